"""Plain-text tables for what entry points print at the end of a job."""

from __future__ import annotations


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])
