"""The view registry: what a loader hands a LoL model for each LoRA module.

A view is a pure function of one module's factors ``U (..., n, r)``, ``V (..., m, r)`` (with
ΔW = U V^T) plus a small context (module name, LoRA indices, seed, template). It returns a dict
of tensors keyed by role, so ``collate_loras`` knows how to batch them:

- ``"U"`` (..., n, r), ``"V"`` (..., m, r), ``"S"`` (..., r): have a rank axis (last), which
  collate zero-pads to the batch's max rank and masks;
- ``"W"`` (..., n, m): the dense ΔW, stacked as is.

Adding a view is one new file in this folder, ``lora_zoo/load/views/<name>.py``, holding one
decorated function (pure math goes in ``symmetry.py``), plus an invariance / equivariance
property test in ``tests/unit/load/``::

    from lora_zoo.load.views import register_view

    @register_view("gram")
    def gram_view(u, v, ctx):
        return {"S": ...}

The registry (``VIEWS``, a ``lora_zoo.registry.Registry``) imports the folder's modules on the
first lookup, and a distribution can add views under the entry-point group ``lora_zoo.views``.

Views accept leading batch dims so the streaming loader can run one batched LAPACK call per
module for a whole record batch; ``ctx.indices`` then holds one LoRA index per batch row.

Device: a view computes where its input factors are (the datasets' ``device=`` moves them
first), so QR / SVD / GEMMs run on the GPU when asked; random draws (``gl_augment``) stay on
the CPU generator so R is the same on every device. No view touches torch's global thread
count: the CPU math runs under ``threads.single_threaded``, which only changes the calling
thread's OpenMP setting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_zoo.errors import SelectionError
from lora_zoo.load import symmetry
from lora_zoo.registry import Registry
from lora_zoo.seeding import augment_seed

logger = logging.getLogger(__name__)

RANK_KEYS = frozenset({"U", "V", "S"})  # outputs whose last axis is the LoRA rank
ViewFn = Callable[[torch.Tensor, torch.Tensor, "ViewContext"], dict[str, torch.Tensor]]
# many modules at once: (U per module, V per module, ctx per module) -> one result per module
ManyFn = Callable[
    [Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence["ViewContext"]],
    list[dict[str, torch.Tensor]],
]


@dataclass(frozen=True)
class ViewContext:
    """Everything a view may depend on besides the factors.

    ``indices``: the LoRAs' row indices in the split (one per batch row; used to seed
    ``gl_augment``). ``template``: the template module's (U_t, V_t) for ``aligned``.
    ``dtype``: requested output dtype (None = keep the stored dtype).
    """

    module: str = ""
    indices: tuple[int, ...] = ()
    seed: int = 0
    epoch: int = 0
    dtype: torch.dtype | None = None
    template: tuple[torch.Tensor, torch.Tensor] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ViewSpec:
    """A registered view. ``many``: optional version over every module of a batch at once
    (one result per module, each equal to ``fn`` on that module alone); the datasets use it."""

    name: str
    fn: ViewFn
    needs_template: bool = False
    doc: str = ""
    many: ManyFn | None = None


#: every view by name: this package's modules, run-time registrations, entry points
VIEWS: Registry[ViewSpec] = Registry(
    "view",
    key="view",
    error=SelectionError,
    packages=(__name__,),
    entry_points="lora_zoo.views",
    hint="a view is one file in lora_zoo/load/views/ with @register_view",
)


def register_view(
    name: str, *, needs_template: bool = False, many: ManyFn | None = None
) -> Callable[[ViewFn], ViewFn]:
    """Decorator: register ``fn(u, v, ctx) -> dict`` under ``name`` (one name, one function);
    ``many``: see ``ViewSpec``."""

    def deco(fn: ViewFn) -> ViewFn:
        doc = (fn.__doc__ or "").strip()
        VIEWS.add(name, ViewSpec(name, fn, needs_template, doc, many), doc=doc.split("\n")[0])
        return fn

    return deco


def get_view(name: str) -> ViewSpec:
    """The registered view, or a ``SelectionError`` that suggests close names and lists all."""
    return VIEWS.get(name)


def available_views() -> list[str]:
    return VIEWS.names()


def _out(x: torch.Tensor, ctx: ViewContext, stored: torch.dtype) -> torch.Tensor:
    return x.to(ctx.dtype or stored)


# ---- the built-in views ----------------------------------------------------------------------
@register_view("factors")
def factors_view(u: torch.Tensor, v: torch.Tensor, ctx: ViewContext) -> dict[str, torch.Tensor]:
    """Raw (U, V) as stored (scale folded in by the loader if asked). GL(r)-equivariant:
    (U R, V R^-T) in, (U R, V R^-T) out."""
    return {"U": _out(u, ctx, u.dtype), "V": _out(v, ctx, v.dtype)}


@register_view("dense")
def dense_view(u: torch.Tensor, v: torch.Tensor, ctx: ViewContext) -> dict[str, torch.Tensor]:
    """ΔW = U V^T (..., n, m). Opt-in: n*m per module is 100-1000x the factors' size."""
    return {"W": symmetry.dense(u, v, out_dtype=ctx.dtype or u.dtype)}


def _svals_many(
    us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], ctxs: Sequence[ViewContext]
) -> list[dict[str, torch.Tensor]]:
    """``svals`` of every module of a batch: the r x r SVDs of all modules in one call."""
    ods = [c.dtype or u.dtype for u, c in zip(us, ctxs)]
    return [{"S": s} for s in symmetry.svals_many(list(zip(us, vs)), out_dtype=ods)]


@register_view("svals", many=_svals_many)
def svals_view(u: torch.Tensor, v: torch.Tensor, ctx: ViewContext) -> dict[str, torch.Tensor]:
    """Singular values of ΔW (..., r), from QR + r x r SVD (no dense SVD). GL(r)-invariant."""
    return {"S": symmetry.svals(u, v, out_dtype=ctx.dtype or u.dtype)}


@register_view("canonical")
def canonical_view(u: torch.Tensor, v: torch.Tensor, ctx: ViewContext) -> dict[str, torch.Tensor]:
    """Balanced-SVD canonical factors with a sign rule; see ``symmetry.canonical`` for what is
    invariant (repeated singular values: only up to O(d) in the block; zero ones: zero columns)."""
    uc, vc = symmetry.canonical(u, v, out_dtype=ctx.dtype or u.dtype)
    return {"U": uc, "V": vc}


@register_view("aligned", needs_template=True)
def aligned_view(u: torch.Tensor, v: torch.Tensor, ctx: ViewContext) -> dict[str, torch.Tensor]:
    """Factors rotated by the orthogonal Q that best maps them onto a template LoRA's factors
    (joint Procrustes). Only O(r)-invariant; ranks are zero-padded to the larger of the two."""
    if ctx.template is None:
        raise SelectionError("view 'aligned' needs a template (template_id=...)", key=ctx.module)
    u_t, v_t = ctx.template  # (n, r_t), (m, r_t)
    u_t, v_t = u_t.to(u.device), v_t.to(u.device)
    if u_t.shape[-2] != u.shape[-2] or v_t.shape[-2] != v.shape[-2]:
        raise SelectionError(
            f"template module has shape U {tuple(u_t.shape)}, V {tuple(v_t.shape)}; this LoRA "
            f"has U {tuple(u.shape)}, V {tuple(v.shape)}",
            key=ctx.module,
        )
    r = max(u.shape[-1], u_t.shape[-1])
    u, v = symmetry.pad_rank(u, r), symmetry.pad_rank(v, r)
    u_t, v_t = symmetry.pad_rank(u_t, r), symmetry.pad_rank(v_t, r)
    ua, va = symmetry.align(u, v, u_t, v_t, out_dtype=ctx.dtype or u.dtype)
    return {"U": ua, "V": va}


@register_view("gl_augment")
def gl_augment_view(u: torch.Tensor, v: torch.Tensor, ctx: ViewContext) -> dict[str, torch.Tensor]:
    """(U R, V R^-T) with a seeded random R per (seed, epoch, LoRA index, module):
    R = Q1 diag(exp(t)) Q2, t ~ U(-a, a), so cond(R) <= exp(2a) (``options['log_cond']``,
    default 2.0 -> cond <= e^2 ~ 7.4). A data augmentation for models that read raw factors."""
    log_cond = float(ctx.options.get("log_cond", 2.0))
    r = u.shape[-1]
    batched = u.dim() == 3
    idx: Sequence[int] = ctx.indices if batched else ctx.indices[:1]
    if len(idx) != (u.shape[0] if batched else 1):
        raise ValueError(f"gl_augment needs one LoRA index per batch row, got {len(idx)}")
    rs, rits = [], []
    for i in idx:
        g = torch.Generator().manual_seed(augment_seed(ctx.seed, ctx.epoch, int(i), ctx.module))
        rm, rit = symmetry.random_gl(r, generator=g, log_cond=log_cond)
        rs.append(rm)
        rits.append(rit)
    r_mat = torch.stack(rs) if batched else rs[0]  # (b, r, r) or (r, r)
    r_inv_t = torch.stack(rits) if batched else rits[0]
    # drawn on the CPU (the same R on any device), applied where the factors are
    r_mat, r_inv_t = r_mat.to(u.device), r_inv_t.to(u.device)
    ua, va = symmetry.apply_gl(u, v, r_mat, r_inv_t)
    return {"U": _out(ua, ctx, u.dtype), "V": _out(va, ctx, v.dtype)}


def apply_view(
    name: str, u: torch.Tensor, v: torch.Tensor, ctx: ViewContext
) -> dict[str, torch.Tensor]:
    """Look up and run a view (one place for the call convention)."""
    return get_view(name).fn(u, v, ctx)


def apply_view_many(
    name: str,
    us: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    ctxs: Sequence[ViewContext],
) -> list[dict[str, torch.Tensor]]:
    """A view over many modules: its ``many`` version where it has one, else module by
    module."""
    spec = get_view(name)
    if spec.many is not None:
        return spec.many(us, vs, ctxs)
    return [spec.fn(u, v, c) for u, v, c in zip(us, vs, ctxs)]
