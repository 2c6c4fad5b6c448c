"""Shared fixtures: tiny synthetic shard sets written once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the shards/ and launch/ entry points live at the repo root
os.environ.setdefault("CARL_SCALE_NO_PROGRESS", "1")

from carl_scale.data.config import SyntheticConfig  # noqa: E402
from carl_scale.datasets.encode import EncodeOptions  # noqa: E402
from carl_scale.datasets.synthetic import write_synthetic_shards  # noqa: E402

TINY = SyntheticConfig(num_actions=3, train_videos=8, val_videos=4, min_frames=40, max_frames=100,
                       height=64, width=64, seed=7)


@pytest.fixture(scope="session")
def tiny_cfg() -> SyntheticConfig:
    return TINY


@pytest.fixture(scope="session")
def vp9_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vp9")
    write_synthetic_shards(out, TINY, payload="video", max_samples=2, progress=False)
    return out


@pytest.fixture(scope="session")
def jpeg_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jpeg")
    write_synthetic_shards(out, TINY, payload="jpeg", max_samples=2, progress=False)
    return out


@pytest.fixture(scope="session")
def mjpeg_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mjpeg")
    write_synthetic_shards(out, TINY, payload="video", encode=EncodeOptions(codec="mjpeg"), max_samples=4,
                           progress=False)
    return out


def damaged_copy(src: Path, dst: Path, *, split: str, flip_in_shard: int | None = None,
                 truncate_shard: int | None = None) -> list[str]:
    """A copy of a shard directory in which the first sample of ``split``'s shard ``flip_in_shard``
    has one byte of its metadata changed (its JSON no longer parses) and shard ``truncate_shard`` is
    cut off mid-member, as a bad disk or an interrupted copy leaves them. Returns the ids of the
    damaged samples."""
    import json
    import shutil
    import tarfile

    shutil.copytree(src, dst)
    shards = json.loads((dst / "shards.json").read_text())["splits"][split]["shards"]
    damaged = []
    if flip_in_shard is not None:
        path = dst / shards[flip_in_shard]["path"]
        with tarfile.open(path) as tf:
            first_json = next(m for m in tf.getmembers() if m.name.endswith(".json"))
            offset = first_json.offset_data
            damaged.append(json.loads(tf.extractfile(first_json).read())["video_id"])
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x40  # '{' -> ';': one flipped bit
        path.write_bytes(bytes(data))
    if truncate_shard is not None:
        path = dst / shards[truncate_shard]["path"]
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 + 100])
    return damaged


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's process group or launcher (a fixed or
    pid-derived one may still be held by the launch before it: the rendezvous then waits)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dali_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # (no "nvidia" namespace at all)
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``dali`` skip where DALI is not installed (a lent GPU before its parts are
    staged), as the ``gpu`` ones skip without CUDA, instead of failing on the import."""
    if _dali_installed():
        return
    skip = pytest.mark.skip(reason="needs DALI (nvidia-dali-cuda130): not installed")
    for item in items:
        if "dali" in item.keywords:
            item.add_marker(skip)
