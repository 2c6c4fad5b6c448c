"""`carl-scale embed` / `carl-scale align` on plain video files and on shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from carl_scale.cli import main
from carl_scale.config import to_dict
from carl_scale.datasets.encode import EncodeOptions, encode_video
from carl_scale.data.config import SyntheticConfig
from carl_scale.datasets.synthetic import render_video
from carl_scale.models import load_model
from carl_scale.models import build_model, model_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint directory laid out as the trainer writes it (DeepSpeed model states + meta)."""
    path = tmp_path_factory.mktemp("run") / "checkpoints/step_000001"
    path.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, train_frames=8))
    torch.save({"module": {f"model.{k}": v for k, v in model.state_dict().items()}},
               path / "mp_rank_00_model_states.pt")
    (path / "meta.json").write_text(json.dumps({"step": 1, "config": {"model": to_dict(model.cfg)}}))
    (path.parent / "latest").write_text("step_000001")
    return path, model


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("videos")
    cfg = SyntheticConfig(height=48, width=48, min_frames=30, max_frames=60)
    paths = []
    for i in range(2):
        p = out / f"clip{i}.webm"
        p.write_bytes(encode_video(render_video(cfg, "val", i).frames, 30.0, EncodeOptions(codec="vp9")))
        paths.append(p)
    return paths


def test_checkpoint_round_trip(checkpoint):
    path, model = checkpoint
    loaded = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_checkpoint_from_another_architecture_says_so(checkpoint, tmp_path):
    path, model = checkpoint
    old = tmp_path / "step_000001"
    old.mkdir()
    state = torch.load(path / "mp_rank_00_model_states.pt", weights_only=True)
    state["module"] = {k: v for k, v in state["module"].items() if "backbone" not in k}  # another backbone's keys
    state["module"]["model.backbone.conv_old.weight"] = torch.zeros(3)
    torch.save(state, old / "mp_rank_00_model_states.pt")
    (old / "meta.json").write_text((path / "meta.json").read_text())
    n_missing = sum(k.startswith("backbone.") for k in model.state_dict())
    with pytest.raises(ValueError, match=rf"{n_missing} missing, 1 unexpected.*older carl_scale.*Retrain it"):
        load_model(old)


def test_plain_videos_are_downscaled_while_decoding(videos):
    from carl_scale.cli import read_video

    full, small = read_video(str(videos[0])), read_video(str(videos[0]), short_side=24)
    assert full.shape[1:] == (48, 48, 3) and small.shape == (len(full), 24, 24, 3)


def test_embed_files_and_shards(checkpoint, videos, vp9_shards, tmp_path, capsys):
    import json

    path, _ = checkpoint
    main(["embed", *map(str, videos), "--checkpoint", str(path), "--out", str(tmp_path), "--device", "cpu"])
    emb = np.load(tmp_path / "clip0.npy")
    assert emb.shape[1] == 64 and 30 <= emb.shape[0] <= 60
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert json.loads((tmp_path / "clip0.json").read_text())["checkpoint"] == str(path.resolve())
    # a rerun keeps what the same checkpoint embedded; another checkpoint's files need --overwrite
    stamp = (tmp_path / "clip0.npy").stat().st_mtime_ns
    main(["embed", *map(str, videos), "--checkpoint", str(path), "--out", str(tmp_path)])
    assert "kept (same video and checkpoint)" in capsys.readouterr().out
    assert (tmp_path / "clip0.npy").stat().st_mtime_ns == stamp
    record = json.loads((tmp_path / "clip0.json").read_text())
    (tmp_path / "clip0.json").write_text(json.dumps({**record, "checkpoint": "another/step_000009"}))
    with pytest.raises(FileExistsError, match=r"clip0.npy holds embeddings of another checkpoint.*--overwrite"):
        main(["embed", str(videos[0]), "--checkpoint", str(path), "--out", str(tmp_path)])
    main(["embed", str(videos[0]), "--checkpoint", str(path), "--out", str(tmp_path), "--overwrite"])
    assert json.loads((tmp_path / "clip0.json").read_text()) == record
    assert (tmp_path / "clip0.npy").stat().st_mtime_ns != stamp  # embedded again, not only its record
    # made by an earlier evaluation view (a record without this format): embedded again, no --overwrite needed
    (tmp_path / "clip0.json").write_text(json.dumps({k: v for k, v in record.items() if k != "format"}))
    stamp = (tmp_path / "clip0.npy").stat().st_mtime_ns
    main(["embed", str(videos[0]), "--checkpoint", str(path), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "clip0.json").read_text()) == record
    assert (tmp_path / "clip0.npy").stat().st_mtime_ns != stamp
    main(["embed", "--shards", str(vp9_shards), "--run-dir", str(path.parents[1]), "--out", str(tmp_path)])
    assert (tmp_path / "val.npz").exists()


def test_align_writes_a_picture_and_missing_files_are_named(checkpoint, videos, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "a.png"
    main(["align", str(videos[0]), str(videos[1]), "--checkpoint", str(path), "--out", str(out)])
    assert Image.open(out).size[0] > 500
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        main(["align", str(videos[0]), "nope.mp4", "--checkpoint", str(path), "--out", str(out)])
    # a folder (or a name without a format) gets the picture inside, where the printed line says
    main(["align", str(videos[0]), str(videos[1]), "--checkpoint", str(path), "--out", str(tmp_path / "pics")])
    assert (tmp_path / "pics/alignment.png").exists() and not (tmp_path / "pics.png").exists()
    with pytest.raises(ValueError, match=r"--out .*a.txt: a picture's name ends in .png"):
        main(["align", str(videos[0]), str(videos[1]), "--checkpoint", str(path), "--out", str(tmp_path / "a.txt")])


def test_embed_checks_every_input_before_writing_anything(checkpoint, videos, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "embs"
    with pytest.raises(FileNotFoundError, match="video nope.mp4 not found"):
        main(["embed", str(videos[0]), "nope.mp4", "--checkpoint", str(path), "--out", str(out)])
    with pytest.raises(ValueError, match="share a file name"):
        main(["embed", str(videos[0]), str(videos[0]), "--checkpoint", str(path), "--out", str(out)])
    with pytest.raises(FileNotFoundError, match="no shards at nowhere"):
        main(["embed", "--shards", "nowhere", "--checkpoint", str(path), "--out", str(out)])
    with pytest.raises(ValueError, match="--checkpoint is empty"):  # never "" taken for "the newest"
        main(["embed", str(videos[0]), "--checkpoint", "", "--out", str(out)])
    with pytest.raises(SystemExit):  # no abbreviated flags: "--check" is not --checkpoint
        main(["embed", str(videos[0]), "--check", str(path), "--out", str(out)])
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):  # the checkpoint found before any folder
        main(["align", str(videos[0]), str(videos[1]), "--run-dir", str(tmp_path / "none"),
              "--out", str(tmp_path / "figs/a.png")])
    assert not out.exists() and not (tmp_path / "figs").exists()


def test_the_machines_errors_about_a_path_end_in_one_line(capsys):
    """A read-only file system, a full disk, a name too long: the operating system's words and the
    path, exit status 1, no traceback (they are plain OSErrors, without a subclass of their own)."""
    import errno

    from carl_scale.errors import run_cli

    def main_(argv):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run")

    with pytest.raises(SystemExit) as exn:
        run_cli("x", main_, [])
    assert str(exn.value) == ("x: error: Read-only file system: /mnt/ro/run (a path given here: check it, and that "
                              "it may be written)")

    def bug(argv):
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):  # anything else is a bug: its traceback stays
        run_cli("x", bug, [])


def test_ctrl_c_and_a_gpus_out_of_memory_end_in_one_line(capsys):
    """Both ended in a traceback: Ctrl-C is a person's choice (exit 130, as a shell gives it), and
    running out of GPU memory the commonest failure of a run that asks too much of the card."""
    import torch

    from carl_scale.errors import run_cli

    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exn:
        run_cli("x", interrupted, [])
    assert exn.value.code == 130 and capsys.readouterr().err == "x: interrupted (Ctrl-C)\n"

    def too_big(argv):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 139.81 GiB of which 1.5 GiB is free. Including non-PyTorch memory, ...\nmore")

    with pytest.raises(SystemExit) as exn:
        run_cli("x", too_big, [])
    said = ("x: error: CUDA out of memory. Tried to allocate 2.00 GiB: the GPU holds fewer frames or videos at once "
            "(in training: --frames, or --batch-size with --grad-accum for the same batch, or --trunk-chunk)")
    assert str(exn.value) == said

    def in_a_worker(argv):  # (PyTorch re-raises a DataLoader worker's error with its traceback as the text)
        raise torch.OutOfMemoryError("Caught OutOfMemoryError in DataLoader worker process 0.\nOriginal Traceback "
                                     "(most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory. "
                                     "Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.81 GiB\n")

    with pytest.raises(SystemExit) as exn:
        run_cli("x", in_a_worker, [])
    assert str(exn.value) == said

    def without_words(argv):
        raise torch.OutOfMemoryError()

    with pytest.raises(SystemExit) as exn:  # (its empty text was indexed: a traceback inside the handler)
        run_cli("x", without_words, [])
    assert str(exn.value).startswith("x: error: out of memory: the GPU holds fewer frames")


def test_progress_bars_write_whole_lines_to_a_log_file_and_nothing_when_asked(tmp_path):
    """A bar on a terminal redraws with carriage returns; in a log file (``2>log``) that is one
    endless line, so there a bar writes a plain line per interval; CARL_SCALE_NO_PROGRESS=1 none."""
    import os
    import subprocess
    import sys

    code = ("import time\nfrom carl_scale.tables import progress_bar\n"
            "bar = progress_bar(total=20, desc='work', unit='step', log_every_s=0.05)\n"
            "for i in range(20):\n    time.sleep(0.01); bar.update(1); bar.set_postfix(loss=i, refresh=False)\n"
            "bar.close()\n")
    for value, lines in (("0", True), ("1", False)):
        log = tmp_path / f"log{value}"
        with open(log, "w") as err:
            subprocess.run([sys.executable, "-c", code], stderr=err, check=True, timeout=60,
                           env={**os.environ, "CARL_SCALE_NO_PROGRESS": value})
        text = log.read_text()
        if not lines:
            assert text == ""
            continue
        assert "\r" not in text and text.endswith("\n")
        rows = text.splitlines()
        assert 2 <= len(rows) <= 21 and all(r.startswith("work:") for r in rows), rows
        assert "20/20" in rows[-1] and "loss=19" in rows[-1]
    # a passing bar (leave=False) that ends within its first interval writes nothing to a log
    log = tmp_path / "passing"
    with open(log, "w") as err:
        subprocess.run([sys.executable, "-c", code.replace("log_every_s=0.05", "log_every_s=30, leave=False")],
                       stderr=err, check=True, timeout=60, env={**os.environ, "CARL_SCALE_NO_PROGRESS": "0"})
    assert log.read_text() == ""


def test_a_log_line_keeps_no_cursor_moves_of_bars_stacked_on_a_terminal():
    import io

    from carl_scale.tables import _LineWriter

    out = io.StringIO()
    w = _LineWriter(out)
    for chunk in ("\r  embed val: 50%|#####     | 1/2", "\x1b[A", "\n\x1b[A\r", "   "):
        w.write(chunk)
    assert out.getvalue() == "  embed val: 50%|#####     | 1/2\n"


@pytest.mark.parametrize("module, argv", [
    ("shards.synthetic", ["--out", ""]),
    ("shards.folder", ["--src", "", "--out", "x"]),
    ("shards.pouring", ["--src", "x", "--out", "x", "--dataset", " "]),
    ("carl_scale.cli", ["embed", "v.mp4", "--out", ""]),
    ("carl_scale.cli", ["import-carl", "c.pth", "--out", ""]),
    ("launch.transfer_eval", ["synthetic", "--shards", ""]),
])
def test_an_empty_path_flag_is_refused_before_anything_is_read_or_written(module, argv, capsys, tmp_path, monkeypatch):
    """An empty path (an unset shell variable) would mean the current directory: shards written,
    files scanned or results written there."""
    import importlib

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(argv)
    assert exit_.value.code == 2 and "empty: give a path" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_is_evaluated_with_its_own_runs_view(checkpoint, videos, tmp_path, caplog):
    """Its normalisation and crop ratios from meta.json's data.spatial (as its end-of-run evaluation
    saw it); the defaults where it has none (imported checkpoints) or one this version cannot read."""
    import shutil

    from carl_scale.data.config import SpatialConfig
    from carl_scale.eval.embed import trained_view

    path, _ = checkpoint
    assert trained_view(path) == SpatialConfig()  # (no data section: the defaults)
    own = tmp_path / "run/checkpoints/step_000001"
    shutil.copytree(path, own)
    meta = json.loads((own / "meta.json").read_text())
    view = {**to_dict(SpatialConfig()), "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (own / "meta.json").write_text(json.dumps({**meta, "config": {**meta["config"], "data": {"spatial": view}}}))
    assert trained_view(own).mean == (0.5, 0.5, 0.5)
    main(["embed", str(videos[0]), "--checkpoint", str(path), "--out", str(tmp_path / "default")])
    main(["embed", str(videos[0]), "--checkpoint", str(own), "--out", str(tmp_path / "own")])
    assert not np.allclose(np.load(tmp_path / "default/clip0.npy"), np.load(tmp_path / "own/clip0.npy"))
    # a file embedded with another view of the same checkpoint (its meta.json edited since) is made again
    record = json.loads((tmp_path / "own/clip0.json").read_text())
    (tmp_path / "own/clip0.json").write_text(json.dumps({**record, "view": [[0.1] * 3, [0.2] * 3, [0.75, 1.33]]}))
    main(["embed", str(videos[0]), "--checkpoint", str(own), "--out", str(tmp_path / "own")])
    assert json.loads((tmp_path / "own/clip0.json").read_text()) == record
    (own / "meta.json").write_text(json.dumps({**meta, "config": {**meta["config"],
                                                                  "data": {"spatial": {**view, "new_knob": 1}}}}))
    with caplog.at_level("WARNING", logger="carl_scale.eval"):
        assert trained_view(own) == SpatialConfig() and "is not readable here" in caplog.text
