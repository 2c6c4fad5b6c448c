"""Embeddings of every frame of every video: stride 1, no augmentation, whole videos at once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from carl_scale.config import SpatialConfig
from carl_scale.data.decoders import make_decoder
from carl_scale.data.reader import manifest_codec, resolve_shards
from carl_scale.data.spatial import eval_geometric, eval_photometric, to_tchw
from carl_scale.data.whole_video import iter_whole_videos


@dataclass
class VideoEmbeddings:
    video_ids: list[str]
    embeddings: list[np.ndarray]  # (S_i, D) L2-normalised
    phase_labels: list[np.ndarray]
    action_labels: np.ndarray

    def subset(self, idx: list[int]) -> "VideoEmbeddings":
        return VideoEmbeddings([self.video_ids[i] for i in idx], [self.embeddings[i] for i in idx],
                               [self.phase_labels[i] for i in idx], self.action_labels[list(idx)])

    def by_action(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for k, a in enumerate(self.action_labels.tolist()):
            out.setdefault(a, []).append(k)
        return out

    def save(self, path: str) -> None:
        np.savez_compressed(path, video_ids=np.array(self.video_ids), action_labels=self.action_labels,
                            **{f"emb_{k}": e for k, e in enumerate(self.embeddings)},
                            **{f"phase_{k}": p for k, p in enumerate(self.phase_labels)})

    @classmethod
    def load(cls, path: str) -> "VideoEmbeddings":
        z = np.load(path)
        n = len(z["video_ids"])
        return cls(z["video_ids"].tolist(), [z[f"emb_{k}"] for k in range(n)], [z[f"phase_{k}"] for k in range(n)],
                   z["action_labels"])


def default_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def embed_frames(model, frames, *, image_size: int | None = None, spatial: SpatialConfig | None = None,
                 device: str = "cpu") -> np.ndarray:
    """One whole video ``(S, H, W, 3)`` uint8 -> L2-normalised ``(S, D)``: the evaluation view
    (centre crop, resize, normalise; no augmentation) through ``model.embed_video``."""
    x = eval_photometric(eval_geometric(to_tchw(frames), image_size or model.cfg.image_size),
                         spatial or SpatialConfig()).to(device)
    return model.embed_video(x.to(next(model.parameters()).dtype)).float().cpu().numpy()


@torch.no_grad()
def extract_embeddings(model, shards, split: str = "val", *, image_size: int | None = None,
                       spatial: SpatialConfig | None = None, device: str = "cpu", decoder: str = "auto",
                       limit: int | None = None, cache: str | None = None) -> VideoEmbeddings:
    """Embed every frame of every video of ``split``; optionally saved to ``cache`` (.npz, see
    :meth:`VideoEmbeddings.load`)."""
    _, manifest = resolve_shards(shards, split)
    # evaluation decodes whole videos on the CPU, whatever the training device
    dec = make_decoder(decoder, codec=manifest_codec(manifest), device="cpu")
    was_training = model.training
    model.eval()
    ids, embs, phases, actions = [], [], [], []
    for meta, frames in iter_whole_videos(shards, dec, split):
        embs.append(embed_frames(model, frames, image_size=image_size, spatial=spatial, device=device))
        ids.append(meta["video_id"])
        phases.append(np.asarray(meta["phase_labels"], dtype=np.int64))
        actions.append(int(meta["action_label"]))
        if limit and len(ids) >= limit:
            break
    model.train(was_training)
    out = VideoEmbeddings(ids, embs, phases, np.asarray(actions, dtype=np.int64))
    if cache:
        out.save(cache)
    return out
