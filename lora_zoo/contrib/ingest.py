"""Turn a pile of existing LoRA files (PEFT folders, diffusers files, kohya files) into a zoo.

Why it is shaped this way: the inputs are untrusted and many. Every candidate is read in
isolation and any failure becomes one entry of the report (file, error class, key, message);
one bad file never stops or loses the others. Nothing is unpickled unless the caller passes
``allow_pickle_conversion`` (then only ``torch.load(weights_only=True)``). Paths found under a
source (symlinks, ``..``) must stay inside it. Accepted LoRAs are written with ``ZooWriter``;
duplicates (same factors, any format) are reported and skipped.

Hub SRCs (``hf://owner/name[@rev][/sub]``, or a bare ``owner/name`` that is not a local path) are
fetched by ``lora_zoo.contrib.ingest_hub`` into a temporary folder first (safetensors and small JSON
only, pinned to one commit sha) and then go through exactly the same checks as local files; each
accepted LoRA from the Hub records repo id, revision and commit sha in its metadata. A Hub SRC
that cannot be opened is one entry of the report; the other SRCs still go through.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_zoo.contrib.formats import FORMATS, read_adapter
from lora_zoo.contrib.formats.base_arch import module_shapes
from lora_zoo.contrib.formats.common import check_against_shapes, delta_shape
from lora_zoo.contrib.formats.detect import detect_format
from lora_zoo.contrib.formats.files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX
from lora_zoo.contrib.formats.peft import CONFIG_NAME
from lora_zoo.contrib.ingest_hub import fetch_all, is_hub_source
from lora_zoo.contrib.ingest_table import MetadataTable, read_table
from lora_zoo.errors import CorruptFileError, LoraZooError, PathEscapeError, ShapeMismatchError
from lora_zoo.progress import track
from lora_zoo.record import LoraRecord
from lora_zoo.zoo.writer import ZooWriter

log = logging.getLogger(__name__)
REPORT_NAME = "ingest_report.json"
_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)


@dataclass
class Candidate:
    path: Path  # as found (not resolved)
    root: Path  # the source directory it must stay inside
    rel: str  # path relative to root, POSIX (for Hub files: the path in the repo)
    id_prefix: str | None = None  # Hub files: the repo id, so ids from two repos never clash
    origin: str | None = None  # Hub files: the pinned hf:// URL the report shows
    provenance: dict[str, Any] | None = None  # Hub files: repo / revision / commit metadata

    @property
    def lora_id(self) -> str:
        rel = self.rel
        for s in _SUFFIXES:
            if rel.lower().endswith(s):
                rel = rel[: -len(s)]
                break
        if self.id_prefix is None:
            return rel
        return f"{self.id_prefix}/{rel}" if rel else self.id_prefix

    @property
    def display(self) -> str:
        return self.origin or str(self.path)


def _inside(path: Path, root: Path) -> bool:
    real, rroot = os.path.realpath(path), os.path.realpath(root)
    return real == rroot or real.startswith(rroot.rstrip(os.sep) + os.sep)


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    keep = []
    for part in parts:
        if glob.has_magic(part):
            break
        keep.append(part)
    return Path(*keep) if keep else Path(".")


def _walk(root: Path, start: Path, out: list[Candidate], bad: list[dict[str, Any]]) -> None:
    """Adapter candidates under ``start``: PEFT folders (not descended into) and tensor files."""
    if (start / CONFIG_NAME).is_file():
        rel = start.relative_to(root).as_posix()
        out.append(Candidate(start, root, start.name if rel == "." else rel))
        return
    for dirpath, dirnames, filenames in os.walk(start, followlinks=False):
        d = Path(dirpath)
        for dn in list(dirnames):
            sub = d / dn
            if sub.is_symlink() and not _inside(sub, root):
                bad.append(
                    _reject(
                        sub, PathEscapeError("symlinked folder points outside the source", file=sub)
                    )
                )
            if sub.is_symlink() or (sub / CONFIG_NAME).is_file():
                dirnames.remove(dn)  # symlinks never followed; PEFT folders are one adapter
                if not sub.is_symlink():
                    out.append(Candidate(sub, root, sub.relative_to(root).as_posix()))
        for fn in sorted(filenames):
            f = d / fn
            if fn.lower().endswith(_SUFFIXES):
                out.append(Candidate(f, root, f.relative_to(root).as_posix()))
        dirnames.sort()


def discover(sources: list[str]) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Expand folders / files / glob patterns into candidates (+ rejections found on the way)."""
    cands: list[Candidate] = []
    bad: list[dict[str, Any]] = []
    for src in sources:
        if glob.has_magic(src):
            root = _glob_root(src)
            matches = sorted(glob.glob(src, recursive=True))
            if not matches:
                bad.append(
                    _reject(Path(src), CorruptFileError("glob pattern matches nothing", file=src))
                )
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    _walk(root, mp, cands, bad)
                else:
                    cands.append(Candidate(mp, root, mp.relative_to(root).as_posix()))
            continue
        p = Path(src)
        if p.is_dir():
            _walk(p, p, cands, bad)
        elif p.is_file() or p.is_symlink():
            cands.append(Candidate(p, p.parent, p.name))
        else:
            bad.append(_reject(p, CorruptFileError("no such file or folder", file=p)))
    seen: set[str] = set()
    unique = []
    for c in cands:  # the same file reached through two sources counts once
        real = os.path.realpath(c.path)
        if real not in seen:
            seen.add(real)
            unique.append(c)
    return unique, bad


def _reject(path: Path | str, err: Exception) -> dict[str, Any]:
    if isinstance(err, LoraZooError):
        d = err.to_dict()
        if d["file"] and d["file"] != str(path):
            d["inner_file"] = d["file"]  # e.g. a PEFT folder's adapter_config.json
        d["file"] = str(path)
        return d
    return {"error": type(err).__name__, "file": str(path), "key": None, "message": str(err)}


def content_hash(rec: LoraRecord) -> str:
    """sha256 of the factors, alphas and scales in canonical order: the same LoRA in two
    formats (or two file names) hashes the same."""
    h = hashlib.sha256()
    for name in sorted(rec.modules):
        m = rec.modules[name]
        h.update(f"{name}|{m.alpha!r}|{m.scale!r}|{m.fan_in_fan_out}|".encode())
        for t in (m.A, m.B):
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_escape(c: Candidate) -> None:
    paths = [c.path]
    if c.path.is_dir():
        paths += [p for p in c.path.iterdir()]
    for p in paths:
        if not _inside(p, c.root):
            raise PathEscapeError(
                f"resolves to {os.path.realpath(p)}, outside the source {c.root}", file=p
            )


def ingest(
    sources: list[str],
    out: str | os.PathLike[str],
    *,
    format: str = "auto",
    metadata: str | os.PathLike[str] | None = None,
    labels: list[str] | tuple[str, ...] = (),
    base_model: str | None = None,
    collection: str = "default",
    max_file_mb: float | None = None,
    allow_pickle_conversion: bool = False,
    assume_alpha_equals_rank: bool = False,
    report_path: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    download_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Ingest ``sources`` into a new zoo at ``out``; returns (and saves) the report.

    ``revision`` pins Hub SRCs that do not say ``@rev`` themselves. Hub downloads go to a
    temporary folder under the lora_zoo cache that is removed afterwards, unless
    ``download_dir`` is given (then they are kept there, one sub-folder per Hub SRC).
    """
    if format != "auto":
        FORMATS.get(format)  # a typo is one clear error, not one rejection per file
    max_bytes = None if max_file_mb is None else int(max_file_mb * 2**20)
    opt = IngestOptions(
        format=format,
        table=read_table(metadata) if metadata else None,
        labels=frozenset(labels),
        shapes=module_shapes(base_model) if base_model else None,
        base_name=str(base_model or ""),
        collection=collection,
        max_bytes=max_bytes,
        allow_pickle_conversion=allow_pickle_conversion,
        assume_alpha_equals_rank=assume_alpha_equals_rank,
    )
    hub_srcs = [s for s in sources if is_hub_source(s)]
    cands, rejected = discover([s for s in sources if s not in hub_srcs])
    tmp: Path | None = None
    if hub_srcs and download_dir is None:
        from lora_zoo._io import cache_root

        (cache_root() / "ingest").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="hub-", dir=cache_root() / "ingest"))
    try:
        hub_report = fetch_all(hub_srcs, Path(download_dir or tmp or "."), revision=revision,
                               max_bytes=max_bytes, make_candidate=Candidate,
                               cands=cands, rejected=rejected)  # fmt: skip
        report = _ingest(cands, rejected, out, opt, sources=sources, hub_report=hub_report)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    rp = Path(report_path) if report_path else Path(out) / REPORT_NAME
    rp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    report["report_path"] = str(rp)
    c = report["counts"]
    log.info("ingest: %d accepted, %d rejected, %d duplicates",
             c["accepted"], c["rejected"], c["duplicates"])  # fmt: skip
    return report


def _reject_candidate(c: Candidate, e: Exception) -> dict[str, Any]:
    """A rejection named by the file the user knows (the hf:// URL for Hub files)."""
    d = _reject(c.path, e)
    if c.origin:
        d["file"] = c.origin
        inner = d.get("inner_file")
        if inner and str(inner).startswith(str(c.path)):
            d["inner_file"] = c.origin.rstrip("/") + str(inner)[len(str(c.path)) :]
    return d


@dataclass(frozen=True)
class IngestOptions:
    """How every candidate of one ingest is read, checked and stored (``ingest``'s arguments,
    resolved: the metadata table read, the base model's module shapes looked up)."""

    format: str = "auto"
    table: MetadataTable | None = None
    labels: frozenset[str] = frozenset()
    shapes: dict[str, Any] | None = None
    base_name: str = ""
    collection: str = "default"
    max_bytes: int | None = None
    allow_pickle_conversion: bool = False
    assume_alpha_equals_rank: bool = False


@dataclass
class _IngestState:
    """What the ingest has seen so far (the collection-level checks need it)."""

    accepted: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)  # content sha256 -> first file
    ref_shapes: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    used_keys: set[str] = field(default_factory=set)
    missing_rows: list[str] = field(default_factory=list)


def _read_candidate(c: Candidate, opt: IngestOptions) -> tuple[LoraRecord, str]:
    """The candidate's record and format, checked against the base model's shapes."""
    _check_escape(c)
    fmt = detect_format(c.path, opt.max_bytes) if opt.format == "auto" else opt.format
    rec = read_adapter(
        c.path,
        fmt,
        allow_pickle_conversion=opt.allow_pickle_conversion,
        max_bytes=opt.max_bytes,
        known_modules=list(opt.shapes) if opt.shapes else None,
        assume_alpha_equals_rank=opt.assume_alpha_equals_rank,
    )
    if opt.shapes is not None:
        check_against_shapes(rec, opt.shapes, file=c.display, what=f"base model {opt.base_name}")
    return rec, fmt


def _check_collection_shapes(rec: LoraRecord, c: Candidate, st: _IngestState) -> None:
    """Same module, same collection: the same ΔW shape as the first LoRA that had it."""
    for name, m in rec.modules.items():
        got = delta_shape(m)
        if name in st.ref_shapes and st.ref_shapes[name][0] != got:
            want, first = st.ref_shapes[name]
            raise ShapeMismatchError(
                f"ΔW shape {got} differs from {want} in {first} (same module, "
                "same collection: different base models?)",
                file=c.path,
                key=name,
            )


def _row(
    c: Candidate, lora_id: str, fmt: str, digest: str, opt: IngestOptions, st: _IngestState
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, labels) of one row: provenance plus the metadata table's columns."""
    meta: dict[str, Any] = {
        "source_file": c.rel,
        "source_format": fmt,
        "content_sha256": digest,
        **(c.provenance or {}),
    }
    labs: dict[str, Any] = {}
    if opt.table is not None:
        hit = opt.table.lookup([lora_id, c.rel, c.lora_id, c.path.name, Path(c.lora_id).name])
        if hit is None:
            st.missing_rows.append(lora_id)
        else:
            st.used_keys.add(hit[0])
            for col, v in hit[1].items():
                (labs if col in opt.labels else meta)[col] = v
    return meta, labs


def _ingest_one(w: ZooWriter, c: Candidate, opt: IngestOptions, st: _IngestState) -> None:
    """Read, check and store one candidate (or record it as a duplicate); raises on rejection."""
    rec, fmt = _read_candidate(c, opt)
    _check_collection_shapes(rec, c, st)
    digest = content_hash(rec)
    if digest in st.hashes:
        st.duplicates.append(
            {"file": c.display, "duplicate_of": st.hashes[digest], "sha256": digest}
        )
        return
    lora_id = c.lora_id
    k = 2
    while lora_id in w:
        lora_id, k = f"{c.lora_id}~{k}", k + 1
    meta, labs = _row(c, lora_id, fmt, digest, opt, st)
    base = opt.base_name or str(rec.config.get("base_model_name_or_path") or "")
    w.add(rec, lora_id=lora_id, metadata=meta, labels=labs, base_model=base,
          collection=opt.collection)  # fmt: skip
    st.hashes[digest] = c.display
    for name, m in rec.modules.items():
        st.ref_shapes.setdefault(name, (delta_shape(m), c.display))
    st.accepted.append({"lora_id": lora_id, "file": c.display, "format": fmt,
                        "modules": len(rec), "rank": max(rec.ranks.values())})  # fmt: skip
    if c.provenance:
        st.accepted[-1].update(hub_repo=c.provenance["hub_repo"],
                               hub_commit=c.provenance["hub_commit"])  # fmt: skip


def _report(
    out: str | os.PathLike[str],
    cands: list[Candidate],
    rejected: list[dict[str, Any]],
    opt: IngestOptions,
    st: _IngestState,
    sources: list[str],
    hub_report: list[dict[str, Any]],
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "out": str(out),
        "sources": list(sources),
        "collection": opt.collection,
        "base_model": opt.base_name,
        "base_model_checked": opt.shapes is not None,
        "counts": {
            "candidates": len(cands),
            "accepted": len(st.accepted),
            "rejected": len(rejected),
            "duplicates": len(st.duplicates),
        },  # fmt: skip
        "accepted": st.accepted,
        "rejected": rejected,
        "duplicates": st.duplicates,
    }
    table = opt.table
    if table is not None:
        report["metadata"] = {
            "table": table.path,
            "key_column": table.key_column,
            "column_types": table.types,
            "labels": sorted(opt.labels & set(table.types)),
            "missing_rows": st.missing_rows,
            "extra_rows": sorted(set(table.rows) - st.used_keys),
            "type_errors": table.type_errors,
        }
    if hub_report:
        report["hub"] = hub_report
    return report


def _ingest(
    cands: list[Candidate],
    rejected: list[dict[str, Any]],
    out: str | os.PathLike[str],
    opt: IngestOptions,
    *,
    sources: list[str],
    hub_report: list[dict[str, Any]],
) -> dict[str, Any]:
    st = _IngestState()
    with ZooWriter(out, mode="create") as w:
        for c in track(cands, desc="ingest", unit="lora", enabled=len(cands) >= 20):
            try:
                _ingest_one(w, c, opt, st)
            except LoraZooError as e:
                rejected.append(_reject_candidate(c, e))
            except Exception as e:  # a bug or library error on one file must not stop the rest
                log.exception("%s: unexpected error", c.display)
                rejected.append(_reject_candidate(c, e))
        report = _report(out, cands, rejected, opt, st, sources, hub_report)
        info = {k: report[k] for k in ("sources", "collection", "base_model", "counts")}
        if hub_report:  # zoo-level provenance: which repos at which commits
            info["hub"] = [{k: h.get(k) for k in ("source", "repo_id", "revision", "commit")}
                           for h in hub_report if "commit" in h]  # fmt: skip
        w.set_info(ingest=info)
    return report
