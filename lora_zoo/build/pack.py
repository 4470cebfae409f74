"""Pack: merge the finished LoRAs of a build's (or its shards') work dirs into one zoo.

Why separate from training: shards of one recipe run on different machines (Slurm arrays) and
are merged later, anywhere; a pack must refuse mixing builds (recipe, k, builder VERSION), a
missing shard or open jobs, and must give the same zoo however the build was cut.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
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
    import torch
    from tqdm.auto import tqdm

    from lora_zoo import env
    from lora_zoo.build import provenance
    from lora_zoo.build.recipe import OutputSpec
    from lora_zoo.zoo.schema import flatten
    from lora_zoo.zoo.writer import ZooWriter

    wds = _work_dirs(sources)
    metas = [wd.meta() for wd in wds]
    if len({m["recipe_sha256"] for m in metas}) != 1:
        raise BuildError(
            "work dirs come from different recipes (recipe_sha256 differs)",
            file=wds[1].root,
            key="recipe_sha256",
        )
    if len({m.get("k") for m in metas}) != 1:
        raise BuildError(
            "work dirs were built with different k (LoRAs per batched pass)",
            file=wds[1].root,
            key="k",
        )
    if len({m["builder"]["VERSION"] for m in metas}) != 1:
        raise BuildError(
            "work dirs were built with different builder VERSIONs",
            file=wds[1].root,
            key="builder.VERSION",
        )
    resolved = wds[0].resolved()
    output = OutputSpec.model_validate(resolved.get("output") or {})
    jobs: dict[int, JobSpec] = {}
    found: dict[int, tuple[WorkDir, str]] = {}
    states: dict[int, JobState] = {}
    # Pass 1 reads only the small JSON documents (which name the weights' sha256): memory stays
    # bounded whatever the number of LoRAs, and each LoRA's weights are read and hashed once,
    # in pass 2, on their way into the writer.
    docs_keys: dict[int, Any] = {}  # index -> the group-split key value (only that is kept)
    for wd in wds:
        st = wd.replay()
        for j in wd.jobs():
            jobs.setdefault(j.index, j)
            doc = wd.finished_doc(j.index)
            if doc is not None:
                sha = doc["weights_sha256"]
                if j.index in found and found[j.index][1] != sha:
                    raise BuildError(
                        f"{j.lora_id} was built twice with different weights",
                        file=wd.root,
                        key=j.lora_id,
                    )
                found[j.index] = (wd, sha)
                if output.split.kind == "group":
                    flat = flatten(_row_metadata(j, doc), what="metadata", lora_id=j.lora_id)
                    docs_keys[j.index] = flat.get(output.split.key, _MISSING)
                states[j.index] = st.get(j.index, JobState(DONE))
                states[j.index].state = DONE
            elif states.get(j.index, JobState()).state != DONE:
                logged = st.get(j.index, JobState())
                if logged.state in (DONE, RUNNING):  # result files gone / torn: still open
                    logged = JobState(PENDING, logged.attempts)
                states[j.index] = logged
    wanted = {i for m in metas for i in (m.get("all_indices") or [])}
    missing = sorted(wanted - set(jobs))
    if missing and not allow_partial:
        raise BuildError(
            f"{len(missing)} job(s) of this build are in no given work dir (e.g. "
            f"index {missing[0]}): a shard is missing",
            file=wds[0].root,
            key="shards",
        )
    open_jobs = [
        jobs[i].lora_id
        for i in sorted(jobs)
        if states[i].state != DONE and not (states[i].state == FAILED)
    ]
    if open_jobs and not allow_partial:
        raise BuildError(
            f"{len(open_jobs)} job(s) not finished (e.g. {open_jobs[0]}); run the "
            "build again or pass allow_partial",
            file=wds[0].root,
            key="jobs",
        )
    done = sorted(found)
    ids = [jobs[i].lora_id for i in done]
    if split_of is not None and all(i in split_of for i in ids):
        assign = {i: str(split_of[i]) for i in ids}  # a rebuild keeps the original's splits
    else:
        keyed = [
            {} if docs_keys.get(i, _MISSING) is _MISSING else {output.split.key: docs_keys[i]}
            for i in done
        ]
        assign = _split_assignment(ids, keyed, output.split)
    root = Path(out)
    mode = "overwrite" if overwrite else "create"
    dtype = getattr(torch, output.dtype)
    base = resolved.get("base_model") or {}
    base_name = (
        str(base.get("id") or base.get("architecture") or base.get("kind") or "")
        if isinstance(base, dict)
        else str(base)
    )
    w = ZooWriter(root, shard_max_rows=output.shard_rows, mode=mode)
    try:
        for i in tqdm(done, desc="pack", unit="lora", disable=not progress):
            j, wd = jobs[i], found[i][0]
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
        failed = [
            {
                "index": i,
                "lora_id": jobs[i].lora_id,
                "reason": states[i].reason,
                "failed_step": states[i].failed_step,
                "attempts": states[i].attempts,
            }
            for i in sorted(jobs)
            if states[i].state == FAILED
        ]
        walls = {jobs[i].lora_id: states[i].wall_time_s or 0.0 for i in done}
        binfo = metas[0]["builder"]
        dev = device or ("cuda" if env.gpu_names() else "cpu")
        w.set_info(
            recipe=read_regular(wds[0].root / "recipe.orig.yaml", root=wds[0].root).decode(),
            recipe_resolved=resolved,
            recipe_sha256=metas[0]["recipe_sha256"],
            jobs=[jobs[i].to_dict() for i in sorted(jobs)],
            builder=binfo,
            build={
                "num_jobs": len(jobs),
                "num_done": len(done),
                "k": metas[0].get("k"),
                "failed": failed,
                "shards": sorted({tuple(m["shard"]) for m in metas if m["shard"]}),
            },
            provenance=(prov := provenance.collect(binfo, walls, dev)),
        )
    except BaseException:
        w.abort()
        raise
    manifest = w.close()
    resolved_text = yaml.safe_dump(resolved, sort_keys=False)
    atomic_write_bytes(root / "recipe.yaml", resolved_text.encode(), root=root)
    jobs_text = planlib.jobs_to_jsonl([jobs[i] for i in sorted(jobs)])
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
    log.info("packed %d LoRAs (%d failed) into %s", len(done), len(failed), root)
    return manifest
