"""A server that comes back empty (killed, restarted without its data) under running services:
they recreate what they need, the executors' workflows included, and the events published
after it run. Before, the executors registered their workflows only when they started, so
ingress acknowledged every later event with no workflow to run it, until an executor was
restarted by hand."""

from __future__ import annotations

import orjson
import redis as redis_sync
from redis.asyncio import Redis

from supersede.keys import Keys
from supersede.server import EmbeddedServer
from tests.support import APP, APP_WORKFLOWS, System, eventually, records


async def test_services_carry_on_when_the_server_restarts_empty() -> None:
    keys = Keys("lost", 4)
    server = EmbeddedServer().start()
    system = System(server.url, keys)
    redis = Redis.from_url(server.url)
    try:
        system.start("admission", "--block-ms", "100")
        system.start("executor", APP)

        async def registered() -> bool:
            return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

        await eventually(registered, timeout=30)
        system.start("ingress", "--block-ms", "100")
        await redis.xadd(keys.events_stream, {"name": "work.item", "data": b"{}"})
        await eventually(lambda: _succeeded(redis, keys, 1), timeout=30)

        assert server.proc is not None
        server.proc.kill()
        server.stop()  # (its folder goes too)
        server = EmbeddedServer(port=server.port).start()  # the same address, no data
        await redis.aclose()
        redis = Redis.from_url(server.url)
        for i in range(5):
            data = orjson.dumps({"k": f"after-{i}"})
            await redis.xadd(keys.events_stream, {"name": "work.item", "data": data})
        # the executors register their workflows again, and ingress waited for them: none of
        # the five events was acknowledged with no workflow to run it
        await eventually(lambda: _succeeded(redis, keys, 5), timeout=30)
        assert int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS
        assert all(p.poll() is None for p in system.procs)
    finally:
        system.close()
        await redis.aclose()
        server.stop()


async def _succeeded(redis: Redis, keys: Keys, n: int) -> bool:
    try:
        runs = await records(redis, keys)
    except redis_sync.ConnectionError:
        return False
    return sum(1 for r in runs.values() if r["st"] == "S") >= n
