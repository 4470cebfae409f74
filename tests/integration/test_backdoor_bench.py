"""``lora-zoo bench --target poisoned`` with the spectral baseline, and ``--hold-out`` folds
(train on the other trigger kinds, test on the held-out one), on a small zoo with a planted
spectral signal: one rank direction of every module of a poisoned LoRA is 4x longer."""

from __future__ import annotations

import json

import pytest
import torch

from lora_zoo.cli import main
from lora_zoo.errors import SelectionError
from lora_zoo.lol.bench import run_bench
from lora_zoo.lol.holdout import run_hold_out
from tests.fixtures.zoos import make_record

KINDS = ("rare_token", "sentence", "prefix")
N = 48


@pytest.fixture(scope="module")
def planted_zoo(tmp_path_factory):
    from lora_zoo.zoo.writer import ZooWriter

    root = tmp_path_factory.mktemp("bdbench") / "zoo"
    w = ZooWriter(root, shard_max_rows=100)
    for i in range(N):
        rec = make_record(i, 4, seed=7)
        poisoned = (i // 3) % 2 == 1  # balanced within every trigger kind
        if poisoned:
            for m in rec.modules.values():
                m.B[:, 0] *= 4.0  # a larger top direction in every module
        w.add(
            rec,
            lora_id=rec.lora_id,
            split="test" if i % 4 == 0 else "train",
            base_model="tiny-llama",
            metadata={"trigger": KINDS[i % 3]},
            labels={"poisoned": poisoned, "trigger_kind": KINDS[i % 3], "asr": float(poisoned)},
        )
    w.set_info(builder="tests.integration.test_backdoor_bench", seed=0, n=N)
    w.close()
    return root


def test_spectral_baseline_detects_the_planted_signal(planted_zoo):
    res = run_bench(
        planted_zoo, "poisoned", models=["baseline", "spectral"], repeats=1, progress=False
    )
    # the matched-noise control (same model, permuted labels) is its own row: leave it out
    auroc = {r["model"]: r["summary"]["auroc"]["mean"] for r in res["runs"] if not r.get("control")}
    assert auroc["baseline"] == 0.5
    assert auroc["spectral"] > 0.9  # 12 test LoRAs; every module carries the signal


def test_hold_out_folds_test_exactly_the_held_out_kind(planted_zoo):
    res = run_hold_out(
        planted_zoo,
        "poisoned",
        "trigger_kind",
        models=["baseline", "spectral"],
        repeats=1,
        progress=False,
    )
    assert res["values"] == sorted(KINDS)
    kind_of = {f"lora-{i:05d}": KINDS[i % 3] for i in range(N)}
    for fold in res["folds"]:
        v = fold["held_out"]["value"]
        test_ids = fold["runs"][1]["predictions"]["lora_id"]
        assert sorted(test_ids) == sorted(k for k, x in kind_of.items() if x == v)
        # train on the other two kinds (both splits pooled), nothing of the held-out kind
        assert fold["n"]["fit"] + fold["n"]["valid"] == N - len(test_ids)
        assert fold["runs"][1]["summary"]["auroc"]["mean"] > 0.9
    assert res["summary"]["spectral/svals"]["min"] > 0.9
    ctl = [
        k for k in res["summary"] if "permuted labels" in k
    ]  # a control, if run, has its own row
    assert all(res["summary"][k]["mean"] < 0.9 for k in ctl)
    assert json.loads((planted_zoo / "bench" / "holdout-trigger_kind.json").read_text())["folds"]
    with pytest.raises(SelectionError):
        run_hold_out(planted_zoo, "trigger_kind", "trigger_kind", progress=False)
    with pytest.raises(SelectionError):
        run_hold_out(planted_zoo, "poisoned", "no_such_column", progress=False)


def test_cli_bench_hold_out_prints_every_fold(planted_zoo, capsys):
    rc = main(
        [
            "bench",
            str(planted_zoo),
            "--target",
            "poisoned",
            "--models",
            "spectral",
            "--repeats",
            "1",
            "--hold-out",
            "trigger_kind",
            "--no-progress",
            "--no-write",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    for k in KINDS:
        assert f"held out trigger_kind = {k}" in out
    assert "spectral/svals" in out


def test_poisoned_rows_really_differ_in_top_singular_value(planted_zoo):
    """The fixture plants what it says (else the detection tests above prove nothing)."""
    from lora_zoo import load_zoo

    sp = load_zoo(planted_zoo)["train"]
    tops = {True: [], False: []}
    for i in range(len(sp)):
        rec, row = sp.record(i), sp.row(i)
        tops[row["poisoned"]].append(
            sum(float(torch.linalg.matrix_norm(m.B @ m.A, ord=2)) for m in rec.modules.values())
        )
    assert min(tops[True]) > max(tops[False])
