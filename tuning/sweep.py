"""Ray Tune sweep of σ² and τ (with --weak also ε₁ and λ) on validation videos, before transfer evaluation.

    python tuning/sweep.py                              # the embedded synthetic set, debug recipe, ~5 min on 2 CPUs
    python tuning/sweep.py --trials 12 --steps 200 --tau 0.05:0.3
    python tuning/sweep.py --weak --init-from runs/pretrain/checkpoints/latest    # σ², τ, ε₁, λ of weak supervision
    python tuning/sweep.py --recipe pennaction --shards data/pennaction --gpus-per-trial 1 --cpus-per-trial 8
    python tuning/sweep.py --resume                     # continue an interrupted sweep (same --name/--out)

Writes runs/sweep/<name>/: results.csv, results.md, objective.png, best_config.json (for
``launch/pretrain_k400.py --config``), and prints the table, the best values and the two commands
that follow: pretraining with them and its transfer evaluation.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from carl_scale.config import ConfigError, add_flags, from_dict, given_flags, iter_flags  # noqa: E402
from carl_scale.errors import run_cli  # noqa: E402
from carl_scale.tuning.config import SweepConfig  # noqa: E402


def parse(argv: list[str] | None = None) -> SweepConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected failure too")
    add_flags(p, SweepConfig, shown=SweepConfig())
    given = given_flags(p.parse_args(argv), SweepConfig)
    changed = sorted(set(given) - {"resume", "name", "out"})
    if given.get("resume") and changed:  # never silently ignored
        names = {fl.path: fl.flag for fl in iter_flags(SweepConfig)}
        raise ConfigError(f"--resume continues the sweep as it was started (its sweep.json): drop "
                          f"{', '.join(names[k] for k in changed)}, or start another sweep with --name")
    names = {fl.path: fl.flag for fl in iter_flags(SweepConfig)}
    if "recipe" in given and "config" in given:
        raise ConfigError("--recipe and --config both name the config every trial starts from; give one")
    weak_only = [k for k in ("eps1", "lam", "eps2") if k in given]
    if weak_only and not given.get("weak") and not given.get("resume"):  # (a resumed sweep has its own)
        raise ConfigError(f"{names[weak_only[0]]} is a weak-supervision setting, and this sweep is self-supervised "
                          f"(σ², τ): add --weak, or drop the flag")
    cfg = from_dict(SweepConfig, given)
    # (a fresh sweep's: one resumed is as it was started, sweep.json)
    if not cfg.resume and cfg.trials > 1 and all(getattr(cfg, k)[0] == getattr(cfg, k)[1] for k in cfg.swept()):
        raise ConfigError(f"--trials ({cfg.trials}) would train one config {cfg.trials} times: every swept range is "
                          f"one value ({', '.join(cfg.swept())}); widen a range, or give --trials 1")
    return cfg


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(argv)
    # Ray's workers start fresh interpreters: they find carl_scale from here, and draw no progress bars
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("CARL_SCALE_NO_PROGRESS", "1")
    from carl_scale.tuning.sweep import run_sweep

    try:
        summary = run_sweep(cfg)
    except KeyboardInterrupt:  # a second Ctrl-C (Ray takes the first, and returns as from the end)
        if not (cfg.directory / "ray").is_dir():  # (before Ray began: nothing to continue)
            raise
        raise ValueError(f"interrupted (Ctrl-C): continue the sweep with python tuning/sweep.py --resume --out "
                         f"{cfg.directory}") from None
    cfg = summary.get("sweep", cfg)  # a resumed sweep's own settings (its objective, its name)
    print(f"\nsweep {cfg.name}: {cfg.objective} on validation videos, best first\n{summary['table']}")
    if summary.get("unfinished"):  # Ray returns from an interrupt (Ctrl-C, SIGUSR1) as from the end
        raise ValueError(f"the sweep stopped with {summary['unfinished']} of {cfg.trials} trials unfinished "
                         f"(interrupted), so it has no best yet: continue it with python tuning/sweep.py --resume "
                         f"--out {cfg.directory}")
    if "best" in summary:
        b = summary["best"]
        values = ", ".join(f"{k}={b[k]:.4g}" for k in ("sigma2", "tau", "eps1", "lam") if k in b)
        print(f"\nbest: {values} ({cfg.objective} {b['objective']:.4f}, {b['trial']})")
        print(f"next: {summary['pretrain']}\n      {summary['transfer']}")
        if summary.get("warning"):
            print(f"warning: {summary['warning']}")
    else:  # not one trial scored: say why, and end non-zero
        failed = summary["failed"]
        diverged = sum(r.get("status") == "diverged" for r in summary["rows"])
        why = f"the first error: {failed[0]}" if failed else \
            "their losses went non-finite: lower --lr in the config, or narrow the ranges" if diverged else \
            "no trial reported a score"
        where = f"; each trial's error is in {cfg.directory / 'ray'}/*/error.txt" if failed else ""
        raise ValueError(f"no trial of the sweep scored ({len(failed)} of {len(summary['rows'])} failed, {diverged} "
                         f"diverged; {why}){where}")
    return summary


if __name__ == "__main__":
    run_cli("sweep.py", main)
