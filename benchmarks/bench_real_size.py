"""Real-size training steps on the CPU: per-step time and peak memory at K = 1 and 2 LoRAs, the
engine (K LoRAs in one batched pass) against PEFT (one adapter on a resident base, K runs one
after another), on the papers' base architectures with random weights:

  qwen2   Qwen2-0.5B (494M parameters, vocab 151,936), LoRA r=4 on q_proj / v_proj, float32,
          2 rows x 64 tokens per LoRA per step
  sd14    SD-1.4's UNet (860M parameters), LoRA r=4 on to_q/to_k/to_v/to_out.0, float32,
          1 latent of 64x64 (512 px) per LoRA per step, 77 text tokens of width 768

Each (architecture, implementation, K) runs in a fresh subprocess so its peak RSS
(``ru_maxrss``) is its own; the table sets it beside the builder's memory estimate
(``cost_model(...).memory.at(K)``, what ``lora-zoo plan --estimate`` and ``build``'s K check use)
for the engine. Correctness at these sizes is tests/builders/test_real_size.py.

Usage::

    python benchmarks/bench_real_size.py                  # both, K = 1, 2 (about 10 min, 2 cores)
    python benchmarks/bench_real_size.py --arch qwen2 --ks 1,2,4 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def _qwen2() -> tuple[torch.nn.Module, list[str]]:
    from lora_zoo.builders.causal_lm.estimate import HUB_ARCHITECTURES
    from lora_zoo.builders.causal_lm.model import build_from_config

    arch, kw = HUB_ARCHITECTURES["Qwen/Qwen2-0.5B"]
    kw = {**kw, "max_position_embeddings": 4096}
    return build_from_config(arch, kw, vocab_size=259, seed=0).eval(), ["q_proj", "v_proj"]


def _sd14() -> tuple[torch.nn.Module, list[str]]:
    from lora_zoo.builders.text_to_image.pipeline import TinyPipeline, tiny_unet

    unet = tiny_unet(TinyPipeline(preset="sd14")).eval()
    return unet, ["to_q", "to_k", "to_v", "to_out.0"]


def _inputs(arch: str, rows: int, g: torch.Generator) -> tuple[dict, torch.Tensor | None]:
    if arch == "qwen2":
        ids = torch.randint(1, 151936, (2 * rows, 64), generator=g)
        return {"input_ids": ids}, ids
    lat = torch.randn(rows, 4, 64, 64, generator=g)
    return {
        "sample": lat,
        "timestep": torch.randint(0, 1000, (rows,), generator=g),
        "encoder_hidden_states": torch.randn(rows, 77, 768, generator=g),
    }, None


def _loss(arch: str, model: torch.nn.Module, inputs: dict, ids: torch.Tensor | None, k: int):
    """Per-LoRA losses (K,), summed by the caller: LM cross-entropy or noise MSE."""
    if arch == "qwen2":
        from lora_zoo.builders.causal_lm.losses import causal_lm_losses

        return causal_lm_losses(model(**inputs).logits, ids, k)
    out = model(**inputs).sample
    return ((out - inputs["sample"]) ** 2).reshape(k, -1).mean(dim=1)


def child(arch: str, impl: str, k: int, steps: int) -> dict:
    """One configuration: build, one warm-up step, ``steps`` timed steps; RSS in GiB."""
    from lora_zoo.engine import LoraSpec, MultiLoraModel, MultiLoraTrainer, TrainHParams

    torch.manual_seed(0)
    model, targets = _qwen2() if arch == "qwen2" else _sd14()
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    g = torch.Generator().manual_seed(1)
    hp = TrainHParams(lr=1e-4, total_steps=steps + 1)
    if impl == "engine":
        mm = MultiLoraModel(model, targets, [LoraSpec(r=4, alpha=8, init_seed=i) for i in range(k)])
        tr = MultiLoraTrainer(mm, [hp] * k)
        runs = [(k, lambda inputs, ids: tr.step(lambda: _loss(arch, model, inputs, ids, k)))]
    else:  # PEFT: one adapter at a time on the resident base, K runs back to back
        from peft import LoraConfig, get_peft_model

        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr)

        def peft_step(inputs: dict, ids: torch.Tensor | None) -> None:
            opt.zero_grad()
            _loss(arch, pm, inputs, ids, 1).sum().backward()
            opt.step()

        runs = [(1, peft_step)] * k
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        for rows, fn in runs:
            fn(*_inputs(arch, rows, g))
        if step:  # the first step is the warm-up (allocator, kernels)
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return {"step_s": sum(times) / len(times), "peak_gib": peak, "base_gib": rss_base}


def estimate_gib(arch: str, k: int) -> float:
    """The builder's own estimate of one batched pass of K LoRAs with this script's rows per
    LoRA (what ``plan --estimate`` prints and ``build`` checks K against), from the paper
    recipe's config, offline."""
    from lora_zoo.build.recipe import load_recipe

    if arch == "qwen2":
        over = ["train.max_seq_len=64", "train.micro_batch_size=2", "base_model.dtype=float32"]
        recipe, rows, kw = load_recipe(REPO / "recipes/arc-qwen2-r4.yaml", over), 2, {"seq_len": 64}
    else:
        over = ["lora.targets=[to_q,to_k,to_v,to_out.0]", "base_model.dtype=float32"]
        recipe, rows, kw = load_recipe(REPO / "recipes/celeba-sd14-r4.yaml", over), 1, {}
    m = recipe.builder_cls.cost_model(recipe.config, **kw).memory
    return type(m)(k, rows, m.base, m.lora_state, m.per_row, m.transient).total / GIB


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="qwen2,sd14")
    ap.add_argument("--ks", default="1,2")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("ARCH", "IMPL", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        arch, impl, k = args.child
        print(json.dumps(child(arch, impl, int(k), args.steps)))
        return
    print(f"# bench_real_size: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"float32, {args.steps} timed steps after 1 warm-up; RSS from ru_maxrss")  # fmt: skip
    print(f"{'arch':<6} {'K':>2} {'engine s/step':>13} {'PEFT s/step':>11} {'PEFT/engine':>11} "
          f"{'engine peak GiB':>15} {'PEFT peak GiB':>13} {'est. GiB':>8}")  # fmt: skip
    for arch in args.arch.split(","):
        for k in (int(x) for x in args.ks.split(",")):
            res = {}
            for impl in ("engine", "peft"):
                cmd = [sys.executable, __file__, "--child", arch, impl, str(k), "--steps",
                       str(args.steps)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
                res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            e, p = res["engine"], res["peft"]
            est = estimate_gib(arch, k)
            print(f"{arch:<6} {k:>2} {e['step_s']:>13.2f} {p['step_s']:>11.2f} "
                  f"{p['step_s'] / e['step_s']:>10.2f}x {e['peak_gib']:>15.2f} "
                  f"{p['peak_gib']:>13.2f} {est:>8.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
