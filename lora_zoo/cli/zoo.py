"""CLI verbs on a zoo folder: ``info``, ``verify``, ``split``, ``env``, ``card``, ``analyze``,
``views``."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="summarize a zoo (splits, columns, ranks, modules, size)")
    p.add_argument("zoo", help="zoo folder (or Hub repo id / fsspec URL)")
    p.add_argument("--revision", default=None)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check shard hashes, row counts, schema; exit 1 on problems")
    p.add_argument("zoo", help="zoo folder, Hub repo id or fsspec URL")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    p.add_argument("--no-hash", action="store_true", help="skip sha256 (sizes/rows/schema only)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("split", help="compute and store a named split of a zoo")
    p.add_argument("zoo", help="zoo folder")
    p.add_argument("--name", required=True)
    p.add_argument("--kind", choices=("random", "group"), default="random")
    p.add_argument("--key", default=None, help="metadata column holding the group (kind=group)")
    p.add_argument(
        "--lists",
        choices=("set", "components"),
        default="set",
        help="how a list-valued group is treated (see lora_zoo.zoo.splits)",
    )
    p.add_argument("--fractions", default="train=0.8,test=0.2")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("env", help="the environment a zoo was built in, and how to recreate it")
    p.add_argument("zoo", help="zoo folder, Hub repo id or fsspec URL")
    p.add_argument("--revision", default=None)
    p.add_argument("--write", default=None, metavar="FILE", help="write its requirements file")
    p.add_argument("--print", dest="show", action="store_true", help="print the requirements")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser(
        "analyze", help="add spectral columns (top singular value, stable/effective/energy rank)"
    )
    p.add_argument("zoo", help="local zoo folder (rewritten in place, atomically)")
    p.add_argument(
        "--base-weights",
        default=None,
        metavar="FILE",
        help="safetensors of the base model's state_dict ('<module>.weight'): adds intruder "
        "dimensions",
    )
    p.add_argument("--intruder-k", type=int, default=10, help="top singular vectors checked")
    p.add_argument("--intruder-eps", type=float, default=0.5, help="|cosine| threshold")
    p.add_argument("--card", action="store_true", help="re-render README.md and plots after")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "views", help="cache invariant views (canonical, svals) beside a zoo; show their state"
    )
    p.add_argument("zoo", help="local zoo folder (the cache goes to ZOO/.cache/views/)")
    p.add_argument(
        "--cache",
        default=None,
        metavar="VIEWS",
        help="comma-separated views to compute and store (resumable), e.g. canonical,svals; "
        "without it, print each cacheable view's cache state",
    )
    p.add_argument("--cache-dir", default=None, help="store the cache here instead")
    p.set_defaults(func=cmd_views)

    p = sub.add_parser("card", help="render README.md (dataset card) and plots of a zoo folder")
    p.add_argument("dir", help="local zoo folder")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--template", default=None, help="a Jinja2 template file to use instead")
    p.add_argument("--stdout", action="store_true", help="print the card instead of writing it")
    p.set_defaults(func=cmd_card)


def summarize(zoo: Any) -> dict[str, Any]:
    """What `info` prints: cheap reads only (rank column, one LoRA's safetensors header)."""
    m = zoo.manifest
    out: dict[str, Any] = {
        "source": str(zoo.source),
        "format_version": m["format_version"],
        "num_rows": len(zoo),
        "num_bytes": sum(sp["num_bytes"] for sp in m["splits"].values()),
        "splits": {
            s: {
                "num_rows": sp["num_rows"],
                "shards": len(sp["shards"]),
                "num_bytes": sp["num_bytes"],
            }
            for s, sp in m["splits"].items()
        },
        "columns": [{k: c[k] for k in ("name", "type", "role")} for c in m["columns"]],
        "info_keys": sorted(m.get("info", {})),
        "named_splits": {n: ns.get("num_rows") for n, ns in m.get("named_splits", {}).items()},
    }
    ranks: Counter[int] = Counter()
    base: Counter[str] = Counter()
    for s in zoo.splits:
        t = zoo[s].table(["rank", "base_model"])
        ranks.update(t.column("rank").to_pylist())
        base.update(t.column("base_model").to_pylist())
    out["ranks"] = {str(k): v for k, v in sorted(ranks.items())}
    out["base_models"] = dict(base)
    first = next((s for s in zoo.splits if len(zoo[s])), None)
    if first is not None:
        from lora_zoo.record import cell_modules

        lid, data, _ = zoo[first].cell(0)
        mods, dtypes = cell_modules(data, file=f"{zoo.source}:{lid}")
        out["modules"] = {"count": len(mods), "first": mods[:3], "last": mods[-1] if mods else None}
        out["dtype"] = dtypes
    return out


def cmd_info(args: argparse.Namespace) -> int:
    from lora_zoo.load.source import load_zoo

    s = summarize(load_zoo(args.zoo, revision=args.revision))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    mb = s["num_bytes"] / 2**20
    print(
        f"zoo {s['source']}  (format v{s['format_version']}): {s['num_rows']} LoRAs, {mb:.2f} MiB"
    )
    for name, sp in s["splits"].items():
        print(f"  split {name:<12} {sp['num_rows']:>8} rows  {sp['shards']:>4} shard(s)")
    print(f"  ranks: {s['ranks']}   base models: {s['base_models']}")
    if "modules" in s:
        md = s["modules"]
        print(f"  modules ({md['count']}): {', '.join(md['first'])}, ... {md['last']}")
        print(f"  weight dtype: {', '.join(s['dtype'])}")
    print("  columns:")
    for c in s["columns"]:
        print(f"    {c['name']:<32} {c['type']:<28} {c['role']}")
    if s["named_splits"]:
        print(f"  named splits: {s['named_splits']}")
    print(f"  info keys: {', '.join(s['info_keys']) or '(none)'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from lora_zoo.remote.pull import verify_source

    problems = verify_source(args.zoo, args.revision, hashes=not args.no_hash)
    return report_problems(args.zoo, problems, ok=f"{args.zoo}: OK")


def cmd_views(args: argparse.Namespace) -> int:
    """Build the asked view caches, then print the state of every cacheable view's cache."""
    from lora_zoo.errors import LoraZooError
    from lora_zoo.load import cache
    from lora_zoo.load.source import load_zoo

    zoo = load_zoo(args.zoo)
    for view in cache.parse_views(args.cache) if args.cache else []:
        cache.build_view_cache(zoo, view, cache_root=args.cache_dir)
    bad = 0
    for view in cache.cacheable_views():
        folder = cache.cache_folder(zoo, view, args.cache_dir)
        try:
            vc = cache.open_view_cache(zoo, view, cache_root=args.cache_dir)
            if vc is not None:
                for split in zoo.splits:
                    vc.table(split)  # every part: sha256 and row ids
        except LoraZooError as e:
            print(f"{view}: not usable: {e}")
            bad += 1
            continue
        print(f"{view}: {'cached, verified' if vc else 'not cached'} ({folder})")
    return 1 if bad else 0


def report_problems(where: object, problems: list[str], *, ok: str) -> int:
    """Print ``verify`` findings (or ``ok``); the exit code every verifying verb returns."""
    if problems:
        print(f"{where}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(ok)
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from lora_zoo.load.source import load_zoo
    from lora_zoo.zoo.splits import make_named_split

    assign = make_named_split(
        load_zoo(args.zoo),
        args.name,
        args.kind,
        args.fractions,
        seed=args.seed,
        key=args.key,
        lists=args.lists,
    )
    sizes = ", ".join(f"{s}={len(v)}" for s, v in assign.items())
    print(f"stored split {args.name!r} ({args.kind}): {sizes}")
    return 0


def _same_text(path: Any, root: Any, text: str) -> bool:
    """The zoo's requirements file holds exactly the checked pins of ``text`` (comments aside)."""
    from lora_zoo._io import read_regular
    from lora_zoo.errors import LoraZooError

    def pins(t: str) -> list[str]:
        return [x for x in t.splitlines() if x.strip() and not x.lstrip().startswith("#")]

    try:
        raw = read_regular(path, root=root, max_bytes=1 << 20).decode("utf-8")
    except (OSError, UnicodeDecodeError, LoraZooError):
        return False
    return pins(raw) == pins(text)


def cmd_env(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lora_zoo import env
    from lora_zoo._io import atomic_write_bytes
    from lora_zoo.errors import ZooFormatError
    from lora_zoo.load.source import load_zoo
    from lora_zoo.zoo.schema import MANIFEST_NAME

    zoo = load_zoo(args.zoo, revision=args.revision)
    stored = (zoo.info.get("provenance") or {}).get("environment")
    if not stored:
        raise ZooFormatError(
            "the zoo records no build environment (ingested or merged zoos have none)",
            file=str(zoo.source),
            key="info.provenance.environment",
        )
    text = env.requirements_text(stored, source=str(zoo.source), file=MANIFEST_NAME)
    if args.show:
        print(text, end="")
        return 0
    b = stored.get("blas") or {}
    print(
        f"built with Python {stored.get('python')} on {stored.get('machine')}; CPU "
        f"{stored.get('cpu')} ({stored.get('cpu_count')} cores, {stored.get('torch_threads')} "
        f"torch threads); GPUs {', '.join(stored.get('gpus') or []) or 'none'}; BLAS torch "
        f"{b.get('torch_blas_info')} / numpy {b.get('numpy_blas')}; "
        f"{len(stored.get('distributions') or {})} distributions"
    )
    print(env.format_drift(env.drift(stored, env.capture())))
    if args.write:
        atomic_write_bytes(Path(args.write), text.encode("utf-8"))  # never through a link
        req = args.write
    else:  # the zoo's own file is a stranger's text: advised only if it is exactly the checked one
        protocol = getattr(zoo.fs, "protocol", ())
        is_local = "file" in (protocol if isinstance(protocol, tuple) else (protocol,))
        local = Path(str(zoo.root)) / env.REQUIREMENTS_NAME
        req = str(local) if is_local and _same_text(local, zoo.root, text) else None
    py = ".".join(str(stored.get("python", "3")).split(".")[:2])
    if req is None:
        print(f"recreate it: lora-zoo env {args.zoo} --write requirements.txt, then")
        req = "requirements.txt"
    else:
        print("recreate it:")
    print(f"  python{py} -m venv zoo-env && . zoo-env/bin/activate && pip install -r {req}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from lora_zoo.cards import render_card, write_card

    if args.stdout:
        print(render_card(args.dir, template=args.template))
        return 0
    path = write_card(args.dir, plots=not args.no_plots, template=args.template)
    print(f"wrote {path}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from lora_zoo.load.spectra import analyze_zoo, read_base_weights

    base = read_base_weights(args.base_weights) if args.base_weights else None
    summary = analyze_zoo(args.zoo, base=base, k=args.intruder_k, eps=args.intruder_eps)
    for col, s in summary["columns"].items():
        print(f"{col:36s} mean {s['mean']:.4g}  median {s['median']:.4g}  max {s['max']:.4g}")
    if args.card:
        from lora_zoo.cards import write_card

        print(f"wrote {write_card(args.zoo)}")
    return 0
