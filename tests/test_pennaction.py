"""PennAction -> shards from a folder laid out like the download plus CARL's phase label files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from carl_scale.data.decoders import PyAVDecoder
from carl_scale.datasets.pennaction import ACTIONS, CARL_SPLIT, match_lengths, split_differences
from carl_scale.data.whole_video import iter_whole_videos
from shards import pennaction


def _frames(root, seq: str, n: int) -> None:
    d = root / "frames" / seq
    d.mkdir(parents=True)
    for i in range(n):  # grey level 8 * frame index: which frame a sample holds is readable
        Image.fromarray(np.full((32, 48, 3), 8 * i, np.uint8)).save(d / f"{i + 1:06d}.jpg", quality=95)


@pytest.fixture(scope="module")
def penn(tmp_path_factory):
    root = tmp_path_factory.mktemp("penn")
    raw, lab = root / "Penn_Action", root / "labels"
    (raw / "labels").mkdir(parents=True)
    videos = {  # seq: (action in the .mat, label folder, split, frames, label count)
        "0001": ("baseball_pitch", "baseball_pitch", "train", 12, 12),
        "0002": ("bowl", "bowling", "train", 20, 10),  # more frames than labels: frames resampled
        "0003": ("squat", "squats", "val", 10, 20),  # more labels than frames: labels resampled
        "0004": ("strum_guitar", "strum_guitar", "train", 6, 6),  # not one of the 13
        "0005": ("situp", "situp", "val", 0, 8),  # no frames: skipped and counted
        "0006": (None, "pushups", "val", 7, 7),  # no .mat: the label folder's (TCC) name says pushup
        "0007": ("pullup", "pullup", "val", 5, 5),  # a phase label 2: pullup has 2 phases, skipped
        "0008": ("situp", "squat", "val", 6, 6),  # a squat's labels filed for a situp: named
    }
    for seq, (action, folder, split, n, m) in videos.items():
        if n:
            _frames(raw, seq, n)
        if action:
            savemat(raw / "labels" / f"{seq}.mat", {"action": action, "nframes": n, "train": int(split == "train")})
        (lab / split / folder).mkdir(parents=True, exist_ok=True)
        phases = 2 if seq == "0006" else 3  # (0006: pushup has 2 phases)
        np.save(lab / split / folder / f"{seq}.npy", np.arange(m) % phases)
    (lab / "val" / "baseball_pitch").mkdir()
    np.save(lab / "val" / "baseball_pitch" / "0001.npy", np.zeros(12))  # 0001 labelled twice: written once
    (lab / "train" / "README.txt").write_text("not a label file")  # stray files are not sequences
    return raw, lab


def test_pennaction_shards_follow_carls_preparation(penn, tmp_path):
    raw, lab = penn
    m = pennaction.main(["--root", str(raw), "--phase-labels", str(lab), "--out", str(tmp_path), "--codec", "mjpeg",
                         "--no-progress"])
    assert m["label_names"]["actions"] == ACTIONS and len(ACTIONS) == 13
    train_skips = {s["source"]: s["reason"] for s in m["splits"]["train"]["skipped"]}
    assert list(train_skips) == ["train/strum_guitar/0004.npy"]  # README.txt is no sequence
    assert "not one of the 13" in train_skips["train/strum_guitar/0004.npy"]
    val_skips = {s["source"]: s["reason"] for s in m["splits"]["val"]["skipped"]}
    assert "also labelled by" in val_skips["val/baseball_pitch/0001.npy"]
    assert "no frames" in val_skips["val/situp/0005.npy"]
    assert val_skips["val/pullup/0007.npy"] == "phase label 2 in 0007.npy: pullup has 2 phases (0-1) in the CARL code's labels"
    assert val_skips["val/squat/0008.npy"] == ("phase label 2 in 0008.npy: situp has 2 phases (0-1) in the CARL code's "
                                               "labels; the file is in the squat folder (labels of another action?)")
    train = {meta["video_id"]: (meta, f) for meta, f in iter_whole_videos(tmp_path, PyAVDecoder(), "train")}
    assert set(train) == {"0001_baseball_pitch", "0002_bowl"}
    meta, frames = train["0002_bowl"]
    assert meta["action_label"] == ACTIONS.index("bowl") and frames.shape == (10, 224, 224, 3)  # CARL's squash
    assert np.round(frames[:, 16, 24, 0] / 8).astype(int).tolist() == list(range(0, 20, 2))  # frames j*20//10
    val = {meta["video_id"]: (meta, f) for meta, f in iter_whole_videos(tmp_path, PyAVDecoder(), "val")}
    assert set(val) == {"0003_squat", "0006_pushup"}
    vmeta, vframes = val["0003_squat"]
    assert len(vframes) == 10 and vmeta["phase_labels"] == (np.arange(20) % 3)[::2].tolist()  # labels j*20//10
    assert val["0006_pushup"][0]["action_label"] == ACTIONS.index("pushup")
    written = json.loads((tmp_path / "shards.json").read_text())
    assert written["dataset"] == "pennaction"
    # counted per action, by name, and compared with the CARL code's split (in total and per action)
    assert written["splits"]["val"]["videos_per_action"] == {"pushup": 1, "squat": 1}
    assert written["splits"]["train"]["warnings"] == [
        "pennaction train: 2 videos written; the CARL code's split has 1140 (1 skipped, listed in shards.json)",
        "pennaction train: videos per action differ from the CARL code's split: baseball_pitch 1 (CARL: 103), "
        "baseball_swing 0 (CARL: 113), bench_press 0 (CARL: 69), bowl 1 (CARL: 134), " + ", ".join(
            f"{a} 0 (CARL: {n[0]})" for a, n in list(CARL_SPLIT.items())[4:])]


def test_a_misfiled_action_is_warned_about_where_the_total_matches():
    """A label folder filed under another action keeps the split's total: only the per-action counts
    say so."""
    per_action = {a: n[1] for a, n in CARL_SPLIT.items()}
    per_action["squat"] -= 3
    per_action["situp"] += 3
    assert split_differences("val", {"samples": 966, "skipped": [], "videos_per_action": per_action}) == [
        "pennaction val: videos per action differ from the CARL code's split: situp 53 (CARL: 50), squat 112 "
        "(CARL: 115)"]
    assert split_differences("val", {"samples": 966, "skipped": [],
                                     "videos_per_action": {a: n[1] for a, n in CARL_SPLIT.items()}}) == []


def test_match_lengths_is_the_identity_when_counts_agree():
    frames, labels = match_lengths(list("abcd"), np.arange(4))
    assert frames == list("abcd") and labels.tolist() == [0, 1, 2, 3]


def test_missing_inputs_say_what_to_get(penn, tmp_path):
    raw, lab = penn
    with pytest.raises(FileNotFoundError, match="Penn_Action folder of the download"):
        pennaction.main(["--root", str(tmp_path), "--phase-labels", str(lab), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="needs train/ and val/"):
        pennaction.main(["--root", str(raw), "--phase-labels", str(tmp_path), "--out", str(tmp_path / "o")])


def test_frames_are_squashed_as_opencvs_linear_resize_does():
    """cv2.resize's INTER_LINEAR (the CARL code's preparation) takes 2 x 2 source pixels per output
    pixel: halving is the mean of each 2 x 2 block, where an antialiasing filter (PIL's) also
    weighs the neighbouring blocks. An odd --square is refused before anything is written."""
    from carl_scale.datasets.pennaction import PennActionOptions, _linear_resize, write_pennaction_shards

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (8, 12, 3)).astype(np.uint8)
    blocks = frame.reshape(4, 2, 6, 2, 3).astype(float).mean(axis=(1, 3))
    got = _linear_resize(frame, 4, 6).astype(float)
    assert np.abs(got - blocks).max() <= 0.5
    pil = np.asarray(Image.fromarray(frame).resize((6, 4), Image.BILINEAR)).astype(float)
    assert np.abs(pil - blocks).max() > 2  # (what it did before)
    with pytest.raises(ValueError, match="needs even frame sizes, got 223x223"):
        write_pennaction_shards("nowhere", "nowhere", "out", PennActionOptions(square=223))
