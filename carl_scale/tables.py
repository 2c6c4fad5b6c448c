"""What entry points show at the terminal: plain-text tables at the end of a job, and whether
long work draws progress bars."""

from __future__ import annotations

import os


def progress_wanted() -> bool:
    """Progress bars unless CARL_SCALE_NO_PROGRESS is set to something other than 0 / false / no
    (tests and sweeps set it to 1: their logs are files)."""
    return os.environ.get("CARL_SCALE_NO_PROGRESS", "").strip().lower() in ("", "0", "false", "no")


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])
