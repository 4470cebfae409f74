"""A real ``kill -9`` of ``python -m lora_zoo build`` at several points, then the same command
again: the final zoo must equal an uninterrupted build (ids, rows, weights bytes, info).

The toy builder is found by the child through ``LORA_ZOO_BUILDERS`` (registry.py) and sleeps
per LoRA so the kills land mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lora_zoo.cli import main as cli_main
from tests.fixtures.toy_builder import register, subprocess_env, toy_recipe, zoo_snapshot

pytestmark = pytest.mark.slow

N = 8


def _events(out: Path) -> list[dict]:
    p = out / ".build" / "state.jsonl"
    if not p.exists():
        return []
    evs = []
    for line in p.read_text().splitlines():
        try:
            evs.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return evs


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lora_zoo",
            "build",
            str(recipe),
            "--out",
            str(out),
            "--no-progress",
        ],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_when(proc: subprocess.Popen, cond, timeout: float = 90.0) -> bool:
    """SIGKILL ``proc`` as soon as ``cond()`` holds; False when it exited first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    raise AssertionError("condition never reached")


def _n_done(out: Path) -> int:
    return sum(e["state"] == "done" for e in _events(out))


def test_kill9_resume_equals_clean_build(tmp_path):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(toy_recipe(num_loras=N, builder_args={"sleep_s": 0.4}))

    # the uninterrupted reference build, in this process (same machine, same code)
    register()
    clean = tmp_path / "clean"
    assert cli_main(["build", str(recipe), "--out", str(clean), "--no-progress"]) == 0

    out = tmp_path / "killed"
    kills = []
    # 1) while the first chunk is running (nothing finished yet)
    p = _start(recipe, out)
    kills.append(_kill_when(p, lambda: any(e["state"] == "running" for e in _events(out))))
    assert _n_done(out) == 0
    # 2) mid-chunk: one LoRA of a chunk finished, its neighbour not yet
    p = _start(recipe, out)
    kills.append(_kill_when(p, lambda: _n_done(out) >= 3))
    # remember what was finished (recorded done): it must never be rewritten. A file whose job
    # has no done event yet (killed between the file's rename and the event) is rightly redone.
    done_now = {e["i"] for e in _events(out) if e["state"] == "done"}
    finished = {
        f.name: (f.stat().st_mtime_ns, f.stat().st_ino)
        for f in (out / ".build" / "loras").glob("*.safetensors")
        if int(f.stem) in done_now
    }
    assert finished
    # 3) after a few more
    p = _start(recipe, out)
    kills.append(_kill_when(p, lambda: _n_done(out) >= 6))
    # 4) every LoRA done: the child is packing (or about to)
    p = _start(recipe, out)
    kills.append(_kill_when(p, lambda: _n_done(out) >= N))
    assert kills[0] and kills[1], "the build finished before it could be killed"
    # the same command again, to the end
    p = _start(recipe, out)
    log = p.communicate(timeout=120)[0].decode()
    assert p.returncode == 0, log
    assert f"{N} done, 0 failed, 0 pending" in log

    # nothing finished was trained-and-written twice, nothing lost
    evs = _events(out)
    done_counts = Counter(e["i"] for e in evs if e["state"] == "done")
    assert sorted(done_counts) == list(range(N))
    assert set(done_counts.values()) == {1}, done_counts
    for name, (mtime, ino) in finished.items():
        st = (out / ".build" / "loras" / name).stat()
        assert (st.st_mtime_ns, st.st_ino) == (mtime, ino), f"{name} was rewritten"
    # the kills really interrupted work: some job ran more than once
    assert max(e.get("attempts", 1) for e in evs) >= 1
    assert sum(e["state"] == "running" for e in evs) > N

    a, b = zoo_snapshot(clean), zoo_snapshot(out)
    assert sorted(k for k in a if k not in ("info", "columns")) == ["test", "train"]
    for split in ("train", "test"):
        assert a[split]["ids"] == b[split]["ids"]
        assert a[split]["rows"] == b[split]["rows"]
        assert a[split]["weights"] == b[split]["weights"]  # bytes, not just values
    assert a["info"] == b["info"]
    assert a["columns"] == b["columns"]
    assert sum(len(a[s]["ids"]) for s in ("train", "test")) == N
    assert (out / "recipe.yaml").read_bytes() == (clean / "recipe.yaml").read_bytes()
    assert (out / "jobs.jsonl").read_bytes() == (clean / "jobs.jsonl").read_bytes()


def test_kill9_during_pack_then_rerun(tmp_path):
    """Train with --no-pack, then kill ``pack`` itself as soon as it starts writing; rerunning
    the build packs a complete zoo equal to a clean one."""
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(
        toy_recipe(
            num_loras=6, output={"dtype": "float32", "shard_rows": 1, "split": {"kind": "none"}}
        )
    )
    register()
    clean = tmp_path / "clean"
    assert cli_main(["build", str(recipe), "--out", str(clean), "--no-progress"]) == 0
    out = tmp_path / "out"
    assert cli_main(["build", str(recipe), "--out", str(out), "--no-progress", "--no-pack"]) == 0
    assert not (out / "lora_zoo.json").exists()

    data = out / "data"
    p = _start(recipe, out)
    killed = _kill_when(p, lambda: data.exists() and any(data.iterdir()), timeout=60)
    assert killed, "pack finished before it could be killed"
    if not (out / "lora_zoo.json").exists():  # caught mid-pack: no half zoo is readable
        from lora_zoo.errors import LoraZooError
        from lora_zoo.load.source import load_zoo

        with pytest.raises(LoraZooError):
            load_zoo(str(out))
    p = _start(recipe, out)
    log = p.communicate(timeout=120)[0].decode()
    assert p.returncode == 0, log
    assert zoo_snapshot(clean) == zoo_snapshot(out)
