"""Interpreter-lock benchmark: what a busy background thread costs a loop of short torch operators
(a training step queueing kernels), against the same loop alone and beside the same work in a
process of its own, in one process. Why ``--finish-in process`` exists (carl_scale.data.finish_process).

    python -m carl_scale.bench.gil
    python -m carl_scale.bench.gil --python-us 100 --ops 3000 --switch-ms 5 0.5

The background work alternates a stretch of pure Python (``--python-us``) with one small torch
operator, as a finishing thread alternates its Python with crops, colour and DALI calls. Every
torch operator releases the lock while it runs; CPython gives a released lock to whichever thread
takes it first, and a thread that retakes it within microseconds usually beats one that sleeps on
it, so the measured loop waits. ``sys.setswitchinterval`` (``--switch-ms``; CPython's default 5
ms) bounds the wait for a lock held by pure Python, not for one released and retaken. On a GPU,
where each kernel launch is such an operator, this is the host time a step loses to finishing
threads; a process of its own has its own lock, and costs only the cores it uses.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import threading
import time

import torch

from carl_scale.tables import table


def _busy(stop, python_us: float, started=None) -> None:
    y = torch.zeros(1)
    n = max(1, int(python_us * 20))  # ~20 additions per microsecond of CPython
    if started is not None:
        started.set()
    while not stop.is_set():
        s = 0
        for i in range(n):
            s += i
        y.add_(1)


def _loop(ops: int, windows: int = 10) -> float:
    """Microseconds per operator of a loop of small in-place additions, timed in ``windows``
    stretches, each after a short sleep. Why: which of two threads keeps the lock is decided at
    the start and then tends to hold (each retakes it before the other wakes). Timed in one
    stretch, about one run in six here found the loop keeping it and the busy thread starved
    (2-3x instead of thousands); each sleep hands the lock back, so the windows sample both."""
    x = torch.zeros(1)
    per, total = max(1, ops // windows), 0.0
    for _ in range(windows):
        time.sleep(0.001)
        t0 = time.perf_counter()
        for _ in range(per):
            x.add_(1)
        total += time.perf_counter() - t0
    return 1e6 * total / (per * windows)


def measure(ops: int, python_us: float, switch_s: float) -> dict[str, float]:
    """Microseconds per operator: alone, beside a busy thread, beside a busy process."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(switch_s)
    try:
        _loop(ops)  # warm
        alone = _loop(ops)
        stop = threading.Event()
        thread = threading.Thread(target=_busy, args=(stop, python_us), daemon=True)
        thread.start()
        time.sleep(0.05)
        beside_thread = _loop(max(50, ops // 20))  # (slow: fewer)
        stop.set()
        thread.join()
        ctx = mp.get_context("spawn")
        pstop, pstarted = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_busy, args=(pstop, python_us, pstarted), daemon=True)
        proc.start()
        # timed once its loop runs (a fixed wait could time the row before it, on a loaded machine)
        if not pstarted.wait(120):
            raise RuntimeError("the busy process did not start its loop within 120 s")
        time.sleep(0.05)
        beside_process = _loop(ops)
        pstop.set()
        proc.join()
    finally:
        sys.setswitchinterval(old)
    return {"alone": alone, "thread": beside_thread, "process": beside_process}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--ops", type=int, default=3000, help="operators timed per row (a tenth beside the thread)")
    p.add_argument("--python-us", type=float, default=100.0, help="the background work's Python stretch, us")
    p.add_argument("--switch-ms", type=float, nargs="+", default=[5.0, 0.5],
                   help="interpreter switch intervals to measure (CPython's default: 5)")
    a = p.parse_args(argv)
    if a.ops < 50 or a.python_us <= 0 or any(s <= 0 for s in a.switch_ms):
        p.error("--ops must be >= 50, --python-us and --switch-ms > 0")
    rows, out = [], []
    for ms in a.switch_ms:
        r = measure(a.ops, a.python_us, ms / 1000)
        out.append({"switch_ms": ms, **r})
        rows.append((f"{ms:g}", f"{r['alone']:.1f}", f"{r['thread']:.1f}", f"{r['thread'] / r['alone']:.0f}x",
                     f"{r['process']:.1f}", f"{r['process'] / r['alone']:.1f}x"))
    print(f"a torch operator's host time (us) beside background work alternating {a.python_us:g} us of Python "
          f"with a torch operator ({torch.get_num_threads()} torch threads, Python {sys.version.split()[0]})")
    print(table(rows, ("switch ms", "alone", "beside a thread", "x", "beside a process", "x")))
    return out


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("carl_scale.bench.gil", main)
