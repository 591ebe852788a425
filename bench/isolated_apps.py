"""Workflows of the process-isolation benchmark (`supersede executor bench.isolated_apps`):
process steps that ignore their cancel flag, or honour it."""

from __future__ import annotations

import os
import time

from supersede.config import DEFAULT_URL, connect_sync
from supersede.workflow import Concurrency, Context, Workflow

_redis = connect_sync(os.environ.get("SUPERSEDE_REDIS_URL", DEFAULT_URL))
STARTED = f"{os.environ.get('SUPERSEDE_NAMESPACE', 'supersede')}:bench:started"

stoppable = Workflow(
    "stoppable", on_events=["bench.stoppable"], concurrency=Concurrency("input.k"),
    isolation="process",
)  # fmt: skip


@stoppable.step()
def work(ctx: Context) -> None:
    if ctx.input.get("quick"):
        return
    _redis.sadd(STARTED, ctx.run_id)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ctx.input.get("honours") and ctx.cancelled:
            return
        time.sleep(0.005)


debounced = Workflow(
    "debounced",
    on_events=["bench.typed"],
    concurrency=Concurrency("input.k", debounce_ms=200),
)


@debounced.step()
async def settle(ctx: Context) -> None:
    return None
