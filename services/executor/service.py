"""The executor service: the wiring of its parts, start-up, and the SIGTERM drain.

Tasks: fetch (assignments -> claim -> start), control (cancels), the lease keeper's thread
(leases, and the runs to let go or stop), the re-sending of results that wait too long, the
outbox writer, and on a cluster one wake task per shard.

SIGTERM drains: stop fetching and start what the read in flight took; keep renewing leases and
receiving cancels while running runs finish within the drain deadline; then wait (within the
same deadline) until the results are applied (by its own finish calls, or by admission for
those written to the results streams), since a run whose lease lapsed before that would be
retried. What is still running at the deadline is stopped, logged and handed back: retried
elsewhere at once (at least once), without using an attempt (lua/hand_back.lua); a sync step
that runs on past it leaves its run to its lease instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from supersede import aio
from supersede.config import Settings
from supersede.errors import ConfigError, WorkflowRejected, describe
from supersede.lookups import executor_said
from supersede.protocol import EXECUTOR_GROUP
from supersede.registry import register_all, served_version_field
from supersede.scripts import HandBackResult
from supersede.service import Periodic, Service, Throttle
from supersede.service import serve as serve_service
from supersede.services.executor import metrics
from supersede.services.executor.cancel import Cancels
from supersede.services.executor.claim import Claimer
from supersede.services.executor.config import ExecutorConfig
from supersede.services.executor.fetch import Fetcher
from supersede.services.executor.lease import LeaseKeeper
from supersede.services.executor.outbox import FinishHere, Outbox
from supersede.services.executor.steps import OUTCOME_LABEL, Runner
from supersede.streams import GroupSpec
from supersede.workflow import Workflow

__all__ = ["Executor", "ExecutorConfig", "serve"]

DRAIN_POLL = 0.1  # seconds between checks that written results were applied, while draining
LOOP_LAG_EVERY = 0.1  # seconds between two measures of the event loop's lag
BLOCKED_LOOP_WARN = 1.0  # a lag from which the loop is logged as blocked (seconds)
REGISTER_RETRY_AFTER = 60.0  # seconds before a refused re-registration is tried again
EXECUTOR_FORGOTTEN_AFTER = 3600.0  # seconds: an executor silent that long is deleted from the hash
REGISTRY_CHECK_EVERY = 1.0  # seconds between two looks for this process's workflows in the registry
# Seconds between two warnings that a workflow of this process is registered in another version
REPLACED_WARN_EVERY = 300.0
# Seconds after which a registered version that executors served since its registration, and
# none serves now, gives way to this process's: see Executor.keep_registered
UNSERVED_VERSION_AFTER = 60.0
SERVED_VERSION_FORGOTTEN_AFTER = 3600.0  # seconds after which a version's served mark is deleted
HAND_BACK_WITHIN = 0.5  # seconds the last hand-back calls may take once the drain ended
HAND_BACK_CALL_TIMEOUT = 5.0  # seconds one hand-back call may take (during the drain)


class Executor(Service):
    name = "executor"

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        workflows: Sequence[Workflow],
        config: ExecutorConfig | None = None,
        *,
        consumer: str | None = None,
    ) -> None:
        super().__init__(redis, settings, consumer=consumer)
        self.config = config or ExecutorConfig()
        self.definitions = {wf.id: wf.definition() for wf in workflows}  # validates
        self._register_again_at = 0.0  # (monotonic) when keep_registered may try again
        self._forget_executors_due = Throttle(60.0)  # (a look at the executors hash)
        self._replaced_said: dict[str, float] = {}  # workflow -> when last said (monotonic)
        self.workflows = tuple(self.definitions)
        cluster = isinstance(redis, RedisCluster)
        # (a cluster call of a shard waits a sixth of a lease at most, and 2 s, before the shard
        # is left out: a lease is renewed within a sixth of it, and its run's result applied)
        self.health.deadline = min(self.health.deadline, max(0.5, self.config.lease_ms / 6000))
        self.outbox = Outbox(redis, self.keys, self.config, self.health)
        if not self.config.results_via_stream:
            self.outbox.sink = FinishHere(
                self.scripts, self.consumer, self.config.lease_ms, cluster=cluster,
                health=self.health,
            )  # fmt: skip
        self.runner = Runner(workflows, self.config, self.outbox, tracer=self.tracer,
                             fences=self._fence, keys=self.keys)  # fmt: skip
        self.cancels = Cancels(redis, self.keys, self.runner, self.config, cluster=cluster)
        self.claimer = Claimer(self.scripts, self.consumer, self.config, self.runner, self.cancels,
                               self.health)  # fmt: skip
        self.fetcher = Fetcher(self, self.keys, self.config, self.runner, self.claimer,
                               cluster=cluster)  # fmt: skip
        self.leases = LeaseKeeper(settings.redis_url, self.keys, self.consumer, self.config,
                                  self.runner, self.cancels.let_go,
                                  silent=lambda: self.health.silent.copy())  # fmt: skip
        self._handing_back: asyncio.Task[None] | None = None  # (while it drains)

    async def _fence(self, shard: int, group: str) -> bytes | None:
        """The sequence of the newest run `group` admitted (for `ctx.still_current()`)."""
        fence = await self.redis.hget(self.keys.shard(shard).fences_hash, group)
        return fence.encode() if isinstance(fence, str) else fence

    def groups(self) -> list[GroupSpec]:
        """The executor group of each shard's assignment stream of this process's workflows."""
        return [
            (sk.assignments_stream(wf), EXECUTOR_GROUP)
            for sk in self.keys.all_shards()
            for wf in self.workflows
        ]

    async def prepare(self) -> None:
        """Register this process's workflows (ingress and admission need no user code)."""
        try:  # (one call: the module's workflows change together, a scope's limits too)
            await register_all(self.redis, self.keys, list(self.definitions.values()),
                               serving=True)  # fmt: skip
        except WorkflowRejected as exc:
            which = f"workflow {exc.workflow!r}" if exc.workflow else "a workflow"
            raise ConfigError(f"{which} cannot be registered: {exc}") from None
        metrics.SLOTS.set(self.config.slots)
        for wid in self.definitions:  # (at 0 from the start: increase() sees the first ones)
            for outcome in OUTCOME_LABEL.values():
                metrics.RUNS_FINISHED.labels(wid, outcome)
        await self.runner.start_processes(self.settings.redis_url)
        self.log.info("workflows registered", extra={"workflows": sorted(self.definitions)})

    def periodic(self) -> Sequence[Periodic]:
        return [(REGISTRY_CHECK_EVERY, self.keep_registered)]

    async def keep_registered(self) -> None:
        """Say that this process serves its workflows, in its versions (`retire` refuses a
        workflow served recently), and register again those gone from the registry (a server
        that lost its data, restarted empty): until then ingress routes their events nowhere.
        A workflow registered in another version is left as it is while an executor serves
        that version (a rollout under way, another pool), and so is one no executor served
        since it was registered (ahead of its deploy; a pool that crashes as it starts); once
        executors served it and none has for UNSERVED_VERSION_AFTER, this process registers
        its own: an old executor that started late in a rollout (restarted, rescheduled) put
        its definition back, which stayed once the rollout had replaced it, for good (a probe:
        the events only the new definition listens to made no run)."""
        ids = sorted(self.definitions)
        await self.clock.refresh(self.redis)  # (the mark is the server's time)
        now_ms = int(self.clock.now_ms())
        marks: dict[Any, int] = {
            served_version_field(wid, self.definitions[wid].version): now_ms for wid in ids
        }
        forget = self._forget_executors_due.due()
        async with self.redis.pipeline(transaction=False) as pipe:  # (one slot: the registry's)
            pipe.hset(self.keys.workflows_served_hash, mapping=dict.fromkeys(ids, now_ms))
            pipe.hset(self.keys.served_versions_hash, mapping=marks)
            pipe.hset(self.keys.executors_hash, self.consumer,
                      orjson.dumps({"ms": now_ms, "workflows": ids}))  # fmt: skip
            pipe.hmget(self.keys.workflows_hash, ids)
            pipe.hgetall(self.keys.served_versions_hash)
            pipe.hmget(self.keys.registered_versions_hash, ids)
            if forget:
                pipe.hgetall(self.keys.executors_hash)
            _, _, _, present, served, named, *executors = await pipe.execute()
        self._say_replaced(ids, present)
        await self._forget_served(served, now_ms)
        if executors:
            await self._forget_executors(executors[0], now_ms)
        unserved = self._unserved(ids, present, named, served, now_ms)  # (and the gauge)
        if time.monotonic() < self._register_again_at:
            return
        missing = [
            self.definitions[wid] for wid, body in zip(ids, present, strict=True) if not body
        ]
        if not missing and not unserved:
            return
        if missing:
            self.log.warning(
                "workflows missing from the registry (did the server lose its data?): "
                "registering them again", extra={"workflows": [wf.id for wf in missing]},
            )  # fmt: skip
        for wid, stored in unserved.items():
            here = self.definitions[wid].version
            self.log.warning(
                "a workflow of this executor is registered in a version no executor has served "
                "for a minute: registering this executor's (the executors of that version are "
                "gone: an old one that started late in a rollout, a newer one that stopped)",
                extra={"workflow": wid, "registered": stored, "here": here},
            )
        again = [*missing, *(self.definitions[wid] for wid in unserved)]
        try:
            await register_all(self.redis, self.keys, again, serving=True)
        except WorkflowRejected as exc:  # (tried again in a minute, not every second)
            self._register_again_at = time.monotonic() + REGISTER_RETRY_AFTER
            self.log.error("a workflow could not be registered again",
                           extra={"workflow": exc.workflow, "error": str(exc)})  # fmt: skip

    def _unserved(
        self,
        ids: list[str],
        present: list[bytes | None],
        named: list[bytes | None],
        served: dict[bytes, bytes],
        now_ms: int,
    ) -> dict[str, str]:
        """workflow id -> its registered version, for this process's workflows registered in
        another version that executors served since it was registered, and none for
        UNSERVED_VERSION_AFTER. Left as it is: a version no executor served since its
        registration (`register_all` deletes its mark), one registered by an earlier build
        (which names nothing in the hash: a rollback to it is not undone), and a stored
        definition this process cannot read (ingress says what is wrong with it)."""
        out: dict[str, str] = {}
        for wid, body, name in zip(ids, present, named, strict=True):
            metrics.DEFINITION_DIFFERS.labels(wid).set(0)
            if not body:
                continue
            try:
                stored = orjson.loads(body).get("version")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if not isinstance(stored, str) or stored == self.definitions[wid].version:
                continue
            metrics.DEFINITION_DIFFERS.labels(wid).set(1)
            if name != stored.encode():  # (an earlier build registered it)
                continue
            mark = _ms(served.get(served_version_field(wid, stored).encode()))
            if mark is not None and now_ms - mark > UNSERVED_VERSION_AFTER * 1000:
                out[wid] = stored
        return out

    async def _forget_executors(self, executors: dict[bytes, bytes], now_ms: int) -> None:
        """Delete the entries of executors that said nothing for an hour (killed: an executor
        that exits deletes its own)."""
        old = [name for name, raw in executors.items()
               if now_ms - executor_said(raw)[0] > EXECUTOR_FORGOTTEN_AFTER * 1000]  # fmt: skip
        if old:
            await self.redis.hdel(self.keys.executors_hash, *old)

    async def _say_gone(self) -> None:
        """This executor's entry in the executors hash, deleted as it exits (`status` then
        no longer lists it), within a second; left to the others' hourly look otherwise."""
        try:
            await aio.wait_for(self.redis.hdel(self.keys.executors_hash, self.consumer), 1.0)
        except (RedisError, OSError, TimeoutError) as exc:
            self.log.info("could not say this executor is gone", extra={"error": describe(exc)})

    async def _forget_served(self, served: dict[bytes, bytes], now_ms: int) -> None:
        """Delete the served marks of versions no executor served for an hour (the hash holds
        each workflow's versions served within the last hour), and the fields 0.3.16 wrote
        there naming the version registered last (0.3.15 and older executors read each value
        there as a number: those fields made them fail and turn not ready, for good after a
        rollback; Keys.registered_versions_hash names it now)."""
        old = [field for field, ms in served.items() if b"\n" not in field
               or now_ms - (_ms(ms) or 0) > SERVED_VERSION_FORGOTTEN_AFTER * 1000]  # fmt: skip
        if old:
            await self.redis.hdel(self.keys.served_versions_hash, *old)

    def _say_replaced(self, ids: list[str], present: list[bytes | None]) -> None:
        """Warn, at most once in REPLACED_WARN_EVERY per workflow, while one of this process's
        workflows is registered in another version: ingress and admission then give new runs
        that definition's key, limit and strategy, and this process runs them with its own
        steps. A rollout under way does it for a while; two pools registering one workflow id
        with different definitions replaced each other at each start, silently (a probe: one
        pool's runs executed by the other's steps, its limit and strategy flipping)."""
        now = time.monotonic()
        for wid, body in zip(ids, present, strict=True):
            if not body or now - self._replaced_said.get(wid, -math.inf) < REPLACED_WARN_EVERY:
                continue
            try:
                stored = orjson.loads(body).get("version")
            except (orjson.JSONDecodeError, AttributeError):  # (ingress says so: not here)
                continue
            mine = self.definitions[wid].version
            if stored == mine:
                continue
            self._replaced_said[wid] = now
            self.log.warning(
                "a workflow of this executor is registered in another version: new runs get "
                "that definition's key, limit and strategy, and run here with this executor's "
                "steps; a rollout under way, or another pool registering the same workflow id "
                "with another definition (give it its own id)",
                extra={"workflow": wid, "registered": stored, "here": mine},
            )

    async def main(self, stop: asyncio.Event) -> None:
        drained = asyncio.Event()  # leases and cancels outlive `stop` until the drain ends
        writer = asyncio.create_task(self.outbox.loop())
        fetch = asyncio.create_task(self.fetcher.loop(stop))
        loops = [
            fetch,
            asyncio.create_task(self.fetcher.stale_loop(stop)),
            asyncio.create_task(self.fetcher.bell_loop(stop)),
            asyncio.create_task(self.cancels.control_loop(drained, self.lane())),
            asyncio.create_task(self.cancels.resend_loop(drained)),
            asyncio.create_task(_measure_loop_lag(drained, runner=self.runner)),
            *(
                asyncio.create_task(self.fetcher.wake_loop(stop, shard))
                for shard in (range(self.keys.shards) if self.fetcher.cluster else ())
            ),
        ]
        self.leases.start()
        try:
            await stop.wait()
            # The drain's deadline counts from the signal: a kubelet's or Docker's grace
            # period does too (waiting for the read first, then the whole drain, overran it).
            deadline = asyncio.get_running_loop().time() + self.config.drain_timeout
            self.log.info(  # (nothing said so until "executor stopped", up to the deadline)
                "draining: no new runs; waiting for the running ones",
                extra={
                    "runs": len(self.runner.active),
                    "drain_timeout_s": self.config.drain_timeout,
                },
            )
            self.runner.drain_deadline = deadline
            self.runner.stopping.set()
            # The fetch loop ends after its read in flight, so what that read took is started
            # and drained here rather than left pending to another executor's XAUTOCLAIM.
            self.runner.slot_freed.set()
            self.fetcher.wake()
            await asyncio.wait([fetch], timeout=min(self.config.block_ms / 1000 + 5,
                                                    self.config.drain_timeout))  # fmt: skip
            await self.drain(deadline)
        finally:
            drained.set()
            await self.leases.stop(also=self._handed_back())
            await _cancelled({*loops, writer})
            self.runner.close()
            await self._say_gone()

    async def drain(self, deadline: float | None = None) -> None:
        """Running runs finish (leases renewed, cancels honoured), then their results are
        applied, all within the drain deadline (the loop's time; default: drain_timeout from
        now). No call outlives it: a heartbeat that hangs on a silent server is left to its
        thread."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.config.drain_timeout
        self.runner.drain_deadline = min(self.runner.drain_deadline, deadline)
        self.runner.stopping.set()
        done = asyncio.Event()
        self._handing_back = asyncio.create_task(self._hand_back_loop(done))
        try:
            await self._drain_runs(deadline)
        finally:
            done.set()
            self.runner.left_added.set()

    async def _handed_back(self) -> None:
        """The drain's last hand-backs, given HAND_BACK_WITHIN once the drain ended (its
        stopped steps had up to DRAIN_STOP_WITHIN past the deadline to be left); those not
        made by then are retried once their leases lapse."""
        task = self._handing_back
        if task is None:
            return
        _, late = await asyncio.wait({task}, timeout=HAND_BACK_WITHIN)
        await aio.cancel_until_done(late, 1.0)  # (it awaits threads only: its calls log)
        if self.runner.left:
            self.log.warning(
                "hand-backs not confirmed in time: a run whose hand-back reached the server is "
                "retried at once, the others once their leases lapse",
                extra={"run_ids": [rid for _, rid, _ in self.runner.left][:100]},
            )

    async def _drain_runs(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        # A hand-over still in flight (`supersede serve`) starts its runs first: they are
        # drained with the others rather than left to their leases.
        while self.runner.handing and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL / 10)
        await self.runner.finish_running(deadline - loop.time())
        failures = 0
        while self.runner.awaiting and loop.time() < deadline:
            try:
                # lets go of the runs whose results were applied
                await _in_daemon_thread(self.leases.beat, max(0.05, deadline - loop.time()))
                failures = 0
            except Exception:
                failures += 1
                if failures == 1:
                    self.log.exception("heartbeat failed while draining; retrying")
            if self.runner.awaiting:
                pause = DRAIN_POLL * min(failures + 1, 10)
                await asyncio.sleep(max(0.0, min(pause, deadline - loop.time())))
        if self.runner.awaiting:
            self.log.warning(
                "drain deadline passed with results not confirmed applied: most were, as the "
                "heartbeat confirms them up to a lease later; one that was not is retried "
                "elsewhere once its lease lapses",
                extra={
                    "runs": len(self.runner.awaiting),
                    "run_ids": sorted(self.runner.awaiting)[:20],
                    "pid": os.getpid(),
                },
            )

    async def _hand_back_loop(self, done: asyncio.Event) -> None:
        """Hand back the runs the drain stops as they come (one waiting to retry is stopped
        before the deadline), until `done` and none is left."""
        runner = self.runner
        while True:
            await runner.left_added.wait()
            runner.left_added.clear()
            if runner.left:
                await self._hand_back(runner.left)
            if done.is_set() and not runner.left:
                return

    async def _hand_back(self, left: list[tuple[int, str, int]]) -> None:
        """One hand-back call per shard of the runs in `left` (emptied as each is made); a
        failed call logs, and its runs are retried once their leases lapse."""
        by_shard: dict[int, list[tuple[str, int]]] = {}
        for shard, rid, attempt in left:
            by_shard.setdefault(shard, []).append((rid, attempt))
        left.clear()
        sink = self.outbox.sink
        deadline_ms = sink.assign_deadline_ms if isinstance(sink, FinishHere) else 0

        async def one(shard: int, runs: list[tuple[str, int]]) -> None:
            got: list[HandBackResult] = []
            try:  # (the lease keeper's client, in a daemon thread: a call hung on a silent
                # server neither swallows the cancel nor holds the process)
                await _in_daemon_thread(
                    lambda: got.append(self.leases.hand_back(shard, runs, deadline_ms)),
                    HAND_BACK_CALL_TIMEOUT,
                )
                r = got[0]
            except (Exception, asyncio.CancelledError) as exc:
                self.log.warning(
                    "runs not handed back: they are retried once their leases lapse",
                    extra={"run_ids": [rid for rid, _ in runs][:100],
                           "error": "no reply in time" if isinstance(exc, asyncio.CancelledError)
                           else describe(exc)},
                )  # fmt: skip
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            for workflow, n in r.failed_by:  # (counted where SupersedeRunsFailing looks)
                metrics.RUNS_FINISHED.labels(workflow, "failed").inc(n)
            self.log.info(
                "runs handed back: retried elsewhere now, no attempt used; those unchanged (of "
                "one attempt, or no longer this executor's) are left to their leases",
                extra={"sent": [rid for rid, _ in runs][:100], "handed_back": r.handed,
                       "cancelled": r.cancelled, "failed": r.failed, "unchanged": r.stale},
            )  # fmt: skip

        await asyncio.gather(*(one(shard, runs) for shard, runs in by_shard.items()))


STOP_TASKS_WITHIN = 10.0  # seconds the loops have to end once cancelled, the cancel repeated


async def _cancelled(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel the loops until they end (a task that never ends keeps the process from
    exiting); after STOP_TASKS_WITHIN, log those that still did not."""
    pending = await aio.cancel_until_done(set(tasks), STOP_TASKS_WITHIN)
    if pending:
        logging.getLogger("supersede.executor").error(
            "executor tasks did not stop", extra={"tasks": sorted(t.get_name() for t in pending)}
        )


async def _in_daemon_thread(call: Callable[[], object], timeout: float) -> None:
    """`call()` in a daemon thread of its own, waited for at most `timeout` seconds. A call hung
    on a silent server is left behind: the default executor's threads are joined when the
    loop closes (the process would wait out the hang), a daemon thread is not."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def run() -> None:
        outcome: BaseException | None = None
        try:
            call()
        except BaseException as exc:  # (handed to the awaiting task)
            outcome = exc
        with contextlib.suppress(RuntimeError):  # (the loop closed meanwhile)
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="supersede-drain-beat", daemon=True).start()
    await aio.wait_for(done, timeout)


async def _measure_loop_lag(
    stop: asyncio.Event, every: float = LOOP_LAG_EVERY, runner: Runner | None = None
) -> None:
    """Observe how late a timer due every `every` seconds runs: the event loop's lag. A lag
    past BLOCKED_LOOP_WARN is logged: something held the loop (a step calling time.sleep or
    sync I/O in an async function), and every Redis call of the process that timed out
    meanwhile failed for that, not for the server."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + every
        await asyncio.sleep(every)
        lag = max(0.0, loop.time() - due)
        metrics.LOOP_LAG_SECONDS.observe(lag)
        if lag >= BLOCKED_LOOP_WARN:
            running = sorted({r.workflow.id for r in runner.active.values()}) if runner else []
            logging.getLogger("supersede.executor").warning(
                "event loop blocked: a step blocking it (time.sleep or sync I/O in an async "
                "step), or the process paused, stalls every run and call of this process; "
                "Redis timeouts logged meanwhile are this, not the server",
                extra={"seconds": round(lag, 1), "workflows_running": running[:10]},
            )


async def serve(
    settings: Settings, workflows: Sequence[Workflow], config: ExecutorConfig, stop: asyncio.Event
) -> None:
    """Run one executor process until `stop` is set."""
    await serve_service(lambda redis: Executor(redis, settings, workflows, config), settings, stop)


def _ms(raw: bytes | None) -> int | None:
    """A served mark's milliseconds (None: absent, or not a number: another hand's write)."""
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None
