"""graphq.qat.ops: converters for the op versions onnx2torch 1.5.15 lacks.

Each test builds a one-node (or two-node) graph at the opset under test, converts it with
onnx2torch, runs it in torch and in onnxruntime on the same inputs, and compares: float outputs
within rtol 1e-5 (atol 1e-6 for values near zero), integer and bool outputs exactly, and the
dtypes and shapes always. The cases cover what changed between the versions (attributes that
became inputs, allowzero, negative start/end, new modes and reductions). Real models (MiniLM at
the exporter's default opset, zoo and MTCNN graphs upgraded to opset 21) are compared on their
outputs, relative to each output's largest magnitude.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from tests.qat import require_bridge  # noqa: E402

O2T = require_bridge()

from graphq.qat import ops  # noqa: E402
from tests import realmodels  # noqa: E402

RNG = np.random.default_rng(0)
MAX_OPSET = 21


def make_model(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], opset: int,
               consts: dict[str, np.ndarray] | None = None,
               outputs: list[str] | None = None) -> onnx.ModelProto:
    """A model whose inputs are ``feeds``, ``consts`` initializers, and its outputs are
    ``outputs`` (default: the last node's)."""
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype),
                                            a.shape) for name, a in feeds.items()]
    inits = [onnx.numpy_helper.from_array(a, name) for name, a in (consts or {}).items()]
    names = outputs or [o for o in nodes[-1].output if o]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_empty_tensor_value_info(n) for n in names], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=10)
    # check_model wants output shapes, which some of these graphs cannot infer: check each
    # node against its schema at ``opset`` instead (onnxruntime checks the rest), except
    # deprecated ones the checker refuses (GroupNormalization-18, which opset 21 redefined)
    context = onnx.checker.C.CheckerContext()
    context.ir_version = model.ir_version
    context.opset_imports = {"": opset}
    for node in nodes:
        if not onnx.defs.get_schema(node.op_type, opset).deprecated:
            onnx.checker.check_node(node, context)
    return model


def assert_matches(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Convert ``model``, run it in torch and onnxruntime, compare; return torch's outputs."""
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)
    module = O2T.convert(model).eval()
    with torch.no_grad():
        # ascontiguousarray makes a 0-d array 1-d: reshape back
        got = module(*(torch.from_numpy(np.ascontiguousarray(a).reshape(a.shape))
                       for a in feeds.values()))
    got = [t.numpy() for t in (got if isinstance(got, (tuple, list)) else [got])]
    assert len(got) == len(expected)
    for out, ref in zip(got, expected, strict=True):
        assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, out.shape,
                                                                   ref.dtype, ref.shape)
        if np.issubdtype(ref.dtype, np.floating):
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(out, ref)
    return got


def check(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int,
          consts: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    return assert_matches(make_model([node], feeds, opset, consts), feeds)


def floats(*shape: int, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------


def test_every_schema_version_up_to_21_has_a_converter():
    """For each op onnx2torch converts, every schema version from its oldest registered one up
    to opset 21 resolves to a converter."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    registered = defaultdict(set)
    for key in _CONVERTER_REGISTRY:
        registered[(key.domain, key.operation_type)].add(key.version)
    schemas = defaultdict(set)
    for schema in onnx.defs.get_all_schemas_with_history():
        schemas[(schema.domain, schema.name)].add(schema.since_version)
    missing = [f"{op}-{version}" for (domain, op), versions in sorted(registered.items())
               for version in sorted(schemas[(domain, op)])
               if min(versions) <= version <= MAX_OPSET and version not in versions]
    assert not missing


def test_ops_onnx2torch_lacks_are_registered():
    from onnx2torch.node_converters.registry import get_converter

    for op, version in [("Gelu", 20), ("CastLike", 21), ("GroupNormalization", 21),
                        ("Trilu", 14), ("Mish", 18), ("Size", 21), ("ScatterElements", 18)]:
        assert get_converter(op, version).__module__ == ops.__name__


def test_register_is_idempotent():
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    before = dict(_CONVERTER_REGISTRY)
    ops.register()
    assert dict(_CONVERTER_REGISTRY) == before
    # the converters delegated to are still onnx2torch's own, not ours (no recursion)
    assert ops._ORIGINAL and all(c.__module__.startswith("onnx2torch.")
                                 for c in ops._ORIGINAL.values())
    x = floats(2, 3, 4)
    check(helper.make_node("Reshape", ["x", "s"], ["y"]), {"x": x}, 14, {"s": ints(0, -1)})


# ---------------------------------------------------------------------------------------------
# Reduce* 18 / 20
# ---------------------------------------------------------------------------------------------

REDUCE_OPS = ["ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
              "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare"]

# (axes, how axes is given, keepdims, noop_with_empty_axes)
REDUCE_CASES = [
    ([1], "constant", 1, 0),
    ([0, 2], "input", 0, 0),
    ([-1, 0], "constant", 0, 0),
    (None, "absent", 0, 0),
    (None, "absent", 1, 0),
    ([], "constant", 1, 1),
    ([], "input", 0, 0),
]


@pytest.mark.parametrize("case", REDUCE_CASES, ids=lambda c: f"{c[1]}{c[0]}-k{c[2]}-n{c[3]}")
@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reduce_18(op, case):
    axes, given, keepdims, noop = case
    # signed (ReduceL1 with noop_with_empty_axes is |x|), but positive for ReduceLogSum's log
    x = floats(3, 4, 5, low=0.5 if op == "ReduceLogSum" else -1.5, high=1.5)
    feeds, consts, inputs = {"x": x}, {}, ["x"]
    if given == "constant":
        consts["axes"] = ints(*axes)
        inputs.append("axes")
    elif given == "input":
        feeds["axes"] = ints(*axes)
        inputs.append("axes")
    node = helper.make_node(op, inputs, ["y"], keepdims=keepdims, noop_with_empty_axes=noop)
    check(node, feeds, 18, consts)


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
def test_reduce_20_bool(op):
    x = RNG.random((3, 4)) > 0.5
    node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=0)
    check(node, {"x": x}, 20, {"axes": ints(1)})


# ---------------------------------------------------------------------------------------------
# Reshape 14 / 19 / 21, Shape 19 / 21
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [14, 19, 21])
@pytest.mark.parametrize("allowzero, shape, target", [
    (0, (2, 3, 4), (0, -1)),  # 0 copies the input dimension
    (0, (2, 3, 4), (4, 0, 2)),
    (1, (2, 0, 3), (0, 5)),  # 0 is a dimension of size 0
    (1, (2, 3, 4), (6, -1)),
])
def test_reshape(opset, allowzero, shape, target):
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=allowzero)
    got = check(node, {"x": floats(*shape), "shape": ints(*target)}, opset)
    if allowzero and 0 in target:
        assert got[0].shape == (0, 5)


@pytest.mark.parametrize("opset", [19, 21])
@pytest.mark.parametrize("start, end", [(None, None), (1, None), (-2, -1), (-10, 10), (0, -3),
                                        (2, 1)])
def test_shape(opset, start, end):
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    check(helper.make_node("Shape", ["x"], ["y"], **attrs), {"x": floats(2, 3, 4, 5)}, opset)


# ---------------------------------------------------------------------------------------------
# Pad 18 / 19 / 21
# ---------------------------------------------------------------------------------------------

# (mode, pads, axes, constant value, lowest opset)
PAD_CASES = [
    ("constant", [0, 1, 2, 0, 3, 1], None, 1.5, 18),
    ("constant", [1, 2, 0, 3], [1, -1], None, 18),
    ("constant", [0, -1, 1, 0, 2, -2], None, 0.25, 18),
    ("reflect", [0, 2, 1, 0, 1, 3], None, None, 18),
    ("reflect", [1, 2], [0], None, 18),
    ("edge", [1, 0, 2, 2, 1, 0], None, None, 18),
    ("edge", [-1, 2], [-1], None, 18),
    ("wrap", [0, 1, 2, 0, 2, 1], None, None, 19),
    ("wrap", [2, 3], [1], None, 19),
]


@pytest.mark.parametrize("opset", [18, 19, 21])
@pytest.mark.parametrize("case", PAD_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_pad(opset, case):
    mode, pads, axes, value, lowest = case
    if opset < lowest:
        pytest.skip(f"{mode} mode is new in opset {lowest}")
    consts = {"pads": ints(*pads)}
    inputs = ["x", "pads", "value" if value is not None else ""]
    if value is not None:
        consts["value"] = np.array(value, np.float32)
    if axes is not None:
        consts["axes"] = ints(*axes)
        inputs.append("axes")
    check(helper.make_node("Pad", inputs, ["y"], mode=mode), {"x": floats(3, 4, 5)}, opset,
          consts)


# ---------------------------------------------------------------------------------------------
# Split 18
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_outputs, axis, sizes", [(3, 1, None), (2, -1, None), (4, 1, None),
                                                      (2, 1, [2, 5]), (1, 0, None)])
def test_split_18(num_outputs, axis, sizes):
    outputs = [f"y{i}" for i in range(num_outputs)]
    feeds = {"x": floats(2, 7, 6)}
    attrs = {"axis": axis}
    inputs = ["x"]
    if sizes is None:
        attrs["num_outputs"] = num_outputs
    else:
        feeds["split"] = ints(*sizes)
        inputs.append("split")
    check(helper.make_node("Split", inputs, outputs, **attrs), feeds, 18)


# ---------------------------------------------------------------------------------------------
# Resize 18 / 19, AveragePool, Dropout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [18, 19])
@pytest.mark.parametrize("given, values, axes", [
    ("scales", np.array([2.0, 3.0], np.float32), [2, 3]),
    ("scales", np.array([1.0, 1.0, 0.5, 2.0], np.float32), None),
    ("sizes", ints(6, 4), [-2, -1]),
    ("sizes", ints(9), [3]),
])
def test_resize(opset, given, values, axes):
    inputs = ["x", "", "scales"] if given == "scales" else ["x", "", "", "sizes"]
    attrs = {"mode": "linear"} if axes is None else {"mode": "linear", "axes": axes}
    node = helper.make_node("Resize", inputs, ["y"], **attrs)
    check(node, {"x": floats(1, 2, 4, 5)}, opset, {given: values})


@pytest.mark.parametrize("attrs", [{"antialias": 1}, {"keep_aspect_ratio_policy": "not_larger"}])
def test_resize_refuses_new_attributes(attrs):
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear", **attrs)
    model = make_model([node], {"x": floats(1, 1, 4, 4)}, 18, {"sizes": ints(1, 1, 2, 2)})
    with pytest.raises(NotImplementedError, match=next(iter(attrs))):
        O2T.convert(model)


@pytest.mark.parametrize("opset", [11, 19])
@pytest.mark.parametrize("pads, count_include_pad", [
    ([0, 0, 1, 1], 0), ([2, 0, 0, 1], 0), ([2, 0, 0, 1], 1), ([1, 1, 1, 1], 0)])
def test_average_pool(opset, pads, count_include_pad):
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 2], strides=[2, 1],
                            pads=pads, count_include_pad=count_include_pad)
    check(node, {"x": floats(2, 3, 7, 6)}, opset)


def test_average_pool_refuses_dilations():
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])
    with pytest.raises(NotImplementedError, match="dilations"):
        O2T.convert(make_model([node], {"x": floats(1, 1, 6, 6)}, 19))


def dropout_model(opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Dropout with both outputs used (onnx2torch's returns only the first): y * float(mask)."""
    inputs = ["x"] if opset < 12 else ["x", "ratio"]
    consts = {} if opset < 12 else {"ratio": np.array(0.3, np.float32)}
    nodes = [helper.make_node("Dropout", inputs, ["y", "mask"]),
             helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["y", "m"], ["z"])]
    feeds = {"x": floats(2, 3)}
    return make_model(nodes, feeds, opset, consts), feeds


@pytest.mark.parametrize("opset", [12, 13])
def test_dropout_mask_output(opset):
    assert_matches(*dropout_model(opset))


def test_dropout_10_mask_output():
    """onnxruntime's Dropout-10 returns an all-false mask at inference; the spec and onnx's
    reference implementation an all-true one, as here."""
    from onnx.reference import ReferenceEvaluator

    model, feeds = dropout_model(10)
    expected = ReferenceEvaluator(model).run(None, feeds)[0]
    with torch.no_grad():
        got = O2T.convert(model).eval()(torch.from_numpy(feeds["x"])).numpy()
    np.testing.assert_array_equal(expected, feeds["x"])
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------------------------
# IsInf, ScatterND, ScatterElements, Cast, CastLike
# ---------------------------------------------------------------------------------------------


GATHER_INDICES = {"scalar": np.array(2, np.int64), "repeated": ints(0, 3, 2, 0),
                  "negative": ints(0, -1, 2, -4),
                  "2-D-int32": np.array([[1, -3], [0, 1]], np.int32)}


@pytest.mark.parametrize("opset, indices", [
    (opset, name) for opset in (1, 11, 13) for name in GATHER_INDICES
    if opset >= 11 or (GATHER_INDICES[name] >= 0).all()])  # negatives: from Gather-11 on
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather(opset, indices, axis):
    check(helper.make_node("Gather", ["data", "indices"], ["y"], axis=axis),
          {"data": floats(4, 4, 5), "indices": GATHER_INDICES[indices]}, opset)


def test_gather_of_a_shape_is_int64():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i"], ["y"], axis=0)]
    feeds = {"x": floats(2, 3, 4), "i": np.array(-1, np.int64)}
    got = assert_matches(make_model(nodes, feeds, 13), feeds)
    assert got[0].tolist() == 4


def test_gather_gradient_is_deterministic():
    """A trainable table read at repeated rows gets the same gradient, bit for bit, each
    backward (onnx2torch's advanced-indexing Gather sums repeats in varying order on CPU),
    and the gradient is the rows' summed upstream gradient."""
    table = floats(6000, 64)
    node = helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)
    model = make_model([node], {"ids": np.zeros((32, 64), np.int64)}, 13, {"table": table})
    module = O2T.convert(model)
    (leaf,) = [t for t in (*module.parameters(), *module.buffers()) if t.shape == table.shape]
    leaf.requires_grad_(True)
    ids = torch.from_numpy(RNG.integers(0, 40, (32, 64)))
    upstream = torch.from_numpy(floats(32, 64, 64))
    grads = []
    for _ in range(6):
        leaf.grad = None
        module(ids).backward(upstream)
        grads.append(leaf.grad.clone())
    for grad in grads[1:]:
        assert torch.equal(grad, grads[0])
    expected = np.zeros_like(table)
    np.add.at(expected, ids.numpy().reshape(-1), upstream.numpy().reshape(-1, 64))
    np.testing.assert_allclose(grads[0].numpy(), expected, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("opset", [10, 20])
@pytest.mark.parametrize("positive, negative", [(1, 1), (1, 0), (0, 1), (0, 0)])
def test_is_inf(opset, positive, negative):
    x = np.array([1.0, np.inf, -np.inf, np.nan, -2.0], np.float32)
    node = helper.make_node("IsInf", ["x"], ["y"], detect_positive=positive,
                            detect_negative=negative)
    check(node, {"x": x}, opset)


@pytest.mark.parametrize("reduction, opset", [("none", 16), ("none", 18), ("add", 16),
                                              ("mul", 16), ("max", 18), ("min", 18)])
def test_scatter_nd(reduction, opset):
    data = floats(4, 3, 2)
    # a repeated row (except with reduction none, where repeats are undefined), a negative index
    rows = [[-1, 0], [1, 2], [0, 1]] if reduction == "none" else [[-1, 0], [1, 2], [-1, 0]]
    node = helper.make_node("ScatterND", ["data", "indices", "updates"], ["y"],
                            reduction=reduction)
    check(node, {"data": data, "indices": np.array(rows, np.int64),
                 "updates": floats(3, 2)}, opset)


def test_scatter_nd_whole_slices():
    node = helper.make_node("ScatterND", ["data", "indices", "updates"], ["y"])
    check(node, {"data": floats(4, 3, 2), "indices": ints(2, 0).reshape(2, 1),
                 "updates": floats(2, 3, 2)}, 18)


@pytest.mark.parametrize("reduction, opset", [("none", 11), ("none", 13), ("add", 16),
                                              ("mul", 16), ("max", 18), ("min", 18)])
@pytest.mark.parametrize("axis", [0, -1])
def test_scatter_elements(reduction, opset, axis):
    data = floats(3, 4)
    indices = np.array([[0, -1, 2], [1, 0, -1]], np.int64)
    if reduction == "none":  # distinct targets along the axis
        indices = np.array([[0, -1, 2], [1, 0, -3]], np.int64) if axis else \
            np.array([[0, -1, 2], [1, 0, 0]], np.int64)
    if axis == -1:
        indices = indices.astype(np.int32)  # int32 indices are allowed too
    attrs = {} if reduction == "none" else {"reduction": reduction}  # attribute since 16
    node = helper.make_node("ScatterElements", ["data", "indices", "updates"], ["y"], axis=axis,
                            **attrs)
    check(node, {"data": data, "indices": indices, "updates": floats(2, 3)}, opset)


CAST_CASES = [
    (np.array([-2.7, -0.5, 0.0, 1.5, 3.9], np.float32), TensorProto.INT32),
    (np.array([-2.7, 0.0, -0.0, np.nan, 3.9], np.float32), TensorProto.BOOL),
    (np.array([0.1, 70000.0, -3.3], np.float32), TensorProto.FLOAT16),
    (np.array([0, 7, 65535], np.int64), TensorProto.UINT16),
    (np.array([-3, 5, 1 << 40], np.int64), TensorProto.DOUBLE),
    (np.array([True, False]), TensorProto.FLOAT),
    (np.array([300, -56, 7], np.int32), TensorProto.INT8),
]


@pytest.mark.parametrize("opset", [13, 19, 21])
@pytest.mark.parametrize("x, to", CAST_CASES,
                         ids=[f"{x.dtype}-{TensorProto.DataType.Name(to)}" for x, to in CAST_CASES])
def test_cast(opset, x, to):
    check(helper.make_node("Cast", ["x"], ["y"], to=to), {"x": x}, opset)


@pytest.mark.parametrize("opset", [13, 19, 21])
def test_cast_bfloat16_round_trip(opset):
    to_bf16 = helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16)
    back = helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT)
    feeds = {"x": np.array([1.0, 1.00390625, 3.14159, -1e-3, 65504.0], np.float32)}
    assert_matches(make_model([to_bf16, back], feeds, opset), feeds)


def test_cast_refuses_float8():
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E4M3FN)
    with pytest.raises(NotImplementedError, match="FLOAT8E4M3FN"):
        O2T.convert(make_model([node], {"x": floats(3)}, 19))


@pytest.mark.parametrize("opset", [15, 19, 21])
@pytest.mark.parametrize("x, like", [
    (np.array([-1.7, 2.2], np.float32), np.zeros(1, np.int64)),
    (np.array([3, -4], np.int32), np.zeros(1, np.float16)),
])
def test_cast_like(opset, x, like):
    check(helper.make_node("CastLike", ["x", "like"], ["y"]), {"x": x, "like": like}, opset)


# ---------------------------------------------------------------------------------------------
# versions that reuse onnx2torch's converter
# ---------------------------------------------------------------------------------------------


def same_as_case(op: str) -> tuple[onnx.NodeProto, dict[str, np.ndarray],
                                   dict[str, np.ndarray]]:
    """A node of ``op``, its inputs, and its constant inputs."""
    x = floats(2, 3, 4)
    if op == "Unsqueeze":  # constant axes, as exporters write them
        return helper.make_node("Unsqueeze", ["x", "axes"], ["y"]), {"x": x}, {"axes": ints(-1, 1)}
    cases = {
        "Constant": (helper.make_node("Constant", [], ["y"],
                                      value=onnx.numpy_helper.from_array(floats(2, 2))), {}),
        "ConstantOfShape": (helper.make_node(
            "ConstantOfShape", ["s"], ["y"],
            value=helper.make_tensor("v", TensorProto.INT32, [1], [7])), {"s": ints(2, 3)}),
        "Equal": (helper.make_node("Equal", ["a", "b"], ["y"]),
                  {"a": ints(1, 2, 3), "b": ints(1, 0, 3)}),
        "Flatten": (helper.make_node("Flatten", ["x"], ["y"], axis=2), {"x": x}),
        "GreaterOrEqual": (helper.make_node("GreaterOrEqual", ["a", "b"], ["y"]),
                           {"a": x, "b": np.round(x)}),
        "LessOrEqual": (helper.make_node("LessOrEqual", ["a", "b"], ["y"]),
                        {"a": x, "b": np.round(x)}),
        "Identity": (helper.make_node("Identity", ["x"], ["y"]), {"x": x}),
        "IsNaN": (helper.make_node("IsNaN", ["x"], ["y"]),
                  {"x": np.array([1.0, np.nan, np.inf], np.float32)}),
        "Shape": (helper.make_node("Shape", ["x"], ["y"], start=-2), {"x": x}),
        "Transpose": (helper.make_node("Transpose", ["x"], ["y"], perm=[2, 0, 1]), {"x": x}),
    }
    return *cases[op], {}


SAME_AS = [(op, v) for op, (_, versions) in ops._SAME_AS.items() for v in versions]


@pytest.mark.parametrize("op, opset", SAME_AS, ids=[f"{op}-{v}" for op, v in SAME_AS])
def test_reused_converter(op, opset):
    node, feeds, consts = same_as_case(op)
    check(node, feeds, opset, consts)


# ---------------------------------------------------------------------------------------------
# ops onnx2torch lacks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_20(approximate):
    node = helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)
    check(node, {"x": floats(3, 8, low=-5, high=5)}, 20)


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization(opset):
    channels, groups = 6, 3
    params = groups if opset == 18 else channels  # per group at 18, per channel at 21
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"],
                            num_groups=groups, epsilon=1e-3)
    check(node, {"x": floats(2, channels, 4, 5)}, opset,
          {"scale": floats(params), "bias": floats(params)})


@pytest.mark.parametrize("upper", [0, 1])
@pytest.mark.parametrize("k", [None, -1, 2])
def test_trilu(upper, k):
    consts = {} if k is None else {"k": np.array(k, np.int64)}
    inputs = ["x"] if k is None else ["x", "k"]
    node = helper.make_node("Trilu", inputs, ["y"], upper=upper)
    check(node, {"x": floats(2, 4, 5)}, 14, consts)


@pytest.mark.parametrize("opset", [13, 19, 21])
def test_size(opset):
    check(helper.make_node("Size", ["x"], ["y"]), {"x": floats(2, 3, 5)}, opset)


@pytest.mark.parametrize("op, low, high", [("Sinh", -3, 3), ("Cosh", -3, 3), ("Asinh", -3, 3),
                                           ("Acosh", 1.01, 5), ("Atanh", -0.95, 0.95)])
def test_hyperbolic(op, low, high):
    check(helper.make_node(op, ["x"], ["y"]), {"x": floats(4, 5, low=low, high=high)}, 13)


@pytest.mark.parametrize("node, opset", [
    (helper.make_node("Mish", ["x"], ["y"]), 18),
    (helper.make_node("GlobalMaxPool", ["x"], ["y"]), 13),
    (helper.make_node("ThresholdedRelu", ["x"], ["y"], alpha=0.5), 13),
], ids=["Mish", "GlobalMaxPool", "ThresholdedRelu"])
def test_activations_and_pools(node, opset):
    check(node, {"x": floats(2, 3, 4, 5)}, opset)


# ---------------------------------------------------------------------------------------------
# real models
# ---------------------------------------------------------------------------------------------


def assert_model_matches(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """Outputs of the converted ``model`` within 1e-5 of onnxruntime's, relative to each
    output's largest magnitude."""
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)
    module = O2T.convert(model).eval()
    names = [i.name for i in session.get_inputs()]
    with torch.no_grad():
        got = module(*(torch.from_numpy(feeds[n]) for n in names))
    got = got if isinstance(got, (tuple, list)) else [got]
    assert len(got) == len(expected)
    for out, ref in zip(got, expected, strict=True):
        assert out.shape == ref.shape
        err = np.max(np.abs(out.numpy() - ref)) / np.max(np.abs(ref))
        assert err < 1e-5


def _export_minilm_default_opset(path) -> None:
    model = realmodels.minilm_torch()
    feed = realmodels.minilm_feeds(1, batch_size=2)[0]
    inputs = realmodels.MINILM_INPUTS
    axes = {k: {0: "batch", 1: "sequence"} for k in inputs}
    torch.onnx.export(model, tuple(torch.from_numpy(feed[k]) for k in inputs), str(path),
                      dynamo=False, input_names=list(inputs),
                      output_names=list(realmodels.MINILM_OUTPUTS), dynamic_axes=axes)


def test_minilm_at_the_exporters_default_opset():
    pytest.importorskip("transformers")
    try:
        realmodels.minilm_model_dir()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    name = f"minilm-l6-v2-torch{torch.__version__}-default-opset-" \
           f"{realmodels._CACHE_VERSION}.onnx"
    model = onnx.load(str(realmodels._cached(name, _export_minilm_default_opset)))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 18, f"the exporter's default opset is {opset}"
    feeds = realmodels.minilm_feeds(2, batch_size=3)
    for feed in feeds:
        assert_model_matches(model, feed)


def _zoo_at_21(stem: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = onnx.load(str(realmodels.randomized_zoo_onnx(stem)))
    return onnx.version_converter.convert_version(model, MAX_OPSET), \
        realmodels.zoo_feeds(model, n=1)[0]


@pytest.mark.parametrize("stem", ["light_squeezenet", "light_inception_v1"])
def test_zoo_model_at_opset_21(stem):
    """squeezenet: Dropout with its mask output; inception_v1: AveragePool with pads
    [0, 0, 1, 1]; both at opset 21 (ConstantOfShape, Reshape, Transpose ... 21)."""
    model, feed = _zoo_at_21(stem)
    assert_model_matches(model, feed)


def test_mtcnn_onet_at_opset_21():
    pytest.importorskip("skimage")  # the photos mtcnn_feeds crops
    try:
        path = realmodels.mtcnn_onnx()["onet"]
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    model = onnx.version_converter.convert_version(onnx.load(str(path)), MAX_OPSET)
    assert_model_matches(model, realmodels.mtcnn_feeds("onet", n=1, batch=2)[0])
