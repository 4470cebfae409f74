"""Small file helpers every stage needs, in one copy each: durable atomic writes, streamed
sha256, natural sort, and the cache root.

Why one copy: the durability rule (temp file beside the target, fsync the file, rename, fsync
the directory) is easy to get almost right; four slightly different writers were four chances
to lose a manifest on a power cut.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"  # temp files never end in .parquet / .json, so no reader picks them up


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename durable (POSIX needs the directory entry flushed too)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def tmp_path_for(path: Path) -> Path:
    """Temp name beside ``path``: hidden, pid-tagged, never ending in .parquet / .json."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """temp file + fsync + rename + fsync(dir): readers see the old file or the new one, never
    half, and the new one survives a power cut once this returns."""
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(fs: Any, path: str, chunk: int = 8 << 20) -> tuple[str, int]:
    """(hex sha256, byte size) of a file on any fsspec filesystem, streamed."""
    h, n = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            n += len(b)
    return h.hexdigest(), n


def sha256_local(path: str | os.PathLike[str], chunk: int = 8 << 20) -> str:
    """hex sha256 of a local file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def natural_key(s: str) -> list[Any]:
    """Sort 'layers.10' after 'layers.9' (module order everywhere: records, decode, views)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_relpath(
    path: Any,
    *,
    file: str | os.PathLike[str] | None = None,
    key: str | None = None,
    under: tuple[str, ...] | None = None,
) -> str:
    """The one check for every path that comes from a zoo, a manifest, a Hub listing or an
    archive: a relative POSIX path with no ``..``, no absolute root, no backslash or drive letter,
    no empty or ``.`` segment, optionally inside one of the folders ``under`` allows. Returns it
    unchanged; raises ``PathEscapeError`` naming the file and key otherwise.

    Why so strict: these paths are joined to a destination folder on the user's disk (pull,
    ingest, merge, named splits). Anything that is not plainly "a file below here" is refused
    rather than normalised, so no two spellings can mean different files on different OSes.
    ``resolve_under`` adds the symlink check once the folder exists."""
    from lora_zoo.errors import PathEscapeError

    def bad(why: str) -> PathEscapeError:
        return PathEscapeError(f"unsafe path {path!r}: {why}", file=file, key=key)

    if not isinstance(path, str) or not path:
        raise bad("not a non-empty string")
    if "\\" in path or _DRIVE.match(path) or "\x00" in path:
        raise bad("backslash, drive letter or NUL")
    if path.startswith("/"):
        raise bad("absolute")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise bad("empty, '.' or '..' segment")
    if under is not None and (len(parts) < 2 or parts[0] not in under):
        raise bad(f"must be inside {', '.join(under)}/")
    return path


def resolve_under(root: str | os.PathLike[str], rel: str, **kw: Any) -> Path:
    """``root / rel`` after ``safe_relpath``, refusing a result that a symlink inside ``root``
    points outside of it (``Path.resolve`` follows every link that already exists)."""
    from lora_zoo.errors import PathEscapeError

    safe_relpath(rel, **kw)
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise PathEscapeError(
            f"{rel!r} resolves outside {base} (symlink)", file=kw.get("file"), key=kw.get("key")
        )
    return base / rel


def stable_permutation(n: int, seed: int, salt: str = "") -> list[int]:
    """A seeded permutation of ``range(n)`` that depends on nothing but ``(n, seed, salt)``.

    Why not numpy or ``random``: NEP 19 lets numpy change a Generator's algorithms (shuffle,
    permutation, integers) between versions, and ``random`` is global state; a zoo's splits and
    a builder's data order must come out the same years later on any platform. Scheme (v1,
    stable forever): sort ``i`` by ``sha256(f"lora-zoo/perm/v1/{seed}/{salt}/{i}")``.
    """

    def key(i: int) -> bytes:
        return hashlib.sha256(f"lora-zoo/perm/v1/{int(seed)}/{salt}/{i}".encode()).digest()

    return sorted(range(int(n)), key=key)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where downloads and derived artefacts are cached: an explicit ``cache_dir`` wins, then
    ``$LORA_ZOO_CACHE``, else ``~/.cache/lora_zoo``."""
    return Path(cache_dir or os.environ.get("LORA_ZOO_CACHE") or "~/.cache/lora_zoo").expanduser()


__all__ = [
    "TMP_SUFFIX",
    "atomic_write_bytes",
    "cache_root",
    "fsync_dir",
    "natural_key",
    "resolve_under",
    "safe_relpath",
    "sha256_file",
    "sha256_local",
    "stable_permutation",
    "tmp_path_for",
]
