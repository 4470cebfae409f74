"""The in-memory LoRA: ordered named modules, each a pair of factors plus its exact scale.

PEFT is the reference for every number here: ``delta_w`` reproduces the weight change that
``merge_and_unload()`` applies, including ``use_rslora``, ``rank_pattern`` / ``alpha_pattern``,
GPT-2 style ``fan_in_fan_out`` (Conv1D) and conv LoRAs (kernel shape kept), and DoRA
(``use_dora``: a per-output magnitude vector beside B and A, see ``LoraModule.merged_weight``).
Everything that leaves the process (zoo rows, files) goes through safetensors: never pickle.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lora_zoo._io import natural_key
from lora_zoo.errors import (
    ConfigMismatchError,
    CorruptFileError,
    MissingPairError,
    NonFiniteError,
    ScaleMismatchError,
    ShapeMismatchError,
    UnknownLayoutError,
    UnsupportedVariantError,
)
from lora_zoo.weights import parse_safetensors

PEFT_PREFIX = "base_model.model."

# Config keys whose non-default value changes the math in a way LoraRecord cannot carry.
_UNSUPPORTED_CONFIG = {
    "lora_bias": (False, None),
    "modules_to_save": (None, [], ()),
    "trainable_token_indices": (None, {}, []),
}

# PEFT adapter types that are not LoRA, named for the refusal message
_PEFT_TYPES = {
    "LOHA": "LyCORIS LoHa, a Hadamard product of two low-rank pairs",
    "LOKR": "LyCORIS LoKr, a Kronecker product",
    "ADALORA": "AdaLoRA, an SVD-parameterised LoRA with a rank budget",
    "IA3": "IA3, learned activation scalings",
    "OFT": "OFT, orthogonal finetuning",
    "BOFT": "BOFT, butterfly orthogonal finetuning",
    "VERA": "VeRA, shared random factors with trained scalings",
}

CONFIG_META = "lora_zoo.config"  # header key: the adapter config, embedded for loose files
FIFO_META = "lora_zoo.fan_in_fan_out_modules"  # header key: Conv1D-style modules of a mixed adapter

# a PEFT factor name: "[base_model.model.]<module>.lora_A|B[.<adapter>].weight"
PEFT_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
# a DoRA magnitude: "[base_model.model.]<module>.lora_magnitude_vector[.<adapter>][.weight]"
# (PEFT's saved files have no suffix; its in-memory state dicts end in ".<adapter>.weight")
DORA_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(.+)\.lora_magnitude_vector(?:\.[^.]+\.weight|\.weight)?$"
)
DORA_SUFFIX = "lora_magnitude_vector"


def pattern_key(patterns: Mapping[str, Any], module_name: str) -> str | None:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern`` keys (first key whose regex matches
    the end of the dotted module name wins). Mirrors ``peft.utils.other.get_pattern_key``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def peft_rank_alpha_scale(config: Mapping[str, Any], module_name: str) -> tuple[int, float, float]:
    """(rank, alpha, scale) PEFT would give ``module_name`` under ``config``."""
    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", 8))
    rp = config.get("rank_pattern") or {}
    ap = config.get("alpha_pattern") or {}
    k = pattern_key(rp, module_name)
    if k is not None:
        r = int(rp[k])
    k = pattern_key(ap, module_name)
    if k is not None:
        alpha = float(ap[k])
    scale = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return r, alpha, scale


def check_supported_config(config: Mapping[str, Any], *, file: str | None = None) -> None:
    """Refuse (never silently drop) adapter features whose weights we cannot carry."""
    for key, defaults in _UNSUPPORTED_CONFIG.items():
        val = config.get(key)
        if val not in defaults:
            raise UnsupportedVariantError(
                f"adapter uses {key}={val!r}; lora-zoo stores LoRA factors (plain, rsLoRA, DoRA) only "
                "(merge or drop that feature before ingesting)",
                file=file,
                key=key,
            )
    pt = config.get("peft_type", "LORA")
    if pt not in (None, "LORA"):
        what = _PEFT_TYPES.get(str(pt), "not LoRA")
        raise UnsupportedVariantError(
            f"peft_type {pt!r} ({what}) is not stored: lora-zoo stores LoRA factors (plain, "
            "rsLoRA, DoRA) only (docs/FORMAT.md, 'LyCORIS and other variants'); merge the adapter "
            "into its base model (merge_and_unload) and extract a plain LoRA of the rank you "
            "choose from the weight difference, then ingest that",
            file=file,
            key="peft_type",
        )


@dataclass
class LoraModule:
    """One adapted layer. Shapes follow PEFT's storage: A (r, in[, kh, kw]), B (out, r[, 1, 1]).

    ``scale`` is the effective multiplier (alpha/r, or alpha/sqrt(r) with rsLoRA) so that
    ``delta_w = scale * B @ A``; ``alpha`` is kept separately so every format round-trips it.

    ``magnitude`` (DoRA only): PEFT's ``lora_magnitude_vector``, one entry per output feature,
    in PEFT's own shape ((out,) for linear layers, (1, out, 1, 1) for convs). A DoRA layer's
    weight is ``m / ||W0 + scale B A||_row * (W0 + scale B A)`` (``merged_weight``); B and A keep
    their GL(r) symmetry ((B R, R^-1 A) leaves B A, hence the layer, unchanged) and ``m`` is
    invariant under it.
    """

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    scale: float
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.A.dim() == 4

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        """Flattened input size (in * kh * kw for convs): the length of V's rows."""
        return int(self.A[0].numel())

    def validate(self, name: str = "", *, file: str | None = None) -> None:
        a, b = self.A, self.B
        if a.dim() not in (2, 4) or b.dim() != a.dim():
            raise ShapeMismatchError(
                f"A has shape {tuple(a.shape)} and B {tuple(b.shape)}; expected 2-D (linear) "
                "or 4-D (conv) factors of equal rank-dimension",
                file=file,
                key=name,
            )
        if a.shape[0] != b.shape[1]:
            raise ShapeMismatchError(
                f"rank mismatch: A is {tuple(a.shape)} (rank {a.shape[0]}) but B is "
                f"{tuple(b.shape)} (rank {b.shape[1]})",
                file=file,
                key=name,
            )
        if b.dim() == 4 and tuple(b.shape[2:]) != (1, 1):
            raise ShapeMismatchError(
                f"conv LoRA B must be 1x1, got {tuple(b.shape)}", file=file, key=name
            )
        mag = self.magnitude
        if mag is not None and (
            mag.numel() != b.shape[0]
            or tuple(mag.shape) not in ((b.shape[0],), (1, b.shape[0], 1, 1))
        ):
            raise ShapeMismatchError(
                f"DoRA magnitude has shape {tuple(mag.shape)} but B has {b.shape[0]} output "
                f"features (expected ({b.shape[0]},) or (1, {b.shape[0]}, 1, 1))",
                file=file,
                key=name,
            )
        named = (("lora_A", a), ("lora_B", b), (DORA_SUFFIX, mag))
        for which, t in named:
            if t is not None and not torch.isfinite(t).all():
                n = int((~torch.isfinite(t)).sum())
                raise NonFiniteError(f"{which} holds {n} non-finite value(s)", file=file, key=name)

    def factors(self, fold_scale: bool = True, dtype: torch.dtype | None = None):
        """(U, V) with ΔW = U @ V.T: U = B (out, r), V = A^T flattened (in*, r).

        With ``fold_scale`` sqrt(scale) goes into both, so U V^T is the true weight change.
        """
        u = self.B.reshape(self.B.shape[0], self.rank)
        v = self.A.reshape(self.rank, -1).T
        if dtype is not None:
            u, v = u.to(dtype), v.to(dtype)
        if fold_scale:
            s = math.sqrt(abs(self.scale))
            u = u * (s if self.scale >= 0 else -s)
            v = v * s
        return u, v

    def delta_w(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The weight change in the base layer's own layout (what PEFT's merge adds).

        For DoRA this is the low-rank part ``scale * B A`` only: the layer's full change also
        rescales every output row by ``m / ||W0 + scale B A||``, which needs the base weight
        W0 (``merged_weight(W0) - W0``)."""
        a = self.A if dtype is None else self.A.to(dtype)
        b = self.B if dtype is None else self.B.to(dtype)
        d = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)  # (out, in*)
        d = d * self.scale
        if self.is_conv:
            return d.reshape(b.shape[0], *a.shape[1:])
        return d.T if self.fan_in_fan_out else d

    def merged_weight(self, base: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The adapted layer's weight from the base weight ``base`` (its own layout), as PEFT's
        ``merge_and_unload()`` computes it: ``W0 + scale B A`` for LoRA; for DoRA each output
        row of that is rescaled to norm ``m`` (PEFT's ``dora_factor = m / ||W0 + ΔW||_row``)."""
        w = base.to(dtype) + self.delta_w(dtype)
        if self.magnitude is None:
            return w
        rows = w.T if (self.fan_in_fan_out and not self.is_conv) else w  # (out, in[, kh, kw])
        norm = rows.reshape(rows.shape[0], -1).norm(dim=1)
        factor = self.magnitude.to(dtype).reshape(-1) / norm
        rows = rows * factor.view(-1, *([1] * (rows.dim() - 1)))
        return rows.T if (self.fan_in_fan_out and not self.is_conv) else rows

    def to(self, dtype: torch.dtype) -> LoraModule:
        mag = None if self.magnitude is None else self.magnitude.to(dtype)
        return LoraModule(
            self.A.to(dtype), self.B.to(dtype), self.alpha, self.scale, self.fan_in_fan_out, mag
        )


@dataclass
class LoraRecord:
    """One adapter: ordered ``{module_name: LoraModule}`` plus its PEFT adapter config.

    Module names are paths inside the base model exactly as PEFT names them without the
    ``base_model.model.`` wrapper, e.g. ``model.layers.0.self_attn.q_proj``. The config is a
    JSON-able dict that makes the safetensors bytes a loadable PEFT adapter.
    """

    modules: dict[str, LoraModule]
    config: dict[str, Any] = field(default_factory=dict)
    lora_id: str | None = None

    def __iter__(self) -> Iterator[tuple[str, LoraModule]]:
        return iter(self.modules.items())

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    @property
    def num_parameters(self) -> int:
        return sum(
            m.A.numel() + m.B.numel() + (0 if m.magnitude is None else m.magnitude.numel())
            for m in self.modules.values()
        )

    @property
    def is_dora(self) -> bool:
        return any(m.is_dora for m in self.modules.values())

    def validate(self, *, file: str | None = None) -> None:
        check_supported_config(self.config, file=file)
        if not self.modules:
            raise UnknownLayoutError("adapter has no LoRA modules", file=file)
        dora = bool(self.config.get("use_dora", False))
        for name, m in self.modules.items():
            m.validate(name, file=file)
            if self.config and m.is_dora != dora:
                raise MissingPairError(
                    f"the adapter config has use_dora={dora} but this module "
                    f"{'has' if m.is_dora else 'lacks'} a DoRA {DORA_SUFFIX}",
                    file=file,
                    key=name,
                )
            r, alpha, scale = peft_rank_alpha_scale(self.config, name)
            if self.config and m.rank != r:
                raise ShapeMismatchError(
                    f"factors have rank {m.rank} but the adapter config gives r={r}",
                    file=file,
                    key=name,
                )
            # a reload recomputes alpha and scale from the config (PEFT's rule, rsLoRA and
            # rank/alpha patterns included): a module that disagrees would come back different
            if self.config and not (
                math.isclose(m.scale, scale, rel_tol=1e-6)
                and math.isclose(m.alpha, alpha, rel_tol=1e-6)
            ):
                raise ScaleMismatchError(
                    f"module has alpha={m.alpha:g}, scale={m.scale:g} but its adapter config "
                    f"gives alpha={alpha:g}, scale={scale:g} (use_rslora, rank_pattern, "
                    "alpha_pattern)",
                    file=file,
                    key=name,
                )

    def to(self, dtype: torch.dtype) -> LoraRecord:
        return LoraRecord(
            {k: m.to(dtype) for k, m in self.modules.items()}, dict(self.config), self.lora_id
        )

    def delta_weights(self, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        return {k: m.delta_w(dtype) for k, m in self.modules.items()}

    # ---- PEFT tensor layout (the layout of the zoo's weight column) ----------------------------
    def to_peft_state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, m in self.modules.items():
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.A.contiguous()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.B.contiguous()
            if m.magnitude is not None:  # PEFT's saved key: no ".weight" suffix
                out[f"{PEFT_PREFIX}{name}.{DORA_SUFFIX}"] = m.magnitude.contiguous()
        return out

    @classmethod
    def from_peft_state_dict(
        cls,
        state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        *,
        file: str | None = None,
        lora_id: str | None = None,
        validate: bool = True,
        fan_in_fan_out_modules: Sequence[str] | None = None,
    ) -> LoraRecord:
        """Pair up ``*.lora_A.weight`` / ``*.lora_B.weight`` keys; scales come from config.
        ``fan_in_fan_out_modules`` names the Conv1D-style modules of a mixed adapter (default:
        the config's one flag for all)."""
        check_supported_config(config, file=file)
        a_keys: dict[str, str] = {}
        b_keys: dict[str, str] = {}
        m_keys: dict[str, str] = {}
        for key in state:
            m = PEFT_KEY_RE.match(key)
            if m is None and (d := DORA_KEY_RE.match(key)) is not None:
                m_keys[d.group(1)] = key
                continue
            if m is None:
                if key.endswith(".bias") and ".lora_B" in key:
                    raise UnsupportedVariantError("LoRA bias is not supported", file=file, key=key)
                raise UnknownLayoutError(
                    "tensor name is not a PEFT LoRA factor (expected '<module>.lora_A.weight' "
                    "or '<module>.lora_B.weight')",
                    file=file,
                    key=key,
                )
            (a_keys if m.group(2) == "A" else b_keys)[m.group(1)] = key
        for name in a_keys.keys() - b_keys.keys():
            raise MissingPairError("lora_A has no matching lora_B", file=file, key=a_keys[name])
        for name in b_keys.keys() - a_keys.keys():
            raise MissingPairError("lora_B has no matching lora_A", file=file, key=b_keys[name])
        for name in m_keys.keys() - a_keys.keys():
            raise MissingPairError(
                "DoRA magnitude has no lora_A / lora_B pair", file=file, key=m_keys[name]
            )
        fifo_all = bool(config.get("fan_in_fan_out", False))
        fifo_set = None if fan_in_fan_out_modules is None else set(fan_in_fan_out_modules)
        modules: dict[str, LoraModule] = {}
        # Keep file order (safetensors sorts keys; sort by name for a stable, documented order).
        for name in sorted(a_keys, key=natural_key):
            _, alpha, scale = peft_rank_alpha_scale(config, name)
            fifo = fifo_all if fifo_set is None else name in fifo_set
            mag = state[m_keys[name]] if name in m_keys else None
            modules[name] = LoraModule(
                state[a_keys[name]], state[b_keys[name]], alpha, scale, fifo, mag
            )
        rec = cls(modules, dict(config), lora_id)
        if validate:
            rec.validate(file=file)
        return rec

    def to_safetensors_bytes(self, metadata: Mapping[str, str] | None = None) -> bytes:
        meta = {"format": "pt", CONFIG_META: json.dumps(self.config, sort_keys=True)}
        fifo = sorted((n for n, m in self.modules.items() if m.fan_in_fan_out), key=natural_key)
        if fifo and len(fifo) < len(self.modules):
            # PEFT decides fan_in_fan_out per layer (Conv1D yes, Linear no); one config flag
            # cannot say which, so mixed adapters name their Conv1D-style modules here
            meta[FIFO_META] = json.dumps(fifo)
        meta.update(metadata or {})
        return canonical_safetensors(st_save(self.to_peft_state_dict(), metadata=meta))

    @classmethod
    def from_safetensors_bytes(
        cls,
        data: bytes,
        config: Mapping[str, Any] | str | None = None,
        *,
        file: str | None = None,
        lora_id: str | None = None,
        validate: bool = True,
    ) -> LoraRecord:
        """Decode a weights cell. ``config`` is the row's ``adapter_config`` (dict or JSON
        text): the source of truth (docs/FORMAT.md); an embedded ``lora_zoo.config`` must equal
        it. Without one (a loose file), the embedded config, else ``{}``."""
        header = parse_safetensors(data, file=file)
        state = _tensors(data, file)
        meta = header.metadata
        cfg = cell_config(config, meta, file=file)
        try:
            fifo = json.loads(meta[FIFO_META]) if FIFO_META in meta else None
        except ValueError as e:
            raise CorruptFileError(f"not JSON ({e})", file=file, key=FIFO_META) from e
        if fifo is not None and not (
            isinstance(fifo, list) and all(isinstance(x, str) for x in fifo)
        ):
            raise CorruptFileError("must be a list of module names", file=file, key=FIFO_META)
        return cls.from_peft_state_dict(
            state, cfg, file=file, lora_id=lora_id, validate=validate,
            fan_in_fan_out_modules=fifo,
        )  # fmt: skip


def _json_object(text: str, *, file: str | None, key: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CorruptFileError(f"adapter config is not JSON ({e})", file=file, key=key) from e
    if not isinstance(obj, dict):
        raise CorruptFileError("adapter config is not a JSON object", file=file, key=key)
    return obj


def cell_config(
    column: Mapping[str, Any] | str | None, metadata: Mapping[str, str], *, file: str | None = None
) -> dict[str, Any]:
    """The adapter config of one weights cell, by the rule of docs/FORMAT.md: the row's
    ``adapter_config`` column is authoritative (it is what ``datasets`` users and PEFT see); an
    embedded ``lora_zoo.config`` must be the same JSON or the cell is refused, because two
    loaders reading different halves of one row would compute different scales."""
    embedded = metadata.get(CONFIG_META)
    emb = None if embedded is None else _json_object(embedded, file=file, key=CONFIG_META)
    if column is None:
        return emb or {}
    col = (
        _json_object(column, file=file, key="adapter_config")
        if isinstance(column, str)
        else dict(column)
    )
    if emb is not None and _canon(emb) != _canon(col):
        raise ConfigMismatchError(
            "the config embedded in the weights cell differs from the row's adapter_config "
            f"(embedded r={emb.get('r')!r}, lora_alpha={emb.get('lora_alpha')!r}; column "
            f"r={col.get('r')!r}, lora_alpha={col.get('lora_alpha')!r})",
            file=file,
            key=CONFIG_META,
        )
    return col


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header keys sorted.

    Why: the safetensors writer keeps ``__metadata__`` and the tensor entries in a hash map
    whose order changes from process to process, so one tensor dict saved in two processes
    gives different bytes. Sorting the header (tensor data and offsets are untouched) makes the
    bytes a function of the content, on every write path (build, ingest, merge, export): the
    same rows give the same shard sha256, which push deduplication, resume and ``diff`` need."""
    h = parse_safetensors(data)
    header: dict[str, Any] = {
        t.name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
        for t in h.tensors
    }
    if h.metadata:
        header["__metadata__"] = dict(sorted(h.metadata.items()))
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(raw).to_bytes(8, "little") + raw + bytes(data[h.data_start :])


def _tensors(data: bytes, file: str | None) -> dict[str, torch.Tensor]:
    """safetensors' own decode of bytes ``parse_safetensors`` already accepted."""
    try:
        return st_load(bytes(data))
    except Exception as e:  # SafetensorError and friends: always name the file
        raise CorruptFileError(f"not valid safetensors bytes ({e})", file=file) from e


def load_safetensors_bytes(data: bytes, *, file: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a weights cell, after the full structural check (``lora_zoo.weights``)."""
    parse_safetensors(data, file=file)
    return _tensors(data, file)


def safetensors_metadata(data: bytes, *, file: str | None = None) -> dict[str, str]:
    """The validated header's ``__metadata__`` (tensors untouched)."""
    return dict(parse_safetensors(data, file=file).metadata)


def cell_modules(data: bytes, *, file: str | None = None) -> tuple[list[str], list[str]]:
    """(module names, dtypes) of a weights cell from its validated header alone (``info``,
    cards): names by ``PEFT_KEY_RE``, the one rule for what a factor's key means."""
    h = parse_safetensors(data, file=file)
    mods = {m.group(1) for t in h.tensors if (m := PEFT_KEY_RE.match(t.name))}
    return sorted(mods), sorted({t.dtype for t in h.tensors})
