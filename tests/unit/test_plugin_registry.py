"""lora_zoo/registry.py: registration, lookup with close-match suggestions, lazy discovery of a
package's modules (a plug-in is one new file), metadata, clean-up."""

from __future__ import annotations

import sys

import pytest

from lora_zoo.errors import BuildError, SelectionError
from lora_zoo.registry import Registry


def test_register_get_meta_and_unregister():
    reg: Registry[int] = Registry("widget", key="widget")
    reg.register("alpha", 1, doc="first")
    assert reg.register("beta")(2) == 2  # the decorator form returns the object
    assert reg.get("alpha") == 1 and reg.names() == ["alpha", "beta"]
    assert reg.meta("alpha") == {"doc": "first"}
    with pytest.raises(SelectionError, match="already registered"):
        reg.register("alpha", 3)
    reg.register("alpha", 3, replace=True)
    assert reg.get("alpha") == 3
    reg.unregister("alpha")
    assert "alpha" not in reg and reg.names() == ["beta"]
    with reg.temporarily("gamma", 4):
        assert reg.get("gamma") == 4
    assert "gamma" not in reg


def test_unknown_name_suggests_close_matches_and_lists_all():
    reg: Registry[int] = Registry("widget", key="--widget", error=BuildError, hint="see docs")
    for i, n in enumerate(("canonical", "factors", "svals")):
        reg.register(n, i)
    with pytest.raises(BuildError, match="did you mean 'canonical'") as ei:
        reg.get("canonicl", file="recipe.yaml")
    e = ei.value
    assert e.key == "--widget" and e.file == "recipe.yaml"
    assert "available: canonical, factors, svals" in str(e) and "see docs" in str(e)
    with pytest.raises(BuildError) as ei:
        reg.get("zzz")
    assert "did you mean" not in str(ei.value)


def test_check_runs_on_registration():
    def positive(name: str, obj: int) -> None:
        if obj <= 0:
            raise SelectionError("must be positive", key=name)

    reg: Registry[int] = Registry("widget", key="widget", check=positive)
    with pytest.raises(SelectionError, match="must be positive"):
        reg.register("neg", -1)
    assert "neg" not in reg


def test_a_new_file_in_the_package_is_discovered_lazily(tmp_path, monkeypatch):
    """The promise of every registry: a plug-in is one new file in its folder."""
    pkg = tmp_path / "plugpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from lora_zoo.registry import Registry\nREG = Registry('widget', key='widget', "
        "packages=(__name__,))\n"
    )
    (pkg / "one.py").write_text("from plugpkg import REG\nREG.register('one', 1)\n")
    (pkg / "_private.py").write_text("raise RuntimeError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import plugpkg

        assert "plugpkg.one" not in sys.modules  # nothing imported before a lookup
        assert plugpkg.REG.get("one") == 1
        (pkg / "broken.py").write_text("import no_such_module_anywhere\n")
        plugpkg.REG._discovered = False
        with pytest.raises(SelectionError, match="plugpkg.broken failed to import"):
            plugpkg.REG.names()
    finally:
        for m in [m for m in sys.modules if m.startswith("plugpkg")]:
            del sys.modules[m]
