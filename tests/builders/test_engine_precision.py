"""bf16 autocast on CPU against float32: the GPU path's numerics, testable without a GPU.

Error model (tests/reference/tolerance.py, ``c * eps * n * cond * scale``): under autocast each
GEMM rounds its inputs (and its output) to bfloat16 and accumulates in float32, so the float32
accumulation error (eps32 * inner dim) is negligible and each GEMM adds a relative error of a
few bf16 roundings *of the absolute sum* ``sum_i |x_i| |w_i|``: ``n`` = the GEMMs in series,
``eps`` = eps(bfloat16) = 2^-7, ``scale`` = max over outputs of ``(|x| @ |W|^T)`` (the
magnitude those roundings are relative to), cond = 1, c = 10.
"""

from __future__ import annotations

import torch

from lora_zoo.builders.causal_lm.losses import causal_lm_losses
from lora_zoo.engine import LoraSpec, MultiLoraModel, autocast
from tests.fixtures.models import tiny_llama
from tests.reference.tolerance import tol


def _layer_model(seed: int = 0) -> tuple[torch.nn.Module, MultiLoraModel]:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(48, 40, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 48, generator=g) / 48**0.5)  # (out, in)
    model = torch.nn.Sequential(lin)
    mm = MultiLoraModel(model, ["0"], [LoraSpec(r=4, alpha=16, init_seed=s) for s in (1, 2)])
    w = mm.wrappers["0"]
    with torch.no_grad():  # a LoRA path as large as the base path: dropping it is an O(1) error
        w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=g) / 2)  # (K, out, r)
    return model, mm


def test_multilora_layer_bf16_autocast_matches_fp32():
    model, mm = _layer_model()
    w = mm.wrappers["0"]
    x = torch.randn(2 * 6, 48, generator=torch.Generator().manual_seed(3))  # (K*b, in)
    with torch.no_grad():
        y32 = model(x)  # (K*b, out)
        with autocast("cpu", "bfloat16"):
            y16 = model(x)
    assert y16.dtype == torch.bfloat16  # autocast engaged: the base GEMM ran in bf16
    # scale: |x| @ |W|^T for the base and |x| @ |s B A|^T for the LoRA path, per row group
    dw = (w.scale.view(2, 1, 1) * w.lora_B @ w.lora_A).detach()  # (K, out, in)
    absw = w.base_layer.weight.abs() + dw.abs()  # (K, out, in)
    scale = float((x.abs().view(2, 6, 48) @ absw.transpose(1, 2)).max())
    # n = 3 GEMMs in series (base, x A^T, h B^T); c = 2: each GEMM rounds its two inputs and
    # its output to bf16 once (3 unit roundoffs = 1.5 eps), accumulation is float32
    t = tol(torch.bfloat16, n=3, scale=scale, c=2.0)
    err = float((y16.float() - y32).abs().max())
    assert err <= t
    with mm.disabled(), torch.no_grad():  # the bound is tight enough to see a dropped path
        assert float((model(x) - y32).abs().max()) > 2 * t
    # a float32-only path would agree to float32 rounding: bf16 really ran
    assert err > tol(torch.float32, n=48, scale=scale)


def test_multilora_layer_bf16_autocast_grads_fp32_and_close():
    """Factor grads stay float32 (the engine's AdamW runs on them) and match float32 grads:
    the backward adds the same number of bf16 GEMMs again (n = 6)."""
    model, mm = _layer_model()
    x = torch.randn(12, 48, generator=torch.Generator().manual_seed(4))  # (K*b, in)
    grads = {}
    for amp in ("none", "bfloat16"):
        for p in mm.parameters():
            p.grad = None
        with autocast("cpu", amp):
            y = model(x)
        (y.float() ** 2).sum().backward()
        grads[amp] = [p.grad.clone() for p in mm.parameters()]
    for g32, g16 in zip(grads["none"], grads["bfloat16"]):
        assert g16.dtype == torch.float32
        t = tol(torch.bfloat16, n=6, scale=float(g32.abs().max()) * 4)
        # scale: |grad| of a sum of squares is bounded by 4x its max entry here (|y| <= 2 max)
        assert float((g16 - g32).abs().max()) <= t


def test_tiny_llama_losses_bf16_autocast_within_bound():
    """Whole model: per-LoRA losses under bf16 autocast vs float32. GEMMs in series on the
    longest path: 6 per decoder layer (q/k/v, QK^T, PV, o; gate/up, down) + lm_head, plus the
    3 of each LoRA path they carry -> n = 2 * 6 + 1 + 3; the loss is 2-Lipschitz in the logits
    (|d CE / d logits|_1 <= 2), so scale = 2 max |logits|."""
    model = tiny_llama(seed=0, vocab=96, hidden=64, layers=2)
    specs = [LoraSpec(r=4, alpha=8, init_seed=s) for s in (5, 6)]
    mm = MultiLoraModel(model, ["q_proj", "v_proj", "down_proj"], specs)
    g = torch.Generator().manual_seed(7)
    for w in mm.wrappers.values():
        with torch.no_grad():
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=g) / 8)
    ids = torch.randint(0, 96, (2 * 3, 12), generator=g)  # (K*b, T)
    logits32 = model(input_ids=ids).logits
    l32 = causal_lm_losses(logits32, ids, 2)
    with autocast("cpu", "bfloat16"):
        logits16 = model(input_ids=ids).logits
    l16 = causal_lm_losses(logits16, ids, 2)
    t = tol(torch.bfloat16, n=2 * 6 + 1 + 3, scale=2 * float(logits32.abs().max()))
    assert float((l16.double() - l32.double()).abs().max()) <= t
    assert float((l16 - l32).abs().max()) > 0  # bf16 really ran


def test_device_cuda_refused_cleanly_without_cuda(tmp_path, capsys):
    """No GPU here: ``--device cuda`` is a named error in one line, before any work dir."""
    import pytest

    from lora_zoo.build.backends.local import check_device
    from lora_zoo.cli import main
    from lora_zoo.errors import DeviceUnavailableError
    from tests.fixtures.toy_builder import register, toy_recipe

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        check_device("cuda:0")
    check_device("cpu")  # no-op
    register()
    p = tmp_path / "toy.yaml"
    p.write_text(toy_recipe())
    rc = main(["build", str(p), "--out", str(tmp_path / "out"), "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "CUDA is not available" in err[0]
    assert not (tmp_path / "out").exists()
