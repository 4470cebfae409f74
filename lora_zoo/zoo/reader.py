"""Read a zoo straight from its Parquet shards with pyarrow (no ``datasets`` cache copy).

``Zoo`` only needs an fsspec filesystem and a root path, so a local folder, a Hub repo (resolved
by ``lora_zoo.remote.pull.open_remote``) and an S3 / HTTP URL are read by the same code. Weights are
decoded lazily, per row, from the row group that holds them (a small LRU of decoded row groups
makes sequential and nearby access cheap); large zoos are walked record batch by record batch.
Tensors keep their stored dtype (fp16 / bf16 are never upcast here).
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from lora_zoo._io import local_fs, map_regular
from lora_zoo.errors import IntegrityError, SelectionError
from lora_zoo.record import LoraRecord
from lora_zoo.zoo.manifest import join, read_manifest
from lora_zoo.zoo.manifest import verify as verify_zoo
from lora_zoo.zoo.schema import ROLE_LABEL, ROLE_METADATA

log = logging.getLogger(__name__)


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
        self._cache: OrderedDict[tuple[int, int, tuple[str, ...]], pa.Table] = OrderedDict()
        self._cache_size = cache_row_groups
        self._ids: list[str] | None = None
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
    def _file(self, k: int) -> pq.ParquetFile:
        if k not in self._files:
            path = join(self.zoo.root, self._shards[k]["path"])
            if self.zoo.is_local:
                pf = pq.ParquetFile(pa.py_buffer(map_regular(path, root=self.zoo.root)))
            else:
                pf = pq.ParquetFile(self.zoo.fs.open(path, "rb"))
            if pf.metadata.num_rows != int(self._shards[k]["num_rows"]):
                raise IntegrityError(
                    f"{pf.metadata.num_rows} rows but the manifest says "
                    f"{self._shards[k]['num_rows']}",
                    file=path,
                    key="num_rows",
                )
            md = pf.metadata
            starts = [0]
            for i in range(md.num_row_groups):
                starts.append(starts[-1] + md.row_group(i).num_rows)
            self._files[k], self._rg_starts[k] = pf, starts
        return self._files[k]

    def _locate(self, i: int) -> tuple[int, int, int]:
        """global row -> (shard, row group, row inside the row group)."""
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
        each row group once), as one table whose columns may be chunked across row groups."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"rows [{start}, {stop}) out of range for split {self.name!r}")
        cols = self._check_columns(columns)
        parts = []
        i = start
        while i < stop:
            k, g, off = self._locate(i)
            rg = self._rg_starts[k]
            take = min(stop - i, rg[g + 1] - rg[g] - off)
            parts.append(self._file(k).read_row_group(g, columns=cols).slice(off, take))
            i += take
        if not parts:
            sch = self.zoo.schema
            return (sch if cols is None else pa.schema([sch.field(c) for c in cols])).empty_table()
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def _row_group(self, k: int, g: int, columns: tuple[str, ...]) -> pa.Table:
        key = (k, g, columns)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        t = self._file(k).read_row_group(g, columns=list(columns))
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
        """All lora_ids in row order (reads only the lora_id column)."""
        if self._ids is None:
            ids: list[str] = []
            for k in range(len(self._shards)):
                ids += self._file(k).read(columns=["lora_id"]).column(0).to_pylist()
            self._ids = ids
        return self._ids

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {lid: i for i, lid in enumerate(self.ids)}
        return self._index

    def row(self, i: int | str) -> dict[str, Any]:
        """Every column but ``weights`` of one row, as Python values."""
        k, g, r = self._locate(self._resolve(i))
        cols = tuple(c for c in self.columns if c != "weights")
        t = self._row_group(k, g, cols)
        return {c: t.column(c)[r].as_py() for c in cols}

    def weights_bytes(self, i: int | str) -> bytes:
        """The row's safetensors bytes (a valid PEFT adapter_model.safetensors)."""
        k, g, r = self._locate(self._resolve(i))
        return self._row_group(k, g, ("weights",)).column(0)[r].as_py()

    def record(self, i: int | str, *, validate: bool = True) -> LoraRecord:
        """Decode one LoRA; dtypes as stored. ``validate`` (default) refuses shapes that do not
        pair up and non-finite factors with a named error: a zoo comes from strangers."""
        idx = self._resolve(i)
        k, g, r = self._locate(idx)
        t = self._row_group(k, g, ("lora_id", "weights", "adapter_config"))
        lid = t.column(0)[r].as_py()
        import json

        return LoraRecord.from_safetensors_bytes(
            t.column(1)[r].as_py(),
            json.loads(t.column(2)[r].as_py()),
            file=f"{self.zoo.source}:{self._shards[k]['path']}",
            lora_id=lid,
            validate=validate,
        )

    def __getitem__(self, i: int | str) -> LoraRecord:
        return self.record(i)

    def __iter__(self) -> Iterator[LoraRecord]:
        import json

        for b in self.iter_batches(["lora_id", "weights", "adapter_config"], batch_size=64):
            for lid, w, cfg in zip(*(b.column(c).to_pylist() for c in range(3))):
                yield LoraRecord.from_safetensors_bytes(
                    w, json.loads(cfg), lora_id=lid, validate=False
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
        tables = [self._file(k).read(columns=cols) for k in range(len(self._shards))]
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
            yield from self._file(k).iter_batches(batch_size=batch_size, columns=cols)

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
