"""Pack: merge the finished LoRAs of a build's (or its shards') work dirs into one zoo.

Why separate from training: shards of one recipe run on different machines (Slurm arrays) and
are merged later, anywhere; a pack must refuse mixing builds (recipe, k, builder VERSION), a
missing shard or open jobs, and must give the same zoo however the build was cut.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_zoo._io import atomic_write_bytes, read_regular
from lora_zoo.build import plan as planlib
from lora_zoo.build.api import JobSpec
from lora_zoo.build.workdir import (
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    JobState,
    WorkDir,
)
from lora_zoo.errors import BuildError
from lora_zoo.record import LoraRecord

log = logging.getLogger(__name__)


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
    from lora_zoo.zoo.splits import group_split, random_split

    if split.kind == "none" or not ids:
        return dict.fromkeys(ids, "train")
    if split.kind == "random":
        parts = random_split(ids, split.fractions, seed=split.seed)
    else:
        missing = [i for i, m in zip(ids, metas) if split.key not in m]
        if missing:
            raise BuildError(
                f"group split key is not a metadata column of {missing[0]!r}",
                key=f"output.split.key={split.key}",
            )
        parts = group_split(
            ids, [m[split.key] for m in metas], split.fractions, seed=split.seed, lists=split.lists
        )
    return {lid: s for s, members in parts.items() for lid in members}


_MISSING = object()


def _row_metadata(j: JobSpec, doc: Mapping[str, Any]) -> dict[str, Any]:
    """A zoo row's metadata: the builder's, the job's data, and (format 2) hyperparameters
    under hp.* once (the varied values plus whatever the builder resolved, its defaults) and
    the job's derived seeds under seed.*."""
    builder_meta = dict(doc["metadata"])
    resolved_hp = dict(builder_meta.pop("hp", None) or {})
    return {
        **builder_meta,
        "job_index": j.index,
        **dict(j.data),
        "hp": {**dict(j.hparams), **resolved_hp},
        "seed": dict(j.seeds),
    }


@dataclass
class _Collected:
    """What the work dirs hold, from their small JSON documents only (pass 1)."""

    jobs: dict[int, JobSpec] = field(default_factory=dict)
    found: dict[int, tuple[WorkDir, str]] = field(default_factory=dict)  # index -> (wd, sha256)
    states: dict[int, JobState] = field(default_factory=dict)
    keys: dict[int, Any] = field(default_factory=dict)  # index -> the group-split key value


def _check_same_build(wds: Sequence[WorkDir], metas: Sequence[dict[str, Any]]) -> None:
    """Work dirs of one build: one recipe, one k, one builder VERSION."""
    for what, key, why in (
        (lambda m: m["recipe_sha256"], "recipe_sha256", "come from different recipes"),
        (lambda m: m.get("k"), "k", "were built with different k (LoRAs per batched pass)"),
        (
            lambda m: m["builder"]["VERSION"],
            "builder.VERSION",
            "were built with different builder VERSIONs",
        ),
    ):
        if len({what(m) for m in metas}) != 1:
            detail = " (recipe_sha256 differs)" if key == "recipe_sha256" else ""
            raise BuildError(f"work dirs {why}{detail}", file=wds[1].root, key=key)


def _collect(wds: Sequence[WorkDir], output: Any) -> _Collected:
    """Pass 1: replay every work dir's state and read only the small JSON documents (which
    name the weights' sha256), so memory stays bounded whatever the number of LoRAs; each
    LoRA's weights are read and hashed once, in pass 2, on their way into the writer."""
    from lora_zoo.zoo.schema import flatten

    c = _Collected()
    for wd in wds:
        st = wd.replay()
        for j in wd.jobs():
            c.jobs.setdefault(j.index, j)
            doc = wd.finished_doc(j.index)
            if doc is not None:
                sha = doc["weights_sha256"]
                if j.index in c.found and c.found[j.index][1] != sha:
                    raise BuildError(
                        f"{j.lora_id} was built twice with different weights",
                        file=wd.root,
                        key=j.lora_id,
                    )
                c.found[j.index] = (wd, sha)
                if output.split.kind == "group":
                    flat = flatten(_row_metadata(j, doc), what="metadata", lora_id=j.lora_id)
                    c.keys[j.index] = flat.get(output.split.key, _MISSING)
                c.states[j.index] = st.get(j.index, JobState(DONE))
                c.states[j.index].state = DONE
            elif c.states.get(j.index, JobState()).state != DONE:
                logged = st.get(j.index, JobState())
                if logged.state in (DONE, RUNNING):  # result files gone / torn: still open
                    logged = JobState(PENDING, logged.attempts)
                c.states[j.index] = logged
    return c


def _check_complete(
    c: _Collected, wds: Sequence[WorkDir], metas: Sequence[dict[str, Any]], allow_partial: bool
) -> None:
    """Every job of the build is in some work dir and done or failed (unless allow_partial)."""
    if allow_partial:
        return
    wanted = {i for m in metas for i in (m.get("all_indices") or [])}
    missing = sorted(wanted - set(c.jobs))
    if missing:
        raise BuildError(
            f"{len(missing)} job(s) of this build are in no given work dir (e.g. "
            f"index {missing[0]}): a shard is missing",
            file=wds[0].root,
            key="shards",
        )
    open_jobs = [
        c.jobs[i].lora_id for i in sorted(c.jobs) if c.states[i].state not in (DONE, FAILED)
    ]
    if open_jobs:
        raise BuildError(
            f"{len(open_jobs)} job(s) not finished (e.g. {open_jobs[0]}); run the "
            "build again or pass allow_partial",
            file=wds[0].root,
            key="jobs",
        )


def _assign(
    c: _Collected, done: Sequence[int], output: Any, split_of: Mapping[str, str] | None
) -> dict[str, str]:
    """lora_id -> split: ``split_of`` when it covers every packed LoRA (a rebuild keeps the
    original's splits), else the recipe's split policy."""
    ids = [c.jobs[i].lora_id for i in done]
    if split_of is not None and all(i in split_of for i in ids):
        return {i: str(split_of[i]) for i in ids}
    keyed = [
        {} if c.keys.get(i, _MISSING) is _MISSING else {output.split.key: c.keys[i]} for i in done
    ]
    return _split_assignment(ids, keyed, output.split)


def _base_name(resolved: Mapping[str, Any]) -> str:
    base = resolved.get("base_model") or {}
    if isinstance(base, dict):
        return str(base.get("id") or base.get("architecture") or base.get("kind") or "")
    return str(base)


def _write_rows(
    w: Any,
    c: _Collected,
    done: Sequence[int],
    assign: Mapping[str, str],
    resolved: Any,
    output: Any,
    progress: bool,
) -> None:
    """Pass 2: each finished LoRA read (and its sha256 checked) once, into the writer."""
    import torch

    from lora_zoo.progress import track

    dtype = getattr(torch, output.dtype)
    base_name = _base_name(resolved)
    for i in track(done, desc="pack", unit="lora", enabled=progress):
        j, wd = c.jobs[i], c.found[i][0]
        res = wd.read_result(i)  # the one read + sha256 of this LoRA's weights
        if res is None:
            raise BuildError(
                "finished LoRA's weights are missing or do not match their recorded sha256 "
                "(changed on disk since it was trained?); delete its files in the work dir "
                "and run build again to retrain it",
                file=wd.root,
                key=j.lora_id,
            )
        weights, doc = res
        rec = LoraRecord.from_safetensors_bytes(weights, file=j.lora_id).to(dtype)
        del weights
        w.add(
            rec,
            lora_id=j.lora_id,
            split=assign[j.lora_id],
            metadata=_row_metadata(j, doc),
            labels=doc["scores"],
            base_model=base_name,
            collection=output.collection,
        )


def _failed(c: _Collected) -> list[dict[str, Any]]:
    return [
        {
            "index": i,
            "lora_id": c.jobs[i].lora_id,
            "reason": c.states[i].reason,
            "failed_step": c.states[i].failed_step,
            "attempts": c.states[i].attempts,
        }
        for i in sorted(c.jobs)
        if c.states[i].state == FAILED
    ]


def _set_info(
    w: Any,
    c: _Collected,
    done: Sequence[int],
    wds: Sequence[WorkDir],
    metas: Sequence[dict[str, Any]],
    resolved: Any,
    device: str | None,
) -> dict[str, Any]:
    """The zoo's info: recipe, jobs, builder, build summary, provenance (returned)."""
    from lora_zoo import env
    from lora_zoo.build import provenance

    walls = {c.jobs[i].lora_id: c.states[i].wall_time_s or 0.0 for i in done}
    binfo = metas[0]["builder"]
    dev = device or ("cuda" if env.gpu_names() else "cpu")
    prov = provenance.collect(binfo, walls, dev)
    w.set_info(
        recipe=read_regular(wds[0].root / "recipe.orig.yaml", root=wds[0].root).decode(),
        recipe_resolved=resolved,
        recipe_sha256=metas[0]["recipe_sha256"],
        jobs=[c.jobs[i].to_dict() for i in sorted(c.jobs)],
        builder=binfo,
        build={
            "num_jobs": len(c.jobs),
            "num_done": len(done),
            "k": metas[0].get("k"),
            "failed": _failed(c),
            "shards": sorted({tuple(m["shard"]) for m in metas if m["shard"]}),
        },
        provenance=prov,
    )
    return prov


def _write_sidecars(root: Path, resolved: Any, c: _Collected, prov: dict[str, Any]) -> None:
    """recipe.yaml, jobs.jsonl, the environment as requirements, and the dataset card."""
    from lora_zoo import env

    resolved_text = yaml.safe_dump(resolved, sort_keys=False)
    atomic_write_bytes(root / "recipe.yaml", resolved_text.encode(), root=root)
    jobs_text = planlib.jobs_to_jsonl([c.jobs[i] for i in sorted(c.jobs)])
    atomic_write_bytes(root / "jobs.jsonl", jobs_text.encode(), root=root)
    # the environment as a file pip can install (the manifest's provenance holds the same data)
    atomic_write_bytes(
        root / env.REQUIREMENTS_NAME,
        env.requirements_text(prov["environment"], source=str(root.name)).encode(),
        root=root,
    )
    try:
        from lora_zoo.cards import write_card
    except ImportError:
        log.debug("lora_zoo.cards not available; the writer's README stays")
    else:
        write_card(root)


def pack(
    sources: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    allow_partial: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    split_of: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Merge the finished LoRAs of one or more work dirs (a build or its shards) into a zoo.

    Refuses work dirs of different recipes, a job finished twice with different weights, and
    (unless ``allow_partial``) jobs that are neither done nor failed. ``split_of`` (lora_id ->
    split) replaces the recipe's split policy when it covers every packed LoRA: a partial
    rebuild of a zoo must land each LoRA in its original split, which a split computed over
    the subset would not. Returns the manifest.
    """
    from lora_zoo.build.recipe import OutputSpec
    from lora_zoo.zoo.writer import ZooWriter

    wds = _work_dirs(sources)
    metas = [wd.meta() for wd in wds]
    _check_same_build(wds, metas)
    resolved = wds[0].resolved()
    output = OutputSpec.model_validate(resolved.get("output") or {})
    c = _collect(wds, output)
    _check_complete(c, wds, metas, allow_partial)
    done = sorted(c.found)
    assign = _assign(c, done, output, split_of)
    root = Path(out)
    w = ZooWriter(
        root, shard_max_rows=output.shard_rows, mode="overwrite" if overwrite else "create"
    )
    try:
        _write_rows(w, c, done, assign, resolved, output, progress)
        prov = _set_info(w, c, done, wds, metas, resolved, device)
    except BaseException:
        w.abort()
        raise
    manifest = w.close()
    _write_sidecars(root, resolved, c, prov)
    log.info("packed %d LoRAs (%d failed) into %s", len(done), len(_failed(c)), root)
    return manifest
