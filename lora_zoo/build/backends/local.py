"""The in-process backend: one builder (one resident base model) trains every chunk; with a
``store`` it uploads each finished LoRA there too, exactly like a Ray worker (``results.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lora_zoo.build.backends import Backend, register_backend
from lora_zoo.errors import DeviceUnavailableError


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device: str) -> None:
    """Refuse ``cuda`` / ``cuda:N`` here when this process has no such CUDA device: a named
    error, one line, before any model is loaded (instead of a torch stack trace later)."""
    if not str(device).startswith("cuda"):
        return
    n = cuda_device_count()
    _, _, idx = str(device).partition(":")
    want = int(idx) if idx.isdigit() else 0
    if n == 0:
        raise DeviceUnavailableError(
            f"--device {device}: CUDA is not available here (torch sees no GPU); "
            "use --device cpu or run on a GPU machine",
            key="device",
        )
    if want >= n:
        raise DeviceUnavailableError(
            f"--device {device}: only {n} CUDA device(s) here", key="device"
        )


def local_trainer(recipe: Any, device: str, store: str | None = None, build: str = "") -> Any:
    check_device(device)
    builder = recipe.builder_cls(recipe.config, device=device)
    if store is None:
        return lambda chunk, attempt: builder.train(chunk)
    from lora_zoo.build.backends.results import from_plain, to_plain
    from lora_zoo.build.backends.store import open_store

    st = open_store(store)

    def train(chunk: Sequence[Any], attempt: int) -> list[Any]:
        return [from_plain(tl.job, to_plain(tl, st, build)) for tl in builder.train(chunk)]

    return train


def _trainer(
    recipe: Any,
    device: str,
    todo: Sequence[Sequence[Any]],
    *,
    store: str | None = None,
    build: str = "",
    options: Any = None,
) -> Any:
    return local_trainer(recipe, device, store, build)


register_backend(
    Backend(
        "local",
        _trainer,
        preflight=check_device,
        doc="one builder in this process trains every chunk",
    )
)
