"""Cancel storm: how many cancels per second one executor absorbs while its event loop still
answers within 5 ms.

Every executor reads every cancel of the deployment (the control streams carry them all), so a
busy system's cancel rate lands on each executor. One executor runs alone; cancel messages for
runs it does not hold are written to the control streams at a rising rate, 3 s per step. A step
passes when the executor read them all (its `control_messages_total` kept up with the writes)
and the 99th percentile of its loop lag (`loop_lag_seconds`, a 0.1 s timer's lateness) stayed
within 5 ms. Reference: the pipelined XADD rate of the writing client, in the same run.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request

from redis.asyncio import Redis

from bench.common import log, no_arguments, pipelined_xadd, report
from supersede.config import Settings
from supersede.server import EmbeddedServer, free_port

RATES = (1_000, 2_000, 5_000, 10_000, 20_000, 40_000)
STEP_SECONDS = 3.0
LAG_BUDGET = 0.005


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("supersede_executor_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _lag_p99_within_budget(before: dict[str, float], after: dict[str, float]) -> bool:
    """99% of the loop-lag samples of the step fell in buckets up to the budget."""
    name = "supersede_executor_loop_lag_seconds"
    total = after[f"{name}_count"] - before[f"{name}_count"]
    le = f'{name}_bucket{{le="{LAG_BUDGET}"}}'
    within = after[le] - before[le]
    return total > 0 and within >= 0.99 * total


async def main() -> None:
    server = EmbeddedServer().start()
    settings = Settings(redis_url=server.url, namespace="storm", shards=16)
    keys = settings.keys
    port = free_port()
    env = {**os.environ, "SUPERSEDE_REDIS_URL": server.url, "SUPERSEDE_NAMESPACE": "storm",
           "SUPERSEDE_SHARDS": "16"}  # fmt: skip
    cmd = [sys.executable, "-m", "supersede", "executor", "bench.apps", "--metrics-port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    redis = Redis.from_url(server.url)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                base = await asyncio.to_thread(_scrape, port)
                if "supersede_executor_loop_lag_seconds_count" in base:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("executor did not start")
            await asyncio.sleep(0.2)
        shards = keys.all_shards()
        reference = await pipelined_xadd(redis, [("storm:ref", {"op": b"ref"})] * 20_000)
        log("cancel storm: rising cancel rates on one executor")
        absorbed = 0
        serial = 0
        for rate in RATES:
            before = await asyncio.to_thread(_scrape, port)
            read_before = before["supersede_executor_control_messages_total"]
            tick, written = 0.01, 0
            started = time.monotonic()
            while time.monotonic() - started < STEP_SECONDS:
                due = int((time.monotonic() - started) * rate) - written
                if due > 0:
                    async with redis.pipeline(transaction=False) as pipe:
                        for _ in range(due):
                            serial += 1
                            pipe.xadd(shards[serial % 16].control_stream,
                                      {"op": "cancel", "id": f"{serial % 16}-nope{serial}",
                                       "a": 1, "by": "", "why": "superseded"})  # fmt: skip
                        await pipe.execute()
                    written += due
                await asyncio.sleep(tick)
            await asyncio.sleep(0.5)  # let the last ones be read
            after = await asyncio.to_thread(_scrape, port)
            read = after["supersede_executor_control_messages_total"] - read_before
            kept_up = read >= written
            responsive = _lag_p99_within_budget(before, after)
            log(f"  {rate}/s: wrote {written}, read {read:.0f}, loop p99 within 5 ms: {responsive}")
            if not (kept_up and responsive):
                break
            absorbed = rate
        report("cancel_storm", absorbed, "cancels/s", reference,
               what="cancels one executor absorbs with its loop lag p99 within 5 ms",
               reference_name="pipelined_xadd")  # fmt: skip
    finally:
        proc.kill()
        proc.wait(10)
        await redis.aclose()
        server.stop()


if __name__ == "__main__":
    no_arguments(__doc__)
    asyncio.run(main())
