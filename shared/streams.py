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
INGRESS_GROUP = "ingress"


def consumer_name(service: str) -> str:
    """Unique per process, readable in XINFO CONSUMERS."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def ensure_group(redis: Redis, stream: str, group: str) -> None:
    """Create `group` on `stream` from its first entry, so nothing published earlier is skipped."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def ensure_groups(redis: Redis, keys: Keys) -> None:
    """Create the inbox group and every shard's consumer groups (idempotent)."""
    await ensure_group(redis, keys.events_stream, INGRESS_GROUP)
    for sk in keys.all_shards():
        await ensure_group(redis, sk.requests_stream, ADMISSION_GROUP)
        await ensure_group(redis, sk.results_stream, ADMISSION_GROUP)
        await ensure_group(redis, sk.assignments_stream, EXECUTOR_GROUP)
