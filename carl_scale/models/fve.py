"""The frame-level video encoder (paper §3.3, Fig. 2), parameter for parameter the published
CARL model (``TransformerModel`` of github.com/minghchen/CARL_code) at the ``r50`` flavors.

frames -> 2-D backbone (lower stages frozen) -> max pool -> 2 x [Dropout, Linear, BN, ReLU] ->
Linear to ``width`` -> + sine-cosine positional encoding, dropout -> pre-LN transformer encoder
(:mod:`carl_scale.models.transformer`) -> Linear to ``embed_dim`` = the frame embeddings H. A
2-layer projection head g(H) = Z feeds the loss only. With ``class_token``, a learnable token
joins the sequence and a linear classifier on its output predicts the video's class (weak
supervision; not in the published code).

Positions: a training view has T frames at positions 0..T-1. A video of another length S at
evaluation has its positions stretched onto [0, T-1] (``linspace(0, T - 1, S)``), as the published
code does, so the transformer sees the range of positions it was trained on.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from carl_scale.models.backbones import Backbone
from carl_scale.models.config import ModelConfig
from carl_scale.models.masked_norm import make_row_maskable
from carl_scale.models.transformer import SequenceEncoder


class FrameVideoEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg.backbone, cfg.train_last_stages, cfg.pretrained)
        c, w = self.backbone.out_channels, cfg.head_width
        self.frame_head = nn.Sequential(
            nn.Dropout(cfg.dropout), nn.Linear(c, w), nn.BatchNorm1d(w), nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout), nn.Linear(w, w), nn.BatchNorm1d(w), nn.ReLU(inplace=True),
            nn.Linear(w, cfg.width),
        )
        self.transformer = SequenceEncoder(cfg.width, cfg.num_layers, cfg.num_heads, cfg.ffn_width, cfg.dropout,
                                           pos_encoding=cfg.pos_encoding, final_norm=cfg.final_norm)
        self.embed = nn.Linear(cfg.width, cfg.embed_dim)
        self.projection = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.BatchNorm1d(cfg.embed_dim),
                                        nn.ReLU(inplace=True), nn.Linear(cfg.embed_dim, cfg.proj_dim))
        if cfg.class_token:
            if cfg.num_classes < 1:
                raise ValueError("class_token=True needs num_classes >= 1")
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
            nn.init.normal_(self.cls_token, std=0.02)
            self.classifier = nn.Linear(cfg.width, cfg.num_classes)
        # the trained BatchNorms (the frozen stages' never leave eval mode): statistics over the
        # valid frames of a padded batch, at a fixed shape (see masked_norm)
        self._trunk_norms = make_row_maskable(self.backbone.trainable, self.frame_head)
        self._projection_norms = make_row_maskable(self.projection)

    def frame_features(self, frames: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) -> (N, width)."""
        x = self.backbone(frames, chunk)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.frame_head(x)

    def default_positions(self, batch: int, length: int, device) -> torch.Tensor:
        """(batch, length) float64: 0..T-1 for a training-length sequence, else the published
        stretch ``linspace(0, T - 1, length)``."""
        t = self.cfg.train_frames
        pos = torch.arange(length, device=device, dtype=torch.float64) if length == t else \
            torch.linspace(0, t - 1, length, device=device, dtype=torch.float64)
        return pos.expand(batch, length)

    @staticmethod
    def _valid_frames(fn, norms: list[nn.Module], x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """``fn`` over the rows of ``x`` that ``valid`` marks (all of them without a mask); padded
        rows come back as zeros. Padding never reaches a BatchNorm statistic. Eager, only the
        valid rows go in (``x[valid]``: their count is read on the host). Compiled, every row goes
        in at a fixed shape and ``norms`` (the trained BatchNorms) take their statistics over the
        valid ones: no graph break, no recompile per count (masked_norm's docstring has why)."""
        if valid is None:
            return fn(x)
        if not torch.compiler.is_compiling():
            # (eager keeps the narrower batch: masked_norm's float32 BatchNorm would save a float32
            # copy of each trained activation for backward, and padded frames cost their compute)
            if bool(valid.all()):
                return fn(x)
            out = fn(x[valid])
            full = out.new_zeros((x.shape[0], *out.shape[1:]))
            full[valid] = out
            return full
        # (what a padded slot holds, even inf or NaN, reaches no gradient)
        x = torch.where(valid.view(-1, *([1] * (x.dim() - 1))), x, 0)
        for m in norms:
            m.carl_rows = valid
        try:
            out = fn(x)
        finally:
            for m in norms:
                m.carl_rows = None
        return torch.where(valid.view(-1, *([1] * (out.dim() - 1))), out, 0.0)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                chunk: int | None = None) -> dict[str, torch.Tensor]:
        """frames ``(B, T, 3, H, W)``, mask ``(B, T)`` True = valid. Returns ``embeddings``
        ``(B, T, embed_dim)`` (not normalised; a padded slot's frame feature is zero and the
        transformer ignores it), ``features`` ``(B, T, width)`` (the trunk's frame features, what
        :meth:`encode_sequence` takes) and, with a class token, ``logits`` ``(B, C)``."""
        b, t = frames.shape[:2]
        valid = None if mask is None else mask.reshape(-1).bool()
        feats = self._valid_frames(lambda x: self.frame_features(x, chunk), self._trunk_norms, frames.flatten(0, 1),
                                   valid).view(b, t, -1)
        return {**self.encode_sequence(feats, mask, positions), "features": feats}

    def encode_sequence(self, feats: torch.Tensor, mask: torch.Tensor | None = None,
                        positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Frame features ``(B, T, width)`` -> the forward's outputs (the part after the trunk)."""
        b, t = feats.shape[:2]
        if positions is None:
            positions = self.default_positions(b, t, feats.device)
        prefix = self.cls_token.expand(b, -1, -1) if self.cfg.class_token else None
        x = self.transformer(feats, positions, None if mask is None else mask.bool(), prefix,
                             prefix_readout=self.cfg.class_token_attention == "readout")
        out = {}
        if self.cfg.class_token:
            out["logits"] = self.classifier(x[:, 0])
            x = x[:, 1:]
        out["embeddings"] = self.embed(x)
        return out

    def project(self, embeddings: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """g(H): (B, T, embed_dim) -> (B, T, proj_dim), for the loss; padded slots (``mask``
        False) are left out of the projection's BatchNorm and come back as zeros."""
        b, t, d = embeddings.shape
        valid = None if mask is None else mask.reshape(-1).bool()
        return self._valid_frames(self.projection, self._projection_norms, embeddings.reshape(b * t, d),
                                  valid).view(b, t, -1)

    @torch.no_grad()
    def embed_video(self, frames: torch.Tensor) -> torch.Tensor:
        """A whole video ``(S, 3, H, W)`` -> L2-normalised ``(S, embed_dim)``, in eval mode whatever
        mode the model is in (BatchNorm's running statistics, no dropout); backbone in chunks of
        ``backbone_chunk`` frames, the transformer over the whole sequence at once (the published
        evaluation cuts videos over 1000 frames into separate passes)."""
        was = self.training
        self.eval()
        try:
            out = self(frames[None], chunk=self.cfg.backbone_chunk)["embeddings"][0]
        finally:
            self.train(was)
        return F.normalize(out.float(), dim=-1)
