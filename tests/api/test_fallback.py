"""The breaker and the adaptive in-flight limit, on a fake clock."""

from __future__ import annotations

from api.fallback import Breaker, Limiter, Pauses


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_failures_and_closes_after_a_good_probe() -> None:
    clock = Clock()
    b = Breaker(threshold=3, open_s=1.0, clock=clock)
    for _ in range(2):
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


def test_a_failed_probe_opens_the_breaker_again() -> None:
    clock = Clock()
    b = Breaker(threshold=1, open_s=1.0, clock=clock)
    b.failure()
    clock.now = 1.0
    assert b.allow()
    b.failure()
    assert b.state == "open"
    clock.now = 1.5
    assert not b.allow()


def test_limiter_refuses_beyond_the_limit_and_shrinks_on_slow_requests() -> None:
    clock = Clock()
    lim = Limiter(target_s=0.01, initial=4, low=2, cooldown_s=0.1, clock=clock)
    assert all(lim.try_acquire() for _ in range(4))
    assert not lim.try_acquire()
    lim.release(0.05)  # slow: shrink
    assert lim.limit < 4
    lim.release(0.05)  # within the cooldown: no second decrease
    assert lim.limit == 4 * 0.8
    for _ in range(2):
        lim.release(0.001)
    assert lim.in_flight == 0
    for _ in range(50):
        clock.now += 1
        lim.release(0.5) if lim.try_acquire() else None
    assert lim.limit == 2  # never below the floor


def test_limiter_grows_only_when_it_is_the_bound() -> None:
    lim = Limiter(target_s=0.01, initial=4)
    for _ in range(100):  # one at a time: the limit is not what bounds us
        assert lim.try_acquire()
        lim.release(0.001)
    assert lim.limit == 4
    for _ in range(100):
        while lim.try_acquire():
            pass
        for _ in range(int(lim.limit)):
            lim.release(0.001)
    assert lim.limit > 4


def test_pauses() -> None:
    p = Pauses()
    p.slots.add("a")
    assert p.paused("a")
    assert not p.paused("b")
    p.everything = True
    assert p.paused("b")
