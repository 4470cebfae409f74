"""The house plan, enforced: no import cycles anywhere (module level or lazy inside functions),
and builders/ and cards/ held to the layer table.

Why a test beside `lint-imports`: builders/ and cards/ ship as ``lora_zoo.builders`` and
``lora_zoo.cards`` through setuptools ``package-dir``, so on disk they sit outside ``lora_zoo/``
where import-linter's graph cannot see them. This test parses every module's imports itself
(``ast``: every ``import`` statement, also those inside functions) under the names the package
really has, so the same table covers all of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = {"lora_zoo": ROOT / "lora_zoo", "lora_zoo.builders": ROOT / "builders",
         "lora_zoo.cards": ROOT / "cards"}  # fmt: skip


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for prefix, tree in TREES.items():
        for f in sorted(tree.rglob("*.py")):
            rel = f.relative_to(tree).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "lora_zoo" and parts[:1] in (["builders"], ["cards"]):
                continue  # not on disk there; a stray copy would be a second module
            out[name] = f
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod
                           for a in node.names]  # fmt: skip
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter
                counter += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph[w]))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


GRAPH = _graph()


def test_the_graph_sees_every_part():
    assert {"lora_zoo.builders.causal_lm", "lora_zoo.cards.render", "lora_zoo.zoo.reader"} <= set(
        GRAPH
    )
    assert "lora_zoo.zoo.manifest" in GRAPH["lora_zoo.zoo.reader"]  # edges are real
    assert "lora_zoo.cards" in GRAPH["lora_zoo.build.pack"]  # lazy imports count


def test_no_import_cycles_anywhere():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize(
    "part,allowed",
    [
        # builders reach the library only through the builder API, the engine and the record
        (
            "lora_zoo.builders",
            ("lora_zoo.builders", "lora_zoo.build.api", "lora_zoo.engine", "lora_zoo.record",
             "lora_zoo.errors", "lora_zoo._io", "lora_zoo.seeding", "lora_zoo.progress"),
        ),
        # a dataset card reads a zoo (local or remote) and its views; it never builds or trains
        (
            "lora_zoo.cards",
            ("lora_zoo.cards", "lora_zoo.zoo", "lora_zoo.remote", "lora_zoo.load",
             "lora_zoo.record", "lora_zoo.env", "lora_zoo.errors", "lora_zoo._io",
             "lora_zoo.progress"),
        ),
    ],
)  # fmt: skip
def test_parts_outside_lora_zoo_import_only_what_the_table_allows(part, allowed):
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in GRAPH.items()
        if _under(m, (part,))
        for t in ts
        if not _under(t, allowed)
    )
    assert bad == []


def test_only_the_top_stages_use_cards_and_nothing_imports_builders():
    users = ("lora_zoo.cli", "lora_zoo.lol", "lora_zoo.contrib", "lora_zoo.build", "lora_zoo.cards")
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in GRAPH.items()
        for t in ts
        if (_under(t, ("lora_zoo.cards",)) and not _under(m, users))
        or (_under(t, ("lora_zoo.builders",)) and not _under(m, ("lora_zoo.builders",)))
    )
    assert bad == []  # builders are found through entry points, by name, never imported


def test_loose_modules_are_the_named_bottom_layer():
    """A module directly in ``lora_zoo/`` is a bottom-layer concern that every stage may import
    (errors, the fs layer, the decoder, record, env, registry, seeding, progress), each named in
    the layers contract; anything else belongs in its stage's folder. (Was: at most eight; the
    seeding rule needs seeds below ``load/``, which moved ``seeding`` and ``progress`` here.)"""
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    named = {
        m.strip().removeprefix("lora_zoo.")
        for c in layers["contracts"]
        for row in c.get("layers", [])
        for m in row.split("|")
    }
    loose = sorted(p.stem for p in (ROOT / "lora_zoo").glob("*.py"))
    stray = [m for m in loose if m not in {"__init__", "__main__"} and m not in named]
    assert stray == [], f"put these in a stage folder or name them in the layers contract: {stray}"
    assert len(loose) <= 10, loose
