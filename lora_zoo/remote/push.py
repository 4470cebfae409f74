"""Publish a local zoo to the Hub or to any fsspec URL.

Why it is shaped this way:
- One push is one commit. New shards, the updated manifest and the card go up together through
  ``create_commit`` (with ``parent_commit`` = the head we diffed against, so a concurrent push
  fails loudly instead of interleaving), which makes appending to a published zoo atomic:
  readers see the old zoo or the new one, never a manifest pointing at missing shards.
- Resumable: files whose content the remote already has at the target revision are left out of
  the commit, and the LFS uploads happen first, in batches, through ``preupload_lfs_files``.
  An interrupted push leaves those blobs on the server, and the LFS batch API answers "already
  have it" for them, so re-running the push uploads only what is still missing.
- fsspec targets have no commits: shards are copied first and the manifest last (the same
  commit point the local writer uses); shards the new manifest no longer lists are removed
  only after it is in place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_zoo._io import sha256_file, sha256_local
from lora_zoo.errors import IntegrityError, RemoteError
from lora_zoo.remote.address import hub_api, parse_source, resolve_fsspec
from lora_zoo.zoo.manifest import all_shards, read_manifest, verify
from lora_zoo.zoo.schema import DATA_DIR, MANIFEST_NAME, MAX_FILES_PER_DIR, SPLITS_DIR

log = logging.getLogger(__name__)

# Remote folders whose content belongs to the zoo: stale files there are deleted on push.
MANAGED_DIRS = (DATA_DIR, SPLITS_DIR, "plots")
# The Hub's dataset viewer refuses Parquet row groups above ~286 MiB; stay well under it.
MAX_ROW_GROUP_BYTES = 256 << 20


@dataclass
class PushResult:
    target: str
    commit: str | None = None
    url: str | None = None
    pr_url: str | None = None
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def local_files(root: str | os.PathLike[str]) -> list[str]:
    """Relative paths to publish: everything visible (no dot-files / dot-dirs such as the
    ``.build`` work dir or writer temp files)."""
    root = Path(root)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            out.append(rel)
    per_dir = Counter(posixpath.dirname(r) for r in out)
    crowded = [d for d, n in per_dir.items() if n >= MAX_FILES_PER_DIR]
    if crowded:
        raise RemoteError(
            f"{per_dir[crowded[0]]} files in one folder; the Hub allows under {MAX_FILES_PER_DIR}",
            file=root / crowded[0],
        )
    return out


def _git_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _check_local(root: Path) -> dict[str, Any]:
    problems = verify(root)
    if problems:
        raise IntegrityError(
            "refusing to publish a zoo that fails verification:\n  " + "\n  ".join(problems),
            file=root,
        )
    manifest = read_manifest(*_local(root))
    import pyarrow.parquet as pq

    for _s, sh in all_shards(manifest):
        md = pq.ParquetFile(root / sh["path"]).metadata
        for g in range(md.num_row_groups):
            size = md.row_group(g).total_byte_size
            if size > MAX_ROW_GROUP_BYTES:
                raise RemoteError(
                    f"row group {g} holds {size / 2**20:.0f} MiB (limit "
                    f"{MAX_ROW_GROUP_BYTES >> 20} MiB for the Hub); rewrite the zoo with a "
                    "smaller ZooWriter(row_group_max_bytes=...)",
                    file=sh["path"],
                    key="row_group_max_bytes",
                )
    return manifest


def _local(root: Path):
    from lora_zoo._io import local_fs

    return local_fs(root.resolve()), str(root.resolve())


def push(
    local_dir: str | os.PathLike[str],
    target: str,
    *,
    revision: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
    batch_files: int = 32,
    progress: bool = True,
) -> PushResult:
    """Publish ``local_dir`` to a Hub dataset repo (``ns/name`` / ``hf://datasets/ns/name``) or
    an fsspec URL. Verifies the local zoo first: a broken zoo is never published. To publish a
    card naming the target, render it first (``lora_zoo.cards.write_card(dir, repo_id=...)``,
    what ``lora-zoo push --card`` does), so it travels in the same commit as the shards."""
    root = Path(local_dir)
    spec = parse_source(target, revision)
    manifest = _check_local(root)
    files = local_files(root)
    if spec.kind == "hub":
        if spec.subpath:
            raise RemoteError("push to a sub-folder of a repo is not supported", file=target)
        return _push_hub(
            root,
            spec,
            files,
            manifest,
            private=private,
            create_pr=create_pr,
            message=commit_message,
            endpoint=endpoint,
            token=token,
            batch_files=batch_files,
            progress=progress,
        )
    if create_pr or private:
        raise RemoteError("--create-pr / --private only apply to Hub targets", file=target)
    return _push_fsspec(root, spec, files, manifest, storage_options, progress=progress)


def _hub_head(api: Any, spec: Any, private: bool) -> Any:
    """Create the repo (and the branch) when missing; the commit the push builds on."""
    repo_id, rtype, rev = spec.repo_id, spec.repo_type, spec.revision
    api.create_repo(repo_id, repo_type=rtype, private=private, exist_ok=True)
    if rev is not None and not rev.startswith("refs/"):
        refs = api.list_repo_refs(repo_id, repo_type=rtype)
        if rev not in {b.name for b in refs.branches}:
            api.create_branch(repo_id, branch=rev, repo_type=rtype, exist_ok=True)
    return api.repo_info(repo_id, repo_type=rtype, revision=rev).sha


def _hub_operations(
    api: Any,
    spec: Any,
    head: Any,
    root: Path,
    files: list[str],
    manifest: dict[str, Any],
    res: PushResult,
) -> tuple[list[Any], list[Any]]:
    """(adds, deletes): files whose bytes the remote lacks (an LFS file compared by sha256, a
    small one by git blob id), and managed remote files the zoo no longer has."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.hf_api import RepoFile

    remote = {
        f.path: f
        for f in api.list_repo_tree(
            spec.repo_id, repo_type=spec.repo_type, revision=head, recursive=True
        )
        if isinstance(f, RepoFile)
    }
    shard_sha = {sh["path"]: sh["sha256"] for _s, sh in all_shards(manifest)}
    adds = []
    for rel in files:
        path = root / rel
        have = remote.get(rel)
        if have is not None:
            if have.lfs is not None:
                same = have.lfs.sha256 == shard_sha.get(rel, None) or (
                    have.size == path.stat().st_size and have.lfs.sha256 == sha256_local(path)
                )
            else:
                same = have.blob_id == _git_sha1(path)
            if same:
                res.unchanged.append(rel)
                continue
        adds.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
        res.uploaded.append(rel)
    local = set(files)
    dels = [
        CommitOperationDelete(path_in_repo=p)
        for p in sorted(remote)
        if p.split("/", 1)[0] in MANAGED_DIRS and p not in local
    ]
    res.deleted = [d.path_in_repo for d in dels]
    return adds, dels


def _hub_commit(
    api: Any,
    spec: Any,
    head: Any,
    adds: list[Any],
    dels: list[Any],
    *,
    n_rows: int,
    create_pr: bool,
    message: str | None,
    batch_files: int,
    progress: bool,
) -> Any:
    """LFS uploads first, in batches (each finished batch survives an interruption), then one
    commit of every change on top of ``head``."""
    from lora_zoo.progress import track

    repo_id, rtype, rev = spec.repo_id, spec.repo_type, spec.revision
    batches = [adds[i : i + batch_files] for i in range(0, len(adds), batch_files)]
    for batch in track(batches, desc="upload", unit="batch", enabled=progress):
        api.preupload_lfs_files(
            repo_id, additions=batch, repo_type=rtype, revision=rev, create_pr=create_pr
        )
    return api.create_commit(
        repo_id,
        operations=[*adds, *dels],
        commit_message=message or f"lora-zoo push: {n_rows} LoRAs, {len(adds)} file(s) changed",
        repo_type=rtype,
        revision=rev,
        create_pr=create_pr,
        parent_commit=None if create_pr else head,
    )


def _push_hub(
    root: Path,
    spec: Any,
    files: list[str],
    manifest: dict[str, Any],
    *,
    private: bool,
    create_pr: bool,
    message: str | None,
    endpoint: str | None,
    token: str | None,
    batch_files: int,
    progress: bool,
) -> PushResult:
    from huggingface_hub.errors import HfHubHTTPError

    api = hub_api(endpoint, token)
    res = PushResult(target=spec.url)
    try:
        head = _hub_head(api, spec, private)
        adds, dels = _hub_operations(api, spec, head, root, files, manifest, res)
        if not adds and not dels:
            log.info("%s is already up to date at %s", spec.repo_id, head)
            res.commit = head
            return res
        info = _hub_commit(
            api,
            spec,
            head,
            adds,
            dels,
            n_rows=manifest["num_rows"],
            create_pr=create_pr,
            message=message,
            batch_files=batch_files,
            progress=progress,
        )
    except (HfHubHTTPError, RuntimeError, OSError) as e:  # RuntimeError wraps failed uploads
        raise RemoteError(
            f"push failed ({type(e).__name__}: {str(e).splitlines()[0]}); re-run the same "
            "command to resume (uploaded files are not sent again)",
            file=spec.url,
        ) from e
    res.commit, res.url, res.pr_url = info.oid, info.commit_url, info.pr_url
    log.info(
        "pushed %s: %d uploaded, %d unchanged, %d deleted (commit %s)",
        spec.repo_id,
        len(res.uploaded),
        len(res.unchanged),
        len(res.deleted),
        info.oid,
    )
    return res


def _same_bytes(fs: Any, dst: str, size: int, sha256: str) -> bool:
    """True when ``dst`` exists and holds exactly the bytes with this sha256 (streamed; only
    files of the right size are read)."""
    try:
        if fs.info(dst).get("size") != size:
            return False
    except FileNotFoundError:
        return False
    return sha256_file(fs, dst)[0] == sha256


def _push_fsspec(
    root: Path,
    spec: Any,
    files: list[str],
    manifest: dict[str, Any],
    storage_options: dict[str, Any] | None,
    *,
    progress: bool,
) -> PushResult:
    from lora_zoo.progress import track

    fs, rroot = resolve_fsspec(spec, storage_options)
    res = PushResult(target=spec.url)
    old_listed: set[str] = set()
    try:
        from lora_zoo.remote.pull import read_remote_manifest

        old, _ = read_remote_manifest(fs, rroot)
        old_listed = {sh["path"] for _s, sh in all_shards(old)}
    except (RemoteError, FileNotFoundError):
        pass
    new_sha = {sh["path"]: sh["sha256"] for _s, sh in all_shards(manifest)}
    body = [f for f in files if f != MANIFEST_NAME]
    for rel in track(body, desc="upload", unit="file", enabled=progress):
        src, dst = root / rel, posixpath.join(rroot, rel)
        if rel in new_sha and _same_bytes(fs, dst, src.stat().st_size, new_sha[rel]):
            # "already there" is decided by the bytes' sha256, never by size or by the old
            # manifest: shard names repeat across zoo versions, and an interrupted push can
            # leave another version's bytes under a name the old manifest still vouches for
            res.unchanged.append(rel)
            continue
        fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        fs.put_file(str(src), dst)
        res.uploaded.append(rel)
    fs.put_file(str(root / MANIFEST_NAME), posixpath.join(rroot, MANIFEST_NAME))  # commit point
    res.uploaded.append(MANIFEST_NAME)
    fs.invalidate_cache()
    data = posixpath.join(rroot, DATA_DIR)
    for p in fs.find(data) if fs.exists(data) else []:
        rel = posixpath.relpath(p, rroot)
        if rel not in new_sha and (rel in old_listed or rel.endswith(".parquet")):
            fs.rm_file(p)
            res.deleted.append(rel)
    log.info(
        "pushed %s: %d uploaded, %d unchanged, %d deleted",
        spec.url,
        len(res.uploaded),
        len(res.unchanged),
        len(res.deleted),
    )
    return res


__all__ = ["PushResult", "local_files", "push"]
