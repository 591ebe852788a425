"""Handler bodies of the chaos workflows: sleep for the event's `ms` (async, or a sync loop that
polls `ctx.cancelled`), writing the ledger at start and end."""

from __future__ import annotations

import asyncio
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
