"""Trending and co-visitation as the API reads them: cached in the process, off the hot path.

Trending (global and per category node) is refreshed in the background every second.
Co-visitation neighbours are cached per item: read for every item that has some when the API
starts (`warm_order`, Runtime.warm_covis), and read again in the background after half a
minute; a decision whose recent items the cache has never seen fetches them in one extra
round trip within its Redis budget, and goes on without them if that fails. Scores in Redis
are forward-decayed from a landmark; dividing by a key's best score removes the landmark, so
the API needs no clock agreement with it.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from api import _kernels
from api.items import Rows, ServingCatalog
from api.scoring import TREND_CANDIDATES, Neighbours, Trending
from stream_engine.catalog import CATEGORY_SEP
from stream_engine.state import Keys

TRENDING_DEPTH = 2  # the worker keeps trending for category nodes of depth 1 and 2
TRENDING_TOP = 200  # global trending: the prior of its items, and the slots' defaults
# Per category node only the first few become candidates, and without scores: the prior
# comes from the global list. Reading 200 of each, with scores, put ~14,000 members a
# second through Python (a few ms of the event loop every tick).
CATEGORY_TRENDING_TOP = TREND_CANDIDATES
COVIS_TOP = 30
COVIS_TTL_S = 30.0  # co-visitation decays over days; 30 s stale costs nothing
COVIS_CACHE_MAX = 50_000
# Stale entries are read again in small rounds, ten a second, a few dozen per round trip:
# each round trip holds Redis and then this process's event loop while its replies are
# parsed, and the decisions behind it wait. A second's worth at once (up to 2,000 entries
# in back-to-back round trips of 64) held them for 10-35 ms every second once the first
# entries went stale, and the decisions caught behind it were the p99 (loadtest/JOURNAL.md,
# session 14).
COVIS_REFRESH_EVERY_S = 0.1
COVIS_REFRESH_CHUNK = 32  # stale entries per background round trip
COVIS_REFRESH_MAX = 200  # ... and per round: at most 2,000 a second
# At start the API reads every item's co-visitation in the background (`warm_order`), this
# many per round trip: an empty cache sent 67% of the first 2,000 decisions and 7% of those
# after 24,000 to Redis a second time (loadtest/JOURNAL.md, session 18).
COVIS_WARM_CHUNK = 32


NO_NEIGHBOURS: Neighbours = (np.zeros(0, np.int64), np.zeros(0, np.float32))
GOLDEN = 0.6180339887498949  # row * GOLDEN mod 1: rows spread evenly over [0, 1)


def warm_order(catalog: ServingCatalog, trending: Trending, size: int, limit: int) -> list[int]:
    """The rows whose co-visitation a starting API reads: the global trending items first
    (the ones sessions view most), then the rest of the catalog in order, up to `limit`."""
    first = [int(r) for r in trending.by_key.get("", ()) if r < size]
    order = dict.fromkeys(first)
    for r in range(size):
        if len(order) >= limit:
            break
        order[r] = None
    return list(order)[:limit]


def trending_keys(catalog: ServingCatalog) -> list[str]:
    """ "" (global) and every category node of depth <= 2 the space knows."""
    nodes = [
        n[4:]
        for n in catalog.space.names
        if n.startswith("cat:") and n.count(CATEGORY_SEP) < TRENDING_DEPTH
    ]
    return ["", *nodes]


def trending_commands(keys: Keys, names: Sequence[str]) -> list[tuple[Any, ...]]:
    """Global trending ("") with scores, category nodes' first few members without."""
    return [
        ("ZREVRANGE", keys.trending(None), 0, TRENDING_TOP - 1, "WITHSCORES")
        if n == ""
        else ("ZREVRANGE", keys.trending(n), 0, CATEGORY_TRENDING_TOP - 1)
        for n in names
    ]


Scores = npt.NDArray[np.float64]


def _members(reply: Any, catalog: ServingCatalog, scored: bool = True) -> tuple[Rows, Scores]:
    """A ZREVRANGE reply as the rows the catalog knows and their scores (compiled:
    api/_kernels.pyx)."""
    return _kernels.members(reply, catalog.catalog.row, scored)


def parse_trending(
    names: Sequence[str], replies: Sequence[Any], catalog: ServingCatalog
) -> Trending:
    """The replies of trending_commands(names)."""
    by_key = {}
    prior = np.zeros(len(catalog), np.float32)
    for name, reply in zip(names, replies, strict=True):
        rows, scores = _members(reply, catalog, scored=name == "")  # categories: members only
        if name == "" and scores.size and scores[0] > 0:
            prior[rows] = scores.astype(np.float32) / np.float32(scores[0])
        by_key[name] = rows
    return Trending(by_key, prior)


class CovisCache:
    """item row -> its co-visitation neighbours (row, score / best score).

    An entry older than `ttl_s` is still served, and marked due: the refresher reads the
    due entries again in the background, a few dozen per round trip (`take_due`), so a
    decision waits on Redis for co-visitation only the first time one of its items is
    asked for (about a third of the decisions at 2,000/s paid a second round trip when
    expiry sent them back to Redis)."""

    def __init__(
        self,
        ttl_s: float = COVIS_TTL_S,
        max_items: int = COVIS_CACHE_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self.clock = clock
        self._entries: OrderedDict[int, tuple[float, Neighbours]] = OrderedDict()
        self._due: dict[int, None] = {}  # stale rows asked for, oldest ask first

    def __len__(self) -> int:
        return len(self._entries)

    def unknown(self, rows: Sequence[int]) -> list[int]:
        """The rows never read (or evicted since)."""
        return [r for r in rows if r not in self._entries]

    def lookup(self, rows: Sequence[int]) -> tuple[dict[int, Neighbours], list[int]]:
        """(what the cache has, stale or not; the rows it has never read)."""
        now = self.clock()
        found: dict[int, Neighbours] = {}
        missing: list[int] = []
        for r in rows:
            entry = self._entries.get(r)
            if entry is None:
                missing.append(r)
                continue
            found[r] = entry[1]
            if entry[0] <= now:
                self._due[r] = None
        return found, missing

    def take_due(self, limit: int) -> list[int]:
        """Up to `limit` stale rows to read again (handed out once; `store` them, or
        `lookup` marks them due again)."""
        rows = list(itertools.islice(self._due, limit))
        for r in rows:
            del self._due[r]
        return rows

    def commands(self, keys: Keys, catalog: ServingCatalog, rows: Sequence[int]) -> list[Any]:
        return [
            ("ZREVRANGE", keys.covisit(catalog.item(r).item_id), 0, COVIS_TOP - 1, "WITHSCORES")
            for r in rows
        ]

    def store(
        self,
        rows: Sequence[int],
        replies: Sequence[Any],
        catalog: ServingCatalog,
        spread: bool = False,
    ) -> dict[int, Neighbours]:
        """`spread`: entries go stale at times spread over the second half of `ttl_s` (by
        row), so that a warm-up's thousands of entries are not all due at once."""
        now = self.clock()
        out: dict[int, Neighbours] = {}
        for r, reply in zip(rows, replies, strict=True):
            if isinstance(reply, Exception):
                continue
            if reply:
                members, scores = _members(reply, catalog)
                best = float(scores[0]) if scores.size and scores[0] > 0 else 1.0
                out[r] = (members, scores.astype(np.float32) / best)
            else:  # most of a long tail: one shared empty entry
                out[r] = NO_NEIGHBOURS
            ttl = self.ttl_s * (0.5 + 0.5 * ((r * GOLDEN) % 1.0)) if spread else self.ttl_s
            self._entries[r] = (now + ttl, out[r])
            self._entries.move_to_end(r)
        while len(self._entries) > self.max_items:
            gone, _ = self._entries.popitem(last=False)
            self._due.pop(gone, None)
        return out
