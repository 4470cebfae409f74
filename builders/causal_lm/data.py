"""Text data for the causal-LM builder: sources (Hub, local files, built-in generator), tasks
that turn rows into scored examples, and a byte-level tokenizer for from-config base models.

Why one ``Example`` shape for every task: training (context + correct continuation), held-out
loss and multiple-choice accuracy (lm-evaluation-harness style: sum of continuation logprobs)
all read the same fields, so a new task is one row -> Example function.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_zoo.build.api import stable_permutation
from lora_zoo.errors import DataSourceError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One scored example. Training text = context + choices[label]; ``len(choices) > 1`` means
    it also counts for multiple-choice accuracy."""

    id: str
    group: str
    context: str
    choices: tuple[str, ...]
    label: int = 0

    @property
    def text(self) -> str:
        return self.context + self.choices[self.label]


# ---- tokenizers ---------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes + 3 specials. Needs no download and no training, so a from-config base model
    is fully reproducible offline; ids 0..2 are pad/bos/eos, byte b is id b + 3."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 259
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


class HFTokenizer:
    """Adapter giving a transformers tokenizer the ByteTokenizer interface (no specials added
    by encode; the builder adds BOS itself so both tokenizers behave the same)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.name = getattr(tok, "name_or_path", "hf")
        self.vocab_size = len(tok)
        eos = tok.eos_token_id
        self.eos_id = int(eos) if eos is not None else 0
        self.bos_id = int(tok.bos_token_id) if tok.bos_token_id is not None else self.eos_id
        self.pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))


# ---- tasks: row -> Example ----------------------------------------------------------------------
def arc_source(question_id: str) -> str:
    """ARC's question source is the id prefix before the first '_' ('Mercury_SC_401169' ->
    'Mercury', 'NYSEDREGENTS_2006_8_10' -> 'NYSEDREGENTS', 'AKDE&ED_2008_4_3' -> 'AKDE&ED')."""
    return question_id.split("_", 1)[0]


def arc_example(row: dict[str, Any], *, file: str = "") -> Example:
    """The lm-evaluation-harness ARC format: 'Question: q\\nAnswer:' + ' ' + choice."""
    for key in ("id", "question", "choices", "answerKey"):
        if key not in row:
            raise DataSourceError(f"ARC row lacks field {key!r}", file=file, key=key)
    ch = row["choices"]
    if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
        raise DataSourceError(
            "choices must be {text: [...], label: [...]}", file=file, key=f"{row['id']}.choices"
        )
    labels = list(ch["label"])
    if row["answerKey"] not in labels:
        raise DataSourceError(
            f"answerKey {row['answerKey']!r} not among labels {labels}",
            file=file,
            key=f"{row['id']}.answerKey",
        )
    return Example(
        id=str(row["id"]),
        group=arc_source(str(row["id"])),
        context=f"Question: {row['question']}\nAnswer:",
        choices=tuple(" " + str(t) for t in ch["text"]),
        label=labels.index(row["answerKey"]),
    )


def text_example(
    row: dict[str, Any],
    i: int,
    *,
    text_field: str,
    group_field: str | None,
    id_field: str | None,
    file: str = "",
) -> Example:
    if text_field not in row:
        raise DataSourceError(f"row {i} lacks text field {text_field!r}", file=file, key=text_field)
    group = str(row[group_field]) if group_field else "all"
    if group_field and group_field not in row:
        raise DataSourceError(
            f"row {i} lacks group field {group_field!r}", file=file, key=group_field
        )
    ex_id = str(row[id_field]) if id_field and id_field in row else f"row-{i}"
    return Example(id=ex_id, group=group, context="", choices=(str(row[text_field]),))


# ---- built-in generator -------------------------------------------------------------------------
_LETTERS = "abcdefghij"
_ENTITIES = [
    "zorb",
    "quell",
    "mirt",
    "plon",
    "vask",
    "drel",
    "tump",
    "skiv",
    "brom",
    "yalt",
    "fenn",
    "gosk",
    "hibb",
    "jorn",
    "kelt",
    "lusk",
]
_COLORS = [" red", " blue", " green", " gold", " gray", " pink"]


class _Draws:
    """Seeded draws for the generator without Python's ``random`` (whose algorithms are not
    promised stable across versions): integers from a local ``torch.Generator``, shuffles from
    ``stable_permutation`` keyed by the seed and a running counter."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.g = torch.Generator().manual_seed(self.seed)
        self.n_shuffles = 0

    def randint(self, low: int, high: int) -> int:
        """Uniform in [low, high], both ends included (like ``random.randint``)."""
        return int(torch.randint(low, high + 1, (1,), generator=self.g))

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.randint(0, len(seq) - 1)]

    def shuffle(self, items: list[Any]) -> None:
        perm = stable_permutation(len(items), self.seed, f"gen-shuffle-{self.n_shuffles}")
        self.n_shuffles += 1
        items[:] = [items[i] for i in perm]


def _word(rng: _Draws, n_min: int = 3, n_max: int = 5) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(n_min, n_max)))


def _unique(correct: str, candidates: list[str], rng: _Draws, make: Any) -> list[str]:
    out = [correct]
    for c in candidates:
        if c not in out:
            out.append(c)
    while len(out) < 4:
        c = make()
        if c not in out:
            out.append(c)
    return out[:4]


def generate_quickstart(n_examples: int, seed: int) -> list[Example]:
    """Six small skills a byte-level model can learn in a few dozen steps. Each example is a
    4-way multiple choice whose distractors are the *other* skills' answers, so a LoRA trained
    on a group shifts that group's accuracy and loss, and its weights carry the group."""
    rng = _Draws(seed)
    kb_rng = _Draws(12345)  # the fictional facts are fixed, not per-seed
    facts = {e: kb_rng.choice(_COLORS) for e in _ENTITIES}
    groups = ["arithmetic", "copy", "reversal", "upper", "sort", "facts"]
    out = []
    for i in range(n_examples):
        g = groups[i % len(groups)]
        w = _word(rng)
        if g == "arithmetic":
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            ctx, ans = f"add {a} {b} =", f" {a + b}"
            cands = [f" {a + b + d}" for d in (1, -1, 10, -10) if a + b + d >= 0]
            make = lambda: f" {rng.randint(0, 98)}"  # noqa: E731
        else:
            ops = {"copy": w, "reversal": w[::-1], "upper": w.upper(), "sort": "".join(sorted(w))}
            if g == "facts":
                e = rng.choice(_ENTITIES)
                ctx, ans = f"color of {e} is", facts[e]
                cands = [c for c in _COLORS if c != facts[e]]
                rng.shuffle(cands)
                make = lambda: rng.choice(_COLORS)  # noqa: E731
            else:
                ctx, ans = f"{g} {w} =", " " + ops[g]
                cands = [" " + v for k, v in ops.items() if k != g]
                make = lambda: " " + _word(rng)  # noqa: E731
        choices = _unique(ans, cands, rng, make)
        order = list(range(4))
        rng.shuffle(order)
        shuffled = tuple(choices[j] for j in order)
        out.append(
            Example(
                id=f"gen-{g}-{i:05d}", group=g, context=ctx, choices=shuffled, label=order.index(0)
            )
        )
    return out


GENERATORS = {"quickstart": generate_quickstart}


# ---- loading ------------------------------------------------------------------------------------
def load_rows(source: Any) -> tuple[list[dict[str, Any]], str]:
    """Rows of a hub/files source via the real ``datasets`` code path; returns (rows, label)."""
    import datasets

    if source.kind == "hub":
        names: Sequence[str | None] = (
            source.name if isinstance(source.name, list) else [source.name]
        )
        rows: list[dict[str, Any]] = []
        for name in names:
            try:
                ds = datasets.load_dataset(
                    source.path, name, split=source.split, revision=source.revision
                )
            except Exception as e:  # offline, missing config/split, bad revision...
                raise DataSourceError(
                    f"cannot load Hub dataset (config {name!r}, split {source.split!r}, "
                    f"revision {source.revision!r}): {type(e).__name__}: {e}",
                    file=source.path,
                    key="data.path",
                ) from e
            rows.extend(ds)  # type: ignore[arg-type]
        return rows, f"{source.path}:{','.join(str(n) for n in names)}:{source.split}"
    if source.kind == "files":
        label = ",".join(source.paths)
        for p in source.paths:
            if not os.path.exists(p):
                raise DataSourceError("data file does not exist", file=p, key="data.paths")
        try:
            ds = datasets.load_dataset(source.format, data_files=list(source.paths), split="train")
        except Exception as e:  # datasets raises many types for unreadable files
            raise DataSourceError(
                f"cannot read as {source.format}: {e}", file=label, key="data.format"
            ) from e
        return list(ds), label
    raise DataSourceError(f"no rows for source kind {source.kind!r}", key="data.kind")


def load_examples(source: Any) -> list[Example]:
    """Examples of a data section (see causal_lm.DataSource)."""
    if source.kind == "generator":
        if source.name not in GENERATORS:
            raise DataSourceError(
                f"unknown generator {source.name!r}; have {sorted(GENERATORS)}", key="data.name"
            )
        return GENERATORS[source.name](source.n_examples, source.seed)
    rows, label = load_rows(source)
    if not rows:
        raise DataSourceError("data source is empty", file=label, key="data")
    if source.task == "arc":
        exs = [arc_example(r, file=label) for r in rows]
    elif source.task == "text":
        exs = [
            text_example(
                r,
                i,
                text_field=source.text_field,
                group_field=source.group_field,
                id_field=source.id_field,
                file=label,
            )
            for i, r in enumerate(rows)
        ]
    else:
        raise DataSourceError(
            f"task {source.task!r} needs kind: generator", file=label, key="data.task"
        )
    ids = [e.id for e in exs]
    if len(set(ids)) != len(ids):
        raise DataSourceError("example ids are not unique", file=label, key="data.id")
    logger.info("loaded %d examples from %s", len(exs), label)
    return exs
