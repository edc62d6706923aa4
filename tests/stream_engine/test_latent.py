"""Learned item embeddings: PPMI + SVD find structure, Procrustes keeps the basis stable."""

from __future__ import annotations

import random

import numpy as np
import pytest
import redis.asyncio as aioredis

from stream_engine import latent
from stream_engine.catalog import LEARNED_DIMS, Catalog, CatalogError, Item, LatentUpdate
from stream_engine.latent import (
    NEIGHBOURS,
    LatentModel,
    align,
    install_newer,
    latent_key,
    latent_seq_key,
    learn,
    nearest,
    newer_model,
    parse_model,
    publish,
)

CLUSTERS, PER_CLUSTER = 4, 40


def cluster_of(item: str) -> int:
    return int(item.split("-")[0][1:])


def planted(seed: int, noise: float = 0.03) -> dict[str, dict[str, float]]:
    """Co-visitation of shoppers who stay inside one of CLUSTERS groups of items (with a
    little cross-group noise): the structure embeddings should recover without metadata."""
    rng = random.Random(seed)
    rows: dict[str, dict[str, float]] = {}
    items = [f"c{c}-{i}" for c in range(CLUSTERS) for i in range(PER_CLUSTER)]
    for _ in range(6000):
        src = rng.choice(items)
        if rng.random() < noise:
            dst = rng.choice(items)
        else:
            dst = f"c{cluster_of(src)}-{rng.randrange(PER_CLUSTER)}"
        if dst != src:
            rows.setdefault(src, {}).setdefault(dst, 0.0)
            rows[src][dst] += rng.uniform(0.5, 1.5)
    return rows


def test_embeddings_recover_the_groups_shoppers_move_in() -> None:
    model = learn(planted(1), dims=16, max_items=10_000, previous=None, version=1, now_ms=0)
    assert model is not None
    assert model.vectors.shape == (CLUSTERS * PER_CLUSTER, 16)
    np.testing.assert_allclose(np.linalg.norm(model.vectors, axis=1), 1.0, rtol=1e-5)
    same = total = 0
    for n, item in enumerate(model.ids):
        for j in model.neighbours[n]:
            if j >= 0:
                total += 1
                same += cluster_of(model.ids[j]) == cluster_of(item)
    assert total > CLUSTERS * PER_CLUSTER * 5
    assert same / total > 0.95
    # items of one group are far more alike than items of different groups
    by = {c: [n for n, i in enumerate(model.ids) if cluster_of(i) == c] for c in range(CLUSTERS)}
    inside = float(np.mean(model.vectors[by[0]] @ model.vectors[by[0]].T))
    across = float(np.mean(model.vectors[by[0]] @ model.vectors[by[1]].T))
    assert inside > across + 0.5


def test_refresh_keeps_the_basis_so_old_session_vectors_still_mean_the_same() -> None:
    first = learn(planted(1), dims=16, max_items=10_000, previous=None, version=1, now_ms=0)
    assert first is not None
    later = {src: dict(nexts) for src, nexts in planted(1).items()}  # the counts, grown
    for src, nexts in planted(2).items():
        for dst, score in nexts.items():
            later.setdefault(src, {})[dst] = later.get(src, {}).get(dst, 0.0) + score

    def agreement(model: LatentModel | None) -> float:
        assert model is not None
        pos = {item: n for n, item in enumerate(first.ids)}
        rows = [(n, pos[i]) for n, i in enumerate(model.ids) if i in pos]
        a = model.vectors[[r[0] for r in rows]]
        b = first.vectors[[r[1] for r in rows]]
        return float(np.mean(np.sum(a * b, axis=1)))

    aligned = agreement(learn(later, 16, 10_000, previous=first, version=2, now_ms=1))
    unaligned = agreement(learn(later, 16, 10_000, previous=None, version=2, now_ms=1))
    assert aligned > 0.75
    assert aligned > unaligned + 0.3


def test_align_is_a_rotation_and_undoes_one() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(size=(50, 8)).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    rotated = (base @ q).astype(np.float32)
    ids = [f"i{n}" for n in range(50)]
    nb, sim = nearest(base)
    previous = parse_model({})  # nothing published yet
    assert previous is None
    old = LatentModel(1, tuple(ids), base, nb, sim, 0)
    back = align(ids, rotated, old)
    np.testing.assert_allclose(back, base, atol=1e-4)


def test_too_little_co_visitation_learns_nothing() -> None:
    assert learn({"a": {"b": 1.0}}, 8, 100, None, 1, 0) is None


def test_max_items_keeps_the_most_co_visited() -> None:
    rows = planted(1)
    rows["rare-1"] = {"rare-2": 1e-6}
    model = learn(rows, dims=8, max_items=CLUSTERS * PER_CLUSTER, previous=None, version=1,
                  now_ms=0)  # fmt: skip
    assert model is not None
    assert "rare-1" not in model.ids
    assert model.neighbours.shape == (len(model.ids), NEIGHBOURS)


def test_catalog_installs_learned_vectors_for_items_with_and_without_metadata() -> None:
    shoe = Item("shoe", "Shoe", ("Sports", "Running"), price=50.0)
    bare = Item("bare", "bare")  # an item nothing is known about
    catalog = Catalog([shoe, bare, Item("other", "O", ("Home",), price=5.0)])
    space = catalog.space
    assert space.learned
    assert space.latent_dims == LEARNED_DIMS
    np.testing.assert_array_equal(catalog.matrix[catalog.row["bare"]], 0.0)
    latent = np.zeros((3, LEARNED_DIMS), np.float32)
    latent[0, 0], latent[1, 0], latent[2, 1] = 1.0, 2.0, 1.0
    assert catalog.set_latent(["bare", "shoe", "late"], latent, version=7) == 2
    np.testing.assert_allclose(np.linalg.norm(catalog.matrix, axis=1), [1.0, 1.0, 1.0], rtol=1e-5)
    bare_v, shoe_v = catalog.matrix[catalog.row["bare"]], catalog.matrix[catalog.row["shoe"]]
    assert bare_v[space.latent_start] == pytest.approx(1.0)
    assert shoe_v[space.index["cat:Sports > Running"]] > 0  # the interpretable part stays
    assert float(bare_v @ shoe_v) > 0.4  # alike through the learned block alone
    catalog.upsert(Item("late", "late"))  # arrives after the model: gets its learned vector
    assert catalog.matrix[catalog.row["late"]][space.latent_start + 1] == pytest.approx(1.0)
    assert catalog.latent_version == 7
    with pytest.raises(CatalogError, match="does not fit"):
        catalog.set_latent(["shoe"], np.ones((1, 3), np.float32), version=8)


def test_a_latent_update_is_computed_apart_and_swapped_in_or_redone_if_stale() -> None:
    """The API computes a model's vectors in a thread while decisions read the catalog:
    computing writes nothing, adopting swaps the result in, and an item changed in
    between makes the adoption compute again rather than drop that change."""
    items = [Item("shoe", "Shoe", ("Sports", "Running"), price=50.0), Item("bare", "bare"),
             Item("other", "O", ("Home",), price=5.0)]  # fmt: skip
    latent = np.zeros((2, LEARNED_DIMS), np.float32)
    latent[0, 0], latent[1, 1] = 1.0, 1.0
    ids = ["bare", "other"]
    catalog, twin = Catalog(items), Catalog(items)
    before = catalog.matrix.copy()
    update = catalog.latent_update(ids, latent, version=5)
    np.testing.assert_array_equal(catalog.matrix, before)  # nothing written yet
    assert catalog.latent_version == 0
    assert catalog.adopt_latent(update) == twin.set_latent(ids, latent, version=5) == 2
    np.testing.assert_array_equal(catalog.matrix, twin.matrix)
    assert catalog.latent_version == 5
    # stale: an item moves between the computing and the swap
    update = catalog.latent_update(ids, latent[::-1].copy(), version=6)
    moved = Item("other", "O", ("Sports", "Running"), price=5.0)
    catalog.upsert(moved)
    twin.upsert(moved)
    catalog.adopt_latent(update)
    twin.set_latent(ids, latent[::-1].copy(), version=6)
    np.testing.assert_array_equal(catalog.matrix, twin.matrix)
    other = catalog.matrix[catalog.row["other"]]
    assert other[catalog.space.index["cat:Sports > Running"]] > 0  # the move kept


@pytest.mark.integration
async def test_workers_install_a_published_model_once_and_read_a_misfit_once(
    redis_client: aioredis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = Catalog([Item("a", "A", ("X",), price=1.0), Item("b", "B", ("Y",), price=2.0)])
    model = learn(planted(1), LEARNED_DIMS, 10_000, None, version=3, now_ms=0)
    assert model is not None
    await publish(redis_client, key_prefix, model, ttl_ms=60_000)
    seen, got = await newer_model(redis_client, key_prefix, catalog, seen=0)
    assert seen == 3
    assert got is not None
    assert got.ids == model.ids
    np.testing.assert_array_equal(got.vectors, model.vectors)
    np.testing.assert_array_equal(got.neighbours, model.neighbours)
    # a model of another width: refused, and not read again at the next poll
    narrow = learn(planted(1), 8, 10_000, None, version=4, now_ms=0)
    assert narrow is not None
    await publish(redis_client, key_prefix, narrow, ttl_ms=60_000)
    seen, got = await newer_model(redis_client, key_prefix, catalog, seen=3)
    assert (seen, got) == (4, None)
    reads = []
    monkeypatch.setattr(latent, "load", lambda *a: reads.append(a))
    assert await newer_model(redis_client, key_prefix, catalog, seen=4) == (4, None)
    assert reads == []


@pytest.mark.integration
async def test_a_worker_installs_a_published_model_into_its_catalog(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """The worker's install: computed in a thread, swapped into its catalog, the same
    vectors set_latent gives; nothing more to install at the next poll."""
    items = [Item(f"c{c}-{i}", "x", ("Cat",), price=1.0)
             for c in range(CLUSTERS) for i in range(PER_CLUSTER)]  # fmt: skip
    catalog, twin = Catalog(items), Catalog(items)
    model = learn(planted(2), LEARNED_DIMS, 10_000, None, version=5, now_ms=0)
    assert model is not None
    await publish(redis_client, key_prefix, model, ttl_ms=60_000)

    def prepare(m: LatentModel) -> LatentUpdate:
        return catalog.latent_update(m.ids, m.vectors, m.version)

    seen, got = await install_newer(redis_client, key_prefix, catalog, 0, prepare,
                                    catalog.adopt_latent)  # fmt: skip
    assert seen == 5
    assert got is not None
    assert catalog.latent_version == 5
    twin.set_latent(model.ids, model.vectors, model.version)
    np.testing.assert_allclose(catalog.matrix, twin.matrix, rtol=1e-6, atol=1e-7)
    again = await install_newer(redis_client, key_prefix, catalog, 5, prepare,
                                catalog.adopt_latent)  # fmt: skip
    assert again == (5, None)


@pytest.mark.integration
async def test_model_keys_written_by_something_else_read_as_none_and_are_replaced(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """The model's key or its sequence of another type, or a version that is no number:
    workers and APIs read no model (they raised, and a worker's catalog follower stopped),
    and the learner starts the sequence again (its INCR raised at every round)."""
    catalog = Catalog([Item("a", "A", ("X",), price=1.0)])
    await redis_client.set(latent_key(key_prefix), "not a hash")
    assert await newer_model(redis_client, key_prefix, catalog, seen=0) == (0, None)
    assert await latent.load(redis_client, key_prefix) is None
    await redis_client.delete(latent_key(key_prefix))
    await redis_client.hset(latent_key(key_prefix), "version", "seven")
    assert await latent.published_version(redis_client, key_prefix) == 0
    await redis_client.rpush(latent_seq_key(key_prefix), "not", "a", "counter")
    assert await latent.refresh(redis_client, key_prefix, LEARNED_DIMS, 1000, 60_000,
                                60_000.0) is None  # no co-visitation yet  # fmt: skip
    assert await redis_client.get(latent_seq_key(key_prefix)) == b"1"
    assert 0 < await redis_client.pttl(latent_seq_key(key_prefix)) <= 60_000
