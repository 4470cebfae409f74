"""space.py distributions: validation, ranges, reproducibility, and the weighted choice
checked against a plain cumulative-sum implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from lora_zoo.build.space import (
    Choice,
    Const,
    Cycle,
    LogUniform,
    RandInt,
    Uniform,
    is_random,
    parse_dist,
    sample,
)


def _g(seed: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def test_parse_every_kind():
    assert isinstance(parse_dist(3e-4), Const)
    assert isinstance(parse_dist([1, 2]), Const) and parse_dist([1, 2]).value == [1, 2]
    assert isinstance(parse_dist({"kind": "const", "value": "x"}), Const)
    assert isinstance(parse_dist({"kind": "choice", "values": [1, 2]}), Choice)
    assert isinstance(parse_dist({"kind": "uniform", "low": 0, "high": 1}), Uniform)
    assert isinstance(parse_dist({"kind": "loguniform", "low": 1e-5, "high": 1e-3}), LogUniform)
    assert isinstance(parse_dist({"kind": "randint", "low": 1, "high": 3}), RandInt)
    assert isinstance(parse_dist({"kind": "cycle", "values": ["a", "b"]}), Cycle)
    d = parse_dist({"kind": "choice", "values": [1]})
    assert parse_dist(d) is d


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "gauss", "mu": 0},
        {"low": 0, "high": 1},  # no kind
        {"kind": "uniform", "low": 1, "high": 1},
        {"kind": "uniform", "low": 0, "high": float("inf")},
        {"kind": "loguniform", "low": 0.0, "high": 1},
        {"kind": "loguniform", "low": -1, "high": 1},
        {"kind": "randint", "low": 3, "high": 2},
        {"kind": "choice", "values": []},
        {"kind": "choice", "values": [1, 2], "weights": [1]},
        {"kind": "choice", "values": [1, 2], "weights": [0, 0]},
        {"kind": "choice", "values": [1, 2], "weights": [-1, 2]},
        {"kind": "cycle", "values": []},
        {"kind": "uniform", "low": 0, "high": 1, "extra": 1},
    ],
)
def test_invalid(bad):
    with pytest.raises(ValidationError):
        parse_dist(bad)


def test_ranges():
    g = _g(1)
    u = parse_dist({"kind": "uniform", "low": -2, "high": 3})
    lu = parse_dist({"kind": "loguniform", "low": 1e-5, "high": 1e-3})
    ri = parse_dist({"kind": "randint", "low": 2, "high": 4})
    us = [sample(u, g, 0) for _ in range(500)]
    lus = [sample(lu, g, 0) for _ in range(2000)]
    ris = [sample(ri, g, 0) for _ in range(500)]
    assert all(-2 <= x < 3 for x in us)
    assert all(1e-5 <= x <= 1e-3 for x in lus)
    assert set(ris) == {2, 3, 4}  # inclusive on both ends
    assert all(isinstance(x, int) for x in ris)
    # log-uniform: about half the mass below the geometric midpoint (1e-4)
    frac = sum(x < 1e-4 for x in lus) / len(lus)
    assert 0.45 < frac < 0.55
    # plain uniform on the same range would put ~9% below 1e-4: the log really is used
    assert np.mean(np.log10(lus)) == pytest.approx(-4, abs=0.05)


def test_choice_matches_cumsum_reference():
    d = parse_dist({"kind": "choice", "values": ["a", "b", "c"], "weights": [1, 0, 3]})
    g1, g2 = _g(5), _g(5)
    cum = np.cumsum([1 / 4, 0, 3 / 4])
    for _ in range(1000):
        got = sample(d, g1, 0)
        u = g2.random()
        want = ["a", "b", "c"][int(np.searchsorted(cum, u, side="right"))]
        assert got == want
    counts = {v: 0 for v in "abc"}
    g = _g(9)
    for _ in range(4000):
        counts[sample(d, g, 0)] += 1
    assert counts["b"] == 0
    assert counts["c"] / 4000 == pytest.approx(0.75, abs=0.03)


def test_unweighted_choice_uniform_and_top_end():
    d = parse_dist({"kind": "choice", "values": [10, 20, 30, 40]})

    class _Top:
        def random(self) -> float:
            return math.nextafter(1.0, 0.0)

    assert d.sample(_Top(), 0) == 40
    g = _g(2)
    counts = np.bincount([[10, 20, 30, 40].index(sample(d, g, 0)) for _ in range(4000)])
    assert counts.min() > 900


def test_cycle_const_use_index_not_randomness():
    c = parse_dist({"kind": "cycle", "values": ["x", "y", "z"]})
    g = _g(0)
    state = g.bit_generator.state
    assert [sample(c, g, i) for i in range(7)] == ["x", "y", "z", "x", "y", "z", "x"]
    assert sample(parse_dist(0.5), g, 3) == 0.5
    assert g.bit_generator.state == state  # consumed nothing
    assert not is_random(c) and not is_random(parse_dist(1))
    assert is_random(parse_dist({"kind": "uniform", "low": 0, "high": 1}))


def test_reproducible():
    d = parse_dist({"kind": "loguniform", "low": 1e-5, "high": 1e-2})
    a = [sample(d, _g(42), 0) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert sample(d, _g(42), 0) != sample(d, _g(43), 0)
