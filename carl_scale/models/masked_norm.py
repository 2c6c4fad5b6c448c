"""BatchNorm whose batch statistics follow only the rows a mask marks.

A short video's views are padded to T frames (``--short-video``), and padded frames must stay out
of every BatchNorm statistic the encoder trains with. Running the network on the valid rows alone
(``x[valid]``) does that, but its shape depends on the mask's values: on a GPU each call makes the
host wait for the device (to count the rows), and under ``torch.compile`` it breaks the graph and
recompiles for new counts. Measured on the CPU with the debug flavor and ``--compile objective``:
17 graphs and 11 graph breaks over ten padded steps, against one graph unpadded; on the H200 the
T = 240 end-to-end benchmark, whose short synthetic videos are padded, did not finish its
warm-up in 2 minutes (this the likely cause; not yet re-measured).

Here, when compiled (the encoder's ``_valid_frames``; eager keeps ``x[valid]``), every frame goes
through the network at a fixed shape, and each trained BatchNorm (its module swapped to a subclass
by :func:`make_row_maskable`: same parameters, buffers and state-dict keys) takes its mean and
variance over the rows its ``carl_rows`` marks, while the caller sets it. Every other layer of the
encoder works on one frame at a time, so a valid frame's output, the running statistics and the
gradients are those of the network run on the valid frames alone (to float rounding, and but for
dropout, whose random masks now cover the padded rows too: ``tests/test_model.py`` checks the
rest against ``x[valid]``). The padded rows cost their compute, which the fixed shape pays for;
the caller zeroes their outputs. Eager, this form would save a float32 copy of each trained
activation for backward where cuDNN's BatchNorm saves its input: Inductor fuses it instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _masked_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm of ``x`` ``(N, C, ...)`` with statistics over the rows ``rows``
    ``(N,)`` bool marks (at least one), in float32 whatever ``x``'s dtype (bf16 under autocast);
    updates ``bn``'s running statistics as :class:`torch.nn.BatchNorm2d` would on those rows."""
    dims = [0, *range(2, x.dim())]
    keep = rows.view(-1, *([1] * (x.dim() - 1)))
    # unmarked rows zeroed first (torch.where, not a product with the mask): one holding inf or
    # NaN then reaches neither a statistic nor, through 0 * inf, a gradient
    xf = torch.where(keep, x.float(), 0.0)
    count = keep.sum() * (x[0, 0].numel())
    mean = xf.sum(dims, keepdim=True) / count
    centred = xf - mean
    var = torch.where(keep, centred * centred, 0.0).sum(dims, keepdim=True) / count  # (biased, as BN normalises)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.view_as(scale)
    y = centred * scale
    if bn.bias is not None:
        y = y + bn.bias.view_as(scale)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            # (momentum None, a cumulative average: a device scalar, not a host read)
            momentum = 1.0 / bn.num_batches_tracked if bn.momentum is None else bn.momentum
            unbiased = var * (count / (count - 1).clamp_min(1))
            bn.running_mean.lerp_(mean.flatten().to(bn.running_mean.dtype), momentum)
            bn.running_var.lerp_(unbiased.flatten().to(bn.running_var.dtype), momentum)
    return y.to(x.dtype)


class _RowMaskable:
    """Mixin of the swapped BatchNorm classes: with ``carl_rows`` (a caller's ``(N,)`` bool mask,
    set around one call and cleared after) None, or in eval mode, the plain BatchNorm."""

    carl_rows: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.carl_rows is None or not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        return _masked_batch_norm(self, x, self.carl_rows)


class RowMaskableBatchNorm1d(_RowMaskable, nn.BatchNorm1d):
    pass


class RowMaskableBatchNorm2d(_RowMaskable, nn.BatchNorm2d):
    pass


_SWAPS = {nn.BatchNorm1d: RowMaskableBatchNorm1d, nn.BatchNorm2d: RowMaskableBatchNorm2d}


def make_row_maskable(*modules: nn.Module) -> list[nn.Module]:
    """Swap every BatchNorm1d/2d under ``modules`` to its row-maskable subclass, in place (its
    parameters, buffers and state-dict keys unchanged); returns them (the caller sets their ``carl_rows``)."""
    found = []
    for root in modules:
        for m in root.modules():
            if type(m) in _SWAPS:
                if not m.track_running_stats:  # (its eval mode would take batch statistics, padding included)
                    raise ValueError(f"{m}: a BatchNorm without running statistics cannot keep padding out "
                                     f"in eval mode")
                m.__class__ = _SWAPS[type(m)]
                m.carl_rows = None  # (in the instance from the start: setting it later would fail a compiled guard)
            if isinstance(m, _RowMaskable):
                found.append(m)
    return found
