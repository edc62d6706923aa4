"""The co-visitation cache: stale entries are served and handed out once for a refresh;
sorted-set replies parsed (compiled) as the Python parse did."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api import _kernels
from api.aggregates import CovisCache, warm_order
from api.items import ServingCatalog
from api.scoring import Trending
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


def _members_in_python(reply: Any, catalog: ServingCatalog) -> tuple[list[int], list[float]]:
    """The Python parse the compiled one replaced."""
    reply = reply or []
    if reply and isinstance(reply[0], list):
        pairs = [(m, s) for m, s in reply]
    else:
        pairs = list(zip(reply[::2], reply[1::2], strict=True))
    rows, scores = [], []
    for member, score in pairs:
        row = catalog.row(member.decode())
        if row is not None:
            rows.append(row)
            scores.append(float(score))
    return rows, scores


IDS = [it.item_id for it in CATALOG.catalog.items] + ["not-in-the-catalog", "x:1"]
SCORES = st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 12.5])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(IDS), SCORES), max_size=40), st.booleans())
def test_a_sorted_set_reply_parses_as_the_python_code_did(
    entries: list[tuple[str, float]], resp3: bool
) -> None:
    """Both reply shapes, unknown members skipped, every score Redis can print ("inf",
    17 significant digits) read to the same double."""
    if resp3:
        reply: list[Any] = [[m.encode(), s] for m, s in entries]
    else:
        reply = []
        for m, s in entries:  # Redis prints a score like %.17g, infinities as "inf"
            text = "inf" if s == float("inf") else "-inf" if s == float("-inf") else f"{s:.17g}"
            reply += [m.encode(), text.encode()]
    rows, scores = _kernels.members(reply, CATALOG.catalog.row, True)
    want_rows, want_scores = _members_in_python(reply, CATALOG)
    assert rows.tolist() == want_rows
    assert scores.tolist() == want_scores
    only_rows, _ = _kernels.members([m.encode() for m, _ in entries], CATALOG.catalog.row, False)
    assert only_rows.tolist() == want_rows


def test_a_score_that_is_not_a_number_is_refused() -> None:
    item = CATALOG.item(0).item_id.encode()
    with pytest.raises(ValueError, match="not a score"):
        _kernels.members([item, b"12x"], CATALOG.catalog.row, True)
    with pytest.raises(ValueError, match="WITHSCORES"):
        _kernels.members([item, b"1", item], CATALOG.catalog.row, True)


def test_the_warm_up_reads_trending_items_first_then_the_catalog_up_to_the_cache_size() -> None:
    trending = Trending({"": np.array([7, 3, 60], np.int64)})  # 60: newer than the snapshot
    assert warm_order(CATALOG, trending, 50, 6) == [7, 3, 0, 1, 2, 4]
    rest = [r for r in range(50) if r not in (7, 3)]
    assert warm_order(CATALOG, trending, 50, 100) == [7, 3, *rest]
    assert warm_order(CATALOG, Trending(), 5, 100) == [0, 1, 2, 3, 4]


def test_warmed_entries_go_stale_spread_over_the_second_half_of_their_ttl() -> None:
    """Thousands of entries read at once must not all be due for a re-read in one round."""
    now = [0.0]
    cache = CovisCache(ttl_s=30.0, clock=lambda: now[0])
    rows = list(range(40))
    cache.store(rows, [_reply(CATALOG, [(45, 1.0)])] * len(rows), CATALOG, spread=True)
    first_due: dict[int, int] = {}
    for second in range(31):
        now[0] = second + 0.5
        cache.lookup(rows)
        for r in cache.take_due(100):
            first_due.setdefault(r, second)
    assert sorted(first_due) == rows  # all stale by the end of the ttl
    assert min(first_due.values()) >= 15  # none before half of it
    per_second = Counter(first_due.values())
    assert max(per_second.values()) <= 4  # ~40 over 15 s, not all in one round
