"""Where the CPU of a run goes, per process: the separate services (admission, ingress, two
executors of 100 slots) and the server run 20,000 no-op runs published at once, twice; each
process's CPU time (user + system, from /proc) over the run, divided by the runs. The sum is
what one run costs the machine; 2 cores / that sum is the throughput the machine allows, the
ceiling of `e2e_throughput` here. Reference: the bench's own publishing (pipelined XADD), in
the same run. Lines `cpu_us_per_run_<process>` and `cpu_us_per_run_total`. Linux only."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from redis.asyncio import Redis

from bench.common import apps_registered, log, no_arguments, pipelined_xadd, report
from bench.executor import start, wait_for
from supersede.config import Settings
from supersede.server import EmbeddedServer
from supersede.services.ops import ended_runs
from supersede.streams import ensure_groups


def _cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(n: int = 20_000, rounds: int = 2) -> None:
    if not os.path.exists("/proc/self/stat"):
        log("cpu split: skipped (no /proc)")
        return
    server = EmbeddedServer().start()
    settings = Settings(redis_url=server.url, namespace="benchc", shards=16)
    env = {**os.environ, "SUPERSEDE_REDIS_URL": server.url, "SUPERSEDE_NAMESPACE": "benchc",
           "SUPERSEDE_SHARDS": "16"}  # fmt: skip
    redis = Redis.from_url(server.url)
    procs = {}
    try:
        await ensure_groups(redis, settings.keys)
        procs["admission"] = start(env, "admission", "--block-ms", "100")
        for name in ("executor1", "executor2"):
            procs[name] = start(env, "executor", "bench.apps", "--slots", "100")
        await wait_for(lambda: apps_registered(redis, settings.keys))
        procs["ingress"] = start(env, "ingress", "--block-ms", "100")
        log("cpu split: CPU per run of each process, separate services")
        keys = settings.keys
        noop = (keys.events_stream, {"name": b"bench.noop", "data": b"{}"})
        warm = [noop] * 2000

        async def warmed() -> bool:  # every process started and ran runs: no start-up counted
            return await ended_runs(redis, keys) >= len(warm)

        await pipelined_xadd(redis, warm)
        await wait_for(warmed, timeout=120)
        server_pid = int((await redis.info("server"))["process_id"])
        items = [noop] * n
        totals: dict[str, float] = {}
        xadd_us = 0.0
        for _ in range(rounds):
            base = await ended_runs(redis, keys)
            before = {k: _cpu_seconds(p.pid) for k, p in procs.items()}
            before["redis"] = _cpu_seconds(server_pid)
            mine = time.process_time()
            await pipelined_xadd(redis, items)
            xadd_us += (time.process_time() - mine) / n * 1e6

            async def ended(base: int = base) -> bool:
                return await ended_runs(redis, keys) >= base + n

            await wait_for(ended, timeout=300)
            after = {k: _cpu_seconds(p.pid) for k, p in procs.items()}
            after["redis"] = _cpu_seconds(server_pid)
            for k in after:
                totals[k] = totals.get(k, 0.0) + (after[k] - before[k]) / n * 1e6
        reference = xadd_us / rounds
        for k in ("ingress", "admission", "executor1", "executor2", "redis"):
            report(f"cpu_us_per_run_{k}", totals[k] / rounds, "us", reference, runs=n * rounds,
                   reference_name="bench_cpu_us_per_pipelined_xadd")  # fmt: skip
        report("cpu_us_per_run_total", sum(totals.values()) / rounds, "us", reference,
               runs=n * rounds, reference_name="bench_cpu_us_per_pipelined_xadd",
               what="ingress + admission + 2 executors + server, no-op runs")  # fmt: skip
    finally:
        for p in procs.values():
            p.kill()
            p.wait(5)
        await redis.aclose()
        server.stop()


if __name__ == "__main__":
    no_arguments(__doc__)
    asyncio.run(main())
