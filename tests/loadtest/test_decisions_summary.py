"""The decisions benchmark's summary arithmetic: no services involved."""

from __future__ import annotations

from loadtest.decisions import Step, summarize
from loadtest.openloop import PacingStats, Percentiles


def _step(kind: str, rate: int, p99: float, api_cpu: float, degraded: int = 0) -> Step:
    answered = rate * 10
    latency = Percentiles(1.0, p99, p99 * 2, answered)
    pacing = PacingStats(answered, 10.0, 1.0)
    fallbacks = {"timeout": degraded, "holdout": 7}
    return Step(kind, rate, latency, pacing, answered, 0, fallbacks, {"api": api_cpu})


def test_cpu_per_request_and_the_decision_cost_above_the_baseline() -> None:
    steps = [
        _step("static", 1000, 2.0, 10.0), _step("static", 1000, 3.0, 12.0),
        _step("static", 1000, 2.5, 11.0),
        _step("slots", 1000, 5.0, 50.0), _step("slots", 1000, 4.0, 60.0, degraded=20),
        _step("slots", 1000, 6.0, 55.0),
    ]  # fmt: skip
    assert steps[3].api_us_per_request == 500.0  # 50% of a core at 1,000 requests/s
    out = summarize(steps, [1000])["rates"]["1000"]
    assert out["static"]["api_cpu_us_per_request"] == 110
    assert out["slots"]["api_cpu_us_per_request"] == 550
    assert out["decision_cpu_us"] == 440
    assert out["p99_over_baseline"] == 2.0  # medians: 5.0 / 2.5
    # holdout answers are not degradation; the worst repeat is reported
    assert out["slots"]["degraded_share_max"] == 20 / 10000
    assert out["slots"]["degraded_share_all"] == 20 / 30000  # all three repeats' answers


def test_a_rate_answered_fast_by_shedding_to_the_defaults_is_not_held() -> None:
    steps = [
        _step("static", 1000, 2.0, 10.0), _step("slots", 1000, 5.0, 50.0, degraded=50),
        _step("static", 2000, 2.0, 20.0), _step("slots", 2000, 5.0, 90.0, degraded=5000),
    ]  # fmt: skip
    held = summarize(steps, [1000, 2000])["highest_rate_p99_within_slo"]
    assert held == {"static": 2000, "slots": 1000}  # 2,000/s: p99 5 ms, but 25% defaults


def test_the_machine_speed_probe_is_the_median_over_the_repeats_that_have_one() -> None:
    steps = [_step("static", 1000, 2.0, 10.0), _step("slots", 1000, 5.0, 50.0)] * 3
    for step, probe in zip(steps, [0.8, 1.3, None, 1.0, 0.9, 1.1], strict=True):
        step.probe_ms = probe
    out = summarize(steps, [1000])["rates"]["1000"]
    assert out["static"]["probe_ms"] == 0.9  # 0.8 and 1.0 (None: no sample)
    assert out["slots"]["probe_ms"] == 1.1  # 1.3, 0.9, 1.1


def test_the_split_inside_the_api_reads_the_apis_own_histograms() -> None:
    from prometheus_client import generate_latest

    from api.metrics import ApiMetrics
    from loadtest.decisions import api_split

    m = ApiMetrics()
    m.handled("slots", 0.050)  # before the step: not counted
    before = generate_latest(m.registry).decode()
    for _ in range(99):
        m.handled("slots", 0.0009)
        m.handled("decisions", 0.040)  # another endpoint
        m.state_read.observe(0.0004)
    m.handled("slots", 0.009)
    m.state_read.observe(0.004)
    split = api_split(before, generate_latest(m.registry).decode(), "slots")
    # in the bucket of what the step observed, not of the slow request before it
    assert 0.5 < (split["handler_p50_ms"] or 0) <= 1.0
    assert 0.5 < (split["handler_p99_ms"] or 0) <= 1.0
    assert 0.25 < (split["read_p50_ms"] or 0) <= 0.5
    assert api_split(before, before, "slots")["read_p99_ms"] is None  # nothing observed
    assert api_split(before, before, None) == {}  # the static baseline has none

    steps = [_step("static", 1000, 2.0, 10.0)]
    for read_p99 in (1.0, None, 3.0):
        s = _step("slots", 1000, 5.0, 50.0)
        s.inside.update({"read_p99_ms": read_p99, "handler_p99_ms": 2.0})
        steps.append(s)
    inside = summarize(steps, [1000])["rates"]["1000"]["slots"]["inside"]
    assert inside == {"handler_p99_ms": 2.0, "read_p99_ms": 2.0}  # the repeats that had it


def test_the_search_climbs_a_quarter_at_a_time_in_steps_of_250() -> None:
    from loadtest.decisions import SEARCH_FACTOR, SEARCH_GRAIN
    from loadtest.search import next_rate

    ladder = [1000]
    while ladder[-1] < 6000:
        ladder.append(next_rate(ladder[-1], SEARCH_FACTOR, SEARCH_GRAIN))
    assert ladder == [1000, 1250, 1500, 2000, 2500, 3000, 3750, 4750, 6000]
    assert next_rate(250, SEARCH_FACTOR, SEARCH_GRAIN) == 500  # never less than one grain up


def test_a_step_misses_on_errors_latency_or_degradation_and_says_which() -> None:
    from loadtest.decisions import misses

    assert misses(_step("slots", 1000, 9.9, 50.0)) is None
    assert misses(_step("slots", 1000, 10.5, 50.0)) == "p99 10.50 ms"
    assert misses(_step("slots", 1000, 5.0, 50.0, degraded=200)) == "2.00% degraded"
    late = _step("static", 8000, 30.0, 50.0)
    late.pacing = PacingStats(late.answered, 10.0, 12.0)
    assert misses(late) == "p99 30.00 ms (the generator 12.0 ms late at p99)"
    failed = _step("slots", 1000, 2.0, 50.0)
    failed.errors = 3
    assert misses(failed) == "3 errors"


async def test_the_search_stops_at_the_first_rate_that_misses_twice() -> None:
    """A lone miss is measured again (a noisy minute); two in a row end the search."""
    from loadtest.decisions import find_max, search_text

    asked: list[tuple[str, int]] = []
    flaky = iter([True, False])  # 2,000/s misses once, then holds

    async def measure_at(kind: str, rate: int) -> Step:
        asked.append((kind, rate))
        if kind == "static":
            return _step(kind, rate, 20.0 if rate >= 3000 else 2.0, 10.0)
        bad = rate >= 2500 or (rate == 2000 and next(flaky))
        return _step(kind, rate, 12.0 if bad else 4.0, 50.0)

    static = await find_max(measure_at, "static", 1000, 16000)
    slots = await find_max(measure_at, "slots", 1000, 16000)
    assert (static.held, slots.held) == (2500, 2000)
    assert asked == [("static", r) for r in (1000, 1250, 1500, 2000, 2500, 3000, 3000)] + [
        ("slots", r) for r in (1000, 1250, 1500, 2000, 2000, 2500, 2500)
    ]
    assert slots.stopped == "2500/s missed twice: p99 12.00 ms; p99 12.00 ms"
    assert len(slots.steps) == 7  # every step measured is kept for the results file
    assert search_text(static, slots).endswith("slots / baseline 0.80 (#4: at least 0.5)")
    capped = await find_max(measure_at, "static", 1000, 1300)
    assert (capped.held, capped.stopped) == (1250, "reached the cap, 1300/s")


def test_a_step_says_why_its_answers_degraded_biggest_reason_first() -> None:
    step = _step("slots", 1000, 5.0, 50.0, degraded=3)
    step.fallbacks.update(overload=40, store_unavailable=1)
    assert step.degraded_text == "0.44% (overload 40, timeout 3, store_unavailable 1)"
    assert _step("slots", 1000, 5.0, 50.0).degraded_text == "0.00%"  # holdout is not listed
