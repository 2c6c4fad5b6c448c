"""The published CARL code's dataset folders (pickled video lists next to the videos) into shards:
`python -m shards.carl`, on real encoded videos, and pickles that would run code refused."""

from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from carl_scale.data.config import SyntheticConfig
from carl_scale.data.decoders import PyAVDecoder
from carl_scale.data.whole_video import iter_whole_videos
from carl_scale.datasets.encode import EncodeOptions, encode_video
from carl_scale.datasets.safe_pickle import UnsafePickleError, load_data_pickle
from carl_scale.datasets.synthetic import render_video
from shards import carl

CFG = SyntheticConfig(num_actions=2, train_videos=4, val_videos=2, min_frames=24, max_frames=40, height=48, width=64)


def _video(split: str, i: int, folder, sub: str, name: str):
    v = render_video(CFG, split, i)
    (folder / sub).mkdir(exist_ok=True)
    (folder / sub / f"{name}.mp4").write_bytes(encode_video(v.frames, 25.0, EncodeOptions(codec="h264")))
    return v


@pytest.fixture(scope="module")
def penn(tmp_path_factory):
    """A PennAction folder as the published preparation writes it: (videos, action_to_indices)
    per split, frame labels as torch tensors, H.264 .mp4 files under videos/."""
    root = tmp_path_factory.mktemp("penn_action")
    truth = {}
    for split, n in (("train", 3), ("val", 2)):
        videos, by_action = [], [[] for _ in range(13)]
        for i in range(n):
            action = [0, 7, 12][i % 3]
            name = f"{split[:1]}{i:03d}_{['baseball_pitch', 'pushup', 'tennis_serve'][i % 3]}"
            v = _video(split, i, root, "videos", name)
            labels = v.phase_labels[:-1] if i == 1 else v.phase_labels  # one frame short: fitted, not skipped
            videos.append({"id": i, "name": name, "video_file": f"videos/{name}.mp4",
                           "frame_label": torch.from_numpy(labels.copy()), "seq_len": len(labels),
                           **({"action_label": action} if split == "train" else {})})
            by_action[action].append(i)
            truth[name] = (action, v.phase_labels, i == 1)
        videos.append({"id": 99, "name": "gone", "video_file": "videos/gone.mp4",
                       "frame_label": torch.zeros(5, dtype=torch.long), "seq_len": 5})
        with open(root / f"{split}.pkl", "wb") as f:
            pickle.dump((videos, by_action), f)
    return root, truth


def test_pennaction_folder_reads_back_with_its_labels(penn, tmp_path):
    root, truth = penn
    out = tmp_path / "shards"
    m = carl.main(["--src", str(root), "--out", str(out), "--no-progress"])
    assert m["dataset"] == "pennaction" and m["label_names"]["actions"][12] == "tennis_serve"
    for split, n in (("train", 3), ("val", 2)):
        s = m["splits"][split]
        assert s["samples"] == n
        assert [k["source"] for k in s["skipped"]] == [f"{split}.pkl[{n}]"]  # the missing video: counted
        assert "gone.mp4 not found" in s["skipped"][0]["reason"]
        got = {meta["video_id"]: (meta, frames) for meta, frames in iter_whole_videos(out, PyAVDecoder(), split)}
        assert len(got) == n
        for vid, (meta, frames) in got.items():
            action, phases, short = truth[vid]
            # val.pkl has no action_label: action_to_indices says it
            assert meta["action_label"] == action and meta["codec"] == "h264"
            want = np.concatenate([phases[:-1], [-1]]) if short else phases
            assert np.array_equal(meta["phase_labels"], want) and len(frames) == len(phases)
            assert ("label_lengths_fitted" in meta) == short


def test_finegym_lists_join_gym99_and_gym288_by_event(tmp_path, caplog):
    root = tmp_path / "finegym"
    root.mkdir()
    lists = {"gym99_train_v1.0.pkl": [], "gym288_train_v1.0.pkl": [], "gym99_val.pkl": [], "additional_v1.0.pkl": []}
    for i in range(2):
        name = f"yt{i}_E_000010_000020"
        v = _video("train", i, root, "processed_videos", name)
        lab = torch.from_numpy(np.where(v.phase_labels >= 0, v.phase_labels, -1)).float()  # float, as published
        item = {"id": i, "name": name, "video_file": f"processed_videos/{name}.mp4", "seq_len": len(lab),
                "event_label": 4}
        lists["gym99_train_v1.0.pkl"].append({**item, "frame_label": lab})
        if i == 0:
            lists["gym288_train_v1.0.pkl"].append({**item, "frame_label": lab + 100 * (lab >= 0)})
    name = "yt9_E_000001_000002"
    v = _video("val", 0, root, "processed_videos", name)
    lists["gym99_val.pkl"].append({"id": 0, "name": name, "video_file": f"processed_videos/{name}.mp4",
                                   "seq_len": len(v.phase_labels), "event_label": 1,
                                   "frame_label": torch.from_numpy(v.phase_labels).float()})
    name = "yt8_E_000003_000004"  # the additional list (no Gym288 list, by design)
    v = _video("train", 5, root, "processed_videos", name)
    lists["additional_v1.0.pkl"].append({"id": 0, "name": name, "video_file": f"processed_videos/{name}.mp4",
                                         "seq_len": len(v.phase_labels), "event_label": 1,
                                         "frame_label": torch.from_numpy(v.phase_labels).float()})
    # the same event named again in one list, other labels: the first item is kept whole (its labels
    # never replace the first's beside the first's video)
    first = lists["gym99_train_v1.0.pkl"][0]
    lists["gym99_train_v1.0.pkl"].append({**first, "frame_label": torch.zeros_like(first["frame_label"])})
    for fname, data in lists.items():
        with open(root / fname, "wb") as f:
            pickle.dump(data, f)
    out = tmp_path / "shards"
    m = carl.main(["--src", str(root), "--out", str(out), "--no-progress"])
    assert m["dataset"] == "finegym" and m["splits"]["train"]["samples"] == 2 and m["splits"]["val"]["samples"] == 1
    assert m["video_order"] == "published"  # (each list's own order: the evaluation's first 10% are the paper's)
    # the probe's splits lacking Gym288 are said; the "additional" list, which never has one, is not
    assert "Gym288 lists for train only, not val:" in caplog.text and "additional" not in caplog.text
    got = {meta["video_id"]: meta for meta, _ in iter_whole_videos(out, PyAVDecoder(), "train")}
    a, b = got["yt0_E_000010_000020"], got["yt1_E_000010_000020"]
    assert a["action_label"] == 3  # event_label 4 (UB) -> 3
    pa = np.asarray(a["phase_labels"])
    assert np.array_equal(np.asarray(a["frame_labels"]["gym288"]), np.where(pa >= 0, pa + 100, -1))
    assert set(np.asarray(b["frame_labels"]["gym288"]).tolist()) == {-1}  # not in the gym288 list
    # the val split has no Gym288 list: its videos carry no such set (never an all-unlabelled one)
    (val,) = [meta for meta, _ in iter_whole_videos(out, PyAVDecoder(), "val")]
    assert "gym288" not in (val.get("frame_labels") or {})


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run > pwned.txt",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "train.pkl", "wb") as f:
        pickle.dump(([{"id": 0, "name": "x", "video_file": "videos/x.mp4", "frame_label": _RunsCode()}], [[0]]), f)
    with pytest.raises(UnsafePickleError, match=r"posix.system|os.system"):
        load_data_pickle(tmp_path / "evil" / "train.pkl")
    from carl_scale.errors import run_cli

    with pytest.raises(SystemExit) as exit_:
        run_cli("shards.carl", carl.main, ["--src", str(tmp_path / "evil"), "--out", str(tmp_path / "out"),
                                           "--no-progress"])
    assert "refused" in str(exit_.value) and "system" in str(exit_.value)
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "out").exists()


def test_data_pickles_keep_numpy_tensors_and_plain_containers(tmp_path):
    data = {"a": np.arange(4, dtype=np.int16), "t": torch.tensor([1.5, -1.0]), "s": {1, 2}, "n": np.float32(2.5),
            "nested": [("x", b"bytes", None, 3.0)]}
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        (tmp_path / "d.pkl").write_bytes(pickle.dumps(data, protocol=proto))
        got = load_data_pickle(tmp_path / "d.pkl")
        assert got["a"].dtype == np.int16 and np.array_equal(got["a"], data["a"])
        assert torch.equal(got["t"], data["t"]) and got["s"] == {1, 2} and got["nested"] == data["nested"]
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps(data)[:20])
    with pytest.raises(ValueError, match="cannot be read as a pickle"):
        load_data_pickle(tmp_path / "cut.pkl")


def test_pouring_folder_is_recognised_and_written(tmp_path):
    root = tmp_path / "pouring"
    root.mkdir()
    for split in ("train", "val"):
        v = _video(split, 0, root, "videos", f"{split}_0")
        with open(root / f"{split}.pkl", "wb") as f:
            pickle.dump([{"id": 0, "name": f"{split}_0", "video_file": f"videos/{split}_0.mp4",
                          "frame_label": torch.from_numpy(v.phase_labels), "seq_len": len(v.phase_labels)}], f)
    out = tmp_path / "shards"
    m = carl.main(["--src", str(root), "--out", str(out), "--no-progress"])
    assert m["dataset"] == "pouring" and {s: m["splits"][s]["samples"] for s in m["splits"]} == {"train": 1, "val": 1}
    (meta, frames), = list(iter_whole_videos(out, PyAVDecoder(), "val"))
    assert meta["video_id"] == "val_0" and meta["action_label"] == -1
    assert np.array_equal(meta["phase_labels"], render_video(CFG, "val", 0).phase_labels)


def test_list_entries_outside_the_folder_and_two_versions_of_a_list(tmp_path):
    root = tmp_path / "pouring"
    root.mkdir()
    (tmp_path / "secret.mp4").write_bytes(b"not for us")
    with open(root / "train.pkl", "wb") as f:
        pickle.dump([{"name": "x", "video_file": "../secret.mp4", "frame_label": np.zeros(3), "seq_len": 3},
                     {"name": "y", "video_file": "/etc/hostname", "frame_label": np.zeros(3), "seq_len": 3}], f)
    with pytest.raises(ValueError, match="none of its 2 inputs could be written .* is outside"):
        carl.main(["--src", str(root), "--out", str(tmp_path / "out"), "--no-progress"])
    m = json.loads((tmp_path / "out/shards.json").read_text())
    reasons = [s["reason"] for s in m["splits"]["train"]["skipped"]]
    assert len(reasons) == 2 and all("is outside" in r for r in reasons)
    # --src . (the folder given relatively): ../ is still outside it
    import os

    here = os.getcwd()
    os.chdir(root)
    try:
        with pytest.raises(ValueError, match="none of its 2 inputs could be written .* is outside"):
            carl.main(["--src", ".", "--out", str(tmp_path / "out_here"), "--no-progress"])
    finally:
        os.chdir(here)
    # an entry whose label is no class index: that video skipped with the reason, not the list
    with open(root / "train.pkl", "wb") as f:
        pickle.dump([{"name": "x", "video_file": "x.mp4", "frame_label": np.zeros(3), "action_label": None}], f)
    with pytest.raises(ValueError, match=r"none of its 1 inputs could be written .*action_label None is not a class"):
        carl.main(["--src", str(root), "--out", str(tmp_path / "out3"), "--no-progress"])
    penn = tmp_path / "penn"
    penn.mkdir()
    (penn / "train.pkl").write_bytes(pickle.dumps(([{"id": 0, "video_file": "a.mp4", "frame_label": np.zeros(2)}],
                                                    [[0], 5])))
    with pytest.raises(ValueError, match=r"train.pkl: its action_to_indices .* is not a list of id lists"):
        carl.main(["--src", str(penn), "--out", str(tmp_path / "out4"), "--no-progress"])
    gym = tmp_path / "gym"
    gym.mkdir()
    (gym / "readme.txt").write_text("no lists here")
    with pytest.raises(FileNotFoundError, match="holds no finegym lists"):
        carl.main(["--src", str(gym), "--dataset", "finegym", "--out", str(tmp_path / "out2"), "--no-progress"])
    for name in ("gym99_train_v1.0.pkl", "gym99_train_v1.1.pkl"):
        (gym / name).write_bytes(pickle.dumps([]))
    with pytest.raises(ValueError, match="two train lists of gym99"):
        carl.main(["--src", str(gym), "--out", str(tmp_path / "out2"), "--no-progress"])


class _Reduces:
    """Pickles as ``callable(*args)`` with an optional BUILD ``state``: how a crafted file looks."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def test_a_pickle_cannot_read_bytes_as_objects_or_change_what_later_loads_return(tmp_path):
    """Three crafted files the data-only reader once accepted: ``numpy.ndarray((), object, bytes)``
    (the bytes read as an object's address: a segfault on first use), a dtype whose pickled flags
    deny its object field (then raw bytes through ``_frombuffer``), and BUILD on one of the
    functions it hands out (a ``__defaults__`` that negated every tensor torch loaded after it).
    Each is refused; object arrays pickled as lists of their items still load."""
    import struct

    def dump(name, obj=None, raw=None):
        path = tmp_path / name
        path.write_bytes(raw if raw is not None else pickle.dumps(obj, protocol=2))
        return path

    with pytest.raises(UnsafePickleError, match="numpy.ndarray called directly"):
        load_data_pickle(dump("a.pkl", [_Reduces(np.ndarray, ((), np.dtype("O"), b"A" * 8))]))
    state = (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)  # flags 0: "no objects here"
    with pytest.raises(UnsafePickleError, match="dtype with objects inside a structure"):
        load_data_pickle(dump("b.pkl", _Reduces(np.dtype, ("V8", False, True), state)))
    with pytest.raises(UnsafePickleError, match=r"m.pkl: numpy.dtype\('M8'\): only plain type codes"):
        load_data_pickle(dump("m.pkl", np.array(["2020-01-01"], dtype="M8[s]")))  # (its BUILD crashes NumPy)
    with pytest.raises(UnsafePickleError, match="only empty arrays are made before their data"):
        load_data_pickle(dump("big.pkl", _Reduces(np.ndarray.__reduce__(np.zeros(0))[0], (np.ndarray, (2**32,), b"O"))))
    with pytest.raises(UnsafePickleError, match="bytearray of anything but bytes"):
        load_data_pickle(dump("fill.pkl", _Reduces(bytearray, (2**33,))))  # 8 GiB from 33 bytes

    def text(s: str) -> bytes:
        return b"X" + struct.pack("<I", len(s)) + s.encode()

    # GLOBAL f; (None, {"__defaults__": ({"neg": True},)}); BUILD
    defaults = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}" + text("__defaults__") + b"(}" + text("neg")
                + b"\x88sts\x86b.")
    with pytest.raises(UnsafePickleError, match="sets the state of a function: refused"):
        load_data_pickle(dump("c.pkl", raw=defaults))
    ones = tmp_path / "ones.pt"
    torch.save(torch.ones(3), ones)
    assert torch.equal(torch.load(ones, weights_only=True), torch.ones(3))  # later loads unchanged
    # _rebuild_tensor_v2(None, 0, (), (), False, OrderedDict({0: set})): hooks are callables
    hooks = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(NK\x00))\x89ccollections\nOrderedDict\n)R"
             b"K\x00cbuiltins\nset\nstR.")
    with pytest.raises(UnsafePickleError, match="backward hooks"):
        load_data_pickle(dump("d.pkl", raw=hooks))
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    with pytest.raises(UnsafePickleError, match="whose state is not a NumPy array's"):  # NumPy reads past the list
        load_data_pickle(dump("short.pkl", _Reduces(reconstruct, (np.ndarray, (0,), b"b"),
                                                    (1, (1000,), np.dtype("O"), False, [7]))))
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    with pytest.raises(UnsafePickleError, match="an array viewing a ndarray: refused"):  # its object pointers
        load_data_pickle(dump("view.pkl", _Reduces(frombuffer, (np.array(["x", None], dtype=object), np.dtype("u1"),
                                                                (16,), "C"))))
    scalar = np.float64(0).__reduce__()[0]
    with pytest.raises(UnsafePickleError, match="a NumPy scalar of float64 from NoneType data"):
        load_data_pickle(dump("scalar.pkl", _Reduces(scalar, (np.dtype("f8"),))))
    with pytest.raises(UnsafePickleError, match=r"size \(2000,\), stride \(1,\) at 0 beyond its storage"):
        load_data_pickle(dump("grow.pkl", _Reduces(torch._utils._rebuild_tensor_v2,
                                                   (torch.storage.TypedStorage(wrap_storage=torch.ones(4).untyped_storage(),
                                                                               dtype=torch.float32, _internal=True),
                                                    0, (2000,), (1,), False, OrderedDict()))))
    things = np.array(["a", None, 3], dtype=object)
    got = load_data_pickle(dump("e.pkl", {"o": things, "f": np.arange(3.0)}))
    assert list(got["o"]) == ["a", None, 3] and np.array_equal(got["f"], np.arange(3.0))
    # dtypes are made anew from their pickled state, never changed in place: one dtype shared by
    # two arrays (the second a memo reference), byte orders, structures, sub-arrays, strings
    values = [np.arange(2, dtype=">i4"), np.arange(3, dtype=">i4"), np.array([(1, 2.5)], dtype=[("a", "<i8"), ("b", ">f4")]),
              np.zeros(2, dtype=("<f8", (3,))), np.array(["ab", "c"]), np.array([b"x"]), np.float32(2.5)]
    for proto in (2, 5):
        got = load_data_pickle(dump(f"v{proto}.pkl", raw=pickle.dumps(values, protocol=proto)))
        for a, b in zip(got, pickle.loads(pickle.dumps(values, protocol=proto))):  # as pickle itself loads them
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (a, b)
    assert np.dtype("f8").str == "<f8" and np.dtype("i4").byteorder == "="  # NumPy's own dtypes untouched
