"""Prometheus and probes: every service serves /metrics, /healthz and /readyz on its own port.

/healthz answers 200 while the process runs; /readyz answers 200 once the service is connected
to Redis with its scripts loaded, and 503 while its last Redis call failed.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from http.server import ThreadingHTTPServer
from typing import Any, Generic, TypeVar, cast

from prometheus_client import REGISTRY, Counter, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from supersede.errors import ConfigError, describe

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Waits (a queue behind slow handlers, a backlog): up to minutes (with LATENCY_BUCKETS alone a
# p99 of runs waiting 48-110 s read as 5 s, the top bucket: an operator probe)
WAIT_BUCKETS = (*LATENCY_BUCKETS, 10, 30, 60, 300)


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class _Tally:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


C = TypeVar("C", _Count, _Tally)


class _LoopMetric(Collector, Generic[C]):
    """A metric of the per-run paths of one event loop: each child is a few plain numbers
    added to without a lock, read when /metrics is scraped. prometheus_client takes a lock
    per increment (a histogram: two), which with the label lookups cost an executor about 5%
    of its CPU. Only the thread of the event loop may change one (the scrape thread reads; a
    scrape may see a histogram's sum one observation ahead of its buckets). Children are never
    removed: bounded label sets only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        if not self.labelnames:  # (exposed at zero from the start, as prometheus_client does)
            self._children[()] = self._child()
        if registry is not None:
            registry.register(self)

    def _child(self) -> C:
        raise NotImplementedError

    def labels(self, *values: str) -> C:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = self._child()
        return child

    def _items(self) -> list[tuple[tuple[str, ...], C]]:
        return list(self._children.items())  # (a copy: the loop may add a child meanwhile)

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        raise NotImplementedError


class LoopCounter(_LoopMetric[_Count]):
    """A counter for one event loop's hot paths (see _LoopMetric); `name` ends in _total."""

    def _child(self) -> _Count:
        return _Count()

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._items():
            family.add_metric(list(values), child.value)
        yield family


def _go_float(bound: float) -> str:
    """A bucket bound as prometheus_client writes it ('+Inf', '0.005', '1.0')."""
    return cast(str, floatToGoString(bound))  # type: ignore[no-untyped-call]


class LoopHistogram(_LoopMetric[_Tally]):
    """A histogram for one event loop's hot paths (see _LoopMetric)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.bounds = [*(float(b) for b in buckets if b != math.inf), math.inf]
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _Tally:
        return _Tally(self.bounds)

    def observe(self, amount: float) -> None:
        self.labels().observe(amount)

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._items():
            counts, total, running = list(child.counts), child.sum, 0
            buckets = []
            for bound, count in zip(self.bounds, counts, strict=True):
                running += count
                buckets.append((_go_float(bound), running))
            family.add_metric(list(values), buckets, total)
        yield family


BUILD_INFO = Gauge(
    "supersede_build_info",
    "1, labelled with the version this process runs (`supersede --version`): a rolling "
    "upgrade is done when every process shows the new one.",
    ["version"],
)
REDIS_EVICTS = Gauge(
    "supersede_redis_evicts",
    "1 while the Redis server's maxmemory-policy evicts keys (anything but noeviction): run "
    "records, groups and stream entries may vanish; read every minute, by service.",
    ["service"],
)
REDIS_MEMORY_USED = Gauge(
    "supersede_redis_memory_used_ratio",
    "The Redis server's used_memory over its maxmemory (a cluster's fullest node; 0 when no "
    "maxmemory is set): at 1 a noeviction server refuses writes, runs wait and their leases "
    "lapse. Read every minute, by service.",
    ["service"],
)
TASK_FAILURES = Counter(
    "supersede_task_failures_total",
    "Failed runs of a service's periodic tasks (the reaper's tick, trims, the registry's "
    "refresh...), by service and task: while a task's last run failed, /readyz answers 503.",
    ["service", "task"],
)
PENDING_DELETED = Counter(
    "supersede_pending_entries_deleted_total",
    "Entries read and never acknowledged that were deleted before they were handled (on a "
    "re-read, or a take-over of a process that died): supersede trims only acknowledged "
    "entries, so something else trimmed or "
    "deleted the stream (an XADD with MAXLEN or MINID, XTRIM, XDEL) and their events or runs "
    "are lost. By service.",
    ["service"],
)
HOP_SECONDS = LoopHistogram(
    "supersede_hop_seconds",
    "Time a run spends in each hop, observed by the service at its end: inbox (published -> "
    "read by ingress), ingress (read -> request written), requests (written -> read by "
    "admission), admission (read -> assigned), assignments (assigned -> read by an executor), "
    "claim (read -> claimed), start (claimed -> handler started). Per batch where a service "
    "handles batches (the batch's oldest entry for the waits).",
    ["hop"],
    buckets=WAIT_BUCKETS,
)
_READY: dict[str, bool] = {}  # part (service name) -> ready; /readyz needs every part ready
_STOPPING: set[str] = set()  # parts told to stop: not ready, whatever their calls do meanwhile
READY = Gauge(
    "supersede_ready",
    "1 while the service is ready (started, and its Redis calls go through), 0 otherwise; as "
    "/readyz, per service of the process. Alerts read it: a service down exports nothing. "
    "Labelled with its namespace (SUPERSEDE_NAMESPACE): one deployment's ingress up must not "
    "hide another's down, in one Prometheus.",
    ["service", "supersede_namespace"],
)
SHARDS_SILENT = Gauge(
    "supersede_shards_silent",
    "Shards whose master did not answer a call in time (a cluster master gone silent: frozen, "
    "or behind a link that drops packets) and has not answered a probe since: the service "
    "leaves their calls out meanwhile, and the other shards go on. By service; 0 on one server.",
    ["service"],
)

# `*_created` series double the series count for no use on dashboards or alerts.
disable_created_metrics()  # type: ignore[no-untyped-call]


def set_ready(ready: bool, part: str = "service") -> None:
    """Services call this: True after start-up, False while Redis calls fail. `part`: the
    service, when one process runs several (`supersede serve`); /readyz answers 200 only while
    every part the process runs or expects is ready, and none is stopping."""
    ready = ready and part not in _STOPPING
    if _READY.get(part) is ready:  # (services call it after every batch: the gauge on changes)
        return
    _READY[part] = ready
    namespace = os.environ.get("SUPERSEDE_NAMESPACE", "supersede")  # (as Settings reads it)
    READY.labels(part, namespace).set(1 if ready else 0)


_FAILING: dict[str, set[str]] = {}  # part -> its components whose last try failed
_FAILING_LOCK = threading.Lock()  # (the executor's heartbeat reports from its own thread)


def report(part: str, component: str, ok: bool) -> None:
    """One component of a part (a stream reader, a periodic task, the heartbeat) went through
    or failed: the part is ready while none of its components' last try failed (one reader
    that succeeds does not hide another that fails)."""
    with _FAILING_LOCK:
        failing = _FAILING.setdefault(part, set())
        if ok:
            failing.discard(component)
        else:
            failing.add(component)
        set_ready(not failing, part)


def stopping(part: str, stops: bool = True) -> None:
    """A part was told to stop (SIGTERM): not ready from then on, while it drains (under
    `supersede serve`, ingress stopped at once and /readyz said 200 until the executor had
    drained, a probe); `stops=False` as it starts again."""
    if stops:
        _STOPPING.add(part)
        set_ready(False, part)
    else:
        _STOPPING.discard(part)


def expect_parts(*parts: str) -> None:
    """The parts a process will run, not ready until each says so (a part that starts late,
    as ingress under `supersede serve`, keeps /readyz at 503 until it is up)."""
    for part in parts:
        if part not in _READY:
            set_ready(False, part)


def is_ready() -> bool:
    states = list(_READY.values())  # (a copy: the HTTP thread reads while services write)
    return bool(states) and all(states)


class _Handler(MetricsHandler):
    registry = REGISTRY

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:  # (a probe may ask HEAD: it was 501)
        self._answer(head=True)

    def _answer(self, head: bool) -> None:
        """/metrics, /healthz and /readyz; any other path is 404 (it was the metrics, 200: a
        probe's typo, `/health`, passed while Redis was down)."""
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._plain(200, b"ok\n", head)
        elif path == "/readyz":
            ready = is_ready()
            self._plain(200 if ready else 503, b"ready\n" if ready else b"not ready\n", head)
        elif path != "/metrics":
            self._plain(404, b"not found: /metrics, /healthz and /readyz are served\n", head)
        elif head:
            self._plain(200, b"", head)
        else:
            super().do_GET()

    def _plain(self, status: int, body: bytes, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


log = logging.getLogger("supersede.metrics")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up before its answer (a probe's 1 s timeout against a paused or
        starved process) is no error: socketserver printed a traceback of several lines to
        stderr for it, not a JSON line. Anything else is one JSON line."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # (BrokenPipe, reset, aborted)
            return
        log.warning("a metrics or probe request failed",
                    extra={"error": describe(exc) if exc else "unknown"})  # fmt: skip


def serve(port: int | None, host: str = "0.0.0.0") -> None:
    """Serve /metrics, /healthz and /readyz on `host`:`port` in a daemon thread (0/None: do
    not). A port that cannot be opened is a ConfigError naming the setting."""
    if not port:
        return
    from supersede import __version__

    BUILD_INFO.labels(__version__).set(1)
    try:
        server = _Server((host, port), _Handler)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} (set --metrics-port "
            "to a free port, or 0 to disable; --metrics-host / SUPERSEDE_METRICS_HOST for the "
            "address)"
        ) from None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
