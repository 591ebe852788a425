"""Handler bodies of the chaos workflows: sleep for the event's `ms` (async, or a sync loop that
polls `ctx.cancelled`, or a process-isolated step that may ignore it), writing the ledger at
start and end."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import time

from chaos import ledger
from supersede.workflow import Context


def _fields(ctx: Context) -> dict[str, object]:
    return {"run": ctx.run_id, "attempt": ctx.attempt, "wf": ctx.workflow, "key": ctx.key}


def _started(ctx: Context) -> None:
    """The start line, with when the attempt was claimed: its lease runs from the claim, and a
    process-isolated step may start long after it (its worker is busy being spawned)."""
    ledger.write("start", claimed=ctx.claimed_at, **_fields(ctx))


async def sleep_async(ctx: Context) -> None:
    _started(ctx)
    try:
        await asyncio.sleep(int(ctx.input["ms"]) / 1000)
    except asyncio.CancelledError:
        ledger.write("end", out="cancelled", **_fields(ctx))
        raise
    ledger.write("end", out="done", **_fields(ctx))


def sleep_sync(ctx: Context) -> None:
    _started(ctx)
    deadline = time.monotonic() + int(ctx.input["ms"]) / 1000
    while time.monotonic() < deadline:
        if ctx.cancelled:
            ledger.write("end", out="cancelled", **_fields(ctx))
            return
        time.sleep(0.01)
    ledger.write("end", out="done", **_fields(ctx))


def sleep_process(ctx: Context) -> None:
    """A step in process isolation: `stubborn` 0 honours the cancel flag, 1 ignores it (so
    SIGTERM ends it), 2 ignores SIGTERM too (so SIGKILL ends it).

    It holds an exclusive lock on a file of its key for as long as its process lives (the
    kernel lets go when the process ends, however it ends). A run that finds the lock held by
    another run of its key writes an `overlap` line: two handlers of one strict group were
    executing at once, whatever the clocks say."""
    fields = _fields(ctx)
    stubborn = int(ctx.input.get("stubborn", 0))
    _started(ctx)
    held = _hold(str(ctx.key), f"{ctx.run_id} {ctx.attempt}", fields)
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
        os.close(held)  # (after the end line: the next run of the key may start now)


def _hold(key: str, holder: str, fields: dict[str, object]) -> int:
    """The key's lock file, locked (flock) with `holder` in it (`<run id> <attempt>`); an
    `overlap` line naming the holder when another one holds it (then the step goes on without
    it)."""
    folder = os.environ["CHAOS_LEDGER"] + ".locks"
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, key), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace")
        ledger.write("overlap", holder=holder, **fields)
        return fd
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    return fd
