"""What a decision reads besides the visitor's state, rebuilt off the request path.

`build_serving` turns the config in force, the catalog, trending and the clock into one
immutable snapshot: compiled rules per slot, banner vectors, candidate rows per category,
and the precomputed default answer of every slot (trending through the slot's rules, else
its configured default). The background refresher swaps in a new snapshot every second;
requests only ever read one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from api.config import Banner, DecisionConfig, Slot, SlotKind
from api.items import Mask, Rows, ServingCatalog
from api.rules import Pick, SlotRules, compile_rules, select, sensitive_mask
from api.scoring import Trending
from stream_engine.catalog import CATEGORY_SEP, Matrix


@dataclass(frozen=True, slots=True)
class BannerSet:
    """The active banners of one slot, in file order, with their targeting vectors."""

    banners: tuple[Banner, ...]
    vectors: Matrix  # row i: unit targeting vector of banners[i] (zeros if untargeted)
    sensitive: tuple[bool, ...]
    default: Banner
    # per banner, per targeted category: (its last name, the leaf ids under it), so the
    # reason ("because you viewed 3 items in Running") costs no catalog scan per request
    targets: tuple[tuple[tuple[str, frozenset[int]], ...], ...] = ()


@dataclass(frozen=True, slots=True)
class SlotDefault:
    picks: tuple[Pick, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Compiled:
    """What a snapshot compiles from the config, the catalog and the clock (not trending),
    and what it was compiled on."""

    rules: Mapping[str, SlotRules]
    banners: Mapping[str, BannerSet]
    category_rows: Mapping[str, Rows]
    sensitive: Mask | None
    compiled_at: dt.datetime
    # the first start or end of a rule's or banner's window after compiled_at (None: none
    # ahead), when the compiled rules and banners go stale without any change to the config
    recompile_at: dt.datetime | None
    layout_version: int  # the catalog's layout_version the rules and banners were compiled on
    catalog_version: int  # the catalog's version the stock-dependent parts were computed on


@dataclass(frozen=True, slots=True)
class Serving:
    config: DecisionConfig
    catalog: ServingCatalog
    trending: Trending
    compiled: Compiled
    defaults: Mapping[str, SlotDefault]
    size: int  # catalog rows when built; newer rows wait for the next snapshot

    @property
    def rules(self) -> Mapping[str, SlotRules]:
        return self.compiled.rules

    @property
    def banners(self) -> Mapping[str, BannerSet]:
        return self.compiled.banners

    @property
    def category_rows(self) -> Mapping[str, Rows]:
        return self.compiled.category_rows

    @property
    def sensitive(self) -> Mask | None:
        return self.compiled.sensitive


def _category_rows(catalog: ServingCatalog) -> dict[str, Rows]:
    """Every leaf category and every category node of the space -> its in-stock rows, in
    catalog order. Grouped with one sort, not a scan per category (100k items)."""
    rows = np.flatnonzero(catalog.in_stock).astype(np.int64)
    leaves = catalog.leaf[rows]
    order = np.argsort(leaves, kind="stable")
    rows, leaves = rows[order], leaves[order]
    bounds = np.flatnonzero(np.diff(leaves)) + 1
    out: dict[str, Rows] = {
        catalog.leaf_names[int(group[0])]: r
        for r, group in zip(np.split(rows, bounds), np.split(leaves, bounds), strict=True)
        if group.size
    }
    for name in catalog.space.names:
        if name.startswith("cat:"):
            node = name[4:]
            parts = [r for leaf, r in out.items()
                     if leaf == node or leaf.startswith(node + CATEGORY_SEP)]  # fmt: skip
            out[node] = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return out


def _banner_vectors(banners: tuple[Banner, ...], catalog: ServingCatalog) -> Matrix:
    """Unit targeting vectors: per banner, the sum of the mean vector of each of its
    categories and the mean of its anchor items. The category means come from one matrix
    product (BLAS, without the GIL), ~8 ms with 100k items for the demo's 17 categories,
    against ~22 ms of a masked copy per category (the compile's biggest part, in a thread
    whose GIL held the event loop)."""
    dims = catalog.space.dims
    out = np.zeros((len(banners), dims), np.float32)
    cats = sorted({c for b in banners for c in b.categories})
    if cats:
        weights = np.zeros((len(cats), len(catalog)), np.float32)
        for i, cat in enumerate(cats):
            weights[i] = catalog.category_mask([cat])
        counts = weights.sum(axis=1)
        means = (weights @ catalog.matrix) / np.maximum(counts, 1.0)[:, None]
        mean_of = dict(zip(cats, means, strict=True))
    for i, banner in enumerate(banners):
        for cat in banner.categories:
            out[i] += mean_of[cat]  # zeros for a category without items
        rows = catalog.rows(banner.items)
        if rows:
            out[i] += catalog.matrix[rows].mean(axis=0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def _banner_sets(
    config: DecisionConfig, catalog: ServingCatalog, now: dt.datetime
) -> dict[str, BannerSet]:
    by_id = {b.banner_id: b for b in config.banners}
    out: dict[str, BannerSet] = {}
    for slot in config.slots.values():
        if slot.kind is not SlotKind.BANNER or slot.default_banner is None:
            continue
        active = tuple(b for b in config.banners if slot.name in b.slots and b.window.active(now))
        vectors = _banner_vectors(active, catalog)
        sensitive = tuple(
            any(c == s or c.startswith(s + CATEGORY_SEP)
                for c in b.categories for s in config.sensitive_categories)
            for b in active
        )  # fmt: skip
        targets = tuple(
            tuple((c.split(CATEGORY_SEP)[-1], frozenset(catalog.leaves_under([c])))
                  for c in b.categories)
            for b in active
        )  # fmt: skip
        out[slot.name] = BannerSet(active, vectors, sensitive, by_id[slot.default_banner],
                                   targets)  # fmt: skip
    return out


def _default_picks(
    slot: Slot, catalog: ServingCatalog, rules: SlotRules, trending: Trending
) -> SlotDefault:
    rows = trending.get()
    picks = select(slot, slot.max_n, rows, trending.prior_of(rows), catalog, rules, ())
    reason = "popular right now"
    if len(picks) < slot.max_n:
        # Not enough trending yet (a fresh deployment): the slot's configured default items,
        # then the catalog's first items in stock.
        taken = {p.row for p in picks}
        static = np.asarray(catalog.rows(slot.default_items), np.int64)
        first = np.flatnonzero(catalog.in_stock)[: slot.max_n * 4].astype(np.int64)
        fill = np.concatenate([static, first])
        weights = np.linspace(1.0, 0.5, fill.size, dtype=np.float32)
        more = select(slot, slot.max_n - len(picks), fill, weights, catalog, rules, taken)
        picks += more
        if not trending.get().size:
            reason = "featured"
    return SlotDefault(tuple(picks), reason)


def next_window_change(config: DecisionConfig, after: dt.datetime) -> dt.datetime | None:
    """The first start or end of any rule's or banner's window later than `after`."""
    windows = [r.window for r in config.rules] + [b.window for b in config.banners]
    ahead = [t for w in windows for t in (w.start, w.end) if t is not None and t > after]
    return min(ahead, default=None)


def _still_compiled(previous: Serving, config: DecisionConfig, catalog: ServingCatalog,
                    now: dt.datetime) -> bool:  # fmt: skip
    """Whether the previous snapshot's rules and banners are still right but for stock:
    same config, no catalog change but stock (and titles), no window boundary crossed (nor
    the clock set back)."""
    done = previous.compiled
    return (
        previous.config is config
        and done.layout_version == catalog.layout_version
        and done.compiled_at <= now
        and (done.recompile_at is None or now < done.recompile_at)
    )


def _restocked(done: Compiled, catalog: ServingCatalog) -> Compiled:
    """A compile with its stock-dependent parts worked out again, after stock changes only:
    each slot's in-stock-and-allowed rows and the in-stock rows per category (~8 ms with
    100k items, against ~40 for the whole compile)."""
    rules = {name: replace(r, allowed=catalog.in_stock[: r.exclude.size] & ~r.exclude)
             for name, r in done.rules.items()}  # fmt: skip
    return replace(done, rules=rules, category_rows=_category_rows(catalog),
                   catalog_version=catalog.version)  # fmt: skip


def needs_compile(previous: Serving | None, config: DecisionConfig, catalog: ServingCatalog,
                  now: dt.datetime) -> bool:  # fmt: skip
    """Whether compile_for has work to do (else it returns the previous snapshot's)."""
    return (
        previous is None
        or previous.compiled.catalog_version != catalog.version
        or not _still_compiled(previous, config, catalog, now)
    )


def compile_for(config: DecisionConfig, catalog: ServingCatalog, now: dt.datetime,
                previous: Serving | None = None) -> Compiled:  # fmt: skip
    """The compiled part of the next snapshot. Compiled again only when the config changed,
    the catalog changed other than in stock (or titles), or a rule's or banner's start or
    end has come (a window takes effect on the first refresh after its boundary); after
    stock changes alone only the stock-dependent parts are. Reads the config and the
    catalog and writes neither, so the API runs it in a thread (~40 ms of work with 100k
    items, 8 with 10k) while the event loop serves decisions on the snapshot in force."""
    if previous is not None and _still_compiled(previous, config, catalog, now):
        done = previous.compiled
        return done if done.catalog_version == catalog.version else _restocked(done, catalog)
    return Compiled(
        compile_rules(config, catalog, now), _banner_sets(config, catalog, now),
        _category_rows(catalog), sensitive_mask(config, catalog), now,
        next_window_change(config, now), catalog.layout_version, catalog.version,
    )  # fmt: skip


def build_serving(
    config: DecisionConfig,
    catalog: ServingCatalog,
    trending: Trending,
    now: dt.datetime,
    previous: Serving | None = None,
    compiled: Compiled | None = None,
) -> Serving:
    """A new snapshot: `compiled` (compile_for's, worked out here if not given) and the
    defaults, which follow trending every time."""
    if compiled is None:
        compiled = compile_for(config, catalog, now, previous)
    defaults = {
        s.name: _default_picks(s, catalog, compiled.rules[s.name], trending)
        for s in config.slots.values()
        if s.kind is SlotKind.ITEMS
    }
    return Serving(config, catalog, trending, compiled, defaults, len(catalog))
