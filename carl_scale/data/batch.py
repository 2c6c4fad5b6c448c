"""A training batch in the making: what a worker prepares per video (:class:`PreparedSample`), and
the finishing step that turns a worker's samples into a :class:`VideoBatch` on the device
(:func:`collate`: decoding there on a GPU, crops, colour), where a video that fails to decode is
counted and stood in for (:class:`StandIns`) so that every rank keeps its step count."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace

import numpy as np
import torch

from carl_scale.data.config import LoaderConfig
from carl_scale.data.decoders import EncodedVideo, FrameDecoder
from carl_scale.data.spatial import ViewParams, crop_views, photometric_batch
from carl_scale.errors import out_of_memory

log = logging.getLogger("carl_scale.data")


# -- skip counting ----------------------------------------------------------------------------
class SkipCounter:
    """Skipped samples, logged as they are skipped and counted where they are skipped (a worker,
    a finishing thread), then handed on with the next batch out of there (:meth:`take`): a loader
    counts the skips behind the batches it has handed over, so a resume, which reads again what
    was read ahead, neither loses a skip nor counts one twice."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[int | None] = []  # each skip's stream position (None: not tied to one)
        self.total = 0  # in this process, ever (for messages)
        # where a worker's stream is, for skips upstream of its positions (damaged tar data,
        # metadata read for --per-label grouping): such a skip is placed at the next sample dealt
        self.position: int | None = None

    def add(self, what: str, exn: BaseException, at: int | None = None) -> None:
        at = self.position if at is None else at
        with self._lock:
            self._pending.append(at)
            self.total += 1
        log.warning("skipping %s: %s: %s", what, type(exn).__name__, exn)

    def handler(self, exn: BaseException) -> bool:  # webdataset handler protocol: True = go on
        self.add("unreadable shard data", exn)
        return True

    def take(self, before: int | None = None, after: int = 0) -> int:
        """The skips not handed on yet at stream positions in [after, before): those from
        ``before`` on stay (a resume reads them again after this batch's resume point), those
        under ``after`` go uncounted (read again by a resume before its resume point: the run
        before the checkpoint counted them)."""
        with self._lock:
            keep = [at for at in self._pending if before is not None and at is not None and at >= before]
            gone = [at for at in self._pending if at is not None and at < after]
            n = len(self._pending) - len(keep) - len(gone)
            self._pending = keep
        return n

    def discard(self) -> None:
        """Forget the skips no batch carried (read ahead of a worker's last batch of an epoch)."""
        with self._lock:
            self._pending = []


@dataclass
class PreparedSample:
    key: str
    meta: dict
    timestamps: np.ndarray  # (2, T)
    mask: np.ndarray  # (2, T)
    params: tuple[ViewParams, ViewParams]
    views: torch.Tensor | None = None  # (2, T, 3, S, S) uint8 when decoded in the worker
    encoded: EncodedVideo | None = None  # when the finishing step decodes (jpeg: cut to the views' frames)


# -- batches -----------------------------------------------------------------------------------
@dataclass
class VideoBatch:
    views: torch.Tensor  # (B, 2, T, 3, S, S) float (the loader's views_dtype), normalised
    timestamps: torch.Tensor  # (B, 2, T) int64 original frame indices
    mask: torch.Tensor  # (B, 2, T) bool
    action_labels: torch.Tensor  # (B,) int64, -1 = none
    phase_labels: torch.Tensor  # (B, 2, T) int64 labels of the sampled frames, -1 = none
    num_frames: torch.Tensor  # (B,) int64
    video_ids: list[str]
    # whether any sampled frame is padding, known on the host (None: not known, the model checks the
    # mask on the device). False lets the model and loss skip their masked paths without asking the GPU.
    padded: bool | None = None

    def to(self, device) -> "VideoBatch":
        return VideoBatch(**{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                             for k, v in self.__dict__.items()})


_ACCELERATOR_ERROR = (torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()


def not_the_video(exn: BaseException, decoder: FrameDecoder) -> bool:
    """Whether a failed decode says nothing about the video: out of memory, or a device that is
    broken for every later call too (a sticky CUDA error: an illegal address, a device-side
    assert). Taken for a corrupt video, such a failure would count every video after it as
    skipped for the rest of the epoch (in a finishing process, with nothing else to fail first)."""
    # (torch.AcceleratorError, a sticky CUDA error: torch 2.8 on; older ones raise a RuntimeError, found below)
    if out_of_memory(exn) or isinstance(exn, (torch.cuda.OutOfMemoryError, *_ACCELERATOR_ERROR)):
        return True
    if getattr(decoder, "device", "cpu") == "cuda" and torch.cuda.is_available():
        try:  # DALI words its CUDA errors as its own: ask the device whether it still works
            torch.cuda.synchronize()
        except Exception:
            return True
    return False


def decode_or_skip(decoder: FrameDecoder, todo: list[PreparedSample], counter: SkipCounter | None) -> list:
    """The sampled frames of ``todo``, decoded in one batched call; where that fails (one corrupt
    video fails the whole call, and may leave DALI's pipelines unusable) and ``counter`` is given,
    again one video at a time on fresh pipelines: a video that fails alone is counted and logged,
    and its entry is None. Running out of memory, or a broken device, is raised, never taken for
    a corrupt video."""
    encoded, indices = [s.encoded for s in todo], [s.timestamps.reshape(-1) for s in todo]
    try:
        return decoder.decode(encoded, indices)
    except Exception as exn:
        if counter is None or not_the_video(exn, decoder):
            raise
        log.warning("a batched decode of %d videos failed (%s: %s): decoding them one at a time", len(todo),
                    type(exn).__name__, exn)
    decoder.reset()
    out = []
    for s, enc, idx in zip(todo, encoded, indices):
        try:
            out.append(decoder.decode([enc], [idx])[0])
        except Exception as exn:  # corrupt or undecodable: counted, never fatal, never silent
            if not_the_video(exn, decoder):
                raise
            counter.add(f"video {s.meta.get('video_id')!r} (decoded in the batch's finishing step; its place "
                        f"in the batch goes to a copy of another of its videos)", exn)
            decoder.reset()
            out.append(None)
    return out


class StandIns:
    """Videos that fail to decode in the finishing step (on a GPU: after the workers, so the
    workers' skip-and-draw-another is over): counted, and each one's place in its batch taken by a
    video of the same batch that did decode, of the same action label where there is one (a
    --per-label group stays one label), so that the batch keeps its size. The copy carries no
    label (-1): the weakly supervised objective would otherwise pair a video with its own copy (a
    --per-label 2 group whose other video failed), a positive at cosine 1 on every frame. A batch
    none of whose videos decoded is None: the loader hands over the next batch in its place (every
    rank keeps its step count)."""

    def __init__(self):
        self.counter = SkipCounter()

    @staticmethod
    def fill(samples: list[PreparedSample]) -> list[PreparedSample] | None:
        good = [s for s in samples if s.views is not None]
        if not good:
            return None

        def label(s: PreparedSample) -> int:
            return int(s.meta.get("action_label", -1))

        def copy(s: PreparedSample) -> PreparedSample:
            g = next((g for g in good if label(g) == label(s)), good[0])
            return replace(g, meta={**g.meta, "action_label": -1})

        return [s if s.views is not None else copy(s) for s in samples]


def collate(samples: list[PreparedSample], cfg: LoaderConfig, decoder: FrameDecoder | None,
            device: str | torch.device = "cpu", views_dtype: torch.dtype = torch.float32,
            stand_ins: StandIns | None = None) -> VideoBatch | None:
    """Finish a worker's batch on ``device``: decode and crop the samples the worker did not (all
    of them, or those outside ``cpu_decode_share``), then colour them if the worker did not; the
    views end in ``views_dtype`` (colour is computed in float32 either way). With ``stand_ins``, a
    video that fails to decode here is counted and its place taken by one that decoded
    (:class:`StandIns`; None if none of the batch decoded); without, the failure is raised."""
    todo = [s for s in samples if s.views is None]
    if todo:
        decoded = []
        for s, f in zip(todo, decode_or_skip(decoder, todo, stand_ins and stand_ins.counter)):
            if f is None:
                continue
            if tuple(f.shape[1:3]) != (int(s.meta["height"]), int(s.meta["width"])):  # its crops were drawn for those
                exn = ValueError(f"decoded frames are {tuple(f.shape[1:3])}, metadata says "
                                 f"{(int(s.meta['height']), int(s.meta['width']))}")
                if stand_ins is None:
                    raise exn
                stand_ins.counter.add(f"video {s.meta.get('video_id')!r} (its place in the batch goes to a copy of "
                                      f"another of its videos)", exn)
                continue
            decoded.append((s, torch.as_tensor(f, device=device)))
        # view by view, on the device the frames were decoded on
        cropped = crop_views([f for _, f in decoded], [s.params for s, _ in decoded], cfg.spatial.image_size)
        for (s, _), views in zip(decoded, cropped):
            s.views = views
        del decoded, cropped  # the full-size frames: not kept through the colour
        if any(s.views is None for s in todo):
            samples = stand_ins.fill(samples)
            if samples is None:
                return None
    if samples[0].views.is_floating_point():  # already augmented in the worker
        views = torch.stack([s.views for s in samples]).to(device, views_dtype)
    else:  # colour on the device, the whole batch at once; (B, 2, T, 3, S, S)
        frames = torch.stack([s.views.to(device, non_blocking=True) for s in samples])
        views = photometric_batch(frames.flatten(0, 1), [p for s in samples for p in s.params],
                                  cfg.spatial).to(views_dtype).view(frames.shape)
    ts = torch.from_numpy(np.stack([s.timestamps for s in samples]))
    phases = torch.from_numpy(np.stack([np.asarray(s.meta["phase_labels"], dtype=np.int64)[s.timestamps]
                                        for s in samples]))
    mask = torch.from_numpy(np.stack([s.mask for s in samples]))
    phases[~mask] = -1
    batch = VideoBatch(
        views=views, timestamps=ts, mask=mask,
        action_labels=torch.tensor([int(s.meta.get("action_label", -1)) for s in samples]),
        phase_labels=phases,
        num_frames=torch.tensor([int(s.meta["num_frames"]) for s in samples]),
        video_ids=[s.meta["video_id"] for s in samples],
        padded=not bool(mask.all()),
    )
    # The small tensors go to the device here too: on a GPU this runs on finish_ahead's own stream,
    # where a copy from pageable memory waits for that stream only; made in the training step, each
    # such copy would wait for the step's queued work first.
    return batch.to(device) if torch.device(device).type != "cpu" else batch
