"""env.py: the full environment stored in every zoo, drift between two environments, the
requirements file that recreates one, and the start-up check of the transformers / PEFT pair."""

from __future__ import annotations

import copy
import importlib.metadata as md

import pytest
from packaging.requirements import Requirement

from lora_zoo import env
from lora_zoo.cli import main


@pytest.fixture(scope="module")
def here() -> dict:
    return env.capture()


def test_capture_names_every_distribution_blas_and_hardware(here):
    assert here["distributions"]["torch"] == md.version("torch")
    assert here["distributions"]["pytest"] == md.version("pytest")  # not a hand-picked list
    assert here["blas"]["torch_blas_info"]  # e.g. mkl or open
    assert here["cpu"] and here["cpu_count"] >= 1 and here["torch_threads"] >= 1


def test_requirements_pin_every_distribution_exactly(here):
    text = env.requirements_text(here)
    pins = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("--extra-index-url"):
            assert "+" in here["distributions"]["torch"]  # only for a local torch build
            continue
        req = Requirement(line)  # every line is a valid requirement pip can install
        (spec,) = req.specifier
        assert spec.operator == "=="
        pins[req.name] = spec.version
    want = {k: v for k, v in here["distributions"].items() if k not in {"pip", "setuptools",
                                                                        "wheel", "lora-zoo"}}  # fmt: skip
    assert pins == want


def test_same_environment_has_no_drift(here):
    rows = env.drift(here, copy.deepcopy(here))
    assert rows == [] and env.bit_identical_expected(rows)
    assert "bit-identical output expected" in env.format_drift(rows)


def test_numeric_and_harmless_drift_are_told_apart(here):
    other = copy.deepcopy(here)
    other["distributions"]["pytest"] = "0.0.1"
    rows = env.drift(here, other)
    assert [r.what for r in rows] == ["pytest"] and not rows[0].numeric
    assert env.bit_identical_expected(rows)  # a test tool cannot change a LoRA
    other["distributions"]["torch"] = "9.9.9"
    other["blas"]["torch_blas_info"] = "open"
    other["cpu"] = "Some Other CPU"
    rows = env.drift(here, other)
    got = {r.what: (r.zoo, r.here, r.numeric) for r in rows}
    assert got["torch"] == (here["distributions"]["torch"], "9.9.9", True)
    assert got["blas.torch_blas_info"][2] and got["cpu"][1] == "Some Other CPU"
    assert not env.bit_identical_expected(rows)
    table = env.format_drift(rows)
    assert "torch" in table and "9.9.9" in table and "not identical bytes" in table


def test_a_zoo_from_before_full_environments_compares_what_it_has(here):
    old = {"libraries": {"torch": "1.0.0", "numpy": here["distributions"]["numpy"]}}
    rows = env.drift(old, here)
    what = [r.what for r in rows]
    assert "(full environment)" in what and "torch" in what and "numpy" not in what
    assert "pytest" not in what  # only what both sides name is compared


@pytest.mark.parametrize(
    "tv,pv,broken",
    [("5.24.0", "0.21.2", True), ("5.23.0", "0.21.2", False), ("5.23.0", "0.19.1", True)],
)
def test_stack_problems_name_both_versions_and_the_fix(monkeypatch, tv, pv, broken):
    versions = {"transformers": tv, "peft": pv}
    monkeypatch.setattr(env.md, "version", lambda n: versions[n])
    monkeypatch.setattr(env.md, "requires", lambda n: [])  # fall back to the known floors
    problems = env.stack_problems()
    assert bool(problems) == broken
    if broken:
        (line,) = problems
        assert f"peft {pv}" in line and f"transformers {tv}" in line and "fix:" in line


def test_the_installed_stack_is_consistent():
    assert env.stack_problems() == []  # the lock must never pin a pair transformers refuses


def test_cli_refuses_a_broken_stack_at_start_up(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(env, "stack_problems", lambda: ["peft 0.1 is installed but ..."])
    assert main(["build", "quickstart", "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: peft 0.1 is installed but ..."]
    assert not (tmp_path / "z").exists()  # refused before any work
