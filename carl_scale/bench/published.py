"""The published CARL code's training step, rebuilt on our model for benchmarks and equivalence
tests (written from reading its ``models/transformer.py``, ``algos/scl.py`` and ``train.py``; none
of its code is used here).

What it does differently from ours, all reproduced:

* the ResNet trunk, frozen stages *and* the fine-tuned last stage, runs in blocks of 40 frames of
  every video at once (``FRAMES_PER_BATCH``), the frozen part under ``no_grad``;
* SCL is one (2BT) x (2BT) similarity matrix of L2-normalised projections over every frame of the
  batch, divided by τ and exponentiated without a max shift; a weight matrix keeps only the other
  view of the same video in each denominator ("single_noself") and 1e-6 of masked pairs; the
  target is the Gaussian of the timestamp distance normalised over the other view; the loss is
  ``KL(target || exp / sum + 1e-6)`` summed over valid pairs and divided by the valid frames;
* its attention: three separate Q, K, V projections and an explicit masked softmax per head
  (``QKt / sqrt(d_k)``, ``masked_fill(-inf)``, ``softmax``, ``@ V``), not a fused kernel;
* fp16 autocast with a GradScaler on a GPU, eager, NCHW; the optimizer steps the parameters
  directly (no engine).

Relation to ours (:func:`carl_scale.losses.sequence_contrastive_loss`, checked in
``tests/test_scl.py``): with every frame valid and no 1e-6 terms, published = (ours − 2 x the mean
entropy of the targets) / 2, and the gradients are half of ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from carl_scale.models.fve import FrameVideoEncoder

FRAMES_PER_BLOCK = 40  # the published configs' MODEL.BASE_MODEL.FRAMES_PER_BATCH


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


def published_encoder(model: FrameVideoEncoder, feats: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """frame features ``(B, T, width)`` -> embeddings, the temporal part as the published code runs
    it (its positional encoding, pre-norm blocks with :func:`published_attention`)."""
    from carl_scale.models.transformer import sincos_encoding

    enc = model.transformer
    b, t = feats.shape[:2]
    pos = model.default_positions(b, t, feats.device)
    x = enc.pos_dropout(feats + sincos_encoding(pos, enc.width, enc.pos_encoding).to(feats.dtype))
    for blk in enc.blocks:
        x = x + blk.dropout(published_attention(blk.attn, blk.attn_norm(x), keep))
        x = x + blk.dropout(blk.fc2(F.relu(blk.fc1(blk.ffn_norm(x)))))
    if enc.final_norm is not None:
        x = enc.final_norm(x)
    return model.embed(x)


def published_scl(z: torch.Tensor, steps: torch.Tensor, mask: torch.Tensor, *, tau: float = 0.1,
                  sigma2: float = 10.0, eps: float = 1e-6) -> torch.Tensor:
    """z ``(B, 2, T, D)`` L2-normalised projections, steps ``(B, 2, T)`` original frame indices,
    mask ``(B, 2, T)``: the published formulation's loss (see the module docstring; ``eps`` is its
    1e-6 inside the log)."""
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
    weight = other_view.to(logits.dtype).masked_fill(pair_valid == 0, 1e-6)
    gauss = torch.exp(-distance ** 2 / (2 * sigma2)).to(logits.dtype) * other_view
    total = gauss.sum(1, keepdim=True)
    target = torch.where(total > 0, gauss / total, torch.zeros_like(gauss))
    target = torch.nan_to_num(target)
    exp = torch.exp(logits)
    p = exp / (weight * exp).sum(1, keepdim=True)
    kl = F.kl_div(torch.log(p + eps), target, reduction="none")
    return (kl * pair_valid).sum() / m.sum()


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
