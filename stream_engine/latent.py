"""Item embeddings learned from co-visitation, for catalogs that ship no embeddings.

Items without metadata have no interpretable dimensions, so only a latent block can carry
their meaning. The learner (`python -m stream_engine latent`, one per deployment) refreshes
it every `latent_refresh_s`:

1. read the co-visitation sorted sets ({agg}:cv:<item>) and keep the `latent_max_items`
   most co-visited items; the matrix C = A + Aᵀ of their (decayed) counts is symmetric;
2. positive PMI with context-distribution smoothing (alpha = 0.75, Levy et al. 2015):
   PPMI_ij = max(0, log(C_ij · T / (r_i · ĉ_j))), ĉ_j ∝ c_j^alpha;
3. truncated SVD (scipy's ARPACK `svds`; a dense SVD for small matrices) and embeddings
   E = U_k · √Σ_k, rows normalized;
4. orthogonal Procrustes onto the previous model (the rotation R minimizing
   ‖E_new[common] R - E_old[common]‖ over the items both know), so session vectors summed
   from the old embeddings keep their meaning after a refresh instead of pointing at noise;
5. each item's NEIGHBOURS most similar items (cosine > MIN_SIMILARITY), which the API uses
   as candidates ("similar to what you viewed") for items co-visitation never linked;
6. publish it in one MULTI to P:{catalog}:latent (a hash: version, dims, at, ids as JSON,
   m = float32 matrix, nb = int32 neighbour indices (-1 = none), ns = float32 similarity).

Workers and the API poll the version and install a newer model (`Catalog.latent_update`,
computed in a thread, then `adopt_latent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import orjson
import redis.asyncio as aioredis

from stream_engine.catalog import Catalog, Matrix
from stream_engine.state import AGG_UNIT, COUNT_UP, UNMARKED, Keys, stored_int
from stream_engine.store import STORE_ERRORS, unless_wrong_type, wrong_type_as_none

log = logging.getLogger("kairos.latent")

NEIGHBOURS = 20
MIN_SIMILARITY = 0.1
SMOOTHING = 0.75
DENSE_SVD_MAX = 1500  # up to this many items a dense SVD is faster and exact
MIN_ITEMS = 4
SCAN_COUNT = 1000
READ_CHUNK = 500

Ints32 = npt.NDArray[np.int32]


def latent_key(prefix: str) -> str:
    return f"{prefix}:{{catalog}}:latent"


def latent_seq_key(prefix: str) -> str:
    return f"{prefix}:{{catalog}}:latent:seq"


@dataclass(frozen=True, slots=True)
class LatentModel:
    version: int
    ids: tuple[str, ...]
    vectors: Matrix  # len(ids) x dims, unit rows
    neighbours: Ints32  # len(ids) x NEIGHBOURS, indices into ids, -1 = none
    similarity: Matrix  # cosine of each neighbour
    learned_at_ms: int

    @property
    def dims(self) -> int:
        return int(self.vectors.shape[1])


# scipy is imported by the functions that learn, not here: the API and the workers import
# this module to read models, and scipy would add ~30 MiB to each of them.


def covisitation_matrix(rows: dict[str, dict[str, float]], max_items: int) -> tuple[list[str], Any]:
    """The symmetric co-visitation matrix (scipy CSR) of the `max_items` most co-visited
    items."""
    from scipy import sparse

    totals: dict[str, float] = {}
    for src, nexts in rows.items():
        for dst, score in nexts.items():
            if dst == src or score <= 0:
                continue
            totals[src] = totals.get(src, 0.0) + score
            totals[dst] = totals.get(dst, 0.0) + score
    ids = sorted(totals, key=lambda i: (-totals[i], i))[:max_items]
    index = {item: n for n, item in enumerate(ids)}
    r, c, v = [], [], []
    for src, nexts in rows.items():
        i = index.get(src)
        if i is None:
            continue
        for dst, score in nexts.items():
            j = index.get(dst)
            if j is not None and j != i and score > 0:
                r += [i, j]
                c += [j, i]
                v += [score, score]
    values = np.asarray(v, np.float64)
    if values.size:
        values /= values.max()  # forward-decayed scores can be huge; PMI ignores the scale
    n = len(ids)
    return ids, sparse.csr_matrix((values, (r, c)), shape=(n, n))  # duplicates are summed


def ppmi(counts: Any, alpha: float = SMOOTHING) -> Any:
    """Positive pointwise mutual information, context distribution smoothed by alpha (CSR in,
    CSR out)."""
    from scipy import sparse

    coo = counts.tocoo()
    total = float(coo.data.sum())
    row_sum = np.asarray(counts.sum(axis=1)).ravel()
    col_sum = np.asarray(counts.sum(axis=0)).ravel()
    smoothed = col_sum**alpha
    p_context = smoothed / smoothed.sum()
    pmi = np.log(coo.data / total) - np.log(row_sum[coo.row] / total) - np.log(p_context[coo.col])
    keep = pmi > 0
    return sparse.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=counts.shape)


def embed(matrix: Any, dims: int) -> Matrix:
    """Rows of U_k·√Σ_k for the top singular values, normalized, padded to `dims` columns."""
    from scipy.sparse.linalg import svds

    n = matrix.shape[0]
    k = min(dims, n - 1)
    if n <= DENSE_SVD_MAX:
        u, s, _ = np.linalg.svd(matrix.toarray(), full_matrices=False)
        u, s = u[:, :k], s[:k]
    else:
        v0 = np.full(n, 1.0 / np.sqrt(n))  # ARPACK's start vector: fixed, for reproducibility
        u, s, _ = svds(matrix.astype(np.float64), k=k, v0=v0)
        order = np.argsort(-s)
        u, s = u[:, order], s[order]
    e = np.zeros((n, dims), np.float64)
    e[:, :k] = u * np.sqrt(np.maximum(s, 0.0))
    return _normalized(e).astype(np.float32)


def _normalized(m: npt.NDArray[Any]) -> npt.NDArray[Any]:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    out: npt.NDArray[Any] = np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)
    return out


def align(new_ids: list[str], new: Matrix, previous: LatentModel | None) -> Matrix:
    """Rotate `new` onto the previous model's basis (orthogonal Procrustes over the items
    both know). Without enough common items the basis is new (and sessions start over)."""
    if previous is None or previous.dims != new.shape[1]:
        return new
    before = {item: n for n, item in enumerate(previous.ids)}
    pairs = [(n, before[i]) for n, i in enumerate(new_ids) if i in before]
    if len(pairs) < new.shape[1]:
        return new
    a = new[[p[0] for p in pairs]].astype(np.float64)
    b = previous.vectors[[p[1] for p in pairs]].astype(np.float64)
    u, _, vt = np.linalg.svd(a.T @ b)
    rotated: Matrix = (new.astype(np.float64) @ (u @ vt)).astype(np.float32)
    return rotated


def nearest(vectors: Matrix, k: int = NEIGHBOURS, block: int = 2048) -> tuple[Ints32, Matrix]:
    """Each row's k most similar other rows (cosine > MIN_SIMILARITY; -1 pads)."""
    n = vectors.shape[0]
    k = min(k, max(n - 1, 0))
    idx = np.full((n, NEIGHBOURS), -1, np.int32)
    sim = np.zeros((n, NEIGHBOURS), np.float32)
    if k == 0:
        return idx, sim
    for start in range(0, n, block):
        stop = min(n, start + block)
        s = vectors[start:stop] @ vectors.T
        s[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        top_s = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-top_s, axis=1)
        top, top_s = np.take_along_axis(top, order, 1), np.take_along_axis(top_s, order, 1)
        weak = top_s <= MIN_SIMILARITY
        idx[start:stop, :k] = np.where(weak, -1, top)
        sim[start:stop, :k] = np.where(weak, 0.0, top_s)
    return idx, sim


def learn(
    rows: dict[str, dict[str, float]],
    dims: int,
    max_items: int,
    previous: LatentModel | None,
    version: int,
    now_ms: int,
) -> LatentModel | None:
    """A model from co-visitation rows (item -> next item -> score); None if too few items."""
    ids, counts = covisitation_matrix(rows, max_items)
    if len(ids) < MIN_ITEMS:
        return None
    vectors = align(ids, embed(ppmi(counts), dims), previous)
    neighbours, similarity = nearest(vectors)
    return LatentModel(version, tuple(ids), vectors, neighbours, similarity, now_ms)


async def read_covisitation(
    redis: aioredis.Redis, keys: Keys, half_life_ms: float
) -> dict[str, dict[str, float]]:
    """Every co-visitation sorted set, as item -> next item -> score, all relative to the
    current landmark: a set not written since the landmark last moved still holds scores
    relative to its own (state.py), and is scaled here as its next write would scale it,
    as is one written before whole units. Keys written by something else are read as the
    aggregate script reads them: a key under the prefix that is no sorted set is left
    out, and a landmark record of another type, or that is no number, as the current
    landmark (the script replaces such a record: state.UNMARKED)."""
    prefix = keys.covisit("")
    names: list[bytes] = []
    async for name in redis.scan_iter(match=prefix + "*", count=SCAN_COUNT):
        names.append(name if isinstance(name, bytes) else name.encode())
    # of another type (the worker's read repairs it): none
    landmark = stored_int(await unless_wrong_type(redis.hget(keys.agg_meta, "L"), None))
    # the landmark of sets without a mark of their own, once the record was replaced
    unmarked_at = stored_int(
        await unless_wrong_type(redis.hget(keys.agg_landmarks, UNMARKED), None)
    )
    out: dict[str, dict[str, float]] = {}
    for start in range(0, len(names), READ_CHUNK):
        chunk = names[start : start + READ_CHUNK]
        pipe = redis.pipeline(transaction=False)
        for name in chunk:
            pipe.zrange(name, 0, -1, withscores=True)
        pipe.hmget(keys.agg_landmarks, chunk)
        *rows, marks = wrong_type_as_none(await pipe.execute(raise_on_error=False))
        unmarked = marks is None  # {agg}:lk of another type: all on the current landmark
        for name, members, mark in zip(chunk, rows, marks or [None] * len(chunk), strict=True):
            if members is None:  # no sorted set: not the worker's
                continue
            f = 1.0
            if mark is None:
                if unmarked_at is not None:  # unmarked since the record's repair
                    if landmark is not None:
                        f = 2.0 ** ((unmarked_at - landmark) / half_life_ms)
                elif not unmarked:  # written before whole units, on the current landmark
                    f = AGG_UNIT
            elif landmark is not None and (at := stored_int(mark)) is not None:
                f = 2.0 ** ((at - landmark) / half_life_ms)
            src = name.decode()[len(prefix) :]
            out[src] = {(m.decode() if isinstance(m, bytes) else m): float(s) * f
                        for m, s in members}  # fmt: skip
    return out


async def publish(redis: aioredis.Redis, prefix: str, model: LatentModel, ttl_ms: int) -> None:
    key = latent_key(prefix)
    pipe = redis.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(key, mapping={
        "version": model.version, "dims": model.dims, "at": model.learned_at_ms,
        "ids": orjson.dumps(list(model.ids)), "m": model.vectors.astype("<f4").tobytes(),
        "nb": model.neighbours.astype("<i4").tobytes(),
        "ns": model.similarity.astype("<f4").tobytes(),
    })  # fmt: skip
    pipe.pexpire(key, ttl_ms)
    await pipe.execute()


def parse_model(fields: dict[Any, Any]) -> LatentModel | None:
    """The model from its hash; None if absent or malformed (logged)."""
    if not fields:
        return None
    try:
        ids = tuple(orjson.loads(fields[b"ids"]))
        dims = int(fields[b"dims"])
        n = len(ids)
        vectors = np.frombuffer(fields[b"m"], "<f4").reshape(n, dims).astype(np.float32)
        neighbours = np.frombuffer(fields[b"nb"], "<i4").reshape(n, NEIGHBOURS).astype(np.int32)
        similarity = np.frombuffer(fields[b"ns"], "<f4").reshape(n, NEIGHBOURS).astype(np.float32)
        return LatentModel(int(fields[b"version"]), ids, vectors, neighbours, similarity,
                           int(fields[b"at"]))  # fmt: skip
    except (KeyError, ValueError, TypeError, orjson.JSONDecodeError) as exc:
        log.warning("latent model in Redis is malformed, ignored: %s", exc)
        return None


async def published_version(redis: aioredis.Redis, prefix: str) -> int:
    """The published model's version; 0 for none, as for a key or a version written by
    something else (the next publish replaces the key)."""
    return stored_int(await unless_wrong_type(redis.hget(latent_key(prefix), "version"), None)) or 0


async def load(redis: aioredis.Redis, prefix: str) -> LatentModel | None:
    # of another type, written by something else: no model (the next publish replaces it)
    return parse_model(await unless_wrong_type(redis.hgetall(latent_key(prefix)), {}))


async def newer_model(
    redis: aioredis.Redis, prefix: str, catalog: Catalog, seen: int, version: int | None = None
) -> tuple[int, LatentModel | None]:
    """(published version, its model) when that version is not `seen` and the model fits the
    catalog's space, else (version, None). Callers keep the returned version as `seen`, so a
    model that is malformed or does not fit is read once, not at every poll. `version` is
    the published version when the caller has read it already; installing is the caller's
    part, and a catalog without a learned block never asks."""
    if not catalog.space.learned:
        return seen, None
    if version is None:
        version = await published_version(redis, prefix)
    if version == 0 or version == seen:
        return seen, None
    model = await load(redis, prefix)
    if model is not None and model.dims != catalog.space.latent_dims:
        log.warning("latent model %d has %d dims, this space %d: ignored", model.version,
                    model.dims, catalog.space.latent_dims)  # fmt: skip
        return model.version, None
    return (model.version if model is not None else version), model


Prepared = TypeVar("Prepared")  # a model made ready to install (each caller's own)


async def install_newer(
    redis: aioredis.Redis,
    prefix: str,
    catalog: Catalog,
    seen: int,
    prepare: Callable[[LatentModel], Prepared],
    adopt: Callable[[Prepared], int],
    version: int | None = None,
) -> tuple[int, LatentModel | None]:
    """newer_model, installed by the caller's `prepare` (run in a thread: the new item
    vectors are 57-243 ms of numpy with 100k items, which lets go of the GIL, while the
    event loop goes on with the vectors in use) and `adopt` (swaps them in on the loop;
    returns how many of the model's items the catalog has). The worker and the API both
    install this way."""
    seen, model = await newer_model(redis, prefix, catalog, seen, version)
    if model is not None:
        known = adopt(await asyncio.to_thread(prepare, model))
        log.info("latent model %d installed: %d of %d items in the catalog", model.version,
                 known, len(model.ids))  # fmt: skip
    return seen, model


async def refresh(
    redis: aioredis.Redis, prefix: str, dims: int, max_items: int, ttl_ms: int,
    covisit_half_life_ms: float,
) -> LatentModel | None:  # fmt: skip
    """Learn from the current co-visitation and publish; None if there is too little yet."""
    started = time.monotonic()
    rows = await read_covisitation(redis, Keys(prefix), covisit_half_life_ms)
    previous = await load(redis, prefix)
    version = int(await redis.eval(COUNT_UP, 1, latent_seq_key(prefix), ttl_ms))
    read_s = time.monotonic() - started
    # the SVD and the neighbour search take seconds at 20k items: off the event loop
    model = await asyncio.to_thread(
        learn, rows, dims, max_items, previous, version, int(time.time() * 1000)
    )
    if model is None:
        log.info("latent: %d co-visited items, too few to learn from", len(rows))
        return None
    await publish(redis, prefix, model, ttl_ms)
    log.info("latent model %d: %d items, %d dims (read %.1f s, total %.1f s)", version,
             len(model.ids), model.dims, read_s, time.monotonic() - started)  # fmt: skip
    return model


async def run_learner(
    redis: aioredis.Redis, prefix: str, dims: int, max_items: int, ttl_ms: int,
    covisit_half_life_ms: float, every_s: float, once: bool = False,
    stopping: asyncio.Event | None = None,
) -> int:  # fmt: skip
    """Refresh every `every_s` until stopped (or once); a Redis failure is logged, the next
    tick retries. Returns the last published version (0 = none)."""
    stopping = stopping or asyncio.Event()
    version = 0
    while not stopping.is_set():
        try:
            model = await refresh(redis, prefix, dims, max_items, ttl_ms, covisit_half_life_ms)
            version = model.version if model is not None else version
        except STORE_ERRORS as exc:
            if once:
                raise
            log.warning("latent refresh failed, retrying in %.0f s: %s", every_s, exc)
        if once:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), every_s)
    return version
