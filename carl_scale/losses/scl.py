"""Sequence contrastive loss (SCL), paper Eq. 1-2.

For the i-th frame of view 1, the target distribution over the frames j of view 2 is a Gaussian
of the timestamp distance, normalised over j: w_ij = G(s1_i - s2_j) / sum_k G(s1_i - s2_k). The
prediction is the softmax over j of cos(z1_i, z2_j) / tau. L^1 is the mean over view 1's frames of
the cross-entropy between the two; L^2 swaps the views; SCL = L^1 + L^2, averaged over videos.

The loss is per video (negatives are the other view's frames of the same video), so it needs no
collective: it is the same at world size 1 and N, and data parallelism averages its gradients.
``negatives="batch"`` is the published K400 config's ``batch_noself``: every frame of the other
videos of the rank's batch (both views) joins each denominator too, a frame's own view still does
not; numerator and Gaussian prior stay over the video's other view. Per rank, as the published
code runs it under DDP: still no collective, but each rank's denominators are its own batch's, so
N ranks of B videos differ from one process of N x B videos (as they do in the published code).

Scale, against the published code (REFERENCE_NOTES, "The published SCL step"): it sums the KL over
valid frames of *both* views and divides by their number, so it is about (L^1 + L^2) / 2 and
weighs videos by their valid frames, where this is L^1 + L^2 per video, averaged over videos
(a short, padded video counts as much as a full one). Adam's update does not change when the
loss is scaled, so the factor 2 shows in two places only: the logged loss (twice the published
numbers) and gradient clipping: clipping the norm at 10 here bites where the published code's
gradient norm reaches 5, i.e. twice as early (Adam's epsilon, 1e-8, is negligible either way).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def gaussian_cross_entropy(log_p: torch.Tensor, s_a: torch.Tensor, s_b: torch.Tensor, m_a: torch.Tensor,
                           m_b: torch.Tensor, sigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What every SCL variant shares once its log-probabilities of view a's frames over view b's
    ``log_p`` ``(B, Ta, Tb)`` are made (their denominators are what differs): the cross-entropy
    with the Gaussian prior of the timestamp distance over b's valid frames, averaged over a's
    valid frames. Per-video L^a (B,) and whether it is defined (view a and view b have a valid frame)."""
    cols = m_b[:, None, :]
    neg = torch.finfo(log_p.dtype).min  # finite: a fully masked row gives finite garbage, not NaN
    prior = -((s_a[:, :, None] - s_b[:, None, :]) ** 2) / (2.0 * sigma2)  # log of the Gaussian; its constant cancels
    w = torch.softmax(prior.masked_fill(~cols, neg), dim=-1).masked_fill(~cols, 0.0)
    ce = -(w * log_p.masked_fill(~cols, 0.0)).sum(-1)  # (B, Ta)
    rows = m_a & m_b.any(-1, keepdim=True)
    n = rows.sum(-1)
    return (ce * rows).sum(-1) / n.clamp(min=1), n > 0


def _one_direction(z_a: torch.Tensor, z_b: torch.Tensor, s_a: torch.Tensor, s_b: torch.Tensor,
                   m_a: torch.Tensor, m_b: torch.Tensor, tau: float, sigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-video L^a (B,) and whether it is defined (B,): view a has a valid frame and view b too."""
    logits = torch.einsum("bid,bjd->bij", z_a, z_b) / tau  # (B, Ta, Tb)
    cols = m_b[:, None, :]
    log_p = torch.log_softmax(logits.masked_fill(~cols, torch.finfo(logits.dtype).min), dim=-1)
    return gaussian_cross_entropy(log_p, s_a, s_b, m_a, m_b, sigma2)


def _batch_direction(z: torch.Tensor, s: torch.Tensor, m: torch.Tensor, a: int, tau: float,
                     sigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-video L^a (B,) and whether it is defined, for the anchors of view ``a`` of ``z``
    ``(B, 2, T, D)`` against every frame of the batch but their own view's."""
    b, _, t, _ = z.shape
    idx = torch.arange(b, device=z.device)
    logits = torch.einsum("bid,evjd->bievj", z[:, a], z).reshape(b, t, b * 2 * t) / tau
    # a frame's own view is neither positive nor negative. A mask made on the device: assigning a
    # Python False through tensor indices (cols[idx, idx, a] = False) copies the value from host
    # memory, a synchronisation per call that CUDA's sync detection counted on an H200 (2 a step)
    own_view = (idx[:, None] == idx[None, :])[:, :, None, None] & (torch.arange(2, device=z.device) == a)[:, None]
    cols = (m[None] & ~own_view).reshape(b, 1, b * 2 * t)  # (anchor video, video, view, frame)
    neg = torch.finfo(logits.dtype).min  # finite: a fully masked row gives finite garbage, not NaN
    log_p = torch.log_softmax(logits.masked_fill(~cols, neg), dim=-1).view(b, t, b, 2, t)
    log_p_own = log_p[idx, :, idx, 1 - a]  # (B, Ta, Tb): the other view of the same video, the numerators
    return gaussian_cross_entropy(log_p_own, s[:, a], s[:, 1 - a], m[:, a], m[:, 1 - a], sigma2)


NEGATIVES = ("video", "batch")


def full_precision(fn):
    """Run a loss with autocast off: an autocast around the model (bf16 training) would otherwise
    compute its similarities in bf16, whose 8 bits of mantissa lose the differences (divided by a
    τ of 0.1) that the loss is made of. Its inputs are cast up inside."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if torch.is_tensor(a))
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


@full_precision
def sequence_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, *,
                              tau: float = 0.1, sigma2: float = 10.0, mask1: torch.Tensor | None = None,
                              mask2: torch.Tensor | None = None, negatives: str = "video") -> torch.Tensor:
    """SCL of two views.

    Args:
        z1, z2: ``(B, T1, D)``, ``(B, T2, D)`` projections of the two views (normalised here).
        s1, s2: ``(B, T1)``, ``(B, T2)`` original-frame timestamps of the sampled frames.
        tau: softmax temperature. sigma2: variance of the Gaussian prior, in frames squared.
        mask1, mask2: ``(B, T)`` bool, True for valid frames (default: all valid).
        negatives: ``"video"`` (the paper's Eq. 1: the other view of the same video) or ``"batch"``
            (also every frame of the batch's other videos, as the published K400 config); the
            latter needs views of equal length.

    Returns the mean over videos of L^1 + L^2 (videos with no valid frame in a view are left
    out; if none is left, a zero that still carries a graph).
    """
    if z1.dim() != 3 or z2.dim() != 3 or z1.shape[0] != z2.shape[0] or z1.shape[-1] != z2.shape[-1]:
        raise ValueError(f"expected (B, T, D) views with equal B and D, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if s1.shape != z1.shape[:2] or s2.shape != z2.shape[:2]:
        raise ValueError(f"timestamps {tuple(s1.shape)}, {tuple(s2.shape)} do not match views "
                         f"{tuple(z1.shape[:2])}, {tuple(z2.shape[:2])}")
    # float32 at least (full_precision keeps autocast from casting it back down)
    dtype = torch.promote_types(z1.dtype, torch.float32)
    z1 = F.normalize(z1.to(dtype), dim=-1)
    z2 = F.normalize(z2.to(dtype), dim=-1)
    s1, s2 = s1.to(dtype), s2.to(dtype)
    mask1 = torch.ones(s1.shape, dtype=torch.bool, device=z1.device) if mask1 is None else mask1.bool()
    mask2 = torch.ones(s2.shape, dtype=torch.bool, device=z2.device) if mask2 is None else mask2.bool()
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if negatives == "batch":
        if z1.shape != z2.shape:
            raise ValueError(f"batch negatives need views of one length, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        z, s, m = torch.stack([z1, z2], 1), torch.stack([s1, s2], 1), torch.stack([mask1, mask2], 1)
        (l1, ok1), (l2, ok2) = (_batch_direction(z, s, m, a, tau, sigma2) for a in (0, 1))
    else:
        l1, ok1 = _one_direction(z1, z2, s1, s2, mask1, mask2, tau, sigma2)
        l2, ok2 = _one_direction(z2, z1, s2, s1, mask2, mask1, tau, sigma2)
    ok = ok1 & ok2
    # no `if ok.any()`: a branch on a device value would make the host wait for the GPU every
    # step. With no video defined this is 0 / 1 = 0, still carrying the graph (zero gradients).
    return torch.where(ok, l1 + l2, 0.0).sum() / ok.sum().clamp(min=1)
