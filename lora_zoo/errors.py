"""One named error per failure mode.

Every error carries the file it came from and the field / key / module it is about, because a
zoo build or an ingest touches thousands of files and "shape mismatch" without a location is
useless. ``str(err)`` always reads ``<file>: <key>: <message>`` (parts omitted when unknown).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike


class LoraZooError(Exception):
    """Base class: a message plus where it happened."""

    def __init__(
        self, message: str, *, file: str | PathLike[str] | None = None, key: str | None = None
    ) -> None:
        self.message = message
        self.file = None if file is None else str(file)
        self.key = key
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.key) if p]
        return ": ".join([*parts, self.message])

    def to_dict(self) -> dict[str, str | None]:
        """JSON-able form, used by ingest reports and runner manifests."""
        return {
            "error": type(self).__name__,
            "file": self.file,
            "key": self.key,
            "message": self.message,
        }


# --- weights / adapter files -------------------------------------------------------------
class PickleRefusedError(LoraZooError):
    """A pickle-based checkpoint (.bin/.pt/.ckpt/.pth) was offered; we never unpickle."""


class CorruptFileError(LoraZooError):
    """Not safetensors, truncated, or otherwise unreadable bytes."""


class MissingPairError(LoraZooError):
    """An A factor without its B (or the reverse), or a kohya pair without its alpha."""


class ShapeMismatchError(LoraZooError):
    """Factor shapes contradict each other, the adapter config or the base architecture."""


class NonFiniteError(LoraZooError):
    """NaN or inf inside a factor; ``key`` names the module."""


class UnknownLayoutError(LoraZooError):
    """The tensor names match none of the known LoRA layouts (PEFT, diffusers, kohya)."""


class UnsupportedVariantError(LoraZooError):
    """A LoRA variant we cannot represent faithfully (DoRA, bias, modules_to_save, ...)."""


# --- zoo on disk ----------------------------------------------------------------------------
class ScaleMismatchError(ShapeMismatchError):
    """A module's alpha / scale contradicts what its adapter config gives it (rsLoRA, rank or
    alpha patterns): stored, it would silently come back with another scale."""


class ZooFormatError(LoraZooError):
    """A zoo directory / repo is malformed: manifest, schema or layout."""


class IntegrityError(LoraZooError):
    """A shard's bytes do not match the sha256 / row count in the manifest."""


# --- recipes and builds ---------------------------------------------------------------------
class RecipeError(LoraZooError):
    """A recipe failed validation. ``problems`` holds every problem found, not just the first."""

    def __init__(self, problems: list[str], *, file: str | PathLike[str] | None = None) -> None:
        self.problems = list(problems)
        msg = "invalid recipe:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg, file=file)


class BuilderNotFoundError(LoraZooError):
    """No builder registered under that name (the message lists the ones that are)."""


class BuildError(LoraZooError):
    """A build-level failure (not a single LoRA's failure, which the runner records)."""


class TrainingDivergedError(LoraZooError):
    """A LoRA's loss became NaN/inf; ``key`` holds the step."""


# --- remotes --------------------------------------------------------------------------------
class RemoteError(LoraZooError):
    """A Hub / fsspec remote operation failed."""


class IngestError(LoraZooError):
    """An ingest-level failure (per-file rejections go to the ingest report instead)."""


# --- loading --------------------------------------------------------------------------------
class SelectionError(LoraZooError):
    """A view name, module pattern, label column or template id that matches nothing."""


# --- builder data sources -------------------------------------------------------------------
class DataSourceError(BuildError):
    """A builder's data source is missing, empty or malformed: an image folder without images, an
    unreadable image, an attribute table without the id column / an attribute / an image id."""


# --- zoo writing (storage engineer) ---------------------------------------------------------
class SchemaConflictError(ZooFormatError):
    """A metadata / label value whose type cannot be unified with the column's type so far
    (``key`` names the column; the message names the lora_id)."""


class DuplicateIdError(ZooFormatError):
    """A lora_id that is already in the zoo (or twice in one named split)."""


# --- contribution: ingest / merge / export (formats engineer) ------------------------------
class MissingAlphaError(MissingPairError):
    """A format that needs an alpha (kohya ``.alpha``, a PEFT file's adapter_config) lacks it."""


class FileTooLargeError(IngestError):
    """An input file is over the ingest size limit (``--max-file-mb``)."""


class PathEscapeError(IngestError, ZooFormatError):
    """A path from a zoo, a manifest, a Hub listing or a source folder (absolute, ``..``, a
    backslash or drive, a symlink) would resolve outside the folder it must stay in."""


class MetadataTableError(IngestError):
    """The ingest metadata table is unreadable, has no key column, or repeats a key."""


class IncompatibleBaseModelError(LoraZooError):
    """Zoos / LoRAs for different base models (or module shapes) combined without asking to."""


class DeviceUnavailableError(BuildError):
    """``--device cuda`` where this process (or the Ray cluster) has no CUDA device."""


class ConfigMismatchError(ScaleMismatchError, ZooFormatError):
    """A weights cell's embedded ``lora_zoo.config`` differs from its row's ``adapter_config``
    (the source of truth, docs/FORMAT.md): loaders reading either half would disagree."""


@contextmanager
def reading(
    file: str | PathLike[str] | None,
    key: str | None = None,
    *,
    error: type[LoraZooError] = CorruptFileError,
) -> Iterator[None]:
    """The read-side error boundary: any exception raised while reading a zoo's bytes
    (pyarrow, JSON, UTF-8, recursion, OS, safetensors) leaves as ``error`` naming ``file``
    and ``key`` (a shard, a row group, a lora_id). Named errors pass through untouched.

    Why one wrapper at the places bytes are read, not a try per call: the failure modes of a
    stranger's bytes are a class without a list; only the boundary is finite."""
    try:
        yield
    except LoraZooError:
        raise
    except FileNotFoundError as e:
        raise ZooFormatError(f"a file the zoo lists is missing ({e})", file=file, key=key) from e
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise error(f"unreadable ({type(e).__name__}: {msg})", file=file, key=key) from e
