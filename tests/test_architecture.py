"""docs/ARCHITECTURE.md's module table matches the tree: every module of lora_zoo/, builders/ and
cards/ has a row, every row is a module that exists, and every test a row names exists.

Why: the house plan drifted before (it missed croissant, lock, two backends modules, a writer
mode; two builder files pointed at a module that never existed). A table a test holds to the
tree cannot drift, and a newcomer can find the test of any module from it.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
ROW = re.compile(r"^\| `(?P<module>[^`]+\.py)` \| (?P<why>.*) \| (?P<tests>.*) \|$")


def _table() -> dict[str, tuple[str, list[str]]]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Every module", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, list[str]]] = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            assert m["module"] not in rows, f"{m['module']} listed twice"
            rows[m["module"]] = (m["why"].strip(), re.findall(r"`([^`]+)`", m["tests"]))
    return rows


def _tree() -> set[str]:
    return {
        p.relative_to(ROOT).as_posix()
        for folder in ("lora_zoo", "builders", "cards")
        for p in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    }


def test_every_module_has_a_row_and_every_row_a_module():
    rows, tree = _table(), _tree()
    assert len(rows) > 50, "the module table was not found or not parsed"
    assert sorted(tree - set(rows)) == [], "modules missing from docs/ARCHITECTURE.md"
    assert sorted(set(rows) - tree) == [], "rows for modules that do not exist"


def test_every_row_says_why_and_names_tests_that_exist():
    missing = []
    for module, (why, tests) in _table().items():
        if not why:
            missing.append(f"{module}: no 'why it exists' (give the module a docstring)")
        if not tests:
            missing.append(f"{module}: no test named")
        missing += [f"{module}: {t} does not exist" for t in tests if not (ROOT / t).is_file()]
    assert missing == []


def test_mirrored_unit_tests_are_named_where_they_exist():
    """A module with a mirrored unit test file names it (so the table never hides the unit test
    behind an integration test)."""
    wrong = []
    for module, (_, tests) in _table().items():
        if not module.startswith("lora_zoo/"):
            continue
        rel = Path(module).relative_to("lora_zoo")
        if rel.name.startswith("_") and rel.name != "__init__.py":
            continue
        mirror = ROOT / "tests" / "unit" / rel.parent / f"test_{rel.stem}.py"
        if rel.name != "__init__.py" and mirror.is_file():
            if mirror.relative_to(ROOT).as_posix() not in tests:
                wrong.append(f"{module}: name {mirror.relative_to(ROOT)}")
    assert wrong == []
