"""Streams trimmed by consumption, never by count.

A stream read through consumer groups is trimmed (XTRIM MINID, exact) only below what every group
has acknowledged: below the oldest entry pending in any group, and never past any group's last
delivered entry, so nothing a group still has to read, or has read but not acknowledged, is
removed. A stream without a group is not trimmed here (nobody has read it yet: an assignment
stream of a workflow no executor has started for keeps its backlog). The control streams, read
with XREAD from their tail by every executor, and the dead letters, read by people, are trimmed
by age instead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from supersede.health import shard_failure


def stream_id(raw: Any) -> tuple[int, int]:
    """A stream entry id (`ms-seq`, bytes or text) as a pair that orders as the stream does."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(entry: tuple[int, int]) -> str:
    return f"{entry[0]}-{entry[1]}"


def consumed_below(groups: Sequence[dict[str, Any]], oldest_pending: dict[str, Any]) -> str | None:
    """The id below which every group acknowledged every entry (None: keep all).

    `groups` is an XINFO GROUPS reply; `oldest_pending` maps a group name to the id of its
    oldest pending entry. A group with entries pending whose oldest one is not known (its
    XPENDING failed, or all were acknowledged in between) keeps the whole stream this time."""
    cut: tuple[int, int] | None = None
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else str(g["name"])
        if int(g["pending"]):
            if name not in oldest_pending:
                return None
            low = stream_id(oldest_pending[name])
        else:
            ms, seq = stream_id(g["last-delivered-id"])
            low = (ms, seq + 1)  # everything up to the last delivered entry is acknowledged
        cut = low if cut is None else min(cut, low)
    return None if cut is None else _text(cut)


async def trim_consumed(redis: Redis, streams: Sequence[str]) -> dict[str, int]:
    """Trim each stream below what all its groups acknowledged: three pipelined round trips
    whatever the number of streams. Returns the entries removed per stream trimmed."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
        infos = await pipe.execute(raise_on_error=False)
    _raise_refused(infos, expected="no such key")  # (a stream not made yet: nothing to trim)
    grouped = [(s, g) for s, g in zip(streams, infos, strict=True) if isinstance(g, list) and g]
    async with redis.pipeline(transaction=False) as pipe:
        asks = []
        for stream, groups in grouped:
            for g in groups:
                if int(g["pending"]):
                    pipe.xpending(stream, g["name"])
                    asks.append((stream, g["name"]))
        summaries = await pipe.execute(raise_on_error=False) if asks else []
    _raise_refused(summaries, expected="NOGROUP")  # (a group deleted since: nothing to keep)
    oldest: dict[str, dict[str, Any]] = {}
    for (stream, name), summary in zip(asks, summaries, strict=True):
        if isinstance(summary, dict) and summary.get("min"):
            key = name.decode() if isinstance(name, bytes) else str(name)
            oldest.setdefault(stream, {})[key] = summary["min"]
    cuts = [(s, consumed_below(g, oldest.get(s, {}))) for s, g in grouped]
    return await _trim(redis, [(s, c) for s, c in cuts if c is not None and c != "0-1"])


async def trim_older_than(
    redis: Redis, streams: Sequence[str], age_ms: int, now_ms: float | None = None
) -> dict[str, int]:
    """Trim each stream below the entries added in the last `age_ms`, by the server's clock
    (`now_ms`, as the caller tells it: the ids are the server's milliseconds; this host's
    clock when not given, which a skew of the age's size made trim every entry)."""
    now = time.time() * 1000 if now_ms is None else now_ms
    cut = f"{max(0, int(now) - age_ms)}-0"
    return await _trim(redis, [(s, cut) for s in streams])


async def trim_to_length(redis: Redis, stream: str, maxlen: int) -> dict[str, int]:
    """Keep only the newest `maxlen` entries of a stream nobody consumes through a group (the
    dead letters, read by people): a flood of bad input cannot grow it past that."""
    removed = int(await redis.xtrim(stream, maxlen=maxlen, approximate=False) or 0)
    return {stream: removed} if removed else {}


async def _trim(redis: Redis, cuts: Sequence[tuple[str, str]]) -> dict[str, int]:
    if not cuts:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for stream, cut in cuts:
            pipe.xtrim(stream, minid=cut, approximate=False)
        removed = await pipe.execute(raise_on_error=False)
    _raise_refused(removed)
    return {s: int(n) for (s, _), n in zip(cuts, removed, strict=True) if isinstance(n, int) and n}


def _raise_refused(replies: Sequence[Any], expected: str = "") -> None:
    """Raise the first error among a pipeline's replies (one whose text holds `expected`
    aside): a trim the server refused (an ACL user without XTRIM) was passed over, and the
    stream grew without a line, a failed task or an unready service (a security probe)."""
    for reply in replies:
        if isinstance(reply, Exception) and not (expected and expected in str(reply)):
            if shard_failure(reply):  # (a cluster slot left half moved: that stream's trim
                continue  # waits for the next; the others were made, a cluster probe)
            raise reply
