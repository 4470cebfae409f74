"""The LoL harness end to end: a collection ingested from PEFT adapters with different target
modules batches (union of modules, ``present`` masks, exact zeros) and trains a GL-net; and
``lora-zoo bench`` trains, tests, prints and stores its table on a small real zoo."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from lora_zoo.cli import main
from lora_zoo.errors import DeviceUnavailableError, SelectionError
from lora_zoo.load.collate import collate_loras
from lora_zoo.load.datasets import LoraDataset, LoraIterableDataset
from lora_zoo.lol.bench import TrainConfig, run_bench
from lora_zoo.lol.models import GLNet, specs_from_batch

TARGET_SETS = (["q_proj", "v_proj"], ["k_proj", "v_proj", "o_proj"], ["q_proj"])


@pytest.fixture(scope="module")
def mixed_zoo(tmp_path_factory):
    """Nine PEFT adapters on one tiny Llama, three different target-module sets, ingested."""
    from peft import LoraConfig, get_peft_model

    from lora_zoo.contrib.ingest import ingest
    from tests.fixtures.adapters import randomize_lora
    from tests.fixtures.models import tiny_llama

    root = tmp_path_factory.mktemp("mixed")
    base = tiny_llama(0)
    for i in range(9):
        cfg = LoraConfig(r=2 + i % 2, lora_alpha=4, target_modules=TARGET_SETS[i % 3])
        pm = get_peft_model(tiny_llama(0), cfg)
        randomize_lora(pm, 50 + i)
        pm.save_pretrained(str(root / "adapters" / f"a{i}"))
    del base
    report = ingest([str(root / "adapters")], root / "zoo")
    assert report["counts"]["accepted"] == 9
    return root / "zoo"


def test_mixed_modules_batch_and_train_a_glnet(mixed_zoo):
    from lora_zoo import load_zoo

    split = load_zoo(mixed_zoo)["train"]
    dl = DataLoader(LoraDataset(split, "factors"), batch_size=9, collate_fn=collate_loras)
    batch = next(iter(dl))
    names = list(batch["modules"])
    types = {batch["module_info"][n]["type"] for n in names}
    assert types == {"q_proj", "k_proj", "v_proj", "o_proj"}
    from lora_zoo._io import natural_key

    assert names == sorted(names, key=natural_key)
    for n in names:
        mod, info = batch["modules"][n], batch["module_info"][n]
        assert mod["present"].shape == (9,) and mod["present"].any()
        absent = ~mod["present"]
        assert torch.all(mod["U"][absent] == 0) and torch.all(mod["V"][absent] == 0)
        assert not mod["mask"][absent].any()
        assert (
            mod["U"].shape[1] == info["out_features"] and mod["V"].shape[1] == info["in_features"]
        )
        assert info["layer"] in (0, 1)
    rec_names = {i: set(split.record(i).modules) for i in range(9)}
    for n in names:  # present == the LoRA adapts the module
        assert batch["modules"][n]["present"].tolist() == [n in rec_names[i] for i in range(9)]
    assert len(set(batch["base_model"])) == 1
    # the streaming fast path builds the same union
    streamed = next(iter(LoraIterableDataset(split, "factors", batch_size=9)))
    assert list(streamed["modules"]) == names
    for n in names:
        assert torch.equal(streamed["modules"][n]["present"], batch["modules"][n]["present"])

    # a GL-net trains on it: target = log ||ΔW||_F of each LoRA (an invariant the net can see)
    torch.manual_seed(0)
    specs = specs_from_batch(batch)
    model = GLNet(specs, 1, width=4)
    model.calibrate(batch["modules"])
    y = torch.stack(
        [
            torch.log(sum((m.delta_w() ** 2).sum() for m in split.record(i).modules.values()))
            for i in range(9)
        ]
    )[:, None].float()
    y = (y - y.mean()) / y.std()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(model(batch["modules"]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.2 * losses[0], losses[::30]


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    from tests.fixtures.zoos import make_zoo

    return make_zoo(
        tmp_path_factory.mktemp("b") / "zoo", n=24, splits={"train": 0.75, "test": 0.25}
    )


def test_bench_cli_prints_stores_and_reruns(small_zoo, capsys):
    args = [
        "bench",
        str(small_zoo),
        "--target",
        "eval_loss",
        "--models",
        "baseline",
        "mlp",
        "glnet",
        "--views",
        "factors",
        "svals",
        "--repeats",
        "2",
        "--epochs",
        "15",
        "--no-progress",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "r2" in text and "glnet" in text and "baseline" in text
    res = json.loads((small_zoo / "bench" / "results.json").read_text())
    assert res["task"] == "regression" and res["n"]["test"] == 6
    assert res["n"]["fit"] + res["n"]["valid"] == 18
    runs = {(r["model"], r["view"]) for r in res["runs"]}
    assert runs == {("baseline", "-"), ("mlp", "factors"), ("mlp", "svals"), ("glnet", "factors")}
    from lora_zoo.seeding import sub_seed

    # each repeat's seed is a named sub-stream of the split seed (0 here), never split_seed + rep
    want_seeds = [sub_seed(0, "bench", f"repeat{rep}", bits=31) for rep in range(2)]
    for r in res["runs"]:
        assert r["seeds"] == want_seeds and len(r["per_seed"]) == 2
        assert {"r2", "kendall_tau", "spearman"} <= set(r["summary"])
        if r["model"] != "baseline":
            assert r["hparams"]["parameters"] > 0 and r["train"]["max_epochs"] == 15
    base = next(r for r in res["runs"] if r["model"] == "baseline")
    assert base["summary"]["r2"]["mean"] <= 0.0  # predicting the fit mean: R² <= 0 on test


def test_bench_classification_and_errors(small_zoo, tmp_path):
    res = run_bench(
        small_zoo,
        "is_even",
        train=TrainConfig(max_epochs=15),
        models=["baseline", "transformer"],
        repeats=1,
        progress=False,
        write=False,
        json_path=tmp_path / "r.json",
    )
    assert res["task"] == "binary" and (tmp_path / "r.json").is_file()
    t = next(r for r in res["runs"] if r["model"] == "transformer")
    assert 0.0 <= t["summary"]["auroc"]["mean"] <= 1.0 and "is_even" in t["summary"]["per_label"]
    # a list column (a membership vector) is not one target: the error names the column and
    # points at the per-label columns
    with pytest.raises(SelectionError, match="per-label columns") as ei:
        run_bench(small_zoo, "seen_groups", models=["baseline"], repeats=1, write=False)
    assert ei.value.key == "seen_groups"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="CUDA"):
            run_bench(small_zoo, "eval_loss", device="cuda", write=False)
