"""Structured logs: one JSON object a line on stderr."""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from typing import Any, TextIO

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from supersede.errors import describe, message_of_text

_RESERVED = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        body.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:  # (a failed pipeline's command by its number: its arguments are
            # event data and outputs, written to the logs with each outage's first traceback)
            body["exc"] = message_of_text(self.formatException(record.exc_info))
        return orjson.dumps(body, default=str).decode()


# The same failure logged again within this many seconds is counted, not written; its
# traceback is written at most once in TRACE_EVERY (a server down for an hour made each
# service write a traceback every 0.25-0.5 s: 1.8 MB per 25 s for four services).
REPEAT_EVERY = 5.0
_NUMBERS = re.compile(r"\d+")
TRACE_EVERY = 300.0


# A lost or refused connection, a timeout: one outage, whatever the client says of it.
_LINK_LOST = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,  # (asyncio's too)
)


def kind_of(exc: BaseException) -> str:
    """The kind of a failure, for a sampled line's key (`Sampled.due`): a lost or refused
    connection or a timeout is one, "link lost", whatever the client says of each (under
    `CLIENT KILL` "Connection closed." and "Connection lost" were two lines every 5 s, an
    operator's probe); another failure its one line (`describe`)."""
    return "link lost" if isinstance(exc, _LINK_LOST) else describe(exc)


class Repeats(logging.Filter):
    """Collapses a failure that repeats (same logger, message, exception class and text): one
    line per REPEAT_EVERY with `repeats` (how many were not written since), the traceback only
    the first time in TRACE_EVERY (later lines carry `error`, the exception's one line)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[str, ...], list[float]] = {}  # [written, count, trace]

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not record.name.startswith("supersede"):
            return True  # (user code's logs are its own)
        try:
            text = message_of_text(str(exc))[:200]
            # (numbers aside: a refused command quotes its arguments, timestamps among them,
            # and a failure repeated each second was another line each time)
            same = _NUMBERS.sub("#", text)
            kind = type(exc).__name__
            if isinstance(exc, _LINK_LOST):
                # one outage: its errors alternate as the client meets it ("Connection closed
                # by server.", "Error while reading ... (104 ...)", a timeout), and each was a
                # line of its own every 5 s (a probe: 34 lines per executor for a 12 s outage)
                same = kind = "link lost"
            # the message with its arguments and extra fields (a run id, a task's name): the
            # same failure of another run is another line
            extra = sorted(
                (k, repr(v)[:100]) for k, v in vars(record).items() if k not in _RESERVED
            )
            key = (record.name, record.getMessage(), kind, same, repr(extra))
        except Exception:  # (an exception whose str() fails: written as it comes)
            return True
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is None:
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[key] = [now, 0, now]
            return True
        if now - seen[0] < REPEAT_EVERY:
            seen[1] += 1
            return False
        record.repeats = int(seen[1])
        seen[0], seen[1] = now, 0
        if now - seen[2] < TRACE_EVERY:
            record.exc_info = None
            record.error = f"{type(exc).__name__}: {text}"
        else:
            seen[2] = now
        return True


class Sampled:
    """A line that comes once per input (a dead letter per bad event: a flood of hostile events
    wrote a line each, 165 bytes): written for the first of each kind in REPEAT_EVERY, with
    `repeats`, how many of that kind were not written since (the metrics count them all)."""

    def __init__(self, every: float = REPEAT_EVERY) -> None:
        self.every = every
        self._seen: dict[Any, list[float]] = {}  # kind -> [written at, not written since]

    def due(self, kind: Any) -> int | None:
        """None: not to be written; else how many of `kind` were not written before it."""
        if isinstance(kind, str):  # (numbers aside: a timestamp in an error is the same one)
            kind = _NUMBERS.sub("#", kind)
        now = time.monotonic()
        seen = self._seen.get(kind)
        if seen is None or now - seen[0] >= self.every:
            if seen is None and len(self._seen) > 1000:
                self._seen.clear()
            self._seen[kind] = [now, 0]
            return int(seen[1]) if seen else 0
        seen[1] += 1
        return None


def _warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A Python warning (a library's deprecation, a step's own `warnings.warn`) as a log line:
    it was plain text among the JSON lines, which a log pipeline reading JSON dropped or
    mangled (a workflow-author probe)."""
    logging.getLogger("py.warnings").warning(
        "%s: %s", category.__name__, message, extra={"where": f"{filename}:{lineno}"}
    )


def setup(level: str | int = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(Repeats())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    warnings.showwarning = _warning
