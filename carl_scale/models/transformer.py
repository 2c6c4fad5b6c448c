"""The FVE's temporal part: positional encoding and a pre-norm transformer encoder, built to be
the published CARL model's (``models/transformer.py`` of github.com/minghchen/CARL_code) layer
for layer, so that the authors' checkpoints give the same frame embeddings here.

What the published encoder does, and so what this one does:

* positional encoding: ``x + PE`` then dropout. ``PE[p, i] = sin(p / 10000^(i/d))`` for even
  ``i`` and ``cos(p / 10000^(i/d))`` for odd ``i`` (the odd index itself in the exponent, not
  ``i - 1`` as in the transformer paper), computed in float64. A sequence of S frames at
  evaluation (S != the training T) takes the positions ``linspace(0, T - 1, S)``.
* each block: ``x + Dropout(Attn(LN(x)))``, then ``x + Dropout(FFN(LN(x)))``; attention with
  1/sqrt(d_head) scaling and padded keys masked, no dropout inside attention or between the two
  FFN layers (the published code passes 0.0 there); ReLU FFN.
* no LayerNorm after the last block.

Two settings keep checkpoints written by carl_scale before November 2026 (which used PyTorch's
``nn.TransformerEncoder``) computing what they computed: ``final_norm=True`` (the LayerNorm after
the last block) and ``pos_encoding="halves"`` (sines in the first half of the channels, cosines in
the second, exponent ``2k/d``). :func:`upgrade_legacy_keys` renames their weights; the parameter
order is the old one too, so a DeepSpeed optimizer state written then still lines up.

Attention runs through ``F.scaled_dot_product_attention`` (fused kernels on a GPU) on one packed
Q/K/V projection; the published code's separate Q, K and V projections are its three row blocks.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

PositionalLayout = Literal["interleaved", "halves"]  # the published code's; carl_scale's before November 2026


def sincos_encoding(positions: torch.Tensor, dim: int, layout: PositionalLayout = "interleaved") -> torch.Tensor:
    """(..., L) positions (fractional allowed) -> (..., L, dim) float32, computed in float64."""
    pos = positions.double()[..., None]
    if layout == "interleaved":
        i = torch.arange(dim, device=positions.device, dtype=torch.float64)
        ang = pos / torch.pow(10000.0, i / dim)
        return torch.where(i.long() % 2 == 0, torch.sin(ang), torch.cos(ang)).float()
    if layout == "halves":
        half = dim // 2
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float64) / half)
        ang = pos * freq
        return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).float()
    raise ValueError(f"unknown positional encoding layout {layout!r}")


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # rows: Q, K, V projections
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x ``(B, S, D)``; ``keep`` ``(B, S)`` True for keys that may be attended to, or
        ``(B | 1, S, S)`` per query (row) and key (column)."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if keep is None else keep[:, None, None, :] if keep.dim() == 2 else keep[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class EncoderBlock(nn.Module):
    """Pre-norm block. Submodules are declared in the order of ``nn.TransformerEncoderLayer``'s
    parameters (attention, fc1, fc2, the two norms), which old optimizer states follow."""

    def __init__(self, width: int, heads: int, ffn_width: int, dropout: float):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.fc1 = nn.Linear(width, ffn_width)
        self.fc2 = nn.Linear(ffn_width, width)
        self.attn_norm = nn.LayerNorm(width)
        self.ffn_norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)  # on each residual branch, as published
        # the published initialisation: Xavier on each (out, in) matrix, Q, K and V each on its own
        # (one bound for the packed 3w x w matrix would be sqrt(2) smaller)
        for w in (*self.attn.qkv.weight.data.chunk(3), self.attn.proj.weight, self.fc1.weight, self.fc2.weight):
            nn.init.xavier_uniform_(w)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), keep))
        return x + self.dropout(self.fc2(F.relu(self.fc1(self.ffn_norm(x)))))


class SequenceEncoder(nn.Module):
    """Positional encoding + ``layers`` blocks (+ the legacy final LayerNorm)."""

    def __init__(self, width: int, layers: int, heads: int, ffn_width: int, dropout: float, *,
                 pos_encoding: PositionalLayout = "interleaved", final_norm: bool = False):
        super().__init__()
        self.width, self.pos_encoding = width, pos_encoding
        self.pos_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, ffn_width, dropout) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width) if final_norm else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None, prefix_readout: bool = False) -> torch.Tensor:
        """x ``(B, S, D)`` frame features at ``positions`` ``(B, S)``; ``prefix`` ``(B, P, D)``
        tokens without a position (the class token) go in front. With ``prefix_readout`` the
        prefix reads the frames but no frame attends to the prefix, so the frames' outputs are
        exactly what they would be without it."""
        x = self.pos_dropout(x + sincos_encoding(positions, self.width, self.pos_encoding).to(x.dtype))
        if prefix is not None:
            p = prefix.shape[1]
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
            if keep is not None:
                keep = torch.cat([keep.new_ones(keep.shape[0], p), keep], dim=1)
        if keep is not None and not torch.compiler.is_compiling() and bool(keep.all()):
            keep = None  # no mask: the fused kernels' fast path (compiled: no branch on a device value)
        if prefix is not None and prefix_readout:
            s = x.shape[1]
            allowed = torch.ones(s, s, dtype=torch.bool, device=x.device)
            allowed[p:, :p] = False  # frame queries never see the prefix keys
            keep = allowed[None] if keep is None else allowed[None] & keep[:, None, :]  # (B | 1, S, S)
        for block in self.blocks:
            x = block(x, keep)
        return x if self.final_norm is None else self.final_norm(x)


# -- checkpoints written with nn.TransformerEncoder (carl_scale before November 2026) ------------
_LEGACY = [
    (r"transformer\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$", r"transformer.blocks.\1.attn.qkv.\2"),
    (r"transformer\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$", r"transformer.blocks.\1.attn.proj.\2"),
    (r"transformer\.layers\.(\d+)\.linear1\.(weight|bias)$", r"transformer.blocks.\1.fc1.\2"),
    (r"transformer\.layers\.(\d+)\.linear2\.(weight|bias)$", r"transformer.blocks.\1.fc2.\2"),
    (r"transformer\.layers\.(\d+)\.norm1\.(weight|bias)$", r"transformer.blocks.\1.attn_norm.\2"),
    (r"transformer\.layers\.(\d+)\.norm2\.(weight|bias)$", r"transformer.blocks.\1.ffn_norm.\2"),
    (r"transformer\.norm\.(weight|bias)$", r"transformer.final_norm.\1"),
]


def upgrade_legacy_keys(state: dict, prefix: str = "") -> dict:
    """``state`` with the weight names of an ``nn.TransformerEncoder``-based FVE renamed to this
    module's (``prefix``: what precedes the encoder's names, e.g. ``"model."`` in DeepSpeed's
    module); other keys, and the order of all keys, unchanged. PyTorch packs Q, K, V in
    ``in_proj`` in the same row order as ``qkv``, so the tensors are used as they are."""
    if not any(k.startswith(prefix + "transformer.layers.") for k in state):
        return state
    out = {}
    for k, v in state.items():
        name = k[len(prefix):] if k.startswith(prefix) else None
        if name is not None:
            for pattern, repl in _LEGACY:
                if re.match(pattern, name):
                    k = prefix + re.sub(pattern, repl, name)
                    break
        out[k] = v
    return out
