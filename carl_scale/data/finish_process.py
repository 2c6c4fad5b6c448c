"""Batches finished in a process of their own (``--finish-in process``): the GPU loader's decoding,
crops and colour run outside the training process, which receives each finished batch through
CUDA IPC.

Why a process: in threads (:func:`~carl_scale.data.prefetch.finish_ahead`) the finishing shares
one interpreter lock with the training step. PyTorch releases the lock around every operator, and
CPython hands a released lock to whichever thread retakes it first, so a thread that alternates
short Python stretches with operators (a finishing thread: ~150 operators and a DALI run per
batch) keeps taking it back from one that was woken to take it (the step: hundreds of kernel
launches). On this repo's CPU machine (Python 3.11) a 3 us torch operator took 0.06-16 ms
beside such a thread, 2.5-3.9 us beside the same work in a process (``python -m
carl_scale.bench.gil``). On the H200 the step lost 14-25% with the loader merely running
alongside, while waiting for data only 3-6% of the time (BENCHMARKS.md, end to end). A process
of its own has an interpreter of its own; what it shares with the step is the GPU (kernels of two
processes take turns on it rather than run side by side, without MPS), and the training process
keeps one thread of Python per batch (receiving and copying it).

How:

* the child (spawned: CUDA is up in the parent, and forking it is unsafe) builds the same
  :class:`~carl_scale.data.reader.VideoLoader` with the same seed, finishing in threads as the
  training process would, and serves one pass at a time from the state the parent sends (epoch,
  batch, worker positions): each finished batch, in order, with its slot (worker, resume point,
  skips) and its finishing time, over a ``torch.multiprocessing`` queue, its views as a CUDA IPC
  handle (CPU tensors in shared memory), its small tensors on the host;
* one thread of the parent receives them, up to two batches ahead of the step: it copies each
  batch's views into the training process's own memory on a stream of its own, waits for the copy, and
  frees the received views there. Why the copy: a received CUDA tensor, when freed, synchronises
  the freeing thread's current stream (PyTorch's guard against the producer reusing the memory
  too early), so freed in the step's thread it would stall the step. Every received tensor,
  drained ones included, is freed in that thread, on that stream;
* the parent keeps the loader's state, so checkpoints and resumes are unchanged; the child's
  failures are raised in the parent in the place of the batch they stopped; a child that dies is
  reported with its exit code (one alive is waited for, as a finishing thread is; only a stopped
  pass's drain has a limit) and the pass after that error starts a new one.

Memory: the child holds its own CUDA context and allocator cache, and up to about 6 batches of
views (its threads' ``GPU_PREFETCH_BATCHES`` and those being finished, one being sent); the
parent up to 4 (received, handed over, in the step, and the one before it, kept to stand in at the
epoch's end): about twice the threads' batches in flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import multiprocessing.util
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Iterator

import torch
import torch.multiprocessing as tmp

from carl_scale.data.batch import VideoBatch
from carl_scale.errors import STOP_SIGNALS, ignore_stop_signals

DRAIN_S = 60.0  # a stopped pass's end: at most a batch being finished, and the last one being sent
_POLL_S = 0.2


class ChildTraceback(Exception):
    """The finishing process's own traceback of the error raised here (its ``__cause__``)."""

    def __str__(self) -> str:
        return "\n\nin the finishing process:\n" + self.args[0]


class _Stopped(Exception):
    """The consumer stopped the pass (raised out of a wait in the receiving thread)."""


class FinishProcess:
    """A child process that finishes a :class:`VideoLoader`'s batches (see the module docstring):
    it builds ``loader_cls(**spec)``, the loader's own class and constructor arguments. :meth:`batches`
    serves one pass. After a protocol failure (the child dead, or silent through a stopped pass's
    drain) it is ``broken``: the loader starts another."""

    def __init__(self, loader_cls: type, spec: dict, device: torch.device):
        if device.type == "cuda" and device.index is None:  # the child sets its device by index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.broken = device, False
        ctx = tmp.get_context("spawn")
        self._commands, self._results, self._stop = ctx.Queue(), ctx.Queue(maxsize=1), ctx.Event()
        self._closing = ctx.Event()  # set only when the child is stopped: its last message may then be dropped
        self._proc = ctx.Process(target=_serve, args=(loader_cls, dict(spec, device=str(device)), self._commands,
                                                      self._results, self._stop, self._closing, os.getpid()),
                                 name="carl-scale-finish-process")
        # SIGINT blocked while the child starts (the mask survives spawn's exec) until it ignores it:
        # a Ctrl-C reaches the whole process group, and the parent decides what stops
        masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *STOP_SIGNALS})
        try:
            with _main_not_rerun():
                self._proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, masked)
        self._active = False  # a pass is being served and its end not read yet
        self._lock = threading.Lock()  # one receiving thread at a time
        self._pass_stop: threading.Event | None = None
        self._recv_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # run at interpreter exit before multiprocessing joins its children (a child still serving
        # would hold the exit forever) and before the command queue's own finalizer (10) stops its
        # feeder, or when this object is collected
        self._finalizer = multiprocessing.util.Finalize(
            self, _shut_down, args=(self._proc, self._commands, self._stop, self._closing), exitpriority=20)

    def _on_device(self):
        if self._recv_stream is None:
            return contextlib.nullcontext()
        ctx = contextlib.ExitStack()  # (the device first: leaving the stream then restores this one)
        ctx.enter_context(torch.cuda.device(self.device))
        ctx.enter_context(torch.cuda.stream(self._recv_stream))
        return ctx

    def _fail(self, message: str) -> RuntimeError:
        self.broken = True
        self._finalizer()  # stop it (if alive) so that nothing more is sent
        return RuntimeError(f"the process finishing the batches (--finish-in process) {message} (--finish-in "
                            f"thread finishes them in the training process instead)")

    def _get(self, stop: threading.Event | None, timeout: float | None = None):
        """The next message, waiting while the child lives (and, with ``stop``, until it is set),
        up to ``timeout`` seconds. A batch has no limit, as in a finishing thread: the child may be
        silent for long while alive (its imports, the workers' fork and DALI's pipelines before the
        first batch; after a resume, each worker replaying its stream up to its position, minutes
        to tens of minutes late in a Kinetics epoch read from tars without an index, where a limit
        of 600 s stopped the run). Call on the receiving thread, within :meth:`_on_device`."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._results.get(timeout=_POLL_S)
            except queue.Empty:
                pass
            except Exception as exn:  # unpickling what a dying child sent: its handles are gone with it
                self._proc.join(timeout=1.0)
                if not self._proc.is_alive():
                    raise self._fail(f"died, exit code {self._proc.exitcode}: see its output above") from None
                raise self._fail(f"sent a batch that cannot be received ({type(exn).__name__}: {exn})") from exn
            if not self._proc.is_alive():
                raise self._fail(f"died, exit code {self._proc.exitcode}: see its output above")
            if stop is not None and stop.is_set():
                raise _Stopped
            if end is not None and time.monotonic() > end:
                raise self._fail(f"sent nothing for {timeout:.0f} s")

    def _end_active(self) -> None:
        """Stop the pass being served and read up to its end (what it sent is freed here, on the
        receiving stream), so that the next pass starts clean."""
        if not self._active or self.broken:
            return
        self._stop.set()
        try:
            while True:
                msg = self._get(None, timeout=DRAIN_S)  # (a wedged child must not hold a close for long)
                if msg[0] == "done":
                    break
                del msg
        finally:
            self._active = False
            self._stop.clear()

    def _receive(self, msg: tuple) -> tuple:
        """A batch message as (slot, this process's own batch, seconds): the views copied on the
        receiving stream, the copy waited for, the received views freed (their stream sync then
        finds nothing queued)."""
        _, slot, batch, seconds = msg
        if batch is not None:
            small = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in batch["small"].items()}
            views = batch["views"].to(self.device, copy=True, non_blocking=True)
            if self._recv_stream is not None:
                self._recv_stream.synchronize()  # (releases the interpreter lock while it waits)
            batch = VideoBatch(views=views, **small, **batch["rest"])
        return slot, batch, seconds

    def _pass(self, command: tuple, stop: threading.Event) -> Iterator[tuple]:
        """The receiving thread's pass: messages until "done", each batch received."""
        with self._lock, self._on_device():
            if self.broken:
                raise self._fail("failed before: start another")
            self._end_active()  # an earlier pass left unfinished
            self._active = True
            self._commands.put(command)
            msg = None
            try:
                while True:
                    msg = self._get(stop)
                    if msg[0] == "done":
                        self._active = False
                        if msg[1] is not None:
                            error, remote = msg[1]
                            error.__cause__ = ChildTraceback(remote)
                            raise error
                        return
                    if stop.is_set():  # (what came meanwhile is freed by the drain below, not copied)
                        raise _Stopped
                    got = self._receive(msg)
                    msg = None
                    yield got
            except _Stopped:
                pass
            except BaseException as exn:  # (e.g. out of memory in the copy): no received tensor may
                msg = None                # outlive this thread in the traceback's frames
                traceback.clear_frames(exn.__traceback__)
                raise
            finally:  # stopped by the consumer, or a failure here: stop the child's pass too
                msg = None  # (freed here, on the receiving stream: see _receive)
                if self._active and not self.broken:
                    self._end_active()

    def batches(self, epoch: int, next_batch: int, positions: dict[int, int]) -> Iterator[tuple]:
        """One pass from the given start: ``(slot, batch, finishing seconds)`` per batch in order
        (``batch`` None where none of the slot's videos decoded), received by a thread of its own
        up to two batches ahead; a failure in the child is raised here in the place of the batch it
        stopped. Closing the generator stops the pass."""
        if self._pass_stop is not None:
            self._pass_stop.set()  # an earlier pass's receiving thread, if still running
        stop = self._pass_stop = threading.Event()
        handoff: queue.Queue = queue.Queue(maxsize=1)
        end = object()

        def receive() -> None:
            try:
                with contextlib.closing(self._pass((epoch, next_batch, dict(positions)), stop)) as passing:
                    for got in passing:
                        if not _put(handoff, got, stop):
                            return  # (closing it here drains the child's pass on this thread)
                        del got
                last = end
            except BaseException as exn:  # raised in the consumer, in the place of the batch it stopped
                last = exn
            _put(handoff, last, stop)

        thread = threading.Thread(target=receive, name="carl-scale-finish-receiver", daemon=True)
        thread.start()
        try:
            while True:
                got = handoff.get()
                if got is end:
                    return
                if isinstance(got, BaseException):
                    raise got
                batch = got[1]
                if batch is not None and self._recv_stream is not None:  # made on the receiving stream
                    current = torch.cuda.current_stream(self.device)
                    for t in batch.__dict__.values():
                        if torch.is_tensor(t):
                            t.record_stream(current)
                yield got
                del got, batch
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        """Stop the pass being served (if any) and the child (which stops its loader's workers)."""
        if self._pass_stop is not None:
            self._pass_stop.set()
        self._finalizer()


@contextlib.contextmanager
def _main_not_rerun():
    """Spawn runs the parent's main script again in the child (as ``__mp_main__``) unless it has no
    file: a training script without a ``__name__ == "__main__"`` guard would build a second trainer
    there. The child needs nothing of it (it runs :func:`_serve`), so spawn is shown none."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    for k in saved:
        setattr(main, k, None) if k == "__spec__" else delattr(main, k)
    try:
        yield
    finally:
        main.__dict__.update(saved)


def _shut_down(proc, commands, stop, closing) -> None:
    closing.set()
    stop.set()
    if proc.is_alive():
        try:
            commands.put(None)
        except (OSError, ValueError):
            pass
        proc.join(timeout=10)
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=5)
    if proc.is_alive():  # (it ignores SIGTERM, as a scheduler's reaches it with its rank)
        proc.kill()
        proc.join(timeout=5)
    if not proc.is_alive() and proc.pid is not None:
        # The reference counts of the CUDA views it sent live in files named after it, which only
        # its own teardown removes, and it leaves through os._exit (_exit_now): /dev/shm is memory.
        # (A mapping the parent still holds keeps working without its name.)
        for name in glob.glob(f"/dev/shm/torch_{proc.pid}_*"):
            with contextlib.suppress(OSError):
                os.unlink(name)


def _put(q, x, stop) -> bool:
    """Put ``x`` on ``q`` (a thread's or a process's queue) once there is room, unless ``stop`` (an
    event of either kind) is set first."""
    while not stop.is_set():
        try:
            q.put(x, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _picklable(exn: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exn))
        return exn
    except Exception:
        return RuntimeError(f"{type(exn).__name__}: {exn}")


def _outgoing(batch: VideoBatch | None) -> dict | None:
    """A finished batch as sent: its views as they are (a CUDA IPC handle; on the CPU, shared
    memory), its small tensors as NumPy arrays (pickled by value: no handle to open per batch)."""
    if batch is None:
        return None
    small = {k: v.cpu().numpy() for k, v in batch.__dict__.items() if torch.is_tensor(v) and k != "views"}
    rest = {k: v for k, v in batch.__dict__.items() if not torch.is_tensor(v)}
    return {"views": batch.views, "small": small, "rest": rest}


def _serve(loader_cls: type, spec: dict, commands, results, stop, closing, parent: int) -> None:
    """The child: a loader finishing in threads, serving one pass per command until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group: the parent decides
    ignore_stop_signals()  # and so does a scheduler's SIGTERM: the parent writes a checkpoint first
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, *STOP_SIGNALS})  # (blocked while it started)

    def orphaned() -> None:  # the training process gone without closing this one: go too
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=orphaned, name="carl-scale-finish-watchdog", daemon=True).start()
    cuda = torch.device(spec["device"]).type == "cuda"
    if cuda:  # (before the loader: its decoders take the current device's index)
        torch.cuda.set_device(torch.device(spec["device"]))
    loader = loader_cls(**spec)
    loader.finish_in_thread = True

    try:
        while (command := commands.get()) is not None:
            loader.finish_times = times = []
            error, ahead = None, None
            try:
                finished, ahead = loader.finished_stream(*command)
                for slot, batch in finished:
                    if stop.is_set():
                        break
                    if batch is not None and cuda:
                        # The parent copies the views without waiting for any event of ours (PyTorch
                        # records its IPC event on the sending thread's stream, not the finishing
                        # one): they must be complete before their handle leaves. Keep this.
                        torch.cuda.current_stream().synchronize()
                    seconds = times.pop(0)[0] if times else 0.0  # (one entry per finished batch)
                    sent = ("batch", dataclasses.replace(slot, samples=[]), _outgoing(batch), seconds)
                    if not _put(results, sent, stop):
                        break
                    del batch, slot, sent
            except BaseException as exn:  # raised in the parent, in the place of the batch it stopped
                # with this process's own traceback (a pickled exception loses it) for --debug
                error = (_picklable(exn), "".join(traceback.format_exception(exn)))
                traceback.clear_frames(exn.__traceback__)  # (its frames hold the lanes' batches)
            finally:
                if ahead is not None:
                    ahead.close()
                batch = slot = sent = None  # nothing of this pass held on the GPU until the next command
            # read by the parent even after a stop (it drains to it), however late (a checkpoint or an
            # evaluation between its steps), unless it is stopping this process
            _put(results, ("done", error), closing)
            error = None
    except BaseException:  # (the command queue broken: the parent gone mid-message)
        traceback.print_exc()
        code = 1
    else:
        code = 0
    try:
        loader.close()
    except BaseException:  # (still leave through _exit_now: the normal exit is the one that aborts)
        traceback.print_exc()
        code = 1
    _exit_now(code, cuda)


def _exit_now(code: int, cuda: bool) -> None:
    """End the child without the interpreter's teardown. Views sent but never received (in flight
    when the parent stopped it) stay in PyTorch's IPC limbo, and at a normal exit the limbo frees
    them from a static destructor after the CUDA driver has begun shutting down: on the H200 that
    aborted the child ("terminate called ... CUDA error: driver shutting down") at the end of every
    run. The parent no longer reads anything (it sent None), the loader's workers are stopped, and
    the driver frees this process's memory when it exits."""
    if cuda:
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()  # (nothing of ours still running on the GPU when it goes)
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(Exception):  # C stdio too (DALI's and PyTorch's messages), into a file
        ctypes.CDLL(None).fflush(None)
    os._exit(code)
