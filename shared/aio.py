"""Small asyncio helpers for the services' hot paths, and for their stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


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
