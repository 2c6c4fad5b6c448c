"""A Ray Tune sweep of σ², τ (and with weak supervision ε₁ and λ) before transfer evaluation.

:func:`run_sweep` validates everything, writes the synthetic shards once if the recipe uses them
(before Ray starts, so no two trials race for them), then runs a ``Tuner`` of :func:`trial`s under
ASHA (trials report every ``report_every`` steps; the weaker half is stopped at each rung) with
random draws from the ranges, retrying a failed trial from its last checkpoint. An interrupted
sweep continues with ``resume=True`` (``Tuner.restore``): finished trials are kept, unfinished ones
resume from their checkpoints. At the end it writes into the sweep's directory ``results.csv`` (one
row per trial), ``results.md``, ``objective.png`` (the objective against each hyper-parameter) and
``best_config.json``: the recipe with the best trial's values, which ``launch/pretrain_k400.py
--config`` takes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

from carl_scale.config import ConfigError, from_dict, to_dict
from carl_scale.models.config import ModelConfig
from carl_scale.tables import table
from carl_scale.train.config import RunConfig
from carl_scale.tables import progress_wanted
from carl_scale.train.recipes import configure, load_run_config, recipe
from carl_scale.tuning.config import LOG_SCALE, SweepConfig, overrides_of
from carl_scale.tuning.trial import failures, trial, trial_overrides

# the transfer evaluation that follows a recipe's pretraining (its protocol in carl_scale.eval.transfer)
TRANSFER_DATASET = {"debug": "synthetic", "pennaction": "pennaction", "finegym": "finegym", "pouring": "pouring",
                    "k400": "pennaction"}
PAPER = {"sigma2": 10.0, "tau": 0.1, "eps1": 5.0, "lam": 0.3}
MAX_FAILURES = 2  # retries of a trial that raised, each from its last checkpoint
LABEL = {"sigma2": "σ²", "tau": "τ", "eps1": "ε₁ (%)", "lam": "λ"}


def local(path: str) -> bool:
    """A path on this machine's file system (not a URL, a ``pipe:`` command or a list)."""
    return isinstance(path, str) and "://" not in path and not path.startswith("pipe:")


def validation_shards(base: RunConfig) -> str:
    """Where the trials' validation videos are (absolute where local: Ray runs each trial in a
    directory of its own), or the one-line refusal of a sweep that has none."""
    from carl_scale.eval.quick import end_of_run_shards

    val, why = end_of_run_shards(base.data.shards, base.eval.shards,
                                 base.synthetic.val_videos if base.synthetic is not None else None)
    if val is None:
        raise ConfigError(f"the sweep scores trials on validation videos, and there are none: {why}")
    return str(Path(val).resolve()) if local(val) else val


def scored_split_warning(val: str) -> str | None:
    """What to say when the trials' validation videos are the split a transfer protocol reports
    (PennAction, FineGym and Pouring have no other held-out split: their ``val`` is the paper's
    test set), so the sweep would choose its values on the numbers it then reports; None if not."""
    from carl_scale.data.manifest import read_manifest
    from carl_scale.eval.transfer import PROTOCOLS

    manifest = read_manifest(val) if local(val) and Path(val).is_dir() else None
    dataset = (manifest or {}).get("dataset")
    if dataset not in PROTOCOLS or dataset == "synthetic":  # (the embedded set is a demonstration, not a benchmark)
        return None
    return (f"the trials are scored on the val split of {val}, which launch/transfer_eval.sh {dataset} reports "
            f"as its test numbers: values chosen on it overstate them. Hold out videos of a training split "
            f"instead (e.g. python -m shards.folder ... --val-fraction 0.1) and pass that as --val-shards")


def prepare(cfg: SweepConfig) -> tuple[RunConfig, str]:
    """(the run config every trial starts from, the validation shards); refuses what would fail
    later, inside Ray, trial by trial (a bad recipe, --weak on data without video labels, no
    validation videos, a trial config the run refuses, a missing --pretrained file)."""
    from carl_scale.train.trainer import check_local_files

    overrides = {}
    if cfg.shards is not None:
        overrides["data.shards"] = cfg.shards
    if cfg.init_from is not None:
        overrides["init_from"] = cfg.init_from
    if cfg.eps2 is not None and cfg.weak:  # (a sweep started before --eps2 was refused without --weak: ignored)
        overrides["loss.eps2"] = cfg.eps2
    if cfg.weak:  # (each trial draws its own; the lowest, so that the base config is never refused for it)
        overrides["loss.eps1"] = cfg.eps1[0]
    start = load_run_config(cfg.config) if cfg.config is not None else recipe(cfg.recipe)
    base = configure(start, overrides, weak=cfg.weak)
    if cfg.weak and not cfg.resume and cfg.eps1[1] > base.loss.eps2:  # draws above ε₂: refused inside Ray
        raise ConfigError(f"--eps1 {cfg.eps1[0]:g}:{cfg.eps1[1]:g} reaches above ε₂ = {base.loss.eps2:g} (a positive "
                          f"is never a negative): lower its HI, or raise --eps2")
    # Ray runs each trial in a working directory of its own: every path a trial reads, absolute
    if base.init_from is not None:
        base = dataclasses.replace(base, init_from=str(Path(base.init_from).resolve()))
    if base.model.pretrained is not None:
        base = dataclasses.replace(base, model=dataclasses.replace(base.model,
                                                                   pretrained=str(Path(base.model.pretrained).resolve())))
    shards = base.data.shards
    if local(shards):  # Ray's workers run elsewhere: absolute paths
        absolute = str(Path(shards).resolve())
        # the synthetic set moves (it is written later, before Ray starts); other shards are the user's
        base = configure(base, data_dir=absolute) if base.synthetic is not None else \
            configure(base, {"data.shards": absolute})
    if local(base.eval.shards):  # (--val-shards, saved in base_config.json too)
        base = configure(base, {"eval.shards": str(Path(base.eval.shards).resolve())})
    val = validation_shards(base)
    # what each trial will run, built once here: a setting its overrides make invalid (a warm-up
    # of more than --steps), or a missing --pretrained file, is one line now, not every trial's error
    trial_cfg = configure(base, trial_overrides(cfg.directory / "trials" / "check", cfg.steps, cfg.report_every))
    if not cfg.resume:  # (a resumed trial reads its checkpoint, not the weights it started from)
        check_local_files(trial_cfg)
    return base, val


def as_started(out: Path, base: RunConfig, resume: bool) -> RunConfig:
    """The config trials start from. A sweep writes it to ``base_config.json`` when it starts and
    reads it back on ``--resume``, so the trials it resumes and those it starts later build one
    architecture even when carl_scale's defaults moved in between. A sweep started before that
    file existed ran the encoder carl_scale had then (see :class:`ModelConfig.upgrade_saved`)."""
    if not resume:
        return base
    saved = out / "base_config.json"
    if saved.is_file():
        return load_run_config(str(saved))
    d = to_dict(base)
    d["model"] = ModelConfig.upgrade_saved({k: v for k, v in d["model"].items()
                                            if k not in ("pos_encoding", "final_norm")})
    return from_dict(RunConfig, d)


def _space(cfg: SweepConfig) -> dict:
    from ray import tune

    space = {}
    for name in cfg.swept():
        lo, hi = getattr(cfg, name)
        space[name] = lo if lo == hi else (tune.loguniform(lo, hi) if LOG_SCALE[name] else tune.uniform(lo, hi))
    return space


def _cpus() -> int:
    """The CPUs this process may use (a container reports the host's count otherwise)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _tune(cfg: SweepConfig, base: RunConfig, val: str):
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from carl_scale.tuning.asha import SWEEP_DIR_ENV, RecordedASHA

    out = cfg.directory
    os.environ[SWEEP_DIR_ENV] = str(out.resolve())  # (the scheduler runs here, in the driver)
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=to_dict(base), directory=str(out), steps=cfg.steps,
                             report_every=cfg.report_every, val_shards=val,
                             objective=cfg.objective, val_videos=cfg.val_videos),
        {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    # Ray reports usage statistics over the network unless told not to; nothing here goes online
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # what the trials' interpreters need, on this machine and on a cluster's other nodes (which do
    # not inherit this process's environment)
    env = {k: os.environ[k] for k in ("PYTHONPATH", "CARL_SCALE_NO_PROGRESS", "RAY_USAGE_STATS_ENABLED")
           if k in os.environ}
    if os.environ.get("RAY_ADDRESS"):  # a Ray cluster: its own resources
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env})
    else:  # this machine: the CPUs this process may use (a container reports the host's otherwise)
        ray.init(num_cpus=max(_cpus(), math.ceil(cfg.cpus_per_trial)), include_dashboard=False,
                 object_store_memory=200 * 2**20, configure_logging=False, runtime_env={"env_vars": env})
    try:
        if cfg.resume:
            tuner = tune.Tuner.restore(str(out / "ray"), trainable, resume_unfinished=True, resume_errored=True)
        else:
            scheduler = RecordedASHA(time_attr="step", max_t=cfg.steps, grace_period=cfg.report_every,
                                     reduction_factor=2)
            tuner = tune.Tuner(
                trainable, param_space=_space(cfg),
                tune_config=tune.TuneConfig(metric="objective", mode="max", scheduler=scheduler,
                                            num_samples=cfg.trials, reuse_actors=False,
                                            search_alg=BasicVariantGenerator(random_state=cfg.seed)),
                run_config=tune.RunConfig(name="ray", storage_path=str(out),
                                          failure_config=tune.FailureConfig(max_failures=MAX_FAILURES)))
        return tuner.fit()
    finally:
        ray.shutdown()


def _rows(grid, cfg: SweepConfig, stopped: dict[str, int | None] | None) -> list[dict]:
    """One row per trial; ``stopped``: the trials ASHA stopped at a rung, with the step (the others
    that ended short without an error were stopped by an interrupt: unfinished), None where the
    sweep kept no such record (started before it was kept: every short trial reads as ASHA's)."""
    from carl_scale.tuning.asha import asha_stopped_at

    rows = []
    for result in grid:
        metrics = result.metrics or {}
        step = int(metrics.get("step", 0) or 0)
        trial_id = metrics.get("trial_id")  # (none: a trial that never reported, e.g. never started)
        name = f"trial_{metrics['trial_id']}" if "trial_id" in metrics else Path(result.path).name
        # an error with retries left: Ray had put the trial back in its queue when an interrupt came
        retrying = stopped is not None and 0 < failures(cfg.directory / "trials" / name) <= MAX_FAILURES
        status = ("unfinished" if retrying else "error") if result.error is not None else \
            "diverged" if metrics.get("diverged") else "finished" if step >= cfg.steps else \
            "stopped early" if asha_stopped_at(stopped, trial_id, step) else "unfinished"
        rows.append({"trial": name, **{k: result.config.get(k) for k in cfg.swept()},
                     "objective": metrics.get("objective", float("nan")), "steps": step, "status": status})
    # finished trials first (one ASHA stopped scored lower at a rung), best objective first
    return sorted(rows, key=lambda r: (r["status"] != "finished",
                                       -r["objective"] if r["objective"] == r["objective"] else math.inf))


def best_row(rows: list[dict]) -> dict | None:
    """The best trial that ran as the sweep asked: finished, or stopped by ASHA at a rung (rows
    come sorted, finished first). Not one that failed after a report (Ray retried it twice), nor
    one an interrupt cut short (its score is from fewer steps than its rivals had)."""
    return next((r for r in rows if r["objective"] == r["objective"] and r["status"] in ("finished", "stopped early")),
                None)


def _plot(rows: list[dict], cfg: SweepConfig, path: Path, best: dict | None) -> None:
    from carl_scale.eval.pictures import figure, save

    names = cfg.swept()
    fig = figure((4 * len(names), 3.4))
    axes = fig.subplots(1, len(names), squeeze=False)
    colour = {"finished": "tab:blue", "stopped early": "tab:orange", "unfinished": "tab:gray", "error": "tab:red"}
    for ax, name in zip(axes[0], names):
        for status, c in colour.items():
            pts = [(r[name], r["objective"]) for r in rows if r["status"] == status and r["objective"] == r["objective"]]
            if pts:
                ax.scatter(*zip(*pts), c=c, label=status, s=30)
        if best is not None:
            ax.scatter([best[name]], [best["objective"]], marker="*", s=220, c="gold", edgecolors="k",
                       label="best", zorder=3)
        ax.axvline(PAPER[name], color="grey", ls="--", lw=1, label="paper")
        if LOG_SCALE[name]:
            ax.set_xscale("log")
        ax.set_xlabel(LABEL[name])
        ax.set_ylabel(cfg.objective)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"sweep {cfg.name}: {cfg.objective} on validation videos, {len(rows)} trials")
    save(fig, path, dpi=110)


def write_results(rows: list[dict], cfg: SweepConfig, base: RunConfig) -> dict:
    """results.csv / .md, objective.png and (once no trial is left unfinished) best_config.json in
    the sweep's directory."""
    out = cfg.directory
    keys = ["trial", *cfg.swept(), "objective", "steps", "status"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    text = table([tuple(fmt(r[k]) for k in keys) for r in rows], tuple(keys))
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + \
         ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    (out / "results.md").write_text(f"# Sweep {cfg.name}: {cfg.objective} on validation videos, "
                                    f"{cfg.steps} steps per trial\n\n" + "\n".join(md) + "\n")
    best = best_row(rows)
    _plot(rows, cfg, out / "objective.png", best)
    summary = {"table": text, "rows": rows}
    unfinished = sum(r["status"] == "unfinished" for r in rows) + max(0, cfg.trials - len(rows))
    if unfinished:  # interrupted: no best yet (a --resume finishes the trials and chooses)
        summary["unfinished"] = unfinished
    elif best is not None:
        run_dir = str(out / "best_run")
        best_cfg = configure(base, {**overrides_of({k: best[k] for k in cfg.swept()}), "run_dir": run_dir})
        (out / "best_config.json").write_text(json.dumps(to_dict(best_cfg), indent=2, sort_keys=True) + "\n")
        # the evaluation that follows: the recipe's dataset, or this data with the generic protocol
        dataset = f"synthetic --shards {base.data.shards}" if cfg.config is not None else \
            TRANSFER_DATASET[cfg.recipe] + (f" --shards {cfg.shards}" if cfg.shards is not None
                                            and TRANSFER_DATASET[cfg.recipe] == cfg.recipe else "")
        summary.update(best=best, pretrain=f"python launch/pretrain_k400.py --config {out / 'best_config.json'}",
                       transfer=f"launch/transfer_eval.sh {dataset} --run-dir {run_dir} --out {out / 'transfer'}")
    return summary


def run_sweep(cfg: SweepConfig) -> dict:
    """The whole sweep; returns the summary (table, rows, best trial, the two next commands)."""
    from ray import tune

    from carl_scale.tuning.asha import start_record, stopped_by_asha

    out = cfg.directory
    experiment = out / "ray"
    if cfg.resume:  # the sweep as it was started; only where it is comes from this call
        if not (out / "sweep.json").is_file() or not tune.Tuner.can_restore(str(experiment)):
            raise ConfigError(f"--resume: there is no sweep to continue in {out}")
        if not _ray_started(experiment):
            raise ConfigError(f"--resume: the sweep in {out} stopped before Ray saved its first state (no trial had "
                              f"run): start it again without --resume")
        cfg = dataclasses.replace(from_dict(SweepConfig, json.loads((out / "sweep.json").read_text())),
                                  out=str(out), resume=True)
    if cfg.resume and (out / "base_config.json").is_file():
        # the trials' config as it was started (its paths absolute), and its validation videos: the
        # recipe, --config and paths are not read again from wherever this call runs
        base = load_run_config(str(out / "base_config.json"))
        val = validation_shards(base)
    else:
        base, val = prepare(cfg)
        base = as_started(out, base, cfg.resume)  # (a sweep from before base_config.json: its encoder)
    if not cfg.resume and experiment.exists() and _ray_started(experiment):
        raise ConfigError(f"{out} holds a sweep already: continue it with --resume, or give another --name/--out")
    # (both before anything is written: the synthetic shards, the sweep's directory)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: name a directory for the sweep")
    if cfg.gpus_per_trial > 0 and not os.environ.get("RAY_ADDRESS"):
        import torch

        if not torch.cuda.is_available():  # (Ray would wait for a GPU forever)
            raise ConfigError(f"--gpus-per-trial {cfg.gpus_per_trial:g}: this machine has no GPU; leave the flag "
                              f"out to train the trials on the CPU")
    if base.synthetic is not None:  # once, here: trials never race to write the shards
        from carl_scale.datasets.synthetic import ensure_synthetic_shards

        ensure_synthetic_shards(base.data.shards, base.synthetic, progress=progress_wanted())
    if not cfg.resume and experiment.exists():
        # Ray writes tuner.pkl as the Tuner is built and its state at the first step: a sweep stopped
        # between the two holds nothing to keep (no trial ran), and would block both a resume and this
        print(f"{experiment}: a sweep stopped before its first trial; starting again", flush=True)
        shutil.rmtree(experiment)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:  # (its paths absolute: a --resume may run from another directory)
        start_record(out)
        paths = {k: str(Path(v).resolve()) for k in ("config", "shards", "init_from")
                 if local(v := getattr(cfg, k))}
        (out / "sweep.json").write_text(json.dumps(to_dict(dataclasses.replace(cfg, out=str(out), **paths)), indent=2,
                                                   sort_keys=True) + "\n")
        (out / "base_config.json").write_text(json.dumps(to_dict(base), indent=2) + "\n")
    if (warning := scored_split_warning(val)) is not None:
        print(f"warning: {warning}", flush=True)
    grid = _tune(cfg, base, val)
    summary = write_results(_rows(grid, cfg, stopped_by_asha(out)), cfg, base)
    summary["failed"] = [_last_line(r.error) for r in grid if r.error is not None]
    summary["warning"] = scored_split_warning(val)
    summary["sweep"] = cfg  # the settings it ran with (a resumed sweep's are its saved ones)
    return summary


def _ray_started(experiment: Path) -> bool:
    """Whether Ray saved the experiment's state (trials, their status) there: what a restore reads."""
    return any(experiment.glob("experiment_state-*.json"))


def _last_line(error: BaseException) -> str:
    """A failed trial's own error (Ray wraps it in its traceback)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__
