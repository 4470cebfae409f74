"""The Ray backend: one actor per GPU (or per ``--workers N`` on CPU) keeps its builder, and so
the base model, resident across chunks; the driver hands out chunks and records results.

Why actors and not tasks: loading a base model is the costly part of a chunk; an actor loads
it once. Why a driver-side dispatcher: chunks are handed to whichever actor is idle (a slow
chunk does not hold the others back), while the runner still consumes results in chunk order
(so the work dir and packing stay deterministic). A worker process that dies mid-chunk
(``kill -9``, OOM, a lost node) fails that chunk's attempt; its actor is replaced, and the
runner's retry runs the chunk on the next idle actor, i.e. in another process.

With ``store`` (``--store URL``, see ``store.py``) each worker uploads its finished LoRAs itself
and returns only references, so the driver never holds weights. Without a store the weights
come back as safetensors bytes (plain data, never pickled tensors).
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lora_zoo.build.api import JobSpec
from lora_zoo.build.backends import Backend, register_backend
from lora_zoo.build.backends.local import cuda_device_count
from lora_zoo.build.backends.results import from_plain, to_plain
from lora_zoo.build.backends.store import open_store
from lora_zoo.build.recipe import Recipe
from lora_zoo.build.registry import ENV_VAR
from lora_zoo.errors import BuildError, DeviceUnavailableError

log = logging.getLogger(__name__)

#: options a caller may pass to ``ray_trainer`` (CLI flags of ``lora-zoo build``)
RAY_OPTIONS = ("address", "workers", "cpus_per_worker", "gpus_per_worker")


class ChunkWorker:
    """Ray actor body: one builder for the actor's lifetime; ``train`` runs one chunk."""

    def __init__(
        self, resolved: dict[str, Any], device: str, store_url: str | None, build: str
    ) -> None:
        from lora_zoo.build.recipe import validate

        recipe = validate(resolved, file="<ray worker>")
        self.builder = recipe.builder_cls(recipe.config, device=device)
        self.store = open_store(store_url) if store_url else None
        self.build = build

    def pid(self) -> int:
        return os.getpid()

    def train(self, job_dicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        jobs = [JobSpec.from_dict(d) for d in job_dicts]
        return [to_plain(tl, self.store, self.build) for tl in self.builder.train(jobs)]


class _Dispatcher:
    """Hands chunks to idle actors, collects results, replaces dead actors (module docstring).

    ``lookahead`` bounds how many chunks past the one the runner waits for may be running or
    finished-but-unconsumed (results without a store hold weights in driver memory)."""

    def __init__(
        self,
        ray: Any,
        make_actor: Any,
        n_workers: int,
        todo: Sequence[Sequence[JobSpec]],
        lookahead: int,
    ) -> None:
        self.ray = ray
        self.make_actor = make_actor
        self.order = [c[0].index for c in todo]
        self.chunks = {c[0].index: [j.to_dict() for j in c] for c in todo}
        self.queue: collections.deque[int] = collections.deque(self.order)
        self.idle = [make_actor() for _ in range(n_workers)]
        self.inflight: dict[Any, tuple[int, Any]] = {}
        self.results: dict[int, tuple[bool, Any]] = {}
        self.lookahead = lookahead
        self.replaced = 0

    def _pump(self, waiting_for: int) -> None:
        limit = self.order.index(waiting_for) + self.lookahead if waiting_for in self.order else 0
        while self.idle and self.queue:
            key = self.queue[0]
            if key != waiting_for and self.order.index(key) > limit:
                break
            self.queue.popleft()
            actor = self.idle.pop()
            self.inflight[actor.train.remote(self.chunks[key])] = (key, actor)

    def get(self, chunk: Sequence[JobSpec]) -> list[dict[str, Any]]:
        from ray.exceptions import RayActorError

        key = chunk[0].index
        if key not in self.chunks:
            self.order.append(key)
            self.chunks[key] = [j.to_dict() for j in chunk]
        running = {k for k, _ in self.inflight.values()}
        if key not in self.results and key not in running and key not in self.queue:
            self.queue.appendleft(key)  # a retry: first in line
        while key not in self.results:
            self._pump(key)
            ready, _ = self.ray.wait(list(self.inflight), num_returns=1)
            for ref in ready:
                done_key, actor = self.inflight.pop(ref)
                try:
                    self.results[done_key] = (True, self.ray.get(ref))
                    self.idle.append(actor)
                except RayActorError as e:  # the worker process died: new actor, chunk fails
                    log.warning("Ray worker died during chunk at job %d: %s", done_key, e)
                    self.results[done_key] = (False, e)
                    self.replaced += 1
                    self.idle.append(self.make_actor())
                except Exception as e:  # the builder raised: the actor is fine
                    self.results[done_key] = (False, e)
                    self.idle.append(actor)
        ok, value = self.results.pop(key)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        for actor in self.idle + [a for _, a in self.inflight.values()]:
            try:
                self.ray.kill(actor)
            except Exception:  # already dead
                pass
        self.idle, self.inflight = [], {}


class RayTrainer:
    """``train(chunk, attempt) -> results`` over a ``_Dispatcher``; ``close()`` frees the actors."""

    def __init__(self, dispatcher: _Dispatcher) -> None:
        self.dispatcher = dispatcher

    def __call__(self, chunk: Sequence[JobSpec], attempt: int) -> list[Any]:
        rows = self.dispatcher.get(chunk)
        return [from_plain(j, r) for j, r in zip(chunk, rows)]

    def close(self) -> None:
        self.dispatcher.close()


def ray_trainer(
    recipe: Recipe,
    device: str,
    todo: Sequence[Sequence[JobSpec]],
    *,
    store: str | None = None,
    build: str = "",
    options: Mapping[str, Any] | None = None,
) -> RayTrainer:
    """Start (or join, ``address``) a Ray cluster and the worker actors for ``todo``."""
    try:
        import ray
    except ImportError as e:
        raise BuildError(
            "--backend ray needs Ray: pip install 'lora-zoo[ray]'", key="backend"
        ) from e
    opts = dict(options or {})
    unknown = set(opts) - set(RAY_OPTIONS)
    if unknown:
        raise BuildError(f"unknown Ray option(s) {sorted(unknown)}", key="backend_options")
    if not ray.is_initialized():
        # workers must find the same builders as the driver: entry points come with the
        # installed package, LORA_ZOO_BUILDERS (and the PYTHONPATH it relies on) is passed on;
        # a class registered with register_builder() in the driver is invisible to them
        env = {v: os.environ[v] for v in (ENV_VAR, "PYTHONPATH") if os.environ.get(v)}
        ray.init(
            address=opts.get("address"),
            runtime_env={"env_vars": env} if env else None,
        )
    cuda = device.startswith("cuda")
    res = ray.cluster_resources()
    gpus = float(opts.get("gpus_per_worker") or (1 if cuda else 0))
    cpus = float(opts.get("cpus_per_worker") or 1)
    if cuda and res.get("GPU", 0) < gpus:
        raise DeviceUnavailableError(
            f"--device {device}: the Ray cluster has {res.get('GPU', 0):g} GPUs", key="device"
        )
    n = opts.get("workers")
    if n is None:
        n = int(res.get("GPU", 0) // gpus) if cuda else int(res.get("CPU", 1) // cpus)
    n = max(1, min(int(n), len(todo)))
    actor_cls = ray.remote(num_cpus=cpus, num_gpus=gpus)(ChunkWorker)
    # a retry must find a worker: the cluster needs room for n actors (checked by Ray itself)
    resolved = json.loads(json.dumps(recipe.resolved, default=str))
    log.info("Ray: %d worker actor(s), %g CPU + %g GPU each, store=%s", n, cpus, gpus, store)

    def make_actor() -> Any:
        return actor_cls.remote(resolved, device, store, build)

    return RayTrainer(_Dispatcher(ray, make_actor, n, todo, lookahead=max(8, 2 * n)))


register_backend(
    Backend(
        "ray",
        ray_trainer,
        options=RAY_OPTIONS,
        doc="one Ray actor per GPU (or --workers N) keeps its builder resident across chunks",
    )
)

__all__ = ["RAY_OPTIONS", "ChunkWorker", "RayTrainer", "cuda_device_count", "ray_trainer"]
