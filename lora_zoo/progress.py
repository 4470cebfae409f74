"""Progress for long work: a tqdm bar on a terminal, a few readable log lines everywhere else.

Why not tqdm everywhere: redirected to a file (CI, Slurm, ``nohup``), tqdm writes one line per
refresh, with escape codes for nested bars; ``lora-zoo demo > log`` was 1,620 lines, 1,395 of
them progress. Why not silence: a Slurm job that prints nothing for an hour looks hung.

So ``track`` picks by where stderr goes:

- a terminal: a tqdm bar (nested bars clean up after themselves);
- anything else: for an outer task (``nested=False``) one INFO line when an update lands at
  least ``every`` seconds after the last line (default 30 s), with count, rate and ETA, and one
  line at the end; for an inner loop (``nested=True``: the steps inside one chunk) nothing,
  unless it runs long, then a heartbeat line every ``every`` seconds (default 300 s: the outer
  task's line per chunk already carries the rate; this only shows a long chunk is alive).

``LORA_ZOO_PROGRESS=bar|log|off`` overrides the choice (tests use ``log`` to see the lines).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

log = logging.getLogger("lora_zoo.progress")

T = TypeVar("T")
ENV = "LORA_ZOO_PROGRESS"


def mode() -> str:
    """``bar`` on a terminal, else ``log``; ``$LORA_ZOO_PROGRESS`` (bar / log / off) wins."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("bar", "log", "off"):
        return forced
    try:
        return "bar" if sys.stderr.isatty() else "log"
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return "log"


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class _LogProgress(Generic[T]):
    """The non-terminal half of ``track`` (module docstring)."""

    def __init__(
        self,
        iterable: Iterable[T] | None,
        *,
        total: int | None,
        desc: str,
        unit: str,
        initial: int,
        nested: bool,
        every: float | None,
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None else _len(iterable)
        self.desc, self.unit, self.nested = desc, unit, nested
        self.n = self.start_n = initial
        self.every = every if every is not None else (300.0 if nested else 30.0)
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None, "track() without an iterable: call update()"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> _LogProgress[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, now: float, done: bool = False) -> str:
        elapsed = now - self.t0
        made = self.n - self.start_n
        rate = made / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        rate_s = (
            f"{rate:.2f} {self.unit}/s"
            if rate >= 0.1
            else f"{1 / rate:.1f} s/{self.unit}"
            if rate
            else "-"
        )
        if done:
            return f"{self.desc}: {count} {self.unit} in {_fmt_time(elapsed)} ({rate_s})"
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {_fmt_time((self.total - self.n) / rate)}"
        return f"{self.desc}: {count} {self.unit} ({rate_s}{eta})"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every and not (self.total and self.n >= self.total):
            self.last = now
            log.info("%s", self._line(now))

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Accepted for tqdm compatibility; log lines stay short."""

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        # an inner loop reports its end only if it ran long enough to have sent a heartbeat
        if not self.nested or now - self.t0 >= self.every:
            log.info("%s", self._line(now, done=True))


def _len(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def track(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    initial: int = 0,
    nested: bool = False,
    every: float | None = None,
) -> Any:
    """Iterate ``iterable`` (or call ``update(n)``) with progress shown as the module docstring
    says. ``enabled=False`` (a caller's ``progress=False``) shows nothing at all."""
    m = mode() if enabled else "off"
    if m == "bar":
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=not nested)
    if m == "off":
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=True)
    return _LogProgress(
        iterable, total=total, desc=desc, unit=unit, initial=initial, nested=nested, every=every
    )
