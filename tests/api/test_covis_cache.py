"""The co-visitation cache: stale entries are served and handed out once for a refresh."""

from __future__ import annotations

import numpy as np

from api.aggregates import CovisCache
from api.items import ServingCatalog
from stream_engine.catalog import Catalog
from stream_engine.demo_catalog import generate

CATALOG = ServingCatalog(Catalog(generate(50)))


def _reply(catalog: ServingCatalog, rows_scores: list[tuple[int, float]]) -> list[bytes]:
    out: list[bytes] = []
    for row, score in rows_scores:
        out += [catalog.item(row).item_id.encode(), str(score).encode()]
    return out


def test_stale_entries_are_served_then_due_once_and_eviction_forgets_them() -> None:
    serving_catalog = CATALOG
    now = [0.0]
    cache = CovisCache(ttl_s=30.0, max_items=2, clock=lambda: now[0])
    assert cache.lookup([1, 2]) == ({}, [1, 2])
    cache.store([1, 2], [_reply(serving_catalog, [(5, 4.0), (6, 2.0)]), []], serving_catalog)
    found, missing = cache.lookup([1, 2])
    assert missing == []
    assert found[1][0].tolist() == [5, 6]
    np.testing.assert_allclose(found[1][1], [1.0, 0.5])
    assert found[2][0].size == 0
    assert cache.take_due(10) == []  # fresh: nothing to read again
    now[0] = 31.0
    found, missing = cache.lookup([2, 1, 2])
    assert sorted(found) == [1, 2]
    assert missing == []
    assert cache.take_due(1) == [2]  # oldest ask first, up to the limit
    assert cache.take_due(10) == [1]
    assert cache.take_due(10) == []  # handed out once
    cache.lookup([1])  # still stale: due again
    cache.store([3], [_reply(serving_catalog, [(7, 1.0)])], serving_catalog)  # evicts row 1
    assert cache.take_due(10) == []  # an evicted row is not read again for nobody
    assert cache.lookup([1]) == ({}, [1])
