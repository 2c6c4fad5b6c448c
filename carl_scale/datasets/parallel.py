"""Writing a split in parallel, resumably: the driver every converter hands its inputs to.

A converter lists a split's inputs (file paths, annotation rows: small picklable values) and a
``load(input) -> VideoRecord`` function. The inputs are cut into fixed slots of ``max_samples``;
slot ``j`` becomes ``<split>-<j:06d>.tar`` (see :class:`~carl_scale.datasets.writer.SlotWriter`), so
the same inputs give the same shards whatever the number of workers. ``workers`` forked processes
take the slots round-robin.

Resuming: the plan (a fingerprint of the inputs and options) goes to ``.progress/<split>.plan.json``
before anything is written, and each finished slot leaves ``.progress/<split>-<j:06d>.json`` (its
shards, skipped inputs, keys and frame count) after its shards are renamed and indexed. Rerunning
the same command after an interruption (Ctrl-C, kill -9, a lost node) keeps every finished slot,
rewrites the unfinished ones from scratch and merges ``shards.json`` from the records; rerunning on
a finished split says so and changes nothing. Other inputs or options on an existing split are
refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import hashlib
import json
import logging
import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from carl_scale.data.manifest import read_manifest
from carl_scale.datasets.encode import EncodeOptions
from carl_scale.datasets.writer import Payload, SkipInput, SlotWriter, VideoRecord, check_split_name, write_manifest
from carl_scale.durable import durable_replace
from carl_scale.errors import out_of_memory
from carl_scale.tables import progress_bar

log = logging.getLogger("carl_scale.data")

PROGRESS_DIR = ".progress"


@dataclass(frozen=True)
class WriteOptions:
    """How a split is written; the shared ``shards`` flags (see ``shards/common.py``)."""

    payload: Payload = "video"
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    max_samples: int = 64  # inputs per slot, so videos per shard at most
    max_bytes: int = 1 << 30  # a slot's shard that would grow past this continues in another part
    workers: int = 1
    overwrite: bool = False
    progress: bool = True
    # rewrite the slots of a written split that skipped inputs (clips downloaded since, a fixed
    # file); not part of the plan: the same command with it finishes, never refuses, the split
    retry_skipped: bool = False

    def __post_init__(self) -> None:
        for name, lo in (("max_samples", 1), ("max_bytes", 1), ("workers", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")


def _fingerprint(dataset: str, items: Sequence[Any], opts: WriteOptions, describe: Callable[[Any], str],
                 settings: dict) -> str:
    h = hashlib.sha256(json.dumps({"dataset": dataset, "payload": opts.payload, "encode": asdict(opts.encode),
                                   "max_samples": opts.max_samples, "max_bytes": opts.max_bytes,
                                   "settings": settings}, sort_keys=True, default=str).encode())
    for item in items:  # (a file name that is not UTF-8 keeps its bytes)
        h.update(describe(item).encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:20]


def labels_digest(*paths: str | Path | None) -> str | None:
    """A digest of the contents of label files (each path a file, or a directory: every file
    under it; None: none), which a converter reads beside the videos: changed after a split was
    written, a rerun is refused instead of taken as complete. None when there are none."""
    h, seen = hashlib.sha256(), False
    for path in (Path(p) for p in paths if p is not None):
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path] if path.is_file() else []
        for f in files:
            name = str(f.relative_to(path)) if path.is_dir() else f.name
            h.update(name.encode("utf-8", "surrogateescape") + b"\0" + hashlib.sha256(f.read_bytes()).digest())
            seen = True
    return h.hexdigest()[:20] if seen else None


def _slot_files(out_dir: Path, split: str, slot: int | None = None) -> list[Path]:
    stem = f"{split}-" + ("*" if slot is None else f"{slot:06d}")
    return sorted({p for pat in (f"{stem}.tar*", f"{stem}_*.tar*", f"{stem}.idx*", f"{stem}_*.idx*")
                   for p in out_dir.glob(pat)})


def _record_path(out_dir: Path, split: str, slot: int) -> Path:
    return out_dir / PROGRESS_DIR / f"{split}-{slot:06d}.json"


def _reading_path(out_dir: Path, split: str, worker: int) -> Path:
    """Which input a writer worker is reading, while it reads it (removed when its slot is done)."""
    return out_dir / PROGRESS_DIR / f"{split}.worker{worker}.reading"


def _killed_while_reading(out_dir: Path, split: str) -> list[str]:
    """The inputs an earlier write was reading when it stopped without a word (killed: for
    memory, most often), from the files its workers left; the files are removed."""
    found = []
    for path in sorted((out_dir / PROGRESS_DIR).glob(f"{split}.worker*.reading")):
        try:
            found.append(path.read_text())
            path.unlink()
        except OSError:
            pass
    return found


def _read_record(out_dir: Path, split: str, slot: int, plan: str) -> dict | None:
    """A finished slot's record, if it belongs to this plan and its shards are on disk whole."""
    path = _record_path(out_dir, split, slot)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("plan") == plan and _whole(out_dir, rec.get("shards", [])) else None


def _whole(out_dir: Path, shards: list[dict]) -> bool:
    """Whether every shard listed is on disk with its index, at the size it was written."""
    return all((out_dir / s["path"]).is_file() and (out_dir / s["path"]).stat().st_size == s["bytes"]
               and (out_dir / s["index"]).is_file() for s in shards)


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj))
    durable_replace(tmp, path)


# An input's read failing for one of these says nothing about the input (the disk, a network
# mount, memory or file handles): the write stops instead of listing the input as skipped
_MACHINE_ERRNOS = {errno.EIO, errno.ESTALE, errno.ENOSPC, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EDQUOT}


def not_the_input(exn: BaseException) -> bool:
    """Whether a failed load is the machine's fault, not the input's: out of memory, or an
    operating-system error of the disk, a mount or the process's limits. FFmpeg's own errors
    (PyAV's, some of which are OSErrors) are left out: its demuxers report truncated files as
    I/O errors too."""
    if out_of_memory(exn):
        return True
    if type(exn).__module__.startswith("av."):
        return False
    return isinstance(exn, OSError) and exn.errno in _MACHINE_ERRNOS


@contextlib.contextmanager
def _manifest_lock(out_dir: Path):
    """Held while ``shards.json`` is read, changed and written back: writes of two splits into one
    directory (each holding its own split's lock) may run side by side, and neither may drop the
    other's entry."""
    with open(out_dir / PROGRESS_DIR / "manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (held for a read and a write: moments)
        yield


def annotate(out_dir: str | Path, **fields) -> dict | None:
    """``shards.json`` with ``fields`` set at its top level (facts about how the shards were
    written that are not part of any split's plan, e.g. ``video_order``), under the directory's
    lock; returns the manifest."""
    out_dir = Path(out_dir)
    with _manifest_lock(out_dir):
        manifest = read_manifest(out_dir)
        if manifest is not None:  # (nothing written: nothing to say)
            manifest.update(fields)
            write_manifest(out_dir, manifest)
    return manifest


def add_warnings(out_dir: str | Path, warnings: list[str], splits: Sequence[str]) -> dict:
    """``shards.json`` with this command's warnings, about the ``splits`` it wrote: each split's
    own list in its entry (``warnings``, replacing what an earlier command said about it: a fixed
    CSV leaves none), and every split's together under the top-level ``label_warnings``. Read
    and written back under the directory's lock; returns the manifest."""
    out_dir = Path(out_dir)
    with _manifest_lock(out_dir):
        manifest = read_manifest(out_dir)
        for split in splits:
            entry = manifest["splits"].get(split)
            if entry is not None:
                entry.pop("warnings", None)
                if warnings:
                    entry["warnings"] = list(warnings)
        every = list(dict.fromkeys(w for e in manifest["splits"].values() for w in e.get("warnings", [])))
        manifest.pop("label_warnings", None)
        if every:
            manifest["label_warnings"] = every
        write_manifest(out_dir, manifest)
    return manifest


def _remove_split(out_dir: Path, split: str, manifest: dict | None) -> None:
    if manifest is not None and split in manifest.get("splits", {}):  # first: never a manifest naming removed shards
        del manifest["splits"][split]
        write_manifest(out_dir, manifest)
    for p in _slot_files(out_dir, split):
        p.unlink()
    for pat in (f"{split}[-.]*.json", f"{split}[-.]*.json.partial", f"{split}.worker*.reading"):  # (not the lock)
        for p in (out_dir / PROGRESS_DIR).glob(pat):
            p.unlink()


def _claim(out_dir: Path, split: str, plan: str, opts: WriteOptions, labels: str | None = None) -> dict | None:
    """The finished split entry when this exact split is already written (nothing to do), else
    None after making the output ready to (re)start or resume; refuses other inputs or options,
    and label files that changed since (``labels``: their digest; a split written before digests
    were kept is taken as it is)."""
    manifest = read_manifest(out_dir)
    entry = (manifest or {}).get("splits", {}).get(split)
    plan_path = out_dir / PROGRESS_DIR / f"{split}.plan.json"
    try:  # (written atomically; one damaged otherwise counts as none: the shards it planned are refused below)
        planned = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
        old, old_labels = planned.get("fingerprint"), planned.get("labels")
    except (ValueError, KeyError, TypeError, AttributeError):
        old = old_labels = None
    changed = (f"{out_dir}: the label files of split {split!r} changed since it was written (the videos and options "
               f"did not): pass --overwrite to write it again with the labels as they are now")
    if opts.overwrite:
        if entry is None and old == plan and old_labels in (None, labels):  # this very command, interrupted: finish it
            return None
        _remove_split(out_dir, split, manifest)
        return None
    if entry is not None:
        if entry.get("plan") == plan:
            if labels is not None and entry.get("labels", labels) != labels:
                raise FileExistsError(changed)
            redo = ("some of its shards are gone or changed size since" if not _whole(out_dir, entry["shards"])
                    else "--retry-skipped: rewriting its slots that skipped inputs" if opts.retry_skipped
                    and entry["skipped"] else None)
            if redo is None:
                return entry
            # a resume of this write: slots whose shards are whole are kept, the rest written again;
            # the entry goes first, so no manifest names a shard while it is rewritten
            log.warning("%s: split %r was finished, but %s: writing those slots again", out_dir, split, redo)
            del manifest["splits"][split]
            write_manifest(out_dir, manifest)
            return None
        raise FileExistsError(f"{out_dir} already holds a finished split {split!r} written from other inputs or "
                              f"options. Choose another --out, or pass --overwrite to replace it.")
    if old == plan and labels is not None and old_labels not in (None, labels):
        raise FileExistsError(changed.replace("since it was written", "since its unfinished write began"))
    if old is not None and old != plan:
        raise FileExistsError(f"{out_dir} holds an unfinished write of split {split!r} from other inputs or options: "
                              f"rerun that command to finish it, or pass --overwrite to start this one instead.")
    if old is None and _slot_files(out_dir, split):
        raise FileExistsError(f"{out_dir} already holds {split!r} shards that no resumable write planned. Choose "
                              f"another --out, or pass --overwrite to replace them.")
    return None


def _write_slot(out_dir: Path, split: str, slot: int, items: Sequence[Any], load: Callable[[Any], VideoRecord],
                dataset: str, opts: WriteOptions, plan: str, describe: Callable[[Any], str], done,
                parent: int | None, counter: int) -> None:
    # the slot's old record first: a rewrite killed after its shard's rename and before its new
    # record would otherwise leave the old one beside a shard of the same size, taken as finished
    _record_path(out_dir, split, slot).unlink(missing_ok=True)
    for p in _slot_files(out_dir, split, slot):  # what an interrupted attempt at this slot left
        p.unlink()
    reading = _reading_path(out_dir, split, counter)
    writer = SlotWriter(out_dir, split, slot, dataset=dataset, payload=opts.payload, encode=opts.encode,
                        max_bytes=opts.max_bytes)
    try:
        for item in items:
            if parent is not None and os.getppid() != parent:  # a forked worker whose driver was killed
                os._exit(1)  # stops rather than writing on unseen
            # named if the kernel kills this process while it reads this input (for memory, most often)
            reading.write_text(describe(item), errors="backslashreplace")
            try:
                rec = load(item)
            except SkipInput as exn:
                writer.skip(describe(item), str(exn))
            except Exception as exn:  # a corrupt or unreadable input: skipped and listed, never fatal
                if not_the_input(exn):  # (listed as skipped, it would be lost for good: the slot is finished)
                    raise ValueError(f"reading {describe(item)}: {type(exn).__name__}: {exn}. The machine, not "
                                     f"the video: the write stops here, keeping the shards it finished; rerun the "
                                     f"same command once that is fixed (fewer --workers need less memory)") from exn
                log.warning("skipping %s: %s: %s", describe(item), type(exn).__name__, exn)
                writer.skip(describe(item), f"{type(exn).__name__}: {exn}")
            else:
                try:  # a record that cannot be encoded is skipped; a shard that cannot be written stops all
                    writer.write(rec)
                except SkipInput as exn:
                    log.warning("skipping %s: %s", describe(item), exn)
                    writer.skip(describe(item), str(exn))
            done[counter] += 1
    except BaseException:
        writer.abort()
        # raised, not killed: the error says what happened (a .reading file is left only where the
        # process died without a word, which is what it is for)
        reading.unlink(missing_ok=True)
        raise
    _atomic_json(_record_path(out_dir, split, slot), {"plan": plan, "inputs": len(items), **writer.close()})
    reading.unlink(missing_ok=True)


def _worker(slots, args, errors, index: int) -> None:
    try:
        for slot, items in slots:
            _write_slot(args[0], args[1], slot, items, *args[2:], counter=index)
    except BaseException as exn:  # reported to the driver, which logs it and raises it
        # The queue pickles in a feeder thread, where a failure is lost (and one that does not
        # unpickle would raise in the driver): checked here, the text sent instead. The pipe holds
        # ~64 KiB, and the feeder is joined at exit: more would keep this worker alive, unread.
        tb = traceback.format_exc()[-16000:]
        sent = RuntimeError(f"{type(exn).__name__}: {str(exn)[:4000]}")
        try:
            blob = pickle.dumps(exn)
            pickle.loads(blob)
            sent = exn if len(blob) < 16000 else sent
        except Exception:
            pass
        errors.put((index, sent, tb))
        raise SystemExit(1)


def write_split(out_dir: str | Path, split: str, items: Sequence[Any], load: Callable[[Any], VideoRecord], *,
                dataset: str, opts: WriteOptions = WriteOptions(), label_names: dict | None = None,
                describe: Callable[[Any], str] = str, settings: dict | None = None, extra: dict | None = None,
                labels: str | None = None) -> dict:
    """Write ``items`` as ``split`` of ``out_dir`` (see the module docstring); returns the split's
    entry in ``shards.json``. ``describe(item)`` names an input in the skipped list and the plan;
    ``settings`` (the converter's own options) are part of the plan, so a rerun with others is
    refused instead of mixed in; so are label files that changed (``labels``: :func:`labels_digest`
    of those the converter reads); ``extra`` goes into the manifest's top level. Refused before
    anything is written or removed: a bad split name, no inputs, another payload than the
    directory's. A split none of whose inputs could be written is written empty (its entry lists
    why each was skipped); :func:`empty_splits` says which, once every split is written."""
    out_dir = Path(out_dir)
    check_split_name(split)
    if label_names is not None and not any(label_names.values()):  # (e.g. K400's test CSV: no classes named)
        label_names = None  # nothing to record, and never a replacement for names other splits wrote
    if not items:
        raise ValueError(f"split {split!r} has no inputs to write into {out_dir}: check the source paths and lists")
    held = read_manifest(out_dir) if out_dir.is_dir() else None
    if held is not None and held.get("payload", opts.payload) != opts.payload:
        raise FileExistsError(f"--payload {opts.payload}, but {out_dir} holds {held['payload']} shards (splits "
                              f"{sorted(held.get('splits', {}))}): one directory holds one payload, and --overwrite "
                              f"replaces splits, not the payload. Choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PROGRESS_DIR).mkdir(exist_ok=True)
    with open(out_dir / PROGRESS_DIR / f"{split}.lock", "w") as lock:
        try:  # forked workers inherit it: a rerun waits for orphans of a killed write to stop too
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another write of split {split!r} into {out_dir} is running (or its workers are "
                                  f"still stopping): wait for it to end, or stop it, then rerun") from None
        return _write_split(out_dir, split, items, load, dataset=dataset, opts=opts, label_names=label_names,
                            describe=describe, settings=settings, extra=extra, labels=labels)


def empty_splits(manifest: dict, out_dir: str | Path) -> str | None:
    """What to tell the user when a split had inputs and none could be written (None: no such
    split): each such split, with its commonest reason; the command should then fail."""
    lines = []
    for split, entry in sorted(manifest.get("splits", {}).items()):
        if entry["samples"] == 0:
            reasons = [s["reason"] for s in entry["skipped"]]
            kinds = [r.split(":")[0] for r in reasons]  # the error's class, or a skip's own first words
            common = max(set(kinds), key=kinds.count) if kinds else ""
            example = next((r for r in reasons if r.split(":")[0] == common), "none given")
            lines.append(f"split {split!r}: none of its {len(reasons)} inputs could be written (the most common "
                         f"reason, {kinds.count(common)} of them: {example})")
    return "; ".join(lines) + f"; {Path(out_dir) / 'shards.json'} lists each" if lines else None


def _write_split(out_dir: Path, split: str, items: Sequence[Any], load: Callable[[Any], VideoRecord], *,
                 dataset: str, opts: WriteOptions, label_names: dict | None, describe: Callable[[Any], str],
                 settings: dict | None, extra: dict | None, labels: str | None) -> dict:
    plan = _fingerprint(dataset, items, opts, describe, {**(settings or {}), **(extra or {})})
    with _manifest_lock(out_dir):
        finished = _claim(out_dir, split, plan, opts, labels)
    if finished is not None:
        print(f"{out_dir}: split {split!r} is already complete ({finished['samples']} videos); nothing to do")
        return finished
    for what in _killed_while_reading(out_dir, split):  # (a single-process write killed says nothing itself)
        log.warning("the last write of split %s stopped while reading %s: if it was killed (for memory, most "
                    "often) and stops there again, leave that input out or write with fewer --workers", split, what)
    _atomic_json(out_dir / PROGRESS_DIR / f"{split}.plan.json", {"fingerprint": plan, "inputs": len(items),
                                                                 "labels": labels})
    n = opts.max_samples
    slots = [(j, list(items[j * n: (j + 1) * n])) for j in range(-(-len(items) // n))]
    records = {j: _read_record(out_dir, split, j, plan) for j, _ in slots}
    todo = [(j, chunk) for j, chunk in slots if records[j] is None or (opts.retry_skipped and records[j]["skipped"])]
    if len(todo) < len(slots):
        print(f"{out_dir}: resuming split {split!r}: {len(slots) - len(todo)} of {len(slots)} shards were finished")
    ctx = mp.get_context("fork")
    gc.collect()  # (cyclic garbage freed in a forked writer can crash it: see VideoLoader.finished_stream)
    workers = min(opts.workers, len(todo))
    if len(slots) < opts.workers and len(todo) == len(slots):
        log.warning("split %s: %d slot(s) of --max-samples %d inputs for --workers %d: only %d worker(s) can write; "
                    "a smaller --max-samples gives each worker slots", split, len(slots), n, opts.workers, workers)
    # one counter per worker, each written by its own process only: no lock a killed worker could hold
    done = ctx.Array("q", max(1, workers), lock=False)
    args = (out_dir, split, load, dataset, opts, plan, describe, done, os.getpid())
    before = len(items) - sum(len(c) for _, c in todo)  # inputs of finished slots
    bar = progress_bar(enabled=opts.progress, total=len(items), initial=before, desc=f"{dataset} {split}",
                       unit="video", smoothing=0.05)

    def show() -> None:  # (update, not refresh: a log file gets a line per interval, not per shard)
        bar.update(before + sum(done) - bar.n)

    with bar:
        if workers <= 1:
            for j, chunk in todo:
                _write_slot(out_dir, split, j, chunk, *args[2:-1], parent=None, counter=0)
                show()
        else:
            errors = ctx.Queue()
            procs = [ctx.Process(target=_worker, args=(todo[w::workers], args, errors, w), daemon=False)
                     for w in range(workers)]
            for p in procs:
                p.start()
            try:
                # until all are done, or one failed (the others are stopped: a rerun finishes the job)
                while any(p.is_alive() for p in procs) and not any(p.exitcode for p in procs):
                    time.sleep(0.2)
                    show()
            finally:
                for p in procs:  # on Ctrl-C, the workers stop too; finished slots stay
                    if p.is_alive():
                        p.terminate()
                    p.join()
            failed = [p for p in procs if p.exitcode != 0]
            if failed:
                # the worker that failed, not one the loop above then stopped (SIGTERM: it was innocent)
                failed.sort(key=lambda p: p.exitcode == -signal.SIGTERM)
                for p in failed[1:]:
                    if p.exitcode == -signal.SIGTERM:
                        _reading_path(out_dir, split, procs.index(p)).unlink(missing_ok=True)
                code = failed[0].exitcode  # (a worker killed, e.g. by the kernel for memory, reports nothing)
                w = procs.index(failed[0])
                try:
                    reading = f" while reading {_reading_path(out_dir, split, w).read_text()}"
                except OSError:
                    reading = ""
                index, exn, tb = errors.get(timeout=5) if not errors.empty() else \
                    (w, ValueError(
                        f"writer worker {w} ended with exit code {code}" +
                        (f" (killed by signal {-code}{': out of memory?' if code == -9 else ''})" if code < 0 else "")
                        + f"{reading}: rerun the same command to write the rest (with fewer --workers if memory ran "
                        f"out)"), "")
                log.error("writer worker %s failed:\n%s", index, tb)
                print(f"writer worker {index} failed; the shards finished so far are kept: rerun the same "
                      f"command to write the rest")
                raise exn  # its own class: an expected error still ends in one line
        show()
    with _manifest_lock(out_dir):
        return _merge(out_dir, split, [(j, _read_record(out_dir, split, j, plan)) for j, _ in slots], plan,
                      dataset=dataset, opts=opts, label_names=label_names, extra=extra, labels=labels)


def _merge(out_dir: Path, split: str, records: list[tuple[int, dict | None]], plan: str, *, dataset: str,
           opts: WriteOptions, label_names: dict | None, extra: dict | None, labels: str | None = None) -> dict:
    """``shards.json``'s entry for ``split``, from the slots' records."""
    missing = [j for j, r in records if r is None]
    if missing:
        raise RuntimeError(f"{out_dir}: slots {missing[:5]} of split {split!r} have no record after writing; rerun")
    seen: dict[str, int] = {}
    repeated = []  # two inputs that named the same video (the converters rule it out where ids come from names)
    for j, rec in records:
        for key in rec["keys"]:
            if key in seen:
                repeated.append(f"{key} (shards {seen[key]} and {j})")
            seen[key] = j
    if repeated:
        log.warning("split %s: %d video keys occur twice, e.g. %s (listed in shards.json)", split, len(repeated),
                    repeated[0])
    manifest = read_manifest(out_dir) or {"version": 1, "splits": {}}
    if manifest.get("payload", opts.payload) != opts.payload:
        raise ValueError(f"{out_dir} holds {manifest['payload']} shards; cannot add {opts.payload} ones")
    manifest.update(dataset=dataset, payload=opts.payload, **(extra or {}))
    # The top-level codec and class names are the splits' as they are now: unioned with the old
    # top-level values, an --overwrite could never take back what a replaced split had put there
    # (h264 shards rewritten as vp9 stayed "mixed": PyAV where DALI reads them). A split written
    # before splits recorded their codecs ("codecs") keeps the old values in.
    others = [e for other, e in manifest["splits"].items() if other != split]
    older = [e for e in others if "codecs" not in e]
    split_codecs = sorted({c for _, r in records for c in r["codecs"]})
    codecs = set(split_codecs) | {c for e in others for c in e.get("codecs", [])} | (
        {manifest["codec"]} if older and "codec" in manifest else set())
    # One codec for the whole directory lets readers pick a decoder up front ("mixed" when
    # a folder of original files was stored without transcoding).
    manifest["codec"] = codecs.pop() if len(codecs) == 1 else ("mixed" if codecs else opts.encode.codec)
    if label_names:
        manifest["label_names"] = label_names
    elif not older:  # the names a split left holds, or none (never the replaced split's)
        kept = next((e["label_names"] for e in others if e.get("label_names")), None)
        if kept is None:
            manifest.pop("label_names", None)
        else:
            manifest["label_names"] = kept
    # Splits written by separate commands can name their classes differently (a folder's names are
    # those its videos' labels use): their action labels then index other lists. Said, and kept in
    # the manifest while it holds (each split records the names it was written with).
    conflicts = sorted(other for other, e in manifest["splits"].items() if other != split and label_names
                       and e.get("label_names") is not None and e["label_names"] != label_names)
    if conflicts:
        manifest["label_conflicts"] = (f"split {split!r} was written with other class names than split(s) "
                                       f"{', '.join(map(repr, conflicts))}: their labels index other lists; write "
                                       f"them in one command, or again with the same labels (--overwrite)")
        log.warning("%s: %s", out_dir, manifest["label_conflicts"])
    else:
        manifest.pop("label_conflicts", None)
    shards = [s for _, r in records for s in r["shards"]]
    per_action = videos_per_action([r for _, r in records], (label_names or {}).get("actions"))
    entry = {"shards": shards, "samples": sum(s["samples"] for s in shards),
             "frames": sum(r["frames"] for _, r in records), "skipped": [s for _, r in records for s in r["skipped"]],
             "codecs": split_codecs,
             **({"videos_per_action": per_action} if per_action is not None else {}),
             "plan": plan, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
             **({"repeated_keys": repeated} if repeated else {}), **({"labels": labels} if labels else {}),
             **({"label_names": label_names} if label_names else {})}
    manifest["splits"][split] = entry
    write_manifest(out_dir, manifest)
    return entry


def videos_per_action(records: list[dict], names: list[str] | None) -> dict[str, int] | None:
    """A split's videos per action class, by name where the classes have names (``"unlabelled"``
    for -1), in class order; None when a slot was written before its record counted them."""
    if any("actions" not in r for r in records):
        return None
    total: dict[int, int] = {}
    for r in records:
        for label, n in r["actions"].items():
            total[int(label)] = total.get(int(label), 0) + n

    def name(label: int) -> str:
        if label < 0:
            return "unlabelled"
        return names[label] if names is not None and label < len(names) else str(label)

    return {name(label): total[label] for label in sorted(total)}


def write_options(*, payload: Payload = "video", encode: EncodeOptions | None = None, max_samples: int | None = None,
                  max_bytes: int = 1 << 30, overwrite: bool = False, progress: bool = True, workers: int = 1,
                  retry_skipped: bool = False, default_max_samples: int = 64) -> WriteOptions:
    """:class:`WriteOptions` from the keyword arguments every ``write_*_shards`` function takes
    (``max_samples=None``: the converter's own default)."""
    return WriteOptions(payload=payload, encode=encode or EncodeOptions(),
                        max_samples=default_max_samples if max_samples is None else max_samples,
                        max_bytes=max_bytes, workers=workers, overwrite=overwrite, progress=progress,
                        retry_skipped=retry_skipped)
