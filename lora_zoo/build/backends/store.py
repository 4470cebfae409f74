"""A shared LoRA store (``--store URL``): where remote workers put finished LoRAs themselves.

Why: with the weights travelling back through Ray's object store, a 10k-LoRA zoo of 9 MB
adapters is 90 GB through the one driver process. With a store, each worker writes its LoRAs
to any fsspec URL (a shared path, ``s3://``, ``gs://``) and hands the driver only a small
reference; the driver writes that reference into the work dir (``WorkDir.write_ref``) and never
holds the weights. ``pack`` later streams them out of the store one LoRA at a time.

Layout (``<build>`` names the build, ``<job>`` the job, ``<sha>`` the weights' content)::

    URL/<recipe name>-<build key>/<index:06d>-<job key>/<sha>.safetensors   the PEFT weights
    URL/<recipe name>-<build key>/<index:06d>-<job key>/<sha>.json          the result document

The build key hashes what decides a LoRA's bits besides its job (recipe sha, ``k``, builder
VERSION); the job key hashes the job itself. Keys are named by content, so two attempts of a
chunk (a retry after a worker died mid-upload) can never collide with a half-written object:
a torn object fails its sha256 and is ignored, a complete one holds exactly what its name says.
The weights go first, the document (which carries their sha256 and size) last, so a document
is only ever found beside its weights. On a local / shared file system every object is written
to a temp name and renamed (object stores make a PUT visible whole anyway).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lora_zoo.errors import BuildError

log = logging.getLogger(__name__)


def build_key(recipe_sha256: str, k: int, builder_version: str) -> str:
    """16 hex digits naming one build's LoRAs in a store (see the module docstring)."""
    doc = {"recipe": recipe_sha256, "k": int(k), "builder_version": str(builder_version)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def job_key(job: Mapping[str, Any]) -> str:
    """16 hex digits naming one job (its ``JobSpec.to_dict()``)."""
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StoreRef:
    """Where one finished LoRA lives in a store: enough for the driver to record it."""

    url: str  # the store URL as given (--store)
    key: str  # path of the .safetensors below the store root
    weights_sha256: str
    weights_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreRef:
        return cls(str(d["url"]), str(d["key"]), str(d["weights_sha256"]), int(d["weights_bytes"]))


class LoraStore:
    """Finished LoRAs of builds on one fsspec URL (see the module docstring)."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = str(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url)
        except (ValueError, ImportError) as e:
            raise BuildError(f"cannot open store {self.url!r}: {e}", key="store") from e
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._rename = bool({"file", "local"} & set(protocols))
        if self._rename:
            self.url = self.root  # absolute: references must not depend on the cwd

    # ---- keys ---------------------------------------------------------------------------------
    def job_dir(self, build: str, index: int, job: Mapping[str, Any]) -> str:
        """Key of one job's folder: ``<build>/<index:06d>-<job key>``; ``build`` is
        ``<recipe name>-<build key>``."""
        return f"{build}/{int(index):06d}-{job_key(job)}"

    def _abs(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def _put(self, key: str, data: bytes) -> None:
        path = self._abs(key)
        if not self._rename:
            self.fs.pipe_file(path, data)  # an object PUT becomes visible whole or not at all
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)

    # ---- write (workers) ----------------------------------------------------------------------
    def put(self, job_dir: str, weights: bytes, doc: Mapping[str, Any]) -> StoreRef:
        """Upload one LoRA: weights, then the document naming them (see the module docstring)."""
        sha = hashlib.sha256(weights).hexdigest()
        ref = StoreRef(self.url, f"{job_dir}/{sha}.safetensors", sha, len(weights))
        full = {**doc, "weights_sha256": sha, "weights_bytes": len(weights)}
        try:
            text = json.dumps(full, sort_keys=True, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise BuildError(f"result is not JSON-able: {e}", key=job_dir) from e
        self._put(ref.key, weights)
        self._put(f"{job_dir}/{sha}.json", text.encode())
        return ref

    def put_failure(self, job_dir: str, doc: Mapping[str, Any]) -> None:
        """Record a LoRA that diverged (its step and reason): deterministic, so a rerun records
        it from here instead of training its chunk again."""
        text = json.dumps(dict(doc), sort_keys=True, allow_nan=True).encode()
        self._put(f"{job_dir}/failed-{hashlib.sha256(text).hexdigest()[:16]}.json", text)

    # ---- read (driver, pack) ------------------------------------------------------------------
    def find_failure(self, job_dir: str) -> dict[str, Any] | None:
        """A recorded divergence of this job (see ``put_failure``), or None."""
        try:
            names = sorted(self.fs.ls(self._abs(job_dir), detail=False))
        except FileNotFoundError:
            return None
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.startswith("failed-") and base.endswith(".json") and ".tmp-" not in base:
                try:
                    return json.loads(self.fs.cat_file(name))
                except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
                    continue
        return None

    def find(self, job_dir: str) -> tuple[StoreRef, dict[str, Any]] | None:
        """A complete LoRA of this job already in the store (document + weights of the size it
        names), or None. Several complete ones (CPU retries give the same bytes, a GPU retry
        may not) -> the one with the smallest sha, so every reader picks the same."""
        try:
            names = sorted(self.fs.ls(self._abs(job_dir), detail=False))
        except FileNotFoundError:
            return None
        sizes: dict[str, int] = {}
        docs = []
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.endswith(".json") and ".tmp-" not in base and not base.startswith("failed-"):
                docs.append(base[: -len(".json")])
        for sha in sorted(docs):
            try:
                doc = json.loads(self.fs.cat_file(self._abs(f"{job_dir}/{sha}.json")))
            except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
                continue  # torn document: as if absent
            if doc.get("weights_sha256") != sha:
                continue
            key = f"{job_dir}/{sha}.safetensors"
            try:
                sizes[key] = int(self.fs.size(self._abs(key)))
            except FileNotFoundError:
                continue
            if sizes[key] != int(doc.get("weights_bytes", -1)):
                continue
            return StoreRef(self.url, key, sha, sizes[key]), doc
        return None

    def exists(self, ref: StoreRef) -> bool:
        """Cheap check (size only) that a recorded LoRA is still there; ``get`` verifies."""
        try:
            return int(self.fs.size(self._abs(ref.key))) == ref.weights_bytes
        except FileNotFoundError:
            return False

    def get(self, ref: StoreRef) -> bytes | None:
        """The weights, or None when missing or not what the reference names (sha256)."""
        try:
            data = self.fs.cat_file(self._abs(ref.key))
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != ref.weights_sha256:
            log.warning("store object %s does not match its sha256; ignored", ref.key)
            return None
        return data


_STORES: dict[str, LoraStore] = {}


def open_store(url: str) -> LoraStore:
    """One ``LoraStore`` per URL and process (fsspec file systems are costly to set up)."""
    st = _STORES.get(url)
    if st is None:
        st = _STORES[url] = LoraStore(url)
    return st
