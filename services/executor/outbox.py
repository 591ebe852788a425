"""The result outbox: outcomes XADDed to their shard's results stream, one pipeline per turn,
so a thousand runs ending together cost one round trip, not a thousand connections."""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis

from supersede.keys import Keys
from supersede.protocol import PAYLOAD, RunResult
from supersede.services.executor.config import ExecutorConfig

log = logging.getLogger("supersede.executor")


class Outbox:
    def __init__(self, redis: Redis, keys: Keys, config: ExecutorConfig) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self._pending: list[tuple[int, bytes, asyncio.Future[None]]] = []
        self._ready = asyncio.Event()

    def put(self, shard: int, result: RunResult) -> asyncio.Future[None]:
        """Queue one outcome; the future resolves once it is written (or fails)."""
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((shard, result.pack(), written))
        self._ready.set()
        return written

    async def loop(self) -> None:
        """Write what is queued, turn after turn, until cancelled.

        A failed write (a failover, say) is retried for up to a lease: after that the reaper
        has retried the run elsewhere and this result would be discarded as stale anyway."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._pending = self._pending, []
            error = await self._write(batch)
            for _, _, fut in batch:
                if fut.done():
                    continue
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

    async def _write(
        self, batch: list[tuple[int, bytes, asyncio.Future[None]]]
    ) -> Exception | None:
        deadline = time.monotonic() + self.config.lease_ms / 1000
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for shard, payload, _ in batch:
                        pipe.xadd(self.keys.shard(shard).results_stream, {PAYLOAD: payload})
                    await pipe.execute()
                return None
            except Exception as exc:  # redis-py can raise others mid-failover
                if time.monotonic() > deadline:
                    return exc
                log.warning("results not written yet; retrying", extra={"runs": len(batch)})
                await asyncio.sleep(0.2)
