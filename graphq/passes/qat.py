"""qat: finetune the calibrated graph in PyTorch and write the learned values back.

Runs after ``calibrate`` (and before ``emit``): the graph with its Q/DQ pairs goes into
PyTorch through the QAT bridge (:mod:`graphq.qat`), trains on the pipeline's data, and the
learned weights, biases, scales and zero points go back onto the same graph by initializer
name, so node names and structure are unchanged. Label-free by default: the loss is the
distance of the outputs (and of ``distill_tensors``) to the float model's, run in onnxruntime
on the same batch (the pipeline's input model when it has those tensors, else the calibrated
graph with its Q/DQ pairs bypassed, whose biases bias correction has changed); with labels in
the data, ``loss = "cross_entropy"`` or ``"mse"`` trains on them. Needs torch and onnx2torch
(the core does not); runs under ``torchrun`` with
DistributedDataParallel. With ``eval_data`` (held-out data), the graph is scored before and
after finetuning and the finetuned values are kept only if they score at least as well:
finetuning that overfits its data does not replace a better calibrated graph.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx

from graphq import graph as G
from graphq import runtime
from graphq import sensitivity as S
from graphq.data import DATA_HINT, DataSource, samples_in
from graphq.errors import QAT_INSTALL, ConfigError, DataError, GraphqError, PassError
from graphq.quant import QuantTable
from graphq.registry import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)


@dataclass
class QatOptions:
    method: Literal["ste", "lsq", "pact"] = field(default="lsq", metadata={
        "help": "fake-quant gradients: ste (scales fixed), lsq (learned step size), pact "
                "(learned activation clip, LSQ for weights)"})
    epochs: int = field(default=1, metadata={"help": "passes over the data", "min": 1})
    lr: float = field(default=1e-5, metadata={"help": "learning rate", "min": 0.0})
    optimizer: Literal["adam", "adamw", "sgd"] = field(default="adam", metadata={
        "help": "optimizer"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay", "min": 0.0})
    scale_lr: float = field(default=1.0, metadata={
        "help": "a learned scale's step relative to its size, per unit of lr (Adam moves a "
                "scale by about lr * scale_lr * |scale| per step)", "min": 0.0})
    batch_size: int | None = field(default=None, metadata={
        "help": "samples per step (default: [data] batch_size)", "min": 1})
    loss: Literal["distill", "cross_entropy", "mse"] = field(default="distill", metadata={
        "help": "distill: match the float graph's outputs (no labels needed); cross_entropy "
                "or mse: the data's labels against the first output"})
    distill_tensors: list[str] = field(default_factory=list, metadata={
        "help": "intermediate tensors also matched to the float graph's (distill)"})
    train: list[str] = field(default_factory=lambda: ["weights", "biases", "scales"],
                             metadata={"help": "what learns: weights, biases, scales, "
                                               "input_scales (quantizers on graph inputs)"})
    grad_scale: float | None = field(default=None, metadata={
        "help": "LSQ gradient scale (default: 1/sqrt(N * qmax); msModelSlim uses 0.001)"})
    max_steps: int | None = field(default=None, metadata={
        "help": "stop after this many steps in all", "min": 1})
    grad_clip: float | None = field(default=None, metadata={
        "help": "clip the gradient norm to this", "min": 0.0})
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when available), cpu, cuda, cuda:N"})
    checkpoint: str | None = field(default=None, metadata={
        "help": "file the finetune state is saved to after every epoch"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the checkpoint when it exists"})
    seed: int = field(default=0, metadata={"help": "torch random seed"})
    eval_data: str | None = field(default=None, metadata={
        "help": "held-out data (an .npz or a folder, as --data) the graph is scored on before "
                "and after finetuning (worst output SQNR against the float model in "
                "onnxruntime): the finetuned values are kept only if they score at least as "
                "well, else the calibrated graph goes on unchanged, with a note; default: "
                "none, the finetuned values are always kept"})
    eval_limit: int = field(default=256, metadata={
        "help": "with eval_data: at most this many samples are scored", "min": 1})
    batch_norm: bool = field(default=False, metadata={
        "help": "train the Convs that fold-bn folded a BatchNormalization into with batch "
                "normalization in the loop again (batch statistics, running statistics "
                "updated; folded back when written back), as torch.ao's QAT does"})
    batch_norm_freeze: float = field(default=0.75, metadata={
        "help": "with batch_norm: the share of the epochs after which the batch norms use "
                "their running statistics (the folded form) for the rest, as torch.ao's QAT "
                "recipe freezes them (1: never; only with more than one epoch)",
        "min": 0.0, "max": 1.0})


@register
class Qat(Pass):
    name = "qat"
    summary = "finetune the calibrated graph in PyTorch (QAT) and write learned values back"
    Options = QatOptions
    preserves_semantics = False
    needs_data = True

    def __init__(self, options=None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        # say it when the pipeline is read, not after the passes before this one have run
        missing = [m for m in ("torch", "onnx2torch") if not _installed(m)]
        if missing:
            raise ConfigError(f"pass 'qat': {missing[0]} is not installed; {QAT_INSTALL}")

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        o = self.options
        table = QuantTable.required(model, "insert-qdq and calibrate", "qat")
        if any(not e.calibrated for e in table.quantized()):
            raise PassError("qat needs calibrated scales: run calibrate before qat")
        if ctx.data is None:
            raise DataError(f"qat needs data: {DATA_HINT}")
        known = {o for n in model.graph.node for o in n.output} | \
            {i.name for i in model.graph.input}
        missing = [n for n in o.distill_tensors if n not in known]
        if missing:
            raise ConfigError(f"pass 'qat': distill tensor '{missing[0]}' is not in the graph")
        try:
            from graphq import qat
            from graphq.qat import train as T
        except GraphqError as exc:
            raise ConfigError(f"pass 'qat': {exc}") from exc
        import torch

        device = _device(o.device, torch)
        bridge = qat.prepare(model, method=o.method, train=o.train, grad_scale=o.grad_scale,
                             extra_outputs=o.distill_tensors, batch_norm=o.batch_norm)
        teacher = None
        if o.loss == "distill":
            teacher = _teacher(model, bridge.output_names + list(o.distill_tensors), ctx)
        data = ctx.data
        if o.batch_size is not None:
            data = copy.copy(ctx.data)
            data.batch_size = o.batch_size
        config = T.FinetuneConfig(
            epochs=o.epochs, lr=o.lr, optimizer=o.optimizer, weight_decay=o.weight_decay,
            loss=o.loss, scale_lr=o.scale_lr, max_steps=o.max_steps, grad_clip=o.grad_clip,
            seed=o.seed, pact_decay=1e-4 if o.method == "pact" else 0.0,
            checkpoint=ctx.path(o.checkpoint) if o.checkpoint else None, resume=o.resume,
            freeze_batch_norm=math.ceil(o.batch_norm_freeze * o.epochs)
            if o.batch_norm and o.epochs > 1 and o.batch_norm_freeze < 1 else None)
        held_out = self._held_out(model, ctx)  # a bad path fails before training
        result = T.finetune(bridge, lambda: data.labeled_feeds(model), teacher, config,
                            device)
        bridge.to("cpu")
        out = bridge.write_back()
        counts = {"epochs": result.epochs, "steps": result.steps,
                  "world_size": result.world_size, **bridge.module.graphq_counts}
        check = _check(model, out, held_out, ctx) if held_out else None
        if check is not None:
            counts["kept"] = check["kept"]
        ctx.report["qat"] = {"method": o.method, "loss": o.loss, "device": str(device),
                             "epoch_loss": result.losses,
                             "epoch_seconds": result.epoch_seconds,
                             "resumed_from_epoch": result.resumed_from, **counts}
        notes = [f"{o.method} on {device}: {result.steps} steps, loss "
                 + " -> ".join(f"{v:.4g}" for v in result.losses)]
        if result.resumed_from is not None:
            notes.append(f"resumed after epoch {result.resumed_from}")
        if check is not None:
            ctx.report["qat"]["eval"] = check
            before, after = check["before_db"], check["after_db"]
            if check["kept"] == "calibrated":
                why = (f"onnxruntime cannot run the finetuned graph ({check['error']})"
                       if "error" in check else f"the worst output SQNR is {after:.2f} dB "
                       "after finetuning")
                notes.append(f"finetuned values NOT kept: on eval_data ({check['samples']} "
                             f"samples) {why}, {before:.2f} dB before; the calibrated graph "
                             "goes on unchanged (try a lower lr, fewer epochs or more data)")
                log.warning("%s", notes[-1])
                return PassResult(model, False, counts, notes)
            notes.append(f"eval_data ({check['samples']} samples): worst output SQNR "
                         f"{before:.2f} -> {after:.2f} dB; finetuned values kept")
        return PassResult(out, True, counts, notes)

    def _held_out(self, model: onnx.ModelProto, ctx: PassContext
                  ) -> list[dict[str, np.ndarray]]:
        """The eval_data feeds (at most eval_limit samples); none without eval_data."""
        if self.options.eval_data is None:
            return []
        path = ctx.path(self.options.eval_data)
        if not path.exists():
            raise DataError(f"qat eval_data not found: {path}; give an .npz keyed by input "
                            "name or a folder of .npz/.npy files, held out from the training "
                            "data")
        feeds = list(DataSource(path, batch_size=ctx.data.batch_size,
                                limit=self.options.eval_limit).feeds(model))
        if not feeds:
            raise DataError(f"qat eval_data {path} holds no samples")
        return feeds


def _check(model: onnx.ModelProto, tuned: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
           ctx: PassContext) -> dict[str, object]:
    """Worst output SQNR (dB; outputs a Concat makes scored per part too) of the calibrated
    ``model`` and the finetuned ``tuned`` graph against the float model on ``feeds``, and
    which is kept (``tuned`` on a tie)."""
    names = [o.name for o in model.graph.output]
    float_run = _teacher(model, names, ctx)
    reference = [dict(zip(names, float_run(feed), strict=True)) for feed in feeds]
    parts = G.output_parts(model)

    def score(graph: onnx.ModelProto) -> float:
        sess = runtime.session(graph, ctx.providers)
        return S.worst_sqnr(reference, [runtime.run(sess, f) for f in feeds], parts)

    before, error = score(model), None
    try:
        after = score(tuned)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime refuses what training made
        after, error = -math.inf, f"{type(exc).__name__}: {exc}"
    check: dict[str, object] = {
        "before_db": before, "after_db": after if error is None else None,
        "samples": sum(samples_in(f, model) for f in feeds),
        "kept": "finetuned" if after >= before else "calibrated"}
    if error is not None:
        check["error"] = error
    return check


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _device(name: str, torch):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"pass 'qat': device '{name}' asked, but torch sees no CUDA "
                              "device; use device = \"cpu\" or \"auto\"")
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    elif name != "cpu":
        raise ConfigError(f"pass 'qat': unknown device '{name}'; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def _teacher(model: onnx.ModelProto, names: list[str], ctx: PassContext):
    """The float model in onnxruntime, returning ``names``: the pipeline's input model when it
    has every one of them and the same inputs (the true float model: calibrate's bias
    correction changes the calibrated graph's biases), else the calibrated graph with its Q/DQ
    pairs bypassed."""
    source = model
    if ctx.float_source is not None:
        original = ctx.float_model()
        known = {t for n in original.graph.node for t in n.output} | \
            {i.name for i in original.graph.input}
        if set(names) <= known and _feeds(original) == _feeds(model):
            source = original
    float_model = G.with_outputs(source, names, float_view=True)
    # no busy-waiting between runs: torch trains on the same cores in between
    sess = runtime.session(float_model, ctx.providers, spinning=False)

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return sess.run(names, feed)
    return run


def _feeds(model: onnx.ModelProto) -> set[str]:
    """The inputs a run feeds (graph inputs that are not initializers)."""
    inits = {i.name for i in model.graph.initializer}
    return {i.name for i in model.graph.input if i.name not in inits}
