"""`make soak`: memory under a steady load must plateau.

The whole system (ingress and admission with a short retention and de-duplication window, two
executors) runs no-op events at a steady rate for `--duration` seconds. The server's
`used_memory` is sampled every 5 s; once two retention windows have passed, every sample must
lie within 10% of their mean: records, streams and indexes are bounded by what the retention
and the consumers hold, not by how long the system has run. Prints one `SOAK {json}` line;
exits 1 when memory did not plateau.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import orjson
from redis.asyncio import Redis

from bench.common import log
from supersede.server import EmbeddedServer


async def soak(duration: float, rate: float, retention: float) -> dict[str, object]:
    server = EmbeddedServer().start()
    env = {**os.environ, "SUPERSEDE_REDIS_URL": server.url, "SUPERSEDE_NAMESPACE": "soak",
           "SUPERSEDE_SHARDS": "16"}  # fmt: skip

    def start(*args: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "supersede", *args, "--metrics-port", "0"]
        return subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)

    procs = [
        start(
            "admission",
            "--retention",
            str(retention),
            "--min-retention",
            str(retention),
            "--trim-interval",
            "1",
        ),
        start("executor", "bench.apps", "--slots", "100"),
        start("executor", "bench.apps", "--slots", "100"),
    ]
    redis = Redis.from_url(server.url)
    samples: list[tuple[float, int]] = []
    published = 0
    try:
        while int(await redis.hlen("{soak}:workflows")) < 3:
            await asyncio.sleep(0.1)
        procs.append(start("ingress", "--dedup-window", str(retention)))
        data = orjson.dumps({"pad": "x" * 90})
        started = time.monotonic()
        next_sample = started
        while (now := time.monotonic()) - started < duration:
            due = int((now - started) * rate) - published
            if due > 0:
                async with redis.pipeline(transaction=False) as pipe:
                    for _ in range(due):
                        pipe.xadd("soak:events", {"name": "bench.noop", "data": data})
                    await pipe.execute()
                published += due
            if now >= next_sample:
                memory = await redis.info("memory")
                samples.append((now - started, int(memory["used_memory"])))
                next_sample += 5
            await asyncio.sleep(0.01)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        await redis.aclose()
        server.stop()
    settled = [m for t, m in samples if t >= 2 * retention]
    mean = statistics.fmean(settled) if settled else 0.0
    spread = max(abs(m - mean) for m in settled) / mean if settled else 1.0
    return {
        "duration_s": duration,
        "rate": rate,
        "retention_s": retention,
        "published": published,
        "samples_after_two_retentions": len(settled),
        "used_memory_mean_mb": round(mean / 2**20, 1),
        "used_memory_max_deviation": round(spread, 3),
        "first_and_last_mb": [round(samples[0][1] / 2**20, 1), round(samples[-1][1] / 2**20, 1)]
        if samples
        else [],
        "ok": bool(settled) and spread <= 0.10,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    p.add_argument("--rate", type=float, default=2000, help="events per second (default 2000)")
    p.add_argument("--retention", type=float, default=60, help="retention of ended runs, s")
    args = p.parse_args(argv)
    log(f"soak: {args.rate:.0f} events/s for {args.duration:.0f} s, retention {args.retention} s")
    result = asyncio.run(soak(args.duration, args.rate, args.retention))
    print("SOAK " + orjson.dumps(result).decode(), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
