"""Re-packing a zoo with one LoRA added changes only the bytes near it, so a re-push
deduplicates on chunk-addressed storage (the Hub's Xet), measured with tests/reference/cdc.py."""

from __future__ import annotations

import pyarrow.parquet as pq
import torch

from lora_zoo.record import LoraModule, LoraRecord
from lora_zoo.zoo.writer import PARQUET_SETTINGS, ZooWriter
from tests.reference.cdc import chunks, reused_fraction


def _rec(i: int) -> LoraRecord:
    g = torch.Generator().manual_seed(i)
    mods = {
        f"model.layers.{layer}.self_attn.{p}": LoraModule(
            torch.randn(8, 256, generator=g), torch.randn(256, 8, generator=g), 8.0, 1.0
        )
        for layer in range(4)
        for p in ("q_proj", "v_proj")
    }
    return LoraRecord(mods, {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})


def _shard(root, ids) -> bytes:
    w = ZooWriter(root)
    for i in ids:
        w.add(_rec(i), lora_id=f"l{i:04d}")
    m = w.close()
    assert m["parquet"] == {**m["parquet"], **PARQUET_SETTINGS}  # settings are recorded
    return (root / "data" / "train-00000.parquet").read_bytes()


def test_chunker_finds_shifted_content():
    import numpy as np

    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    assert len(chunks(data)) > 4
    assert reused_fraction(data, data[:1000] + b"inserted" + data[1000:]) > 0.9


def test_one_lora_inserted_in_the_middle_reuses_most_bytes(tmp_path):
    ids = list(range(60))
    old = _shard(tmp_path / "a", ids)
    new = _shard(tmp_path / "b", ids[:30] + [999] + ids[30:])
    assert pq.ParquetFile(tmp_path / "b" / "data" / "train-00000.parquet").metadata.num_rows == 61
    frac = reused_fraction(old, new)
    # the inserted LoRA is 1/61 of the data; page headers around shifted pages cost a chunk
    # each: measured 0.94 on pyarrow 26 (see PARQUET_SETTINGS)
    assert frac >= 0.9, frac
