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
small LoRAs, e.g. the shipped quickstart zoos); a streaming trainer over ``LoraIterableDataset``
is the way beyond that.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lora_zoo._io import atomic_write_bytes
from lora_zoo.errors import SelectionError
from lora_zoo.load import symmetry
from lora_zoo.load.datasets import LoraIterableDataset, check_device
from lora_zoo.lol import metrics as M
from lora_zoo.lol.models import MODEL_VIEWS, LolModel, loader_view, make_model, specs_from_batch

logger = logging.getLogger(__name__)

RESULTS = "bench/results.json"
FORMAT = 1
# (model, view) pairs run by default: every reference model of the papers, plus the baseline
DEFAULT_RUNS: tuple[tuple[str, str], ...] = (
    ("baseline", "-"),
    ("mlp", "factors"),
    ("mlp", "dense"),
    ("mlp", "svals"),
    ("mlp", "aligned"),
    ("mlp", "canonical"),
    ("glnet", "factors"),
    ("transformer", "svals"),
)
NON_INVARIANT = {("mlp", "factors"), ("mlp", "aligned")}  # where GL augmentation means something
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
    """The whole split as one collated batch of ``view`` (labels as tensors + masks)."""
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
    from tqdm.auto import tqdm

    (xm, y), (vm, vy) = fit, valid
    dev = next(model.parameters()).device
    y, vy = y.to(dev), vy.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 7919)
    n = len(y)
    best, best_epoch, best_state = math.inf, -1, None
    bar = tqdm(range(cfg.max_epochs), desc=desc, leave=False, disable=None if progress else True)
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            mb = take(xm, idx)
            if gl_augment:
                mb = augment(mb, aug_gen, cfg.augment_log_cond)
            loss = _loss(task, model(mb), y[idx.to(dev)])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            vloss = float(_loss(task, model(vm), vy))
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


def predict(model: LolModel, task: Task, modules: dict[str, Any]) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out = model(modules).float().cpu()
    if task.kind == "binary":
        return torch.sigmoid(out).numpy()
    if task.kind == "multiclass":
        return torch.softmax(out, -1).numpy()
    return (out * torch.tensor(task.std) + torch.tensor(task.mean)).numpy()


def score(task: Task, y: torch.Tensor, pred: np.ndarray) -> dict[str, Any]:
    if task.kind == "binary":
        return M.classification_metrics(y.numpy(), pred, task.columns)
    if task.kind == "multiclass":
        return M.multiclass_metrics(y.numpy(), pred, task.classes)
    return M.regression_metrics(y.numpy(), pred, task.columns)


def baseline_predict(task: Task, y_fit: torch.Tensor, n: int) -> np.ndarray:
    """Majority class per label (probability = the fit rows' positive rate, so AUROC is 0.5) /
    the most frequent class / the fit rows' mean value."""
    if task.kind == "binary":
        rate = torch.nanmean(y_fit, 0).numpy()  # (k,)
        p = np.where(rate > 0.5, 0.5 + 1e-6, 0.5 - 1e-6)  # majority decision, constant score
        return np.broadcast_to(p, (n, len(rate))).copy()
    if task.kind == "multiclass":
        counts = np.bincount(y_fit[y_fit >= 0].numpy(), minlength=len(task.classes))
        p = np.zeros((n, len(task.classes)))
        p[:, int(counts.argmax())] = 1.0
        return p
    return np.broadcast_to(np.array(task.mean), (n, len(task.mean))).copy()


# ---- the harness -------------------------------------------------------------------------------
def plan_runs(
    models: Sequence[str] | None, views: Sequence[str] | None, gl_augment: bool
) -> list[tuple[str, str, bool]]:
    """(model, view, augment) triples: the defaults filtered by ``models`` / ``views``, plus a
    GL-augmented copy of each non-invariant run when asked."""
    known = {"baseline", *MODEL_VIEWS}
    for m in models or ():
        if m not in known:
            raise SelectionError(f"unknown model {m!r}; available: {sorted(known)}", key="models")
    allv = {v for vs in MODEL_VIEWS.values() for v in vs}
    for v in views or ():
        if v not in allv:
            raise SelectionError(f"unknown view {v!r}; available: {sorted(allv)}", key="views")
    runs = []
    for m, v in DEFAULT_RUNS:
        if models and m not in models:
            continue
        if views and m != "baseline" and v not in views:
            continue
        runs.append((m, v, False))
        if gl_augment and (m, v) in NON_INVARIANT:
            runs.append((m, v, True))
    if models and not runs:
        raise SelectionError("no (model, view) pair left after --models/--views", key="views")
    return runs


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
) -> dict[str, Any]:
    """Run the benchmark; returns the results dict (also written to ``bench/results.json`` of a
    local zoo when ``write``, and to ``json_path``)."""
    from lora_zoo.load.source import load_zoo

    zoo = load_zoo(str(zoo_or_path)) if isinstance(zoo_or_path, (str, os.PathLike)) else zoo_or_path
    where = str(getattr(zoo, "source", zoo_or_path))
    for s in ("train", "test"):
        if s not in zoo.splits:
            raise SelectionError(
                f"bench needs train and test splits; has {zoo.splits}", file=where, key="split"
            )
    dev = check_device(device, where)
    cfg = train or TrainConfig()
    columns = resolve_targets(zoo, target)
    runs = plan_runs(models, views, gl_augment)
    t_start = time.perf_counter()

    cache: dict[str, dict[str, dict[str, Any]]] = {}

    def data(view: str) -> dict[str, dict[str, Any]]:
        if view not in cache:
            cache[view] = {s: load_view(zoo[s], view, columns, dev) for s in ("train", "test")}
        return cache[view]

    first = data("svals" if any(v == "svals" for _, v, _ in runs) else "factors")
    tr = first["train"]
    ids = list(tr["lora_id"])
    probe_labels = {
        c: (tr["labels"][c].float() if not isinstance(tr["labels"][c], list) else None)
        for c in columns
    }
    task = infer_task(zoo, columns, {c: v for c, v in probe_labels.items() if v is not None})
    if task.kind == "multiclass":
        vals = tr["labels"][columns[0]]
        vals = vals if isinstance(vals, list) else vals.tolist()
        task.classes = sorted({str(v) for v in vals if v is not None})
    carve = validation_carve(zoo, ids, cfg.val_fraction, split_seed)
    pos = {lid: i for i, lid in enumerate(ids)}
    fit_idx = torch.tensor(sorted(pos[i] for i in carve["fit"]))
    val_idx = torch.tensor(sorted(pos[i] for i in carve["valid"]))
    y_train, y_test = targets_tensor(task, tr), targets_tensor(task, first["test"])
    if task.kind == "regression":
        yf = y_train[fit_idx]
        task.mean = torch.nanmean(yf, 0).tolist()
        sd = [float(np.nanstd(yf[:, j].numpy())) for j in range(yf.shape[1])]
        task.std = [s if s > 0 else 1.0 for s in sd]

    out_runs = []
    for model_name, view, aug in runs:
        label = f"{view}+gl_augment" if aug else view
        hp = dict((hparams or {}).get(model_name, {}))
        per_seed = []
        t0 = time.perf_counter()
        preds0 = None
        for rep in range(repeats):
            seed = 1000 * split_seed + rep
            if model_name == "baseline":
                pred = baseline_predict(task, y_train[fit_idx], len(y_test))
                per_seed.append({"seed": seed, "metrics": score(task, y_test, pred)})
                preds0 = pred if preds0 is None else preds0
                continue
            d = data(loader_view(model_name, view))
            xm_all = d["train"]["modules"]
            torch.manual_seed(seed)
            specs = specs_from_batch(d["train"])
            model = make_model(model_name, view, specs, task.out_dim, **hp).to(dev)
            fit_m = take(xm_all, fit_idx)
            model.calibrate(fit_m)
            info = train_model(
                model,
                task,
                (fit_m, y_train[fit_idx]),
                (take(xm_all, val_idx), y_train[val_idx]),
                cfg,
                seed,
                gl_augment=aug,
                progress=progress,
                desc=f"{model_name}/{label} seed {seed}",
            )
            pred = predict(model, task, d["test"]["modules"])
            preds0 = pred if preds0 is None else preds0
            per_seed.append({"seed": seed, "metrics": score(task, y_test, pred), **info})
            invariance = model.invariance
        summary = _summary([p["metrics"] for p in per_seed])
        entry = {
            "model": model_name,
            "view": label,
            "invariance": "-" if model_name == "baseline" else invariance,
            "hparams": hp if model_name == "baseline" else _hparams(model, hp),
            "train": {} if model_name == "baseline" else {**asdict(cfg), "gl_augment": aug},
            "seeds": [p["seed"] for p in per_seed],
            "per_seed": per_seed,
            "summary": summary,
            "time_s": round(time.perf_counter() - t0, 2),
            "predictions": _predictions(first["test"]["lora_id"], y_test, preds0, task),
        }
        logger.info("bench %s/%s: %s", model_name, label, _short(summary, PRIMARY[task.kind]))
        out_runs.append(entry)

    import lora_zoo

    res = {
        "format": FORMAT,
        "zoo": where,
        "target": target if isinstance(target, str) else list(target),
        "columns": columns,
        "task": task.kind,
        "classes": task.classes,
        "primary_metric": PRIMARY[task.kind],
        "n": {"fit": len(fit_idx), "valid": len(val_idx), "test": len(y_test)},
        "validation": carve["how"],
        "device": str(dev),
        "repeats": repeats,
        "versions": {"lora_zoo": getattr(lora_zoo, "__version__", ""), "torch": torch.__version__},
        "time_s": round(time.perf_counter() - t_start, 1),
        "runs": out_runs,
    }
    blob = (json.dumps(res, indent=1, default=_jsonable) + "\n").encode()
    if write and getattr(zoo, "is_local", False):
        dest = Path(zoo.root) / RESULTS
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, blob)
        res["written"] = str(dest)
    if json_path is not None:
        atomic_write_bytes(Path(json_path), blob)
    return res


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
    """The results table: model, view, symmetry, metrics mean ± std, and the primary metric's
    difference to the baseline."""
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
        f"{'model':<12}{'view':<22}{'symmetry':<10}"
        + "".join(f"{m:>18}" for m in metrics)
        + f"{'vs baseline':>14}"
    )
    lines = [
        f"target {res['target']} ({kind}, {len(res['columns'])} label(s)); fit/valid/test "
        f"{res['n']['fit']}/{res['n']['valid']}/{res['n']['test']} LoRAs; {res['repeats']} seeds; "
        f"validation carved {res['validation']['kind']}",
        head,
        "-" * len(head),
    ]
    for r in res["runs"]:
        cells = "".join(
            f"{r['summary'][m]['mean']:>11.3f} ±{r['summary'][m]['std']:>5.3f}" for m in metrics
        )
        d = r["summary"][prim]["mean"] - b
        lines.append(f"{r['model']:<12}{r['view']:<22}{r['invariance']:<10}{cells}{d:>+14.3f}")
    return "\n".join(lines)


__all__ = ["DEFAULT_RUNS", "RESULTS", "TrainConfig", "format_table", "plan_runs", "run_bench"]
