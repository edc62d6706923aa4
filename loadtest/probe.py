"""How fast the machine runs a fixed piece of Python while a step runs: `SpeedProbe`.

The machine is shared, and its speed moves under us: a fixed 20,000-iteration loop took
0.76 ms of CPU in one second and 1.36 ms in the next while nothing of ours changed
(session 14, loadtest/JOURNAL.md), and an API's CPU per request moved with it. The CPU time
of the same instructions is what a busy neighbour (a hyperthread sibling, a lower clock)
changes, and what a benchmark's own figures cannot tell apart from a slower code path.
The probe is a process of its own that runs the loop every PROBE_EVERY_S (~1% of a core)
and prints each run's CPU time; a step reports the median, so a slow step can be read
against how slow the machine itself was then.

    python -m loadtest.probe      the probe loop (what SpeedProbe runs)
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time

PROBE_EVERY_S = 0.1
LOOP = 20_000


def work(n: int = LOOP) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def main() -> None:
    while True:
        start = time.thread_time()
        work()
        print(f"{(time.thread_time() - start) * 1000:.4f}", flush=True)
        time.sleep(PROBE_EVERY_S)


class SpeedProbe:
    """The probe process over one step: start it, then `stop()` for the median CPU time
    of one loop in ms (None if it took no sample)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest.probe"], stdout=subprocess.PIPE, text=True
        )

    def stop(self) -> float | None:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        samples = [float(x) for x in out.split()]
        return round(statistics.median(samples), 3) if samples else None


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
