"""Whole videos, every frame, in shard order: what evaluation and the shard round-trip need.

Two readers with the same output, ``(meta, frames)`` with frames ``(S, H, W, 3)`` uint8:

* :func:`iter_whole_videos` — WebDataset in Python plus any :class:`FrameDecoder` (both payloads);
* :func:`iter_whole_videos_dali` — all in DALI: ``fn.readers.webdataset`` with the ``wds2idx``
  index of each shard feeding ``fn.decoders.video`` (``video`` payload; on a GPU, ``mixed``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds

from carl_scale.data.batch import not_the_video
from carl_scale.data.decoders import DALI_CPU_CODECS, EncodedVideo, FrameDecoder, keep_out_of_children, split_device
from carl_scale.data.manifest import resolve_shards
from carl_scale.data.stream import parse_meta


def iter_whole_videos(spec, decoder: FrameDecoder, split: str = "train", on_error=None,
                      only: set[str] | None = None, want=None) -> Iterator[tuple[dict, np.ndarray]]:
    """Every video of the shards (or those whose ``video_id`` is in ``only``, and for which
    ``want(meta)`` is true: the others are not decoded), decoded whole. ``on_error(what, exn)`` is called for a sample that cannot be read,
    parsed or decoded (or decodes to another frame count than its metadata says) and for unreadable
    shard data (a truncated tar), which are then skipped; without it they raise."""
    urls, _ = resolve_shards(spec, split)

    def bad_shard_data(exn: BaseException) -> bool:  # webdataset's handler protocol: True = go on
        if on_error is None:
            raise exn
        on_error("unreadable shard data", exn)
        return True

    def damaged(sample: dict, exn: Exception) -> None:
        if on_error is None:
            raise exn
        on_error(f"sample {sample.get('__key__')!r} of {sample.get('__url__')}", exn)

    for sample in wds.tarfile_to_samples(handler=bad_shard_data)([dict(url=u) for u in urls]):
        try:
            meta = parse_meta(sample)
        except Exception as exn:
            damaged(sample, exn)
            continue
        # (outside the handler: an error in the caller's filter is the caller's, not a damaged sample)
        if (only is not None and meta["video_id"] not in only) or (want is not None and not want(meta)):
            continue
        try:
            frames = decoder.decode_all(EncodedVideo.from_sample(sample, meta))
            if len(frames) != int(meta["num_frames"]):
                raise ValueError(f"decoded {len(frames)} frames, the metadata says {meta['num_frames']}")
        except Exception as exn:
            if not_the_video(exn, decoder):  # out of memory, a broken device: never taken for a damaged video
                raise
            decoder.reset()  # a failed DALI run may leave its pipelines unusable for the next video
            damaged(sample, exn)
            continue
        yield meta, frames


def iter_whole_videos_dali(spec, split: str = "train", *, device: str = "cpu", shard_id: int = 0,
                           num_shards: int = 1, num_threads: int = 2) -> Iterator[tuple[dict, np.ndarray]]:
    """DALI end to end. ``shard_id``/``num_shards`` split the videos over ranks."""
    from nvidia.dali import fn, pipeline_def, types

    device, device_id = split_device(device)  # "cuda:N": that GPU
    urls, manifest = resolve_shards(spec, split)
    if manifest is not None and manifest.get("payload") == "jpeg":
        raise ValueError("iter_whole_videos_dali reads 'video' payloads; for jpeg shards use "
                         "iter_whole_videos(spec, DaliDecoder(...))")
    codec = (manifest or {}).get("codec", "")
    if device == "cpu" and codec and codec not in DALI_CPU_CODECS:
        raise ValueError(f"DALI cannot decode {codec} on the CPU; use iter_whole_videos with PyAVDecoder")
    index_paths = [str(Path(u).with_suffix(".idx")) for u in urls]
    for ip in index_paths:
        if not Path(ip).exists():
            raise FileNotFoundError(f"DALI index {ip} is missing; make it with 'wds2idx {ip[:-4]}.tar {ip}'")

    @pipeline_def(batch_size=1, num_threads=num_threads, device_id=device_id if device == "cuda" else None,
                  exec_dynamic=True)
    def pipe():
        video, meta, nframes = fn.readers.webdataset(
            paths=urls, index_paths=index_paths, ext=["video", "json", "nframes"],
            dtypes=[types.UINT8, types.UINT8, types.INT32], missing_component_behavior="error",
            shard_id=shard_id, num_shards=num_shards, random_shuffle=False, name="reader")
        frames = fn.decoders.video(video, device="mixed" if device == "cuda" else "cpu")
        return frames, meta, nframes

    p = pipe()
    p.build()
    keep_out_of_children(p)
    n = p.reader_meta("reader")["epoch_size"]
    # DALI's reader shard k holds samples [floor(k*n/N), floor((k+1)*n/N)).
    count = (shard_id + 1) * n // num_shards - shard_id * n // num_shards
    for _ in range(count):
        frames, meta, nframes = p.run()
        f = frames[0]
        arr = np.array(f.as_cpu()) if device == "cuda" else np.array(f)
        m = json.loads(np.array(meta[0]).tobytes())
        if int(np.array(nframes[0])[0]) != len(arr):
            raise ValueError(f"{m['video_id']}: decoded {len(arr)} frames, nframes says {int(np.array(nframes[0])[0])}")
        yield m, arr
