"""The ledger every chaos handler appends to: one JSON line per handler start and end.

A line is written with one `os.write` on a file opened with O_APPEND, so lines from many
processes and threads never interleave. The file (not Redis) holds it, so a server crash loses
no line. `pid` is the executor's (a step in process isolation runs in a worker process).
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

_fd: int | None = None


def write(event: str, **fields: Any) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["CHAOS_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = int(os.environ.get("CHAOS_EXECUTOR_PID") or os.getpid())  # see chaos/pool_c.py
    line = orjson.dumps({"ev": event, "pid": pid, "t": time.time(), **fields})
    os.write(_fd, line + b"\n")


def read(path: str) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]
