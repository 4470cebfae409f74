"""Fetch the safe part of a Hub model repo so ``ingest`` can treat it like a local folder.

Why it works this way:
- A Hub SRC is ``hf://[models/|datasets/]owner/name[@revision][/subpath]``, or a bare
  ``owner/name`` that is *not* an existing local path (a local file or folder always wins, so
  ``ingest runs/exp`` never goes to the network when ``runs/exp`` exists). Model repos are the
  default, since that is where LoRAs live.
- The revision (``@rev`` or ``--revision``; branch, tag, ``refs/pr/N`` or sha) is resolved to a
  commit sha once and every listing and download is pinned to that sha, so a push landing
  mid-ingest cannot mix two versions; the sha is recorded per accepted LoRA (provenance).
- Only what ingest can read safely is downloaded: ``*.safetensors`` and small ``*.json`` files
  (``adapter_config.json``, metadata). Pickle-based files (``.bin/.pt/.ckpt/.pth/.pkl``) are
  refused *by name* from the listing and never fetched, whatever ``--allow-pickle-conversion``
  says: conversion is a deliberate local step. A folder's ``adapter_config.json`` is only fetched
  when a safetensors file next to it is, so a ``.bin``-only PEFT folder yields one clear refusal.
- Size limits are applied from the listing's sizes before anything is downloaded, paths that
  would land outside the download folder (``..``, absolute) are refused, and each LFS file's
  sha256 is checked against the listing after download.
- Any failure of the repo itself (not found, bad revision, offline, unreachable) raises
  ``RemoteError`` naming the SRC; ingest reports it and goes on with the other SRCs.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_zoo._io import safe_relpath, sha256_local
from lora_zoo.contrib.formats.files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX
from lora_zoo.contrib.formats.peft import CONFIG_NAME, WEIGHTS_NAME
from lora_zoo.errors import (
    FileTooLargeError,
    IntegrityError,
    LoraZooError,
    PathEscapeError,
    PickleRefusedError,
    RemoteError,
)
from lora_zoo.remote.address import HF_PREFIX, hub_api, hub_endpoint, hub_token, parse_source
from lora_zoo.remote.address import is_hub_source as is_hub_source

log = logging.getLogger(__name__)

JSON_MAX_BYTES = 1 << 20  # metadata JSON larger than this is skipped (tokenizer.json etc.)


@dataclass
class HubSource:
    """A parsed Hub SRC."""

    src: str
    repo_id: str
    repo_type: str = "model"
    revision: str | None = None
    subpath: str = ""


@dataclass
class HubFetch:
    """What one Hub SRC gave: a local folder holding the downloaded files, plus the report."""

    source: HubSource
    commit: str
    root: Path  # local folder mirroring the repo root (pinned to ``commit``)
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    bytes: int = 0

    def url(self, path_in_repo: str = "") -> str:
        """``hf://[type/]owner/name@sha[/path]``: where a file came from, pinned."""
        t = "" if self.source.repo_type == "model" else f"{self.source.repo_type}s/"
        u = f"{HF_PREFIX}{t}{self.source.repo_id}@{self.commit}"
        return f"{u}/{path_in_repo}" if path_in_repo else u

    def provenance(self, path_in_repo: str) -> dict[str, Any]:
        """Per-LoRA metadata columns: which repo, which commit, which file."""
        return {
            "hub_repo": self.source.repo_id,
            "hub_repo_type": self.source.repo_type,
            "hub_revision": self.source.revision or "main",
            "hub_commit": self.commit,
            "source_url": self.url(path_in_repo),
        }

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source.src,
            "repo_id": self.source.repo_id,
            "repo_type": self.source.repo_type,
            "revision": self.source.revision,
            "commit": self.commit,
            "subpath": self.source.subpath,
            "downloaded": self.downloaded,
            "skipped": self.skipped,
            "refused": len(self.rejected),
            "bytes_downloaded": self.bytes,
        }


def parse_hub_source(src: str, revision: str | None = None) -> HubSource:
    """Split a Hub SRC (``remote.address.parse_source``; a bare ``owner/name`` is a model repo
    here); ``revision`` (``--revision``) applies unless the SRC pins ``@rev``."""
    spec = parse_source(src, revision, default_repo_type="model")
    if spec.kind != "hub":
        raise RemoteError("not a Hub SRC (hf://owner/name or owner/name)", file=src)
    return HubSource(src, spec.repo_id or "", spec.repo_type, spec.revision, spec.subpath)


def _resolve_commit(api: Any, hs: HubSource) -> str:
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = api.repo_info(hs.repo_id, repo_type=hs.repo_type, revision=hs.revision)
    except RepositoryNotFoundError as e:
        local = "" if hs.src.startswith(HF_PREFIX) else " and no local path of that name exists"
        raise RemoteError(
            f"Hub repo not found (or private / gated without a token){local}",
            file=hs.src,
            key="repo_id",
        ) from e
    except RevisionNotFoundError as e:
        raise RemoteError(
            f"revision {hs.revision!r} not found in {hs.repo_id}", file=hs.src, key="revision"
        ) from e
    except OfflineModeIsEnabled as e:
        raise RemoteError(
            "the Hub is offline (HF_HUB_OFFLINE=1) and no local path of that name exists",
            file=hs.src,
        ) from e
    except HfHubHTTPError as e:
        raise RemoteError(
            f"cannot open Hub repo ({type(e).__name__}: {str(e).splitlines()[0]})", file=hs.src
        ) from e
    except (OSError, ValueError) as e:  # connection refused, DNS, invalid repo id
        msg = str(e).splitlines()[0] if str(e) else ""
        raise RemoteError(
            f"the Hub at {hub_endpoint()} cannot be reached ({type(e).__name__}: {msg})",
            file=hs.src,
        ) from e
    if not info.sha:
        raise RemoteError("the Hub did not say which commit the revision is", file=hs.src)
    return str(info.sha)


def _refusal(
    path: str, size: int, url: str, sized: bool, max_bytes: int | None
) -> LoraZooError | None:
    """Why a listed file is refused before download (None: it is not)."""
    try:
        safe_relpath(path, file=url, key="path")  # the one check every zoo path gets
    except PathEscapeError as e:
        return e
    if path.lower().endswith(PICKLE_SUFFIXES):
        return PickleRefusedError(
            f"pickle-based checkpoint ({size:,} bytes): refused, not downloaded. "
            "Download and convert it yourself, or ask the author for safetensors",
            file=url,
        )
    if sized and max_bytes is not None and size > max_bytes:
        return FileTooLargeError(
            f"file is {size:,} bytes on the Hub, over the limit of {max_bytes:,} bytes "
            "(not downloaded; raise --max-file-mb to accept it)",
            file=url,
        )
    return None


def plan(
    files: list[tuple[str, int, str | None]], fetch: HubFetch, max_bytes: int | None
) -> list[tuple[str, int, str | None]]:
    """Which of the listed files (path, size, lfs sha256) to download; refusals go to
    ``fetch.rejected`` and ignored files to ``fetch.skipped``."""
    wanted: list[tuple[str, int, str | None]] = []
    configs: list[tuple[str, int, str | None]] = []
    weight_dirs: set[str] = set()
    for path, size, sha in files:
        low, url = path.lower(), fetch.url(path)
        is_weights = low.endswith(SAFETENSORS_SUFFIX)
        is_config = posixpath.basename(path) == CONFIG_NAME
        err = _refusal(path, size, url, is_weights or is_config, max_bytes)
        if err is not None:
            fetch.rejected.append(_err(url, err))
        elif is_weights:
            wanted.append((path, size, sha))
            weight_dirs.add(posixpath.dirname(path))
        elif is_config:
            configs.append((path, size, sha))
        elif low.endswith(".json") and size <= min(JSON_MAX_BYTES, max_bytes or JSON_MAX_BYTES):
            wanted.append((path, size, sha))  # metadata; never a candidate itself
        else:
            fetch.skipped.append(path)
    for path, size, sha in configs:  # a config without weights to go with it is useless
        (wanted.append((path, size, sha)) if posixpath.dirname(path) in weight_dirs
         else fetch.skipped.append(path))  # fmt: skip
    return sorted(wanted)


def _err(url: str, e: LoraZooError) -> dict[str, Any]:
    d = e.to_dict()
    d["file"] = url
    return d


def fetch_hub_source(
    src: str,
    dest: str | os.PathLike[str],
    *,
    revision: str | None = None,
    max_bytes: int | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> HubFetch:
    """Download the safe files of one Hub SRC into ``dest`` (a fresh folder).

    Raises ``RemoteError`` when the repo / revision cannot be opened; per-file problems
    (pickles, too large, failed or corrupted downloads) are in ``HubFetch.rejected``.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.hf_api import RepoFile

    hs = parse_hub_source(src, revision)
    api = hub_api(endpoint, token)
    commit = _resolve_commit(api, hs)
    fetch = HubFetch(hs, commit, Path(dest))
    try:
        listing = api.list_repo_tree(
            hs.repo_id, path_in_repo=hs.subpath or None, recursive=True,
            revision=commit, repo_type=hs.repo_type,
        )  # fmt: skip
        files = [
            (f.path, int(f.size), f.lfs.sha256 if f.lfs else None)
            for f in listing
            if isinstance(f, RepoFile)
        ]
    except Exception as e:  # noqa: BLE001 - any listing failure is this SRC's failure
        raise RemoteError(
            f"cannot list {hs.repo_id}@{commit}/{hs.subpath} ({type(e).__name__}: {e})",
            file=src,
            key="subpath" if hs.subpath else None,
        ) from e
    if not files:
        raise RemoteError(
            f"no files in {hs.repo_id}@{commit[:12]}" + (f"/{hs.subpath}" if hs.subpath else ""),
            file=src,
        )
    todo = plan(files, fetch, max_bytes)
    log.info("%s @ %s: downloading %d of %d files", hs.repo_id, commit[:12], len(todo), len(files))
    for path, size, sha in todo:
        url = fetch.url(path)
        try:
            local = Path(
                hf_hub_download(
                    hs.repo_id,
                    path,
                    repo_type=hs.repo_type,
                    revision=commit,
                    local_dir=fetch.root,
                    endpoint=hub_endpoint(endpoint),
                    token=hub_token(token),
                )  # fmt: skip
            )
            got = local.stat().st_size
            if got != size:
                raise IntegrityError(f"downloaded {got:,} bytes, the Hub listed {size:,}", file=url)
            if sha is not None and sha256_local(local) != sha:
                raise IntegrityError("sha256 differs from the Hub's LFS sha256", file=url)
        except LoraZooError as e:
            fetch.rejected.append(_err(url, e))
            _drop(fetch.root / path)
            continue
        except Exception as e:  # noqa: BLE001 - one failed download must not stop the rest
            fetch.rejected.append(
                _err(url, RemoteError(f"download failed ({type(e).__name__}: {e})", file=url))
            )
            _drop(fetch.root / path)
            continue
        fetch.downloaded.append(path)
        fetch.bytes += got
    return fetch


def hub_candidates(fetch: HubFetch, make: Callable[..., Any]) -> list[Any]:
    """Ingest candidates among the files fetched from one Hub SRC, tagged with their origin.

    A Hub repo is a collection: a folder with ``adapter_config.json`` and
    ``adapter_model.safetensors`` is one adapter (the repo root included), and every other
    ``*.safetensors`` is a file candidate; unlike local folders, sub-folders of a PEFT folder are
    still searched (repos often hold one adapter at the root and more in sub-folders).
    ``make(path, root, rel, **tags)`` builds ingest's ``Candidate``.
    """
    start = fetch.root / fetch.source.subpath if fetch.source.subpath else fetch.root
    got = set(fetch.downloaded)
    adapters = {
        posixpath.dirname(f)
        for f in got
        if posixpath.basename(f) == CONFIG_NAME
        and posixpath.join(posixpath.dirname(f), WEIGHTS_NAME) in got
    }
    found = [(d, fetch.root / d if d else fetch.root) for d in sorted(adapters)]
    for f in sorted(got):
        in_adapter = posixpath.basename(f) == WEIGHTS_NAME and posixpath.dirname(f) in adapters
        if f.lower().endswith(SAFETENSORS_SUFFIX) and not in_adapter:
            found.append((f, fetch.root / f))
    return [
        make(
            path,
            start,
            rel,
            id_prefix=fetch.source.repo_id,
            origin=fetch.url(rel),
            provenance=fetch.provenance(rel),
        )  # fmt: skip
        for rel, path in found
    ]


def fetch_all(
    hub_srcs: list[str],
    dest: Path,
    *,
    revision: str | None,
    max_bytes: int | None,
    make_candidate: Callable[..., Any],
    cands: list[Any],
    rejected: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Fetch each Hub SRC into ``dest/NNN``, extending ``cands`` (via ``to_candidates``) and
    ``rejected``; a SRC that cannot be opened is one rejection and never stops the others.
    Returns the per-SRC summaries for the report."""
    out: list[dict[str, Any]] = []
    for i, src in enumerate(hub_srcs):
        try:
            fetch = fetch_hub_source(src, dest / f"{i:03d}", revision=revision, max_bytes=max_bytes)
        except LoraZooError as e:
            rejected.append(e.to_dict() | {"file": src})
            out.append({"source": src, "error": type(e).__name__, "message": e.message})
            continue
        cands += hub_candidates(fetch, make_candidate)
        rejected += fetch.rejected
        out.append(fetch.summary())
    return out


def _drop(p: Path) -> None:
    try:
        p.unlink(missing_ok=True)
    except OSError:  # pragma: no cover - best effort
        log.warning("could not remove %s", p)
