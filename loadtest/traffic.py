"""Realistic synthetic shoppers: Zipf item popularity, a category affinity that drifts,
an event-type funnel, and sessions that end and are replaced by new ones.

Only the public event contract of stream_engine is used, as a real tracker would.
"""

from __future__ import annotations

import itertools
import random
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field

from stream_engine.catalog import Item
from stream_engine.events import Event, EventType, encode_event

TRACKED = "trk-"
FUNNEL = (
    (EventType.VIEW, 0.70),
    (EventType.CLICK, 0.20),
    (EventType.ADD_TO_CART, 0.07),
    (EventType.PURCHASE, 0.03),
)


def zipf_cumulative(n: int, s: float = 1.07) -> list[float]:
    """Cumulative Zipf weights, so a draw is a bisect (random.choices with cum_weights)."""
    return list(itertools.accumulate(1.0 / (rank + 1) ** s for rank in range(n)))


@dataclass(slots=True)
class _Shopper:
    session_id: str
    leaf: tuple[str, ...]
    left: int
    sent: int = 0


@dataclass
class Traffic:
    """Generates events; `items` must be in popularity order (most popular first)."""

    items: list[Item]
    active_sessions: int = 2000
    mean_session_events: int = 12
    affinity: float = 0.8  # share of events inside the shopper's current category
    drift: float = 0.08  # chance per event that the shopper moves to another category
    seed: int = 1
    # Share of sessions whose ids start with TRACKED, so a benchmark can follow a sample of
    # sessions (cheaply, by key pattern) instead of every one.
    tracked_share: float = 1.0
    # In every session id (so in every event id): random unless given. The worker takes an
    # event whose id its session has already applied for a duplicate, so two runs of the
    # same seed within a session's TTL must not share ids: the second one's events would be
    # ignored, and the demo and the peak suite would show and measure nothing.
    run: str = ""
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._global = zipf_cumulative(len(self.items))
        self._all = range(len(self.items))
        by_leaf: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for idx, it in enumerate(self.items):
            by_leaf[it.category].append(idx)
        self._leaves = list(by_leaf)
        self._leaf_items = {leaf: rows for leaf, rows in by_leaf.items()}
        self._leaf_weights = {leaf: zipf_cumulative(len(rows)) for leaf, rows in by_leaf.items()}
        self._serial = 0
        if not self.run:
            self.run = secrets.token_hex(3)
        self._shoppers = [self._new_shopper() for _ in range(self.active_sessions)]
        # The sessions of the last `active_sessions` events, for page views of shoppers in
        # mid-session (recent_session), weighted by how much each has clicked lately.
        self._recent: list[str] = []
        self._recent_next = 0
        self._types = [t for t, _ in FUNNEL]
        self._type_weights = list(itertools.accumulate(w for _, w in FUNNEL))

    def _new_shopper(self) -> _Shopper:
        self._serial += 1
        leaf = self._leaves[self.rng.randrange(len(self._leaves))]
        length = max(1, int(self.rng.expovariate(1 / self.mean_session_events)))
        kind = TRACKED if self.rng.random() < self.tracked_share else "sim-"
        return _Shopper(f"{kind}{self.run}-{self._serial}", leaf, length)

    def _item(self, shopper: _Shopper) -> Item:
        if self.rng.random() < self.drift:
            shopper.leaf = self._leaves[self.rng.randrange(len(self._leaves))]
        if self.rng.random() < self.affinity:
            rows = self._leaf_items[shopper.leaf]
            idx = self.rng.choices(rows, cum_weights=self._leaf_weights[shopper.leaf])[0]
        else:
            idx = self.rng.choices(self._all, cum_weights=self._global)[0]
        return self.items[idx]

    def next_event(self, now_ms: int | None = None) -> tuple[str, bytes, int]:
        """(session id, encoded event, the event's sequence number within its session)."""
        slot = self.rng.randrange(len(self._shoppers))
        shopper = self._shoppers[slot]
        item = self._item(shopper)
        etype = self.rng.choices(self._types, cum_weights=self._type_weights)[0]
        shopper.sent += 1
        event = Event(
            event_id=f"{shopper.session_id}-{shopper.sent}",
            type=etype,
            session_id=shopper.session_id,
            ts=now_ms if now_ms is not None else int(time.time() * 1000),
            item_id=item.item_id,
        )
        seq = shopper.sent
        shopper.left -= 1
        if shopper.left <= 0:
            self._shoppers[slot] = self._new_shopper()
        if len(self._recent) < self.active_sessions:
            self._recent.append(shopper.session_id)
        else:
            self._recent[self._recent_next] = shopper.session_id
            self._recent_next = (self._recent_next + 1) % self.active_sessions
        return shopper.session_id, encode_event(event), seq

    def recent_session(self, rng: random.Random) -> str | None:
        """The session of one of the last `active_sessions` events (None before the first):
        a shopper whose clicks are in the stream, as a page view would come from. Drawn with
        the caller's `rng`, so page views don't change the events this generates."""
        return self._recent[rng.randrange(len(self._recent))] if self._recent else None
