"""Plain-text tables for the commands' reports: aligned columns, a rule under the header, wrapped long cells."""

from __future__ import annotations

import textwrap
from typing import Sequence


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence],
    align: str | None = None,
    rule: bool = True,
    wrap: dict[int, int] | None = None,
    sep: str = "  ",
) -> str:
    """``rows`` under ``header``, one line each (cells converted with ``str``).

    ``align``: one letter per column, ``l`` or ``r`` (default: the first column left, the others right). ``rule``:
    dashes under the header. ``wrap``: column index → width; longer cells go on onto continuation lines.
    """
    wrap = wrap or {}
    align = align or "l" + "r" * (len(header) - 1)
    lines: list[list[str]] = []
    for row in rows:
        cells = [textwrap.wrap(str(c), wrap[i]) or [""] if i in wrap else [str(c)] for i, c in enumerate(row)]
        for k in range(max(len(c) for c in cells)):
            lines.append([c[k] if k < len(c) else "" for c in cells])
    widths = [max([len(str(h))] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]

    def join(cells) -> str:
        return sep.join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    out = [join([str(h) for h in header])]
    if rule:
        out.append(join(["-" * w for w in widths]))
    out.extend(join(line) for line in lines)
    return "\n".join(out)
