"""CLI verb ``demo``: the quick start in one command (build the quickstart zoo, load it back,
probe its ``svals`` view for group membership, print the table).

Why a verb and not a script: it is the first thing a new user runs after ``pip install``, so it
must work from the installed package (the recipe ships inside it) with no repo checkout.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="build the quickstart zoo, load it, probe it (a few minutes, CPU)"
    )
    p.add_argument("--out", default="quickstart-zoo", help="zoo folder (reused when finished)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a quickstart recipe field (e.g. num_loras=32)",
    )
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of the probe")
    p.add_argument("--probe", action="store_true", help="also run the logistic svals probe")
    p.add_argument("--repeats", type=int, default=2, help="seeds per bench model")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo, needs_stack=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from lora_zoo.lol.demo import run_demo

    t0 = time.perf_counter()
    res = run_demo(
        args.out,
        overrides=args.overrides,
        progress=not args.no_progress,
        folds=args.folds,
        probe=args.probe,
        repeats=args.repeats,
    )
    how = "built" if res.built else "reused"
    print(f"zoo: {res.zoo} ({res.num_loras} LoRAs, {how}) in {time.perf_counter() - t0:.0f} s")
    if res.results:
        print(res.table())
        print()
    print(res.bench_table())
    print(
        "\nbench: trained on the zoo's train split, tested on its test split; baseline = "
        "majority class; symmetry = what the model is invariant to (GL(r): the LoRA symmetry). "
        f"Stored in {res.zoo}/bench/results.json; `lora-zoo bench` runs every reference model."
    )
    print(
        f"load it yourself:  zoo = lora_zoo.load_zoo({str(res.zoo)!r}); "
        "LoraDataset(zoo['train'], view='svals')"
    )
    return 0
