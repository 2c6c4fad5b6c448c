"""`python -m shards.kinetics400` on a small Kinetics-shaped folder of real H.264 clips: class folders
with spaces, flat clips, missing/truncated/zero-byte clips, two splits, a clip with B-frames and a
variable-frame-rate one; and the parallel writer killed mid-write and rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from carl_scale.data.codec import iter_video_frames
from carl_scale.data.decoders import PyAVDecoder
from carl_scale.data.reader import VideoLoader
from carl_scale.data.config import LoaderConfig, SpatialConfig, TemporalConfig
from carl_scale.data.whole_video import iter_whole_videos
from carl_scale.datasets.encode import EncodeOptions, encode_video
from carl_scale.datasets.kinetics400 import probe, summary_rows
from shards import kinetics400

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["abseiling", "playing guitar", "riding a bike", "zumba"]  # zumba: annotated, no clip present


def _frames(n: int, seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 8, w // 8, 3)).repeat(8, 0).repeat(8, 1)
    return np.stack([np.roll(base, 3 * i, axis=1) for i in range(n)]).astype(np.uint8)


def _write_mp4(path: Path, frames: np.ndarray, *, bframes: bool = False, pts: list[int] | None = None) -> None:
    """H.264 in MP4 as YouTube-derived clips are: B-frames on request, or explicit (variable) pts."""
    with av.open(str(path), "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"preset": "veryfast", "bf": "2" if bframes else "0", "g": "12"}
        if pts is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def _k400(root: Path) -> dict:
    """Writes the folder and CSVs; returns {clip id: (split, label, frame count or None)}."""
    vids = root / "videos"
    (vids / "train" / "playing guitar").mkdir(parents=True)
    (vids / "train" / "riding_a_bike").mkdir(parents=True)  # a renamed folder
    expect = {}
    clips = [  # (youtube id, split, class, frames, where, kind)
        ("aaaaaaaaaa1", "train", "playing guitar", 30, "train/playing guitar", "ok"),
        ("-bbbbbbbbb2", "train", "playing guitar", 26, "train/playing guitar", "bframes"),
        ("cc_cccccccc", "train", "riding a bike", 34, "train/riding_a_bike", "ok"),
        ("ddddddddddd", "train", "abseiling", 28, "", "ok"),
        ("eeeeeeeeeee", "train", "abseiling", 28, "", "missing"),
        ("fffffffffff", "train", "riding a bike", 30, "", "truncated"),
        ("ggggggggggg", "train", "abseiling", 30, "", "zero"),
        ("hhhhhhhhhhh", "val", "playing guitar", 24, "", "ok"),
        ("iiiiiiiiiii", "val", "riding a bike", 32, "", "vfr"),
        ("jjjjjjjjjjj", "val", "zumba", 20, "", "missing"),
    ]
    for k, (yid, split, cls, n, where, kind) in enumerate(clips):
        cid = f"{yid}_{10 * k:06d}_{10 * k + 10:06d}"
        path = vids / where / f"{cid}.mp4"
        frames = _frames(n, k)
        if kind in ("ok", "truncated"):
            path.write_bytes(encode_video(frames, 25, EncodeOptions(codec="h264", gop=12)))
        elif kind == "bframes":
            _write_mp4(path, frames, bframes=True)
        elif kind == "vfr":  # 40 ms frames, then a stretch of 80 ms ones
            _write_mp4(path, frames, pts=[40 * i if i < 16 else 640 + 80 * (i - 16) for i in range(n)])
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the moov atom is at the end: gone
        elif kind == "zero":
            path.write_bytes(b"")
        expect[cid] = (split, cls, n if kind in ("ok", "bframes") else None, kind)
    train_rows = [(c, v) for c, v in expect.items() if v[0] == "train"]
    with open(root / "k400.csv", "w") as f:  # one CSV with a split column (and is_cc), as the 2020 release
        f.write("label,youtube_id,time_start,time_end,split,is_cc\n")
        for cid, (split, cls, _, _) in train_rows:
            yid, start, end = cid[:11], int(cid[12:18]), int(cid[19:25])
            f.write(f'"{cls}",{yid},{start},{end},{split},0\n')
    with open(root / "validate.csv", "w") as f:  # the split from the file name
        f.write("label,youtube_id,time_start,time_end\n")
        for cid, (split, cls, _, _) in expect.items():
            if split == "val":
                f.write(f'{cls},{cid[:11]},{int(cid[12:18])}.0,{int(cid[19:25])}.0\n')
    return expect


@pytest.fixture(scope="module")
def k400_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("k400src")
    return root, _k400(root)


def test_kinetics_folder_to_shards_counts_labels_and_frames(k400_src, tmp_path):
    root, expect = k400_src
    out = tmp_path / "shards"
    manifest = kinetics400.main(["--annotations", str(root / "k400.csv"), "--annotations", str(root / "validate.csv"),
                                 "--videos", str(root / "videos"), "--out", str(out), "--max-samples", "2",
                                 "--workers", "2", "--no-progress"])
    assert manifest["label_names"]["actions"] == CLASSES and manifest["codec"] == "h264"
    rows = {r["split"]: r for r in summary_rows(manifest)}
    assert (rows["train"]["written"], rows["train"]["missing"], rows["train"]["unreadable"]) == (4, 1, 2)
    assert (rows["val"]["written"], rows["val"]["missing"], rows["val"]["variable frame rate"]) == (1, 1, 1)
    reasons = {sk["source"]: sk["reason"] for s in manifest["splits"].values() for sk in s["skipped"]}
    kinds = {cid: v[3] for cid, v in expect.items()}
    assert {kinds[c] for c in reasons} == {"missing", "truncated", "zero", "vfr"}
    assert all(reasons[c].startswith("unreadable") for c in reasons if kinds[c] in ("truncated", "zero"))
    assert "zero bytes" in next(reasons[c] for c in reasons if kinds[c] == "zero")
    seen = {}
    for split in ("train", "val"):
        for meta, frames in iter_whole_videos(str(out), PyAVDecoder(), split=split):
            seen[meta["video_id"]] = meta
            _, cls, n, _ = expect[meta["video_id"]]
            assert meta["split"] == split and meta["action_label"] == CLASSES.index(cls)
            assert meta["num_frames"] == n == len(frames) and frames.shape[1:] == (48, 64, 3)
    assert set(seen) == {c for c, v in expect.items() if v[2] is not None}
    assert manifest["splits"]["train"]["frames"] == sum(v[2] for v in expect.values() if v[0] == "train" and v[2])
    # the training reader takes them as they are (PyAV decodes H.264 on the CPU)
    cfg = LoaderConfig(shards=str(out), batch_size=2, num_workers=0, shuffle_buffer=0, decoder="pyav",
                       temporal=TemporalConfig(num_frames=8), spatial=SpatialConfig(image_size=32))
    batch = next(iter(VideoLoader(cfg)))
    assert batch.views.shape == (2, 2, 8, 3, 32, 32)


def test_variable_frame_rate_is_found_and_resampled_when_transcoding(k400_src, tmp_path):
    root, expect = k400_src
    vfr = next(c for c, v in expect.items() if v[3] == "vfr")
    path = root / "videos" / f"{vfr}.mp4"
    assert probe(path).variable_rate and not probe(next((root / "videos" / "train").rglob("*.mp4"))).variable_rate
    out = tmp_path / "t"
    manifest = kinetics400.main(["--annotations", str(root / "validate.csv"), "--videos", str(root / "videos"),
                                 "--out", str(out), "--transcode", "--codec", "mjpeg", "--no-progress"])
    metas = {m["video_id"]: (m, f) for m, f in iter_whole_videos(str(out), PyAVDecoder(), split="val")}
    meta, frames = metas[vfr]
    # 16 frames 40 ms apart, then 16 frames 80 ms apart: resampled to 25 fps (the median interval),
    # every source frame once in the first part and twice in the second (the last shown 40 ms)
    assert meta["resampled_from_variable_rate"] and meta["fps"] == pytest.approx(25.0)
    src = np.stack([f for f in iter_video_frames(str(path))])
    assert len(src) == 32 and len(frames) == 16 + 2 * 15 + 1
    order = [i for i in range(16)] + [16 + j // 2 for j in range(31)]
    err = np.abs(frames[:, None].astype(np.int16) - src[None].astype(np.int16)).mean(axis=(2, 3, 4))
    assert err.argmin(axis=1).tolist() == order  # each output frame is the source frame shown at its time
    assert manifest["splits"]["val"]["samples"] == 2


def test_a_writer_killed_mid_write_finishes_on_rerun_with_the_same_shards(k400_src, tmp_path):
    root, _ = k400_src
    # more clips: the same files listed under many ids, so the write takes long enough to interrupt
    many = tmp_path / "many"
    (many / "videos").mkdir(parents=True)
    src = sorted((root / "videos").rglob("*.mp4"))[0]
    with open(many / "train.csv", "w") as f:
        f.write("label,youtube_id,time_start,time_end\n")
        for i in range(48):
            cid = f"k{i:010d}_000000_000010"
            os.link(src, many / "videos" / f"{cid}.mp4")
            f.write(f"class {i % 3},{cid[:11]},0,10\n")
    flags = ["--annotations", str(many / "train.csv"), "--videos", str(many / "videos"), "--transcode",
             "--codec", "mjpeg", "--max-samples", "3", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "shards.kinetics400", *flags, "--out", str(out), "--workers", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while len(list((out / ".progress").glob("train-*.json"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "the write ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / ".progress").glob("train-*.json")))
    assert 3 <= finished < 16 and not (out / "shards.json").exists()
    res = subprocess.run([sys.executable, "-m", "shards.kinetics400", *flags, "--out", str(out), "--workers", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "resuming" in res.stdout, res.stdout + res.stderr
    ref = tmp_path / "ref"
    kinetics400.main([*flags, "--out", str(ref), "--workers", "1"])
    names = sorted(p.name for p in ref.iterdir() if p.suffix in (".tar", ".idx"))
    assert len(names) == 32 and names == sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".idx"))
    assert all((out / n).read_bytes() == (ref / n).read_bytes() for n in names)
    a, b = json.loads((out / "shards.json").read_text()), json.loads((ref / "shards.json").read_text())
    assert a["splits"]["train"]["shards"] == b["splits"]["train"]["shards"] and a["splits"]["train"]["samples"] == 48
    rerun = subprocess.run([sys.executable, "-m", "shards.kinetics400", *flags, "--out", str(out)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "already complete" in rerun.stdout


def test_folder_refuses_variable_frame_rate_as_is_and_resamples_it_when_transcoding(k400_src, tmp_path):
    from shards import folder

    root, expect = k400_src
    src = tmp_path / "mine"
    src.mkdir()
    vfr = next(c for c, v in expect.items() if v[3] == "vfr")
    (src / "vfr.mp4").write_bytes((root / "videos" / f"{vfr}.mp4").read_bytes())
    ok = next(c for c, v in expect.items() if v[3] == "ok")
    (src / "cfr.mp4").write_bytes(next((root / "videos").rglob(f"{ok}.mp4")).read_bytes())
    m = folder.main(["--src", str(src), "--out", str(tmp_path / "as_is"), "--no-progress"])
    (skipped,) = m["splits"]["train"]["skipped"]
    assert skipped["source"] == "vfr.mp4" and skipped["reason"].startswith("variable frame rate")
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "vfr.txt").write_text("\n".join(str(i) for i in range(32)))  # one label per source frame
    m = folder.main(["--src", str(src), "--out", str(tmp_path / "t"), "--transcode", "--codec", "mjpeg",
                     "--frame-labels", str(labels), "--no-progress"])
    metas = {meta["video_id"]: meta for meta, _ in iter_whole_videos(str(tmp_path / "t"), PyAVDecoder())}
    assert metas["vfr"]["num_frames"] == 47 and metas["vfr"]["fps"] == pytest.approx(25.0)
    # the labels follow the frames: the source frame each output frame shows
    assert metas["vfr"]["phase_labels"] == list(range(16)) + [16 + j // 2 for j in range(31)]
    assert metas["cfr"]["num_frames"] == expect[ok][2]
    # a label list a frame short of the source (within the CARL code's slack): fitted to the source
    # frames first (-1 for the missing one), then it follows the resampling as a whole one does
    import numpy as np

    from carl_scale.datasets.folder import file_record

    rec = file_record(src / "vfr.mp4", "vfr", -1, np.arange(31), {}, short_side=None, transcode=True,
                      source="vfr.mp4", label_slack=2)
    assert rec.phase_labels.tolist() == list(range(16)) + [16 + j // 2 if j < 30 else -1 for j in range(31)]
    assert rec.extra["label_lengths_fitted"] == {"phase": 31}


def test_an_annotation_csv_without_clips_is_refused(tmp_path):
    (tmp_path / "k400.csv").write_text("label,youtube_id,time_start,time_end,split\n")
    (tmp_path / "videos").mkdir()
    with pytest.raises(ValueError, match="no clips listed"):
        kinetics400.main(["--annotations", str(tmp_path / "k400.csv"), "--videos", str(tmp_path / "videos"),
                          "--out", str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out").exists()
    # a split the CSV names but nobody knows is refused, not read as the file name's split
    (tmp_path / "train.csv").write_text("label,youtube_id,time_start,time_end,split\nwave,abcdefghijk,1,11,training\n")
    with pytest.raises(ValueError, match=r"train.csv:2: unknown split 'training'"):
        kinetics400.main(["--annotations", str(tmp_path / "train.csv"), "--videos", str(tmp_path / "videos"),
                          "--out", str(tmp_path / "out"), "--no-progress"])


def test_frame_timing_finds_slow_drift_but_not_a_millisecond_time_base():
    """Frames are found by pts x rate: a stretch at 28 fps in a 30 fps clip (each interval within
    10% of the median) puts frames 5 indices off; 29.97 fps in milliseconds (33, 33, 34 ticks) is
    constant-rate."""
    from carl_scale.datasets.encode import frame_timing

    ms = np.round(np.arange(300) * 1000 / 29.97).astype(int)
    assert frame_timing(ms) == (33.0, False)
    drift = np.concatenate([np.arange(150) / 30, 5 + np.arange(1, 141) / 28])
    assert frame_timing(np.round(drift * 90000).astype(int))[1]
    assert frame_timing(np.arange(100) * 3003) == (3003.0, False)


@pytest.mark.parametrize("row", ["wave,abcdefghijk,1\n", "wave,abcdefghijk,inf,11\n", "wave\n"])
def test_a_short_or_non_numeric_annotation_row_is_refused_in_one_line_naming_it(tmp_path, row):
    (tmp_path / "train.csv").write_text("label,youtube_id,time_start,time_end\n" + row)
    (tmp_path / "videos").mkdir()
    with pytest.raises(ValueError, match=r"train.csv:2: youtube_id, time_start and time_end must be given"):
        kinetics400.main(["--annotations", str(tmp_path / "train.csv"), "--videos", str(tmp_path / "videos"),
                          "--out", str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out").exists()


def test_a_clip_listed_in_two_splits_is_said_to_be(tmp_path):
    from carl_scale.datasets.kinetics400 import read_annotations

    (tmp_path / "train.csv").write_text("label,youtube_id,time_start,time_end\nwave,abcdefghijk,1,11\n"
                                        "squat,bbcdefghijk,0,10\n")
    (tmp_path / "validate.csv").write_text("label,youtube_id,time_start,time_end\nwave,abcdefghijk,1,11\n")
    clips, names, warnings = read_annotations([tmp_path / "train.csv", tmp_path / "validate.csv"])
    assert len(clips) == 3 and names == ["squat", "wave"]
    assert warnings == ["1 clip(s) are listed in more than one split and written into each, e.g. "
                        "abcdefghijk_000001_000011 (train, val): check the annotation CSVs"]


def test_a_machine_error_while_reading_a_clip_stops_the_write(k400_src, tmp_path, monkeypatch):
    """An I/O error of the disk while a clip is probed is not the clip's fault: the write stops
    (and a rerun finishes it) instead of listing the clip as unreadable for good."""
    import errno

    from carl_scale.datasets import kinetics400 as k400

    def broken_disk(path):
        raise OSError(errno.EIO, "Input/output error", str(path))
    monkeypatch.setattr(k400, "probe", broken_disk)
    root, _ = k400_src
    with pytest.raises(ValueError, match="The machine, not the video: the write stops here"):
        kinetics400.main(["--annotations", str(root / "k400.csv"), "--videos", str(root / "videos"),
                          "--out", str(tmp_path / "out"), "--no-progress"])


def test_skips_are_grouped_by_kind_and_clips_added_later_are_written_with_retry_skipped(k400_src, tmp_path, capsys):
    import shutil

    from carl_scale.datasets.kinetics400 import skip_kind

    root, expect = k400_src
    src, out = tmp_path / "src", tmp_path / "shards"
    shutil.copytree(root, src)
    args = ["--annotations", str(src / "k400.csv"), "--videos", str(src / "videos"), "--out", str(out),
            "--max-samples", "2", "--no-progress"]
    manifest = kinetics400.main(args)
    printed = capsys.readouterr().out
    kinds = [skip_kind(sk["reason"]) for sk in manifest["splits"]["train"]["skipped"]]
    assert kinds.count("missing") == 1 and all(k.startswith(("missing", "unreadable: ")) for k in kinds)
    assert "        1  missing  (e.g. eeeeeeeeeee" in printed and "--retry-skipped" in printed
    assert not any(cid in line.split("(e.g.")[0] for line in printed.splitlines() for cid in expect)  # ids not grouped on

    # the missing clip arrives: the same command keeps the split as it is; --retry-skipped rewrites
    # only the slots that skipped something, and the clip is in
    cid = next(c for c, v in expect.items() if v[3] == "missing" and v[0] == "train")
    (src / "videos" / f"{cid}.mp4").write_bytes(encode_video(_frames(28, 4), 25, EncodeOptions(codec="h264", gop=12)))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    assert kinetics400.main(args)["splits"]["train"]["samples"] == 4
    manifest = kinetics400.main(args + ["--retry-skipped"])
    entry = manifest["splits"]["train"]
    assert entry["samples"] == 5 and [skip_kind(s["reason"]) for s in entry["skipped"]].count("missing") == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    assert after["train-000000.tar"] == stamps["train-000000.tar"] and after["train-000001.tar"] == stamps["train-000001.tar"]
    assert "train-000002.tar" not in stamps and "train-000002.tar" in after  # (its two inputs were both skipped)
    assert cid in {meta["video_id"] for meta, _ in iter_whole_videos(str(out), PyAVDecoder(), split="train")}

    # Kinetics' test CSV names no classes: written on its own, the names the train split recorded stay
    (src / "test.csv").write_text("youtube_id,time_start,time_end\n" + f"{cid[:11]},{int(cid[12:18])},{int(cid[19:25])}\n")
    manifest = kinetics400.main(["--annotations", str(src / "test.csv"), "--videos", str(src / "videos"),
                                 "--out", str(out), "--no-progress"])
    assert manifest["splits"]["test"]["samples"] == 1
    assert manifest["label_names"]["actions"] == ["abseiling", "playing guitar", "riding a bike"]
    assert "label_conflicts" not in manifest
