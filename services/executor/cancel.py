"""Cancellation of local runs. Two ways in: the control streams (XREAD BLOCK, every executor
reads every cancel within milliseconds) and the heartbeat's answer, the runs no longer this
executor's (the backstop for a control message this process missed): `let_go` handles those,
called from the lease keeper (services/executor/lease.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

from redis.asyncio import Redis

from supersede import tracing
from supersede.aio import wait_for
from supersede.errors import describe
from supersede.health import shard_failure
from supersede.keys import Keys
from supersede.lane import Lane, read
from supersede.logs import Sampled, kind_of
from supersede.protocol import Control, Entry, Outcome, parse_cancel
from supersede.service import server_now
from supersede.services.executor import metrics
from supersede.services.executor.config import ExecutorConfig
from supersede.services.executor.isolation import SERVER_UNAVAILABLE
from supersede.services.executor.steps import RECANCEL_AFTER, Runner, Running
from supersede.streams import entry_ms, failed_over, retry_pause, tail_ids

log = logging.getLogger("supersede.executor")

EARLY_CANCEL_TTL = 10.0  # seconds a cancel for a run not (yet) here is remembered
EARLY_CANCEL_MAX = 10_000
_CONTROL_FAILED = Sampled()  # (a control read failing while the server is down)


class Cancels:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        runner: Runner,
        config: ExecutorConfig,
        *,
        cluster: bool,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.runner = runner
        self.config = config
        self.cluster = cluster
        # Cancels that arrived before their run was started here (the claim reply and the
        # control message race): run id -> (attempt, decided ms, monotonic time received, the
        # superseding run's trace context).
        self._early: OrderedDict[str, tuple[int | None, float, float, bytes]] = OrderedDict()
        self._grace_reports: set[asyncio.Task[None]] = set()

    def cancel_local(
        self, rid: str, attempt: int | None, decided_ms: float, by_traceparent: bytes = b""
    ) -> None:
        """Stop a local run now: cancel its task, set its flag, report after the grace period.
        `by_traceparent`: the superseding run's trace context, linked from this run's span."""
        run = self.runner.active.get(rid)
        if run is None or run.cancel_decided_ms is not None:
            return
        if attempt is not None and attempt != run.attempt:
            return
        run.cancel_decided_ms = decided_ms
        if run.span is not None:
            tracing.cancelled(run.span, by_traceparent)
        run.ctx._cancel()
        self.runner.stage(run, "flag")
        if run.task and not run.task.done():
            self.runner.stop_task(run)
            if run.in_async_step and not run.report_when_stopped:
                # (not in strict mode, whose run is reported only once its handler stopped: a
                # repeat would leave work a step shields, or an `asyncio.wait_for` of Python
                # 3.11 runs as a task, going on after the report)
                self._track(self.runner.until_out_of_step(run, RECANCEL_AFTER))
        self._track(self._report_after_grace(run))

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._grace_reports.add(task)
        task.add_done_callback(self._grace_reports.discard)

    async def _report_after_grace(self, run: Running) -> None:
        """A handler that ignores its cancellation keeps running, but its slot is reported
        free after the grace period (the run's own task reports sooner when it stops) — unless
        the run must be reported only once its handler stopped (strict mode, or a step in a
        worker process: its task reports when the ladder has stopped it)."""
        await asyncio.sleep(self.config.grace)
        if run.report_when_stopped and run.task is not None and not run.task.done():
            return
        await self.runner.report(run, Outcome.CANCELLED, "")

    def apply_early(self, run: Running) -> None:
        """A cancel that arrived before this run was started applies now."""
        early = self._early.pop(run.run_id, None)
        if early is not None:
            self.cancel_local(run.run_id, early[0], early[1], early[3])

    def _remember(
        self, rid: str, attempt: int | None, decided_ms: float, by_traceparent: bytes = b""
    ) -> None:
        """Keep a cancel for a run not (yet) here for a few seconds, at most EARLY_CANCEL_MAX of
        them. Oldest first in the dict, so forgetting is O(1) per cancel (every executor sees
        every cancel of the deployment, so this runs at the cancel rate of the whole system)."""
        now = time.monotonic()
        early = self._early
        while early:
            oldest = next(iter(early.values()))
            if now - oldest[2] < EARLY_CANCEL_TTL and len(early) < EARLY_CANCEL_MAX:
                break
            early.popitem(last=False)
        early[rid] = (attempt, decided_ms, now, by_traceparent)
        early.move_to_end(rid)

    # -- the control streams ---------------------------------------------------------------------
    async def control_loop(self, stop: asyncio.Event, lane: Lane | None = None) -> None:
        """XREAD BLOCK over the control streams (one reader per shard on a cluster; on one
        server on `lane`, when given)."""
        streams = [sk.control_stream for sk in self.keys.all_shards()]
        if self.cluster:
            await asyncio.gather(*(self._read_control(stop, [s]) for s in streams))
        else:
            await self._read_control(stop, streams, lane)

    async def _read_control(
        self, stop: asyncio.Event, streams: list[str], lane: Lane | None = None
    ) -> None:
        ids = await tail_ids(self.redis, streams)
        while not stop.is_set():
            try:
                reply = await read(lane, self.redis, ids, count=1000, block=self.config.block_ms)
                for stream, entries in reply:
                    ids[stream.decode()] = entries[-1][0].decode()
                    self._on_control(entries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                local = shard_failure(exc)  # (a cluster slot left half moved: an ERROR with
                # a traceback every read, a cluster probe; one line once in a while)
                if not isinstance(exc, SERVER_UNAVAILABLE) and not failed_over(exc) and not local:
                    log.exception("control iteration failed")
                    await asyncio.sleep(0.5)
                    continue
                # (one line: a resume from SIGSTOP timed out the read in flight, a failover
                # ended it, and a traceback at ERROR said nothing more)
                error = describe(exc)
                if (repeats := _CONTROL_FAILED.due(kind_of(exc))) is not None:  # (once in 5 s)
                    log.warning("control read failed; reading again",
                                extra={"error": error, "repeats": repeats})  # fmt: skip
                await asyncio.sleep(retry_pause(exc))

    def _on_control(self, entries: list[Entry]) -> None:
        metrics.CONTROL_MESSAGES.inc(len(entries))
        for entry_id, fields in entries:
            try:
                cancel = parse_cancel(fields)
            except ValueError as exc:  # (one bad entry: the cancels after it still count)
                log.warning("control message skipped: malformed",
                            extra={"entry": entry_id.decode(), "error": describe(exc)})  # fmt: skip
                continue
            if cancel is None:
                continue
            rid, attempt = cancel
            by_tp = fields.get(Control.BY_TRACEPARENT, b"")
            decided = _decided_ms(entry_id, fields)
            if rid in self.runner.active:
                self.cancel_local(rid, attempt, decided, by_tp)
            else:  # its claim reply may not have been handled yet
                self._remember(rid, attempt, decided, by_tp)

    # -- the heartbeat ---------------------------------------------------------------------------
    async def resend_loop(self, stop: asyncio.Event) -> None:
        """Every third of a lease, write again the results that wait too long (the leases
        themselves are renewed by the lease keeper's thread), until `stop`."""
        interval = self.config.lease_ms / 3000
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await wait_for(stop.wait(), interval)
            self.runner.resend_due()

    def let_go(self, rid: str, attempt: int) -> None:
        """The heartbeat says `attempt` of `rid` is no longer this executor's to run, or the
        lease keeper found its result's turn confirmed."""
        reported = self.runner.awaiting.get(rid)
        if reported is not None and reported.attempt == attempt:
            del self.runner.awaiting[rid]  # applied (or taken over): nothing left to renew
            return
        run = self.runner.active.get(rid)
        if run is not None and run.reported:
            return  # its outcome is being written; admission sorts out which attempt counts
        self.cancel_local(rid, attempt, server_now() * 1000)


def _decided_ms(entry_id: bytes, fields: dict[bytes, bytes]) -> float:
    """When a cancel was decided, epoch ms: its `du` (µs), else its entry id's whole ms (a
    message from an earlier version's script)."""
    try:
        return int(fields[Control.DECIDED_US]) / 1000
    except (KeyError, ValueError):
        return entry_ms(entry_id)
