"""Kairos stream engine: clickstream events from Kafka to per-session interest state in Redis."""

__version__ = "0.1.0"
