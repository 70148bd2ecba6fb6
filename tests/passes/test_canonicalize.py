"""canonicalize: opset upgrade, initializer inputs, constant folding, onnxsim, shapes.

Tolerance: outputs equal to the input graph's within 1e-5 of their largest magnitude.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphq.errors import PassError
from graphq.passes.canonicalize import Canonicalize
from graphq.registry import PassContext
from tests.helpers import assert_close, bn_node, bn_params, make_model, op_counts, run, tensor

RTOL = 1e-5


def canonicalize(model: onnx.ModelProto, **options):
    before = onnx.ModelProto()
    before.CopyFrom(model)
    result = Canonicalize(**options).run(model, PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    return before, result


def old_style_model(opset: int = 9) -> onnx.ModelProto:
    """Like the model-zoo graphs: a weight built by ConstantOfShape from a shape initializer
    that is also a graph input, a BN whose parameters are initializers listed as inputs."""
    rng = np.random.default_rng(0)
    params = bn_params(rng, 4)
    shape = np.array([4, 3, 3, 3], np.int64)
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w"],
                         value=numpy_helper.from_array(np.array([0.05], np.float32))),
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        bn_node("c", "b"),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    inits = {"w_shape": shape, **params}
    inputs = [tensor("x", [1, 3, 8, 8]), tensor("w_shape", [4], TensorProto.INT64)]
    inputs += [tensor(k, [4]) for k in params]
    model = make_model(nodes, inputs, [tensor("y", [1, 4, 8, 8])], inits, opset=opset)
    model.ir_version = 3
    model.producer_name = "old-exporter"
    model.doc_string = "kept"
    onnx.helper.set_model_props(model, {"author": "someone"})
    return model


def feeds():
    return {"x": np.random.default_rng(1).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)}


def test_old_style_model_is_canonicalized():
    before, result = canonicalize(old_style_model())
    model = result.model
    assert result.changed
    assert [o.version for o in model.opset_import if o.domain == ""] == [13]
    assert model.ir_version >= 7
    assert [i.name for i in model.graph.input] == ["x"]
    assert result.counts["initializer_inputs_removed"] == 5
    assert "ConstantOfShape" not in op_counts(model)
    assert op_counts(model)["BatchNormalization"] == 1  # onnxsim's BN fusion stays off
    w = next(t for t in model.graph.initializer if t.name == "w")
    assert list(w.dims) == [4, 3, 3, 3]
    assert model.producer_name == "old-exporter" and model.doc_string == "kept"
    assert {p.key: p.value for p in model.metadata_props} == {"author": "someone"}
    assert_close(run(before, feeds()), run(model, feeds()), RTOL)


def test_keep_initializer_inputs():
    _, result = canonicalize(old_style_model(), keep_initializer_inputs=["bn_mean"],
                             fold_constants=False, simplify=False)
    assert [i.name for i in result.model.graph.input] == ["x", "bn_mean"]


def test_shapes_are_inferred():
    _, result = canonicalize(old_style_model(), simplify=False)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in result.model.graph.value_info}
    assert shapes["c"] == [1, 4, 8, 8]


def test_opset_13_model_is_left_at_its_opset():
    rng = np.random.default_rng(2)
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [2, 3])],
                       [tensor("y", [2, 3])], opset=17)
    _, result = canonicalize(model)
    assert result.model.opset_import[0].version == 17
    del rng


def test_min_opset_option_upgrades_further():
    _, result = canonicalize(old_style_model(), min_opset=17)
    assert result.model.opset_import[0].version == 17


def test_unconvertible_op_is_named():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("ImageScaler", ["r"], ["y"], name="scaler_1", scale=2.0)],
        [tensor("x", [1, 3, 2, 2])], [tensor("y", [1, 3, 2, 2])], opset=7)
    with pytest.raises(PassError, match="ImageScaler node 'scaler_1'"):
        canonicalize(model)


def test_onnxsim_failure_is_a_warning(monkeypatch, caplog):
    import onnxsim

    def broken(*args, **kwargs):
        raise RuntimeError("simplifier exploded")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    with caplog.at_level(logging.WARNING):
        before, result = canonicalize(old_style_model())
    assert any("simplifier exploded" in n for n in result.notes)
    assert "onnxsim's graph not used" in caplog.text
    assert_close(run(before, feeds()), run(result.model, feeds()), RTOL)


def test_a_simplified_graph_that_moves_the_outputs_is_not_used(monkeypatch, caplog):
    """onnxsim's fusions and folded constants can add up past the pass's tolerance (PP-OCRv5
    mobile rec: 6.8e-4 on a softmax, and the run failed in canonicalize's check): its graph
    is compared with the one it came from on the first batch, and one that moves an output
    beyond the tolerance is dropped with a warning and a note naming the output; the run
    goes on unsimplified."""
    import onnxsim

    real = onnxsim.simplify

    def drifting(model, **kwargs):
        out, ok = real(model, **kwargs)
        weight = next(t for t in out.graph.initializer if t.name == "w")
        values = numpy_helper.to_array(weight) * np.float32(1.01)
        weight.CopyFrom(numpy_helper.from_array(values, "w"))
        return out, ok

    monkeypatch.setattr(onnxsim, "simplify", drifting)
    with caplog.at_level(logging.WARNING):
        before, result = canonicalize(old_style_model())
    (note,) = [n for n in result.notes if n.startswith("onnxsim's graph not used")]
    assert "changed output 'y' beyond canonicalize's tolerance" in note
    assert "onnxsim's graph not used" in caplog.text
    assert_close(run(before, feeds()), run(result.model, feeds()), RTOL)


def test_a_simplified_graph_is_compared_on_every_batch_the_pipeline_checks(monkeypatch,
                                                                          caplog, tmp_path):
    """The pass manager checks canonicalize's outputs on the first piece of each of its
    first batches (2 by default); onnxsim's graph was compared on the first alone, and where
    only a later batch showed its drift (PP-OCRv5 mobile rec on English text lines: 4.6e-4 on
    its softmax in the second batch) the run failed in the pipeline's check. It is compared
    on the pipeline's own feeds now. Here the drift shows only on the second batch: its
    inputs are positive, the first batch's are negative and a Relu zeroes them."""
    import onnxsim

    from graphq.pipeline import PassManager

    real = onnxsim.simplify

    def drifting(model, **kwargs):
        out, ok = real(model, **kwargs)
        weight = next(t for t in out.graph.initializer if t.name == "w")
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.01),
                                                "w"))
        return out, ok

    model = make_model([helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                        helper.make_node("Relu", ["m"], ["y"], name="relu")],
                       [tensor("x", ["N", 4])], [tensor("y", ["N", 3])],
                       {"w": np.full((4, 3), 0.5, np.float32)})
    rng = np.random.default_rng(2)
    data = [{"x": -rng.uniform(1, 2, (4, 4)).astype(np.float32)},
            {"x": rng.uniform(1, 2, (4, 4)).astype(np.float32)}]
    monkeypatch.setattr(onnxsim, "simplify", drifting)
    with caplog.at_level(logging.WARNING):
        result = PassManager([Canonicalize()]).run(model, tmp_path / "out", data=data)
    (note,) = [n for r in result.records for n in r.notes
               if n.startswith("onnxsim's graph not used")]
    assert "changed output 'y' beyond canonicalize's tolerance" in note
    np.testing.assert_allclose(run(result.model, data[1])[0], run(model, data[1])[0],
                               rtol=1e-6)


@pytest.mark.parametrize("simplify", [False, True])
def test_a_weight_shared_through_identities_is_folded_once(simplify):
    """The torch exporter writes each extra use of a shared weight as an Identity of the
    initializer; folding made one copy per use (chython-rxnmap's transformer: 85 MB of
    initializers became 643 MB, 3.3 GB at the peak, before onnxsim merged them). Its readers
    now read the initializer itself: one copy, with or without onnxsim, the same outputs; an
    Identity that makes a graph output stays."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 1, (64, 64)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["w"], ["w1"], name="share1"),
             helper.make_node("Identity", ["w"], ["w2"], name="share2"),
             helper.make_node("Identity", ["w"], ["w_out"], name="exported"),
             helper.make_node("MatMul", ["x", "w"], ["h0"], name="mm0"),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="mm1"),
             helper.make_node("MatMul", ["h1", "w2"], ["y"], name="mm2")]
    model = make_model(nodes, [tensor("x", ["N", 64])],
                       [tensor("y", ["N", 64]), tensor("w_out", [64, 64])], {"w": w})
    before, result = canonicalize(model, simplify=simplify)
    out = result.model
    weights = {n.input[1] for n in out.graph.node if n.op_type == "MatMul"}
    assert len(weights) == 1, weights  # the three MatMuls read one copy
    big = [t.name for t in out.graph.initializer if np.prod(t.dims) == 64 * 64]
    assert len(big) == 2, big  # that one, and the graph output the weight is returned as
    assert result.counts["initializer_identities_dropped"] == 2
    assert "w_out" in {o.name for o in out.graph.output}
    feed = {"x": rng.normal(0, 1, (3, 64)).astype(np.float32)}
    assert_close(run(before, feed), run(out, feed), RTOL)


def test_constant_folding_turns_shape_arithmetic_into_initializers():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Constant", [], ["two"],
                         value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Mul", ["base", "two"], ["scale"]),
        helper.make_node("Mul", ["x", "scale"], ["y"]),
    ]
    model = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])],
                       {"base": rng.normal(0, 1, 3).astype(np.float32)})
    before, result = canonicalize(model, simplify=False)
    assert op_counts(result.model) == {"Mul": 1}
    x = {"x": rng.normal(0, 1, 3).astype(np.float32)}
    assert_close(run(before, x), run(result.model, x), RTOL)


# ---- Sum -> Add ---------------------------------------------------------------------------------
def sum_model(n_inputs: int) -> onnx.ModelProto:
    """Relu(x) summed with n - 1 scaled copies of x (one Sum of n inputs), as old exporters
    write residual sums; the first copy broadcasts a per-channel tensor."""
    names = [f"s{i}" for i in range(n_inputs)]
    nodes = [helper.make_node("Relu", ["x"], ["s0"], name="relu")]
    inits = {}
    for i in range(1, n_inputs):
        inits[f"k{i}"] = np.full((3, 1, 1) if i == 1 else (1,), 0.5 + i, np.float32)
        nodes.append(helper.make_node("Mul", ["x", f"k{i}"], [f"s{i}"], name=f"mul{i}"))
    nodes.append(helper.make_node("Sum", names, ["y"], name="residual"))
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 3, 8, 8])], inits)


@pytest.mark.parametrize("n_inputs", [1, 2, 3, 4])
def test_sum_becomes_add(n_inputs):
    before, result = canonicalize(sum_model(n_inputs), simplify=False)
    model = result.model
    counts = op_counts(model)
    assert "Sum" not in counts and result.counts["sums_rewritten"] == 1
    if n_inputs == 1:
        assert counts["Identity"] == 1
    else:
        assert counts["Add"] == n_inputs - 1
        last = model.graph.node[-1]
        assert (last.op_type, last.name, list(last.output)) == ("Add", "residual", ["y"])
        names = [n.name for n in model.graph.node]
        assert len(set(names)) == len(names)
    assert_close(run(before, feeds()), run(model, feeds()), RTOL)


def test_sum_to_add_can_be_turned_off():
    _, result = canonicalize(sum_model(2), simplify=False, sum_to_add=False)
    assert op_counts(result.model)["Sum"] == 1 and "sums_rewritten" not in result.counts


# ---- channel shuffle -> Gather ------------------------------------------------------------------
def shuffle_model(groups: int = 3, channels: int = 12, perm=(0, 2, 1, 3, 4), batch="N",
                  extra_use: bool = False) -> onnx.ModelProto:
    """Conv -> channel shuffle (Reshape [N, g, C/g, H, W] -> Transpose -> Reshape) -> Conv,
    as ShuffleNet exports it; ``extra_use`` also makes the transposed tensor an output."""
    rng = np.random.default_rng(3)
    split = np.array([0, groups, channels // groups, 6, 6], np.int64)
    back = np.array([0, channels, 6, 6], np.int64)
    inits = {"w1": rng.normal(0, 0.3, (channels, 3, 1, 1)).astype(np.float32),
             "w2": rng.normal(0, 0.3, (channels, 1, 3, 3)).astype(np.float32),
             "split": split, "back": back}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="pw"),
             helper.make_node("Reshape", ["c1", "split"], ["r1"], name="shuffle_reshape"),
             helper.make_node("Transpose", ["r1"], ["t"], name="shuffle_transpose",
                              perm=list(perm)),
             helper.make_node("Reshape", ["t", "back"], ["r2"], name="shuffle_back"),
             helper.make_node("Conv", ["r2", "w2"], ["y"], name="dw", group=channels,
                              pads=[1, 1, 1, 1])]
    outputs = [tensor("y", [batch, channels, 6, 6])]
    if extra_use:
        outputs.append(tensor("t", None))
    return make_model(nodes, [tensor("x", [batch, 3, 6, 6])], outputs, inits)


def shuffle_feeds(batch: int = 2):
    return {"x": np.random.default_rng(4).normal(0, 1, (batch, 3, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize("groups", [2, 3, 4])
def test_channel_shuffle_becomes_one_gather(groups):
    before, result = canonicalize(shuffle_model(groups), simplify=False)
    model = result.model
    assert result.counts["channel_shuffles_rewritten"] == 1
    assert [(n.op_type, n.name) for n in model.graph.node] == [
        ("Conv", "pw"), ("Gather", "shuffle_back"), ("Conv", "dw")]
    gather = model.graph.node[1]
    idx = next(numpy_helper.to_array(t) for t in model.graph.initializer
               if t.name == gather.input[1])
    assert gather.input[0] == "c1" and list(gather.output) == ["r2"]
    assert sorted(idx.tolist()) == list(range(12)) and idx[1] == 12 // groups
    assert {"split", "back"}.isdisjoint(t.name for t in model.graph.initializer)
    assert not {"r1", "t"} & {v.name for v in model.graph.value_info}
    # same values, exactly: a Gather moves the numbers the Transpose moved
    ref, out = run(before, shuffle_feeds()), run(model, shuffle_feeds())
    np.testing.assert_array_equal(ref[0], out[0])


@pytest.mark.parametrize("case", ["other-perm", "transposed-tensor-is-an-output", "off"])
def test_other_reshape_transposes_stay(case):
    model = {"other-perm": lambda: shuffle_model(perm=(0, 1, 2, 4, 3)),
             "transposed-tensor-is-an-output": lambda: shuffle_model(extra_use=True),
             "off": shuffle_model}[case]()
    options = {"shuffle_to_gather": False} if case == "off" else {}
    before, result = canonicalize(model, simplify=False, **options)
    assert "Gather" not in op_counts(result.model)
    assert op_counts(result.model)["Transpose"] == 1
    assert_close(run(before, shuffle_feeds()), run(result.model, shuffle_feeds()), RTOL)


# ---- PRelu -> Max / Relu + Min ------------------------------------------------------------------
def prelu_model(slopes: np.ndarray) -> onnx.ModelProto:
    """Conv -> PRelu (per-channel slopes, shape (C, 1, 1) as exporters write them) -> Conv."""
    rng = np.random.default_rng(5)
    c = slopes.shape[0]
    inits = {"w1": rng.normal(0, 0.5, (c, 3, 3, 3)).astype(np.float32),
             "w2": rng.normal(0, 0.3, (4, c, 1, 1)).astype(np.float32),
             "slope": slopes.astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("PRelu", ["c1", "slope"], ["p"], name="prelu1"),
             helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2")]
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 6, 6])],
                      inits)


@pytest.mark.parametrize("case, ops", [
    ("unit", ["Conv", "Mul", "Max", "Conv"]),
    ("negative", ["Conv", "Relu", "Min", "Mul", "Add", "Conv"]),
    ("above-one", ["Conv", "Relu", "Min", "Mul", "Add", "Conv"])])
def test_prelu_becomes_the_same_values_in_faster_ops(case, ops):
    """Slopes in [0, 1]: Max(x, x * slope); others: Relu(x) + Min(x, 0) * slope. The values
    are the PRelu's bit for bit (onnxruntime, optimizations off), the names unchanged."""
    slopes = {"unit": np.array([0.0, 0.25, 0.5, 1.0, 0.1, 0.75]),
              "negative": np.array([-1.3, 0.25, 0.5, 1.0, -0.2, 0.75]),
              "above-one": np.array([1.3, 0.25, 0.5, 1.0, 0.2, 0.75])}[case]
    before, result = canonicalize(prelu_model(slopes.reshape(-1, 1, 1)), simplify=False)
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    assert result.counts["prelus_rewritten"] == 1
    assert [n.op_type for n in model.graph.node] == ops
    last = model.graph.node[-2]
    assert (last.name, list(last.output)) == ("prelu1", ["p"])
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names)
    feed = {"x": np.random.default_rng(6).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}
    for a, b in zip(run(before, feed), run(model, feed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_prelu_with_a_computed_slope_or_turned_off_stays():
    model = prelu_model(np.full((6, 1, 1), 0.25))
    _, off = canonicalize(model, simplify=False, prelu_to_max=False)
    assert op_counts(off.model)["PRelu"] == 1 and "prelus_rewritten" not in off.counts
    fed = prelu_model(np.full((6, 1, 1), 0.25))
    del fed.graph.initializer[[i.name for i in fed.graph.initializer].index("slope")]
    fed.graph.input.append(tensor("slope", [6, 1, 1]))
    _, result = canonicalize(fed, simplify=False, fold_constants=False)
    assert op_counts(result.model)["PRelu"] == 1 and result.counts["prelus_rewritten"] == 0


# ---- Erf-form GELU -> Gelu ------------------------------------------------------------------
def gelu_model(form: str, opset: int = 13, extra_output: str | None = None) -> onnx.ModelProto:
    """Conv -> GELU written with Erf, in the orders exporters write it -> Conv."""
    rng = np.random.default_rng(8)
    inits = {"w1": rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32),
             "w2": rng.normal(0, 0.3, (4, 6, 1, 1)).astype(np.float32),
             "sqrt2": np.array(np.sqrt(2.0), np.float32),
             "inv_sqrt2": np.array(1 / np.sqrt(2.0), np.float32),
             "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}
    scale = (helper.make_node("Mul", ["inv_sqrt2", "c"], ["s"], name="scale") if form == "mul"
             else helper.make_node("Div", ["c", "sqrt2"], ["s"], name="scale"))
    head = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"), scale,
            helper.make_node("Erf", ["s"], ["e"], name="erf"),
            helper.make_node("Add", ["one", "e"], ["a"], name="plus_one")]
    tail = {  # (1 + erf) * x * 0.5 in each order
        "div": [helper.make_node("Mul", ["c", "a"], ["m"], name="times_x"),
                helper.make_node("Mul", ["m", "half"], ["g"], name="gelu")],
        "mul": [helper.make_node("Mul", ["a", "c"], ["m"], name="times_x"),
                helper.make_node("Mul", ["half", "m"], ["g"], name="gelu")],
        "half-first": [helper.make_node("Mul", ["c", "half"], ["m"], name="half_x"),
                       helper.make_node("Mul", ["m", "a"], ["g"], name="gelu")],
        "half-of-erf": [helper.make_node("Mul", ["a", "half"], ["m"], name="half_erf"),
                        helper.make_node("Mul", ["c", "m"], ["g"], name="gelu")],
    }[form]
    nodes = [*head, *tail, helper.make_node("Conv", ["g", "w2"], ["y"], name="conv2")]
    outputs = [tensor("y", ["N", 4, 6, 6])]
    if extra_output:
        outputs.append(tensor(extra_output, None))
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], outputs, inits, opset=opset)


@pytest.mark.parametrize("form", ["div", "mul", "half-first", "half-of-erf"])
def test_erf_gelu_becomes_one_gelu_raising_the_opset(form):
    """Each order of x * 0.5 * (1 + erf(x / sqrt 2)) becomes Gelu(x) with the last node's
    name and output; "raise-opset" takes the opset from 13 to 20 for it; the values stay
    (onnxruntime, within 1e-5 of the largest output). Fused before onnxsim, which would fold
    the * 0.5 into the next Conv and leave a pattern without it."""
    before, result = canonicalize(gelu_model(form), fuse_gelu="raise-opset")
    model = result.model
    assert result.counts["gelus_fused"] == 1 and result.counts["opset_after"] == 20
    assert [n.op_type for n in model.graph.node] == ["Conv", "Gelu", "Conv"]
    gelu = model.graph.node[1]
    assert (gelu.name, list(gelu.input), list(gelu.output)) == ("gelu", ["c"], ["g"])
    assert not {"sqrt2", "inv_sqrt2", "one", "half"} & {t.name for t in model.graph.initializer}
    assert any("opset 13 -> 20" in n for n in result.notes)
    feed = {"x": np.random.default_rng(9).normal(0, 2, (2, 3, 8, 8)).astype(np.float32)}
    assert_close(run(before, feed), run(model, feed), rtol=RTOL)


def test_erf_gelu_is_fused_by_default_only_at_opset_20():
    """The default ("opset-20") leaves an opset-13 graph's Erf form as it is and fuses an
    opset-20 graph's; "off" leaves both."""
    _, low = canonicalize(gelu_model("div"), simplify=False)
    assert op_counts(low.model)["Erf"] == 1 and low.counts["gelus_fused"] == 0
    assert low.counts["opset_after"] == 13
    _, high = canonicalize(gelu_model("div", opset=20), simplify=False)
    assert op_counts(high.model) == {"Conv": 2, "Gelu": 1} and high.counts["gelus_fused"] == 1
    assert not high.notes
    _, off = canonicalize(gelu_model("div", opset=20), simplify=False, fuse_gelu="off")
    assert op_counts(off.model)["Erf"] == 1 and "gelus_fused" not in off.counts


@pytest.mark.parametrize("read", ["e", "m"])
def test_erf_gelu_whose_inner_tensor_is_read_elsewhere_stays(read):
    """A tensor inside the pattern that is also a graph output keeps the Erf form (and the
    opset: nothing to fuse, nothing raised)."""
    before, result = canonicalize(gelu_model("div", extra_output=read), simplify=False,
                                  fuse_gelu="raise-opset")
    assert op_counts(result.model)["Erf"] == 1 and result.counts["gelus_fused"] == 0
    assert result.counts["opset_after"] == 13
    feed = {"x": np.random.default_rng(10).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)}
    assert_close(run(before, feed), run(result.model, feed), rtol=0)


def test_erf_gelu_with_other_constants_stays():
    """x * (1 + erf(x / 2)) * 0.5 is not GELU: left alone."""
    model = gelu_model("div", opset=20)
    next(t for t in model.graph.initializer if t.name == "sqrt2").CopyFrom(
        numpy_helper.from_array(np.array(2.0, np.float32), "sqrt2"))
    _, result = canonicalize(model, simplify=False)
    assert op_counts(result.model)["Erf"] == 1 and result.counts["gelus_fused"] == 0


def hard_swish_model(form: str, extra_output: str | None = None,
                     three: float = 3.0) -> onnx.ModelProto:
    """Conv -> HardSwish written out, x * Clip(x + 3, 0, 6) / 6 in the orders exporters write
    it (or HardSigmoid, Clip(x + 3, 0, 6) / 6, feeding a Conv) -> Conv."""
    rng = np.random.default_rng(11)
    inits = {"w1": rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32),
             "w2": rng.normal(0, 0.3, (4, 6, 1, 1)).astype(np.float32),
             "three": np.array([three], np.float32), "zero": np.array(0.0, np.float32),
             "six": np.array(6.0, np.float32), "sixth": np.array(1 / 6, np.float32)}
    head = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
            helper.make_node("Add", ["c", "three"], ["a"], name="plus3"),
            helper.make_node("Clip", ["a", "zero", "six"], ["r"], name="relu6")]
    tail = {  # as paddle2onnx writes it; * 1/6 first; the gate alone (HardSigmoid)
        "paddle": [helper.make_node("Mul", ["c", "r"], ["m"], name="times_x"),
                   helper.make_node("Div", ["m", "six"], ["g"], name="hswish")],
        "sixth-first": [helper.make_node("Mul", ["sixth", "r"], ["m"], name="by6"),
                        helper.make_node("Mul", ["m", "c"], ["g"], name="hswish")],
        "gate": [helper.make_node("Div", ["r", "six"], ["g"], name="hsig")],
    }[form]
    nodes = [*head, *tail, helper.make_node("Conv", ["g", "w2"], ["y"], name="conv2")]
    outputs = [tensor("y", ["N", 4, 6, 6])]
    if extra_output:
        outputs.append(tensor(extra_output, None))
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], outputs, inits)


@pytest.mark.parametrize("form", ["paddle", "sixth-first", "gate"])
def test_written_out_hard_swish_becomes_hard_sigmoid_and_mul(form):
    """x * Clip(x + 3, 0, 6) / 6 becomes x * HardSigmoid(x; 1/6, 1/2) (the Mul with the last
    node's name and output, the HardSigmoid with the Clip's), Clip(x + 3, 0, 6) / 6 alone one
    HardSigmoid; the constants go; the values stay (onnxruntime, within 1e-5 of the largest
    output)."""
    before, result = canonicalize(hard_swish_model(form), simplify=False)
    model = result.model
    assert result.counts["hard_swishes_fused"] == 1
    gate = form == "gate"
    assert [n.op_type for n in model.graph.node] == \
        ["Conv", "HardSigmoid", *([] if gate else ["Mul"]), "Conv"]
    hsig = model.graph.node[1]
    assert hsig.name == "relu6" and list(hsig.input) == ["c"]
    assert {a.name: a.f for a in hsig.attribute} == {"alpha": pytest.approx(1 / 6),
                                                     "beta": 0.5}
    if gate:
        assert list(hsig.output) == ["g"]
    else:
        mul = model.graph.node[2]
        assert (mul.name, list(mul.input), list(mul.output)) == \
            ("hswish", ["c", hsig.output[0]], ["g"])
    assert {t.name for t in model.graph.initializer} == {"w1", "w2"}
    feed = {"x": np.random.default_rng(12).normal(0, 2, (2, 3, 8, 8)).astype(np.float32)}
    assert_close(run(before, feed), run(model, feed), rtol=RTOL)


@pytest.mark.parametrize("case", ["output a", "output r", "output m", "plus 2", "off"])
def test_written_out_hard_swish_stays_where_it_is_not_one_or_is_read_elsewhere(case):
    """A tensor inside the pattern that is also a graph output keeps the written-out form;
    so does Clip(x + 2, 0, 6) / 6, which is not HardSwish; fuse_hard_swish = false keeps
    it too."""
    kind, _, arg = case.partition(" ")
    model = hard_swish_model("paddle", extra_output=arg if kind == "output" else None,
                             three=2.0 if kind == "plus" else 3.0)
    _, result = canonicalize(model, simplify=False, fuse_hard_swish=kind != "off")
    assert op_counts(result.model)["Clip"] == 1
    assert result.counts.get("hard_swishes_fused", 0) == 0


def test_erf_gelu_stays_when_the_opset_cannot_be_raised(monkeypatch, caplog):
    """Fusing GELU only makes the graph faster: a model the version converter cannot take to
    opset 20 keeps its Erf form and its opset, with a warning and a note naming why."""
    from graphq.passes import canonicalize as C

    def refuse(model, target):
        raise PassError(f"cannot upgrade the model from opset 13 to {target} at Foo node 'f'")

    monkeypatch.setattr(C, "upgrade_opset", refuse)
    with caplog.at_level(logging.WARNING):
        before, result = canonicalize(gelu_model("div"), simplify=False,
                                      fuse_gelu="raise-opset")
    assert op_counts(result.model)["Erf"] == 1 and result.counts["gelus_fused"] == 0
    assert result.counts["opset_after"] == 13
    assert any("GELU left in its Erf form: cannot upgrade" in n for n in result.notes)
    assert "GELU left in its Erf form" in caplog.text
    feed = {"x": np.random.default_rng(11).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)}
    assert_close(run(before, feed), run(result.model, feed), rtol=RTOL)


def test_an_output_of_unknown_rank_gets_the_rank_a_sample_run_makes():
    """An output whose rank shape inference cannot find (a Reshape to a target whose length
    depends on the data; PP-OCRv5's recognizer ends so after the opset converter dropped its
    declared rank-0 shape) has no shape, which onnx.checker refuses on a graph output: it
    gets as many unknown dims as a run on a sample input makes, with a note."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Greater", ["m", "low"], ["g"]),
             helper.make_node("Cast", ["g"], ["gi"], to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["gi", "axis0"], ["end"]),
             helper.make_node("Slice", ["s", "start", "end"], ["head"]),
             helper.make_node("Concat", ["head", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    inits = {"low": np.array(-1e9, np.float32), "axis0": np.array([0], np.int64),
             "start": np.array([0], np.int64), "rest": np.array([-1], np.int64)}
    graph = helper.make_graph(
        nodes, "g", [tensor("x", ["N", 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(onnx.checker.ValidationError, match="'shape' of 'type' is required"):
        onnx.checker.check_model(model)
    result = Canonicalize(simplify=False).run(model, PassContext())
    (out,) = result.model.graph.output
    assert [d.WhichOneof("value") for d in out.type.tensor_type.shape.dim] == [None, None]
    onnx.checker.check_model(result.model, full_check=True)
    assert "graph output 'y' has no shape after shape inference (its rank is unknown): " \
           "given 2 unknown dims, as a run on a sample input makes" in result.notes
    x = np.random.default_rng(0).normal(0, 1, (2, 4, 3)).astype(np.float32)
    assert run(result.model, {"x": x})[0].shape == (2, 12)


def nhwc_block_model(rng: np.random.Generator, residual: bool = True) -> onnx.ModelProto:
    """A converted TF block: NCHW convolutions wrapped in Transposes to the graph's NHWC
    layout, bias and BN as NHWC arithmetic ([C] constants), a residual Add of two NHWC
    branches, ReLU, and back to NCHW for the next Conv (open_nsfw's export)."""
    c = 6
    w = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
    inits = {"w1": w(c, 3, 3, 3), "w2": w(c, 3, 1, 1), "w3": w(4, c, 3, 3),
             "bias": w(c), "mean": w(c), "scale": np.abs(w(c)) + 0.5, "beta": w(c),
             "bias2": w(1, 1, 1, c), "ten": np.array(10.0, np.float32)}
    to_nhwc, to_nchw = [0, 2, 3, 1], [0, 3, 1, 2]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=to_nchw),
        helper.make_node("Conv", ["x_nchw", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["c1"], ["t1"], perm=to_nhwc),
        helper.make_node("Add", ["t1", "bias"], ["a1"]),
        helper.make_node("Sub", ["a1", "mean"], ["s1"]),
        helper.make_node("Mul", ["scale", "s1"], ["m1"]),  # the constant first
        helper.make_node("Add", ["m1", "beta"], ["b1"]),
        helper.make_node("Conv", ["x_nchw", "w2"], ["c2"]),
        helper.make_node("Transpose", ["c2"], ["t2"], perm=to_nhwc),
        helper.make_node("Add", ["t2", "bias2"], ["b2"]),
        helper.make_node("Add", ["b1", "b2"] if residual else ["b1", "ten"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["r"]),
        helper.make_node("Transpose", ["r"], ["r_nchw"], perm=to_nchw),
        helper.make_node("Conv", ["r_nchw", "w3"], ["y"], pads=[1, 1, 1, 1]),
    ]
    if not residual:
        nodes = [n for n in nodes if n.output[0] not in ("c2", "t2", "b2")]
    return make_model(nodes, [tensor("x", [2, 8, 8, 3])], [tensor("y", [2, 4, 8, 8])], inits)


@pytest.mark.parametrize("residual", [True, False])
def test_transposes_sink_below_elementwise_ops_and_cancel(residual):
    """Each Transpose moves below the elementwise ops that read it alone (constants
    transposed back, a second operand transposed alike taken before its Transpose) and
    the pairs that undo each other go: only the input's layout Transpose is left, and the
    arithmetic follows each Conv for fold-bn. The same values."""
    rng = np.random.default_rng(11)
    before, result = canonicalize(nhwc_block_model(rng, residual), simplify=False)
    counts = op_counts(result.model)
    assert counts["Transpose"] == 1 and result.counts["transposes_dropped"] >= 1
    assert result.model.graph.node[0].op_type == "Transpose"  # the input's, kept
    inits = {t.name: t for t in result.model.graph.initializer}
    conv_out = next(n.output[0] for n in result.model.graph.node if n.op_type == "Conv")
    (reader,) = [n for n in result.model.graph.node if conv_out in n.input]
    assert reader.op_type == "Add" and list(inits[reader.input[1]].dims) == [1, 6, 1, 1]
    x = rng.normal(0, 1, (2, 8, 8, 3)).astype(np.float32)
    assert_close(run(before, {"x": x}), run(result.model, {"x": x}), RTOL)


def test_transposes_read_twice_or_before_a_non_elementwise_op_stay():
    """A Transpose read by two ops, one that is a graph output, and one before an op that is
    not elementwise (a Softmax), or whose other operand is neither constant nor transposed
    alike, stays where it is."""
    rng = np.random.default_rng(12)
    perm = [0, 2, 1]
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=perm),
             helper.make_node("Relu", ["t1"], ["r1"]),
             helper.make_node("Sigmoid", ["t1"], ["s1"]),  # t1 read twice
             helper.make_node("Transpose", ["x"], ["t2"], perm=perm),
             helper.make_node("Softmax", ["t2"], ["s2"], axis=-1),
             helper.make_node("Transpose", ["x"], ["t3"], perm=perm),
             helper.make_node("Add", ["t3", "z"], ["a3"])]  # z: an input, not transposed
    outputs = [tensor(n, [2, 4, 3]) for n in ("r1", "s1", "s2", "a3")]
    model = make_model(nodes, [tensor("x", [2, 3, 4]), tensor("z", [2, 4, 3])], outputs,
                       {"unused": np.zeros(1, np.float32)})
    before, result = canonicalize(model, simplify=False)
    assert result.counts["transposes_moved"] == 0 and result.counts["transposes_dropped"] == 0
    assert op_counts(result.model)["Transpose"] == 3
    feed = {"x": rng.normal(0, 1, (2, 3, 4)).astype(np.float32),
            "z": rng.normal(0, 1, (2, 4, 3)).astype(np.float32)}
    assert_close(run(before, feed), run(result.model, feed), RTOL)


def test_sink_transposes_can_be_turned_off():
    before, result = canonicalize(nhwc_block_model(np.random.default_rng(13)), simplify=False,
                                  sink_transposes=False)
    assert op_counts(result.model)["Transpose"] == 4 and "transposes_moved" not in result.counts
