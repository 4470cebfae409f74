"""loaders.py: datasets, batched decode and collate, checked against safetensors read directly.

Most tests run on ``ParquetSplit`` below: a minimal object with the ``ZooSplit`` contract from
docs/ARCHITECTURE.md over a real Parquet file (real safetensors bytes from real PEFT adapters),
so the loaders are exercised independently of the zoo writer/reader. ``TestRealReader`` repeats
the key checks on a zoo written by ``lora_zoo.zoo.writer`` when that module is importable.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load as st_load
from torch.utils.data import DataLoader

import lora_zoo.load.decode as decode_mod
from lora_zoo.errors import CorruptFileError, NonFiniteError, SelectionError
from lora_zoo.load.collate import collate_loras, label_masks, labels_to_batch
from lora_zoo.load.datasets import LoraDataset, LoraIterableDataset, select_modules
from lora_zoo.load.decode import decode_weight_batch
from lora_zoo.load.views import ViewContext, apply_view
from lora_zoo.record import LoraModule, LoraRecord
from tests.reference.dense_ref import ref_factors_from_bytes, ref_svals
from tests.reference.tolerance import canonical_tol, pair_cond, svals_tol, tol


def same_tol(t: torch.Tensor) -> float:
    """Two runs of the same float32 math on the same rows that differ only in batching (map
    style + collate vs the streaming fast path): at most a GEMM/QR rounding each,
    10 eps32 * n * max|t| with n the largest dimension of ``t``."""
    t = torch.as_tensor(t)
    if t.numel() == 0 or not t.is_floating_point():
        return 0.0
    n = max(t.shape[-2:]) if t.dim() >= 2 else (t.shape[-1] if t.dim() else 1)
    return tol(torch.float32, n=n, scale=max(float(t.abs().max()), 1e-30))


ALL_VIEWS = ["factors", "dense", "svals", "canonical", "gl_augment"]


@cache
def peft_template() -> tuple[dict, dict[str, tuple[int, int]]]:
    """Module names/shapes and config of a real PEFT LoRA on a tiny Llama (built once)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from tests.fixtures.models import tiny_llama

    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(tiny_llama(), cfg)
    rec = LoraRecord.from_peft_state_dict(get_peft_model_state_dict(model), cfg.to_dict())
    shapes = {n: (m.out_features, m.in_features) for n, m in rec.modules.items()}
    config = json.loads(json.dumps(cfg.to_dict(), default=list))
    return config, shapes


def make_record(i: int, rank: int, dtype: torch.dtype = torch.float32) -> LoraRecord:
    config, shapes = peft_template()
    config = {**config, "r": rank, "lora_alpha": 2 * rank + i % 3}
    g = torch.Generator().manual_seed(1000 + i)
    mods = {}
    for name, (n_out, n_in) in shapes.items():
        a = torch.randn(rank, n_in, generator=g).to(dtype)
        b = torch.randn(n_out, rank, generator=g).to(dtype)
        mods[name] = LoraModule(a, b, config["lora_alpha"], config["lora_alpha"] / rank)
    return LoraRecord(mods, config, f"lora-{i:03d}")


class ParquetSplit:
    """The ZooSplit contract (ids, len, row, record, cell, weights_bytes, table, iter_batches,
    label_columns, metadata_columns) over one real Parquet file."""

    label_columns = ["task", "score", "vec"]
    metadata_columns = ["group"]

    def __init__(self, path: Path) -> None:
        self.root = str(path)
        self.ids = pq.read_table(path, columns=["lora_id"]).column("lora_id").to_pylist()

    def __len__(self) -> int:
        return len(self.ids)

    def table(self, columns=None) -> pa.Table:
        return pq.read_table(self.root, columns=columns)

    def weights_bytes(self, i: int) -> bytes:
        return self.table(["weights"]).column("weights")[int(i)].as_py()

    def cell(self, i: int) -> tuple[str, bytes, str]:
        t = self.table(["lora_id", "weights", "adapter_config"])
        return tuple(t.column(c)[int(i)].as_py() for c in range(3))

    def record(self, i) -> LoraRecord:
        i = self.ids.index(i) if isinstance(i, str) else int(i)
        lid, w, cfg = self.cell(i)
        return LoraRecord.from_safetensors_bytes(w, cfg, lora_id=lid)

    def iter_batches(self, columns=None, batch_size=1000):
        yield from pq.ParquetFile(self.root).iter_batches(batch_size=batch_size, columns=columns)


def write_split(path: Path, ranks: list[int], dtype=torch.float32, row_group_size=4) -> Path:
    recs = [make_record(i, r, dtype) for i, r in enumerate(ranks)]
    table = pa.table(
        {
            "lora_id": [r.lora_id for r in recs],
            "weights": pa.array([r.to_safetensors_bytes() for r in recs], pa.binary()),
            "adapter_config": [json.dumps(r.config) for r in recs],
            "base_model": ["tiny-llama"] * len(recs),
            "collection": ["default"] * len(recs),
            "rank": pa.array(ranks, pa.int32()),
            "num_modules": pa.array([len(r) for r in recs], pa.int32()),
            "task": [f"t{i % 3}" for i in range(len(recs))],
            "score": [0.5 * i for i in range(len(recs))],
            "vec": [[float(i), 1.0] for i in range(len(recs))],
            "group": [i % 2 for i in range(len(recs))],
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> ParquetSplit:
    ranks = [4, 2, 4, 4, 2, 2, 4, 3, 4, 4, 2]  # mixed ranks, 11 rows, row groups of 4
    return ParquetSplit(write_split(tmp_path_factory.mktemp("zoo") / "train.parquet", ranks))


def test_factors_match_safetensors_read_directly(split):
    ds = LoraDataset(split, "factors")
    assert len(ds) == 11
    for i in range(len(ds)):
        ref = ref_factors_from_bytes(split.weights_bytes(i))
        item = ds[i]
        assert item["lora_id"] == split.ids[i] and set(item["modules"]) == set(ref)
        assert list(item["modules"]) == list(split.record(i).modules)  # LoraRecord's order
        for name, (u, v) in ref.items():
            assert torch.equal(item["modules"][name]["U"], u)
            assert torch.equal(item["modules"][name]["V"], v)
            assert item["modules"][name]["rank"] == u.shape[1]
        raw = ds.__class__(split, "factors", fold_scale=False)[i]
        for name, (u, _v) in ref_factors_from_bytes(split.weights_bytes(i), False).items():
            assert torch.equal(raw["modules"][name]["U"], u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batch_decode_equals_per_row_safetensors(tmp_path, dtype):
    sp = ParquetSplit(write_split(tmp_path / "s.parquet", [2, 4, 2, 4, 4, 1], dtype))
    table = sp.table(["lora_id", "weights"])
    col = table.column("weights")
    for arr in (
        col.combine_chunks(),
        col.combine_chunks().slice(1),
        pa.array(col.to_pylist(), pa.large_binary()),
    ):
        start = len(col) - len(arr)
        groups = decode_weight_batch(arr, fold_scale=False)
        assert sorted(int(r) for rows, _ in groups for r in rows) == list(range(len(arr)))
        for rows, fac in groups:
            for j, row in enumerate(rows):
                state = st_load(col[start + int(row)].as_py())
                for name, (u, v) in fac.items():
                    a = state[f"base_model.model.{name}.lora_A.weight"]
                    b = state[f"base_model.model.{name}.lora_B.weight"]
                    assert u.dtype == dtype and torch.equal(u[j], b) and torch.equal(v[j], a.T)


def test_corrupt_weights_named_error():
    good = make_record(0, 2).to_safetensors_bytes()
    with pytest.raises(CorruptFileError, match="zoo:bad") as e:
        decode_weight_batch(pa.array([good, b"\x05\x00"], pa.binary()), ids=["ok", "bad"])
    assert "lora-zoo" not in str(e.value)
    with pytest.raises(CorruptFileError, match="zoo:cut: weights length does not match"):
        decode_weight_batch(pa.array([good, good[:-2]], pa.binary()), ids=["ok", "cut"])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        rec = make_record(1, 2, dtype)
        name = "model.layers.1.self_attn.v_proj"
        rec.modules[name].B[3, 1] = float("nan") if dtype != torch.float16 else float("inf")
        arr = pa.array([good, rec.to_safetensors_bytes()], pa.binary())
        with pytest.raises(NonFiniteError, match="zoo:nan") as e:
            decode_weight_batch(arr, ids=["ok", "nan"])
        assert e.value.key == f"base_model.model.{name}.lora_B.weight"
        decode_weight_batch(arr, ids=["ok", "nan"], validate=False)  # opt-out is honoured
    bad_len = (10**9).to_bytes(8, "little") + good[8:]
    with pytest.raises(CorruptFileError, match="header length"):
        decode_weight_batch(pa.array([bad_len], pa.binary()))


def _fresh_weights(sp: ParquetSplit, batch_size: int) -> list[pa.Array]:
    """Weight columns of record batches straight from Parquet (ours to consume)."""
    return [b.column("weights") for b in sp.iter_batches(["weights"], batch_size=batch_size)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_consume_in_place_equals_safetensors_and_copy_path(tmp_path, dtype):
    """decode_weight_batch(consume=True) returns views of one block (the fold is the copy into
    it; without a fold, views of Arrow's buffer itself): bit-equal to safetensors read directly
    (LoraModule.factors rules) and to consume=False, which leaves its input untouched."""
    sp = ParquetSplit(write_split(tmp_path / "s.parquet", [4, 4, 2, 4, 4, 4], dtype, 6))
    rows_bytes = [sp.weights_bytes(i) for i in range(len(sp))]
    for fold in (True, False):
        kept = _fresh_weights(sp, 6)
        before = [w.as_py() for w in kept[0]]
        copied = decode_weight_batch(kept[0], fold_scale=fold)
        assert [w.as_py() for w in kept[0]] == before  # consume=False: input not mutated
        consumed = decode_weight_batch(_fresh_weights(sp, 6)[0], fold_scale=fold, consume=True)
        assert len(consumed) == len(copied) > 1  # rank 2 and rank 4 rows: two groups
        shared = 0
        for (rows_c, fac_c), (rows_k, fac_k) in zip(consumed, copied):
            assert rows_c.tolist() == rows_k.tolist()
            for name, (u, v) in fac_c.items():
                assert u.dtype == dtype and torch.equal(u, fac_k[name][0])
                assert torch.equal(v, fac_k[name][1])
                for j, row in enumerate(rows_c):
                    ru, rv = ref_factors_from_bytes(rows_bytes[int(row)], fold)[name]
                    assert torch.equal(u[j], ru) and torch.equal(v[j], rv)
            u0 = next(iter(fac_c.values()))[0]
            shared += u0.untyped_storage().nbytes() > u0.nbytes  # a view into the batch
        assert shared == len(consumed)  # the in-place path was taken for every group


def test_consume_falls_back_and_rejects_nonfinite(tmp_path):
    """Selection, negative scales and inf/nan in the in-place path behave like the copy path."""
    sp = ParquetSplit(write_split(tmp_path / "s.parquet", [4, 4, 4], torch.bfloat16, 3))
    pick = lambda names: [n for n in names if n.endswith("q_proj")]  # noqa: E731
    want = decode_weight_batch(_fresh_weights(sp, 3)[0], select=pick)
    got = decode_weight_batch(_fresh_weights(sp, 3)[0], select=pick, consume=True)
    for name, (u, v) in got[0][1].items():
        assert u.untyped_storage().nbytes() == u.nbytes  # partial selection: fresh copies
        assert torch.equal(u, want[0][1][name][0]) and torch.equal(v, want[0][1][name][1])
    neg = make_record(0, 4, torch.bfloat16)
    neg.config["lora_alpha"] = -8
    for m in neg.modules.values():
        m.alpha, m.scale = -8, -2.0
    arr = lambda: pa.array([neg.to_safetensors_bytes()] * 2, pa.binary())  # noqa: E731
    ref = ref_factors_from_bytes(neg.to_safetensors_bytes())
    ((_, fac),) = decode_weight_batch(arr(), consume=True)
    for name, (u, v) in fac.items():
        assert torch.equal(u[1], ref[name][0]) and torch.equal(v[1], ref[name][1])
    name = "model.layers.1.self_attn.v_proj"
    # both integer reductions of _check_finite (signed max: +inf/nan, unsigned max: -inf/-nan),
    # every float width, and the fold's overflow to inf (finite max * sqrt(2) > max)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        big = torch.finfo(dtype).max
        for value, factor in (
            (float("-inf"), "A"),
            (float("inf"), "B"),
            (float("nan"), "A"),
            (-float("nan"), "B"),
            (big, "B"),
        ):
            bad = make_record(1, 4, dtype)
            t = bad.modules[name].A if factor == "A" else bad.modules[name].B
            t[2, 1] = value
            recs = [make_record(1, 4, dtype), make_record(2, 4, dtype), bad]
            for consume in (True, False):
                with pytest.raises(NonFiniteError, match="zoo:inf") as e:
                    decode_weight_batch(
                        pa.array([r.to_safetensors_bytes() for r in recs], pa.binary()),
                        None,  # each row its embedded config (the column would have to equal it)
                        ids=["ok", "ok2", "inf"],
                        consume=consume,
                    )
                assert e.value.key == f"base_model.model.{name}.lora_{factor}.weight", (
                    dtype,
                    value,
                )
        # the largest finite value without a fold is fine (not an overflow)
        fine = make_record(1, 4, dtype)
        fine.modules[name].B[0, 0] = big
        decode_weight_batch(
            pa.array([fine.to_safetensors_bytes()] * 2, pa.binary()), fold_scale=False
        )


def test_iterable_batches_equal_safetensors_read_directly(split):
    """The streaming fast path (consume=True) against safetensors per row, bit for bit."""
    for batch in LoraIterableDataset(split, "factors", batch_size=4):
        for j, i in enumerate(batch["index"].tolist()):
            for name, (u, v) in ref_factors_from_bytes(split.weights_bytes(i)).items():
                r = u.shape[1]
                mod = batch["modules"][name]
                assert torch.equal(mod["U"][j, :, :r], u) and torch.equal(mod["V"][j, :, :r], v)
                assert not mod["U"][j, :, r:].any() and int(mod["mask"][j].sum()) == r


@pytest.mark.parametrize("view", ALL_VIEWS)
def test_iterable_equals_map_style(split, view):
    items = [LoraDataset(split, view, labels=["task"])[i] for i in range(len(split))]
    streamed = list(LoraIterableDataset(split, view, labels=["task"], read_batch_size=4))
    assert [s["lora_id"] for s in streamed] == split.ids
    for a, b in zip(items, streamed):
        assert a["labels"] == b["labels"] and a["index"] == b["index"]
        for name in a["modules"]:
            for k, t in a["modules"][name].items():
                if k == "rank":
                    assert t == b["modules"][name][k]
                else:  # same float32 math on the same rows, batched differently: 10 eps n max|t|
                    torch.testing.assert_close(b["modules"][name][k], t, atol=same_tol(t), rtol=0)
    # batched fast path == collate of the map-style items, batch by batch
    batches = list(LoraIterableDataset(split, view, labels=["task"], batch_size=4))
    assert [len(b["lora_id"]) for b in batches] == [4, 4, 3]
    for k, batch in enumerate(batches):
        want = collate_loras(items[4 * k : 4 * k + 4])
        assert batch["lora_id"] == want["lora_id"] and torch.equal(batch["index"], want["index"])
        for name, mod in want["modules"].items():
            assert set(mod) == set(batch["modules"][name])
            for key, t in mod.items():
                t_k = same_tol(t)  # 10 eps32 n max|t|
                torch.testing.assert_close(batch["modules"][name][key], t, atol=t_k, rtol=0)


def test_padding_is_exact_under_the_symmetry(split):
    """Collated mixed ranks: views of the zero-padded factors equal the padded views."""
    batch = next(iter(LoraIterableDataset(split, "factors", batch_size=8, modules="*q_proj")))
    for view, keys in (("svals", ["S"]), ("canonical", ["U", "V"]), ("dense", ["W"])):
        viewed = next(iter(LoraIterableDataset(split, view, batch_size=8, modules="*q_proj")))
        for name, mod in batch["modules"].items():
            assert mod["mask"].sum(1).tolist() == [4, 2, 4, 4, 2, 2, 4, 3]
            u, v = mod["U"].double(), mod["V"].double()  # padded (8, n, 4), (8, m, 4)
            on_padded = apply_view(view, u, v, ViewContext(module=name))
            f32 = torch.float32  # the loader computes in float32, the padded view in float64
            s1 = float(torch.linalg.matrix_norm(u @ v.mT, 2).max())
            bound = {
                "S": 2 * svals_tol(u, v, f32),  # 2 x 10 eps32 max(n, m) pair_cond s1
                "U": 2 * canonical_tol(u, v, f32),  # 2 x 10 eps32 n pair_cond (s1/gap) sqrt(s1)
                "W": 2 * tol(f32, n=4, cond=pair_cond(u, v), scale=s1),  # GEMM, inner dim r
            }
            for key in keys:
                torch.testing.assert_close(
                    on_padded[key].float(),
                    viewed["modules"][name][key],
                    atol=bound["U" if key == "V" else key],
                    rtol=0,
                )
            if view == "svals":  # and both agree with the dense reference
                for j in range(8):
                    torch.testing.assert_close(
                        viewed["modules"][name]["S"][j].double(),
                        ref_svals(u[j], v[j]),
                        atol=svals_tol(u[j], v[j], f32),  # 10 eps32 max(n, m) pair_cond s1
                        rtol=0,
                    )
            if view == "canonical":  # padded columns are exactly zero
                pad = ~mod["mask"]  # (8, 4)
                assert (viewed["modules"][name]["U"].transpose(1, 2)[pad] == 0).all()


@pytest.mark.parametrize("batched", [False, True])
def test_dataloader_two_workers_no_duplicates(split, batched):
    if batched:
        ds = LoraIterableDataset(split, "gl_augment", batch_size=2, labels=["score"], seed=5)
        dl = DataLoader(ds, batch_size=None, num_workers=2)
    else:
        ds = LoraIterableDataset(split, "gl_augment", read_batch_size=2, labels=["score"], seed=5)
        dl = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_loras)
    seen, by_id = [], {}
    for b in dl:
        seen += b["lora_id"]
        for j, lid in enumerate(b["lora_id"]):
            by_id[lid] = (
                b["modules"]["model.layers.0.self_attn.q_proj"]["U"][j],
                b["labels"]["score"][j],
            )
    assert sorted(seen) == sorted(split.ids) and len(seen) == len(set(seen))
    # same augmentation as a single-process map-style read (seeded by index, not by worker)
    ref = LoraDataset(split, "gl_augment", seed=5)
    for i, lid in enumerate(split.ids):
        u = ref[i]["modules"]["model.layers.0.self_attn.q_proj"]["U"]
        torch.testing.assert_close(by_id[lid][0][:, : u.shape[1]], u)
        assert float(by_id[lid][1]) == 0.5 * i


def test_map_style_dataloader_with_workers(split):
    dl = DataLoader(
        LoraDataset(split, "svals", labels=["score", "vec", "task"]),
        batch_size=4,
        num_workers=2,
        collate_fn=collate_loras,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    ids = [i for b in dl for i in b["lora_id"]]
    assert sorted(ids) == sorted(split.ids)
    b = next(
        iter(
            DataLoader(
                LoraDataset(split, "svals", labels=["score", "vec", "task", "group"]),
                batch_size=3,
                collate_fn=collate_loras,
            )
        )
    )
    assert b["labels"]["score"].dtype == torch.float32 and b["labels"]["vec"].shape == (3, 2)
    assert b["labels"]["task"] == ["t0", "t1", "t2"] and b["labels"]["group"].dtype == torch.int64
    assert b["modules"]["model.layers.1.self_attn.v_proj"]["S"].shape == (3, 4)


def test_module_selection_glob_regex():
    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(12) for p in "qkv"]
    assert select_modules(names, "*.q_proj") == [n for n in names if n.endswith("q_proj")]
    assert select_modules(names, "re:.*layers\\.1\\..*") == names[3:6]
    assert select_modules(names, re.compile(r".*\.(k|v)_proj")) == [
        n for n in names if n[-6] in "kv"
    ]
    assert select_modules(names, ["*.layers.0.*", "re:.*layers\\.11\\.self_attn\\.q_proj"]) == [
        *names[:3],
        names[33],
    ]
    assert select_modules(names, None) == names
    with pytest.raises(SelectionError, match="matches none") as e:
        select_modules(names, "*.o_proj")
    assert e.value.key == "*.o_proj"


def test_bad_selections_are_named_errors(split):
    with pytest.raises(SelectionError, match="unknown view"):
        LoraDataset(split, "svd")
    with pytest.raises(SelectionError) as e:
        LoraDataset(split, "factors", labels=["nope"])
    assert e.value.key == "nope" and e.value.file == split.root
    with pytest.raises(SelectionError, match="template_id"):
        LoraDataset(split, "aligned")
    with pytest.raises(SelectionError, match="not in this split"):
        LoraDataset(split, "aligned", template_id="missing")[0]
    with pytest.raises(SelectionError, match="matches none"):
        LoraDataset(split, "factors", modules="*.mlp.*")[0]


def test_aligned_dtype_and_selection(split):
    ds = LoraDataset(
        split, "aligned", template_id="lora-000", modules="*.v_proj", dtype=torch.float64
    )
    t = ds[0]  # the template aligned to itself is itself
    ref = ref_factors_from_bytes(split.weights_bytes(0))
    assert set(t["modules"]) == {n for n in ref if n.endswith("v_proj")}
    nrm = torch.linalg.matrix_norm
    for name, mod in t["modules"].items():
        assert mod["U"].dtype == torch.float64
        # Q = polar factor of M = U^T U + V^T V (== I exactly), computed from float32-rounded
        # inputs: moves by eps32 (n + m) (||U||^2 + ||V||^2) / sigma_min(M) =: eps32 (n + m)
        # cond_M; U Q then by 10 eps32 (n + m) cond_M ||U||
        u, v = (x.double() for x in ref[name])
        cond_m = float(
            (nrm(u, 2) ** 2 + nrm(v, 2) ** 2) / torch.linalg.svdvals(u.T @ u + v.T @ v)[-1]
        )
        t_u = tol(torch.float32, n=u.shape[0] + v.shape[0], cond=cond_m, scale=float(nrm(u, 2)))
        torch.testing.assert_close(mod["U"], u, atol=t_u, rtol=0)
    item = ds[1]  # rank 2 against a rank-4 template: padded to 4, ΔW kept
    u, v = ref_factors_from_bytes(split.weights_bytes(1))["model.layers.0.self_attn.v_proj"]
    mod = item["modules"]["model.layers.0.self_attn.v_proj"]
    assert mod["U"].shape[1] == 4 and mod["rank"] == 4
    # ΔW kept: Q orthogonal to 10 eps32 r, so 2 x 10 eps32 r pair_cond s1 (with the GEMMs)
    s1 = float(torch.linalg.matrix_norm((u @ v.T).double(), 2))
    t_w = 2 * tol(torch.float32, n=4, cond=pair_cond(u, v), scale=s1)
    torch.testing.assert_close(mod["U"] @ mod["V"].T, (u @ v.T).double(), atol=t_w, rtol=0)


def test_fp16_zoo_kept_unless_dtype_given(tmp_path):
    sp = ParquetSplit(write_split(tmp_path / "h.parquet", [4, 4, 2], torch.float16))
    for view in ALL_VIEWS:
        b = next(iter(LoraIterableDataset(sp, view, batch_size=3)))
        assert all(
            t.dtype == torch.float16
            for m in b["modules"].values()
            for k, t in m.items()
            if k not in ("mask", "present")
        )
    b = next(iter(LoraIterableDataset(sp, "svals", batch_size=3, dtype=torch.float32)))
    s = b["modules"]["model.layers.0.self_attn.q_proj"]["S"]
    u, v = ref_factors_from_bytes(sp.weights_bytes(0))["model.layers.0.self_attn.q_proj"]
    assert s.dtype == torch.float32
    # computed in float32 from the stored fp16 values: 10 eps32 max(n, m) pair_cond s1
    t = svals_tol(u.double(), v.double(), torch.float32)
    torch.testing.assert_close(s[0].double(), ref_svals(u.double(), v.double()), atol=t, rtol=0)


def test_labels_to_batch_types():
    out = labels_to_batch(
        {
            "b": [True, False],
            "i": [1, 2],
            "f": [1, 2.5],
            "s": ["a", "b"],
            "n": [1.0, None],
            "ragged": [[1], [1, 2]],
            "l": [[1, 2], [3, 4]],
        }
    )
    assert out["b"].dtype == torch.bool and out["i"].dtype == torch.int64
    assert out["f"].dtype == torch.float32 and out["l"].shape == (2, 2)
    assert out["s"] == ["a", "b"]  # strings: the only labels that stay lists
    # missing values: float tensors with NaN there, never a Python list, plus a mask
    assert out["n"].dtype == torch.float32 and out["n"][0] == 1.0 and torch.isnan(out["n"][1])
    assert out["ragged"].shape == (2, 2) and torch.isnan(out["ragged"][0, 1])
    masks = label_masks({"n": [1.0, None], "ragged": [[1], [1, 2]], "bn": [True, None]})
    assert masks["n"].tolist() == [True, False]
    assert masks["ragged"].tolist() == [[True, False], [True, True]]
    bn = labels_to_batch({"bn": [True, None], "in": [3, None], "ln": [[1.0], None]})
    assert bn["bn"].dtype == torch.float32 and bn["bn"][0] == 1.0 and torch.isnan(bn["bn"][1])
    assert bn["in"][0] == 3.0 and torch.isnan(bn["in"][1]) and bn["ln"].shape == (2, 1)


@pytest.fixture(scope="module")
def real_zoo(tmp_path_factory) -> Path:
    """A multi-shard zoo (5 rows a shard, ranks 2/4) written by ZooWriter."""
    from tests.fixtures.zoos import make_zoo

    return make_zoo(
        tmp_path_factory.mktemp("real") / "zoo", n=12, splits={"train": 0.75, "test": 0.25}
    )


def test_real_reader_factors_match_safetensors(real_zoo):
    from lora_zoo.load.source import load_zoo

    zsplit = load_zoo(real_zoo)["train"]
    ds = LoraDataset(real_zoo, "factors", labels=["eval_loss", "group"])
    assert len(ds) == len(zsplit) == 9
    for i in range(len(ds)):
        item = ds[i]
        assert item["lora_id"] == zsplit.ids[i]
        for name, (u, v) in ref_factors_from_bytes(zsplit.weights_bytes(i)).items():
            assert torch.equal(item["modules"][name]["U"], u)
            assert torch.equal(item["modules"][name]["V"], v)
        rec = zsplit.record(i)  # and the reader's own LoraRecord agrees
        for name, m in rec.modules.items():
            assert torch.equal(item["modules"][name]["U"], m.factors(True)[0])
    assert LoraDataset(real_zoo, "svals", split="test")[0]["lora_id"] == "lora-00009"
    with pytest.raises(SelectionError, match="no split"):
        LoraDataset(real_zoo, "svals", split="valid")


def test_real_reader_streaming_two_workers(real_zoo):
    ds = LoraIterableDataset(
        real_zoo,
        "canonical",
        batch_size=2,
        labels=["eval_loss", "eval_loss_by_group.alpha", "group"],
    )
    seen, losses = [], {}
    for b in DataLoader(ds, batch_size=None, num_workers=2):
        seen += b["lora_id"]
        assert b["labels"]["eval_loss"].dtype == torch.float32 and isinstance(
            b["labels"]["group"], list
        )
        losses.update(zip(b["lora_id"], b["labels"]["eval_loss"].tolist()))
        mod = b["modules"]["model.layers.1.self_attn.v_proj"]
        ranks = [(2, 4)[int(lid[-5:]) % 2] for lid in b["lora_id"]]  # make_zoo: ranks (2, 4)
        assert mod["U"].shape[1:] == (32, max(ranks)) and mod["mask"].sum(1).tolist() == ranks
    assert sorted(seen) == [f"lora-{i:05d}" for i in range(9)] and len(set(seen)) == 9
    assert losses["lora-00003"] == pytest.approx(0.25)
    # the same batches through the map-style dataset + collate_loras
    items = [LoraDataset(real_zoo, "canonical")[i] for i in range(9)]
    ref = collate_loras(items)
    for b in LoraIterableDataset(real_zoo, "canonical", batch_size=4):
        for name, mod in b["modules"].items():
            w = mod["U"].shape[-1]  # a batch is padded to its own max rank
            torch.testing.assert_close(mod["U"], ref["modules"][name]["U"][b["index"]][..., :w])
            assert torch.equal(mod["mask"], ref["modules"][name]["mask"][b["index"]][:, :w])


def test_arrow_labels_match_labels_to_batch():
    """The Arrow fast path for numeric label columns gives what the Python path gives."""
    from lora_zoo.load.collate import _arrow_labels

    batch = pa.record_batch(
        {
            "b": pa.array([True, False, True]),
            "i8": pa.array([-3, 0, 127], pa.int8()),
            "i64": pa.array([2**40, -1, 7], pa.int64()),
            "u32": pa.array([0, 2**32 - 1, 5], pa.uint32()),
            "f16": pa.array([0.1, -2.5, 65504.0], pa.float16()),
            "f64": pa.array([0.1, 1e-40, 3.4e38 * 0.999], pa.float64()),  # rounding, subnormal
            "null": pa.array([1.0, None, 2.0]),
            "s": pa.array(["a", "b", "c"]),
            "l": pa.array([[1, 2], [3, 4], [5, 6]]),
        }
    )
    fast, fast_masks = _arrow_labels(batch, batch.schema.names)
    cols = {c: batch.column(c).to_pylist() for c in batch.schema.names}
    slow, slow_masks = labels_to_batch(cols), label_masks(cols)
    assert list(fast) == list(slow) and list(fast_masks) == list(slow_masks)
    for c, want in slow.items():
        if isinstance(want, torch.Tensor):
            assert fast[c].dtype == want.dtype, c
            torch.testing.assert_close(fast[c], want, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(fast_masks[c], slow_masks[c]), c
        else:
            assert fast[c] == want, c
    assert fast_masks["null"].tolist() == [True, False, True] and "s" not in fast_masks


def _reordered_header(data: bytes) -> bytes:
    """The same safetensors file with its header keys in another order (as a HashMap writes)."""
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8 : 8 + n])
    flipped = json.dumps(dict(reversed(list(head.items()))), separators=(",", ":")).encode()
    assert len(flipped) <= n and flipped != data[8 : 8 + n].rstrip()
    return data[:8] + flipped.ljust(n) + data[8 + n :]


def test_parsed_headers_cached_across_batches(monkeypatch):
    """Each distinct header is parsed once per process; byte-different headers of one layout
    still share one group; results equal the per-row safetensors read; a failing layout check
    raises every time (nothing cached)."""
    monkeypatch.setattr(decode_mod, "_LAYOUTS", {})
    monkeypatch.setattr(decode_mod, "_INTERNED", {})
    calls = []
    parse = decode_mod._parse_header
    monkeypatch.setattr(decode_mod, "_parse_header", lambda *a: calls.append(a[0]) or parse(*a))
    recs = [make_record(i, 4, torch.bfloat16) for i in (0, 3, 6)]  # one config
    raw = [r.to_safetensors_bytes() for r in recs]
    rows = [raw[0], _reordered_header(raw[1]), raw[2]]
    heads = {r[: 8 + int.from_bytes(r[:8], "little")] for r in rows}
    for _ in range(3):
        for consume in (False, True):
            ((got_rows, fac),) = decode_weight_batch(
                pa.array(rows, pa.binary()), ids=["a", "b", "c"], consume=consume
            )
            assert got_rows.tolist() == [0, 1, 2]
            for j, data in enumerate(raw):
                for name, (u, v) in ref_factors_from_bytes(data).items():
                    assert torch.equal(fac[name][0][j], u) and torch.equal(fac[name][1][j], v)
        # each distinct header byte string parsed once, in the first batch only (safetensors
        # writes metadata in HashMap order, so raw[0] and raw[2] may or may not share bytes)
        assert len(calls) == len(heads) >= 2
    from safetensors.torch import save

    bare = save({f"m.lora_{k}.weight": torch.ones(2, 2) for k in "AB"})  # config: the column
    bad_cfg = pa.array([bare] * 2, pa.binary())
    for _ in range(2):
        with pytest.raises(CorruptFileError, match="zoo:x: .*adapter config is not JSON"):
            decode_weight_batch(bad_cfg, ["{not json", "{not json"], ids=["x", "y"])


def test_streaming_splits_evenly_over_ranks_and_workers(real_zoo):
    """Same row count per rank (wrap-around padding like DistributedSampler), a disjoint even
    cut over workers inside a rank, and each shard reads only its own row groups."""
    ds = LoraIterableDataset(real_zoo, "svals", batch_size=2)
    n = len(ds.split)  # 9 rows, shards of 5 rows
    for world in (1, 2, 4):
        per_rank = [sum((ds.rows_for(r, world, w, 2) for w in range(2)), []) for r in range(world)]
        assert {len(p) for p in per_rank} == {-(-n // world)}  # ceil(n / world) each
        assert set().union(*map(set, per_rank)) == set(range(n))
        for r in range(world):
            a, b = ds.rows_for(r, world, 0, 2), ds.rows_for(r, world, 1, 2)
            assert not set(a) & set(b) and abs(len(a) - len(b)) <= 1
    dropped = LoraIterableDataset(real_zoo, "svals", batch_size=2, drop_last=True)
    assert [len(dropped.rows_for(r, 2)) for r in range(2)] == [4, 4]
    # rank 0 of 2 holds rows 0..4 = the first shard only: the second shard is never opened
    fresh = LoraIterableDataset(real_zoo, "svals", batch_size=2)
    fresh._blocks = lambda: [(0, 5), (5, 9)]  # row groups known without opening files
    list(fresh._read(fresh._ranges(0, 2, 0, 1), ["lora_id"]))
    assert set(fresh.split._files) == {0}


def test_shuffle_buffer_is_seeded_and_complete(real_zoo):
    def order(seed, epoch=0):
        ds = LoraIterableDataset(real_zoo, "svals", read_batch_size=2, shuffle_buffer=4, seed=seed)
        ds.set_epoch(epoch)
        return [it["lora_id"] for it in ds]

    a = order(1)
    assert sorted(a) == [f"lora-{i:05d}" for i in range(9)]
    assert order(1) == a and (order(2) != a or order(1, epoch=1) != a)
    assert a != sorted(a)


def test_views_keep_torch_global_thread_count():
    """single_threaded changes only the calling thread's OpenMP setting."""
    import threading

    from lora_zoo.load.threads import single_threaded

    before = torch.get_num_threads()
    seen = {}

    def other():
        seen["other"] = torch.get_num_threads()

    with single_threaded():
        inside = torch.get_num_threads()
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert torch.get_num_threads() == before
    assert seen["other"] == before  # a thread started meanwhile is not affected
    if before > 1:
        assert inside == 1


def test_device_cuda_refused_cleanly_without_cuda(split):
    from lora_zoo.errors import DeviceUnavailableError

    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by the device run")
    with pytest.raises(DeviceUnavailableError, match="CUDA"):
        LoraDataset(split, "svals", device="cuda")
    b = next(iter(LoraIterableDataset(split, "svals", batch_size=3, device="cpu")))
    assert b["modules"]["model.layers.0.self_attn.q_proj"]["S"].device.type == "cpu"
