"""Handler bodies of the chaos workflows: sleep for the event's `ms` (async, or a sync loop that
polls `ctx.cancelled`, or a process-isolated step that may ignore it), writing the ledger at
start and end."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from chaos import ledger
from supersede.workflow import Context


def _fields(ctx: Context) -> dict[str, object]:
    return {"run": ctx.run_id, "attempt": ctx.attempt, "wf": ctx.workflow, "key": ctx.key}


async def sleep_async(ctx: Context) -> None:
    ledger.write("start", **_fields(ctx))
    try:
        await asyncio.sleep(int(ctx.input["ms"]) / 1000)
    except asyncio.CancelledError:
        ledger.write("end", out="cancelled", **_fields(ctx))
        raise
    ledger.write("end", out="done", **_fields(ctx))


def sleep_sync(ctx: Context) -> None:
    ledger.write("start", **_fields(ctx))
    deadline = time.monotonic() + int(ctx.input["ms"]) / 1000
    while time.monotonic() < deadline:
        if ctx.cancelled:
            ledger.write("end", out="cancelled", **_fields(ctx))
            return
        time.sleep(0.01)
    ledger.write("end", out="done", **_fields(ctx))


def sleep_process(ctx: Context) -> None:
    """A step in process isolation: `stubborn` 0 honours the cancel flag, 1 ignores it (so
    SIGTERM ends it), 2 ignores SIGTERM too (so SIGKILL ends it). A watcher process writes the
    end line when the step's process dies before returning."""
    fields = _fields(ctx)
    stubborn = int(ctx.input.get("stubborn", 0))
    ledger.write("start", **fields)
    alive = _watch_death(fields)
    if stubborn == 2:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        deadline = time.monotonic() + int(ctx.input["ms"]) / 1000
        while time.monotonic() < deadline:
            if ctx.cancelled and not stubborn:
                ledger.write("end", out="cancelled", **fields)
                return
            time.sleep(0.01)
        ledger.write("end", out="done", **fields)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.write(alive[1], b"x")  # returned: the watcher writes nothing
        os.close(alive[1])
        os.waitpid(alive[0], 0)


def _watch_death(fields: dict[str, object]) -> tuple[int, int]:
    """Fork a watcher holding the read end of a pipe: EOF without a byte means this process
    died mid-step (SIGTERM, SIGKILL, its executor gone), and the watcher writes the end line
    then. (watcher pid, write end)"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the watcher: no Python-level cleanup, only the read and the ledger line
        try:
            os.close(w)
            if not os.read(r, 1):
                ledger.write("end", out="killed", **fields)
        finally:
            os._exit(0)
    os.close(r)
    return pid, w
