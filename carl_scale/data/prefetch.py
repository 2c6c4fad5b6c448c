"""Work finished ahead of its consumer in background threads: the GPU loader decodes, crops and
colours the next batches on CUDA streams of its own while the training step runs.

With more than one lane, batches are finished side by side: batch k by lane k mod n, each lane a
thread with its own finishing function (its own decoder: DALI pipelines are not shared between
threads) and its own CUDA stream, and handed over in input order. Side by side is what a
decoder bound by each video's latency needs (NVDEC through DALI sets up a session per video and
decodes one video at a time), and it overlaps one batch's host work (nvJPEG's Huffman stage, the
crops' Python loop) with another's GPU work.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence

import torch

THREAD_NAME = "carl-scale-finish-ahead"


class _Failed:
    """An exception on its way to the consumer, in the place of the item it stopped."""

    def __init__(self, exn: BaseException):
        self.exn = exn


_END = object()


def finish_ahead(items: Iterable, finish: Callable | Sequence[Callable], depth: int,
                 device: torch.device) -> Iterator[tuple]:
    """``(item, finish(item))`` for ``items`` in order, computed by background threads ahead of
    the consumer. ``finish`` is one callable, or one per lane (``len(finish)`` lanes): item k is
    finished by lane k mod n. A reader thread takes the items; each lane keeps up to
    ``ceil(depth / n)`` results ready, so up to max(depth, n) wait finished and n more are being
    made. On a CUDA device each lane works on its own stream; each result is handed over with an
    event the consumer's stream waits for, and its CUDA tensors are recorded on that stream (the
    caching allocator must not reuse them early). An exception (in ``finish`` or in reading
    ``items``) is raised here, in the place of the item it stopped; closing the generator stops
    and joins every thread."""
    finishers = [finish] if callable(finish) else list(finish)
    if not finishers or depth < 1:
        raise ValueError(f"finish_ahead needs at least one lane and depth >= 1, got {len(finishers)} and {depth}")
    lanes = len(finishers)
    inboxes = [queue.Queue(maxsize=2) for _ in range(lanes)]  # 2: a slow lane holds the others back less
    outboxes = [queue.Queue(maxsize=math.ceil(depth / lanes)) for _ in range(lanes)]
    stop = threading.Event()
    cuda = device.type == "cuda"

    def put(q: queue.Queue, x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:  # items to lanes in turn; the end (or a failure) to the lane whose turn it is
        k = 0
        try:
            for item in items:
                if not put(inboxes[k % lanes], item):
                    return
                k += 1
            last = _END
        except BaseException as exn:
            last = _Failed(exn)
        for j in range(lanes):  # every lane learns that nothing more comes; the one in turn first
            if not put(inboxes[(k + j) % lanes], last if j == 0 else _END):
                return

    def work(lane: int) -> None:
        inbox, outbox = inboxes[lane], outboxes[lane]
        try:
            with contextlib.ExitStack() as ctx:
                if cuda:
                    stream = torch.cuda.Stream(device)
                    ctx.enter_context(torch.cuda.device(device))
                    ctx.enter_context(torch.cuda.stream(stream))
                while True:
                    try:
                        item = inbox.get(timeout=0.1)
                    except queue.Empty:
                        if stop.is_set():
                            return
                        continue
                    if item is _END or isinstance(item, _Failed):
                        put(outbox, item)
                        return
                    out = finishers[lane](item)
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not put(outbox, (item, out, event)):
                        return
                    del item, out, event  # not kept alive here until the next one is made
        except BaseException as exn:  # handed to the consumer, raised there
            put(outbox, _Failed(exn))

    threads = [threading.Thread(target=read, name=f"{THREAD_NAME}-reader", daemon=True)]
    threads += [threading.Thread(target=work, args=(i,), name=f"{THREAD_NAME}-{i}", daemon=True)
                for i in range(lanes)]
    for t in threads:
        t.start()
    try:
        k = 0
        while True:
            got = outboxes[k % lanes].get()
            k += 1
            if got is _END:
                return
            if isinstance(got, _Failed):
                raise got.exn
            item, out, event = got
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in getattr(out, "__dict__", {}).values():
                    if torch.is_tensor(t) and t.is_cuda:
                        t.record_stream(current)
            yield item, out
    finally:
        stop.set()
        for t in threads:
            t.join()
