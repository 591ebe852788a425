"""Consumer groups and the small stream helpers every service uses."""

from __future__ import annotations

import os
import socket
import uuid

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.keys import Keys

ADMISSION_GROUP = "admission"
EXECUTOR_GROUP = "executors"


def consumer_name(service: str) -> str:
    """Unique per process, readable in XINFO CONSUMERS."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def ensure_groups(redis: Redis, keys: Keys) -> None:
    """Create every shard's consumer groups from the start of their streams (idempotent)."""
    for sk in keys.all_shards():
        for stream, group in (
            (sk.requests_stream, ADMISSION_GROUP),
            (sk.results_stream, ADMISSION_GROUP),
            (sk.assignments_stream, EXECUTOR_GROUP),
        ):
            try:
                await redis.xgroup_create(stream, group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
