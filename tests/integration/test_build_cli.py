"""The build verbs through the CLI: ``plan``, ``build``, ``status``, ``pack`` (in-process
via ``cli.main`` and once as a real ``python -m lora_zoo`` child using LORA_ZOO_BUILDERS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lora_zoo.build import runner
from lora_zoo.build.plan import plan
from lora_zoo.build.recipe import load_recipe
from lora_zoo.cli import main
from tests.fixtures.toy_builder import (
    TOY_ENV_SPEC,
    register,
    subprocess_env,
    toy_recipe,
    zoo_snapshot,
)


@pytest.fixture(autouse=True)
def _toy():
    register()


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "toy.yaml"
    p.write_text(toy_recipe(num_loras=5))
    return p


def test_plan_table_and_json(recipe, capsys):
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# toy: builder toy_linear, 5 LoRAs, k=2"
    assert out[1].split() == ["index", "lora_id", "hparams", "groups"]
    assert len(out) == 2 + 5 and out[2].split()[:2] == ["0", "toy-000"]
    assert main(["plan", str(recipe), "--json", "--limit", "2", "--set", "seed=8"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    want = plan(load_recipe(recipe, ["seed=8"]), limit=2)
    assert rows == [j.to_dict() for j in want]


def test_plan_bad_recipe_exits_1_with_every_problem(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(toy_recipe(num_loras=0, bogus=1))
    assert main(["plan", str(p)]) == 1
    err = capsys.readouterr().err
    assert f"{p}: num_loras - " in err and f"{p}: bogus - Extra inputs" in err
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 1
    assert "recipe file not found" in capsys.readouterr().err


def test_build_status_shards_pack(recipe, tmp_path, capsys):
    single = tmp_path / "single"
    assert main(["build", str(recipe), "--out", str(single), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "5 done, 0 failed, 0 pending" in out and f"zoo written to {single}" in out

    sh = tmp_path / "sharded"
    for i in range(2):
        assert (
            main(["build", str(recipe), "--out", str(sh), "--shard", f"{i}/2", "--no-progress"])
            == 0
        )
    capsys.readouterr()
    assert main(["status", str(sh)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("shard 0/2: pending 0, running 0, done 3, failed 0")
    assert out[1].endswith("shard 1/2: pending 0, running 0, done 2, failed 0")
    assert main(["status", str(sh), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert [w["counts"]["done"] for w in js] == [3, 2]
    assert main(["pack", str(sh), "--out", str(tmp_path / "merged")]) == 0
    assert "packed 5 LoRAs into" in capsys.readouterr().out
    assert zoo_snapshot(tmp_path / "merged") == zoo_snapshot(single)
    # a bad shard spec is one clean error line
    assert main(["build", str(recipe), "--out", str(sh), "--shard", "2/2"]) == 1
    assert "--shard must be I/N" in capsys.readouterr().err


def test_build_reports_failures_and_k(tmp_path, capsys):
    p = tmp_path / "nan.yaml"
    p.write_text(toy_recipe(num_loras=3, vary={"lr": {"kind": "cycle", "values": [0.05, 1.0e30]}}))
    assert main(["build", str(p), "--out", str(tmp_path / "z"), "--no-progress", "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 done, 1 failed, 0 pending" in out
    assert "failed toy-001 at step 1: loss is" in out
    assert json.loads((tmp_path / "z" / ".build" / "build.json").read_text())["k"] == 3
    assert main(["status", str(tmp_path / "z")]) == 0
    assert "failed toy-001 at step 1 (attempts 1): loss is" in capsys.readouterr().out


@pytest.mark.slow
def test_subprocess_cli_uses_env_registered_builder(recipe, tmp_path):
    env = subprocess_env()
    r = subprocess.run(
        [sys.executable, "-m", "lora_zoo", "plan", str(recipe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "toy-004" in r.stdout
    env.pop("LORA_ZOO_BUILDERS")
    r = subprocess.run(
        [sys.executable, "-m", "lora_zoo", "plan", str(recipe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    # the registry's one message form: the name typed, what exists, where builders come from
    assert "unknown builder 'toy_linear'" in r.stderr and "LORA_ZOO_BUILDERS" in r.stderr


@pytest.fixture
def ray_env(monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setenv("LORA_ZOO_BUILDERS", TOY_ENV_SPEC)
    monkeypatch.setenv("PYTHONPATH", root)
    ray = pytest.importorskip("ray")
    yield  # the runner starts Ray itself (all local CPUs: 2 workers here) and passes env on
    ray.shutdown()


@pytest.mark.slow
def test_ray_two_workers_equal_local(tmp_path, ray_env, monkeypatch):
    """``--backend ray``: a local Ray cluster builds the same zoo as the local backend."""
    ray = pytest.importorskip("ray")
    register()
    p = tmp_path / "toy.yaml"
    p.write_text(
        toy_recipe(num_loras=6, vary={"lr": {"kind": "cycle", "values": [0.05, 0.02, 1.0e30]}})
    )
    local = runner.build(p, tmp_path / "local", progress=False)

    def no_local(*a, **k):
        raise AssertionError("the ray backend trained in the driver")

    from lora_zoo.build.backends import local as local_backend

    monkeypatch.setattr(local_backend, "local_trainer", no_local)
    remote = runner.build(p, tmp_path / "ray", progress=False, backend="ray")
    assert remote.counts == local.counts == {"done": 4, "failed": 2, "pending": 0}
    assert [f["failed_step"] for f in remote.failed] == [f["failed_step"] for f in local.failed]
    assert zoo_snapshot(tmp_path / "ray") == zoo_snapshot(tmp_path / "local")
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] >= 2  # >= 2 parallel tasks
