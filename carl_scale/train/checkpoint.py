"""Training checkpoints: ``<run>/checkpoints/step_000500/`` with DeepSpeed's model/optimizer/scheduler
state, the encoder's float32 weights (``model.pt``, :mod:`carl_scale.models.weights`, what
evaluation and ``--init-from`` read), a per-rank ``client_rank{r}.pt`` (RNG and data-pipeline
state) and ``meta.json`` (step, resolved config, git revision).

Written under ``step_000500.partial`` and renamed when every rank is done, then ``latest`` is
replaced atomically: a crash mid-save leaves the previous checkpoint as the newest complete one.
Nothing a user may need is deleted: pruning removes only older checkpoints of the run's own past
(never the one ``latest`` names), and resuming from an older step moves the newer checkpoints
aside into ``abandoned_after_step_NNNNNN/`` instead of overwriting them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from carl_scale.durable import durable_replace, fsync
from carl_scale.models.weights import (META_FILE, CheckpointError, checkpoints, intact_before, intact_hint, is_intact,
                                      latest_name, load_tensors, save_weights, step_of)


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rng_state() -> dict:
    """Every RNG's state as tensors and plain Python values, so that it loads with ``weights_only``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's device only: a resume may see fewer GPUs
        state["cuda_device"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_device"], torch.cuda.current_device())
    elif "cuda" in state and torch.cuda.is_available():  # written before: every GPU's, this one's at its index
        index = torch.cuda.current_device()
        if index < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][index], index)


def _allowed_records() -> list:
    """The only objects besides tensors and plain data that training-state files hold: DeepSpeed's
    ZeRO optimizer states carry four plain records. Allowed by name; anything else (a function, a
    class with a reducer) is refused. NumPy's arrays and dtypes are not: BUILD on a dtype changes it
    in place (a cached built-in one, for the whole process), after which an array's raw bytes can be
    read as object addresses (``datasets/safe_pickle.py`` rebuilds them instead). The client files
    of the first day (2026-11-26), whose RNG state was a NumPy array, are refused with them."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location=None):
    """A training-state file through :func:`carl_scale.models.weights.load_tensors` (never
    ``weights_only=False``): tensors, plain data and :func:`_allowed_records` only."""
    return load_tensors(path, allow=_allowed_records(), map_location=map_location)


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with every load through :func:`safe_load` (DeepSpeed's own
    loads with ``weights_only=False``); saving is untouched."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, path, map_location=None):
        from carl_scale.models.transformer import upgrade_legacy_keys

        state = safe_load(path, map_location)
        if isinstance(state, dict) and isinstance(state.get("module"), dict):  # the model states file
            state["module"] = upgrade_legacy_keys(state["module"], prefix="model.")
        return state


def tag(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_tree(path: Path) -> None:
    """Every file under ``path``, then the folders, on disk: after a machine crash a published
    checkpoint is whole, not files of the right names holding nothing (ranks on other machines
    wrote theirs to a shared file system, which has them on closing)."""
    for p in sorted(path.rglob("*"), reverse=True):
        if p.is_file() or p.is_dir():
            fsync(p)
    fsync(path)


ROLLBACK = "rollback.partial"  # exists while a resume moves newer checkpoints aside (names the step)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class OtherRankFailed(ValueError):
    """Raised on the ranks where a step that every rank had to finish succeeded, when it failed on
    another (whose own error, one line, is in that rank's output)."""


def agree(fn: Callable[[], Any], what: str, device: torch.device | str = "cpu") -> Any:
    """``fn()`` on this rank, then a barrier at which every rank learns whether it succeeded on all:
    a failure on any rank is raised on every rank (its own error where it happened, naming the
    failing rank elsewhere), where a plain barrier after it would keep the others waiting until the
    group's timeout (30 minutes). ``device``: where the flag goes (NCCL's: the rank's GPU)."""
    error, result = None, None
    try:
        result = fn()
    except Exception as exn:
        error = exn
    failed = -1 if error is None else (dist.get_rank() if dist.is_initialized() else 0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([failed], dtype=torch.float32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = int(flag.item())
    if error is not None:
        raise error
    if failed >= 0:
        raise OtherRankFailed(f"rank {failed} failed {what} (its own message says why); this rank stops too")
    return result


def prune(root: Path, keep: int) -> list[Path]:
    """Keep the checkpoint ``latest`` names and the ``keep - 1`` newest before it (0 keeps all);
    remove the older ones. Checkpoints after ``latest`` are never touched (they are not this
    run's past; resuming moves them aside first). Returns what was removed."""
    found = checkpoints(root)
    name = latest_name(root)
    latest = step_of(root / name) if name else max(found, default=None)
    if keep <= 0 or latest is None:
        return []
    older = sorted(s for s in found if s < latest)
    gone = [found[s] for s in older[: max(0, len(older) - (keep - 1))]]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def set_aside_newer(root: Path, step: int) -> Path | None:
    """Resuming at ``step`` abandons the checkpoints after it (they belong to a future this run
    will rewrite): move them into ``abandoned_after_step_NNNNNN/`` (never deleted, never pruned,
    never overwritten by the new ones). Returns that folder, or None if nothing was newer."""
    newer = [p for s, p in sorted(checkpoints(root).items()) if s > step]
    if not newer:
        if step in checkpoints(root) and latest_name(root) != tag(step):  # resumed a newer one than latest named
            _point_latest(root, step)
        (root / ROLLBACK).unlink(missing_ok=True)  # (a rollback that died after its last move)
        return None
    dest = root / f"abandoned_after_{tag(step)}"
    n = 1
    while dest.exists():
        n += 1
        dest = root / f"abandoned_after_{tag(step)}_{n}"
    (root / (ROLLBACK + ".tmp")).write_text(tag(step) + "\n")  # (first: while it exists, find("latest") knows)
    durable_replace(root / (ROLLBACK + ".tmp"), root / ROLLBACK)
    dest.mkdir()
    # then latest: it may name one of them, and a crash while they move must leave it naming a
    # checkpoint (the resumed one, when it is here; a resume from elsewhere, such as Ray's copy of a
    # trial's checkpoint, leaves the newest one kept, or none)
    kept = [s for s in checkpoints(root) if s <= step]
    if kept:
        _point_latest(root, step if step in kept else max(kept))
    else:
        (root / "latest").unlink(missing_ok=True)
    for p in newer:
        os.replace(p, dest / p.name)
    (root / ROLLBACK).unlink()
    return dest


def _point_latest(root: Path, step: int) -> None:
    tmp = root / "latest.partial"
    tmp.write_text(tag(step) + "\n")
    durable_replace(tmp, root / "latest")


def save(engine, model: torch.nn.Module, root: Path, step: int, client: dict, meta: dict, keep: int) -> Path:
    """Save on every rank (DeepSpeed shards optimizer state under ZeRO); rank 0 adds the float32
    weights and meta.json, publishes the directory, points ``latest`` at it and prunes."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    partial, final = tag(step) + ".partial", root / tag(step)
    if final.exists():  # never replaced (the trainer refuses runs that could get here): on every rank
        raise CheckpointError(f"{final} already exists; refusing to replace it")
    if rank == 0 and (root / partial).exists():
        shutil.rmtree(root / partial)
    _barrier()
    device = next(model.parameters()).device
    # What can be known before DeepSpeed's save is checked first, on every rank, and agreed on: the
    # folder takes a file, and has room for the checkpoint. A write failing inside the save anyway
    # (a quota, an I/O error) is agreed on after it (_deepspeed_save).
    agree(lambda: _writing(root / partial, lambda: _room(root, rank, step, *checkpoint_bytes(root, model))),
          f"to find room for {tag(step)}", device)
    failed = _writing(root / partial, lambda: _deepspeed_save(engine, root, partial))  # (one it could not join)
    agree(lambda: _writing(root / partial, lambda: _raise(failed)), f"to write {root / partial}", device)
    # a rank that cannot write (a full disk) stops every rank here, the checkpoint unpublished
    agree(lambda: _writing(root / partial, lambda: torch.save(client, root / partial / f"client_rank{rank}.pt")),
          f"to write {root / partial}", device)

    def publish() -> None:
        if rank == 0:
            save_weights(model, root / partial)
            (root / partial / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            _fsync_tree(root / partial)
            os.replace(root / partial, final)
            _point_latest(root, step)
            prune(root, keep)
    agree(lambda: _writing(final, publish), f"to publish {final}", device)
    return final


def _io_error(exn: BaseException) -> bool:
    """A file system's failure. torch.save words a failed write as a RuntimeError of its stream
    writer's ("... file write failed"; on a full disk, as measured with torch 2.14 writing to
    /dev/full: "[enforce fail at inline_container.cc:...] unexpected pos ..." or "basic_ios::clear:
    iostream error"); other RuntimeErrors, a collective's or CUDA's, are not the disk's."""
    if isinstance(exn, OSError):
        return True
    text = str(exn).lower()
    return isinstance(exn, RuntimeError) and any(w in text for w in ("writ", "inline_container", "iostream error"))


def _joins_a_failed_save(engine) -> bool:
    """Whether this DeepSpeed's save runs no collective between its check of the tag and its last
    barrier, so that a rank failing there may join that barrier. From 0.17.1 on (before, its
    ZeRO checkpoint files were made rank after rank, a barrier of the data-parallel group each:
    the mirror of its repository); a checkpoint engine that writes in the background (decoupled)
    is left alone."""
    import deepspeed

    version = tuple(int(x) for x in re.findall(r"\d+", deepspeed.__version__)[:3])
    decoupled = getattr(engine.checkpoint_engine, "is_decoupled", lambda: True)()
    return version >= (0, 17, 1) and not decoupled


def _deepspeed_save(engine, root: Path, partial: str) -> BaseException | None:
    """DeepSpeed's ``save_checkpoint``, safe to fail on one rank. It starts with a barrier and the
    ranks' check of the tag (collectives), then each rank writes its files, commits, and the save
    ends in a barrier. A rank whose write fails (a quota, an I/O error: the room was checked
    before) would never reach that barrier, and the others would wait there for the group's
    timeout (30 minutes; under srun without --kill-on-bad-exit, for as long). Such a rank joins
    that barrier and returns its error, for the ranks to agree on after the save (every rank then
    stops at once); a failure elsewhere (before the tag check, at or after the commit, or on a
    DeepSpeed this does not know to be safe) is raised here, as DeepSpeed's own save raises it."""
    stage: list[str] = []  # "checked", then "committed"
    joins = _joins_a_failed_save(engine) and dist.is_available() and dist.is_initialized() and \
        dist.get_world_size() > 1
    if joins:
        check, commit = engine._checkpoint_tag_validation, engine.checkpoint_engine.commit

        def checked(*args, **kwargs):
            out = check(*args, **kwargs)
            stage.append("checked")
            return out

        def committed(*args, **kwargs):
            stage.append("committed")
            return commit(*args, **kwargs)

        # (for this save: instance attributes over the methods)
        engine._checkpoint_tag_validation, engine.checkpoint_engine.commit = checked, committed
    try:
        engine.save_checkpoint(str(root), tag=partial, save_latest=False)
    except Exception as exn:
        if stage != ["checked"]:
            raise
        dist.barrier()  # the save's last one, where the other ranks are
        return exn
    finally:
        if joins:
            del engine._checkpoint_tag_validation, engine.checkpoint_engine.commit
    return None


def _raise(error: BaseException | None) -> None:
    if error is not None:
        raise error


def free_bytes(path: Path) -> int:
    """Bytes this process may still write on the file system of ``path``."""
    return shutil.disk_usage(path).free


def checkpoint_bytes(root: Path, model: torch.nn.Module) -> tuple[int, str]:
    """What the next checkpoint takes at least, and whence the figure: the newest complete one's size
    (every rank's files; the older ones are pruned only after the new one is written), else the
    weights and optimizer state it will hold (the client files and metadata come on top: a lower
    bound, never a refusal of a save that would fit)."""
    found = checkpoints(root)
    if found:
        newest = found[max(found)]
        return sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()), f"the size of {newest.name}"
    params = list(model.parameters())
    # model.pt's float32 weights and DeepSpeed's copy of the module in its own dtype; per trained
    # parameter AdamW's two float32 moments, and a float32 master copy where training is not fp32
    weights = sum(p.numel() * (4 + p.element_size()) for p in params)
    trained = sum(p.numel() * (8 + (4 if p.dtype != torch.float32 else 0)) for p in params if p.requires_grad)
    return weights + trained, "the model's weights and its optimizer's state, at least"


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _room(root: Path, rank: int, step: int, needed: int, why: str) -> None:
    """This rank can write in ``root`` (a read-only or full file system says so here), and the file
    system has ``needed`` bytes free."""
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".write_check_rank{rank}"
    try:
        probe.write_bytes(b"\0")
    finally:
        probe.unlink(missing_ok=True)
    free = free_bytes(root)
    if free < needed:
        then = (f"--resume latest goes on from the last complete checkpoint (the one {root / 'latest'} names)"
                if latest_name(root) else "start the run again (it has no checkpoint yet)")
        raise CheckpointError(f"no room for checkpoint {tag(step)} in {root}: it takes {_size(needed)} ({why}), "
                              f"{_size(free)} are free. Free some space there, then {then}")


def _writing(where: Path, fn: Callable[[], Any]) -> Any:
    """``fn()``, its file-system errors (a full disk) said in one line naming ``where``."""
    try:
        return fn()
    except (OSError, RuntimeError) as exn:
        if not _io_error(exn):  # (a collective's or CUDA's keep their own words)
            raise
        raise CheckpointError(f"could not write {where}: {type(exn).__name__}: {exn} (a full disk? the last "
                              f"complete checkpoint is the one {where.parent / 'latest'} names)") from exn


def find(root: Path, resume: str, *, quiet: bool = False) -> Path | None:
    """The checkpoint directory ``resume`` names: "latest" (None if there is none yet) or a path.
    Without a ``latest`` pointer but with checkpoints (a crash between publishing the first one and
    pointing at it, or step directories copied without it), "latest" is the newest intact one; so
    it is when an intact checkpoint is newer than the one ``latest`` names (a crash between
    publishing it and pointing at it), unless a rollback to ``latest``'s step is under way (its
    ``rollback.partial`` marker exists: :func:`set_aside_newer`). ``quiet``: say nothing."""
    say = not quiet and (not dist.is_initialized() or dist.get_rank() == 0)  # one line, not one per rank
    if resume == "latest":
        name = latest_name(root)
        if name is None:
            newest = intact_before(root, None)
            if newest is None and checkpoints(root):  # never start over silently beside a run's damaged work
                held = sorted(checkpoints(root))
                raise CheckpointError(f"--resume latest: {root} holds checkpoints (steps {held[0]}..{held[-1]}) but "
                                      f"none is intact (each lacks a file it needs): remove the damaged ones to start "
                                      f"over, or resume one you repaired by its path")
            if newest is not None and say:
                print(f"{root / 'latest'} is missing: resuming from the newest intact checkpoint, {newest.name}",
                      flush=True)
            return newest
        path = root / name
        at = step_of(path)
        # only those newer than latest's are checked whole (reading each file): none, as a rule
        newer = [p for s, p in sorted(checkpoints(root).items(), reverse=True) if at is not None and s > at]
        # a rollback under way (set_aside_newer interrupted): to a step at or after latest's
        try:  # (a marker that cannot be read: a rollback to latest's step, the safe reading)
            m = re.fullmatch(r"step_(\d+)", (root / ROLLBACK).read_text().strip())
            marked = int(m[1]) if m else at
        except (OSError, UnicodeDecodeError):
            marked = None if not (root / ROLLBACK).exists() else at
        rollback = at is not None and marked is not None and marked >= at
        newest = next((p for p in newer if is_intact(p)), None) if not rollback else None
        if newest is not None:
            # published, then the run died before `latest` was moved on to it: the newest is complete
            if say:
                print(f"{root / 'latest'} names {name}, and {newest.name} after it is complete (a run stopped "
                      f"between publishing it and pointing at it): resuming from {newest.name}", flush=True)
            return newest
    else:
        path = Path(resume)
        if not path.is_absolute() and not path.exists():
            path = root / resume
    if not (path / META_FILE).exists():
        raise CheckpointError(f"no complete checkpoint at {path} (expected {path / META_FILE}); use --resume "
                              f"latest or a step_NNNNNN directory under {root}{intact_hint(path)}")
    return path


# Settings a resumed run must share with the checkpoint: they define where the data stream stands,
# what the optimizer state and schedule mean, and the model's shape (a flag given on resume that
# changes one is refused, never silently ignored or half applied).
RESUME_FIXED = ("seed", "data.shards", "data.batch_size", "data.num_workers", "data.shuffle_buffer", "data.resampled",
                "data.epoch_samples", "data.per_label", "data.temporal", "model", "loss.name", "loss.scl_negatives", "optim",
                "parallel.zero_stage", "parallel.grad_accum", "synthetic")


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """Nested settings as {"data.temporal.num_frames": value}; a section that is None (no embedded
    synthetic set) is one key, ``"synthetic": None``, and so is a section given on one side only
    against None on the other (see :func:`_compared`)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _compared(then: dict, now: dict) -> tuple[dict, dict]:
    """Both sides flattened, where a section one side has and the other has as None is compared
    whole (as "set" against None): flattened, it had no key in common with the other."""
    a, b = _flatten(then), _flatten(now)
    for x, y in ((a, b), (b, a)):
        for k in [k for k, v in x.items() if v is None and k not in y and any(j.startswith(k + ".") for j in y)]:
            y[k] = "set"
            for j in [j for j in y if j.startswith(k + ".")]:
                del y[j]
    return a, b


def settings_differ(then: dict, now: dict) -> bool:
    """Whether two run configs differ in a setting that trains (outside :data:`RESUME_QUIET`)."""
    a, b = _compared(then, now)
    return any(a.get(k) != b.get(k) for k in set(a) | set(b) if not k.startswith(RESUME_QUIET))


# Settings a resume may change without a word: where the run writes and how long it is (the
# schedule is stretched, said by the trainer), what it logs and evaluates. Any other change (the
# loss's temperature, the views' augmentation, the decoder) is allowed and said, one line per flag:
# a resume by hand that leaves out a flag the run was started with goes back to its default.
RESUME_QUIET = ("run_dir", "steps", "epochs", "log_every", "init_from", "checkpoint.", "eval.", "model.pretrained")


def check_resume(path: Path, meta: dict, config: dict, world_size: int, precision: str | None = None) -> list[str]:
    """Refuse to resume ``path`` with settings that would not continue it (:data:`RESUME_FIXED`, and
    the world size), naming each flag with both values. Returns the other settings that differ
    (outside :data:`RESUME_QUIET`), each as "flag then (now now)", with the step's resolved
    ``precision`` when the checkpoint records another (``auto`` is bf16 on a GPU, fp32 on a CPU: the
    weights and optimizer states are float32 either way, so a CPU run may go on on a GPU)."""
    from carl_scale.config import ConfigError, iter_flags
    from carl_scale.train.config import RunConfig

    from carl_scale.models.config import ModelConfig

    flags = {f.path: f.flag for f in iter_flags(RunConfig)}
    saved = dict(meta.get("config", {}))
    if isinstance(saved.get("model"), dict):  # the architecture an older checkpoint's config means
        saved["model"] = ModelConfig.upgrade_saved(saved["model"])
    if isinstance(saved.get("loss"), dict) and "scl_negatives" not in saved["loss"]:  # before the option: video
        saved["loss"] = {**saved["loss"], "scl_negatives": "video"}
    then, now = _compared(saved, config)
    differ = [k for k in sorted(now) if k.startswith(RESUME_FIXED) and k in then and then[k] != now[k]
              and k != "model.pretrained"]  # the backbone's start weights are in the checkpoint anyway
    parts = [f"{flags.get(k, k)} {then[k]} (now {now[k]})" for k in differ[:4]]
    if int(meta.get("world_size", world_size)) != world_size:
        parts.append(f"world size {meta['world_size']} (now {world_size})")
    if parts:
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ConfigError(
            f"--resume {path}: it was trained with {', '.join(parts)}{more}; its data position, optimizer state "
            f"and schedule only continue with the same settings. Resume with them (--config {path / META_FILE} "
            f"--resume {path}), or start a new run from its weights: --init-from {path} --run-dir NEW_DIR")
    notes = [f"{flags.get(k, k)} {then[k]} (now {now[k]})" for k in sorted(now)
             if k in then and then[k] != now[k] and not k.startswith(RESUME_FIXED + RESUME_QUIET)]
    if precision is not None and meta.get("precision", precision) != precision:
        notes.append(f"{meta['precision']} training (now {precision}; --precision {meta['precision']} keeps it)")
    return notes


def load(engine, path: Path, meta: dict) -> dict:
    """Restore model, optimizer and scheduler into ``engine`` (whose checkpoint engine loads
    through :func:`safe_load`) and return this rank's client state. A file any rank cannot load
    stops every rank with the file named and the newest intact checkpoint before it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    error, client = None, None
    try:
        if not (path / "mp_rank_00_model_states.pt").is_file():
            raise CheckpointError(f"{path / 'mp_rank_00_model_states.pt'} is missing")
        client_file = path / f"client_rank{rank}.pt"
        if not client_file.exists():
            raise CheckpointError(f"{client_file} is missing (written with world size {meta.get('world_size')}?)")
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no model states in {path}")
        client = safe_load(client_file, map_location="cpu")
    except Exception as exn:  # any failure is shared: the others would wait at their next collective
        error = exn
    failed = torch.tensor([float(error is not None)], device=next(engine.module.parameters()).device)
    if dist.is_initialized():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None and not isinstance(error, CheckpointError):
        raise error  # (not the file's fault as far as we know: its own words, its own traceback)
    if failed.item():
        raise CheckpointError(f"{error if error is not None else f'another rank could not load {path}'}"
                              f"{intact_hint(path)}")
    return client
