"""progress.track: a few readable log lines when stderr is not a terminal (issue 20: the demo's
log was 1,620 lines, 1,395 of them tqdm refreshes), a bar on a terminal, nothing when off."""

from __future__ import annotations

import logging

import pytest

from lora_zoo import progress


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    monkeypatch.setenv(progress.ENV, "log")
    return c


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lora_zoo.progress"]


def test_outer_task_logs_at_most_one_line_per_interval_with_rate_and_eta(clock, caplog):
    caplog.set_level(logging.INFO, logger="lora_zoo.progress")
    for _ in progress.track(range(100), desc="build", unit="lora"):
        clock.t += 1.0  # 1 s per LoRA: 100 s in all, a line every >= 30 s
    lines = _lines(caplog)
    assert 3 <= len(lines) <= 5, lines  # ~3 progress lines + the final one, never 100
    assert lines[0].startswith("build: 30/100 lora (1.00 lora/s, ETA 1:10)")
    assert lines[-1] == "build: 100/100 lora in 1:40 (1.00 lora/s)"


def test_update_api_and_initial_count_for_a_resumed_build(clock, caplog):
    caplog.set_level(logging.INFO, logger="lora_zoo.progress")
    bar = progress.track(total=10, initial=4, desc="zoo", unit="lora")
    clock.t += 40
    bar.update(2)  # 2 LoRAs in 40 s: the rate counts only this run's work
    bar.close()
    bar.close()  # idempotent
    assert _lines(caplog) == [
        "zoo: 6/10 lora (20.0 s/lora, ETA 1:20)",
        "zoo: 6/10 lora in 0:40 (20.0 s/lora)",
    ]


def test_inner_loops_are_silent_unless_long(clock, caplog):
    caplog.set_level(logging.INFO, logger="lora_zoo.progress")
    for _ in progress.track(range(50), desc="train 4 LoRAs", unit="step", nested=True):
        clock.t += 0.5  # 25 s: no line at all
    assert _lines(caplog) == []
    for _ in progress.track(range(10), desc="long chunk", unit="step", nested=True):
        clock.t += 100.0  # 1,000 s: a heartbeat every 300 s, and the end
    lines = _lines(caplog)
    assert len(lines) == 4 and lines[-1].startswith("long chunk: 10/10 step in 16:40")


def test_disabled_and_off_log_nothing(clock, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="lora_zoo.progress")
    for _ in progress.track(range(100), desc="x", enabled=False):
        clock.t += 10
    monkeypatch.setenv(progress.ENV, "off")
    for _ in progress.track(range(100), desc="y"):
        clock.t += 10
    assert _lines(caplog) == []


def test_mode_follows_stderr_unless_forced(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)

    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress.sys, "stderr", Tty())
    assert progress.mode() == "bar"
    from tqdm.auto import tqdm

    bar = progress.track(range(3), desc="t")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setattr(progress.sys, "stderr", None)
    assert progress.mode() == "log"
    monkeypatch.setenv(progress.ENV, "bar")
    assert progress.mode() == "bar"
