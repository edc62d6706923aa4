"""How late a process's event loop runs (the API's overload signal, the worker's metric)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class LoopLag:
    """How late this process's event loop runs: a task sleeps `tick_s` at a time and
    records how much longer it took. `recent_s` is the largest lag of the current and the
    previous window of `window_s`; `observe`, if given, gets every tick's lag (seconds).

    In the API: a Redis read that misses its budget while the loop itself runs late was not
    slowed by Redis: the reply sat in the socket while the process was busy with other
    requests. Such a miss is an overload, not a store failure, and must not open the
    breaker. In the worker: freshness lost to the worker's own loop (a long batch, work in
    the background) rather than to Kafka or Redis.
    """

    def __init__(
        self,
        tick_s: float = 0.005,
        window_s: float = 0.5,
        clock: Callable[[], float] = time.perf_counter,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.tick_s = tick_s
        self.observe = observe
        self.window_s = window_s
        self.clock = clock
        self._window_start = clock()
        self._current = 0.0
        self._previous = 0.0

    @property
    def recent_s(self) -> float:
        self._roll(self.clock())
        return max(self._current, self._previous)

    def record(self, lag_s: float) -> None:
        self._roll(self.clock())
        self._current = max(self._current, lag_s)

    def _roll(self, now: float) -> None:
        if now - self._window_start < self.window_s:
            return
        self._previous, self._current = self._current, 0.0
        self._window_start = now

    async def run(self) -> None:
        while True:
            start = self.clock()
            await asyncio.sleep(self.tick_s)
            lag = max(0.0, self.clock() - start - self.tick_s)
            self.record(lag)
            if self.observe is not None:
                self.observe(lag)
