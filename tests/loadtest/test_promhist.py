"""Histogram quantiles between two scrapes of a real prometheus_client exposition."""

from __future__ import annotations

import random

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from loadtest.promhist import buckets, quantile

BOUNDS = (0.001, 0.002, 0.005, 0.01, 0.02)


def _registry() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    h = Histogram("t_seconds", "test", ["endpoint"], buckets=BOUNDS, registry=registry)
    return registry, h


def _scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_the_quantile_is_of_what_was_observed_between_the_scrapes() -> None:
    registry, h = _registry()
    for _ in range(1000):  # before the step: all slow, must not count
        h.labels("slots").observe(0.015)
    before = buckets(_scrape(registry), "t_seconds", 'endpoint="slots",')
    rng = random.Random(3)
    values = [rng.uniform(0.0, 0.005) for _ in range(20000)]  # even inside each bucket
    for v in values:
        h.labels("slots").observe(v)
        h.labels("other").observe(0.018)  # another series, same metric
    after = buckets(_scrape(registry), "t_seconds", 'endpoint="slots",')
    for q in (0.5, 0.9, 0.99):
        got = quantile(before, after, q)
        true = float(np.quantile(values, q))
        assert got is not None
        # in the same bucket as the true quantile, and close (uniform inside a bucket)
        assert next(b for b in BOUNDS if b >= got) == next(b for b in BOUNDS if b >= true)
        assert got == pytest.approx(true, abs=0.0002)


def test_past_the_last_bound_and_nothing_observed() -> None:
    registry, h = _registry()
    before = buckets(_scrape(registry), "t_seconds", 'endpoint="slots",')
    h.labels("slots")  # the series exists, nothing observed
    assert quantile(before, buckets(_scrape(registry), "t_seconds", 'endpoint="slots",'),
                    0.99) is None  # fmt: skip
    for _ in range(98):
        h.labels("slots").observe(0.0005)
    for _ in range(2):
        h.labels("slots").observe(1.0)  # in +Inf
    after = buckets(_scrape(registry), "t_seconds", 'endpoint="slots",')
    assert quantile(before, after, 0.99) == 0.02  # at least the highest finite bound
    # the 50th of 98 in (0, 1 ms]
    assert quantile(before, after, 0.5) == pytest.approx(0.001 * 50 / 98, rel=1e-9)
    with pytest.raises(ValueError, match="between 0 and 1"):
        quantile(before, after, 99)


def test_a_metric_or_series_not_in_the_exposition_has_no_buckets() -> None:
    registry, h = _registry()
    h.labels("slots").observe(0.001)
    text = _scrape(registry)
    assert buckets(text, "t_seconds", 'endpoint="nope",') == {}
    assert buckets(text, "missing_seconds") == {}
    assert quantile({}, {}, 0.5) is None
