"""The result outbox: each turn's outcomes applied with one `finish` call of the executor's own
(`FinishHere`: one per shard on a cluster), so a thousand runs ending together cost one round
trip, and no results-stream entry is written, read, acknowledged or trimmed. Whatever that call
does not take (a result it refuses, an error, a call slower than a third of a lease) is XADDed
to the shards' results streams, one pipeline per turn, and admission applies it from there
(and dead-letters a bad one). A result applied twice is stale: a no-op. A user without the
rights of the finish script (an ACL user created before executors applied their results) sends
every result the stream's way, after one warning.

On a cluster each shard's call is bounded (ShardHealth): the results of a shard whose master
does not answer wait, and are tried again every RETRY_EVERY seconds for up to a lease, while
the other shards' results are applied turn after turn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from supersede.aio import wait_for
from supersede.errors import describe
from supersede.health import ShardHealth
from supersede.keys import Keys
from supersede.logs import Sampled
from supersede.protocol import ASSIGN_DEADLINE_FIELD, PAYLOAD, RunResult
from supersede.scripts import Scripts, Turn
from supersede.service import Throttle, error_fields
from supersede.services.executor import metrics
from supersede.services.executor.config import ExecutorConfig

log = logging.getLogger("supersede.executor")
# (lines that repeat while the server is down: written once per 5 s, with how many were not)
_NOT_WRITTEN_YET = Sampled()
_NOT_APPLIED = Sampled()

DEADLINE_EVERY = 10.0  # seconds between two reads of admission's assignment deadline
RETRY_EVERY = 0.2  # seconds between two tries of a result not written

# One outcome to write: (shard, packed result, its future, when to give up (monotonic)).
Held = tuple[int, bytes, asyncio.Future[int], float]


class PartlyApplied(Exception):
    """A finish call of some shards failed (a cluster: one call per shard): `applied` says
    which did apply, and the turn; the error is the first failure's."""

    def __init__(self, applied: set[int], turn: int, error: BaseException) -> None:
        super().__init__(describe(error))
        self.applied = applied
        self.turn = turn
        self.error = error


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

    def __init__(
        self,
        scripts: Scripts,
        executor: str,
        lease_ms: int,
        *,
        cluster: bool,
        health: ShardHealth | None = None,
    ) -> None:
        self.scripts = scripts
        self.health = health or ShardHealth.off()
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
                read = self.scripts.redis.hget(keys.config_hash, ASSIGN_DEADLINE_FIELD)
                # (bounded: its master may be silent; the results are not held for it)
                raw = await wait_for(read, self.health.deadline)
                self.assign_deadline_ms = int(raw or 0)
            except Exception as exc:  # (the last one known serves; the results go on)
                log.warning("assignment deadline not read", extra={"error": describe(exc)})
        deadline = self.assign_deadline_ms
        self.turn += 1
        turn = Turn(self.executor, self.turn, self.turn_ttl_ms, dict(self.last_turn))
        failed: BaseException | None = None
        if self.cluster:
            calls = {
                s: ([s], self.scripts.finish(s, part, assign_deadline_ms=deadline, turn=turn))
                for s, part in items.items()
            }
            replies = await self.health.each(calls)
            failed = next((r for r in replies.values() if isinstance(r, BaseException)), None)
            done = [r for r in replies.values() if not isinstance(r, BaseException)]
            applied = {s for s, r in replies.items() if not isinstance(r, BaseException)}
        else:
            done = [await self.scripts.finish_shards(items, assign_deadline_ms=deadline, turn=turn)]
            applied = set(items)
        for shard in applied:  # (not after a call that raised: the next one starts a new range)
            self.last_turn[shard] = turn.number
        metrics.RESULTS.labels("applied").inc(sum(r.applied for r in done))
        metrics.RESULTS.labels("stale").inc(sum(r.stale for r in done))
        metrics.ASSIGNED.inc(sum(r.assigned for r in done))
        if failed is not None:
            if not applied:
                raise failed
            raise PartlyApplied(applied, turn.number, failed)
        return turn.number


class Outbox:
    def __init__(
        self, redis: Redis, keys: Keys, config: ExecutorConfig, health: ShardHealth | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self.health = health or ShardHealth.off()
        self._pending: list[tuple[int, bytes, asyncio.Future[int]]] = []
        self._retry: list[Held] = []  # not written yet: tried again from _retry_at
        self._retry_at = 0.0  # (monotonic)
        self._retry_error: BaseException | None = None  # (the last write's that failed)
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

        A result neither applied nor written (a failover, a silent master) is tried again
        every RETRY_EVERY seconds, through the stream, for up to a lease (after an in-process
        call that failed, for up to a third of one): after that the reaper has retried the
        run elsewhere and this result would be discarded as stale anyway. Meanwhile the
        results queued after it are applied or written as usual."""
        while True:
            if self._retry and not self._pending:
                # (nothing new: the retries when due, or something new before)
                with contextlib.suppress(TimeoutError):
                    await wait_for(self._ready.wait(), max(0.0, self._retry_at - time.monotonic()))
            else:
                await self._ready.wait()
            self._ready.clear()
            now = time.monotonic()
            self._give_up(now)
            batch, self._pending = self._pending, []
            give_up = now + self.config.lease_ms / 1000
            if self.health.silent:  # (a silent shard's results wait for the retries)
                up = self.health.up
                self._hold([(s, p, f, give_up) for s, p, f in batch if not up(s)], now)
                batch = [item for item in batch if up(item[0])]
            rest = await self._apply_here(batch) if batch else []
            held = [(shard, payload, fut, give_up) for shard, payload, fut in rest]
            if self._retry and time.monotonic() >= self._retry_at:
                held += self._retry
                self._retry = []
            if held:
                await self._write(held)

    def _hold(self, items: list[Held], now: float) -> None:
        """Hold `items` for the next retry (in RETRY_EVERY seconds, or with those held already:
        a result that came later never puts the earlier ones off)."""
        if items:
            if not self._retry:
                self._retry_at = now + RETRY_EVERY
            self._retry += items

    def _give_up(self, now: float) -> None:
        """Fail the held results whose time to give up passed (whether or not they were tried
        since: a steady flow of new results does not keep them waiting)."""
        if not self._retry:
            return
        keep: list[Held] = []
        for item in self._retry:
            if now < item[3]:
                keep.append(item)
            elif not item[2].done():
                item[2].set_exception(self._retry_error or TimeoutError("result not written"))
        self._retry = keep

    async def _apply_here(
        self, batch: list[tuple[int, bytes, asyncio.Future[int]]]
    ) -> list[tuple[int, bytes, asyncio.Future[int]]]:
        """The batch applied by the sink, if there is one, each future given the turn of the
        call that applied it; what it did not apply is returned. A refused result or a failed
        call: the batch goes to the streams, where admission's read dead-letters a bad one and
        applies the rest (a result applied twice is a no-op); on a cluster the shards whose
        calls did apply are done, the others' results go to the streams."""
        if self.sink is None:
            return batch
        by_shard: dict[int, list[bytes]] = {}
        for shard, payload, _ in batch:
            by_shard.setdefault(shard, []).append(payload)
        try:
            # (bounded: a stalled call would hold every later result, and with them the slots;
            # on a cluster each shard's call is, by ShardHealth's deadline)
            bound = None if self.health.enabled else self.config.lease_ms / 3000
            turn = await wait_for(self.sink(by_shard), bound)
        except NoPermissionError as exc:
            self.sink = None  # (for good: the user's rights do not change under it)
            log.warning("this executor's Redis user may not run the finish script; results "
                        "go through the results stream until it restarts (re-create the users "
                        "with `supersede acl --apply`, then restart the executors)",
                        extra={"error": describe(exc)})  # fmt: skip
            return batch
        except Exception as exc:
            applied = exc.applied if isinstance(exc, PartlyApplied) else set()
            error = exc.error if isinstance(exc, PartlyApplied) else exc
            rest = [item for item in batch if item[0] not in applied]
            repeats = _NOT_APPLIED.due(type(error).__name__)
            if repeats is not None:
                log.warning("results not applied by the finish call; writing them to the streams",
                            extra={"runs": len(rest), **error_fields(error),
                                   "repeats": repeats})  # fmt: skip
            if not applied:
                return batch
            turn = cast(PartlyApplied, exc).turn
            batch = [item for item in batch if item[0] in applied]
        else:
            rest = []
        for _, _, fut in batch:
            if not fut.done():
                fut.set_result(turn)
        return rest

    async def _write(self, items: list[Held]) -> None:
        """XADD each result to its shard's results stream: one pipeline on one server; on a
        cluster one per shard, each bounded by ShardHealth. A result not written is tried again
        after RETRY_EVERY seconds, until its time to give up (its future fails then)."""
        by_shard: dict[int, list[Held]] = {}
        for item in items:  # (one server: one pipeline)
            by_shard.setdefault(item[0] if self.health.enabled else -1, []).append(item)
        # (redis-py can raise others than its own mid-failover: each is the call's outcome)
        outcome = await self.health.each(
            {s: ([s], self._xadd(part)) for s, part in by_shard.items()}
        )
        now = time.monotonic()
        for s, part in by_shard.items():
            exc = outcome[s]
            if not isinstance(exc, BaseException):
                metrics.RESULTS.labels("stream").inc(len(part))
                for _, _, fut, _ in part:
                    if not fut.done():
                        fut.set_result(0)
                continue
            self._retry_error = exc
            self._hold([item for item in part if now < item[3]], now)
            for item in part:
                if now >= item[3] and not item[2].done():
                    item[2].set_exception(exc)
            repeats = _NOT_WRITTEN_YET.due("write")  # (every 0.2 s while the server is down)
            if repeats is not None:
                log.warning("results not written yet; retrying",
                            extra={"runs": len(part), **error_fields(exc),
                                   "repeats": repeats})  # fmt: skip

    async def _xadd(self, items: list[Held]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard, payload, _, _ in items:
                pipe.xadd(self.keys.shard(shard).results_stream, {PAYLOAD: payload})
            await pipe.execute()
