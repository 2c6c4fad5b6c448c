"""FineGym -> shards from files shaped like the official annotations, then the FineGym protocol
(linear probes on Gym99 and Gym288 from one shard set) end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from carl_scale.datasets.encode import EncodeOptions, encode_video
from carl_scale.data.decoders import PyAVDecoder
from carl_scale.datasets.finegym import decode_span
from carl_scale.data.whole_video import iter_whole_videos
from carl_scale.eval.embed import VideoEmbeddings
from carl_scale.eval.transfer import transfer_eval
from carl_scale.models import build_model, model_config
from shards import finegym

A, B, V = "a_b-cdEfgh1", "Bclip000002", "valvideo001"  # YouTube ids (they may hold '_' and 'E')


def _numbered(n: int) -> np.ndarray:
    """Flat frames whose colour spells their index, robust to lossy coding: which source frame an
    output frame shows is readable with :func:`_index`."""
    i = np.arange(n)
    rgb = np.stack([(i % 25) * 10, (i // 25) * 30, np.zeros(n)], axis=1).astype(np.uint8)
    return np.broadcast_to(rgb[:, None, None, :], (n, 48, 64, 3)).copy()


def _index(frames: np.ndarray) -> np.ndarray:
    px = frames[:, 24, 32].astype(float)
    return np.round(px[:, 0] / 10).astype(int) + 25 * np.round(px[:, 1] / 30).astype(int)


def _seg(*stages):
    return {"stages": len(stages), "timestamps": [list(s) for s in stages]}


@pytest.fixture(scope="module")
def finegym_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("finegym")
    videos, ann = root / "videos", root / "annotations"
    (videos / "nested").mkdir(parents=True)
    ann.mkdir()
    mjpeg = EncodeOptions(codec="mjpeg")
    # a whole 20 s "YouTube video" (webm: the cut seeks, as in real ones)
    (videos / f"{A}.webm").write_bytes(encode_video(_numbered(200), 10.0, EncodeOptions(codec="vp9", gop=30)))
    (videos / "nested" / f"{B}_E_000100_000104.avi").write_bytes(encode_video(_numbered(40), 10.0, mjpeg))  # an event clip
    (videos / f"{V}.avi").write_bytes(encode_video(_numbered(100), 10.0, mjpeg))
    info = {
        A: {"E_000002_000008": {"event": 2, "timestamps": [[2.5, 8.5]],
                                "segments": {"A_0001_0002": _seg((1.0, 2.0)), "A_0003_0005": _seg((3.2, 5.0))}},
            "E_000010_000016": {"event": 1, "timestamps": [[10.0, 16.0]],  # vault: three stages
                                "segments": {"A_0000_0004": _seg((0.2, 1.0), (1.0, 2.0), (2.0, 4.0))}}},
        B: {"E_000100_000104": {"event": 3, "timestamps": [[100.0, 104.0]], "segments": {"A_0001_0003": _seg((1.0, 3.0))}}},
        V: {"E_000001_000007": {"event": 2, "timestamps": [[1.0, 7.0]],
                                "segments": {"A_0000_0002": _seg((0.5, 2.0)), "A_0003_0005": _seg((3.0, 5.0))}}},
        "missingvid1": {"E_000001_000003": {"event": 4, "timestamps": [[1.0, 3.0]], "segments": {"A_0000_0001": _seg((0, 1))}}},
        "men00000001": {"E_000001_000003": {"event": 7, "timestamps": [[1.0, 3.0]], "segments": None}},
    }
    (ann / "finegym_annotation_info_v1.1.json").write_text(json.dumps(info))
    lines = {
        "gym99_train_element_v1.1.txt": [f"{A}_E_000002_000008_A_0001_0002 5", f"{A}_E_000002_000008_A_0003_0005 7",
                                         f"{A}_E_000010_000016_A_0000_0004 1", "missingvid1_E_000001_000003_A_0000_0001 2"],
        "gym288_train_element_v1.1.txt": [f"{A}_E_000002_000008_A_0001_0002 50", f"{B}_E_000100_000104_A_0001_0003 200"],
        "gym99_val_element.txt": [f"{V}_E_000001_000007_A_0000_0002 5", f"{V}_E_000001_000007_A_0003_0005 7"],
        "gym288_val_element.txt": [f"{V}_E_000001_000007_A_0000_0002 50", f"{V}_E_000001_000007_A_0003_0005 70"],
    }
    for name, ls in lines.items():
        (ann / name).write_text("\n".join(ls) + "\n")
    return root


@pytest.fixture(scope="module")
def finegym_shards(finegym_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("finegym_shards")
    finegym.main(["--videos", str(finegym_raw / "videos"), "--annotations", str(finegym_raw / "annotations"),
                  "--out", str(out), "--fps", "5", "--short-side", "0", "--codec", "mjpeg", "--no-progress"])
    return out


@pytest.mark.parametrize("codec,ext", [("h264", "mp4"), ("vp9", "webm")])
def test_decode_span_keeps_every_frame_once_at_the_source_rate(codec, ext, tmp_path):
    path = tmp_path / f"v.{ext}"
    path.write_bytes(encode_video(_numbered(200), 25.0, EncodeOptions(codec=codec, gop=25)))
    for start in (1.0, 1.16, 4.12):  # t0 + k/fps lands on frame times up to float error
        frames = decode_span(path, start, start + 2.0, 25.0, None)
        first = round(start * 25)
        assert _index(frames).tolist() == list(range(first, first + 50))
    whole = decode_span(path, None, None, 25.0, None)
    assert _index(whole).tolist() == list(range(200))
    assert _index(decode_span(path, 7.0, 9.0, 25.0, None)).tolist() == list(range(175, 200))  # ends with the video


def test_events_are_cut_resampled_and_labelled_with_both_class_sets(finegym_shards):
    m = json.loads((finegym_shards / "shards.json").read_text())
    train = m["splits"]["train"]
    assert train["samples"] == 3 and [s["source"] for s in train["skipped"]] == ["missingvid1_E_000001_000003"]
    got = {meta["video_id"]: (meta, f) for meta, f in iter_whole_videos(finegym_shards, PyAVDecoder(), "train")}
    meta, frames = got[f"{A}_E_000002_000008"]
    # 6 s at 5 fps, cut out of the 10 fps video from 2.5 s: output frame k shows source frame 25 + 2k
    assert len(frames) == 30 and meta["action_label"] == 1 and meta["fps"] == 5.0
    assert _index(frames).tolist() == (25 + 2 * np.arange(30)).tolist()
    gym99, gym288 = np.full(30, -1), np.full(30, -1)
    gym99[5:11], gym99[16:26], gym288[5:11] = 5, 7, 50  # frames int(s*fps) .. int(e*fps), ends included
    assert meta["phase_labels"] == gym99.tolist() and meta["frame_labels"]["gym288"] == gym288.tolist()
    vault = got[f"{A}_E_000010_000016"][0]
    assert vault["action_label"] == 0 and np.flatnonzero(np.array(vault["phase_labels"]) == 1).tolist() == list(range(10, 21))
    clip_meta, clip = got[f"{B}_E_000100_000104"]  # an event clip: time 0 is the event's start
    assert len(clip) == 20 and _index(clip).tolist() == (2 * np.arange(20)).tolist()
    assert set(clip_meta["phase_labels"]) == {-1}  # labelled in Gym288 only
    assert np.flatnonzero(np.array(clip_meta["frame_labels"]["gym288"]) == 200).tolist() == list(range(5, 16))


def test_finegym_protocol_probes_gym99_and_gym288(finegym_shards, tmp_path):
    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, train_frames=8)).eval()
    res = transfer_eval("finegym", {"random_init": model}, shards=str(finegym_shards), out_dir=tmp_path)
    mean = res["results"]["random_init"]["mean"]
    keys = [c + s for c in ("FineGym99", "FineGym288") for s in ("@0.1", "@0.5", "")]  # Table 14's fractions
    assert set(mean) == {*keys, *(k + " mean class" for k in keys)}
    md = (tmp_path / "finegym" / "results.md").read_text()
    assert "(Table 5)" in md and "(Table 14)" in md and "Tables 1 and 6" not in md
    # the full sets score; a subset takes at least 10 videos (the published probe's one batch), all 3
    # here; NaN only where a subset has no labelled frame of a set
    assert all(0.0 <= v <= 1.0 or (np.isnan(v) and "@" in k) for k, v in mean.items())
    assert all(0.0 <= mean[k] <= 1.0 for k in ("FineGym99", "FineGym288"))
    assert "| random_init |" in (tmp_path / "finegym" / "results.md").read_text()
    val = VideoEmbeddings.load(tmp_path / "finegym" / "random_init_val.npz")  # both label sets saved
    expected = np.full(30, -1)
    expected[2:11], expected[15:26] = 50, 70
    assert val.labels("gym288")[0].tolist() == expected.tolist() and val.labels("phase")[0].max() == 7
    with pytest.raises(ValueError, match="--extra-frame-labels gym999"):
        val.labels("gym999")


def test_missing_annotations_name_the_file_and_where_to_get_it(finegym_raw, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"finegym_annotation_info_v1.0.json is missing.*sdolivia"):
        finegym.main(["--videos", str(finegym_raw / "videos"), "--annotations", str(finegym_raw / "annotations"),
                      "--out", str(tmp_path / "o"), "--version", "v1.0"])
    bad = tmp_path / "ann"
    bad.mkdir()
    for f in (finegym_raw / "annotations").iterdir():
        (bad / f.name).write_text(f.read_text())
    (bad / "gym99_val_element.txt").write_text("not_an_element_id 3\n")
    with pytest.raises(ValueError, match="gym99_val_element.txt:1"):
        finegym.main(["--videos", str(finegym_raw / "videos"), "--annotations", str(bad), "--out", str(tmp_path / "p")])


def test_each_probe_trains_on_its_own_class_sets_events(monkeypatch):
    """One shard set holds the events of both class sets' lists; the published code prepares one
    dataset per set. Each probe trains on the events its set labels (the other set's are all -1)."""
    import carl_scale.eval.transfer as transfer
    from carl_scale.eval.embed import VideoEmbeddings

    rng = np.random.default_rng(0)
    n = 14
    gym99 = [np.full(5, -1) if i < 3 else rng.integers(0, 4, 5) for i in range(n)]  # 3 events only gym288 lists
    gym288 = [rng.integers(0, 6, 5) for _ in range(n)]
    ve = VideoEmbeddings([f"v{i}" for i in range(n)], [rng.normal(size=(5, 8)) for _ in range(n)], gym99,
                         np.full(n, -1), {"gym288": gym288})
    seen = []
    monkeypatch.setattr(transfer, "linear_probe_frame_classification",
                        lambda tr, lab, *a, **k: seen.append(len(tr)) or classes.append(k["num_classes"])
                        or {"accuracy": 0.5, "mean_class_accuracy": 0.5})
    classes = []
    transfer.run_protocol(ve, ve, transfer.PROTOCOLS["finegym"])
    fractions = len(transfer.PROTOCOLS["finegym"].fractions)
    assert seen[:fractions] == [10, 10, 11][:fractions] and max(seen[:fractions]) == 11  # Gym99: its 11 events
    assert max(seen[fractions:]) == 14  # Gym288 labels every event here
    assert classes == [99] * fractions + [288] * fractions  # the layer's outputs: the set's, not the data's largest


def test_an_element_list_line_with_a_bad_class_names_the_file_and_line(tmp_path):
    from carl_scale.datasets.finegym import read_element_labels

    good = "abcdefghijk_E_000001_000002_A_0001_0002"
    for text in (f"{good} x1\n", f"{good} 120\n"):
        (tmp_path / "gym99_val_element.txt").write_text(f"{good} 3\n{text}")
        with pytest.raises(ValueError, match=r"gym99_val_element.txt:2: .* with a class in 0..98"):
            read_element_labels(tmp_path / "gym99_val_element.txt")
    (tmp_path / "gym288_val_element.txt").write_text(f"{good} 120\n")
    assert read_element_labels(tmp_path / "gym288_val_element.txt") == {("abcdefghijk", "E_000001_000002",
                                                                          "A_0001_0002"): 120}


def test_two_files_of_one_video_id_are_said_to_be_and_the_first_is_used(tmp_path, caplog):
    import logging

    from carl_scale.datasets.finegym import _find_videos

    for name in ("abc.mp4", "sub/abc.mkv", "other.webm"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        found = _find_videos(tmp_path)
    assert found == {"abc": tmp_path / "abc.mp4", "other": tmp_path / "other.webm"}
    assert any("are both video 'abc'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kw, said", [({"fps": 0.0}, "--fps must be a finite number > 0, got 0.0"),
                                      ({"short_side": 8}, "--short-side must be >= 16"),
                                      ({"limit": -1}, "--limit must be >= 1, got -1")])
def test_bad_options_are_refused_before_anything_is_written(kw, said):
    """As the other converters' options: --limit -1 dropped an event (a slice [:-1]), fps 0 failed
    every event with a bare ZeroDivisionError as its skip reason, and --short-side 8 wrote hours of
    events no model takes."""
    from carl_scale.datasets.finegym import FineGymOptions

    with pytest.raises(ValueError, match=said.replace("(", r"\(")):
        FineGymOptions(**kw)


def test_the_command_line_refuses_a_short_side_no_model_takes_and_keeps_0_as_the_source_size(tmp_path, capsys):
    with pytest.raises(ValueError, match="--short-side must be >= 16, got 8"):
        finegym.main(["--videos", str(tmp_path), "--annotations", str(tmp_path), "--out", str(tmp_path / "o"),
                      "--short-side", "8"])
    assert not (tmp_path / "o").exists()
