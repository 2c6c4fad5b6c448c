"""The frozen ResNet stages as fused convolutions (``--fuse-frozen on``).

The frozen stages run in inference mode with fixed BatchNorm statistics, so each BatchNorm is an
affine map per channel and folds into the convolution before it (W' = W·s, b' = β − μ·s with
s = γ / sqrt(σ² + ε)). On a GPU each convolution then runs as one cuDNN call with its bias, the
residual add and the ReLU fused in (``torch.cudnn_convolution_relu`` / ``_add_relu``): a
bottleneck block is 3-4 kernels instead of ~10, with no pass over the activations for BatchNorm,
ReLU or the add. The H200 profile of the eager r50 step (BENCHMARKS.md) spent 9 of the frozen
trunk's 19 ms in BatchNorm and ReLU. Elsewhere (a CPU) the same program runs as ``conv2d`` with
the folded bias, then add and ReLU. Under ``torch.compile`` each fused convolution is one custom
operator (:func:`fused_conv_relu`, which dynamo can hold in a graph) and the folding is part of
the graph.

The folded weights are derived, never saved: the stages' own weights stay where they are (state
dict and checkpoints unchanged) and the folded copies are remade whenever one of them changes (a
checkpoint or ``--pretrained`` load, a move), in the dtype the convolutions run in (the autocast
dtype under autocast).

:func:`fuse_stages` knows the modules our backbones are made of: ``Sequential``, Conv2d +
BatchNorm2d (+ ReLU) runs, max pooling, torchvision's ``Bottleneck`` and our ``_BasicBlock``
(``body`` + ``short``); anything else is refused when the program is built.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class _Conv:
    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    relu: bool  # a ReLU follows (for a block's last convolution: after the residual add)


@dataclass
class _Block:
    main: list  # _Conv...: the last one's output + the shortcut's, then ReLU
    short: list = field(default_factory=list)  # empty: the identity

    def __post_init__(self):
        self.main[-1].relu = True  # the block's closing ReLU, fused with the add


def _sequence(modules: list[nn.Module]) -> list:
    ops, i = [], 0
    while i < len(modules):
        m = modules[i]
        if isinstance(m, nn.Conv2d):
            if i + 1 >= len(modules) or not isinstance(modules[i + 1], nn.BatchNorm2d):
                raise ValueError(f"--fuse-frozen: a Conv2d without a BatchNorm2d after it ({m})")
            bn = modules[i + 1]
            if m.padding_mode != "zeros" or isinstance(m.padding, str) or not bn.affine or bn.running_var is None:
                raise ValueError(f"--fuse-frozen: folds only zero-padded convolutions with numeric padding into "
                                 f"affine BatchNorms with running statistics ({m}, {bn})")
            relu = i + 2 < len(modules) and isinstance(modules[i + 2], nn.ReLU)
            ops.append(_Conv(m, modules[i + 1], relu))
            i += 3 if relu else 2
        else:
            ops += fuse_stages(m)
            i += 1
    return ops


def fuse_stages(module: nn.Module) -> list:
    """The fused program of ``module`` (see the module docstring); refuses a module it does not know."""
    from torchvision.models.resnet import Bottleneck

    if isinstance(module, nn.Sequential):
        return _sequence(list(module))
    if isinstance(module, (nn.MaxPool2d, nn.Identity)):
        return [module]
    if isinstance(module, Bottleneck):
        m = module
        main = [_Conv(m.conv1, m.bn1, True), _Conv(m.conv2, m.bn2, True), _Conv(m.conv3, m.bn3, True)]
        return [_Block(main, _sequence(list(m.downsample)) if m.downsample is not None else [])]
    if isinstance(getattr(module, "body", None), nn.Sequential) and hasattr(module, "short"):
        # backbones._BasicBlock (by its parts, not imported: backbones imports this module)
        short = [] if isinstance(module.short, nn.Identity) else _sequence(list(module.short))
        return [_Block(_sequence(list(module.body)), short)]
    raise ValueError(f"--fuse-frozen: cannot fuse a {type(module).__name__}; use --fuse-frozen off")


def _fold(op: _Conv, dtype: torch.dtype, memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    conv, bn = op.conv, op.bn
    scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
    bias = bn.bias.float() - bn.running_mean.float() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.float() * scale
    weight = (conv.weight.float() * scale.view(-1, 1, 1, 1)).contiguous(memory_format=memory_format)
    return weight.to(dtype), bias.to(dtype)


_REFUSED: set = set()  # the fused calls cuDNN refused, by everything that tells one call from another


def conv_bias_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, z: torch.Tensor | None, stride, padding,
                  dilation, groups: int, relu: bool = True, cudnn: bool | None = None) -> torch.Tensor:
    """``relu(conv2d(x, w, b) + z)`` (``z`` optional; without ``relu``: no ReLU). ``cudnn`` (None:
    on a CUDA tensor) makes it one fused cuDNN call; where cuDNN refuses one (known for some dtype
    and layout combinations), that convolution runs as conv2d + add + ReLU from then on, after one
    warning. A refusal reads ``CUDNN_STATUS_NOT_SUPPORTED`` when building the graph fails, and
    "GET/FIND was unable to find an engine ..." when no engine takes it (PyTorch's Conv_v8.cpp)."""
    if cudnn is None:
        cudnn = x.is_cuda
    key = (x.dtype, x.is_contiguous(), tuple(x.shape[1:]), tuple(w.shape), tuple(stride), tuple(padding),
           tuple(dilation), groups, z is not None)
    if relu and cudnn and key not in _REFUSED:
        try:
            if z is None:
                return torch.cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups)
            return torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, stride, padding, dilation, groups)
        except RuntimeError as exn:  # only cuDNN's refusal: out of memory, a sync trap etc. stay errors
            refused = any(m in str(exn) for m in ("CUDNN_STATUS_NOT_SUPPORTED", "unable to find an engine"))
            if isinstance(exn, torch.OutOfMemoryError) or not refused:
                raise
            if not _REFUSED:
                warnings.warn(f"--fuse-frozen: cuDNN refused a fused convolution ({str(exn).splitlines()[0]}); "
                              f"those run unfused (folded BatchNorm, then add and ReLU)", stacklevel=2)
            _REFUSED.add(key)
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    if z is not None:
        y.add_(z)
    return y.relu_() if relu else y


@torch.library.custom_op("carl_scale::fused_conv_relu", mutates_args=())
def fused_conv_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, z: torch.Tensor | None, stride: list[int],
                    padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """:func:`conv_bias_act` with its ReLU as one operator torch.compile can hold in a graph
    (dynamo has no shapes for cuDNN's fused calls): what ``--compile`` + ``--fuse-frozen`` run."""
    return conv_bias_act(x, w, b, z, stride, padding, dilation, groups)


@fused_conv_relu.register_fake
def _(x, w, b, z, stride, padding, dilation, groups):
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    # cuDNN answers in channels_last when the input or the weight is in it (so does conv2d here)
    last = any(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in (x, w))
    return torch.empty((x.shape[0], w.shape[0], *size), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if last else torch.contiguous_format)


class FusedStages:
    """Runs a frozen stage group as its fused program; call it under ``no_grad``, eager or inside
    a compiled graph (the weights are then folded in the graph and each fused convolution is the
    :func:`fused_conv_relu` operator); :meth:`compile` compiles it on its own."""

    def __init__(self, stages: nn.Module):
        self.stages = stages
        self.program = fuse_stages(stages)
        self._folded: dict = {}
        self._stamp: tuple | None = None
        self.cudnn: bool | None = None  # the fused cuDNN calls: None = on CUDA tensors (a test may force them)
        self._compiled = None

    def compile(self, mode: str | None = None) -> "FusedStages":
        """``--compile trunk``: calls run :meth:`forward` compiled (this object stays itself)."""
        self._compiled = torch.compile(self.forward, mode=mode)
        return self

    def _weights(self, op: _Conv, dtype: torch.dtype, layout) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():  # folded in the graph: a few small fused kernels per step
            return _fold(op, dtype, layout)
        key = (id(op), dtype, layout)
        if key not in self._folded:
            self._folded[key] = _fold(op, dtype, layout)
        return self._folded[key]

    def __call__(self, x: torch.Tensor, layout=torch.contiguous_format, check: bool = True) -> torch.Tensor:
        """``x`` (N, 3, H, W) in ``layout`` (the weights' memory format) -> the stages' output.
        ``check=False`` skips looking for changed weights (~0.1 ms of host time for r50): for
        the second and later chunks of one batch."""
        if self._compiled is not None and not torch.compiler.is_compiling():
            return self._compiled(x, layout)  # (folds in its graph: nothing to check)
        return self.forward(x, layout, check)

    def forward(self, x: torch.Tensor, layout=torch.contiguous_format, check: bool = True) -> torch.Tensor:
        # Fold again when a weight changed: a load writes in place (the version counter moves), a
        # move or an assigning load replaces the tensor (another object, another address). Writes
        # through ``.data`` move no counter and are not seen (nothing here makes them).
        if check and not torch.compiler.is_compiling():
            stamp = tuple((id(t), t._version, t.data_ptr()) for m in self.stages.modules()
                          for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)
            if stamp != self._stamp:
                self._folded, self._stamp = {}, stamp
        if torch.is_autocast_enabled(x.device.type):  # cuDNN's fused calls are outside autocast's lists
            x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            return self._run(self.program, x, layout)

    def _conv(self, op: _Conv, x: torch.Tensor, layout, z: torch.Tensor | None = None) -> torch.Tensor:
        w, b = self._weights(op, x.dtype, layout)
        c = op.conv
        if op.relu and torch.compiler.is_compiling():
            return fused_conv_relu(x, w, b, z, list(c.stride), list(c.padding), list(c.dilation), c.groups)
        return conv_bias_act(x, w, b, z, c.stride, c.padding, c.dilation, c.groups, op.relu, self.cudnn)

    def _run(self, program: list, x: torch.Tensor, layout) -> torch.Tensor:
        for op in program:
            if isinstance(op, _Conv):
                x = self._conv(op, x, layout)
            elif isinstance(op, nn.MaxPool2d):
                x = op(x)
            elif isinstance(op, _Block):
                z = self._run(op.short, x, layout) if op.short else x
                x = self._conv(op.main[-1], self._run(op.main[:-1], x, layout), layout, z)
            elif not isinstance(op, nn.Identity):
                raise AssertionError(op)
        return x
