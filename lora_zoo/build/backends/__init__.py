"""Where a build's chunks are trained: in this process (``local``) or on a Ray cluster
(``ray``). A backend returns ``train(chunk, attempt) -> list[TrainedLora]``; the runner owns
the work dir, retries and packing, so a backend never writes a zoo.

A backend is ONE file in this folder that registers a ``Backend`` with ``register_backend``
(``BACKENDS``, a ``lora_zoo.registry.Registry``, imports the folder's modules on the first
lookup; a distribution can add backends under the entry-point group ``lora_zoo.backends``).
The runner and ``lora-zoo build --backend`` read the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_zoo.errors import BuildError
from lora_zoo.registry import Registry


@dataclass(frozen=True)
class Backend:
    """One build backend.

    ``trainer(recipe, device, todo, *, store, build, options) -> train`` where
    ``train(chunk, attempt)`` returns the chunk's ``TrainedLora`` list (and may have a
    ``close()``); ``todo`` is every chunk the runner will hand it, ``store`` the ``--store`` URL,
    ``build`` the build's name in the store, ``options`` the backend's own settings (only the
    names in ``options``, e.g. Ray's ``address``). ``preflight(device)``: a cheap check run before
    any work dir is made (the local backend refuses a missing CUDA device there)."""

    name: str
    trainer: Callable[..., Any]
    preflight: Callable[[str], None] | None = None
    options: tuple[str, ...] = ()
    doc: str = ""


#: every build backend by name: this package's modules, run-time registrations, entry points
BACKENDS: Registry[Backend] = Registry(
    "build backend",
    key="backend",
    error=BuildError,
    packages=(__name__,),
    entry_points="lora_zoo.backends",
    hint="a backend is one file in lora_zoo/build/backends/ calling register_backend",
)


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Register ``backend`` under ``backend.name`` (a backend module calls this at import)."""
    BACKENDS.add(backend.name, backend, replace=replace, doc=backend.doc)
    return backend


def backend_names() -> list[str]:
    return BACKENDS.names()


def option_owner(option: str) -> str | None:
    """The backend that takes ``option`` (for "--address needs --backend ray")."""
    return next((n for n, b in BACKENDS.items() if option in b.options), None)


__all__ = ["BACKENDS", "Backend", "backend_names", "option_owner", "register_backend"]
