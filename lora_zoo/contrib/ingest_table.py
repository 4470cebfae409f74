"""The metadata / label table of an ingest: CSV, JSON (list of rows or {key: row}), JSON Lines
or Parquet, keyed by file name or lora id.

Contributors' tables are hand-made. Column types are inferred from the values (the majority type
of the non-empty cells; int widens to float) and every cell that does not fit is reported with
its row and column and left empty, rather than silently turning a numeric column into strings.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_zoo.errors import MetadataTableError

log = logging.getLogger(__name__)

KEY_COLUMNS = ("lora_id", "id", "file", "path", "filename", "name")


def _parse_cell(s: str) -> Any:
    """CSV text -> bool / int / float / list (JSON) / str; empty -> None."""
    t = s.strip()
    if t == "":
        return None
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        pass
    if t.startswith("[") and t.endswith("]"):
        try:
            return json.loads(t)
        except json.JSONDecodeError:
            pass
    return s


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    return type(v).__name__


def _fits(kind: str, v: Any) -> bool:
    k = _kind(v)
    return k == kind or (kind == "float" and k == "int")


@dataclass
class MetadataTable:
    path: str
    key_column: str
    rows: dict[str, dict[str, Any]]
    types: dict[str, str]
    type_errors: list[dict[str, Any]] = field(default_factory=list)

    def lookup(self, candidates: list[str]) -> tuple[str, dict[str, Any]] | None:
        for c in candidates:
            if c in self.rows:
                return c, self.rows[c]
        return None


def _load_rows(p: Path) -> tuple[list[dict[str, Any]], bool]:
    """(rows, needs_type_inference)."""
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                return [dict(r) for r in csv.DictReader(f)], True
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(p).to_pylist(), False
        if suffix == ".jsonl":
            lines = p.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()], False
        if suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {key: {col: value}}
                return [{"lora_id": k, **v} for k, v in data.items()], False
            return data, False
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error, ValueError) as e:
        raise MetadataTableError(f"cannot read the table ({e})", file=p) from e
    except Exception as e:  # pyarrow errors
        raise MetadataTableError(f"cannot read the table ({e})", file=p) from e
    raise MetadataTableError("table must be .csv, .json, .jsonl or .parquet", file=p)


def _column_kind(rows: list[dict[str, Any]], c: str) -> str | None:
    """The column's type by majority vote of its cells (ints and floats vote together as
    numbers); None for a column with no values."""
    kinds = Counter(_kind(r.get(c)) for r in rows if r.get(c) is not None)
    if not kinds:
        return None
    numeric = kinds["int"] + kinds["float"]
    others = Counter({k: n for k, n in kinds.items() if k not in ("int", "float")})
    top = others.most_common(1)[0] if others else ("", 0)
    if numeric and numeric >= top[1]:
        return "float" if kinds["float"] else "int"
    return top[0]


def _clear_misfits(rows: list[dict[str, Any]], c: str, kind: str) -> list[dict[str, Any]]:
    """Cells of column ``c`` that are not ``kind`` (or not finite) become None; one error each,
    so a user sees every bad cell at once and keeps the rest of the table."""
    errors = []
    for i, r in enumerate(rows):
        v = r.get(c)
        bad = isinstance(v, float) and not math.isfinite(v)
        if bad or (v is not None and not _fits(kind, v)):
            errors.append({"row": i, "column": c, "value": repr(v), "expected": kind})
            r[c] = None
    return errors


def read_table(path: str | os.PathLike[str]) -> MetadataTable:
    p = Path(path)
    rows, infer = _load_rows(p)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise MetadataTableError("table rows must be objects", file=p)
    if not rows:
        raise MetadataTableError("table is empty", file=p)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    key = next((c for c in KEY_COLUMNS if c in cols), None)
    if key is None:
        raise MetadataTableError(
            f"no key column; name one of {', '.join(KEY_COLUMNS)}", file=p, key=cols[0]
        )
    if infer:
        rows = [{c: (v if c == key else _parse_cell(v or "")) for c, v in r.items()} for r in rows]
    types: dict[str, str] = {}
    errors: list[dict[str, Any]] = []
    for c in cols:
        kind = _column_kind(rows, c) if c != key else None
        if kind is not None:
            types[c] = kind
            errors += _clear_misfits(rows, c, kind)
    by_key: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(rows):
        k = r.get(key)
        if k is None or str(k).strip() == "":
            raise MetadataTableError(f"row {i} has an empty key", file=p, key=key)
        k = str(k).strip()
        if k in by_key:
            raise MetadataTableError(f"key {k!r} appears twice (row {i})", file=p, key=key)
        by_key[k] = {c: v for c, v in r.items() if c != key}
    for e in errors:
        log.warning(
            "%s: row %s column %s: %s is not %s",
            p,
            e["row"],
            e["column"],
            e["value"],
            e["expected"],
        )
    return MetadataTable(str(p), key, by_key, types, errors)
