"""Open zoos that live elsewhere: Hub dataset repos (``ns/name``, ``hf://...``) and fsspec URLs.

Why it works this way:
- A Hub revision (branch, ``refs/pr/N``) is resolved to its commit sha once, and every read goes
  to that sha, so a push landing while we read can never mix two versions of a zoo.
- Without ``streaming`` the zoo's files are pulled into a cache keyed by that commit sha (or, for
  fsspec URLs, by the manifest's own hash) and each shard's sha256 is checked against the
  manifest while it downloads; a mismatch raises ``IntegrityError`` naming the shard, and the
  bad file never enters the cache. A finished pull is marked complete, so the next
  ``load_zoo`` of the same revision reads local Parquet with no network.
- With ``streaming`` nothing is downloaded up front: shards are read by HTTP range requests,
  row group by row group. Hashing a shard would mean downloading it, so instead the Hub's LFS
  sha256 of each shard (from one tree listing) is compared with the manifest; other remotes are
  checked by size. ``Zoo.verify()`` still does the full byte check on demand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_zoo._io import (
    atomic_write_bytes,
    cache_root,
    check_write_target,
    create_exclusive,
    fsync_dir,
    local_fs,
    resolve_under,
    safe_mkdirs,
    safe_relpath,
    sha256_local,
    tmp_path_for,
)
from lora_zoo.errors import IntegrityError, RemoteError, ZooFormatError
from lora_zoo.remote.address import (
    RemoteSpec,
    hub_api,
    is_hub_source,
    parse_source,
    resolve_fsspec,
    resolve_hub,
)
from lora_zoo.zoo.manifest import all_shards, validate_manifest
from lora_zoo.zoo.schema import DATA_DIR, MANIFEST_NAME, README_NAME, SPLITS_DIR

log = logging.getLogger(__name__)

_COMPLETE = ".lora_zoo_complete"


def read_remote_manifest(fs: Any, root: str) -> tuple[dict[str, Any], bytes]:
    path = posixpath.join(root, MANIFEST_NAME)
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise RemoteError("no lora_zoo.json: not a zoo (or not a finished one)", file=path) from e
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZooFormatError(f"manifest is not valid JSON ({e})", file=path) from e
    return validate_manifest(m, file=path), raw


# ---- downloads ----------------------------------------------------------------------------------
def download_file(
    fs: Any,
    src: str,
    dst: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    name: str | None = None,
    chunk: int = 8 << 20,
    max_bytes: int | None = None,
    root: Path | None = None,
) -> None:
    """Stream ``src`` to ``dst`` (temp + rename), checking sha256 / size when given.

    The download stops as soon as more bytes arrive than declared (``size``) or allowed
    (``max_bytes``, for files the manifest does not size): a hostile remote cannot fill the
    disk by lying about a file, and nothing unverified is ever renamed into place."""
    if root is not None:  # every folder below the destination: created here, never a link
        safe_mkdirs(root, dst.parent.relative_to(root).as_posix() if dst.parent != root else "")
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
    check_write_target(dst, root=root)
    tmp = tmp_path_for(dst)
    h, n = hashlib.sha256(), 0
    limit = size if size is not None else max_bytes
    try:
        with (
            fs.open(src, "rb", block_size=0 if _is_hf(fs) else None) as fin,
            create_exclusive(tmp) as fo,
        ):
            while True:
                b = fin.read(chunk)
                if not b:
                    break
                h.update(b)
                n += len(b)
                if limit is not None and n > limit:
                    raise IntegrityError(
                        f"more than {limit} bytes arrived ("
                        + ("the manifest's size" if size is not None else "the size cap")
                        + "); download stopped",
                        file=name or src,
                        key="num_bytes",
                    )
                fo.write(b)
            fo.flush()
            os.fsync(fo.fileno())
        if size is not None and n != size:
            raise IntegrityError(
                f"downloaded {n} bytes but the manifest says {size}",
                file=name or src,
                key="num_bytes",
            )
        if sha256 is not None and h.hexdigest() != sha256:
            raise IntegrityError(
                f"sha256 {h.hexdigest()} != manifest {sha256} (corrupted in storage or transit)",
                file=name or src,
                key="sha256",
            )
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _is_hf(fs: Any) -> bool:
    return type(fs).__name__ == "HfFileSystem"


def zoo_files(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} of the files a zoo needs (shards, named splits), every
    path checked by ``safe_relpath`` (``validate_manifest`` already did; this is the last line
    before a path is joined to the user's folder)."""
    out: dict[str, dict[str, Any]] = {}
    for split, sh in all_shards(manifest):
        rel = safe_relpath(sh["path"], file=MANIFEST_NAME, key=f"splits.{split}", under=(DATA_DIR,))
        out[rel] = {"sha256": sh["sha256"], "size": sh["num_bytes"]}
    for name, ns in (manifest.get("named_splits") or {}).items():
        if isinstance(ns, dict):
            rel = safe_relpath(ns.get("path", f"{SPLITS_DIR}/{name}.json"), file=MANIFEST_NAME,
                               key=f"named_splits.{name}.path", under=(SPLITS_DIR,))  # fmt: skip
            out[rel] = {"sha256": ns.get("sha256"), "size": ns.get("num_bytes")}
    return out


#: cap for a file the manifest does not list (README.md, plots, recipe, jobs); raise per call
UNLISTED_MAX_BYTES = 64 << 20
#: cap for a whole pull; raise with ``max_total_bytes=`` / ``lora-zoo pull --max-gb``
PULL_MAX_BYTES = int(os.environ.get("LORA_ZOO_MAX_PULL_BYTES", 256 << 30))


def download_zoo(
    fs: Any,
    root: str,
    dest: str | os.PathLike[str],
    *,
    manifest: dict[str, Any] | None = None,
    manifest_bytes: bytes | None = None,
    extra: bool = False,
    progress: bool = True,
    max_total_bytes: int | None = None,
    unlisted_max_bytes: int = UNLISTED_MAX_BYTES,
) -> Path:
    """Copy a zoo from ``fs:root`` into local ``dest`` with every hash checked; the manifest is
    written last (as the writer does), so ``dest`` is a zoo only once it is complete.
    ``extra`` also copies the other visible files (recipe, jobs, plots, card assets), each
    capped at ``unlisted_max_bytes``. Every path stays inside ``dest`` (``resolve_under``), and
    the declared total is checked against ``max_total_bytes`` before anything is fetched."""
    from lora_zoo.progress import track

    if manifest is None or manifest_bytes is None:
        manifest, manifest_bytes = read_remote_manifest(fs, root)
    dest = safe_mkdirs(Path(dest))
    files = zoo_files(manifest)
    wanted = dict(files)
    wanted.setdefault(README_NAME, {"sha256": None, "size": None})
    if extra:
        for p in fs.find(root):
            rel = posixpath.relpath(p, root)
            if rel != MANIFEST_NAME and not any(s.startswith(".") for s in rel.split("/")):
                safe_relpath(rel, file=posixpath.join(root, rel), key="listing")
                wanted.setdefault(rel, {"sha256": None, "size": None})
    cap = PULL_MAX_BYTES if max_total_bytes is None else max_total_bytes
    declared = sum(m["size"] or 0 for m in wanted.values())
    if declared > cap:
        raise IntegrityError(
            f"the manifest declares {declared:,} bytes, over the pull limit of {cap:,} "
            "(raise it with max_total_bytes= / lora-zoo pull --max-gb)",
            file=posixpath.join(root, MANIFEST_NAME),
            key="num_bytes",
        )
    for rel, meta in track(sorted(wanted.items()), desc="pull", unit="file", enabled=progress):
        local = resolve_under(dest, rel, file=posixpath.join(root, rel), key="path")
        if meta["sha256"] and local.exists() and sha256_local(local) == meta["sha256"]:
            continue  # resumed pull: already here and intact
        src = posixpath.join(root, rel)
        if rel == README_NAME and not fs.exists(src):
            continue
        download_file(fs, src, local, sha256=meta["sha256"], size=meta["size"], name=rel,
                      max_bytes=None if meta["size"] is not None else unlisted_max_bytes,
                      root=dest)  # fmt: skip
    atomic_write_bytes(
        dest / MANIFEST_NAME, manifest_bytes, root=dest
    )  # last: dest is a zoo only now
    return dest


# ---- cheap integrity checks for streaming -------------------------------------------------------
def check_remote_shards(
    spec: RemoteSpec,
    fs: Any,
    root: str,
    manifest: dict[str, Any],
    endpoint: str | None = None,
    token: str | None = None,
    sha: str | None = None,
) -> None:
    """Compare the manifest with what the remote says about each shard, without downloading:
    the Hub's LFS sha256 (and size); other filesystems' sizes."""
    shards = {sh["path"]: sh for _s, sh in all_shards(manifest)}
    if not shards:
        return
    if spec.kind == "hub":
        from huggingface_hub.hf_api import RepoFile

        api = hub_api(endpoint, token)
        prefix = f"{spec.subpath}/" if spec.subpath else ""
        infos = api.get_paths_info(
            spec.repo_id, [prefix + p for p in shards], repo_type=spec.repo_type, revision=sha
        )
        got = {i.path[len(prefix) :]: i for i in infos if isinstance(i, RepoFile)}
        for rel, sh in shards.items():
            info = got.get(rel)
            if info is None:
                raise IntegrityError("shard listed in the manifest is missing", file=rel)
            if info.size != sh["num_bytes"]:
                raise IntegrityError(
                    f"remote size {info.size} != manifest {sh['num_bytes']}",
                    file=rel,
                    key="num_bytes",
                )
            if info.lfs is not None and info.lfs.sha256 != sh["sha256"]:
                raise IntegrityError(
                    f"remote sha256 {info.lfs.sha256} != manifest {sh['sha256']}",
                    file=rel,
                    key="sha256",
                )
        return
    for rel, sh in shards.items():
        try:
            size = fs.info(posixpath.join(root, rel)).get("size")
        except FileNotFoundError as e:
            raise IntegrityError("shard listed in the manifest is missing", file=rel) from e
        if size is not None and int(size) != sh["num_bytes"]:
            raise IntegrityError(
                f"remote size {size} != manifest {sh['num_bytes']}", file=rel, key="num_bytes"
            )


# ---- the entry point load_zoo calls -----------------------------------------------------------
@dataclass(frozen=True)
class ZooLocation:
    """Where a zoo's files are: an fsspec filesystem and the root folder on it (the local
    cache, or the remote itself when streaming), plus the Hub commit it was resolved to."""

    fs: Any
    root: str
    source: str
    revision: str | None = None
    streaming: bool = False


def locate(
    source: str,
    revision: str | None = None,
    streaming: bool = False,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> ZooLocation:
    """Where the zoo of a Hub repo id / ``hf://`` path / fsspec URL is, after pulling it into
    the cache unless ``streaming`` (see the module docstring)."""
    spec = parse_source(source, revision)
    sha: str | None = None
    if spec.kind == "hub":
        fs, root, sha = resolve_hub(spec, endpoint, token)
    else:
        fs, root = resolve_fsspec(spec, storage_options)
    on_disk = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if on_disk:
        return ZooLocation(fs, root, source, streaming=streaming)
    manifest, raw = read_remote_manifest(fs, root)
    if streaming:
        check_remote_shards(spec, fs, root, manifest, endpoint, token, sha)
        return ZooLocation(fs, root, source, revision=sha, streaming=True)
    base = Path(cache_dir) if cache_dir else cache_root()
    if spec.kind == "hub":
        key = f"{spec.repo_type}s--{spec.repo_id.replace('/', '--')}"
        dest = base / "hub" / key / sha / (spec.subpath or "_root")  # type: ignore[operator]
    else:
        url_key = hashlib.sha256(spec.url.encode()).hexdigest()[:16]
        dest = base / "fsspec" / url_key / hashlib.sha256(raw).hexdigest()[:16]
    if not (dest / _COMPLETE).exists():
        log.info("pulling %s into %s", source, dest)
        download_zoo(fs, root, dest, manifest=manifest, manifest_bytes=raw, progress=progress)
        marker = json.dumps({"source": source, "revision": sha}) + "\n"
        atomic_write_bytes(dest / _COMPLETE, marker.encode(), root=dest)
    return ZooLocation(local_fs(dest), str(dest), source, revision=sha)


def verify_source(
    source: str,
    revision: str | None = None,
    *,
    hashes: bool = True,
    endpoint: str | None = None,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """``manifest.verify`` for any source: a local folder, a Hub repo or an fsspec URL. Remote
    shards are streamed through the hash (nothing is cached); a missing zoo is a problem
    string, like every other finding, not an exception."""
    from lora_zoo.zoo.manifest import verify

    if "://" not in source and not is_hub_source(source) or os.path.exists(source):
        return verify(source, hashes=hashes)
    try:
        spec = parse_source(source, revision)
        if spec.kind == "hub":
            fs, root, _sha = resolve_hub(spec, endpoint, token)
        else:
            fs, root = resolve_fsspec(spec, storage_options)
    except RemoteError as e:
        return [str(e)]
    return verify(fs, root, hashes=hashes)


def pull(
    source: str,
    dest: str | os.PathLike[str],
    revision: str | None = None,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Download a whole remote zoo (shards checked against the manifest, plus recipe, jobs,
    plots and card) into the local folder ``dest``."""
    spec = parse_source(source, revision)
    if spec.kind == "hub":
        fs, root, _sha = resolve_hub(spec, endpoint, token)
    else:
        fs, root = resolve_fsspec(spec, storage_options)
    dest = Path(dest)
    if (dest / MANIFEST_NAME).exists():
        if not overwrite:
            raise RemoteError("already a zoo here; pass overwrite", file=dest)
        (dest / MANIFEST_NAME).unlink()
        shutil.rmtree(dest / "data", ignore_errors=True)
    return download_zoo(fs, root, dest, extra=True, progress=progress)


__all__ = [
    "RemoteSpec",
    "download_zoo",
    "ZooLocation",
    "locate",
    "parse_source",
    "pull",
    "verify_source",
]
