"""One parser for every place a zoo or an adapter can come from, and one HfApi factory.

Sources: a Hub repo (``ns/name`` or ``hf://[datasets/|models/]ns/name[@rev][/sub]``) or any
fsspec URL (``s3://bucket/zoo``, ``file:///...``). The Hub endpoint and token are read at call
time from ``HF_ENDPOINT`` / ``HF_TOKEN`` like every huggingface_hub tool, so tests and users
can point everything at another Hub with one variable.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lora_zoo.errors import PathEscapeError, RemoteError

HF_PREFIX = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


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


def is_hub_source(source: str) -> bool:
    """``hf://...`` always; a bare ``owner/name`` only when no local path of that name exists
    (a folder called ``zoos/v1`` beside you is a folder, not a repo)."""
    if source.startswith(HF_PREFIX):
        return True
    return "://" not in source and bool(_REPO_ID.match(source)) and not os.path.lexists(source)


def parse_source(
    source: str, revision: str | None = None, *, default_repo_type: str = "dataset"
) -> RemoteSpec:
    """``ns/name``, ``hf://[datasets/|models/|spaces/]ns/name[@rev][/sub]`` -> hub;
    ``scheme://...`` -> fsspec.

    ``default_repo_type`` is what a bare ``ns/name`` means: zoos are dataset repos (push, pull,
    load_zoo), LoRA adapters to ingest are model repos. ``revision`` applies unless the source
    pins ``@rev`` itself (then the two must agree)."""
    if is_hub_source(source):
        rest = source.removeprefix(HF_PREFIX).strip("/")
        rtype = default_repo_type
        head, _, tail = rest.partition("/")
        if head in _TYPES:
            rtype, rest = _TYPES[head], tail
        parts = rest.split("/")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise RemoteError("a Hub source needs 'owner/name'", file=source, key="repo_id")
        name, at, rev = parts[1].partition("@")
        if at:
            rev = unquote(rev)
            if not rev:
                raise RemoteError("empty revision after '@'", file=source, key="revision")
            if revision is not None and revision != rev:
                raise RemoteError(
                    f"revision {revision!r} contradicts @{rev} in the source",
                    file=source,
                    key="revision",
                )
            revision = rev
        sub = "/".join(parts[2:]).strip("/")
        if ".." in sub.split("/"):
            raise PathEscapeError("'..' in the source's subpath", file=source, key="subpath")
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
    if isinstance(fs, LocalFileSystem):  # file://: read under the no-follow rule like any zoo
        from lora_zoo._io import local_fs

        fs = local_fs(root)
    fs.invalidate_cache()  # a cached listing (sizes, ETags) may predate another writer's push
    return fs, root.rstrip("/")


__all__ = [
    "HF_PREFIX",
    "RemoteSpec",
    "hub_api",
    "hub_endpoint",
    "hub_filesystem",
    "hub_token",
    "is_hub_source",
    "parse_source",
    "resolve_fsspec",
    "resolve_hub",
]
