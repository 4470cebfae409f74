"""A content-defined chunker over bytes, like the Hub's Xet storage (gear-style rolling hash,
~64 KiB average chunks): what "the re-packed shard deduplicates" means, measured."""

from __future__ import annotations

import hashlib

import numpy as np

_GEAR = np.random.default_rng(20261201).integers(0, 2**63, size=256, dtype=np.uint64)


def chunks(
    data: bytes, *, avg_bits: int = 16, window: int = 64, min_size: int = 8 << 10
) -> list[bytes]:
    """Cut where the rolling sum of ``window`` gear values has ``avg_bits`` low zero bits
    (average chunk 2**avg_bits bytes), never below ``min_size``. O(n), vectorised."""
    a = np.frombuffer(data, dtype=np.uint8)
    if a.size <= window:
        return [data]
    s = np.concatenate([[np.uint64(0)], np.cumsum(_GEAR[a], dtype=np.uint64)])  # wraps mod 2^64
    h = s[window:] - s[:-window]  # (n - window + 1,) hash of each window
    mask = np.uint64((1 << avg_bits) - 1)
    cuts = np.flatnonzero((h & mask) == 0) + window
    out, last = [], 0
    for c in cuts.tolist():
        if c - last >= min_size:
            out.append(data[last:c])
            last = c
    out.append(data[last:])
    return out


def reused_fraction(old: bytes, new: bytes) -> float:
    """Share of ``new``'s bytes in chunks that ``old`` already has (what a dedup store keeps)."""
    have = {hashlib.sha256(c).digest() for c in chunks(old)}
    return sum(len(c) for c in chunks(new) if hashlib.sha256(c).digest() in have) / len(new)
