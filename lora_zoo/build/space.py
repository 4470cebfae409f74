"""Distributions for a recipe's ``vary:`` (and ``subset.count`` / ``subset.size``).

Why our own small set instead of scipy / optuna spaces: every draw must be reproducible from
the recipe alone. Samplers therefore use only ``Generator.random()`` (uniform doubles from the
PCG64 bit stream, which numpy keeps stable) and derive everything else by simple arithmetic
here, instead of relying on numpy's ``choice`` / ``integers`` algorithms, which NEP 19 allows
to change between numpy versions.

YAML forms::

    lr: 1.0e-4                                         # plain scalar (or list) = const
    lr: {kind: loguniform, low: 1.0e-5, high: 1.0e-3}
    r: {kind: choice, values: [4, 8, 16], weights: [1, 1, 2]}
    dropout: {kind: uniform, low: 0.0, high: 0.1}
    steps: {kind: randint, low: 50, high: 200}          # inclusive on both ends
    prompt: {kind: cycle, values: [sks, skd, xyz]}      # values[index % len]: by job index
    seed_offset: {kind: const, value: 3}
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator


class _Dist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def sample(self, g: np.random.Generator, index: int) -> Any:  # pragma: no cover
        raise NotImplementedError


class Const(_Dist):
    kind: Literal["const"] = "const"
    value: Any

    def sample(self, g: np.random.Generator, index: int) -> Any:
        return self.value


class Choice(_Dist):
    kind: Literal["choice"]
    values: list[Any] = Field(min_length=1)
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> Choice:
        if self.weights is not None:
            if len(self.weights) != len(self.values):
                raise ValueError(
                    f"weights has {len(self.weights)} entries but values has {len(self.values)}"
                )
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("weights must be finite, >= 0 and not all zero")
        return self

    def sample(self, g: np.random.Generator, index: int) -> Any:
        u = float(g.random())  # [0, 1)
        if self.weights is None:
            return self.values[min(int(u * len(self.values)), len(self.values) - 1)]
        total = float(sum(self.weights))
        acc = 0.0
        for v, w in zip(self.values, self.weights):
            acc += w / total
            if u < acc:
                return v
        # float round-off at the top end: the last value with a positive weight
        return [v for v, w in zip(self.values, self.weights) if w > 0][-1]


class Cycle(_Dist):
    kind: Literal["cycle"]
    values: list[Any] = Field(min_length=1)

    def sample(self, g: np.random.Generator, index: int) -> Any:
        return self.values[index % len(self.values)]


class _Range(_Dist):
    low: float
    high: float

    @model_validator(mode="after")
    def _check(self) -> _Range:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self


class Uniform(_Range):
    kind: Literal["uniform"]

    def sample(self, g: np.random.Generator, index: int) -> float:
        return float(self.low + (self.high - self.low) * float(g.random()))


class LogUniform(_Range):
    kind: Literal["loguniform"]

    @model_validator(mode="after")
    def _positive(self) -> LogUniform:
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self

    def sample(self, g: np.random.Generator, index: int) -> float:
        lo, hi = math.log(self.low), math.log(self.high)
        return float(math.exp(lo + (hi - lo) * float(g.random())))


class RandInt(_Dist):
    kind: Literal["randint"]
    low: int
    high: int

    @model_validator(mode="after")
    def _check(self) -> RandInt:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self

    def sample(self, g: np.random.Generator, index: int) -> int:
        n = self.high - self.low + 1
        return int(self.low + min(int(float(g.random()) * n), n - 1))


Dist = Annotated[
    Const | Choice | Cycle | Uniform | LogUniform | RandInt, Field(discriminator="kind")
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Dist)

#: kinds whose values are numbers (usable for counts / sizes)
KINDS = ("const", "choice", "cycle", "uniform", "loguniform", "randint")


def parse_dist(value: Any) -> _Dist:
    """A YAML value -> distribution. Dicts must carry ``kind``; anything else is a constant.

    Raises ``pydantic.ValidationError`` (recipe.py turns it into located recipe problems).
    """
    if isinstance(value, _Dist):
        return value
    if isinstance(value, dict):
        return _ADAPTER.validate_python(value)
    return Const(value=value)


def is_random(d: _Dist) -> bool:
    """True when the draw consumes randomness (const and cycle do not)."""
    return isinstance(d, (Choice, Uniform, LogUniform, RandInt))


def sample(d: _Dist, g: np.random.Generator, index: int) -> Any:
    """Draw one value for job ``index`` (``g`` comes from ``seeding.rng``)."""
    return d.sample(g, index)
