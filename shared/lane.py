"""A lean connection for the hot path: one socket, commands pipelined in the order they are
sent, replies parsed by hiredis straight from the event loop's protocol callback.

redis-py's asyncio client spends most of a round trip in Python around the socket (the pool and
its lock, the retry wrapper, a timeout context per read, a stream reader and its futures): about
80 µs of CPU per command on the development machine, against 8 µs here (`bench/lane.py`). Each
run crosses three hops, each a blocking read and a script call, so those microseconds are most
of the start latency above the wake-ups themselves, and CPU the services share with Redis.

A lane is used for the hot calls only (the blocking reads of the three services, the script
calls): everything else keeps redis-py. It is made only where it can do what redis-py would:
- one server (a cluster routes by slot: redis-py's cluster client keeps every call there);
- either protocol redis-py negotiated (its replies are hiredis's, as redis-py's are; stream
  reads are shaped as redis-py shapes them);
- redis-py makes the connection (address, TLS, AUTH, SELECT, client name: its handshake, the
  same as every other connection of the process), then the lane takes over its transport;
- redis-py's `socket_timeout` (5 s unless the URL says otherwise) bounds each call, plus the
  BLOCK of a blocking read (the connection is dropped: the calls waiting on it fail with
  TimeoutError, the next call connects again).

Errors are redis-py's exceptions (its parser's mapping: NOSCRIPT, NOPERM, ... ), so callers
handle them as before. A connection that breaks fails every call waiting on it with
ConnectionError; the next call connects again. A caller cancelled while its reply is on the way
leaves the connection usable: that reply is read and dropped in its turn.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError, InvalidResponse, RedisError, TimeoutError

from supersede.aio import wait_for
from supersede.protocol import StreamReply
from supersede.streams import parse_stream_read

try:  # (where redis-py keeps its parsers moved between releases)
    from redis._parsers.base import BaseParser
except ImportError:  # pragma: no cover
    BaseParser = None  # type: ignore[assignment,misc]

_TAKEN_OVER = (Connection, SSLConnection, UnixDomainSocketConnection)  # redis-py's own
_MORE = object()  # what hiredis's reader gives while a reply is incomplete
_PUSH = getattr(hiredis, "PushNotification", ())  # (hiredis before 3.2 has none)


def _retrieved(attempt: asyncio.Future[Any]) -> None:
    """A failed connect attempt's error is raised to those awaiting it; nothing to log."""
    if not attempt.cancelled():
        attempt.exception()


class _Wire(asyncio.Protocol):
    """The protocol on a taken-over transport: replies go to the waiting calls in order.

    With a `timeout`, a watchdog (a timer every quarter of it, at most a second) drops the
    connection when the oldest call waited past its deadline: one timer per connection instead
    of one per call."""

    def __init__(
        self, transport: asyncio.Transport, writer: asyncio.StreamWriter, timeout: float | None
    ) -> None:
        self.transport = transport
        self.writer = writer  # (held: a stream writer closes its transport when collected)
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=BaseParser.parse_error,
            notEnoughData=_MORE,  # (not False: a RESP3 reply can be false)
        )
        # (call, deadline by the loop's clock; deadlines never decrease along the queue)
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.lost: RedisError | None = None
        self.loop = asyncio.get_running_loop()
        self.closed = self.loop.create_future()  # set by the transport
        self.timeout = timeout
        if timeout:
            self.loop.call_later(self._watch_every(), self._watch)

    def send(self, packed: bytes, block_s: float) -> asyncio.Future[Any]:
        """Write one packed command; the future of its reply. `block_s`: how long the server
        may hold it on purpose (a BLOCK), added to its deadline."""
        future = self.loop.create_future()
        if self.lost is not None:  # (lost since its caller got it: nothing would answer or fail
            future.set_exception(self.lost)  # it, the watchdog stopped with the connection)
            return future
        deadline = math.inf
        if self.timeout:
            deadline = self.loop.time() + self.timeout + block_s
            if self.waiting:  # (it runs after those before it)
                deadline = max(deadline, self.waiting[-1][1])
        self.waiting.append((future, deadline))
        self.transport.write(packed)
        return future

    def _watch_every(self) -> float:
        return max(0.01, min(1.0, (self.timeout or 0) / 4))

    def _watch(self) -> None:
        if self.lost is not None:
            return
        if self.waiting and self.waiting[0][1] < self.loop.time():
            self.transport.abort()
            self.fail(TimeoutError("Timeout reading from the server"))
            return
        self.loop.call_later(self._watch_every(), self._watch)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self.reader.gets()
            except Exception as exc:  # (a protocol error: nothing after it can be trusted)
                self.transport.abort()
                self.fail(ConnectionError(f"Protocol error: {exc}"))
                return
            if reply is _MORE:
                return
            if isinstance(reply, _PUSH):  # (RESP3: not a reply)
                continue
            if not waiting:  # (no reply comes unasked: a broken stream)
                self.transport.abort()
                self.fail(ConnectionError("Protocol error: a reply nobody asked for"))
                return
            future = waiting.popleft()[0]
            if future.done():  # (its caller was cancelled: the reply is dropped in its turn)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.fail(ConnectionError(f"Connection lost: {exc}" if exc else "Connection closed."))

    def fail(self, error: RedisError) -> None:
        """The connection is unusable: every call waiting on it fails with `error` (the
        first one given)."""
        if self.lost is None:
            self.lost = error
        while self.waiting:
            future = self.waiting.popleft()[0]
            if not future.done():
                future.set_exception(self.lost)

    def eof_received(self) -> bool:
        return False  # (close the transport: connection_lost follows)


class Lane:
    """One connection of `redis`'s settings for hot calls (see the module's docstring)."""

    def __init__(self, redis: Redis) -> None:
        self._pool = redis.connection_pool
        self._wire: _Wire | None = None
        self._connecting: asyncio.Future[_Wire] | None = None
        self._closed = False

    @staticmethod
    def usable(redis: Redis) -> bool:
        """Whether a lane can stand in for `redis`'s calls (one server, redis-py's sockets)."""
        if isinstance(redis, RedisCluster) or BaseParser is None:
            return False
        return redis.connection_pool.connection_class in _TAKEN_OVER  # (fakeredis: none)

    async def execute(self, *args: Any, block_s: float = 0.0) -> Any:
        """Send one command; its reply as hiredis gives it (bytes, ints, lists, maps).
        `block_s`: how long the server may hold it on purpose (a BLOCK argument)."""
        wire = self._wire
        if wire is None or wire.lost is not None:
            wire = await self._connect()
        return await wire.send(hiredis.pack_command(args), block_s)

    async def execute_then(
        self, first: Sequence[Any], then: Sequence[Any], *, block_s: float = 0.0
    ) -> tuple[Any, Any]:
        """Send `first`, then `then` in the same write: the server runs `then` once `first`
        returned (after its BLOCK), no round trip more. Both replies; `first`'s error raises
        (and `then`'s reply is dropped)."""
        wire = self._wire
        if wire is None or wire.lost is not None:
            wire = await self._connect()
        replies = wire.send(hiredis.pack_command(tuple(first)), block_s)
        after = wire.send(hiredis.pack_command(tuple(then)), block_s)
        after.add_done_callback(_retrieved)
        try:
            reply = await replies
        except BaseException:
            if not after.done():
                after.cancel()  # (its reply is read and dropped in its turn)
            raise
        return reply, await after

    async def _connect(self) -> _Wire:
        """The connection, made again if it broke: one attempt shared by every call that
        waits for it (each making its own in turn, the k-th waited k timeouts)."""
        if self._closed:
            raise ConnectionError("the lane is closed")
        attempt = self._connecting
        if attempt is None or attempt.done():
            attempt = self._connecting = asyncio.ensure_future(self._open())
            attempt.add_done_callback(_retrieved)
        wire = await asyncio.shield(attempt)
        if self._closed:  # (closed while it connected)
            self._wire = None
            wire.transport.abort()
            raise ConnectionError("the lane is closed")
        return wire

    async def _open(self) -> _Wire:
        connection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        await connection.connect()  # redis-py's handshake: TLS, AUTH, SELECT, name
        writer = cast(asyncio.StreamWriter | None, getattr(connection, "_writer", None))
        reader = cast(asyncio.StreamReader | None, getattr(connection, "_reader", None))
        # (data, or a close, that reached redis-py's protocol: a close delivered there never
        # reaches the wire, whose calls would wait for good; a server that stopped just after
        # the handshake did that once in a parallel suite)
        if (
            writer is None
            or writer.transport.is_closing()
            or (reader is not None and (reader._buffer or reader.at_eof()))  # type: ignore[attr-defined]
        ):
            await connection.disconnect()
            raise ConnectionError("the connection could not be taken over")
        transport = cast(asyncio.Transport, writer.transport)
        wire = _Wire(transport, writer, getattr(connection, "socket_timeout", None))
        transport.set_protocol(wire)
        connection._writer = connection._reader = None  # (its __del__ would close it)
        self._wire = wire
        return wire

    async def aclose(self) -> None:
        """Close the connection (calls waiting on it fail with ConnectionError) and wait until
        its socket is closed."""
        self._closed = True
        wire, self._wire = self._wire, None
        if wire is None:
            return
        wire.transport.close()
        wire.fail(ConnectionError("the lane is closed"))
        try:
            await wait_for(asyncio.shield(wire.closed), 1.0)
        except builtins.TimeoutError:  # (a silent peer, a TLS close never answered)
            wire.transport.abort()

    async def xreadgroup(
        self,
        group: str,
        consumer: str,
        streams: Mapping[Any, Any],
        *,
        count: int | None = None,
        block: int | None = None,
    ) -> StreamReply:
        """XREADGROUP, its reply shaped as redis-py's: [[stream, [(id, fields)]]], [] for
        none; a pending entry trimmed away has empty fields."""
        return await self._read(["XREADGROUP", "GROUP", group, consumer], streams, count, block)

    async def xreadgroup_then(
        self,
        group: str,
        consumer: str,
        streams: Mapping[Any, Any],
        then: Sequence[Any],
        *,
        count: int | None = None,
        block: int | None = None,
    ) -> tuple[StreamReply, Any]:
        """`xreadgroup`, and the reply of `then`, run by the server once the read returned
        (see `execute_then`)."""
        args = _read_args(["XREADGROUP", "GROUP", group, consumer], streams, count, block)
        raw, after = await self.execute_then(args, then, block_s=(block or 0) / 1000)
        return stream_reply(raw), after

    async def xread(
        self, streams: Mapping[Any, Any], *, count: int | None = None, block: int | None = None
    ) -> StreamReply:
        """XREAD, its reply shaped as xreadgroup's."""
        return await self._read(["XREAD"], streams, count, block)

    async def _read(
        self, args: list[Any], streams: Mapping[Any, Any], count: int | None, block: int | None
    ) -> StreamReply:
        args = _read_args(args, streams, count, block)
        return stream_reply(await self.execute(*args, block_s=(block or 0) / 1000))


def _read_args(
    args: list[Any], streams: Mapping[Any, Any], count: int | None, block: int | None
) -> list[Any]:
    if count:
        args += ("COUNT", count)
    if block is not None:
        args += ("BLOCK", block)
    args.append("STREAMS")
    args += streams.keys()
    args += streams.values()
    return args


def stream_reply(raw: dict[bytes, list[Any]] | list[list[Any]] | None) -> StreamReply:
    """A raw XREAD(GROUP) reply (a map in RESP3, pairs in RESP2) as redis-py's RESP2 shape."""
    return cast(StreamReply, parse_stream_read(raw))


async def read(
    lane: Lane | None,
    redis: Redis,
    streams: Mapping[Any, Any],
    *,
    group: tuple[str, str] | None = None,
    count: int | None = None,
    block: int | None = None,
) -> StreamReply:
    """XREAD, or XREADGROUP as `group` ((group, consumer)), on `lane`, else through redis-py's
    client (a cluster): the same shape."""
    reply: Any
    if group is not None:
        if lane is not None:
            return await lane.xreadgroup(*group, streams, count=count, block=block)
        reply = await redis.xreadgroup(*group, streams, count=count, block=block)  # type: ignore[arg-type]
    elif lane is not None:
        return await lane.xread(streams, count=count, block=block)
    else:
        reply = await redis.xread(streams, count=count, block=block)  # type: ignore[arg-type]
    return cast(StreamReply, reply or [])


async def read_then(
    lane: Lane | None,
    redis: Redis,
    streams: Mapping[Any, Any],
    then: Sequence[Any],
    *,
    group: tuple[str, str],
    count: int | None = None,
    block: int | None = None,
) -> tuple[StreamReply, Any]:
    """`read` as `group`, and the reply of the command `then`, run by the server once the read
    returned: in the same write on `lane`; else (a cluster) through redis-py after it, a round
    trip more, and only when the read found entries (None otherwise)."""
    if lane is not None:
        return await lane.xreadgroup_then(*group, streams, then, count=count, block=block)
    reply = await read(None, redis, streams, group=group, count=count, block=block)
    return reply, (await redis.execute_command(*then) if reply else None)  # type: ignore[no-untyped-call]


def lane_of(redis: Redis) -> Lane | None:
    """A lane for `redis`'s hot calls, or None where redis-py must make them (a cluster)."""
    return Lane(redis) if Lane.usable(redis) else None
