"""The streaming reader does not leave the zoo resident (issue 24: 10,000 SD-sized LoRAs, 16 GB of
shards, under 4 GiB peak RSS).

Shards are memory-mapped for the in-memory path (zero-copy Parquet); every page of a map that a
read touches then counts in the process's RSS until the map goes. A streaming pass must read
without the map, so what it leaves resident does not grow with the zoo. Measured per mapping in
``/proc/self/smaps`` (the ``Rss`` of the mappings of this zoo's shard files): exact for this
process, unaffected by other work on the machine or by the allocator.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from lora_zoo.load.datasets import LoraIterableDataset
from lora_zoo.load.source import load_zoo
from tests.fixtures.zoos import make_zoo

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux-only"
)

N, RANK = 200, 64  # 200 LoRAs of 112 KiB of factors: a 23 MB shard, ~5,600 pages


def shard_rss(root: Path) -> int:
    """Bytes of this zoo's shard files resident in this process's memory maps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = (
                len(head) >= 6 and head[5].startswith(str(root)) and head[5].endswith(".parquet")
            )
        elif inside and head and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def layout(root: Path) -> tuple[int, int, int]:
    """(bytes of the weights column chunks, bytes of everything else, number of column chunks)
    over the zoo's shards, from their footers."""
    weights = other = chunks = 0
    for f in sorted(root.rglob("*.parquet")):
        md = pq.ParquetFile(f).metadata
        w = sum(
            md.row_group(g).column(c).total_compressed_size
            for g in range(md.num_row_groups)
            for c in range(md.num_columns)
            if md.row_group(g).column(c).path_in_schema == "weights"
        )
        weights, other = weights + w, other + f.stat().st_size - w
        chunks += md.num_row_groups * md.num_columns
    return weights, other, chunks


def test_streaming_pass_leaves_shards_unmapped(tmp_path):
    root = make_zoo(tmp_path / "zoo", n=N, ranks=(RANK,), shard_max_rows=N)
    weights, other, chunks = layout(root)
    assert weights > 16 * 2**20  # the property needs a weights column far above the bound below

    split = load_zoo(root)["train"]
    before = shard_rss(root)
    rows = 0
    for batch in LoraIterableDataset(split, "factors", batch_size=32, shuffle_buffer=8):
        rows += len(batch["lora_id"])
        assert batch["modules"]["model.layers.0.self_attn.q_proj"]["U"].dtype == torch.float32
    assert rows == N
    streamed = shard_rss(root) - before
    # What the stream may still touch through the map: the footers, the lora_id column (row
    # identity) and any small column, plus the kernel's fault-around (up to 64 KiB mapped around
    # each faulting page) at both ends of every column chunk; never the weights themselves.
    bound = other + chunks * 2 * 64 * 1024
    assert bound < weights / 2
    assert streamed <= bound, (streamed, bound, weights)

    # The control: the in-memory path reads the same split through the map and keeps it
    # resident, so the measure above can see a resident weights column.
    mapped = load_zoo(root)["train"]
    table = mapped.table(columns=["lora_id", "weights"])
    assert table.num_rows == N
    assert shard_rss(root) - before - streamed >= 0.9 * weights


def test_a_shard_replaced_after_its_footer_was_read_is_refused(tmp_path):
    """Streaming re-opens a shard by name for each row group (the map pinned the file its
    footer came from): a different file under that name must not be decoded with the old
    footer's offsets."""
    from lora_zoo.errors import IntegrityError

    root = make_zoo(tmp_path / "zoo", n=12, shard_max_rows=12)
    other = make_zoo(tmp_path / "other", n=12, shard_max_rows=12, seed=1)
    split = load_zoo(root)["train"]
    first = next(iter(LoraIterableDataset(split, "factors", batch_size=4)))
    assert len(first["lora_id"]) == 4
    (shard,) = root.rglob("*.parquet")
    (twin,) = other.rglob("*.parquet")
    os.replace(twin, shard)
    with pytest.raises(IntegrityError, match="replaced or changed"):
        next(iter(LoraIterableDataset(split, "factors", batch_size=4)))
