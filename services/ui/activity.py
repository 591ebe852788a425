"""Runs ended, and cancelled, per minute over the last minutes: the overview's chart. Read from
the ended streams incrementally (each look reads only the entries added since the last one), so
an open overview costs the server a few commands per refresh, whatever the retention."""

from __future__ import annotations

import time
from collections import Counter

from redis.asyncio import Redis

from supersede import codec
from supersede.keys import Keys
from supersede.protocol import RunState
from supersede.services.ops import ended_streams

MINUTES = 10  # the window shown
READ = 10_000  # entries per stream and look (a busier minute is caught up on the next looks)
CANCELLED = RunState.CANCELLED.value


class Activity:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.last: dict[str, str] = {}  # stream -> the newest entry id counted
        self.minutes: dict[int, Counter[str]] = {}  # epoch minute -> state letter -> runs
        self.looked = 0.0

    async def look(self, every: float = 1.0) -> None:
        """Count the entries added since the last look (at most once per `every` s)."""
        if time.monotonic() - self.looked < every:
            return
        self.looked = time.monotonic()
        floor = int(time.time() * 1000) - MINUTES * 60_000
        streams = await ended_streams(self.redis, self.keys, None)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in streams:
                start = "(" + self.last[name] if name in self.last else str(floor)
                pipe.xrange(name, start, "+", count=READ)
            replies = await pipe.execute()
        for name, entries in zip(streams, replies, strict=True):
            for entry_id, fields in entries:
                eid = codec.text(entry_id)
                minute = int(eid.partition("-")[0]) // 60_000
                counts = self.minutes.setdefault(minute, Counter())
                for state, ids in fields.items():
                    counts[codec.text(state)] += codec.text(ids).count(",") + 1
                self.last[name] = eid
        for minute in [m for m in self.minutes if m < floor // 60_000]:
            del self.minutes[minute]

    def series(self) -> list[tuple[int, int, int]]:
        """(epoch minute, runs ended, runs cancelled) of the last MINUTES minutes, oldest first."""
        now = int(time.time()) // 60
        out = []
        for minute in range(now - MINUTES + 1, now + 1):
            c = self.minutes.get(minute, Counter())
            out.append((minute, sum(c.values()), c[CANCELLED]))
        return out
