"""Steps in pre-started worker processes (`isolation="process"`): cancellation that is
guaranteed to stop code.

A thread cannot be stopped and a task only at its next await, so a handler that ignores its
cancellation keeps running after its run was reported CANCELLED. A process can be stopped: a
cancelled (or timed-out) step gets the ladder

    flag (ctx.cancelled; an async step is cancelled at its next await)
    -> after the grace period, SIGTERM -> after --kill-after, SIGKILL

and its run is reported only once the process is gone (or the step returned). The workers are
forked from a forkserver that has imported the steps' modules, one per slot, started with the
executor; a stopped worker is replaced in the background. Inputs, parents' outputs and the
step's output cross the boundary as msgpack. A supervisor's SIGTERM to the executor's process
group drains the executor with its steps (the forkserver starts with SIGTERM blocked, the
workers in sessions of their own); one to every process of its cgroup ends the workers too, and
their runs are then left to their leases (`WorkerTerminated`), not failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

import orjson
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from supersede import codec, logs
from supersede.aio import wait_for
from supersede.errors import step_traceback
from supersede.services.executor.outputs import OutputError, readable
from supersede.services.modules import import_module, module_file
from supersede.workflow import Context, NotAwaited, is_async_callable, resolve

log = logging.getLogger("supersede.executor")

FENCE_RETRY_FIRST = 0.05  # s before `ctx.still_current()` reads the fence again after an error
FENCE_RETRY_MAX = 1.0
# The client's errors of a server that is down, restarting, loading or failing over: the read
# is made again (a refused right, a wrong command or bad data is not).
SERVER_UNAVAILABLE: tuple[type[Exception], ...] = (
    RedisConnectionError, RedisTimeoutError, BusyLoadingError, TryAgainError, ClusterDownError,
    ReadOnlyError, ConnectionError, TimeoutError,
    OutOfMemoryError,  # (a full server: one sampled line, not a traceback per run; a probe)
)  # fmt: skip

# The environment variable by which the forkserver learns the files of the modules loaded by
# their paths (a JSON list; set while it starts): supersede.services.executor.preload
STEP_MODULE_FILES = "SUPERSEDE_STEP_MODULE_FILES"
_ENV_LOCK = threading.Lock()
STAGES = ("flag", "sigterm", "sigkill", "stopped")  # of a cancel (the stage metric's label)


def _signal_session(worker: Worker, sig: int) -> None:
    """`sig` to the worker and to every process of its session that stayed in its group (the
    worker is its session's leader: see _worker): what a step started (`subprocess.Popen`) is
    stopped with it. Only the worker's own, then, before its setsid (just forked)."""
    pid = worker.process.pid
    if pid is None:
        return
    if worker.process.exitcode is not None:  # (reaped: its pid may be another's now)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass  # (no process has it: while its group has members, none can)
        except PermissionError:
            return
        else:
            return  # (a process took its pid, so its group was empty: nothing to stop)
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # (no such group: gone, or not yet its own)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if worker.process.is_alive():
                os.kill(pid, sig)
    except PermissionError:
        pass


class StepError(Exception):
    """A step raised in its worker process; the message is the worker's traceback."""


# The two stamps a worker's shared pair holds for the run it runs (monotonic seconds of the
# renewal's send): CURRENT for its still_current(), not renewed once the run is named to stop
# (0: a cancelled run); RENEWED the server's lease, renewed while a cancel's ladder winds the
# step down, which the worker's own watch reads (it cut the ladder's grace short otherwise).
CURRENT, RENEWED = 0, 1


class WorkerLost(Exception):
    """The worker process ended without answering (it crashed, or user code exited it)."""


def _exit_said(code: int | None) -> str:
    """How a worker process ended, for its run's error (one line, not the executor's frames)."""
    if code is None:
        return "it did not exit, its pipe closed"
    if code >= 0:
        return (
            f"it exited with code {code} (the step, or a library it called, ended the process: "
            "os._exit, sys.exit in a thread, or a crash)"
        )
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    oom = " (the kernel's OOM killer sends it when the host runs out of memory)" if (
        -code == signal.SIGKILL) else ""  # fmt: skip
    return f"it was killed by {name}{oom}"


class WorkerLapsed(WorkerLost):
    """The worker stopped the step itself, its attempt's lease lapsed (the executor froze): the
    run is retried elsewhere; this attempt reports nothing."""


class WorkerTerminated(WorkerLost):
    """The worker process ended by a SIGTERM the executor did not send (not the ladder's): a
    supervisor's stop reaching every process of the executor's cgroup (systemd's default
    KillMode), or somebody's `kill`."""


# -- the worker process ----------------------------------------------------------------------


class _WorkerContext(Context):
    """The step's Context inside a worker: `cancelled` reads the executor's flag for this
    worker; `still_current()` checks the attempt's lease as the executor does (its stamp, in
    shared memory: the workers go on while a SIGSTOPped executor's leases lapse) and reads the
    group's fence with the worker's own connection."""

    def __init__(
        self, job: dict[str, Any], flag: ProcessEvent, fence_check: Any, leased: Any
    ) -> None:
        super().__init__(
            run_id=job["id"], workflow=job["w"], attempt=job["a"], input=job["in"],
            metadata=job["md"], event=job["ev"], event_id=job["ei"], key=job["k"],
            fence=int(job["f"]), claimed_at=float(job.get("ca", 0.0)),
            step_names={(m, q): name for m, q, name in job.get("pn", ())},
        )  # fmt: skip
        self.outputs = dict(job["o"])
        self.retry_count = int(job.get("rc", 0))
        self._flag = flag  # type: ignore[assignment]  # (an Event with the same two methods)
        self._fence_check = fence_check
        self._fence_args = (job.get("fk"), job.get("g"), job.get("s"))
        self._lease = float(job.get("ls", 0.0))
        self._leased = leased

    def still_current_blocking(self, timeout: float | None = None) -> bool:
        """As the executor's (Runner._still_current): a read the server fails is made again
        until it answers, the lease runs out or the run is cancelled (False then)."""
        pause = FENCE_RETRY_FIRST
        while True:
            if self.cancelled:
                return False
            lease = self._lease  # (Runner.lease_left, in the worker)
            if lease and time.monotonic() - self._leased[CURRENT] >= lease:
                return False
            key, group, seq = self._fence_args
            if not key:
                return True
            try:
                return bool(self._fence_check(key, group, seq))
            except SERVER_UNAVAILABLE:
                time.sleep(pause)
                pause = min(pause * 2, FENCE_RETRY_MAX)

    async def _still_current(self) -> bool:
        return await asyncio.to_thread(self.still_current_blocking)


async def _until_flag(fn: Callable[[Context], Any], ctx: Context, flag: ProcessEvent) -> Any:
    """An async step inside a worker, cancelled (CancelledError at its next await) once the
    executor raises the flag, as in task isolation."""
    step = asyncio.ensure_future(fn(ctx))
    while not step.done():
        await asyncio.wait({step}, timeout=0.005)
        if flag.is_set() and not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await step
            raise asyncio.CancelledError
    return step.result()


# (as the executor's lease watch: a step is stopped a tenth of a lease before its lease runs
# out by this process's stamp)
LAPSE_MARGIN = 0.1
WATCH_EVERY = 0.05  # seconds between two looks of a worker's watch


class _Job:
    """The job a worker runs, as its watch thread sees it: the attempt's lease (s, 0: none),
    its number (the watch acts on the job it looked at, not the next), and whether the watch
    stopped it because the lease ran out (its reply then says so: not the step's failure)."""

    __slots__ = ("lapsed", "lease", "number")

    def __init__(self) -> None:
        self.lease = 0.0
        self.number = 0
        self.lapsed = False

    def start(self, job: dict[str, Any]) -> None:
        self.number += 1
        self.lapsed = False
        self.lease = float(job.get("ls", 0.0))


def _exit_with_parent(executor: int, job: _Job, flag: ProcessEvent, leased: Any) -> None:
    """A worker must not outlive its executor: a step still running there would run twice
    once its lease expires and the run is retried elsewhere (in strict mode, two handlers of a
    key at once). It watches the executor itself: the forkserver, its parent, may live on for
    seconds after a SIGKILL of the executor. It exits when either is gone. Nor may a step
    outlive its attempt's lease while the executor is frozen (SIGSTOP, a hung VM: it renews
    nothing, and the run is retried elsewhere): as the executor's own lease watch does, the
    worker raises the step's flag a tenth of a lease before the lease runs out by its stamp
    (sent before the server stamped it), and exits when it runs out, before the retry (a probe
    saw a worker's step run 7 s beside the retry, for as long as its executor was stopped; and
    with a ladder's grace after the lapse, 6.8 s)."""
    parent = os.getppid()

    def alive() -> bool:
        try:
            os.kill(executor, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # (the pid now belongs to another user's process)
            return False
        try:  # (a killed executor not yet reaped by its parent is a zombie: gone too)
            with open(f"/proc/{executor}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    return False
        except (OSError, IndexError):
            pass
        return os.getppid() == parent

    def watch() -> None:
        while alive():
            number, lease = job.number, job.lease
            late = time.monotonic() - leased[RENEWED] - lease  # (>= 0: it ran out)
            if lease and late >= -lease * LAPSE_MARGIN and number == job.number:
                job.lapsed = True
                flag.set()  # (a polite step stops; the reply says "lapsed", not its failure)
                if late >= -WATCH_EVERY and number == job.number and job.lease:
                    break  # (the next look would be past it)
            time.sleep(WATCH_EVERY)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(
    conn: Connection,
    flag: ProcessEvent,
    leased: Any,
    redis_url: str,
    executor: int,
    log_level: int = logging.INFO,
) -> None:
    """A worker's loop: one job at a time, from the executor's end of the pipe."""
    if not logging.getLogger().handlers:  # (unless the steps' modules set up their own)
        # the executor's JSON lines at its level: a step's logger.info was lost, its warnings
        # plain text (a process the forkserver started has no logging set up)
        logs.setup(log_level)
    # (the forkserver forked it with SIGTERM blocked, see `ProcessPool._spawn`: the ladder's
    # SIGTERM is for the worker, and so is the mask its steps' subprocesses inherit)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the executor
    os.setsid()  # a signal to the executor's process group (a supervisor's) is not for steps
    running = _Job()
    _exit_with_parent(executor, running, flag, leased)
    client: Any = None

    def fence_check(key: str, group: str, seq: str) -> bool:
        nonlocal client
        if client is None:
            from supersede.config import connect_sync

            client = connect_sync(redis_url)
        newest = client.hget(key, group)
        return newest is None or newest.decode() <= seq

    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        job = codec.unpack(raw)
        running.start(job)
        try:
            if job.get("mf"):  # (a module given by its path: loaded under the same name)
                import_module(job["mf"])
            fn = resolve(job["m"], job["q"])
            ctx = _WorkerContext(job, flag, fence_check, leased)
            out = asyncio.run(_until_flag(fn, ctx, flag)) if is_async_callable(fn) else fn(ctx)
            ctx.check_awaited(job.get("sn", job["q"]))
            readable(out, job.get("sn", job["q"]))  # (an OutputError names the culprit)
            reply = codec.pack_value(["ok", out])
        except asyncio.CancelledError as exc:
            reply = codec.pack_value(["cancelled", step_traceback(exc)])
        except (OutputError, NotAwaited) as exc:  # (the step's failure, not retried)
            reply = codec.pack_value(["output", str(exc)])
        except BaseException as exc:  # (SystemExit, KeyboardInterrupt too: the step's failure)
            reply = codec.pack_value(["err", step_traceback(exc)])
        running.lease = 0.0
        if running.lapsed:  # (stopped by the watch: the attempt is over, whatever the step did)
            reply = codec.pack_value(["lapsed"])
        conn.send_bytes(reply)


# -- the executor's side ----------------------------------------------------------------------


@dataclass(slots=True, eq=False)  # (hashed by identity: the pool keeps a set of them)
class Worker:
    process: Any  # multiprocessing's Process of the forkserver context
    conn: Connection
    flag: ProcessEvent
    # (monotonic) the lease stamp of the run whose step it runs, in shared memory: written
    # by the executor as its heartbeat renews it; the worker goes on while a SIGSTOPped
    # executor's leases lapse (see Runner.lease_left)
    leased: Any
    terminated: bool = False  # the ladder sent it SIGTERM


RESPAWN_DELAY = 0.05
SLOW_START = 10.0  # seconds the step workers' first start may take before a line says so


class ProcessPool:
    """`size` worker processes, forked from a forkserver that preloaded `modules`."""

    def __init__(
        self, size: int, modules: list[str], redis_url: str, *, grace: float, kill_after: float
    ) -> None:
        self.size = size
        self.redis_url = redis_url
        self.grace = grace
        self.kill_after = kill_after
        self._mp = multiprocessing.get_context("forkserver")
        # A module loaded by its path has a name no import finds: the preload module loads
        # its file (see supersede.services.executor.preload), the others by their names.
        self._files = sorted({f for m in modules if (f := module_file(m)) is not None})
        named = sorted({m for m in modules if module_file(m) is None})
        self._modules = sorted({*named, *self._files})
        self._mp.set_forkserver_preload(["supersede.services.executor.preload", *named])
        self._idle: asyncio.Queue[Worker] = asyncio.Queue()
        self._all: set[Worker] = set()
        self._spawning: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        """Start every worker (the forkserver imports the modules once, first). A start that
        takes SLOW_START says so, once: a module whose import waits (on a lock, a server)
        only in the forkserver held the executor's start without a word (a review)."""
        if self.size <= 0:
            return
        first = asyncio.ensure_future(asyncio.to_thread(self._spawn))
        done, _ = await asyncio.wait([first], timeout=SLOW_START)
        if not done:
            log.warning(
                "the step workers' forkserver has been importing %s for %.0f s; the executor "
                "starts once it is done (does a module's import wait on something?)",
                ", ".join(self._modules) or "supersede", SLOW_START,
            )  # fmt: skip
        self._idle.put_nowait(await first)
        for _ in range(self.size - 1):
            self._idle.put_nowait(await asyncio.to_thread(self._spawn))

    def _spawn(self) -> Worker:
        ours, theirs = self._mp.Pipe()
        flag = self._mp.Event()
        leased = self._mp.RawArray("d", 2)  # ([CURRENT], [RENEWED]: Runner.mark_leased)
        process = self._mp.Process(
            target=worker_main,
            args=(theirs, flag, leased, self.redis_url, os.getpid(), logging.root.level),
            daemon=True,
            name="supersede-step",
        )  # fmt: skip
        # The forkserver (which the first start launches) begins with SIGTERM blocked, as this
        # thread has it: a SIGTERM to the executor's whole process group (supervisord's
        # stopasgroup, `kill -TERM -<pgid>`) or cgroup must not end it, since the workers
        # forked from it end with it (their steps failed, the executor's drain notwithstanding).
        # A SIGTERM to the process goes to another thread, the loop's; the forkserver ends when
        # the executor's end of its socket closes. Its workers unblock it. (The resource
        # tracker first: its launch, which the forkserver's would make, unblocks SIGTERM.)
        resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        # The files of the modules loaded by their paths, for the forkserver to import as it
        # starts: at the first start, or again once it was killed (the OOM killer). Only
        # around the start, under a lock (pools may start at once); preload drops it.
        with _ENV_LOCK:
            before = os.environ.get(STEP_MODULE_FILES)
            os.environ[STEP_MODULE_FILES] = orjson.dumps(self._files).decode()
            try:
                process.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                if before is None:
                    os.environ.pop(STEP_MODULE_FILES, None)
                else:
                    os.environ[STEP_MODULE_FILES] = before
        theirs.close()
        worker = Worker(process, ours, flag, leased)
        self._all.add(worker)
        return worker

    def _replace(self, worker: Worker) -> None:
        """Forget a stopped worker and start another in the background (once per worker)."""
        if worker not in self._all:
            return
        self._all.discard(worker)
        worker.conn.close()
        if self._closed:
            return

        async def spawn() -> None:
            delay = 0.1
            if not await self._exited(worker, 10.0):  # reaped (stopped, or SIGKILLed just now)
                with contextlib.suppress(Exception):
                    worker.process.kill()
            _signal_session(worker, signal.SIGKILL)  # (what its step started and left)
            # A moment for the stopped run's report, which would otherwise share the CPU with
            # the fork and the new worker's start: SIGTERM -> CANCELLED took 16 ms over the
            # grace period without it, 10 ms with it (the cancel's own hop and report: 6-8 ms).
            await asyncio.sleep(RESPAWN_DELAY)
            while not self._closed:
                try:
                    self._idle.put_nowait(await asyncio.to_thread(self._spawn))
                    return
                except Exception:
                    log.exception("a step worker process could not be started; retrying")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

        task = asyncio.get_running_loop().create_task(spawn())
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def call(
        self,
        job: dict[str, Any],
        *,
        lease: Callable[[Any], None],
        timeout: float | None,
        cancelled: Callable[[], bool],
        stage: Callable[[str], None],
    ) -> Any:
        """Run one step in a worker; its output. `lease(cell)` is given the worker's shared
        lease stamp first. A cancel of the calling task while the run
        is cancelled (`cancelled()`), or the step's `timeout`, stops the worker by the ladder,
        then raises CancelledError, resp. TimeoutError; any other cancel (a shutdown) kills
        the worker at once. A step that raised raises StepError with its traceback."""
        worker = await self._take(job, lease)
        try:
            reply = await wait_for(self._receive(worker), timeout)
        except (asyncio.CancelledError, TimeoutError) as exc:
            ladder = isinstance(exc, TimeoutError) or cancelled()
            try:
                if ladder:
                    await self._stop(worker, stage)
                else:
                    await self._kill(worker)
            except BaseException:
                await self._kill(worker)  # interrupted while stopping: never leave it running
                raise
            raise
        except WorkerLost:
            await self._kill(worker)
            raise
        except BaseException:  # anything else: the worker's state is unknown, never reuse it
            await self._kill(worker)
            raise
        self._idle.put_nowait(worker)
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "cancelled":  # (only a cancel raises it where the executor sees it)
            raise StepError(f"{reply[1]}the step raised CancelledError, and its run was not "
                            "cancelled")  # fmt: skip
        if reply[0] == "lapsed":
            raise WorkerLapsed("the worker stopped the step: its attempt's lease lapsed")
        if reply[0] == "output":
            raise OutputError(reply[1])
        raise StepError(reply[1])

    async def _take(self, job: dict[str, Any], lease: Callable[[Any], None]) -> Worker:
        """An idle worker that was sent `job`, `lease` given its lease stamp first (the run's,
        for its still_current()). One that died while idle (OOM-killed, say) is
        replaced and another takes the job: found dead, or its end of the pipe closed though
        its death was not reported yet (the forkserver reaps it, then says so): the step
        failed, "could not be reached", though no worker had seen it (a flaky test)."""
        while True:
            worker = await self._idle.get()
            if not worker.process.is_alive():
                self._replace(worker)
                continue
            worker.flag.clear()
            lease(worker.leased)
            try:
                worker.conn.send_bytes(codec.pack_value(job))
            except OSError:  # (never read by it: its end is closed)
                self._replace(worker)
                continue
            return worker

    async def _receive(self, worker: Worker) -> list[Any]:
        """The worker's reply (waits without blocking the loop)."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = worker.conn.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
            # (uvloop's reader leaves the socket non-blocking: a message larger than its buffer
            # then failed part-way, EAGAIN, here and at the next job's send to this worker)
            if not worker.conn.closed:  # (closed at a shutdown: its fd may be another's)
                with contextlib.suppress(OSError):
                    os.set_blocking(fd, True)
        try:
            reply: list[Any] = codec.unpack(worker.conn.recv_bytes())
        except (EOFError, OSError):
            await self._exited(worker, 1.0)  # (for its exit code)
            code = worker.process.exitcode
            lost = (
                WorkerTerminated
                if code == -signal.SIGTERM and not worker.terminated
                else WorkerLost
            )
            raise lost(
                f"the step's worker process ended without answering: {_exit_said(code)}"
            ) from None
        return reply

    async def _exited(self, worker: Worker, timeout: float) -> bool:
        """Waits up to `timeout` for the worker process to end (its sentinel turns readable)."""
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()
        sentinel = worker.process.sentinel

        def wake() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(sentinel, wake)
        try:
            await wait_for(gone, timeout)
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(sentinel)
        worker.process.join()
        return True

    async def _stop(self, worker: Worker, stage: Callable[[str], None]) -> None:
        """The ladder: flag, grace, SIGTERM, --kill-after, SIGKILL; returns once the step
        returned (the worker is kept) or its process is gone (it is replaced)."""
        worker.flag.set()
        answer = asyncio.ensure_future(self._receive(worker))
        try:
            await asyncio.wait({answer}, timeout=self.grace)
        finally:
            if not answer.done():
                answer.cancel()
                await asyncio.wait({answer})  # (a cancel of this task still propagates)
        if not answer.cancelled():
            if answer.exception() is None:  # the step honoured the flag: the worker is free
                self._idle.put_nowait(worker)
            else:  # (WorkerLost: it ended by itself)
                self._replace(worker)
            return
        worker.terminated = True
        _signal_session(worker, signal.SIGTERM)
        stage("sigterm")
        if not await self._exited(worker, self.kill_after):
            _signal_session(worker, signal.SIGKILL)
            stage("sigkill")
            await self._exited(worker, 10.0)
        self._replace(worker)

    async def _kill(self, worker: Worker) -> None:
        """SIGKILL, and return once the process is gone (the run it ran may be reported, and
        its strict slot freed, only then), then replace it. Waits off the event loop; a cancel
        meanwhile is raised once the process is gone."""
        _signal_session(worker, signal.SIGKILL)
        interrupted = False
        while True:
            try:
                await self._exited(worker, 5.0)
                break
            except asyncio.CancelledError:
                interrupted = True
        self._replace(worker)
        if interrupted:
            raise asyncio.CancelledError

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._all if w.process.pid is not None]

    def close(self) -> None:
        """Kill every worker (the executor is exiting; a running step was left to its lease)."""
        self._closed = True
        for worker in list(self._all):
            with contextlib.suppress(Exception):
                worker.conn.close()
            _signal_session(worker, signal.SIGKILL)
        for worker in list(self._all):
            worker.process.join(5)
        self._all.clear()
