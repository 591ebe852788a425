"""Prometheus and probes: every service serves /metrics, /healthz and /readyz on its own port.

/healthz answers 200 while the process runs; /readyz answers 200 once the service is connected
to Redis with its scripts loaded, and 503 while its last Redis call failed.
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from typing import Any, TypeVar, cast

from prometheus_client import REGISTRY, Histogram, disable_created_metrics
from prometheus_client.exposition import MetricsHandler
from prometheus_client.metrics import MetricWrapperBase

from supersede.errors import ConfigError

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

HOP_SECONDS = Histogram(
    "supersede_hop_seconds",
    "Time a run spends in each hop, observed by the service at its end: inbox (published -> "
    "read by ingress), ingress (read -> request written), requests (written -> read by "
    "admission), admission (read -> assigned), assignments (assigned -> read by an executor), "
    "claim (read -> claimed), start (claimed -> handler started). Per batch where a service "
    "handles batches (the batch's oldest entry for the waits).",
    ["hop"],
    buckets=LATENCY_BUCKETS,
)
_READY: dict[str, bool] = {}  # part (service name) -> ready; /readyz needs every part ready

M = TypeVar("M", bound=MetricWrapperBase)
_CHILDREN: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}


def labelled(metric: M, *values: str) -> M:
    """`metric.labels(*values)`, kept: on a per-run path `labels()` (a lock, a tuple, a dict)
    cost an executor 5% of its CPU. Only for metrics whose labels are never removed (bounded
    label sets: every metric here)."""
    key = (metric, values)  # (the metric itself: an id could be reused by another)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*values)
    return cast(M, child)


# `*_created` series double the series count for no use on dashboards or alerts.
disable_created_metrics()  # type: ignore[no-untyped-call]


def set_ready(ready: bool, part: str = "service") -> None:
    """Services call this: True after start-up, False while Redis calls fail. `part`: the
    service, when one process runs several (`supersede serve`); /readyz answers 200 only while
    every part the process runs or expects is ready."""
    _READY[part] = ready


def expect_parts(*parts: str) -> None:
    """The parts a process will run, not ready until each says so (a part that starts late,
    as ingress under `supersede serve`, keeps /readyz at 503 until it is up)."""
    for part in parts:
        _READY.setdefault(part, False)


def is_ready() -> bool:
    states = list(_READY.values())  # (a copy: the HTTP thread reads while services write)
    return bool(states) and all(states)


class _Handler(MetricsHandler):
    registry = REGISTRY

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._plain(200, b"ok\n")
        elif path == "/readyz":
            self._plain(200, b"ready\n") if is_ready() else self._plain(503, b"not ready\n")
        else:
            super().do_GET()

    def _plain(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


def serve(port: int | None, host: str = "0.0.0.0") -> None:
    """Serve /metrics, /healthz and /readyz on `host`:`port` in a daemon thread (0/None: do
    not). A port that cannot be opened is a ConfigError naming the setting."""
    if not port:
        return
    try:
        server = ThreadingHTTPServer((host, port), _Handler)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} (set --metrics-port "
            "to a free port, or 0 to disable; --metrics-host / SUPERSEDE_METRICS_HOST for the "
            "address)"
        ) from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
