"""Yielding Redis to the API: a worker that catches up a backlog paces itself while the
decision API says its reads are slow.

A worker restarted behind a backlog applies it as fast as it can, and Redis (and, on a
shared box, the CPU) goes to it. The API's reads then wait: while a worker caught up 100k
events, 13-16% (faust) and 35-47% (aiokafka) of the decisions at 1,000/s fell back
(timeouts, then the breaker); yielding, 0.01%, and the backlog took 26-28 s instead of
12-18 s (`python -m loadtest catchup`, loadtest/JOURNAL.md, session 19).

The API counts its slow reads (api/pressure.py) and, in a 100 ms window that had enough of
them, increments one counter in Redis (`Keys.pressure`). The worker reads that counter
every 100 ms: when it went up, the worker halves the rate it applies at (never below
`yield_min_rate`); while it stays put, the rate climbs back by `yield_min_rate` a second
and the limit goes once it has been quiet for a few seconds. A worker starts at the floor
and climbs the same way (a slow start). Under a limit a batch goes in slices of what the
limit allows at once (BURST_S of it), so Redis sees the rate evenly rather than a 500-event
write every quarter second. A worker that keeps up never meets its limit, so in normal
running this costs nothing: the limit only binds a worker that is applying faster than
the API can bear, which is a worker catching up.

A counter rather than timestamps: no clocks to compare between hosts. Every API instance
increments the same key; the worker only asks whether any did since it last looked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from stream_engine.state import stored_int

log = logging.getLogger("kairos.worker")

WATCH_EVERY_S = 0.1  # how often the worker reads the counter
WATCH_TIMEOUT_S = 1.0
DECREASE = 0.5  # a report halves the rate
HOLD_S = 0.3  # after a cut, reports are not acted on again for this long (they lag it)
RELEASE_S = 5.0  # this long without a report and the limit goes
BURST_S = 0.05  # a paced worker may apply this much of its rate at once
RATE_WINDOW_S = 0.5  # the applied rate a cut starts from is measured over this long


@dataclass(slots=True)
class Governor:
    """The rate a worker may apply events at (None: no limit). `admit(n)` before applying
    n events waits out the limit; `tick(reported)` every WATCH_EVERY_S moves it.

    A worker starts the way TCP does, at the floor, climbing by `min_rate` a second from
    its first batch, and with no limit once RELEASE_S have passed without a report: a
    worker started behind a backlog would otherwise take Redis for the 0.2-0.4 s the API's
    first report takes to reach it, and that is where most of the decisions that still
    fell back did (loadtest/JOURNAL.md, session 19). A worker started on a quiet stream is
    free after its first 5 s."""

    min_rate: float  # events/s applied whatever the API says
    enabled: bool = True
    limit: float | None = None
    tokens: float = 0.0
    stamp: float = 0.0  # when tokens were last topped up
    held_until: float = 0.0
    quiet_since: float | None = None  # the last report (or first batch); None: no batch yet
    waited_s: float = 0.0  # time spent waiting on the limit, in all
    _applied: deque[tuple[float, int]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.enabled and self.limit is None:
            self.limit = self.min_rate  # the slow start

    async def admit(self, n: int) -> None:
        """Wait until n more events fit under the limit (at once when there is none)."""
        wait = self.charge(n, time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)

    def charge(self, n: int, now: float) -> float:
        """Counts n events admitted at `now`; how long they must wait (seconds)."""
        self._count(now, n)
        limit = self.limit
        if limit is None:
            return 0.0
        if self.quiet_since is None:  # the first batch: the slow start's clock starts
            self.quiet_since = self.stamp = now
            self.tokens = limit * BURST_S
        self.tokens = min(limit * BURST_S, self.tokens + (now - self.stamp) * limit) - n
        self.stamp = now
        if self.tokens >= 0:
            return 0.0
        wait = -self.tokens / limit
        self.waited_s += wait
        return wait

    def slice(self) -> int | None:
        """The most events to apply at once under the limit (None: no limit)."""
        return None if self.limit is None else max(1, int(self.limit * BURST_S))

    def rate(self, now: float) -> float:
        """Events admitted per second over the last RATE_WINDOW_S."""
        self._trim(now)
        return sum(n for _, n in self._applied) / RATE_WINDOW_S

    def tick(self, reported: bool, now: float) -> None:
        if not self.enabled:
            return
        if reported:
            self.quiet_since = now
            if now < self.held_until:
                return
            rate = self.rate(now)
            base = rate if self.limit is None else min(self.limit, rate)
            if self.limit is None:
                self.tokens, self.stamp = 0.0, now
                log.info("the API reports slow reads: applying at most %.0f events/s",
                         max(self.min_rate, base * DECREASE))  # fmt: skip
            self.limit = max(self.min_rate, base * DECREASE)
            self.held_until = now + HOLD_S
        elif self.limit is not None and self.quiet_since is not None:
            if now - self.quiet_since >= RELEASE_S:
                self.limit = None
                log.info("no slow reads reported for %.0f s: no limit", RELEASE_S)
            else:
                self.limit += self.min_rate * WATCH_EVERY_S

    def _count(self, now: float, n: int) -> None:
        self._applied.append((now, n))
        self._trim(now)

    def _trim(self, now: float) -> None:
        applied = self._applied
        while applied and applied[0][0] < now - RATE_WINDOW_S:
            applied.popleft()


@dataclass(slots=True)
class PressureWatch:
    """The worker's side of the counter: has any API incremented it since the last look?
    The first look only learns where it stands; a counter that expired counts from 0."""

    last: int | None = None

    def seen(self, raw: bytes | str | None) -> bool:
        value = stored_int(raw) or 0  # none, or not a number (written by something else)
        went_up = self.last is not None and value > self.last
        self.last = value
        return went_up
