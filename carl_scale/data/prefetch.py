"""Work finished ahead of its consumer in a background thread: the GPU loader decodes, crops and
colours the next batches on a CUDA stream of its own while the training step runs."""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable, Iterable, Iterator

import torch


def finish_ahead(items: Iterable, finish: Callable, depth: int, device: torch.device) -> Iterator[tuple]:
    """``(item, finish(item))`` for ``items`` in order, computed by a background thread up to
    ``depth`` items ahead of the consumer. On a CUDA device the thread works on its own stream;
    each result is handed over with an event the consumer's stream waits for, and its CUDA tensors
    are recorded on that stream (the caching allocator must not reuse them early). An exception in
    the thread is raised here; closing the generator stops and joins the thread."""
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cuda = device.type == "cuda"

    def put(x) -> bool:
        while not stop.is_set():
            try:
                results.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            with contextlib.ExitStack() as ctx:
                if cuda:
                    stream = torch.cuda.Stream(device)
                    ctx.enter_context(torch.cuda.device(device))
                    ctx.enter_context(torch.cuda.stream(stream))
                for item in items:
                    out = finish(item)
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not put((item, out, event)):
                        return
            put(_END)
        except BaseException as exn:  # handed to the consumer, raised there
            put(exn)

    thread = threading.Thread(target=work, name="carl-scale-finish-ahead", daemon=True)
    thread.start()
    try:
        while True:
            got = results.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
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
        thread.join()


_END = object()
