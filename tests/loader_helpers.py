"""Helpers the loader's tests share (tests/test_reader.py, tests/test_finishing.py)."""

from __future__ import annotations

import io
import json
import tarfile

from carl_scale.data.config import LoaderConfig, SpatialConfig, TemporalConfig


def loader_cfg(shards, **kw) -> LoaderConfig:
    base = dict(shards=shards if isinstance(shards, list) else str(shards), batch_size=2, num_workers=0, shuffle_buffer=4, decoder="pyav",
                temporal=TemporalConfig(num_frames=12), spatial=SpatialConfig(image_size=32))
    base.update(kw)
    return LoaderConfig(**base)


def loader_ids(loader) -> list[str]:
    return [v for b in loader for v in b.video_ids]


def corrupt_shard(src_tar, dst_tar):
    """A copy of a shard whose samples are broken in three different ways, plus one good one."""
    with tarfile.open(src_tar) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    keys = sorted({n.split(".")[0] for n in members})
    good = keys[0]
    out = {}
    for ext in ("video", "json", "nframes"):
        out[f"{good}.{ext}"] = members[f"{good}.{ext}"]
        out[f"trunc.{ext}"] = members[f"{good}.{ext}"][: len(members[f"{good}.video"]) // 3] if ext == "video" \
            else members[f"{good}.{ext}"]
        out[f"garbage.{ext}"] = b"\x1a\x45\xdf\xa3 garbage" * 20 if ext == "video" else members[f"{good}.{ext}"]
        out[f"badjson.{ext}"] = b"{not json" if ext == "json" else members[f"{good}.{ext}"]
    for name in ("trunc.json", "garbage.json", "badjson.json"):
        if name != "badjson.json":
            meta = json.loads(out[name])
            meta["video_id"] = name.split(".")[0]
            out[name] = json.dumps(meta).encode()
    with tarfile.open(dst_tar, "w") as tf:  # members of a sample must be consecutive
        for name, data in sorted(out.items(), key=lambda kv: kv[0].split(".")[0]):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return good
