"""Cached invariant views beside a zoo: compute ``canonical`` / ``svals`` once, read them back
at the Parquet floor.

Why: the invariant views are pure functions of the stored factors, yet every epoch and every
bench run recomputed them (QR + r x r SVD per module), which made them load slower than one
safetensors file per LoRA. A zoo's content never changes under a given manifest, so the result
can be stored once and read back like any other Parquet column.

Where: ``ZOO/.cache/views/<view>-v<version>-<zoo hash[:16]>/`` (or under ``cache_root``), one
Parquet part per zoo shard (``<split>-<k>.parquet``: ``lora_id`` + ``views``, in the shard's
row order) and ``cache.json``. It lives beside the zoo, never in the published shards: hidden
paths are never pushed (``remote/push.py`` skips dot-parts) nor checked by ``verify``.

Trust: the cache is a file on disk, read like a stranger's zoo. It is used only when
``cache.json`` names this view, this view's version (``VIEW_VERSIONS``, bumped whenever the
view's math changes), this torch version (LAPACK results may change with it), the zoo's content
hash (``zoo_content_hash``: the manifest's shard sha256s and row counts) and every part's sha256
matches the bytes (hashed once, at open, from the memory map the reads then use). Each cell is a
safetensors buffer parsed by ``weights.parse_header`` (the one header validator), and each part's
``lora_id`` column must equal the zoo shard's ids. Anything else is a named error (file + key);
the datasets then log it and compute the view instead (``cache="auto"``), never use it.

Building is resumable: each shard's part is written atomically (``_io.atomic_write_bytes``) and
``cache.json`` is rewritten after each, so a killed ``lora-zoo views ZOO --cache svals`` resumes
at the first missing or unverifiable part. The values are those of the datasets' own code path
(``decode_weight_batch`` + the view's ``apply_view_many``, as ``_ZooViews._views``; stored dtype, ``fold_scale=True``, CPU), so
cached and computed views are the same bytes.

The ``spectral`` LoL model reads the ``svals`` view (its four statistics per module are a few
flops on the cached singular values), so caching ``svals`` covers it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lora_zoo._io import atomic_write_bytes, map_regular, read_regular
from lora_zoo.errors import CorruptFileError, IntegrityError, SelectionError, reading
from lora_zoo.load.collate import rebatch_tables
from lora_zoo.load.decode import _ST_DTYPES, _arrow_rows, _as_torch
from lora_zoo.progress import track
from lora_zoo.weights import header_length, parse_header

logger = logging.getLogger(__name__)

FORMAT = "lora-zoo/view-cache"
FORMAT_VERSION = 1
MANIFEST = "cache.json"
MANIFEST_MAX_BYTES = 16 << 20
#: the cacheable views and their versions: bump one when its math (symmetry.py) changes
VIEW_VERSIONS = {"canonical": 1, "svals": 1}
META = "lora_zoo.view_cache"  # safetensors __metadata__ key: {module: {"features", "rank"}}
SEP = "::"  # tensor name = f"{module}{SEP}{key}"
KEYS = frozenset({"U", "V", "S", "M"})
PAD = "~pad"  # a U8 tensor that rounds each cell to 8 bytes: rows stay aligned in Arrow's buffer
CHUNK_ROWS = 256
_PART = re.compile(r"^[A-Za-z0-9_.-]+-\d{5}\.parquet$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


# ---- keys --------------------------------------------------------------------------------------
def cacheable_views() -> list[str]:
    return sorted(VIEW_VERSIONS)


def parse_views(spec: str | Sequence[str]) -> list[str]:
    """``"canonical,svals"`` -> the view names, each cacheable, or a ``SelectionError``."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [s for s in names if s]
    for n in names:
        if n not in VIEW_VERSIONS:
            raise SelectionError(
                f"not a cacheable view; cacheable: {', '.join(cacheable_views())} (a view "
                "with a seed, a template or a dense output is computed per use)",
                key=n,
            )
    if not names:
        raise SelectionError("no view named", key="--cache")
    return list(dict.fromkeys(names))


def zoo_content_hash(zoo: Any) -> str:
    """sha256 over every shard's (split, path, rows, sha256) as the manifest lists them: the
    zoo's content, as far as its manifest (the commit point) says. An append or rebuild changes
    it; relabeling metadata outside the shards does not touch the weights, and neither does it."""
    items = sorted(
        (s, str(sh["path"]), int(sh["num_rows"]), str(sh["sha256"]))
        for s, sp in zoo.manifest["splits"].items()
        for sh in sp["shards"]
    )
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def cache_key(zoo: Any, view: str) -> dict[str, Any]:
    """What a cache must match to be used (``cache.json`` holds these plus its parts)."""
    (view,) = parse_views([view])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "view": view,
        "view_version": VIEW_VERSIONS[view],
        "torch": torch.__version__,
        "zoo_hash": zoo_content_hash(zoo),
        "fold_scale": True,
        "dtype": "stored",
    }


def cache_folder(zoo: Any, view: str, cache_root: str | Path | None = None) -> Path | None:
    """``ZOO/.cache/views/<view>-v<version>-<hash[:16]>`` (or under ``cache_root``); None for
    a zoo that is not a local folder and no ``cache_root``."""
    key = cache_key(zoo, view)
    name = f"{key['view']}-v{key['view_version']}-{key['zoo_hash'][:16]}"
    if cache_root is not None:
        return Path(cache_root) / name
    if not getattr(zoo, "is_local", False):
        return None
    return Path(zoo.root) / ".cache" / "views" / name


def part_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.parquet"


def _shard_ranges(zoo: Any, split: str) -> list[tuple[int, int, dict[str, Any]]]:
    """(start, stop, manifest entry) of each shard of ``split``, in row order."""
    out, a = [], 0
    for sh in zoo.manifest["splits"][split]["shards"]:
        out.append((a, a + int(sh["num_rows"]), sh))
        a += int(sh["num_rows"])
    return out


# ---- encoding ----------------------------------------------------------------------------------
def encode_cell(views: dict[str, dict[str, Any]], j: int) -> bytes:
    """Row ``j`` of a group's view stacks as one safetensors buffer: ``module::key`` tensors,
    ``features`` / ``rank`` in the metadata, a pad tensor so the length is a multiple of 8."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, res in views.items():
        meta[name] = {"features": list(res["features"]), "rank": int(res["rank"])}
        for k, t in res.items():
            if k in KEYS:
                tensors[f"{name}{SEP}{k}"] = t[j].contiguous()
    md = {META: json.dumps(meta)}  # insertion order: the decoder's module order
    data = save(tensors, metadata=md)
    pad = -len(data) % 8
    for extra in range(pad, pad + 64, 8):  # the header grows with the pad entry: find a fit
        tensors[PAD] = torch.zeros(extra, dtype=torch.uint8)
        data = save(tensors, metadata=md)
        if len(data) % 8 == 0:
            return data
    return data  # unaligned rows are still read correctly (copied instead of viewed)


def _compute_views(view: str, fac: Any, indices: Sequence[int]) -> dict[str, dict[str, Any]]:
    """``_ZooViews._views`` for the cache's settings (all modules, stored dtype, CPU, no
    template): one ``apply_view_many`` call, plus ``features`` / ``rank`` / ``M`` as there.
    (Not imported from ``datasets``, which imports this module; the tests compare the two
    byte for byte.)"""
    from lora_zoo.load.views import RANK_KEYS, ViewContext, apply_view_many

    idx = tuple(int(i) for i in indices)
    names = list(fac)
    us, vs = [fac[n][0] for n in names], [fac[n][1] for n in names]
    ctxs = [ViewContext(module=n, indices=idx) for n in names]
    out: dict[str, dict[str, Any]] = {}
    for name, u, v, res in zip(names, us, vs, apply_view_many(view, us, vs, ctxs)):
        res["features"] = (int(u.shape[-2]), int(v.shape[-2]))
        res["rank"] = max([u.shape[-1], *(t.shape[-1] for k, t in res.items() if k in RANK_KEYS)])
        if len(fac[name]) > 2:  # DoRA: the magnitude goes beside the view, as in the datasets
            res["M"] = fac[name][2]
        out[name] = res
    return out


def _encode_rows(
    split: Any, view: str, a: int, b: int, where: str
) -> tuple[list[str], list[bytes]]:
    """Rows [a, b) of ``split``: their ids and cells, by the datasets' decode + view path."""
    from lora_zoo.load.decode import decode_weight_batch

    t = split.read_rows(a, b, ["lora_id", "weights", "adapter_config"])
    ids = t.column("lora_id").to_pylist()
    cells: list[bytes | None] = [None] * len(ids)
    groups = decode_weight_batch(
        t.column("weights"),
        t.column("adapter_config").to_pylist(),
        fold_scale=True,
        where=where,
        ids=ids,
        validate=True,
    )
    for rows, fac in groups:
        views = _compute_views(view, fac, [a + int(r) for r in rows])
        for j, r in enumerate(rows):
            cells[int(r)] = encode_cell(views, j)
    return ids, cells  # type: ignore[return-value]


def _part_bytes(ids: list[str], cells: list[bytes]) -> bytes:
    table = pa.table({"lora_id": pa.array(ids, pa.string()), "views": pa.array(cells, pa.binary())})
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=CHUNK_ROWS,
        compression={"lora_id": "ZSTD", "views": "NONE"},
        use_dictionary=False,
        write_statistics=False,
    )
    return sink.getvalue().to_pybytes()


# ---- building ----------------------------------------------------------------------------------
def build_view_cache(
    zoo: Any,
    view: str,
    *,
    cache_root: str | Path | None = None,
    progress: bool = True,
    chunk: int = CHUNK_ROWS,
) -> Path:
    """Compute ``view`` for every LoRA of every split of a local ``zoo`` and store it beside
    the zoo (see the module docstring); resumes a killed build. Returns the cache folder."""
    folder = cache_folder(zoo, view, cache_root)
    if folder is None:
        raise SelectionError(
            "a view cache is stored beside a local zoo folder; pull the zoo first or pass "
            "cache_root",
            file=str(getattr(zoo, "source", "zoo")),
            key="--cache",
        )
    key = cache_key(zoo, view)
    expect = {
        part_name(s, k): (s, str(sh["path"]), b - a)
        for s in zoo.splits
        for k, (a, b, sh) in enumerate(_shard_ranges(zoo, s))
    }
    kept = _resumable_parts(folder, key)
    kept = {  # only parts of this zoo's shards, as the reader will ask for them
        n: p for n, p in kept.items() if expect.get(n) == (p["split"], p["shard"], p["num_rows"])
    }
    man = {**key, "complete": False, "parts": kept}
    todo = [
        (s, k, a, b, sh)
        for s in zoo.splits
        for k, (a, b, sh) in enumerate(_shard_ranges(zoo, s))
        if part_name(s, k) not in man["parts"]
    ]
    root = cache_root if cache_root is not None else zoo.root
    with track(
        total=sum(b - a for _, _, a, b, _ in todo),
        desc=f"views {view}",
        unit="LoRA",
        enabled=progress,
    ) as bar:
        for s, k, a, b, sh in todo:
            ids: list[str] = []
            cells: list[bytes] = []
            for c in range(a, b, max(1, chunk)):
                got = _encode_rows(zoo[s], key["view"], c, min(b, c + chunk), str(zoo.source))
                ids += got[0]
                cells += got[1]
                bar.update(len(got[0]))
            data = _part_bytes(ids, cells)
            atomic_write_bytes(folder / part_name(s, k), data, root=root)
            man["parts"][part_name(s, k)] = {
                "split": s,
                "shard": str(sh["path"]),
                "num_rows": b - a,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            _write_manifest(folder, man, root)
    man["complete"] = True
    _write_manifest(folder, man, root)
    logger.info("view cache %s: %d parts", folder, len(man["parts"]))
    return folder


def _write_manifest(folder: Path, man: dict[str, Any], root: Any) -> None:
    data = json.dumps(man, indent=1, sort_keys=True).encode()
    atomic_write_bytes(folder / MANIFEST, data, root=root)


def _resumable_parts(folder: Path, key: dict[str, Any]) -> dict[str, Any]:
    """Parts of an earlier (killed) build that are still good: same key, bytes that hash to
    what its ``cache.json`` says. Anything unreadable starts the build over."""
    if not (folder / MANIFEST).exists():
        return {}
    try:
        man = _read_manifest(folder, key)
    except (CorruptFileError, IntegrityError) as e:
        logger.warning("view cache: starting over (%s)", e)
        return {}
    keep = {}
    for name, p in man["parts"].items():
        try:
            _mapped_part(folder / name, p["sha256"], folder)
        except (CorruptFileError, IntegrityError, OSError) as e:
            logger.warning("view cache: recomputing a part (%s)", e)
            continue
        keep[name] = p
    return keep


# ---- reading -----------------------------------------------------------------------------------
def _read_manifest(folder: Path, key: dict[str, Any]) -> dict[str, Any]:
    """``cache.json``, validated as untrusted input and checked against ``key``."""
    path = folder / MANIFEST
    with reading(path, MANIFEST):
        man = json.loads(read_regular(path, root=folder, max_bytes=MANIFEST_MAX_BYTES))
    if not isinstance(man, dict):
        raise CorruptFileError("not a JSON object", file=path, key=MANIFEST)
    for k, want in key.items():
        if man.get(k) != want:
            raise IntegrityError(
                f"stale view cache: {k} is {man.get(k)!r}, this zoo and lora_zoo need {want!r}",
                file=path,
                key=k,
            )
    parts = man.get("parts")
    if not isinstance(parts, dict):
        raise CorruptFileError("'parts' must be an object", file=path, key="parts")
    for name, p in parts.items():
        ok = (
            isinstance(name, str)
            and _PART.match(name)
            and isinstance(p, dict)
            and isinstance(p.get("sha256"), str)
            and _HEX.match(p["sha256"])
            and isinstance(p.get("num_rows"), int)
            and isinstance(p.get("split"), str)
            and isinstance(p.get("shard"), str)
        )
        if not ok:
            raise CorruptFileError("malformed part entry", file=path, key=f"parts.{name}")
    return man


_VERIFIED: dict[tuple[Any, ...], str] = {}  # (path, dev, inode, size, mtime_ns) -> sha256 seen


def _mapped_part(path: Path, sha256: str, folder: Path) -> Any:
    """The part's bytes (a read-only memory map), after checking their sha256: the reads use
    these very bytes. Hashed once per process per file identity (path, device, inode, size,
    mtime): a replaced or rewritten file is a new identity and is hashed again; reopening the
    same file (each epoch, each bench repeat) is not hashed twice. What this leaves open (a
    same-size rewrite in place within one timestamp tick) is no wider than the memory map
    itself, which shows later in-place writes to the file, as the zoo reader's maps do."""
    with reading(path, "sha256"):
        mm = map_regular(path, root=folder)
        st = path.stat()
        ident = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        got = _VERIFIED.get(ident) or hashlib.sha256(mm).hexdigest()
    if got != sha256:
        raise IntegrityError(
            f"view cache part was modified: sha256 {got[:12]}... but cache.json says "
            f"{sha256[:12]}...",
            file=path,
            key="sha256",
        )
    _VERIFIED[ident] = got
    return mm


class ViewCache:
    """An opened, verified view cache of one zoo and one view (``open_view_cache``)."""

    def __init__(self, zoo: Any, view: str, folder: Path, manifest: dict[str, Any]) -> None:
        self.zoo, self.view, self.folder, self.manifest = zoo, view, folder, manifest
        self._tables: dict[str, pa.Table] = {}

    def __repr__(self) -> str:
        return f"ViewCache({self.view!r}, {str(self.folder)!r})"

    def table(self, split: str) -> pa.Table:
        """``lora_id`` + ``views`` of every row of ``split``, in the zoo's row order: each part
        sha256-checked, its ids checked against the zoo shard's ids (read once, kept)."""
        if split not in self._tables:
            parts = []
            for k, (a, b, sh) in enumerate(_shard_ranges(self.zoo, split)):
                parts.append(self._part(split, k, a, b, sh))
            if parts:
                self._tables[split] = pa.concat_tables(parts)
            else:
                sch = pa.schema([("lora_id", pa.string()), ("views", pa.binary())])
                self._tables[split] = sch.empty_table()
        return self._tables[split]

    def _mapped(self, split: str, k: int, a: int, b: int, sh: dict[str, Any]) -> tuple[Path, Any]:
        """(path, verified memory map) of the part of shard ``k``, which must be listed for
        exactly that shard and row count."""
        name = part_name(split, k)
        p = self.manifest["parts"].get(name)
        if p is None or p["shard"] != str(sh["path"]) or p["num_rows"] != b - a:
            raise IntegrityError(
                f"view cache has no part for shard {sh['path']!r} ({b - a} rows)",
                file=self.folder / MANIFEST,
                key=f"parts.{name}",
            )
        return self.folder / name, _mapped_part(self.folder / name, p["sha256"], self.folder)

    def _check(self, t: Any, want: list[str], path: Path) -> None:
        if t.schema.field("views").type != pa.binary():
            raise CorruptFileError("'views' is not a binary column", file=path, key="views")
        if t.column("lora_id").to_pylist() != want:
            raise IntegrityError(
                "view cache rows are not the zoo shard's rows", file=path, key="lora_id"
            )

    def _part(self, split: str, k: int, a: int, b: int, sh: dict[str, Any]) -> pa.Table:
        path, mm = self._mapped(split, k, a, b, sh)
        with reading(path, "parquet"):
            t = pq.read_table(pa.py_buffer(mm), columns=["lora_id", "views"])
            self._check(t, self.zoo[split].ids[a:b], path)
        return t

    def iter_tables(self, split: str, batch_size: int, *, stream: bool = False) -> Iterator[Any]:
        """Tables of ``batch_size`` rows (the last may be shorter) in row order, across parts.
        ``stream=False``: slices of ``table(split)`` (each part read whole: the fastest read,
        the split's cached view held in memory); ``stream=True``: record batches read part by
        part (memory: about one batch), each checked against the zoo's ids."""
        size = max(1, batch_size)
        if not stream:
            t = self.table(split)
            for a in range(0, t.num_rows, size):
                yield t.slice(a, size)
            return
        yield from rebatch_tables(self._checked_batches(split, size), size)

    def _checked_batches(self, split: str, size: int) -> Iterator[Any]:
        """Each part's record batches as tables, part by part, each checked against the zoo's
        ids, and each part's row count against its shard's."""
        for k, (a, b, sh) in enumerate(_shard_ranges(self.zoo, split)):
            path, mm = self._mapped(split, k, a, b, sh)
            ids, pos = self.zoo[split].ids[a:b], 0
            with reading(path, "parquet"):
                for rb in pq.ParquetFile(pa.py_buffer(mm)).iter_batches(
                    size, columns=["lora_id", "views"]
                ):
                    self._check(rb, ids[pos : pos + rb.num_rows], path)
                    pos += rb.num_rows
                    yield pa.Table.from_batches([rb])
            if pos != b - a:
                raise IntegrityError(f"{pos} rows, not {b - a}", file=path, key="num_rows")


def iter_cached_batches(
    cache: ViewCache,
    split: str,
    batch_size: int,
    labels: Sequence[str] = (),
    *,
    stream: bool = False,
) -> Iterator[dict[str, Any]]:
    """Collated batches of ``batch_size`` rows in row order, the format (and, for these views,
    the values) of ``LoraIterableDataset(split, view, batch_size=B, labels=labels)``. The view
    tensors are strided views of the cache's Arrow buffer (no copy): read them, or copy before
    writing (like the streaming dataset's unfolded factors). ``stream``: see
    ``ViewCache.iter_tables`` (memory of about one batch instead of the split's cached view)."""
    from lora_zoo.load.collate import _arrow_labels, _merge

    sp = cache.zoo[split]
    where = str(cache.folder)
    cols = ["lora_id", "base_model", *(c for c in labels if c not in ("lora_id", "base_model"))]
    small_all = sp.table(columns=cols)
    a = 0
    for ct in cache.iter_tables(split, batch_size, stream=stream):
        small = small_all.slice(a, ct.num_rows).combine_chunks().to_batches()[0]
        ids = small.column("lora_id").to_pylist()
        modules, info = _merge(decode_cells(ct.column("views"), where), len(ids), where)
        labs, masks = _arrow_labels(small, list(labels))
        yield {
            "lora_id": ids,
            "index": torch.arange(a, a + len(ids), dtype=torch.int64),
            "base_model": small.column("base_model").to_pylist(),
            "modules": modules,
            "module_info": info,
            "labels": labs,
            "label_mask": masks,
        }
        a += len(ids)


def _why_not(ds: Any) -> str | None:
    """Why a dataset's settings cannot use a cache (None: they can): the cache holds the view
    at the stored dtype, scale folded, computed on the CPU, for a physical split of a zoo."""
    from lora_zoo.zoo.reader import ZooSplit

    if ds.view not in VIEW_VERSIONS:
        return f"view {ds.view!r} is not cacheable"
    if ds.dtype is not None:
        return "dtype= is set (the cache holds the stored dtype)"
    if not ds.fold_scale:
        return "fold_scale=False (the cache holds folded factors)"
    if ds.device is not None and ds.device.type != "cpu":
        return f"device={ds.device} (cached values are the CPU's)"
    if not isinstance(ds.split, ZooSplit):
        return "not a physical split of a zoo"
    return None


def cache_for(ds: Any, mode: bool | str = "auto") -> ViewCache | None:
    """The view cache a dataset (``_ZooViews``) should read, or None to compute the view.

    ``mode``: ``"auto"`` (default) uses a valid cache and logs why a present one is not used;
    ``True`` / ``"require"`` raises instead; ``False`` / ``"off"`` never reads one."""
    if mode in (False, "off", None):
        return None
    strict = mode in (True, "require")
    why = _why_not(ds)
    if why is not None:
        if strict:
            raise SelectionError(f"cannot use a view cache: {why}", file=ds.where, key="cache")
        return None
    from lora_zoo.errors import LoraZooError

    try:
        vc = open_view_cache(ds.split.zoo, ds.view)
    except LoraZooError as e:
        if strict:
            raise
        logger.warning("%s (the view cache is not used; computing %s)", e, ds.view)
        return None
    if vc is None and strict:
        raise SelectionError(
            f"no view cache for this zoo's content: run `lora-zoo views ZOO --cache {ds.view}`",
            file=ds.where,
            key="cache",
        )
    return vc


def cached_split_batch(
    split: Any, view: str, labels: Sequence[str] = (), device: Any = None
) -> dict[str, Any] | None:
    """A whole physical split as one collated batch of ``view`` from a valid cache (what
    ``LoraIterableDataset(split, view, batch_size=len(split))`` yields, the same bytes), or
    None to compute it: no cache, a non-CPU device, or a stale one (logged)."""
    from lora_zoo.errors import LoraZooError
    from lora_zoo.zoo.reader import ZooSplit

    dev = None if device is None else torch.device(device)
    ok = view in VIEW_VERSIONS and isinstance(split, ZooSplit) and len(split) > 0
    if not ok or (dev is not None and dev.type != "cpu"):
        return None
    try:
        vc = open_view_cache(split.zoo, view)
        if vc is None:
            return None
        return next(iter_cached_batches(vc, split.name, len(split), labels))
    except LoraZooError as e:
        logger.warning("%s (the view cache is not used; computing %s)", e, view)
        return None


def cached_views(ds: Any, vc: ViewCache, i: int) -> dict[str, dict[str, Any]]:
    """Row ``i``'s views from the cache, as ``ds._views`` would give them (selected modules, in
    the decoder's order). Copies, not views of the cache's buffer: the dataset keeps that
    buffer for every later item, and a caller may write into what an item hands out."""
    cell = vc.table(ds.split.name).column("views").slice(i, 1)
    ((_, views),) = decode_cells(cell, str(vc.folder))
    return {
        n: {k: t.clone() if torch.is_tensor(t) else t for k, t in views[n].items()}
        for n in ds._select(list(views))
    }


def open_view_cache(
    zoo: Any, view: str, *, cache_root: str | Path | None = None
) -> ViewCache | None:
    """The verified cache of ``view`` for this zoo's content, or None when there is none.
    A cache that is there but stale, incomplete or tampered with raises a named error (file +
    key); the datasets log it and compute instead."""
    if view not in VIEW_VERSIONS:
        return None
    folder = cache_folder(zoo, view, cache_root)
    if folder is None or not (folder / MANIFEST).exists():
        return None
    key = cache_key(zoo, view)
    man = _read_manifest(folder, key)
    if man.get("complete") is not True:
        raise IntegrityError(
            "view cache is incomplete (a build was interrupted): rerun "
            f"`lora-zoo views ZOO --cache {view}`",
            file=folder / MANIFEST,
            key="complete",
        )
    return ViewCache(zoo, key["view"], folder, man)


# ---- decoding ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _header(head: bytes, file: str) -> tuple[Any, dict[str, Any]]:
    """The validated header of a cell and its per-module metadata (cached per header bytes:
    a part's rows share one header)."""
    h = parse_header(head, None, file=file)
    try:
        meta = json.loads(h.metadata[META])
    except (KeyError, ValueError) as e:
        raise CorruptFileError(f"no valid {META} metadata", file=file, key="header") from e
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{META} is not an object", file=file, key="header")
    plan: dict[str, Any] = {}
    for name, m in meta.items():
        ok = (
            isinstance(m, dict)
            and isinstance(m.get("rank"), int)
            and isinstance(m.get("features"), list)
            and len(m["features"]) == 2
            and all(isinstance(x, int) and x >= 0 for x in m["features"])
        )
        if not ok:
            raise CorruptFileError("bad module metadata", file=file, key=name)
        plan[name] = {"features": tuple(m["features"]), "rank": m["rank"], "tensors": {}}
    for spec in h.tensors:
        if spec.name == PAD:
            continue
        name, _, k = spec.name.rpartition(SEP)
        if name not in plan or k not in KEYS or spec.dtype not in _ST_DTYPES:
            raise CorruptFileError("unexpected tensor in a view cell", file=file, key=spec.name)
        _check_shape(k, spec.shape, plan[name], file, spec.name)
        plan[name]["tensors"][k] = spec
    return h, plan


def _check_shape(k: str, shape: tuple[int, ...], mod: dict[str, Any], file: str, key: str) -> None:
    """A cached tensor has the shape its key implies: U (n, r), V (m, r), S (<= r,), M (n,)."""
    (n, m), r = mod["features"], mod["rank"]
    want = {"U": (n, r), "V": (m, r), "M": (n,)}.get(k)
    ok = shape == want if want is not None else len(shape) == 1 and shape[0] <= r
    if not ok:
        raise CorruptFileError(f"shape {shape} for features {(n, m)}, rank {r}", file=file, key=key)


def decode_cells(arr: Any, where: str) -> list[tuple[np.ndarray, dict[str, dict[str, Any]]]]:
    """A binary (chunked) array of cells -> groups ``(row positions, {module: {key: (g, ...),
    "features", "rank"}})``, the structure ``_ZooViews._views`` returns. Rows with one header in
    one chunk share a group; a group of adjacent, aligned rows is a strided view of Arrow's
    buffer (no copy)."""
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    out, first = [], 0
    for chunk in chunks:
        out += [(first + idx, views) for idx, views in _decode_chunk(chunk, where)]
        first += len(chunk)
    return out


def _decode_chunk(arr: Any, where: str) -> list[tuple[np.ndarray, dict[str, dict[str, Any]]]]:
    data, offs, _ = _arrow_rows(arr)
    by_head: dict[bytes, list[int]] = {}
    for j in range(len(arr)):
        o, total = int(offs[j]), int(offs[j + 1] - offs[j])
        hl = header_length(data[o : o + 8], total, file=where)
        by_head.setdefault(data[o + 8 : o + 8 + hl].tobytes(), []).append(j)
    out = []
    for head, rows in by_head.items():
        h, plan = _header(head, where)
        idx = np.asarray(rows, np.int64)
        length = h.total_len
        if np.any(offs[idx + 1] - offs[idx] != length):
            raise CorruptFileError("a cell's length disagrees with its header", file=where)
        starts = offs[idx]
        if len(idx) == 1 or np.all(np.diff(starts) == length):
            mat = data[starts[0] : starts[0] + len(idx) * length].reshape(len(idx), length)
        else:
            mat = np.stack([data[s : s + length] for s in starts])
        out.append((idx, _group_views(mat, h.data_start, plan)))
    return out


def _group_views(mat: np.ndarray, base: int, plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every tensor of a group's rows ``mat`` (g, L) as a (g, *shape) torch view of it: one
    ``as_strided`` per tensor over a typed view of the rows (a copy only when unaligned)."""
    g, length = mat.shape
    rows = _as_torch(mat)  # (g, L) uint8, no copy
    typed: dict[str, torch.Tensor] = {}
    views: dict[str, dict[str, Any]] = {}
    for name, mod in plan.items():
        res: dict[str, Any] = {}
        for k, spec in mod["tensors"].items():
            t_dt = _ST_DTYPES[spec.dtype][1]
            size = spec.itemsize
            start = base + spec.start
            if spec.dtype not in typed:
                ok = mat.strides[0] % size == 0 and mat.__array_interface__["data"][0] % size == 0
                typed[spec.dtype] = rows.view(t_dt) if ok and length % size == 0 else None
            src = typed[spec.dtype]
            if src is None or start % size:  # unaligned (encode_cell pads so this is rare)
                t = rows[:, start : base + spec.end].clone().view(t_dt)
                res[k] = t.reshape(g, *spec.shape)
                continue
            inner = [1]
            for d in reversed(spec.shape[1:]):
                inner.insert(0, inner[0] * d)
            res[k] = torch.as_strided(
                src, (g, *spec.shape), (src.stride(0), *inner), src.storage_offset() + start // size
            )
        res["features"], res["rank"] = mod["features"], mod["rank"]
        views[name] = res
    return views


__all__ = [
    "VIEW_VERSIONS",
    "cache_for",
    "cached_split_batch",
    "cached_views",
    "iter_cached_batches",
    "ViewCache",
    "build_view_cache",
    "cache_folder",
    "cache_key",
    "cacheable_views",
    "decode_cells",
    "open_view_cache",
    "parse_views",
    "zoo_content_hash",
]
