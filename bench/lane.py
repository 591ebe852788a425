"""One round trip, through redis-py's asyncio client and through a lane (shared/lane.py): the
wall time and the client's CPU time per call of an EVALSHA (a one-line script) and of an
XREADGROUP that returns one entry, on the loop the services run (uvloop). Reference: the same
call through redis-py, measured in the same run, so the ratio is the lane's share of it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from bench.common import no_arguments, report
from supersede.config import connect
from supersede.lane import lane_of
from supersede.server import EmbeddedServer
from supersede.service import loop_factory

CALLS = 5_000


async def _per_call(call: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """µs of wall time and of this process's CPU per call, over CALLS calls."""
    for _ in range(200):  # (warm: connections made, scripts cached)
        await call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(CALLS):
        await call()
    return (
        (time.perf_counter() - wall) / CALLS * 1e6,
        (time.process_time() - cpu) / CALLS * 1e6,
    )


async def main() -> None:
    server = EmbeddedServer().start()
    redis: Redis = connect(server.url)
    lane = lane_of(redis)
    assert lane is not None
    try:
        sha = await redis.script_load("return ARGV[1]")
        stream = "bench:lane"
        await redis.xgroup_create(stream, "g", id="0", mkstream=True)
        await redis.xadd(stream, {"f": "v"})
        # An XREADGROUP of the one pending entry (re-read from 0): a read that returns an entry,
        # as each hop's read does, without consuming anything.
        calls: dict[str, tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[Any]]]] = {
            "evalsha": (
                lambda: redis.evalsha(sha, 0, "x"),
                lambda: lane.execute("EVALSHA", sha, 0, "x"),
            ),
            "xreadgroup": (
                lambda: redis.xreadgroup("g", "c", {stream: "0"}, count=1),
                lambda: lane.xreadgroup("g", "c", {stream: "0"}, count=1),
            ),
        }
        await redis.xreadgroup("g", "c", {stream: ">"})  # (the entry pending for "c")
        for name, (through_redis_py, through_lane) in calls.items():
            wall_py, cpu_py = await _per_call(through_redis_py)
            wall, cpu = await _per_call(through_lane)
            report(f"lane_{name}_wall_us", wall, "us", wall_py, calls=CALLS,
                   reference_name=f"redis_py_{name}_wall_us")  # fmt: skip
            report(f"lane_{name}_cpu_us", cpu, "us", cpu_py, calls=CALLS,
                   reference_name=f"redis_py_{name}_cpu_us")  # fmt: skip
    finally:
        await lane.aclose()
        await redis.aclose()
        server.stop()


def run() -> None:
    """On the services' loop (uvloop unless SUPERSEDE_EVENT_LOOP=asyncio)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())


if __name__ == "__main__":
    no_arguments(__doc__)
    run()
