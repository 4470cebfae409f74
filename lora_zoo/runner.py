"""Run a recipe's jobs with resume, shards and retries, then pack the finished LoRAs into a zoo.

Work dir (``OUT/.build``, or ``OUT/.build-shard-I-of-N`` for ``--shard I/N``)::

    recipe.yaml        the resolved recipe (self-contained)   recipe.orig.yaml  the text as given
    jobs.jsonl         this work dir's jobs (the plan)        build.json        recipe sha, shard, builder
    state.jsonl        append-only log: {"i", "state": running|done|failed, "attempts", ...}
    loras/<i>.safetensors + loras/<i>.json    one finished LoRA (each via temp + rename)

Crash safety: a LoRA's safetensors file is renamed into place, then its json (which carries
the weights' sha256), and only then is ``done`` appended to the log. On start the log is
replayed: ``running`` becomes pending again, and a LoRA whose files are complete counts as done
even when the kill came before its ``done`` line. Nothing finished is lost or trained twice.

Determinism: jobs are cut into fixed chunks of ``k`` consecutive jobs and a chunk is always
trained whole (already finished members are recomputed but not rewritten), so a LoRA always
shares its batched pass with the same neighbours; packing goes in job-index order. A resumed
build therefore packs the same rows, byte for byte on the same machine, as an uninterrupted
one. Wall times are not in the rows: they go to ``info.provenance.timing`` (the only part of a
zoo that differs between two builds of one recipe, with the environment description).

A job whose builder result is ``status="failed"`` (loss went NaN/inf) is recorded with its step
and never retried or packed; an exception fails the whole chunk's attempt and is retried up to
``max_attempts`` times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_zoo import plan as planlib
from lora_zoo.builder_api import JobSpec, TrainedLora
from lora_zoo.errors import BuildError, LoraZooError
from lora_zoo.recipe import Recipe, load_recipe, load_recipe_text
from lora_zoo.record import LoraRecord
from lora_zoo.registry import builder_info

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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header keys sorted.

    Why: the safetensors writer keeps ``__metadata__`` and the tensor entries in a hash map
    whose order changes from process to process, so one tensor dict saved in two processes
    gives different bytes. Sorting the header (tensor data and offsets are untouched) makes the
    bytes a function of the content, which resume-equals-clean-build needs."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


class _CanonicalRecord(LoraRecord):
    """A LoraRecord whose bytes (what ZooWriter stores) have a sorted header; see above."""

    def to_safetensors_bytes(self, metadata: Any = None) -> bytes:
        return canonical_safetensors(super().to_safetensors_bytes(metadata))


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
    def init(self, recipe: Recipe, jobs: Sequence[JobSpec], shard: tuple[int, int] | None,
             builder: dict[str, Any]) -> None:
        """Create the work dir, or check that an existing one is for the same build."""
        meta = {"recipe_sha256": recipe.sha256(), "shard": list(shard) if shard else None,
                "num_loras": recipe.model.num_loras, "indices": [j.index for j in jobs],
                "builder": builder}
        bj = self.root / "build.json"
        if bj.exists():
            old = self.meta()
            for key in ("recipe_sha256", "shard", "indices"):
                if old.get(key) != meta[key]:
                    raise BuildError(f"this work dir holds a different build ({key} differs); "
                                     "use another --out or delete it", file=bj, key=key)
            if old["builder"]["VERSION"] != builder["VERSION"]:
                raise BuildError(f"work dir was started with builder VERSION "
                                 f"{old['builder']['VERSION']}, installed is {builder['VERSION']}",
                                 file=bj, key="builder.VERSION")
            if old["builder"]["source_sha256"] != builder["source_sha256"]:
                log.warning("builder source changed since this build started (%s)", bj)
            return
        self.loras.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.root / "recipe.yaml", recipe.resolved_yaml().encode())
        _atomic_write(self.root / "recipe.orig.yaml", recipe.text.encode())
        _atomic_write(self.root / "jobs.jsonl", planlib.jobs_to_jsonl(jobs).encode())
        _atomic_write(bj, json.dumps(meta, indent=1, sort_keys=True).encode())

    def meta(self) -> dict[str, Any]:
        p = self.root / "build.json"
        if not p.exists():
            raise BuildError("not a build work dir (no build.json)", file=self.root)
        return json.loads(p.read_text())

    def jobs(self) -> list[JobSpec]:
        return planlib.jobs_from_jsonl((self.root / "jobs.jsonl").read_text())

    def resolved(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "recipe.yaml").read_text())

    # ---- state log ----------------------------------------------------------------------------
    def append(self, index: int, state: str, **kw: Any) -> None:
        line = json.dumps({"i": index, "state": state, **kw}, sort_keys=True) + "\n"
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def replay(self) -> dict[int, JobState]:
        """Latest state per job index; a torn last line (kill mid-write) is ignored."""
        states: dict[int, JobState] = {}
        if not self.log_path.exists():
            return states
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
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
        doc = {"index": tl.job.index, "lora_id": tl.job.lora_id, "job": tl.job.to_dict(),
               "metadata": _plain(tl.metadata), "scores": _plain(tl.scores),
               "weights_sha256": hashlib.sha256(weights).hexdigest()}
        try:
            text = json.dumps(doc, sort_keys=True, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise BuildError(f"builder metadata/scores are not JSON-able: {e}",
                             key=tl.job.lora_id) from e
        _atomic_write(st_path, weights)
        _atomic_write(js_path, text.encode())

    def read_result(self, index: int) -> tuple[bytes, dict[str, Any]] | None:
        """(weights, doc) when both files are complete and agree, else None."""
        st_path, js_path = self._paths(index)
        if not (st_path.exists() and js_path.exists()):
            return None
        try:
            doc = json.loads(js_path.read_text())
        except json.JSONDecodeError:
            return None
        weights = st_path.read_bytes()
        if hashlib.sha256(weights).hexdigest() != doc.get("weights_sha256"):
            return None
        return weights, doc

    def has_result(self, index: int) -> bool:
        return self.read_result(index) is not None

    def current(self, jobs: Sequence[JobSpec], max_attempts: int,
                retry_failed: bool = False) -> dict[int, JobState]:
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


@dataclass
class BuildResult:
    work_dir: Path
    zoo: Path | None
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)


def chunks(jobs: Sequence[JobSpec], k: int) -> list[list[JobSpec]]:
    """Fixed consecutive chunks of ``k`` (the batching never depends on what is done)."""
    return [list(jobs[i : i + k]) for i in range(0, len(jobs), max(1, k))]


def _record_results(wd: WorkDir, chunk: Sequence[JobSpec], results: Sequence[TrainedLora],
                    states: dict[int, JobState], attempts: int, chunk_wall: float) -> None:
    if len(results) != len(chunk):
        raise BuildError(f"builder returned {len(results)} results for {len(chunk)} jobs",
                         key="train")
    for job, tl in zip(chunk, results):
        if tl.job.index != job.index or tl.job.lora_id != job.lora_id:
            raise BuildError(f"builder returned result for {tl.job.lora_id} in the place of "
                             f"{job.lora_id} (results must be in job order)", key="train")
        st = states[job.index]
        if st.state != PENDING:
            continue  # finished earlier (its chunk is re-run whole for determinism)
        wall = tl.wall_time_s or chunk_wall / len(chunk)
        if tl.status == "done" and tl.record is not None:
            try:
                tl.record.validate(file=job.lora_id)
                weights = canonical_safetensors(tl.record.to_safetensors_bytes())
            except LoraZooError as e:
                st.state, st.reason, st.diverged = FAILED, str(e), True
                wd.append(job.index, FAILED, attempts=attempts, reason=str(e), diverged=True)
                continue
            wd.write_result(tl, weights)
            st.state, st.wall_time_s = DONE, wall
            wd.append(job.index, DONE, attempts=attempts, wall_time_s=round(wall, 4))
        else:
            reason = tl.error or "builder reported failure"
            st.state, st.reason, st.failed_step, st.diverged = FAILED, reason, tl.failed_step, True
            wd.append(job.index, FAILED, attempts=attempts, reason=reason,
                      failed_step=tl.failed_step, diverged=True)
            log.warning("%s failed at step %s: %s", job.lora_id, tl.failed_step, reason)


def _local_trainer(recipe: Recipe, device: str) -> Any:
    builder = recipe.builder_cls(recipe.config, device=device)
    return lambda chunk, attempt: builder.train(chunk)


def _ray_chunk(resolved: dict[str, Any], job_dicts: list[dict[str, Any]],
               device: str) -> list[dict[str, Any]]:
    """Ray task body: rebuild the recipe from its resolved dict, train one chunk, return plain
    data (safetensors bytes, never pickled tensors)."""
    from lora_zoo.recipe import validate

    recipe = validate(resolved, file="<ray task>")
    builder = recipe.builder_cls(recipe.config, device=device)
    out = []
    for tl in builder.train([JobSpec.from_dict(d) for d in job_dicts]):
        out.append({"weights": tl.record.to_safetensors_bytes() if tl.record else None,
                    "metadata": _plain(tl.metadata), "scores": _plain(tl.scores),
                    "status": tl.status, "error": tl.error, "failed_step": tl.failed_step,
                    "wall_time_s": tl.wall_time_s})
    return out


def _ray_trainer(recipe: Recipe, device: str, todo: Sequence[Sequence[JobSpec]]) -> Any:
    """Submit every pending chunk as a Ray task up front; the driver consumes them in chunk
    order (so the work dir and packing stay deterministic) and resubmits a failed attempt."""
    try:
        import ray
    except ImportError as e:
        raise BuildError("--backend ray needs Ray: pip install 'lora-zoo[ray]'",
                         key="backend") from e
    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_gpus=1 if device.startswith("cuda") else 0)(_ray_chunk)

    def submit(chunk: Sequence[JobSpec]) -> Any:
        return task.remote(recipe.resolved, [j.to_dict() for j in chunk], device)

    refs = {chunk[0].index: submit(chunk) for chunk in todo}

    def train(chunk: Sequence[JobSpec], attempt: int) -> list[TrainedLora]:
        ref = refs.pop(chunk[0].index, None) if attempt == 1 else None
        rows = ray.get(ref if ref is not None else submit(chunk))
        return [TrainedLora(job=j, record=(LoraRecord.from_safetensors_bytes(r["weights"])
                                           if r["weights"] is not None else None),
                            metadata=r["metadata"], scores=r["scores"], status=r["status"],
                            error=r["error"], failed_step=r["failed_step"],
                            wall_time_s=r["wall_time_s"]) for j, r in zip(chunk, rows)]

    return train


def run_jobs(recipe: Recipe, wd: WorkDir, jobs: Sequence[JobSpec], *, k: int, device: str = "cpu",
             max_attempts: int = 2, retry_failed: bool = False, backend: str = "local",
             progress: bool = True) -> dict[int, JobState]:
    """Train every pending job of ``wd`` (chunks of ``k``); returns the final states."""
    from tqdm.auto import tqdm

    if max_attempts < 1:
        raise BuildError("max_attempts must be >= 1", key="max_attempts")
    if backend not in ("local", "ray"):
        raise BuildError(f"unknown backend {backend!r} (local or ray)", key="backend")
    states = wd.current(jobs, max_attempts, retry_failed)
    todo = [c for c in chunks(jobs, k) if any(states[j.index].state == PENDING for j in c)]
    if not todo:
        return states
    train = (_ray_trainer(recipe, device, todo) if backend == "ray"
             else _local_trainer(recipe, device))
    done0 = sum(s.state != PENDING for s in states.values())
    bar = tqdm(total=len(jobs), initial=done0, desc=recipe.name, unit="lora", disable=not progress)
    try:
        for chunk in todo:
            pend = [j for j in chunk if states[j.index].state == PENDING]
            n_pend = len(pend)
            while pend:
                attempts = max(states[j.index].attempts for j in pend) + 1
                for j in pend:
                    states[j.index].state = RUNNING
                    wd.append(j.index, RUNNING, attempts=attempts)
                t0 = time.perf_counter()
                try:
                    results = train(chunk, attempts)
                except Exception as e:  # retried: OOM, flaky IO, a transient driver error
                    reason = f"{type(e).__name__}: {e}"
                    log.warning("chunk at %s, attempt %d failed: %s", chunk[0].lora_id,
                                attempts, reason)
                    for j in pend:
                        st = states[j.index]
                        st.attempts, st.reason = attempts, reason
                        st.state = PENDING if attempts < max_attempts else FAILED
                        wd.append(j.index, FAILED, attempts=attempts, reason=reason)
                    pend = [j for j in pend if states[j.index].state == PENDING]
                    continue
                for j in pend:
                    states[j.index].state, states[j.index].attempts = PENDING, attempts
                _record_results(wd, chunk, results, states, attempts, time.perf_counter() - t0)
                pend = []
            bar.update(n_pend)
    finally:
        bar.close()
    return states


# ---- packing ----------------------------------------------------------------------------------
def _work_dirs(paths: Iterable[str | os.PathLike[str]]) -> list[WorkDir]:
    """Each path is a work dir or an OUT dir holding ``.build*`` work dirs."""
    out: list[WorkDir] = []
    for p in map(Path, paths):
        if (p / "build.json").exists():
            out.append(WorkDir(p))
            continue
        found = sorted(d for d in p.glob(".build*") if (d / "build.json").exists())
        if not found:
            raise BuildError("no build work dir here (.build*/build.json)", file=p)
        out += [WorkDir(d) for d in found]
    return out


def _split_assignment(ids: list[str], metas: list[dict[str, Any]], split: Any) -> dict[str, str]:
    from lora_zoo.splits import group_split, random_split

    if split.kind == "none" or not ids:
        return dict.fromkeys(ids, "train")
    if split.kind == "random":
        parts = random_split(ids, split.fractions, seed=split.seed)
    else:
        missing = [i for i, m in zip(ids, metas) if split.key not in m]
        if missing:
            raise BuildError(f"group split key is not a metadata column of {missing[0]!r}",
                             key=f"output.split.key={split.key}")
        parts = group_split(ids, [m[split.key] for m in metas], split.fractions,
                            seed=split.seed, lists=split.lists)
    return {lid: s for s, members in parts.items() for lid in members}


def pack(sources: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
         allow_partial: bool = False, overwrite: bool = False, device: str | None = None,
         progress: bool = True) -> dict[str, Any]:
    """Merge the finished LoRAs of one or more work dirs (a build or its shards) into a zoo.

    Refuses work dirs of different recipes, a job finished twice with different weights, and
    (unless ``allow_partial``) jobs that are neither done nor failed. Returns the manifest.
    """
    import torch
    from tqdm.auto import tqdm

    from lora_zoo import provenance
    from lora_zoo.recipe import OutputSpec
    from lora_zoo.schema import flatten
    from lora_zoo.writer import ZooWriter

    wds = _work_dirs(sources)
    metas = [wd.meta() for wd in wds]
    if len({m["recipe_sha256"] for m in metas}) != 1:
        raise BuildError("work dirs come from different recipes (recipe_sha256 differs)",
                         file=wds[1].root, key="recipe_sha256")
    if len({m["builder"]["VERSION"] for m in metas}) != 1:
        raise BuildError("work dirs were built with different builder VERSIONs",
                         file=wds[1].root, key="builder.VERSION")
    resolved = wds[0].resolved()
    output = OutputSpec.model_validate(resolved.get("output") or {})
    jobs: dict[int, JobSpec] = {}
    found: dict[int, tuple[WorkDir, str]] = {}
    states: dict[int, JobState] = {}
    for wd in wds:
        st = wd.replay()
        for j in wd.jobs():
            jobs.setdefault(j.index, j)
            res = wd.read_result(j.index)
            if res is not None:
                sha = res[1]["weights_sha256"]
                if j.index in found and found[j.index][1] != sha:
                    raise BuildError(f"{j.lora_id} was built twice with different weights",
                                     file=wd.root, key=j.lora_id)
                found[j.index] = (wd, sha)
                states[j.index] = st.get(j.index, JobState(DONE))
                states[j.index].state = DONE
            elif states.get(j.index, JobState()).state != DONE:
                states[j.index] = st.get(j.index, JobState())
    open_jobs = [jobs[i].lora_id for i in sorted(jobs)
                 if states[i].state != DONE and not (states[i].state == FAILED)]
    if open_jobs and not allow_partial:
        raise BuildError(f"{len(open_jobs)} job(s) not finished (e.g. {open_jobs[0]}); run the "
                         "build again or pass allow_partial", file=wds[0].root, key="jobs")
    done = sorted(found)
    rows = []
    for i in done:
        weights, doc = found[i][0].read_result(i)  # type: ignore[misc]
        j = jobs[i]
        meta = {**doc["metadata"], "job_index": i, **dict(j.data),
                "hp": dict(j.hparams), "seed": dict(j.seeds)}
        rows.append((j, weights, meta, doc["scores"]))
    flat = [flatten(m, what="metadata", lora_id=j.lora_id) for j, _, m, _ in rows]
    assign = _split_assignment([j.lora_id for j, *_ in rows], flat, output.split)
    root = Path(out)
    mode = "overwrite" if overwrite else "create"
    dtype = getattr(torch, output.dtype)
    base = resolved.get("base_model") or {}
    base_name = str(base.get("id") or base.get("architecture") or base.get("kind") or "") \
        if isinstance(base, dict) else str(base)
    w = ZooWriter(root, shard_max_rows=output.shard_rows, mode=mode)
    try:
        for j, weights, meta, scores in tqdm(rows, desc="pack", unit="lora", disable=not progress):
            rec = LoraRecord.from_safetensors_bytes(weights, file=j.lora_id).to(dtype)
            rec = _CanonicalRecord(rec.modules, rec.config, rec.lora_id)
            w.add(rec, lora_id=j.lora_id, split=assign[j.lora_id], metadata=meta, labels=scores,
                  base_model=base_name, collection=output.collection)
        failed = [{"index": i, "lora_id": jobs[i].lora_id, "reason": states[i].reason,
                   "failed_step": states[i].failed_step, "attempts": states[i].attempts}
                  for i in sorted(jobs) if states[i].state == FAILED]
        walls = {jobs[i].lora_id: states[i].wall_time_s or 0.0 for i in done}
        binfo = metas[0]["builder"]
        dev = device or ("cuda" if provenance.gpu_names() else "cpu")
        w.set_info(
            recipe=(wds[0].root / "recipe.orig.yaml").read_text(encoding="utf-8"),
            recipe_resolved=resolved, recipe_sha256=metas[0]["recipe_sha256"],
            jobs=[jobs[i].to_dict() for i in sorted(jobs)], builder=binfo,
            build={"num_jobs": len(jobs), "num_done": len(done), "failed": failed,
                   "shards": sorted({tuple(m["shard"]) for m in metas if m["shard"]})},
            provenance=provenance.collect(binfo, walls, dev))
    except BaseException:
        w.abort()
        raise
    manifest = w.close()
    _atomic_write(root / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
    _atomic_write(root / "jobs.jsonl",
                  planlib.jobs_to_jsonl([jobs[i] for i in sorted(jobs)]).encode())
    try:
        from lora_zoo.cards import write_card
    except ImportError:
        log.debug("lora_zoo.cards not available; the writer's README stays")
    else:
        write_card(root)
    log.info("packed %d LoRAs (%d failed) into %s", len(done), len(failed), root)
    return manifest


# ---- entry points -----------------------------------------------------------------------------
def build(recipe: Recipe | str | os.PathLike[str], out_dir: str | os.PathLike[str],
          only_ids: Iterable[str] | None = None, *, overrides: Sequence[str] = (),
          k: int | None = None, shard: tuple[int, int] | None = None, device: str = "cpu",
          max_attempts: int = 2, retry_failed: bool = False, backend: str = "local",
          pack_zoo: bool = True, limit: int | None = None, progress: bool = True) -> BuildResult:
    """Plan, train (resuming whatever ``out_dir`` holds) and, unless sharded, pack into
    ``out_dir``. Re-running the same call after a crash continues where it stopped."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise BuildError("overrides only apply to a recipe path", key="overrides")
    jobs = planlib.plan(recipe, only_ids=only_ids, shard=shard, limit=limit)
    wd = WorkDir(work_dir_for(out_dir, shard))
    wd.init(recipe, jobs, shard, builder_info(recipe.builder))
    states = run_jobs(recipe, wd, jobs, k=k or recipe.k, device=device,
                      max_attempts=max_attempts, retry_failed=retry_failed, backend=backend,
                      progress=progress)
    counts = {s: sum(st.state == s for st in states.values()) for s in (DONE, FAILED, PENDING)}
    failed = [{"lora_id": j.lora_id, "reason": states[j.index].reason,
               "failed_step": states[j.index].failed_step} for j in jobs
              if states[j.index].state == FAILED]
    zoo = None
    if shard is None and pack_zoo and counts[PENDING] == 0:
        pack([wd.root], out_dir, overwrite=True, device=device, progress=progress)
        zoo = Path(out_dir)
    return BuildResult(work_dir=wd.root, zoo=zoo, counts=counts, failed=failed)


def status(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Per work dir: counts by state and the failures (reason, step, attempts)."""
    out = []
    for wd in _work_dirs([path]):
        meta = wd.meta()
        jobs = wd.jobs()
        states = wd.replay()
        counts = dict.fromkeys((PENDING, RUNNING, DONE, FAILED), 0)
        failed = []
        for j in jobs:
            st = states.get(j.index, JobState())
            s = DONE if wd.has_result(j.index) else st.state
            counts[s] += 1
            if s == FAILED:
                failed.append({"lora_id": j.lora_id, "reason": st.reason,
                               "failed_step": st.failed_step, "attempts": st.attempts})
        out.append({"work_dir": str(wd.root), "shard": meta["shard"], "counts": counts,
                    "failed": failed})
    return out


def build_from_recipe_text(text: str, out_dir: str | os.PathLike[str],
                           only_ids: Iterable[str] | None = None, *,
                           builder_version: str | None = None, force: bool = False,
                           **kw: Any) -> BuildResult:
    """Rebuild from a recipe stored in a zoo (its resolved YAML). Refuses when the zoo was made
    with another builder ``VERSION`` than the installed one, unless ``force``."""
    recipe = load_recipe_text(text, file="<stored recipe>")
    installed = str(recipe.builder_cls.VERSION)
    if builder_version is not None and str(builder_version) != installed:
        msg = (f"zoo was built with {recipe.builder} VERSION {builder_version}, installed is "
               f"{installed}: outputs would differ")
        if not force:
            raise BuildError(msg + " (pass force to rebuild anyway)", key="builder.VERSION")
        log.warning("%s (forced)", msg)
    return build(recipe, out_dir, only_ids, **kw)


def rebuild_from_zoo(zoo: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                     only_ids: Iterable[str] | None = None, *, force: bool = False,
                     **kw: Any) -> BuildResult:
    """Rebuild (some of) a zoo's LoRAs from the recipe and builder VERSION stored in it."""
    from lora_zoo.reader import load_zoo

    info = load_zoo(zoo).info
    if not info.get("recipe_resolved"):
        raise BuildError("zoo has no stored recipe (not built by lora-zoo build)", file=zoo,
                         key="info.recipe_resolved")
    text = yaml.safe_dump(info["recipe_resolved"], sort_keys=False)
    version = (info.get("builder") or {}).get("VERSION")
    return build_from_recipe_text(text, out_dir, only_ids, builder_version=version, force=force,
                                  **kw)
