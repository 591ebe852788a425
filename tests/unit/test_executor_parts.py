"""Executor parts that need no server: the memory of cancels that arrive before their run."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, cast

import pytest

from supersede.services.executor import cancel
from supersede.services.executor.config import ExecutorConfig
from supersede.workflow import Concurrency, Workflow


class _Outbox:
    """The runner's outbox, keeping what it is given (each put done at once)."""

    def __init__(self) -> None:
        self.written: list[Any] = []

    def put(self, shard: int, result: Any) -> Any:
        import asyncio

        self.written.append(result)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class _Reported(_Outbox):
    """An outbox that notes each report in `events` ("reported C"), beside what the test notes."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def put(self, shard: int, result: Any) -> Any:
        self.events.append(f"reported {result.outcome.value}")
        return super().put(shard, result)


def _stubborn(events: list[str], release: threading.Event, strict: bool, **step: Any) -> Workflow:
    """A workflow keyed by `input.k` whose one sync step waits for `release` without looking
    at `ctx.cancelled`, and whose on_cancel hook notes itself in `events` after it."""
    wf = Workflow("wf", on_events=["e"], concurrency=Concurrency("input.k", strict=strict))

    @wf.step(**step)
    def stubborn(ctx: Any) -> None:
        release.wait(10)  # (never looks at ctx.cancelled)
        events.append("step returned")

    @wf.on_cancel
    def hook(ctx: Any) -> None:
        events.append("hook")

    return wf


def _cancels() -> cancel.Cancels:
    unused: Any = None
    runner: Any = type("R", (), {"active": {}})()
    return cancel.Cancels(unused, unused, runner, ExecutorConfig(), cluster=False)


def test_early_cancels_are_bounded_and_forgotten_oldest_first(monkeypatch: Any) -> None:
    clock = [1000.0]
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    c = _cancels()
    for i in range(cancel.EARLY_CANCEL_MAX + 500):
        c._remember(f"r{i}", 1, 0.0)
    assert len(c._early) == cancel.EARLY_CANCEL_MAX
    assert "r0" not in c._early and f"r{cancel.EARLY_CANCEL_MAX + 499}" in c._early
    clock[0] += cancel.EARLY_CANCEL_TTL + 1  # everything remembered so far has expired
    c._remember("new", None, 0.0)
    assert list(c._early) == ["new"]


def test_remembering_a_cancel_touches_only_what_it_forgets(monkeypatch: Any) -> None:
    """O(1) per cancel: with a full memory of fresh cancels, each new one drops exactly one."""
    clock = [1000.0]
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    c = _cancels()
    for i in range(cancel.EARLY_CANCEL_MAX):
        c._remember(f"r{i}", 1, 0.0)
    reads = 0
    real = c._early

    class Counting(type(real)):
        def popitem(self, last: bool = True) -> Any:
            nonlocal reads
            reads += 1
            return super().popitem(last)

    c._early = Counting(real)
    for i in range(100):
        c._remember(f"n{i}", 1, 0.0)
    assert reads == 100 and len(c._early) == cancel.EARLY_CANCEL_MAX


def test_a_malformed_control_message_skips_itself_alone() -> None:
    """A cancel whose attempt is not a number, or whose run id is not UTF-8, raised out of the
    read loop: the valid cancels read with it were lost (a probe: the run ran to its end)."""
    from supersede.protocol import Control

    c = _cancels()
    cancel_of = {Control.OP: Control.CANCEL}
    c._on_control([
        (b"1-0", {**cancel_of, Control.RUN_ID: b"0-1", Control.ATTEMPT: b"zz"}),
        (b"1-1", {**cancel_of, Control.RUN_ID: b"\xff\xfe", Control.ATTEMPT: b"1"}),
        (b"1-2", {**cancel_of, Control.RUN_ID: b"0-2", Control.ATTEMPT: b"1"}),
    ])  # fmt: skip
    assert list(c._early) == ["0-2"]


async def test_an_assignment_whose_input_cannot_be_decoded_fails_its_run_alone() -> None:
    """One bad input fails its own run (reported FAILED, naming why) instead of raising into
    the fetch loop, which would leave the claimed run to its lease, attempt after attempt."""
    import asyncio

    from supersede.protocol import Outcome, pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    outbox = _Outbox()
    written = outbox.written
    wf = Workflow("wf", on_events=["e"])
    wf.step()(lambda ctx: None)
    runner = Runner([wf], ExecutorConfig(), outbox)
    bad = Claim("0-bad", True, 1, "wf", "v", b"\xc1\xc1 not msgpack", "k", "s", "R")
    good = Claim("0-good", True, 1, "wf", "v", pack_input({}, {}, "e", "1"), "k", "s", "R")
    assert runner.start(0, bad) is None
    assert runner.start(0, good) is not None
    from prometheus_client import REGISTRY

    def busy() -> float | None:  # (read when scraped, not set per start and end)
        return REGISTRY.get_sample_value("supersede_executor_busy_slots")

    assert busy() == len(runner.active) == 2  # (the bad one too, until reported)
    while runner.active:
        await asyncio.sleep(0.01)
    assert busy() == 0
    outcomes = {r.run_id: (r.outcome, r.error) for r in written}
    assert outcomes["0-good"] == (Outcome.SUCCEEDED, "")
    assert outcomes["0-bad"][0] is Outcome.FAILED
    assert outcomes["0-bad"][1].startswith("input could not be decoded")
    runner.close()


def test_a_heartbeat_later_than_a_lease_is_counted_and_logged(caplog: Any) -> None:
    """A process starved (or cut off from the server) for longer than a lease cannot know
    whether its runs were retried elsewhere: it says so, with its pid, once it renews again."""
    import threading
    import time

    from supersede.keys import Keys
    from supersede.services.executor import metrics
    from supersede.services.executor.lease import LeaseKeeper

    beats: list[float] = []
    done = threading.Event()

    sends = True

    class Starved(LeaseKeeper):
        def beat(self) -> bool:
            beats.append(time.monotonic())
            if len(beats) == 2:
                time.sleep(0.5)  # starved for longer than the 0.3 s lease
            if len(beats) == 4:
                done.set()
            return sends

    config = ExecutorConfig(lease_ms=300)
    runner: Any = type("R", (), {"mark_renewed": lambda self, began: None})()

    def four_beats() -> None:
        done.clear()
        keeper = Starved("redis://127.0.0.1:1/0", Keys("t", 1), "c", config, runner,
                         lambda r, a: None)  # fmt: skip
        thread = threading.Thread(target=keeper._run)
        thread.start()
        try:
            assert done.wait(10)
        finally:
            keeper._halt.set()
            thread.join(5)

    before = metrics.HEARTBEATS_LATE._value.get()
    four_beats()
    # (at least the starved beat: a loaded machine may starve a later one too)
    assert metrics.HEARTBEATS_LATE._value.get() >= before + 1
    late = [r for r in caplog.records if r.getMessage().startswith("heartbeat late")]
    assert len(late) >= 1 and late[0].late_s > 0.3 and late[0].pid > 0
    # beats with no lease to renew are never late (it said so in an outage, once the watch
    # had stopped every run: a probe)
    caplog.clear()
    sends, beats[:] = False, []
    four_beats()
    assert not [r for r in caplog.records if r.getMessage().startswith("heartbeat late")]


async def test_a_read_of_streams_with_a_backlog_is_deep_over_a_few_of_them_in_rotation() -> None:
    """The streams whose last read gave all it asked for (a backlog) are taken deep: each in
    turn asked for all the free slots, so one call claims from one shard (a wide read took a
    slot's worth from each of them and paid the per-shard cost of the claim, and of the
    finish, on every shard). At most DEEP_STREAMS of them per call, the first one rotating so
    no backlog waits behind another's."""
    from supersede.health import ShardHealth
    from supersede.keys import Keys
    from supersede.scripts import Taken
    from supersede.services.executor import fetch

    calls: list[tuple[list[str], int, bool]] = []

    class Claimer:
        async def take(self, streams: Any, want: int, *, deep: bool = False) -> Taken:
            calls.append(([s for s, _ in streams], want, deep))
            return Taken([], 0, [], [], 1)

    service: Any = type("S", (), {"redis": None, "consumer": "c", "health": ShardHealth.off()})()
    runner: Any = type("R", (), {"workflows": {"wf": None}})()
    keys = Keys("ns", 16)
    claimer: Any = Claimer()
    f = fetch.Fetcher(service, keys, ExecutorConfig(), runner, claimer, cluster=False)
    f._hot = set(range(10))
    for _ in range(3):
        await f._read_hot(8)
    assert all(deep and want == 8 for _, want, deep in calls)
    assert all(len(streams) == fetch.DEEP_STREAMS for streams, _, _ in calls)
    assert len({streams[0] for streams, _, _ in calls}) == 3  # rotated
    assert all(set(streams) <= {f.streams[i] for i in range(10)} for streams, _, _ in calls)


async def test_an_entry_read_without_a_bell_turns_the_bells_off_for_the_hold() -> None:
    """A take that read an assignment no bell announced turns the waits for bells off, and
    bells heard within UNRUNG_HOLD do not turn them on again. The wait right after (the same
    loop iteration, when the take left every stream empty) does not read from the ids kept
    while bells were on (none at all, when the XREADGROUP BLOCK served before): it returns at
    once, so the loop reads the tails and scans first."""
    from supersede.health import ShardHealth
    from supersede.keys import Keys
    from supersede.scripts import Taken
    from supersede.services.executor import fetch

    class Claimer:
        async def take(self, streams: Any, want: int, *, deep: bool = False) -> Taken:
            return Taken([], 1, [(streams[0][0], 1, b"1-0", want)], [], len(streams), 1)

    service: Any = type(
        "S", (), {"redis": None, "consumer": "c", "health": ShardHealth.off()}
    )()  # (a read would fail)
    runner: Any = type("R", (), {"workflows": {"wf": None}})()
    claimer: Any = Claimer()
    f = fetch.Fetcher(service, Keys("ns", 4), ExecutorConfig(), runner, claimer, cluster=False)
    bell = {"type": "smessage", "channel": f.streams[1]}
    f._ring(bell)
    assert f.bells and not f._wake_ids
    got, _ = await f._take(list(range(len(f.streams))), 2)
    assert got.drained and not f.bells
    assert await f._wait_for_assignments()  # (no XREAD: it would need a connection)
    f._ring(bell)
    assert not f.bells
    f._unrung_until = time.monotonic() - 1  # (the hold passed)
    f._ring(bell)
    assert f.bells


def test_a_cancel_message_is_timed_by_its_decision_in_microseconds() -> None:
    """The cancel latency metric counts from `du` (server µs); a message from an earlier
    version's script, without it, from its entry id's whole ms."""
    assert cancel._decided_ms(b"1700000000123-0", {b"du": b"1700000000123456"}) == 1700000000123.456
    assert cancel._decided_ms(b"1700000000123-0", {}) == 1700000000123


def test_queue_wait_runs_from_the_assignment_to_the_read(monkeypatch: Any) -> None:
    """An assignment written 2.5 s before the executor read it waited 2.5 s (it was always 0:
    seconds were compared with the entry id's milliseconds)."""
    from prometheus_client import REGISTRY

    from supersede.scripts import Claim
    from supersede.services.executor.claim import Claimer

    unused: Any = None
    claimer = Claimer(unused, "me", ExecutorConfig(), unused, unused)
    monkeypatch.setattr(claimer, "_start", lambda *args: None)

    def observed() -> tuple[float, float]:
        wait = REGISTRY.get_sample_value("supersede_executor_queue_wait_seconds_sum") or 0.0
        hop = REGISTRY.get_sample_value("supersede_hop_seconds_sum", {"hop": "assignments"})
        return wait, hop or 0.0

    before = observed()
    now = 1_800_000_000.0
    entry = f"{int(now * 1000) - 2500}-0".encode()
    claimer.start_taken([(0, entry, Claim("0-r", True))], 0, now)
    after = observed()
    assert abs(after[0] - before[0] - 2.5) < 0.01 and abs(after[1] - before[1] - 2.5) < 0.01


async def test_a_step_timeout_repeats_its_cancel_and_a_shutdown_beside_it_wins() -> None:
    """A step that swallows its timeout's cancels and returns, or turns them into another
    error, timed out; with a shutdown's (or a run's) cancel beside the timeout it was reported
    a timeout all the same (FAILED, or retried during the drain) and left a cancel counted on
    the task. The other cancel wins, whatever the step did; the task's count is clean after."""
    import asyncio
    import contextlib

    from supersede.services.executor.steps import Runner

    async def swallows(n: int, then: str) -> str:
        for _ in range(n):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)
        if then == "raise":
            raise RuntimeError("a library's own error")
        return "late"

    async def step(then: str, shutdown_at: float | None) -> tuple[str, int]:
        task = asyncio.current_task()
        assert task is not None
        if shutdown_at is not None:
            asyncio.get_running_loop().call_later(shutdown_at, task.cancel)
        try:
            await Runner._timed(swallows(3, then), "s", 0.05, repeat=True)
        except BaseException as exc:  # (a timeout is a StepTimedOut: a TimeoutError)
            left = "TimeoutError" if isinstance(exc, TimeoutError) else type(exc).__name__
        else:
            left = "returned"
        return left, task.cancelling()

    async def run(then: str, shutdown_at: float | None) -> tuple[str, int]:
        return await asyncio.create_task(step(then, shutdown_at))

    assert await run("return", None) == ("TimeoutError", 0)  # (swallowed three, returned)
    assert await run("raise", None) == ("TimeoutError", 0)
    assert await run("return", 0.12) == ("CancelledError", 1)  # (the shutdown's, still counted)
    assert await run("raise", 0.12) == ("CancelledError", 1)


async def test_the_bells_listener_ends_at_stop_though_its_cancel_is_swallowed(
    monkeypatch: Any,
) -> None:
    """redis-py's get_message may swallow the CancelledError that lands in it: the listener
    went on pinging its connection (answered) forever, and the executor never exited after
    its drain (a probe: one stop in fifteen). It ends once `stop` is set."""
    import asyncio
    import contextlib

    from supersede.services.executor import fetch

    monkeypatch.setattr(fetch, "BELLS_PING_EVERY", 0.02)

    class Swallowing:  # (a connection that answers every PING)
        pinged = False

        async def get_message(self, timeout: float) -> Any:
            with contextlib.suppress(asyncio.CancelledError):  # (as redis-py may)
                await asyncio.sleep(timeout)
            if self.pinged:
                self.pinged = False
                return {"type": "pong", "data": b""}
            return None

        async def ping(self) -> None:
            self.pinged = True

    fake: Any = type("F", (), {"_ring": lambda self, message: None})()
    stop = asyncio.Event()
    task = asyncio.create_task(fetch.Fetcher._listen(fake, Swallowing(), stop))
    await asyncio.sleep(0.1)
    assert not task.done()
    stop.set()
    task.cancel()  # (swallowed)
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done


@pytest.mark.parametrize(("retries", "then"), [(0, "raise"), (2, "raise"), (0, "return")])
async def test_a_run_whose_step_fumbles_the_drains_cancel_is_left_to_its_lease(
    retries: int, then: str
) -> None:
    """Past the drain deadline the run's task is cancelled; a step that turned the
    CancelledError into another error (a library's ConnectionError) had its run FAILED, final,
    or retried past the deadline (a review: 2 attempts, SUCCEEDED); one that swallowed it went
    on to its next step. The run is left to its lease (nothing reported), and no step starts."""
    import asyncio

    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    outbox = _Outbox()
    calls: list[str] = []
    wf = Workflow("wf", on_events=["e"])

    @wf.step(retries=retries)
    async def first(ctx: Any) -> str:
        calls.append("first")
        if len(calls) > 1:
            return "again"
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if then == "raise":
                raise ConnectionError("what a library made of the CancelledError") from None
        return "swallowed"

    @wf.step(parents=[first])
    async def second(ctx: Any) -> None:
        calls.append("second")

    runner = Runner([wf], ExecutorConfig(retry_backoff=0.01), outbox)
    claim = Claim("0-a", True, 1, "wf", "v", pack_input({}, {}, "e", "1"), "k", "s", "R")
    run = runner.start(0, claim)
    assert run is not None and run.task is not None
    await asyncio.sleep(0.05)
    runner.stopping.set()
    await runner.finish_running(0.0)  # (the drain deadline passed)
    await asyncio.wait({run.task}, timeout=5)
    assert run.task.done() and calls == ["first"] and outbox.written == []
    assert runner.left == [(0, "0-a", 1)]  # handed back by the executor
    runner.close()


async def test_at_the_drain_deadline_a_sync_step_sees_ctx_cancelled_and_is_handed_back() -> None:
    """A sync step polling `ctx.cancelled` was never told the drain deadline passed: it was cut
    off mid-work when the process exited, and its run waited for its lease (a rolling-deploy
    probe). It now sees `ctx.cancelled`, returns, and its run is handed back (not reported,
    no later step). One that ignores it runs on: its run is left to its lease, never handed
    back while its handler still runs."""
    import asyncio
    import threading

    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    outbox = _Outbox()
    seen: list[str] = []
    release = threading.Event()
    wf = Workflow("wf", on_events=["e"])

    @wf.step()
    def first(ctx: Any) -> None:
        if ctx.input.get("polls"):
            while not ctx.cancelled:
                time.sleep(0.005)
            seen.append(ctx.run_id)
        else:
            release.wait(10)  # (never looks at ctx.cancelled)

    @wf.step(parents=[first])
    def second(ctx: Any) -> None:
        seen.append("second")

    runner = Runner([wf], ExecutorConfig(), outbox)
    runs = [
        runner.start(0, Claim(rid, True, 1, "wf", "v", pack_input({"polls": polls}, {}, "e", rid),
                              "k", "s", "R"))
        for rid, polls in (("0-polls", True), ("0-ignores", False))
    ]  # fmt: skip
    await asyncio.sleep(0.1)
    runner.stopping.set()
    try:
        await runner.finish_running(0.0)  # (the drain deadline passed)
        assert seen == ["0-polls"] and outbox.written == []
        assert runner.left == [(0, "0-polls", 1)]
        assert all(r is not None and r.task is not None and r.task.done() for r in runs)
    finally:
        release.set()
        runner.close()


async def test_a_sync_step_past_its_timeout_sees_ctx_cancelled_and_no_retry_overlaps_it() -> None:
    """A sync step's timeout set nothing the step could see, and its retry started at once: a
    probe saw three tries of one step running together, none told to stop. Now the step sees
    `ctx.cancelled` (cleared again for its retry) and has the grace period to return before
    the retry starts; one that runs on past it fails its run, not retried beside itself."""
    import asyncio
    import itertools
    import threading

    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    outbox = _Outbox()
    tries: list[tuple[str, float, float, bool]] = []  # (run, start, end, saw ctx.cancelled)
    release = threading.Event()
    wf = Workflow("wf", on_events=["e"])

    @wf.step(timeout=0.2, retries=2)
    def slow(ctx: Any) -> None:
        start = time.monotonic()
        if ctx.input["polls"]:
            while not ctx.cancelled and time.monotonic() - start < 5:
                time.sleep(0.005)
        else:
            release.wait(10)  # (never looks at ctx.cancelled)
        tries.append((ctx.run_id, start, time.monotonic(), ctx.cancelled))

    runner = Runner([wf], ExecutorConfig(grace=0.5, retry_backoff=0.01), outbox)
    try:
        runs = [
            runner.start(0, Claim(rid, True, 1, "wf", "v",
                                  pack_input({"polls": polls}, {}, "e", rid), "k", "s", "R"))
            for rid, polls in (("0-polls", True), ("0-ignores", False))
        ]  # fmt: skip
        await asyncio.wait({r.task for r in runs if r and r.task}, timeout=10)
        polled = [t for t in tries if t[0] == "0-polls"]
        assert len(polled) == 3 and all(saw for *_, saw in polled)  # each try was told
        assert all(later[1] >= earlier[2] for earlier, later in itertools.pairwise(polled))
        assert {r.run_id: r.outcome.value for r in outbox.written} == {
            "0-polls": "F", "0-ignores": "F"
        }  # fmt: skip
        ignored = next(r for r in outbox.written if r.run_id == "0-ignores")
        assert "not retried while it runs" in (ignored.error or "")
        assert not [t for t in tries if t[0] == "0-ignores"]  # (one try, still running)
    finally:
        release.set()
        runner.close()


async def test_an_async_step_that_catches_its_timeouts_cancels_fails_its_run_after_grace() -> None:
    """An async step that catches every CancelledError (a `while True: try: await ... except
    CancelledError: pass`) ran on past its timeout with its run RUNNING and its slot held, for
    good and without a word (a probe: four such runs stalled an executor of four slots). Its
    run fails once the grace period after the timeout passed, its slot freed; the step's task
    runs on, counted a stray handler. One that leaves within the grace fails as before."""
    import asyncio
    import contextlib

    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor import metrics
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    outbox = _Outbox()
    stop = asyncio.Event()
    wf = Workflow("wf", on_events=["e"])

    @wf.step(timeout=0.1, retries=2)
    async def stubborn(ctx: Any) -> None:
        for _ in range(1_000 if ctx.input["forever"] else 1):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05 if stop.is_set() else 30)
            if stop.is_set():
                return

    runner = Runner([wf], ExecutorConfig(grace=0.3, retry_backoff=0.01), outbox)
    strays = metrics.STRAY_HANDLERS._value.get()
    try:
        runs = [
            runner.start(0, Claim(rid, True, 1, "wf", "v",
                                  pack_input({"forever": forever}, {}, "e", rid), "k", "s", "R"))
            for rid, forever in (("0-forever", True), ("0-once", False))
        ]  # fmt: skip
        for _ in range(200):
            if len(outbox.written) == 2:
                break
            await asyncio.sleep(0.02)
        results = {r.run_id: r for r in outbox.written}
        assert {rid: r.outcome.value for rid, r in results.items()} == {
            "0-forever": "F", "0-once": "F"
        }  # fmt: skip
        assert "catching each CancelledError" in (results["0-forever"].error or "")
        assert "timed out after 0.1s" in (results["0-once"].error or "")
        assert "0-forever" not in runner.active and "0-once" not in runner.active
        forever = runs[0]
        assert forever is not None and forever.task is not None and not forever.task.done()
        assert metrics.STRAY_HANDLERS._value.get() == strays + 1
        stop.set()  # (it leaves: not tried again, reported once)
        await asyncio.wait({forever.task}, timeout=10)
        assert len(outbox.written) == 2 and metrics.STRAY_HANDLERS._value.get() == strays
    finally:
        stop.set()
        runner.close()

    # A step that blocked the loop past its timeout and the grace, then left at its next
    # await (its cleanup awaiting briefly): timed out, tried again, not failed as a stray
    blocker = Workflow("blocker", on_events=["e"])

    @blocker.step(timeout=0.1, retries=1)
    async def blocks(ctx: Any) -> None:
        try:
            time.sleep(0.5)  # (the loop held: the timeout's cancel comes at the next await)
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(0.01)

    outbox = _Outbox()
    runner = Runner([blocker], ExecutorConfig(grace=0.3, retry_backoff=0.01), outbox)
    try:
        claim = Claim("0-blocks", True, 1, "blocker", "v", pack_input({}, {}, "e", "0-blocks"),
                      "k", "s", "R")  # fmt: skip
        run = runner.start(0, claim)
        assert run is not None and run.task is not None
        await asyncio.wait({run.task}, timeout=10)
        [result] = outbox.written
        assert result.outcome.value == "F" and "failed after 2 tries" in (result.error or "")
        assert "catching each" not in (result.error or ""), result.error
    finally:
        runner.close()


async def test_a_sync_step_waiting_for_a_thread_of_a_full_pool_is_said(caplog: Any) -> None:
    """Sync steps that never return held every thread of the step pool, and later runs sat
    RUNNING with nothing logged, only the stray handlers gauge to show it (a probe). The first
    step that waits for a thread is said, once per 5 s."""
    import asyncio
    import logging
    import threading

    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    release = threading.Event()
    wf = Workflow("wf", on_events=["e"])

    @wf.step()
    def holds(ctx: Any) -> None:
        release.wait(10)

    runner = Runner([wf], ExecutorConfig(slots=2), _Outbox())  # (4 threads)
    try:
        with caplog.at_level(logging.WARNING, logger="supersede"):
            runs = [
                runner.start(0, Claim(f"0-{i}", True, 1, "wf", "v",
                                      pack_input({}, {}, "e", f"0-{i}"), "k", "s", "R"))
                for i in range(4)
            ]  # fmt: skip
            for _ in range(100):
                if runner.on_threads == 4:
                    break
                await asyncio.sleep(0.01)
            assert not [r for r in caplog.records if "thread is busy" in r.getMessage()]
            runs.append(
                runner.start(
                    0,
                    Claim("0-4", True, 1, "wf", "v", pack_input({}, {}, "e", "0-4"), "k", "s", "R"),
                )
            )
            for _ in range(100):
                if runner.on_threads == 5:
                    break
                await asyncio.sleep(0.01)
        [line] = [r for r in caplog.records if "thread is busy" in r.getMessage()]
        assert vars(line)["threads"] == 4
        release.set()
        await asyncio.wait({r.task for r in runs if r and r.task}, timeout=10)
        assert runner.on_threads == 0
    finally:
        release.set()
        runner.close()


async def test_the_on_cancel_hook_of_a_sync_step_past_its_grace_waits_for_the_step() -> None:
    """A cancelled run whose sync step ignored `ctx.cancelled` is reported CANCELLED after the
    grace period (its slot freed), but its on_cancel hook ran then too, beside the step it
    cleans up after (an API-user probe). The hook now runs when the step returns."""
    import asyncio

    from supersede.keys import Keys
    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.cancel import Cancels
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    outbox = _Outbox()
    at: dict[str, float] = {}
    wf = Workflow("wf", on_events=["e"])

    @wf.step()
    def stubborn(ctx: Any) -> None:
        time.sleep(0.8)  # (never looks at ctx.cancelled)
        at["step returned"] = time.monotonic()

    @wf.on_cancel
    def hook(ctx: Any) -> None:
        at["hook"] = time.monotonic()

    config = ExecutorConfig(grace=0.2)
    runner = Runner([wf], config, outbox)
    cancels = Cancels(None, Keys("t", 1), runner, config, cluster=False)
    try:
        runner.start(0, Claim("0-a", True, 1, "wf", "v", pack_input({}, {}, "e", "1"), "k",
                              "s", "R"))  # fmt: skip
        await asyncio.sleep(0.1)
        cancels.cancel_local("0-a", 1, time.time() * 1000)
        deadline = time.monotonic() + 5
        while "hook" not in at and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert [r.outcome.value for r in outbox.written] == ["C"]  # (after the grace period)
        assert "step returned" in at and at["hook"] >= at["step returned"], at
    finally:
        runner.close()


@pytest.mark.parametrize("strict", [False, True])
async def test_a_cancel_that_came_before_its_claim_reply_is_reported_at_once(
    strict: bool,
) -> None:
    """A cancel that arrived before its run's claim reply applies as the run starts, before
    its task took a step: such a task, cancelled, never ran its body, so nothing reported the
    run until the grace period's end (a probe: 5 s, and in strict mode its group's newest run
    waited as long). Now the run is reported CANCELLED at once, its step never run, no hook."""
    from supersede.keys import Keys
    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.cancel import Cancels
    from supersede.services.executor.steps import Runner

    outbox, events = _Outbox(), []
    wf = Workflow("wf", on_events=["e"], concurrency=Concurrency("input.k", strict=strict))

    @wf.step()
    async def step(ctx: Any) -> None:
        events.append("step")
        await asyncio.sleep(5)

    @wf.on_cancel
    def hook(ctx: Any) -> None:
        events.append("hook")

    config = ExecutorConfig(grace=3.0)
    runner = Runner([wf], config, outbox)
    cancels = Cancels(None, Keys("t", 1), runner, config, cluster=False)
    try:
        cancels._remember("0-a", 1, time.time() * 1000)  # (from the control stream)
        claim = Claim("0-a", True, 1, "wf", "v", pack_input({}, {}, "e", "1"), "k", "s", "R")
        run = runner.start(0, claim)
        assert run is not None and run.task is not None
        cancels.apply_early(run)  # (as the claim reply's handling does, at once)
        asked = time.monotonic()
        await asyncio.wait({run.task}, timeout=2)
        for _ in range(100):  # (the report's put is done at once: a few steps at most)
            if outbox.written:
                break
            await asyncio.sleep(0.01)
        assert [r.outcome.value for r in outbox.written] == ["C"]
        assert time.monotonic() - asked < 1.0  # (old: nothing until the 3 s grace)
        assert "0-a" not in runner.active and events == []
    finally:
        runner.close()


async def test_a_result_the_server_refused_is_put_again_its_run_keeping_its_slot() -> None:
    """A result the server would not take (at its maxmemory, down) was dropped: the run left
    the leases the executor renews, lapsed, and ran again elsewhere though its handler had
    succeeded (a probe). Kept waiting with its slot freed (a first fix), it let the executor
    take runs whose results could not be written either (a review). Now it is put again until
    written, its run keeping its slot and renewed as a running one meanwhile."""
    from redis.exceptions import OutOfMemoryError

    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.steps import Runner

    class Refusing(_Outbox):
        def __init__(self) -> None:
            super().__init__()
            self.refused = 0

        def put(self, shard: int, result: Any) -> Any:
            if self.refused == 3:
                return super().put(shard, result)
            self.refused += 1
            failed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            failed.set_exception(OutOfMemoryError("OOM command not allowed"))
            return failed

    outbox = Refusing()
    wf = Workflow("wf", on_events=["e"])

    @wf.step()
    async def quick(ctx: Any) -> int:
        return 1

    runner = Runner([wf], ExecutorConfig(slots=2), outbox)
    try:
        run = runner.start(0, Claim("0-a", True, 1, "wf", "v", pack_input({}, {}, "e", "1"),
                                    "k", "s", "R"))  # fmt: skip
        assert run is not None and run.task is not None
        for _ in range(100):
            if outbox.refused:
                break
            await asyncio.sleep(0.01)
        assert outbox.refused and not outbox.written
        assert runner.free() == 1 and runner.active.get("0-a") is run  # (old: 2, dropped)
        assert [(rid, a) for _, rid, a, _ in runner.leased()] == [("0-a", 1)]  # (renewed)
        await asyncio.wait({run.task}, timeout=5)
        assert outbox.refused == 3 and [r.outcome.value for r in outbox.written] == ["S"]
        assert runner.free() == 2 and "0-a" in runner.awaiting  # (waits as one written)
    finally:
        runner.close()


async def test_a_sync_on_cancel_hooks_own_timeout_is_logged_with_its_frames(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sync on_cancel hook's own TimeoutError (a socket's) was logged without its frames:
    asyncio replaced it as it crossed from the hook's thread (a review). Boxed as a step's."""
    import logging
    import traceback

    from supersede.keys import Keys
    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.cancel import Cancels
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    outbox = _Outbox()
    wf = Workflow("wf", on_events=["e"])

    @wf.step()
    def polite(ctx: Any) -> None:
        while not ctx.cancelled:
            time.sleep(0.01)

    def close_socket() -> None:
        raise TimeoutError("socket timed out")

    @wf.on_cancel
    def hook(ctx: Any) -> None:
        close_socket()

    config = ExecutorConfig(grace=0.5)
    runner = Runner([wf], config, outbox)
    cancels = Cancels(None, Keys("t", 1), runner, config, cluster=False)
    caplog.set_level(logging.ERROR, logger="supersede.executor")
    try:
        runner.start(0, Claim("0-a", True, 1, "wf", "v", pack_input({}, {}, "e", "1"), "k",
                              "s", "R"))  # fmt: skip
        await asyncio.sleep(0.1)
        cancels.cancel_local("0-a", 1, time.time() * 1000)
        deadline = time.monotonic() + 5
        while not any("on_cancel hook failed" in r.message for r in caplog.records):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        [record] = [r for r in caplog.records if "on_cancel hook failed" in r.message]
        assert record.exc_info is not None
        text = "".join(traceback.format_exception(*record.exc_info))
        assert "in close_socket" in text and "TimeoutError: socket timed out" in text, text
    finally:
        runner.close()


async def test_a_cancelled_runs_sync_step_that_waits_for_a_thread_never_starts() -> None:
    """Every step thread busy, a claimed run's sync step waits in the pool's queue; cancelled
    there, it was waited for the grace period (its cancel took 5 s to be reported, a producer
    probe), counted a stray handler, and started once a thread freed, its run long ended. It
    is taken out of the queue: reported at once, and never started."""
    import threading

    from supersede.keys import Keys
    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor import metrics
    from supersede.services.executor.cancel import Cancels
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    strays = metrics.STRAY_HANDLERS._value.get()
    outbox = _Outbox()
    release = threading.Event()
    started: list[str] = []
    busy = Workflow("busy", on_events=["e"])

    @busy.step()
    def hold(ctx: Any) -> None:
        started.append(ctx.run_id)
        release.wait(30)

    late = Workflow("late", on_events=["e"])

    @late.step()
    def waits_for_a_thread(ctx: Any) -> None:
        started.append(ctx.run_id)

    config = ExecutorConfig(slots=1, grace=5.0)
    runner = Runner([busy, late], config, outbox)
    cancels = Cancels(None, Keys("t", 1), runner, config, cluster=False)
    threads = runner.pool._max_workers
    try:
        for i in range(threads):
            runner.start(0, Claim(f"0-{i}", True, 1, "busy", "v", pack_input({}, {}, "e", str(i)),
                                  f"k{i}", "s", "R"))  # fmt: skip
        while len(started) < threads:
            await asyncio.sleep(0.01)
        run = runner.start(0, Claim("0-late", True, 1, "late", "v",
                                    pack_input({}, {}, "e", "late"), "kl", "s", "R"))  # fmt: skip
        assert run is not None and run.task is not None
        await asyncio.sleep(0.1)
        began = time.monotonic()
        cancels.cancel_local("0-late", 1, time.time() * 1000)
        await asyncio.wait_for(asyncio.shield(run.task), 10)
        assert time.monotonic() - began < 1.0
        assert [(r.run_id, r.outcome.value) for r in outbox.written] == [("0-late", "C")]
        release.set()
        while len(outbox.written) < threads + 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert "0-late" not in started and metrics.STRAY_HANDLERS._value.get() == strays
    finally:
        release.set()
        runner.close()


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("how", ["returns", "raises"])
async def test_the_on_cancel_hook_runs_when_an_async_step_takes_its_cancel_without_raising_it(
    how: str, strict: bool
) -> None:
    """An async step that catches its cancel and returns, or raises another error in its
    `except CancelledError`: the run ended CANCELLED, and its on_cancel hook never ran (a
    probe; only a task that raised CancelledError ran it). It runs once, after the step."""
    from supersede.keys import Keys
    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.cancel import Cancels
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Concurrency, Workflow

    events: list[str] = []
    began = asyncio.Event()
    wf = Workflow("wf", on_events=["e"], concurrency=Concurrency("input.k", strict=strict))

    @wf.step()
    async def swallows(ctx: Any) -> None:
        try:
            began.set()
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            events.append("step took its cancel")
            if how == "raises":
                raise RuntimeError("cleaning up failed") from None

    @wf.on_cancel
    async def hook(ctx: Any) -> None:
        events.append("hook")

    outbox = _Outbox()
    config = ExecutorConfig(grace=0.2)
    runner = Runner([wf], config, outbox)
    cancels = Cancels(None, Keys("t", 1), runner, config, cluster=False)
    try:
        run = runner.start(0, Claim("0-a", True, 1, "wf", "v", pack_input({"k": 1}, {}, "e",
                                    "1"), "k", "s", "R"))  # fmt: skip
        assert run is not None and run.task is not None
        await asyncio.wait_for(began.wait(), 5)
        cancels.cancel_local("0-a", 1, time.time() * 1000)
        await asyncio.wait_for(run.task, 5)
        deadline = time.monotonic() + 5
        while not outbox.written and time.monotonic() < deadline:  # (reported, in strict mode
            await asyncio.sleep(0.01)  # by its task; else at the grace's end at the latest)
        await asyncio.sleep(config.grace)  # (a second hook, from the grace's report, by now)
        assert events == ["step took its cancel", "hook"], events
        assert [r.outcome.value for r in outbox.written] == ["C"]
    finally:
        runner.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_on_cancel_hook_that_never_returns_holds_neither_its_run_nor_a_steps_thread(
    kind: str,
) -> None:
    """A hook that hung (a user's bug) kept its run from being reported: CANCELLING, its slot
    taken, for good; a sync one held a thread of the steps' pool too, so with a few of them
    later runs' sync steps queued while their runs showed RUNNING (a new-user probe: four
    5 s steps on four slots took 5, 10, 15 and 20 s). The run is reported CANCELLED after the
    grace period (a second at least), the hook runs on (a stray handler, said once), on a
    thread of the hooks' own pool."""
    import asyncio
    import threading

    from supersede.keys import Keys
    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor import metrics
    from supersede.services.executor.cancel import Cancels
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    outbox = _Outbox()
    release = threading.Event()
    wf = Workflow("wf", on_events=["e"])

    @wf.step()
    async def waits(ctx: Any) -> None:
        await asyncio.sleep(30)

    if kind == "sync":

        @wf.on_cancel
        def hangs(ctx: Any) -> None:
            release.wait(30)

    else:

        @wf.on_cancel
        async def hangs_async(ctx: Any) -> None:
            await asyncio.to_thread(release.wait, 30)

    quick = Workflow("quick", on_events=["q"])

    @quick.step()
    def sync_step(ctx: Any) -> str:
        return threading.current_thread().name

    config = ExecutorConfig(grace=0.2, slots=2)
    runner = Runner([wf, quick], config, outbox)
    cancels = Cancels(None, Keys("t", 1), runner, config, cluster=False)
    strays = metrics.STRAY_HANDLERS._value.get()
    try:
        for i in range(4):  # (the pool has max(4, 2 * slots) threads: every one hung before)
            rid = f"0-{i}"
            runner.start(0, Claim(rid, True, 1, "wf", "v", pack_input({}, {}, "e", str(i)),
                                  "k", "s", "R"))  # fmt: skip
            await asyncio.sleep(0.05)
            cancels.cancel_local(rid, 1, time.time() * 1000)
        deadline = time.monotonic() + 20
        while len(outbox.written) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert [r.outcome.value for r in outbox.written] == ["C"] * 4
        # (the hooks' pool has max(2, slots) threads: two sync hooks hold them, the others
        # wait for one, not started, so not strays; every async one runs)
        expected = strays + (2 if kind == "sync" else 4)
        while metrics.STRAY_HANDLERS._value.get() < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # (a hook is waited for a second at least)
        await asyncio.sleep(0.1)
        assert metrics.STRAY_HANDLERS._value.get() == expected
        run = runner.start(0, Claim("0-q", True, 1, "quick", "v", pack_input({}, {}, "q", "q"),
                                    "k2", "s", "R"))  # fmt: skip
        assert run is not None and run.task is not None
        await asyncio.wait_for(run.task, 5)  # (a step thread was free)
        assert outbox.written[-1].outcome.value == "S"
    finally:
        release.set()
        await asyncio.sleep(0.2)
        runner.close()
    assert metrics.STRAY_HANDLERS._value.get() == strays


@pytest.mark.parametrize("then", ["drain", "cancel", "strict cancel"])
async def test_a_sync_step_stopped_during_its_timeout_s_grace_is_never_run_twice_at_once(
    then: str,
) -> None:
    """A sync step timed out and ignores `ctx.cancelled`; during the grace its timeout gives
    it, the drain deadline passes, or the run is cancelled (a review: the grace wait swallowed
    that cancel). Drained: its run is not handed back while the step runs (it would execute
    twice at once). Cancelled: it goes the way of any cancel of a sync step: the on_cancel
    hook runs after the step returned, and in strict mode before the run is reported (the
    next run of its key starts only after the cleanup)."""
    import asyncio
    import threading

    from supersede.keys import Keys
    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.cancel import Cancels
    from supersede.services.executor.steps import Runner

    events: list[str] = []
    outbox = _Reported(events)
    release = threading.Event()
    wf = _stubborn(events, release, then == "strict cancel", timeout=0.1, retries=1)
    config = ExecutorConfig(grace=1.0)
    runner = Runner([wf], config, outbox)
    cancels = Cancels(None, Keys("t", 1), runner, config, cluster=False)
    try:
        claim = Claim(
            "0-a", True, 1, "wf", "v", pack_input({"k": "a"}, {}, "e", "1"), "k", "s", "R"
        )
        run = runner.start(0, claim)
        assert run is not None and run.task is not None
        await asyncio.sleep(0.3)  # (timed out at 0.1 s: within its grace now)
        if then == "drain":
            runner.stopping.set()
            await runner.finish_running(0.0)
            assert run.task.done() and runner.left == []  # left to its lease
            release.set()
        else:
            cancels.cancel_local("0-a", 1, time.time() * 1000)
            await asyncio.sleep(1.2)  # (past the cancel's grace period)
            release.set()
            deadline = time.monotonic() + 5
            # (both: in strict mode the report comes after the hook, a moment later)
            while not {"hook", "reported C"} <= set(events) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert events.index("step returned") < events.index("hook"), events
            assert "reported C" in events, events
            if then == "strict cancel":
                assert events.index("hook") < events.index("reported C"), events
    finally:
        release.set()
        runner.close()


async def test_a_cancel_that_comes_while_the_drain_stops_a_strict_sync_step_waits_for_it() -> None:
    """A drain's deadline asks a sync step to stop and waits for it; a cancel of its run that
    came meanwhile ended that wait, and the run was reported CANCELLED (its strict slot freed,
    the next run of its key started) and its on_cancel hook run, beside the step still running
    (an upgrade probe: 5 tries of 5, the newer run 0.1-0.35 s before the old step returned).
    It is a cancel still: in strict mode the report waits for the step, the hook after it."""
    import asyncio
    import threading

    from supersede.keys import Keys
    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.cancel import Cancels
    from supersede.services.executor.steps import Runner

    events: list[str] = []
    release = threading.Event()
    wf = _stubborn(events, release, strict=True)
    config = ExecutorConfig(grace=0.2)
    runner = Runner([wf], config, _Reported(events))
    cancels = Cancels(None, Keys("t", 1), runner, config, cluster=False)
    try:
        body = pack_input({"k": "a"}, {}, "e", "1")
        run = runner.start(0, Claim("0-a", True, 1, "wf", "v", body, "k", "s", "R"))
        assert run is not None and run.task is not None
        await asyncio.sleep(0.1)
        runner.stopping.set()
        drain = asyncio.ensure_future(runner.finish_running(0.0))  # (the deadline: now)
        await asyncio.sleep(0.2)  # (within the drain's stop of the step)
        cancels.cancel_local("0-a", 1, time.time() * 1000)
        await asyncio.sleep(1.0)  # (past the drain's stop and the grace: the step runs on)
        assert not any(e.startswith("reported") for e in events), events
        release.set()
        deadline = time.monotonic() + 10
        while "reported C" not in events and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert events == ["step returned", "hook", "reported C"], events
        await drain
    finally:
        release.set()
        runner.close()


def test_a_step_s_retries_wait_twice_as_long_each_time_up_to_a_cap() -> None:
    """retries=20 waited 0.1 * 2**19 s (14.5 h) before its last try, its run RUNNING and its
    slot held all along."""
    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.steps import Runner

    runner = Runner([], ExecutorConfig(), _Outbox())
    waits = [runner.retry_wait(attempt) for attempt in range(100)]
    assert waits[:4] == [0.1, 0.2, 0.4, 0.8]
    assert max(waits) == 30.0 and waits[-1] == 30.0 and waits == sorted(waits)
    assert sum(waits[:20]) < 11 * 60  # (20 retries: about 10 minutes, not 29 hours)
    runner.close()


@pytest.mark.parametrize("backoff", [0.3, 20.0])
async def test_a_run_waiting_to_retry_past_the_drain_deadline_is_left_to_its_lease_at_once(
    backoff: float,
) -> None:
    """A step failed and its retry waits: once the executor drains, a wait that ends after the
    drain deadline leaves the run to its lease at once (it held the drain to its deadline, up
    to retry_backoff_max, to be stopped there anyway); a shorter one is waited and the step
    tried again. The step's time is its tries', not its waits'."""
    import asyncio

    from prometheus_client import REGISTRY

    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    def step_seconds() -> float:
        return (
            REGISTRY.get_sample_value("supersede_executor_step_seconds_sum", {"workflow": "wf"})
            or 0.0
        )

    outbox = _Outbox()
    calls: list[float] = []
    wf = Workflow("wf", on_events=["e"])

    @wf.step(retries=3)
    async def flaky(ctx: Any) -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("the API is down")

    runner = Runner([wf], ExecutorConfig(retry_backoff=backoff), outbox)
    before = step_seconds()
    run = runner.start(0, Claim("0-a", True, 1, "wf", "v", pack_input({}, {}, "e", "1"), "k",
                                "s", "R"))  # fmt: skip
    assert run is not None and run.task is not None
    while not calls:
        await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    runner.drain_deadline = loop.time() + 5.0  # (as the service sets it, with `stopping`)
    runner.stopping.set()
    await asyncio.wait({run.task}, timeout=5)
    assert run.task.done()
    if backoff > 5:  # handed back: nothing reported, the run no longer this executor's
        assert len(calls) == 1 and outbox.written == [] and "0-a" not in runner.active
        assert runner.left == [(0, "0-a", 1)]
    else:  # waited (0.3 s, then 0.6 s) and tried again within the drain
        assert len(calls) == 3 and [r.outcome.value for r in outbox.written] == ["S"]
        assert runner.left == []
        assert calls[1] - calls[0] >= 0.3 and calls[2] - calls[1] >= 0.6
    assert 0 < step_seconds() - before < 0.25  # (three quick tries; the waits took 0.9 s)
    runner.close()


async def test_still_current_asks_again_while_the_server_fails_until_the_lease_ran_out() -> None:
    """`ctx.still_current()` raised the client's ConnectionError into the step while the
    server restarted, and the step FAILED a run of ten attempts on its first (a probe). The
    read is made again until the server answers, or the lease runs out: False then, as the
    run is retried elsewhere."""
    import time
    from types import SimpleNamespace

    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoPermissionError

    from supersede.services.executor.steps import Runner

    answers: list[Any] = [RedisConnectionError("down"), ConnectionRefusedError(), b"0" * 32]

    async def fences(shard: int, group: str) -> bytes | None:
        answer = answers.pop(0) if answers else RedisConnectionError("down for good")
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    runner = Runner([], ExecutorConfig(lease_ms=600), _Outbox(), fences=fences)
    runner.mark_renewed(time.monotonic())
    seq = "0" * 31 + "1"

    def claimed() -> Any:  # (a run claimed just now)
        now = time.monotonic()
        return SimpleNamespace(fence_at=(0, "g"), leased_at=now, started=now,
                               ctx=SimpleNamespace(cancelled=False))  # fmt: skip

    assert await runner._still_current(claimed(), seq) is True  # (newer: own)
    assert not answers
    began = time.monotonic()
    assert await runner._still_current(claimed(), seq) is False  # (the server stays down)
    assert 0.3 < time.monotonic() - began < 1.5  # until its lease of 0.6 s ran out
    # a refused right or a wrong command is no outage: raised at once, not asked for ever
    answers.append(NoPermissionError("no rights on the fences hash"))
    runner.mark_renewed(time.monotonic())
    with pytest.raises(NoPermissionError):
        await runner._still_current(claimed(), seq)

    # a read that hangs (a silent server) is bounded by the lease too
    async def silent(shard: int, group: str) -> bytes | None:
        await asyncio.sleep(60)
        return None

    runner.fences = silent
    runner.mark_renewed(time.monotonic())
    began = time.monotonic()
    assert await runner._still_current(claimed(), seq) is False
    assert time.monotonic() - began < 1.5
    runner.close()


async def test_still_current_blocking_is_false_when_no_answer_comes_in_time() -> None:
    """In a sync step it waited 10 s for the loop's answer and then raised TimeoutError into
    the step; now an answer that does not come in time is False (not known to be current)."""
    import time

    from supersede.workflow import Context

    async def never() -> bool:
        await asyncio.sleep(60)
        return True

    ctx = Context(run_id="0-a", workflow="wf", attempt=1, input={}, metadata={},
                  loop=asyncio.get_running_loop(), current=never)  # fmt: skip
    ctx._answer_within = 0.3
    began = time.monotonic()
    assert await asyncio.to_thread(ctx.still_current_blocking) is False
    assert time.monotonic() - began < 2


async def test_still_current_awaited_on_a_steps_own_loop_asks_on_the_executors() -> None:
    """`asyncio.run(ctx.still_current())` in a sync step read the fence on the step's own
    loop with the executor's client, whose pool then held connections of a closed loop: other
    runs of the executor failed with "Event loop is closed" (an author probe: 5 of 20). The
    read is made on the executor's loop; no answer in time is False, as in a blocking ask."""
    import time

    from supersede.workflow import Context

    loop = asyncio.get_running_loop()
    loops: list[asyncio.AbstractEventLoop] = []

    async def current() -> bool:
        loops.append(asyncio.get_running_loop())
        return True

    ctx = Context(run_id="0-a", workflow="wf", attempt=1, input={}, metadata={},
                  loop=loop, current=current)  # fmt: skip
    assert await asyncio.to_thread(lambda: asyncio.run(ctx.still_current())) is True
    assert loops == [loop]

    async def never() -> bool:
        await asyncio.sleep(60)
        return True

    ctx = Context(run_id="0-a", workflow="wf", attempt=1, input={}, metadata={},
                  loop=loop, current=never)  # fmt: skip
    ctx._answer_within = 0.3
    began = time.monotonic()
    assert await asyncio.to_thread(lambda: asyncio.run(ctx.still_current())) is False
    assert time.monotonic() - began < 2


def test_still_current_in_a_worker_process_asks_again_while_the_server_fails() -> None:
    """The same in a worker process (its own connection): the error reached the step."""
    import multiprocessing
    import time

    from redis.exceptions import TimeoutError as RedisTimeoutError

    from supersede.services.executor.isolation import _WorkerContext

    errors = [RedisTimeoutError("silent"), ConnectionResetError("reset")]

    def fence_check(key: str, group: str, seq: str) -> bool:
        if errors:
            raise errors.pop(0)
        return True

    renewed = multiprocessing.Array("d", [time.monotonic()] * 2)  # (CURRENT, RENEWED)
    job = {"id": "0-a", "w": "wf", "a": 1, "in": {}, "md": {}, "ev": "e", "ei": "1-0",
           "k": "k", "f": "1", "o": {}, "fk": "fences", "g": "g", "s": "0" * 32,
           "cm": time.monotonic(), "ls": 0.6}  # fmt: skip
    ctx = _WorkerContext(job, multiprocessing.Event(), fence_check, renewed)
    assert ctx.still_current_blocking() is True and not errors
    errors.extend([RedisTimeoutError("silent")] * 1000)
    began = time.monotonic()
    assert ctx.still_current_blocking() is False  # (its lease of 0.6 s ran out meanwhile)
    assert time.monotonic() - began < 1.5


async def test_results_waiting_for_a_server_that_is_down_log_one_line_per_window(
    caplog: Any, monkeypatch: Any
) -> None:
    """The outbox retries a write every 0.2 s for up to a lease: each retry wrote a warning
    (175-191 lines per executor in a 40 s outage, a probe). One line per window now, with the
    error and how many were not written."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from supersede.keys import Keys
    from supersede.protocol import Outcome, RunResult
    from supersede.services.executor import outbox

    class _Down(_Writes):
        async def execute(self) -> None:
            raise RedisConnectionError("Error 111 connecting")

    from supersede.logs import Sampled

    monkeypatch.setattr(outbox, "_NOT_WRITTEN_YET", Sampled())  # (another test's lines aside)
    box = outbox.Outbox(_Down(), Keys("ns", 1), ExecutorConfig(lease_ms=1000))
    result = RunResult("0-a", 1, Outcome.SUCCEEDED, "", None, 0)
    with caplog.at_level("WARNING", logger="supersede.executor"):
        writer = asyncio.create_task(box.loop())
        try:
            with pytest.raises(RedisConnectionError):  # (after a lease of retries)
                await asyncio.wait_for(box.put(0, result), 5)
        finally:
            writer.cancel()
    lines = [r for r in caplog.records if r.getMessage() == "results not written yet; retrying"]
    assert len(lines) == 1 and "Error 111" in str(vars(lines[0])["error"]), lines


async def test_a_run_cancelled_while_held_for_its_renewal_runs_no_on_cancel_hook() -> None:
    """A run whose claim reply came late waits for a beat before its first step. Cancelled
    there, it ran no step, yet its on_cancel hook ran (the last session's note): a cleanup of
    work that never began. Now it runs none, as for a run cancelled before its task began;
    a run cancelled in its step still runs its hook."""
    from supersede.protocol import Outcome, pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    outbox = _Outbox()
    hooked: list[str] = []
    wf = Workflow("wf", on_events=["e"])

    @wf.step()
    async def wait(ctx: Any) -> None:
        await asyncio.sleep(10)

    @wf.on_cancel
    async def cleanup(ctx: Any) -> None:
        hooked.append(ctx.run_id)

    def claim(rid: str) -> Claim:
        return Claim(rid, True, 1, "wf", "v", pack_input({}, {}, "e", rid), "k", "s", "R")

    runner = Runner([wf], ExecutorConfig(lease_ms=1_000, grace=0.2), outbox)
    asked: list[bool] = []
    runner.renew_soon = lambda: asked.append(True)  # (a beat asked for, never made here)
    cancels = cancel.Cancels(None, None, runner, runner.config, cluster=False)
    try:
        held = runner.start(0, claim("0-held"), leased_at=time.monotonic() - 0.5)
        live = runner.start(0, claim("0-live"))
        assert held is not None and held.held is not None and asked == [True]
        assert live is not None
        deadline = time.monotonic() + 5
        while not live.handler_started_us and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert live.handler_started_us and not held.handler_started_us
        for rid in ("0-held", "0-live"):
            cancels.cancel_local(rid, 1, time.time() * 1000)
        while runner.active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert {r.run_id: r.outcome for r in outbox.written} == {
            "0-held": Outcome.CANCELLED,
            "0-live": Outcome.CANCELLED,
        }
        assert hooked == ["0-live"] and not held.handler_started_us
    finally:
        runner.close()


async def test_results_of_a_silent_shard_wait_while_the_other_shards_results_are_applied() -> None:
    """A cluster executor's results: one finish call per shard, each bounded. A shard whose
    master went silent held every result of the turn (one call for all, bounded by a third of a
    lease, then writes to the streams retried for a lease, while later results waited behind
    them). Now the other shards' results are applied at once, turn after turn, and the silent
    shard's are tried again until they give up, a lease later."""
    import time

    from supersede.health import ShardHealth
    from supersede.keys import Keys
    from supersede.protocol import Outcome, RunResult
    from supersede.scripts import FinishResult
    from supersede.services.executor import outbox

    keys = Keys("ns", 2)

    class Cluster:
        def get_node_from_key(self, key: str) -> Any:
            return type("N", (), {"name": f"node{_shard_of_key(key)}"})()

        async def exists(self, key: str) -> int:
            await asyncio.sleep(3600 if _shard_of_key(key) == 1 else 0)
            return 0

        async def hget(self, *args: Any) -> None:
            return None

        def pipeline(self, transaction: bool = False) -> Any:
            return _Pipe()

    class Scripts:
        redis = Cluster()
        keys = Keys("ns", 2)

        async def finish(self, shard: int, part: Any, **kwargs: Any) -> FinishResult:
            await asyncio.sleep(3600 if shard == 1 else 0)
            return FinishResult(len(part), 0, 0)

    redis: Any = Cluster()
    config = ExecutorConfig(lease_ms=1500)
    health = ShardHealth(redis, lambda s: keys.shard(s).runs_hash, enabled=True, deadline=0.25,
                         service="test", shards=2)  # fmt: skip
    box = outbox.Outbox(redis, keys, config, health)
    scripts: Any = Scripts()
    box.sink = outbox.FinishHere(scripts, "ex", 1500, cluster=True, health=health)
    writer = asyncio.create_task(box.loop())
    try:

        def result(i: int) -> RunResult:
            return RunResult(f"0-{i}", 1, Outcome.SUCCEEDED, "", None, 0)

        began = time.monotonic()
        first, silent = box.put(0, result(1)), box.put(1, result(2))
        assert await asyncio.wait_for(first, 1) > 0  # (applied: a turn number)
        assert time.monotonic() - began < 0.45  # (the deadline, not a third of the lease)
        assert not silent.done() and health.silent == {1}
        later = time.monotonic()
        assert await asyncio.wait_for(box.put(0, result(3)), 1) > 0
        assert time.monotonic() - later < 0.1  # (not behind the silent shard's result)
        with pytest.raises(Exception, match="no answer in time"):
            await asyncio.wait_for(silent, 3)
        assert time.monotonic() - began > 1.4  # (tried again for a lease)
    finally:
        writer.cancel()


def _shard_of_key(key: str) -> int:
    import re

    return int(re.findall(r"\{ns:(\d+)\}", key)[0])


class _Pipe:
    """A cluster pipeline whose calls to shard 1 never answer."""

    def __init__(self) -> None:
        self.shards: set[int] = set()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    def xadd(self, stream: str, fields: Any) -> None:
        self.shards.add(_shard_of_key(stream))

    async def execute(self) -> None:
        await asyncio.sleep(3600 if 1 in self.shards else 0)


async def test_a_result_not_written_is_tried_again_while_newer_results_keep_coming() -> None:
    """A result whose write failed waits RETRY_EVERY seconds for its retry; each later write
    put that retry off again, so under a steady flow of results (one every 50 ms here) it was
    never tried again nor given up, and its run held its slot for good (a review). Now the
    held results are tried when due whatever comes after them."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from supersede.keys import Keys
    from supersede.protocol import Outcome, RunResult
    from supersede.services.executor import outbox

    calls: list[int] = []

    class _Flaky(_Writes):
        async def execute(self) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RedisConnectionError("Error 111 connecting")

    box = outbox.Outbox(_Flaky(), Keys("ns", 1), ExecutorConfig(lease_ms=10_000))
    writer = asyncio.create_task(box.loop())
    try:
        first = box.put(0, RunResult("0-a", 1, Outcome.SUCCEEDED, "", None, 0))
        began = time.monotonic()
        while not first.done() and time.monotonic() - began < 3:
            box.put(0, RunResult("0-b", 1, Outcome.SUCCEEDED, "", None, 0))
            await asyncio.sleep(0.05)
        assert first.done() and first.result() == 0, "never tried again"
        assert time.monotonic() - began < 1.0
    finally:
        writer.cancel()


class _Writes:
    """A client whose pipelines take XADDs; subclasses say what `execute` does."""

    def pipeline(self, transaction: bool = False) -> Any:
        return self

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    def xadd(self, *args: Any) -> None:
        return None


def test_a_sync_step_s_place_at_its_timeout_is_read_from_its_own_thread_only() -> None:
    """Pool threads are reused: a run whose step had not started (the pool full) or had just
    returned kept the ident of a thread now running another run's step, and its timeout error
    showed that run's code (a review)."""
    import threading
    import types

    from supersede.services.executor.steps import _on_thread, _thread_frames

    release = threading.Event()

    def others_step(ctx: Any) -> None:
        release.wait(10)

    mine, other = types.SimpleNamespace(thread_ident=None), types.SimpleNamespace(thread_ident=None)
    step = types.SimpleNamespace(fn=others_step)
    thread = threading.Thread(target=_on_thread, args=(other, step, None))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while other.thread_ident is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "in others_step" in _thread_frames(other)
        mine.thread_ident = other.thread_ident  # (stale: the thread runs another run's step)
        assert _thread_frames(mine) == ""
    finally:
        release.set()
        thread.join(10)
    assert other.thread_ident is None  # (cleared when the step returned)


async def test_the_drain_deadline_is_said_before_the_hand_backs_of_the_runs_it_stops() -> None:
    """The runs stopped at the drain deadline are handed back as their steps end, and a hand-
    back that failed (Redis down) said "not handed back: retried once their leases lapse"; the
    line "drain deadline passed; runs stopped, to be handed back" came after it, for the same
    runs (an operator probe). The deadline is said as the runs are stopped, before their ends."""
    import asyncio
    import logging

    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Workflow

    wf = Workflow("wf", on_events=["e"])
    events: list[str] = []

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            events.append(record.getMessage().split(";")[0].split(":")[0])

    @wf.step()
    async def long(ctx: Any) -> None:
        try:
            await asyncio.sleep(10)
        finally:
            events.append("step ended")

    runner = Runner([wf], ExecutorConfig(), _Outbox())
    run = runner.start(0, Claim("0-a", True, 1, "wf", "v", pack_input({}, {}, "e", "1"), "k",
                                "s", "R"))  # fmt: skip
    assert run is not None and run.task is not None
    await asyncio.sleep(0.05)
    runner.stopping.set()
    handler = Said(logging.WARNING)
    logger = logging.getLogger("supersede")
    logger.addHandler(handler)
    try:
        await runner.finish_running(0.0)
    finally:
        logger.removeHandler(handler)
    assert events == ["drain deadline passed", "step ended"], events
    assert runner.left == [(0, "0-a", 1)]
    runner.close()


async def test_a_stream_that_rings_at_every_scan_does_not_take_every_free_slot() -> None:
    """One server, bells: a stream whose bell rings before every scan (its workflow's queue
    worked off: each finish assigns the next run) came first at every scan, and with one free
    slot at a time the pool's other streams with entries (hot) were never reached (a probe:
    runs ASSIGNED for over 6 minutes). A stream a call did not reach is read first next."""
    from supersede.health import ShardHealth
    from supersede.keys import Keys
    from supersede.scripts import Taken
    from supersede.services.executor import fetch

    firsts: list[str] = []

    class Claimer:
        async def take(self, streams: Any, want: int, *, deep: bool = False) -> Taken:
            firsts.append(streams[0][0])  # (it reads one entry there, all it asked: more)
            return Taken([], 1, [(streams[0][0], 1, b"1-0", 1)], [], 1, 0)

    service: Any = type("S", (), {"redis": None, "consumer": "c", "health": ShardHealth.off()})()
    runner: Any = type("R", (), {"workflows": {"queue": None, "latest": None}})()
    claimer: Any = Claimer()
    f = fetch.Fetcher(service, Keys("ns", 4), ExecutorConfig(), runner, claimer, cluster=False)
    f.bells, f._full_scan = True, False
    f._full_scan_due = type("T", (), {"due": lambda self: False})()
    ringing, waiting = 0, len(f.streams) - 1
    f._hot = {waiting}
    for _ in range(4):
        f._woken.append(ringing)
        await f._read_scan(1)
    assert f.streams[waiting] in firsts[:2], firsts
    # full scans go round every stream from where the last one stopped, not woken ones first
    f._full_scan, firsts[:] = True, []
    for _ in range(len(f.streams)):
        f._woken.append(ringing)
        f._full_scan = True
        await f._read_scan(1)
    assert sorted(firsts) == sorted(f.streams), firsts


async def test_a_reclaim_never_starts_again_an_attempt_this_executor_let_go() -> None:
    """A master's outage: the lease watch stopped a run it could not renew, unreported, and a
    claim call failed; once the master answered, the reclaim of that call found the run still
    RUNNING for this executor, not held here, and started the same attempt again (a chaos
    run's `started_twice_same_attempt`). An attempt stopped here is not started again."""
    import asyncio
    import time

    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.claim import Claimer
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Context, Workflow

    wf = Workflow("wf", on_events=["e"])

    @wf.step()
    async def slow(ctx: Context) -> None:
        await asyncio.sleep(30)

    runner = Runner([wf], ExecutorConfig(), _Outbox())
    claim = Claim("0-r", True, 1, "wf", "v", pack_input({}, {}, "e", "1"), "k", "s", "R")
    run = runner.start(0, claim)
    assert run is not None
    await asyncio.sleep(0.05)
    run.lapsed = run.drained = True  # (what the lease watch marks, then the loop stops it)
    runner.let_lapse([run])
    while runner.active:
        await asyncio.sleep(0.01)

    class Scripts:
        async def reclaim(self, *args: Any, **kwargs: Any) -> list[Claim]:
            return [claim]  # (the server: still RUNNING, claimed for this executor)

    started: list[Claim] = []
    unused: Any = None
    claimer = Claimer(cast(Any, Scripts()), "me", ExecutorConfig(), runner, unused)
    claimer._start = lambda shard, c, now, asked=0.0: started.append(c)  # type: ignore[method-assign,assignment]
    claimer.lost_since[0] = time.time() - 1
    assert await claimer.reclaim() == 0 and started == []
    runner.close()


async def test_a_reclaim_never_starts_again_an_attempt_whose_result_was_given_up() -> None:
    """A master froze: a run's handler ended, its result could not be written within a lease
    and was given up (so the executor held it no more), and a claim call to that master was
    lost; once a replica took over, the reclaim of that call found the run still RUNNING for
    this executor and started the same attempt again (a cluster probe: a handler run twice
    under one attempt, which fencing cannot tell apart). An attempt started here is never
    started again; one it never started is."""
    import time

    from redis.exceptions import ConnectionError as RedisConnectionError

    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.claim import Claimer
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Context, Workflow

    wf = Workflow("wf", on_events=["e"])

    @wf.step()
    async def quick(ctx: Context) -> None:
        return None

    class Unwritable(_Outbox):
        def put(self, shard: int, result: Any) -> Any:
            raise RedisConnectionError("the master froze")

    runner = Runner([wf], ExecutorConfig(), Unwritable())
    body = pack_input({}, {}, "e", "1")
    ran = Claim("0-r", True, 1, "wf", "v", body, "k", "s", "R")
    never = Claim("0-n", True, 1, "wf", "v", body, "k", "t", "R")

    class Scripts:
        async def reclaim(self, shard: int, executor: str, held: Any, **kw: Any) -> list[Claim]:
            # (the server: both RUNNING for this executor, but for the attempts it names)
            return [c for c in (ran, never) if (c.run_id, c.attempt) not in set(held)]

    class Cancels:
        def apply_early(self, run: Any) -> None:
            pass

    claimer = Claimer(cast(Any, Scripts()), "me", ExecutorConfig(), runner, cast(Any, Cancels()))
    claimer.lost_since[0] = time.time() - 1
    claimer.start_taken([(0, "1-0", ran)], 0)
    deadline = time.monotonic() + 10
    while not runner.active["0-r"].reported and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # (its handler ended; its result is put again and again)
    task = runner.active["0-r"].task
    assert task is not None
    task.cancel()  # (given up, as at a drain's deadline: held no more)
    await asyncio.wait({task}, timeout=5)
    assert not runner.active and not runner.awaiting and ("0-r", 1) not in claimer._held()
    assert await claimer.reclaim() == 1
    assert set(runner.active) == {"0-n"}  # (the one never started here starts; "0-r" not)
    runner.close()


def test_a_renewal_answered_between_two_looks_is_applied_once() -> None:
    """`_ByNode.run` looked at a call's `done()` twice: one answered in between was given to
    the late callback and returned as the beat's reply too, so its runs were stopped and
    marked twice (a review). One look decides: late, or now."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from supersede.services.executor.lease import _ByNode

    class AnsweredBetweenLooks(Future[Any]):
        looks = 0

        def done(self) -> bool:
            self.looks += 1
            if self.looks == 2 and not super().done():
                self.set_result([b"renewed"])
            return super().done()

    call = AnsweredBetweenLooks()
    node = SimpleNamespace(name="m1")
    by_node = _ByNode(SimpleNamespace(get_node_from_key=lambda key: node), wait=0.01)
    by_node.pool = SimpleNamespace(submit=lambda *a: call)  # type: ignore[assignment]
    by_node._read_slots = lambda unanswered: None  # type: ignore[method-assign]
    by_node.suspect.add("m1")  # (not waited for: its answer counts when it comes)
    late: list[Any] = []
    out = by_node.run(["k"], lambda pipe, i: None, late=lambda i, reply: late.append(reply))
    if not call.done():
        call.set_result([b"renewed"])
    applied = late + [r for r in out if not isinstance(r, Exception)]
    assert applied == [b"renewed"], (out, late)


async def test_a_step_that_does_not_await_still_current_fails_saying_so() -> None:
    """`if not ctx.still_current(): return` in a sync step tested a coroutine, always true:
    fencing skipped with only a RuntimeWarning on stderr (a new-user probe). A step that
    called it without awaiting it fails as it returns, saying what to call; awaiting it (in
    an async step, or by `asyncio.run` or `run_coroutine_threadsafe` in a sync one) and
    `still_current_blocking()` are fine (a review: a first form refused those). It is not
    retried (each retry did the unguarded work again, an API-user probe), and names the line
    that asked."""
    import asyncio

    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Context, Workflow

    wf = Workflow("wf", on_events=["e"])
    loop = asyncio.get_running_loop()

    @wf.step()
    def blocking(ctx: Context) -> bool:
        return ctx.still_current_blocking()

    @wf.step()
    def threadsafe(ctx: Context) -> bool:
        return asyncio.run_coroutine_threadsafe(ctx.still_current(), loop).result(5)

    @wf.step()
    def own_loop(ctx: Context) -> bool:
        return asyncio.run(ctx.still_current())

    @wf.step()
    async def awaited(ctx: Context) -> bool:
        return await ctx.still_current()

    slip = Workflow("slip", on_events=["e"])
    tries = {"sync": 0, "async": 0}

    @slip.step(retries=2)
    def forgot(ctx: Context) -> bool:
        tries["sync"] += 1
        return bool(ctx.still_current())  # (the user's slip)

    async_slip = Workflow("async-slip", on_events=["e"])

    @async_slip.step(retries=2)
    async def forgot_too(ctx: Context) -> bool:
        tries["async"] += 1
        return bool(ctx.still_current())

    outbox = _Outbox()
    runner = Runner([wf, slip, async_slip], ExecutorConfig(), outbox)
    try:
        for i, workflow in enumerate(("wf", "slip", "async-slip")):
            body = pack_input({}, {}, "e", str(i))
            run = runner.start(0, Claim(f"0-{i}", True, 1, workflow, "v", body, "k", "s", "R"))
            assert run is not None and run.task is not None
            await asyncio.wait_for(run.task, 10)
        good, bad, bad_async = outbox.written
        assert good.outcome.value == "S", good
        for failed in (bad, bad_async):
            assert failed.outcome.value == "F"
            assert (
                "without awaiting it" in failed.error and "still_current_blocking" in failed.error
            )
            assert f"{__file__}:" in failed.error, failed.error  # (the step's line)
        assert tries == {"sync": 1, "async": 1}
    finally:
        runner.close()


async def test_a_sync_steps_own_timeout_or_cancelled_error_fails_it_with_its_frames() -> None:
    """asyncio replaces a TimeoutError (and concurrent.futures' CancelledError) that crosses
    from a thread with a new one: a sync step's own, a socket's say, failed its run with the
    executor's frames only (an author probe), and a step's CancelledError of a future it waited
    on read as the run's own cancel. Each fails its step with the step's frame."""
    import asyncio
    import concurrent.futures

    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Context, Workflow

    wf = Workflow("wf", on_events=["e"])

    def connect_db() -> None:
        raise TimeoutError("socket timed out")

    @wf.step()
    def timed_out_socket(ctx: Context) -> None:
        connect_db()

    other = Workflow("other", on_events=["e"])

    @other.step()
    def waited_on_a_cancelled_future(ctx: Context) -> None:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        future.cancel()
        future.result()

    outbox = _Outbox()
    runner = Runner([wf, other], ExecutorConfig(), outbox)
    try:
        for i, workflow in enumerate(("wf", "other")):
            body = pack_input({}, {}, "e", str(i))
            run = runner.start(0, Claim(f"0-{i}", True, 1, workflow, "v", body, "k", "s", "R"))
            assert run is not None and run.task is not None
            await asyncio.wait_for(run.task, 10)
        timed_out, cancelled = outbox.written
        assert timed_out.outcome.value == "F", timed_out
        assert "in connect_db" in timed_out.error and "socket timed out" in timed_out.error
        assert cancelled.outcome.value == "F", cancelled
        assert "in waited_on_a_cancelled_future" in cancelled.error, cancelled.error
    finally:
        runner.close()


def test_turn_keys_not_read_for_a_moved_slot_or_a_silent_master_is_no_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each executor logged a `turn keys not read: MovedError` warning per slot move in a
    reshard (a cluster probe), and one each time a silent master's read was not sent: the
    renewals fall back to asking run by run, and their own lines say what matters. Other
    failures are still warned of."""
    import logging
    from types import SimpleNamespace

    from redis.exceptions import MovedError, ResponseError

    from supersede.keys import Keys
    from supersede.services.executor import lease

    keeper = lease.LeaseKeeper.__new__(lease.LeaseKeeper)
    keeper.keys, keeper.consumer = Keys("t", 4), "ex-1"
    snapshot = [(0, "0-a", 1, 3), (1, "1-a", 1, 3)]
    for error, warned in ((MovedError("3999 127.0.0.1:7001"), False),
                          (TimeoutError("m1 did not answer its last call: not asked"), False),
                          (ResponseError("WRONGTYPE"), True)):  # fmt: skip
        replies = [error, None]
        keeper._nodes = SimpleNamespace(run=lambda keys, send, _r=replies, **_: _r)  # type: ignore[assignment]
        lease._TURNS_NOT_READ._seen.clear()  # (said again: a fresh window)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="supersede.executor"):
            assert keeper._confirmed_turns(snapshot) == {}
        said = [r for r in caplog.records if r.getMessage() == "turn keys not read"]
        assert [r.levelno == logging.WARNING for r in said] == [warned], (error, said)


def test_only_a_version_marked_and_unserved_for_a_minute_gives_way() -> None:
    """Executors register their own definition again when the registered version was served
    since its registration and its mark (an executor serving it said so) is over a minute old.
    Left as it is: a version no executor served since it was registered (ahead of its deploy),
    and one an earlier build registered (it names nothing in the hash): a rollback to that
    build is not undone by the newer executors still running."""
    import types

    import orjson

    from supersede.registry import served_version_field
    from supersede.services.executor.service import Executor

    mine = Workflow("w", on_events=["e"])
    me = types.SimpleNamespace(definitions={"w": mine})
    body = orjson.dumps({"id": "w", "events": ["e"], "version": "other"})
    now = 1_000_000
    field = served_version_field("w", "other").encode()

    def unserved(
        served: dict[bytes, bytes], stored: bytes | None = body, named: bytes | None = b"other"
    ) -> dict[str, str]:
        """(`named`: the version registered last, by a build that names it)"""
        return Executor._unserved(cast(Executor, me), ["w"], [stored], [named], served, now)

    assert unserved({field: str(now - 61_000).encode()}) == {"w": "other"}
    assert unserved({field: str(now - 30_000).encode()}) == {}  # (served lately)
    assert unserved({}) == {}  # (not served since it was registered: ahead of its deploy)
    assert unserved({field: b"soon"}) == {}  # (another hand's write)
    # (registered by an earlier build, after this build's: a rollback to it is not undone)
    assert unserved({field: str(now - 61_000).encode()}, named=b"mine-before") == {}
    assert unserved({field: str(now - 61_000).encode()}, named=None) == {}
    # (0.3.16 named it in the served-versions hash: read no more, as an earlier build's)
    assert unserved({field: str(now - 61_000).encode(), b"w": b"other"}, named=None) == {}
    assert unserved({field: b"0"}, stored=None) == {}  # (missing: registered again as missing)
    own = orjson.dumps({"id": "w", "events": ["e"], "version": mine.version})
    assert unserved({}, stored=own) == {}


async def test_a_failover_that_ends_the_control_read_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`CLUSTER FAILOVER` ends a blocking read with "UNBLOCKED force unblock from blocking
    operation, instance state changed": the executor logged "control iteration failed" at
    ERROR with a traceback, as for a defect (a cluster probe). One warning line; read again."""
    import logging

    from redis.exceptions import ResponseError

    from supersede.service import _hint
    from supersede.services.executor import cancel as cancel_mod

    unblocked = ResponseError("UNBLOCKED force unblock from blocking operation, instance state "
                              "changed (master -> replica?)")  # fmt: skip
    stop = asyncio.Event()
    reads = 0

    async def read(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        if reads == 1:
            raise unblocked
        stop.set()
        return []

    async def tails(redis: Any, streams: Any) -> dict[str, str]:
        return dict.fromkeys(streams, "0-0")

    monkeypatch.setattr(cancel_mod, "read", read)
    monkeypatch.setattr(cancel_mod, "tail_ids", tails)
    monkeypatch.setattr(cancel_mod, "retry_pause", lambda exc: 0.0)
    caplog.set_level(logging.WARNING, logger="supersede")
    await asyncio.wait_for(_cancels()._read_control(stop, ["s"]), 5)
    assert reads == 2
    said = [r for r in caplog.records if r.name.startswith("supersede")]
    assert [r.levelno for r in said] == [logging.WARNING], [r.getMessage() for r in said]
    assert said[0].exc_info is None and "reading again" in said[0].getMessage()
    assert _hint(unblocked) is not None and "failover" in str(_hint(unblocked))


def test_starts_forgotten_past_the_cap_are_counted_and_old_ones_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The starts a reclaim may look back past are kept up to STARTED_MOST per shard; one
    dropped by the cap meanwhile could start again after a lost claim call, and it was
    dropped without a word (a review). Each is counted; starts forgotten because no reclaim
    can reach them any more are not."""
    from prometheus_client import REGISTRY

    from supersede.services.executor import claim
    from supersede.services.executor.claim import Claimer

    def forgotten() -> float:
        return REGISTRY.get_sample_value("supersede_executor_starts_forgotten_total") or 0.0

    monkeypatch.setattr(claim, "STARTED_MOST", 3)
    unused: Any = None
    claimer = Claimer(unused, "me", ExecutorConfig(), unused, unused)
    before = forgotten()
    now = 1_800_000_000.0
    for i in range(5):  # (within a second: every one still within a reclaim's reach)
        claimer._remember(0, (f"0-r{i}", 1), now + i * 0.1)
    assert list(claimer.started[0]) == [("0-r2", 1), ("0-r3", 1), ("0-r4", 1)]
    assert forgotten() - before == 2
    claimer._remember(0, ("0-late", 1), now + 60)  # (a minute on: the others are out of reach)
    assert list(claimer.started[0]) == [("0-late", 1)]
    assert forgotten() - before == 2


def test_a_full_server_is_said_in_one_line_by_the_result_and_lease_paths() -> None:
    """At maxmemory an executor logged a traceback for every run it finished ("result not
    written", 50 in a minute) and for each failed renewal: a defect's branch (a memory probe).
    A full server is a server that cannot take the write now, said in one sampled line."""
    from redis.exceptions import OutOfMemoryError

    from supersede.services.executor import lease
    from supersede.services.executor.isolation import SERVER_UNAVAILABLE

    full = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    assert isinstance(full, SERVER_UNAVAILABLE)
    assert isinstance(full, lease._SAID_IN_ONE_LINE) and not isinstance(full, lease._UNANSWERED)


async def test_a_worker_dead_while_idle_before_its_death_is_reported_gives_its_job_to_another() -> (
    None
):
    """A worker SIGKILLed while idle: its end of the pipe closes at once, but the forkserver
    reports its death only once it reaps it, so `is_alive()` still said yes; the job sent to it
    failed "could not be reached" and its run FAILED, though no worker had seen the step (a
    flaky e2e test). Such a worker is replaced and another takes the job."""
    import asyncio
    from types import SimpleNamespace

    from supersede.services.executor.isolation import ProcessPool

    sent: list[str] = []
    replaced: list[str] = []

    def worker(name: str, dead_pipe: bool) -> Any:
        def send_bytes(data: bytes) -> None:
            if dead_pipe:
                raise BrokenPipeError(32, "Broken pipe")
            sent.append(name)

        return SimpleNamespace(
            name=name, process=SimpleNamespace(is_alive=lambda: True),
            conn=SimpleNamespace(send_bytes=send_bytes), flag=SimpleNamespace(clear=lambda: None),
            leased=name,
        )  # fmt: skip

    pool: Any = ProcessPool.__new__(ProcessPool)
    pool._idle = asyncio.Queue()
    pool._idle.put_nowait(worker("killed", dead_pipe=True))
    pool._idle.put_nowait(worker("alive", dead_pipe=False))
    pool._replace = lambda w: replaced.append(w.name)

    async def receive(w: Any) -> list[Any]:
        return ["ok", {"by": w.name}]

    pool._receive = receive
    leased: list[str] = []
    out = await pool.call({"id": "0-a"}, lease=leased.append, timeout=5, cancelled=lambda: False,
                          stage=lambda s: None)  # fmt: skip
    assert out == {"by": "alive"} and sent == ["alive"] and replaced == ["killed"]
    assert leased[-1] == "alive"  # (the stamp given before the job was sent)
