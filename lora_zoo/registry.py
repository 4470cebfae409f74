"""One registry pattern for every pluggable kind: builders, loader views, LoL models, ingest
formats, build backends.

Why one: a newcomer who has added one kind of plug-in knows how to add the others, and every
consumer (the runner, the bench, the CLI help, the docs test) asks the same three questions:
which names exist (``names``), give me this one (``get``, with close-match suggestions on a
typo, as lm-eval does), and what does it declare about itself (``meta``).

Where entries come from, resolved lazily (nothing is imported until a name is asked for):

- ``register(name)``: a decorator (or a call) in the module that defines the plug-in;
- ``packages``: every public submodule of these packages is imported once, on the first lookup,
  so a new plug-in is ONE new file in that folder (its decorator registers it);
- ``entry_points``: an importlib.metadata group, so a third-party distribution registers its
  plug-ins exactly as the built-in builders do; listed by name without importing them.

Tests register a tiny example with ``register`` and remove it with ``unregister`` (or use
``temporarily``).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.metadata as md
import logging
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar, overload

from lora_zoo.errors import LoraZooError, SelectionError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Registry(Generic[T]):
    """Named plug-ins of one kind (module docstring).

    ``kind``: what an entry is, for messages ("view", "LoL model"); ``key``: the error key (the
    option a user typed, e.g. "view", "--backend"); ``error``: raised for an unknown name;
    ``load_error``: raised when a plug-in fails to import or fails ``check``; ``check(name, obj)``
    validates an entry on registration and on lazy load; ``hint``: appended to "unknown name"
    errors (where plug-ins of this kind come from)."""

    def __init__(
        self,
        kind: str,
        *,
        key: str,
        error: type[LoraZooError] = SelectionError,
        load_error: type[LoraZooError] | None = None,
        packages: Sequence[str] = (),
        entry_points: str | None = None,
        check: Callable[[str, T], None] | None = None,
        hint: str = "",
    ) -> None:
        self.kind = kind
        self.key = key
        self.error = error
        self.load_error = load_error or error
        self.packages = tuple(packages)
        self.entry_points = entry_points
        self.check = check
        self.hint = hint
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._discovered = False

    # ---- registering ---------------------------------------------------------------------------
    @overload
    def register(self, name: str, obj: None = None, **meta: Any) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T, **meta: Any) -> T: ...
    def register(self, name: str, obj: T | None = None, **meta: Any) -> Any:
        """Register ``obj`` under ``name`` with metadata ``meta``; without ``obj``, a decorator.
        ``replace=True`` (in ``meta``) allows replacing a different entry of that name."""
        replace = bool(meta.pop("replace", False))

        def deco(o: T) -> T:
            self.add(name, o, replace=replace, **meta)
            return o

        return deco if obj is None else deco(obj)

    def add(self, name: str, obj: T, *, replace: bool = False, **meta: Any) -> None:
        """The non-decorator form of ``register``."""
        if not name or not isinstance(name, str):
            raise self.load_error(f"a {self.kind} needs a non-empty name", key=self.key)
        if not replace and name in self._entries and self._entries[name] != obj:
            raise self.load_error(
                f"a different {self.kind} is already registered under {name!r} "
                f"({self._entries[name]!r})",
                key=name,
            )
        if self.check is not None:
            self.check(name, obj)
        self._entries[name] = obj
        self._meta[name] = dict(meta)

    def unregister(self, name: str) -> None:
        """Drop an entry (tests); unknown names are ignored."""
        self._entries.pop(name, None)
        self._meta.pop(name, None)

    @contextlib.contextmanager
    def temporarily(self, name: str, obj: T, **meta: Any) -> Iterator[T]:
        """Register ``obj`` for the duration of a ``with`` block (tests, notebooks)."""
        self.add(name, obj, **meta)
        try:
            yield obj
        finally:
            self.unregister(name)

    # ---- looking up ----------------------------------------------------------------------------
    def _discover(self) -> None:
        """Import every public submodule of ``packages`` once (their decorators register)."""
        if self._discovered:
            return
        self._discovered = True  # before importing: a module that looks itself up must not loop
        for pkg_name in self.packages:
            pkg = importlib.import_module(pkg_name)
            for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
                if info.name.startswith("_"):
                    continue
                mod = f"{pkg_name}.{info.name}"
                try:
                    importlib.import_module(mod)
                except Exception as e:  # name the broken plug-in file, not just "ImportError"
                    raise self.load_error(
                        f"{self.kind} module {mod} failed to import: {e}", key=self.key
                    ) from e

    def _entry_point_map(self) -> dict[str, md.EntryPoint]:
        if self.entry_points is None:
            return {}
        return {ep.name: ep for ep in md.entry_points(group=self.entry_points)}

    def names(self) -> list[str]:
        """Every name (registered, discovered and entry points, the latter not imported), sorted."""
        self._discover()
        return sorted(set(self._entries) | set(self._entry_point_map()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def is_registered(self, name: str) -> bool:
        """Registered in this process (by a decorator or a call), without discovery."""
        return name in self._entries

    def get(self, name: str, *, file: str | None = None) -> T:
        """The entry for ``name``; ``error`` with close-match suggestions when there is none."""
        if name in self._entries:
            return self._entries[name]
        self._discover()
        if name in self._entries:
            return self._entries[name]
        eps = self._entry_point_map()
        if name in eps:
            return self._load_entry_point(name, eps[name])
        raise self.not_found(name, file=file)

    def _load_entry_point(self, name: str, ep: md.EntryPoint) -> T:
        try:
            obj = ep.load()
        except Exception as e:  # an installed plug-in that fails to import: say which one
            raise self.load_error(f"entry point {ep.value!r} failed to load: {e}", key=name) from e
        dist = getattr(ep, "dist", None)
        meta = {"dist": dist.metadata["Name"], "dist_version": dist.version} if dist else {}
        self.add(name, obj, replace=True, entry_point=ep.value, **meta)
        return obj

    def meta(self, name: str) -> dict[str, Any]:
        """What ``name`` declared at registration (loads it if it is not loaded yet)."""
        self.get(name)
        return dict(self._meta.get(name, {}))

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) for every name, loading entry points."""
        return [(n, self.get(n)) for n in self.names()]

    def suggest(self, name: str, also: Iterable[str] = ()) -> list[str]:
        """Up to three known names (plus ``also``) close to ``name``."""
        return difflib.get_close_matches(name, {*self.names(), *also}, n=3, cutoff=0.5)

    def not_found(
        self,
        name: str,
        *,
        file: str | None = None,
        also: Iterable[str] = (),
        key: str | None = None,
    ) -> LoraZooError:
        """The error for an unknown ``name``: close matches first, then every known name
        (``also``: names the caller knows from elsewhere, e.g. an environment variable)."""
        close = self.suggest(name, also)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(sorted({*self.names(), *also})) or "none"
        tail = f"; {self.hint}" if self.hint else ""
        return self.error(
            f"unknown {self.kind} {name!r}{hint} (available: {known}){tail}",
            file=file,
            key=key or self.key,
        )

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} loaded)"


__all__ = ["Registry"]
