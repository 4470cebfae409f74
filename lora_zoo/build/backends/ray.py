"""The Ray backend: chunks become Ray tasks; each worker process keeps its builder (and base
model) between tasks. Results travel as plain data (safetensors bytes), never pickled tensors."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from lora_zoo.build.api import JobSpec, TrainedLora
from lora_zoo.build.recipe import Recipe
from lora_zoo.build.registry import ENV_VAR
from lora_zoo.build.workdir import _plain
from lora_zoo.errors import BuildError
from lora_zoo.record import LoraRecord

#: the builder a Ray worker process keeps between tasks (one recipe at a time)
_WORKER_BUILDER: dict[tuple[str, str], Any] = {}


def _ray_chunk(
    resolved: dict[str, Any], job_dicts: list[dict[str, Any]], device: str
) -> list[dict[str, Any]]:
    """Ray task body: rebuild the recipe from its resolved dict, train one chunk, return plain
    data (safetensors bytes, never pickled tensors)."""
    from lora_zoo.build.recipe import validate

    key = (json.dumps(resolved, sort_keys=True, default=str), device)
    builder = _WORKER_BUILDER.get(key)
    if builder is None:  # once per worker process: loading a base model is the costly part
        recipe = validate(resolved, file="<ray task>")
        builder = recipe.builder_cls(recipe.config, device=device)
        _WORKER_BUILDER.clear()
        _WORKER_BUILDER[key] = builder
    out = []
    for tl in builder.train([JobSpec.from_dict(d) for d in job_dicts]):
        out.append(
            {
                "weights": tl.record.to_safetensors_bytes() if tl.record else None,
                "metadata": _plain(tl.metadata),
                "scores": _plain(tl.scores),
                "status": tl.status,
                "error": tl.error,
                "failed_step": tl.failed_step,
                "wall_time_s": tl.wall_time_s,
            }
        )
    return out


def ray_trainer(recipe: Recipe, device: str, todo: Sequence[Sequence[JobSpec]]) -> Any:
    """Submit every pending chunk as a Ray task up front; the driver consumes them in chunk
    order (so the work dir and packing stay deterministic) and resubmits a failed attempt."""
    try:
        import ray
    except ImportError as e:
        raise BuildError(
            "--backend ray needs Ray: pip install 'lora-zoo[ray]'", key="backend"
        ) from e
    if not ray.is_initialized():
        # workers must find the same builders as the driver: entry points come with the
        # installed package, LORA_ZOO_BUILDERS (and the PYTHONPATH it relies on) is passed on;
        # a class registered with register_builder() in the driver is invisible to them
        env = {v: os.environ[v] for v in (ENV_VAR, "PYTHONPATH") if os.environ.get(v)}
        ray.init(runtime_env={"env_vars": env} if env else None)
    task = ray.remote(num_gpus=1 if device.startswith("cuda") else 0)(_ray_chunk)

    def submit(chunk: Sequence[JobSpec]) -> Any:
        return task.remote(recipe.resolved, [j.to_dict() for j in chunk], device)

    refs = {chunk[0].index: submit(chunk) for chunk in todo}

    def train(chunk: Sequence[JobSpec], attempt: int) -> list[TrainedLora]:
        ref = refs.pop(chunk[0].index, None) if attempt == 1 else None
        rows = ray.get(ref if ref is not None else submit(chunk))
        return [
            TrainedLora(
                job=j,
                record=(
                    LoraRecord.from_safetensors_bytes(r["weights"])
                    if r["weights"] is not None
                    else None
                ),
                metadata=r["metadata"],
                scores=r["scores"],
                status=r["status"],
                error=r["error"],
                failed_step=r["failed_step"],
                wall_time_s=r["wall_time_s"],
            )
            for j, r in zip(chunk, rows)
        ]

    return train
