"""Running claimed runs: their steps in dependency order, retries and timeouts, the on-cancel
hook, and one report of the outcome to the outbox, after which the run's local slot is free.

A reported run is not done yet: until its result is applied (by the outbox's finish call, or
by admission when it took the results stream), the run stays RUNNING and its lease must be
renewed, or the reaper would retry work that already finished (admission down or behind, a
finish write lost in a failover). `Runner.awaiting` holds those runs until their write is known
to have survived (the turn key of the finish call that applied them, read by the lease keeper,
or the heartbeat saying they ended); a result still unapplied after a lease is sent again (with
backoff), in case
the first write was lost (a failover before replication), since applying a result twice changes
nothing. A result the server would not take (at its maxmemory, down, failing over) is put
again until it is, its run holding its slot and renewed as a running one meanwhile (a renewal
goes through at maxmemory: lua/heartbeat.lua)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import sys
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from supersede import codec, tracing
from supersede.aio import wait_for
from supersede.errors import StepTimedOut, describe, frames_from_step, step_traceback
from supersede.fencing import fence_of
from supersede.keys import Keys
from supersede.logs import Sampled
from supersede.metrics import HOP_SECONDS
from supersede.model import group_id
from supersede.protocol import Outcome, RunResult, unpack_input
from supersede.scripts import Claim
from supersede.service import STEP_THREAD_PREFIX, error_fields, server_now
from supersede.services.executor import metrics
from supersede.services.executor.config import ExecutorConfig
from supersede.services.executor.isolation import (
    CURRENT,
    FENCE_RETRY_FIRST,
    FENCE_RETRY_MAX,
    RENEWED,
    SERVER_UNAVAILABLE,
    ProcessPool,
    StepError,
    WorkerLapsed,
    WorkerLost,
    WorkerTerminated,
)
from supersede.services.executor.outbox import Outbox
from supersede.services.executor.outputs import OutputError, readable
from supersede.services.modules import module_file
from supersede.workflow import Context, NotAwaited, Step, Workflow, is_async_callable

log = logging.getLogger("supersede.executor")
_NOT_WRITTEN = Sampled()  # "result not written" lines: one per 5 s of a kind, with repeats
_FENCE_NOT_READ = Sampled()
_THREADS_BUSY = Sampled()  # "every step thread is busy" lines
_STRAYS_FULL = Sampled()  # "as many left running already" lines

OUTCOME_LABEL = {
    Outcome.SUCCEEDED: "succeeded",
    Outcome.FAILED: "failed",
    Outcome.CANCELLED: "cancelled",
}
MAX_ERROR_BYTES = 8192  # of a failed run's error (`err`) kept in its record: its start and end


def capped_error(error: str, limit: int = MAX_ERROR_BYTES) -> str:
    """`error` in at most `limit` bytes of UTF-8: a longer one keeps its first quarter and its
    last part (a traceback's last lines name the exception), with what was cut between."""
    raw = error.encode("utf-8", "replace")
    if len(raw) <= limit:
        return error
    marker_room = 64
    if limit <= 2 * marker_room:  # (no room for both ends and the note between)
        return raw[:limit].decode("utf-8", "ignore")
    head = (limit - marker_room) // 4
    tail = limit - marker_room - head
    cut = len(raw) - head - tail
    return (
        raw[:head].decode("utf-8", "ignore")
        + f"\n… ({cut} bytes cut) …\n"
        + raw[len(raw) - tail :].decode("utf-8", "ignore")
    )


def _note_turn(rep: Reported, fut: asyncio.Future[int]) -> None:
    """A result written again: the turn that applied it (the lease keeper confirms it by that
    turn's key), or 0 (the results stream: the heartbeat tells). A failed re-send is retried
    at the next due time."""
    if not fut.cancelled() and fut.exception() is None:
        rep.turn = fut.result()


RESULT_RETRY = 0.2  # seconds between two puts of a result the server refused (each up to a lease)
LET_GO_LEASES = 3  # leases an attempt stopped unreported is remembered (Runner.let_go)
LET_GO_MOST = 10_000  # such attempts remembered at most
RECANCEL_AFTER = 0.1  # seconds an async step may go on after a cancel before it is repeated
RECANCEL_EVERY = 0.01  # seconds between the repeats of a cancel an async step swallowed
DRAIN_STOP_WITHIN = 1.0  # seconds a step has to stop once the drain deadline passed
HOOK_WAIT = 1.0  # seconds an on_cancel hook is waited for at least (--grace 0 too)


class StepRunsOn(TimeoutError):
    """A sync step timed out and ran on past the grace period: not retried beside itself."""


class LeftToLease(Exception):
    """The run is not reported: its lease lapses and it is retried elsewhere."""


@dataclass(slots=True)
class Reported:
    """A run whose outcome was applied by the outbox's finish call or written to the results
    stream, not yet known to have survived (the lease keeper reads the turn key of an applied
    one, or asks the heartbeat about it): its lease is still renewed."""

    run_id: str
    shard: int
    attempt: int
    result: RunResult
    resend_at: float  # monotonic time of the next write of the same result
    resends: int = 0
    turn: int = 0  # the finish call's turn that applied it (0: written to the results stream)


@dataclass(slots=True)
class Running:
    """One run executing here (until its outcome is reported)."""

    run_id: str
    shard: int
    attempt: int
    workflow: Workflow
    ctx: Context
    task: asyncio.Task[None] | None = None
    # Its task's coroutine began (Runner._execute); until then a stop is asked by `stop_first`
    # (see Runner.stop_task).
    began: bool = False
    stop_first: bool = False
    cancel_decided_ms: float | None = None  # set once a cancel arrived
    reported: bool = False
    started: float = field(default_factory=time.monotonic)  # claimed (monotonic clock)
    # (monotonic) no later than the server last stamped its lease: when the claim call, or the
    # last heartbeat call that renewed it, was sent (Runner.mark_leased)
    leased_at: float = 0.0
    # Its lease could not be renewed in time: stopped, unreported (Runner.let_lapse); it
    # keeps its slot until its task ended, and is renewed no more.
    lapsed: bool = False
    # Its claim call was sent long before the reply came: its handler starts once a beat
    # renewed its lease (set then, from the lease keeper's thread; see Runner.start).
    held: asyncio.Event | None = None
    # While a step runs in a worker process: that worker's shared copy of `leased_at`, for
    # its still_current() (Runner.mark_leased writes it too).
    lease_cell: Any = None
    handler_started_us: int = 0  # wall clock, a point of the run's path; 0: never started
    span: Any = None  # the run's span on this executor (tracing on)
    fence_at: tuple[int, str] | None = None  # (shard, group) whose fence still_current() reads
    # While set, a cancel is reported only once the handler has stopped (strict mode, or a step
    # in a worker process, which the ladder stops for sure), not at the end of the grace period.
    report_when_stopped: bool = False
    # A sync step that went on past the grace period of a cancel: its "stopped" stage is
    # observed, and the on_cancel hook run, when its thread returns (this future), not when
    # the run is reported CANCELLED.
    stops_later: asyncio.Future[Any] | None = None
    # While an async step runs on this run's task (task isolation): a cancel is repeated until
    # it gets out of the step (see Runner.until_out_of_step).
    in_async_step: bool = False
    # The try of an async step under its timeout now (a token of that try; see _timed).
    timing: object | None = None
    # The drain deadline stopped it (Runner.finish_running), or its lease ran out here
    # (Runner.let_lapse): not the run's own cancel, and nothing is reported.
    drained: bool = False
    # The thread of its last sync step: while that runs, the run is never handed back (it
    # would execute twice at once); its lease lapses instead.
    thread: asyncio.Future[Any] | None = None
    # The pool's future of that sync step: cancelled while it waits for a thread (every one
    # busy), it never starts (see _unstarted).
    queued: concurrent.futures.Future[Any] | None = None
    # The ident of the pool thread its sync step runs on (where it was is told at its timeout).
    thread_ident: int | None = None

    @property
    def step_runs_on(self) -> bool:
        return self.thread is not None and not self.thread.done()


class HookFailed(Exception):
    """An on_cancel hook raised a BaseException that is not an Exception (its cause)."""


async def _hook_guarded(hook: Awaitable[Any]) -> Any:
    """An async on_cancel hook, run as a task of its own (shielded): a SystemExit or
    KeyboardInterrupt it raised left the task, and asyncio re-raises those out of the loop:
    the executor exited with every run it held, saying only "executor stopped" (a probe).
    They are the hook's failure now, logged as any other."""
    try:
        return await hook
    except (asyncio.CancelledError, Exception):
        raise
    except BaseException as exc:
        raise HookFailed(f"on_cancel hook raised {type(exc).__name__}: {exc}") from exc


def _hook_on_thread(hook: Callable[[Context], Any], ctx: Context, started: threading.Event) -> Any:
    """A sync on_cancel hook, on a thread of the hooks' pool: `started` once it has one. Its
    exception boxed as a step's is (`_Raised`): asyncio replaced its own TimeoutError with one
    of no frames, and a CancelledError of a future it waited on read as its run's task's."""
    started.set()
    try:
        return hook(ctx)
    except Exception as exc:
        if type(exc) in _REPLACED:
            raise _Raised(exc) from None
        raise


def _hook_ended(run_id: str, job: asyncio.Future[Any]) -> None:
    """Log an on_cancel hook's failure (SystemExit, KeyboardInterrupt too: a hook's failure,
    as a step's), once it ended, within the grace period or after."""
    if job.cancelled():
        return
    exc = job.exception()
    if isinstance(exc, _Raised):
        exc = exc.error
    if exc is not None:
        log.error("on_cancel hook failed", extra={"run": run_id}, exc_info=exc)


def _timed_out(name: str, timeout: float, failure: BaseException | None) -> StepTimedOut:
    """An async step's timeout, told from where the step awaited when it passed (the cancel's
    traceback), or caused by the error it raised once stopped."""
    message = f"step {name!r} timed out after {timeout}s"
    if isinstance(failure, asyncio.CancelledError):
        return StepTimedOut(message, frames_from_step(traceback.extract_tb(failure.__traceback__)))
    timed_out = StepTimedOut(message)
    timed_out.__cause__ = failure
    return timed_out


class _Raised(Exception):
    """A sync step's exception of a type asyncio replaces as it crosses from the thread's
    future (`_REPLACED`): with a new one of no frames (a socket's TimeoutError failed its run
    with the executor's frames only, an author probe), or concurrent.futures' CancelledError
    with asyncio's, which read as the run's own cancel. Unboxed by `Runner._sync`."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error


_REPLACED = (TimeoutError, FutureCancelled, InvalidStateError)  # (by their exact types)


def _on_thread(run: Running, step: Step, ctx: Context) -> Any:
    """A sync step, on a pool thread whose ident its run keeps while the step runs (see
    `_thread_frames`)."""
    run.thread_ident = threading.get_ident()
    try:
        out = step.fn(ctx)
    except Exception as exc:
        if type(exc) in _REPLACED:
            raise _Raised(exc) from None
        raise
    finally:
        run.thread_ident = None
    if isinstance(ctx, Context):  # (a test's stand-in may be none)
        ctx.check_awaited(step.name)
    return out


def _unstarted(run: Running, thread: asyncio.Future[Any]) -> bool:
    """Whether the run's sync step was still waiting for a pool thread (every one busy), and
    is taken out of the pool's queue now: it never starts. A cancelled run's step that waited
    so was waited for a grace period (its cancel took 5 s to be reported, a producer probe),
    then counted a stray handler, and started once a thread freed, its run long ended."""
    queued = run.queued
    if queued is None or not queued.cancel():
        return False
    thread.cancel()  # (done now: the pool's cancel reaches it only at the loop's next turn)
    return True


def _thread_frames(run: Running) -> str:
    """Where the run's sync step is now, from the step's own frame; "" when not known (not
    started: the pool was full; or returned meanwhile, its thread maybe on another run's)."""
    ident = run.thread_ident
    frame = sys._current_frames().get(ident) if ident is not None else None
    inner = frame
    while inner is not None and not (
        inner.f_code is _on_thread.__code__ and inner.f_locals.get("run") is run
    ):
        inner = inner.f_back
    return "" if inner is None else frames_from_step(traceback.extract_stack(frame))


def _stopped(run: Running) -> bool:
    """A shutdown cancelled this run's task (the drain deadline passed): a cancel is counted
    on it that is not the run's own. Its run is handed back (or left to its lease), whatever
    the step made of the CancelledError (a library's ConnectionError was retried past the
    deadline, or FAILED the run, final; a step that swallowed it went on to its next step;
    a sync step asked to stop by `ctx.cancelled` returned)."""
    if run.drained:
        return True
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0 and not run.ctx.cancelled


class Runner:
    """The local slots: which runs execute here, and the code that executes them."""

    def __init__(
        self,
        workflows: Sequence[Workflow],
        config: ExecutorConfig,
        outbox: Outbox,
        *,
        tracer: Any = None,
        fences: Callable[[int, str], Awaitable[bytes | None]] | None = None,
        keys: Keys | None = None,
    ) -> None:
        """`fences(shard, group)`: reads the sequence of the newest run a group admitted (the
        fences hash), for `ctx.still_current()`; None: every run is current. `keys`: where
        worker processes read it (process isolation)."""
        self.workflows = {wf.id: wf for wf in workflows}
        # (each workflow's steps in order, sorted once: a sort per run was 4% of the CPU)
        self._ordered = {wf.id: wf.ordered_steps() for wf in workflows}
        self.fences = fences
        self.keys = keys
        self.processes: ProcessPool | None = None
        self.config = config
        self.outbox = outbox
        self.tracer = tracer
        self.active: dict[str, Running] = {}
        # read when scraped (a set() per start and end took a lock each: 4% of a busy
        # executor's CPU); bound to the dict, so a runner that stopped is not kept alive by it
        metrics.BUSY_SLOTS.set_function(self.active.__len__)
        self.awaiting: dict[str, Reported] = {}  # outcome written, not yet known to survive
        # attempts this executor stopped unreported (their leases could not be renewed, a
        # drain): (run id, attempt) -> when (monotonic). A reclaim must not start them again
        # (a chaos run: a run stopped by the lease watch in a master's outage was started
        # again, the same attempt, by the reclaim of a claim call the outage failed)
        self.let_go: OrderedDict[tuple[str, int], float] = OrderedDict()
        self.pool = ThreadPoolExecutor(
            max_workers=max(4, config.slots * 2), thread_name_prefix=STEP_THREAD_PREFIX
        )
        # sync on_cancel hooks run on threads of their own: one that never returns held a
        # step's thread for good, and each such hook one more (a new-user probe)
        self.hook_pool = ThreadPoolExecutor(
            max_workers=max(2, config.slots), thread_name_prefix=f"{STEP_THREAD_PREFIX}-hook"
        )
        self.on_threads = 0  # sync steps given to the pool and not yet returned
        self.async_strays = 0  # async steps left running past their timeout and grace
        self.slot_freed = asyncio.Event()
        self.reserved = 0  # slots promised to a claim in flight (a fetch, or a hand-over)
        self.handing = 0  # hand-overs in flight (`supersede serve`): the drain waits for them
        self.stopping = asyncio.Event()  # the executor drains (see `_left_to_lease`)
        # (shard, run id, attempt) of the runs a drain stopped once their steps ended, for the
        # executor to hand back (lua/hand_back.lua); `left_added` is set as one is added
        self.left: list[tuple[int, str, int]] = []
        self._hooks: set[asyncio.Future[None]] = set()  # on_cancel hooks run after a report
        self._hook_jobs: set[asyncio.Future[Any]] = set()  # the hooks themselves, not done
        self._strays: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()  # (counted)
        self._pending: set[asyncio.Future[None]] = set()  # repeated cancels of lapsed runs
        self.left_added = asyncio.Event()
        self.drain_deadline = math.inf  # the loop's time the drain ends by, once it drains
        self.renewed_at: float | None = None  # see `lease_left` (None: no lease keeper)
        self._cells = threading.Lock()  # guards Running.lease_cell (see `mark_leased`)
        # asks the lease keeper for a beat now (thread-safe; None: no lease keeper)
        self.renew_soon: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the runs' (set by `start`)

    def free(self) -> int:
        return self.config.slots - len(self.active) - self.reserved

    @contextlib.contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        """Hold `n` slots for a claim in flight, so that two claims (the fetch loop's and an
        admit call's hand-over in `supersede serve`) never start more runs than the slots."""
        self.reserved += n
        try:
            yield
        finally:
            self.reserved -= n
            if n:
                self.slot_freed.set()

    def start(self, shard: int, claim: Claim, leased_at: float = 0.0) -> Running | None:
        """Start a claimed run as a task. A run of a workflow this process lacks, or whose
        input cannot be decoded, fails at once (None): one bad assignment never stops the
        fetch loop."""
        try:
            body = unpack_input(claim.input)
        except Exception as exc:
            self._fail_at_once(shard, claim, f"input could not be decoded: {describe(exc)}")
            return None
        wf = self.workflows.get(claim.workflow)
        fence_at = None
        if self.fences is not None and wf is not None and wf.concurrency is not None:
            group = group_id(claim.workflow, claim.version, claim.key, wf.concurrency.scope)
            fence_at = (shard, group)
        self._loop = asyncio.get_running_loop()
        ctx = Context(
            run_id=claim.run_id,
            workflow=claim.workflow,
            attempt=claim.attempt,
            input=body.get("input", {}),
            metadata=body.get("metadata", {}),
            event=body.get("event", ""),
            event_id=body.get("event_id", ""),
            key=claim.key,
            loop=self._loop,
            fence=fence_of(claim.seq),
            claimed_at=time.time(),
            step_names=wf.step_names if wf is not None else None,
        )
        # A retry of a run whose earlier attempt's result waits here: that result is stale now.
        self.awaiting.pop(claim.run_id, None)
        if wf is None:  # (routing delivers only this executor's workflows)
            self._fail_at_once(shard, claim, "unknown workflow")
            return None
        run = Running(claim.run_id, shard, claim.attempt, wf, ctx, fence_at=fence_at)
        run.leased_at = leased_at or run.started
        if fence_at is not None:
            ctx._current = functools.partial(self._still_current, run, claim.seq)
        if (
            self.renew_soon is not None
            and run.started - run.leased_at > self.config.lease_ms / 4000
        ):
            # Its claim call was sent long before the reply came (a connection made anew, a
            # queue of calls before it, a cluster node failing over): the server stamped the
            # lease somewhere in between, and the run counts from the send. Its handler waits
            # for a beat, asked for now, that renews it: started at once, such runs were
            # stopped by the watch before any beat (the first ones of a start over a slow
            # link), or a moment after their start (a chaos run: claims sent during a node's
            # outage, answered 2.7 s later at a 3 s lease), and ran again elsewhere.
            run.held = asyncio.Event()
        ctx._answer_within = self.config.lease_ms / 1000 + 1.0  # (still_current_blocking)
        if self.tracer:
            run.span = self.tracer.start_span(
                "supersede.run",
                context=tracing.context_of(claim.traceparent),
                kind=tracing.kind("CONSUMER"),
                attributes={"supersede.run_id": claim.run_id, "supersede.workflow": wf.id,
                            "supersede.attempt": claim.attempt, "supersede.key": claim.key},
            )  # fmt: skip
        self.active[claim.run_id] = run
        if run.held is not None and self.renew_soon is not None:
            self.renew_soon()  # (once in `active`, where the beat's snapshot finds it)
        metrics.RUNS_STARTED.labels(wf.id).inc()
        if claim.handed_back:
            metrics.HANDED_BACK.inc()
        run.task = asyncio.create_task(self._execute(run))
        return run

    async def start_processes(self, redis_url: str) -> None:
        """Start the worker processes (one per slot) when a step runs in process isolation."""
        steps = [s for wf in self.workflows.values() for s in wf.steps
                 if wf.isolation_of(s) == "process"]  # fmt: skip
        if not steps or self.processes is not None:
            return
        self.processes = ProcessPool(
            self.config.slots, [s.fn.__module__ for s in steps], redis_url,
            grace=self.config.grace, kill_after=self.config.kill_after,
        )  # fmt: skip
        await self.processes.start()

    def stage(self, run: Running, stage: str) -> None:
        """A stage of stopping a cancelled run's handler, timed from the cancel decision."""
        if run.cancel_decided_ms is not None:
            metrics.CANCEL_STAGE_SECONDS.labels(stage).observe(self._since_cancel(run))

    def _since_cancel(self, run: Running) -> float:
        """Seconds since the run's cancel was decided (the server's time: this host's clock
        told apart by the offset the service reads)."""
        assert run.cancel_decided_ms is not None
        return max(0.0, server_now() * 1000 - run.cancel_decided_ms) / 1000

    def mark_renewed(self, began: float) -> None:
        """A heartbeat that began at `began` (monotonic) went through, every call of it (the
        watch's log says how long ago). Called from the lease keeper's thread."""
        self.renewed_at = began

    def mark_leased(
        self, runs: Sequence[tuple[str, int]], asked: float, gone: Collection[str] = ()
    ) -> None:
        """A heartbeat call sent at `asked` (monotonic) renewed the leases of `runs` (run id,
        attempt): each runs at least a lease from then (see `lapsing`), and a run held for its
        renewal starts, unless the call named it to stop (`gone`). Called from the lease
        keeper's thread."""
        active = self.active
        for rid, attempt in runs:
            run = active.get(rid)
            if run is not None and run.attempt == attempt and run.leased_at < asked:
                run.leased_at = asked
                if run.lease_cell is not None:
                    # (its step's worker reads it there: [0] for still_current(), never
                    # renewed for one named to stop, which may be another executor's now;
                    # [1] the server's lease, which a CANCELLING run's keeps while its ladder
                    # winds it down, for the worker's own watch. The lock: the loop may hand
                    # this worker to another run's step between the read and the write.)
                    with self._cells:
                        if run.lease_cell is not None:
                            if rid not in gone:
                                run.lease_cell[CURRENT] = asked
                            run.lease_cell[RENEWED] = asked
                if (
                    run.held is not None
                    and not run.held.is_set()
                    and rid not in gone
                    and self._loop is not None
                ):
                    with contextlib.suppress(RuntimeError):  # (the loop closed: it ends)
                        self._loop.call_soon_threadsafe(run.held.set)

    def lease_left(self, run: Running) -> float:
        """Seconds the run's lease surely runs still (<= 0: it may have lapsed): a lease from
        when its claim call, or the last heartbeat call that renewed it, was sent. Not so after
        a pause of the process (SIGSTOP, a starved host) longer than a lease: the reaper may
        have retried the run elsewhere, and that retry shares this one's fence, so the fence
        alone would call this attempt current until the next heartbeat lets it go. Each run
        counts from its own stamp: counted from the last beat whose every call went through,
        a cluster node down for a lease made every run of the other nodes not current, though
        their leases were renewed (the last session's note). No lease keeper: a lease ahead."""
        lease = self.config.lease_ms / 1000
        if self.renewed_at is None:
            return lease
        return lease - (time.monotonic() - (run.leased_at or run.started))

    def lapsing(self, within: float) -> list[Running]:
        """The runs executing here that were neither claimed nor renewed (by a heartbeat call
        sent, see `mark_leased`) within `within` seconds, and not stopped for it yet. Read
        from the lease keeper's thread: retried while the loop changes the dict under the
        read. Each run counts from its own claim or renewal: every beat stamps each run it
        renewed, and one that began after a claim call was sent may not hold the run yet (the
        loop starts it later), so the beat's start would credit that run with time its server
        lease never had (a review)."""
        if self.renewed_at is None:  # (no lease keeper)
            return []
        now = time.monotonic()
        for _ in range(10):
            try:
                runs = list(self.active.values())
                break
            except RuntimeError:  # dictionary changed size during iteration
                continue
        else:
            return []
        # (a run held for its renewal has not started its handler: no retry can run beside
        # it; it starts once a beat renews it, and is let go when one names it gone)
        return [r for r in runs if not r.reported and not r.lapsed
                and (r.held is None or r.held.is_set())
                and now - (r.leased_at or r.started) >= within]  # fmt: skip

    def let_lapse(self, runs: list[Running]) -> None:
        """Stop the runs whose leases run out by this process's clock (see `lapsing`; the
        lease keeper could not renew them: the server refused or did not answer) before the
        server's lapse: the reaper retries each elsewhere then, and it must not still run here
        (a server at its maxmemory refused the renewals, and once memory was freed the reaper
        re-ran runs whose handlers went on here for seconds, strict ones included). The lease
        keeper's thread marked them (`lapsed`, `drained`: not the run's own cancel, nothing
        is reported) and raised their flags; here their tasks are cancelled as at a drain
        deadline (a step in a worker process is killed at once). Each keeps its slot until
        its task ended, and is renewed no more: it runs again once the reaper sees its lease
        lapse, as after a crash."""
        for run in runs:
            if self.active.get(run.run_id) is not run or run.reported:
                continue
            if run.task is not None and not run.task.done():
                self.stop_task(run)
                if run.in_async_step:  # (a library may swallow the cancel)
                    again = asyncio.ensure_future(self.until_out_of_step(run, RECANCEL_AFTER))
                    self._pending.add(again)
                    again.add_done_callback(self._pending.discard)

    async def _still_current(self, run: Running, seq: str) -> bool:
        """Whether the run's lease is held, it was not cancelled and no newer run of its group
        was admitted. While the server fails the read (down, restarting, failing over), asked
        again until it answers or the lease runs out: False then, as the run is retried
        elsewhere (the error reached the step, which FAILED runs of ten attempts on their
        first: a probe)."""
        assert self.fences is not None and run.fence_at is not None
        shard, group = run.fence_at
        pause = FENCE_RETRY_FIRST
        while True:
            left = self.lease_left(run)
            if left <= 0 or run.ctx.cancelled:  # (a heartbeat let it go meanwhile, maybe)
                return False
            try:  # (bounded: a silent server holds a read past the lease otherwise)
                newest = await wait_for(self.fences(shard, group), max(0.05, left))
            except SERVER_UNAVAILABLE as exc:  # (TimeoutError among them: wait_for's)
                repeats = _FENCE_NOT_READ.due(type(exc).__name__)
                if repeats is not None:
                    log.warning("fence not read; asking again until the lease runs out",
                                extra={"error": describe(exc), "repeats": repeats})  # fmt: skip
                await asyncio.sleep(pause)
                pause = min(pause * 2, FENCE_RETRY_MAX)
                continue
            return newest is None or newest.decode() <= seq

    def _fail_at_once(self, shard: int, claim: Claim, error: str) -> None:
        log.error("claimed run cannot start", extra={"run": claim.run_id, "error": error})
        ctx = Context(run_id=claim.run_id, workflow=claim.workflow, attempt=claim.attempt,
                      input={}, metadata={}, event="", event_id="", key=claim.key)  # fmt: skip
        run = Running(claim.run_id, shard, claim.attempt, Workflow(claim.workflow, []), ctx)
        run.began = True  # (its task reports: a stop cancels it, see stop_task)
        self.active[claim.run_id] = run
        run.task = asyncio.create_task(self.report(run, Outcome.FAILED, error))

    def stop_task(self, run: Running) -> None:
        """Cancel the run's task. One whose coroutine has not begun (created with its claim's
        reply, and a cancel came before the loop stepped it) stops as it begins instead: a
        task cancelled before its first step never runs its body, so it reported nothing and
        freed nothing: its cancel was reported only after the grace period, and in strict
        mode its group's newest run waited that long (a probe: 5 s, 2-3 pairs in 40)."""
        task = run.task
        if task is None or task.done():
            return
        if run.began:
            task.cancel()
        else:
            run.stop_first = True

    async def _execute(self, run: Running) -> None:
        run.began = True
        try:
            if run.stop_first:  # (see stop_task: as a cancel of its first step)
                raise asyncio.CancelledError
            if run.held is not None:
                await run.held.wait()  # (see Runner.start)
            run.handler_started_us = int(server_now() * 1e6)
            HOP_SECONDS.labels("start").observe(time.monotonic() - run.started)
            with tracing.current(run.span):  # the step spans are its children
                outcome, error = await self._run_steps(run)
        except LeftToLease:
            if run.span is not None:
                tracing.end_run(run.span, "HANDED_BACK", "")
            self._free_slot(run)  # (handed back, or its lease lapses)
            self._leave(run)
            return
        except asyncio.CancelledError:
            if run.cancel_decided_ms is None:
                if run.span is not None:
                    tracing.end_run(run.span, "LEASE_LAPSED" if run.lapsed else "HANDED_BACK", "")
                if self.stopping.is_set() or run.lapsed:  # (renewed no more; a heartbeat
                    # that names it must not report the old attempt CANCELLED after the grace)
                    self._free_slot(run)
                self._leave(run)
                raise  # shutdown: the run is handed back (or left to its lease)
            outcome, error = Outcome.CANCELLED, ""
            await self._cancelled(run)
        else:
            if run.cancel_decided_ms is not None:  # (a step took its cancel without raising
                # CancelledError: it returned, or raised another error; its hook never ran, a
                # probe: only runs whose task raised it got theirs)
                await self._cancelled(run)
        await self.report(run, outcome, error)

    async def _cancelled(self, run: Running) -> None:
        """The on_cancel hook of a run whose task took its cancel: now, or once its sync step
        returned (it cleans up after the step, not beside it while it still runs)."""
        # The cancel (repeated, maybe: see Runner.until_out_of_step) is handled: none pending
        # stays to misread an asyncio.timeout in what follows.
        task = asyncio.current_task()
        while task is not None and task.cancelling():
            task.uncancel()
        if run.stops_later is None:
            self.stage(run, "stopped")
            if run.handler_started_us:  # (one held for its renewal ran no step: no hook, as
                await self._on_cancel(run)  # for a run cancelled before its task began)
        elif run.stops_later.done():  # (strict mode waited for it: "stopped" was seen)
            await self._on_cancel(run)
        else:
            run.stops_later.add_done_callback(lambda _: self._hook_later(run))

    def _free_slot(self, run: Running) -> None:
        """The run leaves its slot (unless a newer attempt holds its id now), and the fetch
        loop, which may wait on a full executor, is woken. A run left to its lease (its worker
        lost while this process was frozen past the lease) once left without the wake-up: the
        fetch loop went on waiting, its retry ASSIGNED here with the slot unused."""
        if self.active.get(run.run_id) is run:
            del self.active[run.run_id]
        if not run.reported:
            self._let_go(run)
        self.slot_freed.set()

    def _let_go(self, run: Running) -> None:
        """Remember an attempt stopped unreported for LET_GO_LEASES leases (by then the
        reaper retried it as a newer attempt), LET_GO_MOST at most."""
        now = time.monotonic()
        self.let_go[(run.run_id, run.attempt)] = now
        self.let_go.move_to_end((run.run_id, run.attempt))
        keep = now - LET_GO_LEASES * self.config.lease_ms / 1000
        while self.let_go and (
            len(self.let_go) > LET_GO_MOST or next(iter(self.let_go.values())) < keep
        ):
            self.let_go.popitem(last=False)

    def _leave(self, run: Running) -> None:
        """A run the drain stopped, its step ended: queued to be handed back (retried
        elsewhere at once, no attempt used). One whose sync step runs on is left to its
        lease."""
        if run.step_runs_on or run.reported or not self.stopping.is_set():
            return  # (reported: its step ran on past its timeout, the run failed)
        self.left.append((run.shard, run.run_id, run.attempt))
        self.left_added.set()

    async def _run_steps(self, run: Running) -> tuple[Outcome, str]:
        stored = 0  # bytes of the outputs so far, msgpack-encoded
        wf = run.workflow
        ordered = self._ordered[wf.id] if self.workflows.get(wf.id) is wf else wf.ordered_steps()
        for step in ordered:
            for attempt in range(step.retries + 1):
                tried = await self._try_step(run, step, attempt)
                if isinstance(tried, int):
                    size = tried
                    break
                failed = await self._after_failure(run, step, attempt, tried)
                if failed is not None:
                    return failed
            stored += size
            if stored > self.config.max_output_bytes:
                del run.ctx.outputs[step.name]
                return Outcome.FAILED, (
                    f"step {step.name!r} returned {size:,} bytes (msgpack), which makes the run's "
                    f"outputs {stored:,} bytes, over the {self.config.max_output_bytes:,}-byte cap "
                    "on stored outputs: return less (store big results elsewhere and return "
                    "their key), or raise the executor's --max-output-bytes"
                )
            if _stopped(run):  # (its step swallowed the shutdown's cancel, or returned when
                raise asyncio.CancelledError  # asked to stop: no later step starts)
            if run.ctx.cancelled:  # (`_execute` runs its on_cancel hook: "stopped" then)
                self.observe_cancel(run)
                return Outcome.CANCELLED, ""
        return Outcome.SUCCEEDED, ""

    async def _try_step(self, run: Running, step: Step, attempt: int) -> int | BaseException:
        """One try of a step: its output stored in the run's outputs and its size (msgpack),
        or what it raised. Any BaseException a step raises is its failure: SystemExit or
        KeyboardInterrupt would otherwise stop the executor with every run it holds (asyncio
        re-raises them out of the loop), and a user's BaseException subclass would end the
        run's task with the run RUNNING and its slot held."""
        started = time.perf_counter()
        run.ctx.retry_count = attempt  # (steps run one at a time: one field serves them)
        try:
            with tracing.step(self.tracer if run.span else None, step.name, attempt):
                output = await self._call(step, run)
            size = len(readable(output, step.name))  # msgpack-able, and read back
            run.ctx.outputs[step.name] = output
            return size
        except asyncio.CancelledError:
            self.observe_cancel(run)
            raise
        except BaseException as exc:
            return exc
        finally:  # (the try's time: a retry's wait is not the step's)
            metrics.STEP_SECONDS.labels(run.workflow.id).observe(time.perf_counter() - started)

    async def _after_failure(
        self, run: Running, step: Step, attempt: int, exc: BaseException
    ) -> tuple[Outcome, str] | None:
        """The run's end after `attempt` of `step` raised `exc`, or None once the step may be
        tried again (its retry's wait slept)."""
        if run.reported:  # (its step ran on past its timeout and grace: failed then)
            return Outcome.FAILED, ""
        if isinstance(exc, WorkerTerminated) and await self._left_to_lease(run):
            raise LeftToLease from None
        if isinstance(exc, WorkerLapsed) or (
            isinstance(exc, WorkerLost) and self.lease_left(run) <= 0
        ):  # (its worker stopped the step, the lease lapsed while this process was frozen:
            # the run is retried elsewhere; failing it here would end it FAILED)
            raise LeftToLease from None
        if _stopped(run):  # (a shutdown's cancel a library made another error of)
            raise asyncio.CancelledError from exc
        if isinstance(exc, (OutputError, StepRunsOn, NotAwaited)):  # (no retry; the executor's
            # traceback, or the line that asked still_current(), said in the message)
            return Outcome.FAILED, str(exc)
        if attempt < step.retries and not run.ctx.cancelled:  # (cancelled: no retry)
            if not await self._waited_to_retry(run, self.retry_wait(attempt)):
                raise LeftToLease from None
            return None
        # (a worker's traceback is its message: the executor's frames above it say nothing)
        text = str(exc) if isinstance(exc, StepError | WorkerLost) else step_traceback(exc)
        tries = f"{attempt + 1} tries" if attempt else "1 try"  # (the run's attempts are others)
        return Outcome.FAILED, f"step {step.name!r} failed after {tries}:\n{text}"

    async def until_out_of_step(self, run: Running, first: float, within: float = math.inf) -> None:
        """Cancel the run's task again, `first` seconds from now and then every RECANCEL_EVERY,
        while its async step goes on (for `within` seconds at most): a library may swallow the
        CancelledError that lands inside a call of its own. redis-py 8.2's asyncio client does,
        in about two cancels in three of a task looping on HGET, and so did
        `ctx.still_current()`; the step then ran to its end beside the run that superseded it.
        Until the step is left: by the CancelledError, or by its return (a cancelled run then
        ends CANCELLED before its next step). A step's own cleanup after the CancelledError
        (`finally: await ...`) has the first `first` seconds; `on_cancel` runs shielded."""
        task, pause = run.task, first
        end = time.monotonic() + within
        while task is not None and not task.done() and time.monotonic() < end:
            await asyncio.sleep(pause)
            pause = RECANCEL_EVERY
            if not run.in_async_step or task.done():
                return
            metrics.CANCELS_REPEATED.inc()
            task.cancel()

    async def _left_to_lease(self, run: Running) -> bool:
        """A step's worker ended by a SIGTERM the executor did not send: when the executor is
        stopping too (within a second: the SIGTERM of a supervisor that signals every process
        of the cgroup, systemd's default KillMode, reaches both at once), its run is left to
        its lease and retried elsewhere, as at a drain deadline, rather than failed. Otherwise
        (somebody's `kill` of the worker) the step failed."""
        try:
            await wait_for(self.stopping.wait(), 1.0)
        except TimeoutError:
            return False
        log.warning(
            "a step's worker process was ended by a SIGTERM not the executor's while it stops; "
            "its run is left to its lease (use KillMode=mixed under systemd to let it finish)",
            extra={"run": run.run_id, "workflow": run.workflow.id},
        )
        return True

    async def _call(self, step: Step, run: Running) -> Any:
        """The step's output. A CancelledError nothing asked for (the step raised it, or
        awaited something another task cancelled) is the step's failure, not a cancel of the
        run or a shutdown: those cancel this task first."""
        try:
            return await self._call_step(step, run)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling() or run.ctx.cancelled:
                raise
            raise StepError(  # (where the step raised it: it has no message of its own)
                f"{step_traceback(exc)}step {step.name!r} raised CancelledError, and neither "
                "its run was cancelled nor the executor was stopping"
            ) from None

    async def _call_step(self, step: Step, run: Running) -> Any:
        ctx = run.ctx
        isolation = run.workflow.isolation_of(step)
        strict = run.workflow.concurrency is not None and run.workflow.concurrency.strict
        run.report_when_stopped = strict or isolation == "process"
        if isolation == "process" and self.processes is not None:
            return await self._in_process(step, run)
        if not step.is_async:
            loop = asyncio.get_running_loop()
            self._say_if_threads_busy(run)
            queued = self.pool.submit(_on_thread, run, step, ctx)
            thread = asyncio.wrap_future(queued, loop=loop)
            self.on_threads += 1
            thread.add_done_callback(self._thread_returned)
            run.thread, run.queued = thread, queued
            try:
                return await self._sync(thread, run, strict, step.timeout)
            except StepRunsOn as exc:
                raise StepRunsOn(f"step {step.name!r} {exc} (timeout {step.timeout}s)") from None
            except StepTimedOut as exc:
                message = f"step {step.name!r} timed out after {step.timeout}s"
                raise StepTimedOut(message, exc.where) from None
        coro = step.fn(ctx)
        run.in_async_step = True
        token = run.timing = object()
        timers: list[asyncio.TimerHandle] = []
        try:
            if step.timeout:
                if not strict:  # (the grace counted from when the timeout came: a step that
                    # blocked the loop past both was failed as it left)
                    loop = asyncio.get_running_loop()
                    timers.append(loop.call_later(step.timeout, lambda: timers.append(
                        loop.call_later(self.config.grace, self._fail_if_on, run, step, token)
                    )))  # fmt: skip
                out = await self._timed(coro, step.name, step.timeout, not strict)
            else:
                out = await coro
            ctx.check_awaited(step.name)
            return out
        finally:
            run.in_async_step = False
            run.timing = None
            for timer in timers:
                timer.cancel()

    def _thread_returned(self, _: object) -> None:
        self.on_threads -= 1

    def _async_stray_ended(self, _: object) -> None:
        self.async_strays -= 1
        metrics.STRAY_HANDLERS.dec()

    def _say_if_threads_busy(self, run: Running) -> None:
        """Every thread of the step pool holds a sync step (those past their run's cancel or
        timeout among them): this one waits for a thread, its run RUNNING. Said once per 5 s;
        before, only the stray handlers gauge showed it (a probe)."""
        threads = self.pool._max_workers
        if self.on_threads >= threads and (repeats := _THREADS_BUSY.due("busy")) is not None:
            log.warning(
                "every step thread is busy: sync steps wait for one, their runs RUNNING (steps "
                "that never return hold them; see stray handlers)",
                extra={"threads": threads, "workflow": run.workflow.id, "repeats": repeats},
            )

    def _fail_if_on(self, run: Running, step: Step, token: object) -> None:
        """An async step's timeout and the grace period after it passed with the step still in
        (it swallows every cancel): its run fails and its slot is freed, the step's task
        left to run on (a stray handler, as a sync step's), as a cancel of the run does. The
        run stayed RUNNING with its slot, without a word, for as long as the step ran (a
        probe: for good). Strict mode holds the slot until the step is out."""
        task = asyncio.ensure_future(self._fail_left_on(run, step, token))
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)

    async def _fail_left_on(self, run: Running, step: Step, token: object) -> None:
        if run.timing is not token or run.reported or run.ctx.cancelled or _stopped(run):
            return  # (out of the step; or its cancel, the drain or a lapse reports it)
        if self.async_strays >= self.config.slots:  # (bounded, as sync ones by the pool)
            if (repeats := _STRAYS_FULL.due("full")) is not None:
                log.warning(
                    "an async step runs on past its timeout and grace, catching each "
                    "CancelledError, and as many left running already: its run keeps its "
                    "slot", extra={"run": run.run_id, "workflow": run.workflow.id,
                                   "step": step.name, "repeats": repeats},
                )  # fmt: skip
            return
        if run.task is not None and not run.task.done():
            self.async_strays += 1
            metrics.STRAY_HANDLERS.inc()
            run.task.add_done_callback(self._async_stray_ended)
        log.warning(
            "an async step ran on past its timeout and the grace period, catching each "
            "CancelledError: its run failed and its slot is free, the step runs on beside",
            extra={"run": run.run_id, "workflow": run.workflow.id, "step": step.name},
        )
        await self.report(run, Outcome.FAILED, (
            f"step {step.name!r} timed out after {step.timeout}s and was still running "
            f"{self.config.grace}s later, catching each CancelledError (its task was left "
            "running): let CancelledError propagate"
        ))  # fmt: skip

    @staticmethod
    async def _timed(coro: Awaitable[Any], name: str, timeout: float, repeat: bool) -> Any:
        """An async step's output within its `timeout`: past it, the step's task is cancelled,
        and (`repeat`) cancelled again RECANCEL_AFTER later and then every RECANCEL_EVERY until
        the step is left, as a run's cancel is (Runner.until_out_of_step): asyncio.timeout
        cancels once, and a step that swallowed it (redis-py's client may) ran on to its end,
        and then succeeded. A step left after its timeout timed out, however it left, unless a
        cancel of the run or a shutdown came too. (Not wait_for: on Python 3.11 it runs the
        step as a task of its own, and asyncio re-raises a SystemExit or KeyboardInterrupt of a
        task out of the loop.)"""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        sent = 0  # cancels of the task for the timeout
        inside = True
        handle: asyncio.TimerHandle | None = None

        def expire() -> None:
            nonlocal handle, sent
            if not inside:
                return
            if sent:
                metrics.CANCELS_REPEATED.inc()
            sent += 1
            task.cancel()
            if repeat:
                handle = loop.call_later(RECANCEL_AFTER if sent == 1 else RECANCEL_EVERY, expire)

        handle = loop.call_later(timeout, expire)
        failure: BaseException | None = None
        try:
            output = await coro
        except BaseException as exc:
            if not sent:
                raise  # the step's own failure (or a cancel of the run, or a shutdown)
            failure = exc
        finally:
            inside = False
            if handle is not None:
                handle.cancel()
            others = task.cancelling() > sent  # a cancel of the run, or a shutdown, came too
            for _ in range(sent):
                task.uncancel()
        if not sent:
            return output
        if others:  # (it wins, however the step left: swallowed, returned, or another error)
            if isinstance(failure, asyncio.CancelledError):
                raise failure
            raise asyncio.CancelledError
        raise _timed_out(name, timeout, failure)

    async def _in_process(self, step: Step, run: Running) -> Any:
        """A step in a worker process (isolation "process"): a cancel or its timeout stops it
        by the ladder (flag, SIGTERM, SIGKILL) before the run is reported."""
        assert self.processes is not None
        ctx = run.ctx
        job: dict[str, Any] = {
            "m": step.fn.__module__, "q": step.fn.__qualname__, "sn": step.name, "id": ctx.run_id,
            "w": ctx.workflow, "a": ctx.attempt, "in": ctx.input, "md": ctx.metadata,
            "ev": ctx.event, "ei": ctx.event_id, "k": ctx.key, "f": str(ctx.fence),
            "o": ctx.outputs, "ca": ctx.claimed_at, "mf": module_file(step.fn.__module__),
            "rc": ctx.retry_count,
            # (the lease check of still_current(), as the executor's: the lease; none for a
            # run without a group, current until cancelled; see lease_left)
            "ls": 0,
            # (the names its steps' functions were registered under, for ctx.parent(fn): the
            # worker may not have imported the module that registered them)
            "pn": [[*fn, name] for fn, name in run.workflow.step_names.items()],
        }  # fmt: skip
        if self.renewed_at is not None and run.fence_at is not None:
            job["ls"] = self.config.lease_ms / 1000  # (and the worker's own watch: its
            # executor may be frozen, the run retried elsewhere once the lease runs out)
        if run.fence_at is not None and self.keys is not None:
            shard, group = run.fence_at
            job.update(fk=self.keys.shard(shard).fences_hash, g=group, s=f"{ctx.fence:032x}")
        try:
            return await self.processes.call(
                job,
                lease=lambda cell: self._share_lease(run, cell),
                timeout=step.timeout,
                # (a drain deadline or a lapsed lease kills the worker at once: no ladder)
                cancelled=lambda: ctx.cancelled and not run.drained,
                stage=lambda stage: self.stage(run, stage),
            )
        except TimeoutError:
            raise StepTimedOut(f"step {step.name!r} timed out after {step.timeout}s") from None
        except StepError as exc:
            raise StepError(f"in its worker process:\n{exc}") from None
        finally:
            with self._cells:  # (the worker is idle again: no renewal of this run goes there)
                run.lease_cell = None

    def _share_lease(self, run: Running, cell: Any) -> None:
        """Show the run's lease stamps to the worker process about to run its step (`cell`,
        that worker's shared pair: see mark_leased), and have the lease keeper's renewals of
        them written there too; a cancelled run's current stamp as lapsed (its
        still_current() is False: the worker's own flag is raised only when the loop stops
        it)."""
        with self._cells:
            run.lease_cell = cell
            stamp = run.leased_at or run.started
            cell[CURRENT] = 0.0 if run.ctx.cancelled else stamp
            cell[RENEWED] = stamp

    async def _sync(
        self, thread: asyncio.Future[Any], run: Running, strict: bool, timeout: float | None
    ) -> Any:
        """A sync step's result (see `_waited`); its own exception as it raised it."""
        try:
            return await self._waited(thread, run, strict, timeout)
        except _Raised as raised:
            error = raised.error
        raise error  # (outside the except: not "during handling of" the box)

    async def _waited(
        self, thread: asyncio.Future[Any], run: Running, strict: bool, timeout: float | None
    ) -> Any:
        """A sync step's result. A thread cannot be interrupted: when the run is cancelled,
        wait (within the grace period) until the step has returned, so the run is not reported
        CANCELLED, nor its slot freed, while its handler still executes. A step still running
        after the grace period (or past its timeout) is counted as a stray handler until it
        returns; in strict mode its run keeps waiting for it (and holds its slot)."""
        try:
            return await wait_for(asyncio.shield(thread), timeout)
        except TimeoutError:
            if thread.done():  # (the step's own TimeoutError, a socket's say: its failure)
                return thread.result()
            where = _thread_frames(run)
        except asyncio.CancelledError:
            await self._cancelled_sync(thread, run, strict)
            raise
        try:  # (past its timeout)
            await self._stop_timed_out(thread, run, strict)
        except asyncio.CancelledError:  # (a cancel of the run, or the drain, meanwhile)
            await self._cancelled_sync(thread, run, strict)
            raise
        raise StepTimedOut("", where)

    async def _cancelled_sync(
        self, thread: asyncio.Future[Any], run: Running, strict: bool
    ) -> None:
        """The run's task was cancelled while its sync step ran: by the run's cancel (the step
        has the grace period to return), the drain deadline, or a shutdown. A cancel of the
        run that came while the drain stopped the step is a cancel still: it ended the drain's
        wait, and the run was reported (its strict slot freed, its hook run) while the step
        ran on, beside the newer run of its key (an upgrade probe, 5 tries of 5)."""
        if run.cancel_decided_ms is not None and _unstarted(run, thread):
            return  # (its step waited for a thread: it never starts)
        if run.cancel_decided_ms is None:
            if run.drained:  # the drain deadline: the step is asked to stop
                await self._stop_for_drain(thread, run)
            if run.cancel_decided_ms is None or thread.done():
                return  # a shutdown, or a drain's stop the step obeyed
        with contextlib.suppress(Exception, asyncio.CancelledError, TimeoutError):
            await wait_for(asyncio.shield(thread), self.config.grace)
        if not thread.done():
            self._stray(thread)
            run.stops_later = thread
            thread.add_done_callback(lambda _: self.stage(run, "stopped"))
            if strict:
                with contextlib.suppress(Exception):
                    await asyncio.shield(thread)

    async def _stop_timed_out(
        self, thread: asyncio.Future[Any], run: Running, strict: bool
    ) -> None:
        """A sync step past its timeout sees `ctx.cancelled` and has the grace period to return
        (strict mode: as long as it runs); then `ctx.cancelled` is cleared for its retry. One
        that runs on is a stray handler and raises StepRunsOn: its run FAILS rather than retry
        the step beside it (a probe saw three tries of one step running at once, none of them
        told to stop)."""
        if _unstarted(run, thread):  # (it waited its whole timeout for a thread)
            return
        flag = run.ctx._flag
        flag.set()
        with contextlib.suppress(Exception, TimeoutError):  # (a cancel goes to the caller)
            await wait_for(asyncio.shield(thread), self.config.grace)
        if not thread.done() and strict:
            with contextlib.suppress(Exception):
                await asyncio.shield(thread)
        if not thread.done():
            self._stray(thread)
            raise StepRunsOn(
                f"timed out, and did not return within the {self.config.grace:g}s grace period "
                "once `ctx.cancelled` was set: not retried while it runs (poll ctx.cancelled, "
                'or give it isolation="process")'
            )
        if run.cancel_decided_ms is None and not run.drained:
            flag.clear()  # (its retry starts afresh; a cancel of the run keeps it set)

    async def _stop_for_drain(self, thread: asyncio.Future[Any], run: Running) -> None:
        """At the drain deadline, a sync step sees `ctx.cancelled` (a cooperative one returns)
        and has DRAIN_STOP_WITHIN seconds to: then its run is handed back. One that runs on is
        a stray handler, and its run is left to its lease (handing it back would run it twice
        at once)."""
        if _unstarted(run, thread):
            return
        run.ctx._cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError, TimeoutError):
            await wait_for(asyncio.shield(thread), DRAIN_STOP_WITHIN)
        self._stray(thread)  # (counted only while it runs)

    def _stray(self, thread: asyncio.Future[Any]) -> None:
        """Count a sync step that runs on though its run no longer waits for it (once)."""
        if not thread.done() and thread not in self._strays:
            self._strays.add(thread)
            metrics.STRAY_HANDLERS.inc()
            thread.add_done_callback(lambda _: metrics.STRAY_HANDLERS.dec())

    def _hook_later(self, run: Running) -> None:
        """The on_cancel hook of a run whose sync step returned after its run was reported."""
        if run.workflow.cancel_hook is None:
            return
        task = asyncio.ensure_future(self._on_cancel(run))
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)

    async def _on_cancel(self, run: Running) -> None:
        """The run's on_cancel hook, shielded, waited for within the grace period (a second at
        least; in strict mode as long as it runs, as a step): one still running then is left to
        run on, a stray handler, and the run is reported (a hook that never returned kept its
        run from being reported, and its slot taken, for good)."""
        hook = run.workflow.cancel_hook
        if hook is None:
            return
        started = threading.Event()
        if is_async_callable(hook):
            started.set()
            job: asyncio.Future[Any] = asyncio.ensure_future(_hook_guarded(hook(run.ctx)))
        else:
            job = asyncio.get_running_loop().run_in_executor(
                self.hook_pool, _hook_on_thread, hook, run.ctx, started
            )
        self._hook_jobs.add(job)  # (held until done: the loop keeps only weak references)
        job.add_done_callback(self._hook_jobs.discard)
        job.add_done_callback(functools.partial(_hook_ended, run.run_id))
        conc = run.workflow.concurrency
        wait = None if conc is not None and conc.strict else max(self.config.grace, HOOK_WAIT)
        try:
            await wait_for(asyncio.shield(job), wait)
        except TimeoutError:
            if not job.done():
                self._hook_runs_on(run, job, started.is_set(), wait or 0.0)
        except asyncio.CancelledError:
            raise
        except BaseException:  # (its failure: logged by _hook_ended)
            pass

    def _hook_runs_on(
        self, run: Running, job: asyncio.Future[Any], began: bool, waited: float
    ) -> None:
        """A hook not done within its wait: its run is reported, and the hook runs on (a stray
        handler), or waits for a thread of the hooks' pool, every one held by a hook that never
        returned (not started: not a stray; it runs when one is free)."""
        extra = {"run": run.run_id, "workflow": run.workflow.id, "waited_s": waited}
        if began:
            log.warning("on_cancel hook still running after the grace period: its run is "
                        "reported CANCELLED and the hook runs on, a stray handler",
                        extra=extra)  # fmt: skip
            self._stray(job)
        else:
            log.warning("on_cancel hook not started: every thread of the hooks' pool is held by "
                        "a hook that has not returned; its run is reported CANCELLED and the "
                        "hook runs once a thread is free", extra=extra)  # fmt: skip

    async def _waited_to_retry(self, run: Running, wait: float) -> bool:
        """Sleep `wait` seconds before a step's next try: True once slept. False, at once, when
        the executor drains (or starts to) and the try could not start before the drain's
        deadline: the run is then handed back now (retried elsewhere at once), rather than
        holding the drain to its end (up to retry_backoff_max) to be stopped there anyway."""
        loop = asyncio.get_running_loop()
        until = loop.time() + wait
        if not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await wait_for(self.stopping.wait(), wait)  # (a drain began)
        if self.stopping.is_set() and until >= self.drain_deadline:
            log.warning(
                "a run waiting to retry a step is handed back: the try would start after the "
                "drain deadline (it is retried elsewhere now, from its first step, no attempt "
                "used)",
                extra={"run": run.run_id, "workflow": run.workflow.id},
            )
            return False
        await asyncio.sleep(max(0.0, until - loop.time()))
        return True

    def retry_wait(self, attempt: int) -> float:
        """Seconds before a step's retry after `attempt` (0 first): doubled each time, capped."""
        return min(
            self.config.retry_backoff * 2.0 ** min(attempt, 60), self.config.retry_backoff_max
        )

    def observe_cancel(self, run: Running) -> None:
        if run.cancel_decided_ms is not None:
            metrics.CANCEL_LATENCY_SECONDS.observe(self._since_cancel(run))

    async def report(self, run: Running, outcome: Outcome, error: str) -> None:
        """Hand the outcome to the outbox (once), then free the local slot."""
        if run.reported:
            return
        run.reported = True
        if run.cancel_decided_ms is not None:
            outcome, error = Outcome.CANCELLED, ""  # results of cancelled runs are discarded
        outputs = None  # steps that returned None have no output: nothing is stored for them
        kept = {k: v for k, v in run.ctx.outputs.items() if v is not None}
        if kept and outcome is not Outcome.CANCELLED:
            outputs = codec.pack_value(kept)
            if len(outputs) > self.config.max_output_bytes and outcome is not Outcome.SUCCEEDED:
                outputs = None  # a failed run keeps its own error
            elif len(outputs) > self.config.max_output_bytes:  # names and map overhead included
                error = (
                    f"the run's outputs come to {len(outputs):,} bytes (msgpack), over the "
                    f"{self.config.max_output_bytes:,}-byte cap on stored outputs: return less, "
                    "or raise the executor's --max-output-bytes"
                )
                outcome, outputs = Outcome.FAILED, None
        result = RunResult(run.run_id, run.attempt, outcome, capped_error(error), outputs,
                           run.handler_started_us)  # fmt: skip
        if run.span is not None:
            tracing.end_run(run.span, outcome.name, error)
        try:
            turn = await self._put_until_written(run, result)
            # Renewed until known to have survived, even when the finish call applied it: a
            # failover or a crash of the server can still lose that write.
            if self.active.get(run.run_id) is run:  # not superseded by a newer attempt here
                resend_at = time.monotonic() + self.config.lease_ms / 1000
                self.awaiting[run.run_id] = Reported(
                    run.run_id, run.shard, run.attempt, result, resend_at, turn=turn
                )
        except Exception as exc:
            # Not written: the run's lease expires and the reaper retries it elsewhere.
            if not isinstance(exc, SERVER_UNAVAILABLE):  # (a defect: its stack)
                log.exception("result not written", extra={"run": run.run_id})
        finally:
            metrics.RUNS_FINISHED.labels(run.workflow.id, OUTCOME_LABEL[outcome]).inc()
            self._free_slot(run)

    async def _put_until_written(self, run: Running, result: RunResult) -> int:
        """Hand `result` to the outbox, again while the server refuses it or does not take it
        (at its maxmemory, down, failing over: the outbox tries each put for up to a lease),
        the run keeping its slot and renewed as a running one; its turn (see Outbox.put).
        Dropped, such a result's run was retried once its lease lapsed and its handler ran
        again (a probe: 82 re-runs in a 4-minute OOM); and with its slot freed, runs whose
        results could not be written either were taken meanwhile (a review). Given up when a
        newer attempt of the run started here. (Not shielded: a cancel of this task, a drain's
        deadline, cancels only the future, and the outbox writes the result all the same,
        skipping a future that is done.)"""
        while True:
            try:
                return await self.outbox.put(run.shard, result)
            except SERVER_UNAVAILABLE as exc:
                if self.active.get(run.run_id) is not run:
                    raise
                if (repeats := _NOT_WRITTEN.due(type(exc).__name__)) is not None:
                    log.warning("result not written yet: put again until the server takes it, "
                                "the run keeping its slot", extra={"run": run.run_id,
                                **error_fields(exc), "repeats": repeats})  # fmt: skip
                await asyncio.sleep(RESULT_RETRY)

    def leased(self) -> list[tuple[int, str, int, int]]:
        """(shard, run id, attempt, turn) of the runs whose leases this executor renews:
        running here (a result being written included; turn 0), and reported but not yet
        known to have survived (turn: the finish call's that applied it, 0 for the results
        stream). A run id appears once: a claim of a newer attempt drops the older one from
        `awaiting`."""
        out = [(r.shard, r.run_id, r.attempt, 0) for r in self.active.values() if not r.lapsed]
        out += [(r.shard, r.run_id, r.attempt, r.turn) for r in self.awaiting.values()
                if r.run_id not in self.active]  # fmt: skip
        return out

    def resend_due(self) -> None:
        """Write again the results unapplied for a lease (then 2, 4, ... up to 64 leases)."""
        now = time.monotonic()
        lease = self.config.lease_ms / 1000
        for rep in self.awaiting.values():
            if now >= rep.resend_at:
                rep.resends += 1
                rep.resend_at = now + lease * 2 ** min(rep.resends, 6)
                written = self.outbox.put(rep.shard, rep.result)
                written.add_done_callback(functools.partial(_note_turn, rep))

    async def finish_running(self, timeout: float) -> None:
        """Let running runs finish within `timeout`; stop the rest (an async step cancelled, a
        sync step shown `ctx.cancelled`) and wait up to DRAIN_STOP_WITHIN for their steps to
        end: those are handed back (`left`), the others left to their leases. Either way they
        are retried elsewhere: the at-least-once case of a drain deadline."""
        runs = {r.task: r for r in self.active.values() if r.task}
        tasks = {task: run.run_id for task, run in runs.items()}
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=max(0.0, timeout))
        if late:  # (said first: the hand-backs, made as their steps end, log their outcome)
            log.warning(
                "drain deadline passed; stopping runs: each is handed back as its step ends and "
                "retried elsewhere at once (a run of one attempt once its lease lapses)",
                extra={"runs": len(late), "run_ids": sorted(tasks[t] for t in late)[:100]},
            )  # fmt: skip
        for task in late:
            runs[task].drained = True
            self.stop_task(runs[task])
        # A library may swallow that cancel (see Runner.until_out_of_step): an async step
        # still going on is cancelled again every 10 ms, for a second at most, rather than run
        # on past its leases (and beside its retry) until the loop's own last cancel, which it
        # may swallow too (the process then waited for the step's end to exit).
        # A sync step's own wait is DRAIN_STOP_WITHIN (see _stop_for_drain): both at once.
        await asyncio.gather(
            *(self.until_out_of_step(runs[task], RECANCEL_EVERY, within=DRAIN_STOP_WITHIN)
              for task in late if runs[task].in_async_step),
            asyncio.wait(late, timeout=DRAIN_STOP_WITHIN + 0.1) if late else asyncio.sleep(0),
        )  # fmt: skip
        kept = sorted(tasks[t] for t in late if not t.done() or runs[t].step_runs_on)
        if kept:
            log.warning(
                "runs whose steps ran on past their stop are not handed back: they are retried "
                "elsewhere once their leases lapse", extra={"run_ids": kept[:100]},
            )  # fmt: skip

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        waiting = len(self._hook_jobs)
        self.hook_pool.shutdown(wait=False, cancel_futures=True)
        if waiting:  # (those not started are dropped; those running are left to end)
            log.warning("on_cancel hooks not done as the executor stops: those not started "
                        "are not run", extra={"hooks": waiting})  # fmt: skip
        if self.processes is not None:
            self.processes.close()
