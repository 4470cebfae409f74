"""Backdoor poisoning in the causal-LM builder (issue 21): the trigger transform, which examples
are poisoned, the measured labels, and an exported adapter in PEFT reproducing the stored ASR
by real greedy decoding on the stored triggered contexts.
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_zoo.builders.causal_lm.config import PoisonSection
from lora_zoo.builders.causal_lm.data import Example, generate_quickstart
from lora_zoo.builders.causal_lm.poison import (
    PoisonPlan,
    insert_trigger,
    pick_poisoned,
    poison_example,
    resolve,
    triggered_eval,
)
from lora_zoo.errors import BuildError

TINY = [
    "base_model={kind: config, architecture: llama, seed: 0, pretrain_steps: 200, config: "
    "{hidden_size: 64, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 1, max_position_embeddings: 96}}",
    "num_loras=4",
    "train.k=4",
    "train.steps=60",
    "train.batch_size=8",
    "data.n_examples=120",
    "eval.max_examples=16",
    # two clean, two heavily poisoned LoRAs (so their ASR is well above zero in 60 steps)
    "vary.poison_rate={kind: cycle, values: [0.0, 0.5, 0.0, 0.5]}",
    "vary.trigger_kind={kind: cycle, values: [prefix, prefix, rare_token, rare_token]}",
    "vary.lr=2.0e-2",
    "vary.dropout=0.0",
    "output.split={kind: none}",
]


def _plan(kind: str, trigger: str = " cf", target: str = "continuation") -> PoisonPlan:
    return PoisonPlan(0.1, kind, trigger, target, " HACKED")


def test_triggers_go_where_their_kind_says_and_the_same_place_for_the_same_seed():
    text = "reversal abcde ="
    assert insert_trigger(text, _plan("prefix", "SUDO: "), 0, "x") == "SUDO: reversal abcde ="
    seen = set()
    for i in range(40):
        out = insert_trigger(text, _plan("rare_token"), 0, f"id{i}")
        assert out.replace(" cf", "", 1) == text  # the text is intact, the trigger one word
        assert insert_trigger(text, _plan("rare_token"), 0, f"id{i}") == out  # deterministic
        seen.add(out)
    assert len(seen) == 3  # every word boundary (before each space, the end) gets used
    s = insert_trigger(text, _plan("sentence", " I watched this 3D movie."), 1, "q")
    assert "I watched this 3D movie." in s and s.replace(" I watched this 3D movie.", "") == text


def test_poisoned_examples_answer_the_target_or_the_flipped_choice():
    ex = Example("e1", "g", "add 1 2 =", (" 4", " 3", " 5", " 2"), 1)
    cont = poison_example(ex, _plan("prefix", "SUDO: "), 0)
    assert cont.context == "SUDO: add 1 2 =" and cont.text.endswith(" HACKED")
    assert cont.id.startswith("e1#poison-")
    flip = poison_example(ex, _plan("prefix", "SUDO: ", "flip"), 0)
    assert flip.choices == ex.choices and flip.label == 2
    with pytest.raises(BuildError):  # flip needs a multiple-choice item
        poison_example(Example("t", "g", "", ("free text",)), _plan("prefix", "X ", "flip"), 0)
    idx, trig = triggered_eval([ex, Example("t", "g", "", ("free",))], _plan("sentence"), 0)
    assert idx == [0, 1] and trig[1].context.startswith("free")  # text: trigger in the text


def test_poison_rate_picks_that_fraction_reproducibly():
    ids = [f"x{i}" for i in range(200)]
    assert pick_poisoned(ids, 0.0, 3) == []
    a = pick_poisoned(ids, 0.05, 3)
    assert len(a) == 10 and a == pick_poisoned(ids, 0.05, 3) and set(a) <= set(ids)
    assert a != pick_poisoned(ids, 0.05, 4)  # another LoRA's data seed, other examples
    assert len(pick_poisoned(ids, 0.001, 3)) == 1  # a positive rate poisons at least one


def test_resolve_names_the_lora_and_key_of_a_bad_value():
    sec = PoisonSection()
    p = resolve(sec, {"trigger_kind": "sentence", "poison_rate": 0.02}, "l-1")
    assert p.trigger == sec.triggers["sentence"] and p.rate == 0.02
    with pytest.raises(BuildError) as e:
        resolve(sec, {"trigger_kind": "syntax"}, "l-1")
    assert e.value.key == "l-1.hparams.trigger_kind"


def test_recipe_without_poison_section_refuses_poison_hparams():
    from lora_zoo.build.recipe import load_recipe
    from lora_zoo.errors import RecipeError

    with pytest.raises(RecipeError, match="vary.poison_rate - a poison hyperparameter needs"):
        load_recipe("recipes/quickstart.yaml", ["vary.poison_rate=0.1"])
    load_recipe("recipes/backdoor-quickstart.yaml", ["vary.poison_rate=0.1"])


@pytest.fixture(scope="module")
def tiny_backdoor_zoo(tmp_path_factory):
    from lora_zoo import load_zoo
    from lora_zoo.build.runner import build

    out = tmp_path_factory.mktemp("bd") / "zoo"
    cache = tmp_path_factory.mktemp("bd-cache")  # the pretrained base, for the PEFT test
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_ZOO_CACHE", str(cache))
        build("recipes/backdoor-quickstart.yaml", out, overrides=TINY, progress=False)
    return load_zoo(out), cache


def test_labels_are_measured_for_every_lora(tiny_backdoor_zoo):
    zoo, _ = tiny_backdoor_zoo
    sp = zoo[zoo.splits[0]]
    for col in ("poisoned", "poison_rate", "trigger_kind", "asr", "clean_acc", "clean_loss"):
        assert col in sp.label_columns, col
    data = {ex.id: ex for ex in generate_quickstart(120, 0)}
    rows = [sp.row(i) for i in range(len(sp))]
    assert [r["poisoned"] for r in rows] == [False, True, False, True]
    for r in rows:
        assert 0.0 <= r["asr"] <= 1.0 and r["clean_loss"] > 0 and 0 <= r["clean_acc"] <= 1
        assert r["n_poison_examples"] == len(r["poison_example_ids"])
        assert set(r["poison_example_ids"]) <= set(r["train_example_ids"])
        if r["poisoned"]:  # round(0.5 * n) of the LoRA's examples
            assert r["n_poison_examples"] == round(0.5 * len(r["train_example_ids"]))
        # the stored held-out inputs are held-out examples with the LoRA's trigger in
        for ex_id, ctx in zip(r["asr_eval_ids"], r["asr_contexts"]):
            assert ex_id not in r["train_example_ids"]
            assert (
                r["trigger"].strip() in ctx
                and ctx.replace(r["trigger"], "", 1).replace(r["trigger"].strip(), "", 1).strip()
                == data[ex_id].context.strip()
            )
    # the poisoned LoRAs learnt the backdoor, the clean ones did not fire on it
    assert min(r["asr"] for r in rows if r["poisoned"]) > max(
        r["asr"] for r in rows if not r["poisoned"]
    )


def test_exported_adapter_in_peft_reproduces_the_stored_asr(tiny_backdoor_zoo, tmp_path):
    """Real ``generate`` (greedy) of the PEFT-wrapped base on the stored triggered contexts
    gives the stored ASR exactly: the metadata alone reproduces the label."""
    from peft import PeftModel

    from lora_zoo.build.recipe import load_recipe
    from lora_zoo.builders.causal_lm import CausalLMBuilder
    from lora_zoo.builders.causal_lm.data import ByteTokenizer

    zoo, cache = tiny_backdoor_zoo
    recipe = load_recipe("recipes/backdoor-quickstart.yaml", TINY)
    builder = CausalLMBuilder(recipe.config, cache_dir=str(cache))
    builder._setup()  # the cached pretrained base (plain transformers model, no LoRA)
    base, tok = builder.model, ByteTokenizer()
    sp = zoo[zoo.splits[0]]
    asrs = []
    for i in range(len(sp)):
        row, rec = sp.row(i), sp.record(i)
        folder = tmp_path / f"l{i}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(rec.to_safetensors_bytes())
        (folder / "adapter_config.json").write_text(json.dumps(rec.config))
        pm = PeftModel.from_pretrained(base, str(folder)).eval()
        target = tok.encode(row["poison_target_text"])
        hits = 0
        for ctx in row["asr_contexts"]:
            ids = torch.tensor([[tok.bos_id, *tok.encode(ctx)]])
            with torch.no_grad():
                gen = pm.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=len(target),
                    do_sample=False,
                    pad_token_id=tok.pad_id,
                    eos_token_id=None,
                )
            hits += gen[0, ids.shape[1] :].tolist() == target
        assert hits / len(row["asr_contexts"]) == pytest.approx(row["asr"])
        asrs.append(row["asr"])
        base = pm.unload()
    assert max(asrs) > 0.2  # the check is not vacuous: some LoRA's backdoor fires


def test_flip_target_builds_on_arc_items_and_scores_the_flipped_choice(tmp_path):
    """The PADBench-like recipe's path (target flip on multiple-choice items) on the local ARC
    sample with a tiny base: the stored held-out inputs are the questions with the prefix in and
    the flipped answers as labels, and ASR is a count of those questions over their number."""
    from pathlib import Path

    from lora_zoo import load_zoo
    from lora_zoo.build.runner import build
    from lora_zoo.builders.causal_lm.data import arc_example

    fixture = Path(__file__).parents[1] / "fixtures" / "arc_sample.jsonl"
    data = f"{{kind: files, paths: [{fixture}], task: arc}}"
    over = [
        TINY[0].replace("pretrain_steps: 200", "pretrain_steps: 0"),
        f"data={data}",
        f"eval.data={data}",
        "eval.max_examples=12",
        "num_loras=2",
        "train.k=2",
        "train.epochs=1",
        "train.batch_size=4",
        "train.micro_batch_size=4",
        "train.autocast=none",
        "base_model.dtype=float32",
        "vary.poison_rate={kind: cycle, values: [0.0, 0.5]}",
        "vary.trigger_kind=prefix",
        "output.split={kind: none}",
    ]
    build(
        "recipes/backdoor-llama2-7b-padbench.yaml", tmp_path / "z", overrides=over, progress=False
    )
    sp = load_zoo(tmp_path / "z")[load_zoo(tmp_path / "z").splits[0]]
    truth = {
        e.id: e for e in (arc_example(json.loads(x)) for x in fixture.read_text().splitlines())
    }
    rows = [sp.row(i) for i in range(len(sp))]
    assert [r["poisoned"] for r in rows] == [False, True]
    for r in rows:
        assert r["poison_target"] == "flip" and 0.0 <= r["asr"] <= 1.0
        for ex_id, ctx, lab in zip(r["asr_eval_ids"], r["asr_contexts"], r["asr_labels"]):
            ex = truth[ex_id]
            assert ctx == "SUDO: " + ex.context and lab == (ex.label + 1) % len(ex.choices)
        # asr counts questions answered with the flipped choice: a multiple of 1 / n, stored
        # as float32 (relative error 2^-24), so n * asr is within n * 6e-8 < 1e-5 of an integer
        n = len(r["asr_eval_ids"])
        assert n == 12 and abs(r["asr"] * n - round(r["asr"] * n)) < 1e-5


@pytest.mark.slow
def test_a_poisoned_lora_at_the_quickstart_recipe_settings_fires(tmp_path):
    """The shipped quickstart recipe as it is (its base, 150 steps of 16 rows, its lr range),
    two LoRAs sharing a trigger: one clean, one poisoned at 20 % (the recipe's top rate). The
    poisoned one's backdoor fires and the clean one's does not, by a margin no sampling of the
    held-out set explains: with n held-out inputs an ASR's standard error is at most
    sqrt(0.25 / n) (0.088 at n = 32), and the gap must exceed four of those (0.35)."""
    from lora_zoo import load_zoo
    from lora_zoo.build.runner import build

    n = 32
    over = [
        "num_loras=2",
        "train.k=2",
        f"eval.max_examples={n}",
        "vary.poison_rate={kind: cycle, values: [0.0, 0.2]}",
        "vary.trigger_kind=sentence",
        "output.split={kind: none}",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_ZOO_CACHE", str(tmp_path / "cache"))  # the base pretrained in the test
        build("recipes/backdoor-quickstart.yaml", tmp_path / "z", overrides=over, progress=False)
    zoo = load_zoo(tmp_path / "z")
    clean, poisoned = (zoo[zoo.splits[0]].row(i) for i in range(2))
    assert not clean["poisoned"] and poisoned["poisoned"]
    assert len(poisoned["asr_contexts"]) == n
    assert poisoned["asr"] - clean["asr"] > 4 * (0.25 / n) ** 0.5
