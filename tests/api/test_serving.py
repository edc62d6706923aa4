"""When a serving snapshot recompiles its rules and banners: on a change, or when a window
opens or closes, and not otherwise (a recompile holds the event loop)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import orjson
import pytest

from api.config import parse_config
from api.items import ServingCatalog
from api.scoring import Trending
from api.serving import _banner_vectors, build_serving, next_window_change
from stream_engine.catalog import Catalog
from stream_engine.demo_catalog import generate

CATALOG = ServingCatalog(Catalog(generate(300)))
NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
SALE_START = NOW + dt.timedelta(hours=2)
SALE_END = NOW + dt.timedelta(hours=5)
BANNER_END = NOW + dt.timedelta(days=3)
EXCLUDED = CATALOG.catalog.items[0].item_id


def _config(windowed: bool = True) -> dict[str, object]:
    window = {"start": SALE_START.isoformat(), "end": SALE_END.isoformat()} if windowed else {}
    return {
        "version": "t",
        "slots": {"recs": {"kind": "items", "n": 4},
                  "hero": {"kind": "banner", "default_banner": "plain"}},
        "rules": [{"id": "sale", "action": "exclude", "items": [EXCLUDED], **window}],
        "banners": [
            {"id": "plain", "slots": ["hero"], "title": "Hello"},
            {"id": "late", "slots": ["hero"], "title": "Soon",
             "targeting": {"categories": ["Books"]},
             **({"end": BANNER_END.isoformat()} if windowed else {})},
        ],
    }  # fmt: skip


def _excluded(serving: object) -> bool:
    row = CATALOG.row(EXCLUDED)
    assert row is not None
    return bool(serving.rules["recs"].exclude[row])  # type: ignore[attr-defined]


def test_the_next_change_is_the_first_start_or_end_still_ahead() -> None:
    config = parse_config(_config(), "t.yaml")
    assert next_window_change(config, NOW) == SALE_START
    assert next_window_change(config, SALE_START) == SALE_END
    assert next_window_change(config, SALE_END) == BANNER_END
    assert next_window_change(config, BANNER_END) is None
    assert next_window_change(parse_config(_config(windowed=False), "t.yaml"), NOW) is None


def test_nothing_recompiles_until_a_window_opens_and_then_it_takes_effect() -> None:
    config = parse_config(_config(), "t.yaml")
    first = build_serving(config, CATALOG, Trending(), NOW)
    assert not _excluded(first)
    assert first.compiled.recompile_at == SALE_START
    # an hour on, nothing changed: the same compiled rules (no recompile)
    later = build_serving(config, CATALOG, Trending(), NOW + dt.timedelta(hours=1), first)
    assert later.rules is first.rules
    assert later.banners is first.banners
    # the sale starts: recompiled on the first refresh at or after its start
    opened = build_serving(config, CATALOG, Trending(), SALE_START, later)
    assert opened.rules is not first.rules
    assert _excluded(opened)
    assert opened.compiled.recompile_at == SALE_END
    closed = build_serving(config, CATALOG, Trending(), SALE_END + dt.timedelta(seconds=1),
                           opened)  # fmt: skip
    assert not _excluded(closed)
    # the banner whose window ends goes from the hero slot's set when it ends
    assert [b.banner_id for b in closed.banners["hero"].banners] == ["plain", "late"]
    gone = build_serving(config, CATALOG, Trending(), BANNER_END, closed)
    assert [b.banner_id for b in gone.banners["hero"].banners] == ["plain"]


def test_without_windows_a_snapshot_keeps_its_compile_however_old() -> None:
    config = parse_config(_config(windowed=False), "t.yaml")
    first = build_serving(config, CATALOG, Trending(), NOW)
    much_later = build_serving(config, CATALOG, Trending(), NOW + dt.timedelta(days=30), first)
    assert much_later.rules is first.rules


def test_a_new_config_a_changed_catalog_or_a_clock_set_back_recompile() -> None:
    config = parse_config(_config(windowed=False), "t.yaml")
    first = build_serving(config, CATALOG, Trending(), NOW)
    reloaded = parse_config(_config(windowed=False), "t.yaml")  # same text, a new load
    assert build_serving(reloaded, CATALOG, Trending(), NOW, first).rules is not first.rules
    earlier = NOW - dt.timedelta(minutes=5)
    assert build_serving(config, CATALOG, Trending(), earlier, first).rules is not first.rules
    catalog = ServingCatalog(Catalog(generate(300)))
    catalog.version += 1  # as applied catalog updates leave it
    assert build_serving(config, catalog, Trending(), NOW, first).rules is not first.rules


def test_stock_changes_alone_update_the_stock_dependent_parts_only() -> None:
    catalog = ServingCatalog(Catalog(generate(300)))
    config = parse_config(_config(windowed=False), "t.yaml")
    first = build_serving(config, catalog, Trending(), NOW)
    items = catalog.catalog.items
    row = next(i for i, it in enumerate(items)
               if it.available and it.category and it.item_id != EXCLUDED)  # fmt: skip
    item = items[row]
    sold_out = dataclasses.replace(item, stock=0)
    catalog.apply_updates([(item.item_id, orjson.dumps(sold_out.to_json()))])
    after = build_serving(config, catalog, Trending(), NOW + dt.timedelta(seconds=1), first)
    assert after.banners is first.banners  # nothing compiled but stock
    assert after.rules["recs"].exclude is first.rules["recs"].exclude
    allowed = after.rules["recs"].allowed
    assert allowed is not None
    assert not allowed[row]
    assert first.rules["recs"].allowed is not None
    assert first.rules["recs"].allowed[row]  # the old snapshot is left as it was
    assert row not in after.category_rows[item.category_path]
    assert row in first.category_rows[item.category_path]
    # a price change moves the item's vector: a whole compile
    repriced = dataclasses.replace(sold_out, price=sold_out.price * 3 + 1)
    catalog.apply_updates([(item.item_id, orjson.dumps(repriced.to_json()))])
    again = build_serving(config, catalog, Trending(), NOW + dt.timedelta(seconds=2), after)
    assert again.banners is not first.banners


def test_banner_vectors_are_the_normalized_sum_of_their_category_and_item_means() -> None:
    banners = parse_config({
        "version": "v", "slots": {"hero": {"kind": "banner", "default_banner": "plain"}},
        "banners": [
            {"id": "plain", "slots": ["hero"], "title": "Hello"},
            {"id": "two", "slots": ["hero"], "title": "Two",
             "targeting": {"categories": ["Books", "Sports > Running"]}},
            {"id": "items", "slots": ["hero"], "title": "Items",
             "targeting": {"categories": ["Books"], "items": [EXCLUDED]}},
            {"id": "empty", "slots": ["hero"], "title": "None",
             "targeting": {"categories": ["No > Such"]}},
        ],
    }, "t").banners  # fmt: skip
    got = _banner_vectors(tuple(banners), CATALOG)
    for banner, vector in zip(banners, got, strict=True):
        want = np.zeros(CATALOG.space.dims, np.float32)
        for cat in banner.categories:
            rows = [i for i, it in enumerate(CATALOG.catalog.items)
                    if (it.category_path + " >").startswith(cat + " >")]  # fmt: skip
            if rows:
                want += CATALOG.matrix[rows].mean(axis=0)
        if banner.items:
            want += CATALOG.matrix[CATALOG.rows(banner.items)].mean(axis=0)
        norm = np.linalg.norm(want)
        np.testing.assert_allclose(vector, want / norm if norm else want, atol=1e-5)
    assert np.linalg.norm(got[1]) == pytest.approx(1.0, abs=1e-5)
    assert not got[0].any()
    assert not got[3].any()
