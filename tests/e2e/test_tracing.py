"""OpenTelemetry traces (issue 16, item 2): one trace per run from the publish through ingress,
admission and the executor down to the handler's steps, continuing the producer's
`traceparent`; a superseded run's cancel links to the run that superseded it. The services run
as processes with the console exporter, and the test reads the spans they print."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from supersede.client import wait_for_run
from supersede.keys import Keys
from supersede.protocol import Inbox, RunRecord
from supersede.tracing import wanted
from tests.support import APP, APP_WORKFLOWS, System, eventually, records

pytest.importorskip("opentelemetry.sdk.trace", reason="the tracing extra is not installed")

PRODUCER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_SPAN = "00f067aa0ba902b7"


def spans_printed(path: Path) -> list[dict[str, Any]]:
    """The spans a console exporter wrote to a file (JSON objects one after another)."""
    text, out, at = path.read_text(), [], 0
    decoder = json.JSONDecoder()
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return out
        span, at = decoder.raw_decode(text, at)
        out.append(span)


def _id(hex_id: str | None) -> str:
    return (hex_id or "").removeprefix("0x")


async def test_a_run_is_one_trace_through_every_hop_and_a_cancel_links_to_the_newer_run(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    env = {**system.env, "OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    outs = {name: tmp_path / f"{name}.spans" for name in ("admission", "executor", "ingress")}
    args = {"admission": ["--block-ms", "100"], "executor": [APP],
            "ingress": ["--block-ms", "100"]}  # fmt: skip
    procs = {}
    for name in ("admission", "executor"):
        procs[name] = _start(name, args[name], env, outs[name], system)

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

    await eventually(registered, timeout=30)
    procs["ingress"] = _start("ingress", args["ingress"], env, outs["ingress"], system)
    inbox = keys.events_stream
    # Any Redis client: a raw XADD whose traceparent continues the producer's trace.
    producer = f"00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01".encode()
    await redis.xadd(inbox, {Inbox.NAME: b"chat.message", Inbox.ID: b"older",
                             Inbox.DATA: b'{"userId": "t", "sleep": 30}',
                             Inbox.TRACEPARENT: producer})  # fmt: skip

    async def started(state: str = "R") -> bool:
        return any(r["st"] == state for r in (await records(redis, keys)).values())

    await eventually(started)
    await redis.xadd(inbox, {Inbox.NAME: b"chat.message", Inbox.ID: b"newer",
                             Inbox.DATA: b'{"userId": "t"}'})  # fmt: skip

    async def settled() -> bool:
        states = sorted(str(r["st"]) for r in (await records(redis, keys)).values())
        return states == ["C", "S"]

    await eventually(settled, timeout=30)
    runs = {rid: RunRecord.from_map(rid, r) for rid, r in (await records(redis, keys)).items()}
    older = next(r for r in runs.values() if r.state.name == "CANCELLED")
    newer = next(r for r in runs.values() if r.state.name == "SUCCEEDED")
    assert older.cancelled_by == newer.id
    assert (await wait_for_run(redis, newer.id, 5, namespace=keys.namespace)).state == "SUCCEEDED"
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        assert proc.wait(30) == 0
    by_service = {name: spans_printed(path) for name, path in outs.items()}
    spans = [s for found in by_service.values() for s in found]

    def of(name: str, run: str) -> dict[str, Any]:
        [span] = [
            s for s in spans if s["name"] == name and s["attributes"].get("supersede.run_id") == run
        ]
        return span

    # The older run: the producer's trace, every hop under its ingress span.
    ingress = of("supersede.ingress", older.id)
    assert _id(ingress["context"]["trace_id"]) == PRODUCER_TRACE
    assert _id(ingress["parent_id"]) == PRODUCER_SPAN
    root = _id(ingress["context"]["span_id"])
    for name in ("supersede.admission", "supersede.run", "supersede.cancel"):
        span = of(name, older.id)
        assert _id(span["context"]["trace_id"]) == PRODUCER_TRACE, name
        assert _id(span["parent_id"]) == root, name
    run_span = of("supersede.run", older.id)
    assert run_span["attributes"]["supersede.outcome"] == "CANCELLED"
    steps = [s for s in spans if _id(s["parent_id"]) == _id(run_span["context"]["span_id"])]
    assert [s["name"] for s in steps] == ["supersede.step reply"]

    # The newer run: a trace of its own (no traceparent), its two steps under its run span.
    newer_ingress = of("supersede.ingress", newer.id)
    newer_trace = _id(newer_ingress["context"]["trace_id"])
    assert newer_trace != PRODUCER_TRACE and newer_ingress["parent_id"] is None
    newer_run = of("supersede.run", newer.id)
    assert _id(newer_run["context"]["trace_id"]) == newer_trace
    assert newer_run["attributes"]["supersede.outcome"] == "SUCCEEDED"
    newer_id = _id(newer_run["context"]["span_id"])
    newer_steps = sorted(s["name"] for s in spans if _id(s["parent_id"]) == newer_id)
    assert newer_steps == ["supersede.step reply", "supersede.step store"]

    # The cancel links the older run to the run that superseded it (its ingress span), both
    # in admission's cancel span and on the older run's executor span.
    target = (newer_trace, _id(newer_ingress["context"]["span_id"]))
    cancel = of("supersede.cancel", older.id)
    assert cancel["attributes"]["supersede.cancelled_by"] == newer.id
    assert cancel["attributes"]["supersede.reason"] == "superseded"
    for span in (cancel, run_span):
        linked = [(_id(x["context"]["trace_id"]), _id(x["context"]["span_id"]))
                  for x in span["links"]]  # fmt: skip
        assert linked == [target]
    # Each service printed only its own spans.
    assert {s["name"] for s in by_service["ingress"]} == {"supersede.ingress"}
    assert {s["name"] for s in by_service["admission"]} == {"supersede.admission",
                                                            "supersede.cancel"}  # fmt: skip
    assert {s["resource"]["attributes"]["service.name"] for s in by_service["executor"]} == {
        "supersede-executor"
    }


def _start(
    name: str, args: list[str], env: dict[str, str], out: Path, system: System
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "supersede", name, *args, "--metrics-port", "0"]
    with out.open("wb") as stdout:
        proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=system.stderr)
    system.procs.append(proc)
    return proc


def test_tracing_is_off_unless_the_environment_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert wanted() == []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert wanted() == ["otlp"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert wanted() == []
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp_proto_grpc, console")
    assert wanted() == ["otlp_grpc", "console"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert wanted() == ["console"]
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert wanted() == []
    assert os.environ["OTEL_TRACES_EXPORTER"] == "console"


def _without_the_otlp_exporter(
    env: dict[str, str], tmp_path: Path, blocked: str = "opentelemetry.exporter.otlp"
) -> dict[str, str]:
    """`env` for a process that cannot import the OTLP exporters (`make install` has the HTTP
    one, as README "Tracing" needs): an install without them, as a user's may be (or without
    what else `blocked` names: the SDK)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n\n\nclass _NoOtlp:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.startswith({blocked!r}):\n"
        "            raise ImportError(name)\n\n\nsys.meta_path.insert(0, _NoOtlp())\n"
    )
    paths = [str(tmp_path), *filter(None, [env.get("PYTHONPATH")])]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


@pytest.mark.parametrize(
    ("exporter", "named", "blocked"),
    [("zipkin", "use otlp, console or none", "opentelemetry.exporter.otlp"),
     ("otlp", "pip install", "opentelemetry.exporter.otlp"),
     # (without the SDK an unknown exporter was "the SDK is not installed", a newcomer probe)
     ("zipkin", "use otlp, console or none", "opentelemetry.sdk")],
)  # fmt: skip
def test_a_service_refuses_traces_it_cannot_export_in_one_line(
    system: System, exporter: str, named: str, blocked: str, tmp_path: Path
) -> None:
    """Before it connects anywhere: the variable to fix, or the package to install."""
    env = {**_without_the_otlp_exporter(system.env, tmp_path, blocked),
           "OTEL_TRACES_EXPORTER": exporter,
           "SUPERSEDE_REDIS_URL": "redis://127.0.0.1:1/0"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "supersede", "admission", "--metrics-port", "0"],
                          env=env, capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    [line] = [x for x in done.stderr.decode().splitlines() if x.startswith("supersede:")]
    assert "OTEL_TRACES_EXPORTER" in line and named in line and "Redis" not in line


def test_an_otlp_endpoint_alone_without_its_exporter_only_warns(
    system: System, tmp_path: Path
) -> None:
    """Platforms set OTEL_EXPORTER_OTLP_ENDPOINT for every process: with the SDK installed but
    not the OTLP exporter, the service refused to start, naming OTEL_TRACES_EXPORTER=otlp, a
    variable nobody set. It warns once and runs without traces (here it then stops at the
    unreachable server, which shows it went past tracing)."""
    env = {k: v for k, v in _without_the_otlp_exporter(system.env, tmp_path).items()
           if not k.startswith("OTEL_")}  # fmt: skip
    env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.invalid:4318",
            "SUPERSEDE_REDIS_URL": "redis://127.0.0.1:1/0"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "supersede", "admission", "--metrics-port", "0"],
                          env=env, capture_output=True, timeout=60)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and "cannot reach Redis" in err.splitlines()[-1], err
    assert "an OTLP endpoint is set but opentelemetry-exporter-otlp-proto-http" in err


@pytest.mark.parametrize(
    ("variable", "value"),
    [("OTEL_TRACES_SAMPLER", "bogus"), ("OTEL_BSP_SCHEDULE_DELAY", "abc"),
     ("OTEL_RESOURCE_ATTRIBUTES", "garbage"), ("OTEL_TRACES_SAMPLER_ARG", "abc"),
     # (the SDK does not strip a sampler's name; it refuses these in a traceback)
     ("OTEL_TRACES_SAMPLER", "traceidratio "), ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
     ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096"),
     # the OTLP exporter's (an observability probe): headers dropped with a warning, so every
     # export went without its credentials; a timeout replaced; http/json sent as protobuf
     # (a header is a credential: `key:token` is refused without quoting it, a probe)
     ("OTEL_EXPORTER_OTLP_HEADERS", "x-team:SECRET-token"), ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc"),
     ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
     ("OTEL_EXPORTER_OTLP_ENDPOINT", "not-a-url")],
)  # fmt: skip
def test_a_tracing_setting_the_sdk_would_ignore_is_refused_in_one_line(
    system: System, variable: str, value: str
) -> None:
    """The SDK only logs a warning (one as a traceback in a log line) and goes on sampling
    or batching otherwise than asked: the service refuses to start, naming the variable."""
    env = {k: v for k, v in system.env.items() if not k.startswith("OTEL_")}
    exporter = "otlp" if variable.startswith("OTEL_EXPORTER_OTLP") else "console"
    env |= {"OTEL_TRACES_EXPORTER": exporter, variable: value,
            "SUPERSEDE_REDIS_URL": "redis://127.0.0.1:1/0"}  # fmt: skip
    if variable == "OTEL_TRACES_SAMPLER_ARG":
        env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
    done = subprocess.run([sys.executable, "-m", "supersede", "admission", "--metrics-port", "0"],
                          env=env, capture_output=True, timeout=60)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("supersede: ") and variable in last and "Redis" not in last, err
    assert "Traceback" not in err and "SECRET" not in err


async def test_traces_reach_an_otlp_collector_over_http(
    redis: Redis, keys: Keys, system: System
) -> None:
    """README "Tracing" as written, after `make install`: OTEL_TRACES_EXPORTER=otlp and an
    endpoint send the spans to a collector over HTTP (the dev tools lacked the exporter: the
    service refused to start, exit 2; an observability probe)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{collector.server_port}"
        system.env = {
            **system.env,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        }
        await system.pipeline(redis, keys, 1)
        await redis.xadd(keys.events_stream, {Inbox.NAME: b"work.item", Inbox.DATA: b"{}"})

        async def exported() -> bool:
            return any(p == "/v1/traces" and b"supersede-executor" in b for p, b in received)

        await eventually(exported, timeout=30)
    finally:
        collector.shutdown()
        collector.server_close()
