"""The executor service: claims assigned runs, runs their steps, honours cancellations.

Loops (each a short method naming the Redis structure it touches):
- fetch: XREADGROUP on the shards' assignment streams, never more entries than free slots
  (shards are read in rotation; when all are empty, one XREAD BLOCK over every assignment stream
  waits for new entries without consuming them), then the claim script per shard;
- control: XREAD BLOCK over every shard's control stream; a cancel stops the local run at once;
- heartbeat: renews leases; the ids it returns are runs to stop (the backstop for a missed
  control message); it also takes over assignments a dead executor read but never claimed.
Outcomes go to the shard's results stream. SIGTERM drains: stop fetching, let running runs
finish within the deadline, leave the rest to their leases (they are retried elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from supersede import codec
from supersede import metrics as shared_metrics
from supersede.config import Settings, connect, pin_shard_count
from supersede.protocol import (
    EXECUTOR_GROUP,
    PAYLOAD,
    Outcome,
    RunResult,
    StreamReply,
    parse_assignment,
    parse_cancel,
    unpack_input,
)
from supersede.registry import register
from supersede.scripts import Claim, Scripts
from supersede.services.executor import metrics
from supersede.streams import OwnPending, after_failure, consumer_name, ensure_groups
from supersede.workflow import Context, Step, Workflow

log = logging.getLogger("supersede.executor")

EARLY_CANCEL_TTL = 10.0  # seconds a cancel for an unknown run is remembered
OUTCOME_LABEL = {
    Outcome.SUCCEEDED: "succeeded",
    Outcome.FAILED: "failed",
    Outcome.CANCELLED: "cancelled",
}


@dataclass(slots=True)
class ExecutorConfig:
    slots: int = 10
    lease_ms: int = 10_000
    grace: float = 5.0
    drain_timeout: float = 30.0
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    retry_backoff: float = 0.1


@dataclass(slots=True)
class Running:
    run_id: str
    shard: int
    attempt: int
    workflow: Workflow
    ctx: Context
    task: asyncio.Task[None] | None = None
    cancel_decided_ms: float | None = None  # set once a cancel arrived
    reported: bool = False
    started: float = field(default_factory=time.monotonic)


def _ms_of(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


class Executor:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        workflows: Sequence[Workflow],
        config: ExecutorConfig | None = None,
        *,
        consumer: str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = settings.keys
        self.config = config or ExecutorConfig()
        self.consumer = consumer or consumer_name("executor")
        self.scripts = Scripts(redis, self.keys)
        self.definitions = {wf.id: wf.definition() for wf in workflows}  # validates
        self.workflows = {wf.id: wf for wf in workflows}
        self.active: dict[str, Running] = {}
        self.pool = ThreadPoolExecutor(max_workers=max(4, self.config.slots * 2))
        self.slot_freed = asyncio.Event()
        self.ready = False
        self._assign_streams = [sk.assignments_stream for sk in self.keys.all_shards()]
        self._rotation = 0
        self._woken: list[int] = []
        self._malformed: list[tuple[int, bytes]] = []
        self._cluster = isinstance(redis, RedisCluster)
        self._wake = asyncio.Event()
        self._shard_of_stream = {name: i for i, name in enumerate(self._assign_streams)}
        self._wake_ids: dict[str, str] = {}
        self._own = OwnPending(self._assign_streams)
        # Cancels that arrived before their run was registered here (the claim reply and the
        # control message race): run id -> (attempt, decided ms, monotonic time received).
        self._early_cancels: dict[str, tuple[int | None, float, float]] = {}
        self._outbox: list[tuple[int, bytes, asyncio.Future[None]]] = []
        self._outbox_ready = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        await pin_shard_count(self.redis, self.keys)
        await ensure_groups(self.redis, self.keys)
        await self.scripts.load()
        for wf in self.definitions.values():
            await register(self.redis, self.keys, wf)
        metrics.SLOTS.set(self.config.slots)
        self.ready = True
        shared_metrics.set_ready(True)

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        log.info(
            "executor started",
            extra={"consumer": self.consumer, "workflows": sorted(self.workflows)},
        )
        writer = asyncio.create_task(self._results_loop())
        loops = [
            asyncio.create_task(self._fetch_loop(stop)),
            asyncio.create_task(self._control_loop(stop)),
            *(
                asyncio.create_task(self._wake_loop(stop, shard))
                for shard in (range(self.keys.shards) if self._cluster else ())
            ),
            asyncio.create_task(self._heartbeat_loop(stop)),
        ]
        try:
            await stop.wait()
            # The fetch loop ends after its read in flight, so what that read took is started
            # and drained here rather than left pending to another executor's XAUTOCLAIM.
            self.slot_freed.set()
            await asyncio.wait([loops[0]], timeout=self.config.block_ms / 1000 + 5)
            await self._drain()
        finally:
            for task in [*loops, writer]:
                task.cancel()
            await asyncio.gather(*loops, writer, return_exceptions=True)
            self.pool.shutdown(wait=False, cancel_futures=True)
            log.info("executor stopped", extra={"consumer": self.consumer})

    async def _drain(self) -> None:
        """Let running runs finish within the deadline; leave the rest to their leases."""
        pending = [r.task for r in self.active.values() if r.task]
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.config.drain_timeout)
            for task in late:
                task.cancel()
            if late:
                log.warning(
                    "drain deadline passed; runs left to lease expiry", extra={"runs": len(late)}
                )

    # -- fetch ------------------------------------------------------------------------------------
    async def _fetch_loop(self, stop: asyncio.Event) -> None:
        last_reclaim = 0.0
        stale_tails = True
        while not stop.is_set():
            reread = False
            try:
                free = self.config.slots - len(self.active)
                if free <= 0:
                    self.slot_freed.clear()
                    await self.slot_freed.wait()
                    continue
                # With a free slot per shard (and one server) a single XREADGROUP BLOCK over
                # every shard both waits and reads: free // shards entries per shard at most.
                # Otherwise an XREAD BLOCK wakes the loop and the shards are read one by one.
                blocking = free >= self.keys.shards and not self._cluster
                self._wake.clear()  # cluster mode: a waker setting it from now on is not missed
                if stale_tails and not blocking:
                    # Tails first, then the scan: an entry older than a tail is seen by the
                    # scan, a newer one wakes the XREAD below, so none waits for a timeout.
                    # After a wake-up the XREAD's own ids are fresh: no tail read in that path.
                    self._wake_ids = await self._tail_ids(self._assign_streams)
                    stale_tails = False
                self._own.sweep_if_due()
                reread = self._own.active
                if reread:
                    got = await self._read_own(free)
                else:
                    if blocking:
                        got = await self._read_blocking(free)
                    else:
                        got = await self._read_assignments(free)
                    self._own.advance(None, reread=False)
                if len(got) < free and time.monotonic() - last_reclaim > 1.0:
                    last_reclaim = time.monotonic()
                    got += await self._reclaim(free - len(got))
                if self._malformed:
                    await self._ack_malformed()
                shared_metrics.set_ready(True)
                if got:
                    stale_tails = True
                    await self._claim_and_start(got)
                    # Let the new runs reach their first step before the next read is sent.
                    await asyncio.sleep(0)
                elif not blocking and not reread:
                    # Only after a scan: entries older than the tails are the scan's to find,
                    # so a wait after a re-read of own entries could sleep past them.
                    await self._wait_for_assignments()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                shared_metrics.set_ready(False)
                log.exception("fetch iteration failed")
                # Assignments read but not claimed are pending for this consumer: read them
                # again first.
                await after_failure(self.redis, self.keys, self._own, exc, failed_reread=reread)

    async def _read_own(self, free: int) -> list[tuple[int, bytes, str, int]]:
        """This consumer's pending assignments, shard by shard, at most `free` of them."""
        got: list[tuple[int, bytes, str, int]] = []
        replies: StreamReply = []
        ids = self._own.ids()
        for shard, stream in enumerate(self._assign_streams):
            if len(got) >= free:
                break
            reply = cast(
                StreamReply | None,
                await self.redis.xreadgroup(
                    EXECUTOR_GROUP, self.consumer, {stream: ids[stream]}, count=free - len(got)
                ),
            )
            for name, entries in reply or []:
                replies.append((name, entries))
                got += self._parse_assignments(shard, entries)
        self._own.advance(replies, reread=True)
        return got

    async def _read_blocking(self, free: int) -> list[tuple[int, bytes, str, int]]:
        """One XREADGROUP BLOCK over every assignment stream, `free // shards` entries each."""
        reply = await self.redis.xreadgroup(
            EXECUTOR_GROUP,
            self.consumer,
            dict.fromkeys(self._assign_streams, ">"),
            count=free // self.keys.shards,
            block=self.config.block_ms,
        )
        got: list[tuple[int, bytes, str, int]] = []
        for stream, entries in cast(StreamReply, reply or []):
            got += self._parse_assignments(self._shard_of_stream[stream.decode()], entries)
        return got

    async def _read_assignments(self, free: int) -> list[tuple[int, bytes, str, int]]:
        """XREADGROUP at most `free` entries in all: with at least one free slot per shard, from
        every shard in one pipeline; otherwise shard by shard, woken shards first."""
        got: list[tuple[int, bytes, str, int]] = []
        n = self.keys.shards
        if free >= n:
            # Enough free slots to ask every shard for free // n entries in one round trip
            # (a scan of one round trip per shard takes milliseconds in redis-py).
            self._woken = []
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream in self._assign_streams:
                    pipe.xreadgroup(EXECUTOR_GROUP, self.consumer, {stream: ">"}, count=free // n)
                replies = await pipe.execute()
            for shard, reply in enumerate(replies):
                for _, entries in cast(StreamReply, reply or []):
                    got += self._parse_assignments(shard, entries)
            return got
        # Shards the last wake-up saw new entries on come first, then the rotation.
        order = [*self._woken, *((self._rotation + i) % n for i in range(n))]
        self._woken = []
        visited: set[int] = set()
        for shard in order:
            if len(got) >= free:
                break
            if shard in visited:
                continue
            visited.add(shard)
            reply = await self.redis.xreadgroup(
                EXECUTOR_GROUP,
                self.consumer,
                {self._assign_streams[shard]: ">"},
                count=free - len(got),
            )
            for _, entries in cast(
                list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], reply or []
            ):
                got += self._parse_assignments(shard, entries)
        self._rotation = (self._rotation + 1) % n
        return got

    def _parse_assignments(
        self, shard: int, entries: Sequence[tuple[bytes, dict[bytes, bytes]]]
    ) -> list[tuple[int, bytes, str, int]]:
        """(shard, entry id, run id, attempt); an entry that is not an assignment is noted
        for acknowledgement, so it cannot come back through XAUTOCLAIM forever."""
        out = []
        for entry_id, fields in entries:
            try:
                out.append((shard, entry_id, *parse_assignment(fields)))
            except (KeyError, ValueError, TypeError, UnicodeDecodeError):
                self._malformed.append((shard, entry_id))
        return out

    async def _ack_malformed(self) -> None:
        bad, self._malformed = self._malformed, []
        for shard, entry_id in bad:
            log.error(
                "malformed assignment acknowledged",
                extra={"shard": shard, "entry": entry_id.decode()},
            )
            await self.redis.xack(self._assign_streams[shard], EXECUTOR_GROUP, entry_id)

    async def _wake_loop(self, stop: asyncio.Event, shard: int) -> None:
        """Cluster mode: one XREAD BLOCK per shard sets `_wake` on new assignments."""
        stream = self._assign_streams[shard]
        last = (await self._tail_ids([stream]))[stream]
        while not stop.is_set():
            try:
                reply = await self.redis.xread(
                    {stream: last}, count=100, block=self.config.block_ms
                )
                for _, entries in cast(StreamReply, reply or []):
                    if entries:
                        last = entries[-1][0].decode()
                        self._woken.append(shard)
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("wake iteration failed")
                await asyncio.sleep(0.5)

    async def _wait_for_assignments(self) -> None:
        """XREAD BLOCK over every assignment stream: wakes on any new entry, consumes nothing."""
        if self._cluster:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.block_ms / 1000)
            return
        reply = await self.redis.xread(self._wake_ids, count=1, block=self.config.block_ms)  # type: ignore[arg-type]
        for stream, entries in cast(StreamReply, reply or []):
            if entries:
                name = stream.decode()
                self._wake_ids[name] = entries[-1][0].decode()
                self._woken.append(self._shard_of_stream[name])

    async def _reclaim(self, free: int) -> list[tuple[int, bytes, str, int]]:
        """XAUTOCLAIM assignments a dead executor read and never claimed."""
        got: list[tuple[int, bytes, str, int]] = []
        for shard, stream in enumerate(self._assign_streams):
            if len(got) >= free:
                break
            reply = await self.redis.xautoclaim(
                stream,
                EXECUTOR_GROUP,
                self.consumer,
                self.config.claim_idle_ms,
                count=free - len(got),
            )
            got += self._parse_assignments(shard, [e for e in reply[1] if e and e[1]])
        return got

    async def _claim_and_start(self, items: list[tuple[int, bytes, str, int]]) -> None:
        by_shard: dict[int, list[tuple[bytes, str, int]]] = {}
        for shard, entry_id, rid, attempt in items:
            by_shard.setdefault(shard, []).append((entry_id, rid, attempt))
        now = time.time() * 1000
        replies = await self.scripts.claim_shards(
            self.consumer, by_shard, lease_ms=self.config.lease_ms
        )
        for shard, claims in replies.items():
            triples = by_shard[shard]
            for (entry_id, _, _), claim in zip(triples, claims, strict=True):
                if not claim.claimed:
                    metrics.CLAIMS_REFUSED.inc()
                    continue
                metrics.QUEUE_WAIT_SECONDS.observe(max(0.0, now - _ms_of(entry_id)) / 1000)
                self._start(shard, claim)

    def _start(self, shard: int, claim: Claim) -> None:
        wf = self.workflows.get(claim.workflow)
        body = unpack_input(claim.input)
        ctx = Context(
            run_id=claim.run_id,
            workflow=claim.workflow,
            attempt=claim.attempt,
            input=body.get("input", {}),
            metadata=body.get("metadata", {}),
            event=body.get("event", ""),
            event_id=body.get("event_id", ""),
            key=claim.key,
        )
        if wf is None:  # another executor's workflow; should not happen with one deployment
            log.error("claimed a run of an unknown workflow", extra={"run": claim.run_id})
            run = Running(claim.run_id, shard, claim.attempt, Workflow(claim.workflow, []), ctx)
            self.active[claim.run_id] = run
            run.task = asyncio.create_task(self._report(run, Outcome.FAILED, "unknown workflow"))
            return
        run = Running(claim.run_id, shard, claim.attempt, wf, ctx)
        self.active[claim.run_id] = run
        metrics.RUNS_STARTED.labels(wf.id).inc()
        metrics.BUSY_SLOTS.set(len(self.active))
        run.task = asyncio.create_task(self._execute(run))
        early = self._early_cancels.pop(claim.run_id, None)
        if early is not None:
            self.cancel_local(claim.run_id, early[0], early[1])

    # -- execution -------------------------------------------------------------------------------
    async def _execute(self, run: Running) -> None:
        try:
            outcome, error = await self._run_steps(run)
        except asyncio.CancelledError:
            if run.cancel_decided_ms is None:
                raise  # shutdown: leave the run to its lease
            outcome, error = Outcome.CANCELLED, ""
            await self._on_cancel(run)
        await self._report(run, outcome, error)

    async def _run_steps(self, run: Running) -> tuple[Outcome, str]:
        for step in run.workflow.ordered_steps():
            for attempt in range(step.retries + 1):
                started = time.perf_counter()
                try:
                    output = await self._call(step, run.ctx)
                    codec.pack(output)  # outputs must be msgpack-able values
                    run.ctx.outputs[step.name] = output
                    break
                except asyncio.CancelledError:
                    self._observe_cancel(run)
                    raise
                except Exception as exc:
                    if attempt < step.retries:
                        await asyncio.sleep(self.config.retry_backoff * 2**attempt)
                        continue
                    text = "".join(traceback.format_exception(exc))
                    return (
                        Outcome.FAILED,
                        f"step {step.name!r} failed after {attempt + 1} attempt(s):\n{text}",
                    )
                finally:
                    metrics.STEP_SECONDS.labels(run.workflow.id).observe(
                        time.perf_counter() - started
                    )
            if run.ctx.cancelled:
                self._observe_cancel(run)
                return Outcome.CANCELLED, ""
        return Outcome.SUCCEEDED, ""

    async def _call(self, step: Step, ctx: Context) -> Any:
        if step.is_async:
            coro = step.fn(ctx)
        else:
            loop = asyncio.get_running_loop()
            coro = loop.run_in_executor(self.pool, functools.partial(step.fn, ctx))
        if step.timeout:
            try:
                return await asyncio.wait_for(coro, step.timeout)
            except TimeoutError:
                raise TimeoutError(f"step {step.name!r} timed out after {step.timeout}s") from None
        return await coro

    async def _on_cancel(self, run: Running) -> None:
        hook = run.workflow.cancel_hook
        if hook is None:
            return
        try:
            if asyncio.iscoroutinefunction(hook):
                await asyncio.shield(hook(run.ctx))
            else:
                await asyncio.shield(
                    asyncio.get_running_loop().run_in_executor(self.pool, hook, run.ctx)
                )
        except Exception:
            log.exception("on_cancel hook failed", extra={"run": run.run_id})

    def _observe_cancel(self, run: Running) -> None:
        if run.cancel_decided_ms is not None:
            metrics.CANCEL_LATENCY_SECONDS.observe(
                max(0.0, time.time() * 1000 - run.cancel_decided_ms) / 1000
            )

    async def _report(self, run: Running, outcome: Outcome, error: str) -> None:
        """XADD the outcome to the shard's results stream (once), then free the local slot."""
        if run.reported:
            return
        run.reported = True
        if run.cancel_decided_ms is not None:
            outcome, error = Outcome.CANCELLED, ""  # results of cancelled runs are discarded
        result = RunResult(run.run_id, run.attempt, outcome, error[:20_000])
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.append((run.shard, result.pack(), written))
        self._outbox_ready.set()
        try:
            await asyncio.shield(written)
        except Exception:
            # Not written: the run's lease expires and the reaper retries it elsewhere.
            log.exception("result not written", extra={"run": run.run_id})
        finally:
            metrics.RUNS_FINISHED.labels(run.workflow.id, OUTCOME_LABEL[outcome]).inc()
            self.active.pop(run.run_id, None)
            metrics.BUSY_SLOTS.set(len(self.active))
            self.slot_freed.set()

    async def _results_loop(self) -> None:
        """XADD every pending outcome to its shard's results stream: one pipeline per turn,
        so a thousand runs ending together cost one round trip, not a thousand connections.
        A failed write (a failover, say) is retried for up to a lease: after that the reaper
        has retried the run elsewhere and this result would be discarded as stale anyway."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            batch, self._outbox = self._outbox, []
            deadline = time.monotonic() + self.config.lease_ms / 1000
            error: Exception | None = None
            while True:
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for shard, payload, _ in batch:
                            pipe.xadd(self.keys.shard(shard).results_stream, {PAYLOAD: payload})
                        await pipe.execute()
                    error = None
                    break
                except Exception as exc:  # redis-py can raise others mid-failover
                    error = exc
                    if time.monotonic() > deadline:
                        break
                    log.warning("results not written yet; retrying", extra={"runs": len(batch)})
                    await asyncio.sleep(0.2)
            for _, _, fut in batch:
                if fut.done():
                    continue
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

    # -- cancellation ----------------------------------------------------------------------------
    def cancel_local(self, rid: str, attempt: int | None, decided_ms: float) -> None:
        """Stop a local run now: cancel its task, set its flag, report after the grace period."""
        run = self.active.get(rid)
        if run is None or run.cancel_decided_ms is not None:
            return
        if attempt is not None and attempt != run.attempt:
            return
        run.cancel_decided_ms = decided_ms
        run.ctx._cancel()
        if run.task and not run.task.done():
            run.task.cancel()
        asyncio.get_running_loop().call_later(
            self.config.grace,
            lambda: asyncio.ensure_future(self._report(run, Outcome.CANCELLED, "")),
        )

    async def _tail_ids(self, streams: Sequence[str]) -> dict[str, str]:
        """The last id of each stream now ('0-0' when it does not exist yet).

        XREAD's '$' would be re-read on every call for streams that returned nothing, so
        entries added between two calls would be missed; explicit ids never miss one.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xrevrange(stream, count=1)
            tails = await pipe.execute()
        return {s: (t[0][0].decode() if t else "0-0") for s, t in zip(streams, tails, strict=True)}

    async def _control_loop(self, stop: asyncio.Event) -> None:
        """XREAD BLOCK over the control streams (one reader per shard on a cluster)."""
        streams = [sk.control_stream for sk in self.keys.all_shards()]
        if self._cluster:
            await asyncio.gather(*(self._read_control(stop, [s]) for s in streams))
        else:
            await self._read_control(stop, streams)

    async def _read_control(self, stop: asyncio.Event, streams: list[str]) -> None:
        ids = await self._tail_ids(streams)
        while not stop.is_set():
            try:
                reply = await self.redis.xread(ids, count=1000, block=self.config.block_ms)  # type: ignore[arg-type]
                for stream, entries in cast(StreamReply, reply or []):
                    ids[stream.decode()] = entries[-1][0].decode()
                    for entry_id, fields in entries:
                        cancel = parse_cancel(fields)
                        if cancel is None:
                            continue
                        rid, attempt = cancel
                        if rid in self.active:
                            self.cancel_local(rid, attempt, _ms_of(entry_id))
                        else:  # its claim reply may not have been handled yet
                            self._remember_cancel(rid, attempt, _ms_of(entry_id))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control iteration failed")
                await asyncio.sleep(0.5)

    def _remember_cancel(self, rid: str, attempt: int | None, decided_ms: float) -> None:
        """Keep a cancel for a run not (yet) here for a few seconds, bounded in size."""
        now = time.monotonic()
        if len(self._early_cancels) > 10_000:
            self._early_cancels = {
                k: v for k, v in self._early_cancels.items() if now - v[2] < EARLY_CANCEL_TTL
            }
        self._early_cancels[rid] = (attempt, decided_ms, now)

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        interval = self.config.lease_ms / 3000
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            try:
                by_shard: dict[int, list[tuple[str, int]]] = {}
                for run in list(self.active.values()):
                    if not run.reported:
                        by_shard.setdefault(run.shard, []).append((run.run_id, run.attempt))
                for shard, runs in by_shard.items():
                    stop_ids = await self.scripts.heartbeat(
                        shard, self.consumer, runs, lease_ms=self.config.lease_ms
                    )
                    for rid in stop_ids:
                        self.cancel_local(rid, None, time.time() * 1000)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat iteration failed")


async def serve(
    settings: Settings, workflows: Sequence[Workflow], config: ExecutorConfig, stop: asyncio.Event
) -> None:
    redis = connect(settings.redis_url)
    try:
        await Executor(redis, settings, workflows, config).run(stop)
    finally:
        await redis.aclose()
