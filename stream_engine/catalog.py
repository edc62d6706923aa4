"""The item catalog and the vector space items, banners and sessions share.

A catalog is JSONL (one item object per line) or CSV with the same columns:
`item_id`, `title`, `category` (path joined by " > "), `brand`, `price`, `stock`, optional
`image`, optional `embedding` (list of floats; CSV: space-separated). Bad rows raise
CatalogError naming the file, the line and the problem.

The space: an interpretable block with one dimension per category node down to
`max_depth` (so "this session is into running shoes" can be read off a vector) plus price
bands, and a latent block from the catalog's embeddings when it ships them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator, Mapping
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


class CatalogError(KairosError, ValueError):
    """A catalog file or update is malformed; the message names where."""


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    title: str
    category: tuple[str, ...]
    brand: str = ""
    price: float = 0.0
    stock: int = 0
    image: str | None = None
    embedding: tuple[float, ...] | None = None

    @property
    def category_path(self) -> str:
        return CATEGORY_SEP.join(self.category)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "item_id": self.item_id,
            "title": self.title,
            "category": self.category_path,
            "brand": self.brand,
            "price": self.price,
            "stock": self.stock,
        }
        if self.image:
            out["image"] = self.image
        if self.embedding is not None:
            out["embedding"] = list(self.embedding)
        return out


def item_from_mapping(row: Mapping[str, Any], where: str) -> Item:
    """Build an Item from a JSON object or CSV row; CatalogError says `where` and what."""
    try:
        item_id = str(row["item_id"])
        category = tuple(p.strip() for p in str(row["category"]).split(">") if p.strip())
    except KeyError as exc:
        raise CatalogError(f"{where}: missing {exc.args[0]!r}") from None
    if not ID_PATTERN.fullmatch(item_id):
        raise CatalogError(f"{where}: item_id {item_id!r} is not a valid id")
    if not category:
        raise CatalogError(f"{where}: item {item_id} has an empty category")
    try:
        price = float(row.get("price") or 0.0)
        stock = int(row.get("stock") or 0)
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

    @property
    def dims(self) -> int:
        return len(self.names)

    @classmethod
    def build(cls, items: Iterable[Item]) -> Space:
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
        prices = sorted(it.price for it in items)
        edges = tuple(prices[len(prices) * k // PRICE_BANDS] for k in range(1, PRICE_BANDS))
        names.extend(f"price:{b}" for b in range(PRICE_BANDS))
        latent = {len(it.embedding) for it in items if it.embedding is not None}
        latent_dims = max(latent) if latent else 0
        names.extend(f"latent:{k}" for k in range(latent_dims))
        index = {n: i for i, n in enumerate(names)}
        return cls(tuple(names), max_depth, edges, latent_dims, index)

    def price_band(self, price: float) -> int:
        return sum(price >= e for e in self.price_edges)

    def item_vector(self, item: Item) -> Vector:
        """Unit-length vector of one item; categories the space doesn't know contribute nothing."""
        v = np.zeros(self.dims, dtype=np.float32)
        for depth in range(1, min(len(item.category), self.max_depth) + 1):
            idx = self.index.get("cat:" + CATEGORY_SEP.join(item.category[:depth]))
            if idx is not None:
                v[idx] = DEPTH_WEIGHTS[depth]
        v[self.index[f"price:{self.price_band(item.price)}"]] = PRICE_WEIGHT
        if self.latent_dims and item.embedding is not None:
            emb = np.asarray(item.embedding[: self.latent_dims], dtype=np.float32)
            norm = float(np.linalg.norm(emb))
            if norm > 0:
                start = self.dims - self.latent_dims
                v[start : start + emb.size] = emb / norm
        norm = float(np.linalg.norm(v))
        return v / norm if norm > 0 else v

    def top_dimensions(self, vector: Vector, k: int = 3) -> list[tuple[str, float]]:
        """The k strongest interpretable dimensions of a vector, for explanations."""
        interp = self.dims - self.latent_dims
        order = np.argsort(-vector[:interp])[:k]
        return [(self.names[i], float(vector[i])) for i in order if vector[i] > 0]


class Catalog:
    """Items, their vectors as one float32 matrix, and id → row lookup; grows on updates."""

    def __init__(self, items: Iterable[Item], space: Space | None = None) -> None:
        items = list(items)
        self.space = space or Space.build(items)
        self.items: list[Item] = []
        self.row: dict[str, int] = {}
        self._matrix = np.zeros((max(len(items), 16), self.space.dims), dtype=np.float32)
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
                self._matrix = np.concatenate([self._matrix, np.zeros_like(self._matrix)])
            self.items.append(item)
            self.row[item.item_id] = row
        else:
            self.items[row] = item
        self._matrix[row] = self.space.item_vector(item)


def write_jsonl(items: Iterable[Item], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for it in items:
            f.write(orjson.dumps(it.to_json()) + b"\n")
