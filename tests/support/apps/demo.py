"""Workflows the executor tests run in real executor processes.

Each step logs what happened to a Redis list `<ns>:test:log` so the test can observe it, through
SUPERSEDE_TEST_LOG_URL when set (user code has its own credentials: an executor's ACL user may not
write there), else SUPERSEDE_REDIS_URL.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from supersede.config import DEFAULT_URL, connect_sync
from supersede.workflow import Concurrency, Context, Strategy, Workflow

_logs: dict[str, Any] = {}  # log server URL -> its connection


def note(*parts: object) -> None:
    """Append to the test log of the server and namespace the environment names now (read at
    each call: a test that runs these workflows in its own process sets them for itself)."""
    url = os.environ.get("SUPERSEDE_TEST_LOG_URL") or os.environ.get(
        "SUPERSEDE_REDIS_URL", DEFAULT_URL
    )
    conn = _logs.get(url) or _logs.setdefault(url, connect_sync(url))
    conn.rpush(f"{os.environ.get('SUPERSEDE_NAMESPACE', 'supersede')}:test:log",
               ":".join(str(p) for p in parts))  # fmt: skip


chat = Workflow(
    "chat-reply",
    on_events=["chat.message"],
    concurrency=Concurrency(expression="input.userId", max_runs=1,
                            limit_strategy=Strategy.CANCEL_IN_PROGRESS),
)  # fmt: skip


@chat.step()
async def reply(ctx: Context) -> dict[str, str]:
    note("started", ctx.run_id)
    try:
        await asyncio.sleep(float(ctx.input.get("sleep", 0)))
    except asyncio.CancelledError:
        note("cancelled", ctx.run_id)
        raise
    return {"text": f"re: {ctx.input.get('text', '')}"}


@chat.step(parents=[reply])
def store(ctx: Context) -> None:
    note("stored", ctx.run_id, ctx.parent(reply)["text"])


@chat.on_cancel
async def cleanup(ctx: Context) -> None:
    note("hook", ctx.run_id)


sync_chat = Workflow(
    "sync-reply",
    on_events=["sync.message"],
    concurrency=Concurrency(expression="input.userId", max_runs=1),
)


@sync_chat.step()
def sync_reply(ctx: Context) -> None:
    note("started", ctx.run_id)
    deadline = time.monotonic() + float(ctx.input.get("sleep", 0))
    while time.monotonic() < deadline:
        if ctx.cancelled:
            note("sync-cancelled", ctx.run_id)
            time.sleep(float(ctx.input.get("linger", 0)))  # winds down slowly
            note("sync-returned", ctx.run_id, int(time.time() * 1000))
            return
        time.sleep(0.005)


work = Workflow("work", on_events=["work.item"])


@work.step()
async def do_work(ctx: Context) -> None:
    note("started", ctx.run_id)
    time.sleep(float(ctx.input.get("block", 0)))  # blocks the executor's event loop on purpose
    await asyncio.sleep(float(ctx.input.get("sleep", 0)))
    note("done", ctx.run_id, os.getpid())


flaky = Workflow("flaky", on_events=["flaky.item"])


@flaky.step(retries=2)
def always_fails(ctx: Context) -> None:
    note("attempt", ctx.run_id, ctx.retry_count)
    raise RuntimeError(ctx.input.get("message", "boom from the step"))


stubborn = Workflow(
    "stubborn", on_events=["stubborn.item"], concurrency=Concurrency(expression="input.k")
)


@stubborn.step()
def ignores_cancellation(ctx: Context) -> None:
    note("started", ctx.run_id)
    time.sleep(float(ctx.input.get("sleep", 0)))  # never looks at ctx.cancelled
    note("stubborn-finished", ctx.run_id)


timeouts = Workflow("timeouts", on_events=["timeout.item"])


@timeouts.step(timeout=0.2)
async def too_slow(ctx: Context) -> None:
    await asyncio.sleep(5)


sync_timeouts = Workflow("sync-timeouts", on_events=["sync.timeout.item"])


@sync_timeouts.step(timeout=0.2)
def waits_past_its_timeout(ctx: Context) -> None:
    if ctx.input.get("raise"):
        raise TimeoutError("a socket's own timeout")  # (the step's failure, not its timeout)
    while not ctx.cancelled:  # (its timeout sets it: the step returns within the grace)
        time.sleep(0.01)


unpackable = Workflow("unpackable", on_events=["unpackable.item"])


@unpackable.step()
def returns_an_object(ctx: Context) -> object:
    return object()


self_cancelling = Workflow("self-cancelling", on_events=["selfcancel.item"])


@self_cancelling.step()
async def awaits_a_cancelled_future(ctx: Context) -> None:
    """Raises CancelledError though nothing cancelled its run (a failure of the step)."""
    inner = asyncio.ensure_future(asyncio.sleep(5))
    inner.cancel()
    await inner
