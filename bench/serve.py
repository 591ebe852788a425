"""`supersede serve` (ingress, admission and an executor in one process, 100 slots) against the
separate services: the start latency at 200 events/s with its hops, the end-to-end throughput
of no-op runs, and the server's memory and CPU per run; references as in the executor
benchmark (the XADD wake-up, the pipelined XADD rate, a pipelined XADD's memory and CPU).
`held`: the start latency only, with SUPERSEDE_CPU_LATENCY_US=0 (lines `serve_held_…`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from redis.asyncio import Redis

from bench.common import apps_registered, log, no_arguments
from bench.executor import (
    cost_per_run,
    e2e_throughput,
    start_latency,
    wait_for,
    xread_wakeup_ms,
)
from supersede.config import Settings
from supersede.protocol import INGRESS_GROUP
from supersede.server import EmbeddedServer
from supersede.streams import ensure_groups


async def main(held: bool = False) -> None:
    server = EmbeddedServer().start()
    settings = Settings(redis_url=server.url, namespace="benchs", shards=16)
    env = {**os.environ, "SUPERSEDE_REDIS_URL": server.url, "SUPERSEDE_NAMESPACE": "benchs",
           "SUPERSEDE_SHARDS": "16"}  # fmt: skip
    if held:
        env["SUPERSEDE_CPU_LATENCY_US"] = "0"
    cmd = [sys.executable, "-m", "supersede", "serve", "bench.apps", "--slots", "100",
           "--metrics-port", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    redis = Redis.from_url(server.url)
    try:
        await ensure_groups(redis, settings.keys)
        log(
            "serve bench: all-in-one start latency"
            + (", CPUs held out of deep idle" if held else ", end-to-end throughput")
        )

        async def ready() -> bool:  # registered, and ingress reads the inbox
            if not await apps_registered(redis, settings.keys):
                return False
            readers = await redis.xinfo_consumers(settings.keys.events_stream, INGRESS_GROUP)
            return bool(readers)

        await wait_for(ready)
        prefix = "serve_held_" if held else "serve_"
        await start_latency(redis, settings, await xread_wakeup_ms(redis), prefix=prefix)
        if held:
            return
        await e2e_throughput(redis, settings, 20_000, name="serve_e2e_throughput")
        await cost_per_run(redis, settings, 20_000, prefix="serve_")
    finally:
        proc.kill()
        proc.wait(10)
        await redis.aclose()
        server.stop()


if __name__ == "__main__":
    no_arguments(__doc__)
    asyncio.run(main())
