"""The highest rate a path holds, searched upwards: `loadtest decisions --find-max` (each
endpoint's rate within the SLO) and `loadtest ingest --find-max` (the events/s one worker
sustains with flat lag).

From `start`, each step a `factor` more in multiples of `grain` (never less than one grain
up), to `cap`. A step that misses is measured once more, and the search stops only if that
misses too: on this shared machine one noisy step is not the path's limit. The misses say
why, so a reader can tell the path's limit from the generator's or the machine's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")  # one measured step


def next_rate(rate: int, factor: float, grain: int) -> int:
    """A `factor` more than `rate`, in multiples of `grain`; at least one grain up."""
    return max(rate + grain, round(rate * factor / grain) * grain)


@dataclass
class Search(Generic[T]):
    start: int  # the first rate tried
    held: int  # the highest rate held; 0 if the first missed
    stopped: str  # why the search stopped there
    steps: list[T] = field(default_factory=list)  # every step measured, in order

    @property
    def held_text(self) -> str:
        return f"{self.held}/s" if self.held else f"below {self.start}/s (the first rate tried)"


async def highest_held(
    measure: Callable[[int], Awaitable[T]],
    misses: Callable[[T], str | None],
    start: int,
    cap: int,
    factor: float,
    grain: int,
) -> Search[T]:
    """The highest rate from `start` to `cap` whose step `misses` finds nothing wrong with
    (a missed step measured twice before it counts)."""
    search: Search[T] = Search(start, 0, f"reached the cap, {cap}/s")
    rate = start
    while rate <= cap:
        step = await measure(rate)
        search.steps.append(step)
        if (why := misses(step)) is not None:
            again = await measure(rate)
            search.steps.append(again)
            if (why_again := misses(again)) is not None:
                search.stopped = f"{rate}/s missed twice: {why}; {why_again}"
                return search
        search.held = rate
        rate = next_rate(rate, factor, grain)
    return search
