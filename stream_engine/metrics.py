"""Prometheus metrics of the stream worker (served on KAIROS_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Freshness buckets in seconds: the targets live between 1 ms and 50 ms.
FRESHNESS_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 60.0,
)  # fmt: skip


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
        self.freshness_produced = Histogram(
            "kairos_freshness_produced_seconds",
            "Kafka record timestamp (produced) to state written in Redis",
            buckets=FRESHNESS_BUCKETS, registry=r,
        )  # fmt: skip
        self.freshness_event = Histogram(
            "kairos_freshness_event_seconds", "Event time (ts) to state written in Redis",
            buckets=FRESHNESS_BUCKETS, registry=r,
        )  # fmt: skip
        self.conflicts = Counter(
            "kairos_fence_conflicts_total", "Writes refused by a fence and retried", registry=r
        )
        self.store_errors = Counter(
            "kairos_store_errors_total", "Redis failures while applying a batch (retried)",
            registry=r,
        )  # fmt: skip
        self.catalog_updates = Counter(
            "kairos_catalog_updates_total", "Catalog topic messages, by outcome", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.lag = Gauge(
            "kairos_consumer_lag", "Messages behind the partition's high watermark",
            ["partition"], registry=r,
        )  # fmt: skip
        self.latent_version = Gauge(
            "kairos_latent_model_version", "Learned embeddings version in use (0 = none yet)",
            registry=r,
        )  # fmt: skip
