"""Trending and co-visitation as the API reads them: cached in the process, off the hot path.

Trending (global and per category node) is refreshed in the background every second.
Co-visitation neighbours are cached per item: for half a minute they are fresh; for up to
ten minutes more they are still served while a background task reads them again (the
request never waits for that). Only a decision whose recent items were never read, or not
for ten minutes, fetches them in one extra round trip within its Redis budget, and goes on
without them if that fails. Scores in Redis are forward-decayed from a landmark; dividing
by a key's best score removes the landmark, so the API needs no clock agreement with it.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from api.items import ServingCatalog
from api.scoring import Neighbours, Trending
from stream_engine.catalog import CATEGORY_SEP
from stream_engine.state import Keys

TRENDING_DEPTH = 2  # the worker keeps trending for category nodes of depth 1 and 2
TRENDING_TOP = 200
COVIS_TOP = 30
COVIS_TTL_S = 30.0  # co-visitation decays over days; 30 s stale costs nothing
COVIS_STALE_S = 600.0  # served while being read again in the background, up to this age
COVIS_CACHE_MAX = 50_000
COVIS_REFRESH_MAX = 2_000  # rows waiting for a background read; beyond, refreshed later


def trending_keys(catalog: ServingCatalog) -> list[str]:
    """ "" (global) and every category node of depth <= 2 the space knows."""
    nodes = [
        n[4:]
        for n in catalog.space.names
        if n.startswith("cat:") and n.count(CATEGORY_SEP) < TRENDING_DEPTH
    ]
    return ["", *nodes]


def trending_commands(keys: Keys, names: Sequence[str]) -> list[tuple[Any, ...]]:
    return [
        ("ZREVRANGE", keys.trending(n or None), 0, TRENDING_TOP - 1, "WITHSCORES") for n in names
    ]


def _members(reply: Any, catalog: ServingCatalog) -> tuple[list[int], list[float]]:
    rows: list[int] = []
    scores: list[float] = []
    reply = reply or []
    if reply and isinstance(reply[0], list):  # RESP3: [[member, score], ...]
        pairs = [(m, s) for m, s in reply]
    else:  # RESP2: member, score, member, score, ...
        pairs = list(zip(reply[::2], reply[1::2], strict=True))
    for member, score in pairs:
        row = catalog.row(member.decode())
        if row is not None:
            rows.append(row)
            scores.append(float(score))
    return rows, scores


def parse_trending(
    names: Sequence[str], replies: Sequence[Any], catalog: ServingCatalog
) -> Trending:
    by_key = {}
    prior = np.zeros(len(catalog), np.float32)
    for name, reply in zip(names, replies, strict=True):
        rows, scores = _members(reply, catalog)
        by_key[name] = np.asarray(rows, dtype=np.int64)
        if name == "" and scores and scores[0] > 0:
            prior[rows] = np.asarray(scores, np.float32) / np.float32(scores[0])
    return Trending(by_key, prior)


class CovisCache:
    """item row -> its co-visitation neighbours (row, score / best score).

    Fresh for `ttl_s`; then, up to `stale_s`, still served but queued for a background
    read (`due`), so a request pays an extra round trip only for items it is the first to
    need in a while. Before this, every item's entry expired every 30 s and the next
    request to need it waited for a second Redis read.
    """

    def __init__(
        self,
        ttl_s: float = COVIS_TTL_S,
        max_items: int = COVIS_CACHE_MAX,
        stale_s: float = COVIS_STALE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        self.max_items = max_items
        self.clock = clock
        self._entries: OrderedDict[int, tuple[float, Neighbours]] = OrderedDict()
        self._due: dict[int, None] = {}  # rows to read again in the background, in order

    def lookup(self, rows: Sequence[int]) -> tuple[dict[int, Neighbours], list[int]]:
        """(what the cache can serve, what must be read now)."""
        now = self.clock()
        found: dict[int, Neighbours] = {}
        missing: list[int] = []
        for r in rows:
            entry = self._entries.get(r)
            if entry is None or now - entry[0] > self.ttl_s + self.stale_s:
                missing.append(r)
                continue
            found[r] = entry[1]
            if now - entry[0] > self.ttl_s and len(self._due) < COVIS_REFRESH_MAX:
                self._due[r] = None
        return found, missing

    def due(self, limit: int) -> list[int]:
        """Takes up to `limit` rows waiting for their background read."""
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
        self, rows: Sequence[int], replies: Sequence[Any], catalog: ServingCatalog
    ) -> dict[int, Neighbours]:
        fetched = self.clock()
        out: dict[int, Neighbours] = {}
        for r, reply in zip(rows, replies, strict=True):
            if isinstance(reply, Exception):
                continue
            members, scores = _members(reply, catalog)
            best = scores[0] if scores and scores[0] > 0 else 1.0
            out[r] = (np.asarray(members, np.int64), np.asarray(scores, np.float32) / best)
            self._entries[r] = (fetched, out[r])
            self._entries.move_to_end(r)
        while len(self._entries) > self.max_items:
            self._entries.popitem(last=False)
        return out
