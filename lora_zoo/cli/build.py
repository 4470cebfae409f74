"""CLI verbs of the build pipeline: ``plan``, ``build``, ``pack``, ``status``, ``rebuild``.

``plan`` shows what a recipe would train without training; ``build`` trains with resume (run
the same command again after a crash) and packs; ``--shard I/N`` builds a slice that ``pack``
later merges with its siblings; ``status`` reports progress and failures of a work dir;
``rebuild`` re-trains a downloaded zoo from its stored recipe (local paths only under --allow-path).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lora_zoo.cli import LazyHelp


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (or the name of a shipped recipe)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, value parsed as YAML (repeatable)",
    )


def register(sub: Any) -> None:
    p = sub.add_parser("plan", help="print a recipe's job table without training")
    _add_recipe_args(p)
    p.add_argument("--limit", type=int, default=None, help="first N jobs only")
    p.add_argument("--json", action="store_true", help="one JSON job per line")
    p.add_argument(
        "--estimate",
        action="store_true",
        help="FLOPs per LoRA and for the zoo, memory per K, GPU-hours; offline, no job table",
    )
    p.add_argument("--accelerator", default="H100", help="A100, H100 or H200 (bf16 peak)")
    p.add_argument(
        "--utilisation", type=float, default=None, help="assumed fraction of peak (default 0.3)"
    )
    p.add_argument("--seq", type=int, default=None, help="tokens per row (causal LM)")
    p.add_argument("--examples", type=int, default=None, help="training examples in the data")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("build", help="train a recipe's LoRAs (resumable) and pack the zoo")
    _add_recipe_args(p)
    p.add_argument("--out", required=True, help="zoo folder (work state in OUT/.build*)")
    p.add_argument("--k", type=int, default=None, help="LoRAs per batched pass (train.k)")
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="build every N-th chunk of k jobs, starting at chunk I (merge with pack)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--max-attempts", type=int, default=2, help="tries per chunk on exceptions")
    p.add_argument("--retry-failed", action="store_true", help="retry jobs that failed before")
    p.add_argument("--backend", default="local", help=LazyHelp(_backends_help))
    p.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="fsspec URL (shared path, s3://, gs://) where workers write finished LoRAs; "
        "the work dir records references, a rerun records what is there instead of retraining",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster to join (auto, host:port, ray://...)"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="Ray actors (default: one per GPU / CPU)"
    )
    p.add_argument("--cpus-per-worker", type=float, default=None, help="Ray: CPUs per actor")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="Ray: GPUs per actor")
    p.add_argument("--limit", type=int, default=None, help="first N jobs only (smoke runs)")
    p.add_argument("--no-pack", action="store_true", help="train only; pack later")
    p.add_argument("--analyze", action="store_true", help=_ANALYZE_HELP)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_build, needs_stack=True)

    _register_pack(sub)

    p = sub.add_parser("status", help="job counts and failures of a build dir")
    p.add_argument("dir", help="build OUT dir or a .build* work dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("rebuild", help="re-train a zoo (or some LoRAs) from its stored recipe")
    p.add_argument("source", help="zoo folder, Hub repo id or fsspec URL")
    p.add_argument("--out", required=True, help="folder for the rebuilt zoo")
    p.add_argument("--only", default=None, help="comma-separated lora_ids to rebuild")
    p.add_argument("--revision", default=None)
    p.add_argument("--force", action="store_true", help="rebuild despite a builder VERSION change")
    p.add_argument(
        "--allow-path",
        action="append",
        default=[],
        metavar="ROOT",
        help="let the stored recipe read local files under ROOT (repeatable; default: none)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_rebuild, needs_stack=True)


def cmd_plan(args: argparse.Namespace) -> int:
    from lora_zoo.build.plan import format_table, plan
    from lora_zoo.build.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.estimate:
        from lora_zoo.build.estimate import DEFAULT_UTILISATION, estimate_recipe, format_estimate

        est = estimate_recipe(
            recipe,
            seq_len=args.seq,
            examples=args.examples,
            accelerator=args.accelerator,
            utilisation=args.utilisation or DEFAULT_UTILISATION,
        )
        print(format_estimate(est))
        return 0
    jobs = plan(recipe, limit=args.limit)
    if args.json:
        for j in jobs:
            print(json.dumps(j.to_dict(), sort_keys=True))
    else:
        print(
            f"# {recipe.name}: builder {recipe.builder}, {recipe.model.num_loras} LoRAs, "
            f"k={recipe.k}"
        )
        print(format_table(jobs))
    return 0


def _backends_help() -> str:
    from lora_zoo.build.backends import BACKENDS

    return "where chunks train: " + "; ".join(f"{n}: {b.doc}" for n, b in BACKENDS.items())


def _check_backend(name: str, options: dict[str, Any], device: str) -> None:
    """The backend exists, takes every option given, and passes its pre-flight check."""
    from lora_zoo.build.backends import BACKENDS, option_owner
    from lora_zoo.errors import BuildError

    backend = BACKENDS.get(name)
    for opt in sorted(options):
        if opt not in backend.options:
            raise BuildError(f"--{opt.replace('_', '-')} needs --backend {option_owner(opt)}")
    if backend.preflight is not None:
        backend.preflight(device)


def cmd_build(args: argparse.Namespace) -> int:
    from lora_zoo.build.runner import build, parse_shard

    ray_opts = {
        "address": args.address,
        "workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "gpus_per_worker": args.gpus_per_worker,
    }
    ray_opts = {key: v for key, v in ray_opts.items() if v is not None}
    _check_backend(args.backend, ray_opts, args.device)  # before any work dir is made
    res = build(
        args.recipe,
        args.out,
        overrides=args.overrides,
        k=args.k,
        shard=parse_shard(args.shard) if args.shard else None,
        device=args.device,
        max_attempts=args.max_attempts,
        retry_failed=args.retry_failed,
        backend=args.backend,
        pack_zoo=not args.no_pack,
        limit=args.limit,
        progress=not args.no_progress,
        store=args.store,
        backend_options=ray_opts or None,
    )
    c = res.counts
    print(f"{c['done']} done, {c['failed']} failed, {c['pending']} pending ({res.work_dir})")
    for f in res.failed:
        step = f" at step {f['failed_step']}" if f["failed_step"] is not None else ""
        print(f"  failed {f['lora_id']}{step}: {f['reason']}")
    if res.zoo is not None:
        print(f"zoo written to {res.zoo}")
        if args.analyze:
            _analyze(res.zoo)
    return 0 if c["pending"] == 0 else 1


_ANALYZE_HELP = "then add the spectral columns (as `lora-zoo analyze ZOO` does)"


def _register_pack(sub: Any) -> None:
    p = sub.add_parser("pack", help="merge finished LoRAs of build/shard dirs into one zoo")
    p.add_argument("dirs", nargs="+", help="build OUT dirs or their .build* work dirs")
    p.add_argument("--out", required=True, help="zoo folder to write")
    p.add_argument("--allow-partial", action="store_true", help="pack although jobs are open")
    p.add_argument("--overwrite", action="store_true", help="replace an existing zoo")
    p.add_argument("--analyze", action="store_true", help=_ANALYZE_HELP)
    p.set_defaults(func=cmd_pack)


def _analyze(zoo: object) -> None:
    from lora_zoo.load.spectra import analyze_zoo

    summary = analyze_zoo(str(zoo))
    print(f"added {len(summary['columns'])} spectral summary columns (lora-zoo analyze)")


def cmd_pack(args: argparse.Namespace) -> int:
    from lora_zoo.build.runner import pack

    m = pack(args.dirs, args.out, allow_partial=args.allow_partial, overwrite=args.overwrite)
    rows = {s: sum(sh["num_rows"] for sh in sp["shards"]) for s, sp in m["splits"].items()}
    print(
        f"packed {sum(rows.values())} LoRAs into {args.out}: "
        + ", ".join(f"{s}={n}" for s, n in rows.items())
    )
    if args.analyze:
        _analyze(args.out)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from lora_zoo.build.runner import status

    info = status(args.dir)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for wd in info:
        shard = f" shard {wd['shard'][0]}/{wd['shard'][1]}" if wd["shard"] else ""
        print(f"{wd['work_dir']}{shard}: " + ", ".join(f"{k} {v}" for k, v in wd["counts"].items()))
        for f in wd["failed"]:
            step = f" at step {f['failed_step']}" if f["failed_step"] is not None else ""
            print(f"  failed {f['lora_id']}{step} (attempts {f['attempts']}): {f['reason']}")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from lora_zoo.build.runner import rebuild_from_zoo

    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    source = args.source
    if args.revision:
        from lora_zoo.load.source import load_zoo

        source = load_zoo(args.source, revision=args.revision).root
    _print_drift(source, args.revision)
    res = rebuild_from_zoo(
        source,
        args.out,
        only,
        force=args.force,
        device=args.device,
        progress=not args.no_progress,
        allow_paths=args.allow_path,
    )
    c = res.counts
    print(f"{c['done']} done, {c['failed']} failed, {c['pending']} pending; zoo: {res.zoo}")
    return 0 if c["pending"] == 0 and c["failed"] == 0 else 1


def _print_drift(source: str, revision: str | None) -> None:
    """Before a rebuild: what differs from the environment the zoo was built in."""
    from lora_zoo import env
    from lora_zoo.load.source import load_zoo

    info = load_zoo(source, revision=revision).info
    stored = (info.get("provenance") or {}).get("environment")
    print(env.format_drift(env.drift(stored, env.capture())))
    built = info.get("builder") or {}
    if built.get("name") and built.get("source_sha256"):
        from lora_zoo.build.registry import builder_info

        try:
            here = builder_info(built["name"])
        except Exception:  # an unknown builder is reported by the rebuild itself
            return
        for key, what in (("builder_source_sha256", "builder's source"),
                          ("library_sha256", "lora-zoo engine / record / seeding source")):  # fmt: skip
            if built.get(key) and built[key] != here[key]:
                print(f"code drift: the {what} changed since the zoo was built "
                      "(same VERSION): bit-identical output is not guaranteed")  # fmt: skip
        if not built.get("library_sha256") and built["source_sha256"] != here["source_sha256"]:
            print("code drift: the builder's source hash differs from the zoo's")
