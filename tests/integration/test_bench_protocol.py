"""``lora-zoo bench`` as a protocol on a small real zoo: the GL-net preset the task calls for,
the matched-noise control and bootstrap intervals in every table, learning curves, and
``--test-zoo`` transfer onto a twin zoo (same modules, other weights)."""

from __future__ import annotations

import json

import pytest

from lora_zoo.cli import main
from lora_zoo.errors import SelectionError
from lora_zoo.lol.bench import TrainConfig, run_bench
from lora_zoo.lol.presets import PRESETS


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    from tests.fixtures.zoos import make_zoo

    root = tmp_path_factory.mktemp("twins")
    split = {"train": 0.75, "test": 0.25}
    return make_zoo(root / "a", n=24, splits=split), make_zoo(
        root / "b", n=16, splits=split, seed=1
    )


def test_bench_protocol_preset_control_ci_curves_transfer(twins, capsys):
    a, b = twins
    args = [
        "bench", str(a), "--target", "is_even", "--models", "baseline", "glnet",
        "--repeats", "2", "--epochs", "4", "--no-progress", "--train-sizes", "0.5,1",
        "--test-zoo", str(b), "--bootstrap", "200",
    ]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "glnet (permuted labels)" in text and "auroc 95% CI" in text
    assert "learning curves" in text and f"tested on {b}" in text
    res = json.loads((a / "bench" / "results.json").read_text())
    assert (
        res["glnet_preset"]["name"] == "attributes" and res["glnet_preset"]["chosen_by"] == "task"
    )
    assert res["n"]["test"] == 4 and res["test_zoo"] == str(b)  # the twin's test split
    glnet, control = (r for r in res["runs"] if r["model"] == "glnet")
    assert glnet["hparams"]["width"] == 64 and glnet["hparams"]["layers"] == 1
    assert control["control"] == "permuted_labels" and not glnet["control"]
    for r in res["runs"]:
        lo, hi = r["summary"]["accuracy"]["ci95"]
        assert 0.0 <= lo <= hi <= 1.0
    curve = next(c for c in res["curves"] if c["model"] == "glnet")
    assert [p["n_fit"] for p in curve["points"]] == [
        round(0.5 * res["n"]["fit"]),
        res["n"]["fit"],
    ]
    assert curve["points"][-1]["mean"] == glnet["summary"]["auroc"]["mean"]


def test_bench_preset_override_and_refusals(twins, tmp_path):
    a, _ = twins
    kw = dict(models=["glnet"], repeats=1, progress=False, write=False, controls=False)
    res = run_bench(a, "eval_loss", preset="small", hparams={"glnet": {"width": 4}}, **kw)
    hp = res["runs"][0]["hparams"]
    assert res["glnet_preset"]["name"] == "small" and (hp["width"], hp["layers"]) == (4, 2)
    assert len(res["runs"]) == 1 and "curves" not in res
    with pytest.raises(SelectionError, match="preset"):
        run_bench(a, "eval_loss", preset="small,huge", **kw)
    # several presets: chosen on the validation loss alone, every candidate's loss recorded
    sel = run_bench(
        a, "eval_loss", preset="small,clip_score", train=TrainConfig(max_epochs=3), **kw
    )
    p = sel["glnet_preset"]
    assert p["chosen_by"] == "validation loss" and set(p["validation_loss"]) == {
        "small",
        "clip_score",
    }
    assert p["name"] == min(p["validation_loss"], key=p["validation_loss"].get)
    run = sel["runs"][0]
    assert run["hparams"]["width"] == PRESETS[p["name"]].model["width"]
    got = sum(s["best_val_loss"] for s in run["per_seed"]) / len(run["per_seed"])
    assert got == pytest.approx(p["validation_loss"][p["name"]])
    from tests.fixtures.zoos import make_zoo

    lone = make_zoo(tmp_path / "lone", n=6)  # one split only: nothing to test on
    with pytest.raises(SelectionError, match="test split") as ei:
        run_bench(a, "eval_loss", test_zoo=lone, **kw)
    assert ei.value.key == "split"


def test_streaming_pieces_equal_the_in_memory_ones(twins):
    """Validation loss summed over streamed minibatches == the loss over all rows at once, and
    streamed predictions == in-memory ones, row for row (float32 matmuls over other batch
    shapes: agreement to ~1e-6 relative, well inside 1e-4)."""
    import torch

    from lora_zoo import load_zoo
    from lora_zoo.lol import bench as B
    from lora_zoo.lol.models import GLNet, specs_from_batch
    from lora_zoo.lol.stream import batches, stream_predict, stream_val_loss

    zoo = load_zoo(twins[0])
    dev = torch.device("cpu")
    full = B.load_view(zoo["train"], "factors", ["eval_loss"], dev)
    task = B.Task("regression", ["eval_loss"], mean=[0.0], std=[1.0])
    y = B.targets_tensor(task, full)
    pos = {lid: i for i, lid in enumerate(full["lora_id"])}
    torch.manual_seed(0)
    model = GLNet(specs_from_batch(full), 1, width=4)
    model.calibrate(full["modules"])
    model.eval()
    valid = {1, 4, 5, 9, 16}
    idx = torch.tensor(sorted(valid))
    with torch.no_grad():
        want = float(B._loss(task, model(B.take(full["modules"], idx)), y[idx]))
        got = stream_val_loss(
            lambda m, yb: B._loss_sum(task, model(m), yb), batches(zoo["train"], "factors", 4, dev),
            pos, valid, y,
        )  # fmt: skip
    assert got == pytest.approx(want, rel=1e-4)
    ids = list(full["lora_id"])[::-1]  # any order: rows are found by id
    with torch.no_grad():
        streamed = stream_predict(
            lambda batch: B.predict(model, task, batch["modules"]),
            batches(zoo["train"], "factors", 5, dev, seed=1, shuffle=8),
            ids,
        )
    direct = B.predict(model, task, full["modules"])[[pos[i] for i in ids]]
    assert streamed == pytest.approx(direct, rel=1e-4, abs=1e-6)


def test_streaming_bench_runs_the_whole_protocol(twins):
    a, b = twins
    res = run_bench(
        a, "is_even", models=["baseline", "glnet"], repeats=1, progress=False, write=False,
        train=TrainConfig(max_epochs=3, stream=True, batch_size=4), train_sizes=[0.5],
        test_zoo=b, bootstrap=50,
    )  # fmt: skip
    glnet, control = (r for r in res["runs"] if r["model"] == "glnet")
    assert glnet["train"]["stream"] is True and control["control"] == "permuted_labels"
    assert len(glnet["predictions"]["y_pred"]) == res["n"]["test"] == 4
    assert all(0.0 <= p <= 1.0 for row in glnet["predictions"]["y_pred"] for p in row)
    assert 1 <= glnet["per_seed"][0]["epochs"] <= 3
    assert [p["n_fit"] for p in res["curves"][1]["points"]] == [
        round(0.5 * res["n"]["fit"]),
        res["n"]["fit"],
    ]
