"""A trained chunk as plain data: what a worker sends back to the driver, and what the driver
makes of it again.

Why plain data: Ray's object store would pickle tensors; safetensors bytes and JSON-able dicts
are all that crosses a process boundary here. With a ``--store`` not even the bytes cross: the
worker validates, canonicalises and uploads each LoRA itself (``backends/store.py``) and the
driver gets a ``StoredLora`` (the result document plus where the weights are).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_zoo.build.api import JobSpec, TrainedLora
from lora_zoo.build.backends.store import LoraStore
from lora_zoo.build.workdir import _plain, result_doc
from lora_zoo.errors import LoraZooError
from lora_zoo.record import LoraRecord


@dataclass
class StoredLora:
    """A finished LoRA that lives in a store; the runner records ``ref`` instead of weights."""

    job: JobSpec
    doc: dict[str, Any] | None = None  # the work dir's result document (done only)
    ref: dict[str, Any] | None = None  # StoreRef.to_dict() (done only)
    status: str = "done"
    error: str | None = None
    failed_step: int | None = None
    wall_time_s: float | None = None
    record: None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def to_plain(tl: TrainedLora, store: LoraStore | None = None, build: str = "") -> dict[str, Any]:
    """Worker side: one builder result -> JSON-able dict (with ``store``: uploaded first)."""
    row: dict[str, Any] = {
        "status": tl.status,
        "error": tl.error,
        "failed_step": tl.failed_step,
        "wall_time_s": tl.wall_time_s,
    }
    if tl.status != "done" or tl.record is None:
        row = {**row, "status": "failed"}
        if store is not None:
            store.put_failure(store.job_dir(build, tl.job.index, tl.job.to_dict()), row)
        return row
    if store is None:
        return {
            **row,
            "weights": tl.record.to_safetensors_bytes(),
            "metadata": _plain(tl.metadata),
            "scores": _plain(tl.scores),
        }
    try:  # what the runner does for a local result, done here so bad weights are never uploaded
        tl.record.validate(file=tl.job.lora_id)
        weights = tl.record.to_safetensors_bytes()  # canonical header (record layer)
    except LoraZooError as e:
        row = {**row, "status": "failed", "error": str(e)}
        store.put_failure(store.job_dir(build, tl.job.index, tl.job.to_dict()), row)
        return row
    doc = result_doc(tl, weights)
    ref = store.put(store.job_dir(build, tl.job.index, tl.job.to_dict()), weights, doc)
    return {**row, "doc": doc, "ref": ref.to_dict()}


def from_plain(job: JobSpec, row: dict[str, Any]) -> TrainedLora | StoredLora:
    """Driver side: the inverse of ``to_plain``."""
    common = {
        "status": row["status"],
        "error": row["error"],
        "failed_step": row["failed_step"],
        "wall_time_s": row["wall_time_s"],
    }
    if "ref" in row:
        return StoredLora(job=job, doc=row["doc"], ref=row["ref"], **common)
    if "weights" not in row:
        return StoredLora(job=job, **common)  # a failure: nothing to record but the reason
    return TrainedLora(
        job=job,
        record=LoraRecord.from_safetensors_bytes(row["weights"]),
        metadata=row["metadata"],
        scores=row["scores"],
        **common,
    )
