"""How command-line entry points end on an expected failure (a bad flag, a missing file, a damaged
checkpoint): one line that names the problem and what to do, exit status 1, no traceback. Every
entry point takes ``--debug`` to show the traceback as well."""

from __future__ import annotations

import errno
import signal
import sys
import traceback
from typing import Callable


class Stopped(Exception):
    """A run that ended early on purpose (a scheduler's signal), its work saved: one line, exit 1."""


# A scheduler's signals to end a job (SLURM's scancel and time limit, Kubernetes, the deepspeed
# launcher: SIGTERM; SLURM's --signal=USR1@SECONDS: a warning ahead); see carl_scale.train.preemption.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


STOP_GRACE_S = 60  # how long a feeding process outlives a stop signal: a scheduler's grace is 30 s


def _stop_later(signum, frame) -> None:
    signal.alarm(STOP_GRACE_S)  # (SIGALRM's default action ends the process: never stuck for good)


def ignore_stop_signals(*_) -> None:
    """In a process that feeds a training rank (a DataLoader's ``worker_init_fn``, the finishing
    process): the signal reaches it with its rank, which writes a checkpoint first and needs it.
    It still ends ``STOP_GRACE_S`` later, so a terminate() meant for it (a stuck worker at
    shutdown) is delayed, never lost."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_later)


# What the library raises for bad input; its messages are written for the person at the terminal.
# Anything else (a bug) keeps its traceback.
EXPECTED = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, NotADirectoryError,
            IsADirectoryError, PermissionError, Stopped)

# The operating system's errors about a path a user gave or the machine's room, said in one line
# too (they carry no subclass of their own): a read-only file system, a full disk or quota, a name
# too long
USER_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}


def nonempty(text: str) -> str:
    """An argparse ``type`` for a path or name flag: an empty one (``--out ""``, an unset shell
    variable) would mean the current directory, and writes or scans there, so it is refused."""
    import argparse

    if not text.strip():
        raise argparse.ArgumentTypeError("empty: give a path (for the current directory, '.')")
    return text


def expected(exn: BaseException) -> bool:
    """Whether ``exn`` is bad input or the machine's state, said in one line (else: a bug)."""
    return isinstance(exn, EXPECTED) or (isinstance(exn, OSError) and exn.errno in USER_ERRNOS) or \
        device_out_of_memory(exn)


def device_out_of_memory(exn: BaseException) -> bool:
    """torch's out-of-memory error of a GPU (by name: this module never imports torch), the most
    common failure of a run that asks for more frames or videos than the card holds."""
    return type(exn).__name__ == "OutOfMemoryError" and type(exn).__module__.split(".")[0] == "torch"


def out_of_memory(exn: BaseException) -> bool:
    """Whether the process ran out of memory: Python's MemoryError, not its subclasses from PyAV
    (FFmpeg's ENOMEM, which a damaged stream gives too) or NumPy (an array a damaged header asks
    for), which say something about the input. A reader re-raises the one, skips the others."""
    return isinstance(exn, MemoryError) and type(exn).__module__.split(".")[0] not in ("av", "numpy")


def one_line(exn: BaseException) -> str:
    """The message of ``exn``; of an error a DataLoader worker raised, the worker's own message
    (PyTorch re-raises it with the worker's whole traceback as its text)."""
    text = str(exn)
    if isinstance(exn, OSError) and (isinstance(exn, (NotADirectoryError, IsADirectoryError, PermissionError))
                                     or exn.errno in USER_ERRNOS) and exn.filename is not None:
        # the operating system's own words ("[Errno 20] Not a directory: 'out/x'") and what to check
        where = f"{exn.filename}" + (f" -> {exn.filename2}" if exn.filename2 is not None else "")
        return f"{exn.strerror}: {where} (a path given here: check it, and that it may be written)"
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]  # "ValueError: <the message>"
        text = last.split(": ", 1)[1] if ": " in last else last
    if device_out_of_memory(exn):  # (its text: a paragraph of the allocator's numbers)
        first = ". ".join((text.splitlines() or ["out of memory"])[0].split(". ")[:2]).rstrip(".")  # "CUDA out of ..."
        return (f"{first}: the GPU holds fewer frames or videos at once (in training: --frames, or --batch-size "
                f"with --grad-accum for the same batch, or --trunk-chunk)")
    return text


def run_cli(prog: str, main: Callable, argv: list[str] | None = None):
    """``main(argv)``, with an expected failure turned into ``prog: error: ...`` and exit status 1."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except KeyboardInterrupt:  # Ctrl-C: a person stopped it, and knows why (130: the shell's code for it)
        if "--debug" in argv:
            traceback.print_exc()
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as exn:
        if not expected(exn):
            raise
        if "--debug" in argv:
            traceback.print_exc()
        sys.exit(f"{prog}: error: {one_line(exn)}")
