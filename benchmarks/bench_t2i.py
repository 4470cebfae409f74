"""Text-to-image zoo throughput: training LoRAs/hour and CLIP-scoring LoRAs/hour.

Three ways to build the same LoRAs (same data streams, steps, eval prompts):
  (a) paper: a fresh Python process + pipeline per LoRA (PEFT on the UNet), as the paper's scripts;
  (b) resident: one pipeline, PEFT adapter added / trained / scored / deleted per LoRA;
  (c) engine: TextToImageBuilder, K LoRAs per batched step and per denoising loop.
Prints one table (LoRAs/hour, ratio to (a), peak GPU memory on CUDA).

    python benchmarks/bench_t2i.py                                  # CPU, tiny pipeline
    python benchmarks/bench_t2i.py --device cuda --unet sd14-config # SD-1.4-sized, random weights

This is a script, not a test: numbers depend on the machine (and on what else runs on it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from lora_zoo.build.api import JobSpec
from lora_zoo.builders.text_to_image import Config, TextToImageBuilder
from lora_zoo.builders.text_to_image.eval import generate_grouped
from lora_zoo.builders.text_to_image.pipeline import make_sampler, training_scheduler
from lora_zoo.builders.text_to_image.train import LoraStream, autocast_ctx, diffusion_target

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_config(args, cache: str) -> Config:
    sd14 = args.unet == "sd14-config"
    res = 512 if sd14 else args.resolution
    base = {"kind": "config", "preset": "sd14" if sd14 else "tiny", "resolution": res}
    if not sd14:
        base.update(
            unet_channels=[32, 64], vae_channels=[32, 64], cross_attention_dim=32, text_hidden=32
        )
    clip = (
        {"kind": "config", "seed": 3, "hidden": 768, "image_size": 224, "patch_size": 16}
        if sd14
        else {"kind": "config", "seed": 3, "hidden": 32, "image_size": 32, "patch_size": 8}
    )
    return Config.model_validate(
        {
            "base_model": base,
            "lora": {"r": args.rank, "alpha": args.rank, "targets": TARGETS},
            "data": {
                "kind": "sample_images",
                "resolution": res,
                "root": os.path.join(cache, "img"),
            },
            "train": {"steps": args.steps, "lr": 1e-4, "batch_size": 1, "mixed_precision": "bf16"},
            "eval": {
                "prompts": ["a photo of {prompt}", "a {prompt} on a table"][: args.prompts],
                "steps": args.eval_steps,
                "guidance": 7.5,
                "seed": 42,
                "clip": clip,
            },
        }
    )


def jobs(n: int, offset: int = 0) -> list[JobSpec]:
    groups = ["animal", "object", "people", "scene", "texture", "microscopy"]
    out = []
    for i in range(offset, offset + n):
        seeds = {
            s: 100 * i + j
            for j, s in enumerate(("init", "data", "dropout", "noise", "timestep", "eval"))
        }
        out.append(
            JobSpec(i, f"b{i}", seeds, {"prompt": "sks"}, {"groups_included": [groups[i % 6]]})
        )
    return out


def peft_one(b: TextToImageBuilder, job: JobSpec, device: str) -> tuple[float, float]:
    """Train + score ONE LoRA with a PEFT adapter on the resident UNet; (train_s, eval_s)."""
    from peft import LoraConfig

    pipe, cfg = b.pipe, b.config
    unet = pipe.unet
    t0 = time.perf_counter()
    unet.add_adapter(
        LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=TARGETS),
        adapter_name="bench",
    )
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    sched = training_scheduler(pipe)
    items = b.index.select(job.data["groups_included"], size=None, seed=job.seeds["data"])
    stats = b.latents.get(pipe, b.index, items, cfg.data.resolution, True)
    stream = LoraStream(
        stats,
        seeds=dict(job.seeds),
        scaling_factor=pipe.vae.config.scaling_factor,
        num_train_timesteps=sched.config.num_train_timesteps,
    )
    from lora_zoo.builders.text_to_image.eval import encode_prompts

    text = encode_prompts(pipe, ["sks"])
    for _ in range(cfg.train.steps):
        lat, noise, t = (x.to(device) for x in stream.next(1))
        with autocast_ctx(device, "bf16"):
            pred = unet(
                sched.add_noise(lat, noise, t).to(unet.dtype), t, encoder_hidden_states=text
            ).sample
        loss = torch.nn.functional.mse_loss(pred.float(), diffusion_target(sched, lat, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    _sync(device)
    t1 = time.perf_counter()
    ev = cfg.eval
    prompts = [p.replace("{prompt}", "sks") for p in ev.prompts]
    with torch.no_grad(), autocast_ctx(device, "bf16"):
        imgs = generate_grouped(
            pipe,
            [prompts],
            sampler=make_sampler(pipe, ev.sampler),
            steps=ev.steps,
            guidance=ev.guidance,
            seed=ev.seed,
            resolution=cfg.data.resolution,
        )
    b.clip.score(imgs[0], prompts)
    _sync(device)
    t2 = time.perf_counter()
    unet.delete_adapters("bench")
    return t1 - t0, t2 - t1


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def worker(args) -> None:
    """(a): one fresh process = one LoRA; prints JSON timings."""
    t0 = time.perf_counter()
    b = TextToImageBuilder(make_config(args, args.cache), device=args.device, cache_dir=args.cache)
    b.pipe, b.index, b.clip  # noqa: B018 - load everything, as a per-LoRA script would
    _sync(args.device)
    load = time.perf_counter() - t0
    tr, ev = peft_one(b, jobs(1, args.worker_index)[0], args.device)
    print(json.dumps({"load": load, "train": tr, "eval": ev, "peak_gib": _peak()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--unet", choices=["tiny", "sd14-config"], default="tiny")
    ap.add_argument("--ks", default="1,4,8,16")
    ap.add_argument("--steps", type=int, default=10, help="training steps per LoRA")
    ap.add_argument("--eval-steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--paper-loras", type=int, default=2, help="LoRAs for mode (a)")
    ap.add_argument("--resident-loras", type=int, default=4, help="LoRAs for mode (b)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lora_zoo_bench_t2i"))
    ap.add_argument("--worker-index", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_index >= 0:
        return worker(args)
    rows = []  # (mode, K, train LoRAs/h, score LoRAs/h, peak GiB)

    # (a) fresh process per LoRA: wall time of the whole process counts (imports, build, load)
    ta, ea, peak = 0.0, 0.0, float("nan")
    for i in range(args.paper_loras):
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker-index", str(i)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        wall = time.perf_counter() - t0
        r = json.loads(out.strip().splitlines()[-1])
        startup = wall - r["load"] - r["train"] - r["eval"]  # interpreter + imports
        ta += startup + r["load"] + r["train"]
        ea += startup + r["load"] + r["eval"]  # the paper scores in a second per-LoRA script
        peak = r["peak_gib"]
    rows.append(
        (
            "(a) paper: process+pipeline per LoRA",
            1,
            args.paper_loras / ta,
            args.paper_loras / ea,
            peak,
        )
    )

    b = TextToImageBuilder(make_config(args, args.cache), device=args.device, cache_dir=args.cache)
    b.pipe, b.index, b.clip  # noqa: B018 - resident from here on
    peft_one(b, jobs(1, 999)[0], args.device)  # warm-up (kernels, latent cache)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tb = eb = 0.0
    for j in jobs(args.resident_loras):
        tr, ev = peft_one(b, j, args.device)
        tb, eb = tb + tr, eb + ev
    rows.append(
        (
            "(b) resident pipeline, PEFT one at a time",
            1,
            args.resident_loras / tb,
            args.resident_loras / eb,
            _peak(),
        )
    )

    # (c) engine: K LoRAs per batched step / denoising loop, on a fresh resident pipeline
    # (PEFT leaves its layer wrappers in the UNet even after delete_adapters)
    del b
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    b = TextToImageBuilder(make_config(args, args.cache), device=args.device, cache_dir=args.cache)
    b.config.eval.enabled = False
    for k in [int(x) for x in args.ks.split(",")]:
        b.train(jobs(k, 500))  # warm-up at this K (wrappers, kernels, latents)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        js = jobs(k, 1000 * k)
        hps = [b._hp(j) for j in js]
        _sync(args.device)
        t0 = time.perf_counter()
        b.train(js)
        _sync(args.device)
        t1 = time.perf_counter()
        b.evaluate(hps)  # autocast bf16 on CUDA inside
        _sync(args.device)
        t2 = time.perf_counter()
        rows.append((f"(c) engine, K={k}", k, k / (t1 - t0), k / (t2 - t1), _peak()))

    base_t, base_e = rows[0][2], rows[0][3]
    print(
        f"\ntext-to-image zoo throughput | device={args.device} unet={args.unet} "
        f"steps/LoRA={args.steps} eval={args.prompts} prompts x {args.eval_steps} steps "
        f"rank={args.rank} threads={torch.get_num_threads()}"
    )
    print(
        f"{'mode':44s} {'K':>3s} {'train LoRAs/h':>14s} {'x(a)':>6s} {'score LoRAs/h':>14s} "
        f"{'x(a)':>6s} {'peak GiB':>9s}"
    )
    for name, k, t, e, pk in rows:
        print(
            f"{name:44s} {k:3d} {3600 * t:14.0f} {t / base_t:6.1f} {3600 * e:14.0f} "
            f"{e / base_e:6.1f} {pk:9.2f}"
        )


if __name__ == "__main__":
    main()
