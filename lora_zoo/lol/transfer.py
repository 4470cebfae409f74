"""Transfer in ``lora-zoo bench --test-zoo OTHER``: train on one zoo's train split, test on
another zoo's test split (the papers' SD-1.4 -> SD-1.5 experiment).

Why refuse rather than guess: a LoL model has one input slot per module (``ModuleSpec``), so a
test LoRA is only meaningful to it when every slot has a counterpart of the same shape, and a
score is only meaningful when the target means the same thing (same column, same Arrow type).
Modules are matched by name, else by the record's module metadata (``module_info``: the index
path and the module type, so ``model.layers.3.self_attn.q_proj`` of one base matches
``base.layers.3.self_attn.q_proj`` of another); anything else is refused with the module, the
zoo and what differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lora_zoo.errors import SelectionError

__all__ = ["check_targets", "match_modules"]


def check_targets(train_zoo: Any, test_zoo: Any, columns: Sequence[str]) -> None:
    """Every target column exists in the test zoo with the train zoo's Arrow type."""
    where = str(getattr(test_zoo, "source", ""))
    if "test" not in test_zoo.splits:
        raise SelectionError(
            f"--test-zoo needs a test split; it has {test_zoo.splits}", file=where, key="split"
        )
    names = set(test_zoo.schema.names)
    for c in columns:
        if c not in names:
            raise SelectionError(
                f"target column {c!r} is not in the test zoo (same target columns needed)",
                file=where,
                key=c,
            )
        a, b = train_zoo.schema.field(c).type, test_zoo.schema.field(c).type
        if a != b:
            raise SelectionError(
                f"target column {c!r} is {a} in the train zoo but {b} in the test zoo",
                file=where,
                key=c,
            )


def _key(info: dict[str, Any]) -> tuple[Any, ...]:
    return (tuple(info.get("index_path", ())), info.get("type"))


def _rank(mod: dict[str, Any]) -> int:
    return next((int(mod[k].shape[-1]) for k in ("U", "S") if k in mod), 0)


def _counterpart(name: str, train: dict[str, Any], test: dict[str, Any], where: str) -> str:
    """The test module standing for train module ``name``: same name, else same metadata."""
    if name in test["modules"]:
        return name
    want = _key(train["module_info"][name])
    hits = [n for n in test["modules"] if _key(test["module_info"][n]) == want]
    if len(hits) != 1:
        raise SelectionError(
            f"module {name!r} of the train zoo has {len(hits)} counterparts in the test zoo "
            f"(matched by name, then by layer path {want[0]} and type {want[1]!r})",
            file=where,
            key=name,
        )
    return hits[0]


def _check_shape(name: str, other: str, train: dict[str, Any], test: dict[str, Any], where: str):
    a, b = train["module_info"][name], test["module_info"][other]
    shape_a, shape_b = (a["out_features"], a["in_features"]), (b["out_features"], b["in_features"])
    if shape_a != shape_b:
        raise SelectionError(
            f"module {name!r} is ΔW {shape_a} in the train zoo but {shape_b} in the test zoo "
            f"({other!r}): a model trained on one cannot read the other",
            file=where,
            key=other,
        )
    ra, rb = _rank(train["modules"][name]), _rank(test["modules"][other])
    if rb > ra:
        raise SelectionError(
            f"module {other!r} has rank {rb} in the test zoo, above the train zoo's {ra}: the "
            "model has no input slots for the extra rank",
            file=where,
            key=other,
        )


def match_modules(train: dict[str, Any], test: dict[str, Any], where: str) -> dict[str, Any]:
    """The test batch with its modules renamed to (and ordered as) the train batch's; refused
    with a SelectionError naming the module where a slot has no same-shape counterpart or the
    test zoo adapts a module the train zoo never does."""
    mapping = {n: _counterpart(n, train, test, where) for n in train["modules"]}
    extra = sorted(set(test["modules"]) - set(mapping.values()))
    if extra:
        raise SelectionError(
            f"the test zoo adapts {len(extra)} module(s) the train zoo never does, e.g. "
            f"{extra[0]!r}: the model has no slot for them",
            file=where,
            key=extra[0],
        )
    for n, o in mapping.items():
        _check_shape(n, o, train, test, where)
    out = dict(test)
    out["modules"] = {n: test["modules"][o] for n, o in mapping.items()}
    out["module_info"] = {n: train["module_info"][n] for n in mapping}
    return out
