"""``ZooWriter``: append LoRAs, roll Parquet shards, finalize atomically.

Why it is shaped this way:
- A zoo build can die at any moment (OOM, preemption, kill -9). Shards are written under hidden
  ``.tmp`` names and renamed only when complete (after fsync), and the manifest is renamed into
  place last, so a directory is either "no manifest" (unfinished) or fully consistent.
- Builders hand over loose dicts. Column types are inferred from the rows and unified (null ->
  anything, int -> float, lists elementwise); a row that changes the schema closes the current
  shard, and ``close()`` rewrites the few shards whose schema is narrower than the final one, so
  every shard ends with the same Arrow schema (``datasets`` requires that).
- Row groups are bounded by bytes *and* rows: the Hub viewer rejects huge row groups, and small
  ones keep random access (one LoRA = one row-group read) cheap.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lora_zoo._io import (
    TMP_SUFFIX,
    check_write_target,
    commit_staged,
    fsync_dir,
    map_regular,
    open_regular,
    read_regular,
    safe_mkdirs,
    sha256_file,
    stage_bytes,
    tmp_path_for,
)
from lora_zoo.errors import DuplicateIdError, SchemaConflictError, ZooFormatError
from lora_zoo.record import LoraRecord
from lora_zoo.zoo.card_min import stage_minimal_card
from lora_zoo.zoo.croissant import CROISSANT_NAME, croissant_bytes
from lora_zoo.zoo.manifest import read_manifest, write_manifest
from lora_zoo.zoo.schema import (
    CORE_COLUMNS,
    DATA_DIR,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_FILES_PER_DIR,
    README_NAME,
    ROLE_LABEL,
    ROLE_METADATA,
    SHARD_SUFFIX,
    SPLITS_DIR,
    build_schema,
    check_split_name,
    columns_json,
    flatten,
    leaf_paths,
    shard_index,
    shard_name,
    to_plain,
    type_of,
    type_str,
    unify,
)

log = logging.getLogger(__name__)
_ROW_OVERHEAD = 256  # rough bytes per row besides the weights, for size budgeting


#: How shards are written; recorded in every manifest ("parquet"). A page index, as the Hub
#: writes it (the viewer and streaming readers seek by page instead of scanning a row group).
#: Content-defined chunking (pyarrow's option, which datasets 5.x turns on) is *off*: measured
#: on this project's shards (uncompressed safetensors blobs, pyarrow 26, one LoRA inserted in
#: the middle of a 60-LoRA 8 MB shard, Xet-like 64 KiB byte chunks, tests/reference/cdc.py),
#: 94% of the re-packed shard's bytes are reused without it and 77% (57% with 64-256 KiB pages)
#: with it: uncompressed PLAIN pages already shift cleanly, and CDC only adds page headers.
#: Pass ``use_content_defined_chunking`` here (a dict of pyarrow's options) to turn it on.
PARQUET_SETTINGS: dict[str, Any] = {
    "write_page_index": True,
    "use_content_defined_chunking": False,
    "compression": {"weights": "NONE", "other": "ZSTD"},
}
ROW_GROUP_MAX_BYTES = 64 << 20  # <= 100 MiB uncompressed, the Hub viewer's limit
SHARD_MAX_BYTES = 500 * 10**6  # <= 500 MB per shard, as datasets pushes


def open_shard_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    """Parquet writer with the format's per-column options: weights uncompressed, no
    dictionary and no min/max statistics (safetensors blobs neither compress nor sort, and
    statistics would copy every blob into the footer); everything else zstd; page index and
    content-defined chunking (``PARQUET_SETTINGS``)."""
    comp, stats, dict_cols = {}, [], []
    for f in schema:
        for p in leaf_paths(f):
            comp[p] = "NONE" if f.name == "weights" else "ZSTD"
            if f.name != "weights":
                stats.append(p)
            if f.name not in ("weights", "lora_id"):
                dict_cols.append(p)
    check_write_target(path)  # the temp name: never a link someone planted
    Path(path).unlink(missing_ok=True)
    return pq.ParquetWriter(
        str(path),
        schema,
        compression=comp,
        write_statistics=stats,
        use_dictionary=dict_cols,
        write_page_index=PARQUET_SETTINGS["write_page_index"],
        use_content_defined_chunking=PARQUET_SETTINGS["use_content_defined_chunking"],
    )


def conform_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast / null-fill / reorder ``table`` to ``schema`` (widening only: int -> float etc.)."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _finish_file(tmp: Path, final: Path) -> None:
    check_write_target(final)
    with open_regular(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


@dataclass
class _OpenShard:
    index: int
    tmp: Path
    writer: pq.ParquetWriter
    schema: pa.Schema
    rows: int = 0
    nbytes: int = 0


@dataclass
class _Split:
    name: str
    next_index: int = 0
    buffer: list[dict[str, Any]] = field(default_factory=list)
    buffer_bytes: int = 0
    open: _OpenShard | None = None
    # manifest shard entries plus private "_schema" (pa.Schema | None) and "_new" (bool)
    shards: list[dict[str, Any]] = field(default_factory=list)


class ZooWriter:
    """Write (``mode="create"``), extend (``"append"``) or replace (``"overwrite"``) a zoo dir.

    Use as a context manager or call ``close()``; on an exception inside ``with`` the partial
    write is discarded (temp files removed, manifest untouched).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        shard_max_rows: int = 1000,
        shard_max_bytes: int = SHARD_MAX_BYTES,
        row_group_max_bytes: int = ROW_GROUP_MAX_BYTES,
        mode: str = "create",
        *,
        row_group_max_rows: int = 128,
        validate: bool = True,
    ) -> None:
        if mode not in ("create", "append", "overwrite"):
            raise ValueError(f"mode must be create, append or overwrite, not {mode!r}")
        if min(shard_max_rows, shard_max_bytes, row_group_max_bytes, row_group_max_rows) < 1:
            raise ValueError("shard / row-group limits must be positive")
        self.root = Path(root)
        self.shard_max_rows, self.shard_max_bytes = shard_max_rows, shard_max_bytes
        self.row_group_max_bytes, self.row_group_max_rows = row_group_max_bytes, row_group_max_rows
        self.validate = validate
        self.mode = mode
        self._types: dict[str, pa.DataType] = {}  # non-core columns, first-seen order
        self._roles: dict[str, str] = {}
        self._ids: set[str] = set()
        self._splits: dict[str, _Split] = {}
        self._info: dict[str, Any] = {}
        self._named_splits: dict[str, Any] = {}
        self._superseded: list[Path] = []
        self._carry_named: dict[str, Any] = {}
        self._replacing = False
        self._closed = False
        self._prepare_dir()

    # ---- setup ---------------------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        manifest = self.root / MANIFEST_NAME
        data = self.root / DATA_DIR
        if self.mode == "overwrite":
            # Replace, never delete first: the old manifest keeps pointing at intact old shards
            # until the new manifest lands (new shards take fresh indices, see _split), so a
            # kill at any moment leaves the old zoo or the new one. Named splits and every
            # other file a user added stay; named splits whose LoRAs all survive are carried.
            if manifest.exists():
                try:
                    self._carry_named = dict(
                        read_manifest(*_local(self.root)).get("named_splits") or {}
                    )
                except ZooFormatError as e:
                    log.warning("replacing an unreadable zoo manifest: %s", e)
            self._replacing = True
        elif self.mode == "create":
            if manifest.exists():
                raise ZooFormatError(
                    "already a zoo; use mode='append' to add LoRAs or mode='overwrite'",
                    file=manifest,
                )
            leftovers = sorted(data.glob(f"*{SHARD_SUFFIX}")) if data.exists() else []
            if leftovers:
                raise ZooFormatError(
                    f"{len(leftovers)} shard file(s) without a manifest (an interrupted write?); "
                    "delete data/ or use mode='overwrite'",
                    file=leftovers[0],
                )
        else:
            self._load_existing()
        safe_mkdirs(self.root, DATA_DIR)  # a symlinked data/ must not redirect the shards

    def _load_existing(self) -> None:
        m = read_manifest(*_local(self.root))
        self._info = dict(m.get("info") or {})
        self._named_splits = dict(m.get("named_splits") or {})
        for c in m["columns"]:
            if c["name"] not in CORE_COLUMNS:
                self._roles[c["name"]] = c["role"]
        first = None
        for split, sp in m["splits"].items():
            st = self._split(split)
            for sh in sp["shards"]:
                path = self.root / sh["path"]
                pf = pq.ParquetFile(path)
                schema = pf.schema_arrow
                first = first or schema
                ids = pf.read(columns=["lora_id"]).column(0).to_pylist()
                dup = self._ids.intersection(ids)
                if dup:
                    raise DuplicateIdError(
                        f"lora_id {sorted(dup)[0]!r} twice in the zoo", file=path, key="lora_id"
                    )
                self._ids.update(ids)
                st.shards.append({**{k: sh[k] for k in sh}, "_schema": schema, "_new": False})
        if first is not None:
            for f in first:
                if f.name not in CORE_COLUMNS:
                    self._types[f.name] = f.type
        # never reuse an index present on disk (a crashed append may have left files)
        for p in (self.root / DATA_DIR).glob(f"*{SHARD_SUFFIX}"):
            split = p.name.rsplit("-", 1)[0]
            if split in self._splits:
                st = self._splits[split]
                st.next_index = max(st.next_index, shard_index(p.name) + 1)

    def _split(self, name: str) -> _Split:
        if name not in self._splits:
            check_split_name(name, file=self.root)
            st = _Split(name)
            data = self.root / DATA_DIR
            existing = [shard_index(p.name) for p in data.glob(f"{name}-*{SHARD_SUFFIX}")]
            st.next_index = max(existing, default=-1) + 1
            self._splits[name] = st
        return self._splits[name]

    # ---- public API ------------------------------------------------------------------------------
    def add(
        self,
        record: LoraRecord,
        *,
        lora_id: str,
        split: str = "train",
        metadata: dict[str, Any] | None = None,
        labels: dict[str, Any] | None = None,
        base_model: str = "",
        collection: str = "default",
    ) -> None:
        """Buffer one LoRA; rows go to disk a row group at a time."""
        self._check_id(lora_id)
        st = self._split(split)
        if self.validate:
            record.validate(file=lora_id)
        row, new_types, new_roles = self._columns(lora_id, metadata, labels)
        weights = record.to_safetensors_bytes()
        row.update(
            lora_id=lora_id,
            weights=weights,
            adapter_config=json.dumps(record.config, sort_keys=True),
            base_model=base_model,
            collection=collection,
            rank=max((m.rank for m in record.modules.values()), default=0),
            num_modules=len(record.modules),
        )
        self._types.update(new_types)
        self._roles.update(new_roles)
        self._ids.add(lora_id)
        self._buffer(st, row, len(weights) + _ROW_OVERHEAD)

    def _check_id(self, lora_id: str) -> None:
        if self._closed:
            raise ZooFormatError("writer is closed", file=self.root)
        if not isinstance(lora_id, str) or not lora_id:
            raise ZooFormatError(
                f"lora_id must be a non-empty string, got {lora_id!r}",
                file=self.root,
                key="lora_id",
            )
        if lora_id in self._ids:
            raise DuplicateIdError(
                f"lora_id {lora_id!r} is already in the zoo", file=self.root, key="lora_id"
            )

    def _columns(
        self, lora_id: str, metadata: dict[str, Any] | None, labels: dict[str, Any] | None
    ) -> tuple[dict[str, Any], dict[str, pa.DataType], dict[str, str]]:
        """The row's metadata and label cells, with each column's unified type and role; the
        writer's own schema is updated by the caller only once the whole row is good."""
        row: dict[str, Any] = {}
        new_types: dict[str, pa.DataType] = {}
        new_roles: dict[str, str] = {}
        flat_m = flatten(metadata, what="metadata", lora_id=lora_id)
        flat_l = flatten(labels, what="labels", lora_id=lora_id)
        for role, flat in ((ROLE_METADATA, flat_m), (ROLE_LABEL, flat_l)):
            for name, value in flat.items():
                if name in CORE_COLUMNS:
                    raise ZooFormatError(
                        f"{name!r} is a core column name; rename this {role}",
                        file=self.root,
                        key=name,
                    )
                known_role = new_roles.get(name) or self._roles.get(name)
                if known_role is not None and known_role != role:
                    raise SchemaConflictError(
                        f"{lora_id!r} gives {name!r} as {role} but it is a {known_role} column",
                        file=self.root,
                        key=name,
                    )
                value = to_plain(value)
                t = type_of(value, column=name, lora_id=lora_id)
                old = self._types.get(name)
                u = t if old is None else unify(old, t)
                if u is None:
                    raise SchemaConflictError(
                        f"{lora_id!r} gives a {type_str(t)} value but the column holds "
                        f"{type_str(old)}",
                        file=self.root,
                        key=name,
                    )
                new_types[name], new_roles[name], row[name] = u, role, value
        return row, new_types, new_roles

    def _buffer(self, st: _Split, row: dict[str, Any], size: int) -> None:
        """Append a row to its split's buffer. Bounds are upper bounds: flush / roll *before*
        a row would cross them (a single row larger than a bound still gets its own row group
        / shard)."""
        if st.buffer and st.buffer_bytes + size > self.row_group_max_bytes:
            self._flush(st)
        in_shard = (st.open.nbytes if st.open else 0) + st.buffer_bytes
        if (st.open or st.buffer) and in_shard + size > self.shard_max_bytes:
            self._flush(st)
            if st.open is not None:
                self._finish(st)
        st.buffer.append(row)
        st.buffer_bytes += size
        rows_left = self.shard_max_rows - (st.open.rows if st.open else 0)
        bytes_left = self.shard_max_bytes - (st.open.nbytes if st.open else 0)
        if len(st.buffer) >= min(self.row_group_max_rows, rows_left) or st.buffer_bytes >= min(
            self.row_group_max_bytes, bytes_left
        ):
            self._flush(st)

    def set_info(self, **info: Any) -> None:
        """Merge JSON-able entries (recipe, provenance, builder, ...) into the manifest info."""
        for k, v in info.items():
            try:
                json.dumps(v)
            except (TypeError, ValueError) as e:
                raise ZooFormatError(
                    f"info value is not JSON-able ({e})", file=self.root, key=k
                ) from e
        self._info.update(info)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, lora_id: object) -> bool:
        return lora_id in self._ids

    def __enter__(self) -> ZooWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop buffered rows and temp files; the manifest (if any) is left as it was."""
        for st in self._splits.values():
            if st.open is not None:
                st.open.writer.close()
                st.open.tmp.unlink(missing_ok=True)
                st.open = None
            st.buffer.clear()
        self._closed = True

    # ---- shards --------------------------------------------------------------------------------
    def _schema(self) -> pa.Schema:
        return build_schema(self._types, self._roles)

    def _flush(self, st: _Split) -> None:
        if not st.buffer:
            return
        schema = self._schema()
        if st.open is not None and not st.open.schema.equals(schema, check_metadata=True):
            self._finish(st)  # schema widened: start a new shard; close() conforms the old one
        if st.open is None:
            n_files = sum(len(s.shards) + (s.open is not None) for s in self._splits.values())
            if n_files + 1 >= MAX_FILES_PER_DIR:
                raise ZooFormatError(
                    f"more than {MAX_FILES_PER_DIR} shards in data/ (the Hub's per-folder "
                    "limit); raise shard_max_rows / shard_max_bytes",
                    file=self.root / DATA_DIR,
                )
            final = self.root / shard_name(st.name, st.next_index)
            tmp = tmp_path_for(final)
            st.open = _OpenShard(st.next_index, tmp, open_shard_writer(tmp, schema), schema)
            st.next_index += 1
        table = pa.Table.from_pylist(st.buffer, schema=schema)
        st.open.writer.write_table(table, row_group_size=max(1, table.num_rows))
        st.open.rows += table.num_rows
        st.open.nbytes += st.buffer_bytes
        st.buffer, st.buffer_bytes = [], 0
        if st.open.rows >= self.shard_max_rows or st.open.nbytes >= self.shard_max_bytes:
            self._finish(st)

    def _finish(self, st: _Split) -> None:
        """Close the open shard, fsync, rename it to its final name, hash it."""
        o = st.open
        assert o is not None
        o.writer.close()
        rel = shard_name(st.name, o.index)
        _finish_file(o.tmp, self.root / rel)
        digest, size = sha256_file(*_local(self.root / rel))
        st.shards.append(
            {
                "path": rel,
                "num_rows": o.rows,
                "num_bytes": size,
                "sha256": digest,
                "_schema": o.schema,
                "_new": True,
            }
        )
        st.open = None
        log.debug("finished shard %s (%d rows, %d bytes)", rel, o.rows, size)

    def _conform(self, st: _Split, sh: dict[str, Any], schema: pa.Schema) -> None:
        """Rewrite a shard to the final schema. Shards from an earlier session get a new name
        (the old manifest keeps pointing at intact files until the new manifest lands)."""
        src = self.root / sh["path"]
        rel = sh["path"] if sh["_new"] else shard_name(st.name, st.next_index)
        if not sh["_new"]:
            st.next_index += 1
            self._superseded.append(src)
        dst = self.root / rel
        tmp = tmp_path_for(dst)
        pf = pq.ParquetFile(pa.py_buffer(map_regular(src, root=self.root)))
        w = open_shard_writer(tmp, schema)
        for i in range(pf.num_row_groups):  # keep row-group boundaries
            t = conform_table(pf.read_row_group(i), schema)
            w.write_table(t, row_group_size=max(1, t.num_rows))
        w.close()
        _finish_file(tmp, dst)
        digest, size = sha256_file(*_local(dst))
        sh.update(path=rel, num_bytes=size, sha256=digest, _schema=schema, _new=True)

    def close(self) -> dict[str, Any]:
        """Flush, conform every shard to the final schema, write README.md, then the manifest
        (atomic rename, last). Returns the manifest."""
        if self._closed:
            raise ZooFormatError("writer is already closed", file=self.root)
        for st in self._splits.values():
            self._flush(st)
            if st.open is not None:
                self._finish(st)
        schema = self._schema()
        for st in self._splits.values():
            for sh in st.shards:
                if sh["_schema"] is None or not sh["_schema"].equals(schema, check_metadata=True):
                    self._conform(st, sh, schema)
        if self._replacing:
            self._named_splits = self._carried_named_splits()
        manifest = self._manifest(schema)
        # README.md and croissant.json derive from the manifest: staged before its rename (the
        # commit point) and renamed after it, so a kill before the commit leaves the old zoo
        # agreeing with its old card, and one after it leaves the new card staged (verify says so)
        staged = [
            (stage_minimal_card(self.root, manifest), self.root / README_NAME),
            (
                stage_bytes(
                    self.root / CROISSANT_NAME,
                    croissant_bytes(manifest, name=self.root.resolve().name),
                    root=self.root,
                ),
                self.root / CROISSANT_NAME,
            ),
        ]
        write_manifest(self.root, manifest)
        for tmp, final in staged:
            commit_staged(tmp, final)
        for p in self._superseded:
            p.unlink(missing_ok=True)
        if self._replacing:  # the old zoo's shards (and crash leftovers): data/ is ours alone
            listed = {sh["path"] for sp in manifest["splits"].values() for sh in sp["shards"]}
            for p in (self.root / DATA_DIR).iterdir():
                stale = p.name.endswith(SHARD_SUFFIX) and f"{DATA_DIR}/{p.name}" not in listed
                if stale or (p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)):
                    p.unlink(missing_ok=True)
        fsync_dir(self.root / DATA_DIR)
        self._closed = True
        n = manifest["num_rows"]
        log.info("zoo %s: %d LoRAs in %d split(s)", self.root, n, len(manifest["splits"]))
        return manifest

    def _carried_named_splits(self) -> dict[str, Any]:
        """The old zoo's named splits whose every LoRA is in the new zoo (their files are kept
        either way; a split naming a LoRA that is gone is left out of the manifest, loudly)."""
        import json

        out: dict[str, Any] = {}
        for name, ns in self._carry_named.items():
            rel = ns.get("path", f"{SPLITS_DIR}/{name}.json") if isinstance(ns, dict) else None
            try:
                raw = read_regular(self.root / rel, root=self.root) if rel else None
                data = json.loads(raw) if raw is not None else None
                ids = {i for v in data.values() for i in v} if isinstance(data, dict) else None
            except (OSError, ValueError, TypeError):
                ids = None
            if ids is not None and ids <= self._ids:
                out[name] = ns
            else:
                log.warning(
                    "named split %r names LoRAs the replaced zoo no longer has: left out of the "
                    "manifest; its file %s is kept",
                    name,
                    rel,
                )
        return out

    def _manifest(self, schema: pa.Schema) -> dict[str, Any]:
        from lora_zoo import __version__

        splits = {}
        for name, st in self._splits.items():
            shards = [
                {k: sh[k] for k in ("path", "num_rows", "num_bytes", "sha256")} for sh in st.shards
            ]
            splits[name] = {
                "num_rows": sum(s["num_rows"] for s in shards),
                "num_bytes": sum(s["num_bytes"] for s in shards),
                "shards": shards,
            }
        return {
            "format_version": FORMAT_VERSION,
            "lora_zoo_version": __version__,
            "num_rows": sum(s["num_rows"] for s in splits.values()),
            "splits": splits,
            "columns": columns_json(schema, self._roles),
            "named_splits": self._named_splits,
            "parquet": {  # how the shards were written (format 2)
                **PARQUET_SETTINGS,
                "row_group_max_bytes": self.row_group_max_bytes,
                "row_group_max_rows": self.row_group_max_rows,
                "shard_max_bytes": self.shard_max_bytes,
                "shard_max_rows": self.shard_max_rows,
            },
            "info": self._info,
        }


def _local(path: Path):
    from lora_zoo._io import local_fs

    return local_fs(path), str(path)
