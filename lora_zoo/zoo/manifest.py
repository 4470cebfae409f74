"""The manifest (``lora_zoo.json``): what a zoo contains, and the checks that it is intact.

The manifest is the zoo's commit point: the writer renames it into place last, so a directory
without one is an unfinished write, and every shard a manifest lists carries its row count, size
and sha256. ``verify`` re-derives all of those from the bytes (local or any fsspec filesystem), so
a zoo downloaded from anywhere can be checked without trusting the transport.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq

from lora_zoo._io import (
    TMP_SUFFIX,
    atomic_write_bytes,
    check_case_collisions,
    load_untrusted_yaml,
    local_fs,
    safe_relpath,
    sha256_file,
    staged_path_for,
)
from lora_zoo.errors import LoraZooError, ZooFormatError, reading
from lora_zoo.zoo.schema import (
    DATA_DIR,
    FORMAT_VERSION,
    MANIFEST_NAME,
    README_NAME,
    ROLES,
    SPLITS_DIR,
    check_core_types,
    schema_matches,
)

log = logging.getLogger(__name__)

# Keys of format version 2 (v1 had no "parquet"), pinned by tests/unit/zoo/test_manifest.py and docs/FORMAT.md.
MANIFEST_KEYS = (
    "format_version",
    "lora_zoo_version",
    "num_rows",
    "splits",
    "columns",
    "named_splits",
    "parquet",
    "info",
)
SPLIT_KEYS = ("num_rows", "num_bytes", "shards")
SHARD_KEYS = ("path", "num_rows", "num_bytes", "sha256")


def as_fs(root_or_fs: Any, root: str | os.PathLike[str] | None = None):
    """(filesystem, root path) from a local path, or from an fsspec filesystem plus a root."""
    if isinstance(root_or_fs, fsspec.AbstractFileSystem):
        if root is None:
            raise ValueError("a filesystem needs a root path")
        return root_or_fs, str(root).rstrip("/")
    root_path = str(Path(root_or_fs).resolve())
    return local_fs(root_path), root_path


def join(root: str, rel: str) -> str:
    return posixpath.join(root, rel) if root else rel


def write_manifest(root: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    data = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(Path(root) / MANIFEST_NAME, data.encode(), root=root)


# ---- reading + structural validation -----------------------------------------------------------
def _nonneg_int(v: Any, *, file: str, key: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ZooFormatError("must be a non-negative integer", file=file, key=key)


def _check_header_keys(m: Any, *, file: str) -> int:
    """The top level: an object with a supported format version; returns the version."""
    if not isinstance(m, dict):
        raise ZooFormatError("manifest is not a JSON object", file=file)
    for k in ("format_version", "splits", "columns"):
        if k not in m:
            raise ZooFormatError("missing key", file=file, key=k)
    fv = m["format_version"]
    if not isinstance(fv, int) or fv > FORMAT_VERSION or fv < 1:
        raise ZooFormatError(
            f"format_version {fv!r} is not supported (this lora-zoo reads 1..{FORMAT_VERSION}; "
            "upgrade lora-zoo)",
            file=file,
            key="format_version",
        )
    if not isinstance(m["splits"], dict):
        raise ZooFormatError("must be an object {split: {...}}", file=file, key="splits")
    return fv


def _check_shard_entry(sh: Any, where: str, seen: dict[str, str], *, file: str) -> None:
    """One shard entry: every key, a safe path under data/, sizes, a hash, listed once."""
    for k in SHARD_KEYS:
        if not isinstance(sh, dict) or k not in sh:
            raise ZooFormatError("missing key", file=file, key=f"{where}.{k}")
    safe_relpath(sh["path"], file=file, key=f"{where}.path", under=(DATA_DIR,))
    for k in ("num_rows", "num_bytes"):
        _nonneg_int(sh[k], file=file, key=f"{where}.{k}")
    if not isinstance(sh["sha256"], str):
        raise ZooFormatError("must be a hex string", file=file, key=f"{where}.sha256")
    # a shard listed twice would serve its rows twice, and only one entry's hash would describe
    # the bytes actually read
    if sh["path"] in seen:
        raise ZooFormatError(
            f"shard {sh['path']!r} is listed twice (also at {seen[sh['path']]})",
            file=file,
            key=f"{where}.path",
        )
    seen[sh["path"]] = f"{where}.path"


def _check_splits(m: dict[str, Any], *, file: str) -> None:
    seen: dict[str, str] = {}  # shard path -> where it was listed first
    for s, sp in m["splits"].items():
        if not isinstance(sp, dict) or not isinstance(sp.get("shards"), list):
            raise ZooFormatError("needs a 'shards' list", file=file, key=f"splits.{s}")
        for k in ("num_rows", "num_bytes"):
            _nonneg_int(sp.get(k, 0), file=file, key=f"splits.{s}.{k}")
        for i, sh in enumerate(sp["shards"]):
            _check_shard_entry(sh, f"splits.{s}.shards.{i}", seen, file=file)
        for k in ("num_rows", "num_bytes"):  # optional per split: the sum of its shards
            sp.setdefault(k, sum(sh[k] for sh in sp["shards"]))


def _check_columns(m: dict[str, Any], *, file: str) -> None:
    if not isinstance(m["columns"], list):
        raise ZooFormatError("must be a list", file=file, key="columns")
    for i, c in enumerate(m["columns"]):
        if not isinstance(c, dict) or not {"name", "type", "role"} <= c.keys():
            raise ZooFormatError("needs name, type, role", file=file, key=f"columns.{i}")
        if not isinstance(c["name"], str) or not isinstance(c["type"], str):
            raise ZooFormatError("name and type must be strings", file=file, key=f"columns.{i}")
        if c["role"] not in ROLES:
            raise ZooFormatError(f"unknown role {c['role']!r}", file=file, key=f"columns.{i}.role")


def _check_named_split_entries(m: dict[str, Any], fv: int, *, file: str) -> dict[str, Any]:
    named = m.setdefault("named_splits", {})
    if not isinstance(named, dict):
        raise ZooFormatError("must be an object {name: {...}}", file=file, key="named_splits")
    for name, ns in named.items():
        where = f"named_splits.{name}"
        if not isinstance(ns, dict):
            raise ZooFormatError("must be an object", file=file, key=where)
        safe_relpath(ns.get("path", f"{SPLITS_DIR}/{name}.json"), file=file, key=f"{where}.path",
                     under=(SPLITS_DIR,))  # fmt: skip
        missing = [k for k in ("sha256", "num_bytes") if k not in ns]
        if missing and fv >= 2:
            raise ZooFormatError(f"needs {' and '.join(missing)}", file=file, key=where)
        if missing:
            log.warning(
                "%s: %s: a format-1 named split without %s: it is read with a size cap only "
                "(re-save it with lora-zoo split to record them)",
                file,
                where,
                " / ".join(missing),
            )
    return named


def validate_manifest(m: Any, *, file: str) -> dict[str, Any]:
    """Check the manifest's structure (not the shards' bytes) with errors naming the key."""
    fv = _check_header_keys(m, file=file)
    _check_splits(m, file=file)
    _check_columns(m, file=file)
    named = _check_named_split_entries(m, fv, file=file)
    listed = [(f"splits.{s}.shards.{i}.path", sh["path"]) for s, sp in m["splits"].items()
              for i, sh in enumerate(sp["shards"])]  # fmt: skip
    listed += [(f"named_splits.{n}.path", ns.get("path", f"{SPLITS_DIR}/{n}.json"))
               for n, ns in named.items()]  # fmt: skip
    check_case_collisions(listed, file=file)
    if not isinstance(m.setdefault("info", {}), dict):
        raise ZooFormatError("must be an object {key: value}", file=file, key="info")
    return m


def read_manifest(fs, root: str) -> dict[str, Any]:
    path = join(root, MANIFEST_NAME)
    if not fs.exists(path):
        raise ZooFormatError(
            "no lora_zoo.json: not a zoo, or its write never finished (the manifest is written "
            "last)",
            file=path,
        )
    try:
        with reading(path, error=ZooFormatError), fs.open(path, "rb") as f:
            raw = f.read()
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ZooFormatError(f"manifest is not valid JSON ({e})", file=path) from e
    return validate_manifest(m, file=path)


def all_shards(m: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(s, sh) for s, sp in m["splits"].items() for sh in sp["shards"]]


# ---- verify -----------------------------------------------------------------------------------
def verify(root_or_fs: Any, root: str | None = None, *, hashes: bool = True) -> list[str]:
    """Every problem found (empty list = intact): shard sha256, size and row counts, schema
    agreement with the manifest, duplicate ids, named splits, README configs, unknown or
    leftover temp files under data/. Each message names the file."""
    fs, root = as_fs(root_or_fs, root)
    try:
        m = read_manifest(fs, root)
    except ZooFormatError as e:
        return [str(e)]
    problems: list[str] = []
    listed = set()
    ids: dict[str, str] = {}
    for _split, sh in all_shards(m):
        rel = sh["path"]
        listed.add(rel)
        path = join(root, rel)
        if not fs.exists(path):
            problems.append(f"{rel}: shard listed in the manifest is missing")
            continue
        if hashes:
            try:
                with reading(path, "sha256"):
                    digest, size = sha256_file(fs, path)
            except LoraZooError as e:
                problems.append(f"{rel}: {e.message}")
                continue
            if size != sh["num_bytes"]:
                problems.append(f"{rel}: size {size} != manifest num_bytes {sh['num_bytes']}")
            if digest != sh["sha256"]:
                problems.append(f"{rel}: sha256 {digest} != manifest {sh['sha256']}")
                continue
        problems += _check_shard(fs, path, rel, sh, m["columns"], ids)
    for split, sp in m["splits"].items():
        n = sum(sh["num_rows"] for sh in sp["shards"])
        if sp["num_rows"] != n:
            problems.append(f"{MANIFEST_NAME}: splits.{split}.num_rows {sp['num_rows']} != {n}")
    problems += _check_data_dir(fs, root, listed)
    problems += _check_named_splits(fs, root, m, set(ids))
    problems += _check_readme(fs, root, m)
    return problems


def _check_shard(
    fs, path: str, rel: str, sh: Mapping[str, Any], columns: list[Any], ids: dict[str, str]
) -> list[str]:
    """What is wrong with one shard's rows: the footer's row counts, per row group, against the
    rows actually read, their sum against the manifest, the schema, lora_ids unique across the
    zoo (``ids``: id -> shard, filled here). A footer that lies about row-group counts would
    make position-based reads serve one LoRA under another's id."""
    out: list[str] = []
    try:
        with reading(path, "footer"), fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            diff = schema_matches(pf.schema_arrow, columns)
            if diff:
                out.append(f"{rel}: {diff}")
            check_core_types(pf.schema_arrow, file=rel)
            got: list[Any] = []
            for g in range(md.num_row_groups):
                with reading(path, f"row group {g}"):
                    # every column, so a corrupt page anywhere (weights included) is found here
                    # and not by the first reader of that LoRA; one row group in memory at a time
                    part = pf.read_row_group(g).column("lora_id").to_pylist()
                if len(part) != md.row_group(g).num_rows:
                    out.append(
                        f"{rel}: row group {g} holds {len(part)} rows but its footer says "
                        f"{md.row_group(g).num_rows}"
                    )
                got += part
            with reading(path, "lora_id"):
                whole = pf.read(columns=["lora_id"]).column(0).to_pylist()
    except ZooFormatError as e:
        return [*out, str(e)]
    except Exception as e:  # unreadable Parquet: report, keep checking the rest
        return [*out, f"{rel}: not readable Parquet ({e})"]
    if whole != got:
        out.append(f"{rel}: the row groups hold other rows than the whole file ({len(got)} vs "
                   f"{len(whole)})")  # fmt: skip
    if md.num_rows != sh["num_rows"]:
        out.append(f"{rel}: {md.num_rows} rows != manifest num_rows {sh['num_rows']}")
    elif len(whole) != md.num_rows:
        out.append(f"{rel}: {len(whole)} rows read but the footer says {md.num_rows}")
    for lid in whole:
        if lid in ids:
            out.append(f"{rel}: duplicate lora_id {lid!r} (also in {ids[lid]})")
        ids[lid] = rel
    return out


def _check_data_dir(fs, root: str, listed: set[str]) -> list[str]:
    out = []
    data = join(root, DATA_DIR)
    if not fs.exists(data):
        return out
    for p in sorted(fs.find(data)):
        rel = posixpath.relpath(p, root) if root else p
        if rel in listed:
            continue
        if p.endswith(TMP_SUFFIX):
            out.append(f"{rel}: leftover temp file from an interrupted write (safe to delete)")
        else:
            out.append(f"{rel}: unknown file in data/ (not listed in the manifest)")
    return out


def _check_named_splits(fs, root: str, m: Mapping[str, Any], ids: set[str]) -> list[str]:
    out = []
    for name, ns in (m.get("named_splits") or {}).items():
        rel = ns.get("path", f"{SPLITS_DIR}/{name}.json") if isinstance(ns, dict) else ""
        path = join(root, rel)
        if not rel or not fs.exists(path):
            out.append(f"{rel or name}: named split {name!r} listed in the manifest is missing")
            continue
        if isinstance(ns, dict) and "sha256" in ns and sha256_file(fs, path)[0] != ns["sha256"]:
            out.append(f"{rel}: sha256 differs from the manifest's named_splits.{name}")
        try:
            with fs.open(path, "rb") as f:
                assign = json.loads(f.read())
        except Exception as e:
            out.append(f"{rel}: not valid JSON ({e})")
            continue
        if not isinstance(assign, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in assign.values()
        ):
            out.append(f"{rel}: not an object {{split: [lora_id, ...]}}")
            continue
        seen: set[str] = set()
        for split, members in assign.items():
            for lid in members:
                if lid in seen:
                    out.append(f"{rel}: lora_id {lid!r} is in two splits")
                elif ids and lid not in ids:
                    out.append(f"{rel}: lora_id {lid!r} (split {split!r}) is not in the zoo")
                seen.add(lid)
    return out


def _check_readme(fs, root: str, m: Mapping[str, Any]) -> list[str]:
    """The README's `configs:` must list exactly the manifest's shards, or the Hub and
    ``datasets.load_dataset`` would read different rows than lora_zoo does."""
    path = join(root, README_NAME)
    if not fs.exists(path):
        return [f"{README_NAME}: missing (datasets.load_dataset needs its configs header)"]
    got = _readme_data_files(fs, path)
    if isinstance(got, str):
        return [got]
    want = {s: [sh["path"] for sh in sp["shards"]] for s, sp in m["splits"].items() if sp["shards"]}
    if got == want:
        return []
    # a writer killed between the manifest's rename and the card's: the card for this manifest
    # is staged beside README.md. Still a problem (the Hub would read the old shards), but a
    # leftover of an interrupted write, said as such, not a README that disagrees on its own.
    staged = join(root, staged_path_for(Path(README_NAME)).name)
    if fs.exists(staged) and _readme_data_files(fs, staged) == want:
        return [
            f"{staged_path_for(Path(README_NAME)).name}: leftover temp file from an interrupted "
            f"write: it holds the card for this manifest and README.md is one write behind "
            f"(the next write or `lora-zoo card` replaces README.md)"
        ]
    return [f"{README_NAME}: configs data_files {got} != manifest shards {want}"]


def _readme_data_files(fs, path: str) -> dict[str, list[str]] | str:
    """The default config's data_files of a card, or a problem message. The card is text from
    strangers: every level of the header may be any YAML type."""
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    if not text.startswith("---"):
        return f"{README_NAME}: no YAML header with configs"
    try:
        header = load_untrusted_yaml(text.split("---", 2)[1], file=README_NAME, key="header") or {}
    except ZooFormatError as e:
        return str(e)
    configs = header.get("configs") if isinstance(header, dict) else None
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        return f"{README_NAME}: YAML header key 'configs' is not a list of mappings"
    got: dict[str, list[str]] = {}
    for cfg in configs:
        if cfg.get("config_name", "default") != "default":
            continue
        files = cfg.get("data_files") or []
        if not isinstance(files, list) or not all(isinstance(d, dict) for d in files):
            return f"{README_NAME}: YAML header key 'configs.data_files' is not a list of mappings"
        for df in files:
            p = df.get("path")
            if not (
                isinstance(p, str) or (isinstance(p, list) and all(isinstance(x, str) for x in p))
            ):
                return f"{README_NAME}: YAML header key 'configs.data_files.path' is not a path or list of paths"
            got[str(df.get("split"))] = [p] if isinstance(p, str) else list(p)
    return got
