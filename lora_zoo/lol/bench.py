"""``lora-zoo bench``: train the reference LoL models (``lol.models``) on a zoo's stored train
split, test on its test split, and store the table in the zoo (``bench/results.json``).

Why a harness in the toolkit: LoL numbers are only comparable when every model sees the same
LoRAs, the same validation slice and the same metrics. So: the zoo's own ``train`` / ``test``
splits; early stopping on a validation slice carved from train the way the zoo's split was made
(group-aware when the recipe split by group, ``zoo.splits.group_split`` on the same key; seeded
random otherwise); ``--repeats`` seeds per model (init, batch order, augmentation) with mean ±
std; every hyperparameter and seed in the output.

Tasks, from the target columns' Arrow types: bool columns -> binary (several, e.g.
``in_group.*``, are one multi-label model with one sigmoid each; accuracy per label and mean,
AUROC); string (or a single small-integer) column -> multiclass (accuracy, macro AUROC);
floats -> regression, standardised on the fit rows (R², Kendall τ, Spearman). Missing labels
(NaN) are left out of the loss and the metrics.

The split's views are held in memory (one collated batch per view: fine for zoos of up to ~10^4
small LoRAs, e.g. the shipped quickstart zoos); ``--stream`` (automatic above a quarter of
physical memory) trains from ``LoraIterableDataset`` minibatches instead (``lol.stream``).

What makes a table publishable (issue 24): GL-net at the papers' size (``lol.presets``, chosen
by the task, selectable on the validation loss); two rows that show chance (the label-mean /
majority baseline and the permuted-labels control); a 95 % bootstrap interval over test LoRAs
beside the seed std; learning curves (``train_sizes``); transfer to another zoo's test split
(``test_zoo``, ``lol.transfer``).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lora_zoo._io import atomic_write_bytes
from lora_zoo.cards.lol_results import ci_text, run_label
from lora_zoo.errors import SelectionError
from lora_zoo.load import symmetry
from lora_zoo.load.datasets import LoraIterableDataset, check_device
from lora_zoo.lol import metrics as M
from lora_zoo.lol.models import (
    MODELS,
    LolModel,
    LolModelInfo,
    all_models,
    make_model,
    model_info,
    specs_from_batch,
)
from lora_zoo.lol.models.baseline import baseline_predict
from lora_zoo.lol.presets import Preset, get_preset, preset_for_task
from lora_zoo.lol.stream import (
    batch_rows,
    batches,
    split_labels,
    stream_predict,
    stream_train_epoch,
    stream_val_loss,
)
from lora_zoo.lol.transfer import check_targets, match_modules
from lora_zoo.seeding import sub_seed

logger = logging.getLogger(__name__)

RESULTS = "bench/results.json"
#: the in-memory path holds a split's decoded view (about its stored bytes, more for derived
#: views); above this fraction of physical memory the bench streams instead
STREAM_ABOVE = 0.25
FORMAT = 1
PRIMARY = {"binary": "auroc", "multiclass": "accuracy", "regression": "r2"}


@dataclass
class TrainConfig:
    """Optimisation settings shared by every neural model (stored with each run)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    max_epochs: int = 300
    patience: int = 30
    val_fraction: float = 0.15
    augment_log_cond: float = 2.0  # cond(R) <= e^2 for the gl_augment draws
    stream: bool | None = None  # None: stream when the train split's bytes exceed STREAM_ABOVE
    # streaming: rows in the seeded shuffle buffer, after a row-group shuffle. Small on purpose:
    # a buffered row pins its Arrow row group until the group's last row is drawn, so a K-row
    # buffer keeps about K ln(rows per group) rows read (K = 256: ~1,200 SD-sized LoRAs, 2 GB)
    shuffle_buffer: int = 32
    calibrate_rows: int = 128  # streaming: rows read for the input scaling (fit rows among them)


@dataclass
class Task:
    kind: str  # binary | multiclass | regression
    columns: list[str]
    classes: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def out_dim(self) -> int:
        return len(self.classes) if self.kind == "multiclass" else len(self.columns)


# ---- data ------------------------------------------------------------------------------------
def resolve_targets(zoo: Any, target: str | Sequence[str]) -> list[str]:
    """Label (or metadata) columns matching the column names / globs, in manifest order."""
    pats = [target] if isinstance(target, str) else list(target)
    sp = zoo["train"]
    cols = [*sp.label_columns, *sp.metadata_columns]
    out = [c for c in cols if any(fnmatch.fnmatchcase(c, p) for p in pats)]
    if not out:
        raise SelectionError(
            f"--target matches no label/metadata column; labels: {sp.label_columns}",
            file=str(zoo.source),
            key=",".join(pats),
        )
    return out


def infer_task(zoo: Any, columns: list[str], train_labels: dict[str, Any]) -> Task:
    import pyarrow as pa

    kinds = set()
    for c in columns:
        t = zoo.schema.field(c).type
        if pa.types.is_boolean(t):
            kinds.add("binary")
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            kinds.add("multiclass")
        elif pa.types.is_integer(t) and len(columns) == 1:
            vals = {v for v in train_labels[c].tolist() if not math.isnan(v)}
            kinds.add("multiclass" if len(vals) <= 20 else "regression")
        elif pa.types.is_integer(t) or pa.types.is_floating(t):
            kinds.add("regression")
        elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            raise SelectionError(
                f"cannot learn a list column ({t}) as one target: bench the per-label columns "
                "instead (e.g. --target 'in_group.*'; text-to-image recipes write them with "
                "builder_args.in_group_columns: true)",
                key=c,
            )
        else:
            raise SelectionError(f"cannot learn a target of type {t}", key=c)
    if len(kinds) != 1 or ("multiclass" in kinds and len(columns) != 1):
        raise SelectionError(
            f"targets mix task kinds {sorted(kinds)} (or several multiclass columns); bench "
            "one kind at a time",
            key=",".join(columns),
        )
    return Task(kinds.pop(), columns)


def validation_carve(zoo: Any, ids: list[str], fraction: float, seed: int) -> dict[str, Any]:
    """(fit ids, valid ids, how): carved from train the way the zoo's split was made."""
    from lora_zoo.zoo.splits import group_split, random_split

    spec = ((zoo.info.get("recipe_resolved") or {}).get("output") or {}).get("split") or {}
    fr = {"fit": 1 - fraction, "valid": fraction}
    how: dict[str, Any] = {"kind": "random", "fraction": fraction, "seed": seed}
    if spec.get("kind") == "group" and spec.get("key"):
        key = spec["key"]
        vals = zoo["train"].table(columns=["lora_id", key])
        by_id = dict(zip(vals.column("lora_id").to_pylist(), vals.column(key).to_pylist()))
        parts = group_split(ids, [by_id[i] for i in ids], fr, seed)
        how.update(kind="group", key=key)
    else:
        parts = random_split(ids, fr, seed)
    if not parts["valid"] or not parts["fit"]:  # tiny zoos: keep at least one row on each side
        parts = random_split(
            ids,
            {"fit": 1 - max(fraction, 1 / len(ids)), "valid": max(fraction, 1 / len(ids))},
            seed,
        )
    return {"fit": parts["fit"], "valid": parts["valid"], "how": how}


def load_view(split: Any, view: str, labels: Sequence[str], device: torch.device) -> dict[str, Any]:
    """The whole split as one collated batch of ``view`` (labels as tensors + masks): read from
    the zoo's view cache when one is valid (``lora-zoo views ZOO --cache``), else computed."""
    from lora_zoo.load.cache import cached_split_batch

    cached = cached_split_batch(split, view, labels, device)
    if cached is not None:
        return cached
    ds = LoraIterableDataset(
        split, view, batch_size=max(1, len(split)), labels=list(labels), device=device
    )
    return next(iter(ds))


def take(modules: dict[str, dict[str, torch.Tensor]], idx: torch.Tensor) -> dict[str, Any]:
    """Rows ``idx`` of every module tensor."""
    return {n: {k: t[idx.to(t.device)] for k, t in m.items()} for n, m in modules.items()}


def targets_tensor(task: Task, batch: dict[str, Any]) -> torch.Tensor:
    """(b, k) float with NaN for missing labels (multiclass: (b,) class index, -1 missing)."""
    labs = batch["labels"]
    if task.kind == "multiclass":
        col = labs[task.columns[0]]
        vals = col if isinstance(col, list) else col.tolist()
        idx = {c: i for i, c in enumerate(task.classes)}
        return torch.tensor([idx.get(str(v), -1) if v is not None else -1 for v in vals])
    cols = []
    for c in task.columns:
        t = labs[c]
        if isinstance(t, list):
            raise SelectionError("label column is not numeric", key=c)
        t = t.to(torch.float32)
        mask = batch.get("label_mask", {}).get(c)
        if mask is not None:
            t = torch.where(mask.to(t.device), t, torch.full_like(t, math.nan))
        cols.append(t.cpu())
    return torch.stack(cols, 1)


# ---- training --------------------------------------------------------------------------------
def _loss(task: Task, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task.kind == "multiclass":
        ok = y >= 0
        return nn.functional.cross_entropy(out[ok], y[ok]) if ok.any() else out.sum() * 0
    ok = ~torch.isnan(y)
    yz = torch.where(ok, y, torch.zeros_like(y))
    if task.kind == "binary":
        per = nn.functional.binary_cross_entropy_with_logits(out, yz, reduction="none")
    else:
        mu = torch.tensor(task.mean, device=y.device)
        sd = torch.tensor(task.std, device=y.device)
        per = (out - (yz - mu) / sd) ** 2
    return (per * ok).sum() / ok.sum().clamp_min(1)


def augment(
    modules: dict[str, dict[str, torch.Tensor]], gen: torch.Generator, log_cond: float
) -> dict[str, dict[str, torch.Tensor]]:
    """(U R, V R^-T) with a fresh random R per LoRA and module (the ``gl_augment`` view's op:
    ``symmetry.random_gl`` + ``apply_gl``), applied to a training minibatch."""
    out = {}
    for name, m in modules.items():
        b, r = m["U"].shape[0], m["U"].shape[-1]
        rm, rit = symmetry.random_gl(r, generator=gen, log_cond=log_cond, batch=(b,))
        u, v = symmetry.apply_gl(m["U"], m["V"], rm.to(m["U"].device), rit.to(m["U"].device))
        out[name] = {**m, "U": u, "V": v}
    return out


def _stepper(
    model: LolModel, task: Task, opt: torch.optim.Optimizer, cfg: TrainConfig, aug_gen: Any
) -> Any:
    """One optimiser step on a minibatch (GL(r)-augmented first when ``aug_gen`` is given)."""

    def step(mb: dict[str, Any], yb: torch.Tensor) -> None:
        if aug_gen is not None:
            mb = augment(mb, aug_gen, cfg.augment_log_cond)
        loss = _loss(task, model(mb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _early_stopping(
    model: LolModel, cfg: TrainConfig, epoch_fn: Any, val_fn: Any, progress: bool, desc: str
) -> dict[str, Any]:
    """Epochs of ``epoch_fn(epoch)`` until the validation loss ``val_fn()`` has not improved
    for ``cfg.patience`` epochs; restores the best epoch's weights."""
    from lora_zoo.progress import track

    best, best_epoch, best_state = math.inf, -1, None
    bar = track(range(cfg.max_epochs), desc=desc, unit="epoch", nested=True, enabled=progress)
    for epoch in bar:
        model.train()
        epoch_fn(epoch)
        model.eval()
        with torch.no_grad():
            vloss = float(val_fn())
        if vloss < best - 1e-6:
            best, best_epoch = vloss, epoch
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        bar.set_postfix(val=f"{vloss:.4f}", best=f"{best:.4f}")
        if epoch - best_epoch >= cfg.patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"epochs": epoch + 1, "best_epoch": best_epoch, "best_val_loss": best}


def train_model(
    model: LolModel,
    task: Task,
    fit: tuple[dict[str, Any], torch.Tensor],
    valid: tuple[dict[str, Any], torch.Tensor],
    cfg: TrainConfig,
    seed: int,
    *,
    gl_augment: bool = False,
    progress: bool = True,
    desc: str = "",
) -> dict[str, Any]:
    """AdamW on minibatches, early stopping on the validation loss; restores the best epoch."""
    (xm, y), (vm, vy) = fit, valid
    dev = next(model.parameters()).device
    y, vy = y.to(dev), vy.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(sub_seed(seed, "augment"))
    step = _stepper(model, task, opt, cfg, aug_gen if gl_augment else None)
    n = len(y)

    def epoch_fn(epoch: int) -> None:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            step(take(xm, idx), y[idx.to(dev)])

    def val_fn() -> float:
        return float(_loss(task, model(vm), vy))

    return _early_stopping(model, cfg, epoch_fn, val_fn, progress, desc)


def predict(model: LolModel, task: Task, modules: dict[str, Any]) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out = model(modules).float().cpu()
    if task.kind == "binary":
        return torch.sigmoid(out).numpy()
    if task.kind == "multiclass":
        return torch.softmax(out, -1).numpy()
    return (out * torch.tensor(task.std) + torch.tensor(task.mean)).numpy()


def score(task: Task, y: torch.Tensor | np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    yn = y.numpy() if isinstance(y, torch.Tensor) else y
    if task.kind == "binary":
        return M.classification_metrics(yn, pred, task.columns)
    if task.kind == "multiclass":
        return M.multiclass_metrics(yn, pred, task.classes)
    return M.regression_metrics(yn, pred, task.columns)


# ---- the harness -------------------------------------------------------------------------------
def default_runs() -> list[tuple[str, str]]:
    """(model, view) pairs run by default: every registered model on every view it reads, in
    the models' declared order (the baseline first)."""
    return [(info.name, v) for info in all_models() for v in info.views]


def non_invariant_runs() -> set[tuple[str, str]]:
    """(model, view) pairs where GL(r) augmentation means something (declared symmetry)."""
    return {(i.name, v) for i in all_models() for v in i.views if i.non_invariant(v)}


def plan_runs(
    models: Sequence[str] | None, views: Sequence[str] | None, gl_augment: bool
) -> list[tuple[str, str, bool]]:
    """(model, view, augment) triples: the defaults filtered by ``models`` / ``views``, plus a
    GL-augmented copy of each non-invariant run when asked."""
    infos = all_models()
    for m in models or ():
        if m not in MODELS:
            raise MODELS.not_found(m, key="models")
    allv = {v for i in infos if i.reads_weights for v in i.views}
    for v in views or ():
        if v not in allv:
            close = difflib.get_close_matches(v, allv, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SelectionError(
                f"unknown view {v!r}{hint}; available: {sorted(allv)}", key="views"
            )
    runs = []
    for info in infos:
        for v in info.views:
            if models and info.name not in models:
                continue
            if views and info.reads_weights and v not in views:
                continue
            runs.append((info.name, v, False))
            if gl_augment and info.non_invariant(v):
                runs.append((info.name, v, True))
    if models and not runs:
        raise SelectionError("no (model, view) pair left after --models/--views", key="views")
    return runs


@dataclass
class _Bench:
    """What every run of one bench shares: the zoo, the task, the fit / valid / test rows."""

    zoo: Any
    where: str
    columns: list[str]
    dev: torch.device
    cfg: TrainConfig
    progress: bool
    split_seed: int
    cache: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    test_zoo: Any = None  # --test-zoo: test on this zoo's test split instead (transfer)
    train_pos: dict[str, int] = field(default_factory=dict)  # lora_id -> train row
    n_boot: int = 1000
    task: Task | None = None
    carve: dict[str, Any] = field(default_factory=dict)
    fit_idx: torch.Tensor | None = None
    val_idx: torch.Tensor | None = None
    y_train: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    test_ids: list[str] = field(default_factory=list)

    def data(self, view: str) -> dict[str, dict[str, Any]]:
        """The train and test splits as one collated batch of ``view`` each (cached)."""
        if view not in self.cache:
            train = load_view(self.zoo["train"], view, self.columns, self.dev)
            test_zoo = self.zoo if self.test_zoo is None else self.test_zoo
            test = load_view(test_zoo["test"], view, self.columns, self.dev)
            if self.test_zoo is not None:
                test = match_modules(train, test, str(getattr(test_zoo, "source", "")))
            self.cache[view] = {"train": train, "test": test}
        return self.cache[view]


def _open_bench(
    zoo_or_path: Any, target: str | Sequence[str], device: str, cfg: TrainConfig, **kw: Any
) -> _Bench:
    """The zoo (opened if a path), checked for train and test splits, and the target columns."""
    from lora_zoo.load.source import load_zoo

    zoo = load_zoo(str(zoo_or_path)) if isinstance(zoo_or_path, (str, os.PathLike)) else zoo_or_path
    where = str(getattr(zoo, "source", zoo_or_path))
    for s in ("train", "test"):
        if s not in zoo.splits:
            raise SelectionError(
                f"bench needs train and test splits; has {zoo.splits}", file=where, key="split"
            )
    dev = check_device(device, where)
    return _Bench(zoo, where, resolve_targets(zoo, target), dev, cfg, **kw)


def _prepare_task(b: _Bench, runs: Sequence[tuple[str, str, bool]]) -> None:
    """Infer the task from the labels, carve the validation rows, and build the target
    tensors (regression targets standardised on the fit rows)."""
    if b.cfg.stream:  # labels from the Arrow tables alone: no view decoded
        test_zoo = b.zoo if b.test_zoo is None else b.test_zoo
        first = {
            "train": split_labels(b.zoo["train"], b.columns),
            "test": split_labels(test_zoo["test"], b.columns),
        }
    else:
        first = b.data("svals" if any(v == "svals" for _, v, _ in runs) else "factors")
    tr, columns = first["train"], b.columns
    ids = list(tr["lora_id"])
    probe_labels = {
        c: (tr["labels"][c].float() if not isinstance(tr["labels"][c], list) else None)
        for c in columns
    }
    task = infer_task(b.zoo, columns, {c: v for c, v in probe_labels.items() if v is not None})
    if task.kind == "multiclass":
        vals = tr["labels"][columns[0]]
        vals = vals if isinstance(vals, list) else vals.tolist()
        task.classes = sorted({str(v) for v in vals if v is not None})
    b.carve = validation_carve(b.zoo, ids, b.cfg.val_fraction, b.split_seed)
    pos = b.train_pos = {lid: i for i, lid in enumerate(ids)}
    b.fit_idx = torch.tensor(sorted(pos[i] for i in b.carve["fit"]))
    b.val_idx = torch.tensor(sorted(pos[i] for i in b.carve["valid"]))
    b.y_train, b.y_test = targets_tensor(task, tr), targets_tensor(task, first["test"])
    b.test_ids = list(first["test"]["lora_id"])
    if task.kind == "regression":
        yf = b.y_train[b.fit_idx]
        task.mean = torch.nanmean(yf, 0).tolist()
        sd = [float(np.nanstd(yf[:, j].numpy())) for j in range(yf.shape[1])]
        task.std = [s if s > 0 else 1.0 for s in sd]
    b.task = task


@dataclass(frozen=True)
class _Variant:
    """What one run trains on besides the model: a subset of the fit rows (learning curves)
    and the matched-noise control (train-split labels permuted per seed)."""

    fraction: float = 1.0
    control: str = ""  # "" | "permuted_labels"


def _fit_rows(b: _Bench, fraction: float) -> torch.Tensor:
    """The first ``fraction`` of a seeded permutation of the fit rows: nested across fractions,
    so a bigger training set always contains the smaller one (a curve, not resamples)."""
    assert b.fit_idx is not None
    if fraction >= 1.0:
        return b.fit_idx
    gen = torch.Generator().manual_seed(sub_seed(b.split_seed, "learning_curve", bits=31))
    order = torch.randperm(len(b.fit_idx), generator=gen)
    k = max(2, round(fraction * len(b.fit_idx)))
    return b.fit_idx[order[:k]].sort().values


def _train_labels(b: _Bench, var: _Variant, seed: int) -> torch.Tensor:
    """The train split's labels, or (control) the same labels permuted across its rows: the
    weights no longer tell the labels, yet their marginal, the split size and every model
    choice stay, so the control's score is what chance looks like on this zoo."""
    assert b.y_train is not None
    if var.control != "permuted_labels":
        return b.y_train
    gen = torch.Generator().manual_seed(sub_seed(seed, "permute_labels", bits=31))
    return b.y_train[torch.randperm(len(b.y_train), generator=gen)]


def _fit_one_seed(
    b: _Bench,
    info: LolModelInfo,
    view: str,
    aug: bool,
    seed: int,
    hp: dict[str, Any],
    var: _Variant = _Variant(),
) -> tuple[np.ndarray, dict[str, Any], LolModel | None]:
    """One seed of one run: (test predictions, training info, the trained model or None)."""
    assert b.task is not None and b.y_test is not None and b.val_idx is not None
    fit_idx, y_train = _fit_rows(b, var.fraction), _train_labels(b, var, seed)
    if not info.reads_weights:
        assert info.fit_predict is not None
        return info.fit_predict(b.task, y_train[fit_idx], len(b.y_test)), {}, None
    if b.cfg.stream:
        return _fit_streaming(b, info, view, aug, seed, hp, (fit_idx, y_train))
    label = f"{view}+gl_augment" if aug else view
    d = b.data(info.loader_view(view))
    xm_all = d["train"]["modules"]
    torch.manual_seed(seed)
    specs = specs_from_batch(d["train"])
    model = make_model(info.name, view, specs, b.task.out_dim, **hp).to(b.dev)
    fit_m = take(xm_all, fit_idx)
    model.calibrate(fit_m)
    train_info = train_model(
        model,
        b.task,
        (fit_m, y_train[fit_idx]),
        (take(xm_all, b.val_idx), y_train[b.val_idx]),
        b.cfg,
        seed,
        gl_augment=aug,
        progress=b.progress,
        desc=f"{info.name}/{label} seed {seed}",
    )
    return predict(model, b.task, d["test"]["modules"]), train_info, model


def _loss_sum(task: Task, out: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(loss x count, count): ``_loss`` as a sum over the labels it averages, so minibatch
    sums add up to the loss over all rows at once."""
    n = int((y >= 0).sum()) if task.kind == "multiclass" else int((~torch.isnan(y)).sum())
    return float(_loss(task, out, y)) * n, n


def _fit_streaming(
    b: _Bench,
    info: LolModelInfo,
    view: str,
    aug: bool,
    seed: int,
    hp: dict[str, Any],
    fit: tuple[torch.Tensor, torch.Tensor],
) -> tuple[np.ndarray, dict[str, Any], LolModel]:
    """``_fit_one_seed`` from minibatches (``lol.stream``): memory flat in the number of
    LoRAs. Same model, optimiser, stopping rule, fit / validation rows and labels."""
    assert b.task is not None and b.val_idx is not None
    task, cfg, lv, (fit_idx, y_train) = b.task, b.cfg, info.loader_view(view), fit
    train_split = b.zoo["train"]
    test_zoo = b.zoo if b.test_zoo is None else b.test_zoo
    fit_rows, val_rows = set(fit_idx.tolist()), set(b.val_idx.tolist())
    first = next(batches(train_split, lv, cfg.calibrate_rows, b.dev))
    torch.manual_seed(seed)
    model = make_model(info.name, view, specs_from_batch(first), task.out_dim, **hp).to(b.dev)
    model.calibrate(take(first["modules"], batch_rows(first, b.train_pos, fit_rows)))
    ref = {
        "modules": take(first["modules"], torch.tensor([0])),
        "module_info": first["module_info"],
    }
    del first
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    aug_gen = torch.Generator().manual_seed(sub_seed(seed, "augment")) if aug else None
    step = _stepper(model, task, opt, cfg, aug_gen)
    y = y_train.to(b.dev)

    def source(epoch: int) -> Any:
        return batches(
            train_split,
            lv,
            cfg.batch_size,
            b.dev,
            seed=seed,
            epoch=epoch,
            shuffle=cfg.shuffle_buffer,
        )

    def val_fn() -> float:
        sums = lambda mods, yb: _loss_sum(task, model(mods), yb)  # noqa: E731
        return stream_val_loss(sums, batches(train_split, lv, 64, b.dev), b.train_pos, val_rows, y)

    train_info = _early_stopping(
        model,
        cfg,
        lambda e: stream_train_epoch(step, source, e, b.train_pos, fit_rows, y),
        val_fn,
        b.progress,
        f"{info.name}/{view} seed {seed} (streaming)",
    )
    where = str(getattr(test_zoo, "source", ""))

    def pred_fn(batch: dict[str, Any]) -> np.ndarray:
        mapped = batch if b.test_zoo is None else match_modules(ref, batch, where)
        return predict(model, task, mapped["modules"])

    test = batches(test_zoo["test"], lv, 64, b.dev)
    return stream_predict(pred_fn, test, b.test_ids), train_info, model


def _run_one(
    b: _Bench,
    name: str,
    view: str,
    aug: bool,
    repeats: int,
    hp: dict[str, Any],
    var: _Variant = _Variant(),
) -> dict[str, Any]:
    """Every seed of one (model, view, augment) run, summarised as one results entry (seed
    mean ± std, and the bootstrap interval over test LoRAs)."""
    assert b.task is not None and b.y_test is not None
    info = model_info(name)
    label = f"{view}+gl_augment" if aug else view
    per_seed, preds, model = [], [], None
    t0 = time.perf_counter()
    for rep in range(repeats):
        seed = sub_seed(b.split_seed, "bench", f"repeat{rep}", bits=31)
        pred, train_info, model = _fit_one_seed(b, info, view, aug, seed, hp, var)
        preds.append(pred)
        per_seed.append({"seed": seed, "metrics": score(b.task, b.y_test, pred), **train_info})
    summary = _summary([p["metrics"] for p in per_seed])
    if b.n_boot:
        ci = M.bootstrap_ci(
            lambda y, p: score(b.task, y, p),  # type: ignore[arg-type]
            b.y_test.numpy(),
            preds,
            sub_seed(b.split_seed, "bootstrap", bits=31),
            n_boot=b.n_boot,
        )
        for k, lohi in ci.items():
            summary[k]["ci95"] = lohi  # type: ignore[assignment]
    what = f"{name}/{label}" + (f" ({var.control})" if var.control else "")
    what += f" on {len(_fit_rows(b, var.fraction))} fit rows" if var.fraction < 1 else ""
    logger.info("bench %s: %s", what, _short(summary, PRIMARY[b.task.kind]))
    return {
        "model": name,
        "view": label,
        "control": var.control,
        "n_fit": len(_fit_rows(b, var.fraction)),
        "invariance": info.symmetry[view],
        "hparams": hp if model is None else _hparams(model, hp),
        "train": {**asdict(b.cfg), "gl_augment": aug} if info.reads_weights else {},
        "seeds": [p["seed"] for p in per_seed],
        "per_seed": per_seed,
        "summary": summary,
        "time_s": round(time.perf_counter() - t0, 2),
        "predictions": _predictions(b.test_ids, b.y_test, preds[0] if preds else None, b.task),
    }


def _results(
    b: _Bench, target: str | Sequence[str], repeats: int, runs: list[dict[str, Any]], t0: float
) -> dict[str, Any]:
    import lora_zoo

    assert b.task is not None and b.fit_idx is not None and b.val_idx is not None
    assert b.y_test is not None
    return {
        "format": FORMAT,
        "zoo": b.where,
        "target": target if isinstance(target, str) else list(target),
        "columns": b.columns,
        "task": b.task.kind,
        "classes": b.task.classes,
        "primary_metric": PRIMARY[b.task.kind],
        "n": {"fit": len(b.fit_idx), "valid": len(b.val_idx), "test": len(b.y_test)},
        "validation": b.carve["how"],
        "device": str(b.dev),
        "repeats": repeats,
        "versions": {"lora_zoo": getattr(lora_zoo, "__version__", ""), "torch": torch.__version__},
        "time_s": round(time.perf_counter() - t0, 1),
        "runs": runs,
    }


def _write_results(
    res: dict[str, Any], zoo: Any, write: bool, json_path: str | os.PathLike[str] | None
) -> None:
    """Into the zoo (``bench/results.json`` of a local zoo, when ``write``) and ``json_path``."""
    blob = (json.dumps(res, indent=1, default=_jsonable) + "\n").encode()
    if write and getattr(zoo, "is_local", False):
        dest = Path(zoo.root) / RESULTS
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, blob)
        res["written"] = str(dest)
    if json_path is not None:
        atomic_write_bytes(Path(json_path), blob)


def run_bench(
    zoo_or_path: Any,
    target: str | Sequence[str],
    *,
    models: Sequence[str] | None = None,
    views: Sequence[str] | None = None,
    repeats: int = 3,
    device: str = "cpu",
    gl_augment: bool = False,
    train: TrainConfig | None = None,
    hparams: dict[str, dict[str, Any]] | None = None,
    json_path: str | os.PathLike[str] | None = None,
    write: bool = True,
    progress: bool = True,
    split_seed: int = 0,
    preset: str | None = None,
    controls: bool = True,
    train_sizes: Sequence[float] | None = None,
    test_zoo: Any = None,
    bootstrap: int = 1000,
) -> dict[str, Any]:
    """Run the benchmark; returns the results dict (also written to ``bench/results.json`` of a
    local zoo when ``write``, and to ``json_path``).

    GL-net runs at the preset ``preset`` names (``lora_zoo.lol.presets``), or at the one the
    task calls for when None; several comma-separated names are selected among on the
    validation loss (``_select_on_validation``); ``hparams`` keys win over the preset's. ``controls``: also the
    matched-noise control (``_train_labels``). ``train_sizes``: fractions of the fit rows for
    the learning curves. ``test_zoo``: test on that zoo's test split (``lol.transfer``).
    ``bootstrap``: resamples of the test LoRAs for the 95 % intervals (0: none)."""
    cfg = train or TrainConfig()
    names = [n.strip() for n in preset.split(",")] if preset else []
    for n in names:
        get_preset(n)  # refuse a bad name before any work
    sizes = _check_sizes(train_sizes)
    b = _open_bench(zoo_or_path, target, device, cfg, progress=progress, split_seed=split_seed)
    b.n_boot = bootstrap
    if cfg.stream is None:
        b.cfg = replace(cfg, stream=_too_big(b.zoo))
    if test_zoo is not None:
        b.test_zoo = _open_other(test_zoo)
        check_targets(b.zoo, b.test_zoo, b.columns)
    runs = plan_runs(models, views, gl_augment)
    t_start = time.perf_counter()
    _prepare_task(b, runs)
    assert b.task is not None
    cands = [get_preset(n) for n in names or [preset_for_task(b.task.kind, b.columns)]]
    chosen, selection = cands[0], {}
    hps = {m: dict((hparams or {}).get(m, {})) for m, _, _ in runs}
    user_glnet = dict(hps.get("glnet", {}))
    hps["glnet"] = {**chosen.model, **user_glnet}
    out_runs = []
    for m, v, aug in runs:
        if m == "glnet" and len(cands) > 1:
            entry, chosen, selection = _select_on_validation(
                b, (m, v, aug), repeats, cands, user_glnet
            )
            hps["glnet"] = {**chosen.model, **user_glnet}
        else:
            entry = _run_one(b, m, v, aug, repeats, hps[m])
        out_runs.append(entry)
    ctl = _control_run(runs) if controls else None
    if ctl is not None:
        m, v, aug = ctl
        out_runs.append(
            _run_one(b, m, v, aug, repeats, hps[m], _Variant(control="permuted_labels"))
        )
    res = _results(b, target, repeats, out_runs, t_start)
    res["glnet_preset"] = {
        "name": chosen.name,
        "chosen_by": ("validation loss" if selection else "--preset") if preset else "task",
        "mirrors": chosen.mirrors,
        "validation_loss": selection,
    }
    if sizes:
        res["curves"] = _curves(b, runs, out_runs, sizes, repeats, hps)
    if b.test_zoo is not None:
        res["test_zoo"] = str(getattr(b.test_zoo, "source", test_zoo))
    res["time_s"] = round(time.perf_counter() - t_start, 1)
    _write_results(res, b.zoo, write, json_path)
    return res


def _select_on_validation(
    b: _Bench,
    run: tuple[str, str, bool],
    repeats: int,
    cands: Sequence[Preset],
    user_hp: dict[str, Any],
) -> tuple[dict[str, Any], Preset, dict[str, float]]:
    """``--preset a,b,...``: every candidate trained on the fit rows; the one with the lowest
    best validation loss (mean over seeds) is kept. Only validation losses are compared and
    recorded: the other candidates' test scores are dropped unseen, so the choice never looks
    at the test split."""
    m, v, aug = run
    val: dict[str, float] = {}
    best: tuple[dict[str, Any], Preset] | None = None
    for p in cands:
        entry = _run_one(b, m, v, aug, repeats, {**p.model, **user_hp})
        val[p.name] = float(np.mean([s["best_val_loss"] for s in entry["per_seed"]]))
        if best is None or val[p.name] < val[best[1].name]:
            best = (entry, p)
    assert best is not None
    return best[0], best[1], val


def _too_big(zoo: Any) -> bool:
    """Whether the train split's stored bytes exceed ``STREAM_ABOVE`` of physical memory (the
    in-memory path would hold at least that much once decoded)."""
    try:
        nbytes = int(zoo.manifest["splits"]["train"]["num_bytes"])
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (KeyError, TypeError, ValueError, OSError, AttributeError):
        return False
    big = nbytes > STREAM_ABOVE * phys
    if big:
        logger.info("train split is %.1f GB: streaming the bench", nbytes / 1e9)
    return big


def _check_sizes(sizes: Sequence[float] | None) -> list[float]:
    """The learning-curve fractions, sorted, each in (0, 1]; 1 is always a point."""
    if not sizes:
        return []
    bad = [f for f in sizes if not 0 < f <= 1]
    if bad:
        raise SelectionError(
            f"--train-sizes are fractions of the fit rows in (0, 1], got {bad}", key="train_sizes"
        )
    return sorted({float(f) for f in sizes} | {1.0})


def _open_other(zoo_or_path: Any) -> Any:
    from lora_zoo.load.source import load_zoo

    if isinstance(zoo_or_path, (str, os.PathLike)):
        return load_zoo(str(zoo_or_path))
    return zoo_or_path


def _control_run(runs: Sequence[tuple[str, str, bool]]) -> tuple[str, str, bool] | None:
    """The run the matched-noise control repeats: GL-net's when it runs (the bench's main
    invariant model), else the first weight-reading run; None when only the baseline runs."""
    weighted = [r for r in runs if model_info(r[0]).reads_weights and not r[2]]
    return next((r for r in weighted if r[0] == "glnet"), weighted[0] if weighted else None)


def _curves(
    b: _Bench,
    runs: Sequence[tuple[str, str, bool]],
    full: Sequence[dict[str, Any]],
    sizes: Sequence[float],
    repeats: int,
    hps: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Primary test metric against the number of training LoRAs, per run: "how many LoRAs
    does this task need". The full-size point is the main run's; validation and test rows stay
    the same at every size, so only the training set changes along a curve."""
    assert b.task is not None
    prim = PRIMARY[b.task.kind]
    out = []
    for (m, v, aug), main in zip(runs, full):
        points = []
        for f in sizes:
            r = main if f >= 1.0 else _run_one(b, m, v, aug, repeats, hps[m], _Variant(f))
            points.append({"fraction": f, "n_fit": r["n_fit"], **r["summary"][prim]})
        out.append({"model": m, "view": main["view"], "metric": prim, "points": points})
    return out


def _hparams(model: LolModel, given: dict[str, Any]) -> dict[str, Any]:
    """The constructor hyperparameters in effect (defaults + overrides)."""
    import inspect

    sig = inspect.signature(type(model).__init__)
    hp = {
        k: p.default
        for k, p in sig.parameters.items()
        if p.kind == p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }
    if type(model).__name__ == "OAlignMLP":
        hp = {
            k: p.default
            for k, p in inspect.signature(type(model).__mro__[1].__init__).parameters.items()
            if p.kind == p.KEYWORD_ONLY
        }
        hp["view"] = "aligned"
    hp.update(given)
    hp["parameters"] = sum(p.numel() for p in model.parameters())
    return hp


def _predictions(
    ids: Sequence[str], y: torch.Tensor, pred: np.ndarray | None, task: Task, cap: int = 2000
) -> dict[str, Any]:
    if pred is None:
        return {}
    k = min(cap, len(ids))
    return {
        "lora_id": list(ids[:k]),
        "y_true": y[:k].tolist(),
        "y_pred": np.asarray(pred)[:k].round(6).tolist(),
    }


def _summary(ms: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for k, v in ms[0].items():
        if isinstance(v, float):
            xs = np.array([m[k] for m in ms], dtype=float)
            out[k] = {
                "mean": float(np.nanmean(xs)) if not np.isnan(xs).all() else math.nan,
                "std": float(np.nanstd(xs)) if not np.isnan(xs).all() else math.nan,
            }
    per = {}
    for lab in ms[0].get("per_label", {}):
        per[lab] = {}
        for k in ms[0]["per_label"][lab]:
            xs = np.array([m["per_label"][lab][k] for m in ms], dtype=float)
            per[lab][k] = float(np.nanmean(xs)) if not np.isnan(xs).all() else math.nan
    out["per_label"] = per  # type: ignore[assignment]
    return out


def _short(summary: dict[str, Any], metric: str) -> str:
    s = summary.get(metric, {})
    return f"{metric} {s.get('mean', math.nan):.3f} ± {s.get('std', math.nan):.3f}"


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def format_table(res: dict[str, Any]) -> str:
    """The results table: model, view, symmetry, metrics mean ± seed std, the primary metric's
    95 % bootstrap interval over test LoRAs, and its difference to the baseline; then the
    learning curves when measured."""
    kind = res["task"]
    metrics = {
        "binary": ["accuracy", "auroc"],
        "multiclass": ["accuracy", "auroc"],
        "regression": ["r2", "kendall_tau", "spearman"],
    }[kind]
    prim = res["primary_metric"]
    base = next((r for r in res["runs"] if r["model"] == "baseline"), None)
    b = base["summary"][prim]["mean"] if base else math.nan
    head = (
        f"{'model':<32}{'view':<22}{'symmetry':<10}"
        + "".join(f"{m:>18}" for m in metrics)
        + f"{prim + ' 95% CI':>20}{'vs baseline':>14}"
    )
    test_on = f"; tested on {res['test_zoo']}" if res.get("test_zoo") else ""
    lines = [
        f"target {res['target']} ({kind}, {len(res['columns'])} label(s)); fit/valid/test "
        f"{res['n']['fit']}/{res['n']['valid']}/{res['n']['test']} LoRAs; {res['repeats']} seeds; "
        f"validation carved {res['validation']['kind']}{test_on}",
        head,
        "-" * len(head),
    ]
    for r in res["runs"]:
        cells = "".join(
            f"{r['summary'][m]['mean']:>11.3f} ±{r['summary'][m]['std']:>5.3f}" for m in metrics
        )
        # without a baseline run (``--models mlp``) there is nothing to subtract: "-", not nan
        d = f"{r['summary'][prim]['mean'] - b:>+14.3f}" if base else f"{'-':>14}"
        lines.append(
            f"{run_label(r):<32}{r['view']:<22}{r['invariance']:<10}{cells}"
            f"{ci_text(r['summary'], prim):>20}{d}"
        )
    lines += _curve_lines(res)
    return "\n".join(lines)


def _curve_lines(res: dict[str, Any]) -> list[str]:
    """Learning curves as text: one line per run, primary metric at each training size."""
    if not res.get("curves"):
        return []
    out = [f"\nlearning curves ({res['primary_metric']} vs training LoRAs):"]
    for c in res["curves"]:
        pts = "  ".join(f"{p['n_fit']}: {p['mean']:.3f}" for p in c["points"])
        out.append(f"  {c['model'] + '/' + c['view']:<30}{pts}")
    return out


__all__ = [
    "RESULTS",
    "TrainConfig",
    "baseline_predict",
    "default_runs",
    "format_table",
    "plan_runs",
    "run_bench",
]
