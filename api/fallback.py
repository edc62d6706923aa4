"""Degrade, don't fail: the breaker, the in-flight limit and the pause switches.

Each turns a dependency problem or an overload into a precomputed default answered at once,
with the reason in the body, in a header and in the metrics.
"""

from __future__ import annotations

import enum
import os
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
    """Circuit breaker on Redis, by failure rate: over the last `window_s`, at least
    `min_failures` failures that are at least `ratio` of the reads open it for `open_s`;
    then one probe at a time is let through, and its success closes it.

    A rate rather than "n failures in a row": under CPU overload a few reads time out
    because the event loop was late, not because Redis was; those must not switch every
    visitor to the default for a whole second. The last `window_s` is the current window
    plus the part of the previous one it still covers (its counts weighted by that part):
    with windows counted from zero, a handful of timeouts just after a window began were
    most of its reads, and at 2,000 requests/s 16 of them opened the breaker for a second
    on a healthy Redis (10% of a step's answers; loadtest/JOURNAL.md, session 31).
    """

    def __init__(
        self,
        min_failures: int = 5,
        ratio: float = 0.5,
        window_s: float = 1.0,
        open_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_failures = min_failures
        self.ratio = ratio
        self.window_s = window_s
        self.open_s = open_s
        self.clock = clock
        self.opened_at: float | None = None
        self.probing = False
        self._window_start = clock()
        self._reads = 0
        self._failures = 0
        self._last_reads = 0  # the previous window's
        self._last_failures = 0

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

    def _count(self, failed: bool) -> float:
        """Counts a read; returns the share of the previous window's counts still in."""
        now = self.clock()
        elapsed = now - self._window_start
        if elapsed >= self.window_s:
            if elapsed < 2 * self.window_s:
                self._last_reads, self._last_failures = self._reads, self._failures
            else:  # a whole window without reads between
                self._last_reads = self._last_failures = 0
            self._window_start, self._reads, self._failures = now, 0, 0
            elapsed = 0.0
        self._reads += 1
        self._failures += failed
        return 1.0 - elapsed / self.window_s

    def _reset(self) -> None:
        self._reads = self._failures = self._last_reads = self._last_failures = 0

    def success(self) -> None:
        self._count(False)
        if self.opened_at is not None:
            self.opened_at = None
            self._reset()
        self.probing = False

    def failure(self) -> None:
        last = self._count(True)
        failures = self._failures + last * self._last_failures
        reads = self._reads + last * self._last_reads
        if self.probing or (failures >= self.min_failures and failures >= self.ratio * reads):
            self.opened_at = self.clock()
            self._reset()
        self.probing = False


# Weight of the latest window in the CPU share the limiter acts on: one busy window (a
# refresh tick, a collection) does not shrink the limit; from 70% of a core, four windows
# in a row at a full core do.
CPU_SMOOTHING = 0.3
# The run-queue signal counts only while the API itself uses this much of a core: shedding
# frees a core only for a process that holds a good part of one (below it the waits are
# the other tenants' doing, and the defaults would cost personalization for nothing).
RUNQUEUE_MIN_CPU_SHARE = 0.5


class RunQueueClock:
    """Seconds the calling thread has spent runnable but waiting for a core (Linux's
    /proc/thread-self/schedstat, its second field), one pread a call. The file is opened by
    the first call, so it is the event loop's thread when the limiter makes that call (its
    windows close in `release`, on the loop). Returns None where there is no such file (not
    Linux) or it cannot be read: the signal is then off."""

    def __init__(self, path: str = "/proc/thread-self/schedstat") -> None:
        self.path = path
        self._fd: int | None = None
        self._off = False

    def __call__(self) -> float | None:
        if self._off:
            return None
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            self._off = True
            return None


class Limiter:
    """Adaptive bound on requests in flight (AIMD, like TCP congestion control), decided per
    window of `window_s`: the limit shrinks by `backoff` down to one when this process used
    more than `max_cpu_share` of a core (`cpu_clock`: its CPU time; a moving average over
    windows, `CPU_SMOOTHING`; 0 = never), else down to `low` when more than `slow_share` of
    the window's requests took longer than `target_s`; when the limit was reached in a
    window without either, it grows by a tenth. Requests beyond the limit are not queued:
    they get the default at once. Windows, not single requests, so one GC pause is not an
    overload.

    Why the CPU share: one event loop does everything, so a saturated process queues new
    requests in front of its loop, where no handler's latency sees them, while the few in
    flight still finish fast (and stay under any floor like `low`). Shedding decisions
    before the core is full keeps the answers in budget: at 3x the sustainable rate, p99
    5 ms against 17-22 ms on latency alone (loadtest/JOURNAL.md, session 11). Slow requests
    alone keep the floor: on a machine whose other tenants are the overload (the worker,
    Redis), the process is not the one to shed.
    """

    def __init__(
        self,
        target_s: float,
        initial: int = 64,
        low: int = 16,
        high: int = 1024,
        backoff: float = 0.8,
        window_s: float = 0.1,
        slow_share: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        max_cpu_share: float = 0.0,  # 0: latency alone
        cpu_clock: Callable[[], float] = time.process_time,
        max_runqueue_share: float = 0.0,  # 0: the run queue is not watched
        runqueue_clock: Callable[[], float | None] | None = None,
    ) -> None:
        self.target_s = target_s
        self.limit = float(initial)
        self.low, self.high = low, high
        self.backoff = backoff
        self.window_s = window_s
        self.slow_share = slow_share
        self.clock = clock
        self.max_cpu_share = max_cpu_share
        self.cpu_clock = cpu_clock
        self.in_flight = 0
        self.cpu_share = 0.0  # over the last whole window
        self.cpu_smoothed = 0.0  # moving average over windows: what `max_cpu_share` is for
        self.max_runqueue_share = max_runqueue_share
        self.runqueue_clock = runqueue_clock if max_runqueue_share > 0 else None
        self.runqueue_share = 0.0  # of the last whole window: the loop waited for a core
        self.runqueue_smoothed = 0.0  # as cpu_smoothed: what max_runqueue_share is for
        self._window_start = clock()
        self._window_cpu = cpu_clock()
        self._window_runqueue: float | None = None  # read first in the loop's thread
        self._done = 0
        self._slow = 0
        self._saturated = False

    def try_acquire(self) -> bool:
        if self.in_flight >= int(self.limit):
            self._saturated = True
            return False
        self.in_flight += 1
        return True

    def release(self, latency_s: float) -> None:
        self.in_flight -= 1
        self._done += 1
        self._slow += latency_s > self.target_s
        now = self.clock()
        if now - self._window_start < self.window_s:
            return
        cpu = self.cpu_clock()
        elapsed = now - self._window_start
        self.cpu_share = (cpu - self._window_cpu) / elapsed
        self.cpu_smoothed += CPU_SMOOTHING * (self.cpu_share - self.cpu_smoothed)
        starved = self._starved(elapsed)  # every window: its reading starts the next
        hot = starved or 0 < self.max_cpu_share < self.cpu_smoothed
        if hot:  # down to one: a CPU-bound overload has few requests in flight at a time
            self.limit = max(1.0, self.limit * self.backoff)
        elif self._slow > self.slow_share * self._done:  # slow, not busy: keep `low`
            self.limit = max(min(self.low, self.limit), self.limit * self.backoff)
        elif self._saturated:
            self.limit = min(self.high, self.limit * 1.1 + 1)
        self._window_start, self._done, self._slow, self._saturated = now, 0, 0, False
        self._window_cpu = cpu

    def _starved(self, elapsed: float) -> bool:
        """Whether the event loop's thread spent more than `max_runqueue_share` of the recent
        windows waiting for a core while this process used at least RUNQUEUE_MIN_CPU_SHARE
        of one: the machine is full and requests wait in front of the loop, unseen by any
        handler's latency and by this process's own CPU share."""
        if self.runqueue_clock is None:
            return False
        wait = self.runqueue_clock()
        if wait is None:
            self.runqueue_clock = None
            return False
        if self._window_runqueue is not None:
            self.runqueue_share = (wait - self._window_runqueue) / elapsed
            self.runqueue_smoothed += CPU_SMOOTHING * (self.runqueue_share - self.runqueue_smoothed)
        self._window_runqueue = wait
        return (self.max_runqueue_share < self.runqueue_smoothed
                and self.cpu_smoothed >= RUNQUEUE_MIN_CPU_SHARE)  # fmt: skip


@dataclass(slots=True)
class Pauses:
    """The global and per-slot switches (admin API)."""

    everything: bool = False
    slots: set[str] = field(default_factory=set)

    def paused(self, slot: str) -> bool:
        return self.everything or slot in self.slots

    def as_json(self) -> dict[str, object]:
        return {"all": self.everything, "slots": sorted(self.slots)}
