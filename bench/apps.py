"""Workflows for the executor benchmarks (imported by `supersede executor bench.apps`)."""

from __future__ import annotations

import asyncio
import os
import time

from supersede.config import DEFAULT_URL, connect_sync
from supersede.workflow import Concurrency, Context, Workflow

_redis = connect_sync(os.environ.get("SUPERSEDE_REDIS_URL", DEFAULT_URL))
CANCELLED_AT = f"{os.environ.get('SUPERSEDE_NAMESPACE', 'supersede')}:bench:cancelled"
STARTED = f"{os.environ.get('SUPERSEDE_NAMESPACE', 'supersede')}:bench:started"
CANCELLED_BY_ROUND = f"{os.environ.get('SUPERSEDE_NAMESPACE', 'supersede')}:bench:cancelled-round"
STARTED_AT = f"{os.environ.get('SUPERSEDE_NAMESPACE', 'supersede')}:bench:started-at"

latest = Workflow(
    "latest-only",
    on_events=["bench.supersede"],
    concurrency=Concurrency(expression="input.userId", max_runs=1),
)


def _later(fn, *args) -> None:  # type: ignore[no-untyped-def]
    """Write from a thread, so the measurement never blocks the executor's loop."""
    asyncio.get_running_loop().run_in_executor(None, fn, *args)


@latest.step()
async def hold(ctx: Context) -> None:
    _later(_redis.sadd, STARTED, ctx.run_id)
    try:
        await asyncio.sleep(300)
    except asyncio.CancelledError:
        now = repr(time.time())
        _later(_redis.hset, CANCELLED_AT, ctx.run_id, now)
        _later(_redis.hset, CANCELLED_BY_ROUND, f"{ctx.input['userId']}:{ctx.input['r']}", now)
        raise


noop = Workflow("noop", on_events=["bench.noop"])


@noop.step()
async def nothing(ctx: Context) -> None:
    return None


keyed = Workflow(
    "keyed",
    on_events=["bench.keyed"],
    concurrency=Concurrency(expression="input.userId", max_runs=1),
)


@keyed.step()
async def nothing_keyed(ctx: Context) -> None:
    return None


probe = Workflow("probe", on_events=["bench.probe"])


@probe.step()
async def record_start(ctx: Context) -> None:
    _later(_redis.hset, STARTED_AT, str(ctx.input["n"]), repr(time.time()))
