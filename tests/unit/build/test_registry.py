"""registry.py: entry points, run-time registration, the LORA_ZOO_BUILDERS env var, and the
provenance of a builder (source hash)."""

from __future__ import annotations

import pytest

from lora_zoo.build import registry
from lora_zoo.errors import BuilderNotFoundError, BuildError
from tests.fixtures.toy_builder import ToyLinearBuilder

SPEC = "tests.fixtures.toy_builder:ToyLinearBuilder"


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.unregister_builder("toy_linear")
    yield
    registry.unregister_builder("toy_linear")


def test_entry_points_listed():
    names = registry.available_builders()
    assert "causal_lm" in names and "text_to_image" in names
    assert "toy_linear" not in names


def test_register_and_unregister():
    registry.register_builder(ToyLinearBuilder)
    assert registry.get_builder("toy_linear") is ToyLinearBuilder
    assert "toy_linear" in registry.available_builders()

    class Other(ToyLinearBuilder):
        pass

    with pytest.raises(BuildError, match="already registered"):
        registry.register_builder(Other, "toy_linear")
    registry.register_builder(Other, "toy_linear", replace=True)
    assert registry.get_builder("toy_linear") is Other
    registry.unregister_builder("toy_linear")
    with pytest.raises(BuilderNotFoundError):
        registry.get_builder("toy_linear")


def test_incomplete_class_refused():
    class NoTrain:
        NAME = "x"
        VERSION = "1"

    with pytest.raises(BuildError, match="lacks Config, train"):
        registry.register_builder(NoTrain)

    class NoName:
        pass

    with pytest.raises(BuildError, match="has no NAME"):
        registry.register_builder(NoName)


def test_not_found_suggests_close_names():
    with pytest.raises(BuilderNotFoundError, match="did you mean 'causal_lm'") as ei:
        registry.get_builder("causal_llm")
    assert ei.value.key == "builder"
    assert "lora_zoo.builders" in str(ei.value)


@pytest.mark.parametrize("value", [SPEC, f"toy_linear={SPEC}", f" other=x:y , {SPEC} "])
def test_env_var(monkeypatch, value):
    monkeypatch.setenv(registry.ENV_VAR, value)
    assert registry.get_builder("toy_linear") is ToyLinearBuilder
    assert "toy_linear" in registry.available_builders()


def test_env_var_named_alias_and_errors(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, f"my_toy={SPEC}")
    assert registry.get_builder("my_toy") is ToyLinearBuilder
    monkeypatch.setenv(registry.ENV_VAR, "broken=tests.fixtures.nope:X")
    with pytest.raises(BuildError, match="'tests.fixtures.nope:X' failed to load") as ei:
        registry.get_builder("broken")
    assert ei.value.key == "broken"
    monkeypatch.setenv(registry.ENV_VAR, "tests.fixtures.toy_builder:ToyConfig")
    with pytest.raises(BuildError, match="has no NAME"):
        registry.available_builders()
    monkeypatch.setenv(registry.ENV_VAR, "nocolon")
    with pytest.raises(BuildError, match=r"expected \[name=\]module:Class") as ei:
        registry.get_builder("x")
    assert ei.value.key == registry.ENV_VAR
    monkeypatch.setenv(registry.ENV_VAR, "bad=tests.fixtures.toy_builder:ToyConfig")
    with pytest.raises(BuildError, match="lacks"):
        registry.get_builder("bad")


def test_builder_info_and_source_hash(tmp_path, monkeypatch):
    registry.register_builder(ToyLinearBuilder)
    info = registry.builder_info("toy_linear")
    assert info["class"] == "tests.fixtures.toy_builder:ToyLinearBuilder"
    assert info["VERSION"] == "1" and len(info["source_sha256"]) == 64
    assert info == registry.builder_info("toy_linear")  # stable
    # the hash covers the module and what it imports from its own package: a fake package
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("X = 1\n")
    (pkg / "b.py").write_text(
        "from .helper import X\n"
        "from tests.fixtures.toy_builder import ToyLinearBuilder\n"
        "class B(ToyLinearBuilder):\n    NAME = 'fake'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("fakepkg.b")
    h1 = registry.source_hash(mod.B)
    (pkg / "helper.py").write_text("X = 2\n")
    assert registry.source_hash(mod.B) != h1
    (pkg / "helper.py").write_text("X = 1\n")
    assert registry.source_hash(mod.B) == h1


def test_causal_lm_entry_point_loads():
    cls = registry.get_builder("causal_lm")
    assert cls.NAME == "causal_lm"
    info = registry.builder_info("causal_lm")
    assert info["dist"] == "lora-zoo" and info["dist_version"]


def test_drift_detection_covers_the_engine_and_the_record(tmp_path, monkeypatch):
    """A change to the engine or the record changes a zoo's bytes as much as a builder change:
    the source hash a work dir / rebuild compares must see it."""
    from lora_zoo.build import registry

    real = registry._module_file
    before = registry.library_hash()
    copy = tmp_path / "record.py"
    copy.write_text(real("lora_zoo.record").read_text() + "\n# a change\n")
    monkeypatch.setattr(
        registry, "_module_file", lambda m: copy if m == "lora_zoo.record" else real(m)
    )
    assert registry.library_hash() != before
    info = registry.builder_info(next(iter(registry.available_builders())))
    assert info["library_sha256"] == registry.library_hash()
    assert {"builder_source_sha256", "source_sha256"} <= info.keys()
