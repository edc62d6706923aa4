"""The item catalog and the vector space items, banners and sessions share.

A catalog is JSONL (one item object per line) or CSV with the same columns:
`item_id`, `title`, `category` (path joined by " > "), `brand`, `price`, `stock`, optional
`image`, optional `embedding` (list of floats; CSV: space-separated). Only `item_id` is
required: an item without category or price is an item *without metadata* (its vector is
all latent), and an item without `stock` is not stock-tracked (always available). Bad rows
raise CatalogError naming the file, the line and the problem.

The space: an interpretable block with one dimension per category node down to
`max_depth` (so "this session is into running shoes" can be read off a vector) plus price
bands, and a latent block: the catalog's embeddings when it ships them, otherwise
LEARNED_DIMS dimensions reserved for embeddings learned from co-visitation
(stream_engine/latent.py) and filled in by `Catalog.set_latent` when a model is published.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from stream_engine.events import ID_PATTERN
from stream_engine.exceptions import KairosError

Vector = npt.NDArray[np.float32]
Matrix = npt.NDArray[np.float32]

CATEGORY_SEP = " > "
PRICE_BANDS = 4
# Weight of a category node in an item's vector by depth (1 = department).
DEPTH_WEIGHTS = {1: 0.5, 2: 1.0, 3: 1.0}
PRICE_WEIGHT = 0.25
MAX_INTERPRETABLE_DIMS = 96
# Latent dimensions reserved for learned embeddings when the catalog ships none. Workers and
# API build the same space from the same file, so this is a constant, not a setting.
LEARNED_DIMS = 32
# The fewest rows the item matrix grows by when a new item finds it full (Catalog.reserve).
GROW_ROWS = 1024


class CatalogError(KairosError, ValueError):
    """A catalog file or update is malformed; the message names where."""


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    title: str
    category: tuple[str, ...] = ()
    brand: str = ""
    price: float = 0.0
    stock: int | None = None  # None: not stock-tracked, always available
    image: str | None = None
    embedding: tuple[float, ...] | None = None

    @property
    def category_path(self) -> str:
        return CATEGORY_SEP.join(self.category)

    @property
    def leaf_name(self) -> str:
        """The item's own category ("" for an item without metadata)."""
        return self.category[-1] if self.category else ""

    @property
    def available(self) -> bool:
        return self.stock is None or self.stock > 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "item_id": self.item_id,
            "title": self.title,
            "category": self.category_path,
            "brand": self.brand,
            "price": self.price,
        }
        if self.stock is not None:
            out["stock"] = self.stock
        if self.image:
            out["image"] = self.image
        if self.embedding is not None:
            out["embedding"] = list(self.embedding)
        return out


def item_from_mapping(row: Mapping[str, Any], where: str) -> Item:
    """Build an Item from a JSON object or CSV row; CatalogError says `where` and what."""
    try:
        item_id = str(row["item_id"])
    except KeyError as exc:
        raise CatalogError(f"{where}: missing {exc.args[0]!r}") from None
    category = tuple(p.strip() for p in str(row.get("category") or "").split(">") if p.strip())
    if not ID_PATTERN.fullmatch(item_id):
        raise CatalogError(f"{where}: item_id {item_id!r} is not a valid id")
    try:
        price = float(row.get("price") or 0.0)
        raw_stock = row.get("stock")
        stock = None if raw_stock is None or raw_stock == "" else int(raw_stock)
        embedding = _embedding(row.get("embedding"))
    except (TypeError, ValueError) as exc:
        raise CatalogError(f"{where}: item {item_id}: {exc}") from None
    if not math.isfinite(price) or price < 0:
        raise CatalogError(f"{where}: item {item_id}: price must be >= 0")
    return Item(
        item_id=item_id,
        title=str(row.get("title") or item_id),
        category=category,
        brand=str(row.get("brand") or ""),
        price=price,
        stock=stock,
        image=str(row["image"]) if row.get("image") else None,
        embedding=embedding,
    )


def _scaled(values: tuple[float, ...]) -> Vector:
    """A catalog embedding as float32 at most 1 in size, its direction kept: cast as it is,
    1e39 is infinite in float32 (and a norm of 1e20s overflows), and the item's vector
    became NaN, which every decision that scored it read."""
    x = np.asarray(values, dtype=np.float64)
    top = float(np.abs(x).max()) if x.size else 0.0
    return (x / top if top > 0 else x).astype(np.float32)


def _embedding(raw: Any) -> tuple[float, ...] | None:
    if raw is None or raw == "":
        return None
    values = raw.split() if isinstance(raw, str) else raw
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in out):
        raise ValueError("embedding has non-finite values")
    return out


def _read_rows(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):
                yield f"{path}:{n}", row
        return
    with path.open("rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise CatalogError(f"{path}:{n}: not JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise CatalogError(f"{path}:{n}: expected an object")
            yield f"{path}:{n}", obj


def load_items(path: Path) -> list[Item]:
    if not path.exists():
        raise CatalogError(f"{path}: catalog file not found")
    items: dict[str, Item] = {}
    for where, row in _read_rows(path):
        item = item_from_mapping(row, where)
        if item.item_id in items:
            raise CatalogError(f"{where}: duplicate item_id {item.item_id}")
        items[item.item_id] = item
    if not items:
        raise CatalogError(f"{path}: catalog is empty")
    return list(items.values())


@dataclass(frozen=True, slots=True)
class Space:
    """The dimensions of the shared vector space; `names[i]` says what dimension i means."""

    names: tuple[str, ...]
    max_depth: int
    price_edges: tuple[float, ...]
    latent_dims: int
    index: Mapping[str, int] = field(repr=False)
    # True when the latent block waits for learned embeddings (the catalog ships none)
    learned: bool = False

    @property
    def dims(self) -> int:
        return len(self.names)

    @classmethod
    def build(cls, items: Iterable[Item], learned_dims: int = LEARNED_DIMS) -> Space:
        items = list(items)
        nodes_by_depth: dict[int, set[str]] = {}
        for it in items:
            for depth in range(1, len(it.category) + 1):
                nodes_by_depth.setdefault(depth, set()).add(CATEGORY_SEP.join(it.category[:depth]))
        names: list[str] = []
        max_depth = 0
        for depth in sorted(nodes_by_depth):
            level = sorted(nodes_by_depth[depth])
            if depth > max(DEPTH_WEIGHTS) or len(names) + len(level) > MAX_INTERPRETABLE_DIMS:
                break
            names.extend(f"cat:{n}" for n in level)
            max_depth = depth
        prices = sorted(it.price for it in items if it.price > 0) or [0.0]
        edges = tuple(prices[len(prices) * k // PRICE_BANDS] for k in range(1, PRICE_BANDS))
        names.extend(f"price:{b}" for b in range(PRICE_BANDS))
        latent = {len(it.embedding) for it in items if it.embedding is not None}
        latent_dims = max(latent) if latent else learned_dims
        names.extend(f"latent:{k}" for k in range(latent_dims))
        index = {n: i for i, n in enumerate(names)}
        return cls(tuple(names), max_depth, edges, latent_dims, index, learned=not latent)

    @property
    def latent_start(self) -> int:
        return self.dims - self.latent_dims

    def price_band(self, price: float) -> int:
        return sum(price >= e for e in self.price_edges)

    def raw_vector(self, item: Item, latent: Vector | None = None) -> Vector:
        """One item's vector before normalization: category nodes (weighted by depth), price
        band (items with a price), and a unit latent block (the catalog's embedding, or the
        learned one given as `latent`). Categories the space doesn't know add nothing."""
        v = np.zeros(self.dims, dtype=np.float32)
        for depth in range(1, min(len(item.category), self.max_depth) + 1):
            idx = self.index.get("cat:" + CATEGORY_SEP.join(item.category[:depth]))
            if idx is not None:
                v[idx] = DEPTH_WEIGHTS[depth]
        if item.price > 0:
            v[self.index[f"price:{self.price_band(item.price)}"]] = PRICE_WEIGHT
        if latent is None and not self.learned and item.embedding is not None:
            latent = _scaled(item.embedding[: self.latent_dims])
        if latent is not None and self.latent_dims:
            norm = float(np.linalg.norm(latent))
            if norm > 0:
                v[self.latent_start : self.latent_start + latent.size] = latent / norm
        return v

    def top_dimensions(self, vector: Vector, k: int = 3) -> list[tuple[str, float]]:
        """The k strongest interpretable dimensions of a vector, for explanations."""
        interp = self.dims - self.latent_dims
        order = np.argsort(-vector[:interp])[:k]
        return [(self.names[i], float(vector[i])) for i in order if vector[i] > 0]


class Catalog:
    """Items, their vectors as one float32 matrix, and id → row lookup; grows on updates.

    With a learned latent block, `set_latent` installs a model's embeddings: the items it
    knows get them (new items too, when they arrive later), every other item's latent block
    is zero.
    """

    def __init__(self, items: Iterable[Item], space: Space | None = None) -> None:
        items = list(items)
        self.space = space or Space.build(items)
        self.items: list[Item] = []
        self.row: dict[str, int] = {}
        self._matrix = np.zeros((max(len(items), 16), self.space.dims), dtype=np.float32)
        # each row's norm before normalization: the raw vector is matrix[row] * norm[row]
        self._norm = np.zeros(self._matrix.shape[0], dtype=np.float32)
        self._writes = 0  # upserts so far: a latent update computed before one is stale
        self._learned: Mapping[str, Vector] = {}
        self.latent_version = 0
        for it in items:
            self.upsert(it)

    @classmethod
    def from_file(cls, path: Path) -> Catalog:
        return cls(load_items(path))

    @property
    def matrix(self) -> Matrix:
        return self._matrix[: len(self.items)]

    def __len__(self) -> int:
        return len(self.items)

    def get(self, item_id: str) -> Item | None:
        row = self.row.get(item_id)
        return None if row is None else self.items[row]

    def upsert(self, item: Item) -> None:
        """Add a new item or replace an existing one (price, stock, title or category change)."""
        row = self.row.get(item.item_id)
        if row is None:
            row = len(self.items)
            if row == self._matrix.shape[0]:
                self.reserve(1)
            self.items.append(item)
            self.row[item.item_id] = row
        else:
            self.items[row] = item
        v = self.space.raw_vector(item, self._learned.get(item.item_id))
        norm = np.float32(np.linalg.norm(v))
        self._writes += 1
        self._norm[row] = norm
        self._matrix[row] = v / norm if norm > 0 else v

    def reserve(self, extra: int) -> None:
        """Room for `extra` more items in the item matrix. Grows by an eighth (at least
        GROW_ROWS), not twice over: the first new item after loading 100k items doubled a
        27 MiB matrix on the event loop, ~100 ms of it faulting in fresh pages, and kept
        the doubled memory. The API calls this in a thread before it adds items (numpy
        copies without the GIL): the rows in use are copied before the swap, so readers see
        the same vectors throughout; nothing may write the catalog meanwhile."""
        rows = self._matrix.shape[0]
        needed = len(self.items) + extra
        if needed <= rows:
            return
        size = max(needed, rows + max(GROW_ROWS, rows // 8))
        matrix = np.empty((size, self.space.dims), dtype=np.float32)
        matrix[:rows] = self._matrix
        matrix[rows:] = 0.0
        norm = np.zeros(size, dtype=np.float32)
        norm[:rows] = self._norm
        self._matrix, self._norm = matrix, norm

    def reserve_for(self, item_ids: Iterable[str]) -> None:
        """`reserve` for the items among `item_ids` the catalog does not have yet."""
        self.reserve(sum(1 for item_id in item_ids if item_id not in self.row))

    def set_latent(self, ids: Sequence[str], vectors: Matrix, version: int) -> int:
        """Install learned embeddings (row i of `vectors` is item ids[i]) in every item's
        latent block, renormalizing in one numpy pass; returns how many catalog items got
        one. CatalogError if the space has no learned block of that width."""
        return self.adopt_latent(self.latent_update(ids, vectors, version))

    def latent_update(self, ids: Sequence[str], vectors: Matrix, version: int) -> LatentUpdate:
        """set_latent's work, written nowhere: new item vectors to `adopt_latent`. Reads the
        catalog and changes nothing, so the API runs it in a thread (~100-250 ms of numpy
        with 100k items) while its event loop serves decisions on the vectors in use."""
        space = self.space
        if not space.learned or vectors.shape != (len(ids), space.latent_dims):
            raise CatalogError(
                f"latent model {version}: {vectors.shape[1] if vectors.ndim == 2 else '?'} "
                f"dims for {len(ids)} items does not fit this space "
                f"({space.latent_dims} learned dims: {space.learned})"
            )
        lengths = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit_rows = np.divide(vectors, lengths, out=np.zeros_like(vectors), where=lengths > 0)
        learned = {item_id: unit_rows[i] for i, item_id in enumerate(ids)}
        n, start, writes = len(self.items), space.latent_start, self._writes
        raw = self._matrix[:n] * self._norm[:n, None]
        raw[:, start:] = 0.0
        model_rows = np.fromiter((self.row.get(i, -1) for i in ids), np.int64, len(ids))
        known = model_rows >= 0
        raw[model_rows[known], start:] = unit_rows[known]
        norms = np.linalg.norm(raw, axis=1).astype(np.float32)
        matrix = np.zeros_like(self._matrix)
        norm = np.zeros_like(self._norm)
        norm[:n] = norms
        np.divide(raw, norms[:, None], out=matrix[:n], where=norms[:, None] > 0)
        return LatentUpdate(ids, vectors, version, learned, matrix, norm, int(known.sum()),
                            writes)  # fmt: skip

    def adopt_latent(self, update: LatentUpdate) -> int:
        """Puts a latent_update in place (one swap of the vectors); computes it again here
        if an item was added or changed since it was computed."""
        if update.writes != self._writes:
            update = self.latent_update(update.ids, update.vectors, update.version)
        self._learned = update.learned
        self._matrix, self._norm = update.matrix, update.norm
        self.latent_version = update.version
        return update.known


@dataclass(frozen=True, slots=True)
class LatentUpdate:
    """Item vectors with a model's embeddings, computed apart from the catalog."""

    ids: Sequence[str]
    vectors: Matrix
    version: int
    learned: dict[str, Vector]
    matrix: Matrix  # the whole buffer (the catalog's capacity), rows beyond the items zero
    norm: Vector
    known: int  # catalog items the model has
    writes: int  # the catalog's upsert count it was computed on


def write_jsonl(items: Iterable[Item], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for it in items:
            f.write(orjson.dumps(it.to_json()) + b"\n")
