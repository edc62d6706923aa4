"""The serving catalog's per-row arrays under catalog updates: changes to known items in
place, anything new by a rebuild, and every array as a rebuild from scratch would have it."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson

from api.items import ServingCatalog
from stream_engine.catalog import Catalog, Item
from stream_engine.demo_catalog import generate


def _fresh() -> ServingCatalog:
    return ServingCatalog(Catalog(generate(200)))


def _mirror(*items: Item) -> list[tuple[str, bytes]]:
    return [(it.item_id, orjson.dumps(it.to_json())) for it in items]


def _as_rebuilt(cat: ServingCatalog) -> None:
    """Every per-row array equals what a rebuild from the same items gives."""
    again = ServingCatalog(Catalog(list(cat.catalog.items)))
    assert cat.leaf_names == again.leaf_names
    assert np.array_equal(cat.in_stock, again.in_stock)
    assert np.array_equal(cat.leaf, again.leaf)
    for brand in {it.brand for it in cat.catalog.items} | {"no such brand"}:
        assert np.array_equal(cat.brand_mask([brand]), again.brand_mask([brand]))
        want = np.fromiter((it.brand == brand for it in cat.catalog.items), bool)
        assert np.array_equal(cat.brand_mask([brand]), want)


def test_a_stock_price_or_title_change_updates_its_row_in_place() -> None:
    cat = _fresh()
    row = next(i for i, it in enumerate(cat.catalog.items) if it.available)
    old = cat.catalog.items[row]
    cat.item_json(row, "x")  # cached
    leaf, version = cat.leaf, cat.version
    sold_out = dataclasses.replace(old, stock=0, title="Renamed")
    layout = cat.layout_version
    assert cat.apply_updates(_mirror(sold_out)) == 1
    assert cat.leaf is leaf  # in place: no rebuild
    assert cat.layout_version == layout  # stock and title: nothing a compile depends on
    assert cat.version == version + 1
    assert not cat.in_stock[row]
    assert cat.item_json(row, "x")["title"] == "Renamed"  # its cached JSON dropped
    _as_rebuilt(cat)
    repriced = dataclasses.replace(sold_out, price=old.price + 100)
    assert cat.apply_updates(_mirror(repriced)) == 1
    assert cat.leaf is leaf  # still in place, but rules and banners must compile again
    assert cat.layout_version == layout + 1
    _as_rebuilt(cat)


def test_a_move_to_a_known_category_or_brand_is_in_place_and_a_new_one_rebuilds() -> None:
    cat = _fresh()
    items = cat.catalog.items
    a = items[0]
    b = next(it for it in items if it.category != a.category and it.brand != a.brand)
    leaf = cat.leaf
    cat.apply_updates(_mirror(dataclasses.replace(a, category=b.category, brand=b.brand)))
    assert cat.leaf is leaf
    assert cat.leaf[0] == cat.leaf[cat.catalog.row[b.item_id]]
    assert cat.brand_mask([b.brand])[0]
    _as_rebuilt(cat)
    cat.apply_updates(_mirror(dataclasses.replace(a, category=("Garden", "Ponds"))))
    assert cat.leaf is not leaf  # rebuilt: a category no item had
    assert "Garden > Ponds" in cat.leaf_names
    _as_rebuilt(cat)
    cat.apply_updates(_mirror(dataclasses.replace(a, brand="Newco")))
    assert cat.brand_mask(["Newco"])[0]
    _as_rebuilt(cat)


def test_a_new_item_grows_every_array() -> None:
    cat = _fresh()
    n = len(cat)
    new = dataclasses.replace(cat.catalog.items[3], item_id="brand-new-item", stock=5)
    assert cat.apply_updates(_mirror(new)) == 1
    assert len(cat) == n + 1
    assert cat.leaf.shape == cat.in_stock.shape == (n + 1,)
    assert cat.in_stock[n]
    _as_rebuilt(cat)


def test_an_unchanged_or_unreadable_item_changes_nothing() -> None:
    cat = _fresh()
    version = cat.version
    same = _mirror(cat.catalog.items[5])
    assert cat.apply_updates([*same, ("broken", b"{not json")]) == 0
    assert cat.version == version
