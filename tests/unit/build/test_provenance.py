"""provenance.py: versions, hardware, git commit and wall-time summaries."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess

import pytest

from lora_zoo import env
from lora_zoo.build import provenance


def test_library_versions_match_metadata():
    v = provenance.library_versions(("torch", "numpy", "surely-not-installed-pkg"))
    assert v["torch"] == md.version("torch") and v["numpy"] == md.version("numpy")
    assert v["surely-not-installed-pkg"] is None
    assert provenance.library_versions()["lora-zoo"] == md.version("lora-zoo")


def test_environment_is_json_and_describes_this_machine():
    import os
    import platform

    e = provenance.environment()
    json.dumps(e)  # stored in the zoo's info
    assert e["cpu_count"] == os.cpu_count() and e["machine"] == platform.machine()
    assert e["python"] == platform.python_version()
    assert e["cpu"]
    assert e["gpus"] == env.gpu_names()
    assert isinstance(e["torch_threads"], int) and e["torch_threads"] >= 1
    # the full set of installed distributions, not a hand-picked list
    assert e["distributions"]["pytest"] == md.version("pytest")
    assert len(e["distributions"]) == len({d.metadata["Name"].lower() for d in md.distributions()})


def test_git_commit(tmp_path):
    assert provenance.git_commit(tmp_path) is None  # not a checkout
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    f = tmp_path / "a.txt"
    f.write_text("1")
    g = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*g, "add", "a.txt"], check=True)
    subprocess.run([*g, "commit", "-qm", "x"], check=True)
    head = subprocess.run(
        [*g, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert provenance.git_commit(tmp_path) == {"commit": head, "dirty": False}
    f.write_text("2")
    assert provenance.git_commit(tmp_path) == {"commit": head, "dirty": True}


@pytest.mark.parametrize("device,cpu,gpu", [("cpu", 1.0, 0.0), ("cuda:0", 0.0, 1.0)])
def test_timing_summary(device, cpu, gpu):
    t = provenance.timing_summary({"a": 1800.0, "b": 1800.00004}, device)
    assert t["device"] == device
    assert t["wall_time_s"] == {"a": 1800.0, "b": 1800.0}
    assert t["total_wall_s"] == 3600.0
    assert t["cpu_hours"] == cpu and t["gpu_hours"] == gpu


def test_collect():
    p = provenance.collect({"name": "toy"}, {"x": 2.0}, "cpu", extra={"note": 1})
    assert p["builder"] == {"name": "toy"} and p["timing"]["total_wall_s"] == 2.0
    assert p["note"] == 1 and "libraries" in p["environment"]
