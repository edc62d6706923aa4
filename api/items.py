"""The catalog as the API serves it: the worker's item vectors plus what filters need per row.

The API builds the same vector space as the worker from the same catalog file, so session
vectors written by the worker read back with the same meaning. Stock, price and new items
arrive through the worker's Redis mirror of the `catalog` topic (`{catalog}:items`), polled
in the background by `follow_mirror`. Learned embeddings (stream_engine/latent.py) arrive
the same way: `prepare_latent` and `adopt_latent` put them in the item vectors and keep
each item's most similar items (`similar`, rows, -1 = none) as candidates.

Items without metadata have no category: their leaf is NO_LEAF's, which counts for nothing
in leaf affinity and diversity.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from stream_engine.catalog import (
    CATEGORY_SEP,
    Catalog,
    CatalogError,
    Item,
    LatentUpdate,
    item_from_mapping,
)
from stream_engine.latent import NEIGHBOURS, LatentModel

log = logging.getLogger("kairos.api.items")

JSON_CACHE_MAX = 20_000

Rows = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]


class ServingCatalog:
    """Items by row, with per-row arrays for filters (stock, category, brand)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.space = catalog.space
        self.version = 0  # bumps on every applied change; compiled configs check it
        # bumps on changes other than stock, title and image (category, brand, price, a
        # new item, learned vectors): those change rule masks and banner vectors, and need
        # a whole compile; a stock change needs only the stock-dependent parts
        self.layout_version = 0
        self.model: LatentModel | None = None
        self.similar: Rows = np.full((0, NEIGHBOURS), -1, np.int64)
        self._mapped = Mapped({}, np.zeros(0, np.int64))  # the model's items -> rows
        self._rebuild()

    def _rebuild(self) -> None:
        """Every per-row array from all the items (~50 ms with 100k: at start only;
        apply_updates changes and appends rows in place)."""
        items = self.catalog.items
        self._json: dict[int, tuple[dict[str, Any], str | None]] = {}
        paths = [it.category_path for it in items]
        # leaf ids in order of first appearance after these, so a new leaf category (at the
        # end) leaves every id a compiled snapshot holds as it was
        self.leaf_names: list[str] = sorted(set(paths))  # "" (no category) sorts first
        self._leaf_index = {name: i for i, name in enumerate(self.leaf_names)}
        self.no_leaf = self._leaf_index.get("", -1)
        self.leaf: Rows = np.fromiter(map(self._leaf_index.__getitem__, paths), np.int64,
                                      len(items))  # fmt: skip
        self.in_stock: Mask = np.fromiter((it.available for it in items), bool, len(items))
        self._brand_index: dict[str, int] = {}
        brand_of = self._brand_index.setdefault
        self.brand: Rows = np.fromiter(
            (brand_of(it.brand, len(self._brand_index)) for it in items), np.int64, len(items)
        )
        self.version += 1
        self.layout_version += 1

    def _leaf_id(self, path: str) -> int:
        leaf = self._leaf_index.get(path)
        if leaf is None:
            leaf = self._leaf_index[path] = len(self.leaf_names)
            self.leaf_names.append(path)
            if path == "":
                self.no_leaf = leaf
        return leaf

    def _update_rows(self, rows: list[int], layout: bool) -> None:
        """The per-row arrays of changed and new items (new items are the last rows), in
        place: a new item used to rebuild every array, ~50 ms on the event loop with 100k
        items."""
        items = self.catalog.items
        known = self.leaf.shape[0]
        if len(items) > known:
            more = len(items) - known
            self.leaf = np.concatenate([self.leaf, np.zeros(more, np.int64)])
            self.brand = np.concatenate([self.brand, np.zeros(more, np.int64)])
            self.in_stock = np.concatenate([self.in_stock, np.zeros(more, bool)])
        brand_of = self._brand_index.setdefault
        for row in rows:
            it = items[row]
            self.leaf[row] = self._leaf_id(it.category_path)
            self.brand[row] = brand_of(it.brand, len(self._brand_index))
            self.in_stock[row] = it.available
            self._json.pop(row, None)
        if len(items) > known and self.model is not None:
            self._map_new_items(range(known, len(items)))
        self.version += 1
        if layout:
            self.layout_version += 1

    def prepare_latent(self, model: LatentModel) -> PreparedLatent:
        """A model's item vectors and similar-item rows, written nowhere: adopt_latent puts
        them in place (the API prepares in a thread: stream_engine/latent.py, install_newer)."""
        update = self.catalog.latent_update(model.ids, model.vectors, model.version)
        similar, mapped = self._similar_rows(model)
        return PreparedLatent(model, update, similar, mapped, len(self))

    def adopt_latent(self, prepared: PreparedLatent) -> int:
        """Swaps a prepared model in; maps its neighbours again if the catalog grew since."""
        known = self.catalog.adopt_latent(prepared.update)
        self.model = prepared.model
        if prepared.rows != len(self):
            self.similar, self._mapped = self._similar_rows(prepared.model)
        else:
            self.similar, self._mapped = prepared.similar, prepared.mapped
        self.version += 1
        self.layout_version += 1
        return known

    def _similar_rows(self, model: LatentModel) -> tuple[Rows, Mapped]:
        get = self.catalog.row.get
        row_of = np.fromiter((get(i, -1) for i in model.ids), np.int64, len(model.ids))
        similar = np.full((len(self), NEIGHBOURS), -1, np.int64)
        known = row_of >= 0
        mapped = np.where(model.neighbours[known] >= 0, row_of[model.neighbours[known]], -1)
        similar[row_of[known]] = mapped
        return similar, Mapped({item_id: i for i, item_id in enumerate(model.ids)}, row_of)

    def _map_new_items(self, rows: Iterable[int]) -> None:
        """New items the model knows: their neighbours, and they as others' neighbours
        (mapping the whole model again was ~10 ms on the event loop with 100k items)."""
        model, mapped, items = self.model, self._mapped, self.catalog.items
        fresh = [(row, at) for row in rows
                 if (at := mapped.index.get(items[row].item_id)) is not None]  # fmt: skip
        if model is None or not fresh:
            return  # similar_to reads rows past the array's end as having none
        row_of = mapped.row_of
        known = np.fromiter((a for _, a in fresh), np.int64, len(fresh))
        row_of[known] = np.fromiter((r for r, _ in fresh), np.int64, len(fresh))
        similar = np.full((len(self), NEIGHBOURS), -1, np.int64)
        similar[: self.similar.shape[0]] = self.similar
        own = model.neighbours[known]
        similar[row_of[known]] = np.where(own >= 0, row_of[own], -1)
        src, col = np.nonzero(np.isin(model.neighbours, known))
        src_rows = row_of[src]
        ok = src_rows >= 0
        similar[src_rows[ok], col[ok]] = row_of[model.neighbours[src[ok], col[ok]]]
        self.similar = similar

    def similar_to(self, rows: list[int]) -> Rows:
        """The learned most-similar items of `rows`, as catalog rows."""
        sim = self.similar
        picked = [r for r in rows if r < sim.shape[0]]
        if not picked:
            return np.zeros(0, np.int64)
        out = sim[picked].ravel()
        return out[out >= 0]

    @property
    def latent_version(self) -> int:
        return self.catalog.latent_version

    def __len__(self) -> int:
        return len(self.catalog)

    @property
    def matrix(self) -> npt.NDArray[np.float32]:
        return self.catalog.matrix

    def item(self, row: int) -> Item:
        return self.catalog.items[row]

    def item_json(self, row: int, reason: str) -> dict[str, Any]:
        """The item as a decision serves it, with its reason. The fields are built once per
        catalog change (at most JSON_CACHE_MAX items kept) and copied per answer."""
        cached = self._json.get(row)
        if cached is None:
            item = self.catalog.items[row]
            fields = {"item_id": item.item_id, "title": item.title,
                      "category": item.category_path, "price": item.price}  # fmt: skip
            if len(self._json) >= JSON_CACHE_MAX:
                self._json.clear()
            cached = self._json[row] = (fields, item.image)
        out = cached[0].copy()
        out["reason"] = reason
        if cached[1]:
            out["image"] = cached[1]
        return out

    def row(self, item_id: str) -> int | None:
        return self.catalog.row.get(item_id)

    def rows(self, item_ids: Iterable[str]) -> list[int]:
        get = self.catalog.row.get
        return [r for i in item_ids if (r := get(i)) is not None]

    def leaves_under(self, categories: Iterable[str]) -> list[int]:
        """Leaf category ids at or below any of `categories` (paths joined by " > ")."""
        prefixes = tuple(categories)
        return [
            i
            for i, name in enumerate(self.leaf_names)
            if any(name == p or name.startswith(p + CATEGORY_SEP) for p in prefixes)
        ]

    def category_mask(self, categories: Iterable[str]) -> Mask:
        """Rows whose category path is one of `categories` or below one of them."""
        under = np.zeros(len(self.leaf_names), dtype=bool)
        under[self.leaves_under(categories)] = True
        return under[self.leaf]

    def brand_mask(self, brands: Iterable[str]) -> Mask:
        """Rows whose brand is one of `brands`."""
        wanted = [i for b in brands if (i := self._brand_index.get(b)) is not None]
        if not wanted:
            return np.zeros(len(self), dtype=bool)
        return np.isin(self.brand, np.asarray(wanted, dtype=np.int64))

    def apply_updates(self, raw_items: Iterable[tuple[str, bytes]]) -> int:
        """Apply mirrored items (id, JSON); returns how many changed. Bad rows are skipped.
        The rows of changed and new items are updated in place."""
        changed = 0
        rows: list[int] = []
        layout = False
        for item_id, raw in raw_items:
            try:
                obj = orjson.loads(raw)
                item = item_from_mapping(obj, f"catalog mirror item {item_id}")
            except (orjson.JSONDecodeError, CatalogError, TypeError, AttributeError) as exc:
                log.warning("catalog mirror: skipped %s: %s", item_id, exc)
                continue
            old = self.catalog.get(item.item_id)
            if old != item:
                layout = layout or old is None or _layout_of(old) != _layout_of(item)
                self.catalog.upsert(item)
                rows.append(self.catalog.row[item.item_id])
                changed += 1
        if changed:
            self._update_rows(rows, layout)
        return changed


@dataclass(frozen=True, slots=True)
class Mapped:
    """A learned model's items as catalog rows: index (item id -> the model's position)
    and row_of (the model's position -> catalog row, -1 = not in the catalog)."""

    index: dict[str, int]
    row_of: Rows


@dataclass(frozen=True, slots=True)
class PreparedLatent:
    model: LatentModel
    update: LatentUpdate
    similar: Rows
    mapped: Mapped
    rows: int  # catalog rows when prepared


def _layout_of(item: Item) -> tuple[object, ...]:
    """What of an item compiled rules, banners and vectors depend on (all but its stock,
    title and image)."""
    return item.category, item.brand, item.price, item.embedding
