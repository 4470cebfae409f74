"""``lora-zoo rebuild`` regenerates a zoo (or some LoRAs) from its stored recipe, and
``lora-zoo diff`` confirms it; also from a pip-installed (non-editable) lora-zoo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_zoo.cli import main
from lora_zoo.contrib.diff import diff_zoos
from lora_zoo.errors import BuildError
from lora_zoo.load.source import load_zoo
from lora_zoo.zoo.manifest import read_manifest, write_manifest
from tests.fixtures.hub_server import hub  # noqa: F401  (fixture)
from tests.fixtures.toy_builder import TOY_RECIPE, register

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = TOY_RECIPE.replace("steps: {kind: choice, values: [10, 20]}", "steps: 8")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    from lora_zoo.build.runner import build_from_recipe_text

    register()
    out = tmp_path_factory.mktemp("rebuild") / "toy"
    build_from_recipe_text(RECIPE, out, progress=False)
    return out


def test_full_rebuild_is_identical(built, tmp_path, capsys):
    register()
    assert main(["rebuild", str(built), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    rep = diff_zoos(built, tmp_path / "again")
    assert rep.equal, rep.format()
    assert rep.compared == 6 and rep.max_abs_weights == 0.0
    assert main(["diff", str(built), str(tmp_path / "again")]) == 0


def test_built_zoo_names_its_environment_and_rebuild_shows_drift(built, tmp_path, capsys):
    """The zoo carries every installed distribution (manifest + requirements.txt); a rebuild in
    another environment prints the drift table and says bit-identical bytes are not expected."""
    from lora_zoo import env

    stored = load_zoo(built).info["provenance"]["environment"]
    assert stored["distributions"] == env.distributions()
    req = (built / env.REQUIREMENTS_NAME).read_text()
    assert f"torch=={stored['distributions']['torch']}" in req.splitlines()
    assert main(["env", str(built)]) == 0
    out = capsys.readouterr().out
    assert "bit-identical output expected" in out and f"pip install -r {built}" in out
    # the same zoo as if built elsewhere: another torch and another CPU
    moved = tmp_path / "moved"
    shutil.copytree(built, moved)
    import fsspec

    m = read_manifest(fsspec.filesystem("file"), str(moved))
    m["info"]["provenance"]["environment"]["distributions"]["torch"] = "2.0.0"
    m["info"]["provenance"]["environment"]["cpu"] = "Another CPU"
    write_manifest(moved, m)
    register()
    assert main(["rebuild", str(moved), "--out", str(tmp_path / "re"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "environment drift" in out and "2.0.0" in out and "Another CPU" in out
    assert "not identical bytes" in out
    assert main(["diff", str(moved), str(tmp_path / "re")]) == 0  # same LoRAs, drift reported
    out = capsys.readouterr().out
    assert "environment drift" in out and "no differences" in out


def test_only_subset_rebuild(built, tmp_path):
    register()
    ids = load_zoo(built)["train"].ids[:2]
    assert (
        main(
            [
                "rebuild",
                str(built),
                "--out",
                str(tmp_path / "part"),
                "--only",
                ",".join(ids),
                "--no-progress",
            ]
        )
        == 0
    )
    part = load_zoo(tmp_path / "part")
    assert sorted(lid for s in part.splits for lid in part[s].ids) == sorted(ids)
    assert main(["diff", str(built), str(tmp_path / "part")]) == 1  # missing ids
    assert main(["diff", str(built), str(tmp_path / "part"), "--subset"]) == 0


def test_builder_version_drift_is_refused(built, tmp_path):
    register()
    drift = tmp_path / "drift"
    shutil.copytree(built, drift, ignore=shutil.ignore_patterns(".build*"))
    import fsspec

    m = read_manifest(fsspec.filesystem("file"), str(drift))
    m["info"]["builder"]["VERSION"] = "0"
    write_manifest(drift, m)
    with pytest.raises(BuildError, match="VERSION"):
        from lora_zoo.build.runner import rebuild_from_zoo

        rebuild_from_zoo(drift, tmp_path / "x", progress=False)
    assert main(["rebuild", str(drift), "--out", str(tmp_path / "y"), "--no-progress"]) == 1
    assert (
        main(["rebuild", str(drift), "--out", str(tmp_path / "z"), "--force", "--no-progress"]) == 0
    )


def test_rebuild_from_a_hub_repo(built, hub, tmp_path):  # noqa: F811
    from lora_zoo.remote.push import push

    register()
    push(built, "tester/toy", progress=False)
    assert main(["rebuild", "tester/toy", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    rep = diff_zoos("tester/toy", tmp_path / "r")
    assert rep.equal and rep.compared == 6, rep.format()


def test_only_rebuild_of_a_lora_from_a_split_chunk(built, tmp_path):
    register()
    lid = load_zoo(built)["test"].ids[0]
    assert (
        main(
            ["rebuild", str(built), "--out", str(tmp_path / "one"), "--only", lid, "--no-progress"]
        )
        == 0
    )
    rep = diff_zoos(built, tmp_path / "one", subset=True)
    assert rep.equal, rep.format()


_SKIP = shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__", ".pytest_cache")


def _ignore_outputs(d: str, names: list[str]) -> set[str]:
    """Build outputs and tests at the top only: lora_zoo/build/ is source."""
    top = {"build", "dist", "tests"} if Path(d) == REPO_ROOT else set()
    return set(_SKIP(d, names)) | (top & set(names))


@pytest.mark.slow
def test_pip_installed_lora_zoo_rebuilds(built, tmp_path):
    """A non-editable install in a fresh venv (deps reused via --system-site-packages) reads
    the stored recipe and regenerates the same LoRAs; the card templates ship in the wheel."""
    src = tmp_path / "src"
    shutil.copytree(
        REPO_ROOT,
        src,
        ignore=_ignore_outputs,
    )
    venv = tmp_path / "venv"
    base_py = REPO_ROOT / ".venv" / "bin" / "python"
    subprocess.run(
        [str(base_py), "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
    )
    # A venv made from a venv gets the *base* interpreter's site-packages; reuse the project
    # venv's installed deps (pip, setuptools, torch, ...) with a path entry instead. Its .pth
    # files (the editable install's finder) are not processed this way, so lora_zoo itself
    # can only come from the wheel installed below.
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = next((REPO_ROOT / ".venv" / "lib").glob("python3*/site-packages"))
    (site / "_project_deps.pth").write_text(f"{deps}\n")
    py = venv / "bin" / "python"
    r = subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # the toy builder is test code: give the subprocess a copy outside the repo
    plug = tmp_path / "plug"
    plug.mkdir()
    shutil.copy(REPO_ROOT / "tests" / "fixtures" / "toy_builder.py", plug / "toy_builder.py")
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(plug)!r})
        import lora_zoo, lora_zoo.cards
        from lora_zoo.cli import main
        import toy_builder
        toy_builder.register()
        rc = main(["rebuild", {str(built)!r}, "--out", {str(tmp_path / "wheel")!r},
                   "--no-progress"])
        print(json.dumps({{"rc": rc, "file": lora_zoo.__file__,
                           "cards": lora_zoo.cards.__file__}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [str(py), "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0
    site = str(venv)
    assert out["file"].startswith(site) and out["cards"].startswith(site)  # not the checkout
    rep = diff_zoos(built, tmp_path / "wheel")
    assert rep.equal, rep.format()
    assert "## Provenance" in (tmp_path / "wheel" / "README.md").read_text()
    assert sys.executable  # the test process itself is untouched
