"""End-to-end throughput on a real 3-master cluster, against the single-server figure measured
in the same run (same services, same no-op workflow, both as separate processes)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from bench.common import apps_registered, log, no_arguments, report
from bench.executor import start, wait_for
from supersede.keys import Keys
from supersede.server import EmbeddedCluster, EmbeddedServer
from supersede.services.ops import ended_runs


async def e2e(url: str, client: Any, n: int) -> float:
    keys = Keys("benchcl", 16)
    env = {**os.environ, "SUPERSEDE_REDIS_URL": url, "SUPERSEDE_NAMESPACE": keys.namespace,
           "SUPERSEDE_SHARDS": "16"}  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = [start(env, "admission", "--block-ms", "100")]
    procs += [start(env, "executor", "bench.apps", "--slots", "100") for _ in range(2)]
    try:

        async def registered() -> bool:
            return await apps_registered(client, keys)

        await wait_for(registered)
        procs.append(start(env, "ingress", "--block-ms", "100"))

        async def ingress_ready() -> bool:
            return bool(await client.exists(keys.events_stream))

        await wait_for(ingress_ready)
        started = time.perf_counter()
        for i in range(0, n, 500):
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(min(500, n - i)):
                    pipe.xadd(keys.events_stream, {"name": b"bench.noop", "data": b"{}"})
                await pipe.execute()

        async def finished() -> bool:
            return await ended_runs(client, keys) >= n

        await wait_for(finished, timeout=300)
        return n / (time.perf_counter() - started)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


async def main(n: int = 10_000) -> None:
    server = EmbeddedServer().start()
    cluster = EmbeddedCluster(3).start()
    try:
        log(f"cluster bench: {n} no-op runs end to end, single server then 3-node cluster")
        single_client = Redis.from_url(server.url)
        single = await e2e(server.url, single_client, n)
        await single_client.aclose()
        cluster_client = RedisCluster.from_url(cluster.url)
        url = f"redis+cluster://127.0.0.1:{cluster.nodes[0].port}"
        clustered = await e2e(url, cluster_client, n)
        await cluster_client.aclose()
        report("e2e_throughput_cluster", clustered, "runs/s", single, runs=n, masters=3,
               reference_name="e2e_throughput_single_server")  # fmt: skip
    finally:
        cluster.stop()
        server.stop()


if __name__ == "__main__":
    no_arguments(__doc__)
    asyncio.run(main())
