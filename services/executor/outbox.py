"""The result outbox: outcomes XADDed to their shard's results stream, one pipeline per turn,
so a thousand runs ending together cost one round trip, not a thousand connections.

Under `supersede serve` the outcomes of a turn are applied by the admission of the same process
instead (`sink`: one finish call, no results-stream entry); whatever that call does not take
(a result it refuses, an error) is written to the streams as above."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from supersede.errors import describe
from supersede.keys import Keys
from supersede.protocol import PAYLOAD, RunResult
from supersede.services.executor.config import ExecutorConfig

log = logging.getLogger("supersede.executor")

# Applies packed results of several shards at once, in this process (`supersede serve`).
Sink = Callable[[dict[int, list[bytes]]], Awaitable[None]]


class Outbox:
    def __init__(self, redis: Redis, keys: Keys, config: ExecutorConfig) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self._pending: list[tuple[int, bytes, asyncio.Future[bool]]] = []
        self._ready = asyncio.Event()
        self.sink: Sink | None = None

    def put(self, shard: int, result: RunResult) -> asyncio.Future[bool]:
        """Queue one outcome; the future resolves once it is written to a stream (False) or
        applied in this process (True), or fails. (The runner renews the run's lease either
        way until the heartbeat finds it ended: a failover can lose either write.)"""
        written: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((shard, result.pack(), written))
        self._ready.set()
        return written

    async def loop(self) -> None:
        """Write what is queued, turn after turn, until cancelled.

        A failed write (a failover, say) is retried for up to a lease (after an in-process
        call that failed, for up to a third of one): after that the reaper has retried the run
        elsewhere and this result would be discarded as stale anyway."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._pending = self._pending, []
            applied = await self._apply_here(batch)
            error = None if applied else await self._write(batch)
            for _, _, fut in batch:
                if fut.done():
                    continue
                if error is None:
                    fut.set_result(applied)
                else:
                    fut.set_exception(error)

    async def _apply_here(self, batch: list[tuple[int, bytes, asyncio.Future[bool]]]) -> bool:
        """The batch applied by the sink, if there is one and it takes all of it. A refused
        result or a failed call: the batch goes to the streams, where admission's read
        dead-letters a bad one and applies the rest (a result applied twice is a no-op; on a
        cluster, where each shard has its own call, the shards that did apply are applied
        again, as stale)."""
        if self.sink is None:
            return False
        by_shard: dict[int, list[bytes]] = {}
        for shard, payload, _ in batch:
            by_shard.setdefault(shard, []).append(payload)
        try:
            # (bounded: a stalled call would hold every later result, and with them the slots)
            await asyncio.wait_for(self.sink(by_shard), self.config.lease_ms / 3000)
        except Exception as exc:
            log.warning("results not applied in this process; writing them to the streams",
                        extra={"runs": len(batch), "error": describe(exc)})  # fmt: skip
            return False
        return True

    async def _write(
        self, batch: list[tuple[int, bytes, asyncio.Future[bool]]]
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
