"""Prometheus metrics of the decision API (GET /metrics)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
# A session-state read is one loopback round trip: ~0.2 ms at the median on this machine;
# its tail is waiting, for Redis and then for this process's loop to reach the reply.
READ_BUCKETS = (
    0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02,
    0.05,
)  # fmt: skip


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # process_cpu_seconds_total, process_resident_memory_bytes, ...: read at scrape time;
        # the load-test suite works out the API's share of a core per step from them
        ProcessCollector(registry=r)
        self.decisions = Counter(
            "kairos_api_decisions_total", "Slot decisions by slot, strategy and fallback reason",
            ["slot", "strategy", "fallback_reason"], registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "kairos_api_fallbacks_total", "Slot decisions that served a default, by reason",
            ["reason"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "kairos_api_request_seconds", "Handler time of decision requests", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.state_read = Histogram(
            "kairos_api_state_read_seconds", "Wall time of a decision's session-state read "
            "(one Redis round trip), reads that answered in budget", buckets=READ_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.state_age = Histogram(
            "kairos_api_state_age_seconds", "Age of the session state a decision used",
            buckets=(0.01, 0.1, 1, 10, 60, 600, 3600), registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("kairos_api_in_flight", "Decision requests in flight", registry=r)
        self.limit = Gauge(
            "kairos_api_in_flight_limit", "Adaptive bound on requests in flight", registry=r
        )
        self.breaker_open = Gauge(
            "kairos_api_redis_breaker_open", "1 while the Redis circuit breaker is open",
            registry=r,
        )  # fmt: skip
        self.loop_lag = Gauge(
            "kairos_api_loop_lag_seconds", "How late the event loop ran lately (the largest "
            "oversleep of a 5 ms timer over the last 0.5-1 s): CPU overload shows here first",
            registry=r,
        )  # fmt: skip
        self.cpu_share = Gauge(
            "kairos_api_cpu_share", "Share of a core this process used over the limiter's "
            "last 100 ms window (the limit shrinks above KAIROS_MAX_CPU_SHARE)", registry=r,
        )  # fmt: skip
        self.runqueue_share = Gauge(
            "kairos_api_runqueue_share", "Share of the limiter's last 100 ms window the event "
            "loop's thread spent waiting for a core (the limit shrinks above "
            "KAIROS_MAX_RUNQUEUE_SHARE, smoothed, while the API uses half a core)", registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "kairos_api_publish_dropped_total", "Messages for Kafka dropped, by topic and why",
            ["topic", "why"], registry=r,
        )  # fmt: skip
        self.beacons = Counter(
            "kairos_api_beacon_events_total", "Collected beacon events by outcome", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "kairos_api_config_reloads_total", "Config reloads by outcome", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.config_version = Gauge(
            "kairos_api_config_info", "The decision config in force (value 1)", ["version"],
            registry=r,
        )  # fmt: skip
        self.latent_version = Gauge(
            "kairos_api_latent_model_version", "Learned embeddings version in use (0 = none)",
            registry=r,
        )  # fmt: skip
        self.pressure_reports = Counter(
            "kairos_api_pressure_reports_total", "100 ms windows whose Redis reads were slow, "
            "reported to the workers (a worker catching up slows down)", registry=r,
        )  # fmt: skip
        self.refresh_errors = Counter(
            "kairos_api_refresh_errors_total", "Background refreshes that failed (kept the last)",
            registry=r,
        )  # fmt: skip
        # From the report (api/report.py), refreshed in the background: alert on these.
        self.report_personalized = Gauge(
            "kairos_report_personalized_share", "Share of a slot's decisions personalized "
            "(last 15 min)", ["slot"], registry=r,
        )  # fmt: skip
        self.report_fallback = Gauge(
            "kairos_report_fallback_share", "Share of a slot's decisions by fallback reason "
            "(last 15 min)", ["slot", "reason"], registry=r,
        )  # fmt: skip
        self.report_lift = Gauge(
            "kairos_report_click_through_lift", "Treatment minus holdout click-through, with "
            "its 95% interval (bound=low|mid|high); absent while there is not enough data",
            ["slot", "bound"], registry=r,
        )  # fmt: skip
        self.report_srm = Gauge(
            "kairos_report_sample_ratio_p_value", "p-value of the observed holdout split "
            "against the configured share (< 0.001: mismatch)", registry=r,
        )  # fmt: skip
        self._decision_children: dict[tuple[str, str, str], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._fallback_children: dict[str, Any] = {}
        self.covis_errors = Counter(
            "kairos_api_covis_errors_total", "Co-visitation reads that failed or ran late",
            registry=r,
        )  # fmt: skip
        self.refused = Counter(
            "kairos_api_refused_total", "Requests refused by the HTTP protocol before any "
            "endpoint saw them, or connections it cut (api/server.py): head_too_large (431), "
            "target_too_long (414), head_timeout (408, or closed when nothing came), "
            "send_timeout (the client stopped reading its answers)", ["reason"], registry=r,
        )  # fmt: skip
        self.state_unreadable = Counter(
            "kairos_api_state_unreadable_total", "Session-state reads whose keys held another "
            "type than the worker writes (WRONGTYPE): answered as an unknown session, not "
            "counted against Redis", registry=r,
        )  # fmt: skip
        self.covis_reads = Counter(
            "kairos_api_covis_reads_total", "Decisions that read co-visitation from Redis on "
            "the request path (a second round trip: their items were not cached yet)",
            registry=r,
        )  # fmt: skip

    def handled(self, endpoint: str, seconds: float) -> None:
        """A decision request's handler time (kairos_api_request_seconds{endpoint})."""
        child = self._latency_children.get(endpoint)
        if child is None:
            child = self._latency_children[endpoint] = self.latency.labels(endpoint)
        child.observe(seconds)

    def decision(self, slot: str, strategy: str, fallback_reason: str) -> None:
        """Count one decision; label children cached (labels() costs microseconds a call)."""
        key = (slot, strategy, fallback_reason)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()
        if fallback_reason and strategy != "trending":
            fb = self._fallback_children.get(fallback_reason)
            if fb is None:
                fb = self._fallback_children[fallback_reason] = self.fallbacks.labels(
                    fallback_reason
                )
            fb.inc()

    def watch(
        self, in_flight: Callable[[], float], limit: Callable[[], float],
        breaker_open: Callable[[], float], loop_lag: Callable[[], float],
        cpu_share: Callable[[], float], runqueue_share: Callable[[], float],
    ) -> None:  # fmt: skip
        """Gauges read at scrape time, so the request path never sets them."""
        self.in_flight.set_function(in_flight)
        self.limit.set_function(limit)
        self.breaker_open.set_function(breaker_open)
        self.loop_lag.set_function(loop_lag)
        self.cpu_share.set_function(cpu_share)
        self.runqueue_share.set_function(runqueue_share)

    def report(self, report: dict[str, Any]) -> None:
        """Set the report gauges from a freshly built report."""
        for gauge in (self.report_personalized, self.report_fallback, self.report_lift):
            gauge.clear()
        for slot, s in report["slots"].items():
            if s["personalized_share"] is not None:
                self.report_personalized.labels(slot).set(s["personalized_share"])
            for reason, n in s["fallback_reasons"].items():
                self.report_fallback.labels(slot, reason).set(n / s["decisions"])
            lift = s["click_through"]
            if lift["status"] == "ok":
                low, high = lift["ci95"]
                for bound, value in (("low", low), ("mid", lift["absolute_lift"]), ("high", high)):
                    self.report_lift.labels(slot, bound).set(value)
        if "p_value" in report["sample_ratio"]:
            self.report_srm.set(report["sample_ratio"]["p_value"])
