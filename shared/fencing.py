"""Fencing tokens: guard the side effect a superseded run must not make.

Cancelling a run cannot always stop its code in time (a sync step in a thread, a call already
on the wire), so a handler that writes something a newer run of its key also writes should
fence the write. Every run carries `ctx.fence`, its sequence as an integer: monotonic per key
(it is the order of the events in the inbox), the same for every attempt of a run. A write is
kept only when no newer fence was stored:

    @chat.step()
    async def reply(ctx: Context) -> None:
        text = await model.answer(ctx.input["text"])
        await set_if_newer(redis, f"reply:{ctx.key}", text, ctx.fence)   # one Lua call

The same in SQL, with the fence in a NUMERIC(39) column (fences are 128-bit integers):

    INSERT INTO reply (chat, body, fence) VALUES (:chat, :body, :fence)
    ON CONFLICT (chat) DO UPDATE SET body = EXCLUDED.body, fence = EXCLUDED.fence
    WHERE reply.fence <= EXCLUDED.fence

`await ctx.still_current()` (`ctx.still_current_blocking()` in a sync step) answers before
doing expensive work whether a newer run of the key was admitted since; the fence check at the
write is the guarantee, the question only saves the work.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from functools import cache
from typing import Any, overload

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.cluster import RedisCluster as SyncRedisCluster

from supersede.scripts import load_source

__all__ = ["FENCE_DIGITS", "fence_of", "read_fenced", "set_if_newer"]

FENCE_DIGITS = 39  # decimal digits of the largest fence (2**128 - 1): the stored width


def fence_of(seq: str) -> int:
    """The fence of a run from its sequence (32 hex digits: the inbox entry's ms, then its
    counter): an integer in the same order, exact for every entry id. 0, older than any run,
    for a sequence that is not one (so a fenced write of such a run loses to every other)."""
    try:
        return int(seq, 16)
    except ValueError:
        return 0


def _arg(fence: int) -> str:
    if not isinstance(fence, int) or isinstance(fence, bool) or not 0 <= fence < 2**128:
        raise ValueError(f"fence must be a run's ctx.fence (an int in [0, 2**128)), not {fence!r}")
    return str(fence).zfill(FENCE_DIGITS)


@cache
def _source() -> str:
    return load_source("fence_set")[0]


def _written(reply: Any) -> bool:
    if not isinstance(reply, list) or int(reply[0]) < 0:
        raise ValueError(f"fence_set refused its arguments: {reply!r}")
    return int(reply[0]) == 1


async def _await_written(reply: Awaitable[Any]) -> bool:
    return _written(await reply)


@overload
def set_if_newer(
    redis: Redis | RedisCluster, key: str, value: bytes | str, fence: int, *, ttl_ms: int = 0
) -> Awaitable[bool]: ...
@overload
def set_if_newer(
    redis: SyncRedis | SyncRedisCluster,
    key: str,
    value: bytes | str,
    fence: int,
    *,
    ttl_ms: int = 0,
) -> bool: ...
def set_if_newer(
    redis: Any, key: str, value: bytes | str, fence: int, *, ttl_ms: int = 0
) -> bool | Awaitable[bool]:
    """Store `value` at `key` (a hash {value, fence}) unless the key holds a newer fence; True
    when written. One atomic script call; with an asyncio client, await the result. The same
    fence may write again (a retry of the same run). `ttl_ms` > 0 sets the key's expiry."""
    if ttl_ms < 0:
        raise ValueError("ttl_ms must be 0 (no expiry) or more")
    args = [value, _arg(fence), ttl_ms]
    reply = redis.register_script(_source())(keys=[key], args=args)
    if inspect.isawaitable(reply):
        return _await_written(reply)
    return _written(reply)


def _pair(raw: Any) -> tuple[bytes | None, int | None]:
    value, fence = raw
    return value, (int(fence) if fence is not None else None)


async def _await_pair(reply: Awaitable[Any]) -> tuple[bytes | None, int | None]:
    return _pair(await reply)


@overload
def read_fenced(
    redis: Redis | RedisCluster, key: str
) -> Awaitable[tuple[bytes | None, int | None]]: ...
@overload
def read_fenced(
    redis: SyncRedis | SyncRedisCluster, key: str
) -> tuple[bytes | None, int | None]: ...
def read_fenced(
    redis: Any, key: str
) -> tuple[bytes | None, int | None] | Awaitable[tuple[bytes | None, int | None]]:
    """(value, fence) stored by `set_if_newer` at `key`; (None, None) when nothing is."""
    reply = redis.hmget(key, ["value", "fence"])
    if inspect.isawaitable(reply):
        return _await_pair(reply)
    return _pair(reply)
