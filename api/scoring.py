"""Candidates and scores: a few hundred items per decision, never the whole catalog.

Candidates come from co-visitation of the session's last items, trending in its strongest
categories, global trending and the first items of those categories; each is scored

    score = W_INTEREST · cos(interest, item) + W_COVISIT · covis + W_TREND · trend

with `covis` and `trend` normalized to [0, 1]. The component that contributed most names
the reason a person reads under the item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

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
CATEGORY_CANDIDATES = 100
TOP_CATEGORIES = 2

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
        return np.where(rows < p.size, p[np.minimum(rows, p.size - 1)], 0.0).astype(np.float32)


_NO_ROWS: Rows = np.zeros(0, np.int64)


@dataclass(slots=True)
class Signals:
    """What one decision knows about the visitor."""

    interest: Vector | None  # unit vector, or None without signal
    recent_rows: list[int]
    covis: dict[int, float] = field(default_factory=dict)  # row -> [0, 1]
    covis_via: dict[int, int] = field(default_factory=dict)  # row -> recent row it came from
    categories: list[str] = field(default_factory=list)  # strongest category nodes
    anchor_title: str | None = None  # the page's item, for "similar to …"
    leaves: dict[int, float] = field(default_factory=dict)  # leaf -> recency-weighted share


def leaf_shares(catalog: ServingCatalog, recent_rows: Sequence[int]) -> dict[int, float]:
    weights = [RECENCY[min(i, len(RECENCY) - 1)] for i in range(len(recent_rows))]
    total = sum(weights)
    out: dict[int, float] = {}
    for row, w in zip(recent_rows, weights, strict=True):
        leaf = int(catalog.leaf[row])
        out[leaf] = out.get(leaf, 0.0) + w / total
    return out


def unit(v: Vector | None) -> Vector | None:
    if v is None:
        return None
    norm = float(np.linalg.norm(v))
    return (v / norm).astype(np.float32) if norm > 1e-9 else None


def top_categories(
    space_names: Sequence[str], interest: Vector, k: int = TOP_CATEGORIES
) -> list[str]:
    """The k strongest category nodes of an interest vector, deepest first on ties."""
    cats = [
        (float(interest[i]), name.count(CATEGORY_SEP), name[4:])
        for i, name in enumerate(space_names)
        if name.startswith("cat:") and interest[i] > 0
    ]
    cats.sort(key=lambda c: (-c[0], -c[1]))
    return [c[2] for c in cats[:k]]


def merge_covis(
    recent_rows: Sequence[int], neighbours: Mapping[int, Sequence[tuple[int, float]]]
) -> tuple[dict[int, float], dict[int, int]]:
    """Co-visitation of the recent items, recency-weighted and normalized to [0, 1]."""
    score: dict[int, float] = {}
    via: dict[int, int] = {}
    best: dict[int, float] = {}
    for rank, src in enumerate(recent_rows[:COVISIT_SOURCES]):
        w = RECENCY[rank]
        for row, s in neighbours.get(src, ()):
            contribution = w * s
            score[row] = score.get(row, 0.0) + contribution
            if contribution > best.get(row, 0.0):
                best[row], via[row] = contribution, src
    top = max(score.values(), default=0.0)
    if top > 0:
        score = {r: s / top for r, s in score.items()}
    return score, via


def candidates(
    catalog: ServingCatalog,
    signals: Signals,
    trending: Trending,
    category_rows: Mapping[str, Rows],
) -> Rows:
    parts: list[Rows] = [np.fromiter(signals.covis, np.int64, len(signals.covis))]
    top_leaves = sorted(signals.leaves, key=lambda k: -signals.leaves[k])[:TOP_CATEGORIES]
    for leaf in top_leaves:
        parts.append(category_rows.get(catalog.leaf_names[leaf], _NO_ROWS)[:CATEGORY_CANDIDATES])
    for cat in signals.categories:
        parts.append(trending.get(cat))
        parts.append(category_rows.get(cat, _NO_ROWS)[:CATEGORY_CANDIDATES])
    parts.append(trending.get())
    return np.unique(np.concatenate(parts))


@dataclass(frozen=True, slots=True)
class Scored:
    rows: Rows
    total: Floats
    interest: Floats
    covis: Floats
    trend: Floats
    leaf: Floats


def score(catalog: ServingCatalog, rows: Rows, signals: Signals, trending: Trending) -> Scored:
    n = rows.size
    interest = (
        catalog.matrix[rows] @ signals.interest
        if signals.interest is not None and n
        else np.zeros(n, np.float32)
    )
    covis = np.fromiter((signals.covis.get(int(r), 0.0) for r in rows), np.float32, n)
    trend = trending.prior_of(rows)
    leaf = np.zeros(n, np.float32)
    if signals.leaves and n:
        leaf_of = catalog.leaf[rows]
        for lf, share in signals.leaves.items():
            leaf[leaf_of == lf] = share
    total = W_INTEREST * interest + W_COVISIT * covis + W_TREND * trend + W_LEAF * leaf
    return Scored(rows, total.astype(np.float32), interest, covis, trend, leaf)


def reason(
    catalog: ServingCatalog,
    row: int,
    scored: Scored,
    i: int,
    signals: Signals,
    personal: bool,
) -> str:
    """A short reason a person can read, from the component that contributed most."""
    item = catalog.item(row)
    parts = {
        "interest": (W_INTEREST * float(scored.interest[i]) + W_LEAF * float(scored.leaf[i]))
        if personal
        else 0.0,
        "covis": W_COVISIT * float(scored.covis[i]),
        "trend": W_TREND * float(scored.trend[i]),
    }
    if not personal and signals.anchor_title is not None and scored.interest[i] > 0:
        parts["anchor"] = W_INTEREST * float(scored.interest[i])
    top = max(parts, key=lambda k: parts[k])
    if top == "anchor":
        return f"similar to {signals.anchor_title}"
    if parts[top] <= 0:
        return f"popular in {item.category[-1]}"
    if top == "covis" and row in signals.covis_via:
        return f"viewed next by people who viewed {catalog.item(signals.covis_via[row]).title}"
    if top == "interest":
        same = sum(1 for r in signals.recent_rows if catalog.leaf[r] == catalog.leaf[row])
        leaf = item.category[-1]
        if same:
            return f"because you viewed {same} item{'s' if same > 1 else ''} in {leaf}"
        if signals.categories:
            return f"matches your interest in {signals.categories[0].split(CATEGORY_SEP)[-1]}"
        return f"matches your interest in {leaf}"
    return f"trending in {item.category[-1]}" if signals.categories else "trending now"
