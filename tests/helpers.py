"""Small helpers shared by the tests: build graphs, run them in onnxruntime, compare."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

#: onnx 1.23's helper writes IR 14; onnxruntime 1.31 reads up to 13.
IR_VERSION = 8


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 13,
               name: str = "test") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k)
                               for k, v in dict(initializers).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    return model


def tensor(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    # no graph optimizations: compare the graph as written, not as onnxruntime rewrites it
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_close(ref: list[np.ndarray], out: list[np.ndarray], rtol: float,
                 atol: float = 0.0) -> None:
    """Each output within ``rtol * max|ref| + atol`` of its reference, everywhere."""
    assert len(ref) == len(out)
    for r, o in zip(ref, out, strict=True):
        assert r.shape == o.shape
        bound = rtol * float(np.max(np.abs(r))) + atol
        err = float(np.max(np.abs(r.astype(np.float64) - o)))
        assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def bn_params(rng: np.random.Generator, c: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    """Non-trivial BN statistics: signed scales, shifted means, variances away from 1."""
    sign = rng.choice([-1.0, 1.0], c)
    return {
        f"{prefix}_scale": (sign * rng.uniform(0.5, 2.0, c)).astype(np.float32),
        f"{prefix}_bias": rng.normal(0, 1, c).astype(np.float32),
        f"{prefix}_mean": rng.normal(0, 1, c).astype(np.float32),
        f"{prefix}_var": rng.uniform(0.2, 3.0, c).astype(np.float32),
    }


def bn_node(x: str, y: str, prefix: str = "bn", name: str = "bn", eps: float = 1e-3):
    return helper.make_node(
        "BatchNormalization",
        [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean", f"{prefix}_var"], [y],
        name=name, epsilon=eps)


def conv_bn_graph(channels: int = 4, batch: int | str = 1, name: str = "tiny",
                  seed: int = 0) -> onnx.GraphProto:
    """x[batch,3,8,8] -> Conv(W[channels,3,3,3], pads 1) -> BatchNormalization -> y."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = {
        "W": rng.standard_normal((c, 3, 3, 3)).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "beta": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.5, 1.5, c).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"],
                         name="bn"),
    ]
    return helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c, 8, 8])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )


def residual_net(rng: np.random.Generator, c: int = 8) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> Relu -> Conv -> Add(residual) -> GlobalAveragePool -> Flatten ->
    Gemm -> y[N,10], with biases: the small conv net of the quantization tests."""
    shapes = {"w1": (0.3, (c, 3, 3, 3)), "b1": (0.1, (c,)), "w2": (0.2, (c, c, 3, 3)),
              "b2": (0.1, (c,)), "wg": (0.3, (10, c)), "bg": (0.1, (10,))}
    inits = {k: rng.normal(0, scale, shape).astype(np.float32)
             for k, (scale, shape) in shapes.items()}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 10])], inits)
