"""Prometheus helpers: every service serves the default registry on its own port."""

from __future__ import annotations

from prometheus_client import start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def serve(port: int | None) -> None:
    """Serve /metrics on `port` (0 or None: do not serve)."""
    if port:
        start_http_server(port, addr="0.0.0.0")
