"""Builder discovery: entry points of group ``lora_zoo.builders``, resolved lazily.

Why entry points: the built-in builders are registered exactly as a third-party package would
register its own (``[project.entry-points."lora_zoo.builders"] my_zoo = "pkg.mod:MyBuilder"``),
so there is one path, and importing lora-zoo never imports torch-heavy builder code until a
recipe names it. ``register_builder`` adds classes at run time (tests, notebooks).

A third door, the environment variable ``LORA_ZOO_BUILDERS``, names builder classes without
installing a package: entries ``[name=]module:Class`` separated by commas. Why: a subprocess
(``python -m lora_zoo build``, a Slurm array task, a Ray worker) cannot see an in-process
``register_builder``; the env var travels with it. The name defaults to the class's ``NAME``.

For provenance (``builder_info``) we record the distribution that provides a builder, its
version, the builder's own ``VERSION`` and a SHA-256 over the source of the builder module and
the modules of its own package that it imports (transitively): a rebuild can then tell
"same VERSION but the code changed" (warn) from "different VERSION" (refuse).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata as md
import importlib.util
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lora_zoo.errors import BuilderNotFoundError, BuildError
from lora_zoo.registry import Registry

log = logging.getLogger(__name__)

GROUP = "lora_zoo.builders"
ENV_VAR = "LORA_ZOO_BUILDERS"

_env_loaded: dict[str, type] = {}  # "LORA_ZOO_BUILDERS:module:Class" -> class


def _check_class(name: str, cls: Any) -> None:
    missing = [a for a in ("NAME", "VERSION", "Config", "train") if not hasattr(cls, a)]
    if missing:
        raise BuildError(
            f"builder class {cls!r} lacks {', '.join(missing)} (see lora_zoo.build.api.Builder)",
            key=name,
        )


#: the builders: entry points of ``GROUP`` plus run-time registrations (``register_builder``);
#: ``LORA_ZOO_BUILDERS`` is read on top of it by ``get_builder`` / ``available_builders``
BUILDERS: Registry[type] = Registry(
    "builder",
    key="builder",
    error=BuilderNotFoundError,
    load_error=BuildError,
    entry_points=GROUP,
    check=_check_class,
    hint=f"builders register under the entry-point group {GROUP!r} or the {ENV_VAR} "
    "environment variable",
)


def _env_specs() -> dict[str | None, str]:
    """``LORA_ZOO_BUILDERS`` parsed: name (None = take the class's NAME) -> ``module:Class``."""
    out: dict[str | None, str] = {}
    for raw in os.environ.get(ENV_VAR, "").split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, target = item.rpartition("=")
        mod, colon, attr = target.partition(":")
        if not colon or not mod or not attr or (sep and not name.strip()):
            raise BuildError(f"bad entry {item!r}: expected [name=]module:Class", key=ENV_VAR)
        out[name.strip() if sep else None] = target.strip()
    return out


def _load_target(target: str, where: str) -> type:
    mod, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(mod.strip())
        for part in attr.strip().split("."):
            obj = getattr(obj, part)
    except Exception as e:  # say which plugin is broken, not just "ImportError"
        raise BuildError(f"builder {target!r} failed to load: {e}", key=where) from e
    return obj  # type: ignore[no-any-return]


def _env_builders() -> dict[str, str]:
    """Env-var builders by name; unnamed entries are imported to learn their ``NAME``."""
    out: dict[str, str] = {}
    for name, target in _env_specs().items():
        if name is None:
            cls = _load_target(target, ENV_VAR)
            name = getattr(cls, "NAME", None)
            if not name:
                raise BuildError(f"builder {target!r} has no NAME; use name={target}", key=ENV_VAR)
        out[str(name)] = target
    return out


def available_builders() -> list[str]:
    """Every builder name: entry points, ``LORA_ZOO_BUILDERS`` and registered ones (sorted)."""
    return sorted(set(BUILDERS.names()) | set(_env_builders()))


def register_builder(cls: type, name: str | None = None, *, replace: bool = False) -> type:
    """Register a builder class under ``name`` (default ``cls.NAME``); usable as a decorator."""
    name = name or getattr(cls, "NAME", None)
    if not name:
        raise BuildError(f"builder class {cls!r} has no NAME", key="NAME")
    BUILDERS.add(name, cls, replace=replace)
    return cls


def unregister_builder(name: str) -> None:
    """Drop a programmatic registration (tests)."""
    BUILDERS.unregister(name)


def get_builder(name: str) -> type:
    """The builder class for ``name``; BuilderNotFoundError lists close matches otherwise.
    Order: a run-time registration, then ``LORA_ZOO_BUILDERS`` (the explicit ask wins over an
    installed entry point), then the entry points."""
    if BUILDERS.is_registered(name) and "entry_point" not in BUILDERS.meta(name):
        return BUILDERS.get(name)
    env = _env_builders()
    if name in env:
        key = f"{ENV_VAR}:{env[name]}"
        if key not in _env_loaded:
            cls = _load_target(env[name], name)
            _check_class(name, cls)
            _env_loaded[key] = cls
        return _env_loaded[key]
    if name not in BUILDERS.names():
        raise BUILDERS.not_found(name, also=env)
    return BUILDERS.get(name)


def _module_file(modname: str) -> Path | None:
    mod = sys.modules.get(modname)
    f = getattr(mod, "__file__", None)
    if f is None:
        try:
            spec = importlib.util.find_spec(modname)
        except (ImportError, ValueError):
            return None
        f = spec.origin if spec is not None else None
    return Path(f) if f and str(f).endswith(".py") else None


def _same_package_imports(path: Path, modname: str, package: str) -> list[str]:
    """Modules of ``package`` that ``modname``'s source imports (absolute or relative)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    base = modname.rsplit(".", 1)[0] if "." in modname else ""
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                root = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{root}.{node.module}" if node.module else root
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]
    return [m for m in out if m.startswith(package + ".")]


#: library modules that shape a LoRA's bytes as much as the builder's own code does: the batched
#: engine, the record and its serialization, seeds, the plan and its distributions
SHAPING_MODULES = (
    "lora_zoo.engine",
    "lora_zoo.record",
    "lora_zoo._io",
    "lora_zoo.build.api",
    "lora_zoo.build.plan",
    "lora_zoo.seeding",
    "lora_zoo.build.space",
)


def library_hash() -> str:
    """SHA-256 over the sources of ``SHAPING_MODULES`` (a package: all its modules)."""
    files: dict[str, Path] = {}
    for name in SHAPING_MODULES:
        p = _module_file(name)
        if p is None:
            continue
        if p.name == "__init__.py":
            for f in sorted(p.parent.glob("*.py")):
                files[f"{name}.{f.stem}"] = f
        else:
            files[name] = p
    h = hashlib.sha256()
    for m in sorted(files):
        h.update(m.encode() + b"\0" + files[m].read_bytes() + b"\0")
    return h.hexdigest()


def source_hash(cls: type) -> str:
    """SHA-256 over the builder's own sources (``builder_source_hash``) and the library
    modules that shape its outputs (``library_hash``): a change to the engine or the record
    changes a zoo's bytes just as a change to the builder does, so drift detection covers
    both."""
    h = hashlib.sha256()
    h.update(builder_source_hash(cls).encode() + b"\0" + library_hash().encode())
    return h.hexdigest()


def builder_source_hash(cls: type) -> str:
    """SHA-256 over the builder module's source and, transitively, the sources of the modules
    of its own package it imports (files sorted by module name)."""
    modname = cls.__module__
    package = modname.rsplit(".", 1)[0] if "." in modname else modname
    seen: dict[str, Path] = {}
    todo = [modname]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        p = _module_file(m)
        if p is None:
            continue
        seen[m] = p
        todo += _same_package_imports(p, m, package)
    if not seen:  # e.g. a class defined in __main__ / a notebook
        try:
            src = inspect.getsource(cls).encode()
        except (OSError, TypeError):
            src = repr(cls).encode()
        return hashlib.sha256(src).hexdigest()
    h = hashlib.sha256()
    for m in sorted(seen):
        h.update(m.encode() + b"\0" + seen[m].read_bytes() + b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    """``importlib.metadata.packages_distributions`` scans every installed dist (~1 s on a
    big venv); it is asked once per build, so cache it for the process."""
    return dict(md.packages_distributions())


def _dist_of(cls: type) -> tuple[str | None, str | None]:
    top = cls.__module__.split(".")[0]
    names = _packages_distributions().get(top) or []
    if not names:
        return None, None
    try:
        return names[0], md.version(names[0])
    except md.PackageNotFoundError:  # pragma: no cover
        return names[0], None


def builder_info(name: str) -> dict[str, Any]:
    """Provenance of builder ``name``: name, class path, dist, dist version, VERSION, source."""
    cls = get_builder(name)
    meta = BUILDERS.meta(name) if BUILDERS.is_registered(name) else {}
    dist, dist_version = (meta["dist"], meta["dist_version"]) if "dist" in meta else _dist_of(cls)
    return {
        "name": name,
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "dist": dist,
        "dist_version": dist_version,
        "VERSION": str(cls.VERSION),
        "source_sha256": source_hash(cls),  # builder + library: what rebuild compares
        "builder_source_sha256": builder_source_hash(cls),
        "library_sha256": library_hash(),
    }
