"""The catch-up benchmark's rows and summary: no services involved."""

from __future__ import annotations

from loadtest.catchup import _row, summarize
from loadtest.decisions import Step
from loadtest.openloop import PacingStats, Percentiles


def _step(p99: float, degraded: int) -> Step:
    answered = 20_000
    fallbacks = {"timeout": degraded, "no_signal": 9000, "holdout": 1000}
    latency = Percentiles(1.0, p99, p99 * 2, answered)
    pacing = PacingStats(answered, 20.0, 1.0)
    return Step("slots", 1000, latency, pacing, answered, 0, fallbacks, {"api": 30.0})


def test_rows_count_degradation_only_and_the_rate_the_backlog_was_applied_at() -> None:
    row = _row("yield", _step(7.0, 12), 25.0, 100_000)
    assert row["degraded"] == 12  # cold-start and holdout answers are not degradation
    assert row["degraded_share"] == 12 / 20_000
    assert row["applied_per_s"] == 4000
    assert _row("no-yield", _step(7.0, 0), None, 100_000)["applied_per_s"] is None


def test_summary_takes_medians_of_latency_and_sums_of_degraded_answers() -> None:
    rows = [
        _row("idle", _step(2.0, 0), None, 0),
        _row("idle", _step(4.0, 1), None, 0),
        _row("idle", _step(3.0, 0), None, 0),
        _row("yield", _step(8.0, 2), 24.0, 100_000),
        _row("yield", _step(6.0, 0), 26.0, 100_000),
        _row("yield", _step(7.0, 1), None, 100_000),  # not applied within the wait
        _row("no-yield", _step(20.0, 400), 15.0, 100_000),
    ]
    out = summarize(rows)
    assert out["idle"]["p99"] == 3.0
    assert out["idle"]["undrained"] == 0
    assert out["yield"]["p99"] == 7.0
    assert out["yield"]["degraded"] == 3
    assert out["yield"]["answered"] == 60_000
    assert out["yield"]["drain_s"] == 25.0  # median of the legs that finished
    assert out["yield"]["undrained"] == 1  # and the one that did not is counted, not hidden
    assert out["no-yield"]["degraded"] == 400
