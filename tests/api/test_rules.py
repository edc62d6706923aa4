"""Rules, filters and diversity on a small catalog: no services involved."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.config import parse_config
from api.items import ServingCatalog
from api.rules import compile_rules, select
from api.scoring import Signals, merge_covis, top_categories
from stream_engine.catalog import Catalog
from stream_engine.demo_catalog import generate

CATALOG = ServingCatalog(Catalog(generate(400)))
NOW = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
ITEMS = CATALOG.catalog.items
IN_STOCK = [i for i, it in enumerate(ITEMS) if it.available]
SOLD_OUT = [i for i, it in enumerate(ITEMS) if it.stock == 0]


def _config(rules: list[dict[str, object]], **slot: object) -> dict[str, object]:
    return {
        "version": "t",
        "slots": {"recs": {"kind": "items", "n": 6, **slot}},
        "rules": rules,
    }


def _pick(rules: list[dict[str, object]], rows: list[int], blocked: set[int] | None = None,
          n: int = 6, **slot: object) -> list[int]:  # fmt: skip
    if blocked is None:
        blocked = set()
    config = parse_config(_config(rules, **slot), "test.yaml")
    compiled = compile_rules(config, CATALOG, NOW)["recs"]
    arr = np.asarray(rows, np.int64)
    scores = np.linspace(1.0, 0.1, arr.size, dtype=np.float32)  # rows in order of preference
    picks = select(config.slots["recs"], n, arr, scores, CATALOG, compiled, blocked)
    return [p.row for p in picks]


def test_best_scores_first_and_filters_drop_sold_out_and_blocked() -> None:
    rows = SOLD_OUT[:2] + IN_STOCK[:10]
    got = _pick([], rows, blocked={IN_STOCK[0]})
    assert got == IN_STOCK[1:7]


def test_exclude_boost_and_pin() -> None:
    rows = IN_STOCK[:10]
    excluded = ITEMS[rows[0]].category_path
    got = _pick([{"id": "x", "action": "exclude", "categories": [excluded]}], rows)
    assert all(ITEMS[r].category_path != excluded for r in got)
    last = ITEMS[rows[9]].item_id
    got = _pick([{"id": "b", "action": "boost", "items": [last], "factor": 50}], rows)
    assert got[0] == rows[9]
    pinned = ITEMS[IN_STOCK[50]].item_id
    got = _pick([{"id": "p", "action": "pin", "items": [pinned], "position": 2}], rows)
    assert got[2] == IN_STOCK[50]
    assert len(got) == 6


def test_a_pin_never_shows_a_sold_out_or_purchased_item() -> None:
    rows = IN_STOCK[:10]
    sold_out = ITEMS[SOLD_OUT[0]].item_id
    got = _pick([{"id": "p", "action": "pin", "items": [sold_out], "position": 0}], rows)
    assert SOLD_OUT[0] not in got
    bought = ITEMS[IN_STOCK[60]].item_id
    got = _pick([{"id": "p", "action": "pin", "items": [bought]}], rows, blocked={IN_STOCK[60]})
    assert IN_STOCK[60] not in got


def test_rules_outside_their_window_do_nothing() -> None:
    rows = IN_STOCK[:10]
    rule: dict[str, object] = {"id": "x", "action": "exclude", "items": [ITEMS[rows[0]].item_id],
            "start": "2027-01-01T00:00:00Z"}  # fmt: skip
    assert _pick([rule], rows)[0] == rows[0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(IN_STOCK), min_size=1, max_size=60, unique=True),
       st.integers(1, 3))  # fmt: skip
def test_diversity_caps_items_per_category(rows: list[int], cap: int) -> None:
    got = _pick([], rows, max_per_category=cap)
    leaves = [ITEMS[r].category_path for r in got]
    assert all(leaves.count(leaf) <= cap for leaf in leaves)
    assert len(set(got)) == len(got)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, 2.5e-8, -3.0, 7.0, 1e30]) |
                st.floats(-1e6, 1e6, width=32), max_size=80))  # fmt: skip
def test_select_orders_like_a_stable_descending_sort(values: list[float]) -> None:
    """Any float32 score (negative, -0.0 beside 0.0, huge): the compiled walk's integer keys
    order the candidates as a stable argsort of -scores does."""
    scores = np.asarray(values, np.float32)
    rows = np.asarray(IN_STOCK[: scores.size], np.int64)
    config = parse_config(_config([], max_per_category=0), "test.yaml")  # 0: no cap
    compiled = compile_rules(config, CATALOG, NOW)["recs"]
    picks = select(config.slots["recs"], rows.size, rows, scores, CATALOG, compiled, set())
    assert [p.at for p in picks] == np.argsort(-scores, kind="stable").tolist()


def test_a_row_offered_twice_is_served_once() -> None:
    rows = [IN_STOCK[3], IN_STOCK[1], IN_STOCK[3], IN_STOCK[2]]
    assert _pick([], rows, n=4) == [IN_STOCK[3], IN_STOCK[1], IN_STOCK[2]]


def _reference(rows: list[int], scores: list[float], n: int, cap: int,
               blocked: set[int]) -> list[int]:  # fmt: skip
    """select without rules, written the obvious way: best score first, ties in order."""
    chosen: list[int] = []
    per_leaf: dict[int, int] = {}
    for i in sorted(range(len(rows)), key=lambda i: (-scores[i], i)):
        row, leaf = rows[i], int(CATALOG.leaf[rows[i]])
        if not ITEMS[row].available or row in blocked or row in chosen:
            continue
        if leaf != CATALOG.no_leaf and per_leaf.get(leaf, 0) >= (cap or n):
            continue
        per_leaf[leaf] = per_leaf.get(leaf, 0) + 1
        chosen.append(row)
        if len(chosen) == n:
            break
    return chosen


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(ITEMS) - 1), st.sampled_from([0.0, 0.5, 1.0, 2.0])),
                min_size=1, max_size=300),
       st.integers(1, 12), st.integers(0, 2), st.sets(st.integers(0, len(ITEMS) - 1)))  # fmt: skip
def test_select_matches_the_obvious_selection(
    scored: list[tuple[int, float]], n: int, cap: int, blocked: set[int]
) -> None:
    """Ties, duplicates, sold-out and blocked rows, and a diversity cap that sends the
    selection past the first chunk of candidates it converts."""
    rows, scores = [r for r, _ in scored], [s for _, s in scored]
    config = parse_config(_config([], max_per_category=cap), "test.yaml")
    compiled = compile_rules(config, CATALOG, NOW)["recs"]
    picks = select(config.slots["recs"], n, np.asarray(rows, np.int64),
                   np.asarray(scores, np.float32), CATALOG, compiled, blocked)  # fmt: skip
    assert [p.row for p in picks] == _reference(rows, scores, n, cap, blocked)
    assert all(rows[p.at] == p.row for p in picks if p.at is not None)


def test_covisitation_merges_by_recency_and_normalizes() -> None:
    def nb(*pairs: tuple[int, float]) -> tuple[Any, Any]:
        return np.asarray([p[0] for p in pairs]), np.asarray([p[1] for p in pairs], np.float32)

    covis = merge_covis([1, 2], {1: nb((10, 1.0), (11, 0.5)), 2: nb((11, 1.0))})
    assert covis.rows.tolist() == [10, 11]
    score = dict(zip(covis.rows.tolist(), covis.scores.tolist(), strict=True))
    via = {r: covis.via_of(r) for r in (10, 11)}
    assert score[10] == pytest.approx(1.0 / 1.2)
    assert score[11] == pytest.approx(1.0)
    assert via[11] == 2
    assert via[10] == 1
    # the scratch sums are back to zero for the next decision
    again = merge_covis([3, 4], {3: nb((10, 0.5), (12, 1.0)), 4: nb((12, 1.0))})
    assert again.rows.tolist() == [10, 12]
    assert again.scores.tolist() == pytest.approx([0.5 / 1.7, 1.0])


def test_covisitation_of_one_source_keeps_its_scores_sorted_by_row() -> None:
    rows, scores = np.asarray([30, 10, 20]), np.asarray([1.0, 0.5, 0.25], np.float32)
    covis = merge_covis([7, 8], {7: (rows, scores), 8: (np.zeros(0, np.int64), scores[:0])})
    assert covis.rows.tolist() == [10, 20, 30]
    assert covis.scores.tolist() == [0.5, 0.25, 1.0]
    assert covis.via_of(20) == 7
    assert covis.via_of(99) is None


def test_top_categories_prefer_the_strongest_then_the_deepest() -> None:
    space = CATALOG.space
    v = np.zeros(space.dims, np.float32)
    v[space.index["cat:Sports"]] = 1.0
    v[space.index["cat:Sports > Running"]] = 1.0
    v[space.index["cat:Home"]] = 0.5
    assert top_categories(space.names, v, k=2) == ["Sports > Running", "Sports"]
    assert Signals(None, []).interest is None


def test_an_exclude_rule_fires_when_it_removes_a_candidate_others_when_they_touch_a_pick() -> None:
    from api.rules import rules_fired

    rows = np.asarray(IN_STOCK[:10], np.int64)
    excluded = ITEMS[rows[0]].item_id
    boosted = ITEMS[rows[5]].item_id
    config = parse_config(_config([
        {"id": "x", "action": "exclude", "items": [excluded]},
        {"id": "b", "action": "boost", "items": [boosted], "factor": 2},
        {"id": "never", "action": "bury", "items": [ITEMS[IN_STOCK[90]].item_id]},
    ]), "test.yaml")  # fmt: skip
    compiled = compile_rules(config, CATALOG, NOW)["recs"]
    scores = np.linspace(1.0, 0.1, rows.size, dtype=np.float32)
    picks = select(config.slots["recs"], 6, rows, scores, CATALOG, compiled, set())
    assert rules_fired(picks, rows, compiled) == ["x", "b"]


def _numpy_score(rows: Any, signals: Signals, prior: Any) -> list[Any]:
    """The scoring as numpy arithmetic, as it was before it was compiled."""
    from api.scoring import W_COVISIT, W_INTEREST, W_LEAF, W_TREND

    n = rows.size
    interest = (CATALOG.matrix[rows] @ signals.interest if signals.interest is not None
                else np.zeros(n, np.float32))  # fmt: skip
    by_row = dict(zip(signals.covis.rows.tolist(), signals.covis.scores.tolist(), strict=True))
    covis = np.asarray([by_row.get(r, 0.0) for r in rows.tolist()], np.float32)
    trend = np.asarray([prior[r] if r < prior.size else 0.0 for r in rows.tolist()], np.float32)
    leaf = np.asarray([signals.leaves.get(int(CATALOG.leaf[r]), 0.0) for r in rows.tolist()],
                      np.float32)  # fmt: skip
    total = W_INTEREST * interest
    total += W_COVISIT * covis
    total += W_TREND * trend
    total += W_LEAF * leaf
    return [total, interest, covis, trend, leaf]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, len(ITEMS) - 1), max_size=120, unique=True),
       st.lists(st.tuples(st.integers(0, len(ITEMS) - 1), st.floats(0, 1, width=32)),
                max_size=40, unique_by=lambda t: t[0]),
       st.booleans(), st.integers(0, len(ITEMS) + 5), st.integers(0, 2**32 - 1))  # fmt: skip
def test_compiled_score_matches_the_numpy_arithmetic(
    candidates: list[int],
    covis: list[tuple[int, float]],
    personal: bool,
    prior_size: int,
    seed: int,
) -> None:
    """Every component of every candidate; the interest dot product sums in another order
    than BLAS (a few units in the last place), the rest is exact; dense and sparse
    interests (only non-zero dimensions enter the sum). A prior shorter than the
    catalog (rows it doesn't cover trend 0); the scratch array is clean afterwards."""
    from api.scoring import Covis, Trending, parts_of, score, unit

    rng = np.random.default_rng(seed)
    rows = np.asarray(sorted(candidates), np.int64)
    crow = np.asarray(sorted(r for r, _ in covis), np.int64)
    cscore = np.asarray([dict(covis)[r] for r in crow.tolist()], np.float32)
    raw = rng.standard_normal(CATALOG.space.dims).astype(np.float32)
    raw[rng.random(raw.size) < rng.choice([0.0, 0.5, 0.95])] = 0  # sessions' are sparse
    interest = unit(raw) if personal else None
    weights = (0.5, 0.3, 0.2)[: len(candidates)]
    leaves = {int(CATALOG.leaf[r]): w for r, w in zip(candidates[:3], weights, strict=True)}
    signals = Signals(interest, [], Covis(crow, cscore), [], None, leaves, {})
    prior = rng.random(prior_size).astype(np.float32)
    got = score(CATALOG, rows, signals, Trending({}, prior))
    want = _numpy_score(rows, signals, prior)
    for name, g, w in zip(("total", "interest", "covis", "trend", "leaf"), got.table, want,
                          strict=True):  # fmt: skip
        assert g.dtype == np.float32, name
        if name in ("total", "interest"):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert g.tolist() == w.tolist(), name
    positions = list(range(0, rows.size, 3))
    assert parts_of(got, positions) == [got.table[1:, i].tolist() for i in positions]
    # the next decision's co-visitation starts from zeros
    again = score(CATALOG, rows, Signals(interest, [], leaves=leaves), Trending({}, prior))
    assert not again.table[2].any()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 5000), st.floats(0, 1, width=32)),
                         min_size=1, max_size=30, unique_by=lambda t: t[0]),
                min_size=1, max_size=5))  # fmt: skip
def test_compiled_covisitation_merge_matches_the_numpy_arithmetic(
    sources: list[list[tuple[int, float]]],
) -> None:
    """One to five sources: each product in float32, summed in float64 in source order, over
    the largest sum, rounded to float32; rows sorted and distinct. Exact."""
    from api.scoring import RECENCY

    neighbours = {
        src: (np.asarray([r for r, _ in pairs], np.int64),
              np.asarray([s for _, s in pairs], np.float32))
        for src, pairs in enumerate(sources)
    }  # fmt: skip
    got = merge_covis(list(range(len(sources))), neighbours)
    acc = np.zeros(5001, np.float64)
    for rank, (rows, scores) in neighbours.items():
        acc[rows] += RECENCY[rank] * scores
    want_rows = np.unique(np.concatenate([rows for rows, _ in neighbours.values()]))
    sums = acc[want_rows]
    top = float(sums.max())
    want = (sums / top if top > 0 else sums).astype(np.float32)
    assert got.rows.tolist() == want_rows.tolist()
    assert got.scores.dtype == np.float32
    assert got.scores.tolist() == want.tolist()


@given(st.lists(st.lists(st.integers(0, 3000), max_size=60), max_size=8))
def test_candidates_union_is_sorted_and_distinct(parts: list[list[int]]) -> None:
    from api import _kernels

    arrays = [np.asarray(p, np.int64) for p in parts]
    got = _kernels.union_sorted(arrays)
    assert got.dtype == np.int64
    assert got.tolist() == sorted({r for p in parts for r in p})
    with pytest.raises(IndexError):
        _kernels.union_sorted([np.asarray([1, -1], np.int64)])
    assert _kernels.union_sorted(arrays).tolist() == got.tolist()  # scratch left clean


@given(st.lists(st.sampled_from([0.0, -0.0, 0.25, 0.5, -0.5, 1.0]) | st.floats(-1, 1, width=32),
                min_size=CATALOG.space.dims, max_size=CATALOG.space.dims),
       st.integers(1, 4))  # fmt: skip
def test_top_categories_match_a_lexsort(values: list[float], k: int) -> None:
    """The compiled top-k against the numpy it replaced: the first k of a lexsort by
    (-value, -depth), positive values only."""
    from stream_engine.catalog import CATEGORY_SEP

    names = CATALOG.space.names
    dims = [i for i, n in enumerate(names) if n.startswith("cat:")]
    depth = np.asarray([names[i].count(CATEGORY_SEP) for i in dims])
    v = np.asarray(values, np.float32)
    order = np.lexsort((-depth, -v[dims]))[:k]
    want = [names[dims[i]][4:] for i in order if v[dims][i] > 0]
    assert top_categories(names, v, k=k) == want


@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=80),
       st.sampled_from([1.0, 1e-12, 0.0]))  # fmt: skip
def test_unit_vectors_compiled_like_numpy(values: list[float], scale: float) -> None:
    from api.scoring import unit

    v = np.asarray(values, np.float32) * np.float32(scale)
    got = unit(v)
    norm = float(np.linalg.norm(v.astype(np.float64)))
    if norm <= 1e-9:
        assert got is None
        return
    assert got is not None
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, (v / norm).astype(np.float32), rtol=1e-6, atol=1e-7)
    assert unit(v.astype(np.float64)) is not None  # another dtype: numpy's way


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, len(ITEMS) - 1), max_size=40),
       st.lists(st.integers(0, len(ITEMS) - 1), max_size=8))  # fmt: skip
def test_rules_fired_in_one_pass_match_the_loop_over_rules(
    candidates: list[int], picked: list[int]
) -> None:
    """The per-row rule bits give the rules a loop over each rule's mask gives."""
    from api.rules import Pick, rules_fired

    cats = sorted({it.category_path for it in ITEMS})
    config = parse_config(_config([
        {"id": "x1", "action": "exclude", "categories": [cats[0]]},
        {"id": "b1", "action": "boost", "categories": [cats[1]], "factor": 2},
        {"id": "x2", "action": "exclude", "categories": [cats[2]]},
        {"id": "u1", "action": "bury", "categories": [cats[3]], "factor": 0.5},
        {"id": "b2", "action": "boost", "items": [ITEMS[i].item_id for i in range(0, 400, 7)],
         "factor": 3},
    ]), "test.yaml")  # fmt: skip
    compiled = compile_rules(config, CATALOG, NOW)["recs"]
    assert compiled.bits is not None
    rows = np.asarray(candidates, np.int64)
    picks = [Pick(r) for r in picked]
    fast = rules_fired(picks, rows, compiled)
    compiled.bits = None
    assert fast == rules_fired(picks, rows, compiled)
