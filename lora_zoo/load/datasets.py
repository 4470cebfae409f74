"""Torch datasets over a zoo split: per LoRA, per selected module, one view plus label columns.

Two entry points, one output format:

- ``LoraDataset`` (map-style): random access through ``ZooSplit.weights_bytes(i)``; shuffle with
  the DataLoader, batch with ``collate_loras``.
- ``LoraIterableDataset`` (streaming): walks ``ZooSplit.iter_batches`` record batch by record
  batch, shards batches over DataLoader workers (and torch.distributed ranks), and decodes a whole
  record batch at once (``decode_weight_batch``): rows whose safetensors headers are identical (the
  normal case in a zoo) share tensor offsets, so every factor of the batch is one strided numpy
  view over Arrow's binary buffer instead of one safetensors parse per LoRA. Views then run once
  per module on (batch, n, r) stacks. With ``batch_size=B`` it yields ready collated batches
  (use ``DataLoader(ds, batch_size=None)``); without, single items like the map-style dataset.

Output (``collate_loras``)::

    {"lora_id": [b], "index": (b,), "labels": {col: tensor (b, ...) | list},
     "modules": {name: {"U": (b, n, r), "V": (b, m, r), "S": (b, r), "W": (b, n, m),
                        "mask": (b, r) bool}}}

(only the keys the view produces). Mixed ranks are zero-padded to the batch max; ``mask`` marks
real rank columns. Zero padding is exact for every built-in view (zero columns add nothing to
U V^T; see ``symmetry.pad_rank``).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from lora_zoo.errors import (
    SelectionError,
)
from lora_zoo.load.collate import _arrow_labels, _merge
from lora_zoo.load.decode import Factors, decode_weight_batch
from lora_zoo.load.views import RANK_KEYS, ViewContext, apply_view, get_view
from lora_zoo.record import LoraRecord

logger = logging.getLogger(__name__)

BASE_COLUMNS = ("lora_id", "base_model", "collection", "rank", "num_modules", "adapter_config")


# ---- module selection ------------------------------------------------------------------------
def select_modules(
    names: Sequence[str], patterns: str | re.Pattern | Sequence[str | re.Pattern] | None
) -> list[str]:
    """Module names matching any pattern, in stored order.

    A pattern is a glob (``*.q_proj``, fnmatch rules, whole name) or a regex: a compiled
    ``re.Pattern`` or a string prefixed ``re:`` (``re:.*layers\\.(0|1)\\..*``), matched with
    ``fullmatch`` like PEFT's ``target_modules``. A pattern that matches nothing is an error:
    a silent empty selection would train a model on nothing.
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
        if not hit:
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
            self._selected[key] = select_modules(names, self.modules)
        return self._selected[key]

    def _views(self, fac: Factors, indices: Sequence[int]) -> dict[str, dict[str, Any]]:
        """Run the view on each selected module's (g, n, r) stack -> {name: {key: (g, ...)}}."""
        out: dict[str, dict[str, Any]] = {}
        idx = tuple(int(i) for i in indices)  # once per group, not once per module
        for name, (u, v) in fac.items():  # already selected by the decoder  # (g, n, r), (g, m, r)
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
            ctx = ViewContext(
                module=name,
                indices=idx,
                seed=self.seed,
                epoch=self.epoch,
                dtype=self.dtype,
                template=template,
                options=self.view_options,
            )
            res = apply_view(self.view, u, v, ctx)
            rank = u.shape[-1]
            for k, t in res.items():
                if k in RANK_KEYS and t.shape[-1] > rank:
                    rank = t.shape[-1]
            res["rank"] = rank
            out[name] = res
        return out


def _items(
    views: dict[str, dict[str, Any]],
    rows: Sequence[int],
    ids: Sequence[str],
    indices: Sequence[int],
    labels: dict[str, list[Any]],
) -> list[dict[str, Any]]:
    """Split group stacks into per-LoRA items (the map-style / unbatched output)."""
    items = []
    for j, row in enumerate(rows):
        mods = {
            n: {k: (t if k == "rank" else t[j]) for k, t in res.items()} for n, res in views.items()
        }
        items.append(
            {
                "lora_id": ids[row],
                "index": int(indices[j]),
                "modules": mods,
                "labels": {c: vals[row] for c, vals in labels.items()},
            }
        )
    return items


class LoraDataset(_ZooViews, Dataset):
    """Map-style dataset: item i is LoRA i of the split, as ``{"lora_id", "index", "modules":
    {name: {view outputs..., "rank"}}, "labels": {...}}``. Batch with ``collate_loras``."""

    def __init__(self, split_or_path: Any, view: str = "factors", **kwargs: Any) -> None:
        super().__init__(split_or_path, view, **kwargs)
        self._ids = list(self.split.ids)
        self._labels: dict[str, list[Any]] = {}
        if self.labels:
            table = self.split.table(columns=list(self.labels))
            self._labels = {c: table.column(c).to_pylist() for c in self.labels}

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import pyarrow as pa

        i = int(i)
        where = f"{self.where}:{self._ids[i]}"
        data = self.split.weights_bytes(i)
        ((rows, fac),) = decode_weight_batch(
            pa.array([data], pa.binary()),
            fold_scale=self.fold_scale,
            where=where,
            validate=self.validate,
            select=self._select,
        )
        views = self._views(fac, [i])
        labels = {c: [vals[i]] for c, vals in self._labels.items()}
        return _items(views, [0], [self._ids[i]], [i], labels)[0]


class LoraIterableDataset(_ZooViews, IterableDataset):
    """Streaming dataset over record batches, sharded across workers and ranks by batch.

    ``batch_size=None`` yields per-LoRA items (use ``DataLoader(..., collate_fn=collate_loras)``);
    ``batch_size=B`` reads record batches of B rows and yields them already collated, decoded and
    viewed as (B, ...) stacks (use ``DataLoader(ds, batch_size=None, num_workers=...)``): the
    fast path. Record batch k goes to shard k % (world_size * num_workers), so no row is seen
    twice; each worker still reads (not decodes) the other shards' batches, since the reader's
    ``iter_batches`` has no shard argument.
    """

    def __init__(
        self,
        split_or_path: Any,
        view: str = "factors",
        *,
        batch_size: int | None = None,
        read_batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(split_or_path, view, **kwargs)
        self.batch_size, self.read_batch_size = batch_size, batch_size or read_batch_size

    def _shard(self) -> tuple[int, int]:
        wi = get_worker_info()
        nw, wid = (wi.num_workers, wi.id) if wi is not None else (1, 0)
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return rank * nw + wid, world * nw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        me, shards = self._shard()
        cols = [
            "lora_id",
            "weights",
            "adapter_config",
            *(c for c in self.labels if c not in ("lora_id", "adapter_config")),
        ]
        offset = 0
        for k, batch in enumerate(
            self.split.iter_batches(columns=cols, batch_size=self.read_batch_size)
        ):
            n = batch.num_rows
            if k % shards == me and n:
                yield from self._process(batch, offset)
            offset += n

    def _process(self, batch: Any, offset: int) -> Iterator[dict[str, Any]]:
        ids = batch.column("lora_id").to_pylist()
        labels = {} if self.batch_size else {c: batch.column(c).to_pylist() for c in self.labels}
        groups = decode_weight_batch(
            batch.column("weights"),
            batch.column("adapter_config").to_pylist(),
            fold_scale=self.fold_scale,
            where=self.where,
            ids=ids,
            validate=self.validate,
            select=self._select,
            consume=True,  # the batch is ours: fold the scale in place, no copy
        )
        viewed = [(rows, self._views(fac, offset + rows)) for rows, fac in groups]
        if self.batch_size is None:
            items = [
                it for rows, vw in viewed for it in _items(vw, rows, ids, offset + rows, labels)
            ]
            yield from sorted(items, key=lambda it: it["index"])
            return
        yield {
            "lora_id": ids,
            "index": torch.arange(offset, offset + len(ids)),
            "modules": _merge(viewed, len(ids), self.where),
            "labels": _arrow_labels(batch, self.labels),
        }
