"""spectra.py: spectral statistics from the factors against a dense-SVD reference, intruder
dimensions against the paper's definition, and ``analyze_zoo`` rewriting a zoo losslessly."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_zoo.load.source import load_zoo
from lora_zoo.load.spectra import (
    STATS,
    analyze_zoo,
    intruder_dimensions,
    lora_columns,
    module_svals,
    read_base_weights,
    stats_from_svals,
)
from lora_zoo.record import LoraModule, LoraRecord
from tests.fixtures.zoos import TINY_LLAMA_SHAPES, make_zoo
from tests.reference.factors import exact_cond_gl, well_separated
from tests.reference.spectra_ref import ref_energy_margin, ref_intruders, ref_stats
from tests.reference.tolerance import svals_tol

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _record(u: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> LoraRecord:
    r = u.shape[1]
    return LoraRecord({"m": LoraModule(v.T.contiguous(), u.contiguous(), scale * r, scale)}, {})


def _stats_tol(ref: dict[str, float], s: torch.Tensor, t: float) -> dict[str, float]:
    """First-order error of each statistic when every singular value is off by at most ``t``
    (x2 for the second-order terms and the two computations compared):
    - stable = F / s1^2: dF <= 2 t sum s_i, d(s1^2) <= 2 s1 t;
    - eff = exp(H), p_i = s_i / L: |dp_i| <= (1 + r) t / L, dH <= sum |1 + log p_i| |dp_i|,
      plus the entropy of values that are zero in exact arithmetic (p <= t / L: p log(1/p));
    - top_sv: t itself."""
    s = s.double().clamp_min(0)
    r, s1, lsum = s.shape[0], float(s[0]), float(s.sum())
    if s1 == 0:
        return dict.fromkeys(STATS, 0.0)
    live = s[s > 2 * t]
    dp = (1 + r) * t / lsum
    logs = [abs(1 + math.log(float(x) / lsum)) for x in live]
    ghost = (r - len(live)) * (t / lsum) * max(math.log(lsum / t), 1.0)
    dh = sum(logs) * dp + ghost
    return {
        "top_sv": 2 * t,
        "stable_rank": 2 * 2 * t * (lsum + ref["stable_rank"] * s1) / s1**2,
        "effective_rank": 2 * ref["effective_rank"] * dh,
        "energy_rank90": 0.0,
    }


dims = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 6), st.integers(0, 10**6))


@SETTINGS
@given(dims=dims, log_cond=st.floats(0.0, math.log(1e3)), scale=st.sampled_from([0.5, 1.0, 3.0]))
def test_stats_match_dense_svd_reference(dims, log_cond, scale):
    n, m, r, seed = dims
    u, v = well_separated(n, m, r, seed)
    rm, rit = exact_cond_gl(r, math.exp(log_cond), seed + 1) if r > 1 else (None, None)
    if rm is not None:  # a badly conditioned factorisation of the same ΔW
        u, v = u @ rm, v @ rit
    rec = _record(u, v, scale)
    delta = rec.modules["m"].delta_w(torch.float64)
    ref = ref_stats(delta)
    s = module_svals(rec)["m"]
    got = {k: float(x) for k, x in stats_from_svals(s).items()}
    # singular values of the scaled pair through QR + r x r SVD vs the dense SVD: each within
    # svals_tol (10 eps max(n, m) pair_cond sigma_1) of the exact ones
    us = u * math.sqrt(scale)
    t = svals_tol(us, v * math.sqrt(scale), torch.float64)
    bound = _stats_tol(ref, s, t)
    for k in ("top_sv", "stable_rank", "effective_rank"):
        assert abs(got[k] - ref[k]) <= bound[k], (k, got[k], ref[k], bound[k])
    if ref_energy_margin(delta) > 100 * t / max(ref["top_sv"], 1e-300):
        assert got["energy_rank90"] == ref["energy_rank90"]
    cols = lora_columns(rec)
    assert cols["spectral.top_sv.per_module"] == [got["top_sv"]]
    assert cols["spectral.energy_rank90.per_module"] == [int(got["energy_rank90"])]


def test_known_spectra_and_zero_module():
    # ΔW = diag(3, 1): top 3, stable (9 + 1) / 9, eff exp(H(.75, .25)), energy 9/10 -> k = 1
    u = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    v = torch.eye(2, dtype=torch.float64)
    got = {k: float(x) for k, x in stats_from_svals(module_svals(_record(u, v))["m"]).items()}
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    want = {"top_sv": 3.0, "stable_rank": 10 / 9, "effective_rank": math.exp(h)}
    for k, w in want.items():  # float64, 2x2 core: a few eps of the values
        assert got[k] == pytest.approx(w, rel=1e-12)
    assert got["energy_rank90"] == 1.0  # 9/10 of the energy exactly: >= 0.9 at k = 1
    zero = stats_from_svals(module_svals(_record(torch.zeros(4, 2), torch.randn(5, 2)))["m"])
    assert all(float(x) == 0.0 for x in zero.values())


def test_intruders_match_the_definition():
    g = torch.Generator().manual_seed(0)
    n, m = 16, 12
    x, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    y, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    s = torch.linspace(4.0, 1.0, m, dtype=torch.float64)
    w0 = x[:, :m] * s @ y.T
    left = torch.linalg.svd(w0, full_matrices=False).U
    assert intruder_dimensions(left, w0, torch.zeros_like(w0), k=5) == 0  # W0's own vectors
    # a rank-1 change along a new output direction (the complement of W0's column space),
    # larger than sigma_1: the top vector of W0 + ΔW is that direction, |cos| = 0 with all x_i
    new = x[:, m:][:, :1]
    delta = 10.0 * new @ torch.randn(1, m, generator=g, dtype=torch.float64)
    assert intruder_dimensions(left, w0, delta, k=5) == 1 == ref_intruders(w0, w0 + delta, 5, 0.5)
    # random low-rank changes: the vectorised count equals the one-vector-at-a-time reference
    for seed in range(5):
        gg = torch.Generator().manual_seed(seed)
        d = torch.randn(n, 3, generator=gg, dtype=torch.float64) @ torch.randn(
            3, m, generator=gg, dtype=torch.float64
        )
        want = ref_intruders(w0, w0 + d, 10, 0.5)
        assert intruder_dimensions(left, w0, d, k=10) == want


def _base(tmp_path, layers: int = 2):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    state = {}
    for layer in range(layers):
        for t, (fin, fout) in TINY_LLAMA_SHAPES.items():
            state[f"model.layers.{layer}.self_attn.{t}.weight"] = torch.randn(
                fout, fin, generator=g
            )
    path = tmp_path / "base.safetensors"
    save_file(state, str(path))
    return path


def test_analyze_zoo_adds_columns_and_loses_nothing(tmp_path):
    root = make_zoo(tmp_path / "z", n=6, splits={"train": 0.5, "test": 0.5}, shard_max_rows=2)
    z0 = load_zoo(root)
    cols0 = z0.manifest["columns"]
    rows0 = {s: z0[s].table().to_pylist() for s in z0.splits}
    base = read_base_weights(_base(tmp_path))
    summary = analyze_zoo(root, base=base, progress=False)
    z = load_zoo(root, verify=True)  # new shards, hashes and manifest agree
    assert z.verify() == []
    by_name = {c["name"]: c for c in z.manifest["columns"]}
    for c in cols0:  # every old column, same type and role
        assert by_name[c["name"]] == c
    assert z.info["builder"] == z0.info["builder"] and z.info["spectral"] == summary
    assert by_name["spectral.top_sv.mean"]["role"] == "label"
    assert by_name["spectral.energy_rank90.per_module"]["type"] == "list<element: int64>"
    for s in z.splits:
        rows = z[s].table().to_pylist()
        assert [r["lora_id"] for r in rows] == [r["lora_id"] for r in rows0[s]]
        for old, new in zip(rows0[s], rows):
            assert {k: new[k] for k in old} == old  # weights bytes included
            rec = LoraRecord.from_safetensors_bytes(new["weights"], new["adapter_config"])
            for j, (name, mod) in enumerate(rec.modules.items()):
                ref = ref_stats(mod.delta_w(torch.float64))
                # fixture factors are well conditioned (pair_cond ~ 1): 1e-9 relative is
                # ~1e5 x float64 eps x 64, far above rounding and far below any real error
                assert new["spectral.top_sv.per_module"][j] == pytest.approx(ref["top_sv"], 1e-9)
                w0 = base[name].double()
                want = ref_intruders(w0, w0 + mod.delta_w(torch.float64), 10, 0.5)
                assert new["spectral.intruders.per_module"][j] == want
    # a second run replaces the columns (no duplicates), keeps everything else
    analyze_zoo(root, progress=False)
    z2 = load_zoo(root, verify=True)
    names = [c["name"] for c in z2.manifest["columns"]]
    assert len(names) == len(set(names)) and "spectral.intruders.sum" not in names
    assert len(list((root / "data").glob("*.parquet"))) == sum(
        len(sp["shards"]) for sp in z2.manifest["splits"].values()
    )
    pf = pq.ParquetFile(root / z2.manifest["splits"]["train"]["shards"][0]["path"])
    assert pf.metadata.num_rows >= 1


def test_analyze_refuses_missing_base_module(tmp_path):
    from lora_zoo.errors import ZooFormatError

    root = make_zoo(tmp_path / "z", n=2)
    before = (root / "lora_zoo.json").read_bytes()
    with pytest.raises(ZooFormatError, match="no base weight") as e:
        analyze_zoo(root, base={}, progress=False)
    assert e.value.key == "model.layers.0.self_attn.q_proj"
    assert (root / "lora_zoo.json").read_bytes() == before  # the old zoo is untouched
    assert load_zoo(root).verify() == []


def test_cli_analyze_end_to_end(tmp_path, capsys):
    from lora_zoo.cli import main

    root = make_zoo(tmp_path / "z", n=3)
    rc = main(["analyze", str(root), "--base-weights", str(_base(tmp_path)), "--intruder-k", "4"])
    assert rc == 0
    assert "spectral.intruders.sum" in capsys.readouterr().out
    z = load_zoo(root, verify=True)
    assert z.info["spectral"]["intruders"] == {"k": 4, "eps": 0.5, "vectors": "left"}
    assert all(0 <= x <= 4 for x in z["train"].table().column("spectral.intruders.sum").to_pylist())


def test_dora_intruders_use_the_full_dora_weight():
    """For DoRA the fine-tuned weight is m / ||W0 + s B A||_row (W0 + s B A): a magnitude that
    flips the sign of one row's scale changes nothing (|cos|), but one that zeroes most rows
    leaves the remaining rows' directions as the top singular vectors: intruders appear that
    the low-rank part alone does not produce."""
    g = torch.Generator().manual_seed(2)
    n, m, r = 12, 10, 2
    w0 = torch.randn(n, m, generator=g, dtype=torch.float64)
    w0[0] = 0.0  # every left singular vector of W0 has x[0] = 0: e_0 matches none of them
    a = torch.randn(r, m, generator=g, dtype=torch.float64) * 1e-3
    b = torch.randn(n, r, generator=g, dtype=torch.float64) * 1e-3
    mag = torch.full((n,), 1e-6, dtype=torch.float64)
    mag[0] = 100.0  # one output row dominates: the top vector is e_0
    mod = LoraModule(a, b, 2.0, 1.0, magnitude=mag)
    rec = LoraRecord({"x": mod}, {"r": r, "lora_alpha": 2.0, "use_dora": True}, "d")
    cols = lora_columns(rec, {"x": w0}, k=1, eps=0.5)
    want = ref_intruders(w0, mod.merged_weight(w0), 1, 0.5)
    assert cols["spectral.intruders.per_module"] == [want] == [1]
    plain = LoraRecord({"x": LoraModule(a, b, 2.0, 1.0)}, {"r": r, "lora_alpha": 2.0}, "p")
    assert lora_columns(plain, {"x": w0}, k=1)["spectral.intruders.per_module"] == [0]
