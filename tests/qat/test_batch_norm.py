"""Batch normalization in the loop for QAT (``batch_norm = true``), on the shipped digits CNN.

fold-bn records the Convs it folded a BatchNormalization into; the bridge trains those with
batch statistics again (:class:`graphq.qat.modules.ConvBatchNorm`) and write-back folds them
back. Checked: the record; the converted module equals the folded graph until it trains; the
first training batch changes nothing; the training forward is torch's batch norm on the Conv's
unfolded output; a per-channel weight step follows the fold (``fq(W; step) * s`` is ``W * s``
on the grid ``step * s``, and fold() writes that grid); after training, the written-back
graph in onnxruntime matches the module, folded and before the fold, within one quantization
step; bad use names the problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.qat import require_bridge

require_bridge()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from graphq import qat, runtime  # noqa: E402
from graphq.errors import GraphqError  # noqa: E402
from graphq.kernels import fakequant as FQ  # noqa: E402
from graphq.kernels.fakequant import FakeQuantize  # noqa: E402
from graphq.passes.emit import deploy_graph  # noqa: E402
from graphq.passes.fold_bn import folded_convs  # noqa: E402
from graphq.pipeline import PassManager  # noqa: E402
from graphq.qat.modules import ConvBatchNorm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"
MODEL = DIGITS / "digits_cnn.onnx"
CONVS = ["/features/features.0/Conv", "/features/features.3/Conv",
         "/features/features.7/Conv", "/features/features.10/Conv"]

PTQ = """
[pipeline]
verify = "off"
[data]
batch_size = 32
[[passes]]
name = "canonicalize"
[[passes]]
name = "fold-bn"
[[passes]]
name = "insert-qdq"
weights = { dtype = "int8", reduce_range = true }
[[passes]]
name = "calibrate"
method = "percentile"
"""


@pytest.fixture(scope="module")
def calibrated() -> onnx.ModelProto:
    return PassManager.from_text(PTQ).run(MODEL, data=DIGITS / "calib.npz").model


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.load(DIGITS / "calib.npz")["image"]


def test_fold_bn_records_the_convs_it_folded_into(calibrated, tmp_path):
    assert folded_convs(onnx.load(str(MODEL))) == []
    assert folded_convs(calibrated) == CONVS  # kept through insert-qdq and calibrate
    files = PassManager.from_text('[pipeline]\nverify = "off"\n[[passes]]\nname = "emit"\n'
                                  'latency_runs = 0\n').run(
        calibrated, tmp_path, data=DIGITS / "calib.npz", stem="digits").files
    assert folded_convs(onnx.load(str(files["digits.fakequant.onnx"]))) == CONVS
    assert folded_convs(onnx.load(str(files["digits.deploy.onnx"]))) == []  # internal


def test_module_is_the_folded_graph_until_it_trains_and_the_first_batch_changes_nothing(
        calibrated, images):
    plain = qat.prepare(calibrated, method="ste")
    bridge = qat.prepare(calibrated, method="ste", batch_norm=True)
    assert bridge.module.graphq_counts["batch_norms"] == 4
    assert sum(isinstance(m, ConvBatchNorm) for m in bridge.module.modules()) == 4
    x = torch.from_numpy(images[:64])
    plain.module.eval()
    bridge.module.eval()
    with torch.no_grad():
        ref = plain.module(x)
        torch.testing.assert_close(bridge.module(x), ref, rtol=0, atol=0)
        bridge.module.train()
        first = bridge.module(x)       # starts the statistics on this batch
    # the folded graph again, but for the float bias (int32 grid step) and float rounding
    torch.testing.assert_close(first, ref, rtol=1e-4, atol=1e-4)


def test_training_forward_is_batch_norm_of_the_unfolded_output(calibrated, images):
    bridge = qat.prepare(calibrated, method="ste", batch_norm=True)
    bn = next(m for m in bridge.module.modules() if isinstance(m, ConvBatchNorm))
    x = torch.randn(32, bn.weight.weight.shape[1], 8, 8)
    bn.train()
    bn(x)                                   # start
    with torch.no_grad():
        bn.gamma.mul_(1.5)
        bn.beta.add_(0.25)
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    x2 = 2.0 * torch.randn(32, bn.weight.weight.shape[1], 8, 8) + 0.5
    y = bn(x2)
    s = bn.gamma / torch.sqrt(var0 + bn.eps)
    assert bn.step_follows  # per-channel weight scales: the unfolded weight is quantized
    w = bn.weight.quant(bn.weight.weight) * s.reshape(-1, 1, 1, 1)
    u = bn.conv(x2, w) / s.reshape(1, -1, 1, 1)
    expected = F.batch_norm(u, mean0.clone(), var0.clone(), bn.gamma, bn.beta, training=True,
                            momentum=0.1, eps=bn.eps)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    n = u.numel() / u.shape[1]
    torch.testing.assert_close(bn.running_mean, 0.9 * mean0 + 0.1 * u.mean((0, 2, 3)))
    torch.testing.assert_close(
        bn.running_var, 0.9 * var0 + 0.1 * u.var((0, 2, 3), unbiased=False) * n / (n - 1))
    # the module's gradients are the formula's (the fold's scale cancels in u, not dropped)
    target = torch.randn_like(y)
    (y * target).sum().backward()
    got = {n: p.grad.clone() for n, p in bn.named_parameters() if p.grad is not None}
    assert {"gamma", "beta", "weight.weight"} <= set(got)
    bn.zero_grad()
    s = bn.gamma / torch.sqrt(var0 + bn.eps)
    u = bn.conv(x2, bn.weight.quant(bn.weight.weight) * s.reshape(-1, 1, 1, 1))
    u = u / s.reshape(1, -1, 1, 1)
    (F.batch_norm(u, mean0.clone(), var0.clone(), bn.gamma, bn.beta, training=True,
                  momentum=0.1, eps=bn.eps) * target).sum().backward()
    for name, grad in got.items():
        ref = dict(bn.named_parameters())[name].grad
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_trained_module_written_back_matches_onnxruntime(calibrated, images):
    bridge = _trained_lsq_batch_norm(calibrated, images)
    bn = next(m for m in bridge.module.modules() if isinstance(m, ConvBatchNorm))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    before = [n.name for n in calibrated.graph.node]
    written = bridge.write_back()              # folds every batch norm into its Conv
    assert [n.name for n in written.graph.node] == before
    assert not bool(bn.started)
    onnx.checker.check_model(written, full_check=True)
    x = images[:128]
    bridge.module.eval()
    with torch.no_grad():
        got = bridge.module(torch.from_numpy(x)).numpy()
    out = runtime.session(written).run(None, {"image": x})[0]
    step = float(np.max(np.abs(out))) / 127  # a generous output step
    assert np.mean(np.abs(got - out) <= step) >= 0.999
    teacher = runtime.session(calibrated).run(None, {"image": x})[0]
    assert not np.allclose(out, teacher, atol=1e-3)  # it trained


def test_batch_norm_needs_the_fold_bn_record(images):
    bare = PassManager.from_text(PTQ.replace('[[passes]]\nname = "fold-bn"\n', "")).run(
        MODEL, data=DIGITS / "calib.npz").model
    assert folded_convs(bare) == []
    with pytest.raises(GraphqError, match="records no Conv that fold-bn folded"):
        qat.prepare(bare, batch_norm=True)


def test_frozen_batch_norm_trains_the_folded_form(calibrated, images):
    bridge = qat.prepare(calibrated, method="ste", batch_norm=True)
    x = torch.from_numpy(images[:32])
    bridge.module.train()
    bridge.module(x)                               # start
    assert bridge.freeze_batch_norm() == 4
    stats = [m.running_var.clone() for m in bridge.module.modules()
             if isinstance(m, ConvBatchNorm)]
    x2 = torch.from_numpy(images[32:64])
    y = bridge.module(x2)
    bridge.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(y.detach(), bridge.module(x2), rtol=0, atol=0)
    after = [m.running_var for m in bridge.module.modules() if isinstance(m, ConvBatchNorm)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after, strict=True))
    y.sum().backward()
    bn = next(m for m in bridge.module.modules() if isinstance(m, ConvBatchNorm))
    assert bn.gamma.grad is not None and bn.beta.grad is not None


@pytest.mark.parametrize("method", ["ste", "lsq", "pact"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rescaled_step_is_the_grid_of_the_scaled_tensor(method, symmetric):
    zero, learn = None, {}  # symmetric, and PACT's unsigned grid: the zero point is fixed
    if not symmetric and method != "pact":
        zero = np.array([-3.0, 0.0, 5.0], np.float32)
        learn = {"learn_zero_point": True} if method == "lsq" else {}
    steps = np.array([0.02, 0.05, 0.01], np.float32)
    q = FakeQuantize("int8", symmetric=symmetric, axis=0, method=method, scale=steps,
                     zero_point=zero, **learn)
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5)
    c = torch.tensor([0.5, 1.7, 3.0])
    with torch.no_grad():
        before = q(x) * c.reshape(-1, 1, 1, 1)
        zp = q.qparams()[1]
        q.rescale(c)
        after = q(x * c.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(q.step(), torch.from_numpy(steps) * c, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(q.qparams()[1], zp)  # the zero point stays
    grid = (torch.from_numpy(steps) * c).reshape(-1, 1, 1, 1)
    off = (after - before).abs() / grid
    assert float(off.max()) <= 1.0 + 1e-4           # a rounding tie may flip by one step
    assert float((off > 1e-4).float().mean()) <= 0.01
    with pytest.raises(ValueError, match="one factor or 3"):
        q.rescale(torch.ones(2))
    with pytest.raises(ValueError, match=">= 0"):
        q.rescale(torch.tensor([1.0, -1.0, 1.0]))


def _perturbed_batch_norm(bridge: qat.Bridge, index: int) -> ConvBatchNorm:
    """The ``index``-th ConvBatchNorm of ``bridge``, started, with ``s`` far from 1 (running
    variance and gamma moved per channel, one gamma learned past zero)."""
    bn = [m for m in bridge.module.modules() if isinstance(m, ConvBatchNorm)][index]
    bn.train()
    bn(torch.randn(32, bn.weight.weight.shape[1], 8, 8))  # start
    c = bn.gamma.numel()
    with torch.no_grad():
        bn.running_var.mul_(torch.rand(c) * 3.0 + 0.25)
        bn.gamma.mul_(torch.rand(c) * 1.5 + 0.5)
        bn.gamma[1] = -bn.gamma[1]
        bn.beta.add_(torch.randn(c) * 0.1)
    return bn


@pytest.mark.parametrize("method", ["ste", "lsq"])
def test_weight_step_follows_the_fold(calibrated, method):
    torch.manual_seed(0)
    bn = _perturbed_batch_norm(qat.prepare(calibrated, method=method, batch_norm=True), 1)
    q, w = bn.weight.quant, bn.weight.weight.detach().clone()
    assert bn.step_follows and q.axis == 0
    qt = q.qtype
    s = bn.scale().detach()
    step = q.step()
    col = (-1, 1, 1, 1)
    x = 2.0 * torch.randn(16, w.shape[1], 8, 8) + 0.5
    # the folded weight W * s on the grid step * |s|: equivariance (ties may flip one step)
    folded = FQ.fake_quantize_ste(w * s.reshape(col), step * s.abs(), 0.0, qt.qmin, qt.qmax,
                                  axis=0)
    with torch.no_grad():
        got = bn.folded_weight(s)
    off = (got - folded).abs() / (step * s.abs()).reshape(col)
    assert float(off.max()) <= 1.0 + 1e-4 and float((off > 1e-4).float().mean()) <= 1e-3
    stale = q(w * s.reshape(col))                  # a step that does not follow the fold
    assert float(((stale - folded).abs() > 1e-6).float().mean()) > 0.3
    with torch.no_grad():
        bn.train()
        mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
        y = bn(x)
        u = bn.conv(x, folded) / s.reshape(1, -1, 1, 1)
        expected = F.batch_norm(u, mean0, var0, bn.gamma, bn.beta, training=True,
                                momentum=bn.momentum, eps=bn.eps)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
        bn.eval()
        s = bn.scale()                              # the running variance moved
        folded = FQ.fake_quantize_ste(w * s.reshape(col), step * s.abs(), 0.0, qt.qmin,
                                      qt.qmax, axis=0)
        y = bn(x)
        shift = (bn.beta - s * bn.running_mean).reshape(1, -1, 1, 1)
        torch.testing.assert_close(y, bn.conv(x, folded) + shift, rtol=1e-4, atol=1e-4)
        bn.fold()                                   # write-back's first step
        torch.testing.assert_close(q.step(), step * s.abs(), rtol=1e-6, atol=0)
        torch.testing.assert_close(bn.weight.weight, w * s.reshape(col), rtol=0, atol=0)
        assert not bool(bn.started)
        # the folded module (weight, grid, int32 bias) computes what the module computed
        torch.testing.assert_close(bn(x), y, rtol=1e-4, atol=1e-4)


def test_trained_lsq_batch_norms_written_back_match_the_module_before_the_fold(calibrated,
                                                                              images):
    """The module's own output (batch norms in the loop, not yet folded) against the
    written-back graph, fake-quant and deploy form, in onnxruntime: the learned steps times
    ``|s|`` are the written weight scales."""
    bridge = _trained_lsq_batch_norm(calibrated, images)
    norms = [m for m in bridge.module.modules() if isinstance(m, ConvBatchNorm)]
    with torch.no_grad():  # as if gamma had trained longer: s far from 1
        for bn in norms:
            bn.gamma.mul_(torch.rand(bn.gamma.numel()) * 1.5 + 0.5)
    expected = {bn.weight.onnx_names["scale"]: (bn.weight.quant.step() * bn.scale().abs())
                .detach().numpy() for bn in norms}
    x = images[:128]
    bridge.module.eval()
    with torch.no_grad():
        got = bridge.module(torch.from_numpy(x)).numpy()
    written = bridge.write_back()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    for name, scale in expected.items():
        np.testing.assert_allclose(inits[name], scale, rtol=1e-6)
    deploy = deploy_graph(written)[0]
    onnx.checker.check_model(deploy, full_check=True)
    step = float(np.max(np.abs(got))) / 127  # a generous output step
    for graph in (written, deploy):
        out = runtime.session(graph).run(None, {"image": x})[0]
        assert np.mean(np.abs(got - out) <= step) >= 0.999
        assert np.mean(np.abs(got - out) <= step / 8) >= 0.99


def _trained_lsq_batch_norm(calibrated, images) -> qat.Bridge:
    """The calibrated graph's bridge (LSQ, batch norms in the loop) after 12 SGD steps towards
    1.1x the teacher's output: statistics, gamma, weights and steps all moved."""
    torch.manual_seed(0)
    bridge = qat.prepare(calibrated, method="lsq", batch_norm=True)
    teacher = runtime.session(calibrated)
    opt = torch.optim.SGD(bridge.parameters(), lr=0.01, momentum=0.9)
    bridge.module.train()
    for i in range(12):
        batch = images[(i % 8) * 32:(i % 8 + 1) * 32]
        target = torch.from_numpy(teacher.run(None, {"image": batch})[0])
        loss = F.mse_loss(bridge.module(torch.from_numpy(batch)), target * 1.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return bridge
