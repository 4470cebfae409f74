"""Images for text-to-image LoRAs: sources, per-LoRA selection, preprocessing, attribute labels.

A LoRA of a text-to-image zoo is defined by WHICH images it saw (an identity, a set of classes),
so membership is the label that matters most: every selected image is recorded by id and by the
sha256 of its encoded bytes, so a zoo row can be traced back to pixels even if a dataset is later
re-ordered or re-encoded. Three sources share one index:

* ``{kind: folder, root}``: ``root/<group>/<image>.png|jpg`` (group = identity or class);
* ``{kind: hub, path, ...}``: a Hub image dataset through ``datasets.load_dataset`` (images read as
  bytes, never re-encoded, so hashes are those of the published files);
* ``{kind: sample_images}``: real photos shipped with scikit-image / scikit-learn written to a
  local folder deterministically, so the smoke recipe and tests run offline.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from lora_zoo.build.api import cache_root, stable_permutation
from lora_zoo.errors import DataSourceError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class AttributeTable(BaseModel):
    """Per-image attributes (e.g. CelebA's ``list_attr_celeba``) aggregated into LoRA labels.

    ``path`` null reads the columns from the Hub dataset rows instead of a file. Values > 0 (or
    True) count as positive, so CelebA's -1/1 encoding and 0/1 both work.
    """

    model_config = ConfigDict(extra="forbid")
    path: str | None = None
    format: Literal["auto", "csv", "tsv", "parquet", "celeba_txt"] = "auto"
    id_column: str = "image_id"
    columns: list[str]
    rule: Literal["majority"] = "majority"


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resolution: int = 512
    center_crop: bool = True
    attributes: AttributeTable | None = None


class FolderSource(_Common):
    kind: Literal["folder"] = "folder"
    root: str


class HubImageSource(_Common):
    kind: Literal["hub"] = "hub"
    path: str
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    image_column: str = "image"
    group_column: str = "label"
    id_column: str | None = None


class SampleImagesSource(_Common):
    kind: Literal["sample_images"] = "sample_images"
    root: str | None = None
    groups: list[str] | None = None


DataSpec = Annotated[
    FolderSource | HubImageSource | SampleImagesSource, Field(discriminator="kind")
]

# Deterministic sample classes: (loader module, function or file) per image.
SAMPLE_GROUPS: dict[str, list[str]] = {
    "people": ["skimage:astronaut", "skimage:camera", "skimage:text"],
    "animal": ["skimage:chelsea", "sklearn:flower.jpg", "skimage:horse"],
    "object": ["skimage:coffee", "skimage:rocket", "skimage:clock"],
    "scene": ["sklearn:china.jpg", "skimage:hubble_deep_field", "skimage:moon"],
    "texture": ["skimage:brick", "skimage:grass", "skimage:gravel"],
    "microscopy": ["skimage:immunohistochemistry", "skimage:retina", "skimage:cell"],
}


def _sample_array(ref: str) -> np.ndarray:
    """(H, W, 3) uint8 for one sample reference."""
    lib, name = ref.split(":")
    if lib == "skimage":
        import skimage.data

        arr = np.asarray(getattr(skimage.data, name)())
    else:
        from sklearn.datasets import load_sample_image

        arr = np.asarray(load_sample_image(name))
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def materialize_sample_images(
    root: str | os.PathLike[str], groups: Sequence[str] | None = None
) -> Path:
    """Write ``root/<group>/<name>.png`` (+ a mirrored copy) for each sample group; idempotent.

    Mirrors double each class to 6 images without inventing pixels. PNG encoding of the same
    array is deterministic, and the builder records sha256s anyway.
    """
    from PIL import Image

    root = Path(root)
    for g in groups or sorted(SAMPLE_GROUPS):
        if g not in SAMPLE_GROUPS:
            raise DataSourceError(
                f"unknown sample group {g!r}; available: {sorted(SAMPLE_GROUPS)}",
                key="data.groups",
            )
        (root / g).mkdir(parents=True, exist_ok=True)
        for ref in SAMPLE_GROUPS[g]:
            stem = ref.split(":")[1].split(".")[0]
            for suffix, flip in (("", False), ("_mirror", True)):
                out = root / g / f"{stem}{suffix}.png"
                if out.exists():
                    continue
                arr = _sample_array(ref)
                arr = arr[:, ::-1] if flip else arr
                tmp = out.with_suffix(".tmp")
                Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
                tmp.replace(out)
    return root


@dataclass(frozen=True)
class ImageItem:
    image_id: str
    group: str
    path: str | None = None  # folder sources
    row: int | None = None  # hub sources


class ImageIndex:
    """Every image of the source with its group; loads bytes / tensors on demand."""

    def __init__(
        self,
        items: list[ImageItem],
        *,
        source: str,
        dataset: Any = None,
        image_column: str = "image",
    ) -> None:
        if not items:
            raise DataSourceError("the data source holds no images", file=source)
        self.items = sorted(items, key=lambda it: it.image_id)
        self.source = source
        self._dataset = dataset
        self._image_column = image_column
        self.by_id = {it.image_id: it for it in self.items}
        self.by_group: dict[str, list[ImageItem]] = {}
        for it in self.items:
            self.by_group.setdefault(it.group, []).append(it)

    @property
    def groups(self) -> list[str]:
        return sorted(self.by_group)

    def read_bytes(self, item: ImageItem) -> bytes:
        if item.path is not None:
            return Path(item.path).read_bytes()
        cell = self._dataset[item.row][self._image_column]
        if not cell.get("bytes"):
            return Path(cell["path"]).read_bytes()
        return cell["bytes"]

    def sha256(self, item: ImageItem) -> str:
        return hashlib.sha256(self.read_bytes(item)).hexdigest()

    def load(self, item: ImageItem, resolution: int, center_crop: bool = True) -> torch.Tensor:
        """(3, res, res) float32 in [-1, 1]: the DreamBooth preprocessing."""
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(self.read_bytes(item)))
            img.load()
        except Exception as e:
            raise DataSourceError(
                f"cannot decode image ({e})", file=item.path or self.source, key=item.image_id
            ) from e
        return preprocess(img, resolution, center_crop)

    def select(self, groups: Sequence[str], *, size: int | None, seed: int) -> list[ImageItem]:
        """The LoRA's training images: all of ``groups`` or a seeded draw of ``size`` of them."""
        pool: list[ImageItem] = []
        for g in groups:
            if g not in self.by_group:
                raise DataSourceError(
                    f"group {g!r} not in the data source (it has {len(self.by_group)} groups, "
                    f"e.g. {self.groups[:5]})",
                    file=self.source,
                    key="data.groups_included",
                )
            pool.extend(self.by_group[g])
        if size is None or size >= len(pool):
            return pool
        # stable_permutation, not numpy: NEP 19 lets numpy change Generator.choice's algorithm
        idx = sorted(stable_permutation(len(pool), seed, "text_to_image/subset")[:size])
        return [pool[i] for i in idx]


def preprocess(img: Any, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """PIL image -> (3, res, res) in [-1, 1]: resize shorter side (bilinear), center crop."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    if center_crop:
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    else:
        img = img.resize((resolution, resolution), Image.BILINEAR)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # (H, W, 3) in [0, 255]
    return arr.permute(2, 0, 1) / 127.5 - 1.0


def build_index(
    spec: FolderSource | HubImageSource | SampleImagesSource,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ImageIndex:
    """Scan the source once (per worker) into an ImageIndex."""
    if isinstance(spec, HubImageSource):
        return _hub_index(spec)
    if isinstance(spec, SampleImagesSource):
        base = cache_root(cache_dir)
        root = Path(spec.root) if spec.root else base / "sample_images"
        materialize_sample_images(root, spec.groups)
        groups = spec.groups
    else:
        root = Path(spec.root).expanduser()
        groups = None
    if not root.is_dir():
        raise DataSourceError("image folder does not exist", file=root, key="data.root")
    items = []
    for gdir in sorted(p for p in root.iterdir() if p.is_dir()):
        if groups is not None and gdir.name not in groups:
            continue
        for f in sorted(gdir.iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append(ImageItem(f"{gdir.name}/{f.name}", gdir.name, path=str(f)))
    if not items:
        raise DataSourceError(
            "no images found (expected root/<group>/<image>.png|jpg)", file=root, key="data.root"
        )
    return ImageIndex(items, source=str(root))


def _hub_index(spec: HubImageSource) -> ImageIndex:
    """Index a Hub image dataset; images stay undecoded bytes (hashes of the published files)."""
    import datasets

    src = f"{spec.path}:{spec.split}"
    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, revision=spec.revision)
    except Exception as e:
        raise DataSourceError(f"cannot load dataset ({e})", file=src, key="data.path") from e
    for col in (spec.image_column, spec.group_column, spec.id_column):
        if col is not None and col not in ds.column_names:
            raise DataSourceError(
                f"column {col!r} not in dataset (columns: {ds.column_names})", file=src, key=col
            )
    ds = ds.cast_column(spec.image_column, datasets.Image(decode=False))
    feat = ds.features[spec.group_column]
    raw_groups = ds[spec.group_column]
    names = [feat.int2str(g) if hasattr(feat, "int2str") else str(g) for g in raw_groups]
    ids = ds[spec.id_column] if spec.id_column else [f"{spec.split}/{i}" for i in range(len(ds))]
    items = [ImageItem(str(i), str(g), row=r) for r, (i, g) in enumerate(zip(ids, names))]
    return ImageIndex(items, source=src, dataset=ds, image_column=spec.image_column)


def read_attribute_table(
    spec: AttributeTable, index: ImageIndex | None = None
) -> dict[str, dict[str, float]]:
    """``{image_id: {attribute: value}}`` for the requested columns."""
    import pandas as pd

    if spec.path is None:
        ds = getattr(index, "_dataset", None)
        if ds is None:
            raise DataSourceError(
                "attributes.path is required unless the data kind is hub",
                key="data.attributes.path",
            )
        df = ds.remove_columns([c for c in ds.column_names if c not in spec.columns]).to_pandas()
        df.index = [it.image_id for it in sorted(index.items, key=lambda it: it.row)]
        src = index.source
    else:
        path = Path(spec.path).expanduser()
        src = str(path)
        fmt = spec.format
        if fmt == "auto":
            fmt = {".parquet": "parquet", ".tsv": "tsv", ".txt": "celeba_txt"}.get(
                path.suffix, "csv"
            )
        if not path.is_file():
            raise DataSourceError(
                "attribute table not found", file=path, key="data.attributes.path"
            )
        if fmt == "parquet":
            df = pd.read_parquet(path)
        elif fmt == "celeba_txt":
            # line 1: count; line 2: attribute names; then "<image> v1 v2 ..." (no id header)
            df = pd.read_csv(path, sep=r"\s+", skiprows=1)
            df.index.name = spec.id_column
            df = df.reset_index()
        else:
            df = pd.read_csv(path, sep="\t" if fmt == "tsv" else ",")
        if spec.id_column not in df.columns:
            raise DataSourceError(
                f"id column missing (columns: {list(df.columns)[:8]}...)",
                file=path,
                key=spec.id_column,
            )
        df = df.set_index(df[spec.id_column].astype(str))
    missing = [c for c in spec.columns if c not in df.columns]
    if missing:
        raise DataSourceError(
            "attribute column(s) missing from the table", file=src, key=",".join(missing)
        )
    return {str(k): {c: float(v) for c, v in row.items()} for k, row in df[spec.columns].iterrows()}


def aggregate_attributes(
    table: Mapping[str, Mapping[str, float]],
    image_ids: Sequence[str],
    columns: Sequence[str],
    *,
    file: str | None = None,
) -> tuple[dict[str, bool], dict[str, float]]:
    """Majority vote per attribute over the LoRA's images; returns (labels, positive fractions).

    The table may key images by file name while folder ids are ``<group>/<file>``, so a
    missing full id falls back to its basename. A tie (fraction exactly 0.5) is False.
    """
    pos = dict.fromkeys(columns, 0)
    for iid in image_ids:
        row = table.get(iid) or table.get(iid.rsplit("/", 1)[-1])
        if row is None:
            raise DataSourceError("image id not in the attribute table", file=file, key=iid)
        for c in columns:
            pos[c] += int(row[c] > 0)
    n = max(len(image_ids), 1)
    frac = {c: pos[c] / n for c in columns}
    return {c: frac[c] > 0.5 for c in columns}, frac
