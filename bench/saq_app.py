"""The SAQ worker of the reference benchmark (`python -m saq bench.saq_app.settings`): a no-op
job, and a probe job that records when it started, written from a thread as bench/apps.py does
for supersede's probe, so both pay the same for the measurement."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis
from redis.asyncio import Redis
from saq.queue.redis import RedisQueue as Queue

URL = os.environ.get("SAQ_BENCH_URL", "redis://127.0.0.1:6379/0")
STARTED_AT = "saqbench:started-at"

_redis = redis.Redis.from_url(URL)
MAX_CONNECTIONS = 1000  # redis-py's default pool (100) is too small for 100 concurrent jobs


def queue(url: str = URL) -> Queue:
    return Queue(Redis.from_url(url, max_connections=MAX_CONNECTIONS), name="bench")


async def noop(ctx: Any) -> None:
    return None


async def probe(ctx: Any, *, n: int) -> None:
    now = repr(time.time())
    asyncio.get_running_loop().run_in_executor(None, _redis.hset, STARTED_AT, str(n), now)


settings = {
    "queue": queue(),
    "functions": [noop, probe],
    "concurrency": 100,
}
