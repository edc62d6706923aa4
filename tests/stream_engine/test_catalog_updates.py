from __future__ import annotations

import orjson
import pytest

from stream_engine.catalog import Catalog, CatalogError
from stream_engine.catalog_updates import merge_update
from stream_engine.demo_catalog import generate

CATALOG = Catalog(generate(50))


def test_partial_update_changes_only_the_fields_given() -> None:
    before = CATALOG.items[3]
    after = merge_update(CATALOG, orjson.dumps({"item_id": before.item_id, "price": 9.5}), "t")
    assert after.price == 9.5
    assert (after.title, after.category, after.stock) == (
        before.title,
        before.category,
        before.stock,
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{nope", "not JSON"),
        (b'{"stock": 1}', "item_id"),
        (b'{"item_id": "brand new", "stock": 1}', "not a valid id"),
        (b'{"item_id": "x", "category": "A", "price": -1}', "price"),
    ],
)
def test_bad_updates_are_refused_with_a_reason(raw: bytes, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        merge_update(CATALOG, raw, "catalog/0@7")
