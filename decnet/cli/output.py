"""Small helpers for what ``decnet-admin`` prints: tables, JSON, errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain, aligned text table (no colour codes: it must read well in a log too)."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_json(doc) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def error(message: str) -> None:
    sys.stderr.write(f"decnet-admin: error: {message}\n")


def short_fp(fp: str | None) -> str:
    return fp[:16] if fp else "-"
