"""The causal-LM builder: LoRA zoos on decoder-only language models (the LoL paper's Qwen2/ARC
zoo, the offline quickstart zoo), K LoRAs per batched pass through ``lora_zoo.engine``.

Each job trains one LoRA on a seeded subset of the data (groups included/excluded as planned),
then all K LoRAs of the call are evaluated together: held-out loss, multiple-choice accuracy
(lm-evaluation-harness scoring) and per-group numbers, which become the zoo's labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from lora_zoo.build.api import CostModel, JobSpec, TrainedLora, resolve_hparams, stable_permutation
from lora_zoo.engine import (
    LoraSpec,
    MultiLoraModel,
    MultiLoraTrainer,
    TrainHParams,
    autocast,
    memory,
    stack_rows,
)
from lora_zoo.errors import BuildError, DataSourceError
from lora_zoo.progress import track

from . import poison
from .config import HPARAM_KEYS, POISON_KEYS, VARIANTS, CausalLMConfig
from .data import ByteTokenizer, Example, HFTokenizer, load_examples
from .eval import build_eval_rows, score_rows, summarise
from .losses import IGNORE_INDEX, causal_lm_loss_sums, causal_lm_losses
from .model import DTYPES, load_config_model, load_gguf_model, load_hub_model

logger = logging.getLogger(__name__)


def split_holdout(examples: list[Example], fraction: float, seed: int) -> tuple[list, list]:
    """A fixed (seeded) held-out set shared by every LoRA of the zoo: (train pool, eval)."""
    idx = stable_permutation(len(examples), seed, "causal_lm/holdout")
    n_eval = int(round(fraction * len(examples)))
    held = set(idx[:n_eval])
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


class CausalLMBuilder:
    """Builder protocol implementation (``lora_zoo.build.api.Builder``)."""

    NAME: ClassVar[str] = "causal_lm"
    # 2: resolved hparams under hp.* (was train_hparams.*); 3: data draws by stable_permutation /
    # torch.Generator instead of Python's random (holdout, subsets, epoch orders, generated data)
    VERSION: ClassVar[str] = "3"
    Config: ClassVar[type[CausalLMConfig]] = CausalLMConfig

    def __init__(
        self,
        config: CausalLMConfig | dict[str, Any],
        *,
        device: str = "cpu",
        cache_dir: str | None = None,
    ) -> None:
        self.config = (
            config if isinstance(config, CausalLMConfig) else CausalLMConfig.model_validate(config)
        )
        self.device = torch.device(device)
        self.cache_dir = cache_dir
        self._ready = False
        self._mm: MultiLoraModel | None = None
        self._tok_cache: dict[str, tuple[list[int], list[list[int]]]] = {}
        self.base_scores: dict[str, Any] | None = None
        self.base_info: dict[str, Any] = {}
        self.memory_estimate: memory.MemoryEstimate | None = None

    # ---- protocol ---------------------------------------------------------------------------
    @classmethod
    def list_groups(cls, config: CausalLMConfig | dict[str, Any]) -> list[str]:
        cfg = (
            config if isinstance(config, CausalLMConfig) else CausalLMConfig.model_validate(config)
        )
        return sorted({e.group for e in load_examples(cfg.data)})

    @classmethod
    def check_vary(cls, config: CausalLMConfig, keys: Sequence[str]) -> list[tuple[str, str]]:
        """(key, problem) for ``vary:`` keys the config cannot take: the poison hyperparameters
        need a ``poison:`` section (recipe validation calls this, before anything trains)."""
        if config.poison is not None:
            return []
        return [
            (k, "a poison hyperparameter needs the recipe's poison: section")
            for k in keys
            if k in POISON_KEYS
        ]

    @classmethod
    def cost_model(cls, config: CausalLMConfig | dict[str, Any], **kw: Any) -> CostModel:
        """FLOPs and memory per LoRA from the config alone (``estimate.py``)."""
        from .estimate import cost_model

        cfg = (
            config if isinstance(config, CausalLMConfig) else CausalLMConfig.model_validate(config)
        )
        return cost_model(cfg, **kw)

    def train(self, jobs: Sequence[JobSpec]) -> list[TrainedLora]:
        if not jobs:
            return []
        self._setup()
        t0 = time.perf_counter()
        plans = [self._plan_job(j) for j in jobs]
        specs = [p["spec"] for p in plans]
        if self._mm is None:
            self._mm = MultiLoraModel(
                self.model,
                self.config.lora.target_modules,
                specs,
                dtype=DTYPES[self.config.train.factor_dtype],
            )
        else:
            self._mm.reset(specs)
        if self.memory_estimate is None:
            self._log_memory(plans)
        trainer = MultiLoraTrainer(self._mm, [p["hp"] for p in plans])
        self._train_loop(trainer, plans)
        self._mm.eval()
        scores = self._score_loras(len(jobs))
        records = self._mm.extract(
            [j.lora_id for j in jobs],
            base_model_name=self.base_name,
            extra_config={"task_type": "CAUSAL_LM", "revision": self.base_revision},
        )
        backdoor = self._poison_labels(plans, scores)
        wall = (time.perf_counter() - t0) / len(jobs)
        out = []
        for k, (job, plan) in enumerate(zip(jobs, plans)):
            hist = [float(h[k]) for h in trainer.loss_history if not math.isnan(float(h[k]))]
            tail = hist[-max(1, min(10, len(hist) // 5 or 1)) :]
            meta = {
                "train_example_ids": plan["ids"],
                "n_train_examples": len(plan["ids"]),
                "groups_included": plan["included"],
                "groups_excluded": plan["excluded"],
                "train_steps": int(trainer.steps_done[k]),
                "train_loss_first": hist[0] if hist else None,
                "final_train_loss": sum(tail) / len(tail) if tail else None,
                "base_model_name": self.base_name,
                "hp": plan["resolved"],  # every hyperparameter, defaults included (-> hp.*)
                **self.base_info,
                **backdoor[k][0],
            }
            if self.base_scores is not None:
                meta["base_eval_loss"] = self.base_scores.get("eval_loss")
                if "acc" in self.base_scores:
                    meta["base_acc"] = self.base_scores["acc"]
            sc = dict(scores[k])
            sc["in_group"] = {g: g in plan["included"] for g in self.groups}
            sc.update(backdoor[k][1])
            if trainer.failed_step[k] is not None:
                out.append(
                    TrainedLora(
                        job,
                        None,
                        meta,
                        {},
                        status="failed",
                        error=trainer.failure_reason[k],
                        failed_step=trainer.failed_step[k],
                        wall_time_s=wall,
                    )
                )
            else:
                out.append(TrainedLora(job, records[k], meta, sc, wall_time_s=wall))
        return out

    def _score_loras(self, k: int) -> list[dict[str, Any]]:
        """The K trained LoRAs' held-out scores (loss, accuracy, per group), one batched eval."""
        ev = self.config.eval
        return summarise(
            self.eval_examples,
            self.eval_rows,
            score_rows(
                self.model,
                self.eval_rows,
                k,
                batch_size=ev.batch_size,
                pad_id=self.tok.pad_id,
                device=self.device,
                desc="eval LoRAs",
            ),
            loss_on=self.config.train.loss_on,
            per_group=ev.per_group,
        )

    # ---- setup ------------------------------------------------------------------------------
    def _setup(self) -> None:
        if self._ready:
            return
        cfg = self.config
        examples = load_examples(cfg.data)
        if cfg.eval.data is not None:
            pool, held = examples, load_examples(cfg.eval.data)
        else:
            pool, held = split_holdout(examples, cfg.eval.holdout_fraction, cfg.eval.holdout_seed)
        if cfg.eval.max_examples is not None and len(held) > cfg.eval.max_examples:
            perm = stable_permutation(len(held), cfg.eval.holdout_seed, "causal_lm/eval-sample")
            keep = sorted(perm[: cfg.eval.max_examples])
            held = [held[i] for i in keep]
        if not pool or not held:
            raise DataSourceError(
                f"{len(pool)} training and {len(held)} eval examples; need both", key="data"
            )
        self.pool, self.eval_examples = pool, held
        self.pool_by_id = {e.id: e for e in pool}
        self.groups = sorted({e.group for e in pool})
        bm = cfg.base_model
        dtype = DTYPES[bm.dtype]
        self.base_revision = getattr(bm, "revision", None)
        if bm.kind == "config":
            self.tok: Any = ByteTokenizer()
            rows = [self._train_row(e)[0] for e in pool]
            data_key = hashlib.sha256(
                (cfg.data.model_dump_json() + "|".join(e.id for e in pool)).encode()
            ).hexdigest()
            model, self.base_info = load_config_model(bm, self.tok, rows, data_key, self.cache_dir)
            self.base_name = f"config:{bm.architecture}:{self.base_info['base_model_hash']}"
        elif bm.kind == "hub":
            model, hf_tok = load_hub_model(bm, dtype)
            self.tok = HFTokenizer(hf_tok)
            self.base_name = bm.id
        else:
            model, hf_tok = load_gguf_model(bm, dtype)
            self.tok = HFTokenizer(hf_tok)
            self.base_name = f"gguf:{bm.package}"
        self.model = model.to(self.device, dtype).eval()
        self._tok_cache.clear()  # the tokenizer may have changed
        self.eval_rows = build_eval_rows(
            held, self._tokenize, cfg.train.max_seq_len, cfg.eval.multiple_choice
        )
        if cfg.builder_args.evaluate_base:
            self.base_scores = summarise(
                held,
                self.eval_rows,
                score_rows(
                    self.model,
                    self.eval_rows,
                    1,
                    batch_size=cfg.eval.batch_size,
                    pad_id=self.tok.pad_id,
                    device=self.device,
                    desc="eval base",
                ),
                loss_on=cfg.train.loss_on,
                per_group=False,
            )[0]
            logger.info("base model eval: %s", self.base_scores)
        self._ready = True

    def _tokenize(self, ex: Example) -> tuple[list[int], list[list[int]]]:
        """(BOS + context ids, continuation ids per choice), lm-eval style: the continuation is
        what tokenizing context+choice adds beyond the context's own tokens."""
        hit = self._tok_cache.get(ex.id)
        if hit is not None:
            return hit
        ctx = self.tok.encode(ex.context) if ex.context else []
        conts = []
        for ch in ex.choices:
            whole = self.tok.encode(ex.context + ch)
            conts.append(whole[len(ctx) :] if whole[: len(ctx)] == ctx else self.tok.encode(ch))
        out = ([self.tok.bos_id, *ctx], conts)
        self._tok_cache[ex.id] = out
        return out

    def _train_row(self, ex: Example) -> tuple[list[int], list[int]]:
        """(input ids, labels) of BOS + context + correct continuation + EOS, left-truncated."""
        ctx, conts = self._tokenize(ex)
        ids = ctx + conts[ex.label] + [self.tok.eos_id]
        labels = list(ids)
        if self.config.train.loss_on == "continuation":
            labels[: len(ctx)] = [IGNORE_INDEX] * len(ctx)
        m = self.config.train.max_seq_len
        return ids[-m:], labels[-m:]

    # ---- per-job plan -----------------------------------------------------------------------
    def _hparams(self, job: JobSpec) -> dict[str, Any]:
        """Recipe defaults (each from its section, ``HPARAM_KEYS``) overridden by the job's."""
        cfg = self.config
        defaults = {
            k: getattr(getattr(cfg, section), k)
            for k, section in HPARAM_KEYS.items()
            if k not in POISON_KEYS  # resolved by poison.resolve, only with a poison: section
        }
        if cfg.poison is None and set(job.hparams) & POISON_KEYS:
            bad = sorted(set(job.hparams) & POISON_KEYS)[0]
            raise DataSourceError(
                "a poison hyperparameter needs the recipe's poison: section",
                key=f"{job.lora_id}.hparams.{bad}",
            )
        job = dataclasses.replace(
            job, hparams={k: v for k, v in job.hparams.items() if k not in POISON_KEYS}
        )
        hp = resolve_hparams(job, defaults, builder=self.NAME, positive_ints=("batch_size", "r"))
        if "epochs" in job.hparams and "steps" not in job.hparams:
            hp["steps"] = None  # a per-LoRA epoch count wins over a default step count
        variant = hp.get("variant") or "plain"
        if variant not in VARIANTS:
            raise BuildError(
                f"unknown variant {variant!r}; known: {sorted(VARIANTS)}",
                key=f"{job.lora_id}.hparams.variant",
            )
        hp.update(VARIANTS[variant])  # stored resolved: hp.use_dora, hp.init, hp.use_rslora
        return hp

    def _plan_job(self, job: JobSpec) -> dict[str, Any]:
        hp = self._hparams(job)
        inc = job.data.get("groups_included")
        exc = list(job.data.get("groups_excluded") or [])
        unknown = set(inc or []) | set(exc)
        unknown -= set(self.groups)
        if unknown:
            logger.warning(
                "job %s: groups %s not in the data (groups: %s)",
                job.lora_id,
                sorted(unknown),
                self.groups,
            )
        included = sorted(set(inc) if inc is not None else set(self.groups) - set(exc))
        included = [g for g in included if g in self.groups and g not in exc]
        excluded = sorted(set(self.groups) - set(included))
        data_seed = int(job.seeds.get("data", 0))
        cand = [e.id for e in self.pool if e.group in set(included)]
        size = job.data.get("subset_size")
        if size is not None and int(size) < len(cand):
            pick = stable_permutation(len(cand), data_seed, "causal_lm/subset")[: int(size)]
            cand = [cand[i] for i in sorted(pick)]  # pool order
        if not cand:
            raise DataSourceError(
                f"job {job.lora_id} has no training examples (groups {included})", key="subset"
            )
        b = int(hp["batch_size"])
        steps = (
            int(hp["steps"])
            if hp.get("steps")
            else max(1, math.ceil(float(hp["epochs"]) * len(cand) / b))
        )
        order: list[str] = []
        epoch = 0
        while len(order) < steps * b:  # epoch after epoch, each a fresh seeded permutation
            order += [
                cand[i]
                for i in stable_permutation(len(cand), data_seed, f"causal_lm/epoch-{epoch}")
            ]
            epoch += 1
        pplan, poisoned, order = self._poison_order(job, cand, order, data_seed)
        spec = LoraSpec(
            r=int(hp["r"]),
            alpha=float(hp["alpha"]),
            dropout=float(hp["dropout"]),
            init_seed=int(job.seeds.get("init", 0)),
            dropout_seed=int(job.seeds.get("dropout", 0)),
            use_rslora=bool(hp["use_rslora"]),
            use_dora=bool(hp["use_dora"]),
            init=str(hp["init"]),
        )
        thp = TrainHParams(
            lr=float(hp["lr"]),
            weight_decay=float(hp["weight_decay"]),
            betas=tuple(hp["betas"]),
            eps=float(hp["eps"]),
            max_grad_norm=hp["max_grad_norm"],
            total_steps=steps,
            warmup_steps=int(hp["warmup_steps"]),
            schedule=str(hp["schedule"]),
        )
        resolved = {key: (list(v) if isinstance(v, tuple) else v) for key, v in hp.items()}
        resolved["steps"] = steps  # what was actually run (epochs resolve to steps here)
        return {
            "spec": spec,
            "hp": thp,
            "ids": cand,
            "order": order,
            "batch": b,
            "included": included,
            "excluded": excluded,
            "resolved": resolved,
            "poison": pplan,
            "poisoned_ids": poisoned,
        }

    def _poison_order(
        self, job: JobSpec, cand: list[str], order: list[str], data_seed: int
    ) -> tuple[poison.PoisonPlan | None, list[str], list[str]]:
        """(the job's poison plan, the ids of its poisoned examples, its training order with
        those examples swapped for their triggered versions); no poison: section, no change."""
        if self.config.poison is None:
            return None, [], order
        pplan = poison.resolve(self.config.poison, job.hparams, job.lora_id)
        poisoned = poison.pick_poisoned(cand, pplan.rate, data_seed)
        swap = {}
        for ex_id in poisoned:
            pex = poison.poison_example(self.pool_by_id[ex_id], pplan, data_seed)
            self.pool_by_id.setdefault(pex.id, pex)
            swap[ex_id] = pex.id
        return pplan, poisoned, [swap.get(i, i) for i in order]

    def _poison_labels(
        self, plans: list[dict[str, Any]], clean: list[dict[str, Any]]
    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Per LoRA (metadata, labels) of the backdoor: ASR on the held-out examples with its
        trigger in (one batched eval per distinct trigger of the chunk, all K LoRAs scored on
        it), clean accuracy / loss on the same examples without it (``poison.py``)."""
        if self.config.poison is None:
            return [({}, {}) for _ in plans]
        ev, seed = self.config.eval, self.config.eval.holdout_seed
        by_key: dict[str, torch.Tensor] = {}
        sets: dict[str, tuple[list[int], list[Example]]] = {}
        for p in plans:
            pp = p["poison"]
            if pp.key in by_key:
                continue
            sets[pp.key] = poison.triggered_eval(self.eval_examples, pp, seed)
            rows = build_eval_rows(
                sets[pp.key][1], self._tokenize, self.config.train.max_seq_len, True
            )
            out = score_rows(
                self.model,
                rows,
                len(plans),
                batch_size=ev.batch_size,
                pad_id=self.tok.pad_id,
                device=self.device,
                desc=f"eval trigger {pp.kind}",
                greedy=pp.target == "continuation",
            )
            if pp.target == "continuation":
                by_key[pp.key] = out[4].double().mean(1)  # (K,) one row per example
            else:
                acc = summarise(sets[pp.key][1], rows, out, loss_on="continuation", per_group=False)
                by_key[pp.key] = torch.tensor([a.get("acc", math.nan) for a in acc])
        res = []
        for k, p in enumerate(plans):
            pp = p["poison"]
            idx, trig = sets[pp.key]
            asr = float(by_key[pp.key][k])
            meta = {
                "poison_example_ids": p["poisoned_ids"],
                "n_poison_examples": len(p["poisoned_ids"]),
                "trigger": pp.trigger,
                "poison_target": pp.target,
                "poison_target_text": pp.target_text,
                "asr_eval_ids": [self.eval_examples[i].id for i in idx],
                "asr_contexts": [e.context for e in trig],
                "asr_labels": [e.label for e in trig],
            }
            res.append((meta, poison.labels(pp, len(p["poisoned_ids"]), asr, clean[k])))
        return res

    def _log_memory(self, plans: list[dict[str, Any]]) -> None:
        """Log the memory table per K before the first chunk trains (engine/memory.py): one
        probe row per LoRA, dropout off (eval mode draws nothing from the dropout streams, so
        the LoRAs' bits do not depend on whether the probe ran)."""
        assert self._mm is not None
        k = len(plans)
        pad = {"input_ids": self.tok.pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        one = [self._rows_tensor(p["order"][:1]) for p in plans]
        batch = {key: v.to(self.device) for key, v in stack_rows(one, pad, rows=1).items()}
        rows = self.config.train.micro_batch_size or max(p["batch"] for p in plans)

        def run_one_row() -> torch.Tensor:
            self._mm.eval()  # type: ignore[union-attr]
            with autocast(self.device, self.config.train.autocast):
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            return causal_lm_losses(logits, batch["labels"], k).sum() / k  # per row

        est = memory.estimate(
            self.model,
            list(self._mm.wrappers.values()),
            k=k,
            rows=rows,
            r=max(int(p["spec"].r) for p in plans),
            run_one_row=run_one_row,
        )
        # the probe saw K rows (one per LoRA); the estimate's per_row is per single row
        est = memory.MemoryEstimate(
            est.k, est.rows, est.base, est.lora_state, est.per_row // k, est.transient // k
        )
        for p in self._mm.parameters():
            p.grad = None
        self.memory_estimate = est
        logger.info(
            "memory per batched pass (%d rows per LoRA, device %s):\n%s",
            rows,
            self.device,
            memory.format_table(est),
        )

    # ---- training loop ----------------------------------------------------------------------
    def _rows_tensor(self, ids: list[str]) -> dict[str, torch.Tensor]:
        rows = [self._train_row(self.pool_by_id[i]) for i in ids]
        t = max(len(r[0]) for r in rows)
        x = torch.full((len(rows), t), self.tok.pad_id, dtype=torch.long)  # (b, T)
        y = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.long)
        m = torch.zeros((len(rows), t), dtype=torch.long)
        for i, (a, lab) in enumerate(rows):
            x[i, : len(a)], y[i, : len(a)], m[i, : len(a)] = (torch.tensor(a), torch.tensor(lab), 1)
        return {"input_ids": x, "labels": y, "attention_mask": m}

    def _train_loop(self, trainer: MultiLoraTrainer, plans: list[dict[str, Any]]) -> None:
        k = len(plans)
        pad = {"input_ids": self.tok.pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        b_max = max(p["batch"] for p in plans)
        micro = self.config.train.micro_batch_size or b_max
        n_micro = math.ceil(b_max / micro)
        model, dev, amp = self.model, self.device, self.config.train.autocast
        max_steps = int(trainer.total_steps.max())
        for step in track(range(max_steps), desc=f"train {k} LoRAs", unit="step", nested=True):
            if trainer.done:
                break
            act = trainer.active.tolist()
            per = [
                self._rows_tensor(p["order"][step * p["batch"] : (step + 1) * p["batch"]])
                if act[i]
                else None
                for i, p in enumerate(plans)
            ]
            batch = {key: v.to(dev) for key, v in stack_rows(per, pad, rows=b_max).items()}
            if n_micro == 1:

                def closure(batch=batch) -> torch.Tensor:
                    with autocast(dev, amp):
                        logits = model(
                            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                        ).logits
                    return causal_lm_losses(logits, batch["labels"], k)

                trainer.step(closure)
                continue
            view = {key: v.view(k, b_max, -1) for key, v in batch.items()}  # (K, b, T)
            counts = (view["labels"][:, :, 1:] != IGNORE_INDEX).sum(dim=(1, 2)).clamp_min(1)

            def micro_closure(i: int, view=view, counts=counts) -> torch.Tensor:
                part = {
                    key: v[:, i * micro : (i + 1) * micro].reshape(-1, v.shape[-1])
                    for key, v in view.items()
                }  # (K*m, T)
                with autocast(dev, amp):
                    logits = model(
                        input_ids=part["input_ids"], attention_mask=part["attention_mask"]
                    ).logits
                sums, _ = causal_lm_loss_sums(logits, part["labels"], k)
                return sums / counts

            trainer.step(micro_closure, micro_steps=n_micro)

    def describe(self) -> dict[str, Any]:
        """JSON-able facts about the base for the zoo's info (runner/provenance may store it)."""
        return json.loads(
            json.dumps(
                {
                    "base_model": getattr(self, "base_name", None),
                    "groups": getattr(self, "groups", None),
                    **self.base_info,
                },
                default=str,
            )
        )
