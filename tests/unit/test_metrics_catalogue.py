"""docs/metrics.md lists exactly the metrics the three services expose."""

from __future__ import annotations

import re

from tests.support import REPO, exposed

CATALOGUE = REPO / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(supersede_[a-z_]+)` \| (counter|gauge|histogram) \|", re.MULTILINE)


def test_the_catalogue_matches_the_exposition() -> None:
    documented = dict(ROW.findall(CATALOGUE.read_text()))
    assert documented == exposed()


def test_metric_names_follow_the_conventions() -> None:
    for name, kind in exposed().items():
        assert name.startswith("supersede_")
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name


def test_dead_letter_reasons_are_exported_from_the_start() -> None:
    """A counter's first sample is what rate() and increase() count from: a burst of 2,000 bad
    events that made the series counted for nothing, and SupersedeDeadLettersRising stayed
    quiet (an operator probe). Each reason ingress gives is exported before any letter: the
    reasons its code and the key expressions name (`repeated_field` was left out, an audit)."""
    from prometheus_client import REGISTRY

    from supersede.protocol import Reason
    from supersede.services.ingress import metrics  # noqa: F401

    named = set()
    for path in [*(REPO / "services" / "ingress").glob("*.py"), REPO / "shared" / "keyexpr.py"]:
        named |= set(re.findall(r"\bReason\.([A-Z_]+)\b", path.read_text()))
    assert {"TOO_LARGE", "REPEATED_FIELD", "KEY_ERROR", "MAX_RUNS_ERROR"} <= named, named
    for name in sorted(named):
        labels = {"reason": Reason[name].value}
        sample = REGISTRY.get_sample_value("supersede_ingress_dead_letters_total", labels)
        assert sample is not None, name


def test_each_process_exports_the_version_it_runs() -> None:
    """A rolling upgrade is done when every process shows the new version (an upgrade probe:
    no log line, metric or command told which build a process ran)."""
    import urllib.request

    from supersede import __version__, metrics
    from supersede.server import free_port

    port = free_port()
    metrics.serve(port, "127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    assert f'supersede_build_info{{version="{__version__}"}} 1.0' in body


def test_the_wait_histograms_reach_minutes() -> None:
    """A queue behind slow handlers (waits of 48-110 s): the queue-wait and hop histograms
    topped out at 5 s, and their p99 panel read a flat 5 (an operator probe)."""
    from prometheus_client import REGISTRY, generate_latest

    from supersede.metrics import HOP_SECONDS
    from supersede.services.executor import metrics

    metrics.QUEUE_WAIT_SECONDS.observe(90)
    HOP_SECONDS.labels("assignments").observe(90)
    body = generate_latest(REGISTRY).decode()
    for series in ('supersede_executor_queue_wait_seconds_bucket{le="300.0"}',
                   'supersede_hop_seconds_bucket{hop="assignments",le="300.0"}'):  # fmt: skip
        assert series in body, series
