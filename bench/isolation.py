"""Process isolation: how long a cancel takes to stop a step in a worker process, from the
cancel decision (the record's `tc`) to the run recorded CANCELLED (`t3`, written once the step
returned or its process was gone, and its result applied): for a step that ignores its flag
(stopped by SIGTERM after the grace period; reference: the grace period) and for one that
honours it (reference: the XADD -> XREAD BLOCK wake-up of the same server). And debounce:
how late a debounced run is assigned after its window closed (the due time taken as when
admission read its event plus the window; reference: the same wake-up)."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess

import orjson
from redis.asyncio import Redis

from bench.common import log, no_arguments, report
from bench.executor import pct, start, wait_for, xread_wakeup_ms
from supersede.config import Settings
from supersede.server import EmbeddedServer
from supersede.services.ops import scan_runs
from supersede.streams import ensure_groups

GRACE = 0.2
DEBOUNCE_MS = 200  # bench/isolated_apps.py's `debounced`
KEYS_PER_ROUND, ROUNDS = 6, 4


async def stop_latencies(redis: Redis, settings: Settings, honours: bool) -> list[float]:
    """ms from each cancel decision to its run recorded CANCELLED, for ROUNDS rounds of
    KEYS_PER_ROUND keys: a long run per key, then a newer one that supersedes it."""
    keys, started_key = settings.keys, f"{settings.namespace}:bench:started"
    kind = "h" if honours else "i"
    for r in range(ROUNDS):
        names = [f"{kind}{r}-{i}" for i in range(KEYS_PER_ROUND)]
        before = int(await redis.scard(started_key))
        for k in names:
            data = orjson.dumps({"k": k, "honours": honours})
            await redis.xadd(keys.events_stream, {"name": "bench.stoppable", "data": data})

        async def started(n: int = before + len(names)) -> bool:
            return int(await redis.scard(started_key)) >= n

        await wait_for(started)
        for k in names:
            data = orjson.dumps({"k": k, "quick": True})
            await redis.xadd(keys.events_stream, {"name": "bench.stoppable", "data": data})

        async def ended(names: list[str] = names) -> bool:
            runs = [x for x in await scan_runs(redis, keys) if x.key in names]
            return sum(1 for x in runs if x.state.terminal) >= 2 * len(names)

        await wait_for(ended)
    return [
        float(run.ended_ms - run.cancel_decided_ms)
        for run in await scan_runs(redis, keys)
        if run.key.startswith(kind) and run.cancel_decided_ms and run.ended_ms
    ]


async def debounce_fire_errors(redis: Redis, settings: Settings) -> list[float]:
    """ms from each debounce window's close to its run assigned, for ROUNDS rounds of
    KEYS_PER_ROUND keys, each a burst of three events 20 ms apart."""
    keys = settings.keys
    for r in range(ROUNDS):
        names = [f"d{r}-{i}" for i in range(KEYS_PER_ROUND)]
        for _ in range(3):
            for k in names:
                data = orjson.dumps({"k": k})
                await redis.xadd(keys.events_stream, {"name": "bench.typed", "data": data})
            await asyncio.sleep(0.02)

        async def ended(names: list[str] = names) -> bool:
            runs = [x for x in await scan_runs(redis, keys) if x.key in names]
            return sum(1 for x in runs if x.state.terminal) >= 3 * len(names)

        await wait_for(ended)
    out = []
    for run in await scan_runs(redis, keys):
        points = dict(run.path())
        if run.workflow == "debounced" and run.state.value == "S":
            out.append(points["assigned"] - (points["admission read"] + DEBOUNCE_MS))
    return out


async def main() -> None:
    server = EmbeddedServer().start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        settings = Settings(redis_url=server.url, namespace="benchi", shards=16)
        env = {**os.environ, "SUPERSEDE_REDIS_URL": server.url, "SUPERSEDE_NAMESPACE": "benchi",
               "SUPERSEDE_SHARDS": "16"}  # fmt: skip
        redis = Redis.from_url(server.url)
        await ensure_groups(redis, settings.keys)
        procs.append(start(env, "admission", "--block-ms", "100"))
        procs.append(start(env, "executor", "bench.isolated_apps", "--slots", "8", "--grace",
                           str(GRACE), "--kill-after", "1"))  # fmt: skip

        async def registered() -> bool:
            return int(await redis.hlen(settings.keys.workflows_hash)) == 2

        await wait_for(registered)
        procs.append(start(env, "ingress", "--block-ms", "100"))
        log("isolation bench: cancel -> worker process stopped")
        reference = statistics.median(await xread_wakeup_ms(redis))
        for honours in (False, True):
            values = await stop_latencies(redis, settings, honours)
            name = "honours" if honours else "ignores"
            how = "returning at its flag" if honours else "ignoring its flag: SIGTERM"
            report(f"process_cancel_latency_{name}_p50", statistics.median(values), "ms",
                   reference if honours else GRACE * 1000, p99=round(pct(values, 0.99), 3),
                   samples=len(values),
                   reference_name="xadd_to_xread_block_wakeup_p50" if honours else "grace_ms",
                   what=f"cancel decided -> run recorded CANCELLED, its step in a worker "
                   f"process {how}")  # fmt: skip
        errors = await debounce_fire_errors(redis, settings)
        report("debounce_fire_error_p50", statistics.median(errors), "ms", reference,
               p99=round(pct(errors, 0.99), 3), samples=len(errors), debounce_ms=DEBOUNCE_MS,
               reference_name="xadd_to_xread_block_wakeup_p50",
               what="debounce window closed -> its run assigned")  # fmt: skip
        await redis.aclose()
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
        server.stop()


if __name__ == "__main__":
    no_arguments(__doc__)
    asyncio.run(main())
