"""``lora-zoo`` command line. One module per verb group; each exposes ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# verb-group modules, in help order
_GROUPS = ("zoo", "build", "hub", "contrib", "demo", "lol")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-zoo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        importlib.import_module(f"lora_zoo.cli.{group}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "needs_stack", False):
        # a transformers/peft pair that transformers refuses fails deep inside a run: say it now
        from lora_zoo.env import stack_problems

        problems = stack_problems()
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        if problems:
            return 2
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # named errors become one clean line, exit 1
        from lora_zoo.errors import LoraZooError

        if isinstance(e, LoraZooError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
