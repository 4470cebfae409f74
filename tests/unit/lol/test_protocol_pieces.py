"""The bench's protocol pieces without a zoo: GL-net presets per task, the bootstrap interval,
the matched-noise control's labels, nested learning-curve subsets, and module matching for
``--test-zoo``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lora_zoo.errors import SelectionError
from lora_zoo.lol import metrics as M
from lora_zoo.lol.bench import _Bench, _check_sizes, _fit_rows, _train_labels, _Variant
from lora_zoo.lol.presets import PRESETS, get_preset, preset_for_task
from lora_zoo.lol.transfer import match_modules


def test_presets_per_task_and_the_papers_membership_size():
    assert preset_for_task("binary", ["in_group.copy", "in_group.sort"]) == "membership"
    assert preset_for_task("binary", ["is_even"]) == "attributes"
    assert preset_for_task("multiclass", ["style"]) == "attributes"
    assert preset_for_task("regression", ["clip_score"]) == "clip_score"
    assert preset_for_task("regression", ["acc"]) == "llm_accuracy"
    m = PRESETS["membership"].model
    assert (m["width"], m["layers"], m["depth"]) == (64, 1, 1)  # d = 64, one GL layer, 1-layer head
    assert all(p.mirrors for p in PRESETS.values())
    with pytest.raises(SelectionError, match="available") as ei:
        get_preset("huge")
    assert ei.value.key == "preset"


def test_bootstrap_interval_matches_the_binomial_width():
    # a constant-score classifier on n balanced labels: accuracy is a proportion p = 1/2, whose
    # bootstrap 95 % interval is ~ p ± 1.96 sqrt(p (1-p) / n) = ± 0.049 at n = 400; 1000
    # resamples put about ±10 % Monte-Carlo error on the 2.5 / 97.5 % quantiles, so 25 % slack
    n = 400
    y = np.array([[float(i % 2)] for i in range(n)])
    pred = np.full((n, 1), 0.4)  # always "0": right on the half that is 0
    ci = M.bootstrap_ci(lambda a, b: M.classification_metrics(a, b, ["x"]), y, [pred], seed=3)
    half = (ci["accuracy"][1] - ci["accuracy"][0]) / 2
    want = 1.96 * math.sqrt(0.25 / n)
    assert abs(half - want) < 0.25 * want, (half, want)
    assert ci["accuracy"][0] < 0.5 < ci["accuracy"][1]
    # perfect scores: every resample with both classes has AUROC 1, so the interval is a point
    perfect = M.bootstrap_ci(lambda a, b: M.classification_metrics(a, b, ["x"]), y, [y], seed=3)
    assert perfect["auroc"] == [1.0, 1.0]


def _bench(n: int = 40) -> _Bench:
    b = _Bench(None, "mem", ["y"], torch.device("cpu"), None, False, 0)  # type: ignore[arg-type]
    b.fit_idx = torch.arange(0, n, 2)
    b.y_train = torch.arange(n, dtype=torch.float32)[:, None]
    return b


def test_permuted_control_keeps_the_labels_and_breaks_the_pairing():
    b = _bench()
    y = _train_labels(b, _Variant(control="permuted_labels"), seed=5)
    assert sorted(y[:, 0].tolist()) == b.y_train[:, 0].tolist()  # same labels, same marginal
    assert (y != b.y_train).float().mean() > 0.5  # most rows now carry another row's label
    assert torch.equal(y, _train_labels(b, _Variant(control="permuted_labels"), seed=5))
    assert not torch.equal(y, _train_labels(b, _Variant(control="permuted_labels"), seed=6))
    assert _train_labels(b, _Variant(), seed=5) is b.y_train


def test_learning_curve_subsets_are_nested_fit_rows():
    b = _bench(200)
    sizes = _check_sizes([0.5, 0.1, 0.25])
    assert sizes == [0.1, 0.25, 0.5, 1.0]
    rows = [set(_fit_rows(b, f).tolist()) for f in sizes]
    assert [len(r) for r in rows] == [10, 25, 50, 100]
    assert all(a < c for a, c in zip(rows, rows[1:]))  # nested, strictly growing
    assert rows[-1] == set(b.fit_idx.tolist())
    with pytest.raises(SelectionError, match="fractions"):
        _check_sizes([0.0, 1.5])


def _batch(names: list[str], shape=(8, 6), rank=2) -> dict:
    from lora_zoo.load.collate import module_info

    return {
        "modules": {
            n: {"U": torch.zeros(3, shape[0], rank), "V": torch.zeros(3, shape[1], rank)}
            for n in names
        },
        "module_info": {n: module_info(n, *shape) for n in names},
        "lora_id": ["a", "b", "c"],
    }


def test_match_modules_by_metadata_and_refusals():
    train = _batch(["model.layers.0.q_proj", "model.layers.1.q_proj"])
    other = _batch(["base.layers.0.q_proj", "base.layers.1.q_proj"])
    out = match_modules(train, other, "other")
    assert list(out["modules"]) == list(train["modules"])
    assert out["modules"]["model.layers.1.q_proj"] is other["modules"]["base.layers.1.q_proj"]
    with pytest.raises(SelectionError, match="ΔW") as ei:
        match_modules(train, _batch(list(train["modules"]), shape=(8, 7)), "other")
    assert ei.value.key == "model.layers.0.q_proj" and ei.value.file == "other"
    with pytest.raises(SelectionError, match="rank 4"):
        match_modules(train, _batch(list(train["modules"]), rank=4), "other")
    with pytest.raises(SelectionError, match="0 counterparts"):
        match_modules(train, _batch(["model.layers.0.q_proj", "model.layers.1.v_proj"]), "o")
    extra = _batch([*train["modules"], "model.layers.2.q_proj"])
    with pytest.raises(SelectionError, match="never does"):
        match_modules(train, extra, "other")


def _res(models: list[str]) -> dict:
    s = {"accuracy": {"mean": 0.75, "std": 0.0}, "auroc": {"mean": 0.8, "std": 0.01}}
    runs = [{"model": m, "view": "svals", "invariance": "GL(r)", "summary": s} for m in models]
    if "baseline" in models:
        runs[models.index("baseline")]["summary"] = {
            "accuracy": {"mean": 0.5, "std": 0.0},
            "auroc": {"mean": 0.5, "std": 0.0},
        }
    return {
        "task": "binary",
        "primary_metric": "auroc",
        "runs": runs,
        "target": "poisoned",
        "columns": ["poisoned"],
        "n": {"fit": 10, "valid": 2, "test": 4},
        "repeats": 1,
        "validation": {"kind": "random"},
    }


def test_results_table_says_dash_not_nan_without_a_baseline_run():
    from lora_zoo.lol.bench import format_table

    with_base = format_table(_res(["baseline", "mlp"])).splitlines()
    assert with_base[-1].rstrip().endswith("+0.300")  # 0.8 - 0.5, the primary metric (AUROC)
    alone = format_table(_res(["mlp"]))
    assert "nan" not in alone
    assert alone.splitlines()[-1].rstrip().endswith("-")
