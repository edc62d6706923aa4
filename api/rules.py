"""Merchandising rules, filters and diversity: from scored candidates to the items served.

Rules and their row masks are compiled once per config or catalog change (and on every
refresh tick, so start/end windows take effect), never per request. Order of a pick:
rules exclude and re-weight, filters drop what must never be shown (purchased, in cart,
out of stock, sensitive without consent, already on the page), diversity keeps at most k
per category, then pins take their positions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from api import _kernels
from api.config import Action, DecisionConfig, Slot, SlotKind
from api.items import Mask, Rows, ServingCatalog

Scores = npt.NDArray[np.float32]
MAX_RULE_BITS = 64  # rules per slot that rules_fired tracks in one word per row


@dataclass(frozen=True, slots=True)
class Pin:
    rule_id: str
    position: int
    rows: tuple[int, ...]


@dataclass(slots=True)
class SlotRules:
    exclude: Mask
    weight: Scores  # product of active boost/bury factors per row
    pins: tuple[Pin, ...] = ()
    fired: dict[str, Mask] = field(default_factory=dict)  # rule id -> rows it touches
    excluding: frozenset[str] = frozenset()  # ids of the exclude rules among them
    allowed: Mask | None = None  # in stock and not excluded, as of compile time
    weighted: bool = False  # any boost or bury
    # per row, bit i set when the i-th rule of `fired` touches it (at most 64 rules; None
    # beyond), and the bits of the exclude rules: which rules shaped an answer, in one pass
    bits: npt.NDArray[np.uint64] | None = None
    exclude_bits: int = 0


def compile_rules(
    config: DecisionConfig, catalog: ServingCatalog, now: dt.datetime
) -> dict[str, SlotRules]:
    """Per items slot: the rows its active rules exclude, re-weight and pin."""
    n = len(catalog)
    out: dict[str, SlotRules] = {}
    masks: dict[str, Mask] = {}
    for rule in config.rules:
        if rule.window.active(now):
            mask = catalog.category_mask(rule.categories) | catalog.brand_mask(rule.brands)
            mask[catalog.rows(rule.items)] = True
            masks[rule.rule_id] = mask
    for slot in config.slots.values():
        if slot.kind is not SlotKind.ITEMS:
            continue
        rules = SlotRules(np.zeros(n, dtype=bool), np.ones(n, dtype=np.float32))
        pins: list[Pin] = []
        for rule in config.rules:
            hit = masks.get(rule.rule_id)
            if hit is None or not rule.applies_to(slot.name):
                continue
            rules.fired[rule.rule_id] = hit
            if rule.action is Action.EXCLUDE:
                rules.exclude |= hit
                rules.excluding = rules.excluding | {rule.rule_id}
            elif rule.action is Action.PIN:
                pins.append(Pin(rule.rule_id, rule.position, tuple(catalog.rows(rule.items))))
            else:
                rules.weight[hit] *= np.float32(rule.factor)
                rules.weighted = True
        rules.pins = tuple(sorted(pins, key=lambda p: p.position))
        rules.allowed = catalog.in_stock[:n] & ~rules.exclude
        _rule_bits(rules, n)
        out[slot.name] = rules
    return out


def _rule_bits(rules: SlotRules, n: int) -> None:
    if len(rules.fired) > MAX_RULE_BITS:
        return
    bits = np.zeros(n, np.uint64)
    for i, (rid, mask) in enumerate(rules.fired.items()):
        bits[mask] |= np.uint64(1 << i)
        if rid in rules.excluding:
            rules.exclude_bits |= 1 << i
    rules.bits = bits


class Pick(NamedTuple):
    """An item to serve. `at`: its index among the scored candidates handed to select (None
    for a pinned item), where the decision finds its score components for the reason."""

    row: int
    pinned_by: str | None = None
    at: int | None = None


def _allowed_rows(catalog: ServingCatalog, rules: SlotRules) -> npt.NDArray[np.uint8]:
    """Per row the rules know: in stock and not excluded (compiled with the rules; worked
    out here when the catalog grew since). Rows added since are not served until the rules
    are compiled again (the next snapshot)."""
    if rules.allowed is not None and rules.allowed.size == len(catalog):
        return rules.allowed.view(np.uint8)
    n = min(len(catalog), rules.exclude.size)
    ok: npt.NDArray[np.uint8] = (catalog.in_stock[:n] & ~rules.exclude[:n]).view(np.uint8)
    return ok


def select(
    slot: Slot,
    n: int,
    rows: Rows,
    scores: Scores,
    catalog: ServingCatalog,
    rules: SlotRules,
    blocked_rows: Collection[int],
    sensitive: Mask | None = None,
) -> list[Pick]:
    """The n items to serve from scored candidates (rows[i] scored scores[i]), best first;
    a row given twice is served once."""
    pins = _pins(rules, catalog, blocked_rows, sensitive, n) if rules.pins else []
    taken = {p.row for p in pins}
    walked = _kernels.walk(
        rows, scores, _allowed_rows(catalog, rules), rules.weight if rules.weighted else None,
        None if sensitive is None else sensitive.view(np.uint8), catalog.leaf,
        len(catalog.leaf_names), blocked_rows, taken, slot.max_per_category or n,
        catalog.no_leaf, n - len(pins),
    )  # fmt: skip
    picks = [Pick(row, None, at) for row, at in walked]
    last = -1
    for p in pins:  # sorted by position; pins sharing a position keep their file order
        last = min(max(p.position, last + 1), len(picks))
        picks.insert(last, Pick(p.row, p.pinned_by))
    return picks[:n]


@dataclass(frozen=True, slots=True)
class _PinnedRow:
    row: int
    position: int
    pinned_by: str


def _pins(
    rules: SlotRules,
    catalog: ServingCatalog,
    blocked_rows: Collection[int],
    sensitive: Mask | None,
    n: int,
) -> list[_PinnedRow]:
    out: list[_PinnedRow] = []
    taken: set[int] = set()
    for pin in rules.pins:
        for row in pin.rows:
            if row in taken or row in blocked_rows or not catalog.in_stock[row]:
                continue
            if rules.exclude[row] or (sensitive is not None and sensitive[row]):
                continue
            out.append(_PinnedRow(row, pin.position, pin.rule_id))
            taken.add(row)
            break  # one item per pin rule: its first item that may be shown
    return out[:n]


def rules_fired(picks: list[Pick], candidates: Rows, rules: SlotRules) -> list[str]:
    """Rule ids that shaped this answer (for the report's "rules that never fired"): an
    exclude rule when it removed a candidate, any other when it touched an item served."""
    if (bits := rules.bits) is not None:
        hit = _kernels.or_bits(bits, candidates) & rules.exclude_bits
        hit |= _kernels.or_bits(bits, [p.row for p in picks]) & ~rules.exclude_bits
        return [rid for i, rid in enumerate(rules.fired) if hit >> i & 1] if hit else []
    rows = np.asarray([p.row for p in picks], dtype=np.int64)
    out = []
    for rid, mask in rules.fired.items():
        touched = candidates if rid in rules.excluding else rows
        if touched.size and bool(mask[touched].any()):
            out.append(rid)
    return out


def sensitive_mask(config: DecisionConfig, catalog: ServingCatalog) -> Mask | None:
    if not config.sensitive_categories:
        return None
    return catalog.category_mask(config.sensitive_categories)


def under_cap(impressions: Mapping[str, int], banner_id: str, cap: int) -> bool:
    """Frequency cap: impressions of this banner the session reported, against its cap."""
    return cap == 0 or impressions.get(banner_id, 0) < cap
