"""The worker's batch-fed histogram exposes what prometheus_client's Histogram would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from stream_engine.metrics import FRESHNESS_BUCKETS, BatchHistogram


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_batches_of_any_size_match_one_observe_per_value() -> None:
    rng = random.Random(7)
    # boundaries exactly, between them, beyond the last bucket, and zero
    values = [*FRESHNESS_BUCKETS, 0.0, 61.0, 1e9]
    values += [rng.choice(FRESHNESS_BUCKETS) * rng.uniform(0.5, 1.5) for _ in range(3000)]
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram("fresh_seconds", "doc", FRESHNESS_BUCKETS, ours_registry)
    theirs = Histogram("fresh_seconds", "doc", buckets=FRESHNESS_BUCKETS,
                       registry=theirs_registry)  # fmt: skip
    at = 0
    for size in (1, 3, BatchHistogram.NUMPY_FROM - 1, BatchHistogram.NUMPY_FROM, 500, 2600):
        batch = values[at : at + size]
        at += size
        ours.observe_many(batch)
        for v in batch:
            theirs.observe(v)
    ours.observe_many([])
    assert at >= len(values)
    got, want = _samples(ours_registry), _samples(theirs_registry)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert abs(got[key] - value) <= 1e-9 * max(1.0, abs(value)), key
    assert b'fresh_seconds_bucket{le="0.0075"}' in generate_latest(ours_registry)
