from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_engine.catalog import Catalog, CatalogError, Item, Space, load_items
from stream_engine.demo_catalog import generate, write_demo_catalog


def test_demo_catalog_loads_back_and_builds_a_readable_space(tmp_path: Path) -> None:
    path = write_demo_catalog(tmp_path / "c.jsonl", n_items=2000)
    catalog = Catalog.from_file(path)
    assert len(catalog) == 2000
    assert catalog.matrix.shape == (2000, catalog.space.dims)
    assert "cat:Sports > Running" in catalog.space.names
    norms = np.linalg.norm(catalog.matrix, axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    shoe = next(it for it in catalog.items if it.category[1] == "Running")
    top = catalog.space.top_dimensions(catalog.matrix[catalog.row[shoe.item_id]], k=2)
    assert top[0][0] == "cat:Sports > Running"


def test_generator_is_deterministic_and_has_out_of_stock_items() -> None:
    a, b = generate(500, seed=3), generate(500, seed=3)
    assert a == b
    assert any(it.stock == 0 for it in a)


def test_csv_with_embeddings_gets_a_latent_block(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text(
        "item_id,title,category,brand,price,stock,embedding\n"
        "a,A,Shoes > Trail,X,10,1,1 0 0\n"
        "b,B,Shoes > Road,Y,20,0,0 1 0\n"
    )
    catalog = Catalog.from_file(path)
    assert catalog.space.latent_dims == 3
    assert catalog.get("b") == Item("b", "B", ("Shoes", "Road"), "Y", 20.0, 0, None, (0, 1, 0))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"title": "x", "category": "A"}', "missing 'item_id'"),
        ('{"item_id": "a b", "category": "A"}', "not a valid id"),
        ('{"item_id": "a", "category": "A", "price": -1}', "price must be >= 0"),
        ('{"item_id": "a", "stock": "many"}', "item a"),
        ('{"item_id": "a", "category": "A", "price": "cheap"}', "item a"),
        ("not json", "not JSON"),
    ],
)
def test_bad_rows_name_file_line_and_problem(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"item_id": "ok", "category": "A"}\n' + line + "\n")
    with pytest.raises(CatalogError, match=message) as info:
        load_items(path)
    assert f"{path}:2" in str(info.value)


def test_a_row_with_only_an_id_is_an_item_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "bare.csv"
    path.write_text("item_id,title,category,brand,price,stock\nsku-9,,,,,\n")
    (item,) = load_items(path)
    assert item == Item("sku-9", "sku-9", (), "", 0.0, None)
    assert item.available
    assert item.leaf_name == ""
    assert "stock" not in item.to_json()  # not stock-tracked, and stays so through updates


def test_upsert_changes_stock_and_grows_for_new_items() -> None:
    items = generate(20)
    catalog = Catalog(items)
    changed = Item(**{**items[0].to_json(), "category": items[0].category, "stock": 0})
    catalog.upsert(changed)
    assert catalog.get(items[0].item_id) == changed
    for i in range(40):
        catalog.upsert(Item(f"new-{i}", "n", items[1].category))
    assert len(catalog) == 60
    np.testing.assert_array_equal(catalog.matrix[-1], catalog.matrix[catalog.row["new-0"]])


def test_space_caps_interpretable_dimensions() -> None:
    items = [Item(f"i{n}", "t", ("Root", f"C{n}", f"L{n}")) for n in range(300)]
    space = Space.build(items)
    assert space.dims - space.latent_dims <= 96 + 4
