from __future__ import annotations

from dataclasses import replace

import numpy as np
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stream_engine.catalog import Catalog, CatalogError, Item
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


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=20,
)  # fmt: skip
_FIELDS = st.fixed_dictionaries(
    {"item_id": st.sampled_from([CATALOG.items[0].item_id, "sku-new-1", "a b", "", 7])},
    optional={k: _JSON for k in ("title", "category", "brand", "price", "stock", "image")}
    | {"embedding": _JSON | st.lists(st.floats(allow_nan=False), max_size=6)},
)


def _with_embeddings(items: list[Item]) -> list[Item]:
    """The catalog's own latent block (4 dims): an update's embedding goes into the matrix."""
    return [replace(it, embedding=(1.0, 0.5, 0.0, -0.5)) if i % 2 else it
            for i, it in enumerate(items)]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(fields=_FIELDS, embedded=st.booleans())
# finite as JSON, infinite as float32 (the item's vector was NaN), and a norm that overflows
@example(fields={"item_id": CATALOG.items[1].item_id, "embedding": [1e300, 1, 1, 1]},
         embedded=True)  # fmt: skip
@example(fields={"item_id": "sku-new-1", "embedding": [1e30, -1e30, 0, 1]}, embedded=True)
def test_any_update_is_applied_or_refused_and_never_poisons_the_catalog(
    fields: dict[str, object], embedded: bool
) -> None:
    """What a catalog message holds is for its sender to get right; a wrong one is refused
    with a CatalogError (counted, logged, the stream goes on), never another exception that
    would stop the worker's or the API's follower, and an update that is taken leaves a
    finite, unit (or zero) vector in the catalog's matrix, which every decision reads."""
    items = generate(20)
    catalog = Catalog(_with_embeddings(items) if embedded else items)
    try:
        raw = orjson.dumps(fields)
    except TypeError:  # beyond JSON (a 70-bit integer): not a message anyone can send
        return
    try:
        item = merge_update(catalog, raw, "catalog/0@1")
    except CatalogError:
        return
    catalog.upsert(item)
    row = catalog.matrix[catalog.row[item.item_id]]
    assert np.isfinite(row).all()
    assert float(np.linalg.norm(row)) == pytest.approx(1.0, abs=1e-5) or not row.any()
