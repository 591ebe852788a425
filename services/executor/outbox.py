"""The result outbox: each turn's outcomes applied with one `finish` call of the executor's own
(`FinishHere`: one per shard on a cluster), so a thousand runs ending together cost one round
trip, and no results-stream entry is written, read, acknowledged or trimmed. Whatever that call
does not take (a result it refuses, an error, a call slower than a third of a lease) is XADDed
to the shards' results streams, one pipeline per turn, and admission applies it from there
(and dead-letters a bad one). A result applied twice is stale: a no-op. A user without the
rights of the finish script (an ACL user created before executors applied their results) sends
every result the stream's way, after one warning."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from supersede import aio
from supersede.errors import describe
from supersede.keys import Keys
from supersede.logs import Sampled
from supersede.protocol import ASSIGN_DEADLINE_FIELD, PAYLOAD, RunResult
from supersede.scripts import Scripts, Turn
from supersede.service import Throttle
from supersede.services.executor import metrics
from supersede.services.executor.config import ExecutorConfig

log = logging.getLogger("supersede.executor")
# (lines that repeat while the server is down: written once per 5 s, with how many were not)
_NOT_WRITTEN_YET = Sampled()
_NOT_APPLIED = Sampled()

DEADLINE_EVERY = 10.0  # seconds between two reads of admission's assignment deadline

# Applies packed results of several shards at once; returns the call's turn number (> 0).
Sink = Callable[[dict[int, list[bytes]]], Awaitable[int]]


class FinishHere:
    """The executor applies its results itself: one `finish` call for a turn's results of
    every shard (one per shard on a cluster, each on its node), with no results-stream entry.
    A refused result raises ScriptError (the outbox writes the turn to the streams instead).
    The assignment deadline of the runs the call starts in the freed slots is admission's, which
    it publishes in the config hash (read again every DEADLINE_EVERY seconds: admission may
    start later, or with another value); 0 until known: the reaper's first look at them comes
    after a second, and the reaper, which knows the deadline, puts them back until it.

    Each call is a turn, numbered from 1, and sets the executor's turn key of each shard it
    applies results in to the range of its turns there with no gap (in the same script, so the
    key and the results survive a crash or a failover together, and a lost turn breaks the
    range): the lease keeper confirms a turn's runs ended with one read of those keys, instead
    of asking about each run (see lua/finish.lua)."""

    def __init__(self, scripts: Scripts, executor: str, lease_ms: int, *, cluster: bool) -> None:
        self.scripts = scripts
        self.executor = executor
        self.cluster = cluster
        self.assign_deadline_ms = 0
        self.turn = 0
        self.last_turn: dict[int, int] = {}  # shard -> the last turn of ours applied there
        # (read within a beat of the call; an expired key only sends the runs the per-run way)
        self.turn_ttl_ms = max(60_000, 10 * lease_ms)
        self._deadline_due = Throttle(DEADLINE_EVERY)

    async def __call__(self, batches: dict[int, list[bytes]]) -> int:
        items = {shard: [(b"", p) for p in payloads] for shard, payloads in batches.items()}
        if self._deadline_due.due():
            try:
                keys = self.scripts.keys
                raw = await self.scripts.redis.hget(keys.config_hash, ASSIGN_DEADLINE_FIELD)
                self.assign_deadline_ms = int(raw or 0)
            except Exception as exc:  # (the last one known serves; the results go on)
                log.warning("assignment deadline not read", extra={"error": describe(exc)})
        deadline = self.assign_deadline_ms
        self.turn += 1
        turn = Turn(self.executor, self.turn, self.turn_ttl_ms, dict(self.last_turn))
        if self.cluster:
            done = await aio.gather(
                *(
                    self.scripts.finish(s, part, assign_deadline_ms=deadline, turn=turn)
                    for s, part in items.items()
                )
            )
        else:
            done = [await self.scripts.finish_shards(items, assign_deadline_ms=deadline, turn=turn)]
        for shard in items:  # (not after a call that raised: the next one starts a new range)
            self.last_turn[shard] = turn.number
        metrics.RESULTS.labels("applied").inc(sum(r.applied for r in done))
        metrics.RESULTS.labels("stale").inc(sum(r.stale for r in done))
        metrics.ASSIGNED.inc(sum(r.assigned for r in done))
        return turn.number


class Outbox:
    def __init__(self, redis: Redis, keys: Keys, config: ExecutorConfig) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self._pending: list[tuple[int, bytes, asyncio.Future[int]]] = []
        self._ready = asyncio.Event()
        self.sink: Sink | None = None

    def put(self, shard: int, result: RunResult) -> asyncio.Future[int]:
        """Queue one outcome; the future resolves once it is written to a stream (0) or
        applied in this process (the number of the finish call's turn), or fails. (The runner
        renews the run's lease either way until it knows the write survived: a failover can
        lose either.)"""
        written: asyncio.Future[int] = asyncio.get_running_loop().create_future()
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

    async def _apply_here(self, batch: list[tuple[int, bytes, asyncio.Future[int]]]) -> int:
        """The batch applied by the sink, if there is one and it takes all of it: the turn
        of the call that applied it (0: not applied). A refused
        result or a failed call: the batch goes to the streams, where admission's read
        dead-letters a bad one and applies the rest (a result applied twice is a no-op; on a
        cluster, where each shard has its own call, the shards that did apply are applied
        again, as stale)."""
        if self.sink is None:
            return 0
        by_shard: dict[int, list[bytes]] = {}
        for shard, payload, _ in batch:
            by_shard.setdefault(shard, []).append(payload)
        try:
            # (bounded: a stalled call would hold every later result, and with them the slots)
            return await asyncio.wait_for(self.sink(by_shard), self.config.lease_ms / 3000)
        except NoPermissionError as exc:
            self.sink = None  # (for good: the user's rights do not change under it)
            log.warning("this executor's Redis user may not run the finish script; results "
                        "go through the results stream until it restarts (re-create the users "
                        "with `supersede acl --apply`, then restart the executors)",
                        extra={"error": describe(exc)})  # fmt: skip
            return 0
        except Exception as exc:
            repeats = _NOT_APPLIED.due(type(exc).__name__)
            if repeats is not None:
                log.warning("results not applied by the finish call; writing them to the streams",
                            extra={"runs": len(batch), "error": describe(exc),
                                   "repeats": repeats})  # fmt: skip
            return 0

    async def _write(self, batch: list[tuple[int, bytes, asyncio.Future[int]]]) -> Exception | None:
        deadline = time.monotonic() + self.config.lease_ms / 1000
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for shard, payload, _ in batch:
                        pipe.xadd(self.keys.shard(shard).results_stream, {PAYLOAD: payload})
                    await pipe.execute()
                metrics.RESULTS.labels("stream").inc(len(batch))
                return None
            except Exception as exc:  # redis-py can raise others mid-failover
                if time.monotonic() > deadline:
                    return exc
                repeats = _NOT_WRITTEN_YET.due("write")  # (every 0.2 s while the server is down)
                if repeats is not None:
                    log.warning("results not written yet; retrying",
                                extra={"runs": len(batch), "error": describe(exc),
                                       "repeats": repeats})  # fmt: skip
                await asyncio.sleep(0.2)
