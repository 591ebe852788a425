"""Shared bits of the benchmarks: the BENCH line and a fresh server per run."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from supersede.errors import ConfigError
from supersede.keys import Keys
from supersede.service import open_cpu_latency_device, request_cpu_latency

RESULTS: dict[str, float] = {}
"""Every figure reported in this process, by name: the comparisons across benchmarks."""


def report(name: str, value: float, unit: str, reference: float | None, **extra: Any) -> None:
    """Print one `BENCH {json}` line; ratio = value / reference measured in the same run."""
    RESULTS[name] = value
    line: dict[str, Any] = {
        "name": name,
        "value": round(value, 3),
        "unit": unit,
        "reference": round(reference, 3) if reference else None,
        "ratio": round(value / reference, 4) if reference else None,
    }
    line.update(extra)
    print("BENCH " + orjson.dumps(line).decode(), flush=True)


async def pipelined_xadd(
    redis: Redis, items: list[tuple[str, dict[str, bytes]]], chunk: int = 1000
) -> float:
    """Write items with pipelined XADD; returns entries per second (the reference rate)."""
    started = time.perf_counter()
    for i in range(0, len(items), chunk):
        async with redis.pipeline(transaction=False) as pipe:
            for stream, fields in items[i : i + chunk]:
                pipe.xadd(stream, fields)
            await pipe.execute()
    return len(items) / (time.perf_counter() - started)


async def apps_registered(redis: Redis | RedisCluster, keys: Keys) -> bool:
    """Every workflow of bench/apps.py is registered (an executor serving it started)."""
    from bench import apps
    from supersede.workflow import Workflow

    wanted = sum(isinstance(v, Workflow) for v in vars(apps).values())
    return int(await redis.hlen(keys.workflows_hash)) == wanted


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_latency_holdable() -> bool:
    """The held rounds need /dev/cpu_dma_latency (Linux, written as root; opening it is the
    test, since a container's device rules can refuse root)."""
    try:
        os.close(open_cpu_latency_device(0))
    except ConfigError:
        return False
    return True


@contextlib.contextmanager
def cpu_latency_held() -> Iterator[None]:
    """The host's CPUs kept out of idle states deeper than 0 µs while inside (the PM QoS
    request SUPERSEDE_CPU_LATENCY_US=0 makes a service hold), for a reference measured under
    the same condition."""
    fd = request_cpu_latency(0)
    try:
        yield
    finally:
        os.close(fd)


def no_arguments(doc: str | None) -> None:
    """A benchmark module that takes no argument: `--help` prints what it measures and exits,
    and any argument is refused (each started the whole benchmark: minutes of CPU, a newcomer
    probe)."""
    import argparse

    argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
