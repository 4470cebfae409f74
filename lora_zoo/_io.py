"""Small file helpers every stage needs, in one copy each: durable atomic writes, streamed
sha256, natural sort, the cache root, and the one filesystem trust boundary (safe paths and
portable names, no-follow reads and writes, the local fsspec filesystem zoos are read through,
the YAML loader for text that comes from a zoo).

Why one copy: the durability rule (temp file beside the target, fsync the file, rename, fsync
the directory) is easy to get almost right; four slightly different writers were four chances
to lose a manifest on a power cut.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from fsspec.implementations.local import LocalFileSystem

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


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, root: str | os.PathLike[str] | None = None
) -> None:
    """temp file + fsync + rename + fsync(dir): readers see the old file or the new one, never
    half, and the new one survives a power cut once this returns.

    Never writes through a link: the target, its folder (and, with ``root``, every folder
    between ``root`` and the target, created here if missing) must not be symlinks
    (``check_write_target``), and the temp file is created with O_EXCL | O_NOFOLLOW."""
    path = check_write_target(path, root=root)
    tmp = tmp_path_for(path)
    _write_durable(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _write_durable(tmp: Path, data: bytes) -> None:
    """``data`` into a fresh file at ``tmp`` (O_EXCL | O_NOFOLLOW), fsynced; removed on failure."""
    try:
        with create_exclusive(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def staged_path_for(path: Path) -> Path:
    """The fixed name a file waits under until its commit point has passed (see ``stage_bytes``).
    Fixed, not pid-tagged, so ``verify`` can find what a killed writer had staged."""
    return path.with_name(f".{path.name}.staged{TMP_SUFFIX}")


def stage_bytes(
    path: str | os.PathLike[str], data: bytes, *, root: str | os.PathLike[str] | None = None
) -> Path:
    """Write ``data`` durably beside ``path`` under its staged name, without replacing ``path``.

    Why: a zoo has one commit point (the manifest's rename) but files derived from the manifest
    (README.md's configs, croissant.json) must change with it. Writing them before the commit
    would make a killed append's old zoo disagree with its own card; writing them after leaves
    a window with nothing on disk to finish from. Staged, they are complete before the commit
    and only a rename after it (``commit_staged``)."""
    path = check_write_target(path, root=root)
    staged = staged_path_for(path)
    _write_durable(staged, data)
    return staged


def commit_staged(staged: Path, path: str | os.PathLike[str]) -> None:
    """Rename a staged file over its target (the second half of ``stage_bytes``)."""
    os.replace(staged, path)
    fsync_dir(Path(path).parent)


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
#: names Windows reserves for devices, with any extension and in any case ("nul.json", "Com1")
_RESERVED = re.compile(
    r"^(con|prn|aux|nul|com[1-9\u00b9\u00b2\u00b3]|lpt[1-9\u00b9\u00b2\u00b3])(\..*)?$", re.I
)
#: characters Windows forbids in a name (``\`` and ``/`` are handled as separators)
_FORBIDDEN = re.compile(r'[<>:"|?*\x00-\x1f]')


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
    Names that cannot exist on Windows or macOS (reserved device names, a trailing dot or
    space, ``<>:"|?*`` and control characters) are refused too, so a zoo that opens here opens
    everywhere; ``check_case_collisions`` adds the set-wide rule (two paths equal but for case).
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
    for p in parts:  # so a zoo that opens here opens on Windows and macOS too
        if _FORBIDDEN.search(p):
            raise bad(f'segment {p!r} holds a character Windows forbids (<>:"|?* or control)')
        if _RESERVED.match(p):
            raise bad(f"segment {p!r} is a name Windows reserves for a device")
        if p[-1] in ". ":
            raise bad(f"segment {p!r} ends in a dot or space (Windows drops it)")
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


def check_case_collisions(paths: Iterable[tuple[str, str]], *, file: Any = None) -> None:
    """Refuse two listed paths that differ only by case (``(key, path)`` pairs, checked once per
    manifest): on Windows and macOS they are one file, so one would silently replace the other."""
    from lora_zoo.errors import PathEscapeError

    seen: dict[str, tuple[str, str]] = {}
    for key, path in paths:
        folded = path.casefold()
        if folded in seen and seen[folded][1] != path:
            raise PathEscapeError(
                f"{path!r} and {seen[folded][1]!r} ({seen[folded][0]}) differ only by case: "
                "one file on Windows and macOS",
                file=file,
                key=key,
            )
        seen.setdefault(folded, (key, path))


# ---- the no-follow filesystem rule ----------------------------------------------------------
# Every read of a zoo's content and every write under a zoo folder, a pull destination or a work
# dir goes through these: no symlink in any component lora-zoo walks below the root, and only
# regular files (never a FIFO that blocks, a device that never ends, or a socket).
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not block before the fstat
_O_BINARY = getattr(os, "O_BINARY", 0)


def _refuse(path: Any, why: str, key: str | None = None) -> Exception:
    from lora_zoo.errors import PathEscapeError

    return PathEscapeError(
        f"{why}: lora-zoo never reads or writes zoo files through links or special files",
        file=path,
        key=key,
    )


def _components(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> list[Path]:
    """The folders from ``root`` (included) down to ``path`` (excluded), lexically (no link is
    followed to compute them); without a root, just ``path``'s folder. Refuses a path that is
    not below ``root``."""
    p = Path(os.path.abspath(path))
    if root is None:
        return [p.parent]
    r = Path(os.path.abspath(root))
    try:
        rel = p.relative_to(r)
    except ValueError:
        raise _refuse(p, f"not inside {r}") from None
    return [r.joinpath(*rel.parts[:i]) for i in range(len(rel.parts))]


def _check_folders(folders: list[Path], *, create: bool, key: str | None = None) -> None:
    for d in folders:
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            if not create:
                return  # the open below reports the missing file
            try:
                os.mkdir(d)
            except FileExistsError:
                pass
            st = os.lstat(d)
        if stat.S_ISLNK(st.st_mode):
            raise _refuse(d, "a symlinked folder", key)
        if not stat.S_ISDIR(st.st_mode):
            raise _refuse(d, "not a folder", key)


def check_write_target(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    key: str | None = None,
) -> Path:
    """Make ``path`` safe to write: its folder (with ``root``: ``root`` and every folder below it,
    created when missing) is a real folder, not a symlink, and the target itself is absent or a
    regular file, never a link. Returns ``path`` as a ``Path``."""
    p = Path(path)
    _check_folders(_components(p, root), create=root is not None, key=key)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return p
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(p, "a symlink", key)
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(p, "not a regular file", key)
    return p


def safe_mkdirs(root: str | os.PathLike[str], rel: str = "", **kw: Any) -> Path:
    """``root / rel`` as a folder, created component by component, none of them (``root``
    included) a symlink; the folders above ``root`` are the user's and may be anything."""
    Path(os.path.abspath(root)).parent.mkdir(parents=True, exist_ok=True)
    target = Path(root) / rel if rel else Path(root)
    if rel:
        safe_relpath(rel, **kw)
    _check_folders([*_components(target, root), target], create=True, key=kw.get("key"))
    return target


def create_exclusive(tmp: Path) -> BinaryIO:
    """A fresh file at ``tmp`` that is not a link someone planted (O_EXCL | O_NOFOLLOW)."""
    tmp.unlink(missing_ok=True)  # a killed run's temp (unlink removes a link, never its target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_BINARY
    return os.fdopen(os.open(tmp, flags, 0o644), "wb")


def open_regular(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    key: str | None = None,
) -> BinaryIO:
    """Open a local zoo file for reading: no folder below ``root`` is a symlink, the file is
    opened with O_NOFOLLOW, and ``fstat`` (of what was opened, so nothing can swap it after the
    check) must say a regular file."""
    if root is not None:
        _check_folders(_components(path, root), create=False, key=key)
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_BINARY)
    except OSError as e:
        if e.errno == errno.ELOOP or (not _O_NOFOLLOW and os.path.islink(path)):
            raise _refuse(path, "a symlink", key) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refuse(path, "not a regular file (a folder, FIFO, device or socket)", key)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_regular(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    key: str | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """The bytes of a regular local file (``open_regular``), refusing more than ``max_bytes``."""
    with open_regular(path, root=root, key=key) as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        from lora_zoo.errors import ZooFormatError

        raise ZooFormatError(f"larger than the {max_bytes:,}-byte cap", file=path, key=key)
    return data


def map_regular(
    path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> mmap.mmap:
    """A read-only memory map of a regular local file (``open_regular``), for zero-copy Parquet."""
    with open_regular(path, root=root) as f:
        if os.fstat(f.fileno()).st_size == 0:
            from lora_zoo.errors import CorruptFileError

            raise CorruptFileError("empty file", file=path)
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def is_regular_file(path: str | os.PathLike[str]) -> bool:
    """True for a regular file that is not a symlink (``lstat``)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def copy_regular(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    src_root: str | os.PathLike[str],
    dst_root: str | os.PathLike[str],
) -> bool:
    """Copy a file that is not listed anywhere (a card asset, a plot) from one zoo to another:
    only a regular file, never through a link, into a folder with no link below ``dst_root``.
    Returns False (and copies nothing) when ``src`` is a link or a special file."""
    from lora_zoo.errors import PathEscapeError

    try:
        with open_regular(src, root=src_root) as f:
            data = f.read()
    except PathEscapeError as e:
        import logging

        logging.getLogger(__name__).warning("not copied: %s", e)
        return False
    atomic_write_bytes(dst, data, root=dst_root)
    return True


class SafeLocalFileSystem(LocalFileSystem):
    """fsspec's local filesystem under the no-follow rule, for reading a zoo folder: ``open``
    goes through ``open_regular`` (no link below ``root``, regular files only), and listings
    (``ls``, hence ``find`` / ``walk`` / ``glob``) leave out links and special files, so a pull,
    merge or re-pack that copies what it lists never copies through a link."""

    cachable = False  # one instance per root; fsspec's instance cache would share them

    def __init__(self, root: str | os.PathLike[str] | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.root = None if root is None else os.path.abspath(root)

    def _root_for(self, path: str) -> str | None:
        if self.root is not None and (path == self.root or path.startswith(self.root + os.sep)):
            return self.root
        return None

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kw: Any) -> Any:
        path = self._strip_protocol(path)
        if set(mode) & set("wax+"):
            check_write_target(path, root=self._root_for(path))
            return super()._open(path, mode, block_size, **kw)
        return open_regular(path, root=self._root_for(path))

    def ls(self, path: str, detail: bool = False, **kw: Any) -> list[Any]:
        infos = [
            d
            for d in super().ls(path, detail=True, **kw)
            if not d.get("islink") and d.get("type") in ("file", "directory")
        ]
        return infos if detail else [d["name"] for d in infos]


def local_fs(root: str | os.PathLike[str] | None = None) -> SafeLocalFileSystem:
    """The filesystem every local zoo is read through (see ``SafeLocalFileSystem``)."""
    return SafeLocalFileSystem(root)


# ---- untrusted YAML ---------------------------------------------------------------------------
#: bounds for YAML that comes from a zoo (README header, stored recipe): far above any real card
YAML_MAX_BYTES = 1 << 20
YAML_MAX_DEPTH = 32


def load_untrusted_yaml(
    text: str | bytes,
    *,
    file: Any = None,
    key: str | None = None,
    max_bytes: int = YAML_MAX_BYTES,
    max_depth: int = YAML_MAX_DEPTH,
    loader: Any = None,
) -> Any:
    """Parse YAML that a stranger wrote: size checked before parsing, and while composing (before
    any Python object is built) anchors / aliases are refused and nesting is bounded, so
    "billion laughs" and deep nesting cannot exhaust memory or the stack. Any failure is a
    ``ZooFormatError`` naming the file, the key and the line. ``loader`` (a ``yaml.SafeLoader``
    subclass, e.g. the recipe loader's number rules) is wrapped with the same bounds."""
    import yaml

    from lora_zoo.errors import ZooFormatError

    def bad(why: str, mark: Any = None) -> ZooFormatError:
        where = f" (line {mark.line + 1})" if mark is not None else ""
        return ZooFormatError(f"YAML refused: {why}{where}", file=file, key=key)

    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > max_bytes:
        raise bad(f"{size:,} bytes, over the {max_bytes:,}-byte cap")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad(f"not UTF-8 ({e})") from None

    class _Bounded(loader or yaml.SafeLoader):  # type: ignore[misc]
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            ev = self.peek_event()
            if isinstance(ev, yaml.AliasEvent):
                raise bad(
                    f"alias *{ev.anchor} (aliases and anchors are not allowed)", ev.start_mark
                )
            if getattr(ev, "anchor", None) is not None:
                raise bad(
                    f"anchor &{ev.anchor} (aliases and anchors are not allowed)", ev.start_mark
                )
            self.depth += 1
            if self.depth > max_depth:
                raise bad(f"nested deeper than {max_depth} levels", ev.start_mark)
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    parser = None
    try:
        parser = _Bounded(text)  # the reader checks the characters here: inside the boundary
        return parser.get_single_data()
    except yaml.YAMLError as e:
        raise bad(f"does not parse ({e})") from None
    except RecursionError:
        raise bad("nested too deeply") from None
    finally:
        if parser is not None:
            parser.dispose()


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
    "YAML_MAX_BYTES",
    "YAML_MAX_DEPTH",
    "SafeLocalFileSystem",
    "atomic_write_bytes",
    "cache_root",
    "check_case_collisions",
    "check_write_target",
    "copy_regular",
    "create_exclusive",
    "fsync_dir",
    "is_regular_file",
    "load_untrusted_yaml",
    "local_fs",
    "map_regular",
    "open_regular",
    "read_regular",
    "safe_mkdirs",
    "natural_key",
    "resolve_under",
    "safe_relpath",
    "sha256_file",
    "sha256_local",
    "stable_permutation",
    "tmp_path_for",
]
