"""Reading the reports' Markdown back as numbers, so tests compare values and table structure, not prose."""

from __future__ import annotations


def number(cell: str) -> float | None:
    """The leading number of a table cell (``0.6000 ± 0.0492`` -> 0.6); None for ``n/a``."""
    head = cell.strip("*").split(" ")[0].replace(",", "")
    return None if head == "n/a" else float(head)


def md_tables(md: str) -> list[dict[str, list[str]]]:
    """Every Markdown table of ``md`` as {first cell: the other cells}, header and rule left out."""
    tables = []
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
            tables.append({r[0]: r[1:] for r in rows})
    return tables
