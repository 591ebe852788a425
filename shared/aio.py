"""Small asyncio helpers for the services' hot paths."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def gather(*aws: Awaitable[T]) -> list[T]:
    """asyncio.gather, except that a single awaitable is awaited in place: at low load most
    batches touch one shard, and a task per call costs a loop iteration of latency."""
    if len(aws) == 1:
        return [await aws[0]]
    return list(await asyncio.gather(*aws))
