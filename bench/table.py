"""The header (machine facts that shape the figures) and the results table, as plain text."""

from __future__ import annotations

from collections.abc import Sequence

from bench.results import Row

COLUMNS = ("scenario", "metric", "value", "target", "result", "notes")


def header(facts: Sequence[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in facts)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in facts)


def table(rows: Sequence[Row]) -> str:
    cells = [COLUMNS] + [(r.scenario, r.metric, r.value, r.target, r.status, r.note) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS) - 1)]

    def line(row: Sequence[str]) -> str:
        fixed = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        return f"{fixed}  {row[-1]}".rstrip()

    rule = "  ".join("-" * w for w in widths) + "  " + "-" * len(COLUMNS[-1])
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])
