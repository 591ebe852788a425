"""Small asyncio helpers for the services' hot paths, and for their stops."""

from __future__ import annotations

import asyncio
import sys
import time
import types
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """asyncio.wait_for as Python 3.12 has it: the awaitable under `asyncio.timeout`. On 3.11
    wait_for loses a cancel that comes as the awaited call completes (CPython gh-86296): the
    caller's task goes on as if it had not been cancelled. Use this one for every wait."""
    if timeout is None:
        return await aw
    async with asyncio.timeout(max(0.0, timeout)):
        return await aw


class _Asyncio(types.ModuleType):
    """The asyncio module, but for its wait_for (see `mend_redis`)."""

    wait_for = staticmethod(wait_for)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


def mend_redis() -> None:
    """On Python 3.11, give redis-py's asyncio connection module the wait_for above. It sends
    every command through asyncio.wait_for when the connection has a socket timeout (5 s by
    default since redis-py 8), so a task cancelled during a run of Redis calls mostly went on:
    a loop of PINGs under `asyncio.timeout(0.3)` ran 2 s, 20,000 calls, and returned (the
    dashboard's 5 s bound on a page never fired: a probe's pages took 11 s; so did any deadline
    of the services, and the cancel of a user's step, round such calls). Idempotent. Applied
    by importing `supersede.config`, which any name taken from `supersede` does first: in
    every process that does, a producer's included, its own redis-py asyncio clients get it
    too."""
    # (3.12 has it; before 3.11.3, asyncio.timeout itself miscounted cancels, gh-102780)
    if not (3, 11, 3) <= sys.version_info < (3, 12):
        return
    from redis.asyncio import connection

    if not isinstance(getattr(connection, "asyncio", None), _Asyncio):
        setattr(connection, "asyncio", _Asyncio("asyncio"))  # noqa: B010 (not exported)


async def gather(*aws: Awaitable[T]) -> list[T]:
    """asyncio.gather, except that a single awaitable is awaited in place: at low load most
    batches touch one shard, and a task per call costs a loop iteration of latency."""
    if len(aws) == 1:
        return [await aws[0]]
    return list(await asyncio.gather(*aws))


async def cancel_until_done(
    tasks: set[asyncio.Task[Any]], within: float, every: float = 0.1
) -> set[asyncio.Task[Any]]:
    """Cancel `tasks`, again every `every` seconds those that go on (redis-py's asyncio client
    may swallow a cancel that lands inside a call), for `within` seconds at most; the tasks
    that still run then. The exceptions of those that ended are read (asyncio warns
    otherwise)."""
    pending = set(tasks)
    end = time.monotonic() + within
    while pending and time.monotonic() < end:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every)
    for task in tasks - pending:
        if not task.cancelled():
            task.exception()
    return pending
