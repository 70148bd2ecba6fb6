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
    assert "onnxsim did not run" in caplog.text
    assert_close(run(before, feeds()), run(result.model, feeds()), RTOL)


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
