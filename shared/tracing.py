"""OpenTelemetry traces: optional, and off unless asked for.

Tracing needs the SDK (`pip install 'supersede[tracing]'`) and one of the standard variables:
`OTEL_TRACES_EXPORTER` (`otlp`, `console`; `none` keeps it off) or an OTLP endpoint
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). `OTEL_SDK_DISABLED=true`
turns it off; `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_BSP_*` work as usual.

Each run is one trace, or part of the producer's: an inbox entry may carry a W3C `traceparent`
field, which the ingress span of each of its runs continues. That span's context travels with
the run (request field and record field `tp`, the claim reply, the cancel message of a run it
supersedes), so admission and the executor add their spans to the same trace, the executor's
step spans under its run span, and a cancelled run's spans link to the run that superseded it.
With tracing off no record grows; request entries carry an empty `tp`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from typing import Any

from supersede.errors import ConfigError

log = logging.getLogger("supersede")
_lock = threading.Lock()
_ALIASES = {"otlp_proto_http": "otlp", "otlp_proto_grpc": "otlp_grpc"}
EXPORTERS = ("otlp", "otlp_grpc", "console")  # (after _ALIASES; `none` is none of them)
_tracer: Any = None
_provider: Any = None
_configured = False


def wanted() -> list[str]:
    """The exporters the environment asks for ([] when tracing is off)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not names:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    out = [_ALIASES.get(n, n) for n in (x.strip().lower() for x in names.split(",")) if n]
    return [] if out == ["none"] else [n for n in out if n != "none"]


def setup(service: str) -> Any:
    """The tracer of this process, set up once from the environment; None when tracing is off.

    Raises ConfigError (one line naming what to fix) when the variables ask for traces the
    installed packages cannot export."""
    global _tracer, _provider, _configured
    with _lock:
        if _configured:
            return _tracer
        exporters = wanted()
        missing = _missing_for_otlp() if exporters else None
        if missing and not os.environ.get("OTEL_TRACES_EXPORTER"):
            # Only an OTLP endpoint (platforms set it for every process): no traces without
            # the SDK or its OTLP exporter, said once; an exporter asked for by name is refused
            # below instead.
            log.warning(f"an OTLP endpoint is set but {missing} is not installed: no traces "
                        "(pip install 'supersede[tracing]')")  # fmt: skip
            exporters = []
        if exporters:
            unknown = [n for n in exporters if n not in EXPORTERS]
            if unknown:  # (before the SDK's check: without it, "not installed" misled)
                raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {unknown[0]!r}; use "
                                  "otlp, console or none")  # fmt: skip
            check_settings()
            if {"otlp", "otlp_grpc"} & set(exporters):
                check_otlp_settings()
            _provider = _make_provider(service, exporters)
            _tracer = _provider.get_tracer("supersede")
            atexit.register(shutdown)
        _configured = True
        return _tracer


_OTLP = ("OTEL_EXPORTER_OTLP_", "OTEL_EXPORTER_OTLP_TRACES_")
_PROTOCOLS = ("http/protobuf", "grpc")  # (the Python exporters': no http/json)


def check_otlp_settings() -> None:
    """The OTLP exporter's settings it would only warn about and then drop (headers: the
    credentials of every export), replace (a timeout), or ignore (http/json, sent as protobuf;
    an endpoint that is no URL): a ConfigError naming the variable."""
    env = os.environ
    for prefix in _OTLP:
        name = f"{prefix}HEADERS"
        headers = env.get(name, "").strip()
        pairs = [h for h in headers.split(",") if h.strip()]
        bad = [h for h in pairs if "=" not in h or not h.split("=", 1)[0].strip()]
        if bad:  # (its text not quoted: a header is a credential, `key:token` a usual slip)
            raise ConfigError(
                f"{name} must be key=value pairs separated by commas; pair "
                f"{pairs.index(bad[0]) + 1} of {len(pairs)} has no '=' or no key"
            )
        name = f"{prefix}TIMEOUT"
        timeout = env.get(name, "").strip()
        if timeout and not _non_negative(timeout):
            raise ConfigError(f"{name} must be a number of seconds, not {timeout!r}")
        name = f"{prefix}PROTOCOL"
        protocol = env.get(name, "").strip()
        if protocol and protocol not in _PROTOCOLS:
            raise ConfigError(f"{name} must be http/protobuf or grpc, not {protocol!r}")
        name = f"{prefix}ENDPOINT"
        endpoint = env.get(name, "").strip()
        if endpoint and not _is_url(endpoint):
            raise ConfigError(
                f"{name} must be a URL (http://collector:4318), not {_without_userinfo(endpoint)!r}"
            )


def _without_userinfo(text: str) -> str:
    """An endpoint as it may be printed: credentials in it (`user:pw@`) replaced by `***`."""
    head, at, host = text.rpartition("@")
    if not at:
        return text
    scheme, sep, _ = head.partition("://")
    return f"{scheme}{sep}***@{host}" if sep else f"***@{host}"


def _non_negative(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


def _is_url(text: str) -> bool:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


_SAMPLERS = {"always_on", "always_off", "traceidratio", "parentbased_always_on",
             "parentbased_always_off", "parentbased_traceidratio"}  # fmt: skip
_COUNTS = ("OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_EXPORT_TIMEOUT", "OTEL_BSP_MAX_QUEUE_SIZE",
           "OTEL_BSP_MAX_EXPORT_BATCH_SIZE")  # fmt: skip
_BSP_DEFAULTS = dict(zip(_COUNTS, (5000, 30000, 2048, 512), strict=True))  # (the SDK's)


def check_settings() -> None:
    """The OTEL_* values the SDK would only warn about, then ignore or replace (traces sampled
    otherwise than asked, spans with attributes missing): a ConfigError naming the variable."""
    env = os.environ
    sampler = env.get("OTEL_TRACES_SAMPLER", "").lower()  # (the SDK does not strip it either)
    if sampler and sampler not in _SAMPLERS:
        raise ConfigError(
            f"OTEL_TRACES_SAMPLER: unknown sampler {sampler!r}; use one of "
            + ", ".join(sorted(_SAMPLERS))
        )
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if arg and sampler.endswith("traceidratio"):
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1, not {arg!r}")
    numbers = {}
    for name in _COUNTS:
        value = env.get(name, "").strip()
        if value and not (value.isdigit() and (int(value) > 0 or name == _COUNTS[1])):
            raise ConfigError(
                f"{name} must be a whole number above 0 (ms, or spans), not {value!r}"
            )
        numbers[name] = int(value) if value else _BSP_DEFAULTS[name]
    if numbers[_COUNTS[3]] > numbers[_COUNTS[2]]:  # (the SDK raises on it, in a traceback)
        raise ConfigError(
            f"{_COUNTS[3]} ({numbers[_COUNTS[3]]}) must not be above {_COUNTS[2]} "
            f"({numbers[_COUNTS[2]]})"
        )
    attributes = env.get("OTEL_RESOURCE_ATTRIBUTES", "").strip()
    bad = [a for a in attributes.split(",") if a.strip() and "=" not in a] if attributes else []
    if bad:
        raise ConfigError(
            f"OTEL_RESOURCE_ATTRIBUTES must be key=value pairs separated by commas, not {bad[0]!r}"
        )


def _missing_for_otlp() -> str | None:
    """What an OTLP export lacks here (the SDK, or the exporter of the configured protocol)."""
    try:
        import opentelemetry.sdk.trace
    except ImportError:
        return "the OpenTelemetry SDK"
    grpc = _protocol().startswith("grpc")
    try:
        if grpc:
            import opentelemetry.exporter.otlp.proto.grpc.trace_exporter
        else:
            import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
    except ImportError:
        return "opentelemetry-exporter-otlp-proto-" + ("grpc" if grpc else "http")
    return None


def _protocol() -> str:
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )


def _make_provider(service: str, exporters: list[str]) -> Any:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise ConfigError(
            "OTEL_TRACES_EXPORTER (or an OTLP endpoint) asks for traces, but the OpenTelemetry "
            "SDK is not installed: pip install 'supersede[tracing]', or unset the variable"
        ) from None
    defaults = (
        {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"supersede-{service}"}
    )
    provider = TracerProvider(resource=Resource.create(defaults))
    for name in exporters:
        if name == "console":
            exporter: Any = ConsoleSpanExporter()
        elif name in ("otlp", "otlp_grpc"):
            exporter = _otlp_exporter(name)
        else:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; use otlp, console or none"
            )
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _otlp_exporter(name: str) -> Any:
    grpc = name == "otlp_grpc" or _protocol().startswith("grpc")
    try:
        if grpc:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
    except ImportError:
        package = "opentelemetry-exporter-otlp-proto-" + ("grpc" if grpc else "http")
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={name} needs {package}: pip install {package} "
            "(or set OTEL_TRACES_EXPORTER=console)"
        ) from None
    return OTLPSpanExporter()


def flush() -> None:
    """Export what is buffered now (a service that stops; the process may go on)."""
    if _provider is not None:
        _provider.force_flush()


def shutdown() -> None:
    """Export what is buffered and stop (a service's last step)."""
    global _tracer, _provider, _configured
    with _lock:
        if _provider is not None:
            _provider.shutdown()
        _tracer, _provider, _configured = None, None, False


TRACEPARENT_MAX = 512  # characters: OpenTelemetry's propagator refuses longer ones, logging


def context_of(traceparent: bytes | str | None) -> Any:
    """The OpenTelemetry context a `traceparent` value names, or None (absent or invalid)."""
    if not traceparent:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    value = (
        traceparent.decode("ascii", "replace") if isinstance(traceparent, bytes) else traceparent
    )
    if len(value) > TRACEPARENT_MAX:  # (the propagator logs a line for each one: a producer's
        return None  # flood of them would decide the log volume)
    ctx = TraceContextTextMapPropagator().extract({"traceparent": value})  # (invalid: no parent)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def link_to(traceparent: bytes | str | None) -> Any:
    """A span link to the span a `traceparent` names, or None."""
    ctx = context_of(traceparent)
    if ctx is None:
        return None
    from opentelemetry import trace

    return trace.Link(trace.get_current_span(ctx).get_span_context())


def traceparent_of(span: Any) -> str:
    """The W3C `traceparent` value of a span ('' for a span that is not recording)."""
    sc = span.get_span_context()
    if not sc.is_valid:
        return ""
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


_api: Any = None  # the opentelemetry.trace module, False when it is not installed


def current_traceparent() -> str:
    """The `traceparent` of the caller's current span, when the OpenTelemetry API is installed
    and a span is current ('' otherwise): what `publish` puts in the inbox entry."""
    global _api
    if _api is None:
        try:
            from opentelemetry import trace

            _api = trace
        except ImportError:
            _api = False
    return traceparent_of(_api.get_current_span()) if _api else ""


def current(span: Any) -> Any:
    """Make `span` the current one in a `with` block (nothing when it is None)."""
    if span is None:
        return contextlib.nullcontext()
    from opentelemetry import trace

    return trace.use_span(span, end_on_exit=False)


def step(tracer: Any, name: str, attempt: int) -> Any:
    """A span around one attempt of a step, a child of the current (run) span; nothing without
    a tracer. An exception the step raises is recorded on it."""
    if tracer is None:
        return contextlib.nullcontext()
    return tracer.start_as_current_span(
        f"supersede.step {name}", attributes={"supersede.step": name, "supersede.try": attempt}
    )


def cancelled(span: Any, by_traceparent: bytes | str) -> None:
    """Mark a run span cancelled, linked to the span of the run that superseded it."""
    span.add_event("cancel requested")
    link = link_to(by_traceparent)
    if link is not None:
        span.add_link(link.context, {"supersede.link": "superseded_by"})


def end_run(span: Any, outcome: str, error: str) -> None:
    """End a run span with its outcome (an error status when it FAILED)."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("supersede.outcome", outcome)
    if outcome == "FAILED":
        span.set_status(Status(StatusCode.ERROR, error.splitlines()[-1] if error else ""))
    span.end()


def kind(name: str) -> Any:
    """The SpanKind named `name` (PRODUCER, CONSUMER, INTERNAL ...)."""
    from opentelemetry.trace import SpanKind

    return SpanKind[name]


def ns(ms: float) -> int:
    """Epoch ms -> the epoch ns OpenTelemetry takes as a span's start or end time."""
    return int(ms * 1_000_000)
