"""The breaker and the adaptive in-flight limit, on a fake clock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from api.fallback import Breaker, Limiter, Pauses, RunQueueClock
from stream_engine.looplag import LoopLag


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_when_most_reads_fail_and_closes_after_a_good_probe() -> None:
    clock = Clock()
    b = Breaker(min_failures=3, ratio=0.5, window_s=1.0, open_s=1.0, clock=clock)
    b.failure()
    b.failure()
    assert b.allow()
    assert b.state == "closed"
    b.failure()
    assert b.state == "open"
    assert not b.allow()
    clock.now = 1.5
    assert b.allow()  # the probe
    assert not b.allow()  # one at a time
    b.success()
    assert b.state == "closed"
    assert b.allow()


def test_a_few_failures_among_many_reads_do_not_open_it() -> None:
    """Overload: some reads time out because the loop was late, most succeed."""
    clock = Clock()
    b = Breaker(min_failures=5, ratio=0.5, clock=clock)
    for i in range(200):
        clock.now = i * 0.004
        b.failure() if i % 5 == 0 else b.success()
    assert b.state == "closed"


def test_failures_just_after_a_window_begins_are_weighed_against_the_one_before() -> None:
    """2,000 reads a second, all fine; then 16 time out together 10 ms into the next
    second. Counted from the window's start, they were 16 of 20 reads and opened it."""
    clock = Clock()
    b = Breaker(min_failures=5, ratio=0.5, window_s=1.0, clock=clock)
    for i in range(2000):
        clock.now = i * 0.0005
        b.success()
    clock.now = 1.005
    for _ in range(4):
        b.success()
    clock.now = 1.010
    for _ in range(16):
        b.failure()
    assert b.state == "closed"


def test_a_redis_that_stops_answering_opens_it_within_the_window() -> None:
    clock = Clock()
    b = Breaker(min_failures=5, ratio=0.5, window_s=1.0, clock=clock)
    for i in range(2000):
        clock.now = i * 0.0005
        b.success()
    opened = None
    for i in range(4000):  # every read from 1.0 s on fails
        clock.now = 1.0 + i * 0.0005
        b.failure()
        if b.state == "open":
            opened = clock.now
            break
    assert opened is not None
    assert opened <= 1.51  # half the reads of the last second failed


def test_a_failed_probe_opens_the_breaker_again() -> None:
    clock = Clock()
    b = Breaker(min_failures=1, open_s=1.0, clock=clock)
    b.failure()
    clock.now = 1.0
    assert b.allow()
    b.failure()
    assert b.state == "open"
    clock.now = 1.5
    assert not b.allow()


def _window(lim: Limiter, clock: Clock, latency: float, n: int) -> None:
    for _ in range(n):
        if lim.try_acquire():
            lim.release(latency)
    clock.now += lim.window_s


def test_limiter_refuses_beyond_the_limit() -> None:
    lim = Limiter(target_s=0.01, initial=4, low=2)
    assert all(lim.try_acquire() for _ in range(4))
    assert not lim.try_acquire()


def test_limiter_shrinks_when_a_window_is_slow_but_not_for_one_slow_request() -> None:
    clock = Clock()
    lim = Limiter(target_s=0.01, initial=100, low=16, clock=clock)
    _window(lim, clock, 0.001, 50)
    for _ in range(50):
        lim.try_acquire()
        lim.release(0.5 if _ == 0 else 0.001)  # one GC pause
    clock.now += lim.window_s
    lim.try_acquire()
    lim.release(0.001)
    assert lim.limit == 100
    for _ in range(30):
        _window(lim, clock, 0.5, 10)
    assert lim.limit == 16  # never below the floor


def test_limiter_grows_only_when_it_is_the_bound() -> None:
    clock = Clock()
    lim = Limiter(target_s=0.01, initial=20, clock=clock)
    for _ in range(10):  # one at a time: the limit is not what bounds us
        _window(lim, clock, 0.001, 10)
    assert lim.limit == 20
    while lim.try_acquire():  # every slot taken, one more refused
        pass
    clock.now += lim.window_s
    for _ in range(20):
        lim.release(0.001)
    assert lim.limit > 20


def _saturated_window(lim: Limiter, clock: Clock, cpu: Clock, share: float) -> None:
    """A window in which every slot of the limit was taken and one more refused, all
    answered fast, the process using `share` of a core."""
    while lim.try_acquire():
        pass
    clock.now += lim.window_s
    cpu.now += share * lim.window_s
    for _ in range(lim.in_flight):
        lim.release(0.001)


def _busy_window(lim: Limiter, clock: Clock, cpu: Clock, share: float, n: int) -> None:
    """A window of n fast requests while the process used `share` of a core."""
    for _ in range(n):
        if lim.try_acquire():
            lim.release(0.001)
    clock.now += lim.window_s
    cpu.now += share * lim.window_s
    lim.try_acquire()
    lim.release(0.001)  # the first release after the window closes it


def test_limiter_sheds_while_the_process_is_near_a_full_core_however_fast_requests_are() -> None:
    clock, cpu = Clock(), Clock()
    # windows of 1/8 s: the fake clock's sums stay exact
    lim = Limiter(target_s=0.01, initial=50, low=16, window_s=0.125, clock=clock,
                  max_cpu_share=0.9, cpu_clock=cpu)  # fmt: skip
    for _ in range(5):
        _busy_window(lim, clock, cpu, 0.5, 10)
    _busy_window(lim, clock, cpu, 1.0, 10)  # one busy window (a refresh, a collection)
    assert lim.cpu_share == pytest.approx(1.0)
    assert lim.limit == 50
    for _ in range(3):
        _busy_window(lim, clock, cpu, 1.0, 10)
    assert lim.limit == 50  # the average has not reached 0.9 yet
    _busy_window(lim, clock, cpu, 1.0, 10)
    assert lim.cpu_smoothed > 0.9
    assert lim.limit == pytest.approx(40)
    for _ in range(40):
        _busy_window(lim, clock, cpu, 0.99, 10)
    assert lim.limit == 1  # below `low` (a floor for slow windows), down to one
    assert lim.try_acquire()
    assert not lim.try_acquire()
    lim.release(0.001)
    clock.now += lim.window_s  # an idle window, but a slow one
    assert lim.try_acquire()
    lim.release(0.5)
    assert lim.cpu_smoothed < 0.9
    assert lim.limit == 1  # a slow window does not lift the limit back to `low`
    # below the share again, and the limit is what bounds: it grows back
    for _ in range(5):
        _saturated_window(lim, clock, cpu, 0.5)
    assert lim.limit > 3


def test_limiter_ignores_the_cpu_share_when_it_is_switched_off() -> None:
    clock, cpu = Clock(), Clock()
    lim = Limiter(target_s=0.01, initial=50, window_s=0.125, clock=clock, cpu_clock=cpu)
    for _ in range(5):
        _busy_window(lim, clock, cpu, 1.0, 10)
    assert lim.cpu_share == pytest.approx(1.0)
    assert lim.limit == 50


class Waits(Clock):
    """A fake run-queue clock: seconds waited for a core, or None (no schedstat)."""

    def __init__(self) -> None:
        super().__init__()
        self.available = True

    def __call__(self) -> float | None:  # type: ignore[override]
        return self.now if self.available else None


def _starved_window(lim: Limiter, clock: Clock, cpu: Clock, waits: Waits, share: float,
                    waited: float) -> None:  # fmt: skip
    """A window of fast requests: the process used `share` of a core and its loop's thread
    waited `waited` of the window for one."""
    waits.now += waited * lim.window_s
    _busy_window(lim, clock, cpu, share, 10)


def test_limiter_sheds_while_the_loop_waits_for_a_core_that_others_hold() -> None:
    clock, cpu, waits = Clock(), Clock(), Waits()
    lim = Limiter(target_s=0.01, initial=50, window_s=0.125, clock=clock, max_cpu_share=0.9,
                  cpu_clock=cpu, max_runqueue_share=0.25, runqueue_clock=waits)  # fmt: skip
    for _ in range(5):  # busy, but with a core to itself
        _starved_window(lim, clock, cpu, waits, 0.8, 0.05)
    assert lim.runqueue_share == pytest.approx(0.05)
    assert lim.limit == 50
    _starved_window(lim, clock, cpu, waits, 0.8, 0.6)  # one starved window is not a trend
    assert lim.limit == 50
    for _ in range(3):  # the machine full: requests queue in front of the loop
        _starved_window(lim, clock, cpu, waits, 0.7, 0.4)
    assert lim.runqueue_smoothed > 0.25
    assert lim.cpu_smoothed < 0.9  # the CPU share alone would never have shed
    assert lim.limit < 50
    for _ in range(40):
        _starved_window(lim, clock, cpu, waits, 0.6, 0.4)
    assert lim.limit == 1
    for _ in range(10):  # a core again: the wait fades and the limit grows back
        _saturated_window(lim, clock, cpu, 0.6)
    assert lim.runqueue_smoothed < 0.25
    assert lim.limit > 3


def test_limiter_leaves_the_waits_to_others_while_the_api_holds_little_of_a_core() -> None:
    clock, cpu, waits = Clock(), Clock(), Waits()
    lim = Limiter(target_s=0.01, initial=50, window_s=0.125, clock=clock, cpu_clock=cpu,
                  max_runqueue_share=0.25, runqueue_clock=waits)  # fmt: skip
    for _ in range(20):  # starved, but shedding would free next to nothing
        _starved_window(lim, clock, cpu, waits, 0.2, 0.6)
    assert lim.runqueue_smoothed > 0.5
    assert lim.limit == 50


def test_limiter_without_a_run_queue_clock_or_switched_off_ignores_the_waits() -> None:
    clock, cpu, waits = Clock(), Clock(), Waits()
    waits.available = False  # not Linux: the clock answers None, and is not asked again
    lim = Limiter(target_s=0.01, initial=50, window_s=0.125, clock=clock, cpu_clock=cpu,
                  max_runqueue_share=0.25, runqueue_clock=waits)  # fmt: skip
    _starved_window(lim, clock, cpu, waits, 0.8, 0.9)
    assert lim.runqueue_clock is None
    off = Limiter(target_s=0.01, initial=50, window_s=0.125, clock=clock, cpu_clock=cpu,
                  max_runqueue_share=0.0, runqueue_clock=Waits())  # fmt: skip
    for _ in range(20):
        _starved_window(off, clock, cpu, waits, 0.8, 0.9)
    assert off.limit == 50
    assert lim.limit == 50


def test_the_run_queue_clock_reads_the_calling_thread_s_wait(tmp_path: Path) -> None:
    stat = tmp_path / "schedstat"
    stat.write_text("60919713 484020000 32\n")  # ns on a core, ns waiting, timeslices
    clock = RunQueueClock(str(stat))
    assert clock() == pytest.approx(0.48402)
    stat.write_text("70000000 1500000000 40\n")  # the same open file, read again
    assert clock() == pytest.approx(1.5)
    stat.write_text("garbage\n")
    assert clock() is None
    assert clock() is None  # off for good: not read again
    assert RunQueueClock(str(tmp_path / "missing"))() is None


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/schedstat"), reason="Linux schedstat")
def test_the_run_queue_clock_on_this_kernel_counts_a_thread_kept_off_its_core() -> None:
    clock = RunQueueClock()
    first = clock()
    assert first is not None
    # Processes spinning on every core twice over: this thread, spinning too, waits its
    # turn for one (about half of the time; a tenth of that is asked for).
    spin = "import time\nt = time.monotonic() + 0.6\nwhile time.monotonic() < t: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin])
                for _ in range(2 * (os.cpu_count() or 1))]  # fmt: skip
    try:
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            pass
    finally:
        for proc in spinners:
            proc.wait()
    later = clock()
    assert later is not None
    assert later - first > 0.02


def test_pauses() -> None:
    p = Pauses()
    p.slots.add("a")
    assert p.paused("a")
    assert not p.paused("b")
    p.everything = True
    assert p.paused("b")


def test_loop_lag_is_the_largest_of_this_window_and_the_last() -> None:
    clock = Clock()
    lag = LoopLag(window_s=0.5, clock=clock)
    lag.record(0.012)
    lag.record(0.001)
    assert lag.recent_s == pytest.approx(0.012)
    clock.now += 0.6  # next window: the last one still counts
    lag.record(0.002)
    assert lag.recent_s == pytest.approx(0.012)
    clock.now += 0.6  # then only the window before
    assert lag.recent_s == pytest.approx(0.002)
    clock.now += 0.6
    assert lag.recent_s == pytest.approx(0.0)


@pytest.mark.parametrize("raw", ["-0.1", "1.5"])
def test_a_cpu_share_outside_zero_to_one_is_refused_with_the_variable_named(raw: str) -> None:
    from api.settings import Settings
    from stream_engine.exceptions import ConfigError

    assert Settings.from_env({"KAIROS_MAX_CPU_SHARE": "0.85"}).max_cpu_share == 0.85
    with pytest.raises(ConfigError, match="KAIROS_MAX_CPU_SHARE"):
        Settings.from_env({"KAIROS_MAX_CPU_SHARE": raw})


def test_the_cpu_share_guard_is_on_at_nine_tenths_unless_set_to_zero() -> None:
    from api.settings import Settings

    assert Settings.from_env({}).max_cpu_share == 0.9
    assert Settings.from_env({"KAIROS_MAX_CPU_SHARE": "0"}).max_cpu_share == 0.0


def test_the_run_queue_guard_is_on_at_a_quarter_and_refuses_shares_outside_zero_to_one() -> None:
    from api.settings import Settings
    from stream_engine.exceptions import ConfigError

    assert Settings.from_env({}).max_runqueue_share == 0.25
    assert Settings.from_env({"KAIROS_MAX_RUNQUEUE_SHARE": "0"}).max_runqueue_share == 0.0
    for raw in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match="KAIROS_MAX_RUNQUEUE_SHARE"):
            Settings.from_env({"KAIROS_MAX_RUNQUEUE_SHARE": raw})
