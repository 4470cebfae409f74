"""An independent reference reader for a zoo: the slow, obvious way to get every LoRA's factors.

It shares no code with ``lora_zoo``: the manifest is read with ``json``, each listed shard with
``pyarrow.parquet.read_table`` (whole file), each weights cell with safetensors' own loader,
and each module's scale from the row's ``adapter_config`` column (the format's declared source
of truth, docs/FORMAT.md) by PEFT's rule, restated here. The fuzzer
(``tests/integration/test_fuzz_zoo.py``) holds every entry point of lora-zoo to it: an entry
point either raises a ``LoraZooError`` or returns exactly what this returns.

``read_reference`` raises ``RefusedByReference`` whenever the obvious reader cannot make sense of
the zoo (or a cell): then lora-zoo must refuse too. Where the reference is stricter than the
format needs it is stricter on purpose (anything it refuses, lora-zoo must refuse).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<ab>[AB])\.weight$")


class RefusedByReference(Exception):
    """The reference reader found the zoo (or one LoRA in it) unreadable or inconsistent."""


@dataclass(frozen=True)
class RefModule:
    A: torch.Tensor  # (r, in[, kh, kw]) as stored
    B: torch.Tensor  # (out, r[, 1, 1]) as stored
    scale: float

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U (out, r), V (in*, r)) in float64 with sqrt(|scale|) folded into both."""
        r = self.A.shape[0]
        s = math.sqrt(abs(self.scale))
        u = self.B.reshape(self.B.shape[0], r).double() * (s if self.scale >= 0 else -s)
        v = self.A.reshape(r, -1).T.double() * s
        return u, v


def _scale(config: dict, name: str) -> tuple[int, float]:
    """PEFT's (rank, scale) for ``name``: pattern keys match the end of the dotted name."""
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    for patterns, is_rank in ((config.get("rank_pattern") or {}, True),
                              (config.get("alpha_pattern") or {}, False)):  # fmt: skip
        for key, val in patterns.items():
            if re.match(rf"(.*\.)?({key})$", name):
                if is_rank:
                    r = int(val)
                else:
                    alpha = float(val)
                break
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def decode_cell(weights: bytes, adapter_config: str) -> dict[str, RefModule]:
    """One weights cell -> {module: RefModule}, or RefusedByReference."""
    from safetensors.torch import load

    try:
        tensors = load(bytes(weights))
        n = int.from_bytes(weights[:8], "little")
        header = json.loads(weights[8 : 8 + n])
        config = json.loads(adapter_config)
    except Exception as e:  # noqa: BLE001 - anything safetensors / json refuses, we refuse
        raise RefusedByReference(f"cell: {e}") from e
    if not isinstance(config, dict):
        raise RefusedByReference("adapter_config is not an object")
    meta = header.get("__metadata__") or {}
    if "lora_zoo.config" in meta and json.loads(meta["lora_zoo.config"]) != config:
        raise RefusedByReference("embedded config disagrees with the adapter_config column")
    # the structure safetensors itself tolerates but the format forbids: gaps / trailing bytes
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    pos = 0
    for s, e in spans:
        if s != pos:
            raise RefusedByReference("gap or overlap between tensors")
        pos = e
    if 8 + n + pos != len(weights):
        raise RefusedByReference("trailing bytes after the last tensor")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise RefusedByReference(f"not a PEFT factor name: {key}")
        pairs.setdefault(m["name"], {})[m["ab"]] = t
    if not pairs:
        raise RefusedByReference("no modules")
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise RefusedByReference(f"{name}: unpaired factor")
        a, b = ab["A"], ab["B"]
        r, scale = _scale(config, name)
        if (
            a.dim() not in (2, 4)
            or b.dim() != a.dim()
            or a.shape[0] != b.shape[1]
            or r != a.shape[0]
        ):
            raise RefusedByReference(f"{name}: shapes {tuple(a.shape)} / {tuple(b.shape)}, r={r}")
        if a.dim() == 4 and tuple(b.shape[2:]) != (1, 1):
            raise RefusedByReference(f"{name}: conv B not 1x1")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise RefusedByReference(f"{name}: non-finite")
        out[name] = RefModule(a, b, scale)
    return out


Cell = dict[str, RefModule] | RefusedByReference


def read_reference(root: str | Path) -> dict[str, dict[str, Cell]]:
    """{split: {lora_id: {module: RefModule} or the reason it is refused}} of a local zoo, in
    row order, checking what the manifest promises (every listed shard once, its sha256, size
    and row count; ids unique across the zoo). Raises ``RefusedByReference`` for the zoo."""
    import pyarrow.parquet as pq

    root = Path(root)
    try:
        manifest = json.loads((root / "lora_zoo.json").read_bytes())
        splits = manifest["splits"]
        items = list(splits.items())
    except Exception as e:  # noqa: BLE001
        raise RefusedByReference(f"manifest: {e}") from e
    out: dict[str, dict[str, Cell]] = {}
    seen_paths: set[str] = set()
    seen_ids: set[str] = set()
    for split, sp in items:
        rows: dict[str, Cell] = {}
        try:
            shards = [
                (sh["path"], sh["sha256"], sh["num_bytes"], sh["num_rows"]) for sh in sp["shards"]
            ]
        except Exception as e:  # noqa: BLE001
            raise RefusedByReference(f"manifest shards: {e}") from e
        for path, sha, nbytes, nrows in shards:
            if not isinstance(path, str) or path in seen_paths or not path.startswith("data/"):
                raise RefusedByReference(f"shard path {path!r}")
            seen_paths.add(path)
            f = root / path
            if f.is_symlink() or not f.is_file():
                raise RefusedByReference(f"{path}: not a regular file")
            data = f.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha or len(data) != nbytes:
                raise RefusedByReference(f"{path}: hash or size")
            try:
                t = pq.read_table(f, columns=["lora_id", "weights", "adapter_config"])
                ids = t.column("lora_id").to_pylist()
                ws = t.column("weights").to_pylist()
                cfgs = t.column("adapter_config").to_pylist()
            except Exception as e:  # noqa: BLE001
                raise RefusedByReference(f"{path}: {e}") from e
            if len(ids) != nrows:
                raise RefusedByReference(f"{path}: {len(ids)} rows, manifest {nrows}")
            for lid, w, cfg in zip(ids, ws, cfgs):
                if not isinstance(lid, str) or lid in seen_ids:
                    raise RefusedByReference(f"{path}: id {lid!r} null or repeated")
                seen_ids.add(lid)
                try:
                    if w is None or cfg is None:
                        raise RefusedByReference(f"{path}: {lid}: null cell")
                    rows[lid] = decode_cell(w, cfg)
                except RefusedByReference as e:
                    rows[lid] = e  # one unreadable LoRA: only reading it must fail
        out[split] = rows
    return out


__all__ = ["RefModule", "RefusedByReference", "decode_cell", "read_reference"]
