"""Issue 19, the filesystem / text / recipe trust boundary: no-follow reads and writes, portable
names, the bounded YAML loader, card escaping, PEP 508 requirement lines, untrusted recipes."""

from __future__ import annotations

import os
import re
import time

import pytest

from lora_zoo._io import (
    atomic_write_bytes,
    check_case_collisions,
    load_untrusted_yaml,
    local_fs,
    open_regular,
    safe_relpath,
)
from lora_zoo.errors import PathEscapeError, RecipeError, ZooFormatError

# ---- portable names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p",
    [
        "data/CON.parquet",
        "data/nul",
        "data/Com1.json",
        "splits/lpt9.x.json",
        "data/aux",
        "data/a.",
        "data/a ",
        "data/a:b",
        "data/a<b",
        "data/a|b",
        "data/a?b",
        "data/a*b",
        'data/a"b',
        "data/a\tb",
        "data/x\x1fy",
    ],  # fmt: skip
)
def test_safe_relpath_refuses_names_windows_or_macos_cannot_hold(p):
    with pytest.raises(PathEscapeError) as e:
        safe_relpath(p, file="m.json", key="k")
    assert e.value.file == "m.json" and e.value.key == "k"


def test_safe_relpath_keeps_names_that_only_look_reserved():
    for p in ("data/console.parquet", "data/com10.json", "data/nul_train.parquet", "data/a.b"):
        assert safe_relpath(p) == p


def test_case_only_collisions_are_refused_once_per_manifest():
    check_case_collisions([("a", "data/x.parquet"), ("b", "data/y.parquet")])
    with pytest.raises(PathEscapeError, match="differ only by case") as e:
        check_case_collisions([("a", "data/x.parquet"), ("b", "data/X.parquet")], file="m")
    assert e.value.key == "b"


# ---- no-follow reads and writes ----------------------------------------------------------------


def test_open_regular_refuses_a_symlink_a_fifo_and_a_symlinked_folder(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t")
    zoo = tmp_path / "zoo"
    (zoo / "data").mkdir(parents=True)
    (zoo / "data" / "link").symlink_to(secret)
    with pytest.raises(PathEscapeError, match="symlink"):
        open_regular(zoo / "data" / "link", root=zoo)
    os.mkfifo(zoo / "data" / "fifo")
    t0 = time.monotonic()
    with pytest.raises(PathEscapeError, match="not a regular file"):
        open_regular(zoo / "data" / "fifo", root=zoo)  # refused at once, never blocks
    assert time.monotonic() - t0 < 5
    (zoo / "linked").symlink_to(tmp_path)
    with pytest.raises(PathEscapeError, match="symlinked folder"):
        open_regular(zoo / "linked" / "secret", root=zoo)
    fs = local_fs(zoo)
    with pytest.raises(PathEscapeError):
        fs.open(str(zoo / "data" / "link"), "rb")
    assert fs.find(str(zoo)) == []  # links and FIFOs are never listed, so never copied


def test_writes_never_follow_a_symlinked_folder_or_target(tmp_path):
    outside, zoo = tmp_path / "outside", tmp_path / "zoo"
    outside.mkdir()
    zoo.mkdir()
    (zoo / "plots").symlink_to(outside)
    with pytest.raises(PathEscapeError, match="symlinked folder"):
        atomic_write_bytes(zoo / "plots" / "a.png", b"x", root=zoo)
    (zoo / "README.md").symlink_to(outside / "victim")
    with pytest.raises(PathEscapeError, match="symlink"):
        atomic_write_bytes(zoo / "README.md", b"x", root=zoo)
    linked_root = tmp_path / "linked_zoo"
    linked_root.symlink_to(outside)
    with pytest.raises(PathEscapeError):
        atomic_write_bytes(linked_root / "lora_zoo.json", b"{}")
    assert list(outside.iterdir()) == []


def test_card_refuses_a_symlinked_plots_folder(tmp_path):
    from lora_zoo.cards import write_card
    from tests.fixtures.zoos import make_zoo

    z = make_zoo(tmp_path / "z", n=4)
    outside = tmp_path / "outside"
    outside.mkdir()
    (z / "plots").symlink_to(outside)
    with pytest.raises(PathEscapeError):
        write_card(z)
    assert list(outside.iterdir()) == []


# ---- untrusted YAML --------------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi")
)


def test_yaml_loader_refuses_aliases_depth_and_size_before_building_objects():
    with pytest.raises(ZooFormatError, match="anchor") as e:
        load_untrusted_yaml(BOMB, file="README.md", key="header")
    assert e.value.file == "README.md" and e.value.key == "header"
    with pytest.raises(ZooFormatError, match="nested deeper"):
        load_untrusted_yaml("a: " + "[" * 200 + "]" * 200, file="r")
    with pytest.raises(ZooFormatError, match="cap"):
        load_untrusted_yaml("a: " + "x" * (2 << 20), file="r")
    with pytest.raises(ZooFormatError, match="does not parse"):
        load_untrusted_yaml("a: [", file="r")
    with pytest.raises(ZooFormatError, match="does not parse"):  # refused by the reader itself
        load_untrusted_yaml("\x93: x", file="r")  # (found by the fuzzer: it escaped as ReaderError)
    assert load_untrusted_yaml("configs: [{config_name: default}]") == {
        "configs": [{"config_name": "default"}]
    }


def test_verify_names_an_alias_bomb_in_the_readme_header(tmp_path):
    from lora_zoo.zoo.manifest import verify
    from tests.fixtures.zoos import make_zoo

    z = make_zoo(tmp_path / "z", n=4)
    (z / "README.md").write_text("---\n" + BOMB + "---\n# card\n")
    t0 = time.monotonic()
    problems = verify(z)
    assert time.monotonic() - t0 < 30
    assert any("README.md" in p and "alias" in p or "anchor" in p for p in problems), problems


# ---- cards -----------------------------------------------------------------------------------

HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)> [x](javascript:a) ` | \n# h"


def test_md_escapes_every_markdown_and_html_construct():
    from lora_zoo.cards.render import fence_for, md

    out = md(HOSTILE)
    for bad in ("<", ">", "`", "|", "\n", "[", "]", "://"):
        assert bad not in out.replace("&#", ""), (bad, out)
    assert md("eval_loss") == "eval_loss" and md("q_proj.lora_A") == "q_proj.lora_A"
    text = "a\n````\n<script>x</script>\n`````"
    assert len(fence_for(text)) == 6 and fence_for("plain") == "```"


def test_a_card_with_hostile_strings_is_inert_and_still_verifies(tmp_path):
    from lora_zoo.cards import write_card
    from lora_zoo.zoo.manifest import read_manifest, verify, write_manifest
    from tests.fixtures.zoos import make_zoo

    z = make_zoo(tmp_path / "z", n=4)
    m = read_manifest(local_fs(z), str(z))
    m["info"]["recipe"] = "name: x\n```\n" + HOSTILE + "\n```\n"
    m["info"]["builder"] = {"name": HOSTILE, "VERSION": HOSTILE}
    m["info"]["provenance"] = {"environment": {"cpu": HOSTILE, "python": HOSTILE}}
    write_manifest(z, m)
    text = write_card(z, plots=False).read_text()
    body = text.split("---", 2)[2]
    fence = re.search(r"^(`{3,})yaml$", body, re.M).group(1)
    recipe_block = body.split(fence + "yaml\n", 1)[1].split("\n" + fence + "\n", 1)
    assert len(recipe_block) == 2 and HOSTILE.split("\n")[0] in recipe_block[0]  # fenced
    outside = recipe_block[1] + body.split(fence + "yaml\n", 1)[0]
    for bad in ("<script", "<img", "onerror=alert(2)>", "](javascript"):
        assert bad not in outside, bad
    assert verify(z) == []


# ---- env --write -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("--index-url https://evil/simple x", "1"),
        ("x", "1\n--index-url https://evil"),
        ("-e git+https://evil/x#egg", "1"),
        ("x", "1 ; python_version>'3'"),
        ("x @ https://e/x.whl", "1"),
        ("x[y]", "1"),
        ("x", ">=1"),
        ("x", "1.0,<2"),
        ("x", ""),
    ],  # fmt: skip
)
def test_requirement_lines_refuse_anything_but_a_plain_pin(name, version):
    from lora_zoo.env import requirements_text

    with pytest.raises(ZooFormatError, match="PEP 508") as e:
        requirements_text({"distributions": {"torch": "2.13.0+cpu", name: version}}, file="m")
    assert e.value.key == "info.provenance.environment.distributions"


def test_requirement_lines_keep_real_pins_and_sanitise_comments():
    from lora_zoo.env import requirements_text

    text = requirements_text(
        {"python": "3.11\n--index-url https://evil", "distributions":
         {"torch": "2.13.0+cpu", "numpy": "2.1.0", "lm_eval": "0.4.8.dev1", "a.b-c": "1!2.0rc1.post3"}}
    )  # fmt: skip
    lines = [x for x in text.splitlines() if not x.startswith("#")]
    assert lines == ["--extra-index-url https://download.pytorch.org/whl/cpu", "torch==2.13.0+cpu",
                     "numpy==2.1.0", "lm_eval==0.4.8.dev1", "a.b-c==1!2.0rc1.post3"]  # fmt: skip


# ---- untrusted recipes -------------------------------------------------------------------------


def test_a_stored_recipe_reads_no_local_path_unless_allowed(tmp_path):
    from lora_zoo.build.recipe import load_recipe_text
    from tests.fixtures.toy_builder import TOY_RECIPE, register

    register()
    secret = tmp_path / "secret.yaml"
    secret.write_text("seed: 1\n")
    text = f"include: {secret}\n" + TOY_RECIPE
    with pytest.raises(RecipeError) as e:
        load_recipe_text(text, file="<stored recipe>", allow_paths=[])
    assert str(secret) in str(e.value) and "include" in str(e.value)
    rec = load_recipe_text(text, file="<stored recipe>", allow_paths=[tmp_path])
    assert rec.seed == 7
    text = TOY_RECIPE.replace("per_group: 16}", f"per_group: 16, paths: [{tmp_path}/x.jsonl]}}")
    with pytest.raises(RecipeError, match="data.paths.0"):
        load_recipe_text(text, file="<stored recipe>", allow_paths=[])


def test_rebuild_refuses_an_absolute_include_in_the_stored_recipe(tmp_path):
    from lora_zoo.build.runner import build_from_recipe_text
    from tests.fixtures.toy_builder import TOY_RECIPE, register

    register()
    secret = tmp_path / "secret.yaml"
    secret.write_text("seed: 1\n")
    with pytest.raises(RecipeError, match=re.escape(str(secret))):
        build_from_recipe_text(f"include: {secret}\n" + TOY_RECIPE, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("num_loras: 6", "num_loras: 100000000000", "num_loras"),
        ('"toy-{index:03d}"', '"toy-{index:0999999999d}"', "lora_id_format"),
        ('"toy-{index:03d}"', '"toy-{index:0999d}"', "lora_id_format"),
        ("train: {k: 2}", "train: {k: 1000000000}", "train.k"),
        ("values: [10, 20]", "values: [10, 2000000000]", "vary.steps"),
        ("name: toy", "name: " + "t" * 5000, "name"),
    ],  # fmt: skip
)
def test_recipe_sizes_are_bounded_before_allocation(old, new, where):
    from lora_zoo.build.recipe import load_recipe_text
    from tests.fixtures.toy_builder import TOY_RECIPE, register

    register()
    with pytest.raises(RecipeError) as e:
        load_recipe_text(TOY_RECIPE.replace(old, new), file="r.yaml")
    assert any(where in p for p in e.value.problems), e.value.problems
