"""The published CARL code's training step, rebuilt on our model for benchmarks and equivalence
tests (written from reading its ``models/transformer.py``, ``algos/scl.py`` and ``train.py``; none
of its code is used here).

What it does differently from ours, all reproduced (the step itself: :mod:`carl_scale.bench.step`):

* the ResNet trunk, frozen stages *and* the fine-tuned last stage, runs in blocks of 40 frames of
  every video at once (``FRAMES_PER_BATCH``), the frozen part under ``no_grad``;
* its positional table is built in NumPy on every forward, row by row, and added with
  ``.type_as(x)``: a copy from pageable host memory to the device in the middle of the forward
  (:func:`published_positional_table`);
* its attention: three separate Q, K, V projections and an explicit masked softmax per head
  (``QKt / sqrt(d_k)``, ``masked_fill(-inf)``, ``softmax``, ``@ V``), not a fused kernel;
* SCL is one (2BT) x (2BT) similarity matrix of L2-normalised projections over every frame of the
  batch, divided by τ and exponentiated without a max shift; a weight matrix keeps only the other
  view of the same video in each denominator ("single_noself") and 1e-6 of masked pairs; the
  target is the Gaussian of the timestamp distance normalised over the other view; the loss is
  ``KL(target || exp / sum + 1e-6)`` summed over valid pairs and divided by the valid frames. The
  step runs it as the published code writes it, Python loops over the videos filling the weight
  and target blocks (:func:`published_scl_loop`, about twice the aten ops);
  :func:`published_scl` is the same loss vectorised, the readable reference;
* fp16 autocast with a GradScaler on a GPU, eager, NCHW; gradients unscaled and clipped to norm
  ``GRAD_CLIP`` every step; the optimizer steps the parameters directly (no engine); after the
  step the loss is NaN-zeroed, all-reduced and read back to the host (``.item()``).

Left out on purpose, each a cost the published step pays and ours does not, so the ratio to
ours is conservative: ``torch.autograd.set_detect_anomaly(True)`` on every step (a debugging
leftover; measured only with ``bench.step --as-shipped``); the DistributedDataParallel and
SyncBatchNorm wrapping it runs even on one GPU; and the host-to-device copies of the batch (the
views, and its loss's ``.to(device)`` of frame counts, timestamps and masks), which both paths'
step benchmarks leave to ``bench.e2e`` by starting from a batch already on the device.

Relation to ours (:func:`carl_scale.losses.sequence_contrastive_loss`, checked in
``tests/test_scl.py``): with every frame valid and no 1e-6 terms, published = (ours − 2 x the mean
entropy of the targets) / 2, and the gradients are half of ours.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from carl_scale.models.fve import FrameVideoEncoder

FRAMES_PER_BLOCK = 40  # the published configs' MODEL.BASE_MODEL.FRAMES_PER_BATCH
GRAD_CLIP = 10.0  # the published configs' OPTIMIZER.GRAD_CLIP (every one of them)


def published_attention(attn, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Our :class:`~carl_scale.models.transformer.SelfAttention`'s weights computed the published
    way: Q, K and V as three linears (the packed weight's row blocks), scores masked with -inf
    for padded keys, softmax, then the output projection."""
    b, s, d = x.shape
    h = attn.heads
    wq, wk, wv = attn.qkv.weight.chunk(3)
    bq, bk, bv = attn.qkv.bias.chunk(3)
    q, k, v = (F.linear(x, w, bias).view(b, s, h, d // h).transpose(1, 2)
               for w, bias in ((wq, bq), (wk, bk), (wv, bv)))
    scores = q @ k.transpose(-1, -2) / (d // h) ** 0.5
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, s, d))


def published_positional_table(length: int, dim: int, train_frames: int) -> torch.Tensor:
    """``(1, length, dim)`` float64 on the host: the published ``generate_sincos_embedding``, which
    its ``PositionalEncoder`` calls on every forward. Sines in the even channels, cosines in the
    odd ones, channel ``i`` at frequency ``10000 ** (-i / dim)`` (our "interleaved" layout);
    positions ``0..T-1`` for a sequence of the training length T, else ``linspace(0, T - 1,
    length)``, as our :meth:`~carl_scale.models.fve.FrameVideoEncoder.default_positions`. Built
    row by row in NumPy as there: that host work is part of the published step's cost."""
    sin_cols, cos_cols = np.arange(0, dim, 2), np.arange(1, dim, 2)
    table = np.zeros((length, dim))
    positions = np.arange(length) if length == train_frames else np.linspace(0, train_frames - 1, num=length)
    for i, pos in enumerate(positions):
        table[i, sin_cols] = np.sin(pos / (10000 ** (sin_cols / dim)))
        table[i, cos_cols] = np.cos(pos / (10000 ** (cos_cols / dim)))
    return torch.from_numpy(table).unsqueeze(0)


def published_encoder(model: FrameVideoEncoder, feats: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """frame features ``(B, T, width)`` -> embeddings, the temporal part as the published code runs
    it (its positional table, pre-norm blocks with :func:`published_attention`)."""
    enc = model.transformer
    if enc.pos_encoding != "interleaved":  # (a pre-November-2026 checkpoint's layout, never published)
        raise ValueError(f"the published code has only the interleaved positional table, this model has "
                         f"{enc.pos_encoding!r}")
    table = published_positional_table(feats.shape[1], enc.width, model.cfg.train_frames)
    x = enc.pos_dropout(feats + table.type_as(feats))  # host float64 -> the device, in the features' dtype
    for blk in enc.blocks:
        x = x + blk.dropout(published_attention(blk.attn, blk.attn_norm(x), keep))
        x = x + blk.dropout(blk.fc2(F.relu(blk.fc1(blk.ffn_norm(x)))))
    if enc.final_norm is not None:
        x = enc.final_norm(x)
    return model.embed(x)


def published_scl(z: torch.Tensor, steps: torch.Tensor, mask: torch.Tensor, *, tau: float = 0.1,
                  sigma2: float = 10.0, eps: float = 1e-6, negatives: str = "video") -> torch.Tensor:
    """z ``(B, 2, T, D)`` L2-normalised projections, steps ``(B, 2, T)`` original frame indices,
    mask ``(B, 2, T)``: the published formulation's loss (see the module docstring; ``eps`` is its
    1e-6 inside the log). ``negatives``: ``"video"`` is its ``single_noself``, ``"batch"`` its
    ``batch_noself`` (the K400 config's: every frame but the own view's in the denominator)."""
    b, v, t, d = z.shape
    n = b * v * t
    e = z.reshape(n, d)
    s = steps.reshape(n).to(e.dtype)
    m = mask.reshape(n).to(e.dtype)
    pair_valid = m[:, None] * m[None, :]
    logits = e @ e.t() / tau
    distance = (s[:, None] - s[None, :]).abs().masked_fill(pair_valid == 0, 1e6)
    video = torch.arange(n, device=z.device) // (v * t)
    view = torch.arange(n, device=z.device) // t
    other_view = (video[:, None] == video[None, :]) & (view[:, None] != view[None, :])
    in_denominator = other_view if negatives == "video" else ~((video[:, None] == video[None, :]) & ~other_view)
    weight = in_denominator.to(logits.dtype).masked_fill(pair_valid == 0, 1e-6)
    gauss = torch.exp(-distance ** 2 / (2 * sigma2)).to(logits.dtype) * other_view
    total = gauss.sum(1, keepdim=True)
    target = torch.where(total > 0, gauss / total, torch.zeros_like(gauss))
    target = torch.nan_to_num(target)
    exp = torch.exp(logits)
    p = exp / (weight * exp).sum(1, keepdim=True)
    kl = F.kl_div(torch.log(p + eps), target, reduction="none")
    return (kl * pair_valid).sum() / m.sum()


def _zero_nans(x: torch.Tensor) -> torch.Tensor:
    """The published division's clean-up: 0 / 0 entries set to 0 through a boolean index (an
    ``index_put_`` with a mask, as there: its cost is part of the step's)."""
    x[torch.isnan(x)] = 0
    return x


def _view_blocks(videos: int, frames: int):
    """Per video of a (video, view, frame)-ordered batch: the index ranges of its first and its
    second view."""
    for v in range(videos):
        first = slice(2 * v * frames, (2 * v + 1) * frames)
        yield first, slice(first.stop, first.stop + frames)


def published_scl_loop(z: torch.Tensor, steps: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, *,
                       tau: float = 0.1, sigma2: float = 10.0, eps: float = 1e-6, negatives: str = "video") -> torch.Tensor:
    """:func:`published_scl` with the published step's work: its Gaussian targets and its
    denominators ("single_noself", or with ``negatives="batch"`` "batch_noself") are filled in
    per video by Python loops (each block a few small
    kernels), an ``argmin`` per view finds each frame's nearest frame of the other view (computed
    and never used there, so computed here), and 0 / 0 is cleaned by boolean indexing.
    ``lengths`` ``(B,)``: each video's frame count, by which the published code rescales one
    side's timestamps (``s_i / L_i * L_j``: the same within a video, the only pairs that reach the
    loss). Same value and gradients as :func:`published_scl` (tested)."""
    videos, views, frames, dim = z.shape
    assert views == 2, "two views per video"
    flat = z.reshape(-1, dim)
    t = steps.reshape(-1)
    # each frame's video length, in the projections' dtype (the published code: float32, as its
    # projections are; the same cast in the step, and the float64 test stays exact)
    length = lengths.repeat_interleave(views * frames).to(flat.dtype)
    valid_pairs = mask.reshape(-1, 1) * mask.reshape(1, -1)

    sim = flat @ flat.t() / tau
    gap = (t[:, None] / length[:, None] * length[None, :] - t[None, :]).abs()
    gap.masked_fill_(valid_pairs == 0, 1e6)
    keep = torch.ones_like(sim)  # which entries of a row's denominator count
    unused_nearest = torch.zeros_like(t, dtype=torch.long)
    for a, b in _view_blocks(videos, frames):
        unused_nearest[a] = b.start + gap[a, b].argmin(dim=1)
        unused_nearest[b] = a.start + gap[b, a].argmin(dim=1)
        if negatives == "video":  # ("single") other videos out of the denominator
            own = slice(a.start, b.stop)
            keep[own, :a.start].fill_(0)
            keep[own, b.stop:].fill_(0)
        keep[a, a] = 0  # ("noself") the frame's own view never in it
        keep[b, b] = 0
    keep.masked_fill_(valid_pairs == 0, 1e-6)

    target = torch.zeros_like(sim)
    gauss = torch.exp(-gap.square() / (2 * sigma2)).type_as(sim)
    for a, b in _view_blocks(videos, frames):
        for rows, cols in ((a, b), (b, a)):
            block = gauss[rows, cols]
            target[rows, cols] = _zero_nans(block / block.sum(dim=1, keepdim=True))

    e = torch.exp(sim)
    p = _zero_nans(e / (keep * e).sum(dim=1, keepdim=True))
    kl = F.kl_div(torch.log(p + eps), target, reduction="none")
    return (kl * valid_pairs).sum() / mask.sum()


def published_forward(model: FrameVideoEncoder, views: torch.Tensor, mask: torch.Tensor | None = None,
                      block: int = FRAMES_PER_BLOCK) -> torch.Tensor:
    """views ``(B, 2, T, 3, H, W)`` -> L2-normalised projections ``(B, 2, T, P)``, the trunk run as
    the published model runs it: blocks of ``block`` frames of all 2B clips, frozen stages without
    gradients, the trained stage on each block."""
    b, v, t = views.shape[:3]
    clips = views.flatten(0, 1)  # (2B, T, 3, H, W)
    blocks = []
    for start in range(0, t, block):
        x = clips[:, start:start + block]
        k = x.shape[1]
        with torch.no_grad():
            y = model.backbone.frozen(x.reshape(-1, *x.shape[2:]))
        y = model.backbone.trainable(y)
        blocks.append(y.view(2 * b, k, *y.shape[1:]))
    feats = torch.cat(blocks, dim=1).flatten(0, 1)  # (2B*T, C, h, w)
    feats = model.frame_head(F.adaptive_max_pool2d(feats, 1).flatten(1)).view(2 * b, t, -1)
    z = model.project(published_encoder(model, feats, None if mask is None else mask.flatten(0, 1).bool()))
    return F.normalize(z.float(), dim=-1).view(b, v, t, -1)
