"""Compare two zoos LoRA by LoRA: ids, split membership, metadata, labels and weights.

Why: a zoo is a measurement, and ``lora-zoo rebuild`` is only useful if one can say whether the
rebuilt zoo is the same measurement. Metadata (what a LoRA *is*: seeds, hparams, example ids)
must match exactly; labels and weights are floating-point results, so they may differ within a
stated tolerance (``|a - b| <= atol + rtol * |b|``, numpy's rule). Every difference names the
LoRA and the column or module, and the largest deviations are kept so a report says *how* far
apart two builds are, not just that they differ. Identical weight bytes skip decoding.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_zoo.record import LoraRecord
from lora_zoo.zoo.schema import ROLE_LABEL, ROLE_METADATA

log = logging.getLogger(__name__)


@dataclass
class Difference:
    lora_id: str | None
    where: str  # "ids", "columns", "split", a column name, or "weights:<module>"
    message: str
    max_abs: float | None = None

    def __str__(self) -> str:
        who = self.lora_id if self.lora_id is not None else "(zoo)"
        return f"{who}: {self.where}: {self.message}"


@dataclass
class DiffReport:
    a: str
    b: str
    atol: float
    rtol: float
    compared: int = 0
    differences: list[Difference] = field(default_factory=list)
    max_abs_weights: float = 0.0
    max_abs_labels: float = 0.0
    env_a: dict[str, Any] | None = None  # info.provenance.environment of each zoo
    env_b: dict[str, Any] | None = None

    @property
    def equal(self) -> bool:
        return not self.differences

    def by_lora(self) -> dict[str | None, list[Difference]]:
        out: dict[str | None, list[Difference]] = {}
        for d in self.differences:
            out.setdefault(d.lora_id, []).append(d)
        return out

    def format(self, max_lines: int = 50) -> str:
        head = (
            f"compared {self.compared} LoRAs of {self.a} and {self.b} "
            f"(atol={self.atol:g}, rtol={self.rtol:g}): max |Δweights| "
            f"{self.max_abs_weights:.3g}, max |Δlabels| {self.max_abs_labels:.3g}"
        )
        if self.equal:
            return head + "\nno differences"
        lines = [
            head,
            f"{len(self.differences)} difference(s) in "
            f"{len(self.by_lora())} LoRA(s) / zoo-level entries:",
        ]
        lines += [f"  {d}" for d in self.differences[:max_lines]]
        if len(self.differences) > max_lines:
            lines.append(f"  ... {len(self.differences) - max_lines} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "atol": self.atol,
            "rtol": self.rtol,
            "equal": self.equal,
            "compared": self.compared,
            "max_abs_weights": self.max_abs_weights,
            "max_abs_labels": self.max_abs_labels,
            "differences": [d.__dict__ for d in self.differences],
        }


def _same_exact(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_same_exact(p, q) for p, q in zip(x, y))
    return x == y


def _numbers(v: Any) -> list[float] | None:
    """A number or a (nested) list of numbers as a flat float list; None otherwise."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return [float(v)]
    if isinstance(v, list):
        out: list[float] = []
        for x in v:
            n = _numbers(x)
            if n is None:
                return None
            out += n
        return out
    return None


def _close(x: Any, y: Any, atol: float, rtol: float) -> tuple[bool, float]:
    """(within tolerance, max |x - y|) for labels; exact comparison for non-numbers."""
    nx, ny = _numbers(x), _numbers(y)
    if nx is None or ny is None or len(nx) != len(ny):
        return _same_exact(x, y), 0.0
    worst, ok = 0.0, True
    for p, q in zip(nx, ny):
        if math.isnan(p) or math.isnan(q):
            ok &= math.isnan(p) and math.isnan(q)
            continue
        d = abs(p - q)
        if math.isinf(d) and p == q:
            d = 0.0
        worst = max(worst, d)
        ok &= d <= atol + rtol * abs(q)
    return ok, worst


def compare_records(
    lid: str, ra: LoraRecord, rb: LoraRecord, atol: float, rtol: float
) -> tuple[list[Difference], float]:
    """Per-module differences of two LoRAs (factors compared in float64) and the max |Δ|."""
    out: list[Difference] = []
    worst = 0.0
    ma, mb = set(ra.modules), set(rb.modules)
    if ma != mb:
        out.append(
            Difference(
                lid,
                "weights",
                f"modules only in A: {sorted(ma - mb)[:5]}, only in B: {sorted(mb - ma)[:5]}",
            )
        )
    for name in sorted(ma & mb):
        a, b = ra.modules[name], rb.modules[name]
        where = f"weights:{name}"
        if a.is_dora != b.is_dora:
            out.append(Difference(lid, where, f"DoRA magnitude only in {'AB'[b.is_dora]}"))
        pairs = [("A", a.A, b.A), ("B", a.B, b.B)]
        if a.magnitude is not None and b.magnitude is not None:
            pairs.append(("magnitude", a.magnitude, b.magnitude))
        for what, x, y in pairs:
            if x.shape != y.shape:
                out.append(
                    Difference(lid, where, f"{what} shape {tuple(x.shape)} != {tuple(y.shape)}")
                )
                continue
            if x.dtype != y.dtype:
                out.append(Difference(lid, where, f"{what} dtype {x.dtype} != {y.dtype}"))
            xd, yd = x.double(), y.double()
            d = float((xd - yd).abs().max()) if xd.numel() else 0.0
            worst = max(worst, d)
            if not torch.allclose(xd, yd, rtol=rtol, atol=atol, equal_nan=True):
                out.append(Difference(lid, where, f"{what} max |Δ| {d:.3g} > tolerance", d))
        if not math.isclose(a.alpha, b.alpha) or not math.isclose(a.scale, b.scale):
            out.append(
                Difference(lid, where, f"alpha/scale {a.alpha}/{a.scale} != {b.alpha}/{b.scale}")
            )
    return out, worst


def _index(zoo: Any) -> dict[str, tuple[str, int]]:
    return {lid: (s, i) for s in zoo.splits for i, lid in enumerate(zoo[s].ids)}


def diff_zoos(
    a: Any,
    b: Any,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    subset: bool = False,
    revision_a: str | None = None,
    revision_b: str | None = None,
) -> DiffReport:
    """Compare zoo ``a`` with zoo ``b`` (folders, Hub ids, URLs or ``Zoo`` objects).

    ``subset``: ``b`` holds only some of ``a``'s LoRAs (a ``rebuild --only``); LoRAs missing
    from ``b`` are then not differences.
    """
    from lora_zoo.load.source import load_zoo
    from lora_zoo.zoo.reader import Zoo

    za = a if isinstance(a, Zoo) else load_zoo(a, revision=revision_a)
    zb = b if isinstance(b, Zoo) else load_zoo(b, revision=revision_b)
    rep = DiffReport(str(za.source), str(zb.source), atol, rtol)
    rep.env_a = (za.info.get("provenance") or {}).get("environment")
    rep.env_b = (zb.info.get("provenance") or {}).get("environment")
    diffs = rep.differences
    cols_a = {c["name"]: c for c in za.manifest["columns"]}
    cols_b = {c["name"]: c for c in zb.manifest["columns"]}
    diffs += _diff_columns(cols_a, cols_b)
    ia, ib = _index(za), _index(zb)
    diffs += _diff_ids(ia, ib, subset)
    common = [x for x in ib if x in ia]
    shared = [n for n in cols_a if n in cols_b and n != "weights"]
    rows_a = _rows(za, shared)
    rows_b = _rows(zb, shared)
    for lid in common:
        (sa, i), (sb, j) = ia[lid], ib[lid]
        if sa != sb:
            diffs.append(Difference(lid, "split", f"in {sa!r} in A but {sb!r} in B"))
        _diff_cells(rep, lid, rows_a[sa][i], rows_b[sb][j], shared, cols_a)
        (_, wa, ca), (_, wb, cb) = za[sa].cell(i), zb[sb].cell(j)
        if wa != wb:  # identical bytes need no decoding
            rec_a = LoraRecord.from_safetensors_bytes(wa, ca, file=f"A:{lid}", lora_id=lid)
            rec_b = LoraRecord.from_safetensors_bytes(wb, cb, file=f"B:{lid}", lora_id=lid)
            d_list, worst = compare_records(lid, rec_a, rec_b, atol, rtol)
            diffs += d_list
            rep.max_abs_weights = max(rep.max_abs_weights, worst)
        rep.compared += 1
    log.info("diff: %d compared, %d differences", rep.compared, len(diffs))
    return rep


def _diff_columns(
    cols_a: dict[str, dict[str, Any]], cols_b: dict[str, dict[str, Any]]
) -> list[Difference]:
    """Columns only on one side, or with another type / role."""
    out = []
    for name in sorted(set(cols_a) ^ set(cols_b)):
        side = "A" if name in cols_a else "B"
        out.append(Difference(None, "columns", f"column {name!r} only in {side}"))
    for name in sorted(set(cols_a) & set(cols_b)):
        ca, cb = cols_a[name], cols_b[name]
        if (ca["type"], ca["role"]) != (cb["type"], cb["role"]):
            out.append(
                Difference(
                    None,
                    "columns",
                    f"{name!r}: {ca['type']}/{ca['role']} != {cb['type']}/{cb['role']}",
                )
            )
    return out


def _diff_ids(ia: dict[str, Any], ib: dict[str, Any], subset: bool) -> list[Difference]:
    """LoRAs only on one side (the first 100 of each, then a count)."""
    only_b = [x for x in ib if x not in ia]
    only_a = [] if subset else [x for x in ia if x not in ib]
    out = [Difference(lid, "ids", "only in A") for lid in only_a[:100]]
    out += [Difference(lid, "ids", "only in B") for lid in only_b[:100]]
    if len(only_a) + len(only_b) > 200:
        out.append(Difference(None, "ids", f"{len(only_a)} only in A, {len(only_b)} only in B"))
    return out


def _diff_cells(
    rep: DiffReport,
    lid: str,
    ra: dict[str, Any],
    rb: dict[str, Any],
    shared: list[str],
    cols_a: dict[str, dict[str, Any]],
) -> None:
    """One LoRA's non-weight cells: labels within tolerance, configs as JSON, the rest exact."""
    for name in shared:
        x, y = ra[name], rb[name]
        if cols_a[name]["role"] == ROLE_LABEL:
            ok, d = _close(x, y, rep.atol, rep.rtol)
            rep.max_abs_labels = max(rep.max_abs_labels, d)
            if not ok:
                rep.differences.append(
                    Difference(lid, name, f"label {x!r} != {y!r} (|Δ| {d:.3g})", d)
                )
        elif name == "adapter_config":
            if json.loads(x) != json.loads(y):
                rep.differences.append(Difference(lid, name, "adapter configs differ"))
        elif not _same_exact(x, y):
            role = "metadata" if cols_a[name]["role"] == ROLE_METADATA else "core"
            rep.differences.append(Difference(lid, name, f"{role} {_short(x)} != {_short(y)}"))


def _rows(zoo: Any, cols: list[str]) -> dict[str, list[dict[str, Any]]]:
    return {s: zoo[s].table(cols).to_pylist() for s in zoo.splits}


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


__all__ = ["DiffReport", "Difference", "compare_records", "diff_zoos"]
