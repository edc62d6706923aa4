"""The decision for a page: the ladder from personalized to the slot's default, with reasons.

    personalized   the session's own interest vector (>= min_signal_events events)
    profile        the linked user's long-term profile (a new session of a known user)
    contextual     the page's item (anchor: context slots) for a visitor without signal
    trending       trending in the session's categories, else globally (fallback no_signal)
    default        the slot's precomputed default (no_signal, or the reason it was forced)
    holdout        the control group: the default, always

A page asks for several slots at once; they share one state read, and no item appears
twice on the page.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from api.config import Anchor, Slot, SlotKind
from api.fallback import FallbackReason
from api.holdout import Group
from api.rules import rules_fired, select, under_cap
from api.scoring import (
    SIMILAR_SOURCES,
    Signals,
    candidates,
    leaf_shares,
    merge_covis,
    parts_of,
    reason,
    score,
    top_categories,
    unit,
)
from api.serving import Serving
from api.session_state import SessionView
from stream_engine.catalog import CATEGORY_SEP

MIN_BANNER_SIMILARITY = 0.35
PERSONAL = frozenset({"personalized", "profile"})


@dataclass(frozen=True, slots=True)
class SlotAsk:
    slot: Slot
    n: int


@dataclass(frozen=True, slots=True)
class PageAsk:
    session_id: str
    user_id: str | None
    asks: tuple[SlotAsk, ...]
    context_item: str | None = None
    sensitive_ok: bool = False  # the storefront's consent for sensitive categories


@dataclass(slots=True)
class SlotDecision:
    slot: str
    decision_id: str
    strategy: str
    fallback_reason: FallbackReason | None
    group: Group
    config_version: str
    state_age_ms: int | None
    items: list[dict[str, Any]] = field(default_factory=list)
    banner: dict[str, Any] | None = None
    rules: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "slot": self.slot,
            "decision_id": self.decision_id,
            "strategy": self.strategy,
            "fallback_reason": self.fallback_reason.value if self.fallback_reason else None,
            "group": self.group.value,
            "config_version": self.config_version,
            "state_age_ms": self.state_age_ms,
        }
        if self.banner is not None:
            out["banner"] = self.banner
        else:
            out["items"] = self.items
            out["rules"] = self.rules
        return out


_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count()


def new_decision_id() -> str:
    """Unique across processes (a random prefix per process) and cheap (a counter)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def _banner_json(banner_id: str, creative: Any, why: str) -> dict[str, Any]:
    return {"banner_id": banner_id, **creative, "reason": why}


def _base(serving: Serving, ask: SlotAsk, group: Group, age_ms: int | None) -> SlotDecision:
    return SlotDecision(
        slot=ask.slot.name,
        decision_id=new_decision_id(),
        strategy="default",
        fallback_reason=None,
        group=group,
        config_version=serving.config.version,
        state_age_ms=age_ms,
    )


def default_decision(
    serving: Serving,
    ask: SlotAsk,
    why: FallbackReason,
    group: Group,
    used: set[int],
    age_ms: int | None = None,
) -> SlotDecision:
    """The slot's precomputed default; cheap enough for the overload path."""
    d = _base(serving, ask, group, age_ms)
    d.strategy = "holdout" if why is FallbackReason.HOLDOUT else "default"
    d.fallback_reason = why
    slot = ask.slot
    if slot.kind is SlotKind.BANNER:
        banner = serving.banners[slot.name].default
        d.banner = _banner_json(banner.banner_id, banner.creative, "featured")
        return d
    default = serving.defaults[slot.name]
    for p in default.picks:
        if len(d.items) == ask.n:
            break
        if p.row not in used:
            used.add(p.row)
            why_item = f"featured by {p.pinned_by}" if p.pinned_by else default.reason
            d.items.append(serving.catalog.item_json(p.row, why_item))
    return d


class PageDecider:
    """Decides every slot of one page from one SessionView."""

    def __init__(self, serving: Serving, page: PageAsk, view: SessionView, now_ms: int,
                 paused: Collection[str] = ()) -> None:  # fmt: skip
        self.serving = serving
        self.page = page
        self.view = view
        self.paused = paused
        self.used: set[int] = set()
        cat = serving.catalog
        self.blocked = set(cat.rows(view.bought)) | set(cat.rows(view.cart))
        self.recent_rows = [r for r in cat.rows(view.recent) if r < serving.size]
        self.recent_leaves = cat.leaf[self.recent_rows].tolist() if self.recent_rows else []
        self.age_ms = None if view.written_ms is None else max(0, now_ms - view.written_ms)
        events = view.events if view.vector is not None else 0
        if events >= serving.config.min_signal_events:
            self.strategy, self.interest = "personalized", unit(view.vector)
        elif view.profile is not None:
            self.strategy, self.interest = "profile", unit(view.profile)
        else:
            self.strategy, self.interest = "trending", None
        if self.interest is None:
            self.strategy = "trending"
        weak = unit(view.vector) if self.interest is None else self.interest
        names = serving.catalog.space.names
        self.categories = top_categories(names, weak) if weak is not None else []
        self._session_signals: tuple[Signals, str] | None = None

    def decide(self, ask: SlotAsk, group: Group, neighbours: Any) -> SlotDecision:
        if ask.slot.name in self.paused:
            return default_decision(self.serving, ask, FallbackReason.PAUSED, group, self.used,
                                    self.age_ms)  # fmt: skip
        if ask.slot.kind is SlotKind.BANNER:
            return self._banner(ask, group)
        return self._items(ask, group, neighbours)

    def _context_row(self, slot: Slot) -> int | None:
        if slot.anchor is not Anchor.CONTEXT or self.page.context_item is None:
            return None
        row = self.serving.catalog.row(self.page.context_item)
        return row if row is not None and row < self.serving.size else None

    def _signals(self, slot: Slot, neighbours: Any) -> tuple[Signals, str]:
        """What the slot's decision knows. Slots anchored on the session share one Signals
        (a page's carousels read the same co-visitation)."""
        ctx = self._context_row(slot)
        if ctx is None and self._session_signals is not None:
            return self._session_signals
        catalog = self.serving.catalog
        strategy, interest = self.strategy, self.interest
        recent, leaves, categories = self.recent_rows, self.recent_leaves, self.categories
        anchor_title = None
        if ctx is not None:
            anchor_title = catalog.item(ctx).title
            item_vec = catalog.matrix[ctx]
            interest = unit(item_vec if interest is None else item_vec + 0.5 * interest)
            others = [(r, leaf) for r, leaf in zip(recent, leaves, strict=True) if r != ctx]
            recent = [ctx, *(r for r, _ in others)]
            leaves = [int(catalog.leaf[ctx]), *(leaf for _, leaf in others)]
            node = CATEGORY_SEP.join(catalog.item(ctx).category[:2])
            if node:
                categories = [node, *(c for c in categories if c != node)]
            if strategy == "trending":
                strategy = "contextual"
        covis = merge_covis(recent, neighbours)
        shares, counts = leaf_shares(leaves, catalog.no_leaf)
        similar = catalog.similar_to(recent[:SIMILAR_SOURCES])
        signals = Signals(interest, recent, covis, categories, anchor_title, shares, counts,
                          similar)  # fmt: skip
        if ctx is None:
            self._session_signals = signals, strategy
        return signals, strategy

    def _items(self, ask: SlotAsk, group: Group, neighbours: Any) -> SlotDecision:
        serving, slot = self.serving, ask.slot
        signals, strategy = self._signals(slot, neighbours)
        if (signals.interest is None and not signals.covis.rows.size and not signals.categories
                and not signals.similar.size):  # fmt: skip
            return default_decision(serving, ask, FallbackReason.NO_SIGNAL, group, self.used,
                                    self.age_ms)  # fmt: skip
        rows = candidates(serving.catalog, signals, serving.trending, serving.category_rows)
        if rows.size and rows[-1] >= serving.size:  # sorted: items newer than the snapshot
            rows = rows[rows < serving.size]
        scored = score(serving.catalog, rows, signals, serving.trending)
        blocked = self.used | self.blocked
        if slot.exclude_seen:
            blocked |= set(signals.recent_rows)
        personal = strategy in PERSONAL
        sensitive = serving.sensitive if personal and not self.page.sensitive_ok else None
        picks = select(slot, ask.n, rows, scored.total, serving.catalog, serving.rules[slot.name],
                       blocked, sensitive)  # fmt: skip
        if not picks:
            return default_decision(serving, ask, FallbackReason.NO_SIGNAL, group, self.used,
                                    self.age_ms)  # fmt: skip
        d = _base(serving, ask, group, self.age_ms)
        d.strategy = strategy
        if strategy == "trending":
            d.fallback_reason = FallbackReason.NO_SIGNAL
        parts = iter(parts_of(scored, [p.at for p in picks if p.at is not None]))
        for p in picks:
            self.used.add(p.row)
            why = (reason(serving.catalog, p.row, next(parts), signals, personal)
                   if p.at is not None
                   else f"featured by {p.pinned_by}" if p.pinned_by else "featured")  # fmt: skip
            d.items.append(serving.catalog.item_json(p.row, why))
        self._fill(d, ask)
        d.rules = rules_fired(picks, rows, serving.rules[slot.name])
        return d

    def _fill(self, d: SlotDecision, ask: SlotAsk) -> None:
        """Too few candidates survived the filters: top up from the slot's default."""
        if len(d.items) >= ask.n:
            return
        extra = default_decision(self.serving, SlotAsk(ask.slot, ask.n - len(d.items)),
                                 FallbackReason.NO_SIGNAL, d.group, self.used)  # fmt: skip
        d.items.extend(extra.items)

    def _banner(self, ask: SlotAsk, group: Group) -> SlotDecision:
        bs = self.serving.banners[ask.slot.name]
        interest = self.interest
        if interest is None or not bs.banners:
            return default_decision(self.serving, ask, FallbackReason.NO_SIGNAL, group,
                                    self.used, self.age_ms)  # fmt: skip
        sims = bs.vectors @ interest
        best, best_score, best_i = None, 0.0, -1
        for i, b in enumerate(bs.banners):
            if not b.targeted or sims[i] < MIN_BANNER_SIMILARITY:
                continue
            if not under_cap(self.view.impressions, b.banner_id, b.frequency_cap):
                continue
            if bs.sensitive[i] and not self.page.sensitive_ok:
                continue
            if (s := float(sims[i]) * b.priority) > best_score:
                best, best_score, best_i = b, s, i
        if best is None:
            return default_decision(self.serving, ask, FallbackReason.NO_SIGNAL, group,
                                    self.used, self.age_ms)  # fmt: skip
        d = _base(self.serving, ask, group, self.age_ms)
        d.strategy = self.strategy
        reason = self._banner_reason(bs.targets[best_i])
        d.banner = _banner_json(best.banner_id, best.creative, reason)
        return d

    def _banner_reason(self, targets: tuple[tuple[str, frozenset[int]], ...]) -> str:
        for name, leaves in targets:
            seen = sum(1 for leaf in self.recent_leaves if leaf in leaves)
            if seen:
                return f"because you viewed {seen} item{'s' if seen > 1 else ''} in {name}"
        if self.categories:
            return f"matches your interest in {self.categories[0].split(CATEGORY_SEP)[-1]}"
        return "picked for you"


def covis_sources(serving: Serving, page: PageAsk, view: SessionView) -> list[int]:
    """The rows whose co-visitation neighbours this page needs."""
    cat = serving.catalog
    rows = [r for r in cat.rows(view.recent[:5]) if r < serving.size]
    if page.context_item is not None and (r := cat.row(page.context_item)) is not None:
        rows.insert(0, r)
    return rows


def decide_page(
    serving: Serving,
    page: PageAsk,
    view: SessionView,
    group: Group,
    neighbours: Any,
    now_ms: int,
    paused: Collection[str] = (),
) -> list[SlotDecision]:
    """Every slot of the page in order; paused slots get their default (sharing the page's
    no-repeat set with the rest)."""
    decider = PageDecider(serving, page, view, now_ms, paused)
    return [decider.decide(ask, group, neighbours) for ask in page.asks]
