"""Batched loading paths against the per-LoRA ones: ``svals_many`` / the datasets' one-call
views, and the decoder's chunk-by-chunk copy of a batch that spans row groups."""

from __future__ import annotations

import pyarrow as pa
import torch

from lora_zoo.load import symmetry
from lora_zoo.load.datasets import LoraIterableDataset
from lora_zoo.load.decode import decode_weight_batch
from lora_zoo.load.views import ViewContext, apply_view, apply_view_many
from tests.reference.dense_ref import ref_factors_from_bytes, ref_svals
from tests.reference.tolerance import canonical_tol, svals_tol
from tests.unit.load.test_datasets import ParquetSplit, make_record, write_split


def _pairs(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Modules of several shapes, batched (b, n, r), float32, including rows the Cholesky fast
    path must refuse (a factor mixed by an R of condition ~1e6: Householder fallback), rows
    that need its second pass (cond ~30), and a shape with n < r (no fast path at all)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, m, r, b in ((40, 24, 4, 5), (24, 40, 4, 3), (3, 16, 4, 2), (40, 24, 2, 4)):
        u = torch.randn(b, n, r, generator=g, dtype=torch.float64)
        v = torch.randn(b, m, r, generator=g, dtype=torch.float64)
        for j, cond in ((0, 1e6), (1, 30.0)):
            if j < b and r > 1:
                mix, _ = symmetry.random_gl(
                    r, generator=g, log_cond=float(torch.tensor(cond).log())
                )
                u[j] = u[j] @ mix
        out.append((u.float(), v.float()))
    return out


def test_svals_many_equals_per_lora_svals_and_dense():
    pairs = _pairs()
    many = symmetry.svals_many(pairs)
    for (u, v), s in zip(pairs, many):
        assert s.shape == (*u.shape[:-2], u.shape[-1]) and s.dtype == u.dtype
        for j in range(u.shape[0]):
            alone = symmetry.svals(u[j], v[j])
            # two float32 computations of the same singular values, each within
            # 10 eps32 max(n, m) pair_cond s1 of the exact ones (Weyl): 2x that
            t = 2 * svals_tol(u[j].double(), v[j].double(), torch.float32)
            torch.testing.assert_close(s[j], alone, atol=t, rtol=0)
            # and the dense float64 reference: 10 eps32 max(n, m) pair_cond s1 (+ its own
            # float64 error, negligible)
            want = ref_svals(u[j].double(), v[j].double())
            t1 = svals_tol(u[j].double(), v[j].double(), torch.float32)
            torch.testing.assert_close(s[j].double(), want, atol=t1, rtol=0)


def test_svals_many_per_pair_dtypes_and_view_many():
    pairs = _pairs(1)
    bf = [(u.bfloat16(), v.bfloat16()) for u, v in pairs]
    ods = [torch.float32 if k % 2 else None for k in range(len(bf))]
    got = symmetry.svals_many(bf, out_dtype=ods)
    for (u, v), s, od in zip(bf, got, ods):
        assert s.dtype == (od or torch.bfloat16)
        # the same math per pair (computed in float32 from the bf16 values), cast once: equal
        assert torch.equal(s, symmetry.svals(u, v, out_dtype=od))
    us, vs = zip(*pairs)
    ctxs = [ViewContext(module=f"m{k}") for k in range(len(pairs))]
    for view in ("svals", "canonical", "factors"):
        many = apply_view_many(view, us, vs, ctxs)
        for u, v, c, res in zip(us, vs, ctxs, many):
            one = apply_view(view, u, v, c)
            assert set(res) == set(one)
            for k, t in one.items():
                # per-LoRA vs batched, both float32 math on the same rows: 2 x the derived
                # bound of each (svals: 10 eps32 max(n, m) pair_cond s1; canonical: that
                # times s1 / gap, sqrt(s1) instead of s1 (Wedin))
                bound = {
                    "S": 2 * svals_tol(u.double(), v.double(), torch.float32),
                    "U": 2 * canonical_tol(u.double(), v.double(), torch.float32),
                    "V": 2 * canonical_tol(u.double(), v.double(), torch.float32),
                }
                torch.testing.assert_close(
                    res[k], t, atol=bound[k] if view != "factors" else 0.0, rtol=0
                )


def test_canonical_batch_equals_per_lora_with_fallback_rows():
    """canonical of a batch holding rows that take the Householder fallback and the second
    Cholesky pass equals canonical of each LoRA alone (the rows' math never depends on its
    neighbours)."""
    for u, v in _pairs(2):
        uc, vc = symmetry.canonical(u, v)
        for j in range(u.shape[0]):
            ua, va = symmetry.canonical(u[j], v[j])
            # 2 x 10 eps32 max(n, m) pair_cond (s1 / gap) sqrt(s1): two float32 computations
            # of the same balanced factors, each within the Wedin bound of the exact ones
            t = 2 * canonical_tol(u[j].double(), v[j].double(), torch.float32)
            torch.testing.assert_close(uc[j], ua, atol=t, rtol=0)
            torch.testing.assert_close(vc[j], va, atol=t, rtol=0)


def test_streaming_svals_equal_per_lora(tmp_path):
    """The dataset's one-call svals over a bf16 batch == svals of each LoRA's folded factors
    (as ``LoraModule.factors`` gives them) on its own."""
    sp = ParquetSplit(write_split(tmp_path / "b.parquet", [4, 4, 4, 4, 4], torch.bfloat16, 2))
    for batch in LoraIterableDataset(sp, "svals", batch_size=3, dtype=torch.float32):
        for j, i in enumerate(batch["index"].tolist()):
            for name, (u, v) in ref_factors_from_bytes(sp.weights_bytes(i)).items():
                s = batch["modules"][name]["S"][j]
                alone = symmetry.svals(u, v, out_dtype=torch.float32)
                # both float32 from the same bf16 values: 2 x 10 eps32 max(n, m) pair_cond s1
                t = 2 * svals_tol(u.double(), v.double(), torch.float32)
                torch.testing.assert_close(s, alone, atol=t, rtol=0)


def test_chunked_batch_decodes_like_per_row(tmp_path):
    """A batch spanning row groups (a chunked weights column) is copied chunk by chunk into one
    block: bit-equal to safetensors per row, with and without the fold, in the dataset too."""
    recs = [make_record(0, 4, torch.bfloat16) for _ in range(5)]
    raw = [r.to_safetensors_bytes() for r in recs]
    chunked = pa.chunked_array([pa.array(raw[:2], pa.binary()), pa.array(raw[2:], pa.binary())])
    for fold in (True, False):
        ((rows, fac),) = decode_weight_batch(chunked, fold_scale=fold, consume=True)
        assert rows.tolist() == [0, 1, 2, 3, 4]
        u0 = next(iter(fac.values()))[0]
        assert u0.untyped_storage().nbytes() > u0.nbytes  # views of one block
        for j, data in enumerate(raw):
            for name, (u, v) in ref_factors_from_bytes(data, fold).items():
                assert torch.equal(fac[name][0][j], u) and torch.equal(fac[name][1][j], v)
    # row groups of 2, batches of 3: every other batch spans two row groups
    sp = ParquetSplit(write_split(tmp_path / "c.parquet", [4, 4, 4, 4, 4, 4, 4], torch.float16, 2))
    seen = 0
    for batch in LoraIterableDataset(sp, "factors", batch_size=3):
        for j, i in enumerate(batch["index"].tolist()):
            for name, (u, v) in ref_factors_from_bytes(sp.weights_bytes(i)).items():
                mod = batch["modules"][name]
                assert torch.equal(mod["U"][j], u) and torch.equal(mod["V"][j], v)
            seen += 1
    assert seen == 7
