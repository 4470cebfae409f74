"""Named splits: seeded random or group-aware assignments of lora_ids, stored in the zoo.

Why stored: LoL results are only comparable when everyone trains and tests on the same LoRAs,
so a split is computed once (seeded, deterministic for a given zoo) and saved as
``splits/<name>.json`` (``{split: [lora_id, ...]}``) plus an entry in the manifest's
``named_splits`` (kind, key, seed, fractions, counts, sha256). Rows are not moved: a named
split is a view over the zoo's physical splits.

Group-aware splits keep every group inside one split, so a model is tested on LoRAs whose
group (task, prompt, data subset, ...) it never saw. A LoRA whose group value is a list (e.g.
the tasks it was trained on) gets ``frozenset(list)`` as its group with ``lists="set"``
(order-insensitive: [a, b] and [b, a] together), or with ``lists="components"`` the connected
component of all LoRAs sharing any element (no element appears in two splits; stricter, may
collapse to few groups). Null values form one group.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lora_zoo._io import atomic_write_bytes, safe_mkdirs, sha256_file, stable_permutation
from lora_zoo.errors import DuplicateIdError, SelectionError, ZooFormatError
from lora_zoo.zoo.manifest import join, read_manifest, write_manifest
from lora_zoo.zoo.schema import SPLITS_DIR, check_named_split_name, check_split_name

log = logging.getLogger(__name__)


def parse_fractions(spec: str | Mapping[str, float]) -> dict[str, float]:
    """``"train=0.8,test=0.2"`` or a dict -> {split: fraction}; fractions must sum to 1."""
    if isinstance(spec, str):
        out: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, val = part.partition("=")
            try:
                out[name.strip()] = float(val)
            except ValueError:
                sep = ""
            if not sep:
                raise ZooFormatError(f"expected name=fraction, got {part!r}", key="fractions")
    else:
        out = {str(k): float(v) for k, v in spec.items()}
    if not out:
        raise ZooFormatError("no fractions given", key="fractions")
    for name, f in out.items():
        check_split_name(name)
        if not 0 <= f <= 1:
            raise ZooFormatError(f"fraction {f} of {name!r} is not in [0, 1]", key="fractions")
    if abs(sum(out.values()) - 1) > 1e-6:
        raise ZooFormatError(f"fractions sum to {sum(out.values())}, not 1", key="fractions")
    return out


def _counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder rounding: counts sum to exactly n."""
    raw = {k: f * n for k, f in fractions.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    order = sorted(raw, key=lambda k: (-(raw[k] - counts[k]), list(raw).index(k)))
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def random_split(
    ids: Sequence[str], fractions: Mapping[str, float], seed: int = 0
) -> dict[str, list[str]]:
    """Seeded shuffle of the sorted ids (so input order does not matter), then cut."""
    fractions = parse_fractions(fractions)
    order = sorted(ids)
    if len(set(order)) != len(order):
        raise DuplicateIdError("ids are not unique", key="lora_id")
    perm = stable_permutation(len(order), seed, "split/random")
    out, start = {}, 0
    for name, c in _counts(len(order), fractions).items():
        out[name] = [order[j] for j in perm[start : start + c]]
        start += c
    return out


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


def group_keys(values: Sequence[Any], lists: str = "set") -> list[Any]:
    """One hashable group per LoRA (see the module docstring for list values)."""
    if lists not in ("set", "components"):
        raise ZooFormatError(f"lists must be 'set' or 'components', not {lists!r}", key="lists")
    keys = [frozenset(map(_hashable, v)) if isinstance(v, list) else ("value", v) for v in values]
    if lists == "set":
        return keys
    parent: dict[Any, Any] = {}

    def find(x: Any) -> Any:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for k in keys:  # union every element of a list with its first element
        elems = sorted(k, key=repr) if isinstance(k, frozenset) else [k]
        for e in elems[1:]:
            parent[find(e)] = find(elems[0])
    return [
        ("component", find(sorted(k, key=repr)[0])) if isinstance(k, frozenset) and k else k
        for k in keys
    ]


def group_split(
    ids: Sequence[str],
    values: Sequence[Any],
    fractions: Mapping[str, float],
    seed: int = 0,
    *,
    lists: str = "set",
) -> dict[str, list[str]]:
    """Whole groups go to one split: groups are shuffled (seeded, from a sorted order) and each
    goes to the split furthest below its target row count, so sizes approach the fractions."""
    fractions = parse_fractions(fractions)
    if len(ids) != len(values):
        raise ZooFormatError("ids and group values differ in length", key="key")
    keys = group_keys(values, lists)
    members: dict[Any, list[str]] = {}
    for lid, k in zip(ids, keys):
        members.setdefault(k, []).append(lid)
    groups = sorted(
        members, key=lambda k: repr(sorted(map(repr, k))) if isinstance(k, frozenset) else repr(k)
    )
    perm = stable_permutation(len(groups), seed, "split/group")
    target = {s: f * len(ids) for s, f in fractions.items()}
    out: dict[str, list[str]] = {s: [] for s in fractions}
    for j in perm:
        g = groups[j]
        best = max(fractions, key=lambda s: (target[s] - len(out[s]), fractions[s]))
        out[best] += members[g]
    for s in out:
        out[s].sort()
        if fractions[s] > 0 and not out[s]:
            log.warning("group split: %r got no LoRA (only %d groups)", s, len(groups))
    return out


# ---- storage -----------------------------------------------------------------------------------
def _local_root(zoo: Any) -> Path:
    protocol = getattr(zoo.fs, "protocol", ())
    if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
        raise ZooFormatError(
            "named splits are written into a local zoo folder (pull it first)",
            file=zoo.source,
            key="splits",
        )
    return Path(zoo.root)


def save_named_split(
    zoo: Any, name: str, assignment: Mapping[str, Sequence[str]], **params: Any
) -> dict[str, Any]:
    """Write ``splits/<name>.json`` into an opened local ``Zoo``, then swap in a manifest listing
    it. Every id must be in the zoo and in at most one split. Returns the new manifest."""
    check_named_split_name(name)
    root = _local_root(zoo)
    known = {lid: (s, i) for s in zoo.splits for i, lid in enumerate(zoo[s].ids)}
    seen: set[str] = set()
    clean: dict[str, list[str]] = {}
    rel = f"{SPLITS_DIR}/{name}.json"
    for split, members in assignment.items():
        check_split_name(split, file=rel)
        for lid in members:
            if lid not in known:
                raise SelectionError(f"lora_id {lid!r} is not in the zoo", file=rel, key=split)
            if lid in seen:
                raise DuplicateIdError(f"lora_id {lid!r} is in two splits", file=rel, key=split)
            seen.add(lid)
        order = {s: k for k, s in enumerate(zoo.splits)}
        clean[split] = sorted(members, key=lambda x: (order[known[x][0]], known[x][1]))
    safe_mkdirs(root, SPLITS_DIR)
    data = (json.dumps(clean, indent=1) + "\n").encode()
    atomic_write_bytes(root / rel, data, root=root)
    fs, r = zoo.fs, zoo.root
    manifest = read_manifest(fs, r)
    digest, size = sha256_file(fs, join(r, rel))
    manifest.setdefault("named_splits", {})[name] = {
        "path": rel,
        **params,
        "num_rows": {s: len(v) for s, v in clean.items()},
        "num_bytes": size,  # every file a manifest lists carries its size and hash (format 2)
        "sha256": digest,
    }
    write_manifest(root, manifest)
    return manifest


def make_named_split(
    zoo: Any,
    name: str,
    kind: str,
    fractions: Any,
    seed: int = 0,
    key: str | None = None,
    lists: str = "set",
) -> dict[str, list[str]]:
    """Compute a random / group split over every LoRA of an opened local ``Zoo`` and store it
    by name."""
    fr = parse_fractions(fractions)
    ids = [lid for s in zoo.splits for lid in zoo[s].ids]
    if kind == "random":
        assign = random_split(ids, fr, seed)
        params: dict[str, Any] = {"kind": kind, "seed": seed, "fractions": fr}
    elif kind == "group":
        cols = [c["name"] for c in zoo.manifest["columns"]]
        if not key or key not in cols:
            raise SelectionError(
                f"group split needs --key, one of {cols}", file=zoo.source, key="key"
            )
        values = [v for s in zoo.splits for v in zoo[s].table([key]).column(0).to_pylist()]
        assign = group_split(ids, values, fr, seed, lists=lists)
        params = {"kind": kind, "key": key, "lists": lists, "seed": seed, "fractions": fr}
    else:
        raise ZooFormatError(f"kind must be random or group, not {kind!r}", key="kind")
    save_named_split(zoo, name, assign, **params)
    return assign


def load_assignment(zoo: Any, name: str) -> dict[str, list[str]]:
    if name not in zoo.named_splits:
        raise SelectionError(
            f"no named split {name!r}; stored: {sorted(zoo.named_splits)}",
            file=zoo.source,
            key="name",
        )
    rel = zoo.named_splits[name].get("path", f"{SPLITS_DIR}/{name}.json")
    path = join(zoo.root, rel)
    try:
        with zoo.fs.open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, json.JSONDecodeError) as e:
        raise ZooFormatError(f"cannot read named split ({e})", file=path) from e
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ZooFormatError("must be {split: [lora_id, ...]}", file=path)
    return data


def named_split_views(zoo: Any, name: str) -> dict[str, SplitView]:
    return {s: SplitView(zoo, s, ids) for s, ids in load_assignment(zoo, name).items()}


class SplitView:
    """The ZooSplit API over a subset of a zoo's LoRAs (possibly from several physical
    splits), in zoo row order."""

    def __init__(self, zoo: Any, name: str, ids: Sequence[str]) -> None:
        self.zoo, self.name = zoo, name
        where: dict[str, tuple[str, int]] = {}
        for s in zoo.splits:
            for i, lid in enumerate(zoo[s].ids):
                where[lid] = (s, i)
        missing = [lid for lid in ids if lid not in where]
        if missing:
            raise SelectionError(
                f"{len(missing)} id(s) not in the zoo, e.g. {missing[0]!r}",
                file=zoo.source,
                key=name,
            )
        self._loc = sorted(
            (where[lid] for lid in ids), key=lambda t: (zoo.splits.index(t[0]), t[1])
        )
        self.ids = [zoo[s].ids[i] for s, i in self._loc]
        self.index = {lid: k for k, lid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self._loc)

    def __repr__(self) -> str:
        return f"SplitView({self.name!r}, rows={len(self)})"

    columns = property(lambda self: [c["name"] for c in self.zoo.manifest["columns"]])
    label_columns = property(lambda self: self.zoo.columns_with_role("label"))
    metadata_columns = property(lambda self: self.zoo.columns_with_role("metadata"))

    def _at(self, i: int | str) -> tuple[Any, int]:
        k = self.index[i] if isinstance(i, str) and i in self.index else i
        if isinstance(k, str):
            raise SelectionError(f"no LoRA {k!r} in {self.name!r}", key="lora_id")
        s, j = self._loc[int(k)]
        return self.zoo[s], j

    def row(self, i: int | str) -> dict[str, Any]:
        sp, j = self._at(i)
        return sp.row(j)

    def weights_bytes(self, i: int | str) -> bytes:
        sp, j = self._at(i)
        return sp.weights_bytes(j)

    def cell(self, i: int | str) -> tuple[str, bytes, str]:
        sp, j = self._at(i)
        return sp.cell(j)

    def record(self, i: int | str, **kw: Any):
        sp, j = self._at(i)
        return sp.record(j, **kw)

    __getitem__ = record

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        parts = []
        for s in self.zoo.splits:
            rows = [j for ss, j in self._loc if ss == s]
            if rows:
                parts.append(self.zoo[s].table(columns).take(pa.array(rows, pa.int64())))
        if not parts:
            return self.zoo[self.zoo.splits[0]].table(columns).slice(0, 0)
        return pa.concat_tables(parts)

    def iter_batches(
        self, columns: Sequence[str] | None = None, batch_size: int = 256
    ) -> Iterator[pa.RecordBatch]:
        """Filtered physical record batches, re-cut to ``batch_size`` rows."""
        pending: list[pa.RecordBatch] = []
        n_pending = 0
        for s in self.zoo.splits:
            keep = {j for ss, j in self._loc if ss == s}
            if not keep:
                continue
            offset = 0
            for b in self.zoo[s].iter_batches(columns, batch_size):
                mask = pa.array([offset + r in keep for r in range(b.num_rows)])
                offset += b.num_rows
                fb = b.filter(mask)
                if fb.num_rows:
                    pending.append(fb)
                    n_pending += fb.num_rows
                while n_pending >= batch_size:
                    t = pa.Table.from_batches(pending).combine_chunks()
                    yield t.slice(0, batch_size).to_batches()[0]
                    rest = t.slice(batch_size)
                    pending, n_pending = rest.to_batches(), rest.num_rows
        if n_pending:
            yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]

    def to_pandas(self, include_weights: bool = False):
        cols = [c for c in self.columns if include_weights or c != "weights"]
        return self.table(cols).to_pandas()
