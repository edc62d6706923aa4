"""Degrade, don't fail: the breaker, the in-flight limit and the pause switches.

Each turns a dependency problem or an overload into a precomputed default answered at once,
with the reason in the body, in a header and in the metrics.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class FallbackReason(enum.StrEnum):
    NO_SIGNAL = "no_signal"
    CONSENT = "consent"
    PAUSED = "paused"
    TIMEOUT = "timeout"
    OVERLOAD = "overload"
    STORE_UNAVAILABLE = "store_unavailable"
    HOLDOUT = "holdout"


class Breaker:
    """Circuit breaker on Redis: `threshold` failures in a row open it for `open_s`; then
    one probe at a time is let through, and its success closes it."""

    def __init__(
        self,
        threshold: int = 5,
        open_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.open_s = open_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.open_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.threshold:
            self.opened_at = self.clock()
        self.probing = False


class Limiter:
    """Adaptive bound on requests in flight (AIMD on latency, like TCP congestion control).

    While requests finish under `target_s` the limit grows by about one per limit's worth
    of requests; a request over target shrinks it by `backoff` (at most once per
    `cooldown_s`, so one slow burst is one decrease). Requests beyond the limit are not
    queued: they get the default at once.
    """

    def __init__(
        self,
        target_s: float,
        initial: int = 64,
        low: int = 4,
        high: int = 1024,
        backoff: float = 0.8,
        cooldown_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target_s = target_s
        self.limit = float(initial)
        self.low, self.high = low, high
        self.backoff = backoff
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.in_flight = 0
        self._last_decrease = -1e9

    def try_acquire(self) -> bool:
        if self.in_flight >= int(self.limit):
            return False
        self.in_flight += 1
        return True

    def release(self, latency_s: float) -> None:
        self.in_flight -= 1
        if latency_s > self.target_s:
            now = self.clock()
            if now - self._last_decrease >= self.cooldown_s:
                self._last_decrease = now
                self.limit = max(self.low, self.limit * self.backoff)
        elif self.in_flight >= int(self.limit) - 1:
            # Only grow when the limit is what bounds us; idle capacity proves nothing.
            self.limit = min(self.high, self.limit + 1.0 / self.limit)


@dataclass(slots=True)
class Pauses:
    """The global and per-slot switches (admin API)."""

    everything: bool = False
    slots: set[str] = field(default_factory=set)

    def paused(self, slot: str) -> bool:
        return self.everything or slot in self.slots

    def as_json(self) -> dict[str, object]:
        return {"all": self.everything, "slots": sorted(self.slots)}
