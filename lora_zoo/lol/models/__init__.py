"""Reference LoL models: what the LoL papers (arXiv 2410.04207, "Learning on LoRAs: GL-Equivariant
Processing of Low-Rank Weight Spaces", and its expanded version "GL Equivariant Metanetworks")
compare, written from their descriptions, small enough to train on a CPU in seconds.

Why these: a LoRA module is ΔW = U V^T with U (n, r), V (m, r), and (U R, V R^-T) is the same
ΔW for every R in GL(r). A model on raw factors must learn that symmetry from data; the others
remove it (svals, canonical form, dense ΔW), reduce it (O-Align: only O(r)), or respect it by
construction (GL-net). Each class states its symmetry; ``tests/unit/lol/test_models.py`` checks
it with random, badly conditioned R per module.

Every model reads a collated batch's ``modules`` (``{name: {"U", "V" | "S" | "W", "mask",
"present"}}``, from ``lora_zoo.load``) for a fixed list of ``ModuleSpec`` (the zoo's module union,
in ``natural_key`` order) and returns (b, out) predictions. ``calibrate(modules)`` fits the
fixed input scalings on training data (a per-feature standardisation or a per-module scale,
always a function of what the model already sees, so it keeps the model's symmetry).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lora_zoo.errors import SelectionError
from lora_zoo.load import symmetry
from lora_zoo.registry import Registry

Modules = dict[str, dict[str, torch.Tensor]]
DENSE_MAX = 1 << 22  # total n*m over the selected modules the dense MLP accepts (4M inputs)


@dataclass(frozen=True)
class ModuleSpec:
    """One module slot of a model (from a batch's ``module_info`` and its widest rank)."""

    name: str
    out_features: int  # n (U rows)
    in_features: int  # m (V rows)
    rank: int  # widest rank in the zoo (narrower LoRAs are zero-padded: exact)
    type: str = ""
    layer: int = -1


def specs_from_batch(batch: dict[str, Any]) -> list[ModuleSpec]:
    """ModuleSpecs of a collated batch (its module union, in the batch's order)."""
    out = []
    for name, mod in batch["modules"].items():
        info = batch["module_info"][name]
        r = next((int(mod[k].shape[-1]) for k in ("U", "S") if k in mod), 0)
        out.append(
            ModuleSpec(
                name, info["out_features"], info["in_features"], r, info["type"], info["layer"]
            )
        )
    return out


def _pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Zero-pad (or keep) the rank (last) axis to r: exact under the symmetry."""
    if x.shape[-1] > r:
        raise ValueError(f"rank {x.shape[-1]} exceeds the model's {r}")
    return nn.functional.pad(x, (0, r - x.shape[-1])) if x.shape[-1] < r else x


def mlp(d_in: int, hidden: int, d_out: int, depth: int = 2, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> LayerNorm -> ReLU blocks, then a linear read-out (the papers' MLP head)."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class LolModel(nn.Module):
    """Base: a fixed module list, the view the model reads, its symmetry, calibration."""

    view: str = "factors"
    invariance: str = "none"  # set by make_model from the registry (LolModelInfo.symmetry)

    def __init__(self, specs: Sequence[ModuleSpec]) -> None:
        super().__init__()
        self.specs = list(specs)
        if not self.specs:
            raise SelectionError("a LoL model needs at least one module", key="modules")

    def _present(self, modules: Modules, b: int, device: torch.device) -> torch.Tensor:
        """(b, M) float: 1 where the LoRA adapts module k (all 1 for a module-uniform zoo)."""
        cols = []
        for s in self.specs:
            p = modules.get(s.name, {}).get("present")
            cols.append(torch.ones(b, device=device) if p is None else p.to(device).float())
        return torch.stack(cols, 1)

    @torch.no_grad()
    def calibrate(self, modules: Modules) -> None:  # pragma: no cover - overridden
        pass


# ---- MLPs on flat features ---------------------------------------------------------------------
class FlatMLP(LolModel):
    """MLP on one flat vector per LoRA built from a view, standardised per feature.

    ``view="factors"``: raw U, V of every module, flattened and concatenated. **Not invariant**:
    (U R, V R^-T) is a different input for the same ΔW (a test shows the output moves), so it has
    to learn the symmetry from data (``augment`` in the bench draws a random R per LoRA, module
    and epoch). ``"canonical"``: the GL-canonical form (balanced SVD + sign rule,
    ``symmetry.canonical``): **GL(r)-invariant** (up to ties in the singular values).
    ``"svals"``: singular values of each ΔW: **GL(r)-invariant** (hence O(r)-invariant).
    ``"dense"``: ΔW itself: **GL(r)-invariant**, but n*m inputs per module, so it refuses zoos
    whose modules total more than ``DENSE_MAX`` entries. The per-feature standardisation is a
    fixed affine map of the view, so it keeps the view's symmetry.

    ``magnitude=True`` (``--hparams '{"mlp": {"magnitude": true}}'``) also feeds each module's
    DoRA magnitude ``M`` (out,) from the batch (zeros for LoRAs without DoRA): an invariant
    feature beside the factors (docs/FORMAT.md), so every view keeps its symmetry.
    """

    def __init__(
        self,
        specs: Sequence[ModuleSpec],
        out_dim: int,
        *,
        view: str = "factors",
        hidden: int | None = None,
        depth: int = 2,
        dropout: float = 0.0,
        magnitude: bool = False,
    ) -> None:
        super().__init__(specs)
        self.view = view
        self.magnitude = bool(magnitude)
        hidden = hidden or (32 if view == "dense" else 128)  # dense: d_in is n*m per module
        if view == "dense":
            total = sum(s.out_features * s.in_features for s in self.specs)
            if total > DENSE_MAX:
                raise SelectionError(
                    f"dense ΔW of the selected modules is {total:,} numbers per LoRA (limit "
                    f"{DENSE_MAX:,}); select fewer modules or use the svals / canonical view",
                    key="view",
                )
        d = sum(self._width(s) for s in self.specs) + len(self.specs)
        self.register_buffer("mu", torch.zeros(d))
        self.register_buffer("sd", torch.ones(d))
        self.net = mlp(d, hidden, out_dim, depth, dropout)

    def _width(self, s: ModuleSpec) -> int:
        return self._view_width(s) + (s.out_features if self.magnitude else 0)

    def _view_width(self, s: ModuleSpec) -> int:
        if self.view == "dense":
            return s.out_features * s.in_features
        if self.view == "svals":
            return s.rank
        return (s.out_features + s.in_features) * s.rank

    def features(self, modules: Modules) -> torch.Tensor:
        """(b, d): the view of every module, flattened, then the ``present`` flags."""
        parts = []
        some = next(iter(modules.values()))
        some_t = next(t for k, t in some.items() if k not in ("mask", "present"))
        b, dev = some_t.shape[0], some_t.device
        for s in self.specs:
            mod = modules.get(s.name)
            if mod is None:  # a module no LoRA of this batch adapts: zeros (exact, see collate)
                parts.append(torch.zeros(b, self._width(s), device=dev, dtype=some_t.dtype))
            elif self.view == "dense":
                parts.append(mod["W"].reshape(b, -1))  # (b, n*m)
            elif self.view == "svals":
                parts.append(_pad(mod["S"], s.rank))  # (b, r)
            else:
                u, v = _pad(mod["U"], s.rank), _pad(mod["V"], s.rank)  # (b, n, r), (b, m, r)
                parts += [u.reshape(b, -1), v.reshape(b, -1)]
            if self.magnitude and mod is not None:  # (b, out); zeros: no DoRA in this batch
                m = mod.get("M")
                parts.append(
                    m.to(some_t.dtype) if m is not None else some_t.new_zeros(b, s.out_features)
                )
        parts.append(self._present(modules, b, dev).to(some_t.dtype))
        return torch.cat(parts, 1)

    @torch.no_grad()
    def calibrate(self, modules: Modules) -> None:
        x = self.features(modules).to(self.mu.dtype)
        self.mu.copy_(x.mean(0))
        self.sd.copy_(x.std(0).nan_to_num(1.0).clamp_min(1e-12 + 1e-6 * float(x.std(0).max())))

    def forward(self, modules: Modules) -> torch.Tensor:
        x = self.features(modules).to(self.mu.dtype)
        return self.net((x - self.mu) / self.sd)


class OAlignMLP(FlatMLP):
    """O-Align: rotate each module's factors by the orthogonal Q that best maps them onto a
    template LoRA's (joint Procrustes, ``symmetry.align``), then the raw-factor MLP.

    **O(r)-invariant only** (for orthogonal R0, align(U R0, V R0) == align(U, V) when the
    Procrustes problem has a unique solution); a general R in GL(r) changes U^T U, which no
    rotation undoes, so the output moves under GL(r) (a test shows both). The template (the
    first training LoRA by default) is stored in the model; a module the template lacks is
    not rotated."""

    def __init__(self, specs: Sequence[ModuleSpec], out_dim: int, **kw: Any) -> None:
        kw.pop("view", None)
        super().__init__(specs, out_dim, view="aligned", **kw)
        self.template: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_template(self, modules: Modules, row: int = 0) -> None:
        self.template = {}
        for s in self.specs:
            mod = modules.get(s.name)
            if mod is not None and bool(mod["present"][row]):
                self.template[s.name] = (
                    _pad(mod["U"][row], s.rank).detach().clone(),
                    _pad(mod["V"][row], s.rank).detach().clone(),
                )

    def aligned(self, modules: Modules) -> Modules:
        out: Modules = {}
        for s in self.specs:
            mod = modules.get(s.name)
            if mod is None:
                continue
            u, v = _pad(mod["U"], s.rank), _pad(mod["V"], s.rank)
            if s.name in self.template:
                ut, vt = (t.to(u.device, u.dtype) for t in self.template[s.name])
                u, v = symmetry.align(u, v, ut, vt)
            out[s.name] = {**mod, "U": u, "V": v}
        return out

    def features(self, modules: Modules) -> torch.Tensor:
        return super().features(self.aligned(modules))

    @torch.no_grad()
    def calibrate(self, modules: Modules) -> None:
        if not self.template:
            self.set_template(modules)
        super().calibrate(modules)


# ---- GL-net --------------------------------------------------------------------------------------
class GLLinear(nn.Module):
    """GL(r)-equivariant linear layer for one module: U -> W_u U, V -> W_v V.

    Mixing rows commutes with the right action: W_u (U R) = (W_u U) R and
    W_v (V R^-T) = (W_v V) R^-T. No bias (adding b 1^T to U would not commute with R)."""

    def __init__(self, n_in: int, m_in: int, n_out: int, m_out: int) -> None:
        super().__init__()
        self.wu = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))
        self.wv = nn.Parameter(torch.randn(m_out, m_in) / math.sqrt(m_in))

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.wu @ u, self.wv @ v  # (b, n_out, r), (b, m_out, r)


def gl_gate(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GL(r)-invariant nonlinearity: scale row i of U by sigmoid(s_i / rms(s)), s = U V^T 1 (the
    row sums of ΔW = U V^T), and row j of V by the same of t = V U^T 1 (the column sums).

    s and t are functions of ΔW only, so the gates are invariant and gating rows commutes with
    the right action: the layer stays equivariant. A smooth version of gating by sign(s_i);
    dividing by rms(s) (also invariant) makes it independent of ΔW's overall scale."""
    s = u @ v.sum(-2, keepdim=True).transpose(-1, -2)  # (b, n, 1) = U (V^T 1)
    t = v @ u.sum(-2, keepdim=True).transpose(-1, -2)  # (b, m, 1) = V (U^T 1)

    def gate(x: torch.Tensor) -> torch.Tensor:
        # + tiny inside the root: an absent module (all zeros) gets gate 1/2 and finite grads
        rms = (x.pow(2).mean(-2, keepdim=True) + torch.finfo(x.dtype).tiny).sqrt()
        return torch.sigmoid(x / rms)

    return u * gate(s), v * gate(t)


class GLNet(LolModel):
    """GL-net: per module, stacked GL-equivariant linear layers (``GLLinear``) with the
    invariant gate (``gl_gate``) between them, then the invariant products U_L V_L^T
    (h x h per module, = W_u ... ΔW ... W_v^T gated) concatenated across modules and an MLP.

    **GL(r)-invariant** by construction (each stage commutes with (U R, V R^-T) and the head
    only sees U_L V_L^T). Absent modules are zero factors: their products are zero.
    ``calibrate`` sets a per-module scale so the products have unit RMS on training data
    (computed from the invariant products, so the scale is invariant too).

    Size: the constructor defaults (width 8, two gated layers, a two-layer head of 128) are a
    CPU-cheap net, *not* the papers'. ``lora-zoo bench`` builds GL-net from a named preset
    (``lora_zoo.lol.presets``), chosen by the task: ``membership`` (the papers' d = 64
    equivariant width, one GL layer, a one-hidden-layer head of 64; ARC / CelebA / ImageNette
    membership), ``attributes`` (the same size; CelebA attributes), ``clip_score`` and
    ``llm_accuracy`` (d = 64, one layer, a two-layer head of 128 for continuous targets), and
    ``small`` (these defaults). With one layer there is no gate: the products are
    W_u ΔW W_v^T, a learned d x d compression of ΔW on each side, which is what lifts GL-net
    from AUROC 0.89 to 0.97 on the quickstart zoo (README, controlled comparison)."""

    view = "factors"

    def __init__(
        self,
        specs: Sequence[ModuleSpec],
        out_dim: int,
        *,
        width: int = 8,
        layers: int = 2,
        hidden: int = 128,
        depth: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(specs)
        self.blocks = nn.ModuleList()
        for s in self.specs:
            dims_n = [s.out_features] + [width] * layers
            dims_m = [s.in_features] + [width] * layers
            self.blocks.append(
                nn.ModuleList(
                    GLLinear(dims_n[i], dims_m[i], dims_n[i + 1], dims_m[i + 1])
                    for i in range(layers)
                )
            )
        self.register_buffer("scale", torch.ones(len(self.specs)))
        self.width = width
        self.head = mlp(len(self.specs) * (width * width + 1), hidden, out_dim, depth, dropout)

    def products(self, modules: Modules) -> torch.Tensor:
        """(b, M, h*h): U_L V_L^T of every module, unscaled."""
        outs = []
        some = next(iter(modules.values()))["U"]
        for s, block in zip(self.specs, self.blocks):
            mod = modules.get(s.name)
            if mod is None:  # no LoRA of this batch adapts it: zero factors, zero products
                outs.append(some.new_zeros(some.shape[0], self.width**2, dtype=self.scale.dtype))
                continue
            u, v = mod["U"].to(self.scale.dtype), mod["V"].to(self.scale.dtype)  # (b, n|m, r)
            for k, layer in enumerate(block):
                u, v = layer(u, v)
                if k < len(block) - 1:
                    u, v = gl_gate(u, v)
            outs.append((u @ v.transpose(-1, -2)).flatten(1))  # (b, h*h)
        return torch.stack(outs, 1)

    @torch.no_grad()
    def calibrate(self, modules: Modules) -> None:
        p = self.products(modules)  # (b, M, h*h)
        rms = p.pow(2).mean((0, 2)).sqrt()  # (M,)
        self.scale.copy_(torch.where(rms > 0, 1 / rms.clamp_min(1e-30), torch.ones_like(rms)))

    def features(self, modules: Modules) -> torch.Tensor:
        p = self.products(modules) * self.scale[None, :, None]  # (b, M, h*h)
        b = p.shape[0]
        pres = self._present(modules, b, p.device).to(p.dtype)[..., None]  # (b, M, 1)
        return torch.cat([p, pres], -1).flatten(1)  # (b, M*(h*h+1))

    def forward(self, modules: Modules) -> torch.Tensor:
        return self.head(self.features(modules))


# ---- transformer over module tokens ---------------------------------------------------------------
class ModuleTransformer(LolModel):
    """A transformer over one token per module, built from invariant per-module features: the
    module's singular values (``svals`` view, standardised per module slot),
    its log Frobenius norm, plus learned embeddings of its type (``q_proj``, ``to_v``, ...) and
    layer index; absent modules are masked out of attention and of the mean pool.

    **GL(r)-invariant**: the tokens are functions of ΔW only; the embeddings depend on the
    module slot, not on the factors."""

    view = "svals"

    def __init__(
        self,
        specs: Sequence[ModuleSpec],
        out_dim: int,
        *,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(specs)
        self.r = max(s.rank for s in self.specs)
        types = sorted({s.type for s in self.specs})
        self.type_index = {t: i for i, t in enumerate(types)}
        self.register_buffer(
            "slot_type", torch.tensor([self.type_index[s.type] for s in self.specs])
        )
        self.register_buffer("slot_layer", torch.tensor([max(s.layer, -1) + 1 for s in self.specs]))
        self.register_buffer("mu", torch.zeros(len(self.specs), self.r + 1))
        self.register_buffer("sd", torch.ones(len(self.specs), self.r + 1))
        self.inp = nn.Linear(self.r + 1, d_model)
        self.type_emb = nn.Embedding(len(types), d_model)
        self.layer_emb = nn.Embedding(int(self.slot_layer.max()) + 1, d_model)
        self.slot_emb = nn.Embedding(len(self.specs), d_model)
        enc = nn.TransformerEncoderLayer(
            d_model, heads, 2 * d_model, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(enc, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, out_dim))

    def raw_tokens(self, modules: Modules) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, M, r+1) [s_1..s_r, log ||ΔW||_F] and (b, M) present."""
        some = next(iter(modules.values()))["S"]
        b, dev = some.shape[0], some.device
        toks = []
        for s in self.specs:
            mod = modules.get(s.name)
            sv = (
                _pad(mod["S"], self.r).to(self.mu.dtype)
                if mod is not None
                else torch.zeros(b, self.r, device=dev, dtype=self.mu.dtype)
            )
            fro = sv.pow(2).sum(-1, keepdim=True).sqrt()  # ||ΔW||_F = ||s||_2
            toks.append(torch.cat([sv, torch.log(fro + 1e-12)], -1))
        return torch.stack(toks, 1), self._present(modules, b, dev) > 0

    @torch.no_grad()
    def calibrate(self, modules: Modules) -> None:
        x, _ = self.raw_tokens(modules)
        self.mu.copy_(x.mean(0))
        self.sd.copy_(x.std(0).nan_to_num(1.0).clamp_min(1e-6))

    def forward(self, modules: Modules) -> torch.Tensor:
        x, present = self.raw_tokens(modules)
        h = self.inp((x - self.mu) / self.sd)  # (b, M, d)
        h = (
            h
            + (
                self.type_emb(self.slot_type)
                + self.layer_emb(self.slot_layer)
                + self.slot_emb.weight
            )[None]
        )
        h = self.encoder(h, src_key_padding_mask=~present)  # (b, M, d)
        w = present.to(h.dtype)[..., None]  # (b, M, 1)
        pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)  # mean over present modules
        return self.out(pooled)


# ---- registry --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LolModelInfo:
    """What a LoL model declares about itself, once, at registration.

    ``symmetry``: view -> the symmetry the model has on that view ("none" | "O(r)" | "GL(r)";
    "-" for a model that never reads weights); its keys, in order, are the views the model
    reads and the bench's default runs. ``make(specs, out_dim, view, **hp)`` builds the module;
    a model without ``make`` never reads weights and predicts from the fit labels alone with
    ``fit_predict(task, y_fit, n_test)`` (the baseline). ``loader_views``: view -> the loader
    view to read when it differs (O-Align aligns inside the model, from factors). ``order``:
    position in the bench's default runs and table."""

    name: str
    symmetry: Mapping[str, str]
    make: Callable[..., LolModel] | None = None
    fit_predict: Callable[..., Any] | None = None
    loader_views: Mapping[str, str] = field(default_factory=dict)
    order: int = 100
    doc: str = ""

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(self.symmetry)

    @property
    def reads_weights(self) -> bool:
        return self.make is not None

    def loader_view(self, view: str) -> str:
        return self.loader_views.get(view, view)

    def non_invariant(self, view: str) -> bool:
        """Where GL(r) augmentation means something: a weight-reading model that is not
        GL(r)-invariant on this view."""
        return self.reads_weights and self.symmetry[view] != "GL(r)"


#: every LoL model by name: this package's modules, run-time registrations, entry points
MODELS: Registry[LolModelInfo] = Registry(
    "LoL model",
    key="model",
    error=SelectionError,
    packages=(__name__,),
    entry_points="lora_zoo.lol_models",
    hint="a LoL model is one file in lora_zoo/lol/models/ with @register_model",
)


def register_model(
    name: str,
    *,
    symmetry: Mapping[str, str],
    loader_views: Mapping[str, str] | None = None,
    order: int = 100,
    label_only: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator on a factory ``make(specs, out_dim, view, **hp) -> LolModel`` (or, with
    ``label_only``, on a predictor ``fit_predict(task, y_fit, n_test)`` that reads no weights):
    registers ``name`` with the views it reads and its symmetry on each (``LolModelInfo``)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        doc = (fn.__doc__ or "").strip()
        info = LolModelInfo(
            name,
            dict(symmetry),
            make=None if label_only else fn,
            fit_predict=fn if label_only else None,
            loader_views=dict(loader_views or {}),
            order=order,
            doc=doc,
        )
        MODELS.add(name, info, doc=doc.split("\n")[0], views=info.views)
        return fn

    return deco


def model_info(name: str) -> LolModelInfo:
    """The registered model, or a SelectionError suggesting close names."""
    return MODELS.get(name)


def all_models() -> list[LolModelInfo]:
    """Every registered model in default-run order."""
    return sorted((info for _, info in MODELS.items()), key=lambda i: (i.order, i.name))


@register_model(
    "mlp",
    symmetry={
        "factors": "none",
        "dense": "GL(r)",
        "svals": "GL(r)",
        "aligned": "O(r)",
        "canonical": "GL(r)",
    },
    loader_views={"aligned": "factors"},
    order=10,
)
def _make_mlp(specs: Sequence[ModuleSpec], out_dim: int, view: str, **hp: Any) -> LolModel:
    """MLP on a flat view (O-Align for the "aligned" view)."""
    if view == "aligned":
        return OAlignMLP(specs, out_dim, **hp)
    return FlatMLP(specs, out_dim, view=view, **hp)


@register_model("glnet", symmetry={"factors": "GL(r)"}, order=20)
def _make_glnet(specs: Sequence[ModuleSpec], out_dim: int, view: str, **hp: Any) -> LolModel:
    """GL-net: GL-equivariant layers on the factors, invariant products, MLP head."""
    return GLNet(specs, out_dim, **hp)


@register_model("transformer", symmetry={"svals": "GL(r)"}, order=30)
def _make_transformer(specs: Sequence[ModuleSpec], out_dim: int, view: str, **hp: Any) -> LolModel:
    """Transformer over one invariant token per module."""
    return ModuleTransformer(specs, out_dim, **hp)


def loader_view(model: str, view: str) -> str:
    """The loader view a (model, view) pair reads (``LolModelInfo.loader_views``)."""
    return model_info(model).loader_view(view)


def make_model(
    name: str, view: str, specs: Sequence[ModuleSpec], out_dim: int, **hp: Any
) -> LolModel:
    """Build a registered model by name; ``hp`` are its constructor hyperparameters. The
    module's ``invariance`` is the symmetry the model declared for ``view``."""
    info = model_info(name)
    if view not in info.symmetry:
        raise SelectionError(
            f"model {name!r} reads the views {info.views}, not {view!r}", key="view"
        )
    if info.make is None:
        raise SelectionError(f"model {name!r} reads no weights: nothing to build", key="model")
    model = info.make(specs, out_dim, view, **hp)
    model.invariance = info.symmetry[view]
    return model


__all__ = [
    "DENSE_MAX",
    "FlatMLP",
    "GLLinear",
    "GLNet",
    "LolModel",
    "MODELS",
    "LolModelInfo",
    "ModuleSpec",
    "ModuleTransformer",
    "OAlignMLP",
    "gl_gate",
    "loader_view",
    "make_model",
    "model_info",
    "all_models",
    "register_model",
    "mlp",
    "specs_from_batch",
]
