"""SAQ, the reference of the latency and throughput targets: its enqueue -> job started latency
at 200 jobs/s and its throughput of no-op jobs (one worker process, concurrency 100), on a
server of its own, measured the way the executor benchmark measures supersede; then the
comparison lines, supersede's figure against SAQ's from the same `make bench` run. `held`: the
start latency only, with the host's CPUs held out of deep idle as `supersede serve` holds them
under SUPERSEDE_CPU_LATENCY_US=0 (lines `saq_held_…`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time

from redis.asyncio import Redis

from bench.common import RESULTS, cpu_latency_held, log, no_arguments, report
from bench.executor import pct, wait_for, xread_wakeup_ms
from supersede.server import EmbeddedServer


async def main(latency_jobs: int = 400, jobs: int = 20_000, held: bool = False) -> None:
    from bench.saq_app import STARTED_AT, queue

    prefix = "saq_held_" if held else "saq_"

    server = EmbeddedServer().start()
    env = {**os.environ, "SAQ_BENCH_URL": server.url}
    cmd = [sys.executable, "-m", "saq", "bench.saq_app.settings", "--quiet"]
    worker = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    jobs_queue = queue(server.url)
    redis = Redis.from_url(server.url)
    try:
        await jobs_queue.connect()
        log(
            "saq reference: start latency"
            + (", CPUs held out of deep idle" if held else ", throughput")
        )

        async def drained() -> bool:
            return int(await jobs_queue.count("incomplete")) == 0

        await jobs_queue.enqueue("noop")  # the worker is up once its first job ran
        await wait_for(drained, timeout=60)
        sent: dict[int, float] = {}
        with cpu_latency_held() if held else contextlib.nullcontext():
            for n in range(latency_jobs):
                sent[n] = time.time()
                await jobs_queue.enqueue("probe", n=n)
                await asyncio.sleep(0.005)  # paced at ~200 jobs/s, as supersede's probe events

            async def all_started() -> bool:
                return int(await redis.hlen(STARTED_AT)) >= latency_jobs

            await wait_for(all_started)
            wakeup = await xread_wakeup_ms(redis)
        started = {int(k): float(v) for k, v in (await redis.hgetall(STARTED_AT)).items()}
        lat = [(started[n] - t) * 1000 for n, t in sent.items()]
        report(f"{prefix}start_latency_p50", statistics.median(lat), "ms",
               statistics.median(wakeup), samples=len(lat),
               reference_name="xadd_to_xread_block_wakeup_p50",
               what="SAQ 0.26: enqueue -> job started, 200 jobs/s")  # fmt: skip
        report(f"{prefix}start_latency_p99", pct(lat, 0.99), "ms", pct(wakeup, 0.99),
               samples=len(lat), reference_name="xadd_to_xread_block_wakeup_p99")  # fmt: skip
        if not held:  # (the held round measures the start latency only)
            await wait_for(drained, timeout=60)
            began = time.perf_counter()
            for i in range(0, jobs, 100):  # enqueued concurrently, 100 round trips at a time
                await asyncio.gather(
                    *(jobs_queue.enqueue("noop") for _ in range(min(100, jobs - i)))
                )
            await wait_for(drained, timeout=600)
            rate = jobs / (time.perf_counter() - began)
            report("saq_throughput", rate, "jobs/s", None, jobs=jobs, concurrency=100,
                   what="SAQ 0.26: enqueued -> all done, no-op jobs")  # fmt: skip
    finally:
        worker.terminate()
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(5)
        await jobs_queue.disconnect()
        await redis.aclose()
        server.stop()
    compare(held)


def compare(held: bool = False) -> None:
    """supersede against SAQ, both from this run: the targets of the latency issue."""
    got = RESULTS
    if held:
        if "serve_held_start_latency_p50" in got:
            # (both with the host's CPUs held out of deep idle, one after the other)
            report("serve_held_start_latency_p50_vs_saq", got["serve_held_start_latency_p50"],
                   "ms", got["saq_held_start_latency_p50"], target=1.0)  # fmt: skip
            report("serve_held_start_latency_p99_vs_saq", got["serve_held_start_latency_p99"],
                   "ms", got["saq_held_start_latency_p99"], target_ratio_at_most=1.0)  # fmt: skip
        return
    if "start_latency_p50" in got:
        report("start_latency_p50_vs_saq", got["start_latency_p50"], "ms",
               got["saq_start_latency_p50"], target=1.0)  # fmt: skip
        report("start_latency_p99_vs_saq", got["start_latency_p99"], "ms",
               got["saq_start_latency_p99"], target_ratio_at_most=1.0)  # fmt: skip
    if "e2e_throughput" in got:
        report("e2e_throughput_vs_saq", got["e2e_throughput"], "runs/s", got["saq_throughput"],
               target_ratio_at_least=7.0)  # fmt: skip


if __name__ == "__main__":
    no_arguments(__doc__)
    asyncio.run(main())
