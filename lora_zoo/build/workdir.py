"""A build's work dir: the append-only job state log and the finished LoRAs, crash-safe.

Why a log plus files and no database: a ``kill -9`` can land anywhere, and both an append of
one fsynced line and a rename are atomic on POSIX file systems. ``runner.py`` explains the
layout and the recovery rules; this module implements them (split out of runner.py, which
re-exports everything here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lora_zoo._io import atomic_write_bytes, check_write_target, read_regular, safe_mkdirs
from lora_zoo.build import plan as planlib
from lora_zoo.build.api import JobSpec, TrainedLora
from lora_zoo.build.recipe import Recipe
from lora_zoo.errors import BuildError

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


def work_dir_for(out: str | os.PathLike[str], shard: tuple[int, int] | None = None) -> Path:
    out = Path(out)
    return out / ".build" if shard is None else out / f".build-shard-{shard[0]}-of-{shard[1]}"


def parse_shard(text: str) -> tuple[int, int]:
    """``"0/4"`` -> (0, 4)."""
    i, sep, n = text.partition("/")
    try:
        si, sn = int(i), int(n)
    except ValueError:
        si = sn = -1
    if not sep or sn < 1 or not 0 <= si < sn:
        raise BuildError(f"--shard must be I/N with 0 <= I < N, got {text!r}", key="shard")
    return si, sn


def _plain(v: Any) -> Any:
    """JSON-able copy (numpy / torch scalars -> Python, tuples -> lists)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    return v


def result_doc(tl: TrainedLora, weights: bytes) -> dict[str, Any]:
    """The JSON document of one finished LoRA (work dir and ``--store`` write the same one)."""
    doc = {
        "index": tl.job.index,
        "lora_id": tl.job.lora_id,
        "job": tl.job.to_dict(),
        "metadata": _plain(tl.metadata),
        "scores": _plain(tl.scores),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    try:
        json.dumps(doc, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise BuildError(
            f"builder metadata/scores are not JSON-able: {e}", key=tl.job.lora_id
        ) from e
    return doc


@dataclass
class JobState:
    state: str = PENDING
    attempts: int = 0
    reason: str | None = None
    failed_step: int | None = None
    diverged: bool = False
    wall_time_s: float | None = None


class WorkDir:
    """One build's (or shard's) on-disk state; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.loras = self.root / "loras"
        self.log_path = self.root / "state.jsonl"

    # ---- creation / checks ------------------------------------------------------------------
    def init(
        self,
        recipe: Recipe,
        jobs: Sequence[JobSpec],
        shard: tuple[int, int] | None,
        builder: dict[str, Any],
        *,
        k: int | None = None,
        all_indices: Sequence[int] | None = None,
    ) -> None:
        """Create the work dir, or check that an existing one is for the same build.

        ``k`` is part of a build's identity: it decides which LoRAs share a batched pass, and
        so (for batched builders) their bits. ``all_indices`` are the jobs of the whole build
        (every shard): ``pack`` uses them to refuse a merge that misses a shard."""
        meta = {
            "recipe_sha256": recipe.sha256(),
            "shard": list(shard) if shard else None,
            "num_loras": recipe.model.num_loras,
            "indices": [j.index for j in jobs],
            "builder": builder,
            "k": k,
            "all_indices": list(all_indices) if all_indices is not None else None,
        }
        bj = self.root / "build.json"
        if bj.exists():
            old = self.meta()
            for key in ("recipe_sha256", "shard", "indices", "k"):
                if key not in old and key == "k":
                    continue  # work dir from before k was recorded
                if old.get(key) != meta[key]:
                    raise BuildError(
                        f"this work dir holds a different build ({key} differs); "
                        "use another --out or delete it",
                        file=bj,
                        key=key,
                    )
            if old["builder"]["VERSION"] != builder["VERSION"]:
                raise BuildError(
                    f"work dir was started with builder VERSION "
                    f"{old['builder']['VERSION']}, installed is {builder['VERSION']}",
                    file=bj,
                    key="builder.VERSION",
                )
            if old["builder"]["source_sha256"] != builder["source_sha256"]:
                log.warning("builder source changed since this build started (%s)", bj)
            return
        safe_mkdirs(self.root, "loras")  # a symlinked work dir / loras/ must not redirect writes
        r = self.root
        atomic_write_bytes(r / "recipe.yaml", recipe.resolved_yaml().encode(), root=r)
        atomic_write_bytes(r / "recipe.orig.yaml", recipe.text.encode(), root=r)
        atomic_write_bytes(r / "jobs.jsonl", planlib.jobs_to_jsonl(jobs).encode(), root=r)
        atomic_write_bytes(bj, json.dumps(meta, indent=1, sort_keys=True).encode(), root=r)

    def meta(self) -> dict[str, Any]:
        p = self.root / "build.json"
        if not p.exists():
            raise BuildError("not a build work dir (no build.json)", file=self.root)
        return json.loads(read_regular(p, root=self.root))

    def jobs(self) -> list[JobSpec]:
        return planlib.jobs_from_jsonl(
            read_regular(self.root / "jobs.jsonl", root=self.root).decode()
        )

    def resolved(self) -> dict[str, Any]:
        return yaml.safe_load(read_regular(self.root / "recipe.yaml", root=self.root).decode())

    # ---- state log ----------------------------------------------------------------------------
    def append(self, index: int, state: str, **kw: Any) -> None:
        line = json.dumps({"i": index, "state": state, **kw}, sort_keys=True) + "\n"
        check_write_target(self.log_path, root=self.root)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def replay(self) -> dict[int, JobState]:
        """Latest state per job index; a torn last line (kill mid-write) is ignored."""
        states: dict[int, JobState] = {}
        if not self.log_path.exists():
            return states
        raw = read_regular(self.log_path, root=self.root).decode("utf-8", "replace")
        for line in raw.splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            st = states.setdefault(int(ev["i"]), JobState())
            st.state = ev["state"]
            st.attempts = int(ev.get("attempts", st.attempts))
            st.reason = ev.get("reason")
            st.failed_step = ev.get("failed_step")
            st.diverged = bool(ev.get("diverged", False))
            if ev.get("wall_time_s") is not None:
                st.wall_time_s = float(ev["wall_time_s"])
        return states

    # ---- results ------------------------------------------------------------------------------
    def _paths(self, index: int) -> tuple[Path, Path]:
        return self.loras / f"{index:06d}.safetensors", self.loras / f"{index:06d}.json"

    def write_result(self, tl: TrainedLora, weights: bytes) -> None:
        st_path, js_path = self._paths(tl.job.index)
        text = json.dumps(result_doc(tl, weights), sort_keys=True, allow_nan=True)
        atomic_write_bytes(st_path, weights, root=self.root)
        atomic_write_bytes(js_path, text.encode(), root=self.root)

    def write_ref(self, doc: dict[str, Any], ref: dict[str, Any]) -> None:
        """Record a LoRA that a worker put into a ``--store`` (see backends/store.py): only the
        result document plus where its weights are; the weights never pass through here."""
        _, js_path = self._paths(int(doc["index"]))
        full = {**doc, "weights_sha256": ref["weights_sha256"], "store": dict(ref)}
        full.pop("weights_bytes", None)
        blob = json.dumps(full, sort_keys=True, allow_nan=True).encode()
        atomic_write_bytes(js_path, blob, root=self.root)

    def _read_doc(self, index: int) -> dict[str, Any] | None:
        _, js_path = self._paths(index)
        if not js_path.exists():
            return None
        try:
            return json.loads(read_regular(js_path, root=self.root))
        except json.JSONDecodeError:
            return None

    def finished_doc(self, index: int) -> dict[str, Any] | None:
        """The result document of a finished LoRA, without reading its weights (pack's first
        pass reads only these). The json is renamed into place only after the weights file
        (``write_result``), so its presence means the weights were complete; whoever reads the
        weights later still checks their sha256."""
        doc = self._read_doc(index)
        if doc is None or "weights_sha256" not in doc:
            return None
        if doc.get("store"):
            return doc
        return doc if self._paths(index)[0].exists() else None

    def read_result(self, index: int) -> tuple[bytes, dict[str, Any]] | None:
        """(weights, doc) when both files are complete and agree, else None. A LoRA recorded
        from a store is read from there (sha256 checked)."""
        doc = self._read_doc(index)
        if doc is None:
            return None
        if doc.get("store"):
            from lora_zoo.build.backends.store import StoreRef, open_store

            ref = StoreRef.from_dict(doc["store"])
            data = open_store(ref.url).get(ref)
            return None if data is None else (data, doc)
        st_path, _ = self._paths(index)
        if not st_path.exists():
            return None
        weights = st_path.read_bytes()
        if hashlib.sha256(weights).hexdigest() != doc.get("weights_sha256"):
            return None
        return weights, doc

    def has_result(self, index: int) -> bool:
        doc = self._read_doc(index)
        if doc is not None and doc.get("store"):
            # resume / status must not download every LoRA: a size check (pack verifies sha256)
            from lora_zoo.build.backends.store import StoreRef, open_store

            ref = StoreRef.from_dict(doc["store"])
            return open_store(ref.url).exists(ref)
        return self.read_result(index) is not None

    def current(
        self, jobs: Sequence[JobSpec], max_attempts: int, retry_failed: bool = False
    ) -> dict[int, JobState]:
        """Replayed states, reconciled with the files (see the module docstring)."""
        states = self.replay()
        out: dict[int, JobState] = {}
        for j in jobs:
            st = states.get(j.index, JobState())
            if self.has_result(j.index):
                if st.state != DONE:
                    self.append(j.index, DONE, attempts=st.attempts, recovered=True)
                st.state = DONE
            elif st.state == DONE or st.state == RUNNING:
                st.state = PENDING  # files missing / never written: train again
            elif st.state == FAILED and not st.diverged:
                if retry_failed:
                    st.attempts = 0
                if st.attempts < max_attempts:
                    st.state = PENDING
            out[j.index] = st
        return out


def chunks(jobs: Sequence[JobSpec], k: int) -> list[list[JobSpec]]:
    """Fixed consecutive chunks of ``k`` (the batching never depends on what is done)."""
    return [list(jobs[i : i + k]) for i in range(0, len(jobs), max(1, k))]


def shard_chunks(jobs: Sequence[JobSpec], k: int, shard: tuple[int, int]) -> list[list[JobSpec]]:
    """Shard ``I/N`` takes every N-th chunk of ``k`` (chunk number % N == I) of the whole
    build. Why whole chunks, not ``index % N``: a LoRA then shares its batched pass with the
    same neighbours as in an unsharded build, so merged shards equal a single build bit for bit
    even for builders whose batched kernels are not bitwise batch-invariant."""
    si, sn = shard
    return [c for n, c in enumerate(chunks(jobs, k)) if n % sn == si]
