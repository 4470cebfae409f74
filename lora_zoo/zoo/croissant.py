"""``croissant.json``: the zoo described in MLCommons Croissant 1.0 (JSON-LD), from its manifest.

Why: the Hub derives only a few Croissant fields from a dataset card, so a zoo's weights column,
its typed metadata and labels, its splits and its provenance would be invisible to Croissant
consumers (dataset search, loaders that read Croissant). The writer emits this file beside the
manifest; it is a pure function of the manifest (``tests/unit/zoo/test_croissant.py`` validates
it with ``mlcroissant`` and reads records back through it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from lora_zoo.zoo.schema import DATA_DIR, ROLE_LABEL, ROLE_METADATA

CROISSANT_NAME = "croissant.json"
RECORD_SET = "loras"
FILE_SET = "parquet-shards"

# the Croissant 1.0 JSON-LD context, as the spec gives it
CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "equivalentProperty": "cr:equivalentProperty",
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}

CITATION = (
    "@article{putterman2024learning, title={Learning on LoRAs: GL-Equivariant Processing of "
    "Low-Rank Weight Spaces for Large Finetuned Models}, author={Putterman, Theo and Lim, Derek "
    "and Gelberg, Yoav and Jegelka, Stefanie and Maron, Haggai}, journal={arXiv preprint "
    "arXiv:2410.04207}, year={2024}}"
)

_DESCRIBE = {
    "lora_id": "unique id of the LoRA",
    "weights": "safetensors bytes of a PEFT LoRA adapter (adapter_model.safetensors; binary)",
    "adapter_config": "the PEFT adapter_config.json of the LoRA, as a JSON string",
    "base_model": "the base model the LoRA adapts",
    "collection": "the collection (zoo) the LoRA belongs to",
    "rank": "the LoRA rank (largest over modules)",
    "num_modules": "how many modules the LoRA adapts",
}


def _data_type(arrow_type: str) -> tuple[str, bool]:
    """(Croissant dataType, repeated) for a manifest column type string."""
    t, repeated = arrow_type, False
    if t.startswith(("list<", "large_list<")):
        t, repeated = t.split(":", 1)[-1].rstrip(">").strip(), True
    if t in ("bool",):
        return "sc:Boolean", repeated
    if t.startswith(("int", "uint")):
        return "sc:Integer", repeated
    if t in ("float", "double", "halffloat") or t.startswith("float"):
        return "sc:Float", repeated
    return "sc:Text", repeated  # string, binary (weights: described), anything nested


def _fields(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One ``cr:Field`` per manifest column, after the ``split`` field read from the shard path."""
    fields: list[dict[str, Any]] = [
        {
            "@type": "cr:Field",
            "@id": f"{RECORD_SET}/split",
            "name": "split",
            "description": "the split the LoRA is stored in (train / test / ...)",
            "dataType": "sc:Text",
            "source": {
                "fileSet": {"@id": FILE_SET},
                "extract": {"fileProperty": "fullpath"},
                "transform": {"regex": rf"^(?:.*/)?{DATA_DIR}/(\w+)-\d+\.parquet$"},
            },
        }
    ]
    for col in manifest.get("columns") or []:
        dtype, repeated = _data_type(str(col["type"]))
        role = col["role"]
        what = _DESCRIBE.get(col["name"]) or (
            "label (a measured score of the LoRA)"
            if role == ROLE_LABEL
            else "metadata (what the LoRA is: data, hyperparameters, seeds)"
            if role == ROLE_METADATA
            else col["name"]
        )
        field: dict[str, Any] = {
            "@type": "cr:Field",
            "@id": f"{RECORD_SET}/{col['name']}",
            "name": col["name"],
            "description": f"{what} [{role}; arrow type {col['type']}]",
            "dataType": dtype,
            "source": {"fileSet": {"@id": FILE_SET}, "extract": {"column": col["name"]}},
        }
        if repeated:
            field["repeated"] = True
        fields.append(field)
    return fields


def croissant(manifest: Mapping[str, Any], *, name: str, url: str = "") -> dict[str, Any]:
    """The Croissant document of a zoo with this manifest (``name``: the zoo's name; ``url``:
    where it is published, when known)."""
    info = manifest.get("info") or {}
    builder = info.get("builder") if isinstance(info.get("builder"), dict) else {}
    fields = _fields(manifest)
    n = manifest.get("num_rows", 0)
    splits = ", ".join(f"{s}: {sp['num_rows']}" for s, sp in (manifest.get("splits") or {}).items())
    prov = {
        "lora_zoo_version": manifest.get("lora_zoo_version"),
        "format_version": manifest.get("format_version"),
        "builder": {k: builder.get(k) for k in ("name", "VERSION", "dist", "dist_version")}
        if builder
        else None,
        "recipe_sha256": info.get("recipe_sha256"),
    }
    doc: dict[str, Any] = {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": "http://mlcommons.org/croissant/1.0",
        "name": name,
        "description": (
            f"A LoRA zoo: {n} LoRA adapters, one row per adapter ({splits}); the weights "
            "column holds safetensors bytes of a PEFT adapter. Built / packed by lora-zoo. "
            f"Provenance: {json.dumps(prov, sort_keys=True)}"
        ),
        "license": str(info.get("license") or "other"),
        "citeAs": CITATION,
        "version": "1.0.0",
        "distribution": [
            {
                "@type": "cr:FileSet",
                "@id": FILE_SET,
                "name": FILE_SET,
                "description": "the zoo's Parquet shards (lora_zoo.json lists each with its sha256)",
                "encodingFormat": "application/x-parquet",
                "includes": f"{DATA_DIR}/*.parquet",
            }
        ],
        "recordSet": [
            {
                "@type": "cr:RecordSet",
                "@id": RECORD_SET,
                "name": RECORD_SET,
                "description": "one record per LoRA adapter",
                "key": {"@id": f"{RECORD_SET}/lora_id"},
                "field": fields,
            }
        ],
    }
    if url:
        doc["url"] = url
    return doc


def croissant_bytes(manifest: Mapping[str, Any], *, name: str, url: str = "") -> bytes:
    return (json.dumps(croissant(manifest, name=name, url=url), indent=1) + "\n").encode()


__all__ = ["CROISSANT_NAME", "croissant", "croissant_bytes"]
