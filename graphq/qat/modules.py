"""The torch modules the QAT bridge puts into a converted graph.

Each module that holds a trainable value also holds the ONNX names it came from
(``onnx_names``), so :mod:`graphq.qat.writeback` can put the learned value back onto the same
initializers: the graph written back has the user's node and tensor names unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from graphq.kernels import fakequant as FQ
from graphq.kernels.fakequant import FakeQuantize
from graphq.kernels.quant import QType


class Param(nn.Module):
    """A float initializer made trainable (a Conv/Gemm/MatMul weight or bias kept float)."""

    def __init__(self, value: np.ndarray, onnx_name: str, trainable: bool) -> None:
        super().__init__()
        self.onnx_names = {"value": onnx_name}
        self.value = nn.Parameter(torch.from_numpy(np.array(value, np.float32)),
                                  requires_grad=trainable)

    def forward(self) -> torch.Tensor:
        return self.value


class WeightFakeQuant(nn.Module):
    """A weight behind a Q -> DQ pair: a float parameter and its own fake-quant node.

    ``onnx_names``: ``weight`` (the float initializer, or ``None`` when the graph held the
    weight as integers), ``quantized`` (the integer initializer, deploy form), ``scale``,
    ``zero_point``.
    """

    def __init__(self, weight: np.ndarray, quant: FakeQuantize, onnx_names: dict[str, str | None],
                 trainable: bool) -> None:
        super().__init__()
        self.onnx_names = onnx_names
        self.weight = nn.Parameter(torch.from_numpy(np.array(weight, np.float32)),
                                   requires_grad=trainable)
        self.quant = quant

    def forward(self) -> torch.Tensor:
        return self.quant(self.weight)


class ActivationFakeQuant(nn.Module):
    """An activation Q -> DQ pair. One instance serves every pair that shares a scale
    initializer (a Concat's inputs and output), so shared scales stay shared."""

    def __init__(self, quant: FakeQuantize, onnx_names: dict[str, str]) -> None:
        super().__init__()
        self.onnx_names = onnx_names
        self.quant = quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(x)


_INT32 = np.iinfo(np.int32)


class Bias(nn.Module):
    """An int32 bias (``DequantizeLinear(int32)``) trained as float. Its scale is not learned:
    write-back requantizes it at ``input scale x weight scale`` of the learned scales, so the
    forward puts it on that grid too (:meth:`link`; straight-through gradient), or on the
    graph's ``scale`` while unlinked: the module computes what the written graph computes."""

    def __init__(self, value: np.ndarray, onnx_names: dict[str, str], trainable: bool,
                 scale: np.ndarray) -> None:
        super().__init__()
        self.onnx_names = onnx_names
        self.bias = nn.Parameter(torch.from_numpy(np.array(value, np.float32)),
                                 requires_grad=trainable)
        self.register_buffer("scale", torch.from_numpy(np.array(scale, np.float32)))
        self.operands: tuple[FakeQuantize, FakeQuantize] | None = None  # not submodules

    def link(self, input_quant: FakeQuantize, weight_quant: FakeQuantize) -> None:
        self.operands = (input_quant, weight_quant)

    def grid(self) -> torch.Tensor:
        """The int32 grid's step: ``input scale x weight scale`` in float32 (as
        :func:`graphq.kernels.quant.bias_int32`), or the graph's scale."""
        if self.operands is None:
            return self.scale
        s_in, s_w = (q.step().reshape(-1) for q in self.operands)
        s = s_in.to(s_w.device) * s_w
        n = self.bias.numel()
        if s.numel() not in (1, n):
            s = s.repeat(n // s.numel())  # ConvTranspose: weight scales per group
        return s

    def forward(self) -> torch.Tensor:
        # detached grid: step() and the buffer carry no gradient
        return on_int32_grid(self.bias, self.grid().to(self.bias.device))


def on_int32_grid(value: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``value`` requantized to int32 at ``step`` (a constant) and dequantized, with a
    straight-through gradient: what write-back's int32 bias holds."""
    b = value.detach()
    # int32 in float64 (exact), then onnxruntime's DequantizeLinear: float32(q) * s
    q = torch.div(b.double(), step.double()).round_().clamp_(_INT32.min, _INT32.max)
    delta = q.float().mul_(step).sub_(b)
    return value + delta  # the grid's value, straight-through gradient


def _broadcast(value: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    if value.ndim == 0:
        return value
    shape = [1] * ndim
    shape[axis % ndim] = value.numel()
    return value.reshape(shape)


_TORCH_STORAGE = {np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8,
                  np.dtype(np.int16): torch.int16, np.dtype(np.uint16): torch.int32,
                  np.dtype(np.int32): torch.int32}


class QuantizeLinear(nn.Module):
    """A QuantizeLinear with no DequantizeLinear after it: integer output, no gradient."""

    def __init__(self, scale: np.ndarray, zero_point: np.ndarray, qtype: QType,
                 axis: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.from_numpy(np.array(scale, np.float32)))
        self.register_buffer("zero_point",
                             torch.from_numpy(np.array(zero_point, np.float32)))
        self.qtype, self.axis = qtype, axis
        self.out_dtype = _TORCH_STORAGE[np.dtype(qtype.storage)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = _broadcast(self.scale, x.ndim, self.axis)
        z = _broadcast(self.zero_point, x.ndim, self.axis)
        return FQ.quantize(x.float(), s, z, self.qtype.qmin, self.qtype.qmax).to(self.out_dtype)


class DequantizeLinear(nn.Module):
    """A DequantizeLinear of a tensor computed in the graph (not an initializer)."""

    def __init__(self, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.from_numpy(np.array(scale, np.float32)))
        self.register_buffer("zero_point",
                             torch.from_numpy(np.array(zero_point, np.float32)))
        self.axis = axis

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        s = _broadcast(self.scale, q.ndim, self.axis)
        z = _broadcast(self.zero_point, q.ndim, self.axis)
        return FQ.dequantize(q, s, z)


def torch_pads(pads: list[int]) -> list[int]:
    """ONNX ``pads`` (every axis's begin, then every axis's end) in ``F.pad``'s order (last
    axis first, begin and end in pairs)."""
    n = len(pads) // 2
    return [p for i in reversed(range(n)) for p in (pads[i], pads[n + i])]


def _same_pads(in_sizes: list[int], kernel: list[int], strides: list[int],
               dilations: list[int], upper: bool) -> list[int]:
    pads_begin, pads_end = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=False):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        pads_begin.append(total - small if not upper else small)
        pads_end.append(small if not upper else total - small)
    return pads_begin + pads_end


class Conv(nn.Module):
    """ONNX Conv / ConvTranspose on a weight that arrives as a tensor (from a fake-quant
    node or a trainable parameter), computed with torch's functional convolutions."""

    def __init__(self, op: str, attrs: dict, spatial: int, onnx_node: str = "") -> None:
        super().__init__()
        self.op, self.spatial = op, spatial
        self.onnx_node = onnx_node  # the ONNX node's name
        self.strides = list(attrs.get("strides", [1] * spatial))
        self.dilations = list(attrs.get("dilations", [1] * spatial))
        self.group = int(attrs.get("group", 1))
        self.pads = list(attrs.get("pads", [0] * 2 * spatial))
        self.auto_pad = attrs.get("auto_pad", "NOTSET")
        if isinstance(self.auto_pad, bytes):
            self.auto_pad = self.auto_pad.decode()
        self.kernel = attrs.get("kernel_shape")
        self.output_padding = list(attrs.get("output_padding", [0] * spatial))
        if op == "ConvTranspose" and (attrs.get("output_shape") is not None
                                      or self.auto_pad not in ("NOTSET", "VALID")):
            raise NotImplementedError("ConvTranspose with output_shape or auto_pad SAME is "
                                      "not supported by the QAT bridge")

    def _conv_pads(self, x: torch.Tensor, w: torch.Tensor) -> list[int]:
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            kernel = list(self.kernel or w.shape[2:])
            return _same_pads(list(x.shape[2:]), kernel, self.strides, self.dilations,
                              self.auto_pad == "SAME_UPPER")
        if self.auto_pad == "VALID":
            return [0] * 2 * self.spatial
        return self.pads

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
                ) -> torch.Tensor:
        n = self.spatial
        if self.op == "ConvTranspose":
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
            pads = self.pads if self.auto_pad == "NOTSET" else [0] * 2 * n
            if pads[:n] != pads[n:]:
                raise NotImplementedError("ConvTranspose with asymmetric pads is not "
                                          "supported by the QAT bridge")
            return fn(x, w, b, self.strides, pads[:n], self.output_padding, self.group,
                      self.dilations)
        fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
        pads = self._conv_pads(x, w)
        begin = pads[:n]
        if begin != pads[n:]:
            x, begin = F.pad(x, torch_pads(pads)), [0] * n
        return fn(x, w, b, self.strides, begin, self.dilations, self.group)

    def extra_repr(self) -> str:
        return (f"{self.op}{self.spatial}d, strides={self.strides}, pads={self.pads}, "
                f"dilations={self.dilations}, group={self.group}")


def _running_statistics(bn: nn.Module, args: tuple) -> None:
    bn.training = False  # a forward pre-hook: normalize with the graph's statistics


def freeze_foreign(module: nn.Module) -> None:
    """Freeze what write-back does not write: the parameters of onnx2torch's own modules
    (BatchNormalization's scale and bias, PRelu's slope, ...) stop requiring grad, and
    BatchNormalization normalizes with the graph's mean and variance in training mode too
    (neither batch statistics nor updated running statistics reach the ONNX graph)."""
    own = (Param, WeightFakeQuant, ActivationFakeQuant, Bias)
    owned = {id(p) for m in module.modules() if isinstance(m, own) for p in m.parameters()}
    for p in module.parameters():
        if id(p) not in owned:
            p.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(_running_statistics)


class ConvBatchNorm(nn.Module):
    """A Conv whose BatchNormalization was folded into it, trained with batch normalization in
    the loop again (the fold simulated as torch.ao's ``ConvBn2d`` and Jacob et al. 2018 do).

    ``gamma``, ``beta`` and the running statistics belong to a BatchNormalization on the
    Conv's bias-free output ``u``; the weight written back is the folded ``W * s`` with
    ``s = gamma / sqrt(running_var + eps)`` per output channel. Training forward::

        z = conv(x, fqs(W, s));  u = z / s    (= conv(x, fq(W)) when the step follows, s > 0)
        y = gamma * (u - mean_B(u)) / sqrt(var_B(u) + eps) + beta

    with the batch's statistics per channel (the running ones follow them, ``momentum``).
    Evaluation, and training after :meth:`freeze`: ``y = conv(x, fqs(W, s)) + beta - s *
    running_mean``, the folded graph (an int32 bias on the grid write-back will use).

    ``fqs(W, s)``, the fake-quantized folded weight: a per-channel weight quantizer (one step
    per output channel, axis 0) quantizes the *unfolded* weight and the fold comes after,
    ``fq(W * sign(s); step) * |s|``. With the zero point kept, fake quantization is
    scale-equivariant, ``fq(W * s; step * |s|) == |s| * fq(W * sign(s); step)``, so this is the
    folded weight on the grid ``step * |s|``: a learned step keeps fitting the folded weight as
    gamma and the running variance move (a fixed step on ``W * s`` would not). ``gamma`` may
    learn to a negative value: the sign goes into the weight, ``|s|`` into the step. A
    per-tensor quantizer (one step cannot follow a scale per channel) reads ``fq(W * s)``.

    The first training batch sets the statistics so that nothing changes yet: running mean and
    variance are that batch's, ``gamma = sqrt(var + eps)`` (so ``s = 1``), ``beta = bias +
    mean``. ``gamma`` learns when the weight does, ``beta`` when the bias did (the bias itself
    stops requiring grad: no training forward reads it). :meth:`fold` writes ``W * s``, the
    grid ``step * |s|`` and the folded bias into the weight and bias modules (write-back calls
    it); the next training batch starts over from them. Under DDP the statistics start as
    rank 0's.
    """

    def __init__(self, conv: Conv, weight: WeightFakeQuant, bias: Bias | Param,
                 momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv, self.weight, self.bias = conv, weight, bias
        channels = weight.weight.shape[0]
        self.momentum, self.eps = momentum, eps
        self.gamma = nn.Parameter(torch.ones(channels), requires_grad=weight.weight.requires_grad)
        # beta learns in the bias's place (which no training forward reads: DDP needs every
        # parameter that requires grad to get one); fold() writes the bias
        self.beta = nn.Parameter(torch.zeros(channels),
                                 requires_grad=self._bias_value().requires_grad)
        self._bias_value().requires_grad_(False)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("started", torch.zeros((), dtype=torch.uint8))  # gloo: no bool
        self.register_buffer("frozen", torch.zeros((), dtype=torch.uint8))
        q = weight.quant
        #: the weight step follows the fold: one step per output channel (see the class doc)
        self.step_follows = (q.axis is not None and q.axis % weight.weight.ndim == 0
                             and q.step().numel() == channels)

    def _bias_value(self) -> torch.Tensor:
        return self.bias.bias if isinstance(self.bias, Bias) else self.bias.value

    def scale(self) -> torch.Tensor:
        """``s = gamma / sqrt(running_var + eps)`` per output channel."""
        return self.gamma / torch.sqrt(self.running_var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.started:
            if not self.training:  # never trained: the folded graph as it is
                return self.conv(x, self.weight(), self.bias())
            self._start(x)
        s = self.scale()
        if not self.training or self.frozen:
            z = self.conv(x, self.folded_weight(s))
            return z + _broadcast(self._shift(s), z.ndim, 1)
        if self.step_follows and not bool((s < 0).any()):
            # conv(x, fq(W) * s) / s: the Conv is linear in each output channel's weight, so
            # the fold's scale cancels, in the values and in every gradient (gamma's reaches it
            # through the batch norm alone either way); one pass over the output fewer each way
            u = self.conv(x, self.weight.quant(self.weight.weight))
        else:
            z = self.conv(x, self.folded_weight(s))
            u = z / _broadcast(s, z.ndim, 1)
        # torch's fused batch norm: batch statistics, running ones updated (unbiased var)
        return F.batch_norm(u, self.running_mean, self.running_var, self.gamma, self.beta, True,
                            self.momentum, self.eps)

    def _shift(self, s: torch.Tensor) -> torch.Tensor:
        """The folded bias ``beta - s * running_mean``, on the int32 grid that write-back
        will put it on (an int32 bias: input step x weight step, the weight step ``step *
        |s|`` when it follows the fold); straight-through gradient."""
        shift = self.beta - s * self.running_mean
        if not isinstance(self.bias, Bias):
            return shift
        grid = self.bias.grid().to(shift.device)
        operands = self.bias.operands
        if self.step_follows and operands is not None and operands[1] is self.weight.quant:
            grid = grid * s.detach().abs()
        return on_int32_grid(shift, grid)

    def folded_weight(self, s: torch.Tensor) -> torch.Tensor:
        """``fqs(W, s)``: the fake-quantized folded weight (class doc)."""
        w = self.weight.weight
        if not self.step_follows:
            return self.weight.quant(w * _broadcast(s, w.ndim, 0))
        if not bool((s < 0).any()):  # the usual case: no sign to move, one op fewer each way
            return self.weight.quant(w) * _broadcast(s, w.ndim, 0)
        sign = torch.where(s < 0, -1.0, 1.0).to(w.dtype)
        return self.weight.quant(w * _broadcast(sign, w.ndim, 0)) * _broadcast(s.abs(), w.ndim, 0)

    @torch.no_grad()
    def _start(self, x: torch.Tensor) -> None:
        u = self.conv(x, self.weight())
        var, mean = torch.var_mean(u, dim=[0, *range(2, u.ndim)], unbiased=False)
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)
        self.gamma.copy_(torch.sqrt(var + self.eps))
        self.beta.copy_(self.bias().detach().reshape(-1) + mean)
        self.started.fill_(1)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():  # every rank starts as rank 0 did
            for t in (self.gamma, self.beta, self.running_mean, self.running_var):
                dist.broadcast(t.data, 0)

    def freeze(self) -> None:
        """Stop following the batches: training normalizes with the running statistics (the
        folded form, gamma and beta still learning), as torch.ao's ``freeze_bn_stats``."""
        self.frozen.fill_(1)

    @torch.no_grad()
    def fold(self) -> None:
        """Write the folded weight ``W * s``, its grid ``step * |s|`` (when the step follows the
        fold) and bias ``beta - s * running_mean`` into the weight and bias modules: the module
        then computes the folded graph, which is what it computed before (but for float
        rounding and the bias's int32 grid). The statistics start over at the next training
        batch."""
        if not self.started:
            return
        s = self.scale()
        if self.step_follows:
            self.weight.quant.rescale(s.abs())
        w = self.weight.weight
        w.mul_(_broadcast(s, w.ndim, 0))
        self._bias_value().copy_((self.beta - s * self.running_mean).reshape(
            self._bias_value().shape))
        self.started.fill_(0)


def train_batch_norm(module: torch.fx.GraphModule, convs: list[str]) -> int:
    """Put a :class:`ConvBatchNorm` in place of every Conv of ``module`` named in ``convs``
    (ONNX node names) whose weight is fake-quantized and whose bias is a module; returns how
    many."""
    wanted = set(convs)
    mods = dict(module.named_modules())
    graph = module.graph
    count = 0
    for node in list(graph.nodes):
        conv = mods.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, Conv) or conv.op != "Conv" or conv.onnx_node not in wanted:
            continue
        if len(node.args) < 3 or node.kwargs:
            continue
        w_node, b_node = node.args[1], node.args[2]
        parts = [mods.get(n.target) if isinstance(n, torch.fx.Node) and n.op == "call_module"
                 else None for n in (w_node, b_node)]
        if not isinstance(parts[0], WeightFakeQuant) or not isinstance(parts[1], Bias | Param):
            continue
        if len(w_node.users) > 1 or len(b_node.users) > 1:
            continue  # a weight or bias shared with another node: left as it is
        name = f"{node.target}_batch_norm"
        module.add_submodule(name, ConvBatchNorm(conv, parts[0], parts[1]))
        with graph.inserting_after(node):
            replacement = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        count += 1
    if count:
        graph.eliminate_dead_code()
        module.recompile()
    return count


def freeze_batch_norms(module: nn.Module) -> int:
    """:meth:`ConvBatchNorm.freeze` on every one in ``module``; returns how many."""
    norms = [m for m in module.modules() if isinstance(m, ConvBatchNorm)]
    for m in norms:
        m.freeze()
    return len(norms)


def fold_batch_norms(module: nn.Module) -> None:
    """:meth:`ConvBatchNorm.fold` on every one in ``module``."""
    for sub in module.modules():
        if isinstance(sub, ConvBatchNorm):
            sub.fold()
