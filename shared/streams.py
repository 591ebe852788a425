"""Consumer groups and the small stream helpers every service uses."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, OutOfMemoryError, ResponseError

from supersede import codec
from supersede.keys import Keys
from supersede.protocol import ADMISSION_GROUP, EXECUTOR_GROUP, INGRESS_GROUP, Entry

StreamName = TypeVar("StreamName", str, bytes)


def entry_ms(entry_id: bytes | str) -> int:
    """The millisecond part of a stream entry id: when the entry was added (server clock)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def consumer_name(service: str) -> str:
    """Unique per process, readable in XINFO CONSUMERS."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def ensure_group(redis: Redis, stream: str, group: str) -> None:
    """Create `group` on `stream` from its first entry, so nothing published earlier is skipped."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except OutOfMemoryError:  # (refused before the server looks for the group: at its
        if not await _has_group(redis, stream, group):  # maxmemory a service could not start)
            raise
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def _has_group(redis: Redis, stream: str, group: str) -> bool:
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # (no such stream)
        return False
    return any(codec.text(g["name"]) == group for g in groups)


GroupSpec = tuple[str, str]
"""(stream, consumer group) a service reads."""


def all_groups(keys: Keys, workflows: Sequence[str] = ()) -> list[GroupSpec]:
    """Every consumer group of a deployment: the inbox's, each shard's admission groups and the
    executor group of each shard's assignment stream of `workflows`."""
    out = [(keys.events_stream, INGRESS_GROUP)]
    for sk in keys.all_shards():
        out += [(sk.requests_stream, ADMISSION_GROUP), (sk.results_stream, ADMISSION_GROUP)]
        out += [(sk.assignments_stream(wf), EXECUTOR_GROUP) for wf in workflows]
    return out


async def create_groups(redis: Redis, groups: Sequence[GroupSpec]) -> None:
    """Create each (stream, group) from the stream's first entry (idempotent). Each service
    creates only the groups it reads, so its ACL user needs no right on other streams; admission
    writes assignments before any executor of a new workflow started, and the executor's group,
    created from `0`, still reads them. In one pipeline: one call after another made every
    start of an executor of 20 workflows wait 320 round trips, 39 s from a server 100 ms away
    (a latency probe)."""
    if not groups:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for stream, group in groups:
            pipe.xgroup_create(stream, group, id="0", mkstream=True)
        replies = await pipe.execute(raise_on_error=False)
    for (stream, group), reply in zip(groups, replies, strict=True):
        if isinstance(reply, OutOfMemoryError):  # (as ensure_group: look whether it is there)
            await ensure_group(redis, stream, group)
        elif isinstance(reply, BaseException) and "BUSYGROUP" not in str(reply):
            raise reply


async def ensure_groups(redis: Redis, keys: Keys, workflows: Sequence[str] = ()) -> None:
    """Every group of the deployment (tests and benchmarks that play every service)."""
    await create_groups(redis, all_groups(keys, workflows))


async def heal_missing_groups(
    redis: Redis, groups: Sequence[GroupSpec], exc: BaseException
) -> None:
    """After a NOGROUP error (a stream deleted, or a failover to a replica that had not yet
    received the group), create the groups again from the first entry: every consumer of
    them is idempotent, so entries seen twice change nothing."""
    if group_gone(exc):
        await create_groups(redis, groups)


def group_gone(exc: BaseException) -> bool:
    """A read failed because its stream or consumer group is gone: NOGROUP, or a blocking read
    ended as its stream was deleted ("UNBLOCKED the stream key no longer exists": a DEL, an
    eviction, a FLUSHALL), which is not a failover."""
    said = str(exc)
    return isinstance(exc, ResponseError) and (
        "NOGROUP" in said or (said.startswith("UNBLOCKED") and "no longer exists" in said)
    )


# A take-over lists this many of its own idle entries beyond a page (see Service.take_over).
OWN_LISTED = 1000
AUTH_RETRY_S = 5.0  # seconds before a loop whose login was refused tries again


def failed_over(exc: BaseException) -> bool:
    """The server ended a blocking read as it became a replica ("UNBLOCKED force unblock from
    blocking operation, instance state changed": a failover, `CLUSTER FAILOVER` included): the
    reader reads again, from the new master. Said in one line (a cluster probe: a traceback at
    ERROR for each graceful failover)."""
    return isinstance(exc, ResponseError) and str(exc).startswith("UNBLOCKED")


def retry_pause(exc: BaseException) -> float:
    """Seconds a stream reader waits after a failed read before the next. Refused credentials
    stay refused until an operator acts: each loop of each process tried a login twice a
    second (1,157 failed logins in the server's ACL LOG in a minute, a probe)."""
    return AUTH_RETRY_S if isinstance(exc, AuthenticationError) else 0.5


async def after_failure(
    redis: Redis,
    groups: Sequence[GroupSpec],
    own: OwnPending,
    exc: BaseException,
    *,
    failed_reread: bool,
) -> None:
    """What every service loop does after a failed batch: schedule the re-read of its own
    pending entries, recreate lost groups, and pause before trying again."""
    own.restart(failed_reread=failed_reread)
    with contextlib.suppress(Exception):
        await heal_missing_groups(redis, groups, exc)
    await asyncio.sleep(retry_pause(exc))


class OwnPending:
    """Which ids a consumer reads with XREADGROUP: '>' normally; after a failure, its own
    pending entries from '0' up to the last one, so a failed batch is retried at once instead
    of waiting for another consumer's XAUTOCLAIM. When a re-read fails too, one read of new
    entries goes before the next re-read, so entries that keep failing never starve the rest."""

    def __init__(self, streams: Sequence[str | bytes], *, sweep_every: float = 2.0) -> None:
        self.streams = [s.decode() if isinstance(s, bytes) else s for s in streams]
        self._ids: dict[str, str] | None = None
        self._new_first = False
        self._sweep_every = sweep_every
        self._last_sweep = time.monotonic()

    def sweep_if_due(self) -> None:
        """Call where nothing read is in flight: every `sweep_every` seconds, re-read own
        pending entries anyway. A client library that retries a read whose reply was lost
        (redis-py does, mid-failover) leaves entries delivered to no one that knows of them."""
        now = time.monotonic()
        if now - self._last_sweep >= self._sweep_every:
            self._last_sweep = now
            if self._ids is None:
                self.restart()

    @property
    def active(self) -> bool:
        """The next read is a re-read of own pending entries."""
        return self._ids is not None and not self._new_first

    def restart(self, *, failed_reread: bool = False) -> None:
        """A batch failed: re-read own pending entries from '0' (after one read of new
        entries when the failed batch was itself a re-read)."""
        self._ids = dict.fromkeys(self.streams, "0")
        self._new_first = failed_reread

    def ids(self) -> dict[str, str]:
        if self.active:
            return dict(self._ids or {})
        return dict.fromkeys(self.streams, ">")

    def advance(self, reply: Sequence[tuple[bytes, Sequence[Entry]]] | None, reread: bool) -> None:
        """After a read that succeeded (`reread`: it was a re-read): move past what it
        returned; back to '>' once a re-read returns nothing."""
        if not reread:
            self._new_first = False
            return
        if self._ids is None:
            return
        seen = False
        for stream, entries in reply or []:
            if entries:
                seen = True
                last = entries[-1][0]
                self._ids[stream.decode()] = last.decode() if isinstance(last, bytes) else last
        if not seen:
            self._ids = None


class RepeatedFields(dict[bytes, bytes]):
    """The fields of a stream entry that gives a name more than once (Redis keeps each pair):
    the last value of each name, as a dict holds them, with what the entry held in all, for
    the checks a dict would mislead (an inbox entry's field count and size)."""

    __slots__ = ("count", "repeated", "size")

    def __init__(self, flat: Sequence[bytes]) -> None:
        it = iter(flat)
        super().__init__(zip(it, it, strict=True))
        self.count = len(flat) // 2  # fields, repeats included
        self.size = sum(len(part) for part in flat)  # bytes of names and values
        names = flat[::2]
        self.repeated = sorted({n for n, times in collections.Counter(names).items() if times > 1})


def entry_fields(flat: Sequence[bytes] | None) -> dict[bytes, bytes]:
    """A stream entry's flat field list as a dict; a RepeatedFields when a name repeats."""
    if not flat:
        return {}
    it = iter(flat)
    fields = dict(zip(it, it, strict=True))
    return fields if 2 * len(fields) == len(flat) else RepeatedFields(flat)


def parse_stream_read(response: Any, **options: Any) -> Any:
    """redis-py's reply of XREAD(GROUP) (either protocol's), in its RESP2 shape, an entry that
    repeats a field name a RepeatedFields (redis-py's own parser keeps the last value only)."""
    if not response:
        return []
    pairs = response.items() if isinstance(response, dict) else response
    return [[name, _entries(entries)] for name, entries in pairs]


def parse_autoclaim(response: Any, **options: Any) -> Any:
    """redis-py's reply of XAUTOCLAIM, as `parse_stream_read` parses entries."""
    if options.get("parse_justid", False):
        return response[1]
    response[1] = _entries(response[1])
    return response


def _entries(entries: Sequence[Any]) -> list[Any]:
    """(id, fields) of each raw entry; (None, None) for a nil one, as redis-py gives it."""
    return [(e[0], entry_fields(e[1])) if e else (None, None) for e in entries]


def split_deleted(entries: Sequence[Entry]) -> tuple[list[Entry], list[bytes]]:
    """Entries that still exist, and ids of pending entries trimmed away since they were read
    (a re-read of pending entries returns those without fields; they can only be acknowledged)."""
    live = [e for e in entries if e[1]]
    gone = [e[0] for e in entries if not e[1]]
    return live, gone


async def tail_ids(redis: Redis, streams: Sequence[str]) -> dict[str, str]:
    """The last id of each stream now ('0-0' when it does not exist yet).

    XREAD's '$' would be re-read on every call for streams that returned nothing, so entries
    added between two calls would be missed; explicit ids never miss one.
    """
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xrevrange(stream, count=1)
        tails = await pipe.execute()
    return {s: (t[0][0].decode() if t else "0-0") for s, t in zip(streams, tails, strict=True)}


async def stale_streams(
    redis: Redis, streams: Sequence[StreamName], group: str, idle_ms: int
) -> list[StreamName]:
    """The streams whose `group` has an entry pending for `idle_ms` or more (read by a
    consumer that died before acknowledging it): one pipelined XPENDING IDLE for all of them,
    so looking costs one round trip however many streams there are (a missing stream or group
    counts as none)."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xpending_range(stream, group, "-", "+", 1, idle=idle_ms)
        replies = await pipe.execute(raise_on_error=False)
    return [s for s, r in zip(streams, replies, strict=True) if r and isinstance(r, list)]


def unread(group: dict[Any, Any], length: object = None) -> int:
    """Entries of a stream a group has not read, from its XINFO GROUPS entry: its `lag`, at most
    the stream's `length` (XLEN) when given. After a crash and an AOF restart of a trimmed
    stream, Redis can report a lag of thousands on a stream it has read to the end (its
    entries-read counter comes back wrong); an unread entry is always in the stream, so the
    cap holds the figure to what can be. A lag Redis cannot tell (nil) is the stream's entries
    less those pending, or 0."""
    lag = group.get("lag")
    if not isinstance(length, int):
        return int(lag or 0)
    if lag is None:
        return max(0, length - int(group["pending"]))
    return min(int(lag), length)


def _group_of(groups: object, group: str) -> dict[Any, Any] | None:
    """`group`'s entry of an XINFO GROUPS reply; None when there is none (or the reply is an
    error: no such stream)."""
    for g in groups if isinstance(groups, list) else []:
        if g["name"] == group.encode():
            return cast(dict[Any, Any], g)
    return None


def reported_lag(groups: object, group: str) -> int:
    """The lag Redis reports for `group` in an XINFO GROUPS reply (0: none, unknown, or no such
    group): a figure `Service.heal_lags` checks when it is not 0."""
    g = _group_of(groups, group)
    return int(g.get("lag") or 0) if g is not None else 0


def group_backlog(groups: object, group: str, length: object = None) -> int | None:
    """Entries of `group` unread or unacknowledged, from an XINFO GROUPS reply (and the
    stream's XLEN, see `unread`); None when the stream has no such group (or does not exist:
    its reply is an error)."""
    g = _group_of(groups, group)
    return int(g["pending"]) + unread(g, length) if g is not None else None
