"""recipe.py: strict validation with every problem reported at once, includes, --set."""

from __future__ import annotations

import pytest
import yaml

from lora_zoo.build.recipe import (
    apply_overrides,
    deep_merge,
    load_recipe,
    load_recipe_text,
    parse_override,
    recipe_sha256,
)
from lora_zoo.errors import RecipeError
from tests.fixtures.toy_builder import TOY_RECIPE, ToyConfig, register, toy_recipe


@pytest.fixture(autouse=True)
def _toy():
    register()


def _problems(text: str, file: str = "r.yaml", **kw) -> list[str]:
    with pytest.raises(RecipeError) as ei:
        load_recipe_text(text, file=file, **kw)
    assert ei.value.file == file or file.startswith("<")
    return ei.value.problems


def test_toy_recipe_loads():
    r = load_recipe_text(TOY_RECIPE, file="toy.yaml")
    assert r.name == "toy" and r.seed == 7 and r.builder == "toy_linear" and r.k == 2
    assert isinstance(r.config, ToyConfig)
    assert r.config.lora.r == 2 and r.config.data.per_group == 16
    assert r.model.output.split.kind == "group"
    assert set(r.vary) == {"lr", "steps"}
    assert r.text == TOY_RECIPE
    assert r.resolved["num_loras"] == 6
    assert yaml.safe_load(r.resolved_yaml()) == r.resolved


def test_all_problems_at_once_with_dotted_fields():
    text = toy_recipe(
        bogus=1,
        seed="abc",
        subset={"groups": "from_data", "mode": "leave_out", "count": 1, "extra": 2},
        vary={
            "lr": {"kind": "loguniform", "low": 1e-3, "high": 1e-1, "x": 3},
            "steps": {"kind": "nope"},
            "r": {"kind": "choice", "values": [1, 2], "weights": [1]},
        },
        lora={"r": 0, "foo": 1},
        output={"split": {"kind": "group"}, "dtype": "int8"},
    )
    probs = _problems(text, "bad.yaml")
    fields = {p.split(" - ")[0] for p in probs}
    assert fields == {
        "bad.yaml: " + f
        for f in (
            "seed",
            "bogus",
            "subset.extra",
            "vary.lr.x",
            "vary.steps",
            "vary.r",
            "lora.r",
            "lora.foo",
            "output.split",
            "output.dtype",
        )
    }
    assert all(p.startswith("bad.yaml: ") and " - " in p for p in probs)
    msg = {p.split(" - ")[0].removeprefix("bad.yaml: "): p.split(" - ", 1)[1] for p in probs}
    assert "Extra inputs" in msg["bogus"] and "Extra inputs" in msg["lora.foo"]
    assert "weights has 1 entries" in msg["vary.r"]
    assert "group split needs key" in msg["output.split"]
    assert "nope" in msg["vary.steps"]
    err = pytest.raises(RecipeError, load_recipe_text, text, file="bad.yaml").value
    assert str(err).startswith("bad.yaml: invalid recipe:")


@pytest.mark.parametrize(
    "changes,field,needle",
    [
        ({"num_loras": 0}, "num_loras", "greater than or equal to 1"),
        ({"name": "has space"}, "name", "pattern"),
        ({"lora_id_format": "fixed"}, "lora_id_format", "must contain {index}"),
        ({"lora_id_format": "{nme}-{index}"}, "lora_id_format", "bad format string"),
        ({"builder": "toy_lineer"}, "builder", "did you mean 'toy_linear'"),
        ({"vary": {"lrr": 0.1}}, "vary.lrr", "did you mean 'lr'"),
        ({"subset": {"mode": "include", "groups": ["a"]}}, "subset", "needs count"),
        ({"subset": {"mode": "include", "count": 1}}, "subset", "needs groups"),
        ({"subset": {"groups": ["a", "a"], "mode": "all"}}, "subset", "duplicates"),
        (
            {"subset": {"groups": ["a"], "mode": "include", "count": {"kind": "x"}}},
            "subset.count",
            "x",
        ),
        (
            {"output": {"split": {"fractions": {"train": 0.5, "test": 0.2}}}},
            "output.split",
            "sum to",
        ),
        ({"output": {"shard_rows": 0}}, "output.shard_rows", "greater than"),
        ({"train": {"k": 0}}, "train.k", "greater than"),
        ({"train": {"kk": 2}}, "train.kk", "Extra inputs"),
        ({"eval": {"holdout": "x"}}, "eval.holdout", "integer"),
    ],
)
def test_single_problem_located(changes, field, needle):
    probs = _problems(toy_recipe(**changes))
    assert any(p.startswith(f"r.yaml: {field} - ") and needle in p for p in probs), probs


def test_yaml_and_shape_errors():
    assert "(yaml)" in _problems("name: [unclosed")[0]
    assert "a recipe is a YAML mapping" in _problems("- a\n- b\n")[0]
    probs = _problems("")  # empty file: every required field is missing at once
    assert {p.split(" - ")[0] for p in probs} >= {
        "r.yaml: name",
        "r.yaml: builder",
        "r.yaml: seed",
        "r.yaml: num_loras",
    }


def test_includes_merge_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text(TOY_RECIPE)
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("include: base.yaml\nnum_loras: 3\nlora: {r: 4}\nvary: {lr: 0.02}\n")
    r = load_recipe(child)
    assert r.model.num_loras == 3
    assert r.config.lora.r == 4 and r.config.lora.alpha == 4  # dicts merge key by key
    assert r.resolved["vary"]["lr"] == 0.02 and "steps" in r.resolved["vary"]
    assert "include" not in r.resolved
    # a list of includes: later ones win, the including file wins last
    (tmp_path / "sub" / "more.yaml").write_text("seed: 99\nnum_loras: 5\n")
    child.write_text("include: [base.yaml, more.yaml]\nnum_loras: 2\n")
    r = load_recipe(child)
    assert (r.seed, r.model.num_loras) == (99, 2)
    # the resolved dict alone reproduces the recipe (what a zoo stores)
    again = load_recipe_text(r.resolved_yaml())
    assert again.sha256() == r.sha256()


def test_include_errors(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("include: b.yaml\n")
    b.write_text("include: a.yaml\n")
    with pytest.raises(RecipeError, match="include cycle"):
        load_recipe(a)
    a.write_text("include: missing.yaml\n")
    with pytest.raises(RecipeError, match="'missing.yaml' not found"):
        load_recipe(a)
    a.write_text("include: {x: 1}\n")
    with pytest.raises(RecipeError, match="file name or a list"):
        load_recipe(a)
    with pytest.raises(RecipeError, match="include - includes must be resolved"):
        from lora_zoo.build.recipe import validate

        validate({**yaml.safe_load(TOY_RECIPE), "include": "x.yaml"})


def test_overrides(tmp_path):
    p = tmp_path / "toy.yaml"
    p.write_text(TOY_RECIPE)
    r = load_recipe(
        p,
        [
            "train.steps=5",
            "num_loras=3",
            "lora.r=4",
            "vary.r={kind: choice, values: [1, 2]}",
            "name=toy2",
        ],
    )
    assert r.config.train.steps == 5 and r.model.num_loras == 3 and r.config.lora.r == 4
    assert r.name == "toy2"
    assert r.vary["r"].values == [1, 2]
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("a=") == (["a"], "")
    assert parse_override("a=[x") == (["a"], "[x")  # not YAML: kept as a string
    for bad in ("nokey", "=3", "a..b=1"):
        with pytest.raises(RecipeError, match="expected key.path=value"):
            parse_override(bad)
    with pytest.raises(RecipeError, match="num_loras - is not a mapping"):
        apply_overrides({"num_loras": 3}, ["num_loras.x=1"])
    # an override that breaks validation is reported like any other field
    with pytest.raises(RecipeError, match=r"train.stepz - Extra inputs"):
        load_recipe(p, ["train.stepz=5"])


def test_missing_file_and_shipped_fallback(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_deep_merge_and_hash():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    out = deep_merge(base, {"a": {"y": [3]}, "c": 2})
    assert out == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}  # not mutated
    assert recipe_sha256({"a": 1, "b": 2}) == recipe_sha256({"b": 2, "a": 1})
    assert recipe_sha256({"a": 1}) != recipe_sha256({"a": 2})


def test_exponent_floats_are_floats():
    # PyYAML alone reads "3e-4" as a string; a const lr must reach the builder as a float
    r = load_recipe_text(toy_recipe(vary={"lr": "PLACEHOLDER"}).replace("PLACEHOLDER", "3e-4"))
    assert r.vary["lr"].value == 3e-4 and isinstance(r.vary["lr"].value, float)
    r = load_recipe_text(TOY_RECIPE, overrides=["train.lr=1e-2", "seed=12"])
    assert r.config.train.lr == 0.01 and r.seed == 12
