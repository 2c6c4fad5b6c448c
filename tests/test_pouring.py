"""TCC-style TFRecords (Pouring) -> shards, read without TensorFlow. The records are written here
by a small encoder that follows the TFRecord and protobuf specifications, not by our reader."""

from __future__ import annotations

import io
import json
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from carl_scale.data.decoders import PyAVDecoder
from carl_scale.datasets.tfrecord import crc32c, masked_crc32c, parse_sequence_example
from carl_scale.data.whole_video import iter_whole_videos
from shards import pouring


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negative int64: ten bytes of two's complement
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _ld(number: int, payload: bytes) -> bytes:  # a length-delimited field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(*values: bytes) -> bytes:
    return _ld(1, b"".join(_ld(1, v) for v in values))


def _int64_feature(*values: int) -> bytes:
    return _ld(3, _ld(1, b"".join(_varint(v) for v in values)))  # packed, as TensorFlow writes it


def _sequence_example(context: dict[str, bytes], lists: dict[str, list[bytes]]) -> bytes:
    ctx = b"".join(_ld(1, _ld(1, k.encode()) + _ld(2, f)) for k, f in context.items())
    fls = b"".join(_ld(1, _ld(1, k.encode()) + _ld(2, b"".join(_ld(1, f) for f in fl))) for k, fl in lists.items())
    return _ld(1, ctx) + _ld(2, fls)


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _unpacked_int64_feature(*values: int) -> bytes:  # also valid protobuf: one field per value
    return _ld(3, b"".join(_varint(1 << 3 | 0) + _varint(v) for v in values))


def _video(name: str, n: int, corrupt: bool = False, labels: int | None = None, packed: bool = True) -> bytes:
    jpegs = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((24, 32, 3), 10 * i, np.uint8)).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue()[:40] if corrupt and i == 2 else buf.getvalue())
    labels = ([-1] + [min(4, i // 2) for i in range(1, n)])[: labels]
    feature = _int64_feature if packed else _unpacked_int64_feature
    return _sequence_example({"name": _bytes_feature(name.encode()), "len": _int64_feature(n),
                              "label": _int64_feature(0)},
                             {"video": [_bytes_feature(j) for j in jpegs], "frame_labels": [feature(v) for v in labels]})


def test_crc32c_known_answer():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C (Castagnoli)


def test_sequence_example_round_trip():
    ctx, lists = parse_sequence_example(_video("x", 3))
    assert ctx["name"] == [b"x"] and ctx["len"] == [3] and ctx["label"] == [0]
    assert len(lists["video"]) == 3 and [f[0] for f in lists["frame_labels"]] == [-1, 0, 1]


@pytest.fixture(scope="module")
def tfrecords(tmp_path_factory):
    src = tmp_path_factory.mktemp("pouring_tfrecords")
    (src / "pouring_train-0-of-2.tfrecord").write_bytes(_record(_video("pour_a", 12)) + _record(_video("pour_b", 9)))
    (src / "pouring_train-1-of-2.tfrecord").write_bytes(
        _record(_video("pour_c", 10)) + _record(_video("broken", 8, corrupt=True)) + _record(_video("cut", 8))[:-30])
    (src / "pouring_val-0-of-1.tfrecord").write_bytes(
        _record(_video("pour_v", 11, packed=False)) + _record(_video("short_labels", 6, labels=4))
        + _record(_video("pour_v", 5)))  # the last two: a label count mismatch, a name seen before
    (src / "other_train-0-of-1.tfrecord").write_bytes(b"another dataset's file: never read")
    return src


def test_pouring_shards_from_tfrecords(tfrecords, tmp_path):
    m = pouring.main(["--src", str(tfrecords), "--out", str(tmp_path), "--codec", "mjpeg", "--no-progress"])
    train = m["splits"]["train"]
    assert train["samples"] == 3 and m["splits"]["val"]["samples"] == 1
    reasons = " ".join(s["source"] + ": " + s["reason"] for s in train["skipped"])
    assert "pouring_train-1-of-2.tfrecord#1" in reasons and "truncated record" in reasons  # counted, not fatal
    got = {meta["video_id"]: (meta, f) for meta, f in iter_whole_videos(tmp_path, PyAVDecoder(), "train")}
    assert set(got) == {"pour_a", "pour_b", "pour_c"}
    # in the order the published conversion read them (tf.data's parallel reads: one record of each
    # file in turn), which the evaluation's "first 10%" takes: a, c, b (not a, b, c)
    assert list(got) == ["pour_a", "pour_c", "pour_b"] and m["video_order"] == "published"
    meta, frames = got["pour_a"]
    assert len(frames) == 12 and meta["phase_labels"] == [-1] + [min(4, i // 2) for i in range(1, 12)]
    val_skips = " ".join(s["reason"] for s in m["splits"]["val"]["skipped"])
    assert "4 phase labels for 6 frames" in val_skips and "duplicate video_id 'pour_v'" in val_skips
    (vmeta, _), = iter_whole_videos(tmp_path, PyAVDecoder(), "val")  # unpacked int64 labels read alike
    assert vmeta["phase_labels"] == [-1] + [min(4, i // 2) for i in range(1, 11)]
    assert np.abs(frames[:, 12, 16, 0].astype(int) - 10 * np.arange(12)).max() <= 3
    assert meta["action_label"] == 0 and meta["dataset"] == "pouring"


def test_not_a_tfrecord_and_no_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no pouring_<train\|val\|test>-K-of-N.tfrecord files in .* \(it holds "
                                                r"0 other entries\): pass the folder that holds them"):
        pouring.main(["--src", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match=r"--src .*nope does not exist: pass the folder that holds the pouring_"):
        pouring.main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    (tmp_path / "pouring_val-0-of-1.tfrecord").write_bytes(b"this is not a tfrecord file at all")
    with pytest.raises(ValueError, match="split 'val': none of its 1 inputs could be written .*bad length checksum"):
        pouring.main(["--src", str(tmp_path), "--out", str(tmp_path / "p"), "--no-progress"])
    m = json.loads((tmp_path / "p/shards.json").read_text())  # kept, to say why
    assert m["splits"]["val"]["samples"] == 0 and "bad length checksum" in m["splits"]["val"]["skipped"][0]["reason"]


def test_an_empty_tfrecord_is_counted_and_a_missing_part_refused_before_writing(tfrecords, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tfrecords, src)
    parts = sorted(src.glob("pouring_train-*-of-2.tfrecord"))
    assert len(parts) == 2
    parts[0].write_bytes(b"")  # a failed download
    m = pouring.main(["--src", str(src), "--out", str(tmp_path / "a"), "--codec", "mjpeg", "--no-progress"])
    reasons = " ".join(s["reason"] for s in m["splits"]["train"]["skipped"])
    assert "empty file (0 bytes)" in reasons
    parts[0].unlink()  # not downloaded at all
    with pytest.raises(FileNotFoundError, match=r"pouring_train has parts K = 1 of -K-of-2 \(K = 0..1\); download"):
        pouring.main(["--src", str(src), "--out", str(tmp_path / "b"), "--codec", "mjpeg", "--no-progress"])
    assert not (tmp_path / "b").exists()
    parts[1].rename(src / "pouring_train-2-of-2.tfrecord")  # as many parts as N, but not 0..N-1
    (src / "pouring_train-0-of-2.tfrecord").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"pouring_train has parts K = 0, 2 of -K-of-2 \(K = 0..1\)"):
        pouring.main(["--src", str(src), "--out", str(tmp_path / "b"), "--codec", "mjpeg", "--no-progress"])
    assert not (tmp_path / "b").exists()
