"""Shard round trips: write synthetic videos, read them back through both decoders."""

from __future__ import annotations

import copy
import dataclasses
import errno
import functools
import hashlib
import io
import json
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from carl_scale.data.codec import iter_video_frames
from carl_scale.data.config import SyntheticConfig
from carl_scale.data.decoders import DaliDecoder, EncodedVideo, PyAVDecoder, make_decoder
from carl_scale.data.manifest import read_manifest
from carl_scale.datasets.encode import EncodeOptions, encode_video
from carl_scale.datasets.synthetic import ensure_synthetic_shards, render_video, true_poses, write_synthetic_shards
from carl_scale.datasets.parallel import WriteOptions, write_split
from carl_scale.datasets.writer import VideoRecord
from carl_scale.data.whole_video import iter_whole_videos, iter_whole_videos_dali

# Lossy codecs on noisy, textured 64x64 frames: the decoded video must stay close to what was
# rendered (another video scores ~10 dB). Frame alignment is checked exactly in
# test_frame_subsets_equal_full_decode.
CODEC_MIN_PSNR = 18.0
DECODER_MEAN_TOL = 0.05  # DALI vs PyAV on the same bitstream: the same YUV->RGB conversion


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-9))


def _codec_close(decoded: np.ndarray, rendered: np.ndarray) -> None:
    assert _psnr(decoded, rendered) > CODEC_MIN_PSNR


def _close(a: np.ndarray, b: np.ndarray, tol: float = DECODER_MEAN_TOL) -> None:
    assert a.shape == b.shape
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert d.mean() < tol, d.mean()
    assert d.max() <= 1  # rounding only


def test_manifest_and_index_files(vp9_shards, tiny_cfg):
    m = read_manifest(vp9_shards)
    assert m["payload"] == "video" and m["codec"] == "vp9" and m["dataset"] == "synthetic"
    assert m["splits"]["train"]["samples"] == tiny_cfg.train_videos
    assert m["splits"]["val"]["samples"] == tiny_cfg.val_videos
    assert m["label_names"]["actions"] == list(tiny_cfg.action_names)
    for s in m["splits"]["train"]["shards"]:
        assert s["samples"] <= 2
        assert (vp9_shards / s["path"]).exists() and (vp9_shards / s["index"]).exists()
    assert not list(vp9_shards.glob("*.partial"))
    # Every sample carries the fields the readers need.
    with tarfile.open(vp9_shards / m["splits"]["train"]["shards"][0]["path"]) as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile([n for n in names if n.endswith(".json")][0]).read())
    assert {n.split(".", 1)[1] for n in names} == {"video", "json", "nframes"}
    for k in ("video_id", "dataset", "fps", "num_frames", "height", "width", "action_label", "phase_labels"):
        assert k in meta
    assert len(meta["phase_labels"]) == meta["num_frames"]


@pytest.mark.parametrize("shards,decoders", [
    ("vp9_shards", ["pyav", "dali"]),
    ("mjpeg_shards", ["pyav", "dali"]),
    ("jpeg_shards", ["pyav", "dali"]),
])
def test_round_trip_both_decoders(request, shards, decoders, tiny_cfg):
    path = request.getfixturevalue(shards)
    results = {}
    for name in decoders:
        dec = PyAVDecoder() if name == "pyav" else DaliDecoder()
        results[name] = list(iter_whole_videos(path, dec, "val"))
    assert len(results["pyav"]) == tiny_cfg.val_videos
    for i, ((meta, frames), (meta_d, frames_d)) in enumerate(zip(results["pyav"], results["dali"])):
        ref = render_video(tiny_cfg, "val", i)
        assert meta == meta_d
        assert meta["video_id"] == ref.video_id and meta["num_frames"] == len(ref.frames)
        assert meta["action_label"] == ref.action_label
        assert meta["phase_labels"] == ref.phase_labels.tolist()
        _codec_close(frames, ref.frames)
        _close(frames_d, frames, DECODER_MEAN_TOL)


def test_dali_webdataset_reader_matches_python_reader(vp9_shards):
    py = list(iter_whole_videos(vp9_shards, PyAVDecoder(), "train"))
    dali = list(iter_whole_videos_dali(vp9_shards, "train"))
    assert [m["video_id"] for m, _ in dali] == [m["video_id"] for m, _ in py]
    for (m1, f1), (m2, f2) in zip(py, dali):
        assert m1 == m2
        _close(f2, f1, DECODER_MEAN_TOL)
    # rank split: two DALI shards partition the videos
    halves = [[m["video_id"] for m, _ in iter_whole_videos_dali(vp9_shards, "train", shard_id=k, num_shards=2)]
              for k in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(m["video_id"] for m, _ in py)
    assert not set(halves[0]) & set(halves[1])


@pytest.mark.parametrize("codec", ["vp9", "h264", "mjpeg"])
def test_frame_subsets_equal_full_decode(codec, tiny_cfg):
    """Decoding only some frames (seek + early stop) returns exactly those frames."""
    v = render_video(SyntheticConfig(height=64, width=64, min_frames=150, max_frames=200), "train", 1)
    data = encode_video(v.frames, v.fps, EncodeOptions(codec=codec, gop=12))
    full = np.stack(list(iter_video_frames(data)))
    assert len(full) == len(v.frames)
    item = EncodedVideo("video", data, len(full), codec=codec)
    rng = np.random.default_rng(0)
    for idx in ([0], [len(full) - 1], [100, 3, 3, 57], np.sort(rng.choice(len(full), 30, replace=False))):
        idx = np.asarray(idx)
        got = PyAVDecoder().decode([item], [idx])[0]
        assert np.array_equal(got, full[idx])
        if codec != "h264":
            _close(DaliDecoder().decode([item], [idx])[0], got, DECODER_MEAN_TOL)
    with pytest.raises(IndexError):
        PyAVDecoder().decode([item], [np.array([len(full)])])


def test_h264_through_pyav_and_clear_error_from_dali_on_cpu(tmp_path):
    cfg = SyntheticConfig(num_actions=2, train_videos=2, val_videos=1, min_frames=30, max_frames=40,
                          height=48, width=48)
    write_synthetic_shards(tmp_path, cfg, encode=EncodeOptions(codec="h264"), progress=False)
    for i, (meta, frames) in enumerate(iter_whole_videos(tmp_path, PyAVDecoder(), "train")):
        _codec_close(frames, render_video(cfg, "train", i).frames)
    with pytest.raises(ValueError, match="h264"):
        make_decoder("dali", codec="h264", device="cpu")
    assert make_decoder("auto", codec="h264", device="cpu").name == "pyav"
    assert make_decoder("auto", codec="vp9", device="cpu").name == "dali"
    assert make_decoder("auto", codec="mixed", device="cpu").name == "pyav"


def test_writer_refuses_other_inputs_and_finishes_an_interrupted_split(tmp_path, capsys):
    cfg = SyntheticConfig(num_actions=1, train_videos=1, val_videos=1, min_frames=20, max_frames=20,
                          height=32, width=32)
    write_synthetic_shards(tmp_path, cfg, progress=False)
    stamp = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    write_synthetic_shards(tmp_path, cfg, progress=False)  # the same command again: complete, nothing changes
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_synthetic_shards(tmp_path, dataclasses.replace(cfg, seed=1), progress=False)
    write_synthetic_shards(tmp_path, dataclasses.replace(cfg, seed=1), overwrite=True, progress=False)
    assert read_manifest(tmp_path)["synthetic_config"]["seed"] == 1

    # Interrupted in the third of four slots: two finished shards and a .partial stay; the rerun
    # keeps the finished ones and gives what an uninterrupted write gives.
    videos = [render_video(cfg, "train", 0)] * 8

    def load(i, fail_at=None):
        if i == fail_at:
            raise KeyboardInterrupt
        return VideoRecord(f"v{i}", videos[i].frames, videos[i].fps, action_label=i % 2)

    out, ref = tmp_path / "interrupted", tmp_path / "uninterrupted"
    opts = WriteOptions(max_samples=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_split(out, "train", range(8), functools.partial(load, fail_at=5), dataset="x", opts=opts)
    assert (out / "train-000001.tar").exists() and (out / "train-000002.tar.partial").exists()
    assert read_manifest(out) is None
    stamp = (out / "train-000000.tar").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="other inputs"):
        write_split(out, "train", range(7), load, dataset="x", opts=opts)
    write_split(out, "train", range(8), load, dataset="x", opts=opts)
    write_split(ref, "train", range(8), load, dataset="x", opts=dataclasses.replace(opts, workers=2))
    assert (out / "train-000000.tar").stat().st_mtime_ns == stamp  # kept, not rewritten
    names = sorted(p.name for p in ref.glob("train-*"))
    assert names == sorted(p.name for p in out.glob("train-*")) and len(names) == 8
    assert all((out / n).read_bytes() == (ref / n).read_bytes() for n in names)
    # videos per action label, summed over the slots of both runs (no class names: their indices)
    assert read_manifest(out)["splits"]["train"]["videos_per_action"] == {"0": 4, "1": 4}
    assert read_manifest(ref)["splits"]["train"]["videos_per_action"] == {"0": 4, "1": 4}
    # a slot finished before its record counted them: the split's entry has no count rather than a short one
    from carl_scale.datasets.parallel import _record_path

    record = json.loads(_record_path(out, "train", 0).read_text())
    del record["actions"]
    _record_path(out, "train", 0).write_text(json.dumps(record))
    (out / "shards.json").unlink()
    write_split(out, "train", range(8), load, dataset="x", opts=opts)
    assert (out / "train-000000.tar").stat().st_mtime_ns == stamp
    assert "videos_per_action" not in read_manifest(out)["splits"]["train"]
    assert read_manifest(out)["splits"]["train"]["samples"] == 8

    # a worker that fails (not an input: the worker itself) stops the write with its error named;
    # the rerun finishes it
    out2 = tmp_path / "worker_failed"
    with pytest.raises(KeyboardInterrupt):  # the worker's own exception, re-raised by the driver
        write_split(out2, "train", range(8), functools.partial(load, fail_at=5), dataset="x",
                    opts=dataclasses.replace(opts, workers=2))
    assert "rerun the same command" in capsys.readouterr().out
    # the same command with --overwrite finishes its own interrupted write instead of starting over
    kept = {p.name: p.stat().st_mtime_ns for p in out2.glob("train-*.tar")}
    write_split(out2, "train", range(8), load, dataset="x", opts=dataclasses.replace(opts, workers=2, overwrite=True))
    assert all((out2 / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert all((out2 / n).read_bytes() == (ref / n).read_bytes() for n in names)

    # one write at a time: a second one into the same split is refused while the first holds the lock
    import fcntl

    with open(out2 / ".progress/train.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FileExistsError, match="another write of split 'train'"):
            write_split(out2, "train", range(8), load, dataset="x", opts=opts)

    # two inputs naming the same video in different shards: reported in the manifest, nothing lost
    entry = write_split(tmp_path / "repeat", "train", [0, 1, 2, 0], lambda i: load(i), dataset="x", opts=opts)
    assert entry["samples"] == 4 and entry["repeated_keys"] == ["v0 (shards 0 and 1)"]


def test_ensure_synthetic_shards_reuses_and_refuses_other_configs(tmp_path):
    cfg = SyntheticConfig(num_actions=1, train_videos=1, val_videos=1, min_frames=20, max_frames=20,
                          height=32, width=32)
    m1 = ensure_synthetic_shards(tmp_path, cfg, progress=False)
    mtime = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    assert ensure_synthetic_shards(tmp_path, cfg, progress=False) == m1
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError):
        ensure_synthetic_shards(tmp_path, SyntheticConfig(num_actions=2, train_videos=1, val_videos=1), progress=False)
    with pytest.raises(FileExistsError):
        ensure_synthetic_shards(tmp_path, dataclasses.replace(cfg, texture="natural"), progress=False)
    # a set written before a setting existed (no "texture" in its manifest) holds what its default renders: reused
    manifest = json.loads((tmp_path / "shards.json").read_text())
    del manifest["synthetic_config"]["texture"]
    (tmp_path / "shards.json").write_text(json.dumps(manifest))
    ensure_synthetic_shards(tmp_path, cfg, progress=False)
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == mtime
    # but one written before "nuisance" existed had today's "high" look: another config's, refused
    del manifest["synthetic_config"]["nuisance"]
    (tmp_path / "shards.json").write_text(json.dumps(manifest))
    with pytest.raises(FileExistsError, match="another dataset or synthetic config"):
        ensure_synthetic_shards(tmp_path, cfg, progress=False)
    # shard files of someone else's (no shards.json, no write of ours in progress): kept, refused
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "train-000000.tar").write_bytes(b"a user's shard")
    with pytest.raises(FileExistsError, match="1 shard files .*train-000000.tar.* that no synthetic write made"):
        ensure_synthetic_shards(theirs, cfg, progress=False)
    assert (theirs / "train-000000.tar").read_bytes() == b"a user's shard"


def test_synthetic_render_is_deterministic_and_varied():
    cfg = SyntheticConfig(height=48, width=48, min_frames=60, max_frames=400)
    a, b = render_video(cfg, "train", 3), render_video(cfg, "train", 3)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.phase_labels, b.phase_labels)
    vids = [render_video(cfg, "train", i) for i in range(10)]
    lengths = [len(v.frames) for v in vids]
    assert all(60 <= n <= 400 for n in lengths) and len(set(lengths)) > 5
    assert sorted({v.action_label for v in vids}) == list(range(cfg.num_actions))
    for v in vids:  # phases in order, every phase present, idle (-1) only at the ends
        lab = v.phase_labels[v.phase_labels >= 0]
        assert np.all(np.diff(lab) >= 0) and lab[0] == 0 and len(np.unique(lab)) == lab[-1] + 1
        inner = v.phase_labels[np.argmax(v.phase_labels >= 0): len(v.phase_labels) - np.argmax(v.phase_labels[::-1] >= 0)]
        assert np.all(inner >= 0)
    val = render_video(cfg, "val", 3)
    assert not np.array_equal(val.frames[:20], a.frames[:20])
    poses, phases, action = true_poses(cfg, "val", 3)  # the ground truth behind the pixels, unrendered
    assert np.array_equal(phases, val.phase_labels) and action == val.action_label and len(poses) == len(val.frames)


def test_synthetic_nuisance_levels():
    """'low' keeps one style (same background and figure colour in every video); 'high' gives
    each video its own; an unknown level is a clear error."""
    low, high = (SyntheticConfig(height=48, width=48, nuisance=n) for n in ("low", "high"))
    corners = {n: {tuple(render_video(c, "train", i).frames[0, 0, 0]) for i in range(6)}
               for n, c in (("low", low), ("high", high))}
    assert len(corners["low"]) == 1 and len(corners["high"]) > 3
    v = render_video(low, "train", 0)
    assert len(np.unique(v.frames[0].reshape(-1, 3), axis=0)) > 1  # the figure is drawn
    with pytest.raises(ValueError, match="nuisance"):
        SyntheticConfig(nuisance="medium")


def test_synthetic_natural_texture_costs_what_camera_footage_costs():
    """texture="natural": JPEG frames several times the plain ones' bytes (at 340x256 the 22-25 KiB
    of photos at that size, checked on a crop here), a background the camera pans over (a frame's
    figure-free corner changes along the video), and the same poses, labels and length; the plain
    set renders the pixels it always did (the texture draws from a generator of its own)."""
    plain = SyntheticConfig(height=64, width=96, min_frames=60, max_frames=90)
    natural = dataclasses.replace(plain, texture="natural")
    a, b = render_video(plain, "train", 2), render_video(natural, "train", 2)
    assert np.array_equal(a.phase_labels, b.phase_labels) and a.action_label == b.action_label

    def kib(frame):
        out = io.BytesIO()
        Image.fromarray(frame).save(out, "JPEG", quality=90)
        return len(out.getvalue()) / 1024

    assert kib(b.frames[0]) > 2 * kib(a.frames[0])  # (at 64x96 the JPEG headers are half a plain frame)
    # 256 x 340 bytes per pixel as the benchmarks' frames: 22-25 KiB a frame
    big = render_video(dataclasses.replace(natural, height=256, width=340, min_frames=12, max_frames=12), "train", 0)
    assert 20 < kib(big.frames[0]) < 28
    corner = b.frames[:, :8, :8].astype(float)
    assert np.abs(corner[0] - corner[-1]).mean() > 2  # the camera moved
    assert np.abs(corner[0] - corner[1]).mean() < np.abs(corner[0] - corner[-1]).mean()  # slowly
    # the plain sets render the pixels they rendered before the option (digests taken then): a set
    # on disk and the published figures made from it stay what the same config makes
    for nuisance, digest in (("low", "0ba22c1506ff1ba6"), ("high", "491c933695475472")):
        frames = render_video(dataclasses.replace(plain, nuisance=nuisance), "train", 2).frames
        assert hashlib.sha256(frames.tobytes()).hexdigest()[:16] == digest, (
            f"the {nuisance} synthetic set renders other pixels than before: a change of the renderer (or of "
            f"Pillow's line drawing) makes existing sets differ from what their config makes now")
    with pytest.raises(ValueError, match="texture"):
        SyntheticConfig(texture="photo")


def test_jpeg_videos_of_different_sizes_decode_in_one_dali_run():
    """nvJPEG/DALI decode a batch's frames in one run and copy them out in one piece, back to back
    whatever their sizes: each video gets its own frames (repeats and order kept), as PyAV gives
    them, with small runs (image_batch 4) splitting the batch too."""
    def jpeg_video(h: int, w: int, seed: int) -> EncodedVideo:
        frames = np.random.default_rng(seed).integers(0, 256, (6, h, w, 3), dtype=np.uint8)
        blobs = []
        for f in frames:
            out = io.BytesIO()
            Image.fromarray(f).save(out, format="JPEG", quality=95)
            blobs.append(out.getvalue())
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        return EncodedVideo("jpeg", b"".join(blobs), len(frames), offsets, "jpeg", height=h, width=w)

    items = [jpeg_video(24, 40, 0), jpeg_video(16, 16, 1), jpeg_video(24, 40, 2)]
    idx = [np.array([5, 0, 0, 3]), np.array([1, 2]), np.array([4, 4, 1])]
    want = PyAVDecoder().decode(items, idx)
    for dec in (DaliDecoder(), DaliDecoder(image_batch=4)):
        for got, ref, i in zip(dec.decode(items, idx), want, idx):
            assert got.shape == ref.shape == (len(i), *ref.shape[1:])
            _close(got, ref, DECODER_MEAN_TOL)


def test_a_forked_worker_neither_runs_nor_destroys_the_parents_dali_pipelines():
    """DataLoader workers forked after the parent built DALI pipelines (the GPU loader decodes in
    the training process; a later loader forks new workers): a worker whose garbage collector
    frees a decoder the parent had dropped used to hang there (the pipeline's threads do not exist
    in the child); now it keeps inherited pipelines alive, and its decoders build their own."""
    import gc

    from torch.utils.data import DataLoader, IterableDataset

    from carl_scale.data.decoders import DaliDecoder

    class Cycle:  # only the garbage collector frees it
        def __init__(self):
            self.me, self.decoder = self, DaliDecoder("cpu")
            self.decoder._image_pipe = self.decoder._build("image")

    live = DaliDecoder("cpu")
    live._image_pipe = live._build("image")
    copied = copy.copy(live)

    class Collect(IterableDataset):
        def __iter__(self):
            gc.collect()
            yield live._image_pipe is None and copied._image_pipe is None

    gc.disable()  # the cycle reaches the children uncollected
    try:
        for _ in range(2):
            Cycle()
            assert list(DataLoader(Collect(), num_workers=1, batch_size=None, multiprocessing_context="fork",
                                   timeout=60)) == [True]
    finally:
        gc.enable()
    assert live._image_pipe is not None  # the parent's own are untouched


def test_a_damaged_jpeg_offset_table_and_a_file_without_video_are_refused_in_one_line(tmp_path):
    """Cut or empty JPEGs from a bad offset table, or an audio file given as a video, are a
    ValueError (a skipped and counted sample; one line at the command line), not garbage or an IndexError."""
    import wave

    from carl_scale.data.codec import split_jpeg_blob

    assert split_jpeg_blob(b"abcdef", np.array([0, 2, 6])) == [b"ab", b"cdef"]
    for offsets in ([0, 2, 10], [0, 4, 2, 6], [1, 6], [0]):
        with pytest.raises(ValueError, match="damaged jpeg offset table"):
            split_jpeg_blob(b"abcdef", np.array(offsets))
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(b"\0\0" * 800)
    with pytest.raises(ValueError, match="no video stream"):
        next(iter_video_frames(str(tmp_path / "a.wav")))


def test_a_synthetic_set_without_val_videos_is_a_train_split_and_short_actions_keep_every_phase(tmp_path):
    """--val-videos 0 wrote train, then failed on the empty val split (and failed again on every
    later call); a short action between long idle spans gave a phase no frames."""
    from carl_scale.datasets.synthetic import _phase_durations

    cfg = SyntheticConfig(num_actions=1, train_videos=2, val_videos=0, min_frames=20, max_frames=24, height=32,
                          width=32)
    m = ensure_synthetic_shards(tmp_path / "s", cfg, progress=False)
    assert set(m["splits"]) == {"train"} and m["splits"]["train"]["samples"] == 2
    assert ensure_synthetic_shards(tmp_path / "s", cfg, progress=False) == m
    for seed in range(200):
        d = _phase_durations(np.random.default_rng(seed), 9, 4)
        assert d.sum() == 9 and d.min() >= 2
    with pytest.raises(ValueError, match="leaves as few as 6 frames between idle spans"):
        SyntheticConfig(min_frames=8, max_frames=8)
    with pytest.raises(ValueError, match="leaves as few as 7 frames"):  # at 61 frames, not at the minimum 60
        SyntheticConfig(min_frames=60, max_frames=100, max_idle=0.45)


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), MemoryError()])
def test_a_machine_error_while_reading_an_input_stops_the_write_instead_of_listing_it_as_skipped(tmp_path, error):
    """A disk or memory failure says nothing about the video: listed as skipped, it would be lost
    for good (its shard is finished, a rerun says "already complete"). The write stops in one
    line; the rerun writes it. FFmpeg's own errors stay skips (it words truncated files as EIO)."""
    import av

    from carl_scale.datasets.parallel import not_the_input

    cfg = SyntheticConfig(num_actions=1, train_videos=1, val_videos=1, min_frames=20, max_frames=20,
                          height=32, width=32)
    video = render_video(cfg, "train", 0)
    broken = {"machine": True}

    def load(i):
        if i == 3 and broken["machine"]:
            raise error
        return VideoRecord(f"v{i}", video.frames, video.fps, action_label=0)

    opts = WriteOptions(max_samples=2, progress=False)
    with pytest.raises(ValueError, match=r"reading 3: .*The machine, not the video: the write stops here.*rerun"):
        write_split(tmp_path, "train", range(6), load, dataset="x", opts=opts)
    broken["machine"] = False
    entry = write_split(tmp_path, "train", range(6), load, dataset="x", opts=opts)
    assert entry["samples"] == 6 and entry["skipped"] == []
    assert not_the_input(OSError(errno.ENOSPC, "No space left on device"))
    assert not not_the_input(av.error.OSError(errno.EIO, "Input/output error"))  # FFmpeg's: the file's
    assert not not_the_input(FileNotFoundError(errno.ENOENT, "gone")) and not not_the_input(ValueError("bad"))


def test_splits_written_with_other_class_names_are_flagged_until_they_agree(tmp_path):
    cfg = SyntheticConfig(num_actions=1, train_videos=1, val_videos=1, min_frames=20, max_frames=20,
                          height=32, width=32)
    video = render_video(cfg, "train", 0)

    def load(i):
        return VideoRecord(f"v{i}", video.frames, video.fps, action_label=0)

    opts = WriteOptions(max_samples=2, progress=False)
    write_split(tmp_path, "train", range(2), load, dataset="x", opts=opts, label_names={"actions": ["squat", "wave"]})
    write_split(tmp_path, "val", range(2), load, dataset="x", opts=opts, label_names={"actions": ["wave"]})
    said = read_manifest(tmp_path)["label_conflicts"]
    assert said.startswith("split 'val' was written with other class names than split(s) 'train'")
    write_split(tmp_path, "val", range(2), load, dataset="x", opts=dataclasses.replace(opts, overwrite=True),
                label_names={"actions": ["squat", "wave"]})
    assert "label_conflicts" not in read_manifest(tmp_path)


def test_labels_that_are_not_class_indices_are_skipped_with_the_reason_before_encoding(tmp_path):
    cfg = SyntheticConfig(num_actions=1, train_videos=1, val_videos=1, min_frames=20, max_frames=20,
                          height=32, width=32)
    video = render_video(cfg, "train", 0)
    n = len(video.frames)
    phases = {"ok": np.zeros(n, np.int64), "whole_floats": np.ones(n), "below": np.full(n, -5),
              "fraction": np.full(n, 1.5), "nan": np.full(n, np.nan)}

    def load(name):
        return VideoRecord(name, video.frames, video.fps, action_label=-2 if name == "bad_action" else 0,
                           phase_labels=phases.get(name, phases["ok"]))

    entry = write_split(tmp_path, "train", [*phases, "bad_action"], load, dataset="x",
                        opts=WriteOptions(max_samples=8, progress=False))
    reasons = {s["source"]: s["reason"] for s in entry["skipped"]}
    assert entry["samples"] == 2 and set(reasons) == {"below", "fraction", "nan", "bad_action"}
    assert "phase labels must be class indices >= 0, or -1 for unlabelled; got -5" in reasons["below"]
    assert "phase labels must be whole numbers" in reasons["fraction"] and "whole numbers" in reasons["nan"]
    assert "its action label must be class indices >= 0, or -1" in reasons["bad_action"]


def test_two_splits_written_side_by_side_into_one_directory_both_reach_the_manifest(tmp_path, monkeypatch):
    """Each split's write holds its own lock; shards.json, which both read and write back, is held
    by one at a time (here each read is slowed so that, unlocked, both would read it before either
    wrote it, and the second write would drop the first split's entry)."""
    import threading
    import time

    import carl_scale.datasets.parallel as parallel

    cfg = SyntheticConfig(num_actions=1, train_videos=1, val_videos=1, min_frames=20, max_frames=20,
                          height=32, width=32)
    video = render_video(cfg, "train", 0)
    real = parallel.read_manifest

    def slow(out_dir):
        got = real(out_dir)
        time.sleep(0.3)
        return got
    monkeypatch.setattr(parallel, "read_manifest", slow)
    opts = WriteOptions(max_samples=2, progress=False)
    threads = [threading.Thread(target=write_split, args=(tmp_path, split, range(2),
                                                          lambda i: VideoRecord(f"v{i}", video.frames, video.fps)),
                                kwargs=dict(dataset="x", opts=opts)) for split in ("train", "val")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(real(tmp_path)["splits"]) == {"train", "val"}


def test_long_video_ids_get_short_keys_and_a_damaged_finished_split_is_written_again(tmp_path, caplog):
    from carl_scale.datasets.parallel import add_warnings
    from carl_scale.datasets.writer import MAX_KEY, sample_key

    cfg = SyntheticConfig(num_actions=1, train_videos=1, val_videos=0, min_frames=8, max_frames=8, height=32, width=32)
    video = render_video(cfg, "train", 0)
    long_a, long_b = "clips/" + "a" * 150 + ".mp4", "clips/" + "a" * 150 + "b.mp4"  # the same first 100 characters
    ids = [long_a, long_b, "short"]
    assert len({sample_key(i) for i in ids}) == 3 and max(len(sample_key(i)) for i in ids) == MAX_KEY
    assert sample_key("short") == "short"

    def load(i):
        return VideoRecord(ids[i], video.frames, video.fps)

    opts = WriteOptions(max_samples=2, progress=False)
    entry = write_split(tmp_path, "train", range(3), load, dataset="x", opts=opts)
    assert entry["samples"] == 3 and not entry["skipped"]
    assert {meta["video_id"] for meta, _ in iter_whole_videos(str(tmp_path), PyAVDecoder(), split="train")} == set(ids)

    # a shard cut short after the split finished (a copy interrupted, then "finished" by a rerun):
    # the rerun writes that slot again instead of saying the split is complete
    first, second = tmp_path / "train-000000.tar", tmp_path / "train-000001.tar"
    whole, stamp = first.read_bytes(), second.stat().st_mtime_ns
    first.write_bytes(whole[: len(whole) // 2])
    entry = write_split(tmp_path, "train", range(3), load, dataset="x", opts=opts)
    assert "some of its shards are gone or changed size" in caplog.text
    assert entry["samples"] == 3 and first.read_bytes() == whole and second.stat().st_mtime_ns == stamp

    # a command's warnings stay with the splits it wrote: another split's command without any keeps
    # them; the same split written again without any drops them
    write_split(tmp_path, "val", range(1), load, dataset="x", opts=opts)
    assert add_warnings(tmp_path, ["a train warning"], ["train"])["label_warnings"] == ["a train warning"]
    assert add_warnings(tmp_path, [], ["val"])["label_warnings"] == ["a train warning"]
    assert add_warnings(tmp_path, ["a val warning"], ["val"])["label_warnings"] == ["a train warning", "a val warning"]
    assert add_warnings(tmp_path, [], ["train"])["label_warnings"] == ["a val warning"]
    assert "label_warnings" not in add_warnings(tmp_path, [], ["val"]) and "label_warnings" not in read_manifest(tmp_path)


def test_a_mount_that_refuses_fsync_on_directories_still_takes_durable_renames(tmp_path, monkeypatch):
    """Some FUSE and network mounts answer a directory's fsync with EINVAL: the rename has
    happened, so that is not an error; a file's fsync failing still is."""
    import os

    from carl_scale import durable

    real = os.fsync

    def picky(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd)

    monkeypatch.setattr(durable.os, "fsync", picky)
    (tmp_path / "a.partial").write_text("whole")
    durable.durable_replace(tmp_path / "a.partial", tmp_path / "a")
    assert (tmp_path / "a").read_text() == "whole" and not (tmp_path / "a.partial").exists()
    monkeypatch.setattr(durable.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    (tmp_path / "b.partial").write_text("whole")
    with pytest.raises(OSError, match="I/O error"):
        durable.durable_replace(tmp_path / "b.partial", tmp_path / "b")
    assert not (tmp_path / "b").exists()  # never renamed before its bytes are on disk


def test_a_video_over_the_tar_formats_member_size_is_skipped_with_the_reason_not_the_whole_write(tmp_path,
                                                                                               monkeypatch):
    """USTAR holds a member of at most 8 GiB; tarfile's own error ("overflow in number field") named
    no video and stopped every rerun at the same one. Here the limit is lowered to fit one video."""
    from carl_scale.datasets import writer

    cfg = SyntheticConfig(num_actions=1, train_videos=1, val_videos=1, min_frames=20, max_frames=20,
                          height=32, width=32)
    video = render_video(cfg, "train", 0)
    monkeypatch.setattr(writer, "TAR_MEMBER_MAX", len(writer.encode_jpeg_frames(video.frames[:4], 90)[0]))

    def load(name):
        return VideoRecord(name, video.frames[:4] if name == "short" else video.frames, video.fps, action_label=0)

    entry = write_split(tmp_path, "train", ["short", "long"], load, dataset="x", opts=WriteOptions(
        max_samples=8, payload="jpeg", progress=False))
    assert entry["samples"] == 1 and [s["source"] for s in entry["skipped"]] == ["long"]
    assert "long: its 'jpgs' payload is 0.0 GiB, over the tar format's 0 GiB a member" in entry["skipped"][0]["reason"]


def test_a_worker_killed_while_reading_an_input_names_it_and_the_rerun_says_so_again(tmp_path, caplog):
    """The kernel kills a writer for memory without a word: the driver now names the input the
    worker was reading, from the file each worker keeps while it reads one (and a rerun names what
    a write killed outright, single-process ones included, had been reading)."""
    import os
    import signal

    cfg = SyntheticConfig(num_actions=1, train_videos=1, val_videos=1, min_frames=20, max_frames=20,
                          height=32, width=32)
    video = render_video(cfg, "train", 0)
    kill = {"on": True}

    def load(i):
        if i == 7 and kill["on"]:  # (worker 1's: slots 1 and 3; worker 0, still writing, is then stopped)
            os.kill(os.getpid(), signal.SIGKILL)
        if i == 4 and kill["on"]:
            time.sleep(30)  # (worker 0 is busy when worker 1 dies: stopped by the driver, SIGTERM)
        return VideoRecord(f"v{i}", video.frames, video.fps, action_label=0)

    opts = WriteOptions(max_samples=2, workers=2, progress=False)
    with pytest.raises(ValueError, match=r"writer worker 1 ended with exit code -9 \(killed by signal 9: out of "
                                         r"memory\?\) while reading clip-7: rerun"):
        write_split(tmp_path, "train", range(8), load, dataset="x", opts=opts, describe=lambda i: f"clip-{i}")
    kill["on"] = False
    with caplog.at_level("WARNING", logger="carl_scale.data"):
        entry = write_split(tmp_path, "train", range(8), load, dataset="x", opts=opts, describe=lambda i: f"clip-{i}")
    assert entry["samples"] == 8 and entry["skipped"] == []
    assert "the last write of split train stopped while reading clip-7" in caplog.text
    assert "clip-4" not in caplog.text  # the worker the driver stopped was reading it: innocent
    assert not list((tmp_path / ".progress").glob("*.reading"))  # a finished write leaves none


def test_a_slot_rewritten_drops_its_old_record_before_anything_else(tmp_path, monkeypatch):
    """--retry-skipped rewrites a finished slot: killed between the new shard's rename and its new
    record, the old record was left beside a shard of the same size (tar sizes come in 10 KiB steps)
    and taken as finished: a manifest whose keys and skips were not the shard's."""
    from carl_scale.datasets import parallel

    cfg = SyntheticConfig(num_actions=1, train_videos=1, val_videos=1, min_frames=20, max_frames=20,
                          height=32, width=32)
    video = render_video(cfg, "train", 0)
    bad = {1}

    def load(i):
        if i in bad:
            raise ValueError("unreadable")
        return VideoRecord(f"v{i}", video.frames, video.fps, action_label=0)

    opts = WriteOptions(max_samples=2, progress=False)
    assert write_split(tmp_path, "train", range(2), load, dataset="x", opts=opts)["samples"] == 1
    record = tmp_path / ".progress" / "train-000000.json"
    assert record.is_file()
    bad.clear()
    real = parallel._atomic_json

    def killed_at_the_record(path, obj):
        if path == record:
            raise KeyboardInterrupt  # (what the kill leaves: the new shard, no new record)
        real(path, obj)

    monkeypatch.setattr(parallel, "_atomic_json", killed_at_the_record)
    with pytest.raises(KeyboardInterrupt):
        write_split(tmp_path, "train", range(2), load, dataset="x", opts=dataclasses.replace(opts, retry_skipped=True))
    assert not record.exists() and (tmp_path / "train-000000.tar").is_file()
    monkeypatch.setattr(parallel, "_atomic_json", real)
    entry = write_split(tmp_path, "train", range(2), load, dataset="x", opts=opts)
    assert entry["samples"] == 2 and entry["skipped"] == []


class _NeedsTwoArguments(Exception):  # pickles, and fails to unpickle (its __init__ takes two)
    def __init__(self, what, where):
        super().__init__(f"{what} at {where}")


@pytest.mark.parametrize("error", [_NeedsTwoArguments("broken", "disk"), RuntimeError("x" * 200_000)])
def test_a_workers_error_reaches_the_driver_as_text_when_it_would_not_travel_whole(tmp_path, error, monkeypatch):
    """The queue pickles in a feeder thread: an error that did not unpickle raised in the driver
    (a traceback), and one over the pipe's ~64 KiB kept the worker alive at exit, unread: a hang."""
    from carl_scale.datasets import parallel

    cfg = SyntheticConfig(num_actions=1, train_videos=1, val_videos=1, min_frames=20, max_frames=20,
                          height=32, width=32)
    video = render_video(cfg, "train", 0)
    real = parallel.SlotWriter.write

    def write(self, rec):  # (a write error stops the whole write: the worker reports it)
        if rec.video_id == "v3":
            raise error
        real(self, rec)

    monkeypatch.setattr(parallel.SlotWriter, "write", write)
    with pytest.raises(RuntimeError, match=f"^{type(error).__name__}: "):
        write_split(tmp_path, "train", range(4), lambda i: VideoRecord(f"v{i}", video.frames, video.fps, action_label=0),
                    dataset="x", opts=WriteOptions(max_samples=2, workers=2, progress=False))


def test_a_record_without_frames_is_skipped_with_its_name(tmp_path):
    from carl_scale.datasets.writer import SkipInput, SlotWriter, VideoRecord

    w = SlotWriter(tmp_path, "train", 0, dataset="t", payload="jpeg")
    with pytest.raises(SkipInput, match="empty: no frames"):
        w.write(VideoRecord("empty", np.zeros((0, 16, 16, 3), np.uint8), fps=30.0))
    with pytest.raises(SkipInput, match="stored: no frames"):
        w.write(VideoRecord("stored", None, fps=30.0, encoded=b"x", num_frames=0, height=16, width=16))


def test_the_library_options_refuse_what_the_command_lines_refuse():
    """A caller of the library (not the CLI) gets the same refusals, before anything is read or written."""
    from carl_scale.datasets.carl_code import CarlDataOptions
    from carl_scale.datasets.encode import EncodeOptions
    from carl_scale.datasets.kinetics400 import Kinetics400Options
    from carl_scale.datasets.pennaction import PennActionOptions
    from carl_scale.datasets.tfrecord import write_tfrecord_shards

    for make, message in ((lambda: CarlDataOptions(limit=-1), "--limit must be >= 1, got -1"),
                          (lambda: CarlDataOptions(short_side=0), "--short-side must be >= 16"),
                          (lambda: CarlDataOptions(dataset="ucf"), "--dataset must be one of pennaction"),
                          (lambda: Kinetics400Options(short_side=4), "--short-side must be >= 16 .*, got 4"),
                          (lambda: PennActionOptions(fps=float("inf")), "--fps must be a finite number > 0"),
                          (lambda: EncodeOptions(gop=0), r"--gop must be an integer >= 1, got 0"),
                          (lambda: EncodeOptions(crf=64), r"--crf must be an integer in \[0, 63\]"),
                          (lambda: EncodeOptions(jpeg_quality=0), r"--jpeg-quality must be an integer in \[1, 100\]"),
                          (lambda: write_tfrecord_shards("nowhere", "out", "pouring", fps=0), "--fps must be")):
        with pytest.raises(ValueError, match=message):
            make()
