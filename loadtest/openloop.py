"""Open-loop pacing and latency summaries shared by the benchmarks.

Sends are scheduled at fixed intended times (start + i / rate) whatever the system does,
and every latency is measured from the intended time, so a stalled system can't hide its
tail by slowing the generator down (coordinated omission). For the same reason the
generator's own garbage collector is off while it paces (`collector_paused`): a full
collection of its heap took 30 ms mid-step, and every answer due in those 30 ms was
measured that much late, whichever system was under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

TICK_S = 0.001


@dataclass(frozen=True, slots=True)
class PacingStats:
    sent: int
    duration_s: float
    late_p99_ms: float  # how far behind its intended time the generator got (self-check)

    @property
    def rate(self) -> float:
        return self.sent / self.duration_s if self.duration_s > 0 else 0.0


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for one measured step (collected first, on
    again after; nested uses leave it to the outermost). A step's garbage is bounded."""
    if not gc.isenabled():
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def open_loop(
    rate: float,
    duration_s: float,
    send: Callable[[int, float], Awaitable[None]],
) -> PacingStats:
    """Call send(i, intended_monotonic_time) for i in range(rate * duration) on schedule."""
    with collector_paused():
        return await _paced(rate, duration_s, send)


async def _paced(
    rate: float,
    duration_s: float,
    send: Callable[[int, float], Awaitable[None]],
) -> PacingStats:
    total = int(rate * duration_s)
    start = time.monotonic() + 0.02
    late: list[float] = []
    i = 0
    while i < total:
        now = time.monotonic()
        due = min(total, int((now - start) * rate) + 1)
        while i < due:
            intended = start + i / rate
            late.append(time.monotonic() - intended)
            await send(i, intended)
            i += 1
        # Wake at most once a millisecond: finer sleeps busy-loop under uvloop (its timers
        # tick in milliseconds) and the generator's CPU is taken from the system under test.
        delay = start + i / rate - time.monotonic()
        await asyncio.sleep(max(TICK_S, delay))
    elapsed = time.monotonic() - start
    late_p99 = float(np.percentile(late, 99)) * 1000 if late else 0.0
    return PacingStats(total, elapsed, max(0.0, late_p99))


@dataclass(frozen=True, slots=True)
class Percentiles:
    p50: float
    p99: float
    p999: float
    count: int

    @classmethod
    def of_ms(cls, samples_s: Sequence[float]) -> Percentiles:
        if not samples_s:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        arr = np.asarray(samples_s) * 1000
        p50, p99, p999 = np.percentile(arr, [50, 99, 99.9])
        return cls(float(p50), float(p99), float(p999), len(samples_s))


def median_of(runs: Sequence[Percentiles]) -> Percentiles:
    """The median over repeats of each percentile (the machine is shared and noisy)."""
    return Percentiles(
        statistics.median(r.p50 for r in runs),
        statistics.median(r.p99 for r in runs),
        statistics.median(r.p999 for r in runs),
        int(statistics.median(r.count for r in runs)),
    )
