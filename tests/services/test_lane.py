"""The lean connection of the hot calls (shared/lane.py): replies and errors as redis-py gives
them, in order after a cancelled call, a broken connection failing its calls and the next one
reconnecting, the URL's socket_timeout, TLS, and the services using lanes only while they run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import uvloop
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from supersede.config import Settings, connect
from supersede.keys import Keys
from supersede.lane import Lane, lane_of
from supersede.registry import register
from supersede.scripts import Scripts
from supersede.server import EmbeddedCluster, EmbeddedServer
from supersede.services.ingress.service import Ingress, IngressConfig
from supersede.streams import ensure_groups
from tests.support import eventually
from tests.support.proxy import FreezableProxy
from tests.support.tls import TlsServer


@pytest.fixture(params=["resp3", "resp2", "tls"])
async def client(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Redis]:
    if request.param == "tls":
        url = request.getfixturevalue("redis_tls").url
    else:
        url = redis_url + ("?protocol=2" if request.param == "resp2" else "")
    redis = connect(url)
    yield redis
    await redis.aclose()


@pytest.fixture
async def lane(client: Redis) -> AsyncIterator[Lane]:
    made = lane_of(client)
    assert made is not None
    yield made
    await made.aclose()


async def _ids(redis: Redis) -> set[int]:
    return {int(c["id"]) for c in await redis.client_list()}


async def test_replies_and_errors_are_redis_py_s(client: Redis, lane: Lane, namespace: str) -> None:
    assert await lane.execute("PING") == b"PONG"
    sha = await client.script_load("return {1, 'two', {3}, KEYS[1], ARGV[1]}")
    args = (sha, 1, f"{namespace}:k", 2.5)
    assert await lane.execute("EVALSHA", *args) == await client.evalsha(*args)
    with pytest.raises(NoScriptError):
        await lane.execute("EVALSHA", "0" * 40, 0)
    with pytest.raises(ResponseError, match="unknown command"):
        await lane.execute("NOSUCHCOMMAND")
    assert await lane.execute("PING") == b"PONG"  # (still in step after the errors)


async def test_stream_reads_are_shaped_as_redis_py_s(
    client: Redis, lane: Lane, namespace: str
) -> None:
    stream = f"{namespace}:s"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    for n in range(3):
        await client.xadd(stream, {"n": str(n), "f": b"\xff"})
    got: Any = await lane.xreadgroup("g", "c", {stream: ">"}, count=2, block=10)
    again = await client.xreadgroup("g", "c", {stream: "0"})  # (the same two, pending)
    assert got == again and len(got[0][1]) == 2
    await client.xtrim(stream, maxlen=0)  # a pending entry trimmed away: empty fields
    got = await lane.xreadgroup("g", "c", {stream: "0"})
    assert got == await client.xreadgroup("g", "c", {stream: "0"})
    assert got[0][1][0][1] == {}
    assert await lane.xreadgroup("g", "c", {stream: ">"}, block=10) == []  # (nothing new)
    first = await client.xadd(stream, {"n": "3"})
    got = await lane.xread({stream: "0"})
    assert got == await client.xread({stream: "0"})
    assert (await lane.xread({stream: "0"}, count=1))[0][1][0][0] == first


async def test_a_cancelled_call_leaves_the_replies_in_order(lane: Lane, namespace: str) -> None:
    blocked = asyncio.create_task(lane.execute("XREAD", "BLOCK", 300, "STREAMS", namespace, "$"))
    await asyncio.sleep(0.05)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert await lane.execute("ECHO", "after") == b"after"  # (not the XREAD's nil)
    assert await lane.execute("ECHO", "next") == b"next"


async def test_a_killed_connection_fails_its_calls_and_the_next_call_reconnects(
    client: Redis, lane: Lane, namespace: str
) -> None:
    first = int(await lane.execute("CLIENT", "ID"))
    blocked = asyncio.create_task(lane.execute("XREAD", "BLOCK", 5000, "STREAMS", namespace, "$"))
    await asyncio.sleep(0.05)
    await client.client_kill_filter(_id=first)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(blocked, 2)  # (not the whole BLOCK)
    second = int(await lane.execute("CLIENT", "ID"))
    assert second != first
    assert first not in await _ids(client)


async def test_a_silent_server_fails_the_calls_after_the_timeout_and_the_lane_reconnects(
    redis_server: EmbeddedServer,
) -> None:
    """The peer goes silent without closing (a dead host, a cut network, a failover behind a
    virtual IP): the calls waiting fail with redis-py's TimeoutError once the socket timeout
    passed, and the next call connects again (new connections reach the server)."""
    proxy = await FreezableProxy(redis_server.port).start()
    redis = connect(proxy.url("?socket_timeout=0.3"))
    lane = lane_of(redis)
    assert lane is not None
    try:
        assert await lane.execute("PING") == b"PONG"
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(lane.execute("PING"), 5)
        assert time.monotonic() - started < 2
        assert await asyncio.wait_for(lane.execute("PING"), 5) == b"PONG"
    finally:
        await lane.aclose()
        await redis.aclose()
        await proxy.stop()


async def test_a_lane_s_timeout_is_redis_py_s_default_unless_the_url_sets_one(
    redis: Redis, redis_url: str
) -> None:
    """(redis-py keeps its default, 5 s, on the connection, not in the pool's settings.)"""
    lane = lane_of(redis)
    assert lane is not None
    try:
        await lane.execute("PING")
        default = redis.connection_pool.make_connection().socket_timeout
        assert default and lane._wire is not None and lane._wire.timeout == default
    finally:
        await lane.aclose()


async def test_the_url_s_socket_timeout_bounds_a_call(redis_url: str, namespace: str) -> None:
    redis = connect(redis_url + "?socket_timeout=0.5")
    lane = lane_of(redis)
    assert lane is not None
    try:
        assert await lane.xread({namespace: "$"}, block=1500) == []  # (its BLOCK is not cut)
        first = int(await lane.execute("CLIENT", "ID"))
        with pytest.raises(TimeoutError):
            await lane.execute("XREAD", "BLOCK", 5000, "STREAMS", namespace, "$")
        assert int(await lane.execute("CLIENT", "ID")) != first  # (a new connection)
        await eventually(lambda: _gone(redis, first))
    finally:
        await lane.aclose()
        await redis.aclose()


async def test_calls_waiting_for_a_connection_share_one_attempt() -> None:
    """A server that accepts and never answers: four calls at once make one connection (one
    handshake timeout for all), not one each in turn (the fourth failed after four)."""
    accepted: list[asyncio.StreamWriter] = []

    async def mute(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    redis = connect(f"redis://127.0.0.1:{port}/0?socket_timeout=0.3")
    lane = lane_of(redis)
    assert lane is not None
    try:
        calls = [lane.execute("EVALSHA", "0" * 40, 0) for _ in range(4)]
        failed = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert all(isinstance(e, (TimeoutError, ConnectionError)) for e in failed), failed
        assert len(accepted) == 1
    finally:
        await lane.aclose()
        await redis.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


def test_lanes_on_uvloop_plain_and_tls(redis_url: str, redis_tls: TlsServer) -> None:
    """The services run uvloop: the takeover of its transports, TLS's included."""

    async def check(url: str) -> None:
        redis = connect(url)
        lane = lane_of(redis)
        assert lane is not None
        try:
            assert await lane.execute("ECHO", "x" * 100_000) == b"x" * 100_000
            first = int(await lane.execute("CLIENT", "ID"))
            await redis.client_kill_filter(_id=first)
            assert await _eventually_answers(lane) != first  # (connected again)
        finally:
            await lane.aclose()
            await redis.aclose()

    for url in (redis_url, redis_tls.url):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(check(url))


async def _eventually_answers(lane: Lane) -> int:
    for _ in range(100):
        try:
            return int(await lane.execute("CLIENT", "ID"))
        except ConnectionError:  # (the kill seen by this call)
            await asyncio.sleep(0.02)
    raise AssertionError("the lane never connected again")


async def _gone(redis: Redis, client_id: int) -> bool:
    return client_id not in await _ids(redis)


async def test_a_script_call_after_the_server_lost_its_scripts(redis: Redis, keys: Keys) -> None:
    lane = lane_of(redis)
    scripts = Scripts(redis, keys, lane=lane)
    await scripts.load()
    await redis.script_flush()
    try:
        assert await scripts.append_requests(0, [b"x"]) == 1  # (NOSCRIPT: loaded, sent again)
    finally:
        assert lane is not None
        await lane.aclose()


async def test_a_closed_lane_closes_its_socket_and_refuses_calls(redis: Redis) -> None:
    lane = lane_of(redis)
    assert lane is not None
    own = int(await lane.execute("CLIENT", "ID"))
    await lane.aclose()
    await eventually(lambda: _gone(redis, own))
    with pytest.raises(ConnectionError):
        await lane.execute("PING")


async def test_no_lane_where_redis_py_must_make_the_calls(redis_cluster: EmbeddedCluster) -> None:
    assert lane_of(fakeredis.FakeAsyncRedis()) is None  # (no socket to take over)
    cluster = connect(f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0].port}")
    assert lane_of(cluster) is None  # (calls routed by slot)
    await cluster.aclose()


async def test_a_running_service_uses_lanes_and_closes_them_when_it_stops(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    await ensure_groups(redis, keys)
    await register(redis, keys, {"id": "w", "events": ["e"]})  # (ingress reads once it routes)
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    before = await _ids(redis)
    service = Ingress(connect(redis_url), settings, IngressConfig(block_ms=50))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await eventually(lambda: asyncio.sleep(0, service.reads is not None))
        assert service.scripts.lane is not None
        await eventually(lambda: asyncio.sleep(0, len(service._lanes) == 2))
        lanes = {int(await lane.execute("CLIENT", "ID")) for lane in service._lanes}
        read_lane = int(await service.reads.execute("CLIENT", "ID"))

        async def reading() -> bool:  # (the inbox read, XREADGROUP BLOCK, is on its lane)
            clients = {int(c["id"]): c for c in await redis.client_list()}
            return lanes <= set(clients) and clients[read_lane]["cmd"] == "xreadgroup"

        await eventually(reading)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await service.redis.aclose()
    assert service.scripts.lane is None

    async def closed() -> bool:
        return not lanes & await _ids(redis) and (await _ids(redis)) - before <= set()

    await eventually(closed)


async def test_a_connection_closed_before_its_take_over_is_not_taken(redis_url: str) -> None:
    """The server closed the connection between redis-py's handshake and the lane's take-over:
    the close reached redis-py's protocol, not the lane's, whose calls then waited for a reply
    for good (no socket timeout set; a parallel suite's server restart met it once)."""
    redis = Redis.from_url(redis_url)
    lane = Lane(redis)
    real = redis.connection_pool.make_connection

    def closing() -> Any:
        connection = real()
        connect = connection.connect

        async def connect_then_closed() -> None:
            await connect()
            connection._writer.transport.close()  # (as a peer's close would)
            await asyncio.sleep(0.01)  # (delivered to redis-py's protocol)

        connection.connect = connect_then_closed
        return connection

    redis.connection_pool.make_connection = closing  # type: ignore[method-assign]
    try:
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(lane.execute("PING"), 5)
        redis.connection_pool.make_connection = real  # type: ignore[method-assign]
        assert await lane.execute("PING") in (b"PONG", "PONG")  # (the next call connects anew)
    finally:
        await lane.aclose()
        await redis.aclose()


async def test_a_connection_lost_before_its_first_call_fails_that_call(redis_url: str) -> None:
    """The connection broke after the take-over and before the call that made it was sent (a
    server stopping just then): the loss failed no call, so the call sent after it waited for
    good, its watchdog stopped with the connection (a parallel suite's server restart met it:
    the admission service read nothing more)."""
    redis = Redis.from_url(redis_url)
    lane = Lane(redis)
    real = lane._open

    async def open_then_lost() -> Any:
        wire = await real()
        wire.transport.abort()  # (the peer's close, delivered before the waiting call resumes)
        return wire

    lane._open = open_then_lost  # type: ignore[method-assign]
    try:
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(lane.execute("PING"), 5)
        lane._open = real  # type: ignore[method-assign]
        assert await lane.execute("PING") in (b"PONG", "PONG")  # (the next call connects anew)
    finally:
        await lane.aclose()
        await redis.aclose()
