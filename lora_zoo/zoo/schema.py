"""Zoo format version 1: names, core columns, and the typing rules for metadata / label columns.

Everything the writer, the reader and ``verify`` must agree on lives here, so the on-disk format
(docs/FORMAT.md) has one source of truth. Metadata and labels arrive as loose Python dicts from
builders; they become *typed* Arrow columns (lists of ints stay lists of ints) so a zoo loads the
same way through ``datasets``, pandas or plain pyarrow, without lora_zoo code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from lora_zoo.errors import SchemaConflictError, ZooFormatError

FORMAT_VERSION = 2  # 2: hyperparameters only under hp.*, seeds only under seed.* (1 is read)
MANIFEST_NAME = "lora_zoo.json"
README_NAME = "README.md"
DATA_DIR = "data"
SPLITS_DIR = "splits"
SHARD_SUFFIX = ".parquet"
# Temp files start with "." and end in ".tmp": no glob for "*.parquet" and no reader picks them up.
MAX_FILES_PER_DIR = 10_000  # the Hub refuses folders with more files than this

ROLE_CORE, ROLE_METADATA, ROLE_LABEL = "core", "metadata", "label"
ROLES = (ROLE_CORE, ROLE_METADATA, ROLE_LABEL)

# The fixed leading columns of every shard, in this order.
CORE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("lora_id", pa.string(), nullable=False),
    pa.field("weights", pa.binary(), nullable=False),  # safetensors bytes: a PEFT adapter file
    pa.field("adapter_config", pa.string(), nullable=False),  # JSON text of the LoraConfig
    pa.field("base_model", pa.string(), nullable=False),
    pa.field("collection", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),  # max rank over modules
    pa.field("num_modules", pa.int32(), nullable=False),
)
CORE_COLUMNS: tuple[str, ...] = tuple(f.name for f in CORE_FIELDS)

# Split names end up in file names and in the Hub's `configs:` header; keep them boring.
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_split_name(name: str, *, file: str | None = None) -> str:
    if not isinstance(name, str) or not _SPLIT_RE.match(name):
        raise ZooFormatError(
            f"invalid split name {name!r}: use letters, digits and '_' (the Hub's rule)",
            file=file,
            key="split",
        )
    return name


def check_named_split_name(name: str, *, file: str | None = None) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ZooFormatError(
            f"invalid named-split name {name!r}: use letters, digits, '_', '-', '.'",
            file=file,
            key="name",
        )
    return name


def shard_name(split: str, index: int) -> str:
    """Relative path of shard ``index`` of ``split`` (``data/<split>-<i:05d>.parquet``)."""
    return f"{DATA_DIR}/{split}-{index:05d}{SHARD_SUFFIX}"


def shard_index(path: str) -> int:
    """Inverse of ``shard_name`` (the 5-digit index), -1 when the name does not follow it."""
    m = re.search(r"-(\d{5,})\.parquet$", path)
    return int(m.group(1)) if m else -1


# ---- metadata / label typing -----------------------------------------------------------------
def flatten(d: Mapping[str, Any] | None, *, what: str, lora_id: str) -> dict[str, Any]:
    """Flatten nested dicts one level with '.' (``{"loss": {"a": 1}}`` -> ``loss.a``).

    One level only: per-group scores are common, deeper trees are not and would make column
    names unreadable, so a dict two levels down is refused rather than guessed at.
    """
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if not isinstance(k, str) or not k:
            raise ZooFormatError(
                f"{what} key {k!r} of {lora_id!r} is not a non-empty string", key=str(k)
            )
        items = v.items() if isinstance(v, Mapping) else [(None, v)]
        for k2, v2 in items:
            name = k if k2 is None else f"{k}.{k2}"
            if isinstance(v2, Mapping):
                raise ZooFormatError(
                    f"{what} of {lora_id!r} nests dicts more than one level deep; flatten it "
                    "yourself or store it as a JSON string",
                    key=name,
                )
            if name in out:
                raise ZooFormatError(f"{what} of {lora_id!r} gives {name!r} twice", key=name)
            out[name] = v2
    return out


def to_plain(v: Any) -> Any:
    """numpy / torch scalars and arrays, tuples -> plain Python values pyarrow can take."""
    if hasattr(v, "detach") and hasattr(v, "tolist"):  # torch.Tensor, without importing torch
        return v.detach().cpu().tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [to_plain(x) for x in v]
    return v


def infer_type(v: Any) -> pa.DataType | None:
    """Arrow type of one plain value; None when the value has no supported type."""
    if v is None:
        return pa.null()
    if isinstance(v, bool):  # before int: bool is an int subclass
        return pa.bool_()
    if isinstance(v, int):
        return pa.int64()
    if isinstance(v, float):
        return pa.float64()
    if isinstance(v, str):
        return pa.string()
    if isinstance(v, (bytes, bytearray)):
        return pa.binary()
    if isinstance(v, list):
        t: pa.DataType | None = pa.null()
        for x in v:
            xt = infer_type(x)
            t = None if xt is None or t is None else unify(t, xt)
            if t is None:
                return None
        return list_of(t)
    return None


def list_of(t: pa.DataType) -> pa.DataType:
    """Lists use Parquet's compliant item name ``element``, so a schema read back from a shard is
    identical (names included) to the one written."""
    return pa.list_(pa.field("element", t))


def leaf_paths(field: pa.Field) -> list[str]:
    """Parquet column paths of a field (``ids.list.element`` for a list): per-column writer
    options (compression, statistics) are keyed by these."""
    path, t = field.name, field.type
    while pa.types.is_list(t):
        path, t = f"{path}.list.element", t.value_type
    return [path]


def unify(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The narrowest type holding both (null -> anything, int -> float, elementwise for lists);
    None when they conflict (e.g. string vs number)."""
    if a.equals(b):
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_null(b):
        return a
    nums = {pa.int64(), pa.float64()}
    if a in nums and b in nums:
        return pa.float64()
    if pa.types.is_list(a) and pa.types.is_list(b):
        t = unify(a.value_type, b.value_type)
        return None if t is None else list_of(t)
    return None


def type_of(v: Any, *, column: str, lora_id: str) -> pa.DataType:
    t = infer_type(v)
    if t is None:
        raise SchemaConflictError(
            f"value of type {type(v).__name__} for {lora_id!r} is not storable (use numbers, "
            "strings, bools, bytes or lists of those)",
            key=column,
        )
    return t  # NaN / inf stay legal float values: a diverged eval loss is still a label


def type_str(t: pa.DataType) -> str:
    """The manifest's spelling of an Arrow type: ``str(type)`` with list items always named
    ``element`` (``list<element: int64>``), whatever name a reader gave them."""
    if pa.types.is_list(t):
        return f"list<element: {type_str(t.value_type)}>"
    return str(t)


def build_schema(columns: Mapping[str, pa.DataType], roles: Mapping[str, str]) -> pa.Schema:
    """Core fields, then metadata / label columns in first-seen order, roles in the footer."""
    fields = list(CORE_FIELDS)
    fields += [pa.field(n, t) for n, t in columns.items() if n not in CORE_COLUMNS]
    meta = {
        "lora_zoo": json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "roles": {n: r for n, r in roles.items() if r != ROLE_CORE},
            },
            sort_keys=True,
        )
    }
    return pa.schema(fields, metadata=meta)


def columns_json(schema: pa.Schema, roles: Mapping[str, str]) -> list[dict[str, str]]:
    """The manifest's ``columns`` list: name, arrow type string, role."""
    return [
        {"name": f.name, "type": type_str(f.type), "role": roles.get(f.name, ROLE_CORE)}
        for f in schema
    ]


def schema_matches(schema: pa.Schema, columns: list[Mapping[str, Any]]) -> str | None:
    """None when a shard's schema agrees with the manifest's columns, else what differs."""
    got = [(f.name, type_str(f.type)) for f in schema]
    want = [(c.get("name"), c.get("type")) for c in columns]
    if got == want:
        return None
    gn, wn = [g[0] for g in got], [w[0] for w in want]
    if gn != wn:
        return f"columns {gn} differ from the manifest's {wn}"
    diff = [f"{g[0]}: {g[1]} != {w[1]}" for g, w in zip(got, want) if g != w]
    return "column types differ from the manifest: " + "; ".join(diff)


def check_core_types(schema: pa.Schema, *, file: str | None = None) -> None:
    """Refuse a shard whose core columns have another Arrow type (a ``weights`` of strings, an
    int ``lora_id``): every reader and loader relies on these types, so a wrong one is named
    here, when the shard is opened, not as a pyarrow error deep in a decode. Core columns absent
    from the shard are reported by ``verify`` (schema vs manifest)."""
    for f in CORE_FIELDS:
        i = schema.get_field_index(f.name)
        if i < 0:
            continue
        got = schema.field(i).type
        ok = got == f.type or (pa.types.is_binary(f.type) and pa.types.is_large_binary(got))
        ok = ok or (pa.types.is_string(f.type) and pa.types.is_large_string(got))
        if not ok:
            raise ZooFormatError(
                f"column has Arrow type {got} but the format requires {f.type}",
                file=file,
                key=f.name,
            )
