"""Ingress throughput: 200k events, two workflows per event name, 10k distinct keys, one
process, against the raw pipelined XADD rate of the same client in the same run."""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from redis.asyncio import Redis

from bench.common import log, pipelined_xadd, report
from supersede.config import Settings
from supersede.protocol import INGRESS_GROUP, request_payloads
from supersede.registry import register
from supersede.server import EmbeddedServer
from supersede.services.ingress.service import Ingress, IngressConfig
from supersede.streams import ensure_groups


async def inbox_backlog(redis: Redis, stream: str) -> int:
    for g in await redis.xinfo_groups(stream):
        if g["name"] == INGRESS_GROUP.encode():
            return int(g["pending"]) + int(g.get("lag") or 0)
    return 0


async def main(n: int, keys_count: int) -> None:
    server = EmbeddedServer().start()
    try:
        settings = Settings(redis_url=server.url, namespace="bench", shards=16)
        keys = settings.keys
        redis = Redis.from_url(server.url)
        await ensure_groups(redis, keys)
        for wid in ("chat-reply", "chat-audit"):
            spec = {"expression": "input.userId"}
            await register(
                redis, keys, {"id": wid, "events": ["chat.message"], "concurrency": spec}
            )
        items = []
        for i in range(n):
            data = orjson.dumps({"userId": f"u{i % keys_count}", "text": "hi"})
            items.append((keys.events_stream, {"name": b"chat.message", "data": data}))
        log(f"ingress bench: {n} events, 2 workflows each, {keys_count} keys")
        xadd_rate = await pipelined_xadd(redis, items)
        service = Ingress(redis, settings, IngressConfig(block_ms=50, refresh_interval=3600))
        await service.start()
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(service.run(stop))
        watcher = Redis.from_url(server.url)
        while await inbox_backlog(watcher, keys.events_stream) > 0:
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
        requests = 0
        for sk in keys.all_shards():
            for _, fields in await redis.xrange(sk.requests_stream):
                requests += len(request_payloads(fields) or [])
        assert requests == 2 * n, f"expected {2 * n} requests, found {requests}"
        report("ingress_throughput", n / elapsed, "events/s", xadd_rate, events=n,
               workflows_per_event=2, keys=keys_count, target=30_000)  # fmt: skip
        await watcher.aclose()
        await redis.aclose()
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.keys))
