"""What entry points show at the terminal: plain-text tables at the end of a job, and whether
long work draws progress bars."""

from __future__ import annotations

import os
import re
import sys

_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # cursor moves of bars stacked on a terminal


def progress_wanted() -> bool:
    """Progress bars unless CARL_SCALE_NO_PROGRESS is set to something other than 0 / false / no
    (tests and sweeps set it to 1: their logs are files)."""
    return os.environ.get("CARL_SCALE_NO_PROGRESS", "").strip().lower() in ("", "0", "false", "no")


class _LineWriter:
    """Where a bar goes when stderr is a file (``2>log``, a batch job): each refresh becomes one
    whole line. tqdm redraws with carriage returns, which a log keeps as one endless line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = _ESCAPES.sub("", s.replace("\r", "")).rstrip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(*, enabled: bool = True, log_every_s: float = 30.0, **kw):
    """A tqdm bar for long work. On a terminal (or in a notebook) the usual live bar; with stderr
    redirected to a file, a plain line at most every ``log_every_s`` seconds (and at the end,
    unless ``leave=False``: such a bar's closing clears it),
    so a log shows how far a job got without megabytes of redraws; none when ``enabled`` is
    false or the environment asks for none (:func:`progress_wanted`). Callers that change the
    postfix should pass ``refresh=False``, so the line interval holds."""
    from tqdm.auto import tqdm

    if not (enabled and progress_wanted()):
        return tqdm(disable=True, **kw)
    if sys.stderr.isatty() or "ipykernel" in sys.modules:
        return tqdm(dynamic_ncols=True, **kw)
    # a passing bar (leave=False: a step inside a job, e.g. embedding the validation videos) writes
    # its first line only once it has run an interval: a log then holds no "0%" line for work that
    # took a few seconds, and a line per interval for work that took longer
    delay = kw.pop("delay", log_every_s if kw.get("leave") is False else 0.0)
    return tqdm(file=_LineWriter(sys.stderr), mininterval=log_every_s, maxinterval=max(log_every_s, 10.0),
                miniters=1, ncols=100, ascii=True, delay=delay, **kw)


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])
