"""Encoding video payloads (PyAV) and packing frames as JPEG, for the shard writers.

A shard sample's payload is either an encoded video in a container (``video``) or every frame as
its own JPEG, concatenated, with an offset table (``jpeg``). The JPEG kind is ~15x larger but any
frame decodes on its own, which is what lets nvJPEG decode only the sampled frames in big batches.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

# The smallest --short-side (or square side) a converter resizes to: the smallest image a model
# takes (ModelConfig.image_size); below it every video would be decoded, then fail to resize
MIN_SHORT_SIDE = 16


def check_source_options(*, fps: float | None = None, short_side: int | None = None, limit: int | None = None,
                         **at_least_short_side: int | None) -> None:
    """What the converters' options share, refused in one line before anything is written: a
    finite ``fps`` above 0, a ``short_side`` (and each of ``at_least_short_side``, e.g. PennAction's
    ``square``) of at least MIN_SHORT_SIDE, a ``limit`` of at least 1; None passes."""
    if fps is not None and not 0 < fps < math.inf:
        raise ValueError(f"--fps must be a finite number > 0, got {fps}")
    for name, value in {"short_side": short_side, **at_least_short_side}.items():
        if value is not None and value < MIN_SHORT_SIDE:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {MIN_SHORT_SIDE} (the smallest image size a "
                             f"model takes), got {value}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")

# user-facing codec name -> (PyAV encoder, container format, pixel format)
CODECS: dict[str, tuple[str, str, str]] = {
    "vp9": ("libvpx-vp9", "webm", "yuv420p"),
    "h264": ("libx264", "mp4", "yuv420p"),
    "mjpeg": ("mjpeg", "avi", "yuvj420p"),
}


@dataclass
class EncodeOptions:
    codec: str = "vp9"
    gop: int = 30  # keyframe interval, frames: bounds the cost of seeking to a sampled frame
    crf: int = 30  # quality for vp9/h264 (lower is better)
    jpeg_quality: int = 90  # the jpeg payload's frames (mjpeg video is FFmpeg's q:v 3)

    def __post_init__(self) -> None:  # (the shard writers' flags are checked alike: shards/common.py)
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; choose one of {sorted(CODECS)}")
        for flag, value, lo, hi in (("--gop", self.gop, 1, None), ("--crf", self.crf, 0, 63),
                                    ("--jpeg-quality", self.jpeg_quality, 1, 100)):
            if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
                raise ValueError(f"{flag} must be an integer {'>= ' + str(lo) if hi is None else f'in [{lo}, {hi}]'}"
                                 f", got {value!r}")


def check_frame_size(codec: str, height: int, width: int) -> None:
    """Frames the codec can store: every one but MJPEG keeps colour at half resolution (4:2:0)."""
    if codec != "mjpeg" and (height % 2 or width % 2):
        raise ValueError(f"{codec} with 4:2:0 chroma needs even frame sizes, got {width}x{height}")


def encode_video(frames: np.ndarray, fps: float, opts: EncodeOptions | None = None) -> bytes:
    """Encode ``(S, H, W, 3)`` uint8 RGB frames into an in-memory container."""
    opts = opts or EncodeOptions()
    encoder, container, pix_fmt = CODECS[opts.codec]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (S, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    h, w = frames.shape[1:3]
    check_frame_size(opts.codec, h, w)
    buf = io.BytesIO()
    # Exact integer-ish rates keep frame index = round(pts * fps) for every container.
    rate = round(fps) if abs(fps - round(fps)) < 1e-6 else av.utils.Fraction(fps).limit_denominator(1001)
    # bitexact: no random segment UID or muxer date, so the same frames give the same bytes (a
    # resumed or re-run write reproduces its shards)
    with av.open(buf, "w", format=container, container_options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(encoder, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.gop_size = opts.gop
        if opts.codec == "vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": str(opts.crf), "b": "0",
                              "row-mt": "1", "g": str(opts.gop)}
        elif opts.codec == "h264":
            stream.options = {"preset": "veryfast", "crf": str(opts.crf), "g": str(opts.gop),
                              "bf": "0"}  # no B-frames: decode order = display order
        else:
            stream.options = {"q:v": "3"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()



def encode_jpeg_frames(frames: np.ndarray, quality: int = 90) -> tuple[bytes, np.ndarray]:
    """Every frame as a JPEG, concatenated; returns (blob, int64 offsets of length S+1)."""
    parts, offsets = [], [0]
    for f in frames:
        b = io.BytesIO()
        Image.fromarray(f).save(b, format="JPEG", quality=quality)
        parts.append(b.getvalue())
        offsets.append(offsets[-1] + len(parts[-1]))
    return b"".join(parts), np.asarray(offsets, dtype=np.int64)


# -- frame timing ---------------------------------------------------------------------------------
def frame_timing(pts: list[int] | np.ndarray) -> tuple[float, bool]:
    """(the nominal frame interval in ``pts`` ticks, whether the clip runs at a variable rate). A
    stored video's frames are found by ``pts x rate``, which is only right at a constant rate; an
    interval more than 10% (and 2 ticks) off the median one makes the clip variable-rate, and so
    does a slow drift: a frame half an interval or more from where its index puts it (a stretch at
    28 fps in a 30 fps clip, each interval within 10%, is 10 frames off after 5 s)."""
    ticks = np.sort(np.asarray(pts, dtype=np.int64))
    deltas = np.diff(ticks)
    if not len(deltas):
        return 0.0, False
    step = float(np.median(deltas))
    if step <= 0:  # repeated timestamps
        return step, True
    # against the mean interval, as the reader's average rate counts (a 29.97 fps clip in a
    # millisecond time base steps 33, 33, 34 ticks: the median would drift off it, the mean not)
    mean = (ticks[-1] - ticks[0]) / len(deltas)
    drift = np.abs((ticks - ticks[0]) / mean - np.arange(len(ticks)))
    return step, bool(np.any(np.abs(deltas - step) > max(2.0, 0.1 * step)) or drift.max() >= 0.5)


def constant_rate_picks(times: np.ndarray, fps: float) -> np.ndarray:
    """Indices into ``times`` (seconds, display times of decoded frames) that resample the clip to
    a constant ``fps``: output frame k is the last frame shown at time k / fps (half a frame of
    slack), so no frame is dropped where the clip runs at ``fps`` and frames repeat where it is
    slower."""
    order = np.argsort(times, kind="stable")
    t = np.asarray(times, dtype=np.float64)[order]
    t = t - t[0]
    n = max(1, int(round((t[-1] + 1.0 / fps) * fps)))
    pick = np.searchsorted(t, np.arange(n) / fps + 0.5 / fps, side="right") - 1
    return order[np.maximum(pick, 0)]
