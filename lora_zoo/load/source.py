"""``load_zoo``: open a zoo from wherever it lives (a folder, a Hub repo, an fsspec URL).

Why here and not in ``zoo/``: the on-disk format (``zoo/``) knows nothing about remotes, and
``remote/`` only answers *where* a zoo's files are (a filesystem and a root, downloaded into the
commit-keyed cache unless streaming); this function turns that answer into a ``Zoo``. Keeping
the three apart is what removed the reader <-> remote import cycle.
"""

from __future__ import annotations

import os

from lora_zoo.errors import IntegrityError, ZooFormatError
from lora_zoo.remote.pull import locate
from lora_zoo.zoo.reader import Zoo, ZooSplit, is_local, open_local


def load_zoo(
    path: str | os.PathLike[str],
    revision: str | None = None,
    split: str | None = None,
    streaming: bool = False,
    verify: bool = False,
) -> Zoo | ZooSplit:
    """Open a zoo: a local folder, a Hub repo id (``ns/name``, ``hf://datasets/ns/name``) or an
    fsspec URL (``s3://bucket/zoo``).

    Returns the ``Zoo`` or, with ``split``, that ``ZooSplit``. ``verify=True`` checks every
    shard's sha256 / rows / schema first and raises ``IntegrityError`` listing the problems.
    ``streaming`` only means "prefetch nothing": shards are opened lazily either way.
    """
    if is_local(path):
        if revision is not None:
            raise ZooFormatError(
                "revision= only applies to Hub repos / remotes", file=path, key="revision"
            )
        zoo = open_local(path, streaming=streaming)
    else:
        loc = locate(os.fspath(path), revision=revision, streaming=streaming)
        zoo = Zoo(
            loc.fs, loc.root, source=loc.source, revision=loc.revision, streaming=loc.streaming
        )
    if verify:
        problems = zoo.verify()
        if problems:
            raise IntegrityError(
                "zoo failed verification:\n  " + "\n  ".join(problems), file=zoo.source
            )
    return zoo[split] if split is not None else zoo


__all__ = ["load_zoo"]
