"""A realistic demo catalog: a three-level category tree, brands, log-normal prices, stock.

    python -m stream_engine catalog --items 10000 --out .stack/catalog/demo.jsonl

Item order is popularity order (item 0 is the most popular), so simulators can draw item
ranks from a Zipf law and map them straight to `items[rank]`. Deterministic for a seed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from stream_engine.catalog import Item, write_jsonl

TREE: dict[str, dict[str, list[str]]] = {
    "Sports": {
        "Running": ["Trail Running Shoes", "Road Running Shoes", "Running Apparel", "GPS Watches"],
        "Cycling": ["Road Bikes", "Helmets", "Cycling Apparel", "Bike Parts"],
        "Outdoor": ["Tents", "Backpacks", "Hiking Boots", "Camping Stoves"],
        "Fitness": ["Yoga Mats", "Dumbbells", "Resistance Bands", "Rowing Machines"],
    },
    "Electronics": {
        "Audio": ["Headphones", "Earbuds", "Speakers", "Turntables"],
        "Computers": ["Laptops", "Monitors", "Keyboards", "Mice"],
        "Phones": ["Smartphones", "Phone Cases", "Chargers", "Screen Protectors"],
        "Cameras": ["Mirrorless Cameras", "Lenses", "Tripods", "Action Cameras"],
    },
    "Home": {
        "Kitchen": ["Cookware", "Knives", "Coffee Makers", "Blenders"],
        "Furniture": ["Sofas", "Desks", "Office Chairs", "Bookshelves"],
        "Bedding": ["Duvets", "Pillows", "Sheets", "Mattress Toppers"],
        "Decor": ["Lamps", "Rugs", "Wall Art", "Plants"],
    },
    "Fashion": {
        "Women": ["Dresses", "Jeans", "Knitwear", "Coats"],
        "Men": ["Shirts", "Chinos", "Jackets", "Suits"],
        "Shoes": ["Sneakers", "Boots", "Sandals", "Loafers"],
        "Accessories": ["Bags", "Belts", "Sunglasses", "Scarves"],
    },
    "Beauty": {
        "Skincare": ["Moisturisers", "Serums", "Cleansers", "Sunscreen"],
        "Makeup": ["Lipstick", "Foundation", "Mascara", "Palettes"],
        "Hair": ["Shampoo", "Conditioner", "Hair Dryers", "Styling"],
    },
    "Toys": {
        "Building": ["Brick Sets", "Marble Runs", "Magnetic Tiles"],
        "Games": ["Board Games", "Puzzles", "Card Games"],
        "Outdoor Play": ["Scooters", "Trampolines", "Water Toys"],
    },
    "Books": {
        "Fiction": ["Crime", "Science Fiction", "Literary Fiction", "Romance"],
        "Non-fiction": ["History", "Cookbooks", "Travel Guides", "Biography"],
    },
    "Grocery": {
        "Coffee & Tea": ["Coffee Beans", "Tea", "Capsules"],
        "Snacks": ["Chocolate", "Crisps", "Nuts"],
    },
}
BRANDS = [
    "Altura", "Borealis", "Cobalt", "Driftwood", "Ember", "Fjord", "Granite", "Halcyon",
    "Ionic", "Juniper", "Kestrel", "Lumen", "Meridian", "Nimbus", "Orchard", "Pinnacle",
]  # fmt: skip
ADJECTIVES = ["Classic", "Pro", "Lite", "Ultra", "Eco", "Prime", "Flex", "Nova", "Core", "Aero"]
# Median price per department (log-normal around it).
MEDIAN_PRICE = {
    "Sports": 60.0, "Electronics": 120.0, "Home": 70.0, "Fashion": 50.0,
    "Beauty": 20.0, "Toys": 25.0, "Books": 15.0, "Grocery": 8.0,
}  # fmt: skip


def _singular(leaf: str) -> str:
    if leaf.endswith(("ches", "shes", "sses")):
        return leaf[:-2]
    return leaf[:-1] if leaf.endswith("s") and not leaf.endswith("ss") else leaf


def leaf_paths() -> list[tuple[str, str, str]]:
    return [
        (d, c, leaf) for d, cats in TREE.items() for c, leaves in cats.items() for leaf in leaves
    ]


def generate(n_items: int = 10_000, seed: int = 7) -> list[Item]:
    rng = random.Random(seed)
    leaves = leaf_paths()
    items: list[Item] = []
    for i in range(n_items):
        dept, cat, leaf = leaves[rng.randrange(len(leaves))]
        brand = BRANDS[rng.randrange(len(BRANDS))]
        price = round(rng.lognormvariate(0, 0.6) * MEDIAN_PRICE[dept], 2)
        # One item in twenty is out of stock.
        stock = 0 if rng.random() < 0.05 else rng.randint(1, 500)
        title = f"{brand} {ADJECTIVES[rng.randrange(len(ADJECTIVES))]} {_singular(leaf)}"
        items.append(
            Item(
                item_id=f"sku-{i:06d}",
                title=title,
                category=(dept, cat, leaf),
                brand=brand,
                price=max(price, 0.5),
                stock=stock,
            )
        )
    return items


def write_demo_catalog(path: Path, n_items: int = 10_000, seed: int = 7) -> Path:
    # Written aside and renamed, so a worker and an API starting together never read half.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_jsonl(generate(n_items, seed), tmp)
    tmp.replace(path)
    return path


def resolve_catalog_path(catalog_path: str, stack_dir: str) -> Path:
    """The configured catalog file, else the demo catalog in the stack dir (written once)."""
    if catalog_path:
        return Path(catalog_path)
    path = Path(stack_dir) / "catalog" / "demo.jsonl"
    if not path.exists():
        write_demo_catalog(path)
    return path
