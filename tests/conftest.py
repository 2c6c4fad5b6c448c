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
