"""Torch datasets over a zoo split: per LoRA, per selected module, one view plus label columns.

Two entry points, one output format:

- ``LoraDataset`` (map-style): random access through ``ZooSplit.cell(i)``; shuffle with
  the DataLoader, batch with ``collate_loras``.
- ``LoraIterableDataset`` (streaming): walks ``ZooSplit.iter_batches`` record batch by record
  batch, shards batches over DataLoader workers (and torch.distributed ranks), and decodes a whole
  record batch at once (``decode_weight_batch``): rows whose safetensors headers are identical (the
  normal case in a zoo) share tensor offsets, so every factor of the batch is one strided numpy
  view over Arrow's binary buffer instead of one safetensors parse per LoRA. Views then run once
  per module on (batch, n, r) stacks. With ``batch_size=B`` it yields ready collated batches
  (use ``DataLoader(ds, batch_size=None)``); without, single items like the map-style dataset.

Output (``collate_loras``)::

    {"lora_id": [b], "index": (b,), "base_model": [b],
     "labels": {col: tensor (b, ...) (NaN where missing) | list (strings only)},
     "label_mask": {col: bool tensor, True where a value is present},
     "module_info": {name: {"layer", "index_path", "type", "out_features", "in_features"}},
     "modules": {name: {"U": (b, n, r), "V": (b, m, r), "S": (b, r), "W": (b, n, m),
                        "M": (b, n) DoRA magnitudes (zeros for non-DoRA LoRAs; only in
                        batches holding a DoRA module),
                        "mask": (b, r) bool, "present": (b,) bool}}}

(only the keys the view produces). Mixed ranks are zero-padded to the batch max; ``mask`` marks
real rank columns. Zero padding is exact for every built-in view (zero columns add nothing to
U V^T; see ``symmetry.pad_rank``). Mixed module sets: a batch covers the union of its LoRAs'
modules (``natural_key`` order); a LoRA without a module has zeros there and ``present`` False.

``device="cuda"`` runs the views (QR, SVD, GEMMs) on that device: factors are decoded on the
CPU, moved, viewed there, and the batch comes back on the device (use ``num_workers=0``, as
CUDA does not survive a fork into DataLoader workers).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from lora_zoo._io import stable_permutation
from lora_zoo.errors import (
    SelectionError,
)
from lora_zoo.load.collate import (
    _arrow_labels,
    _merge,
    label_masks,
    labels_to_batch,
    rebatch_tables,
)
from lora_zoo.load.decode import Factors, decode_weight_batch
from lora_zoo.load.views import RANK_KEYS, ViewContext, apply_view_many, get_view
from lora_zoo.record import LoraRecord
from lora_zoo.seeding import shuffle_rng

logger = logging.getLogger(__name__)

BASE_COLUMNS = ("lora_id", "base_model", "collection", "rank", "num_modules", "adapter_config")


# ---- module selection ------------------------------------------------------------------------
def select_modules(
    names: Sequence[str],
    patterns: str | re.Pattern | Sequence[str | re.Pattern] | None,
    *,
    each: bool = True,
) -> list[str]:
    """Module names matching any pattern, in stored order.

    A pattern is a glob (``*.q_proj``, fnmatch rules, whole name) or a regex: a compiled
    ``re.Pattern`` or a string prefixed ``re:`` (``re:.*layers\\.(0|1)\\..*``), matched with
    ``fullmatch`` like PEFT's ``target_modules``. A pattern that matches nothing is an error:
    a silent empty selection would train a model on nothing. With ``each=False`` (a LoRA of a
    mixed collection, which need not have every selected module) only an empty result is.
    """
    if patterns is None:
        return list(names)
    pats = [patterns] if isinstance(patterns, (str, re.Pattern)) else list(patterns)
    keep: set[str] = set()
    for p in pats:
        if isinstance(p, re.Pattern) or p.startswith("re:"):
            rx = p if isinstance(p, re.Pattern) else re.compile(p[3:])
            hit = {n for n in names if rx.fullmatch(n)}
        else:
            hit = {n for n in names if fnmatch.fnmatchcase(n, p)}
        if not hit and (each or p is pats[-1] and not keep):
            shown = ", ".join(list(names)[:5])
            raise SelectionError(
                f"module pattern matches none of {len(names)} modules (e.g. {shown})",
                key=str(p.pattern if isinstance(p, re.Pattern) else p),
            )
        keep |= hit
    return [n for n in names if n in keep]


# ---- datasets --------------------------------------------------------------------------------
class _ZooViews:
    """Setup shared by both datasets: the split, the view, module selection, labels, template."""

    def __init__(
        self,
        split_or_path: Any,
        view: str = "factors",
        modules: str | re.Pattern | Sequence[str | re.Pattern] | None = None,
        labels: Sequence[str] = (),
        dtype: torch.dtype | None = None,
        fold_scale: bool = True,
        template_id: str | None = None,
        seed: int = 0,
        *,
        split: str = "train",
        epoch: int = 0,
        view_options: dict[str, Any] | None = None,
        revision: str | None = None,
        validate: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        spec = get_view(view)  # unknown names fail here, with suggestions
        self.view, self.modules, self.dtype = spec.name, modules, dtype
        self.labels, self.fold_scale, self.seed, self.epoch = tuple(labels), fold_scale, seed, epoch
        self.template_id, self.view_options, self.validate = (
            template_id,
            view_options or {},
            validate,
        )
        if isinstance(split_or_path, (str, os.PathLike)):
            self._source: tuple[str, str, str | None] | None = (str(split_or_path), split, revision)
            self.where = str(split_or_path)
        else:
            self._source = None
            self.where = str(
                getattr(split_or_path, "root", None)
                or getattr(split_or_path, "path", None)
                or "zoo"
            )
        self._split = None if self._source else split_or_path
        self.device = None if device is None else check_device(device, self.where)
        if spec.needs_template and template_id is None:
            raise SelectionError(
                f"view {view!r} needs template_id=<lora_id>", file=self.where, key="template_id"
            )
        known = {*BASE_COLUMNS, *self.split.label_columns, *self.split.metadata_columns}
        for col in self.labels:
            if col not in known:
                raise SelectionError(
                    f"no such label/metadata column; labels: {sorted(self.split.label_columns)}, "
                    f"metadata: {sorted(self.split.metadata_columns)}",
                    file=self.where,
                    key=col,
                )
        self._template: Factors | None = None
        self._selected: dict[tuple[str, ...], list[str]] = {}

    @property
    def split(self) -> Any:
        """The ZooSplit, (re)opened lazily so a dataset built from a path pickles to workers."""
        if self._split is None:
            from lora_zoo.load.source import load_zoo

            path, name, revision = self._source  # type: ignore[misc]
            zoo = load_zoo(path, revision=revision)
            if name not in zoo.splits:
                raise SelectionError(
                    f"no split {name!r}; splits: {zoo.splits}", file=path, key="split"
                )
            self._split = zoo[name]
        return self._split

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._source is not None:
            state["_split"] = None
        state["_template"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Re-draw ``gl_augment`` matrices each epoch (call before iterating)."""
        self.epoch = epoch

    def _template_factors(self) -> Factors:
        if self._template is None:
            if self.template_id not in set(self.split.ids):
                raise SelectionError(
                    "template LoRA not in this split", file=self.where, key=str(self.template_id)
                )
            rec: LoraRecord = self.split.record(self.template_id)
            self._template = {n: m.factors(self.fold_scale) for n, m in rec.modules.items()}
        return self._template

    def _select(self, names: Sequence[str]) -> list[str]:
        key = tuple(names)
        if key not in self._selected:
            self._selected[key] = select_modules(names, self.modules, each=False)
        return self._selected[key]

    def _views(self, fac: Factors, indices: Sequence[int]) -> dict[str, dict[str, Any]]:
        """Run the view on each selected module's (g, n, r) stack -> {name: {key: (g, ...)}};
        all modules in one call (``apply_view_many``: e.g. one batched r x r SVD for all)."""
        idx = tuple(int(i) for i in indices)  # once per group, not once per module
        names, us, vs, ctxs = [], [], [], []
        mags: dict[str, torch.Tensor] = {}
        for name, fu in fac.items():  # already selected by the decoder  # (g, n, r), (g, m, r)
            u, v = fu[0], fu[1]
            if self.device is not None:
                u, v = u.to(self.device), v.to(self.device)
            if len(fu) > 2:  # DoRA: the magnitude (g, out) goes beside whatever the view gives
                m = fu[2] if self.device is None else fu[2].to(self.device)
                mags[name] = m if self.dtype is None else m.to(self.dtype)
            template = None
            if self.template_id is not None:
                tf = self._template_factors()
                if name not in tf:
                    raise SelectionError(
                        f"template {self.template_id!r} has no such module",
                        file=self.where,
                        key=name,
                    )
                template = tf[name]
                if self.device is not None:
                    template = (template[0].to(self.device), template[1].to(self.device))
            ctx = ViewContext(
                module=name,
                indices=idx,
                seed=self.seed,
                epoch=self.epoch,
                dtype=self.dtype,
                template=template,
                options=self.view_options,
            )
            names.append(name)
            us.append(u)
            vs.append(v)
            ctxs.append(ctx)
        out: dict[str, dict[str, Any]] = {}
        for name, u, v, res in zip(names, us, vs, apply_view_many(self.view, us, vs, ctxs)):
            res["features"] = (int(u.shape[-2]), int(v.shape[-2]))  # ΔW is (out, in)
            rank = u.shape[-1]
            for k, t in res.items():
                if k in RANK_KEYS and t.shape[-1] > rank:
                    rank = t.shape[-1]
            res["rank"] = rank
            if name in mags:
                res["M"] = mags[name]
            out[name] = res
        return out


def check_device(device: str | torch.device, where: str = "zoo") -> torch.device:
    """A usable torch device, or a ``DeviceUnavailableError`` naming it (never a late CUDA
    failure deep inside a view)."""
    from lora_zoo.errors import DeviceUnavailableError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceUnavailableError(f"not a torch device: {e}", file=where, key=str(device)) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "CUDA was asked for but torch sees no CUDA device (CPU-only build or no GPU); "
            "use --device cpu",
            file=where,
            key=str(device),
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"only {torch.cuda.device_count()} CUDA devices", file=where, key=str(device)
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError("MPS is not available", file=where, key=str(device))
    return dev


def _items(
    views: dict[str, dict[str, Any]],
    rows: Sequence[int],
    ids: Sequence[str],
    indices: Sequence[int],
    labels: dict[str, list[Any]],
    base_models: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Split group stacks into per-LoRA items (the map-style / unbatched output)."""
    items = []
    for j, row in enumerate(rows):
        mods = {
            n: {k: (t if k in ("rank", "features") else t[j]) for k, t in res.items()}
            for n, res in views.items()
        }
        item = {
            "lora_id": ids[row],
            "index": int(indices[j]),
            "modules": mods,
            "labels": {c: vals[row] for c, vals in labels.items()},
        }
        if base_models is not None:
            item["base_model"] = base_models[row]
        items.append(item)
    return items


class LoraDataset(_ZooViews, Dataset):
    """Map-style dataset: item i is LoRA i of the split, as ``{"lora_id", "index", "base_model",
    "modules": {name: {view outputs..., "rank", "features"}}, "labels": {...}}``. Batch with
    ``collate_loras``."""

    def __init__(
        self,
        split_or_path: Any,
        view: str = "factors",
        *,
        cache: bool | str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(split_or_path, view, **kwargs)
        from lora_zoo.load.cache import cache_for  # ``cache``: see there (auto / require / off)

        self._cache_mode = cache
        self._vcache = cache_for(self, cache)  # a verified cache of this view, or None
        self._ids = list(self.split.ids)
        cols = [*self.labels, *(["base_model"] if "base_model" not in self.labels else [])]
        table = self.split.table(columns=cols)
        self._labels: dict[str, list[Any]] = {c: table.column(c).to_pylist() for c in self.labels}
        self._base = table.column("base_model").to_pylist()

    def __len__(self) -> int:
        return len(self._ids)

    def labels_tensors(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Every label of the split at once, as a batch would hold them: (labels, masks)."""
        return labels_to_batch(self._labels), label_masks(self._labels)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_vcache"] = None  # memory maps do not pickle: a worker reopens (and re-verifies)
        state["_vcache_todo"] = self._vcache is not None
        return state

    def __getitem__(self, i: int) -> dict[str, Any]:
        import pyarrow as pa

        i = int(i)
        if self.__dict__.pop("_vcache_todo", False):
            from lora_zoo.load.cache import cache_for

            self._vcache = cache_for(self, self._cache_mode)
        if self._vcache is not None:  # the view as cached: the same bytes, no decode or SVD
            from lora_zoo.load.cache import cached_views

            views = cached_views(self, self._vcache, i)
            labels = {c: [vals[i]] for c, vals in self._labels.items()}
            return _items(views, [0], [self._ids[i]], [i], labels, [self._base[i]])[0]
        lid, data, cfg = self.split.cell(i)  # the id as read from the row decoded
        ((rows, fac),) = decode_weight_batch(
            pa.array([data], pa.binary()),
            [cfg],  # the row's adapter_config: the same scale as record() and streaming
            fold_scale=self.fold_scale,
            where=self.where,
            ids=[lid],
            validate=self.validate,
            select=self._select,
        )
        views = self._views(fac, [i])
        labels = {c: [vals[i]] for c, vals in self._labels.items()}
        return _items(views, [0], [lid], [i], labels, [self._base[i]])[0]


_ROW = "__lora_zoo_row"  # the global row index, carried beside the columns while streaming


def _even_range(n: int, parts: int, k: int) -> tuple[int, int]:
    """Part k of ``range(n)`` cut into ``parts`` contiguous pieces whose sizes differ by <= 1."""
    base, extra = divmod(n, parts)
    start = k * base + min(k, extra)
    return start, start + base + (1 if k < extra else 0)


class LoraIterableDataset(_ZooViews, IterableDataset):
    """Streaming dataset over row groups, split evenly across ranks and workers.

    ``batch_size=None`` yields per-LoRA items (use ``DataLoader(..., collate_fn=collate_loras)``);
    ``batch_size=B`` yields batches of B rows already collated, decoded and viewed as (B, ...)
    stacks (use ``DataLoader(ds, batch_size=None, num_workers=...)``): the fast path.

    Sharding: the split's rows, in row-group order (shuffled by row group when
    ``shuffle_buffer > 0``, with the same seed on every rank), are cut into ``world_size``
    contiguous equal parts: every torch.distributed rank gets exactly ``ceil(N / world)`` rows
    (the last parts wrap around to the first rows, as ``DistributedSampler`` pads), or
    ``floor(N / world)`` with ``drop_last=True``, so no rank waits in a collective for one that
    ran out. Each rank's part is cut again over its DataLoader workers (sizes differ by at most
    one; nothing is repeated). A worker reads only the row groups its rows lie in (a ``ZooSplit``
    from ``load_zoo``; a split object with only ``table`` / ``iter_batches`` is read whole).

    ``shuffle_buffer=K``: rows pass through a seeded buffer of K rows (seed, epoch, shard) and
    come out in random order; only Arrow row references are buffered, the weights are decoded
    after the draw. Call ``set_epoch(e)`` for a new order each epoch.
    """

    def __init__(
        self,
        split_or_path: Any,
        view: str = "factors",
        *,
        batch_size: int | None = None,
        read_batch_size: int = 256,
        shuffle_buffer: int = 0,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(split_or_path, view, **kwargs)
        self.batch_size, self.read_batch_size = batch_size, batch_size or read_batch_size
        self.shuffle_buffer, self.drop_last = int(shuffle_buffer), drop_last

    def _shard(self) -> tuple[int, int, int, int]:
        """(rank, world, worker, workers)."""
        wi = get_worker_info()
        nw, wid = (wi.num_workers, wi.id) if wi is not None else (1, 0)
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return rank, world, wid, nw

    def rows_for(self, rank: int, world: int, worker: int = 0, workers: int = 1) -> list[int]:
        """The global row indices this shard reads, in reading order (before the buffer)."""
        return [i for a, b in self._ranges(rank, world, worker, workers) for i in range(a, b)]

    def _blocks(self) -> list[tuple[int, int]]:
        """Global (start, stop) of each row group (the unit of reading and of the shuffle)."""
        sp = self.split
        if hasattr(sp, "row_group_ranges"):
            return sp.row_group_ranges()
        n, step = len(sp), max(1, self.read_batch_size)
        return [(a, min(a + step, n)) for a in range(0, n, step)]

    def _ranges(self, rank: int, world: int, worker: int, workers: int) -> list[tuple[int, int]]:
        blocks = self._blocks()
        if self.shuffle_buffer > 0:  # same permutation on every rank: seed and epoch only
            perm = stable_permutation(len(blocks), self.seed, f"stream/{self.epoch}")
            blocks = [blocks[j] for j in perm]
        n = sum(b - a for a, b in blocks)
        if n == 0:
            return []
        per = n // world if self.drop_last else math.ceil(n / world)
        lo, hi = _even_range(per, workers, worker)
        lo, hi = rank * per + lo, rank * per + hi  # positions in the (wrapped) virtual order
        out: list[tuple[int, int]] = []
        for lap in range(lo // n, (hi - 1) // n + 1 if hi > lo else lo // n):
            x, y = max(lo, lap * n) - lap * n, min(hi, (lap + 1) * n) - lap * n  # inside [0, n)
            pos = 0
            for a, b in blocks:
                s0, s1 = max(x, pos), min(y, pos + b - a)
                if s0 < s1:
                    out.append((a + s0 - pos, a + s1 - pos))
                pos += b - a
        return out

    def _read(self, ranges: list[tuple[int, int]], cols: list[str]) -> Iterator[Any]:
        """pa.Tables of the rows in ``ranges``, with the global row index in ``_ROW``."""
        import pyarrow as pa

        sp = self.split
        real = hasattr(sp, "read_rows")
        whole = None if real else sp.table(columns=cols)
        for a, b in ranges:
            t = sp.read_rows(a, b, cols) if real else whole.slice(a, b - a)
            yield t.append_column(_ROW, pa.array(range(a, b), pa.int64()))

    def _rows(self, tables: Iterator[Any], me: int) -> Iterator[Any]:
        """Tables of ``read_batch_size`` rows, through the shuffle buffer when there is one."""
        import pyarrow as pa

        size = self.read_batch_size
        if self.shuffle_buffer <= 0:
            yield from rebatch_tables(tables, size)
            return
        rng = shuffle_rng(self.seed, self.epoch, me)
        buf: list[Any] = []  # one-row slices (zero-copy references into the read tables)

        def draw(k: int) -> Any:
            out = []
            for _ in range(k):
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                out.append(buf.pop())
            return pa.concat_tables(out)

        for t in tables:
            buf += [t.slice(j, 1) for j in range(t.num_rows)]
            while len(buf) >= self.shuffle_buffer + size:
                yield draw(size)
        while buf:
            yield draw(min(size, len(buf)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, wid, nw = self._shard()
        cols = [
            "lora_id",
            "weights",
            "adapter_config",
            "base_model",
            *(c for c in self.labels if c not in ("lora_id", "adapter_config", "base_model")),
        ]
        ranges = self._ranges(rank, world, wid, nw)
        for t in self._rows(self._read(ranges, cols), rank * nw + wid):
            if t.num_rows:
                # the small columns as one record batch; the weights stay chunked (a batch
                # spanning row groups): the decoder copies each chunk once, into the batch
                small = t.drop_columns(["weights"]).combine_chunks().to_batches()[0]
                yield from self._process(small, t.column("weights"))

    def _process(self, batch: Any, weights: Any) -> Iterator[dict[str, Any]]:
        ids = batch.column("lora_id").to_pylist()
        rows_idx = batch.column(_ROW).to_numpy()  # (b,) global row index
        base = batch.column("base_model").to_pylist()
        labels = {} if self.batch_size else {c: batch.column(c).to_pylist() for c in self.labels}
        groups = decode_weight_batch(
            weights,
            batch.column("adapter_config").to_pylist(),
            fold_scale=self.fold_scale,
            where=self.where,
            ids=ids,
            validate=self.validate,
            select=self._select,
            consume=True,  # the batch is ours: without a fold, views of it (no copy)
        )
        viewed = [(rows, self._views(fac, rows_idx[rows])) for rows, fac in groups]
        if self.batch_size is None:
            items = [
                it
                for rows, vw in viewed
                for it in _items(vw, rows, ids, rows_idx[rows], labels, base)
            ]
            order = {int(r): j for j, r in enumerate(rows_idx)}
            yield from sorted(items, key=lambda it: order[it["index"]])
            return
        modules, info = _merge(viewed, len(ids), self.where)
        labs, masks = _arrow_labels(batch, self.labels)
        yield {
            "lora_id": ids,
            "index": torch.from_numpy(rows_idx.astype("int64")),
            "base_model": base,
            "modules": modules,
            "module_info": info,
            "labels": labs,
            "label_mask": masks,
        }
