"""Bringing your own videos: `python -m shards.folder` on real encoded files, a corrupt one included."""

from __future__ import annotations

import re

import numpy as np
import pytest

from carl_scale.data.codec import iter_video_frames
from carl_scale.data.manifest import read_manifest
from carl_scale.data.decoders import DaliDecoder, PyAVDecoder
from carl_scale.data.config import SyntheticConfig
from carl_scale.datasets.encode import EncodeOptions, encode_video
from carl_scale.datasets.synthetic import render_video
from carl_scale.data.whole_video import iter_whole_videos
from carl_scale.datasets import folder as folder_module
from shards import folder

CFG = SyntheticConfig(num_actions=2, train_videos=4, val_videos=0, min_frames=30, max_frames=50,
                      height=48, width=64)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("videos")
    (src / "sub").mkdir()
    labels, fine, short = src / "labels", src / "fine", src / "short"
    for d in (labels, fine, short):
        d.mkdir()
    files = {"a.mp4": "h264", "b.webm": "vp9", "sub/c.avi": "mjpeg", "d.mp4": "h264"}
    for i, (name, codec) in enumerate(files.items()):
        v = render_video(CFG, "train", i)
        (src / name).write_bytes(encode_video(v.frames, v.fps, EncodeOptions(codec=codec)))
        stem = name.split("/")[-1].split(".")[0]
        if stem != "d":
            np.savetxt(labels / f"{stem}.txt", v.phase_labels, fmt="%d")
        if stem == "a":  # a second, finer label set (as FineGym's Gym288 beside Gym99), a only
            np.save(fine / "a.npy", np.where(v.phase_labels >= 0, 10 + v.phase_labels, -1))
            np.savetxt(short / "a.txt", v.phase_labels[:-3], fmt="%d")
    (src / "d.mp4").write_bytes((src / "d.mp4").read_bytes()[:200])  # truncated: unreadable
    (src / "garbage.mkv").write_bytes(b"\x00not a video at all" * 50)
    (src / "labels.csv").write_text("video,label,split\na.mp4,squat,train\nb,wave,val\nsub/c.avi,squat,\n")
    return src


def test_folder_as_is_keeps_bytes_and_counts_bad_files(video_dir, tmp_path):
    out = tmp_path / "shards"
    m = folder.main(["--src", str(video_dir), "--out", str(out), "--labels", str(video_dir / "labels.csv"),
                     "--frame-labels", str(video_dir / "labels"), "--extra-frame-labels", f"fine={video_dir / 'fine'}",
                     "--no-progress"])
    assert m["codec"] in ("mixed",)  # originals kept: h264 + vp9 + mjpeg
    assert m["label_names"]["actions"] == ["squat", "wave"]
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["samples"] == 2 and val["samples"] == 1
    skipped = sorted(s["source"] for s in train["skipped"])
    assert skipped == ["d.mp4", "garbage.mkv"]  # skipped and counted, not fatal
    got = {meta["video_id"]: (meta, frames) for meta, frames in iter_whole_videos(out, PyAVDecoder(), "train")}
    assert set(got) == {"a", "sub__c"}
    meta, frames = got["a"]
    ref = np.stack(list(iter_video_frames(str(video_dir / "a.mp4"))))
    assert np.array_equal(frames, ref)  # stored as is: bit-identical decode
    assert meta["action_label"] == 0 and meta["codec"] == "h264"
    phases = render_video(CFG, "train", 0).phase_labels
    assert meta["phase_labels"] == phases.tolist()
    assert meta["frame_labels"]["fine"] == np.where(phases >= 0, 10 + phases, -1).tolist()
    assert got["sub__c"][0]["frame_labels"]["fine"] == [-1] * len(got["sub__c"][1])  # no file: unlabelled
    (vmeta, _), = iter_whole_videos(out, PyAVDecoder(), "val")
    assert vmeta["video_id"] == "b" and vmeta["action_label"] == 1


def test_folder_transcode_short_side_and_jpeg(video_dir, tmp_path):
    out = tmp_path / "vp9"
    m = folder.main(["--src", str(video_dir), "--out", str(out), "--transcode", "--codec", "vp9",
                     "--short-side", "32", "--no-progress"])
    assert m["codec"] == "vp9" and m["splits"]["train"]["samples"] == 3
    for meta, frames in iter_whole_videos(out, DaliDecoder(), "train"):  # DALI decodes vp9 on the CPU
        assert frames.shape[1:] == (32, 42, 3) and meta["height"] == 32 and meta["width"] == 42
        assert all(p == -1 for p in meta["phase_labels"]) and meta["action_label"] == -1
    out = tmp_path / "jpeg"
    m = folder.main(["--src", str(video_dir), "--out", str(out), "--payload", "jpeg", "--no-progress"])
    assert m["payload"] == "jpeg"
    a = [f for _, f in iter_whole_videos(out, PyAVDecoder(), "train")]
    b = [f for _, f in iter_whole_videos(out, DaliDecoder(), "train")]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    low = folder.main(["--src", str(video_dir), "--out", str(tmp_path / "jpeg50"), "--payload", "jpeg",
                       "--jpeg-quality", "50", "--no-progress"])  # the same frames in fewer bytes
    size = [sum(s["bytes"] for s in x["splits"]["train"]["shards"]) for x in (m, low)]
    assert size[1] < size[0]  # (whole tar records: the padding hides how much smaller)
    c = [f for _, f in iter_whole_videos(tmp_path / "jpeg50", PyAVDecoder(), "train")]
    assert all(0 < np.abs(x.astype(int) - y).mean() < 8 for x, y in zip(a, c))
    with pytest.raises(ValueError, match=r"--jpeg-quality must be in \[1, 100\], got 0"):
        folder.main(["--src", str(video_dir), "--out", str(tmp_path / "q0"), "--payload", "jpeg", "--jpeg-quality", "0"])
    assert not (tmp_path / "q0").exists()  # refused before anything was written


def test_folder_skips_a_video_whose_label_set_has_the_wrong_length(video_dir, tmp_path):
    m = folder.main(["--src", str(video_dir), "--out", str(tmp_path / "o"), "--extra-frame-labels",
                     f"short={video_dir / 'short'}", "--no-progress"])
    reasons = {s["source"]: s["reason"] for s in m["splits"]["train"]["skipped"]}
    assert "short frame labels" in reasons["a.mp4"]
    with pytest.raises(SystemExit):
        folder.main(["--src", str(video_dir), "--out", str(tmp_path / "p"), "--extra-frame-labels", "no_equals_sign"])


def test_class_labels_blank_integer_and_named():
    """A blank label is no label (-1), not a class; spreadsheet integers ("10.0") are integers, in
    number order, not text order; integers mixed with names are refused, naming the CSV."""
    from carl_scale.datasets.folder import _as_int, _class_names

    assert _class_names(["2", "", "10", "1.0"], "l.csv") == [] and [_as_int(x) for x in ("10", "1.0", "-1")] == [10, 1, -1]
    assert _class_names(["wave", "", "squat"], "l.csv") == ["squat", "wave"]
    with pytest.raises(ValueError, match=r"l.csv: the labels mix integers \('10'\) and names \('wave'\)"):
        _class_names(["wave", "10"], "l.csv")


def test_folder_errors_name_the_problem(tmp_path):
    (tmp_path / "v").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--labels .*nope.csv does not exist"):
        folder.main(["--src", str(tmp_path / "v"), "--out", str(tmp_path / "o"), "--labels", str(tmp_path / "nope.csv")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no video files"):
        folder.main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])


def _faststart_mp4(path, frames, fps: float) -> None:
    """H.264 in an MP4 whose index (moov) comes first, as web videos are made: a truncated copy
    still opens and decodes its first frames without an error."""
    import av

    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        s = out.add_stream("libx264", rate=int(fps))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)


def test_folder_skips_bad_inputs_and_warns_about_labels_without_losing_the_split(tmp_path):
    """Each of these used to abort the split (leaving a .partial shard that blocked a rerun) or
    apply labels silently."""
    src = tmp_path / "src"
    (src / "labels").mkdir(parents=True)
    for i, name in enumerate(["x y.webm", "x_y.webm", "ok.webm", "badlabels.webm", "twin.webm", "twin.mkv"]):
        v = render_video(CFG, "train", i)
        (src / name).write_bytes(encode_video(v.frames, v.fps, EncodeOptions(codec="vp9")))
        np.savetxt(src / "labels" / f"{name.rsplit('.', 1)[0]}.txt", v.phase_labels, fmt="%d")
    (src / "labels/badlabels.txt").write_text("0 1 two 3\n")  # one non-integer token
    v = render_video(CFG, "train", 9)
    _faststart_mp4(tmp_path / "whole.mp4", v.frames, v.fps)
    whole = (tmp_path / "whole.mp4").read_bytes()
    (src / "cut.mp4").write_bytes(whole[: len(whole) * 2 // 3])  # index intact, tail of the data gone
    (src / "labels.csv").write_text("video,label,split\nok,squat,\nok,wave,\nghost,jump,\ntwin,squat,\n"
                                    "x y.webm,wave,val\n")  # x y goes to val: its id clash with x_y is caught anyway
    m = folder.main(["--src", str(src), "--out", str(tmp_path / "o"), "--labels", str(src / "labels.csv"),
                     "--frame-labels", str(src / "labels"), "--no-progress"])
    split = m["splits"]["train"]
    reasons = {s["source"]: s["reason"] for s in split["skipped"]}
    assert set(reasons) == {"x_y.webm", "twin.webm", "badlabels.webm", "cut.mp4"}, reasons
    assert "already 'x y.webm'" in reasons["x_y.webm"] and "already 'twin.mkv'" in reasons["twin.webm"]
    assert "not an integer: 'two'" in reasons["badlabels.webm"]
    assert "frames its container lists" in reasons["cut.mp4"]
    assert split["samples"] == 2 and m["splits"]["val"]["samples"] == 1 and not list((tmp_path / "o").glob("*.partial"))
    warnings = " | ".join(m["label_warnings"])
    assert "'ok' is listed again" in warnings and "'ghost' matches no video" in warnings
    assert "'twin' matches 2 files" in warnings and "share the stem 'twin'" in warnings
    assert m["label_names"]["actions"] == ["squat", "wave"]  # 'jump' labels no video: not a class
    ids = {meta["video_id"]: meta["action_label"] for split in ("train", "val")
           for meta, _ in iter_whole_videos(tmp_path / "o", PyAVDecoder(), split)}
    assert ids == {"x y": 1, "ok": 1, "twin": 0}  # the later 'ok' row won; the first twin kept its label


def test_refusals_come_before_anything_is_written_or_removed(video_dir, tmp_path):
    """Found by review: each of these wrote or deleted first and refused after (or not at all)."""
    from shards import finegym, pennaction, pouring, synthetic

    src = tmp_path / "src"
    src.mkdir()
    v = render_video(CFG, "train", 0)
    (src / "ok.webm").write_bytes(encode_video(v.frames, v.fps, EncodeOptions(codec="vp9")))
    out = tmp_path / "o"
    folder.main(["--src", str(src), "--out", str(out), "--no-progress"])
    before = sorted(p.name for p in out.iterdir())
    # another payload into the same directory, even with --overwrite: refused, the split kept
    with pytest.raises(FileExistsError, match="--payload jpeg, but .* holds video shards"):
        folder.main(["--src", str(src), "--out", str(out), "--payload", "jpeg", "--overwrite", "--no-progress"])
    assert sorted(p.name for p in out.iterdir()) == before
    # a CSV split that is a path: refused before any file is touched (it once deleted ../victim-*)
    victim = tmp_path / "victim-000000.tar"
    victim.write_bytes(b"a user's file")
    (src / "labels.csv").write_text("video,label,split\nok.webm,a,../victim\n")
    with pytest.raises(ValueError, match=r"labels.csv: split name must be letters, digits and underscores, got "
                                         r"'../victim' \(for 'ok.webm'\)"):
        folder.main(["--src", str(src), "--out", str(tmp_path / "o2"), "--labels", str(src / "labels.csv"),
                     "--overwrite", "--no-progress"])
    assert victim.read_bytes() == b"a user's file" and not (tmp_path / "o2").exists()
    for flags, error, message in (
            (["--val-fraction", "7"], ValueError, r"--val-fraction must be in \[0, 1\), got 7"),
            (["--short-side", "8"], ValueError, "--short-side must be >= 16 .*, got 8"),
            (["--frame-labels", ""], ValueError, "--frame-labels is empty"),
            (["--frame-labels", str(tmp_path / "nowhere")], FileNotFoundError, "--frame-labels .*nowhere is not a dir")):
        with pytest.raises(error, match=message):
            folder.main(["--src", str(src), "--out", str(tmp_path / "o3"), "--no-progress", *flags])
        assert not (tmp_path / "o3").exists()
    for main, flags, message in (
            (finegym.main, ["--videos", "v", "--annotations", "a", "--fps", "-25"], "--fps must be >= 0.001, got -25"),
            (finegym.main, ["--videos", "v", "--annotations", "a", "--limit", "-3"], "--limit must be >= 1, got -3"),
            (pennaction.main, ["--root", "r", "--phase-labels", "l", "--square", "-5"], "--square must be >= 0"),
            (pennaction.main, ["--root", "r", "--phase-labels", "l", "--short-side", "256"],
             "--short-side applies with --square 0"),
            (pouring.main, ["--src", "s", "--fps", "0"], "--fps must be >= 0.001, got 0"),
            (pouring.main, ["--src", "s", "--fps", "inf"], "--fps must be a finite number, got inf"),
            (finegym.main, ["--videos", "v", "--annotations", "a", "--fps", "nan"], "--fps must be a finite number"),
            (synthetic.main, ["--seed", "-1"], r"--seed must be in \[0, 4294967295\], got -1"),
            (synthetic.main, ["--train-videos", "0"], "--train-videos must be >= 1, got 0"),
            (synthetic.main, ["--size", "33"], "vp9 with 4:2:0 chroma needs even frame sizes, got 33x33")):
        with pytest.raises(ValueError, match=message):
            main([*flags, "--out", str(tmp_path / "o4")])
        assert not (tmp_path / "o4").exists()


def test_labels_that_reach_no_video_odd_file_names_and_a_split_of_only_failures(tmp_path, caplog):
    import logging

    src = tmp_path / "src"
    (src / "labels").mkdir(parents=True)
    v = render_video(CFG, "train", 0)
    name = "bad\udcff\udcfename.webm"  # not UTF-8 (a Latin-1 name on a UTF-8 system)
    for n in (name, "ok.webm"):
        (src / n).write_bytes(encode_video(v.frames, v.fps, EncodeOptions(codec="vp9")))
    np.savetxt(src / "labels" / "ok.txt", v.phase_labels, fmt="%d")
    with caplog.at_level(logging.WARNING):
        m = folder.main(["--src", str(src), "--out", str(tmp_path / "o"), "--frame-labels", str(src / "labels"),
                         "--val-fraction", "0.5", "--no-progress"])
    assert sum(s["samples"] for s in m["splits"].values()) == 2
    assert any("1 of 2 videos have no label file there" in w for w in m["label_warnings"])
    (src / "latin1.csv").write_bytes("video,label\nok.webm,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.csv is not UTF-8 text .*: save it as UTF-8"):
        folder.main(["--src", str(src), "--out", str(tmp_path / "o6"), "--labels", str(src / "latin1.csv")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.webm").write_bytes(b"\x00not a video" * 30)
    (bad / "y.webm").write_bytes(b"\x00not a video" * 30)
    with pytest.raises(ValueError, match=r"split 'train': none of its 2 inputs could be written \(the most common "
                                         r"reason, 2 of them: .*\); .*shards.json lists each"):
        folder.main(["--src", str(bad), "--out", str(tmp_path / "o5"), "--no-progress"])


def test_a_label_file_changed_after_the_write_is_not_taken_as_complete(video_dir, tmp_path):
    """The same command again after a per-frame label file was fixed: refused (not "already
    complete" with the old labels), and --overwrite writes the new ones."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(video_dir, src)
    out = tmp_path / "shards"
    args = ["--src", str(src), "--out", str(out), "--frame-labels", str(src / "labels"), "--no-progress"]
    folder.main(args)
    assert folder.main(args)["splits"]["train"]["samples"] == 3  # unchanged: complete, nothing to do
    fixed = np.loadtxt(src / "labels/a.txt", dtype=int)
    fixed[fixed >= 0] = 0
    np.savetxt(src / "labels/a.txt", fixed, fmt="%d")
    with pytest.raises(FileExistsError, match="the label files of split 'train' changed since it was written.*--overwrite"):
        folder.main(args)
    folder.main([*args, "--overwrite"])
    got = {m["video_id"]: m for m, _ in iter_whole_videos(out, PyAVDecoder(), "train")}
    assert got["a"]["phase_labels"] == fixed.tolist()


def test_overwrite_names_the_splits_of_an_earlier_command_it_kept(video_dir, tmp_path):
    out = tmp_path / "o"
    args = ["--src", str(video_dir), "--out", str(out), "--no-progress"]
    first = folder.main([*args, "--val-fraction", "0.5"])
    assert set(first["splits"]) == {"train", "val"}
    again = folder.main([*args, "--val-fraction", "0", "--overwrite"])
    assert any(w.startswith("--overwrite kept split(s) 'val' of an earlier command") for w in again["label_warnings"])


def test_files_of_an_extension_not_read_as_video_are_said_to_be_left_out(video_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(video_dir, src)
    (src / "clip.xyz").write_bytes(b"some other container")
    m = folder.main(["--src", str(src), "--out", str(tmp_path / "o"), "--no-progress"])
    said = [w for w in m["label_warnings"] if "left out" in w]
    assert said == [f"1 file(s) under --src with an extension not read as video were left out, e.g. 'clip.xyz' "
                    f"(read: {', '.join(sorted(folder_module.VIDEO_EXTENSIONS))})"]


def test_a_missing_or_file_src_names_what_it_is_and_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--src .*nope does not exist: pass the folder that holds your videos"):
        folder.main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    (tmp_path / "a.mp4").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"--src .*a.mp4 is a file: pass the folder"):
        folder.main(["--src", str(tmp_path / "a.mp4"), "--out", str(tmp_path / "o")])


def decoded_for_writing(path) -> np.ndarray:
    """Every frame as the writer converts them (FFmpeg's RGB), in a list, stacked."""
    import av

    from carl_scale.data.codec import decode_rgb

    with av.open(str(path)) as container:
        return np.stack([decode_rgb(f) for f in container.decode(video=0)])


def test_a_transcoded_file_is_decoded_in_place_every_frame_once_in_order(video_dir):
    """Filled into one array sized by the container's frame count (a list then np.stack held
    every frame twice: a long video's peak)."""
    for name in ("a.mp4", "b.webm", "sub/c.avi"):
        frames, n, fps, *_ = folder_module._decode_file(video_dir / name, None, True)
        ref = decoded_for_writing(video_dir / name)
        assert isinstance(frames, np.ndarray) and n == len(ref) and np.array_equal(frames, ref)


def test_a_video_too_long_to_decode_in_memory_is_skipped_with_the_fix_not_killed(video_dir, tmp_path, monkeypatch):
    """The kernel's kill would stop every rerun at the same video, naming none."""
    monkeypatch.setattr(folder_module, "_available_memory", lambda: 100_000)
    with pytest.raises(ValueError, match="none of its 5 inputs could be written"):
        folder.main(["--src", str(video_dir), "--out", str(tmp_path / "o"), "--payload", "jpeg", "--no-progress"])
    m = read_manifest(tmp_path / "o")
    reasons = {s["source"]: s["reason"] for e in m["splits"].values() for s in e["skipped"]}
    assert {"a.mp4", "b.webm", "sub/c.avi"} <= set(reasons) and not any(e["samples"] for e in m["splits"].values())
    fix = "that while it is stacked and resampled) would take more than half of the memory available: cut it into " \
          "shorter clips, or give a smaller --short-side (fewer --workers leave each more)"
    # 100 kB available: 5 frames of 64x48 fit in half of it; twice a listed count must
    assert re.search(r"decoded, its \d+ frames at 64x48 \(0.0 GiB, up to 2x " + re.escape(fix), reasons["a.mp4"])
    # a WebM lists no frame count: the frames are counted as they are decoded (a list, stacked: 3x)
    assert re.search(r"decoded, its frames at 64x48 \(over 0.0 GiB in 2, up to 3x " + re.escape(fix),
                     reasons["b.webm"])


def test_repeated_timestamps_keep_the_frames_in_decoding_order_at_the_nominal_rate(video_dir, monkeypatch):
    """A median step of 0 between timestamps made the resampled rate 1 / 0: ZeroDivisionError as
    the video's skip reason."""
    monkeypatch.setattr(folder_module, "frame_timing", lambda pts: (0.0, True))
    frames, n, fps, _, picks, _ = folder_module._decode_file(video_dir / "a.mp4", None, True)
    ref = decoded_for_writing(video_dir / "a.mp4")
    assert picks is None and n == len(ref) and np.array_equal(frames, ref) and fps == render_video(CFG, "train", 0).fps
    with pytest.raises(folder_module.SkipInput, match="rerun with --transcode"):  # stored as is: still refused
        folder_module._decode_file(video_dir / "a.mp4", None, False)


def test_overwrite_takes_back_the_codec_and_class_names_the_replaced_splits_had_put_in_the_manifest(video_dir,
                                                                                                  tmp_path):
    """They were unioned with the old top-level values: stored originals (h264 + vp9 + mjpeg,
    "mixed") rewritten as vp9 stayed "mixed" (PyAV on the CPU where DALI reads vp9, about 2x
    slower), and names from a labels CSV stayed over videos written without one."""
    out = tmp_path / "o"
    args = ["--src", str(video_dir), "--out", str(out), "--no-progress"]
    first = folder.main([*args, "--labels", str(video_dir / "labels.csv")])
    assert first["codec"] == "mixed" and first["label_names"]["actions"] == ["squat", "wave"]
    again = folder.main([*args, "--transcode", "--codec", "vp9", "--val-fraction", "0.3", "--overwrite"])
    assert again["codec"] == "vp9" and "label_names" not in again
    assert {s: e["codecs"] for s, e in again["splits"].items()} == {"train": ["vp9"], "val": ["vp9"]}


def test_a_file_stored_as_is_over_the_tar_formats_member_size_is_skipped_before_it_is_read(video_dir, tmp_path,
                                                                                          monkeypatch):
    """Checked on the file's size: read whole first (to be refused by the writer), a file of 8 GiB
    could get the write killed for memory."""
    monkeypatch.setattr(folder_module, "TAR_MEMBER_MAX", 1)  # (bytes: every file is over it)
    monkeypatch.setattr(folder_module, "_decode_file", lambda *a: pytest.fail("decoded a file it should refuse"))
    with pytest.raises(ValueError, match="none of its 5 inputs could be written"):
        folder.main(["--src", str(video_dir), "--out", str(tmp_path / "o"), "--no-progress"])
    reasons = {s["source"]: s["reason"] for e in read_manifest(tmp_path / "o")["splits"].values()
               for s in e["skipped"]}
    assert "GiB, over the tar format's 0 GiB a member: store it smaller (--transcode, --short-side)" in reasons["a.mp4"]
