"""``lora-zoo`` command line. One module per verb group; each exposes ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

# verb-group modules, in help order
_GROUPS = ("zoo", "build", "hub", "contrib", "demo", "lol")


class LazyHelp(str):
    """An argparse help text computed only when help is printed: the names a registry holds
    (views, LoL models, formats, backends) come from importing the plug-ins, which building the
    parser must not do (``lora-zoo --help`` stays instant)."""

    def __new__(cls, text: Callable[[], str]) -> LazyHelp:
        obj = super().__new__(cls, "(computed when help is printed)")
        obj.text = text  # type: ignore[attr-defined]
        return obj

    def __mod__(self, params: object) -> str:  # argparse expands help with ``help % params``
        return str(self.text()) % params  # type: ignore[attr-defined]


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
