"""Workflows for the isolation tests: handlers that ignore cancellation (and SIGTERM) in worker
processes and threads. Each notes what it does, with its pid and the time in ms, to the list
`<ns>:test:log` (a connection of its own process)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from supersede.config import DEFAULT_URL, connect_sync
from supersede.workflow import Concurrency, Context, Workflow
from tests.support.apps.named_steps import made, read_made

_redis = connect_sync(os.environ.get("SUPERSEDE_REDIS_URL", DEFAULT_URL))
LOG = f"{os.environ.get('SUPERSEDE_NAMESPACE', 'supersede')}:test:log"


def note(*parts: object) -> None:
    _redis.rpush(LOG, ":".join(str(p) for p in (*parts, os.getpid(), int(time.time() * 1000))))


def _by_key(strict: bool = False) -> Concurrency:
    return Concurrency("input.k", max_runs=1, strict=strict)


def stubborn(ctx: Context) -> str:
    """Ignores its flag, and SIGTERM when asked to; notes that it is alive every 20 ms."""
    if ctx.input.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    note("started", ctx.run_id)
    if ctx.input.get("fail"):
        note(f"failing{ctx.retry_count}", ctx.run_id)
        raise ValueError(f"the step failed on purpose: {ctx.input['fail']}")
    if ctx.input.get("cancel"):
        raise asyncio.CancelledError  # (nothing cancelled its run: the step's failure)
    if ctx.input.get("exit"):
        os._exit(int(ctx.input["exit"]))  # (its worker ends: a crash of the step's own)
    deadline = time.monotonic() + float(ctx.input.get("sleep", 0))
    while time.monotonic() < deadline:
        note("alive", ctx.run_id)
        time.sleep(0.02)
    note("finished", ctx.run_id)
    return "done"


def polite(ctx: Context) -> dict[str, object]:
    """Returns as soon as its flag is up."""
    note("polite", ctx.run_id)
    deadline = time.monotonic() + float(ctx.input.get("sleep", 0))
    while time.monotonic() < deadline:
        if ctx.cancelled:
            note("saw-flag", ctx.run_id)
            return {}
        time.sleep(0.005)
    return {
        "pid": os.getpid(),
        "parent": ctx.parent("first") if ctx.outputs else None,
        "claimed_at": ctx.claimed_at,
        "at": time.time(),
    }


async def first(ctx: Context) -> dict[str, object]:
    """An async step in a process: cancelled at its await once the flag is up."""
    note("started", ctx.run_id)
    try:
        await asyncio.sleep(float(ctx.input.get("first_sleep", ctx.input.get("sleep", 0))))
    except asyncio.CancelledError:
        note("async-cancelled", ctx.run_id)
        raise
    return {"current": await ctx.still_current(), "fence": str(ctx.fence)}


def returns_its_fence(ctx: Context) -> dict[str, object]:
    """An output msgpack cannot hold (a 128-bit integer): refused once, not retried."""
    note("fence-attempt", ctx.run_id)
    return {"fence": ctx.fence}


def returns_late(ctx: Context) -> None:
    """A sync step (thread) that ignores its flag for a while."""
    note("started", ctx.run_id)
    time.sleep(float(ctx.input.get("sleep", 0)))
    note("returned", ctx.run_id)


def sized(ctx: Context) -> object:
    """The size of its input's `pad`; or raises an error of a megabyte (`raise`), or returns
    an output of one (`big`): messages larger than the pipe's buffer, both ways."""
    if ctx.input.get("raise"):
        raise ValueError("M" * 1_000_000)
    if ctx.input.get("big"):
        return "x" * 1_000_000
    return len(ctx.input.get("pad", ""))


proc = Workflow("proc", on_events=["proc.go"], concurrency=_by_key(), isolation="process")
proc.step()(stubborn)
proc_retried = Workflow("proc-retried", on_events=["proc.retried"], isolation="process")
proc_retried.step(retries=1)(stubborn)
proc_strict = Workflow(
    "proc-strict", on_events=["proc.strict"], concurrency=_by_key(True), isolation="process"
)
proc_strict.step()(stubborn)
polite_wf = Workflow("proc-polite", on_events=["proc.polite"], concurrency=_by_key())
polite_wf.step(isolation="process")(first)
polite_wf.step(isolation="process", parents=["first"])(polite)
slow = Workflow("proc-timeout", on_events=["proc.timeout"], isolation="process")
slow.step(timeout=0.3)(stubborn)
thread_strict = Workflow("thread-strict", on_events=["thread.strict"], concurrency=_by_key(True))
thread_strict.step()(returns_late)
named = Workflow("named", on_events=["named.go"])
named.step(name="made-here")(made)
named.step(parents=[made], name="in-thread")(read_made)
named.step(parents=[made], name="in-process", isolation="process")(read_made)
fence_out = Workflow("fence-out", on_events=["fence.out"], concurrency=_by_key())
fence_out.step(retries=2)(returns_its_fence)
fence_out_process = Workflow(
    "fence-out-process", on_events=["fence.process"], concurrency=_by_key(), isolation="process"
)
fence_out_process.step(retries=2)(returns_its_fence)
proc_large = Workflow("proc-large", on_events=["proc.large"], isolation="process")
proc_large.step()(sized)
