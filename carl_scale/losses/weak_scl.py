"""Weakly supervised sequence contrastive loss (paper Eq. 3).

As SCL (Eq. 1-2, :mod:`carl_scale.losses.scl`), but a frame of video a is also contrasted with
every valid frame of the *other view* of each video b whose video-level label differs
(``labels[b] != labels[a]``): those are "points at infinity", added to the softmax denominator
only. Videos with a's label are not in it (the paired contrastive loss handles them). Numerator
and Gaussian prior are SCL's, over a's own other view; the result is the mean over videos of
L^1 + L^2, so with one label for the whole batch it *is* SCL.

With ``gather=True`` the other videos come from every data-parallel rank (all_gather with
gradient, :mod:`carl_scale.losses.gather`), and the mean is over every rank's defined videos (their
count summed over ranks), so at world size N the loss and its update equal the one process's on
the concatenated batch. Every rank's batch has one shape (the loader keeps batches whole), which
the gather needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from carl_scale.losses.gather import _world, all_gather_no_grad, all_gather_with_grad
from carl_scale.losses.scl import full_precision, gaussian_cross_entropy


def _one_direction(z_a, z_b_all, s_a, s_b, m_a, m_b_all, labels, labels_all, offset, tau, sigma2):
    """Per-video L^a (B,) and whether it is defined, for anchors ``z_a`` (B, Ta, D) against the
    other view of every video in ``z_b_all`` (B', Tb, D), this rank's videos at ``offset``."""
    b, ta, _ = z_a.shape
    nb, tb, _ = z_b_all.shape
    own = torch.arange(b, device=z_a.device) + offset
    logits = torch.einsum("bid,ejd->biej", z_a, z_b_all).reshape(b, ta, nb * tb) / tau
    known = (labels[:, None] >= 0) & (labels_all[None, :] >= 0)  # an unknown label (-1) may be any class
    # points at infinity: other classes, and the video itself (a mask made on the device, not an
    # indexed assignment of a Python True: that copies the value from host memory, a sync)
    itself = own[:, None] == torch.arange(nb, device=z_a.device)[None, :]
    videos = (known & (labels[:, None] != labels_all[None, :])) | itself
    cols = (videos[:, :, None] & m_b_all[None]).reshape(b, 1, nb * tb)
    neg = torch.finfo(logits.dtype).min  # finite: a fully masked row gives finite garbage, not NaN
    log_p = torch.log_softmax(logits.masked_fill(~cols, neg), dim=-1).view(b, ta, nb, tb)
    log_p_own = log_p[torch.arange(b, device=z_a.device), :, own]  # (B, Ta, Tb): the numerator's terms
    return gaussian_cross_entropy(log_p_own, s_a, s_b, m_a, m_b_all[own], sigma2)


@full_precision
def weak_sequence_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                                   labels: torch.Tensor, *, tau: float = 0.1, sigma2: float = 10.0,
                                   mask1: torch.Tensor | None = None, mask2: torch.Tensor | None = None,
                                   gather: bool = False) -> torch.Tensor:
    """Eq. 3 for two views ``(B, T, D)`` with timestamps ``(B, T)`` and video labels ``(B,)``; a
    video with an unknown label (< 0) is no point at infinity for anyone, nor anyone for it."""
    if z1.dim() != 3 or z2.dim() != 3 or z1.shape[0] != z2.shape[0] or labels.shape != z1.shape[:1]:
        raise ValueError(f"expected (B, T, D) views and (B,) labels, got {tuple(z1.shape)}, {tuple(z2.shape)}, "
                         f"{tuple(labels.shape)}")
    for name, x, like in (("s1", s1, z1), ("s2", s2, z2), ("mask1", mask1, z1), ("mask2", mask2, z2)):
        if x is not None and x.shape != like.shape[:2]:  # (a (B, 1) would broadcast into a wrong prior)
            raise ValueError(f"{name} is {tuple(x.shape)}, its view {tuple(like.shape[:2])}")
    dtype = torch.promote_types(z1.dtype, torch.float32)
    z1, z2 = F.normalize(z1.to(dtype), dim=-1), F.normalize(z2.to(dtype), dim=-1)
    s1, s2 = s1.to(dtype), s2.to(dtype)
    mask1 = torch.ones(s1.shape, dtype=torch.bool, device=z1.device) if mask1 is None else mask1.bool()
    mask2 = torch.ones(s2.shape, dtype=torch.bool, device=z2.device) if mask2 is None else mask2.bool()
    labels = labels.long()
    if gather:
        z1_all, offset = all_gather_with_grad(z1)
        z2_all, _ = all_gather_with_grad(z2)
        m1_all, m2_all, labels_all = all_gather_no_grad(mask1), all_gather_no_grad(mask2), all_gather_no_grad(labels)
    else:
        z1_all, z2_all, m1_all, m2_all, labels_all, offset = z1, z2, mask1, mask2, labels, 0
    l1, ok1 = _one_direction(z1, z2_all, s1, s2, mask1, m2_all, labels, labels_all, offset, tau, sigma2)
    l2, ok2 = _one_direction(z2, z1_all, s2, s1, mask2, m1_all, labels, labels_all, offset, tau, sigma2)
    ok = ok1 & ok2
    # no `if ok.any()` (the host would wait for the GPU every step): with no video defined this is
    # 0 / 1 = 0, its graph still through the gathered views, so every rank's backward joins the
    # gather's all_reduce
    defined, world = ok.sum(), _world()[1]
    if gather and world > 1:  # the one process's mean over every rank's defined videos (ranks are averaged)
        return torch.where(ok, l1 + l2, 0.0).sum() * world / all_gather_no_grad(defined[None]).sum().clamp(min=1)
    return torch.where(ok, l1 + l2, 0.0).sum() / defined.clamp(min=1)
