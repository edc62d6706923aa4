"""Decision configuration as data: slots, banners and merchandising rules in one YAML file.

    version: "2026-11-22.1"          # shown in every decision
    holdout_share: 0.05              # share of visitors in the control group
    sensitive_categories: ["Beauty > Skincare"]
    slots:
      home_hero: {kind: banner, default_banner: hero-welcome}
      home_recs: {kind: items, n: 8, max_per_category: 2}
      pdp_similar: {kind: items, n: 6, anchor: context}
    banners:
      - id: hero-running
        slots: [home_hero]
        title: "Run further"
        targeting: {categories: ["Sports > Running"], items: [sku-000001]}
        priority: 1.0
        start: 2026-11-01T00:00:00Z
        frequency_cap: 5
    rules:
      - {id: no-grocery-on-home, slot: home_recs, action: exclude, categories: [Grocery]}
      - {id: pin-gift, slot: home_recs, action: pin, items: [sku-000042], position: 0}
      - {id: boost-brand, slot: "*", action: boost, brands: [Altura], factor: 1.5}

`load_config(path)` validates everything and raises ConfigFileError naming the file, the
entry and the problem; nothing half-valid is ever put in force.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from api.exceptions import ConfigFileError
from stream_engine.catalog import CATEGORY_SEP
from stream_engine.events import ID_PATTERN

MAX_SLOT_ITEMS = 50


class SlotKind(enum.StrEnum):
    BANNER = "banner"
    ITEMS = "items"


class Anchor(enum.StrEnum):
    """What an items slot recommends from: the session, or the page's item (pdp)."""

    SESSION = "session"
    CONTEXT = "context"


class Action(enum.StrEnum):
    PIN = "pin"
    BOOST = "boost"
    BURY = "bury"
    EXCLUDE = "exclude"


@dataclass(frozen=True, slots=True)
class Slot:
    name: str
    kind: SlotKind
    n: int = 1
    max_n: int = 24
    max_per_category: int = 0  # 0 = no diversity limit
    anchor: Anchor = Anchor.SESSION
    exclude_seen: bool = True
    default_banner: str | None = None
    default_items: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Window:
    start: dt.datetime | None = None
    end: dt.datetime | None = None

    def active(self, now: dt.datetime) -> bool:
        return (self.start is None or self.start <= now) and (self.end is None or now < self.end)


@dataclass(frozen=True, slots=True)
class Banner:
    banner_id: str
    slots: tuple[str, ...]
    creative: Mapping[str, str]
    categories: tuple[str, ...] = ()
    items: tuple[str, ...] = ()
    priority: float = 1.0
    window: Window = field(default_factory=Window)
    frequency_cap: int = 0  # impressions per session; 0 = none

    @property
    def targeted(self) -> bool:
        return bool(self.categories or self.items)


@dataclass(frozen=True, slots=True)
class Rule:
    rule_id: str
    slot: str  # "*" = every items slot
    action: Action
    items: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    brands: tuple[str, ...] = ()
    factor: float = 1.0
    position: int = 0
    window: Window = field(default_factory=Window)

    def applies_to(self, slot: str) -> bool:
        return self.slot in ("*", slot)


@dataclass(frozen=True, slots=True)
class DecisionConfig:
    version: str
    slots: Mapping[str, Slot]
    banners: tuple[Banner, ...]
    rules: tuple[Rule, ...]
    holdout_share: float = 0.05
    sensitive_categories: tuple[str, ...] = ()
    min_signal_events: int = 1
    source: str = ""


_CREATIVE_FIELDS = ("title", "subtitle", "image", "link", "cta")


class _Entry:
    """Reads one mapping of the file; every error says the file and the entry."""

    def __init__(self, where: str, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise ConfigFileError(f"{where}: expected a mapping, got {type(raw).__name__}")
        self.where = where
        self.raw: dict[str, Any] = raw

    def fail(self, problem: str) -> ConfigFileError:
        return ConfigFileError(f"{self.where}: {problem}")

    def reject_unknown(self, known: Sequence[str]) -> None:
        unknown = sorted(set(self.raw) - set(known))
        if unknown:
            raise self.fail(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")

    def ident(self, name: str) -> str:
        value = self.raw.get(name)
        if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
            raise self.fail(f"{name} must be an id of 1-128 chars [A-Za-z0-9._:@-], got {value!r}")
        return value

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.raw.get(name, default)
        if value is not None and not isinstance(value, str):
            raise self.fail(f"{name} must be a string")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self.fail(f"{name} must be a number")
        if not low <= value <= high:
            raise self.fail(f"{name} must be between {low} and {high}, got {value}")
        return float(value)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{name} must be an integer")
        if not low <= value <= high:
            raise self.fail(f"{name} must be between {low} and {high}, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(f"{name} must be true or false")
        return value

    def strings(self, name: str, ids: bool = False) -> tuple[str, ...]:
        value = self.raw.get(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"{name} must be a list of strings")
        if ids and (bad := [v for v in value if not ID_PATTERN.fullmatch(v)]):
            raise self.fail(f"{name} has invalid ids: {', '.join(map(repr, bad[:3]))}")
        return tuple(value)

    def choice(self, name: str, kind: type[enum.StrEnum], default: str | None = None) -> Any:
        value = self.raw.get(name, default)
        try:
            return kind(str(value))
        except ValueError:
            options = ", ".join(k.value for k in kind)
            raise self.fail(f"{name} must be one of {options}, got {value!r}") from None

    def window(self) -> Window:
        start, end = self._when("start"), self._when("end")
        if start and end and end <= start:
            raise self.fail("end must be after start")
        return Window(start, end)

    def _when(self, name: str) -> dt.datetime | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value)
            except ValueError:
                raise self.fail(f"{name} must be an ISO 8601 date-time") from None
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = dt.datetime(value.year, value.month, value.day)
        if not isinstance(value, dt.datetime):
            raise self.fail(f"{name} must be an ISO 8601 date-time")
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _category(path: str) -> str:
    return CATEGORY_SEP.join(p.strip() for p in path.split(">") if p.strip())


def _slot(name: str, raw: Any, where: str) -> Slot:
    e = _Entry(f"{where}: slot {name}", raw)
    e.reject_unknown(
        ("kind", "n", "max_n", "max_per_category", "anchor", "exclude_seen", "default_banner",
         "default_items")
    )  # fmt: skip
    if not ID_PATTERN.fullmatch(name):
        raise e.fail("slot names must be ids of [A-Za-z0-9._:@-]")
    kind = e.choice("kind", SlotKind)
    n = e.integer("n", 1 if kind is SlotKind.BANNER else 8, 1, MAX_SLOT_ITEMS)
    max_n = e.integer("max_n", max(24, n), n, MAX_SLOT_ITEMS)
    default_banner = e.text("default_banner")
    if kind is SlotKind.BANNER and default_banner is None:
        raise e.fail("a banner slot needs default_banner (what everyone sees without a signal)")
    return Slot(
        name=name,
        kind=kind,
        n=n,
        max_n=max_n,
        max_per_category=e.integer("max_per_category", 0, 0, MAX_SLOT_ITEMS),
        anchor=e.choice("anchor", Anchor, "session"),
        exclude_seen=e.flag("exclude_seen", True),
        default_banner=default_banner,
        default_items=e.strings("default_items", ids=True),
    )


def _banner(raw: Any, where: str, slots: Mapping[str, Slot]) -> Banner:
    e = _Entry(where, raw)
    banner_id = e.ident("id")
    e.where = f"{where} (banner {banner_id})"
    e.reject_unknown(
        ("id", "slots", "targeting", "priority", "start", "end", "frequency_cap",
         *_CREATIVE_FIELDS)
    )  # fmt: skip
    banner_slots = e.strings("slots", ids=True)
    if not banner_slots:
        raise e.fail("slots must name at least one banner slot")
    for s in banner_slots:
        if s not in slots or slots[s].kind is not SlotKind.BANNER:
            raise e.fail(f"slot {s!r} is not a banner slot of this file")
    targeting = _Entry(f"{e.where} targeting", raw.get("targeting") or {})
    targeting.reject_unknown(("categories", "items"))
    creative = {k: v for k in _CREATIVE_FIELDS if (v := e.text(k)) is not None}
    if "title" not in creative:
        raise e.fail("a banner needs a title")
    return Banner(
        banner_id=banner_id,
        slots=banner_slots,
        creative=creative,
        categories=tuple(_category(c) for c in targeting.strings("categories")),
        items=targeting.strings("items", ids=True),
        priority=e.number("priority", 1.0, 0.0, 1000.0),
        window=e.window(),
        frequency_cap=e.integer("frequency_cap", 0, 0, 1_000_000),
    )


def _rule(raw: Any, where: str, slots: Mapping[str, Slot]) -> Rule:
    e = _Entry(where, raw)
    rule_id = e.ident("id")
    e.where = f"{where} (rule {rule_id})"
    e.reject_unknown(
        ("id", "slot", "action", "items", "categories", "brands", "factor", "position", "start",
         "end")
    )  # fmt: skip
    slot = e.text("slot", "*") or "*"
    if slot != "*" and (slot not in slots or slots[slot].kind is not SlotKind.ITEMS):
        raise e.fail(f"slot {slot!r} is not an items slot of this file (or use '*')")
    action = e.choice("action", Action)
    items = e.strings("items", ids=True)
    categories = tuple(_category(c) for c in e.strings("categories"))
    brands = e.strings("brands")
    if not (items or categories or brands):
        raise e.fail("a rule needs items, categories or brands to act on")
    if action is Action.PIN and not items:
        raise e.fail("pin rules name items")
    factor = e.number("factor", {"boost": 1.5, "bury": 0.5}.get(action.value, 1.0), 0.0, 100.0)
    if (action is Action.BOOST and factor <= 1) or (action is Action.BURY and factor >= 1):
        raise e.fail(f"{action.value} needs factor {'> 1' if action is Action.BOOST else '< 1'}")
    return Rule(
        rule_id=rule_id,
        slot=slot,
        action=action,
        items=items,
        categories=categories,
        brands=brands,
        factor=factor,
        position=e.integer("position", 0, 0, MAX_SLOT_ITEMS - 1),
        window=e.window(),
    )


def _unique(ids: Sequence[str], what: str, where: str) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ConfigFileError(f"{where}: duplicate {what} id {i!r}")
        seen.add(i)


def parse_config(raw: Any, where: str) -> DecisionConfig:
    top = _Entry(where, raw)
    top.reject_unknown(
        ("version", "holdout_share", "sensitive_categories", "min_signal_events", "slots",
         "banners", "rules")
    )  # fmt: skip
    version = raw.get("version")
    if not isinstance(version, str | int | float) or isinstance(version, bool) or not str(version):
        raise top.fail("version is required (a string shown in every decision)")
    raw_slots = raw.get("slots")
    if not isinstance(raw_slots, dict) or not raw_slots:
        raise top.fail("slots must be a non-empty mapping of slot name -> slot")
    slots = {str(name): _slot(str(name), s, where) for name, s in raw_slots.items()}
    for kind, key in (("banners", "banners"), ("rules", "rules")):
        if not isinstance(raw.get(key, []), list):
            raise top.fail(f"{kind} must be a list")
    banners = tuple(
        _banner(b, f"{where}: banners[{i}]", slots) for i, b in enumerate(raw.get("banners", []))
    )
    rules = tuple(
        _rule(r, f"{where}: rules[{i}]", slots) for i, r in enumerate(raw.get("rules", []))
    )
    _unique([b.banner_id for b in banners], "banner", where)
    _unique([r.rule_id for r in rules], "rule", where)
    by_id = {b.banner_id: b for b in banners}
    for s in slots.values():
        if s.default_banner is not None and (
            s.default_banner not in by_id or s.name not in by_id[s.default_banner].slots
        ):
            raise ConfigFileError(
                f"{where}: slot {s.name}: default_banner {s.default_banner!r} is not a banner "
                "of this slot"
            )
    return DecisionConfig(
        version=str(version),
        slots=slots,
        banners=banners,
        rules=rules,
        holdout_share=top.number("holdout_share", 0.05, 0.0, 0.5),
        sensitive_categories=tuple(_category(c) for c in top.strings("sensitive_categories")),
        min_signal_events=top.integer("min_signal_events", 1, 1, 1000),
        source=where,
    )


def load_config(path: Path) -> DecisionConfig:
    """Read and validate the file; ConfigFileError names the file, the entry, the problem."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigFileError(
            f"{path}{at}: not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from None
    return parse_config(raw, str(path))
