"""DreamBooth-style UNet LoRA training of K LoRAs per batched step on the shared engine.

Why per-LoRA input streams: a LoRA's training inputs (image order, VAE latent sample, noise,
timesteps) are drawn from ITS OWN generators seeded from ``JobSpec.seeds`` (``data``, ``noise``,
``timestep``), so the LoRA does not depend on which other LoRAs share its chunk, on K, or on the
device; a plain PEFT run fed the same stream must land on the same weights (tests check this).

Gradient accumulation: LoRA k with ``grad_accum = a_k`` and ``batch_size = b_k`` consumes
``a_k * b_k`` samples per optimizer step. Its loss is the mean noise-prediction MSE over those
samples, which is exactly the gradient of ``a_k`` accumulated micro-batches of ``b_k`` each scaled
by ``1/a_k`` (the diffusers DreamBooth loop), so one batched step holds each LoRA's whole
accumulation window: rows ``(K, R)`` with ``R = max_k a_k b_k``; LoRAs with fewer rows are padded
with zero-weight rows (the engine wrapper needs equal rows per LoRA).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_zoo.seeding import sub_seed

log = logging.getLogger(__name__)


class LatentCache:
    """VAE latent distributions (mean, std) per image id, LRU-bounded.

    Encoding is the costliest data step and the same identity / class images recur across
    many LoRAs, so each image is encoded once per worker; the sample ``mean + std * eps`` is
    drawn per step from the LoRA's noise stream (as DreamBooth's ``latent_dist.sample()``).
    """

    def __init__(self, max_items: int = 4096) -> None:
        self.max_items = max_items
        self._d: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    @torch.no_grad()
    def get(self, pipe, index, items, resolution: int, center_crop: bool, chunk: int = 8):
        """[(mean, std) each (C, h, w) float32 on CPU] for ``items`` in order."""
        todo = [it for it in items if it.image_id not in self._d]
        vae = pipe.vae
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            x = torch.stack([index.load(it, resolution, center_crop) for it in part])  # (n,3,H,W)
            dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
            for it, m, s in zip(part, dist.mean.float().cpu(), dist.std.float().cpu()):
                self._d[it.image_id] = (m, s)
        out = []
        for it in items:
            self._d.move_to_end(it.image_id)
            out.append(self._d[it.image_id])
        while len(self._d) > self.max_items:
            self._d.popitem(last=False)
        return out


class LoraStream:
    """The infinite, seeded sequence of training samples of ONE LoRA.

    ``next(n)`` -> latents (n, C, h, w) (already scaled by the VAE scaling factor), noise
    (n, C, h, w), timesteps (n,) long. Image order: a fresh permutation per epoch.
    """

    def __init__(
        self,
        stats: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        seeds: dict[str, int],
        scaling_factor: float,
        num_train_timesteps: int,
    ) -> None:
        self.stats = list(stats)
        self.scaling = float(scaling_factor)
        self.T = int(num_train_timesteps)
        self.g_data = torch.Generator().manual_seed(sub_seed(int(seeds["data"]), "order"))
        self.g_noise = torch.Generator().manual_seed(int(seeds["noise"]))
        self.g_time = torch.Generator().manual_seed(int(seeds["timestep"]))
        self._order: list[int] = []
        self.seen: list[int] = []  # image positions in the order they were used

    def _next_index(self) -> int:
        if not self._order:
            self._order = torch.randperm(len(self.stats), generator=self.g_data).tolist()
        return self._order.pop(0)

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n samples, drawn one at a time so the stream does not depend on how it is chunked
        (``next(2)`` == ``next(1); next(1)``: grad-accumulation micro-batches see the same data)."""
        lat, noi, ts = [], [], []
        for _ in range(n):
            i = self._next_index()
            self.seen.append(i)
            mean, std = self.stats[i]  # (C, h, w) each
            eps = torch.randn(mean.shape, generator=self.g_noise)
            lat.append((mean + std * eps) * self.scaling)
            noi.append(torch.randn(mean.shape, generator=self.g_noise))
            ts.append(torch.randint(0, self.T, (1,), generator=self.g_time))
        return torch.stack(lat), torch.stack(noi), torch.cat(ts)  # (n,C,h,w), (n,C,h,w), (n,)


@dataclass
class StepPlan:
    """Per-LoRA constants of one batched run."""

    rows: int  # samples per optimizer step = grad_accum * batch_size
    steps: int
    text: torch.Tensor  # (1, T, D) instance-prompt embedding


def diffusion_target(sched, latents, noise, t):
    """Noise (epsilon) or velocity target, per the scheduler's prediction_type."""
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return sched.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def autocast_ctx(device: str, mixed_precision: str):
    """bf16/fp16 autocast on CUDA (LoRA factors and optimizer state stay float32)."""
    if not str(device).startswith("cuda") or mixed_precision == "no":
        return contextlib.nullcontext()
    dt = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dt)


def train_batched(
    pipe,
    trainer,
    streams: Sequence[LoraStream],
    plans: Sequence[StepPlan],
    sched,
    *,
    device: str = "cpu",
    mixed_precision: str = "bf16",
    progress: bool = False,
) -> None:
    """Run the engine's trainer until every LoRA has done its steps (or failed).

    One iteration = one optimizer step for every still-active LoRA; finished/failed LoRAs
    get zero-weight padding rows (the engine keeps them frozen).
    """
    from lora_zoo.progress import track

    K = len(streams)
    R = max(p.rows for p in plans)
    unet = pipe.unet
    total = max(p.steps for p in plans)
    for _ in track(range(total), desc=f"train K={K}", unit="step", nested=True, enabled=progress):
        active = trainer.active.tolist()
        if not any(active):
            break
        lat, noi, ts, emb, w = [], [], [], [], torch.zeros(K, R)
        for k in range(K):
            p = plans[k]
            if active[k]:
                a, n, t = streams[k].next(p.rows)
                w[k, : p.rows] = 1.0 / p.rows
            else:  # frozen LoRA: padding rows, zero weight
                a = n = torch.zeros((0, *streams[k].stats[0][0].shape))
                t = torch.zeros(0, dtype=torch.long)
            pad = R - a.shape[0]
            if pad:
                a = torch.cat([a, torch.zeros((pad, *a.shape[1:]))])
                n = torch.cat([n, torch.zeros((pad, *n.shape[1:]))])
                t = torch.cat([t, torch.zeros(pad, dtype=torch.long)])
            lat.append(a)
            noi.append(n)
            ts.append(t)
            emb.append(p.text.expand(R, *p.text.shape[1:]))
        latents = torch.cat(lat).to(device)  # (K*R, C, h, w)
        noise = torch.cat(noi).to(device)
        t = torch.cat(ts).to(device)  # (K*R,)
        text = torch.cat(emb).to(device, unet.dtype)  # (K*R, T, D)
        w = w.to(device)
        noisy = sched.add_noise(latents, noise, t)
        target = diffusion_target(sched, latents, noise, t)

        def closure(noisy=noisy, t=t, text=text, target=target, w=w):
            with autocast_ctx(device, mixed_precision):
                pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=text).sample
            per_row = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))  # (K*R,)
            return (per_row.view(K, R) * w).sum(dim=1)  # (K,) mean over each LoRA's rows

        trainer.step(closure)
