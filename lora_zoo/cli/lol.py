"""CLI verb group ``lol``: ``lora-zoo bench ZOO --target COLUMN_OR_GLOB``, the reference LoL
models (``lora_zoo.lol.models``) trained on the zoo's train split and tested on its test split.

Why a verb: the first question about a new zoo is "can a model learn the labels from the
weights, and does respecting the GL(r) symmetry help?"; this answers it in one command, stores
the table in the zoo (``bench/results.json``) and ``lora-zoo card`` shows it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lora_zoo.cli import LazyHelp


def _models_help() -> str:
    from lora_zoo.lol.models import all_models

    return "subset of: " + " ".join(i.name for i in all_models())


def _views_help() -> str:
    from lora_zoo.lol.models import all_models

    return "views the models read: " + "; ".join(
        f"{i.name}: {' '.join(i.views)}" for i in all_models() if i.reads_weights
    )


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="train and test the reference LoL models on a zoo's labels")
    p.add_argument("zoo", help="zoo folder, Hub id or URL")
    p.add_argument(
        "--target", required=True, nargs="+", help="label column(s) or globs, e.g. 'in_group.*'"
    )
    p.add_argument("--models", nargs="+", help=LazyHelp(_models_help))
    p.add_argument("--views", nargs="+", help=LazyHelp(_views_help))
    p.add_argument("--repeats", type=int, default=3, help="seeds per model (mean ± std)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument(
        "--gl-augment",
        action="store_true",
        help="also run the non-invariant models with GL(r) augmentation",
    )
    p.add_argument(
        "--epochs", type=int, default=300, help="maximum epochs (early stopping on validation)"
    )
    p.add_argument("--patience", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--hparams", help='JSON {model: {hparam: value}}, e.g. \'{"glnet": {"width": 16}}\''
    )
    p.add_argument(
        "--hold-out",
        metavar="COLUMN",
        help="one fold per value of COLUMN (e.g. trigger_kind): train on the LoRAs with the "
        "other values, test on that value's; written to bench/holdout-COLUMN.json",
    )
    p.add_argument(
        "--preset",
        help="GL-net size preset (membership, attributes, clip_score, llm_accuracy, small), or "
        "several comma-separated to select among on the validation loss; default: the one the "
        "task calls for",
    )
    p.add_argument(
        "--train-sizes",
        type=lambda t: [float(x) for x in t.split(",")],
        help="learning curves: fractions of the fit rows, e.g. 0.1,0.25,0.5,1",
    )
    p.add_argument(
        "--test-zoo", help="train on ZOO's train split, test on this zoo's test split (transfer)"
    )
    p.add_argument(
        "--no-controls",
        action="store_true",
        help="skip the matched-noise control (GL-net on permuted train labels)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples of the test LoRAs for 95%% intervals (0: none)",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train from streamed minibatches (memory flat in the number of LoRAs); default: "
        "only when the train split is over a quarter of physical memory",
    )
    p.add_argument("--json", dest="json_path", help="also write the results here")
    p.add_argument(
        "--no-write", action="store_true", help="do not write bench/results.json into the zoo"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from lora_zoo.lol.bench import TrainConfig, format_table, run_bench

    if args.hold_out:
        return _cmd_hold_out(args)

    res = run_bench(
        args.zoo,
        args.target if len(args.target) > 1 else args.target[0],
        models=args.models,
        views=args.views,
        repeats=args.repeats,
        device=args.device,
        gl_augment=args.gl_augment,
        train=TrainConfig(
            lr=args.lr, max_epochs=args.epochs, patience=args.patience, stream=args.stream
        ),
        hparams=json.loads(args.hparams) if args.hparams else None,
        json_path=args.json_path,
        write=not args.no_write,
        progress=not args.no_progress,
        preset=args.preset,
        controls=not args.no_controls,
        train_sizes=args.train_sizes,
        test_zoo=args.test_zoo,
        bootstrap=args.bootstrap,
    )
    print(format_table(res))
    print(
        f"\n{res['time_s']:.0f} s on {res['device']}"
        + (f"; results in {res['written']}" if "written" in res else "")
    )
    return 0


def _cmd_hold_out(args: argparse.Namespace) -> int:
    """``bench --hold-out COLUMN``: one fold per value of the column (``lol/holdout.py``)."""
    from lora_zoo.lol.bench import TrainConfig
    from lora_zoo.lol.holdout import format_hold_out, run_hold_out

    if args.gl_augment or args.json_path:
        raise SystemExit("--hold-out takes neither --gl-augment nor --json")
    res = run_hold_out(
        args.zoo,
        args.target if len(args.target) > 1 else args.target[0],
        args.hold_out,
        models=args.models,
        views=args.views,
        repeats=args.repeats,
        device=args.device,
        train=TrainConfig(lr=args.lr, max_epochs=args.epochs, patience=args.patience),
        hparams=json.loads(args.hparams) if args.hparams else None,
        write=not args.no_write,
        progress=not args.no_progress,
    )
    print(format_hold_out(res))
    print(
        f"\n{res['time_s']:.0f} s" + (f"; results in {res['written']}" if "written" in res else "")
    )
    return 0
