"""Where a split's shards are, and what ``shards.json`` says about them (the manifest every
writer in :mod:`carl_scale.datasets` leaves beside its shards)."""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

# What ``video_order`` says in shards.json: the splits' videos are in the published lists' order, so
# the evaluation's "first 10%" of the training videos is the published subset (transfer.check_transfer)
PUBLISHED_ORDER = "published"

MANIFEST = "shards.json"

# The command that writes each dataset's shards (README, Data; docs/datasets.md), keyed by recipe
# or transfer protocol; "folder" for anyone's own videos.
WRITE_SHARDS = {
    "synthetic": "python -m shards.synthetic --out {out}",
    "pennaction": "python -m shards.pennaction --root Penn_Action --phase-labels penn_action_labels --out {out}",
    "finegym": "python -m shards.finegym --videos finegym/videos --annotations finegym/annotations --version v1.0 "
               "--out {out}",
    "pouring": "python -m shards.pouring --src pouring_tfrecords --out {out}",
    "k400": "python -m shards.kinetics400 --annotations train.csv --annotations validate.csv --videos k400/ "
            "--out {out} --workers 16",
    "folder": "python -m shards.folder --src VIDEOS --out {out}",
}


def write_command(dataset: str, out: str | Path) -> str:
    """How to write ``dataset``'s shards into ``out`` (another dataset's: the folder converter)."""
    return WRITE_SHARDS.get(dataset, WRITE_SHARDS["folder"]).format(out=out)


def plain_local_path(spec) -> bool:
    """A path on this machine naming one thing (no URL, command, brace pattern, wildcard or list)."""
    return (isinstance(spec, str) and "://" not in spec and not spec.startswith("pipe:")
            and not any(c in spec for c in "{*?["))


def read_manifest(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    fix = ("remove it and rerun the command that wrote the shards (it rebuilds the file from the finished "
           "shards' records, writing only what is missing)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exn:  # (UnicodeDecodeError too)
        raise ValueError(f"{path} is damaged ({exn}): {fix}") from None
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict) or not all(isinstance(v, dict) and isinstance(v.get("shards"), list) and
                                               all(isinstance(s, dict) and "path" in s for s in v["shards"])
                                               for v in splits.values()):
        raise ValueError(f"{path} is damaged (no 'splits' with a list of shards each): {fix}")
    return manifest



def _scheme(url: str) -> str:
    """The URL scheme WebDataset would open ``url`` with ("" for a local path)."""
    from urllib.parse import urlparse

    return urlparse(url).scheme


def resolve_shards(spec: str | list[str], split: str = "train") -> tuple[list[str], dict | None]:
    """Shard paths and the manifest (if any) from a directory with ``shards.json``, a brace
    pattern (``k400/train-{000000..000999}.tar``), a ``.txt`` list, or a list of paths.
    Every path must be local and exist: a URL or ``pipe:`` command (which WebDataset would fetch
    or run) is refused, and a missing path is an error naming it and the fix."""
    manifest = None
    # (as given, as resolved): a URL is told by what the user wrote; a shard directory's entries
    # (None as given) are local by construction
    if isinstance(spec, (list, tuple)):
        entries = [(str(u), str(u)) for u in spec]
    elif Path(spec).is_dir():
        manifest = read_manifest(spec)
        if manifest is None:
            raise FileNotFoundError(
                f"{Path(spec) / MANIFEST} not found: {spec} is not a shard directory. Write shards into it with "
                f"your dataset's converter, e.g. '{write_command('folder', spec)}' (README, Data: one per dataset).")
        if split not in manifest["splits"]:
            raise ValueError(f"{spec} has no split {split!r} (it has {sorted(manifest['splits'])}): name one of "
                             f"those (--split where the command has it), or write a {split} split into it")
        entries = [(None, str(Path(spec) / s["path"])) for s in manifest["splits"][split]["shards"]]
    elif spec.endswith(".txt") and Path(spec).is_file():
        # a relative path: from here, or else from the list's own folder
        entries = [(u, u if Path(u).is_absolute() or Path(u).exists() else str(Path(spec).parent / u))
                   for u in (ln.strip() for ln in Path(spec).read_text().splitlines()) if u]
    else:
        entries = [(u, u) for u in wds.shardlists.expand_urls(spec)]
        parent = Path(entries[0][1]).parent if entries else None
        if parent is not None and (parent / MANIFEST).exists():
            manifest = read_manifest(parent)
    if not entries:
        why = (f": its {split} split is empty (none of its inputs could be written; shards.json lists why)"
               if manifest is not None else ": the list is empty or the pattern matched nothing; check --shards")
        raise FileNotFoundError(f"no shards in {spec!r}{why}")
    urls = []
    for given, u in entries:
        if Path(u).exists():
            # a local file whose name reads as a URL to WebDataset (a:b.tar): given it as ./a:b.tar
            urls.append("./" + u if _scheme(u) and not Path(u).is_absolute() else u)
        elif given is not None and _scheme(given):  # WebDataset would run a pipe: line in a shell, fetch a URL
            where = "" if given == spec else f" (in --shards {spec!r})"
            raise ValueError(f"--shards: {given!r}{where} is a {_scheme(given)}: URL, not a local path. Shards are "
                             f"read from local paths only (nothing is downloaded, no command run): copy them to this "
                             f"machine and give their path")
        else:
            what = f"no shards at {u}" if u == spec else f"shard {u} does not exist (--shards {spec!r})"
            raise FileNotFoundError(
                f"{what}: write them with your dataset's converter, e.g. '{write_command('folder', u)}' "
                f"(README, Data: one per dataset), or point --shards at shards you have.")
    return urls, manifest


def manifest_codec(manifest: dict | None) -> str:
    """What a decoder must read: "jpeg" for jpeg payloads, else the video codec ("" if unknown)."""
    manifest = manifest or {}
    return "jpeg" if manifest.get("payload") == "jpeg" else manifest.get("codec", "")


def manifest_samples(manifest: dict | None, urls: list[str], split: str) -> int | None:
    if manifest is None or split not in manifest["splits"]:
        return None
    counts = {Path(s["path"]).name: s["samples"] for s in manifest["splits"][split]["shards"]}
    names = [Path(u).name for u in urls]
    return sum(counts[n] for n in names) if all(n in counts for n in names) else None
