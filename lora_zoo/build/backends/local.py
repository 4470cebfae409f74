"""The in-process backend: one builder (one resident base model) trains every chunk."""

from __future__ import annotations

from typing import Any

from lora_zoo.build.recipe import Recipe


def local_trainer(recipe: Recipe, device: str) -> Any:
    builder = recipe.builder_cls(recipe.config, device=device)
    return lambda chunk, attempt: builder.train(chunk)
