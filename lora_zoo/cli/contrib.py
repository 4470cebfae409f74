"""CLI verbs to contribute and compare collections: ``ingest``, ``merge``, ``export``, ``diff``
(exit 1 when two zoos differ, so it can gate a rebuild in CI)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lora_zoo.cli import LazyHelp


def _formats_help(*extra: str) -> str:
    from lora_zoo.contrib.formats import format_names

    return "one of: " + ", ".join([*extra, *format_names()])


# The Hub SRC rule, also implemented by lora_zoo.contrib.ingest_hub.is_hub_source (kept here so that
# building the CLI parser imports nothing heavy).
SRC_HELP = (
    "folders, files or glob patterns; or Hub repos: hf://OWNER/NAME[@REV][/SUBPATH] "
    "(hf://datasets/... for dataset repos), or a bare OWNER/NAME when no local path of that "
    "name exists (a local path always wins). From the Hub only *.safetensors and small *.json "
    "are downloaded; .bin/.pt/.ckpt/.pth are refused by name, never fetched"
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ingest",
        help="turn PEFT / diffusers / kohya LoRA files into a zoo (+ a report of rejected files)",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help=SRC_HELP)
    p.add_argument("--out", required=True, help="new zoo folder")
    p.add_argument("--format", default="auto", help=LazyHelp(lambda: _formats_help("auto")))
    p.add_argument(
        "--metadata", default=None, help="CSV / JSON / JSONL / Parquet table keyed by file or id"
    )
    p.add_argument("--labels", default="", help="comma-separated table columns stored as labels")
    p.add_argument(
        "--base-model",
        default=None,
        help="Hub id, or a local config.json / model or pipeline folder to check shapes against",
    )
    p.add_argument("--collection", default="default")
    p.add_argument("--max-file-mb", type=float, default=None)
    p.add_argument(
        "--allow-pickle-conversion",
        action="store_true",
        help="convert .bin/.pt/.ckpt with torch.load(weights_only=True) instead of refusing",
    )
    p.add_argument(
        "--assume-alpha-equals-rank",
        action="store_true",
        help="accept kohya files without .alpha (kohya's old default alpha = rank)",
    )
    p.add_argument(
        "--report", default=None, help="report JSON path (default OUT/ingest_report.json)"
    )
    p.add_argument(
        "--revision",
        default=None,
        help="branch / tag / refs/pr/N / commit of Hub SRCs without @REV (resolved to one commit "
        "sha, recorded per LoRA as hub_commit)",
    )
    p.add_argument(
        "--download-dir",
        default=None,
        help="keep Hub downloads here (default: a temporary folder under $LORA_ZOO_CACHE, removed)",
    )
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=cmd_ingest, needs_stack=True)

    p = sub.add_parser("merge", help="combine zoos into one with a collection column")
    p.add_argument("zoos", nargs="+", metavar="ZOO")
    p.add_argument("--out", required=True)
    p.add_argument("--names", default=None, help="comma-separated collection names, one per zoo")
    p.add_argument(
        "--separate-configs",
        action="store_true",
        help="allow different base models: one config (sub-zoo) per base model",
    )
    p.set_defaults(func=cmd_merge, needs_stack=True)

    p = sub.add_parser("export", help="write one LoRA of a zoo as a PEFT / diffusers / kohya file")
    p.add_argument("zoo")
    p.add_argument("lora_id")
    p.add_argument("--format", required=True, help=LazyHelp(_formats_help))
    p.add_argument("--out", required=True)
    p.add_argument("--revision", default=None)
    p.set_defaults(func=cmd_export, needs_stack=True)

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


def cmd_ingest(args: argparse.Namespace) -> int:
    from lora_zoo.contrib.ingest import ingest

    rep = ingest(
        args.sources,
        args.out,
        format=args.format,
        metadata=args.metadata,
        labels=[c for c in args.labels.split(",") if c],
        base_model=args.base_model,
        collection=args.collection,
        max_file_mb=args.max_file_mb,
        allow_pickle_conversion=args.allow_pickle_conversion,
        assume_alpha_equals_rank=args.assume_alpha_equals_rank,
        report_path=args.report,
        revision=args.revision,
        download_dir=args.download_dir,
    )
    if args.json:
        print(json.dumps(rep, indent=2, sort_keys=True, default=str))
        return 0
    c = rep["counts"]
    print(
        f"{c['accepted']} accepted, {c['rejected']} rejected, {c['duplicates']} duplicates "
        f"(of {c['candidates']} candidates) -> {rep['out']}"
    )
    for r in rep["rejected"]:
        key = f" [{r['key']}]" if r.get("key") else ""
        print(f"  rejected {r['file']}{key}: {r['error']}: {r['message']}")
    for h in rep.get("hub", []):
        if "commit" in h:
            print(
                f"  hub {h['repo_id']}@{h['commit'][:12]}: {len(h['downloaded'])} files downloaded "
                f"({h['bytes_downloaded']:,} bytes), {h['refused']} refused, "
                f"{len(h['skipped'])} skipped"
            )
    for d in rep["duplicates"]:
        print(f"  duplicate {d['file']} (same content as {d['duplicate_of']})")
    md = rep.get("metadata")
    if md:
        for what in ("missing_rows", "extra_rows"):
            if md[what]:
                print(f"  metadata {what.replace('_', ' ')}: {', '.join(md[what])}")
        for e in md["type_errors"]:
            print(
                f"  metadata type error row {e['row']} column {e['column']}: {e['value']} is not {e['expected']}"
            )
    print(f"report: {rep['report_path']}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lora_zoo.contrib.merge import merge_zoos

    names = [n for n in args.names.split(",")] if args.names else None
    rep = merge_zoos(args.zoos, args.out, names=names, separate_configs=args.separate_configs)
    print(json.dumps(rep, indent=2, sort_keys=True))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lora_zoo.contrib.export import export_lora

    path = export_lora(args.zoo, args.lora_id, args.format, args.out, revision=args.revision)
    print(path)
    return 0


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
