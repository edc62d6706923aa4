"""The drain benchmark's span and summary: a fake clock, no services involved."""

from __future__ import annotations

import math
import os

import pytest

from loadtest.drain import Leg, Span, summarize


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr("loadtest.drain.time.monotonic", fake)
    return fake


def test_the_rate_is_taken_between_a_tenth_and_nine_tenths_of_the_backlog(clock: _Clock) -> None:
    span = Span(1000, {"worker": os.getpid()}, "worker")
    started = clock.now
    clock.now += 5.0  # start-up: nothing applied yet
    assert not span.see(0)
    clock.now += 1.0
    assert not span.see(100)  # the span starts here
    clock.now += 2.0
    assert not span.see(500)
    clock.now += 2.0
    assert span.see(900)  # 800 events in 4 s
    leg = span.leg("faust", 900, started)
    assert leg.rate == 200.0  # not 900 / 10 s: the start-up is left out
    assert leg.finished
    assert "worker" in leg.cpu
    assert leg.us_per_event == pytest.approx(leg.cpu["worker"] / 100 / 200 * 1e6, abs=0.1)


def test_a_leg_that_never_gets_there_reports_its_whole_run_as_unfinished(clock: _Clock) -> None:
    span = Span(1000, {"worker": os.getpid()}, "worker")
    started = clock.now
    clock.now += 1.0
    span.see(200)
    clock.now += 9.0
    assert not span.see(400)
    leg = span.leg("faust", 400, started)
    assert not leg.finished
    assert leg.rate == 40.0  # 400 over the 10 s it ran


def _leg(kind: str, rate: float, cpu: float, finished: bool = True) -> Leg:
    return Leg(kind, 1000, rate, 1000, finished, {"worker": cpu, "consumer": cpu}, 1.0)


def test_the_summary_takes_medians_and_each_engine_as_a_share_of_the_raw_read() -> None:
    legs = [_leg("raw", r, 90) for r in (400_000, 500_000, 600_000)]
    legs += [_leg("faust", r, c) for r, c in ((12_000, 95), (14_000, 96), (13_000, 94))]
    legs += [_leg("aiokafka", 9_000, 90), _leg("aiokafka", 3_000, 50, finished=False)]
    summary = summarize(legs, ["raw", "faust", "aiokafka", "librdkafka"])
    assert summary["raw"]["events_per_s"] == 500_000
    assert summary["raw"]["of_raw"] == 1.0
    assert summary["faust"]["events_per_s"] == 13_000
    assert summary["faust"]["of_raw"] == pytest.approx(0.026)
    assert summary["faust"]["cpu"] == 95
    assert summary["faust"]["all_finished"]
    assert not summary["aiokafka"]["all_finished"]
    assert "librdkafka" not in summary  # not run: no row rather than a made-up one


def test_without_a_raw_leg_the_share_is_not_a_number() -> None:
    summary = summarize([_leg("faust", 10_000, 90)], ["raw", "faust"])
    assert math.isnan(summary["faust"]["of_raw"])
