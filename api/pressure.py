"""The API's side of yielding Redis (stream_engine/pressure.py): count the reads that were
slow, and in a window that had enough of them, tell the workers.

A read is slow when it took a third of its budget or more (KAIROS_REDIS_TIMEOUT_MS / 3: an
idle box answers in well under 1 ms), when it failed, or when the breaker kept it from
being sent. A window of PRESSURE_EVERY_S reports when at least MIN_SLOW of its reads, and
at least SLOW_SHARE of them, were slow: a lone slow read on a busy box is not a trend. The
report is one INCR of a counter the workers watch; nothing is written while reads are fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stream_engine.state import COUNT_UP

PRESSURE_EVERY_S = 0.1
# The INCR goes on the background connection, behind whatever refresh holds it; a report
# that arrives late still says "up" to a worker, one cut off drops that connection.
PRESSURE_TIMEOUT_S = 1.0
MIN_SLOW = 2
SLOW_SHARE = 0.005
PRESSURE_TTL_MS = 60_000  # the counter outlives a quiet minute only if reports go on


@dataclass(slots=True)
class SlowReads:
    slow_s: float  # a read that took this long or more is slow
    reads: int = 0
    slow: int = 0

    def read(self, elapsed_s: float) -> None:
        self.reads += 1
        if elapsed_s >= self.slow_s:
            self.slow += 1

    def failed(self) -> None:
        """A read that ran out of budget, failed, or was not sent (breaker open)."""
        self.reads += 1
        self.slow += 1

    def take(self) -> bool:
        """Whether the window now ending calls for a report; starts the next window."""
        report = self.slow >= MIN_SLOW and self.slow >= SLOW_SHARE * self.reads
        self.reads = self.slow = 0
        return report


def report_commands(key: str) -> list[tuple[Any, ...]]:
    """INCR and PEXPIRE in one script (state.COUNT_UP): a counter something else
    overwrote starts again, instead of every report failing on it (and its TTL, refreshed
    by each report, keeping it)."""
    return [("EVAL", COUNT_UP, 1, key, PRESSURE_TTL_MS)]
