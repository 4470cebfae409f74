"""The contract between the runner and a builder (a zoo family).

Recipes stop at ``plan.py``: a builder never sees a recipe, only its own validated ``Config``
(built from the recipe's builder-facing sections) and flat, fully resolved ``JobSpec``s. That
keeps builders testable in isolation and lets ``rebuild`` re-run a single job from a zoo.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel

from lora_zoo._io import cache_root, stable_permutation, tmp_path_for
from lora_zoo.errors import BuildError
from lora_zoo.record import LoraRecord

logger = logging.getLogger(__name__)

# Sections of a recipe that are handed to the builder's Config (validated there, extra=forbid).
BUILDER_SECTIONS = ("base_model", "lora", "data", "train", "eval", "builder_args", "poison")


@dataclass(frozen=True)
class JobSpec:
    """One LoRA to train, with every value resolved.

    ``seeds`` holds independent named streams derived in ``seeding.py`` from (recipe seed, index):
    at least ``init``, ``data`` (subset draw and data order) and ``dropout``; builders may find
    more there (``noise``, ``timestep``, ``eval``). ``hparams`` are the resolved per-LoRA
    hyperparameters (lr, weight_decay, epochs|steps, batch_size, dropout, r, alpha, ...).
    ``data`` is the resolved data selection (``groups_included``, ``groups_excluded``,
    ``subset_size``, optionally ``example_ids``). ``extra`` carries anything else varied per LoRA
    (e.g. ``prompt``).
    """

    index: int
    lora_id: str
    seeds: Mapping[str, int]
    hparams: Mapping[str, Any]
    data: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        return cls(
            index=int(d["index"]),
            lora_id=str(d["lora_id"]),
            seeds=dict(d.get("seeds", {})),
            hparams=dict(d.get("hparams", {})),
            data=dict(d.get("data", {})),
            extra=dict(d.get("extra", {})),
        )


@dataclass
class TrainedLora:
    """What a builder returns per job.

    ``metadata`` is what the LoRA *is* (training example ids, groups included, prompt, final
    train loss...); ``scores`` are its downstream labels (eval loss, accuracy, CLIP score, per-group
    losses...). Both must be JSON/Arrow-friendly: numbers, strings, bools, lists of those, or
    flat dicts of those. A failed job has ``status="failed"``, ``record=None`` and ``error`` set
    (``failed_step`` when the loss diverged); the runner records it and never packs it.
    """

    job: JobSpec
    record: LoraRecord | None
    metadata: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    status: Literal["done", "failed"] = "done"
    error: str | None = None
    failed_step: int | None = None
    wall_time_s: float = 0.0


@dataclass(frozen=True)
class CostModel:
    """What one LoRA of a builder's zoo costs, from its Config alone: no weights, no data
        download (``lora-zoo plan RECIPE --estimate``; builders that can say so define the
        classmethod ``cost_model(config, *, seq_len=None, examples=None, subset=None)``).

        FLOPs follow torch's ``FlopCounterMode`` (multiply-add = 2; matmuls, convolutions and
        attention only). ``samples_per_lora(hparams)``: training samples (rows or images) one LoRA
        consumes with those resolved hyperparameters; ``rows_per_pass(hparams)``: rows per LoRA in
    one forward. ``memory``: ``engine.memory.MemoryEstimate``
        of one training pass at K = 1 (``.at(k)`` for another K). ``assumptions``: each figure the
        estimate had to assume, printed beside it.
    """

    architecture: str
    train_flops_per_sample: float
    forward_flops_per_sample: float
    eval_flops_per_lora: float
    samples_per_lora: Callable[[Mapping[str, Any]], float]
    rows_per_pass: Callable[[Mapping[str, Any]], int]
    memory: Any
    assumptions: tuple[str, ...] = ()


@runtime_checkable
class Builder(Protocol):
    """A zoo family. Registered under the ``lora_zoo.builders`` entry-point group.

    ``VERSION`` must be bumped whenever the same job could produce different outputs, so
    ``rebuild`` can refuse silent drift.
    """

    NAME: ClassVar[str]
    VERSION: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def __init__(
        self, config: BaseModel, *, device: str = "cpu", cache_dir: str | None = None
    ) -> None: ...

    def train(self, jobs: Sequence[JobSpec]) -> list[TrainedLora]:
        """Train these jobs (the runner hands at most ``train.k`` at a time, sharing one
        batched pass) and return one TrainedLora per job, in order."""
        ...

    @classmethod
    def list_groups(cls, config: BaseModel) -> list[str]:
        """The group names of the data source (for recipes whose subset says
        ``groups: from_data``). Builders whose data has no groups return []."""
        ...


__all__ = [
    "BUILDER_SECTIONS",
    "Builder",
    "CostModel",
    "JobSpec",
    "TrainedLora",
    "base_key_digest",
    "cache_root",
    "cached_trained_base",
    "pretrain_lr_lambda",
    "stable_permutation",
]


def resolve_hparams(
    job: JobSpec,
    defaults: Mapping[str, Any],
    *,
    builder: str,
    positive_ints: Sequence[str] = (),
) -> dict[str, Any]:
    """A job's hyperparameters: the builder's recipe defaults overridden by ``job.hparams``.

    Why one function for every builder: the two builders used to resolve with different code,
    names and error keys, so one recipe typo read differently per family. Here an unknown key
    is an error naming the LoRA and the key (``lora-007.hparams.lrr``) with every known key,
    and counts that must be positive integers are checked, whatever the builder."""
    unknown = sorted(set(job.hparams) - set(defaults))
    if unknown:
        raise BuildError(
            f"unknown hyperparameter(s) {unknown} for builder {builder!r}; "
            f"known: {sorted(defaults)}",
            key=f"{job.lora_id}.hparams.{unknown[0]}",
        )
    hp = {**defaults, **job.hparams}
    for key in positive_ints:
        value = hp.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or int(value) != value or int(value) < 1:
            raise BuildError(
                f"must be a positive integer, got {value!r}", key=f"{job.lora_id}.hparams.{key}"
            )
        hp[key] = int(value)
    return hp


def base_key_digest(key_doc: Mapping[str, Any]) -> str:
    """The 16-hex-digit name of a from-config base: a hash of everything that determines its
    weights (config, seed, pretraining settings, data, torch version). Builders record it per
    LoRA (``base_model_hash``) so two zoos on the same base can be told apart from ones that
    only share a recipe name."""
    return hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]


def cached_trained_base(
    module: Any,
    key_doc: Mapping[str, Any],
    *,
    name: str,
    cache_dir: str | None,
    train: Callable[[], Mapping[str, Any]],
) -> dict[str, Any]:
    """Train ``module`` in place with ``train()`` once, or load the result from the cache.

    Why shared: every builder whose base is built from a config and then trained further
    (causal_lm's ``pretrain_steps``, text_to_image's) needs the same guarantees: each shard of a
    build and every rebuild uses the identical base without retraining it; the file lands
    atomically (concurrent shards never read half a base); and the stats ``train()`` returns
    (losses, weight change) travel in the file's metadata, so a LoRA's metadata does not depend
    on whether its worker found the cache. The file is
    ``$LORA_ZOO_CACHE/base_models/{name}-{digest}.safetensors``. Returns the stats.
    """
    from safetensors import safe_open
    from safetensors.torch import load_model, save_model

    key_text = json.dumps(key_doc, sort_keys=True)
    path = cache_root(cache_dir) / "base_models" / f"{name}-{base_key_digest(key_doc)}.safetensors"
    if path.exists():
        load_model(module, str(path), strict=True)
        logger.info("loaded trained base from cache %s", path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return dict(json.loads(meta.get("lora_zoo.pretrain", "{}")))
    stats = dict(train())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)  # the project's temp naming: hidden, pid-tagged, never *.safetensors
    try:
        save_model(
            module,
            str(tmp),
            metadata={"lora_zoo.key": key_text, "lora_zoo.pretrain": json.dumps(stats)},
        )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("trained base cached at %s", path)
    return stats


def pretrain_lr_lambda(steps: int) -> Callable[[int], float]:
    """The base pretraining schedule of every builder: linear warmup over the first tenth of
    the steps, then linear decay to zero (one definition, so the builders' bases are trained
    alike). For ``torch.optim.lr_scheduler.LambdaLR``."""
    return lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps)
