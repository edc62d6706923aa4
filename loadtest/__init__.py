"""Kairos load tests and benchmarks: drives the system from outside, over HTTP and Kafka."""
