"""Publishing events from Python: the same contract as a plain `XADD <ns>:events`.

Fields: `name` (the event name), `data` (a JSON object as text), optional `id` (idempotency key;
default: the stream entry id) and optional `metadata` (a JSON object as text).
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import redis as redis_sync
from redis.asyncio import Redis

from supersede.config import DEFAULT_NAMESPACE
from supersede.keys import inbox_stream
from supersede.protocol import Inbox


def event_fields(
    name: str,
    data: dict[str, Any],
    *,
    id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[bytes, bytes]:
    """The inbox fields of one event; raises TypeError/ValueError on a bad argument."""
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")
    if not isinstance(data, dict):
        raise TypeError("data must be a dict (a JSON object)")
    fields = {Inbox.NAME: name.encode(), Inbox.DATA: orjson.dumps(data)}
    if id is not None:
        fields[Inbox.ID] = str(id).encode()
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError("metadata must be a dict (a JSON object)")
        fields[Inbox.METADATA] = orjson.dumps(metadata)
    return fields


def inbox(namespace: str | None = None) -> str:
    return inbox_stream(namespace or os.environ.get("SUPERSEDE_NAMESPACE", DEFAULT_NAMESPACE))


async def publish(
    redis: Redis,
    name: str,
    data: dict[str, Any],
    *,
    id: str | None = None,
    metadata: dict[str, Any] | None = None,
    namespace: str | None = None,
) -> str:
    """Append one event to the inbox; returns its stream entry id."""
    fields = event_fields(name, data, id=id, metadata=metadata)
    entry = await redis.xadd(inbox(namespace), fields)  # type: ignore[arg-type]
    return entry.decode() if isinstance(entry, bytes) else str(entry)


def publish_sync(
    redis: redis_sync.Redis,
    name: str,
    data: dict[str, Any],
    *,
    id: str | None = None,
    metadata: dict[str, Any] | None = None,
    namespace: str | None = None,
) -> str:
    """`publish` for synchronous code."""
    fields = event_fields(name, data, id=id, metadata=metadata)
    entry = redis.xadd(inbox(namespace), fields)  # type: ignore[arg-type]
    return entry.decode() if isinstance(entry, bytes) else str(entry)
