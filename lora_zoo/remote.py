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
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from lora_zoo.errors import IntegrityError, RemoteError
from lora_zoo.manifest import all_shards, validate_manifest
from lora_zoo.reader import Zoo
from lora_zoo.schema import MANIFEST_NAME, README_NAME

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMPLETE = ".lora_zoo_complete"


@dataclass
class RemoteSpec:
    """Where a zoo lives: ``kind`` is "hub" (repo_id / repo_type / subpath) or "fsspec" (url)."""

    kind: str
    url: str
    repo_id: str | None = None
    repo_type: str = "dataset"
    revision: str | None = None
    subpath: str = ""


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub endpoint, read at call time (``HF_ENDPOINT`` may be set after import)."""
    if endpoint:
        return endpoint.rstrip("/")
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_token(token: str | None = None) -> str | None:
    return token or os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


def cache_root() -> Path:
    """``$LORA_ZOO_CACHE``, else ``~/.cache/lora_zoo``."""
    env = os.environ.get("LORA_ZOO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora_zoo"


def is_hub_source(source: str) -> bool:
    return source.startswith("hf://") or ("://" not in source and bool(_REPO_ID.match(source)))


def parse_source(source: str, revision: str | None = None) -> RemoteSpec:
    """``ns/name``, ``hf://datasets/ns/name[@rev][/sub]`` -> hub; ``scheme://...`` -> fsspec."""
    if source.startswith("hf://") or ("://" not in source and _REPO_ID.match(source)):
        rest = source.removeprefix("hf://")
        rtype = "dataset"
        head = rest.split("/", 1)[0]
        if head in ("datasets", "models", "spaces"):
            rtype, rest = head[:-1], rest.split("/", 1)[1] if "/" in rest else ""
        parts = rest.split("/")
        if len(parts) < 2:
            raise RemoteError("a Hub source needs 'namespace/name'", file=source, key="repo_id")
        name, _, rev_in_path = parts[1].partition("@")
        sub = "/".join(parts[2:]).strip("/")
        if rev_in_path:
            from urllib.parse import unquote

            rev_in_path = unquote(rev_in_path)
            if revision is not None and revision != rev_in_path:
                raise RemoteError(
                    f"revision {revision!r} contradicts @{rev_in_path} in the URL",
                    file=source,
                    key="revision",
                )
            revision = rev_in_path
        return RemoteSpec("hub", source, f"{parts[0]}/{name}", rtype, revision, sub)
    if "://" not in source:
        raise RemoteError(
            "not a local folder, a Hub repo id (namespace/name) or an fsspec URL", file=source
        )
    return RemoteSpec("fsspec", source, revision=revision)


def hub_api(endpoint: str | None = None, token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(endpoint), token=hub_token(token))


def hub_filesystem(endpoint: str | None = None, token: str | None = None):
    """A fresh HfFileSystem (no instance cache: a push may have changed the repo since)."""
    from huggingface_hub import HfFileSystem

    return HfFileSystem(
        endpoint=hub_endpoint(endpoint), token=hub_token(token), skip_instance_cache=True
    )


def resolve_hub(spec: RemoteSpec, endpoint: str | None = None, token: str | None = None):
    """(HfFileSystem, root path pinned to the commit sha, sha)."""
    from huggingface_hub.errors import HfHubHTTPError

    api = hub_api(endpoint, token)
    try:
        info = api.repo_info(spec.repo_id, repo_type=spec.repo_type, revision=spec.revision)
    except HfHubHTTPError as e:
        raise RemoteError(
            f"cannot open Hub repo ({type(e).__name__}: {str(e).splitlines()[0]})",
            file=spec.url,
            key="revision" if "Revision" in type(e).__name__ else "repo_id",
        ) from e
    except (OSError, ValueError) as e:  # offline mode, connection refused, bad repo id
        raise RemoteError(
            f"no local folder of that name, and the Hub at {hub_endpoint(endpoint)} cannot be "
            f"reached ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            file=spec.url,
        ) from e
    sha = info.sha
    prefix = "" if spec.repo_type == "model" else f"{spec.repo_type}s/"
    root = f"{prefix}{spec.repo_id}@{sha}"
    if spec.subpath:
        root = f"{root}/{spec.subpath}"
    return hub_filesystem(endpoint, token), root, sha


def resolve_fsspec(spec: RemoteSpec, storage_options: dict[str, Any] | None = None):
    if spec.revision is not None:
        raise RemoteError("revision= only applies to Hub repos", file=spec.url, key="revision")
    fs, root = fsspec.core.url_to_fs(spec.url, **(storage_options or {}))
    fs.invalidate_cache()  # a cached listing (sizes, ETags) may predate another writer's push
    return fs, root.rstrip("/")


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
        raise IntegrityError(f"manifest is not valid JSON ({e})", file=path) from e
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
) -> None:
    """Stream ``src`` to ``dst`` (temp + rename), checking sha256 / size when given."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    h, n = hashlib.sha256(), 0
    try:
        with fs.open(src, "rb", block_size=0 if _is_hf(fs) else None) as fin, open(tmp, "wb") as fo:
            while True:
                b = fin.read(chunk)
                if not b:
                    break
                h.update(b)
                n += len(b)
                fo.write(b)
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
    finally:
        tmp.unlink(missing_ok=True)


def _is_hf(fs: Any) -> bool:
    return type(fs).__name__ == "HfFileSystem"


def zoo_files(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} of the files a zoo needs (shards, named splits)."""
    out: dict[str, dict[str, Any]] = {}
    for _split, sh in all_shards(manifest):
        out[sh["path"]] = {"sha256": sh["sha256"], "size": sh["num_bytes"]}
    for name, ns in (manifest.get("named_splits") or {}).items():
        if isinstance(ns, dict):
            rel = ns.get("path", f"splits/{name}.json")
            out[rel] = {"sha256": ns.get("sha256"), "size": None}
    return out


def download_zoo(
    fs: Any,
    root: str,
    dest: str | os.PathLike[str],
    *,
    manifest: dict[str, Any] | None = None,
    manifest_bytes: bytes | None = None,
    extra: bool = False,
    progress: bool = True,
) -> Path:
    """Copy a zoo from ``fs:root`` into local ``dest`` with every hash checked; the manifest is
    written last (as the writer does), so ``dest`` is a zoo only once it is complete.
    ``extra`` also copies the other visible files (recipe, jobs, plots, card assets)."""
    from tqdm.auto import tqdm

    if manifest is None or manifest_bytes is None:
        manifest, manifest_bytes = read_remote_manifest(fs, root)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = zoo_files(manifest)
    wanted = dict(files)
    wanted.setdefault(README_NAME, {"sha256": None, "size": None})
    if extra:
        for p in fs.find(root):
            rel = posixpath.relpath(p, root)
            if rel != MANIFEST_NAME and not any(s.startswith(".") for s in rel.split("/")):
                wanted.setdefault(rel, {"sha256": None, "size": None})
    for rel, meta in tqdm(sorted(wanted.items()), desc="pull", unit="file", disable=not progress):
        local = dest / rel
        if meta["sha256"] and local.exists() and _sha256(local) == meta["sha256"]:
            continue  # resumed pull: already here and intact
        src = posixpath.join(root, rel)
        if rel == README_NAME and not fs.exists(src):
            continue
        download_file(fs, src, local, sha256=meta["sha256"], size=meta["size"], name=rel)
    tmp = dest / f".{MANIFEST_NAME}.tmp"
    tmp.write_bytes(manifest_bytes)
    os.replace(tmp, dest / MANIFEST_NAME)
    return dest


def _sha256(path: Path) -> str:
    """sha256 of a local file (the manifest's streamed hash, on the local filesystem)."""
    from fsspec.implementations.local import LocalFileSystem

    from lora_zoo.manifest import sha256_file

    return sha256_file(LocalFileSystem(), str(path))[0]


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


# ---- the entry point reader.load_zoo calls ---------------------------------------------------
def open_remote(
    source: str,
    revision: str | None = None,
    streaming: bool = False,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Zoo:
    """A ``Zoo`` for a Hub repo id / ``hf://`` path / fsspec URL (see the module docstring)."""
    spec = parse_source(source, revision)
    sha: str | None = None
    if spec.kind == "hub":
        fs, root, sha = resolve_hub(spec, endpoint, token)
    else:
        fs, root = resolve_fsspec(spec, storage_options)
    local_fs = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if local_fs:
        return Zoo(fs, root, source=source, streaming=streaming)
    manifest, raw = read_remote_manifest(fs, root)
    if streaming:
        check_remote_shards(spec, fs, root, manifest, endpoint, token, sha)
        return Zoo(fs, root, source=source, revision=sha, streaming=True)
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
        (dest / _COMPLETE).write_text(json.dumps({"source": source, "revision": sha}) + "\n")
    return Zoo(fsspec.filesystem("file"), str(dest), source=source, revision=sha)


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
    from lora_zoo.manifest import verify

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


__all__ = ["RemoteSpec", "download_zoo", "open_remote", "parse_source", "pull", "verify_source"]
