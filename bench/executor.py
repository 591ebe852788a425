"""Executor benchmarks, with admission, ingress and the executor as separate processes:

- cancel latency, events paced at ~200/s: p50/p99 from the cancel decision (the run record's
  `tc`, written by the admit script) to the handler catching CancelledError; reference: the
  wake-up latency of a
  raw XADD -> XREAD BLOCK on the same server, measured in the same run (the floor of any
  stream-delivered cancel);
- executor throughput: no-op runs completed per second by one executor once 5,000 runs are
  assigned; reference: the raw pipelined XADD rate of the same client.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time

import orjson
from redis.asyncio import Redis

from bench.common import log, pipelined_xadd, report
from shared import codec
from shared.config import Settings
from shared.server import EmbeddedServer
from shared.streams import ensure_groups


def start(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "services.cli", *args, "--metrics-port", "0"]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)


async def wait_for(check, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not met")
        await asyncio.sleep(0.005)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def xread_wakeup_ms(redis: Redis, rounds: int = 200) -> list[float]:
    """Reference: XADD by one connection -> XREAD BLOCK wake-up in another."""
    reader = Redis.from_url(_url(redis))
    out = []
    for _ in range(rounds):
        last = (
            (await redis.xinfo_stream("bench:wake"))["last-generated-id"]
            if await redis.exists("bench:wake")
            else b"0-0"
        )
        waiter = asyncio.create_task(reader.xread({"bench:wake": last}, block=1000))
        await asyncio.sleep(0.002)
        t = time.perf_counter()
        await redis.xadd("bench:wake", {"t": "1"})
        await waiter
        out.append((time.perf_counter() - t) * 1000)
    await reader.aclose()
    return out


def _url(redis: Redis) -> str:
    kw = redis.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/0"


async def cancel_latency(redis: Redis, settings: Settings, env: dict[str, str]) -> None:
    keys = settings.keys
    ns = settings.namespace
    users, rounds = 20, 11
    published: list[list[str]] = []
    for r in range(rounds):
        batch = []
        for u in range(users):
            data = orjson.dumps({"userId": f"u{u}", "r": r})
            entry = await redis.xadd(keys.events_stream, {"name": "bench.supersede", "data": data})
            batch.append(entry.decode())
            await asyncio.sleep(0.005)  # paced at ~200 events/s: latency, not a burst's queue
        published.append(batch)

        async def started(n: int = (r + 1) * users) -> bool:
            return int(await redis.scard(f"{ns}:bench:started")) >= n

        await wait_for(started)

    async def all_cancelled() -> bool:
        return int(await redis.hlen(f"{ns}:bench:cancelled")) >= users * (rounds - 1)

    await wait_for(all_cancelled)
    cancelled = {
        k.decode(): float(v) for k, v in (await redis.hgetall(f"{ns}:bench:cancelled")).items()
    }
    latencies = []
    for sk in keys.all_shards():
        for rid, raw in (await redis.hgetall(sk.runs_hash)).items():
            rec = codec.unpack(raw)
            if rid.decode() in cancelled and rec.get("tc"):
                latencies.append(cancelled[rid.decode()] * 1000 - rec["tc"])
    reference = await xread_wakeup_ms(redis)
    ref50 = statistics.median(reference)
    report("cancel_latency_p50", statistics.median(latencies), "ms", ref50, samples=len(latencies),
           reference_name="xadd_to_xread_block_wakeup_p50")  # fmt: skip
    report("cancel_latency_p99", pct(latencies, 0.99), "ms", pct(reference, 0.99),
           samples=len(latencies), target=10,
           reference_name="xadd_to_xread_block_wakeup_p99")  # fmt: skip


async def executor_throughput(
    redis: Redis, settings: Settings, env: dict[str, str], n: int
) -> None:
    keys = settings.keys
    total = n
    items = [(keys.events_stream, {"name": b"bench.noop", "data": b"{}"}) for _ in range(n)]
    xadd_rate = await pipelined_xadd(redis, items)

    async def assigned() -> bool:
        total = 0
        for sk in keys.all_shards():
            total += int(await redis.xlen(sk.assignments_stream))
        return total >= n

    await wait_for(assigned, timeout=120)
    proc = start(env, "executor", "bench.apps", "--slots", "100")

    async def ended() -> int:
        return sum([int(await redis.zcard(sk.terminal_zset)) for sk in keys.all_shards()])

    async def first() -> bool:
        return await ended() > 0

    async def finished() -> bool:
        return await ended() >= total

    try:
        await wait_for(first, timeout=60)  # the clock starts at the first run, not at start-up
        started = time.perf_counter()
        base = await ended()
        n -= base
        await wait_for(finished, timeout=300)
    finally:
        proc.kill()
        proc.wait(30)
    elapsed = time.perf_counter() - started
    report("executor_throughput", n / elapsed, "runs/s", xadd_rate, runs=n, slots=100)


async def main() -> None:
    server = EmbeddedServer().start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        settings = Settings(redis_url=server.url, namespace="benchx", shards=16)
        env = {**os.environ, "SUPERSEDE_REDIS_URL": server.url, "SUPERSEDE_NAMESPACE": "benchx",
               "SUPERSEDE_SHARDS": "16"}  # fmt: skip
        redis = Redis.from_url(server.url)
        await ensure_groups(redis, settings.keys)
        procs.append(start(env, "admission", "--block-ms", "100"))
        procs.append(start(env, "executor", "bench.apps", "--slots", "40"))

        async def registered() -> bool:
            return int(await redis.hlen(settings.keys.workflows_hash)) == 2

        await wait_for(registered)
        procs.append(start(env, "ingress", "--block-ms", "100"))
        log("executor bench: cancel latency")
        await cancel_latency(redis, settings, env)
        procs[1].kill()
        procs[1].wait(30)
        log("executor bench: throughput")
        await executor_throughput(redis, settings, env, 5_000)
        await redis.aclose()
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
