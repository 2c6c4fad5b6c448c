"""End-to-end benchmark: the trainer's step fed by its data loader from shards, against the same
step fed one batch already on the device, in one process.

    python -m carl_scale.bench.e2e                                          # CPU, debug flavor
    python -m carl_scale.bench.e2e --flavor r50 --frames 80 --batch 2 --workers 8 \\
        --height 256 --width 340 --payload jpeg --write-workers 16         # on a GPU
    python -m carl_scale.bench.e2e ... --decoder pyav     # decoding in the CPU workers instead
    python -m carl_scale.bench.e2e ... --set parallel.compile=objective data.nvjpeg_hw_load=1
    python -m carl_scale.bench.e2e ... --set data.finish_in=thread    # finishing in threads of this process

All rows use one :class:`~carl_scale.train.trainer.Trainer` (the engine and the loader the training
run builds; ``--decoder auto``: DALI on a GPU). ``from shards`` times ``Trainer.train_step`` on the
loader's batches, the wait for each batch included, in steady state (the batches the loader made
while the first steps compiled are taken without a step, then as many untimed steps run as its
buffers hold: counted, those batches made the first timed steps free); ``resident`` times it on one
batch kept on the device: with the loader idle (waited for, up to ``--settle`` seconds, until it
has filled its buffers and gone quiet, so that its refill does not share the row), and once more
after the loader is closed. That last row is the step's own speed and every ratio's reference: 1.0
means the loader keeps the step fed. An ``idle`` row below it is what the loader's mere presence
costs (a finishing process's CUDA context, say). ``data wait`` is the share of the loader row spent
waiting for the next batch. ``resident, loader alongside`` steps on the resident batch while a
thread (on a CUDA stream of its own) takes one loader batch per step and drops it: what the
loader's work (its GPU kernels, its host threads) costs the step without any waiting, so a loss not
explained by ``data wait`` shows up here. On a CPU the finishing runs in that thread, beside the
step, where training runs it between steps: there the row overstates. ``loader ms/batch``: the
finishing step's host time per batch (decoding on the GPU, crops, colour), and on a GPU the time
between two events around it on its CUDA stream (idle gaps while the host queues work included;
work DALI queues on streams of its own not seen). With ``--set data.finish_threads=N`` the batches
are finished N at a time, so these are each batch's own times, not the loader's cost per batch
(about that divided by N when the threads overlap well); where the finishing runs in a process of
its own (``--finish-in`` auto on a GPU) the host times are measured in that process, and its GPU
times are not (``--set data.finish_in=thread`` for them). ``step host ms``: the host's time to
queue one training step in each row; on a GPU, where the step runs ahead of the device, a rise with
the loader alongside is the step's Python waiting for the host (the interpreter lock, cores), not
for the GPU. ``peak GiB``: this process's peak GPU memory in the row (a finishing process's own is
not counted). Whether the loader worked in a row: ``batches finished`` by finishing threads in this
process (not counted for a finishing process, which reports batches as they are taken), and
``loader procs' cores``, the CPU that this process's descendants kept busy (workers, a finishing
process and its workers; any other child too, such as Inductor's idle compile workers). The run is
one epoch that does not end (it sets ``data.epoch_samples``): an epoch's end restarts the workers'
streams, once in thousands of steps on Kinetics. ``loader alone``, last before the loader closes:
its batches taken flat out with no step (buffers emptied first), the samples/s it can deliver;
against the closed row, the issue's target 2 (>= 1.2x) in this process, with the trainer's loader.
Built from the flavor's own recipe, as ``bench.step`` builds its rows (r50: ``k400``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from carl_scale.bench.data import BENCH_SHARD_VIDEOS, TEXTURE_HELP, texture_suffix
from carl_scale.bench.step import bench_config, default_recipe, parse_overrides
from carl_scale.models.flavors import FLAVORS
from carl_scale.tables import table

# batches of the run's one epoch beyond those the rows take (the emptied buffers' and the loader's
# own run-ahead): bench.e2e never reaches an epoch's end
EPOCH_SPARE_BATCHES = 240
IDLE_CORES = 0.05  # the loader's processes below this: idle (their threads wake to poll now and then)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    """This process's peak GPU memory since the last reset (a finishing process's not included)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _descendants_cpu_s() -> dict[int, float] | None:
    """CPU seconds so far of each live descendant process of this one (the loader's workers, a
    finishing process and its workers), from Linux's /proc; None where there is none."""
    if not os.path.isdir("/proc/self/task"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # (gone since the listing)
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after the name: state, ppid, ..., utime, stime
        parent[int(entry)], cpu[int(entry)] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
    mine, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        for child in [c for c, p in parent.items() if p == pid]:
            mine[child] = cpu[child]
            todo.append(child)
    return mine


def _cores(before: dict[int, float] | None, after: dict[int, float] | None, wall: float) -> float | None:
    """The cores the descendants kept busy between two readings (processes alive at the second)."""
    if before is None or after is None:
        return None
    return sum(s - before.get(pid, 0.0) for pid, s in after.items()) / wall


def _wait_until_quiet(made: list, counted: bool, limit: float) -> float | None:
    """Seconds until the loader was quiet over half a second (no batch finished, where ``made``
    counts them, and its processes below ``IDLE_CORES``); None if it was not within ``limit``."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        n, cpu, w = len(made), _descendants_cpu_s(), time.perf_counter()
        time.sleep(0.5)
        cores = _cores(cpu, _descendants_cpu_s(), time.perf_counter() - w)
        if (not counted or len(made) == n) and (cores is None or cores < IDLE_CORES):
            return time.perf_counter() - t0
    return None


def run(a) -> dict:
    from carl_scale.train.engine import process_group
    from carl_scale.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp, process_group() as (rank, world, device), contextlib.ExitStack() as on:
        # the flavor's own recipe, as bench.step builds its rows (r50: k400's 2 layers, batch
        # negatives, the paper's augmentation), so the closed row is that step and the loader
        # does the work K400 training gives it
        cfg = bench_config(default_recipe(a.flavor), a.flavor, {
            "data.shards": a.shards, "run_dir": str(Path(tmp) / "run"), "steps": 4 * a.steps + 2 * a.warmup + 1,
            # one epoch for the whole run (the shards are read over and over): an epoch's end
            # restarts the workers' streams, which a Kinetics-sized epoch does once in thousands of steps
            "data.epoch_samples": a.batch * (4 * a.steps + 2 * a.warmup + EPOCH_SPARE_BATCHES + 6 * a.workers),
            "data.batch_size": a.batch, "data.temporal.num_frames": a.frames, "data.num_workers": a.workers,
            "data.decoder": a.decoder, "data.cpu_decode_share": a.cpu_decode_share, "eval.enabled": False,
            **a.overrides})
        trainer = Trainer(cfg, rank=rank, world=world, device=device)
        on.callback(trainer.loader.close)  # (whatever fails: the workers and a finishing process stop)
        on.enter_context(trainer.step_stream())  # (--set parallel.step_priority=high: as training runs)

        def endless():
            while True:
                yield from trainer.loader

        batches = endless()
        for _ in range(a.warmup):
            trainer.train_step(next(batches))
        _sync(device)
        loader = trainer.loader
        # The loader filled its buffers while the first steps compiled (a minute on a GPU): taken
        # by timed steps, they made those steps free and the loader look faster than it is (the
        # first two leases' rows: 10 timed steps, 4-8 of them on batches made beforehand). So they
        # are taken first, without a step; then as many untimed steps as the buffers hold, in which
        # a loader faster than the step fills them again (working flat out, as it never does in
        # steady training) and a slower one keeps them empty. The timed row then sees the loader
        # at the step's pace, or the step at the loader's.
        emptied = loader.batches_ahead()
        for _ in range(emptied):
            next(batches)
        for _ in range(max(a.warmup, emptied)):
            trainer.train_step(next(batches))
        _sync(device)
        # every batch the finishing threads finish, for the whole run: the fed row's host times, and
        # per row how many were finished in it (with a finishing process, entries come as batches
        # are taken, so none there)
        loader.finish_times = made = []
        counted = not loader.finish_process
        wait = queue = 0.0
        padded = 0  # fed batches with a video shorter than T: the masked step, another cost than the full one
        _reset_peak(device)
        fed_cpu, fed_made = _descendants_cpu_s(), len(made)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            w = time.perf_counter()
            batch = next(batches)
            q = time.perf_counter()
            padded += batch.padded is not False  # (None, not known: the masked step, as the objective runs it)
            trainer.train_step(batch)
            wait, queue = wait + q - w, queue + time.perf_counter() - q
        _sync(device)
        fed_wall = time.perf_counter() - t0
        loader_cores = {"from shards": _cores(fed_cpu, _descendants_cpu_s(), fed_wall)}
        finished = {"from shards": len(made) - fed_made if counted else None}
        fed, fed_wait, fed_queue = a.steps * a.batch / fed_wall, wait / fed_wall, 1000 * queue / a.steps
        # each row as it is measured: a run cut short by its time limit still shows what it had
        print(f"measured from shards: {fed:.2f} samples/s, data wait {100 * fed_wait:.0f}%", flush=True)
        peaks = {"from shards": _peak_gib(device)}
        times = made[fed_made:len(made)]  # (a thread may be mid-batch: its entry, if any, comes later)
        host_ms = 1000 * sum(t[0] for t in times) / max(1, len(times))
        gpu_ms = None
        timed = [t for t in times if t[2] is not None]  # (none with --finish-in process: the events stay there)
        if device.type == "cuda" and timed:
            for t in timed:
                t[2].synchronize()
            gpu_ms = sum(t[1].elapsed_time(t[2]) for t in timed) / len(timed)
        resident_batch = next(batches).to(device)
        trainer.train_step(resident_batch)
        _sync(device)

        def resident_steps(row: str) -> tuple[float, float]:
            """(samples/s, host ms to queue a step); the row's peak memory into ``peaks``, the
            loader's processes' CPU use into ``loader_cores``, its finished batches into ``finished``"""
            _reset_peak(device)
            cpu, before = _descendants_cpu_s(), len(made)
            queue, t0 = 0.0, time.perf_counter()
            for _ in range(a.steps):
                q = time.perf_counter()
                trainer.train_step(resident_batch)
                queue += time.perf_counter() - q
                tick.release()
            _sync(device)
            wall = time.perf_counter() - t0
            print(f"measured resident batch, loader {'idle' if row == 'resident' else row}: "
                  f"{a.steps * a.batch / wall:.2f} samples/s", flush=True)
            loader_cores[row] = _cores(cpu, _descendants_cpu_s(), wall)
            finished[row] = len(made) - before if counted and row != "closed" else None
            peaks[row] = _peak_gib(device)
            return a.steps * a.batch / wall, 1000 * queue / a.steps

        tick = threading.Semaphore(0)
        # The loader refills its buffers once the step stops taking batches: a row timed right
        # after the last one would share the GPU (and the host) with that refill. On 2026-11-27
        # the 10-step "idle" row (0.2-0.3 s) ran so, 19-25% below the threads' row with a
        # finishing process beside it. Waited for until it is quiet, the loader is idle in the row
        # (the table's finished batches and processes' CPU say whether it was).
        settled = _wait_until_quiet(made, counted, a.settle)
        resident, resident_queue = resident_steps("resident")
        # the loader's work alongside, paced at one batch per step as in training, batches dropped
        tick, stop, failed = threading.Semaphore(0), threading.Event(), []

        def drain() -> None:
            try:
                # on a stream of its own: taking a batch makes the taker's stream wait for its
                # finishing, which on the step's stream would be a wait, not interference
                own = torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()
                with own:
                    while tick.acquire() and not stop.is_set():
                        next(batches)
            except BaseException as exn:  # raised in the main thread below
                failed.append(exn)

        thread = threading.Thread(target=drain, name="e2e-drain", daemon=True)
        thread.start()
        try:
            alongside, alongside_queue = resident_steps("alongside")
        finally:
            stop.set()
            tick.release()
            thread.join()
        if failed:
            raise failed[0]
        # The loader alone, taken flat out with no step (its buffers emptied first, untimed): the
        # samples/s it can deliver, against the closed row's step, is the target 2 (>= 1.2x)
        # measured in this process with the trainer's own loader settings
        try:
            for _ in range(loader.batches_ahead()):
                next(batches)
            _sync(device)
            cpu, t0 = _descendants_cpu_s(), time.perf_counter()
            for _ in range(a.steps):
                next(batches)
            _sync(device)
            wall = time.perf_counter() - t0
            alone = a.steps * a.batch / wall
            print(f"measured the loader alone: {alone:.2f} samples/s", flush=True)
            loader_cores["loader alone"] = _cores(cpu, _descendants_cpu_s(), wall)
            finished["loader alone"], peaks["loader alone"] = None, None
        finally:
            trainer.loader.close()
        # the same steps once the loader is closed (its threads, or its process, gone): the step's
        # own speed, the reference of every ratio. On the H200 the resident row with a finishing
        # process idle beside it ran 19-25% below the threads' (a second CUDA context on the GPU?):
        # this row tells an idle loader's cost from the step's
        closed, closed_queue = resident_steps("closed")
        name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        return {"device": name, "decoder": trainer.loader.decoder.name + "/" + trainer.loader.decoder.device,
                "from shards": fed, "resident": resident, "alongside": alongside, "closed": closed,
                "loader alone": alone,
                "data wait": fed_wait, "step host ms": {"resident": resident_queue, "alongside": alongside_queue,
                                                        "from shards": fed_queue, "closed": closed_queue,
                                                        "loader alone": None},
                "peak GiB": peaks, "loader cores": loader_cores, "finished": finished, "emptied": emptied,
                "settled s": settled, "epochs ended": loader.epoch, "loader host ms": host_ms,
                "loader gpu ms": gpu_ms, "config": cfg, "padded": padded / a.steps,
                "resident padded": resident_batch.padded is not False}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--shards", help="training shards (default: synthetic ones, made if absent)")
    p.add_argument("--data-dir", default="data/bench", help="where the default synthetic shards go")
    p.add_argument("--payload", choices=("video", "jpeg"), default="video", help="of the default synthetic shards")
    p.add_argument("--texture", choices=("natural", "none"), default="natural", help=TEXTURE_HELP)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--write-workers", type=int, default=1)
    p.add_argument("--decoder", choices=("auto", "dali", "pyav"), default="auto",
                   help="the loader's decoder (pyav on a GPU machine: CPU decoding in the workers)")
    p.add_argument("--cpu-decode-share", type=float, default=0.0,
                   help="with the GPU decoder: the share of the videos decoded by PyAV in the workers")
    p.add_argument("--flavor", default="debug", choices=sorted(FLAVORS))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps at the start (compiling); after the loader's buffers are emptied, as many "
                        "untimed steps as they held, and at least this many")
    p.add_argument("--settle", type=float, default=10.0,
                   help="at most this many seconds of waiting for the loader to fill its buffers and go quiet "
                        "before the idle row")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="more of the run's settings, e.g. parallel.compile=objective data.nvjpeg_hw_load=1")
    a = p.parse_args(argv)
    a.overrides = {}
    for text in a.set:
        a.overrides.update(parse_overrides(text, prefixes=("parallel.", "data.", "loss."), flag="--set"))
    try:  # refused here, before any shards are written
        bench_config(default_recipe(a.flavor), a.flavor, {"data.shards": "(not read here)", **a.overrides})
    except Exception as exn:
        p.error(f"--set: {exn}")
    if min(a.height, a.width, a.write_workers, a.frames, a.batch, a.steps, a.warmup) < 1 or a.workers < 0:
        p.error("every count must be >= 1 (--workers >= 0)")
    if not a.settle >= 0:
        p.error(f"--settle must be >= 0 seconds, got {a.settle}")
    if not 0 <= a.cpu_decode_share <= 1:
        p.error("--cpu-decode-share must be in [0, 1]")
    if a.shards is None:
        from carl_scale.data.config import SyntheticConfig
        from carl_scale.datasets.synthetic import ensure_synthetic_shards

        # no video shorter than T: every batch takes the unmasked step the resident rows time (the
        # default 60-400 frames padded about half the batches at T = 240, mixing two steps in a row)
        shortest = max(SyntheticConfig.min_frames, a.frames)
        a.shards = str(Path(a.data_dir) / (f"e2e_{a.width}x{a.height}" + (f"_min{shortest}" if shortest >
                                                                           SyntheticConfig.min_frames else "")
                                             + texture_suffix(a.texture)) / a.payload)
        syn = SyntheticConfig(train_videos=max(48, a.batch * (a.steps + a.warmup + 4)), val_videos=24,
                              height=a.height, width=a.width, min_frames=shortest,
                              max_frames=max(SyntheticConfig.max_frames, 2 * shortest), texture=a.texture)
        ensure_synthetic_shards(a.shards, syn, payload=a.payload, max_samples=BENCH_SHARD_VIDEOS,
                                workers=a.write_workers, progress=False)
    r = run(a)
    settings = "".join(f", {k}={v}" for k, v in a.overrides.items())
    print(f"\nend to end on {r['device']}: flavor {a.flavor}, recipe {default_recipe(a.flavor)}, T={a.frames}, {a.batch} videos, {a.workers} workers, "
          f"decoder {r['decoder']}, shards {a.shards}{settings}")
    gpu = "-" if r["loader gpu ms"] is None else f"{r['loader gpu ms']:.1f}"
    ref = r["closed"]

    def row(name: str, key: str, *loader: str) -> tuple[str, ...]:
        peak, cores, made = r["peak GiB"].get(key), r["loader cores"].get(key), r["finished"].get(key)
        host = r["step host ms"][key]
        return (name, f"{r[key]:.2f}", f"{r[key] / ref:.2f}", "-" if host is None else f"{host:.1f}",
                "-" if peak is None else f"{peak:.2f}", "-" if made is None else str(made),
                "-" if cores is None else f"{cores:.2f}", *(loader or ("-", "-", "-")))

    print(table([row("resident batch, loader closed", "closed"),
                 row("resident batch, loader idle", "resident"),
                 row("resident batch, loader alongside", "alongside"),
                 row("from shards", "from shards", f"{100 * r['data wait']:.0f}%", f"{r['loader host ms']:.1f}", gpu),
                 row("loader alone, no step (target 2: x >= 1.2)", "loader alone")],
                ("step fed by", "samples/s", "x", "step host ms", "peak GiB", "batches finished", "loader procs' cores",
                 "data wait", "loader host ms/batch", "loader GPU ms/batch")))
    quiet = (f"quiet after {r['settled s']:.1f} s" if r["settled s"] is not None
             else f"NOT quiet within --settle {a.settle:g} s: the idle row had the loader working beside it")
    print(f"(from shards: timed after {r['emptied']} batches taken without a step and as many untimed steps; "
          f"before the idle row the loader was {quiet}; epochs ended: {r['epochs ended']})")
    print(f"(padded batches, a video shorter than T, take the masked step: {100 * r['padded']:.0f}% of the fed "
          f"ones; the resident batch is {'padded' if r['resident padded'] else 'not padded'}"
          + ("; the two rows time different steps: compare with care)" if 0 < r["padded"] < 1 or
             bool(r["padded"]) != r["resident padded"] else ")"))
    return r


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("carl_scale.bench.e2e", main)
