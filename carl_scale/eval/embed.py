"""Embeddings of every frame of every video: stride 1, no augmentation, whole videos at once."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from carl_scale.data.config import SpatialConfig
from carl_scale.data.decoders import make_decoder
from carl_scale.data.manifest import manifest_codec, manifest_samples, resolve_shards
from carl_scale.data.spatial import eval_geometric, eval_photometric, to_tchw
from carl_scale.data.whole_video import iter_whole_videos

log = logging.getLogger("carl_scale.eval")
EMBEDDINGS_FORMAT = 3  # bump when what extract_embeddings computes changes, to retire old .npz files (3: eval view)


@dataclass
class VideoEmbeddings:
    video_ids: list[str]
    embeddings: list[np.ndarray]  # (S_i, D) L2-normalised
    phase_labels: list[np.ndarray]
    action_labels: np.ndarray
    # more per-frame label sets of the shards (meta["frame_labels"]), e.g. {"gym288": [...]}
    frame_labels: dict[str, list[np.ndarray]] = field(default_factory=dict)
    fingerprint: str = ""  # what made them (see :func:`embedding_fingerprint`); "" = unknown
    skipped: list[str] = field(default_factory=list)  # samples that could not be read: "what: why"

    def labels(self, name: str = "phase") -> list[np.ndarray]:
        """A per-frame label set by name: ``"phase"`` or one of :attr:`frame_labels`."""
        if name == "phase":
            return self.phase_labels
        if name not in self.frame_labels:
            raise ValueError(f"no per-frame label set {name!r} in these embeddings (have: phase"
                           f"{''.join(', ' + k for k in self.frame_labels)}); write the shards with "
                           f"--extra-frame-labels {name}=DIR")
        return self.frame_labels[name]

    def subset(self, idx: list[int]) -> "VideoEmbeddings":
        return VideoEmbeddings([self.video_ids[i] for i in idx], [self.embeddings[i] for i in idx],
                               [self.phase_labels[i] for i in idx], self.action_labels[list(idx)],
                               {k: [v[i] for i in idx] for k, v in self.frame_labels.items()}, self.fingerprint,
                               self.skipped)

    def labelled_only(self) -> "VideoEmbeddings":
        """Each video cut to its phase-labelled frames (label >= 0), as the published evaluation
        reads every video before any metric: τ matches, AP@K's stride and progression's positions
        t and length L are then over those frames (the other label sets are left out)."""
        keep = [np.asarray(p) >= 0 for p in self.phase_labels]
        return VideoEmbeddings(list(self.video_ids), [np.asarray(e)[m] for e, m in zip(self.embeddings, keep)],
                               [np.asarray(p)[m] for p, m in zip(self.phase_labels, keep)], self.action_labels,
                               {}, self.fingerprint, self.skipped)

    def nonfinite(self) -> list[str]:
        """The videos with a non-finite embedding, which no metric can score: a NaN frame wins every
        nearest-neighbour search (one-shot, AP@K, τ's matches) and fails the classifiers."""
        return [v for v, x in zip(self.video_ids, self.embeddings) if not np.isfinite(x).all()]

    def by_action(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for k, a in enumerate(self.action_labels.tolist()):
            out.setdefault(a, []).append(k)
        return out

    def save(self, path: str | Path) -> None:
        """One ``.npz``, written to a temporary name first so an interrupted save never looks whole."""
        names = sorted(self.frame_labels)
        tmp = Path(str(path) + ".partial.npz")
        np.savez_compressed(tmp, video_ids=np.array(self.video_ids), action_labels=self.action_labels,
                            fingerprint=np.array(self.fingerprint), frame_label_names=np.array(names, dtype=str),
                            skipped=np.array(self.skipped, dtype=str),
                            **{f"emb_{k}": e for k, e in enumerate(self.embeddings)},
                            **{f"phase_{k}": p for k, p in enumerate(self.phase_labels)},
                            **{f"lab{j}_{k}": lab for j, n in enumerate(names)
                               for k, lab in enumerate(self.frame_labels[n])})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "VideoEmbeddings":
        with np.load(path) as z:
            n = len(z["video_ids"])
            names = z["frame_label_names"].tolist() if "frame_label_names" in z else []
            return cls(z["video_ids"].tolist(), [z[f"emb_{k}"] for k in range(n)],
                       [z[f"phase_{k}"] for k in range(n)], z["action_labels"],
                       {name: [z[f"lab{j}_{k}"] for k in range(n)] for j, name in enumerate(names)},
                       str(z["fingerprint"]) if "fingerprint" in z else "",
                       z["skipped"].tolist() if "skipped" in z else [])


def embedding_fingerprint(model, shards, split: str, *, image_size: int | None, spatial: SpatialConfig,
                          limit: int | None, per_action: int | None = None, actions: int | None = None,
                          decoder: str = "auto", device: str = "cpu") -> str:
    """A hash of everything the embeddings depend on: every weight of the model, its config, the
    shard split as ``shards.json`` lists it (files, sizes, write time) and the files read (a
    pattern may name some of them), the evaluation view (size, crop ratio, normalisation), ``limit``,
    ``per_action``, ``actions``, the decoder (their pixels differ by rounding) and the device (its
    arithmetic). Equal fingerprints mean a saved ``.npz`` can stand in for re-embedding."""
    h = hashlib.sha1(usedforsecurity=False)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    urls, manifest = resolve_shards(shards, split)
    data = (manifest or {}).get("splits", {}).get(split) or [  # no manifest: the files themselves
        (Path(u).name, Path(u).stat().st_size, Path(u).stat().st_mtime_ns) for u in urls]
    read = [Path(u).name for u in urls]  # (local paths only: resolve_shards)
    size = model.cfg.image_size if image_size is None else image_size
    h.update(json.dumps([EMBEDDINGS_FORMAT, repr(getattr(model, "cfg", None)), data, read,
                         size, list(spatial.mean), list(spatial.std), list(spatial.crop_ratio), limit, decoder,
                         str(device)]
                        + ([per_action, actions] if per_action is not None else []),
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def default_device(device: str | None = None) -> str:
    """``--device`` checked against this machine (None: a GPU if there is one), so that a device
    it lacks is one line, not a traceback from deep inside the model."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index or 0) >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s); use cpu"
                             + (f" or cuda:0..cuda:{count - 1}" if count else ""))
    elif parsed.type != "cpu":
        raise ValueError(f"--device {device}: use cpu, cuda or cuda:N")
    return device


def trained_view(checkpoint) -> SpatialConfig:
    """The evaluation view's settings of the run that wrote ``checkpoint`` (its meta.json's
    ``data.spatial``: normalisation, the training crops' aspect ratios), so that a checkpoint is
    evaluated as its end-of-run evaluation saw it; the defaults where it has none (an imported
    checkpoint) or one this version cannot read (with a warning)."""
    from carl_scale.config import ConfigError, from_dict
    from carl_scale.models.weights import read_meta

    spatial = (read_meta(checkpoint)["config"].get("data") or {}).get("spatial")
    if not isinstance(spatial, dict):
        return SpatialConfig()
    try:
        return from_dict(SpatialConfig, spatial, "data.spatial")
    except ConfigError as exn:
        log.warning("%s: its evaluation view is not readable here (%s): the default one is used", checkpoint, exn)
        return SpatialConfig()


@torch.no_grad()
def embed_frames(model, frames, *, image_size: int | None = None, spatial: SpatialConfig | None = None,
                 device: str = "cpu") -> np.ndarray:
    """One whole video ``(S, H, W, 3)`` uint8 -> L2-normalised ``(S, D)``: the evaluation view
    (centre crop, resize, normalise; no augmentation) through ``model.embed_video``. The view is
    made 256 frames at a time: resizing a 5000-frame event at once would hold it as float."""
    size, spatial = model.cfg.image_size if image_size is None else image_size, spatial or SpatialConfig()
    if size < 1:
        raise ValueError(f"image_size must be >= 1 (None: the model's {model.cfg.image_size}), got {size}")
    x = torch.empty((len(frames), 3, size, size), dtype=next(model.parameters()).dtype, device=device)
    for i in range(0, len(frames), 256):  # filled in place: one copy of the video as floats, where it runs
        x[i:i + 256] = eval_photometric(eval_geometric(to_tchw(frames[i:i + 256]), size, spatial.crop_ratio), spatial)
    return model.embed_video(x).float().cpu().numpy()


@torch.no_grad()
def extract_embeddings(model, shards, split: str = "val", *, image_size: int | None = None,
                       spatial: SpatialConfig | None = None, device: str = "cpu", decoder: str = "auto",
                       limit: int | None = None, per_action: int | None = None, max_actions: int | None = None,
                       cache: str | Path | None = None,
                       progress: bool | None = None) -> VideoEmbeddings:
    """Embed every frame of every video of ``split`` (with every per-frame label set the shards
    carry). With ``cache``: a ``.npz`` there whose fingerprint matches (same weights, shards and
    view; :func:`embedding_fingerprint`) is loaded instead, otherwise the embeddings are computed
    and saved there — so metrics re-run without the model, and a changed model is never mixed up.
    A sample that cannot be read or decoded is skipped with a warning and listed in ``.skipped``.
    ``per_action``: at most this many videos of each action, and with ``max_actions`` of the first
    that many actions met only (the first videos in shard order; the others are not decoded), e.g.
    a sample of every class from a split written class by class."""
    if limit is not None and limit < 1:  # (0 is a value: not "no limit", and not one video either)
        raise ValueError(f"limit must be >= 1 (None: every video), got {limit}")
    spatial = spatial or SpatialConfig()
    fp = "" if cache is None else embedding_fingerprint(model, shards, split, image_size=image_size,
                                                        spatial=spatial, limit=limit, per_action=per_action,
                                                        actions=max_actions, decoder=decoder, device=device)
    if cache is not None and Path(cache).exists():
        try:
            saved = VideoEmbeddings.load(cache)
        except Exception as exn:  # unreadable (e.g. truncated by a crash): recompute
            log.warning("ignoring unreadable %s (%s)", cache, exn)
        else:
            if saved.fingerprint == fp:
                log.info("reusing embeddings %s (same weights, shards and view)", cache)
                if saved.skipped:  # (a failure of the machine then, not of the video, stays until recomputed)
                    log.warning("reusing %s, made with %d %s sample(s) skipped as unreadable: --recompute tries "
                                "them again", cache, len(saved.skipped), split)
                return saved
            log.info("%s was made by another model, shard set or view: re-embedding", cache)
    urls, manifest = resolve_shards(shards, split)
    # evaluation decodes whole videos on the CPU, whatever the training device
    dec = make_decoder(decoder, codec=manifest_codec(manifest), device="cpu")
    total = manifest_samples(manifest, urls, split)
    was_training = model.training
    model.eval()
    # an interrupted extraction of the same fingerprint goes on where it stopped (PartialEmbeddings)
    parts = PartialEmbeddings(cache, fp) if cache is not None else None
    before = parts.load() if parts is not None else None
    ids, embs, phases, actions, extra = [], [], [], [], []
    skipped: list[str] = []
    if before is not None:
        ids, embs, phases, actions = (list(before.video_ids), list(before.embeddings), list(before.phase_labels),
                                      before.action_labels.tolist())
        extra = [{k: v[i] for k, v in before.frame_labels.items()} for i in range(len(ids))]
        skipped = list(before.skipped)
        log.info("going on with %d %s videos embedded before an interruption (%s)", len(ids), split, parts.directory)
    done = set(ids)
    from carl_scale.tables import progress_bar  # a bar unless the environment asks for none (tests, sweeps)

    bar = progress_bar(enabled=progress is not False, total=min(total, limit) if total and limit is not None else total,
                       initial=len(ids), desc=f"embed {split}", unit="video", leave=False)

    listed_before = set(skipped)  # (a resumed extraction meets these again: listed once)

    def skip(what: str, exn: BaseException) -> None:  # a damaged sample: counted and listed, never fatal
        line = f"{what}: {type(exn).__name__}: {exn}"
        if line not in listed_before:
            skipped.append(line)
        log.warning("skipping %s: %s: %s", what, type(exn).__name__, exn)

    taken: dict[int, int] = {}  # embedded videos per action (a video that fails to decode takes no slot)
    for a in actions:
        taken[a] = taken.get(a, 0) + 1

    def want(meta: dict) -> bool:
        if meta.get("video_id") in done:  # embedded before the interruption
            return False
        if per_action is None:
            return True
        action = int(meta.get("action_label", -1))
        if action not in taken and max_actions is not None and len(taken) >= max_actions:
            return False
        return taken.get(action, 0) < per_action

    def since(start: int) -> VideoEmbeddings:
        """The videos from ``start`` to the last one whose record is whole (``count``: an interrupt
        can land between the appends below)."""
        end = count
        # a label set some videos lack (shards written in parts) is all -1 for them
        names = sorted({k for e in extra[start:end] for k in e})
        frame_labels = {k: [e.get(k, np.full(len(p), -1, np.int64)) for e, p in zip(extra[start:end], phases[start:end])]
                        for k in names}
        return VideoEmbeddings(ids[start:end], embs[start:end], phases[start:end],
                               np.asarray(actions[start:end], dtype=np.int64), frame_labels, fp, list(skipped))

    count = saved = len(ids)
    last_save = time.monotonic()
    try:  # (a failure leaves the caller's model in the mode it was in: a training run's evaluation hook)
        if limit is None or len(ids) < limit:
            for meta, frames in iter_whole_videos(shards, dec, split, on_error=skip, want=want):
                embs.append(embed_frames(model, frames, image_size=image_size, spatial=spatial, device=device))
                ids.append(meta["video_id"])
                phases.append(np.asarray(meta["phase_labels"], dtype=np.int64))
                actions.append(int(meta["action_label"]))
                taken[actions[-1]] = taken.get(actions[-1], 0) + 1
                extra.append({k: np.asarray(v, dtype=np.int64) for k, v in meta.get("frame_labels", {}).items()})
                count = len(ids)
                bar.update()
                if limit is not None and count >= limit:
                    break
                if parts is not None and time.monotonic() - last_save >= PARTIAL_EVERY_S:
                    try:
                        parts.add(since(saved))
                        saved = count
                    except OSError as exn:  # (a full disk costs the resumability, not the extraction)
                        log.warning("could not keep the embeddings made so far in %s: %s", parts.directory, exn)
                    last_save = time.monotonic()
    except BaseException:  # (Ctrl-C, a lost machine's signal, a failure: what was embedded is kept for the rerun)
        if parts is not None and count > saved:
            try:
                parts.add(since(saved))
            except Exception as exn:  # noqa: BLE001 (the original failure is the one to see)
                log.warning("could not keep the embeddings made so far in %s: %s", parts.directory, exn)
        raise
    finally:
        bar.close()
        model.train(was_training)
    out = since(0)
    if cache is not None:
        out.save(cache)
        parts.remove()
    return out


PARTIAL_EVERY_S = 60.0  # how often an extraction with a cache keeps what it has embedded so far


class PartialEmbeddings:
    """The embeddings an extraction has made so far, in ``<cache>.parts/``: a ``part_NNNNN.npz``
    per minute of work (and one when it is interrupted), with the fingerprint they were made with.
    A rerun with the same fingerprint takes them and embeds only the videos after them (a FineGym
    split is hours of work on a CPU); another fingerprint's are removed (they are a cache of this
    file, made from the model and shards, never the only copy of anything)."""

    def __init__(self, cache: str | Path, fingerprint: str):
        self.directory = Path(str(cache) + ".parts")
        self.fingerprint = fingerprint

    def _parts(self) -> list[Path]:  # (not a save cut short: part_NNNNN.npz.partial.npz)
        return sorted(p for p in self.directory.glob("part_*.npz") if re.fullmatch(r"part_\d{5}\.npz", p.name))

    def load(self) -> VideoEmbeddings | None:
        if not self.directory.is_dir():
            return None
        mark = self.directory / "fingerprint"
        if not mark.is_file() or mark.read_text() != self.fingerprint:
            log.info("%s was made by another model, shard set or view: starting over", self.directory)
            self.remove()
            return None
        for cut in self.directory.glob("*.partial.npz"):  # a save the interruption cut short: never a part
            cut.unlink()
        try:
            loaded = [VideoEmbeddings.load(p) for p in self._parts()]
        except Exception as exn:  # noqa: BLE001 (a part cut short by a crash: start over, never a wrong mix)
            log.warning("ignoring unreadable parts in %s (%s): starting over", self.directory, exn)
            self.remove()
            return None
        if not loaded:
            return None
        names = sorted({k for v in loaded for k in v.frame_labels})
        return VideoEmbeddings(
            [i for v in loaded for i in v.video_ids], [e for v in loaded for e in v.embeddings],
            [p for v in loaded for p in v.phase_labels], np.concatenate([v.action_labels for v in loaded]),
            {k: [lab for v in loaded for lab in v.frame_labels.get(k, [np.full(len(p), -1, np.int64)
                                                                      for p in v.phase_labels])] for k in names},
            self.fingerprint, loaded[-1].skipped)

    def add(self, chunk: VideoEmbeddings) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "fingerprint").write_text(self.fingerprint)
        chunk.save(self.directory / f"part_{len(self._parts()):05d}.npz")

    def remove(self) -> None:
        if self.directory.is_dir():
            for p in self.directory.iterdir():
                p.unlink()
            self.directory.rmdir()
