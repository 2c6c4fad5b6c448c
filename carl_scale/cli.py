"""``carl-scale``: embed videos and align two of them with a pretrained checkpoint; import the
published CARL code's checkpoints.

    carl-scale embed a.mp4 b.webm --out embs/                 # one (S, D) .npy per video (a rerun keeps them)
    carl-scale embed --shards data/synthetic --split val --out embs/
    carl-scale align a.mp4 b.mp4 --out align.png              # heatmap + DTW path + aligned frames
    carl-scale import-carl checkpoint_epoch_00299.pth --config scl_transformer_action_config.yml \
        --out runs/carl_pennaction                            # then --checkpoint runs/carl_pennaction

``--checkpoint`` names a step_NNNNNN directory (default: the newest under runs/pretrain). Plain
video files are decoded with PyAV (any codec FFmpeg reads), shards with the project's decoders.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _model(args):
    from carl_scale.eval.embed import default_device, trained_view
    from carl_scale.eval.transfer import latest_checkpoint
    from carl_scale.models import load_model

    device = default_device(args.device)
    if args.run_dir == "":
        raise ValueError("--run-dir is empty: name the run directory, or leave the flag out for runs/pretrain")
    if args.checkpoint == "":
        raise ValueError("--checkpoint is empty: give a step_NNNNNN directory, or leave the flag out for the newest "
                         "under --run-dir")
    ckpt = Path(args.checkpoint) if args.checkpoint is not None else latest_checkpoint(args.run_dir)
    args.checkpoint_used = str(ckpt.resolve())
    model = load_model(ckpt, device)
    args.spatial = trained_view(ckpt)  # (the view its run's evaluation took)
    return model, device


def read_video(path: str, short_side: int | None = None) -> np.ndarray:
    """Every frame of a plain video file, ``(S, H, W, 3)`` uint8, downscaled to ``short_side``
    while decoding (the model sees a centre crop of ``image_size`` anyway)."""
    from carl_scale.data.codec import iter_video_frames

    if not Path(path).is_file():
        raise FileNotFoundError(f"video {path} not found")
    frames = list(iter_video_frames(path, short_side))
    if not frames:
        raise ValueError(f"{path}: no frames could be decoded")
    return np.stack(frames)


def _made_by(video: str, args) -> dict:
    """What a video's .npy stands for: the video file as it is and the checkpoint that embedded it."""
    from carl_scale.eval.embed import EMBEDDINGS_FORMAT

    st = Path(video).stat()
    view = [list(args.spatial.mean), list(args.spatial.std), list(args.spatial.crop_ratio)]
    return {"video": str(Path(video).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "checkpoint": args.checkpoint_used, "format": EMBEDDINGS_FORMAT, "view": view}


def cmd_embed(args) -> None:
    import json


    from carl_scale.eval.embed import embed_frames, extract_embeddings
    from carl_scale.tables import progress_bar, table

    # every input checked before anything is loaded or written
    missing = [v for v in args.videos if not Path(v).is_file()]
    if missing:
        raise FileNotFoundError(f"video {missing[0]} not found ({len(missing)} of the inputs are missing)")
    stems = [Path(v).stem for v in args.videos]
    if len(set(stems)) < len(stems):
        raise ValueError(f"two inputs share a file name ({stems}); their .npy files in --out would overwrite each "
                         f"other: rename one")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: name a directory for the embeddings")
    if not args.videos and args.shards is None:
        raise ValueError("nothing to embed: give video files, or --shards DIR")
    if args.shards is not None:  # (a directory, pattern or list, and its split: found before anything is made)
        from carl_scale.data.manifest import resolve_shards

        resolve_shards(args.shards, args.split)
    model, device = _model(args)
    # a rerun keeps what the same checkpoint already embedded from the same file, and never
    # replaces another checkpoint's (or an unknown) .npy without --overwrite
    rows, todo = [], []
    for video in args.videos:
        npy, record = out / f"{Path(video).stem}.npy", out / f"{Path(video).stem}.json"
        made, now = json.loads(record.read_text()) if record.is_file() else None, _made_by(video, args)
        # (ours, of the same video and checkpoint, made by an earlier evaluation view: made again)
        ours = isinstance(made, dict) and {**made, "format": now["format"], "view": now["view"]} == now
        if npy.is_file() and made == now:
            rows.append((video, np.load(npy, mmap_mode="r").shape[0], "kept (same video and checkpoint)", str(npy)))
        elif npy.is_file() and not args.overwrite and not ours:
            raise FileExistsError(f"{npy} holds embeddings of {'another checkpoint or video' if made else 'unknown origin'}"
                                  f": give another --out, or --overwrite to replace them")
        else:
            todo.append(video)
    out.mkdir(parents=True, exist_ok=True)
    if args.shards is not None:
        ve = extract_embeddings(model, args.shards, args.split, spatial=args.spatial, device=device,
                                cache=str(out / f"{args.split}.npz"))
        print(f"{len(ve.video_ids)} videos of {args.shards} ({args.split}) -> {out / f'{args.split}.npz'}")
    for video in progress_bar(iterable=todo, desc="embed", unit="video", enabled=len(todo) >= 2):
        emb = embed_frames(model, read_video(video, model.cfg.image_size), spatial=args.spatial, device=device)
        npy = out / f"{Path(video).stem}.npy"
        (out / f"{Path(video).stem}.json").unlink(missing_ok=True)  # (a stale record never vouches for the new file)
        np.save(npy, emb)
        (out / f"{Path(video).stem}.json").write_text(json.dumps(_made_by(video, args)) + "\n")  # after the .npy
        rows.append((video, emb.shape[0], f"embedded ({emb.shape[1]}-d)", str(npy)))
    if rows:
        print(f"checkpoint {args.checkpoint_used}\n" + table(rows, ("video", "frames", "", "embeddings")))


def cmd_align(args) -> None:
    from carl_scale.eval.alignment import save_alignment_figure
    from carl_scale.eval.embed import embed_frames
    from carl_scale.eval.pictures import thumbnails

    out = Path(args.out)
    if out.is_dir() or not out.suffix:  # a folder (or a name without a format): the picture goes inside
        out = out / "alignment.png"
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".pdf", ".svg"):
        raise ValueError(f"--out {args.out}: a picture's name ends in .png, .jpg, .pdf or .svg")
    for video in (args.a, args.b):
        if not Path(video).is_file():
            raise FileNotFoundError(f"video {video} not found")
    model, device = _model(args)  # (the checkpoint found before anything is made)
    out.parent.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    fa, fb = read_video(args.a, model.cfg.image_size), read_video(args.b, model.cfg.image_size)
    ea, eb = (embed_frames(model, f, spatial=args.spatial, device=device) for f in (fa, fb))
    out = save_alignment_figure(ea, eb, args.out, frames_a=thumbnails(fa), frames_b=thumbnails(fb),
                                names=(Path(args.a).name, Path(args.b).name))
    print(f"alignment of {args.a} ({len(fa)} frames) and {args.b} ({len(fb)} frames) -> {out}")


def cmd_import_carl(args) -> None:
    from carl_scale.carl_code import import_carl

    r = import_carl(args.checkpoint_file, args.config, args.out, overwrite=args.overwrite)
    m = r["model"]
    print(f"{args.checkpoint_file} (epoch {r['epoch']}): {r['tensors']} tensors -> {r['out']}/model.pt")
    print(f"  model: ResNet-50 ({m.train_last_stages} stage(s) trained), {m.num_layers}-layer {m.width}-wide "
          f"transformer, {m.embed_dim}-d embeddings, T {m.train_frames}, {m.image_size} px; recipe {r['recipe']}")
    for note in r["notes"]:
        print(f"  note: {note}")
    ds = "pennaction" if r["recipe"] in ("pennaction", "k400") else r["recipe"]
    print(f"\nevaluate it:   launch/transfer_eval.sh {ds} {r['out']}\n"
          f"embed videos:  carl-scale embed VIDEO.mp4 --checkpoint {r['out']}\n"
          f"fine-tune it:  deepspeed launch/pretrain_k400.py --config {r['out']}/meta.json --init-from {r['out']} "
          f"--shards DIR")


def main(argv: list[str] | None = None) -> None:
    from carl_scale.errors import nonempty

    # (no abbreviated flags: "--check" taken for --checkpoint would be a guess)
    p = argparse.ArgumentParser(prog="carl-scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--checkpoint", help="a step_NNNNNN directory (default: newest under --run-dir)")
    common.add_argument("--run-dir", default="runs/pretrain")
    common.add_argument("--device", default=None)
    common.add_argument("--debug", action="store_true", help="show the traceback of an expected failure too")
    e = sub.add_parser("embed", parents=[common], help="frame embeddings of videos or shards", allow_abbrev=False)
    e.add_argument("videos", nargs="*")
    e.add_argument("--shards", type=nonempty, help="a shard directory instead of (or as well as) video files")
    e.add_argument("--split", default="val")
    e.add_argument("--out", default="embeddings", type=nonempty)
    e.add_argument("--overwrite", action="store_true",
                   help="replace .npy files in --out that another checkpoint (or video) made")
    e.set_defaults(func=cmd_embed)
    a = sub.add_parser("align", parents=[common], help="DTW alignment picture of two videos", allow_abbrev=False)
    a.add_argument("a")
    a.add_argument("b")
    a.add_argument("--out", default="alignment.png", type=nonempty)
    a.set_defaults(func=cmd_align)
    i = sub.add_parser("import-carl", help="a published CARL checkpoint as a carl_scale checkpoint directory",
                       allow_abbrev=False)
    i.add_argument("checkpoint_file", metavar="CHECKPOINT", help="checkpoint_epoch_NNNNN.pth of the published code")
    i.add_argument("--config", default=None,
                   help="the YAML it was trained with (default: the config saved in the checkpoint)")
    i.add_argument("--out", required=True, type=nonempty, help="the checkpoint directory to write (meta.json, model.pt)")
    i.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    i.add_argument("--debug", action="store_true", help="show the traceback of an expected failure too")
    i.set_defaults(func=cmd_import_carl)
    args = p.parse_args(argv)
    if args.command == "embed" and not args.videos and args.shards is None:
        p.error("embed: give video files and/or --shards DIR")
    args.func(args)


def entry() -> None:
    """The ``carl-scale`` console script: :func:`main` with expected failures as one line."""
    from carl_scale.errors import run_cli

    run_cli("carl-scale", main)


if __name__ == "__main__":
    entry()
