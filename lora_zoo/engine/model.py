"""Inject K stacked LoRAs into any model, re-point them between chunks, extract LoraRecords.

Why per-LoRA seeded generators: a LoRA's init must depend only on its own ``init_seed``, not
on which chunk it landed in or on K, so a zoo is reproducible job by job and the same init can
be given to a plain PEFT model (``peft_init_like``) to check the batched engine against it.

Init variants (``LoraSpec.init``, PEFT's ``init_lora_weights``): ``default`` (A kaiming-uniform,
B = 0), ``gaussian`` (A ~ N(0, 1/r^2), B = 0), ``pissa`` (B0, A0 from the top-r SVD of W0,
PEFT's formula) and ``olora`` (B0, A0 from the QR of W0). PiSSA / OLoRA change the base weight
in PEFT (W_res = W0 - s B0 A0); the engine keeps W0 and subtracts s B0 A0 in the LoRA path
(``layers``), and ``extract`` stores what PEFT's own conversion
(``save_pretrained(path_initial_model_for_weight_conversion=...)``) stores: the rank-2r plain
LoRA [B, -B0] [A; A0] with the same scale, whose ΔW is relative to the true base W0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_zoo.engine.layers import MultiLoraLinear, base_in_out
from lora_zoo.errors import SelectionError
from lora_zoo.record import LoraModule, LoraRecord, peft_rank_alpha_scale

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA's shape and randomness (everything the stacked factors need at init)."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    init_seed: int = 0
    dropout_seed: int = 0
    use_rslora: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    use_dora: bool = False
    init: str = "default"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise SelectionError(
                f"init {self.init!r} is not one of {', '.join(INITS)}", key="init_lora_weights"
            )
        if self.use_dora and self.init in RESIDUAL_INITS:
            raise SelectionError(
                f"DoRA with init {self.init!r} is not supported: its row norms would be of the "
                "residual base, which the engine does not form; use DoRA with default/gaussian",
                key="init_lora_weights",
            )

    def peft_config(self) -> dict[str, Any]:
        """The rank/alpha part of a PEFT LoraConfig (``record.peft_rank_alpha_scale`` reads it)."""
        return {
            "r": int(self.r),
            "lora_alpha": float(self.alpha),
            "use_rslora": bool(self.use_rslora),
            "rank_pattern": dict(self.rank_pattern or {}),
            "alpha_pattern": dict(self.alpha_pattern or {}),
            "use_dora": bool(self.use_dora),
        }

    def rank_alpha_scale(self, module_name: str) -> tuple[int, float, float]:
        return peft_rank_alpha_scale(self.peft_config(), module_name)


INITS = ("default", "gaussian", "pissa", "olora")
RESIDUAL_INITS = ("pissa", "olora")  # inits that change the base weight in PEFT


def matches_target(name: str, target: str | Sequence[str]) -> bool:
    """PEFT's rule: a regex string must fullmatch the name; a list entry matches the name
    exactly or as a dotted suffix."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def kaiming_init_(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default lora_A init, drawn on CPU float32 so every device/dtype gets the same
    numbers: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))."""
    a = torch.empty(weight.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    with torch.no_grad():
        weight.copy_(a.to(weight.dtype))
    return weight


class MultiLoraModel:
    """Owns the wrappers injected into ``model`` and the stacked factors of the current chunk."""

    def __init__(
        self,
        model: nn.Module,
        target_modules: str | Sequence[str],
        specs: Sequence[LoraSpec],
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.target_modules = (
            target_modules if isinstance(target_modules, str) else list(target_modules)
        )
        self.dtype = dtype
        for p in model.parameters():
            p.requires_grad_(False)
        self.wrappers: dict[str, MultiLoraLinear] = {}
        names = [n for n, m in model.named_modules() if n and matches_target(n, target_modules)]
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = getattr(parent, child)
            try:
                base_in_out(layer)
            except TypeError:
                continue  # PEFT also skips e.g. a matching container; only leaf linears count
            w = MultiLoraLinear(layer, name)
            setattr(parent, child, w)
            self.wrappers[name] = w
        if not self.wrappers:
            raise SelectionError(
                f"no nn.Linear/Conv1D module matches target_modules={target_modules!r}",
                key="target_modules",
            )
        self.specs: list[LoraSpec] = []
        self.reset(specs)

    # ---- chunk management -------------------------------------------------------------------
    @property
    def num_loras(self) -> int:
        return len(self.specs)

    @property
    def device(self) -> torch.device:
        w = next(iter(self.wrappers.values())).base_layer.weight
        return w.device

    def reset(self, specs: Sequence[LoraSpec]) -> None:
        """Fresh factors for a new chunk of ``len(specs)`` LoRAs (PEFT default init)."""
        if not specs:
            raise ValueError("need at least one LoraSpec")
        self.specs = list(specs)
        K, dev = len(specs), self.device
        gens = [torch.Generator().manual_seed(int(s.init_seed)) for s in specs]
        drop_gens: list[torch.Generator | None] = []
        for s in specs:
            if s.dropout > 0:
                g = torch.Generator(device=dev)
                g.manual_seed(int(s.dropout_seed))
                drop_gens.append(g)
            else:
                drop_gens.append(None)
        for name, w in self.wrappers.items():
            ras = [s.rank_alpha_scale(name) for s in specs]
            r_max = max(r for r, _, _ in ras)
            A = torch.zeros(K, r_max, w.in_features, dtype=self.dtype)  # (K, r_max, in)
            B = torch.zeros(K, w.out_features, r_max, dtype=self.dtype)  # (K, out, r_max)
            mask = torch.zeros(K, r_max, dtype=self.dtype)  # (K, r_max) 1 on real rank dims
            for k, (r, _, _) in enumerate(ras):
                kaiming_init_(A[k, :r], gens[k])
                mask[k, :r] = 1.0
            scale = torch.tensor([sc for _, _, sc in ras], dtype=self.dtype)  # (K,)
            init_a, init_b = _variant_init(w, specs, ras, A, B, gens)
            w.set_factors(
                nn.Parameter(A.to(dev)),
                nn.Parameter(B.to(dev)),
                scale.to(dev),
                mask.to(dev),
                [float(s.dropout) for s in specs],
                drop_gens,
            )
            dora = torch.tensor([bool(s.use_dora) for s in specs], device=dev)  # (K,)
            w.set_variants(
                None,
                dora,
                None if init_a is None else init_a.to(dev),
                None if init_b is None else init_b.to(dev),
            )
            if bool(dora.any()):  # PEFT's init: m = ||W0 + s B A||_row (B = 0: ||W0||_row)
                with torch.no_grad():
                    mag = torch.where(dora.view(-1, 1), w.dora_row_norms(), 0.0)  # (K, out)
                w.set_variants(nn.Parameter(mag), dora, w.init_A, w.init_B)

    def parameters(self) -> list[nn.Parameter]:
        """The stacked trainable tensors, each with dim 0 = K (A then B per module)."""
        out: list[nn.Parameter] = []
        for w in self.wrappers.values():
            out += [w.lora_A, w.lora_B]  # type: ignore[list-item]
            if w.magnitude is not None:
                out.append(w.magnitude)
        return out

    def grad_masks(self) -> list[torch.Tensor]:
        """Per parameter, a broadcastable 0/1 mask of real (non-padded) rank entries."""
        out: list[torch.Tensor] = []
        for w in self.wrappers.values():
            out += [w.rank_mask[:, :, None], w.rank_mask[:, None, :]]  # (K,r,1), (K,1,r)
            if w.magnitude is not None:  # only DoRA LoRAs train a magnitude
                out.append(w.dora.to(w.magnitude.dtype)[:, None])  # (K, 1)
        return out

    def train(self) -> None:
        """LoRA dropout on, base model in eval mode: base dropout would draw from the global
        RNG across all K*b rows and couple the LoRAs of a chunk (PEFT-style training of the
        paper's zoos uses base models whose dropout is 0 anyway)."""
        self.model.eval()
        for w in self.wrappers.values():
            w.train()

    def eval(self) -> None:
        self.model.eval()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the plain base model (all wrappers bypass their LoRA path)."""
        for w in self.wrappers.values():
            w.enabled = False
        try:
            yield
        finally:
            for w in self.wrappers.values():
                w.enabled = True

    def remove(self) -> nn.Module:
        """Put the original layers back; returns the (now plain) model."""
        for name, w in self.wrappers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, w.base_layer)
        self.wrappers = {}
        return self.model

    # ---- extraction ---------------------------------------------------------------------------
    def extract(
        self,
        lora_ids: Sequence[str | None] | None = None,
        *,
        base_model_name: str = "",
        extra_config: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> list[LoraRecord]:
        """K LoraRecords with PEFT names and a PEFT config (loadable by PeftModel)."""
        ids = list(lora_ids) if lora_ids is not None else [None] * self.num_loras
        fifo = any(w.fan_in_fan_out for w in self.wrappers.values())
        target = (
            self.target_modules
            if isinstance(self.target_modules, str)
            else sorted(set(self.target_modules))
        )
        out = []
        for k, spec in enumerate(self.specs):
            modules = {
                name: _extract_module(w, k, spec, dtype) for name, w in self.wrappers.items()
            }
            config: dict[str, Any] = {
                "peft_type": "LORA",
                "r": int(spec.r),
                "lora_alpha": float(spec.alpha),
                "target_modules": target,
                "lora_dropout": float(spec.dropout),
                "use_rslora": bool(spec.use_rslora),
                "fan_in_fan_out": fifo,
                "bias": "none",
                "init_lora_weights": True,
                "rank_pattern": dict(spec.rank_pattern or {}),
                "alpha_pattern": dict(spec.alpha_pattern or {}),
                "base_model_name_or_path": base_model_name,
                "inference_mode": True,
            }
            if spec.use_dora:
                config["use_dora"] = True
            if spec.init in RESIDUAL_INITS:
                config.update(_doubled_config(spec))
            config.update(extra_config or {})
            out.append(LoraRecord(modules, config, ids[k]))
        return out


def _doubled_config(spec: LoraSpec) -> dict[str, Any]:
    """PEFT's config of a converted PiSSA / OLoRA adapter: rank 2r at the same scale (alpha x 2,
    or x sqrt(2) under rsLoRA; patterns likewise), ``init_lora_weights`` True (loading it must
    not re-run the init on the true base)."""
    f = math.sqrt(2.0) if spec.use_rslora else 2.0
    return {
        "r": 2 * int(spec.r),
        "lora_alpha": float(spec.alpha) * f,
        "rank_pattern": {k: 2 * int(v) for k, v in (spec.rank_pattern or {}).items()},
        "alpha_pattern": {k: float(v) * f for k, v in (spec.alpha_pattern or {}).items()},
        "init_lora_weights": True,
    }


def _extract_module(w: MultiLoraLinear, k: int, spec: LoraSpec, dtype: torch.dtype) -> LoraModule:
    """LoRA k of wrapper ``w`` as a LoraModule relative to the true base (see module docstring)."""
    r, alpha, scale = spec.rank_alpha_scale(w.name)
    A = w.lora_A.detach()[k, :r].to("cpu", dtype).clone()  # (r, in)
    B = w.lora_B.detach()[k, :, :r].to("cpu", dtype).clone()  # (out, r)
    mag = None
    if spec.use_dora and w.magnitude is not None:
        mag = w.magnitude.detach()[k].to("cpu", dtype).clone()  # (out,)
    if spec.init in RESIDUAL_INITS and w.init_A is not None and w.init_B is not None:
        a0 = w.init_A[k, :r].to("cpu", dtype)
        b0 = w.init_B[k, :, :r].to("cpu", dtype)
        A, B = torch.cat([A, a0], dim=0), torch.cat([B, -b0], dim=1)  # PEFT's [A; A0], [B, -B0]
        alpha = alpha * (math.sqrt(2.0) if spec.use_rslora else 2.0)
    return LoraModule(A, B, alpha, scale, w.fan_in_fan_out, mag)


def _variant_init(
    w: MultiLoraLinear,
    specs: Sequence[LoraSpec],
    ras: Sequence[tuple[int, float, float]],
    A: torch.Tensor,
    B: torch.Tensor,
    gens: Sequence[torch.Generator],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Apply the non-default inits to the (K, r_max, in) / (K, out, r_max) stacks in place;
    returns the frozen (init_A, init_B) stacks when a LoRA uses PiSSA / OLoRA, else (None, None).

    gaussian: PEFT's ``normal_(A, std=1/r)``, drawn from the LoRA's own generator after the
    kaiming draw (so default-init LoRAs of the chunk are unaffected). PiSSA / OLoRA follow
    PEFT's ``pissa_init`` / ``olora_init`` op by op in float32 on the base weight."""
    if all(s.init == "default" for s in specs):
        return None, None
    init_a = torch.zeros_like(A) if any(s.init in RESIDUAL_INITS for s in specs) else None
    init_b = torch.zeros_like(B) if init_a is not None else None
    w0 = w.base_matrix().detach().to("cpu", torch.float32)  # (out, in)
    svd = qr = None
    for k, (s, (r, _, sc)) in enumerate(zip(specs, ras)):
        if s.init == "gaussian":
            draw = torch.randn(A[k, :r].shape, generator=gens[k], dtype=torch.float32) / r
            A[k, :r] = draw.to(A.dtype)
            continue
        if s.init == "pissa":
            svd = svd or torch.linalg.svd(w0, full_matrices=False)
            v, sv, uh = svd
            sr = sv[:r] / sc
            a0 = torch.diag(torch.sqrt(sr)) @ uh[:r]  # (r, in)
            b0 = v[:, :r] @ torch.diag(torch.sqrt(sr))  # (out, r)
        elif s.init == "olora":
            if w.fan_in_fan_out:
                raise SelectionError(
                    "OLoRA on a Conv1D (fan_in_fan_out) layer: PEFT's olora_init factors the "
                    "stored (in, out) weight, which gives B and A the wrong shapes",
                    key=w.name,
                )
            qr = qr or torch.linalg.qr(w0)
            a0, b0 = qr[1][:r].contiguous(), qr[0][:, :r].contiguous()
        else:
            continue
        A[k, :r], B[k, :, :r] = a0.to(A.dtype), b0.to(B.dtype)
        assert init_a is not None and init_b is not None
        init_a[k, :r], init_b[k, :, :r] = A[k, :r], B[k, :, :r]
    return init_a, init_b


def peft_init_like(peft_model: nn.Module, spec: LoraSpec, adapter_name: str = "default") -> None:
    """Give a PEFT model the exact init MultiLoraModel gives ``spec`` (for reference tests):
    same generator, same module order (named_modules), same draws; B = 0."""
    g = torch.Generator().manual_seed(int(spec.init_seed))
    n = 0
    for _, m in peft_model.named_modules():
        la = getattr(m, "lora_A", None)
        if isinstance(la, nn.ModuleDict) and adapter_name in la:
            n += 1
            weight = la[adapter_name].weight
            kaiming_init_(weight, g)  # every init consumes this draw, like MultiLoraModel
            if spec.init in RESIDUAL_INITS:
                raise SelectionError(
                    f"init {spec.init!r} is deterministic: build the PEFT model with "
                    f"init_lora_weights={spec.init!r} instead of copying an init",
                    key="init_lora_weights",
                )
            if spec.init == "gaussian":
                r = weight.shape[0]
                draw = torch.randn(weight.shape, generator=g, dtype=torch.float32) / r
                with torch.no_grad():
                    weight.copy_(draw.to(weight.dtype))
            with torch.no_grad():
                m.lora_B[adapter_name].weight.zero_()
    if n == 0:
        raise SelectionError(f"no LoRA layers for adapter {adapter_name!r}", key=adapter_name)
