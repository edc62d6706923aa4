"""The serving catalog's per-row arrays under catalog updates: changed and new items in
place, and every array as a rebuild from scratch would have it (leaf ids aside: a rebuild
numbers leaves in name order, updates number a new leaf after the others)."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson

from api.items import ServingCatalog
from stream_engine.catalog import GROW_ROWS, Catalog, Item
from stream_engine.demo_catalog import generate
from stream_engine.latent import NEIGHBOURS, LatentModel


def _fresh() -> ServingCatalog:
    return ServingCatalog(Catalog(generate(200)))


def _mirror(*items: Item) -> list[tuple[str, bytes]]:
    return [(it.item_id, orjson.dumps(it.to_json())) for it in items]


def _as_rebuilt(cat: ServingCatalog) -> None:
    """Every per-row array equals what a rebuild from the same items gives."""
    again = ServingCatalog(Catalog(list(cat.catalog.items)))
    assert set(again.leaf_names) <= set(cat.leaf_names)  # a leaf left empty stays named
    assert np.array_equal(cat.in_stock, again.in_stock)
    names = [cat.leaf_names[leaf] for leaf in cat.leaf.tolist()]
    assert names == [again.leaf_names[leaf] for leaf in again.leaf.tolist()]
    assert names == [it.category_path for it in cat.catalog.items]
    if "" in names:
        assert cat.leaf_names[cat.no_leaf] == ""
    for name in again.leaf_names:
        assert np.array_equal(cat.category_mask([name]), again.category_mask([name]))
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


def test_a_move_to_a_known_or_new_category_or_brand_is_in_place() -> None:
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
    ids = cat.leaf.copy()
    cat.apply_updates(_mirror(dataclasses.replace(a, category=("Garden", "Ponds"))))
    assert cat.leaf is leaf  # a category no item had: numbered after the others
    assert cat.leaf_names[cat.leaf[0]] == "Garden > Ponds"
    assert cat.leaf[0] == len(cat.leaf_names) - 1
    assert np.array_equal(cat.leaf[1:], ids[1:])  # no other item's leaf id moved
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


def test_new_items_in_new_categories_and_without_one_keep_every_leaf_id() -> None:
    cat = _fresh()
    ids = cat.leaf.copy()
    like = cat.catalog.items[7]
    new = [
        dataclasses.replace(like, item_id="n-1", category=("Garden", "Ponds", "Pumps")),
        dataclasses.replace(like, item_id="n-2", category=(), brand="Nobody"),
        dataclasses.replace(like, item_id="n-3", stock=0),
    ]
    assert cat.apply_updates(_mirror(*new)) == 3
    assert np.array_equal(cat.leaf[: ids.size], ids)
    assert cat.leaf_names[cat.no_leaf] == ""
    assert cat.leaf[-2] == cat.no_leaf
    assert cat.category_mask(["Garden"]).nonzero()[0].tolist() == [ids.size]
    assert not cat.in_stock[-1]
    _as_rebuilt(cat)


def test_the_item_matrix_grows_by_an_eighth_and_can_be_grown_ahead() -> None:
    cat = _fresh()
    catalog = cat.catalog
    rows = catalog.matrix.shape[0]
    before = catalog.matrix.copy()
    like = catalog.items[0]
    first = [dataclasses.replace(like, item_id=f"g-{i}") for i in range(3)]
    catalog.reserve_for([*(it.item_id for it in first), catalog.items[1].item_id])  # 1 known
    room = catalog._matrix  # the storage, not the rows in use
    assert room.shape[0] == rows + GROW_ROWS  # an eighth of 200 rows is less than that
    assert np.array_equal(catalog.matrix, before)  # the rows in use, copied before the swap
    cat.apply_updates(_mirror(*first))
    assert catalog._matrix is room  # added without growing again
    assert np.array_equal(catalog.matrix[:rows], before)
    big = Catalog(generate(20_000))
    big.reserve(1)
    assert big._matrix.shape[0] == 20_000 + 2_500


def test_an_unchanged_or_unreadable_item_changes_nothing() -> None:
    cat = _fresh()
    version = cat.version
    same = _mirror(cat.catalog.items[5])
    assert cat.apply_updates([*same, ("broken", b"{not json")]) == 0
    assert cat.version == version


def test_new_items_a_learned_model_knows_get_its_neighbours_as_a_whole_mapping_would() -> None:
    items = generate(200)
    cat = ServingCatalog(Catalog(items[:180]))
    rng = np.random.default_rng(27)
    model = LatentModel(
        1, tuple(it.item_id for it in items),
        rng.standard_normal((200, cat.space.latent_dims)).astype(np.float32),
        rng.integers(-1, 200, (200, NEIGHBOURS)).astype(np.int32),
        np.ones((200, NEIGHBOURS), np.float32), 0,
    )  # fmt: skip
    cat.adopt_latent(cat.prepare_latent(model))
    assert (cat.similar >= 180).sum() == 0  # neighbours not in the catalog yet: none
    unknown = dataclasses.replace(items[0], item_id="not-in-the-model")
    cat.apply_updates(_mirror(unknown, *items[180:190]))
    cat.apply_updates(_mirror(*items[190:]))
    whole, _ = cat._similar_rows(model)
    assert np.array_equal(cat.similar, whole)
    assert (cat.similar >= 180).sum() > 0
    assert cat.similar_to([cat.catalog.row["not-in-the-model"]]).size == 0
