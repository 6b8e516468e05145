"""Output helpers shared by every CLI command: aligned tables (rich) or JSON, and messages.

Only the CLI prints. Library code returns data and raises typed errors.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Any, Iterable, Sequence


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_cell(x) for x in v)
    if isinstance(v, dict):
        return ",".join(f"{k}={_cell(x)}" for k, x in v.items())
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)  # JSON has no NaN/inf; keep the fact visible as a string
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "__fspath__"):
        return str(v)
    return v


def emit_json(data: Any) -> None:
    data = _jsonable(data)
    if isinstance(data, list) and len(data) > 50:
        # a long listing: one compact object per line (still one JSON array; 10k checkpoints
        # print in a fraction of the time indent=2 takes, and stay greppable line by line)
        out = sys.stdout
        out.write("[\n")
        last = len(data) - 1
        for i, row in enumerate(data):
            out.write(json.dumps(row, separators=(", ", ": ")) + (",\n" if i < last else "\n"))
        out.write("]\n")
        return
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


#: Above this many rows a table is aligned by hand: rich lays out every cell of every row
#: (about 1 ms a row), which makes `ls` of a 10,000-checkpoint run take seconds.
_RICH_MAX_ROWS = 200


def _plain_table(cells, columns, numeric, title) -> None:
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = sys.stdout
    if title:
        out.write(title + "\n")
    out.write(line(list(columns)) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    out.writelines(line(row) + "\n" for row in cells)


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, *, title: str | None = None,
          as_json: bool = False, right: Iterable[str] = ()) -> None:
    """Print rows as an aligned table, or as a JSON list with ``as_json``."""
    if as_json:
        emit_json(list(rows))
        return
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    from rich.console import Console
    from rich.table import Table
    from rich import box

    right = set(right)
    numeric = [bool(c in right or (rows and all(isinstance(r.get(c), (int, float)) or r.get(c) is None
                                               for r in rows)
                                   and any(r.get(c) is not None for r in rows))) for c in columns]
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    if len(rows) > _RICH_MAX_ROWS:
        _plain_table(cells, columns, numeric, title)
        return
    t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for c, num in zip(columns, numeric):
        t.add_column(c, justify="right" if num else "left", no_wrap=True, overflow="fold")
    for row in cells:
        t.add_row(*row)
    # Size the console to the content so columns are never truncated or folded: a wide table
    # scrolls in a terminal and stays one line per row in a file or pipe.
    need = sum(max([len(c)] + [len(row[i]) for row in cells]) + 3 for i, c in enumerate(columns))
    Console(width=max(need, _term_width()), soft_wrap=True).print(t)


def _term_width() -> int:
    import shutil

    return shutil.get_terminal_size((160, 40)).columns


def kv(data: dict, *, as_json: bool = False) -> None:
    """Print a record as aligned key: value lines, or JSON."""
    if as_json:
        emit_json(data)
        return
    width = max((len(k) for k in data), default=0)
    for k, v in data.items():
        sys.stdout.write(f"{k.ljust(width)}  {_cell(v)}\n")


def info(msg: str) -> None:
    sys.stderr.write(msg + "\n")
