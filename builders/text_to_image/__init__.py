"""Text-to-image builder: Stable Diffusion UNet LoRAs, one identity / class subset per LoRA.

Mirrors the paper's SD zoos (arXiv 2410.04207): DreamBooth-style LoRAs on the UNet attention
projections, each trained on the images of its group(s) with an instance prompt, labelled with
attributes aggregated over its images, its group membership and CLIP scores of generated images.

What is shared across LoRAs and why: the base pipeline (loaded once per worker), the image index
and the VAE latent cache, and the engine wrappers injected once into the UNet. Each ``train``
call re-points the wrappers to the chunk's K fresh LoRAs, trains them in one batched loop,
generates the eval images for all K in one denoising loop, scores them, and extracts records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from lora_zoo.build.api import CostModel, JobSpec, TrainedLora, resolve_hparams
from lora_zoo.errors import BuildError

from .config import HPARAM_KEYS, Config
from .data import aggregate_attributes, build_index, read_attribute_table
from .eval import ClipScorer, generate_grouped
from .pipeline import TinyPipeline, load_pipeline, make_sampler, training_scheduler
from .train import LatentCache, LoraStream, StepPlan, autocast_ctx, train_batched

log = logging.getLogger(__name__)


class TextToImageBuilder:
    """Builder protocol implementation (entry point ``text_to_image``)."""

    NAME: ClassVar[str] = "text_to_image"
    # 2: hp.* / seed.* once (was also hparams.* / seeds.*); 3: subset draws by
    # stable_permutation (was numpy's Generator.choice); 4: clip_score clamps the mean, as
    # torchmetrics does (was the mean of per-image clamped scores); 5: data order, VAE and text
    # encoder init from named sub-streams (lora_zoo.seeding.sub_seed; was seed + 1 / + 2)
    VERSION: ClassVar[str] = "5"
    Config: ClassVar[type[BaseModel]] = Config

    def __init__(self, config: BaseModel, *, device: str = "cpu", cache_dir: str | None = None):
        self.config: Config = (
            config
            if isinstance(config, Config)
            else Config.model_validate(
                config.model_dump() if isinstance(config, BaseModel) else config
            )
        )
        self.device = device
        self.cache_dir = cache_dir
        self._pipe = None
        self._index = None
        self._attrs: dict[str, dict[str, float]] | None = None
        self._mm = None
        self._clip: ClipScorer | None = None
        # facts about a base trained further (pretrain.py), in every LoRA's metadata; empty for
        # a base used as built, so those zoos' rows are what they always were
        self.base_info: dict[str, Any] = {}
        self.latents = LatentCache(self.config.builder_args.latent_cache_size)

    # ---- resident state (loaded once per worker) ---------------------------------------------
    @property
    def pipe(self):
        if self._pipe is None:
            bm = self.config.base_model
            pipe = load_pipeline(bm, device=self.device, cache_dir=self.cache_dir)
            if isinstance(bm, TinyPipeline) and bm.pretrain_steps > 0:
                from .pretrain import pretrain_base

                self.base_info = pretrain_base(
                    pipe, bm, self.index, self.config.data, cache_dir=self.cache_dir
                )
            self._pipe = pipe
        return self._pipe

    @property
    def index(self):
        if self._index is None:
            self._index = build_index(self.config.data, self.cache_dir)
        return self._index

    @property
    def clip(self) -> ClipScorer:
        if self._clip is None:
            self._clip = ClipScorer(
                self.config.eval.clip, device=self.device, cache_dir=self.cache_dir
            )
        return self._clip

    @classmethod
    def cost_model(cls, config: BaseModel, **kw: Any) -> CostModel:
        """FLOPs and memory per LoRA from the config alone (``estimate.py``)."""
        from .estimate import cost_model

        cfg = config if isinstance(config, Config) else Config.model_validate(config)
        return cost_model(cfg, **kw)

    @classmethod
    def list_groups(cls, config: BaseModel) -> list[str]:
        cfg = config if isinstance(config, Config) else Config.model_validate(config)
        return build_index(cfg.data).groups

    # ---- per-job resolution --------------------------------------------------------------------
    def _hp(self, job: JobSpec) -> dict[str, Any]:
        """Recipe defaults overridden by the job's resolved hparams (``resolve_hparams``)."""
        t, lo = self.config.train, self.config.lora
        defaults: dict[str, Any] = dict(
            lr=t.lr,
            steps=t.steps,
            grad_accum=t.grad_accum,
            batch_size=t.batch_size,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            prompt=job.extra.get("prompt", t.prompt),  # a varied extra outside hparams
            r=lo.r,
            alpha=lo.alpha,
            dropout=lo.dropout,
            num_images=None,
            warmup_steps=t.warmup_steps,
        )
        assert set(defaults) == HPARAM_KEYS
        return resolve_hparams(
            job,
            defaults,
            builder=self.NAME,
            positive_ints=("steps", "grad_accum", "batch_size", "r"),
        )

    def _groups(self, job: JobSpec) -> list[str]:
        g = job.data.get("groups_included")
        if not g:
            raise BuildError(
                "job has no data.groups_included (recipe subset.groups missing?)",
                key=f"{job.lora_id}.data.groups_included",
            )
        return [str(x) for x in g]

    # ---- the batched pass ------------------------------------------------------------------------
    def train(self, jobs: Sequence[JobSpec]) -> list[TrainedLora]:
        from lora_zoo.engine import LoraSpec, MultiLoraModel, MultiLoraTrainer, TrainHParams

        if not jobs:
            return []
        t0 = time.perf_counter()
        cfg, pipe = self.config, self.pipe
        hps = [self._hp(j) for j in jobs]
        seeds = [_seeds(j) for j in jobs]
        specs = [
            LoraSpec(
                r=hp["r"],
                alpha=float(hp["alpha"]),
                dropout=float(hp["dropout"]),
                init_seed=sd["init"],
                dropout_seed=sd.get("dropout", 0),
                use_rslora=cfg.lora.use_rslora,
            )
            for sd, hp in zip(seeds, hps)
        ]
        if self._mm is None:
            self._mm = MultiLoraModel(pipe.unet, cfg.lora.targets, specs)
        else:
            self._mm.reset(specs)
        mm = self._mm
        sched = training_scheduler(pipe)
        selections, streams, plans = self._data_plans(jobs, hps, seeds, sched)
        thp = [
            TrainHParams(
                lr=float(hp["lr"]),
                weight_decay=float(hp["weight_decay"]),
                betas=tuple(cfg.train.betas),
                eps=cfg.train.eps,
                max_grad_norm=float(hp["max_grad_norm"]),
                total_steps=hp["steps"],
                warmup_steps=int(hp["warmup_steps"]),
                schedule=cfg.train.lr_schedule,
            )
            for hp in hps
        ]
        trainer = MultiLoraTrainer(mm, thp)
        mm.train()
        train_batched(
            pipe,
            trainer,
            streams,
            plans,
            sched,
            device=self.device,
            mixed_precision=cfg.train.mixed_precision,
            progress=cfg.builder_args.progress,
        )
        mm.eval()
        t_train = time.perf_counter() - t0
        scores, eval_cfg = self.evaluate(hps) if cfg.eval.enabled else ([{} for _ in jobs], None)
        records = mm.extract(
            [j.lora_id for j in jobs], base_model_name=_base_name(cfg, self.base_info)
        )
        out = []
        for k, (j, hp, items) in enumerate(zip(jobs, hps, selections)):
            out.append(self._result(k, j, hp, items, records[k], scores[k], trainer))
            if eval_cfg is not None:
                out[-1].metadata["clip_eval"] = eval_cfg
        wall = time.perf_counter() - t0
        for r in out:
            r.wall_time_s = wall / len(out)
        log.info("t2i chunk of %d: train %.1fs, total %.1fs", len(jobs), t_train, wall)
        return out

    def _data_plans(self, jobs, hps, seeds, sched) -> tuple[list, list, list]:
        """Per job: the images it trains on (drawn with its data seed), its latent stream and its
        step plan (rows per step, steps, the encoded instance prompt)."""
        pipe, index, data = self.pipe, self.index, self.config.data
        selections, streams, plans = [], [], []
        for j, hp, sd in zip(jobs, hps, seeds):
            items = index.select(
                self._groups(j), size=hp["num_images"] or j.data.get("subset_size"), seed=sd["data"]
            )
            selections.append(items)
            stats = self.latents.get(pipe, index, items, data.resolution, data.center_crop)
            streams.append(
                LoraStream(
                    stats,
                    seeds=sd,
                    scaling_factor=pipe.vae.config.scaling_factor,
                    num_train_timesteps=sched.config.num_train_timesteps,
                )
            )
            text = _encode(pipe, [hp["prompt"]])  # (1, T, D)
            plans.append(
                StepPlan(rows=hp["grad_accum"] * hp["batch_size"], steps=hp["steps"], text=text)
            )
        return selections, streams, plans

    def _result(self, k, job, hp, items, record, score, trainer) -> TrainedLora:
        cfg = self.config
        groups = self._groups(job)
        meta: dict[str, Any] = {
            "prompt": hp["prompt"],
            "groups_included": groups,
            "train_example_ids": [it.image_id for it in items],
            "train_example_sha256": [self.index.sha256(it) for it in items],
            "hp": {k2: v for k2, v in hp.items() if v is not None},  # all of them (-> hp.*)
            "resolution": cfg.data.resolution,
            "num_images": len(items),
            "steps_done": int(trainer.steps_done[k]),
            **self.base_info,
        }
        scores = dict(score)
        meta["final_train_loss"] = float(trainer.last_loss[k])  # NaN if it never stepped
        if cfg.builder_args.membership_bits:
            scores["membership"] = [int(g in groups) for g in self.index.groups]
        if cfg.builder_args.in_group_columns:
            scores["in_group"] = {g: g in groups for g in self.index.groups}
        if cfg.data.attributes is not None:
            a = cfg.data.attributes
            if self._attrs is None:
                self._attrs = read_attribute_table(a, self.index)
            labels, frac = aggregate_attributes(
                self._attrs, meta["train_example_ids"], a.columns, file=a.path or self.index.source
            )
            scores["attributes"] = labels
            scores["attribute_fraction"] = frac
            meta["attribute_rule"] = (
                f"{a.rule} vote over the LoRA's {len(items)} training images;"
                " value > 0 is positive; tie -> False"
            )
        failed = trainer.failed_step[k]
        if failed is not None:
            return TrainedLora(
                job,
                None,
                meta,
                scores,
                status="failed",
                failed_step=int(failed),
                error=f"loss became non-finite at step {failed}",
            )
        return TrainedLora(job, record, meta, scores)

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate(self, hps) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Generate with the K LoRAs currently in the UNet wrappers (``hps[k]`` = LoRA k's
        resolved hparams, for its prompt) in one denoising loop, then CLIP-score every image.
        Returns per-LoRA scores and the evaluation config to store next to them."""
        ev, pipe = self.config.eval, self.pipe
        res = ev.resolution or self.config.data.resolution
        prompts = [[p.replace("{prompt}", hp["prompt"]) for p in ev.prompts] for hp in hps]
        with autocast_ctx(self.device, self.config.train.mixed_precision):
            images = generate_grouped(
                pipe,
                prompts,
                sampler=make_sampler(pipe, ev.sampler),
                steps=ev.steps,
                guidance=ev.guidance,
                seed=ev.seed,
                resolution=res,
            )  # (K, P, 3, H, W)
        sim = self.clip.similarity(images.flatten(0, 1), [s for lst in prompts for s in lst])
        sim = sim.view(len(hps), len(ev.prompts))  # (K, P) 100 * cos, unclamped
        cfg_rec = {
            "prompts": list(ev.prompts),
            "sampler": ev.sampler,
            "steps": ev.steps,
            "guidance": ev.guidance,
            "seed": ev.seed,
            "resolution": res,
            "clip_model": self.clip.model_id,
        }
        # torchmetrics' clip_score: a LoRA's score is the clamped mean over its images, each
        # prompt's the clamped score of its one image (ClipScorer's docstring)
        scores = [
            {
                "clip_score": float(ClipScorer.set_score(row)),
                "clip_score_per_prompt": row.clamp(min=0).tolist(),
            }
            for row in sim
        ]
        return scores, cfg_rec


def _seeds(job: JobSpec) -> dict[str, int]:
    missing = [s for s in ("init", "data", "noise", "timestep") if s not in job.seeds]
    if missing:
        raise BuildError(
            f"JobSpec.seeds lacks stream(s) {missing}", key=f"{job.lora_id}.seeds.{missing[0]}"
        )
    return {k: int(v) for k, v in job.seeds.items()}


def _encode(pipe, prompts: list[str]) -> torch.Tensor:
    from .eval import encode_prompts

    return encode_prompts(pipe, prompts).detach().cpu().float()


def _base_name(cfg: Config, base_info: dict[str, Any] | None = None) -> str:
    """The record's base name; a config base trained further is named by its hash too, so
    LoRAs of a twin zoo never claim the untrained base's name."""
    b = cfg.base_model
    if base_info and "base_model_hash" in base_info:
        return f"tiny-sd-config:{base_info['base_model_hash']}"
    return (
        f"{b.id}@{b.revision}"
        if b.kind == "hub" and b.revision
        else getattr(b, "id", "tiny-sd-config")
    )
