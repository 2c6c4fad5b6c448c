"""Gathering a tensor from every data-parallel rank, with or without its gradient.

:func:`all_gather_with_grad` lets a loss use every rank's embeddings as if the whole batch were
on one process: rank r's loss reaches rank q's embeddings through the gather, and the backward
sums those gradients back to q (an all-reduce, which gloo has, then q's slice). With data
parallelism averaging the parameter gradients, the update is then exactly the one process's on
the concatenated batch. At world size 1 (or without a process group) both are the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss, differentiated with respect to every rank's rows
        return grad[ctx.rank * ctx.n: (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every rank's ``x`` concatenated along dim 0, this rank's offset in it); gradients flow
    back to each rank's own rows from every rank's loss."""
    rank, world = _world()
    if world == 1:
        return x, 0
    return _AllGather.apply(x), rank * x.shape[0]


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 (labels, masks, timestamps)."""
    _, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
