"""One build per work dir: an OS file lock, with the holder's pid and host for the error.

Why flock (via the maintained ``filelock`` library) and not a pid file: the kernel drops an
flock when its holder dies, ``kill -9`` included, so a lock left by a killed build is never
mistaken for a live one and is taken over safely by the next ``build``; a pid file would need
liveness guesses across hosts. The ``.lock.owner`` note beside it only feeds the error
message. On network filesystems without working flock (some NFS setups), use a local ``--out``
per process and ``--shard I/N`` + ``lora-zoo pack`` (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from lora_zoo._io import atomic_write_bytes, safe_mkdirs
from lora_zoo.errors import BuildError

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner"


@contextmanager
def work_dir_lock(root: str | os.PathLike[str], timeout: float = 0.0) -> Iterator[None]:
    """Hold ``root``'s lock for the enclosed build; refuse at once (``timeout`` seconds) when
    another process holds it, naming that process."""
    root = safe_mkdirs(Path(root))
    lock = FileLock(str(root / LOCK_NAME))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        try:
            who = json.loads((root / OWNER_NAME).read_text())
            holder = f"pid {who.get('pid')} on {who.get('host')} since {who.get('since')}"
        except (OSError, ValueError):
            holder = "another process"
        raise BuildError(
            f"another build is running on this work dir ({holder}); wait for it, stop it, "
            "or build into another --out",
            file=root,
            key="lock",
        ) from None
    try:
        note = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        atomic_write_bytes(root / OWNER_NAME, json.dumps(note).encode(), root=root)
        yield
    finally:
        (root / OWNER_NAME).unlink(missing_ok=True)
        lock.release()


__all__ = ["LOCK_NAME", "OWNER_NAME", "work_dir_lock"]
