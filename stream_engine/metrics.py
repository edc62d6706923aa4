"""Prometheus metrics of the stream worker (served on KAIROS_METRICS_PORT)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

# Freshness buckets in seconds: the targets live between 1 ms and 50 ms.
FRESHNESS_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 60.0,
)  # fmt: skip
APPLY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0,
)  # fmt: skip


# How late the worker's loop ran a 5 ms tick: a few ms is a batch being planned; tens of
# ms held every batch behind it.
LOOP_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class BatchHistogram(Collector):
    """A Prometheus histogram fed a batch of values at a time, for per-event series.

    prometheus_client's Histogram takes a lock and ~1 µs per observe(): two per event were
    ~3% of the worker at 10,000 events/s. Here a batch costs one numpy pass (or a bisect
    per value for the few-event batches of a quiet stream). Exposed like a Histogram:
    `_bucket{le=...}` (cumulative), `_count`, `_sum`.
    """

    NUMPY_FROM = 16  # values; below this, bisect per value is cheaper than numpy's setup

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:  # fmt: skip
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(float(b) for b in buckets)
        self._edges = np.asarray(self.bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()  # the exporter's thread reads while we write
        registry.register(self)

    def observe_many(self, values: Sequence[float]) -> None:
        if len(values) < self.NUMPY_FROM:
            slots = [bisect.bisect_left(self.bounds, v) for v in values]
            total = float(sum(values))
            with self._lock:
                for i in slots:
                    self._counts[i] += 1
                self._sum += total
            return
        arr = np.asarray(values, dtype=np.float64)
        counts = np.bincount(np.searchsorted(self._edges, arr, side="left"),
                             minlength=len(self._counts)).tolist()  # fmt: skip
        total = float(arr.sum())
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
            self._sum += total

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, n in zip((*(repr(b) for b in self.bounds), "+Inf"), counts, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets,
                                    sum_value=total)  # fmt: skip


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "kairos_events_total", "Clickstream events by type and outcome", ["type", "outcome"],
            registry=r,
        )  # fmt: skip
        self.dlq = Counter(
            "kairos_dlq_events_total", "Events dead-lettered, by reason", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "kairos_batch_size", "Events per micro-batch",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000), registry=r,
        )  # fmt: skip
        self.apply_seconds = Histogram(
            "kairos_batch_apply_seconds",
            "Time a micro-batch took to apply once let through: plan, Redis writes, retries",
            buckets=APPLY_BUCKETS, registry=r,
        )  # fmt: skip
        self.loop_lag = Histogram(
            "kairos_worker_loop_lag_seconds",
            "How much later than due the worker's event loop ran a 5 ms tick: batches and "
            "background work hold it, and every event waiting meanwhile",
            buckets=LOOP_LAG_BUCKETS, registry=r,
        )  # fmt: skip
        self.freshness_produced = BatchHistogram(
            "kairos_freshness_produced_seconds",
            "Kafka record timestamp (produced) to state written in Redis",
            buckets=FRESHNESS_BUCKETS, registry=r,
        )  # fmt: skip
        self.handoff_wait = BatchHistogram(
            "kairos_handoff_wait_seconds",
            "Clickstream message fetched to taken into a micro-batch (faust engine): the wait "
            "behind the batches before",
            buckets=FRESHNESS_BUCKETS, registry=r,
        )  # fmt: skip
        self.freshness_event = BatchHistogram(
            "kairos_freshness_event_seconds", "Event time (ts) to state written in Redis",
            buckets=FRESHNESS_BUCKETS, registry=r,
        )  # fmt: skip
        self.conflicts = Counter(
            "kairos_fence_conflicts_total", "Writes refused by a fence and retried", registry=r
        )
        self.repaired = Counter(
            "kairos_state_repaired_total",
            "Keys of a session, or the aggregates' fence and meta hashes, that held another "
            "Redis type than the worker writes, deleted so that events apply again", registry=r,
        )  # fmt: skip
        self.store_errors = Counter(
            "kairos_store_errors_total", "Redis failures while applying a batch (retried)",
            registry=r,
        )  # fmt: skip
        self.store_regressions = Counter(
            "kairos_store_regressions_total",
            "Times Redis was found to hold less of a partition than the worker had written "
            "(a failover, a restart from older data); the events in between applied again",
            registry=r,
        )  # fmt: skip
        self.store_emptied = Counter(
            "kairos_store_emptied_total",
            "Times Redis had no trace of a partition the worker had written (or the group's "
            "last commit says was written): emptied; what follows applies to fresh state",
            registry=r,
        )  # fmt: skip
        self.reapplied = Counter(
            "kairos_events_reapplied_total",
            "Events read again from Kafka because Redis had lost their effects", registry=r,
        )  # fmt: skip
        self.apply_failures = Counter(
            "kairos_apply_failures_total",
            "Batch applies that failed other than on Redis (retried in place)", registry=r,
        )  # fmt: skip
        self.catalog_updates = Counter(
            "kairos_catalog_updates_total", "Catalog topic messages, by outcome", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.lag = Gauge(
            "kairos_consumer_lag", "Messages behind the partition's high watermark",
            ["partition"], registry=r,
        )  # fmt: skip
        self.apply_limit = Gauge(
            "kairos_worker_apply_limit_events_per_second",
            "Rate the worker holds itself to while the API reports slow reads (0 = none)",
            registry=r,
        )  # fmt: skip
        self.yielded = Counter(
            "kairos_worker_yielded_seconds", "Time batches waited on that limit", registry=r
        )
        self.pressure_reports = Counter(
            "kairos_worker_pressure_reports_total",
            "Looks at the API's slow-read counter that found it gone up", registry=r,
        )  # fmt: skip
        self.latent_version = Gauge(
            "kairos_latent_model_version", "Learned embeddings version in use (0 = none yet)",
            registry=r,
        )  # fmt: skip
