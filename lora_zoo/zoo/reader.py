"""Read a zoo straight from its Parquet shards with pyarrow (no ``datasets`` cache copy).

``Zoo`` only needs an fsspec filesystem and a root path, so a local folder, a Hub repo (resolved
by ``lora_zoo.remote.pull.open_remote``) and an S3 / HTTP URL are read by the same code. Weights are
decoded lazily, per row, from the row group that holds them (a small LRU of decoded row groups
makes sequential and nearby access cheap); large zoos are walked record batch by record batch.
Tensors keep their stored dtype (fp16 / bf16 are never upcast here).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from lora_zoo._io import local_fs, map_regular, open_regular
from lora_zoo.errors import IntegrityError, SelectionError, reading
from lora_zoo.record import LoraRecord
from lora_zoo.zoo.manifest import join, read_manifest
from lora_zoo.zoo.manifest import verify as verify_zoo
from lora_zoo.zoo.schema import ROLE_LABEL, ROLE_METADATA, check_core_types

log = logging.getLogger(__name__)


def _ident(st: os.stat_result) -> tuple[int, ...]:
    """What names one version of a file: device, inode, size, modification time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ZooSplit:
    """One physical split: an ordered list of shards, addressed by global row index or id."""

    def __init__(
        self, zoo: Zoo, name: str, shards: list[dict[str, Any]], cache_row_groups: int = 4
    ) -> None:
        self.zoo, self.name = zoo, name
        self._shards = shards
        self._starts = [0]  # global index of each shard's first row
        for sh in shards:
            self._starts.append(self._starts[-1] + int(sh["num_rows"]))
        self._files: dict[int, pq.ParquetFile] = {}
        self._rg_starts: dict[int, list[int]] = {}
        self._idents: dict[int, tuple[int, ...]] = {}  # local shards: the file the footer is from
        self._cache: OrderedDict[tuple[int, int, tuple[str, ...]], pa.Table] = OrderedDict()
        self._cache_size = cache_row_groups
        self._ids: list[str] | None = None
        self._ids_by_shard: dict[int, list[str]] = {}
        self._index: dict[str, int] | None = None

    # ---- schema ------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"ZooSplit({self.name!r}, rows={len(self)}, shards={len(self._shards)})"

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def columns(self) -> list[str]:
        return [c["name"] for c in self.zoo.manifest["columns"]]

    @property
    def label_columns(self) -> list[str]:
        return self.zoo.columns_with_role(ROLE_LABEL)

    @property
    def metadata_columns(self) -> list[str]:
        return self.zoo.columns_with_role(ROLE_METADATA)

    @property
    def shard_paths(self) -> list[str]:
        return [sh["path"] for sh in self._shards]

    # ---- low-level access -------------------------------------------------------------------
    def _path(self, k: int) -> str:
        return join(self.zoo.root, self._shards[k]["path"])

    def _file(self, k: int) -> pq.ParquetFile:
        if k not in self._files:
            path = self._path(k)
            with reading(path, "footer"):
                if self.zoo.is_local:
                    pf = pq.ParquetFile(pa.py_buffer(map_regular(path, root=self.zoo.root)))
                    self._idents[k] = _ident(os.stat(path, follow_symlinks=False))
                else:
                    pf = pq.ParquetFile(self.zoo.fs.open(path, "rb"))
                md = pf.metadata
                counts = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
                check_core_types(pf.schema_arrow, file=path)
            if md.num_rows != int(self._shards[k]["num_rows"]) or sum(counts) != md.num_rows:
                raise IntegrityError(
                    f"{md.num_rows} rows (row groups: {sum(counts)}) but the manifest says "
                    f"{self._shards[k]['num_rows']}",
                    file=path,
                    key="num_rows",
                )
            self._files[k], self._rg_starts[k] = pf, [0, *itertools.accumulate(counts)]
        return self._files[k]

    def _locate(self, i: int) -> tuple[int, int, int]:
        """global row -> (shard, row group, row inside the row group), from the footers; every
        read through it is then checked against the ids actually read (``_read_group``)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for split {self.name!r} ({n} rows)")
        i %= n
        k = bisect.bisect_right(self._starts, i) - 1
        local = i - self._starts[k]
        self._file(k)
        starts = self._rg_starts[k]
        g = bisect.bisect_right(starts, local) - 1
        return k, g, local - starts[g]

    def _read_group(
        self, k: int, g: int, columns: Sequence[str], *, mapped: bool = True
    ) -> pa.Table:
        """Row group ``g`` of shard ``k`` with ``lora_id`` first, checked for row identity: as
        many rows as the footer promised, and the ids the footer's positions point at. A footer
        that lies about per-row-group counts would otherwise serve one LoRA under another's id.
        ``mapped=False`` reads it through a plain file instead of the shard's memory map
        (``_read_unmapped``).
        """
        cols = list(dict.fromkeys(("lora_id", *columns)))
        path = self._path(k)
        with reading(path, f"row group {g}"):
            if mapped or not self.zoo.is_local:
                t = self._file(k).read_row_group(g, columns=cols)
            else:
                t = self._read_unmapped(k, g, cols)
            got = t.column(0).to_pylist()
        rg = self._rg_starts[k]
        if len(got) != rg[g + 1] - rg[g]:
            raise IntegrityError(
                f"row group {g} holds {len(got)} rows but the footer says {rg[g + 1] - rg[g]}",
                file=path,
                key=f"row group {g}",
            )
        want = self._shard_ids(k)[rg[g] : rg[g + 1]]
        if got != want:
            j = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
            raise IntegrityError(
                f"row group {g} row {j} holds {got[j]!r} where the shard's rows have {want[j]!r}",
                file=path,
                key=str(want[j]),
            )
        return t

    def _read_unmapped(self, k: int, g: int, cols: list[str]) -> pa.Table:
        """Row group ``g`` of local shard ``k`` read with plain reads (``open_regular``, the
        footer already parsed and checked by ``_file``), into Arrow buffers that are freed with
        the table. Why not the memory map: every page of a map that a read touches stays in this
        process's RSS (file-backed, reclaimable, but counted) for as long as the map lives, so
        a streaming pass over a 16 GB zoo would show 16 GB resident. The file is opened per row
        group (one ``open`` per ~64 MiB read) and closed at once: no shared file offset survives
        into forked DataLoader workers, no descriptor is held between reads."""
        md, path = self._file(k).metadata, self._path(k)
        with open_regular(path, root=self.zoo.root) as f:
            if _ident(os.fstat(f.fileno())) != self._idents[k]:
                # re-opened by name: a shard replaced since its footer was read would otherwise
                # be decoded with the old footer's offsets
                raise IntegrityError(
                    "the shard was replaced or changed on disk while the zoo was open",
                    file=path,
                    key=f"row group {g}",
                )
            return pq.ParquetFile(f, metadata=md).read_row_group(g, columns=cols)

    # ---- row-group access (the unit streaming readers shuffle and split) ---------------------
    def row_group_ranges(self) -> list[tuple[int, int]]:
        """Global (start, stop) of every non-empty row group, in order. Reads each shard's
        footer once (cached), never its data."""
        out: list[tuple[int, int]] = []
        for k in range(len(self._shards)):
            if self._starts[k + 1] == self._starts[k]:
                continue
            self._file(k)
            rg = self._rg_starts[k]
            out += [(self._starts[k] + a, self._starts[k] + b) for a, b in zip(rg, rg[1:]) if b > a]
        return out

    def read_rows(self, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Rows [start, stop) read row group by row group (uncached: a streaming read touches
        each row group once), as one table whose columns may be chunked across row groups.
        Read without the memory map (``_read_unmapped``), so a streaming pass does not leave
        the zoo resident: RSS stays flat in the number of rows read."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"rows [{start}, {stop}) out of range for split {self.name!r}")
        cols = self._check_columns(columns) or self.columns
        parts = []
        i = start
        while i < stop:
            k, g, off = self._locate(i)
            rg = self._rg_starts[k]
            take = min(stop - i, rg[g + 1] - rg[g] - off)
            parts.append(self._read_group(k, g, cols, mapped=False).select(cols).slice(off, take))
            i += take
        if not parts:
            sch = self.zoo.schema
            return (
                sch if columns is None else pa.schema([sch.field(c) for c in cols])
            ).empty_table()
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def _row_group(self, k: int, g: int, columns: tuple[str, ...]) -> pa.Table:
        key = (k, g, columns)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        t = self._read_group(k, g, columns)
        self._cache[key] = t
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return t

    def _resolve(self, i_or_id: int | str) -> int:
        if isinstance(i_or_id, str):
            idx = self.index.get(i_or_id)
            if idx is None:
                raise SelectionError(
                    f"no LoRA {i_or_id!r} in split {self.name!r}", file=self.zoo.root, key="lora_id"
                )
            return idx
        return int(i_or_id)

    # ---- public API ---------------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        """All lora_ids in row order (reads only the lora_id column, whole shards: the ids the
        rows really hold, whatever the footers claim per row group)."""
        if self._ids is None:
            self._ids = [lid for k in range(len(self._shards)) for lid in self._shard_ids(k)]
        return self._ids

    def _shard_ids(self, k: int) -> list[str]:
        """Shard ``k``'s lora_ids read whole (not per row group), cached: what row identity is
        checked against, shard by shard (a streaming worker opens only its own shards)."""
        if k not in self._ids_by_shard:
            pf = self._file(k)
            with reading(self._path(k), "lora_id"):
                got = pf.read(columns=["lora_id"]).column(0).to_pylist()
            self._check_count(k, len(got))
            self._ids_by_shard[k] = got
        return self._ids_by_shard[k]

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            index: dict[str, int] = {}
            for i, lid in enumerate(self.ids):
                if index.setdefault(lid, i) != i:
                    raise IntegrityError(
                        f"lora_id appears twice in split {self.name!r} (rows {index[lid]} and {i})",
                        file=self.zoo.source,
                        key=str(lid),
                    )
            self._index = index
        return self._index

    def row(self, i: int | str) -> dict[str, Any]:
        """Every column but ``weights`` of one row, as Python values."""
        k, g, r = self._locate(self._resolve(i))
        cols = tuple(c for c in self.columns if c != "weights")
        t = self._row_group(k, g, cols)
        return {c: t.column(c)[r].as_py() for c in cols}

    def weights_bytes(self, i: int | str) -> bytes:
        """The row's safetensors bytes (a valid PEFT adapter_model.safetensors)."""
        return self.cell(i)[1]

    def cell(self, i: int | str) -> tuple[str, bytes, str]:
        """(lora_id, weights bytes, adapter_config JSON text) of one row, the id as read from
        that row (checked against the position asked for)."""
        k, g, r = self._locate(self._resolve(i))
        t = self._row_group(k, g, ("lora_id", "weights", "adapter_config"))
        return t.column(0)[r].as_py(), t.column(1)[r].as_py(), t.column(2)[r].as_py()

    def record(self, i: int | str, *, validate: bool = True) -> LoraRecord:
        """Decode one LoRA; dtypes as stored. ``validate`` (default) refuses shapes that do not
        pair up and non-finite factors with a named error: a zoo comes from strangers."""
        k = self._locate(self._resolve(i))[0]
        lid, weights, cfg = self.cell(i)
        where = f"{self.zoo.source}:{self._shards[k]['path']}:{lid}"
        with reading(where, "weights"):
            return LoraRecord.from_safetensors_bytes(
                weights, cfg, file=where, lora_id=lid, validate=validate
            )

    def __getitem__(self, i: int | str) -> LoraRecord:
        return self.record(i)

    def __iter__(self) -> Iterator[LoraRecord]:
        for b in self.iter_batches(["lora_id", "weights", "adapter_config"], batch_size=64):
            for lid, w, cfg in zip(*(b.column(c).to_pylist() for c in range(3))):
                yield LoraRecord.from_safetensors_bytes(
                    w, cfg, file=f"{self.zoo.source}:{lid}", lora_id=lid, validate=False
                )

    def _check_columns(self, columns: Sequence[str] | None) -> list[str] | None:
        if columns is None:
            return None
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise SelectionError(
                f"no column(s) {missing}; columns: {self.columns}",
                file=self.zoo.root,
                key=missing[0],
            )
        return list(columns)

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The split as one Arrow table (all columns unless ``columns``)."""
        cols = self._check_columns(columns)
        tables = []
        for k in range(len(self._shards)):
            pf = self._file(k)
            with reading(self._path(k), "table"):
                t = pf.read(columns=cols)
            self._check_count(k, t.num_rows)
            tables.append(t)
        if not tables:
            schema = (
                self.zoo.schema
                if cols is None
                else pa.schema([self.zoo.schema.field(c) for c in cols])
            )
            return schema.empty_table()
        return pa.concat_tables(tables)

    def iter_batches(
        self, columns: Sequence[str] | None = None, batch_size: int = 256
    ) -> Iterator[pa.RecordBatch]:
        """Record batches in row order, shard after shard (bounded memory for any zoo size)."""
        cols = self._check_columns(columns)
        for k in range(len(self._shards)):
            pf, n = self._file(k), 0
            batches = pf.iter_batches(batch_size=batch_size, columns=cols)
            while True:
                with reading(self._path(k), f"batch after row {n}"):
                    b = next(batches, None)
                if b is None:
                    break
                n += b.num_rows
                yield b
            self._check_count(k, n)

    def _check_count(self, k: int, n: int) -> None:
        if n != self._starts[k + 1] - self._starts[k]:
            raise IntegrityError(
                f"{n} rows read but the footer and manifest say "
                f"{self._starts[k + 1] - self._starts[k]}",
                file=self._path(k),
                key="num_rows",
            )

    def to_pandas(self, include_weights: bool = False):
        cols = [c for c in self.columns if include_weights or c != "weights"]
        return self.table(cols).to_pandas()


class Zoo:
    """A zoo on any fsspec filesystem: ``fs`` + ``root`` (a folder holding lora_zoo.json)."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        *,
        source: str | None = None,
        revision: str | None = None,
        streaming: bool = False,
    ) -> None:
        self.fs, self.root = fs, root.rstrip("/") if root != "/" else root
        self.source = source or root
        self.revision, self.streaming = revision, streaming
        self.manifest = read_manifest(fs, self.root)
        self._splits: dict[str, ZooSplit] = {}
        self._schema: pa.Schema | None = None

    @property
    def is_local(self) -> bool:
        return "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    def __repr__(self) -> str:
        rows = {s: sp["num_rows"] for s, sp in self.manifest["splits"].items()}
        return f"Zoo({self.source!r}, splits={rows})"

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def info(self) -> dict[str, Any]:
        return self.manifest.get("info", {})

    @property
    def named_splits(self) -> dict[str, Any]:
        """{name: {path, kind, key, seed, fractions, ...}} of the stored named splits."""
        return self.manifest.get("named_splits", {})

    def columns_with_role(self, role: str) -> list[str]:
        return [c["name"] for c in self.manifest["columns"] if c["role"] == role]

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema (read from the first shard's footer)."""
        if self._schema is None:
            for s in self.splits:
                if self[s]._shards:
                    self._schema = self[s]._file(0).schema_arrow
                    break
            else:
                from lora_zoo.zoo.schema import CORE_FIELDS

                self._schema = pa.schema(list(CORE_FIELDS))
        return self._schema

    def __getitem__(self, split: str) -> ZooSplit:
        if split not in self.manifest["splits"]:
            raise SelectionError(
                f"no split {split!r}; splits: {self.splits}", file=self.source, key="split"
            )
        if split not in self._splits:
            self._splits[split] = ZooSplit(self, split, self.manifest["splits"][split]["shards"])
        return self._splits[split]

    def __len__(self) -> int:
        return int(sum(sp["num_rows"] for sp in self.manifest["splits"].values()))

    def __contains__(self, split: object) -> bool:
        return split in self.manifest["splits"]

    def named_split(self, name: str) -> dict[str, Any]:
        """{split_name: view} for a stored named split; each view has the ZooSplit API."""
        from lora_zoo.zoo.splits import named_split_views

        return named_split_views(self, name)

    def verify(self) -> list[str]:
        return verify_zoo(self.fs, self.root)


def is_local(source: str | os.PathLike[str]) -> bool:
    """A path on this machine (not a Hub repo id or an fsspec URL)."""
    s = os.fspath(source)
    return "://" not in s and (os.path.exists(s) or s.startswith((".", "/", "~")))


def open_local(path: str | os.PathLike[str], *, streaming: bool = False) -> Zoo:
    """The ``Zoo`` in a local folder (``lora_zoo.load_zoo`` also takes Hub ids and URLs)."""
    root = os.path.abspath(os.path.expanduser(os.fspath(path)))
    return Zoo(
        local_fs(root),
        root,
        source=os.fspath(path),
        streaming=streaming,
    )


__all__ = ["Zoo", "ZooSplit", "is_local", "open_local"]
