"""loadtest/search.py and the ingest search's judgement of a live run: no services."""

from __future__ import annotations

from loadtest.ingest import RunResult, misses
from loadtest.openloop import PacingStats, Percentiles
from loadtest.search import highest_held, next_rate


def test_the_ladder_climbs_by_the_factor_in_whole_grains() -> None:
    ladder = [6000]
    while ladder[-1] < 12000:
        ladder.append(next_rate(ladder[-1], 1.1, 500))
    assert ladder == [6000, 6500, 7000, 7500, 8000, 9000, 10000, 11000, 12000]
    assert next_rate(100, 1.1, 500) == 600  # at least one grain up


async def test_a_miss_is_measured_again_and_two_end_the_search() -> None:
    asked: list[int] = []
    flaky = iter([True])  # 7,000/s misses once, then holds

    async def measure(rate: int) -> int:
        asked.append(rate)
        return rate

    def verdict(rate: int) -> str | None:
        if rate == 7000 and next(flaky, False):
            return "noise"
        return "too fast" if rate >= 9000 else None

    found = await highest_held(measure, verdict, 6000, 24000, 1.1, 500)
    assert (found.held, found.stopped) == (8000, "9000/s missed twice: too fast; too fast")
    assert asked == [6000, 6500, 7000, 7000, 7500, 8000, 9000, 9000] == found.steps
    assert found.held_text == "8000/s"
    first = await highest_held(measure, lambda r: "no", 6000, 24000, 1.1, 500)
    assert (first.held, first.stopped) == (0, "6000/s missed twice: no; no")
    assert first.held_text == "below 6000/s (the first rate tried)"


def _live(rate: int, sent: float, growth: float, unseen: int = 0) -> RunResult:
    pacing = PacingStats(int(sent * 20), 20.0, 1.0)
    return RunResult(rate, "faust", Percentiles(5.0, 20.0, 40.0, 100), pacing, unseen, 0,
                     backlog_growth=growth)  # fmt: skip


def test_a_live_run_sustains_its_rate_only_with_flat_lag_all_sent_and_all_seen() -> None:
    assert misses(_live(10000, 9990, 80.0)) is None  # under 1% of the rate
    assert misses(_live(10000, 9990, 150.0)) == "backlog grew +150 events/s"
    assert misses(_live(10000, 9500, 0.0)) == "the generator sent only 9500/s"
    assert misses(_live(10000, 9990, 0.0, unseen=3)) == "3 events never seen in Redis"
