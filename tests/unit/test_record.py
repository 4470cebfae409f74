"""LoraRecord: scale rules, layouts, safetensors round trip and named errors."""

from __future__ import annotations

import math

import pytest
import torch

from lora_zoo.errors import (
    CorruptFileError,
    MissingPairError,
    NonFiniteError,
    ShapeMismatchError,
    UnknownLayoutError,
)
from lora_zoo.record import LoraModule, LoraRecord, peft_rank_alpha_scale


def _rec(dtype=torch.float32) -> LoraRecord:
    g = torch.Generator().manual_seed(0)
    cfg = {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 3}}
    mods = {}
    for name, r in (("model.layers.0.self_attn.q_proj", 4), ("model.layers.0.self_attn.v_proj", 2)):
        _, alpha, scale = peft_rank_alpha_scale(cfg, name)
        a = torch.randn(r, 16, generator=g, dtype=dtype)
        b = torch.randn(8, r, generator=g, dtype=dtype)
        mods[name] = LoraModule(a, b, alpha, scale)
    return LoraRecord(mods, cfg, "x")


def test_scale_rules_follow_peft_patterns():
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"k_proj": 4}}
    assert peft_rank_alpha_scale(cfg, "model.layers.0.self_attn.q_proj") == (8, 16.0, 2.0)
    assert peft_rank_alpha_scale(cfg, "model.layers.0.self_attn.v_proj") == (2, 16.0, 8.0)
    assert peft_rank_alpha_scale(cfg, "model.layers.0.self_attn.k_proj") == (8, 4.0, 0.5)
    r, a, s = peft_rank_alpha_scale({**cfg, "use_rslora": True}, "x.q_proj")
    assert s == pytest.approx(16 / math.sqrt(8))


def test_delta_w_matches_factors_and_layouts():
    m = _rec().modules["model.layers.0.self_attn.q_proj"]
    u, v = m.factors(fold_scale=True)
    torch.testing.assert_close(u @ v.T, m.delta_w())
    torch.testing.assert_close(m.delta_w(), m.scale * m.B @ m.A)
    fifo = LoraModule(m.A, m.B, m.alpha, m.scale, fan_in_fan_out=True)
    torch.testing.assert_close(fifo.delta_w(), (m.scale * m.B @ m.A).T)
    conv = LoraModule(torch.randn(3, 5, 3, 3), torch.randn(7, 3, 1, 1), 6.0, 2.0)
    ref = torch.nn.functional.conv2d(conv.A.permute(1, 0, 2, 3), conv.B).permute(1, 0, 2, 3)
    torch.testing.assert_close(conv.delta_w(), 2.0 * ref)
    assert conv.in_features == 45


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_round_trip_keeps_dtype_and_config(dtype):
    rec = _rec(dtype)
    back = LoraRecord.from_safetensors_bytes(rec.to_safetensors_bytes())
    assert back.config == rec.config
    assert list(back.modules) == list(rec.modules)
    for name, m in rec.modules.items():
        assert back.modules[name].A.dtype == dtype
        assert torch.equal(back.modules[name].A, m.A) and torch.equal(back.modules[name].B, m.B)
        assert back.modules[name].scale == m.scale


def test_bad_inputs_raise_named_errors():
    rec = _rec()
    state = rec.to_peft_state_dict()
    key_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    with pytest.raises(MissingPairError, match="q_proj"):
        LoraRecord.from_peft_state_dict({k: v for k, v in state.items() if k != key_b}, rec.config)
    bad = dict(state)
    bad[key_b] = torch.randn(8, 3)
    with pytest.raises(ShapeMismatchError, match="rank mismatch"):
        LoraRecord.from_peft_state_dict(bad, rec.config, file="f.safetensors")
    nan = dict(state)
    nan[key_b] = state[key_b].clone()
    nan[key_b][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="q_proj") as ei:
        LoraRecord.from_peft_state_dict(nan, rec.config, file="f.safetensors")
    assert ei.value.file == "f.safetensors"
    with pytest.raises(UnknownLayoutError):
        LoraRecord.from_peft_state_dict({"foo.weight": torch.zeros(2)}, {})
    with pytest.raises(MissingPairError, match="use_dora=True but this module lacks"):
        LoraRecord.from_peft_state_dict(state, {**rec.config, "use_dora": True})
    with pytest.raises(CorruptFileError, match="truncated"):
        LoraRecord.from_safetensors_bytes(rec.to_safetensors_bytes()[:-10], file="t.safetensors")
    with pytest.raises(CorruptFileError, match="pickle"):
        LoraRecord.from_safetensors_bytes(b"\x80\x04\x95abc")
    with pytest.raises(ShapeMismatchError, match="config gives r=8"):
        LoraRecord.from_peft_state_dict(state, {"r": 8, "lora_alpha": 8})


@pytest.mark.parametrize("cfg_extra", [{}, {"use_rslora": True}])
def test_a_scale_that_contradicts_the_config_is_refused(tmp_path, cfg_extra):
    """A reload recomputes the scale from the config: the writer must not accept a module
    whose stored scale says otherwise (it would come back different)."""
    from lora_zoo.errors import ScaleMismatchError
    from lora_zoo.zoo.writer import ZooWriter

    rec = _rec()
    rec.config.update(cfg_extra)
    name = "model.layers.0.self_attn.v_proj"
    _, alpha, scale = peft_rank_alpha_scale(rec.config, name)
    for m in rec.modules.values():  # make the honest record consistent with the config first
        m.alpha, m.scale = peft_rank_alpha_scale(rec.config, "model.layers.0.self_attn.q_proj")[1:]
    rec.modules[name].alpha, rec.modules[name].scale = alpha, scale
    w = ZooWriter(tmp_path / "z")
    w.add(rec, lora_id="ok")  # consistent: accepted
    rec.modules[name].scale = scale * 2  # e.g. rsLoRA's rule applied by a tool, config without it
    with pytest.raises(ScaleMismatchError) as e:
        w.add(rec, lora_id="bad")
    assert e.value.key == name and e.value.file == "bad"
    w.abort()


def test_fan_in_fan_out_is_per_module_through_a_round_trip():
    """A GPT-2 adapter on Conv1D (c_attn) and Linear (a Linear head) layers: PEFT sets the flag
    per layer, so one config flag would transpose the Linear's ΔW on reload."""
    g = torch.Generator().manual_seed(1)
    cfg = {"r": 2, "lora_alpha": 2, "fan_in_fan_out": True}
    conv1d = LoraModule(
        torch.randn(2, 6, generator=g), torch.randn(9, 2, generator=g), 2.0, 1.0, True
    )
    linear = LoraModule(
        torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g), 2.0, 1.0, False
    )
    rec = LoraRecord({"h.0.attn.c_attn": conv1d, "score": linear}, cfg, "g")
    back = LoraRecord.from_safetensors_bytes(rec.to_safetensors_bytes())
    assert back.modules["h.0.attn.c_attn"].fan_in_fan_out is True
    assert back.modules["score"].fan_in_fan_out is False
    assert back.modules["score"].delta_w().shape == (3, 5)  # (out, in) as nn.Linear stores it
    assert back.modules["h.0.attn.c_attn"].delta_w().shape == (6, 9)  # Conv1D stores (in, out)


def test_safetensors_bytes_are_canonical_across_processes(tmp_path):
    """Same record -> same bytes in two fresh processes (safetensors' header order is a hash
    map's, which changes per process): every write path stores these bytes."""
    import subprocess
    import sys

    code = (
        "import hashlib, torch\n"
        "from lora_zoo.record import LoraModule, LoraRecord\n"
        "g = torch.Generator().manual_seed(0)\n"
        "mods = {f'm.{i}.q': LoraModule(torch.randn(2, 4, generator=g), torch.randn(3, 2,"
        " generator=g), 2.0, 1.0) for i in range(40)}\n"
        "b = LoraRecord(mods, {'r': 2, 'lora_alpha': 2, 'target_modules': ['q']}, 'x')"
        ".to_safetensors_bytes({'note': 'n', 'a': 'b'})\n"
        "print(hashlib.sha256(b).hexdigest())\n"
    )
    shas = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)},
        ).stdout.strip()
        for seed in (1, 2, 3)
    }  # fmt: skip
    assert len(shas) == 1
