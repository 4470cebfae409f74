"""CLI verbs to publish, fetch and compare zoos: ``push``, ``pull``, ``card``,
``rebuild``, ``diff``.

``push`` / ``pull`` take a Hub repo id (``ns/name``, ``hf://datasets/ns/name``) or any fsspec URL
(``s3://bucket/zoo``, ``file:///...``); the Hub endpoint and token come from ``HF_ENDPOINT`` /
``HF_TOKEN`` like every huggingface_hub tool. ``diff`` exits 1 when the zoos differ, so it can
gate a rebuild in CI.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("push", help="publish a zoo folder to the Hub or an fsspec URL")
    p.add_argument("dir", help="local zoo folder")
    p.add_argument("target", help="Hub repo id (ns/name) or fsspec URL (s3://..., file://...)")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument(
        "--card",
        action="store_true",
        help="re-render README.md + plots (naming the target) and push them along",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pull", help="download a remote zoo into a folder (hashes checked)")
    p.add_argument("source", help="Hub repo id or fsspec URL")
    p.add_argument("dir", help="local folder to write")
    p.add_argument("--revision", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("card", help="render README.md (dataset card) and plots of a zoo folder")
    p.add_argument("dir", help="local zoo folder")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--template", default=None, help="a Jinja2 template file to use instead")
    p.add_argument("--stdout", action="store_true", help="print the card instead of writing it")
    p.set_defaults(func=cmd_card)

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

    p = sub.add_parser("diff", help="compare two zoos; exit 1 when they differ")
    p.add_argument("a", help="zoo folder, Hub repo id or fsspec URL")
    p.add_argument("b")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (labels, weights)")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (labels, weights)")
    p.add_argument(
        "--subset",
        action="store_true",
        help="B holds only some of A's LoRAs (a --only rebuild): compare those",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--max-lines", type=int, default=50)
    p.set_defaults(func=cmd_diff)


def cmd_push(args: argparse.Namespace) -> int:
    from lora_zoo.remote.push import push
    from lora_zoo.remote.sources import parse_source

    if args.card:  # re-render README.md + plots naming the target; they go in the same commit
        from lora_zoo.cards import write_card

        spec = parse_source(args.target, args.revision)
        write_card(args.dir, repo_id=spec.repo_id if spec.kind == "hub" else args.target)
    res = push(
        args.dir,
        args.target,
        revision=args.revision,
        private=args.private,
        create_pr=args.create_pr,
        commit_message=args.message,
        progress=not args.no_progress,
    )
    print(
        f"pushed {args.dir} -> {res.target}: {len(res.uploaded)} uploaded, "
        f"{len(res.unchanged)} unchanged, {len(res.deleted)} deleted"
    )
    if res.commit:
        print(f"commit {res.commit}")
    if res.pr_url:
        print(f"pull request {res.pr_url}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from lora_zoo.cli.zoo import report_problems
    from lora_zoo.remote.pull import pull
    from lora_zoo.zoo.manifest import verify

    dest = pull(
        args.source,
        args.dir,
        args.revision,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return report_problems(dest, verify(dest), ok=f"pulled {args.source} into {dest}: OK")


def cmd_card(args: argparse.Namespace) -> int:
    from lora_zoo.cards import render_card, write_card

    if args.stdout:
        print(render_card(args.dir, template=args.template))
        return 0
    path = write_card(args.dir, plots=not args.no_plots, template=args.template)
    print(f"wrote {path}")
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


def cmd_diff(args: argparse.Namespace) -> int:
    from lora_zoo import env
    from lora_zoo.contrib.diff import diff_zoos

    rep = diff_zoos(args.a, args.b, atol=args.atol, rtol=args.rtol, subset=args.subset)
    rows = env.drift(rep.env_a, rep.env_b)
    if args.json:
        d = rep.to_dict()
        d["environment_drift"] = [r.__dict__ for r in rows]
        d["bit_identical_expected"] = env.bit_identical_expected(rows)
        print(json.dumps(d, indent=1))
    else:
        print(env.format_drift(rows, left="A", right="B"))
        print(rep.format(max_lines=args.max_lines))
    return 0 if rep.equal else 1


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
