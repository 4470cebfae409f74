"""A build never loses what a user added: a finished zoo is left alone by a re-run, and one
work dir takes one build at a time (the lock survives nothing but its holder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lora_zoo.build import runner
from lora_zoo.build.lock import OWNER_NAME
from lora_zoo.errors import BuildError
from lora_zoo.load.source import load_zoo
from lora_zoo.zoo.splits import make_named_split
from tests.fixtures.toy_builder import register, toy_recipe


@pytest.fixture
def recipe(tmp_path):
    register()
    p = tmp_path / "toy.yaml"
    p.write_text(toy_recipe(num_loras=4))
    return p


def test_build_on_a_finished_zoo_is_a_no_op_and_keeps_user_splits(recipe, tmp_path, caplog):
    out = tmp_path / "zoo"
    runner.build(recipe, out, progress=False)
    make_named_split(load_zoo(out), "mine", "random", "train=0.5,test=0.5", seed=3)
    (out / "NOTES.md").write_text("mine")
    manifest = (out / "lora_zoo.json").read_bytes()
    shards = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    with caplog.at_level("INFO", logger="lora_zoo.build.runner"):
        res = runner.build(recipe, out, progress=False)
    assert res.counts["pending"] == 0 and res.zoo == out
    assert "nothing to pack" in caplog.text
    assert (out / "lora_zoo.json").read_bytes() == manifest  # not even re-packed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == shards
    assert "mine" in load_zoo(out).named_splits and (out / "NOTES.md").read_text() == "mine"


def _holder(work_dir) -> subprocess.Popen:
    code = textwrap.dedent(
        f"""
        import time
        from lora_zoo.build.lock import work_dir_lock
        with work_dir_lock({str(work_dir)!r}):
            print("held", flush=True)
            time.sleep(600)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.slow
def test_second_build_on_a_work_dir_is_refused_and_a_killed_holder_frees_it(recipe, tmp_path):
    out = tmp_path / "zoo"
    wd = runner.work_dir_for(out, None)
    p = _holder(wd)
    try:
        note = json.loads((wd / OWNER_NAME).read_text())
        with pytest.raises(BuildError, match=f"pid {p.pid} on ") as e:
            runner.build(recipe, out, progress=False)
        assert e.value.key == "lock" and note["pid"] == p.pid
        assert not (out / "lora_zoo.json").exists()  # refused before any work
    finally:
        os.kill(p.pid, signal.SIGKILL)  # the holder dies without releasing anything
        p.wait()
    time.sleep(0.1)
    res = runner.build(recipe, out, progress=False)  # the stale lock is taken over
    assert res.counts == {"done": 4, "failed": 0, "pending": 0}
