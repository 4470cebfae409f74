"""CLI verbs that move a zoo between this machine and a store: ``push``, ``pull``.

``push`` / ``pull`` take a Hub repo id (``ns/name``, ``hf://datasets/ns/name``) or any fsspec URL
(``s3://bucket/zoo``, ``file:///...``); the Hub endpoint and token come from ``HF_ENDPOINT`` /
``HF_TOKEN`` like every huggingface_hub tool.
"""

from __future__ import annotations

import argparse
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


def cmd_push(args: argparse.Namespace) -> int:
    from lora_zoo.remote.address import parse_source
    from lora_zoo.remote.push import push

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
