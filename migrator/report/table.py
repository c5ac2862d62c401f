"""Plain-text tables for terminals and logs: a header, a rule, left-aligned columns."""

from __future__ import annotations

from typing import Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a table: ``header``, a rule of dashes, then ``rows``; each column as wide
    as its widest cell, two spaces between columns, no trailing spaces."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
            for r in [header, ["-" * w for w in widths], *rows]]


__all__ = ["text_table"]
