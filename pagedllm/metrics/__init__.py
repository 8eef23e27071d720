"""Metrics: the Prometheus exporter of the engine's stats and request latencies."""
