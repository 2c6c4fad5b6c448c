"""Batches finished in a process of their own (``--finish-in process``): the GPU loader's decoding,
crops and colour run outside the training process, which receives each finished batch through
CUDA IPC.

Why a process: in threads (:func:`~carl_scale.data.prefetch.finish_ahead`) the finishing shares
one interpreter lock with the training step. PyTorch releases the lock around every operator, and
CPython hands a released lock to whichever thread retakes it first, so a thread that alternates
short Python stretches with operators (a finishing thread: ~150 operators and a DALI run per
batch) keeps taking it back from one that was woken to take it (the step: hundreds of kernel
launches). On this repo's CPU machine (Python 3.11) a 3 us torch operator took 0.6-16 ms beside
such a thread, and 3-4 us beside the same work in a process (``python -m carl_scale.bench.gil``). On the H200 the step lost 14-25% with the
loader merely running alongside while waiting for data only 3-6% of the time (BENCHMARKS.md, end
to end). A process of its own has an interpreter of its own; what it shares with the step is the
GPU (kernels of two processes take turns on it rather than run side by side, without MPS).

How:

* the child (spawned: CUDA is up in the parent, and forking it is unsafe) builds the same
  :class:`~carl_scale.data.reader.VideoLoader` with the same seed, finishing in threads as the
  training process would, and serves one pass at a time from the state the parent sends (epoch,
  batch, worker positions): each finished batch, in order, with its slot (worker, resume point,
  skips) and its finishing time, over a ``torch.multiprocessing`` queue, its views as a CUDA IPC
  handle (CPU tensors in shared memory), its small tensors on the host;
* the parent takes them in :func:`finish_ahead`'s threads: one reads the queue, one copies each
  batch into the training process's own memory on a stream of its own and hands it over with an
  event. The copy is why: a received CUDA tensor, when freed, synchronises the freeing thread's
  current stream (PyTorch's guard against the producer reusing the memory too early), so freed in
  the step's thread it would stall the step; freed in the copying thread it waits for its copy;
* the parent keeps the loader's state, so checkpoints and resumes are unchanged; the child's
  failures are raised in the parent in the place of the batch they stopped, and a child that dies
  is reported with its exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import queue
import sys
import threading
import time
import weakref
from typing import Iterator

import torch
import torch.multiprocessing as tmp

from carl_scale.data.batch import VideoBatch

CHILD_START_S = 600.0  # the first batch may wait for imports, the workers' fork and DALI's pipelines
_POLL_S = 0.2


class FinishProcess:
    """A child process that finishes a :class:`VideoLoader`'s batches (see the module docstring).
    ``spec`` holds the loader's constructor arguments; :meth:`stream` serves one pass, and
    :meth:`receive` makes a received batch the training process's own."""

    def __init__(self, spec: dict, device: torch.device):
        ctx = tmp.get_context("spawn")
        self.device = device
        self._commands, self._results, self._stop = ctx.Queue(), ctx.Queue(maxsize=1), ctx.Event()
        self._proc = ctx.Process(target=_serve, args=(spec, self._commands, self._results, self._stop, os.getpid()),
                                 name="carl-scale-finish-process")
        with _main_not_rerun():
            self._proc.start()
        self._active: object | None = None  # the pass being served, until its end is read
        self._recv_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # at interpreter exit before close(): multiprocessing would otherwise join a child still serving
        self._finalizer = weakref.finalize(self, _shut_down, self._proc, self._commands, self._stop)

    def _get(self, timeout: float):
        """The next message, waiting up to ``timeout`` seconds while the child lives."""
        end = time.monotonic() + timeout
        while True:
            try:
                if self._recv_stream is None:
                    return self._results.get(timeout=_POLL_S)
                with torch.cuda.stream(self._recv_stream):  # an IPC tensor's wait for its producer goes here
                    return self._results.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise RuntimeError(f"the process finishing the batches (--finish-in process) died, exit code "
                                       f"{self._proc.exitcode}: see its output above (--finish-in thread finishes "
                                       f"them in the training process instead)") from None
                if time.monotonic() > end:
                    raise RuntimeError(f"the process finishing the batches (--finish-in process) sent nothing for "
                                       f"{timeout:.0f} s") from None

    def _end_active(self) -> None:
        """Stop the pass being served and read up to its end, so the next starts clean."""
        if self._active is None:
            return
        self._stop.set()
        try:
            while self._get(CHILD_START_S)[0] != "done":
                pass
        finally:
            self._active = None
            self._stop.clear()

    def stream(self, epoch: int, next_batch: int, positions: dict[int, int]) -> Iterator[list]:
        """One pass from the given start: ``[slot, batch, finishing seconds]`` per batch in order
        (``batch`` None where none of the slot's videos decoded), ended by the end of the epoch;
        a failure in the child is raised here in the place of the batch it stopped."""
        self._end_active()  # an earlier pass left unfinished (a closed iterator)
        me = self._active = object()
        self._commands.put((epoch, next_batch, dict(positions)))
        try:
            while True:
                msg = self._get(CHILD_START_S)
                if msg[0] == "done":
                    self._active = None
                    if msg[1] is not None:
                        raise msg[1]
                    return
                box = list(msg[1:])
                del msg  # the box alone holds the received batch: receive() takes it out
                yield box
        finally:  # closed early by the reader that pulled it: stop the child's pass too
            if self._active is me:
                self._end_active()

    def receive(self, box: list) -> VideoBatch | None:
        """The box's batch as the training process's own tensors (on a GPU: copied on the calling
        thread's stream, which the freed IPC tensors then synchronise, and nothing else)."""
        batch = box[1]
        box[1] = None
        if batch is None or self.device.type != "cuda":
            return batch
        own = VideoBatch(**{k: (v.to(self.device, non_blocking=True, copy=True) if torch.is_tensor(v) else v)
                            for k, v in batch.__dict__.items()})
        del batch  # the IPC views freed here, after their copy was queued on this stream
        return own

    def close(self) -> None:
        """Stop the pass being served and the child (which stops its loader's workers)."""
        try:
            if self._proc.is_alive():
                self._end_active()
        except RuntimeError:  # (the child died meanwhile: nothing to stop)
            pass
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


def _shut_down(proc, commands, stop) -> None:
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


def _picklable(exn: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exn))
        return exn
    except Exception:
        return RuntimeError(f"{type(exn).__name__}: {exn}")


def _serve(spec: dict, commands, results, stop, parent: int) -> None:
    """The child: a loader finishing in threads, serving one pass per command until None."""
    from carl_scale.data.reader import VideoLoader, WorkerBatch

    def orphaned() -> None:  # the training process gone without closing this one: go too
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=orphaned, name="carl-scale-finish-watchdog", daemon=True).start()
    cuda = torch.device(spec["device"]).type == "cuda"
    if cuda:  # (before the loader: its decoders take the current device's index)
        torch.cuda.set_device(torch.device(spec["device"]))
    loader = VideoLoader(**spec)
    loader.finish_in_thread = True

    def put(msg) -> bool:
        while not stop.is_set():
            try:
                results.put(msg, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    try:
        while (command := commands.get()) is not None:
            loader.finish_times = times = []
            error, finished, ahead = None, None, None
            try:
                finished, ahead = loader.finished_stream(*command)
                for slot, batch in finished:
                    if stop.is_set():
                        break
                    if batch is not None:
                        # complete before its handle leaves: the parent's copy orders after nothing of ours
                        if cuda:
                            torch.cuda.current_stream().synchronize()
                        small = {k: v.cpu() for k, v in batch.__dict__.items() if torch.is_tensor(v) and k != "views"}
                        batch = dataclasses.replace(batch, **small)
                    seconds = 0.0
                    while times:  # (appended by the finishing threads: taken one at a time)
                        seconds += times.pop(0)[0]
                    if not put(("batch", WorkerBatch([], slot.worker, slot.resume_at, slot.skipped), batch, seconds)):
                        break
                    del batch, slot
            except BaseException as exn:  # raised in the parent, in the place of the batch it stopped
                error = _picklable(exn)
            finally:
                if ahead is not None:
                    ahead.close()
            results.put(("done", error))  # (read by the parent even after a stop: it drains to it)
    finally:
        loader.close()
