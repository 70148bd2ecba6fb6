"""The finetune loop of the ``qat`` pass: distillation from the float graph or a loss on
labels, streamed batches, progress, checkpoint and resume, and DistributedDataParallel.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialized (gloo on
CPU, NCCL on CUDA) unless the caller did, the module is wrapped in DDP, and rank ``r`` takes
batch ``r`` of every ``world_size`` consecutive batches (a last, incomplete group is skipped on
every rank, so every rank runs the same number of steps). DDP starts every rank from rank 0's
values and averages gradients, so weights and quantization parameters stay identical on every
rank; only rank 0 writes checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from graphq.errors import DataError, PassError
from graphq.kernels.fakequant import FakeQuantize, pact_l2
from graphq.progress import Progress

log = logging.getLogger(__name__)

Batch = tuple[dict[str, np.ndarray], np.ndarray | None]
Teacher = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

LOSSES = ("distill", "cross_entropy", "mse")
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class FinetuneConfig:
    epochs: int = 1
    lr: float = 1e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    loss: str = "distill"
    scale_lr: float = 1.0
    max_steps: int | None = None
    grad_clip: float | None = None
    pact_decay: float = 1e-4
    seed: int = 0
    checkpoint: Path | None = None
    resume: bool = False
    #: the epoch (0-based) from which batch norms in the loop use their running statistics
    freeze_batch_norm: int | None = None


@dataclass
class FinetuneResult:
    epochs: int = 0
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    epoch_seconds: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    world_size: int = 1


# ---- distributed -------------------------------------------------------------------------

def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes; ``(rank, world_size)``."""
    rank, size = world()
    if size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        rank, size = world()
    return rank, size


def shard(batches: Iterable[Batch], rank: int, size: int) -> Iterator[Batch]:
    """Batch ``rank`` of every ``size`` consecutive batches; an incomplete group is dropped."""
    if size <= 1:
        yield from batches
        return
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group[rank]
            group = []


# ---- loss ----------------------------------------------------------------------------------

def distill_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
                 energy: list[float] | None = None) -> torch.Tensor:
    """Mean over outputs of ``mean((s - t)^2) / E``: scale-free, so outputs of different
    magnitudes weigh alike. ``E`` is the output's mean square over the whole data
    (:func:`teacher_energy`), or this batch's ``mean(t^2)`` without ``energy`` - which makes a
    batch whose output is near zero (a detector's map of an image with nothing in it) weigh
    millions of times more than the others."""
    terms = []
    for i, (s, t) in enumerate(zip(student, teacher, strict=False)):
        s = s.float()
        norm = t.pow(2).mean().clamp_min(1e-8) if energy is None else energy[i]
        terms.append(F.mse_loss(s, t) / norm)
    return torch.stack(terms).mean()


def teacher_energy(batches: Iterable[Batch], teacher: Teacher) -> list[float]:
    """Each teacher output's mean square over all ``batches`` (1.0 for an output that is
    zero everywhere): the normalizer of :func:`distill_loss`."""
    sums: list[float] = []
    counts: list[int] = []
    for feed, _ in batches:
        outs = teacher(feed)
        if not sums:
            sums, counts = [0.0] * len(outs), [0] * len(outs)
        for i, t in enumerate(outs):
            a = np.asarray(t, np.float64)
            sums[i] += float(np.sum(a * a))
            counts[i] += a.size
    return [s / c if s > 0 else 1.0 for s, c in zip(sums, counts, strict=True)]


def _labels_loss(kind: str, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind == "cross_entropy":
        if out.ndim < 2:
            raise PassError(f"loss 'cross_entropy' needs class scores (N, C, ...) as the "
                            f"first output; it has shape {tuple(out.shape)}")
        return F.cross_entropy(out.float(), labels.long().reshape(out.shape[0], *out.shape[2:]))
    return F.mse_loss(out.float(), labels.float().reshape(out.shape))


# ---- the loop ------------------------------------------------------------------------------

def param_groups(module: torch.nn.Module, lr: float, scale_lr: float = 1.0
                 ) -> list[dict[str, Any]]:
    """Weights and biases at ``lr``; each learned scale or clip in a group of its own at
    ``lr * scale_lr * mean|value|``, a step relative to its size (no weight decay).

    Adam's step is about ``lr`` whatever the gradient's size, so LSQ's gradient scale does
    not reach it; and a weight scale (about 1e-3) would move by 10% per step at a weight's
    ``lr`` of 1e-4, where a weight (about 1e-1) moves by 0.1%. With SGD at one ``lr`` for
    all, one weight pushed past its channel's clip hands the scale ``qmax`` times its
    gradient (LSQ's clip term): a 3x3 depthwise channel's scale moved by 40% in one step
    and the MNIST MobileNet of the benchmark lost 2.6 points.
    """
    quant_params: list[torch.nn.Parameter] = []
    for m in module.modules():
        if isinstance(m, FakeQuantize):
            quant_params += [p for p in m.parameters(recurse=False) if p.requires_grad]
    ids = {id(p) for p in quant_params}
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": lr}] if rest else []
    for p in quant_params:
        size = float(p.detach().abs().mean()) or 1.0
        groups.append({"params": [p], "lr": lr * scale_lr * size, "weight_decay": 0.0})
    return groups


def _optimizer(config: FinetuneConfig, module: torch.nn.Module):
    groups = param_groups(module, config.lr, config.scale_lr)
    if not groups:
        raise PassError("nothing to train: no parameter requires grad (check 'train')")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, weight_decay=config.weight_decay)


def fingerprint(module: torch.nn.Module, config: FinetuneConfig) -> str:
    """What a checkpoint must match to be resumed: parameter names and shapes, and the
    options that shape the optimizer state."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.requires_grad};".encode())
    h.update(f"{config.optimizer}:{config.loss}:{config.scale_lr}".encode())
    return h.hexdigest()[:16]


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, module, optimizer, mark: str) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != mark:
        raise PassError(f"checkpoint {path} was written for another graph or other options; "
                        "delete it or set resume = false")
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"])


def finetune(bridge: Any, batches: Callable[[], Iterable[Batch]],
             teacher: Teacher | None, config: FinetuneConfig,
             device: torch.device) -> FinetuneResult:
    """Train ``bridge``'s module (a :class:`graphq.qat.Bridge`) on ``batches()`` (called once
    per epoch; feed dict and labels or None) against ``teacher``'s outputs (``distill``) or
    the labels."""
    if config.loss not in LOSSES:
        raise PassError(f"unknown loss {config.loss!r}; losses: {', '.join(LOSSES)}")
    if config.optimizer not in OPTIMIZERS:
        raise PassError(f"unknown optimizer {config.optimizer!r}; optimizers: "
                        f"{', '.join(OPTIMIZERS)}")
    torch.manual_seed(config.seed)
    rank, size = init_distributed(device)
    module = bridge.to(device).module
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = _optimizer(config, module)
    mark = fingerprint(module, config)
    result = FinetuneResult(world_size=size)
    start_epoch = 0
    ckpt = config.checkpoint
    if ckpt is not None and config.resume and ckpt.exists():
        start_epoch = _load_checkpoint(ckpt, module, optimizer, mark)
        result.resumed_from = start_epoch
        log.info("resumed from %s after epoch %d", ckpt, start_epoch)
    model = module
    if size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    pact = config.pact_decay > 0
    energy = None
    if config.loss == "distill" and teacher is not None:
        energy = teacher_energy(batches(), teacher)  # all the data, on every rank alike
    model.train()
    for epoch in range(start_epoch, config.epochs):
        if config.freeze_batch_norm is not None and epoch >= config.freeze_batch_norm:
            from graphq.qat.modules import freeze_batch_norms

            freeze_batch_norms(module)
        t0 = time.perf_counter()
        progress = Progress(f"qat epoch {epoch + 1}/{config.epochs}", unit="step")
        total, count = 0.0, 0
        for feed, labels in shard(batches(), rank, size):
            if config.max_steps is not None and result.steps >= config.max_steps:
                break
            out = model(*bridge.inputs(feed))
            outs = list(out) if isinstance(out, tuple | list) else [out]
            if config.loss == "distill":
                if teacher is None:
                    raise PassError("loss 'distill' needs the float model as teacher")
                ref = [torch.as_tensor(t).to(device) for t in teacher(feed)]
                loss = distill_loss(outs[:len(ref)], ref, energy)
            else:
                if labels is None:
                    raise DataError(f"loss '{config.loss}' needs labels: the data has no "
                                    "label array (see [data] labels), or use loss = 'distill'")
                loss = _labels_loss(config.loss, outs[0], torch.as_tensor(labels).to(device))
            if pact:
                loss = loss + pact_l2(module, config.pact_decay).to(loss.device)
            if not torch.isfinite(loss):
                raise PassError(f"the loss became {loss.item()} at epoch {epoch + 1}, step "
                                f"{count + 1}: lower lr (now {config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            total += float(loss.detach())
            count += 1
            result.steps += 1
            progress.update(count, f"loss {total / count:.4g}")
        progress.close()
        if count == 0:
            raise DataError("the data gave no training batch"
                            + (f" for rank {rank} of {size}" if size > 1 else ""))
        result.epochs = epoch + 1
        result.losses.append(total / count)
        result.epoch_seconds.append(time.perf_counter() - t0)
        log.info("qat epoch %d/%d: %d steps, mean loss %.5g, %.1f s", epoch + 1,
                 config.epochs, count, total / count, result.epoch_seconds[-1])
        if ckpt is not None and rank == 0:
            _save_checkpoint(ckpt, {"fingerprint": mark, "epoch": epoch + 1,
                                    "module": module.state_dict(),
                                    "optimizer": optimizer.state_dict()})
        if config.max_steps is not None and result.steps >= config.max_steps:
            break
    model.eval()
    if size > 1:  # buffers (batch-norm running statistics) as rank 0 ended: one graph
        import torch.distributed as dist

        for buffer in module.buffers():
            dist.broadcast(buffer, 0)
    if not all(math.isfinite(v) for v in result.losses):
        raise PassError("training diverged (non-finite loss)")
    return result
