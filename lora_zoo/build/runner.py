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
one. ``--shard I/N`` takes every N-th of these chunks (see ``shard_chunks``), so merged shards
batch exactly like a single build. Wall times are not in the rows: they go to
``info.provenance.timing`` (the only part of a zoo that differs between two builds of one
recipe, with the environment description).

A job whose builder result is ``status="failed"`` (loss went NaN/inf) is recorded with its step
and never retried or packed; an exception fails the whole chunk's attempt and is retried up to
``max_attempts`` times.

Code layout: the work dir (state log, atomic results) is ``workdir.py``, merging work dirs into
a zoo is ``pack.py``; both are re-exported here, so ``lora_zoo.build.runner`` stays the one import.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_zoo.build import plan as planlib
from lora_zoo.build.api import JobSpec, TrainedLora
from lora_zoo.build.backends import BACKENDS
from lora_zoo.build.backends.store import build_key, open_store
from lora_zoo.build.estimate import check_fits
from lora_zoo.build.lock import work_dir_lock
from lora_zoo.build.pack import _split_assignment, _work_dirs, pack
from lora_zoo.build.recipe import Recipe, load_recipe, load_recipe_text
from lora_zoo.build.registry import builder_info
from lora_zoo.build.workdir import (
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    JobState,
    WorkDir,
    chunks,
    parse_shard,
    shard_chunks,
    work_dir_for,
)
from lora_zoo.errors import BuildError, LoraZooError

__all__ = [
    "DONE",
    "FAILED",
    "PENDING",
    "RUNNING",
    "BuildResult",
    "JobState",
    "WorkDir",
    "build",
    "build_from_recipe_text",
    "chunks",
    "pack",
    "parse_shard",
    "rebuild_from_zoo",
    "run_jobs",
    "shard_chunks",
    "status",
    "work_dir_for",
    "_split_assignment",
]

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    work_dir: Path
    zoo: Path | None
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)


def _record_results(
    wd: WorkDir,
    chunk: Sequence[JobSpec],
    results: Sequence[TrainedLora],
    states: dict[int, JobState],
    attempts: int,
    chunk_wall: float,
) -> None:
    if len(results) != len(chunk):
        raise BuildError(
            f"builder returned {len(results)} results for {len(chunk)} jobs", key="train"
        )
    for job, tl in zip(chunk, results):
        if tl.job.index != job.index or tl.job.lora_id != job.lora_id:
            raise BuildError(
                f"builder returned result for {tl.job.lora_id} in the place of "
                f"{job.lora_id} (results must be in job order)",
                key="train",
            )
        st = states.get(job.index)
        if st is None or st.state != PENDING:
            continue  # a neighbour outside this build, or finished earlier (chunks run whole)
        wall = tl.wall_time_s or chunk_wall / len(chunk)
        ref = getattr(tl, "ref", None)  # a StoredLora: the worker put it into the --store
        if tl.status == "done" and ref is not None:
            wd.write_ref(tl.doc, ref)  # type: ignore[union-attr]
            st.state, st.wall_time_s = DONE, wall
            wd.append(job.index, DONE, attempts=attempts, wall_time_s=round(wall, 4))
        elif tl.status == "done" and tl.record is not None:
            try:
                tl.record.validate(file=job.lora_id)
                weights = tl.record.to_safetensors_bytes()  # canonical header (record layer)
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
            wd.append(
                job.index,
                FAILED,
                attempts=attempts,
                reason=reason,
                failed_step=tl.failed_step,
                diverged=True,
            )
            log.warning("%s failed at step %s: %s", job.lora_id, tl.failed_step, reason)


def run_jobs(
    recipe: Recipe,
    wd: WorkDir,
    jobs: Sequence[JobSpec],
    *,
    k: int,
    device: str = "cpu",
    max_attempts: int = 2,
    retry_failed: bool = False,
    backend: str = "local",
    progress: bool = True,
    chunk_list: Sequence[Sequence[JobSpec]] | None = None,
    store: str | None = None,
    backend_options: Mapping[str, Any] | None = None,
) -> dict[int, JobState]:
    """Train every pending job of ``wd`` (chunks of ``k``); returns the final states.

    ``chunk_list`` gives the batched passes explicitly (a shard, or ``only_ids``: whole chunks
    of the full plan, so a LoRA keeps its neighbours); members that are not in ``jobs`` are
    trained with their chunk but never recorded. ``store`` (an fsspec URL): workers put each
    finished LoRA there and the work dir records references (backends/store.py); a LoRA found
    there on start is recorded, not retrained. ``backend_options``: Ray's ``RAY_OPTIONS``."""
    from lora_zoo.progress import track

    if max_attempts < 1:
        raise BuildError("max_attempts must be >= 1", key="max_attempts")
    trainer = BACKENDS.get(backend).trainer
    states = wd.current(jobs, max_attempts, retry_failed)

    def pending(j: JobSpec) -> bool:
        return j.index in states and states[j.index].state == PENDING

    build_name = ""
    if store is not None:
        build_name = (
            f"{recipe.name}-{build_key(recipe.sha256(), k, wd.meta()['builder']['VERSION'])}"
        )
        _recover_from_store(wd, jobs, states, store, build_name)
    todo = [list(c) for c in (chunk_list or chunks(jobs, k)) if any(pending(j) for j in c)]
    if not todo:
        return states
    train = trainer(recipe, device, todo, store=store, build=build_name, options=backend_options)
    done0 = sum(s.state != PENDING for s in states.values())
    bar = track(total=len(jobs), initial=done0, desc=recipe.name, unit="lora", enabled=progress)
    try:
        for chunk in todo:
            pend = [j for j in chunk if pending(j)]
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
                    log.warning(
                        "chunk at %s, attempt %d failed: %s", chunk[0].lora_id, attempts, reason
                    )
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
        getattr(train, "close", lambda: None)()  # Ray: free the worker actors
    return states


def _recover_from_store(
    wd: WorkDir, jobs: Sequence[JobSpec], states: dict[int, JobState], store: str, build: str
) -> None:
    """Record pending jobs whose LoRA a worker already put into the store (a driver that died
    after the upload, or a build resumed in a fresh work dir): nothing there is retrained."""
    st = open_store(store)
    n = 0
    for j in jobs:
        s = states.get(j.index)
        if s is None or s.state != PENDING:
            continue
        job_dir = st.job_dir(build, j.index, j.to_dict())
        hit = st.find(job_dir)
        if hit is None:
            bad = st.find_failure(job_dir)
            if bad is not None:  # diverged before: deterministic, not worth a retrain
                s.attempts += 1
                s.state, s.reason, s.failed_step, s.diverged = (
                    FAILED,
                    bad.get("error"),
                    bad.get("failed_step"),
                    True,
                )
                wd.append(
                    j.index,
                    FAILED,
                    attempts=s.attempts,
                    reason=s.reason,
                    failed_step=s.failed_step,
                    diverged=True,
                    from_store=True,
                )
                n += 1
            continue
        ref, doc = hit
        doc = {key: v for key, v in doc.items() if key != "weights_bytes"}
        wd.write_ref(doc, ref.to_dict())
        s.attempts += 1  # the attempt the worker finished (its driver never logged it)
        wd.append(j.index, DONE, attempts=s.attempts, from_store=True)
        s.state = DONE
        n += 1
    if n:
        log.info("recorded %d LoRA(s) already in the store %s", n, store)


# ---- entry points -----------------------------------------------------------------------------
def _zoo_is_current(
    out_dir: str | os.PathLike[str], wd: WorkDir, states: Mapping[int, JobState]
) -> bool:
    """True when ``out_dir`` already holds the zoo this work dir would pack: same recipe, same
    builder VERSION, exactly the finished LoRAs. Then a re-run of ``build`` is a no-op: no
    re-pack that could be killed halfway, nothing a user added is touched."""
    from lora_zoo.zoo.manifest import read_manifest
    from lora_zoo.zoo.schema import MANIFEST_NAME

    root = Path(out_dir)
    if not (root / MANIFEST_NAME).exists():
        return False
    try:
        m = read_manifest(*_local_fs(root))
    except LoraZooError:
        return False
    info, meta = m.get("info") or {}, wd.meta()
    done = {j.lora_id for j in wd.jobs() if states.get(j.index, JobState()).state == DONE}
    have = (info.get("build") or {}).get("num_done")
    return (
        info.get("recipe_sha256") == meta.get("recipe_sha256")
        and (info.get("builder") or {}).get("VERSION") == meta["builder"].get("VERSION")
        and have == len(done) == m.get("num_rows")
    )


def _local_fs(root: Path) -> tuple[Any, str]:
    from lora_zoo._io import local_fs

    return local_fs(root.resolve()), str(root.resolve())


def _plan_passes(
    recipe: Recipe,
    k: int,
    only_ids: Iterable[str] | None,
    shard: tuple[int, int] | None,
    limit: int | None,
) -> tuple[list[Any], list[list[Any]], list[Any]]:
    """(the jobs this build makes, the batched passes that train them, the jobs in pass order).
    Passes always come from the full plan's fixed chunks (module docstring), so a partial or
    sharded build trains each LoRA beside the same batch-mates as a full build."""
    all_jobs = planlib.plan(recipe, only_ids=only_ids, limit=limit)
    want = {j.index for j in all_jobs}
    full = all_jobs if only_ids is None else planlib.plan(recipe, limit=limit)
    train_chunks = shard_chunks(full, k, shard) if shard is not None else chunks(full, k)
    train_chunks = [c for c in train_chunks if any(j.index in want for j in c)]
    jobs = [j for c in train_chunks for j in c if j.index in want]
    return all_jobs, train_chunks, jobs


def _build(
    recipe: Recipe | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    only_ids: Iterable[str] | None = None,
    *,
    overrides: Sequence[str] = (),
    k: int | None = None,
    shard: tuple[int, int] | None = None,
    device: str = "cpu",
    max_attempts: int = 2,
    retry_failed: bool = False,
    backend: str = "local",
    pack_zoo: bool = True,
    limit: int | None = None,
    progress: bool = True,
    split_of: Mapping[str, str] | None = None,
    store: str | None = None,
    backend_options: Mapping[str, Any] | None = None,
) -> BuildResult:
    """Plan, train (resuming whatever ``out_dir`` holds) and, unless sharded, pack into
    ``out_dir``. Re-running the same call after a crash continues where it stopped.

    ``only_ids`` builds just those LoRAs, each in its full-build batched pass (neighbours are
    trained along and discarded); ``split_of`` is handed to ``pack`` (see there)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise BuildError("overrides only apply to a recipe path", key="overrides")
    k = k or recipe.k
    if k < 1:
        raise BuildError(f"k must be >= 1, got {k}", key="k")
    check_fits(recipe, k, device)  # before the plan downloads data or a pass runs out of memory
    all_jobs, train_chunks, jobs = _plan_passes(recipe, k, only_ids, shard, limit)
    wd = WorkDir(work_dir_for(out_dir, shard))
    wd.init(
        recipe,
        jobs,
        shard,
        builder_info(recipe.builder),
        k=k,
        all_indices=[j.index for j in all_jobs],
    )
    states = run_jobs(
        recipe,
        wd,
        jobs,
        k=k,
        device=device,
        max_attempts=max_attempts,
        retry_failed=retry_failed,
        backend=backend,
        progress=progress,
        chunk_list=train_chunks,
        store=store,
        backend_options=backend_options,
    )
    counts = {s: sum(st.state == s for st in states.values()) for s in (DONE, FAILED, PENDING)}
    failed = [
        {"lora_id": j.lora_id, "reason": states[j.index].reason,
         "failed_step": states[j.index].failed_step}
        for j in jobs
        if states[j.index].state == FAILED
    ]  # fmt: skip
    zoo = None
    if shard is None and pack_zoo and counts[PENDING] == 0 and _zoo_is_current(out_dir, wd, states):
        log.info("%s is complete and current: nothing to pack (the zoo is left as it is)", out_dir)
        zoo = Path(out_dir)
    elif shard is None and pack_zoo and counts[PENDING] == 0:
        pack(
            [wd.root],
            out_dir,
            overwrite=True,
            device=device,
            progress=progress,
            split_of=split_of,
        )
        zoo = Path(out_dir)
    return BuildResult(work_dir=wd.root, zoo=zoo, counts=counts, failed=failed)


def build(
    recipe: Recipe | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    only_ids: Iterable[str] | None = None,
    **kw: Any,
) -> BuildResult:
    """Plan, train (resuming whatever ``out_dir`` holds) and, unless sharded, pack into
    ``out_dir`` (see ``_build`` for the options), under the work dir's lock: two builds on one
    ``--out`` (or one shard) would append to the same job log, so the second is refused with
    the holder's pid and host. On a finished, current zoo this is a no-op that says so."""
    with work_dir_lock(work_dir_for(out_dir, kw.get("shard"))):
        return _build(recipe, out_dir, only_ids, **kw)


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
            if wd.has_result(j.index):
                s = DONE
            else:  # logged done but its files are missing or torn: it will run again
                s = PENDING if st.state == DONE else st.state
            counts[s] += 1
            if s == FAILED:
                failed.append(
                    {
                        "lora_id": j.lora_id,
                        "reason": st.reason,
                        "failed_step": st.failed_step,
                        "attempts": st.attempts,
                    }
                )
        out.append(
            {"work_dir": str(wd.root), "shard": meta["shard"], "counts": counts, "failed": failed}
        )
    return out


def build_from_recipe_text(
    text: str,
    out_dir: str | os.PathLike[str],
    only_ids: Iterable[str] | None = None,
    *,
    builder_version: str | None = None,
    force: bool = False,
    allow_paths: Sequence[str | os.PathLike[str]] = (),
    **kw: Any,
) -> BuildResult:
    """Rebuild from a recipe stored in a zoo (its resolved YAML). Refuses when the zoo was made
    with another builder ``VERSION`` than the installed one, unless ``force``. The text is a
    stranger's: it reads no local path outside ``allow_paths`` (``load_recipe_text``)."""
    recipe = load_recipe_text(text, file="<stored recipe>", allow_paths=allow_paths)
    installed = str(recipe.builder_cls.VERSION)
    if builder_version is not None and str(builder_version) != installed:
        msg = (
            f"zoo was built with {recipe.builder} VERSION {builder_version}, installed is "
            f"{installed}: outputs would differ"
        )
        if not force:
            raise BuildError(msg + " (pass force to rebuild anyway)", key="builder.VERSION")
        log.warning("%s (forced)", msg)
    return build(recipe, out_dir, only_ids, **kw)


def rebuild_from_zoo(
    zoo: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    only_ids: Iterable[str] | None = None,
    *,
    force: bool = False,
    allow_paths: Sequence[str | os.PathLike[str]] = (),
    **kw: Any,
) -> BuildResult:
    """Rebuild (some of) a zoo's LoRAs from the recipe and builder VERSION stored in it; local
    paths the recipe names must lie under ``allow_paths`` (``lora-zoo rebuild --allow-path``)."""
    from lora_zoo.load.source import load_zoo

    zoo_obj = load_zoo(zoo)
    info = zoo_obj.info
    if not info.get("recipe_resolved"):
        raise BuildError(
            "zoo has no stored recipe (not built by lora-zoo build)",
            file=zoo,
            key="info.recipe_resolved",
        )
    text = yaml.safe_dump(info["recipe_resolved"], sort_keys=False)
    version = (info.get("builder") or {}).get("VERSION")
    # same batching and same splits as the original build (a --k override is in info.build)
    stored_k = (info.get("build") or {}).get("k")
    if stored_k and kw.get("k") is None:
        kw["k"] = int(stored_k)
    if kw.get("split_of") is None:
        kw["split_of"] = {i: s for s in zoo_obj.splits for i in zoo_obj[s].ids}
    return build_from_recipe_text(
        text, out_dir, only_ids, builder_version=version, force=force, allow_paths=allow_paths, **kw
    )
