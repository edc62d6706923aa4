"""Candidates and scores: a few hundred items per decision, never the whole catalog.

Candidates come from co-visitation of the session's last items, their learned most-similar
items (when embeddings have been learned), trending in its strongest categories, global
trending and the first items of those categories; each is scored

    score = W_INTEREST · cos(interest, item) + W_COVISIT · covis + W_TREND · trend
            + W_LEAF · (share of the recent items in the item's leaf category)

with `covis` and `trend` normalized to [0, 1]. The component that contributed most names
the reason a person reads under the item.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from api import _kernels
from api.items import Rows, ServingCatalog
from stream_engine.catalog import CATEGORY_SEP, Vector

W_INTEREST = 1.0
W_COVISIT = 0.6
W_TREND = 0.2
# Same leaf category as the session's recent items (the space may stop above the leaves).
W_LEAF = 0.3
# How many of the session's most recent items feed co-visitation, and their weights.
COVISIT_SOURCES = 5
RECENCY = (1.0, 0.7, 0.5, 0.35, 0.25)
# Candidates per source: enough for a carousel after filters and diversity, few enough that
# scoring them stays far below the cost of the HTTP request around it.
CATEGORY_CANDIDATES = 50
TREND_CANDIDATES = 50
TOP_CATEGORIES = 2
# The most recent items whose learned neighbours become candidates.
SIMILAR_SOURCES = 3

Floats = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Trending:
    """Trending items per key ("" = global, else a category node path) as rows, best first,
    and the global trend prior of every catalog row in [0, 1] (score / best score).
    Refreshed in the background."""

    by_key: Mapping[str, Rows] = field(default_factory=dict)
    prior: Floats = field(default_factory=lambda: np.zeros(0, np.float32))

    def get(self, key: str = "") -> Rows:
        return self.by_key.get(key, _NO_ROWS)

    def prior_of(self, rows: Rows) -> Floats:
        p = self.prior
        if p.size == 0 or rows.size == 0:
            return np.zeros(rows.size, np.float32)
        if int(rows.max()) < p.size:  # the usual case: rows of the catalog the prior covers
            return p[rows].astype(np.float32, copy=False)
        return np.where(rows < p.size, p[np.minimum(rows, p.size - 1)], 0.0).astype(np.float32)


_NO_ROWS: Rows = np.zeros(0, np.int64)
_NO_SCORES: Floats = np.zeros(0, np.float32)


@dataclass(slots=True)
class Signals:
    """What one decision knows about the visitor."""

    interest: Vector | None  # unit vector, or None without signal
    recent_rows: list[int]
    covis: Covis = field(default_factory=lambda: Covis(_NO_ROWS, _NO_SCORES))
    categories: list[str] = field(default_factory=list)  # strongest category nodes
    anchor_title: str | None = None  # the page's item, for "similar to …"
    leaves: dict[int, float] = field(default_factory=dict)  # leaf -> recency-weighted share
    leaf_counts: dict[int, int] = field(default_factory=dict)  # leaf -> recent items in it
    similar: Rows = field(default_factory=lambda: _NO_ROWS)  # learned neighbours of recent
    similar_sets: list[tuple[int, set[int]]] | None = None  # per recent row, built lazily


def leaf_shares(leaves: Sequence[int], no_leaf: int) -> tuple[dict[int, float], dict[int, int]]:
    """Per leaf category of the recent items (their leaves, most recent first):
    recency-weighted share, and count."""
    weights = [RECENCY[min(i, len(RECENCY) - 1)] for i in range(len(leaves))]
    total = sum(weights)
    shares: dict[int, float] = {}
    counts: dict[int, int] = {}
    for leaf, w in zip(leaves, weights, strict=True):
        if leaf == no_leaf:  # items without a category share no affinity
            continue
        shares[leaf] = shares.get(leaf, 0.0) + w / total
        counts[leaf] = counts.get(leaf, 0) + 1
    return shares, counts


def unit(v: Vector | None) -> Vector | None:
    if v is None:
        return None
    if v.dtype == np.float32 and v.flags.c_contiguous:  # every vector a decision reads
        return _kernels.unit_f32(v)
    norm = float(np.sqrt(v @ v))  # np.linalg.norm's arithmetic, without its checks
    if norm <= 1e-9:
        return None
    out = v / norm
    return out if out.dtype == np.float32 else out.astype(np.float32)


@functools.lru_cache(maxsize=8)
def _category_dims(names: tuple[str, ...]) -> tuple[Rows, list[str], Rows]:
    dims = [i for i, n in enumerate(names) if n.startswith("cat:")]
    depth = np.asarray([names[i].count(CATEGORY_SEP) for i in dims], np.int64)
    return np.asarray(dims, np.int64), [names[i][4:] for i in dims], depth


def top_categories(
    space_names: tuple[str, ...], interest: Vector, k: int = TOP_CATEGORIES
) -> list[str]:
    """The k strongest category nodes of an interest vector, deepest first on ties."""
    dims, labels, depth = _category_dims(space_names)
    return [labels[i] for i in _kernels.top_dims(interest, dims, depth, k)]


Neighbours = tuple[Rows, Floats]  # an item's co-visited rows and scores (best = 1)


@dataclass(slots=True)
class Covis:
    """Co-visitation of a session's recent items: candidate rows (sorted) and their score in
    [0, 1]; `via_of` names the recent row that contributed most to a row (for the reason),
    worked out only for the few rows whose reason asks."""

    rows: Rows
    scores: Floats
    sources: list[tuple[float, int, Neighbours]] = field(default_factory=list)
    _by_source: list[tuple[float, int, dict[int, float]]] | None = None

    def via_of(self, row: int) -> int | None:
        if self._by_source is None:
            self._by_source = [
                (w, src, dict(zip(nb[0].tolist(), nb[1].tolist(), strict=True)))
                for w, src, nb in self.sources
            ]
        best, via = 0.0, None
        for w, src, scores in self._by_source:  # most recent first: it wins ties
            if (c := w * scores.get(row, 0.0)) > best:
                best, via = c, src
        return via


def merge_covis(recent_rows: Sequence[int], neighbours: Mapping[int, Neighbours]) -> Covis:
    """Co-visitation of the recent items, recency-weighted and normalized to [0, 1], over
    the sorted union of their rows (compiled: api/_kernels.pyx)."""
    found = []
    for rank, src in enumerate(recent_rows[:COVISIT_SOURCES]):
        nb = neighbours.get(src)
        if nb is not None and nb[0].size:
            found.append((RECENCY[rank], src, nb))
    if not found:
        return Covis(_NO_ROWS, _NO_SCORES)
    rows, scores = _kernels.merge_weighted([(w, nb) for w, _, nb in found])
    return Covis(rows, scores, found)


def candidates(
    catalog: ServingCatalog,
    signals: Signals,
    trending: Trending,
    category_rows: Mapping[str, Rows],
) -> Rows:
    parts: list[Rows] = [signals.covis.rows, signals.similar]
    top_leaves = sorted(signals.leaves, key=lambda k: -signals.leaves[k])[:TOP_CATEGORIES]
    for leaf in top_leaves:
        parts.append(category_rows.get(catalog.leaf_names[leaf], _NO_ROWS)[:CATEGORY_CANDIDATES])
    for cat in signals.categories:
        parts.append(trending.get(cat)[:TREND_CANDIDATES])
        parts.append(category_rows.get(cat, _NO_ROWS)[:CATEGORY_CANDIDATES])
    parts.append(trending.get()[:TREND_CANDIDATES])
    return _kernels.union_sorted(parts)


@dataclass(frozen=True, slots=True)
class Scored:
    rows: Rows
    table: npt.NDArray[np.float32]  # (5, n): total, interest, covis, trend, leaf per candidate

    @property
    def total(self) -> Floats:
        total: Floats = self.table[0]
        return total


def score(catalog: ServingCatalog, rows: Rows, signals: Signals, trending: Trending) -> Scored:
    """Every component for every candidate, in float32 (the weights as float32), in one
    compiled pass (api/_kernels.pyx)."""
    table = _kernels.score_parts(
        catalog.matrix, rows, signals.interest, signals.covis.rows, signals.covis.scores,
        trending.prior, catalog.leaf, signals.leaves, W_INTEREST, W_COVISIT, W_TREND, W_LEAF,
    )  # fmt: skip
    return Scored(rows, table)


Parts = list[float]  # one item's interest, covis, trend and leaf


def parts_of(scored: Scored, positions: list[int]) -> list[Parts]:
    """The score components of the candidates at `positions`, as Python floats."""
    return _kernels.parts_at(scored.table, positions)


def reason(
    catalog: ServingCatalog,
    row: int,
    parts: Parts,
    signals: Signals,
    personal: bool,
) -> str:
    """A short reason a person can read, from the component that contributed most (the
    first of interest, co-visitation, trend, anchor on a tie)."""
    interest, covis, trend, leaf_share = parts
    top, best = "interest", (W_INTEREST * interest + W_LEAF * leaf_share) if personal else 0.0
    if W_COVISIT * covis > best:
        top, best = "covis", W_COVISIT * covis
    if W_TREND * trend > best:
        top, best = "trend", W_TREND * trend
    anchored = not personal and signals.anchor_title is not None and interest > 0
    if anchored and W_INTEREST * interest > best:
        return f"similar to {signals.anchor_title}"
    item = catalog.item(row)
    leaf = item.leaf_name
    if best <= 0:
        return f"popular in {leaf}" if leaf else "popular now"
    if top == "covis" and (via := signals.covis.via_of(row)) is not None:
        return f"viewed next by people who viewed {catalog.item(via).title}"
    if top == "interest":
        same = signals.leaf_counts.get(int(catalog.leaf[row]), 0)
        if same:
            return f"because you viewed {same} item{'s' if same > 1 else ''} in {leaf}"
        # only now the learned neighbours: most picks stop above
        if (like := similar_source(catalog, row, signals)) is not None:
            return f"similar to {catalog.item(like).title}"
        if not leaf:
            return "similar to items you viewed"
        if signals.categories:
            return f"matches your interest in {signals.categories[0].split(CATEGORY_SEP)[-1]}"
        return f"matches your interest in {leaf}"
    return f"trending in {leaf}" if signals.categories and leaf else "trending now"


def similar_source(catalog: ServingCatalog, row: int, signals: Signals) -> int | None:
    """The recent item (of the few that feed candidates) whose learned neighbours include
    `row`, for "similar to …"; None if the item is not among them. The neighbour sets are
    built once per decision, on the first item that asks."""
    if signals.similar_sets is None:
        sim = catalog.similar
        sources = [r for r in signals.recent_rows[:SIMILAR_SOURCES] if r < sim.shape[0]]
        members = sim[sources].tolist() if sources else []
        signals.similar_sets = [(src, set(m)) for src, m in zip(sources, members, strict=True)]
    for src, neighbours in signals.similar_sets:
        if row in neighbours:
            return src
    return None
