"""Executors as real processes with ingress and admission: sharing work, cancellation within
milliseconds (invariant 5 of docs/design.md), SIGKILL recovery (invariant 3), SIGTERM drain,
retries and bad definitions."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from supersede import acl, client, codec
from supersede.keys import Keys
from supersede.registry import load_all, register
from supersede.scripts import load_source
from supersede.server import EmbeddedServer
from tests.support import (
    APP,
    APP_WORKFLOWS,
    CLI,
    System,
    eventually,
    pending_count,
    records,
    scrape,
)
from tests.support.proxy import FreezableProxy


async def publish(redis: Redis, keys: Keys, name: str, **data: object) -> str:
    entry = await redis.xadd(keys.events_stream, {"name": name, "data": orjson.dumps(data)})
    return str(entry.decode())


async def log(redis: Redis, keys: Keys) -> list[str]:
    return [x.decode() for x in await redis.lrange(f"{keys.namespace}:test:log", 0, -1)]


async def logged(redis: Redis, keys: Keys, prefix: str, n: int = 1) -> bool:
    return sum(1 for x in await log(redis, keys) if x.startswith(prefix)) >= n


def assignment_streams(keys: Keys, workflow: str = "work") -> list[str]:
    return [sk.assignments_stream(workflow) for sk in keys.all_shards()]


async def _consumers(redis: Redis, keys: Keys, n: int) -> bool:
    """At least `n` executors have read the assignment streams (each is a group consumer)."""
    names = set()
    for stream in [*assignment_streams(keys), *assignment_streams(keys, "chat")]:
        if await redis.exists(stream):
            names |= {c["name"] for c in await redis.xinfo_consumers(stream, "executors")}
    return len(names) >= n


async def states(redis: Redis, keys: Keys) -> Counter[str]:
    return Counter(str(r["st"]) for r in (await records(redis, keys)).values())


async def test_three_executors_share_the_work_and_each_run_completes_once(
    redis: Redis, keys: Keys, system: System
) -> None:
    execs = await system.pipeline(redis, keys, 3, "--slots", "4")
    # Sharing shown without timing: 12 long runs on 3 x 4 slots are all RUNNING at once only
    # when each executor holds 4 of them.
    await eventually(lambda: _consumers(redis, keys, 3), timeout=30)
    for i in range(12):
        await publish(redis, keys, "work.item", i=-1 - i, sleep=8)

    async def all_twelve_running() -> bool:
        return (await states(redis, keys))["R"] == 12

    await eventually(all_twelve_running, timeout=30)
    holders = Counter(str(r["e"]) for r in (await records(redis, keys)).values())
    assert sorted(holders.values()) == [4, 4, 4]
    n = 150
    for i in range(n):
        await publish(redis, keys, "work.item", i=i, sleep=0.02)
    await eventually(lambda: _all(redis, keys, n + 12, "S"), timeout=60)
    done = [x for x in await log(redis, keys) if x.startswith("done:")]
    assert len(done) == n + 12 and len({x.split(":")[1] for x in done}) == n + 12
    assert all(p.poll() is None for p in execs)


async def _all(redis: Redis, keys: Keys, n: int, state: str) -> bool:
    s = await states(redis, keys)
    return s[state] == n and sum(s.values()) == n


async def test_cancel_in_progress_stops_async_and_sync_handlers_and_runs_the_hook(
    redis: Redis, keys: Keys, system: System
) -> None:
    await system.pipeline(redis, keys, 1)
    await publish(redis, keys, "chat.message", userId="u1", sleep=30, text="first")
    await publish(redis, keys, "sync.message", userId="u1", sleep=30)
    await eventually(lambda: logged(redis, keys, "started:", 2), timeout=30)
    await publish(redis, keys, "chat.message", userId="u1", text="second")
    await publish(redis, keys, "sync.message", userId="u1")
    await eventually(lambda: logged(redis, keys, "stored:"), timeout=10)
    await eventually(lambda: logged(redis, keys, "sync-cancelled:"), timeout=10)
    await eventually(lambda: logged(redis, keys, "hook:"), timeout=10)
    entries = await log(redis, keys)
    started = [x.split(":")[1] for x in entries if x.startswith("started:")]
    first_chat = (
        started[0]
        if started[0] in {x.split(":")[1] for x in entries if x.startswith("cancelled:")}
        else started[1]
    )
    assert f"cancelled:{first_chat}" in entries and f"hook:{first_chat}" in entries
    assert any(x.startswith("stored:") and x.endswith("re: second") for x in entries)
    await eventually(lambda: _states(redis, keys, {"C": 2, "S": 2}), timeout=10)


async def _states(redis: Redis, keys: Keys, expected: dict[str, int]) -> bool:
    return dict(await states(redis, keys)) == expected


async def test_pools_with_different_workflows_each_run_only_their_own(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Two executor pools, each with a module the other lacks: every run goes to the pool that
    has its workflow and succeeds (before routing, each claimed the other's runs and failed
    them as `unknown workflow`)."""
    pool_b = system.start("executor", "tests.support.apps.pool_b")
    [pool_a] = await system.pipeline(redis, keys, 1, expected_workflows=APP_WORKFLOWS + 1)
    for i in range(8):
        await publish(redis, keys, "work.item", i=i)
        await publish(redis, keys, "image.uploaded", i=i)
    await eventually(lambda: _states(redis, keys, {"S": 16}), timeout=30)
    entries = await log(redis, keys)
    assert (
        sorted(x.rsplit(":", 1)[1] for x in entries if x.startswith("done:"))
        == [str(pool_a.pid)] * 8
    )
    assert (
        sorted(x.rsplit(":", 1)[1] for x in entries if x.startswith("ran:resize:"))
        == [str(pool_b.pid)] * 8
    )
    by_workflow = Counter(str(r["w"]) for r in (await records(redis, keys)).values())
    assert by_workflow == {"work": 8, "resize": 8}


async def test_a_pool_registered_ahead_keeps_the_events_published_before_it_started(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Events of two pools' workflows wait in the inbox of a new namespace. The first pool to
    start registered only its own workflows, and ingress then acknowledged the other pool's
    events as unrouted: lost (a black-box probe). `supersede register MODULE...` registers
    the pools' workflows before they run: their events make runs that wait for them."""
    system.start("admission", "--block-ms", "100", "--reap-interval", "0.1")
    system.start("ingress", "--block-ms", "100")
    for i in range(4):
        await publish(redis, keys, "work.item", i=i)
        await publish(redis, keys, "image.uploaded", i=i)
    env = system.env
    register = [sys.executable, "-m", "supersede", "register", APP, "tests.support.apps.pool_b"]
    done = await asyncio.to_thread(subprocess.run, [*register, "--json"], env=env,
                                   capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {row["workflow"]: row["events"] for row in orjson.loads(done.stdout)}
    assert len(rows) == APP_WORKFLOWS + 1 and rows["resize"] == ["image.uploaded"]
    system.start("executor", APP)  # pool A
    await eventually(lambda: _states(redis, keys, {"S": 4, "A": 4}), timeout=30)
    pool_b = system.start("executor", "tests.support.apps.pool_b")
    await eventually(lambda: _states(redis, keys, {"S": 8}), timeout=30)
    ran = [x for x in await log(redis, keys) if x.startswith("ran:resize:")]
    assert sorted(x.rsplit(":", 1)[1] for x in ran) == [str(pool_b.pid)] * 4
    # a module that cannot be loaded, or a definition refused, is one line naming it
    bad = await asyncio.to_thread(subprocess.run, [*register[:-2], "no.such.module"], env=env,
                                  capture_output=True, timeout=60)  # fmt: skip
    err = bad.stderr.decode()
    assert bad.returncode == 2 and "no.such.module" in err and "Traceback" not in err, err


async def test_an_executor_whose_workflow_another_definition_replaced_says_so(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """Two pools registering one workflow id with different definitions replace each other at
    each start, silently: one pool's runs got the other's key, limit and strategy and ran with
    the other's steps (a probe). An executor whose workflow is registered in another version
    says so (a rollout under way does it too, for a while), naming both versions."""
    err = tmp_path / "executor.err"
    cmd = [sys.executable, "-m", "supersede", "executor", APP, "--metrics-port", "0"]
    with err.open("wb") as sink:
        system.procs.append(subprocess.Popen(cmd, env=system.env, stderr=sink))
    await eventually(lambda: _registered(redis, keys, "work"), timeout=30)
    [mine] = [w for w in (await load_all(redis, keys))[1].values() if w.id == "work"]
    said = "a workflow of this executor is registered in another version"
    assert said not in err.read_text()
    other = await register(redis, keys, {"id": "work", "events": ["work.item"],
                                         "steps": [{"name": "elsewhere"}]})  # fmt: skip

    async def warned() -> bool:
        return said in err.read_text()

    await eventually(warned, timeout=10)
    [line] = [orjson.loads(x) for x in err.read_text().splitlines() if said in x]
    assert (line["workflow"], line["here"]) == ("work", mine.version)
    assert line["registered"] == other.version != mine.version


async def test_a_version_no_executor_serves_gives_way_to_the_served_one(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Each executor registers its definitions as it starts, so an old executor that started
    late in a rollout (restarted, rescheduled) put its own back, and it stayed once the rollout
    had replaced that executor, for good: the events only the new definition listens to made no
    run (a probe: 205 of 240). A version registered lately, or served by an executor, is left as
    it is (a deploy about to start, a rollout under way); one no executor has served for a
    minute gives way to the executor's own, which says so."""
    from tests.support import scrape_when

    _, port = await system.serving("executor", APP)
    await eventually(lambda: _registered(redis, keys, "work"), timeout=30)
    [mine] = [w for w in (await load_all(redis, keys))[1].values() if w.id == "work"]
    other = await register(redis, keys, {"id": "work", "events": ["work.item", "work.more"],
                                         "steps": [{"name": "elsewhere"}]})  # fmt: skip
    differs = 'supersede_executor_workflow_definition_differs{workflow="work"} 1.0'
    await scrape_when(f"http://127.0.0.1:{port}/metrics", lambda body: differs in body)
    # (registered, and no executor served it since: the executor saw it, and left it)
    assert (await load_all(redis, keys))[1]["work"].version == other.version
    marks = await redis.hgetall(keys.served_versions_hash)
    assert f"work\n{mine.version}".encode() in marks, marks
    assert f"work\n{other.version}".encode() not in marks
    assert await redis.hget(keys.registered_versions_hash, "work") == other.version.encode()
    seconds, _ = await redis.time()
    # Served, and its executor went a minute ago; a mark of two hours ago is forgotten.
    await redis.hset(
        keys.served_versions_hash,
        mapping={
            f"work\n{other.version}": (seconds - 61) * 1000,
            "gone\nv0": (seconds - 7200) * 1000,
            "gone": "v0",  # (a version name as 0.3.16 kept it here: 0.3.15 read it as ms)
        },
    )

    async def own_again() -> bool:
        return (await load_all(redis, keys))[1]["work"].version == mine.version

    await eventually(own_again, timeout=15)
    same = 'supersede_executor_workflow_definition_differs{workflow="work"} 0.0'
    await scrape_when(f"http://127.0.0.1:{port}/metrics", lambda body: same in body)
    marks = await redis.hgetall(keys.served_versions_hash)
    assert b"gone\nv0" not in marks and b"gone" not in marks, marks


async def test_a_backlog_of_one_workflow_does_not_starve_another(
    redis: Redis, keys: Keys, system: System
) -> None:
    """With two slots busy on a backlog of `work` runs, a `sync-reply` run assigned after
    them starts long before the backlog is worked off: every other read covers every
    stream, not only the ones that had more the last time."""
    await system.pipeline(redis, keys, 1, "--slots", "2")
    for i in range(60):
        await publish(redis, keys, "work.item", i=i, sleep=0.2)
    await eventually(lambda: logged(redis, keys, "done:", 4), timeout=30)
    await publish(redis, keys, "sync.message", userId="u", sleep=0)
    await eventually(lambda: _states(redis, keys, {"S": 61}), timeout=60)
    entries = await log(redis, keys)
    starts = [x for x in entries if x.startswith("started:")]
    sync_rid = next(
        rid for rid, r in (await records(redis, keys)).items() if r["w"] == "sync-reply"
    )
    assert starts.index(f"started:{sync_rid}") < 40, "the other workflow waited for the backlog"


async def test_a_failing_step_is_retried_then_fails_the_run_with_its_traceback(
    redis: Redis, keys: Keys, system: System
) -> None:
    await system.pipeline(redis, keys, 1)
    await publish(redis, keys, "flaky.item")
    await eventually(lambda: _states(redis, keys, {"F": 1}), timeout=30)
    [rec] = (await records(redis, keys)).values()
    assert "RuntimeError: boom from the step" in str(rec["err"]) and "failed after 3 tries" in str(
        rec["err"]
    )
    # the traceback starts at the step's own frame: the executor's and the thread pool's,
    # which said nothing about the failure, are left out
    frames = [line for line in str(rec["err"]).splitlines() if line.lstrip().startswith("File ")]
    assert frames and "apps/demo.py" in frames[0] and "always_fails" in frames[0], rec["err"]
    tries = [x.split(":")[2] for x in await log(redis, keys) if x.startswith("attempt:")]
    assert tries == ["0", "1", "2"]  # (ctx.retry_count: the step's retries so far)
    # An error of 200,000 4-byte characters was kept as 20,000 of them (78 KB) for the whole
    # retention; now at most 8 KiB of it: its start and its end, which names the exception.
    await publish(redis, keys, "flaky.item", message="\U0001f600" * 200_000 + " the end")
    await eventually(lambda: _states(redis, keys, {"F": 2}), timeout=30)
    [err] = [str(r["err"]) for r in (await records(redis, keys)).values() if "the end" in str(r)]
    assert len(err.encode()) <= 8192 and "Traceback" in err and "bytes cut" in err


async def test_sigkill_of_an_executor_holding_runs_retries_them_elsewhere(
    redis: Redis, keys: Keys, system: System
) -> None:
    [victim] = await system.pipeline(redis, keys, 1, "--lease", "1", "--slots", "5")
    for i in range(5):
        await publish(redis, keys, "work.item", i=i, sleep=1.5)
    await eventually(lambda: logged(redis, keys, "started:", 5), timeout=30)
    victim.send_signal(signal.SIGKILL)
    victim.wait(5)
    system.start("executor", APP, "--lease", "1", "--slots", "5")
    await eventually(lambda: _all(redis, keys, 5, "S"), timeout=60)
    recs = await records(redis, keys)
    assert {r["a"] for r in recs.values()} == {2}  # each retried once, none ended twice
    for sk in keys.all_shards():
        assert await redis.hlen(sk.slots_hash) == 0  # every slot released exactly
        assert await redis.zcard(sk.active_zset) == 0
    # `supersede run` shows the first attempt too (it showed only the last): its executor,
    # and how it ended
    shown = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "supersede", "run", next(iter(recs)), "--json"],
        env=system.env, capture_output=True, timeout=30,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    run = orjson.loads(shown.stdout)
    events = [e["event"] for e in run["timeline"]]
    first = run["earlier_attempts"][0]
    assert first["attempt"] == 1 and first["reason"] == "lease_expired", run
    assert first["executor"] != run["executor"] and first["executor"].startswith("executor-")
    assert f"attempt 1 claimed by {first['executor']}" in events, events
    assert any(e.startswith("attempt 1 ended: its lease lapsed") for e in events), events
    assert events.index(f"attempt 1 claimed by {first['executor']}") < events.index(
        "assigned (attempt 2)"
    )


async def test_sigterm_while_the_workflows_import_exits_0_at_once(
    system: System, tmp_path: Path
) -> None:
    """A deploy that stops an executor still importing its workflows' modules (a model
    loaded at import: seconds) saw it killed by the signal's default, exit -15, without a
    line. Nothing was claimed yet: it exits 0 at once, saying so."""
    module = tmp_path / "slow_import.py"
    marker = tmp_path / "importing"
    module.write_text(f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\n"
                      "time.sleep(30)\n")  # fmt: skip
    proc = subprocess.Popen([*CLI, "executor", str(module), "--metrics-port", "0"],
                            env=system.env, stderr=subprocess.PIPE)  # fmt: skip
    try:
        await eventually(lambda: asyncio.to_thread(marker.exists), timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
        assert proc.stderr is not None
        assert "stopped before it started (SIGTERM)" in proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


async def test_sigterm_drains_running_runs_within_the_deadline(
    redis: Redis, keys: Keys, system: System
) -> None:
    [executor] = await system.pipeline(redis, keys, 1, "--drain-timeout", "10")
    await publish(redis, keys, "work.item", sleep=1.0)
    await eventually(lambda: logged(redis, keys, "started:"), timeout=30)
    executor.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(executor.wait, 10) == 0
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=10)


async def test_a_rolling_deploy_hands_runs_back_at_once_and_uses_none_of_their_attempts(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Three rolling restarts of the executor, each drain (1 s) shorter than the handlers: a
    rolling-deploy probe saw a third of such runs FAIL (each drain's lapsed lease used an
    attempt) and each wait a lease before it ran again. Now each drain hands its runs back:
    the next executor starts them at once (the lease here is a minute, so a lapse would not
    do it), a sync step polling `ctx.cancelled` sees it, and after three drains the runs run
    a fourth time, beyond max_attempts (3). A sync step that ignores `ctx.cancelled` is left
    to its lease: handing it back would run it twice at once."""
    args = ("--drain-timeout", "1", "--lease", "60")
    [executor] = await system.pipeline(redis, keys, 1, *args)
    await publish(redis, keys, "work.item", sleep=120)
    await publish(redis, keys, "sync.message", userId="roll", sleep=120)
    await publish(redis, keys, "stubborn.item", k="roll", sleep=120)

    async def running(attempt: int, hand_backs: int, n: int = 2) -> bool:
        recs = await records(redis, keys)
        return n == sum(r["st"] == "R" and r["a"] == attempt and r.get("hb", 0) == hand_backs
                        for r in recs.values())  # fmt: skip

    await eventually(lambda: running(1, 0, 3), timeout=30)
    port = 0
    for drain in (1, 2, 3):
        successor, port = await system.serving("executor", APP, *args)
        executor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(executor.wait, 30) == 0
        await eventually(lambda d=drain: running(d + 1, d), timeout=20)
        executor = successor
    assert await logged(redis, keys, "sync-cancelled:", 3)
    # (the executor that starts a handed-back run counts it: the draining one exits first)
    body = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
    assert "supersede_executor_runs_handed_back_total 2.0" in body, body[-2000:]
    recs = await records(redis, keys)
    [stubborn] = [r for r in recs.values() if r["w"] == "stubborn"]
    assert (stubborn["st"], stubborn["a"], stubborn.get("hb")) == ("R", 1, None)


async def test_a_sync_step_past_the_drain_deadline_does_not_hold_the_process(
    redis: Redis, keys: Keys, system: System
) -> None:
    """SIGTERM while a sync step sleeps 30 s and ignores cancellation, with a 2 s drain: the
    executor logged "executor stopped" after the drain, but Python then joined the step's
    thread, so the process lived 30 s more (a rolling deploy waited for its kill, and the
    handler ran on beside its retry). It now exits at the drain deadline, with exit 0."""
    [executor] = await system.pipeline(redis, keys, 1, "--lease", "3", "--drain-timeout", "2")
    await publish(redis, keys, "stubborn.item", k="held", sleep=30)
    await eventually(lambda: logged(redis, keys, "started:"), timeout=30)
    executor.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert await asyncio.to_thread(executor.wait, 25) == 0
    assert time.monotonic() - signalled < 12
    assert not await logged(redis, keys, "stubborn-finished:")


async def _system_with_module(
    redis: Redis, keys: Keys, system: System, module: Path, workflow: str, *args: str
) -> subprocess.Popen[bytes]:
    """Admission, an executor of `module` (a file of workflows; its stderr piped) and ingress,
    once the executor registered `workflow`."""
    env = {**system.env, "PYTHONPATH": f"{module.parent}:{system.env.get('PYTHONPATH', '')}"}
    system.start("admission", "--block-ms", "100")
    cmd = [sys.executable, "-m", "supersede", "executor", module.stem, *args,
           "--metrics-port", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    system.procs.append(proc)

    async def registered() -> bool:
        return bool(await redis.hexists(keys.workflows_hash, workflow))

    await eventually(registered, timeout=30)
    system.start("ingress", "--block-ms", "100")
    return proc


async def _stderr_after_sigterm(proc: subprocess.Popen[bytes]) -> str:
    """Stop `proc` as a deploy does; its stderr once it exited 0."""
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert proc.stderr is not None
    with proc.stderr:
        return proc.stderr.read().decode()


STUBBORN_BESIDE_PROCESSES = """
import os, time
from supersede.config import connect_sync
from supersede.workflow import Context, Workflow

_redis = connect_sync(os.environ["SUPERSEDE_REDIS_URL"])
isolated = Workflow("isolated-step", on_events=["isolated.item"], isolation="process")


@isolated.step()
def quick(ctx: Context) -> None:
    return None


held = Workflow("held-thread", on_events=["held.item"])


@held.step()
def sleeps(ctx: Context) -> None:
    _redis.rpush(os.environ["SUPERSEDE_NAMESPACE"] + ":test:log", "held-started")
    time.sleep(30)  # (and never looks at ctx.cancelled)
"""


async def test_an_exit_past_the_drain_deadline_beside_worker_processes_writes_only_log_lines(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """An executor with worker processes (a step in process isolation) that exits at the drain
    deadline past a stuck sync step: its stderr holds JSON log lines only. The exit skipped
    the interpreter's finalizers, so multiprocessing's resource tracker found the workers'
    semaphores and printed a two-line warning of its own ("leaked semaphore objects")."""
    module = tmp_path / "stuck_flows.py"
    module.write_text(STUBBORN_BESIDE_PROCESSES)
    proc = await _system_with_module(redis, keys, system, module, "held-thread", "--slots", "2",
                                     "--drain-timeout", "2", "--grace", "0.5")  # fmt: skip
    await publish(redis, keys, "held.item")
    await eventually(lambda: logged(redis, keys, "held-started"), timeout=30)
    err = await _stderr_after_sigterm(proc)
    assert "threads still running" in err  # (the exit this test is about)
    # the signal is said at once (only "executor stopped" came, up to the deadline later)
    drain = next(orjson.loads(x) for x in err.splitlines() if '"draining' in x)
    assert drain["runs"] == 1 and drain["drain_timeout_s"] == 2.0, drain
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("{")] == [], err[-3000:]


THREAD_LEFT_BEHIND = """
import threading, time
from supersede.workflow import Context, Workflow

spawns = Workflow("spawns-thread", on_events=["spawns.item"])


@spawns.step()
async def starts_a_thread(ctx: Context) -> str:
    def forever() -> None:
        while True:
            time.sleep(0.2)

    threading.Thread(target=forever, name="user-thread").start()  # (not a daemon)
    return "left it running"
"""


async def test_a_thread_a_step_left_running_does_not_hold_the_executors_exit(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """A step that starts a (non-daemon) thread and returns: at SIGTERM the executor said
    "executor stopped" and then never exited, as Python joins such threads (a probe: alive
    after 60 s, until SIGKILL). It exits 0 now, naming the thread."""
    module = tmp_path / "spawning_flows.py"
    module.write_text(THREAD_LEFT_BEHIND)
    proc = await _system_with_module(redis, keys, system, module, "spawns-thread")
    await publish(redis, keys, "spawns.item")
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
    err = await _stderr_after_sigterm(proc)
    assert "threads still running" in err and "user-thread" in err, err[-2000:]


LOOP_STOPPER = """
import asyncio
from supersede.workflow import Context, Workflow

stops = Workflow("stops-loop", on_events=["stops.item"])


@stops.step()
async def stops_the_loop(ctx: Context) -> None:
    asyncio.get_running_loop().stop()
    await asyncio.sleep(60)
"""


async def test_a_step_that_stops_the_event_loop_ends_the_executor_in_one_line(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """An async step calling loop.stop(): the executor exited 1 with a traceback of asyncio's
    frames ("Event loop stopped before Future completed") after an info "executor stopped"
    (a probe). It says what happened in one line, naming the fix."""
    module = tmp_path / "stopping_flows.py"
    module.write_text(LOOP_STOPPER)
    proc = await _system_with_module(redis, keys, system, module, "stops-loop")
    await publish(redis, keys, "stops.item")
    assert await asyncio.to_thread(proc.wait, 30) == 1
    assert proc.stderr is not None
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert "the event loop was stopped" in err and "Traceback" not in err, err[-2000:]


BLOCKING_STEP = """
import time
from supersede.workflow import Context, Workflow

blocking = Workflow("blocking", on_events=["blocking.item"])


@blocking.step()
async def sleeps_in_the_loop(ctx: Context) -> None:
    time.sleep(2)  # (the mistake: time.sleep in an async step holds the event loop)
"""


async def test_a_step_that_blocks_the_event_loop_is_named_in_the_logs(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """An async step that calls time.sleep holds the whole process: before, the only trace
    was Redis timeouts of other tasks, which blamed the server; now a warning says the loop
    was blocked, how long, and which workflows were running."""
    module = tmp_path / "blocking_flows.py"
    module.write_text(BLOCKING_STEP)
    proc = await _system_with_module(redis, keys, system, module, "blocking")
    await publish(redis, keys, "blocking.item")

    async def succeeded() -> bool:
        return any(r.get("w") == "blocking" and r.get("st") == "S"
                   for r in (await records(redis, keys)).values())  # fmt: skip

    await eventually(succeeded, timeout=30)
    err = await _stderr_after_sigterm(proc)
    lines = [orjson.loads(line) for line in err.splitlines() if line.strip()]
    [blocked] = [line for line in lines if line["msg"].startswith("event loop blocked")]
    assert blocked["level"] == "warning"
    assert 1.5 <= blocked["seconds"] <= 10
    assert blocked["workflows_running"] == ["blocking"]


LIBRARY_POOL = """
import atexit, os
from concurrent.futures import ThreadPoolExecutor
from supersede.workflow import Context, Workflow

pool = ThreadPoolExecutor(2)  # a library's own pool, idle once its first task is done
pool.submit(int).result()
atexit.register(lambda: open(os.environ["POOL_MARKER"], "w").close())
wf = Workflow("pooled", on_events=["pooled.event"])


@wf.step()
async def nothing(ctx: Context) -> None:
    return None
"""


async def test_a_library_thread_pool_is_left_to_python_s_usual_exit(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """Only the executor's own step threads count as stuck at exit: a pool a workflow module
    started is joined by Python as usual, and its atexit hooks run (os._exit would skip them)."""
    (tmp_path / "pooled_flows.py").write_text(LIBRARY_POOL)
    marker = tmp_path / "marker.atexit"
    env = {**system.env, "PYTHONPATH": f"{tmp_path}:{system.env.get('PYTHONPATH', '')}",
           "POOL_MARKER": str(marker)}  # fmt: skip
    cmd = [sys.executable, "-m", "supersede", "executor", "pooled_flows", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    system.procs.append(proc)

    async def registered() -> bool:
        return bool(await redis.hexists(keys.workflows_hash, "pooled"))

    await eventually(registered, timeout=30)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert proc.stderr is not None
    with proc.stderr:
        assert b"threads still running" not in proc.stderr.read()
    assert marker.exists()


async def test_a_drain_renews_leases_and_takes_cancels_for_handlers_longer_than_the_lease(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A rolling deploy: SIGTERM while a 4 s handler runs under a 1 s lease, with a second
    executor up to take retries. The handler runs once and succeeds at attempt 1; a run
    superseded during the drain is cancelled at once, not at the drain deadline."""
    [old] = await system.pipeline(redis, keys, 1, "--lease", "1", "--drain-timeout", "20")
    await publish(redis, keys, "work.item", sleep=4)
    await publish(redis, keys, "chat.message", userId="u1", sleep=30)
    await eventually(lambda: logged(redis, keys, "started:", 2), timeout=30)
    old.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    system.start("executor", APP, "--lease", "1")
    await eventually(lambda: _consumers(redis, keys, 2), timeout=30)
    # The scenario: the newer message comes once the drain outlasted a control read (1 s).
    await asyncio.sleep(max(0.0, 1.5 - (time.monotonic() - signalled)))
    await publish(redis, keys, "chat.message", userId="u1", sleep=0)
    await eventually(lambda: _states(redis, keys, {"S": 2, "C": 1}), timeout=30)
    # The superseded run stopped when its cancel came, so the drain ended with the 4 s run,
    # not at its 20 s deadline.
    assert await asyncio.to_thread(old.wait, 18 - (time.monotonic() - signalled)) == 0
    recs = await records(redis, keys)
    work = [r for r in recs.values() if r["w"] == "work"]
    assert [r["a"] for r in work] == [1]
    started = [x for x in await log(redis, keys) if x.startswith("started:")]
    assert len(started) == 3  # the work run, the superseded chat run, the newer chat run


@pytest.mark.parametrize("results_lost", [False, True])
async def test_results_waiting_for_admission_keep_their_runs_from_the_reaper(
    redis: Redis, keys: Keys, system: System, results_lost: bool
) -> None:
    """An executor that leaves its results to admission (`--results-via-stream`, as when its own
    finish call fails): admission is down for three leases while runs finish; once it is back,
    every run ends SUCCEEDED at attempt 1 and no handler ran twice. Also when the written
    results are lost meanwhile (a failover before replication): the executor writes them
    again."""
    await system.pipeline(redis, keys, 1, "--lease", "1", "--results-via-stream")
    admission = system.procs[0]
    for i in range(5):
        await publish(redis, keys, "work.item", i=i, sleep=0.5)
    await eventually(lambda: logged(redis, keys, "started:", 5), timeout=30)
    admission.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(admission.wait, 10) == 0
    await eventually(lambda: logged(redis, keys, "done:", 5), timeout=30)
    await asyncio.sleep(3.0)  # the scenario itself: results wait three leases for admission
    if results_lost:
        for sk in keys.all_shards():
            await redis.xtrim(sk.results_stream, maxlen=0)
    system.start("admission", "--block-ms", "100", "--reap-interval", "0.1")
    await eventually(lambda: _all(redis, keys, 5, "S"), timeout=30)
    assert {r["a"] for r in (await records(redis, keys)).values()} == {1}
    assert sum(1 for x in await log(redis, keys) if x.startswith("started:")) == 5
    added = 0  # (the results took the stream: the way this test is about)
    for sk in keys.all_shards():
        if await redis.exists(sk.results_stream):
            added += int((await redis.xinfo_stream(sk.results_stream))["entries-added"])
    assert added >= 5


async def test_an_assigned_run_whose_entry_was_lost_is_reassigned_and_runs(
    redis: Redis, keys: Keys, system: System
) -> None:
    """No executor is up when a run is assigned, and its assignment entry is then lost (a
    trim, a failover): once an executor comes, the run still starts, after the deadline."""
    system.start("admission", "--block-ms", "100", "--reap-interval", "0.1",
                 "--assign-deadline", "1")  # fmt: skip
    # registered by hand: ingress routes only to registered workflows, and no executor is up
    await register(redis, keys, {"id": "work", "events": ["work.item"], "steps": [{"name": "x"}]})
    system.start("ingress", "--block-ms", "100")
    await publish(redis, keys, "work.item", sleep=0)
    await eventually(lambda: _states(redis, keys, {"A": 1}), timeout=30)
    for stream in assignment_streams(keys):
        await redis.xtrim(stream, maxlen=0)
    system.start("executor", APP)
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
    assert [x for x in await log(redis, keys) if x.startswith("started:")] != []


async def test_leases_are_renewed_while_a_handler_blocks_the_event_loop(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A step blocks its executor's event loop for 4 s under a 1 s lease while another executor
    is free: the leases are renewed from their own thread, so the run is not retried elsewhere
    while it still runs; it runs once and succeeds at attempt 1."""
    await system.pipeline(redis, keys, 2, "--lease", "1")
    await publish(redis, keys, "work.item", block=4)
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
    assert [r["a"] for r in (await records(redis, keys)).values()] == [1]
    assert sum(1 for x in await log(redis, keys) if x.startswith("started:")) == 1


async def test_a_cancel_reaches_a_sync_step_while_another_step_blocks_the_event_loop(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Run B is a sync step (in a thread) polling ctx.cancelled; run A then blocks the event
    loop for 6 s. A newer event supersedes B meanwhile: the lease keeper's thread, not the
    blocked loop, hands B its cancel, so B stops while A still blocks the loop."""
    await system.pipeline(redis, keys, 1, "--lease", "1", "--slots", "2")
    await publish(redis, keys, "sync.message", userId="u", sleep=60)
    await eventually(lambda: logged(redis, keys, "started:"), timeout=30)
    [b_started] = await log(redis, keys)
    await publish(redis, keys, "work.item", block=6)
    await eventually(lambda: logged(redis, keys, "started:", 2), timeout=30)
    await publish(redis, keys, "sync.message", userId="u", sleep=0)
    b = b_started.split(":", 1)[1]
    await eventually(lambda: logged(redis, keys, f"sync-cancelled:{b}"), timeout=30)
    entries = await log(redis, keys)
    assert not any(x.startswith("done:") for x in entries), "the loop was no longer blocked"
    await eventually(lambda: _states(redis, keys, {"C": 1, "S": 2}), timeout=30)


async def test_a_cancelled_sync_step_is_reported_only_once_it_has_returned(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A sync step takes 1 s to wind down after its cancel: the run ends (CANCELLED) only
    after the step returned, not when its task was cancelled while the thread still ran."""
    await system.pipeline(redis, keys, 1)
    await publish(redis, keys, "sync.message", userId="u", sleep=60, linger=1)
    await eventually(lambda: logged(redis, keys, "started:"), timeout=30)
    await publish(redis, keys, "sync.message", userId="u", sleep=0)
    await eventually(lambda: _states(redis, keys, {"C": 1, "S": 1}), timeout=30)
    [returned] = [x for x in await log(redis, keys) if x.startswith("sync-returned:")]
    _, rid, at_ms = returned.split(":")
    assert int(str((await records(redis, keys))[rid]["t3"])) >= int(at_ms)


async def test_a_sync_step_that_outlives_the_grace_is_timed_stopped_when_it_returns(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """A sync step takes 2 s to wind down after its cancel, past the 0.5 s grace: its run is
    reported CANCELLED at the grace, but the "stopped" stage of the cancel is observed when the
    thread returned, 2 s or more after the cancel. (Before, it was observed at the grace: the
    metric said the handler had stopped while it still ran.)"""
    import re

    from supersede.server import free_port
    from tests.support import scrape_when

    system = System(redis_url, keys)
    port = free_port()
    try:
        system.start("admission", "--block-ms", "100")
        cmd = [sys.executable, "-m", "supersede", "executor", APP, "--grace", "0.5",
               "--metrics-port", str(port)]  # fmt: skip
        system.procs.append(subprocess.Popen(cmd, env=system.env, stderr=subprocess.DEVNULL))

        async def registered() -> bool:
            return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

        await eventually(registered, timeout=30)
        system.start("ingress", "--block-ms", "100")
        await publish(redis, keys, "sync.message", userId="u", sleep=60, linger=2)
        await eventually(lambda: logged(redis, keys, "started:"), timeout=30)
        await publish(redis, keys, "sync.message", userId="u", sleep=0)
        await eventually(lambda: logged(redis, keys, "sync-returned:"), timeout=30)
        count = 'supersede_executor_cancel_stage_seconds_count{stage="stopped"} 1.0'
        body = await scrape_when(f"http://127.0.0.1:{port}/metrics", lambda b: count in b)
        [total] = re.findall(r'cancel_stage_seconds_sum\{stage="stopped"\} (\S+)', body)
        assert float(total) >= 2.0
    finally:
        system.close()


async def test_sigterm_under_load_starts_and_drains_everything_it_read(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A read in flight at SIGTERM is claimed and drained, not left to another's XAUTOCLAIM."""
    # 64 slots: at least one free per shard, so the executor waits in XREADGROUP BLOCK
    [executor] = await system.pipeline(redis, keys, 1, "--drain-timeout", "10", "--slots", "64")
    stop_publishing = asyncio.Event()
    duration = [0.05]  # runs published from the SIGTERM on last longer than the drain of others

    async def publisher() -> None:
        i = 0
        while not stop_publishing.is_set():
            await publish(redis, keys, "work.item", k=f"u{i}", sleep=duration[0])
            i += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(publisher())
    try:
        await eventually(lambda: logged(redis, keys, "started:", 30), timeout=30)
        duration[0] = 1.0
        await asyncio.sleep(0.02)
        executor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(executor.wait, 15) == 0
    finally:
        stop_publishing.set()
        await task
    assert await pending_count(redis, assignment_streams(keys), "executors") == 0
    counts = await states(redis, keys)
    assert counts["S"] >= 30 and counts["R"] == 0, counts


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("max_runs", "concurrency.max_runs"),
        ("strategy", "concurrency.limit_strategy"),
        ("cel", "concurrency.expression"),
        ("cycle", "steps[0].parents"),
    ],
)
def test_a_bad_definition_stops_the_start_naming_the_field(
    redis_url: str, keys: Keys, kind: str, field: str
) -> None:
    env = {**os.environ, "SUPERSEDE_REDIS_URL": redis_url, "SUPERSEDE_NAMESPACE": keys.namespace,
           "SUPERSEDE_TEST_BAD": kind}  # fmt: skip
    proc = subprocess.run(
        [*CLI, "executor", "tests.support.apps.bad", "--metrics-port", "0"],
        env=env, capture_output=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"{field}:".encode() in proc.stderr


async def test_an_executor_whose_workflow_version_is_taken_stops_naming_version(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    other = {"id": "bad", "version": "v1", "events": ["x"], "steps": [{"name": "other"}]}
    await register(redis, keys, other)
    env = {**os.environ, "SUPERSEDE_REDIS_URL": redis_url, "SUPERSEDE_NAMESPACE": keys.namespace,
           "SUPERSEDE_SHARDS": str(keys.shards), "SUPERSEDE_TEST_BAD": "version"}  # fmt: skip
    proc = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "executor", "tests.support.apps.bad", "--metrics-port", "0"],
        env=env, capture_output=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    assert b"version: 'v1' of workflow 'bad' is already registered" in proc.stderr
    assert b"Traceback" not in proc.stderr
    assert (await load_all(redis, keys))[1]["bad"].steps[0].name == "other"


async def test_a_handler_that_ignores_the_cancel_is_reported_cancelled_after_the_grace(
    redis: Redis, keys: Keys, system: System
) -> None:
    await system.pipeline(redis, keys, 1, "--grace", "0.5")
    await publish(redis, keys, "stubborn.item", k="a", sleep=30)
    await eventually(lambda: logged(redis, keys, "started:"), timeout=30)
    await publish(redis, keys, "stubborn.item", k="a", sleep=0)
    # the newer run succeeds and the older one is CANCELLED long before its handler returns
    await eventually(lambda: _states(redis, keys, {"C": 1, "S": 1}), timeout=20)
    assert not await logged(redis, keys, "stubborn-finished:", 2)


async def test_an_executor_reads_no_more_assignments_than_its_free_slots(
    redis: Redis, keys: Keys, system: System
) -> None:
    await system.pipeline(redis, keys, 1, "--slots", "2")
    for i in range(6):
        await publish(redis, keys, "work.item", i=i, sleep=30)
    await eventually(lambda: logged(redis, keys, "started:", 2), timeout=30)

    async def all_assigned() -> bool:
        return sum([await redis.xlen(s) for s in assignment_streams(keys)]) == 6

    await eventually(all_assigned, timeout=30)
    # A negative can only be shown by giving it the chance: half a second of idle fetching.
    await asyncio.sleep(0.5)
    delivered = 0
    for sk in keys.all_shards():
        for g in await redis.xinfo_groups(sk.assignments_stream("work")):
            delivered += int(g["entries-read"] or 0)
    pending_assignments = sum([await redis.xlen(s) for s in assignment_streams(keys)])
    assert pending_assignments == 6
    assert delivered == 2
    assert sum(1 for x in await log(redis, keys) if x.startswith("started:")) == 2


async def test_a_step_timeout_or_an_unpackable_output_fails_the_run(
    redis: Redis, keys: Keys, system: System
) -> None:
    await system.pipeline(redis, keys, 1)
    await publish(redis, keys, "timeout.item")
    await publish(redis, keys, "sync.timeout.item")
    await publish(redis, keys, "unpackable.item")
    await eventually(lambda: _states(redis, keys, {"F": 3}), timeout=30)
    errors = {r["w"]: str(r["err"]) for r in (await records(redis, keys)).values()}
    # a sync step that raises a TimeoutError of its own (a socket's) failed with it, not with
    # its step timeout's "timed out after 0.2s" and the executor's frames
    await publish(redis, keys, "sync.timeout.item", **{"raise": 1})
    await eventually(lambda: _states(redis, keys, {"F": 4}), timeout=30)
    sync = [str(r["err"]) for r in (await records(redis, keys)).values()]
    [own] = [e for e in sync if "a socket's own timeout" in e]
    assert "TimeoutError: a socket's own timeout" in own and "timed out after" not in own, own
    assert "in waits_past_its_timeout" in own, own  # (its frame: asyncio made a new one)
    assert "can not serialize 'object' object" in errors["unpackable"]
    # A timeout says where the step was when it passed, from the step's own frame (it was the
    # executor's traceback, which raised it: `_timed`, `_call`, `_try_step`)
    for workflow, step, line in [
        ("timeouts", "too_slow", "await asyncio.sleep(5)"),
        ("sync-timeouts", "waits_past_its_timeout", "time.sleep(0.01)"),
    ]:
        err = errors[workflow]
        assert f"step {step!r} timed out after 0.2s" in err, err
        frames = [x for x in err.splitlines() if x.lstrip().startswith("File ")]
        assert frames and "apps/demo.py" in frames[0] and step in frames[0], err
        assert line in err and "services/executor" not in err, err


async def _hostile_system(redis: Redis, keys: Keys, system: System) -> subprocess.Popen[bytes]:
    """Admission, an executor of tests.support.apps.hostile, then ingress once it registered
    its workflows; the executor."""
    system.start("admission", "--block-ms", "100")
    executor = system.start("executor", "tests.support.apps.hostile")

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == 5

    await eventually(registered, timeout=30)
    system.start("ingress", "--block-ms", "100")
    return executor


async def test_a_step_raising_any_base_exception_fails_its_run_alone(
    redis: Redis, keys: Keys, system: System
) -> None:
    """SystemExit, KeyboardInterrupt, GeneratorExit or a user's BaseException subclass raised
    by a step (async, or sync in its thread) fails its run like any exception; an output msgpack
    packs but Python cannot read back fails it too. Before, the first stopped the executor (and
    every run it held) and the last left the run RUNNING for good, its slot held; the output
    succeeded, and every reader of the run raised."""
    executor = await _hostile_system(redis, keys, system)
    kinds = ["base", "exit", "interrupt", "generator-exit", "tuple-key"]
    for kind in kinds:
        await publish(redis, keys, "hostile.item", kind=kind)
    for kind in kinds[:3]:
        await publish(redis, keys, "hostile-sync.item", kind=kind)
        await publish(redis, keys, "hostile-timed.item", kind=kind)
    await eventually(lambda: _states(redis, keys, {"F": 11}), timeout=30)
    errors = sorted(str(r["err"]) for r in (await records(redis, keys)).values())
    for name in ("NotAnException", "SystemExit", "KeyboardInterrupt", "GeneratorExit"):
        assert any(name in e for e in errors), (name, errors)
    assert any("cannot be read back" in e for e in errors), errors
    await publish(redis, keys, "hostile.item", kind="fine")  # the executor serves on
    await eventually(lambda: _states(redis, keys, {"F": 11, "S": 1}), timeout=30)
    assert executor.poll() is None


async def test_an_on_cancel_hook_raising_system_exit_or_keyboard_interrupt_is_its_failure(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A SystemExit or KeyboardInterrupt raised by an on_cancel hook (async or sync) stopped
    the executor with every run it held, saying only "executor stopped" (a probe: exit 4; the
    cancelled run CANCELLING until its lease ran out, healthy runs ASSIGNED). It is the hook's
    failure now, logged, and the executor serves on."""
    executor = await _hostile_system(redis, keys, system)
    for event in ("hostile-hook.item", "hostile-sync-hook.item"):
        for kind in ("exit", "interrupt"):
            await publish(redis, keys, event, kind=kind)
    await eventually(lambda: _states(redis, keys, {"R": 4}), timeout=30)
    for rid in await records(redis, keys):
        assert await client.cancel(redis, rid, namespace=keys.namespace)
    await eventually(lambda: _states(redis, keys, {"C": 4}), timeout=30)
    await publish(redis, keys, "hostile.item", kind="fine")  # the executor serves on
    await eventually(lambda: _states(redis, keys, {"C": 4, "S": 1}), timeout=30)
    assert executor.poll() is None


async def test_a_step_raising_cancelled_error_by_itself_fails_its_run(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Not taken for a shutdown (which leaves the run to its lease, to run again): the run
    fails at once with the reason and where the step raised it (the error had no location: a
    review), and the executor goes on."""
    await system.pipeline(redis, keys, 1)
    await publish(redis, keys, "selfcancel.item")
    await eventually(lambda: _states(redis, keys, {"F": 1}), timeout=30)
    (rec,) = (await records(redis, keys)).values()
    assert "raised CancelledError, and neither its run was cancelled" in str(rec["err"])
    assert "in awaits_a_cancelled_future" in str(rec["err"]), rec["err"]
    assert rec["a"] == 1
    await publish(redis, keys, "timeout.item")
    await eventually(lambda: _states(redis, keys, {"F": 2}), timeout=30)


async def test_executor_metrics_are_served(redis: Redis, redis_url: str, keys: Keys) -> None:
    from supersede.server import free_port
    from tests.support import scrape_when

    system = System(redis_url, keys)
    port = free_port()
    try:
        system.start("admission", "--block-ms", "100")
        cmd = [sys.executable, "-m", "supersede", "executor", APP, "--metrics-port", str(port)]
        system.procs.append(subprocess.Popen(cmd, env=system.env, stderr=subprocess.DEVNULL))

        async def registered() -> bool:
            return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

        await eventually(registered, timeout=30)
        system.start("ingress", "--block-ms", "100")
        await publish(redis, keys, "work.item")
        await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
        finished = 'supersede_executor_runs_finished_total{outcome="succeeded",workflow="work"} 1.0'
        body = await scrape_when(f"http://127.0.0.1:{port}/metrics", lambda b: finished in b)
        assert "supersede_executor_queue_wait_seconds_count 1.0" in body
        # (its namespace: the alerts tell one deployment's readiness from another's)
        ready = f'supersede_ready{{service="executor",supersede_namespace="{keys.namespace}"}} 1.0'
        assert ready in body
        assert "supersede_executor_slots 10.0" in body
        # each of its workflows' outcomes at 0 from the start: a first failure showed as a new
        # series at 1, which increase() misses (SupersedeRunsFailing; an observability probe)
        assert (
            'supersede_executor_runs_finished_total{outcome="failed",workflow="work"} 0.0' in body
        )
    finally:
        system.close()


async def test_assignments_a_dead_executor_read_but_never_claimed_are_taken_over(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    system = System(redis_url, keys)
    try:
        system.start("admission", "--block-ms", "100")
        victim = system.start("executor", APP)

        async def registered() -> bool:
            return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

        await eventually(registered, timeout=30)
        victim.kill()  # only its registration was needed
        victim.wait(5)
        system.start("ingress", "--block-ms", "100")
        for i in range(4):
            await publish(redis, keys, "work.item", i=i)

        async def assigned() -> bool:
            return sum([await redis.xlen(s) for s in assignment_streams(keys)]) == 4

        await eventually(assigned, timeout=30)
        for stream in assignment_streams(keys):  # a "dead executor" reads them, never claims
            await redis.xreadgroup("executors", "ghost", {stream: ">"})
        system.start("executor", APP, "--claim-idle-ms", "200")
        await eventually(lambda: _states(redis, keys, {"S": 4}), timeout=30)
    finally:
        system.close()


async def test_the_heartbeat_stops_a_run_whose_cancel_message_was_missed(
    redis: Redis, keys: Keys, system: System
) -> None:
    from supersede import codec

    await system.pipeline(redis, keys, 1, "--lease", "1.5")
    await publish(redis, keys, "chat.message", userId="u9", sleep=30)
    await eventually(lambda: logged(redis, keys, "started:"), timeout=30)
    [(rid, rec)] = (await records(redis, keys)).items()
    # Decide a cancel the way the scripts do, but write no control message (a "missed" one).
    shard = int(rid.split("-")[0])
    rec.update({"st": "X", "why": "manual"})
    await redis.hset(keys.shard(shard).runs_hash, rid, codec.pack(rec))
    await eventually(lambda: logged(redis, keys, f"cancelled:{rid}"), timeout=15)
    await eventually(lambda: _states(redis, keys, {"C": 1}), timeout=10)


async def test_a_burst_of_runs_ending_together_is_reported_without_loss(
    redis: Redis, keys: Keys, system: System
) -> None:
    # 150 slots finishing at once once needed 150 connections and lost results past the
    # pool's limit; every run must end at its first attempt.
    await system.pipeline(redis, keys, 1, "--slots", "150")
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(300):
            pipe.xadd(keys.events_stream, {"name": "work.item", "data": orjson.dumps({"i": i})})
        await pipe.execute()
    await eventually(lambda: _all(redis, keys, 300, "S"), timeout=60)
    assert {r["a"] for r in (await records(redis, keys)).values()} == {1}


async def test_assignments_read_by_a_failed_claim_are_read_again_at_once(
    redis: Redis, redis_url: str, keys: Keys, system: System
) -> None:
    """Claims fail (the executor's user loses the right to run scripts, a stand-in for a
    failover that writes nothing): the assignments stay pending for this executor, which reads
    them again from '0' after each failure, so the run starts as soon as the cause is gone,
    not after the 30 s XAUTOCLAIM idle time."""
    user = f"exec-{keys.namespace}"
    await redis.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all")
    executor_system = System(redis_url.replace("redis://", f"redis://{user}:pw@"), keys)
    try:
        system.start("admission", "--block-ms", "100")
        # (slots for every assignment stream: the blocking XREADGROUP reads them, then the
        # claim fails; with fewer, the take script's call fails before it reads anything)
        executor_system.start("executor", APP, "--slots", str(keys.shards * APP_WORKFLOWS))

        async def registered() -> bool:
            return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

        await eventually(registered, timeout=30)
        system.start("ingress", "--block-ms", "100")
        await redis.execute_command("ACL", "SETUSER", user, "-evalsha", "-eval")
        await publish(redis, keys, "work.item")

        async def assignment_pending() -> bool:
            return await pending_count(redis, assignment_streams(keys), "executors") == 1

        await eventually(assignment_pending, timeout=30)
        await asyncio.sleep(1.0)  # a few failed claims
        assert not await logged(redis, keys, "started:")
        await redis.execute_command("ACL", "SETUSER", user, "+@all")
        await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=15)
    finally:
        executor_system.close()
        await redis.execute_command("ACL", "DELUSER", user)


async def test_a_backlog_is_worked_through_without_waiting_out_a_blocking_read(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Fewer slots than shards: the executor scans shard by shard and waits on an XREAD only
    for entries newer than the tails it read. With reads that would block for a minute, a
    backlog of short runs (spanning several periodic re-reads of its own pending entries)
    must still finish with no wait in between."""
    await system.pipeline(redis, keys, 1, "--slots", "1", "--block-ms", "60000")
    for i in range(60):
        await publish(redis, keys, "work.item", k=f"u{i}", sleep=0.05)
    await eventually(lambda: _states(redis, keys, {"S": 60}), timeout=30)


async def test_a_malformed_assignment_is_acknowledged_and_the_next_one_runs(
    redis: Redis, keys: Keys, system: System
) -> None:
    await system.pipeline(redis, keys, 1)
    for stream in assignment_streams(keys):
        await redis.xadd(stream, {"garbage": "1"})
    await publish(redis, keys, "work.item")
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)

    async def all_acked() -> bool:
        return await pending_count(redis, assignment_streams(keys), "executors") == 0

    await eventually(all_acked, timeout=10)


async def _burst(redis: Redis, keys: Keys, n: int) -> None:
    """`n` short runs, published in bursts of three (some wake-ups, some backlog)."""
    for i in range(n):
        await publish(redis, keys, "work.item", k=f"u{i}")
        if i % 3 == 0:
            await asyncio.sleep(0.01)


async def test_a_busy_executor_scans_without_reading_the_tails(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Fewer slots than streams, so the executor scans, and waits on an XREAD from ids it
    keeps. It read every stream's tail before nearly every scan (8.6% of its CPU under load);
    now the ids move on with the entries it reads, so a burst costs no tail read after the
    first."""
    await system.pipeline(redis, keys, 1, "--slots", "2")
    await publish(redis, keys, "work.item", k="warm")
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
    await redis.config_resetstat()
    await _burst(redis, keys, 150)
    await eventually(lambda: _states(redis, keys, {"S": 151}), timeout=30)
    stats = await redis.info("commandstats")
    tails = int(stats.get("cmdstat_xrevrange", {}).get("calls", 0))
    streams = keys.shards * APP_WORKFLOWS  # (the old code: one read of all per scan, 50+)
    assert tails <= 2 * streams, (tails, streams)


async def test_an_executor_waits_on_bells_not_on_a_read_over_every_stream(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Fewer slots than streams: the executor waited on an XREAD over every stream it reads,
    which the server ran again over all of them at each new entry, for every executor, so each
    workflow and shard made every run dearer (at 41 workflows the server's CPU per event was
    2.2x that at one). Now the scripts that write an assignment ring the stream's bell, and the
    waits are for bells: events one at a time, each ending a wait, cost no XREAD."""
    await system.pipeline(redis, keys, 1, "--slots", "2")
    await publish(redis, keys, "work.item", k="warm")
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
    await redis.config_resetstat()
    for i in range(20):
        await publish(redis, keys, "work.item", k=f"u{i}")
        await eventually(lambda n=i + 2: _states(redis, keys, {"S": n}), timeout=30)
    stats = await redis.info("commandstats")
    reads = int(stats.get("cmdstat_xread", {}).get("calls", 0))
    bells = int(stats.get("cmdstat_spublish", {}).get("calls", 0))
    assert reads < 5, reads  # (the old code: one or more per event)
    assert bells >= 20, bells


@contextlib.asynccontextmanager
async def _silent_admission(
    redis: Redis, redis_url: str, keys: Keys, system: System, *executor_args: str
) -> AsyncIterator[None]:
    """Admission under a user without the bells' channel right (one an earlier `supersede acl`
    made: its scripts cannot ring, and write the assignments all the same), an executor of
    `executor_args` under the test's own user, and ingress once the workflows are registered."""
    user = f"{keys.namespace}-silent-admission"
    rights = [r for r in acl.rules(keys.namespace, "admission") if not r.startswith("&")]
    await redis.execute_command("ACL", "SETUSER", user, *rights, ">silent-pw")
    scheme, _, rest = redis_url.partition("://")
    silent = System(f"{scheme}://{user}:silent-pw@{rest}", keys)
    try:
        silent.start("admission", "--block-ms", "100", "--reap-interval", "0.1")
        system.start("executor", APP, *executor_args)

        async def registered() -> bool:
            return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

        await eventually(registered, timeout=30)
        system.start("ingress", "--block-ms", "100")
        yield
    finally:
        silent.close()
        await redis.execute_command("ACL", "DELUSER", user)


async def test_an_entry_no_bell_announced_is_read_within_a_wait_while_other_bells_ring(
    redis: Redis, redis_url: str, keys: Keys, system: System
) -> None:
    """Admission under a user without the channel right (one an earlier `supersede acl` made):
    its scripts cannot ring, and write the assignments all the same. While another stream's
    bell rang every 0.1 s, no wait of the executor timed out, so it never read the entries
    nobody announced (it read every stream only after a wait that timed out). Every stream is
    now read once in each --block-ms, whatever the bells do."""
    async with _silent_admission(redis, redis_url, keys, system, "--slots", "2",
                                 "--block-ms", "2000"):  # fmt: skip
        other = keys.shard(0).assignments_stream("chat-reply")

        async def ring() -> None:
            while True:
                await redis.execute_command("SPUBLISH", other, "")
                await asyncio.sleep(0.1)

        ringer = asyncio.create_task(ring())
        try:
            for i in range(3):
                await publish(redis, keys, "work.item", k=f"quiet-{i}")
            await eventually(lambda: _states(redis, keys, {"S": 3}), timeout=10)
        finally:
            ringer.cancel()


async def test_an_executor_under_an_admission_that_never_rings_keeps_its_blocking_reads(
    redis: Redis, redis_url: str, keys: Keys, system: System
) -> None:
    """Admission that rings no bell (a build before them in a rolling upgrade, or a user an
    earlier `supersede acl` made): the executor waited for bells that never came, and each run
    started only at the scan after a timed-out wait, up to --block-ms late (1 s by default;
    a black-box upgrade measured p50 490 ms, max 1.2 s). It now waits on bells only once it
    has heard one; until then its blocking reads start each run at once."""
    async with _silent_admission(redis, redis_url, keys, system, "--slots", "2",
                                 "--block-ms", "5000"):  # fmt: skip
        await publish(redis, keys, "work.item", k="warm")
        await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
        for i in range(4):  # (one at a time: each one's wait began before it came)
            published = time.monotonic()
            await publish(redis, keys, "work.item", k=f"silent-{i}")
            await eventually(lambda n=i + 2: _states(redis, keys, {"S": n}), timeout=30)
            assert time.monotonic() - published < 2.5  # (the old code: the 5 s wait first)


async def test_an_entry_no_bell_announced_puts_an_executor_hearing_bells_back_on_blocking_reads(
    redis: Redis, redis_url: str, keys: Keys, system: System
) -> None:
    """Executors upgraded before admission in a rolling upgrade hear bells (their own finish
    calls ring when they assign a group's next run; here another stream's bell every 0.1 s)
    while the old admission writes without ringing: each of its runs waited for the scan each
    --block-ms (10 s here). An entry without the mark of a bell now puts the executor back on
    its blocking reads for a minute: after the first, each run starts at once."""
    async with _silent_admission(redis, redis_url, keys, system, "--slots", "2",
                                 "--block-ms", "10000"):  # fmt: skip
        other = keys.shard(0).assignments_stream("chat-reply")
        heard = 0

        async def ring() -> None:
            nonlocal heard
            while True:
                heard += await redis.execute_command("SPUBLISH", other, "")
                await asyncio.sleep(0.1)

        async def rang() -> bool:
            return heard >= 3  # (the executor heard bells: its waits are for bells now)

        ringer = asyncio.create_task(ring())
        try:
            await eventually(rang, timeout=30)
            await publish(redis, keys, "work.item", k="first")  # (found by a scan: up to 10 s)
            await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
            for i in range(4):
                published = time.monotonic()
                await publish(redis, keys, "work.item", k=f"unrung-{i}")
                await eventually(lambda n=i + 2: _states(redis, keys, {"S": n}), timeout=30)
                assert time.monotonic() - published < 2.5  # (the old code: the next scan)
        finally:
            ringer.cancel()


async def test_an_executor_subscribes_again_when_its_bells_are_cut(
    redis: Redis, keys: Keys, system: System
) -> None:
    """The bells' connection killed: the executor subscribes again and reads every stream
    once, so runs assigned meanwhile start at once, not after a minute's wait."""
    await system.pipeline(redis, keys, 1, "--slots", "2", "--block-ms", "60000")
    await publish(redis, keys, "work.item", k="warm")
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)

    async def subscribed() -> bool:
        return bool(await redis.execute_command("CLIENT", "LIST", "TYPE", "pubsub"))

    for round_ in range(3):
        await eventually(subscribed, timeout=15)  # (again, after the last round's cut)
        killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert killed >= 1
        for i in range(3):
            await publish(redis, keys, "work.item", k=f"r{round_}-{i}")
        await eventually(lambda n=1 + 3 * (round_ + 1): _states(redis, keys, {"S": n}), timeout=15)


class _Monitor:
    """MONITOR in a task: each command line to `seen` (its words and who sent it: 'lua' or
    'tcp'), from the moment `start` returns (it waits until MONITOR sees a marker)."""

    def __init__(self, redis: Redis, seen: Callable[[list[str], str], None]) -> None:
        self.redis, self.seen, self.ready = redis, seen, asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        async with self.redis.monitor() as monitor:
            async for cmd in monitor.listen():
                words = cmd["command"].split()
                if words[:2] == ["GET", "monitor-ready"]:
                    self.ready.set()
                elif words:
                    self.seen(words, cmd["client_type"])

    async def start(self) -> None:
        self.task = asyncio.create_task(self._watch())

        async def marked() -> bool:
            await self.redis.get("monitor-ready")
            return self.ready.is_set()

        await eventually(marked, timeout=10)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def test_a_busy_executor_reads_and_claims_in_one_call(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Fewer slots than streams, so the executor scans. Each scan read the new entries with an
    XREADGROUP and then claimed them with a second call; now one call (lua/take.lua) does
    both: MONITOR sees XREADGROUP of new entries ('>') only from inside a script."""
    await system.pipeline(redis, keys, 1, "--slots", "2")
    await publish(redis, keys, "work.item", k="warm")
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
    sent: list[str] = []  # XREADGROUP '>' commands, by who sent them: 'lua' or a client

    def seen(words: list[str], client: str) -> None:
        ours = any(":assignments:" in w for w in words)  # (not admission's reads)
        if ours and words[0].upper() == "XREADGROUP" and words[-1] == ">":
            sent.append(client)

    monitor = _Monitor(redis, seen)
    await monitor.start()
    try:
        await _burst(redis, keys, 60)
        await eventually(lambda: _states(redis, keys, {"S": 61}), timeout=30)
    finally:
        await monitor.stop()
    assert sent.count("lua") > 0
    assert sent.count("tcp") == 0, sent.count("tcp")  # (the old code: one per scan, 30+)


async def test_runs_an_executor_applied_are_confirmed_by_turn_not_asked_about_one_by_one(
    redis: Redis, keys: Keys, system: System
) -> None:
    """An executor applies its results itself; each finish call sets its turn key, and one
    read of it confirms every run of that turn. The heartbeat, every sixth of a (1 s) lease,
    used to ask about each run once more after it ended (a few µs of server CPU per run):
    MONITOR sees almost no short run in a heartbeat call now. A long run (1.5 s, in every
    beat while it runs) shows the heartbeat is watched."""
    import hashlib

    from supersede.scripts import load_source

    sha = hashlib.sha1(load_source("heartbeat")[0].encode()).hexdigest()
    await system.pipeline(redis, keys, 1, "--lease", "1")
    await publish(redis, keys, "work.item", k="warm")
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
    asked: Counter[str] = Counter()  # run id -> heartbeat calls that named it

    def seen(words: list[str], client: str) -> None:
        if len(words) > 8 and words[0].upper() == "EVALSHA" and words[1] == sha:
            # (EVALSHA, sha, 2, the 2 keys, now, executor, lease, then run id, attempt pairs)
            asked.update(words[8::2])

    monitor = _Monitor(redis, seen)
    await monitor.start()
    try:
        long_event = await publish(redis, keys, "work.item", sleep=1.5)
        await _burst(redis, keys, 60)
        await eventually(lambda: _states(redis, keys, {"S": 62}), timeout=30)
        await asyncio.sleep(1.0)  # three more beats, for the old code to ask about the last
    finally:
        await monitor.stop()
    recs = await records(redis, keys)
    [long_run] = [rid for rid, r in recs.items() if r["ev"] == long_event]
    assert asked[long_run] >= 2  # the heartbeat was seen: it renewed the long run
    short = sum(n for rid, n in asked.items() if rid != long_run)
    # (the old code: each of the 60 short runs at least once; runs still running at a beat
    # are named, more of them on a loaded machine: 20 on a CI run beside a probe)
    assert short < 35, short


async def test_a_turn_the_server_lost_is_not_confirmed_and_its_runs_keep_their_leases(
    redis_url: str, redis: Redis, keys: Keys
) -> None:
    """The lease keeper drops a reported run without asking the heartbeat only when its turn
    lies in its shard's turn key range. A turn the server lost lies in none: before it (the
    range starts after it, as the next turn starts a new range), after it (a failover lost
    the call), or gone (a crash lost the key). Those runs go to the heartbeat, which renews
    their leases while their records say RUNNING here, so the executor writes them again."""
    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.lease import LeaseKeeper

    shard = 1
    sk = keys.shard(shard)
    leased = [(shard, "1-kept", 1, 5), (shard, "1-before", 1, 3), (shard, "1-after", 1, 9)]
    runner: Any = type("R", (), {"active": {}, "leased": lambda self: list(leased),
                                 "mark_renewed": lambda self, began: None,
                                 "mark_leased": lambda self, runs, asked, gone: None,
                                 })()  # fmt: skip
    named: list[tuple[str, int]] = []
    keeper = LeaseKeeper(redis_url, keys, "ex-1", ExecutorConfig(lease_ms=3_000), runner,
                         lambda rid, attempt: named.append((rid, attempt)))  # fmt: skip
    keeper._loop = asyncio.get_running_loop()
    for _, rid, _, _ in leased:  # as a lost finish write leaves them
        record = {"st": "R", "a": 1, "e": "ex-1", "w": "wf", "g": "g", "s": "0" * 32}
        await redis.hset(sk.runs_hash, rid, codec.pack(record))
    await redis.set(sk.turn_string("ex-1"), "4|6")  # turns 4 to 6 are there; 3 and 9 are not
    try:
        await asyncio.to_thread(keeper.beat)
        await eventually(lambda: _true(named), timeout=5)
        assert named == [("1-kept", 1)]
        leases = dict(await redis.zrange(sk.leases_zset, 0, -1, withscores=True))
        assert set(leases) == {b"1-before", b"1-after"}  # renewed by the heartbeat
        await redis.delete(sk.turn_string("ex-1"))  # a crash lost the key itself
        leased[:] = leased[1:]
        await redis.delete(sk.leases_zset)
        await asyncio.to_thread(keeper.beat)
        await eventually(lambda: _renewed(redis, sk.leases_zset, 2), timeout=5)
        assert named == [("1-kept", 1)]  # (any callback of the beat has run: the loop polled)
    finally:
        keeper._client.close()


async def test_a_failed_beat_is_tried_again_a_quarter_interval_after_it(
    redis_url: str, keys: Keys
) -> None:
    """Beats come a sixth of a lease apart. A failed one was tried again only a whole interval
    after it began, so an outage of under half a lease (a server restart whose AOF took a second
    to load, in a chaos run) could fail two beats, and the next came as the leases ran out: the
    watch stopped 15 runs, retried elsewhere. A failed beat is tried again a quarter interval
    after it ended; after one that went through, the next comes a whole interval later."""
    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.lease import LeaseKeeper

    runner: Any = type("R", (), {"active": {}, "leased": lambda self: [],
                                 "mark_renewed": lambda self, began: None})()  # fmt: skip
    keeper = LeaseKeeper(redis_url, keys, "ex-1", ExecutorConfig(lease_ms=3_000), runner,
                         lambda rid, attempt: None)  # fmt: skip
    beats: list[float] = []

    def beat() -> bool:
        beats.append(time.monotonic())
        if len(beats) <= 3:  # (the server is down for three beats)
            raise ConnectionError("Connection refused")
        return True

    keeper.beat = beat  # type: ignore[method-assign]
    thread = asyncio.ensure_future(asyncio.to_thread(keeper._run))
    try:
        await eventually(lambda: _at_least(beats, 5), timeout=10)
    finally:
        keeper._halt.set()
        keeper._soon.set()
        await thread
        keeper._client.close()
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert all(gap < 0.4 for gap in gaps[:3]), gaps  # (a quarter interval: 0.125 s)
    assert gaps[3] >= 0.45, gaps  # (a whole interval, a sixth of the lease, after it)


async def test_a_server_paused_for_two_thirds_of_a_lease_runs_no_run_twice(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A server that answers nothing for 0.65 of a lease (CLIENT PAUSE here; a slow fork or
    disk, a failover's pause), from just before a beat was due: with beats a third of a lease
    apart, a run's last renewal was a third of a lease old when the pause began, the watch's
    deadline (0.9 of a lease after it) passed before the pause ended, and every run was stopped
    and run again (the README promised half a lease; a probe: 44 of 195 runs at 0.6 to 0.85).
    Beats come a sixth of a lease apart: the renewal before the pause carries each run through.
    """
    lease = 4.0
    await system.pipeline(redis, keys, 1, "--lease", str(lease), "--slots", "5")
    for i in range(4):
        await publish(redis, keys, "work.item", i=i, sleep=2 * lease)
    await eventually(lambda: logged(redis, keys, "started:", 4), timeout=30)

    async def scores() -> dict[bytes, float]:
        out: dict[bytes, float] = {}
        for sk in keys.all_shards():
            out.update(await redis.zrange(sk.leases_zset, 0, -1, withscores=True))
        return out

    claimed = await scores()
    await eventually(lambda: _beat_after(scores, claimed), timeout=10)
    beat = time.monotonic()  # (a beat was just answered; the previous geometry's next is due
    # a third of a lease after it, the new one's came a sixth after it)
    await asyncio.sleep(max(0.0, beat + lease / 3 - 0.05 - time.monotonic()))
    await redis.execute_command("CLIENT", "PAUSE", int(0.65 * lease * 1000), "ALL")
    await eventually(lambda: logged(redis, keys, "done:", 4), timeout=30)
    await eventually(lambda: _all(redis, keys, 4, "S"), timeout=30)
    assert {r["a"] for r in (await records(redis, keys)).values()} == {1}
    assert sum(1 for x in await log(redis, keys) if x.startswith("started:")) == 4


async def _beat_after(
    scores: Callable[[], Awaitable[dict[bytes, float]]], before: dict[bytes, float]
) -> bool:
    now = await scores()
    return any(now.get(rid, 0) > score for rid, score in before.items())


async def _at_least(items: list[Any], n: int) -> bool:
    return len(items) >= n


async def test_a_beat_counts_a_cancelling_run_it_renewed_as_renewed(
    redis_url: str, redis: Redis, keys: Keys
) -> None:
    """The heartbeat renews a CANCELLING run's lease (its strict slot stays held while the
    handler winds down) and names it to stop. Left unstamped because it was named, the watch
    stopped it a lease later, and it was reported CANCELLED while a sync step that ignores
    `ctx.cancelled` still ran, its slot refilled beside it (a review)."""
    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.lease import LeaseKeeper

    shard = 2
    sk = keys.shard(shard)
    stamped: list[tuple[list[tuple[str, int]], set[str]]] = []
    runner: Any = type("R", (), {"active": {}, "leased": lambda self: [(shard, "2-x", 1, 0)],
                                 "mark_renewed": lambda self, began: None,
                                 "mark_leased": lambda self, runs, asked, gone:
                                     stamped.append((list(runs), set(gone)))})()  # fmt: skip
    keeper = LeaseKeeper(redis_url, keys, "ex-1", ExecutorConfig(lease_ms=3_000), runner,
                         lambda rid, attempt: None)  # fmt: skip
    keeper._loop = asyncio.get_running_loop()
    record = {"st": "X", "a": 1, "e": "ex-1", "w": "wf", "g": "g", "s": "0" * 32}
    await redis.hset(sk.runs_hash, "2-x", codec.pack(record))
    try:
        await asyncio.to_thread(keeper.beat)
    finally:
        keeper._client.close()
    assert await redis.zscore(sk.leases_zset, "2-x") is not None  # (the server renewed it)
    assert stamped == [([("2-x", 1)], {"2-x"})]


async def test_a_run_its_node_renews_is_current_while_another_node_is_down(
    redis_url: str, redis: Redis, keys: Keys
) -> None:
    """`ctx.still_current()` counted every run's lease from the last beat whose every call
    went through. On a cluster with one node down for a lease, the runs of the other nodes'
    shards, renewed by every beat, were then not current (a step that asks before it writes
    skipped its write, and its run SUCCEEDED). Each run counts from its own stamp now: a run
    whose shard's renewals fail is not current once its lease may have lapsed, the others
    stay current. (Shard 1's calls fail here, as its node's would.)"""
    from supersede import Concurrency, Workflow
    from supersede.model import group_id
    from supersede.protocol import pack_input
    from supersede.scripts import Claim
    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.lease import LeaseKeeper
    from supersede.services.executor.steps import Runner

    wf = Workflow("wf", on_events=["e"], concurrency=Concurrency("input.k"))

    @wf.step()
    async def wait(ctx: Any) -> None:
        await asyncio.sleep(30)

    async def fences(shard: int, group: str) -> bytes | None:
        raw = await redis.hget(keys.shard(shard).fences_hash, group)
        return None if raw is None else codec.blob(raw)

    config = ExecutorConfig(lease_ms=1_000)
    runner = Runner([wf], config, outbox=None, fences=fences)
    keeper = LeaseKeeper(redis_url, keys, "ex-1", config, runner, lambda rid, attempt: None)
    keeper._loop = asyncio.get_running_loop()
    down = keys.shard(1).runs_hash
    renew = keeper._renew

    def renew_but_shard_1(calls: list[Any], late: Any = None) -> list[Any]:
        up = iter(renew([c for c in calls if c[0][0] != down]))
        return [ConnectionError("node down") if c[0][0] == down else next(up) for c in calls]

    keeper._renew = renew_but_shard_1  # type: ignore[method-assign]
    seq = f"{1:032x}"
    runs = {}
    for shard in (0, 1):
        rid, key = f"{shard}-1", f"k{shard}"
        record = {"st": "R", "a": 1, "e": "ex-1", "w": "wf", "g": "g", "s": seq}
        await redis.hset(keys.shard(shard).runs_hash, rid, codec.pack(record))
        await redis.hset(keys.shard(shard).fences_hash, group_id("wf", "v", key), seq)
        claim = Claim(rid, True, 1, "wf", "v", pack_input({"k": key}, {}, "e", rid), key, seq, "R")
        runs[shard] = runner.start(shard, claim)
    try:
        assert await runs[0].ctx.still_current() and await runs[1].ctx.still_current()
        until = time.monotonic() + 1.5  # (a lease and a half of beats, a third of one apart)
        while True:
            with contextlib.suppress(ConnectionError):
                await asyncio.to_thread(keeper.beat)
            if time.monotonic() > until:
                break  # (the last beat just now: a loaded host's pauses do not count)
            await asyncio.sleep(0.3)
        # (a beat that renewed some runs is not a failed one: the executor stays ready)
        assert runner.renewed_at is not None and time.monotonic() - runner.renewed_at < 1.0
        assert await runs[0].ctx.still_current()  # (renewed by each beat)
        assert not await runs[1].ctx.still_current()  # (its lease may have lapsed)
    finally:
        keeper._client.close()
        runner.close()


async def _renewed(redis: Redis, leases: str, n: int) -> bool:
    return int(await redis.zcard(leases)) == n


async def _true(items: list[Any]) -> bool:
    return bool(items)


async def test_executors_taking_turns_miss_no_wake_up(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Two executors with reads that would block for a minute take turns on a burst of short
    runs, so each one's wait starts from ids behind what the other took: none may wait out a
    read (every run ends well before)."""
    await system.pipeline(redis, keys, 2, "--slots", "2", "--block-ms", "60000")
    await _burst(redis, keys, 150)
    await eventually(lambda: _states(redis, keys, {"S": 150}), timeout=30)


async def test_executors_apply_their_results_without_the_results_stream(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Each executor applies its results with its own finish call: the runs end, the freed
    slots are filled (a limit of one per key, so every run but the first of a key waits for
    one), and nothing is written to a results stream (the old way wrote, read, acknowledged
    and trimmed one entry per run there: 8% of the server's CPU per run)."""
    await system.pipeline(redis, keys, 2, "--slots", "4")
    for i in range(30):
        await publish(redis, keys, "work.item", k=f"u{i % 3}", sleep=0.01)
    await eventually(lambda: _states(redis, keys, {"S": 30}), timeout=30)
    for sk in keys.all_shards():
        if await redis.exists(sk.results_stream):
            assert (await redis.xinfo_stream(sk.results_stream))["entries-added"] == 0


async def test_a_valid_assignment_behind_a_malformed_one_is_not_waited_past(
    redis: Redis, keys: Keys, system: System
) -> None:
    """An executor starts on streams that hold a malformed entry and then a valid assignment.
    With one slot its first scan reads only the malformed entry; the wait that would follow
    starts from the tails, past the valid one (reads that would block for a minute). It must
    scan again instead: the run ends well before a read would time out."""
    [first] = await system.pipeline(redis, keys, 1, "--slots", "1")
    await publish(redis, keys, "work.item", k="warm")
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
    first.kill()
    first.wait(10)
    for stream in assignment_streams(keys):
        await redis.xadd(stream, {"garbage": "1"})
    await publish(redis, keys, "work.item", k="behind")
    await eventually(lambda: _states(redis, keys, {"S": 1, "A": 1}), timeout=30)
    system.start("executor", APP, "--slots", "1", "--block-ms", "60000")
    await eventually(lambda: _states(redis, keys, {"S": 2}), timeout=20)


async def test_admission_says_how_long_no_executor_has_served_a_workflow(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A pool whose executors were all killed had no alert (the slots of another pool kept
    `SupersedeNoLiveExecutors` quiet, and a full pool starts nothing for long either): admission
    exports the seconds since an executor last said it serves each workflow."""
    import re

    from tests.support import scrape

    _, port = await system.serving("admission", "--block-ms", "100")
    [executor] = [system.start("executor", APP)]

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

    await eventually(registered, timeout=30)
    url = f"http://127.0.0.1:{port}/metrics"

    def unserved(body: str) -> float | None:
        pattern = r'^supersede_admission_workflow_unserved_seconds\{workflow="chat-reply"\} (\S+)$'
        found = re.search(pattern, body, re.MULTILINE)
        return float(found.group(1)) if found else None

    async def served_now() -> bool:
        seconds = unserved(await asyncio.to_thread(scrape, url))
        return seconds is not None and seconds < 3

    await eventually(served_now, timeout=30)
    executor.kill()
    executor.wait(10)

    async def unserved_for_a_while() -> bool:
        seconds = unserved(await asyncio.to_thread(scrape, url))
        return seconds is not None and seconds > 4

    await eventually(unserved_for_a_while, timeout=30)


LEDGER_MODULE = """
import asyncio, os, time
from supersede import Concurrency, Context, Workflow

LEDGER = os.environ["LEDGER"]


def note(*parts: object) -> None:
    with open(LEDGER, "a") as f:  # (a file: the server refuses writes in this test)
        f.write(" ".join(str(p) for p in parts) + f" {time.time():.6f}\\n")


async def hold(ctx: Context) -> None:
    note("start", ctx.run_id, ctx.attempt, os.getpid())
    try:
        end = time.monotonic() + (float(ctx.input["sleep"]) if ctx.attempt == 1 else 0)
        while time.monotonic() < end:
            note("alive", ctx.run_id, ctx.attempt, os.getpid())
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        note("stop", ctx.run_id, ctx.attempt, os.getpid())
        raise
    note("end", ctx.run_id, ctx.attempt, os.getpid())


def hold_on(ctx: Context) -> None:  # (a sync step that ignores ctx.cancelled)
    note("start", ctx.run_id, ctx.attempt, os.getpid())
    end = time.monotonic() + (float(ctx.input["sleep"]) if ctx.attempt == 1 else 0)
    while time.monotonic() < end:
        note("alive", ctx.run_id, ctx.attempt, os.getpid())
        time.sleep(0.05)
    note("end", ctx.run_id, ctx.attempt, os.getpid())


held = Workflow("held", on_events=["held.go"], concurrency=Concurrency("input.k"))
held.step()(hold)
held_proc = Workflow("held-proc", on_events=["held-proc.go"],
                     concurrency=Concurrency("input.k"), isolation="process")
held_proc.step()(hold_on)
held_free = Workflow("held-free", on_events=["held-free.go"])  # (no limit: no slot to free)
held_free.step()(hold)
"""


async def _ledgered_system(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Callable[[], list[list[str]]]]:
    """The services with an executor of LEDGER_MODULE at a 2 s lease and a second admission
    reaping every 0.1 s; the executor, and the ledger's lines read anew at each call."""
    module = tmp_path / "ledgered.py"
    module.write_text(LEDGER_MODULE)
    ledger = tmp_path / "ledger.txt"
    system.env["LEDGER"] = str(ledger)
    executor = await _system_with_module(redis, keys, system, module, "held-proc", "--lease", "2")
    system.start("admission", "--reap-interval", "0.1")  # (a second one: reaps every 0.1 s)

    def lines() -> list[list[str]]:
        return [x.split() for x in ledger.read_text().splitlines()] if ledger.exists() else []

    return executor, lines


@pytest.mark.parametrize("event", ["held.go", "held-proc.go"])
async def test_a_run_whose_lease_cannot_be_renewed_stops_before_it_runs_again_elsewhere(
    redis: Redis, keys: Keys, system: System, tmp_path: Path, event: str
) -> None:
    """A server that takes no write for longer than a lease (here `CLIENT PAUSE WRITE`; a
    probe's was at its maxmemory, which refused the renewals then): once it took them again
    the reaper, faster than the heartbeat, re-ran the runs whose handlers still ran on the
    executor that could not renew them: two handlers of one run at once for seconds, strict
    mode included (a probe). The executor now stops a run it could not renew before its lease
    runs out on the server, reports nothing, and the reaper retries it. A step in a worker
    process is killed at once (a cancel's ladder gave one that ignores `ctx.cancelled` the
    grace period, 5 s, past the lease)."""
    executor, lines = await _ledgered_system(redis, keys, system, tmp_path)

    def noted(kind: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return any(x[0] == kind for x in lines())

        return check

    await publish(redis, keys, event, k="a", sleep=30)
    await eventually(noted("start"), timeout=30)
    [rid] = list(await records(redis, keys))
    sk = keys.shard(int(rid.split("-")[0]))
    await redis.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")  # (reads are served)
    try:
        await asyncio.sleep(0.2)  # (a renewal sent just before the pause is in)
        lapses_ms = float(await redis.zscore(sk.leases_zset, rid))  # (renewed no more)
        await eventually(lambda: _past(lapses_ms + 300), timeout=10)
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
    first = [x for x in lines() if x[2] == "1"]
    second = [x for x in lines() if x[2] == "2"]
    assert first[0][0] == "start" and second[0][0] == "start" and second[-1][0] == "end"
    # attempt 1 stopped (its last sign of life) before its lease lapsed on the server
    assert float(first[-1][-1]) * 1000 < lapses_ms, (first[-3:], lapses_ms)
    assert float(first[-1][-1]) * 1000 > lapses_ms - 2000  # (not stopped for another reason)
    assert float(second[0][-1]) * 1000 > lapses_ms
    if event == "held.go":
        assert first[-1][0] == "stop"
    assert "leases not renewed in time" in await _stderr_after_sigterm(executor)


@pytest.mark.parametrize("event", ["held.go", "held-proc.go", "held-free.go"])
async def test_at_maxmemory_runs_keep_their_leases_and_their_results_wait(
    redis: Redis, keys: Keys, system: System, tmp_path: Path, event: str
) -> None:
    """At its maxmemory (noeviction) the server refused the lease renewals, but the reaper's
    and the claims' calls went through (a script's first write decides, and theirs free
    memory): each run was stopped, retried and stopped again a lease later, and FAILED of
    lease_expired once out of attempts; a result the server refused was dropped and its run
    ran again (a probe: 5 runs FAILED, 82 re-run in 4 minutes). Now the renewal goes through
    at maxmemory (lua/heartbeat.lua: allow-oom) and a result not written waits, renewed and
    put again, its run keeping its slot, until memory is freed: the run ends SUCCEEDED on its
    first attempt, its handler run once. (Here the handler, 3 s, outlasts the 2 s lease, and
    ends while the server is full. A limited workflow's finish call frees a slot first, so
    it goes through; an unlimited one's result waits.)"""
    executor, lines = await _ledgered_system(redis, keys, system, tmp_path)

    async def ended() -> bool:
        return any(x[0] == "end" for x in lines())

    await publish(redis, keys, event, k="a", sleep=3)
    await eventually(lambda: _states(redis, keys, {"R": 1}), timeout=30)
    await redis.config_set("maxmemory", 1)  # (noeviction: every write is refused)
    try:
        await eventually(ended, timeout=30)  # (3 s after its start: past a lease)
        [rid] = list(await records(redis, keys))  # (reads are served)
        sk = keys.shard(int(rid.split("-")[0]))
        waited = time.time() + 2.5  # (more than a lease on)
        await eventually(lambda: _past(waited * 1000), timeout=10)
        lease = await redis.zscore(sk.leases_zset, rid)
        if event == "held-free.go":  # (its result waits, its lease renewed)
            assert await _states(redis, keys, {"R": 1})
            assert lease is not None and lease > time.time() * 1000
        else:  # (the finish call went through)
            assert await _states(redis, keys, {"S": 1}) and lease is None
    finally:
        await redis.config_set("maxmemory", 0)
    await eventually(lambda: _states(redis, keys, {"S": 1}), timeout=30)
    kinds = {(x[0], x[2]) for x in lines()}
    assert kinds == {("start", "1"), ("alive", "1"), ("end", "1")}, kinds  # once, attempt 1
    [record] = (await records(redis, keys)).values()
    assert record["a"] == 1
    assert "leases not renewed in time" not in await _stderr_after_sigterm(executor)


async def test_slow_heartbeat_calls_stop_no_run_whose_lease_the_server_renewed(
    redis: Redis, redis_server: EmbeddedServer, keys: Keys, system: System, tmp_path: Path
) -> None:
    """On a loaded host each heartbeat call is slow, and a beat makes one per shard in turn.
    The watch counted every run from the start of the last beat that ended, and the next beat
    began a third of a lease after it ended: two slow beats took a run past 0.9 of its lease
    while the server had renewed it well within it, and healthy runs were stopped and run
    again (a probe: 3 s lease, two CPU hogs; 14 of 16 process-isolated runs FAILED after
    three stops). Here every call of the executor crosses a proxy that delays it: the runs'
    renewals are at most a beat apart on the server, and none is stopped."""
    proxy = FreezableProxy(redis_server.port, delay=0.12)
    runs = 24  # (distinct keys: the runs spread over every shard, a call each per beat)
    kinds = await _held_runs_behind(proxy, redis, keys, system, tmp_path, runs, sleep=6)
    shards = {int(rid.split("-")[0]) for rid in await records(redis, keys)}
    assert len(shards) == keys.shards  # (else fewer calls per beat than meant)
    assert kinds[("start", "1")] == runs and kinds[("end", "1")] == runs, kinds
    assert set(kinds) == {("start", "1"), ("alive", "1"), ("end", "1")}, kinds  # no stop, no retry


async def test_a_run_whose_claim_reached_the_server_late_starts_once_a_beat_renewed_it(
    redis: Redis, redis_server: EmbeddedServer, keys: Keys, system: System, tmp_path: Path
) -> None:
    """A claim call answered long after it was sent (a chaos run: claims sent during a cluster
    node's outage, answered 2.7 s later at a 3 s lease): the run counts from the send, so the
    watch stopped its handler a moment after it started, though the server had just stamped
    the lease, and the run ran again elsewhere. Here every claim of the executor reaches the
    server 1.9 s late at a 2 s lease, each beat 0.3 s late: each handler starts once a beat
    renewed its lease, and runs once."""

    def sha(name: str) -> bytes:
        return hashlib.sha1(load_source(name)[0].encode()).hexdigest().encode()

    # (the beats are slowed too, as in that outage: a beat asked for at the start came after
    # the watch's next look)
    hold = {sha("take"): 1.9, sha("claim"): 1.9, sha("heartbeat"): 0.3}
    proxy = FreezableProxy(redis_server.port, hold=hold)
    runs = 4
    kinds = await _held_runs_behind(proxy, redis, keys, system, tmp_path, runs, sleep=0.5)
    assert kinds[("start", "1")] == runs and kinds[("end", "1")] == runs, kinds
    assert set(kinds) == {("start", "1"), ("alive", "1"), ("end", "1")}, kinds  # no stop, no retry


async def _held_runs_behind(
    proxy: FreezableProxy,
    redis: Redis,
    keys: Keys,
    system: System,
    tmp_path: Path,
    runs: int,
    *,
    sleep: float,
) -> Counter[tuple[str, str]]:
    """`runs` runs of LEDGER_MODULE's `held` (`sleep` s each, a key each) on an executor at a
    2 s lease whose calls cross `proxy`, until all succeeded; the ledger's (kind, attempt)
    counts. The executor must not have stopped a run for its lease."""
    module = tmp_path / "ledgered.py"
    module.write_text(LEDGER_MODULE)
    ledger = tmp_path / "ledger.txt"
    await proxy.start()
    env = {**system.env, "LEDGER": str(ledger), "SUPERSEDE_REDIS_URL": proxy.url(),
           "PYTHONPATH": f"{module.parent}:{system.env.get('PYTHONPATH', '')}"}  # fmt: skip
    system.start("admission", "--block-ms", "100")
    system.start("ingress", "--block-ms", "100")
    cmd = [sys.executable, "-m", "supersede", "executor", module.stem, "--lease", "2",
           "--slots", str(max(runs, 10)), "--metrics-port", "0"]  # fmt: skip
    executor = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)  # (all held at once)
    system.procs.append(executor)
    try:
        await eventually(lambda: _registered(redis, keys, "held"), timeout=30)
        for i in range(runs):
            await publish(redis, keys, "held.go", k=f"k{i}", sleep=sleep)
        await eventually(lambda: _states(redis, keys, {"S": runs}), timeout=60)
        stderr = await _stderr_after_sigterm(executor)
    finally:
        await proxy.stop()
    assert "leases not renewed in time" not in stderr
    return Counter((x.split()[0], x.split()[2]) for x in ledger.read_text().splitlines())


async def test_the_lease_watch_counts_each_run_from_its_own_claim_or_renewal() -> None:
    """A beat that began after a run's claim call was sent may not hold the run yet (the loop
    starts it later). Counted from that beat's start, the run got time its server lease never
    had, and the watch stopped it after the lease ran out on the server, if later renewals
    failed (a review). Each run counts from its own claim or renewal now."""
    from types import SimpleNamespace

    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.steps import Runner

    runner = Runner([], ExecutorConfig(lease_ms=1_000), outbox=None)
    now = time.monotonic()
    runner.mark_renewed(now)  # a beat that began just now went through, without `late`
    late = SimpleNamespace(attempt=1, reported=False, lapsed=False, lease_cell=None,
                           leased_at=now - 0.95, started=now - 0.01, held=None)  # fmt: skip
    kept = SimpleNamespace(attempt=1, reported=False, lapsed=False, lease_cell=None,
                           leased_at=now - 0.95, started=now - 5, held=None)  # fmt: skip
    # (its handler waits for a beat to renew it: no retry can run beside it, see Runner.start)
    held = SimpleNamespace(attempt=1, reported=False, lapsed=False, lease_cell=None,
                           leased_at=now - 0.95, started=now - 0.01,
                           held=asyncio.Event())  # fmt: skip
    runner.active.update({"1-late": late, "1-kept": kept, "1-held": held})  # type: ignore[dict-item]
    runner.mark_leased([("1-kept", 1)], now)  # the beat's call renewed `kept`
    assert runner.lapsing(0.9) == [late]
    assert kept.leased_at == now


async def test_the_lease_watch_counts_the_runs_it_stops_when_it_marks_them(
    redis_url: str, keys: Keys
) -> None:
    """The watch logged `leases not renewed in time` with their number, and the loop counted
    them later, only those still running then: after a freeze, a run whose step's time ran
    out meanwhile returned first, and the counter stayed at 0 (a fleet probe, 2 of 3 tries)."""
    import threading
    from types import SimpleNamespace

    from supersede.services.executor import metrics
    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.lease import LeaseKeeper
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Context

    config = ExecutorConfig(lease_ms=1_000)
    runner = Runner([], config, outbox=None)
    keeper = LeaseKeeper(redis_url, keys, "c", config, runner, on_stop=lambda *_: None)
    now = time.monotonic()
    ctx = Context(run_id="1-x", workflow="w", attempt=1, input={}, metadata={})
    run = SimpleNamespace(run_id="1-x", attempt=1, reported=False, lapsed=False, drained=False,
                          ctx=ctx, lease_cell=None, leased_at=now - 5, started=now,
                          held=None)  # fmt: skip
    runner.active["1-x"] = run  # type: ignore[assignment]
    before = metrics.LEASES_LAPSED._value.get()
    watch = threading.Thread(target=keeper._watch, daemon=True)  # (no loop: nothing else counts)
    watch.start()
    try:
        await eventually(lambda: asyncio.sleep(0, run.lapsed), timeout=10)
    finally:
        keeper._halt.set()
        watch.join(5)
    assert ctx.cancelled and metrics.LEASES_LAPSED._value.get() == before + 1


async def test_a_step_its_worker_stopped_past_the_lease_is_left_to_the_lease_not_failed() -> None:
    """A worker stops its step itself once the attempt's lease lapsed while the executor was
    frozen (see test_isolation). Its reply (a CancelledError, the worker's exit) looked like the
    step's failure: a step without retries FAILED its run, final where the reaper was frozen
    too (`supersede serve`; a review). Such a run is left to its lease and retried now."""
    from types import SimpleNamespace

    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.isolation import WorkerLapsed, WorkerLost
    from supersede.services.executor.steps import LeftToLease, Runner
    from supersede.workflow import Context, Step

    runner = Runner([], ExecutorConfig(lease_ms=1_000), outbox=None)
    now = time.monotonic()
    runner.mark_renewed(now)
    step = Step("s", lambda ctx: None)
    ctx = Context(run_id="1-x", workflow="w", attempt=1, input={}, metadata={})

    def run(leased_at: float) -> Any:
        return SimpleNamespace(drained=False, reported=False, ctx=ctx, leased_at=leased_at,
                               started=leased_at, run_id="1-x",
                               workflow=SimpleNamespace(id="w"))  # fmt: skip

    with pytest.raises(LeftToLease):
        await runner._after_failure(run(now), step, 0, WorkerLapsed("stopped"))
    with pytest.raises(LeftToLease):  # (exited past the ladder: a lost worker, lease lapsed)
        await runner._after_failure(run(now - 5), step, 0, WorkerLost("gone"))
    # a worker lost while the lease holds (OOM-killed, say) is the step's failure, as before
    outcome = await runner._after_failure(run(now), step, 0, WorkerLost("gone"))
    assert outcome is not None and outcome[0].name == "FAILED"


async def test_a_run_left_to_its_lease_frees_its_slot_and_wakes_the_fetch_loop() -> None:
    """A run left to its lease (its worker lost while the executor was frozen past the lease)
    left its slot without waking the fetch loop, which waits on a full executor: its retry
    stayed ASSIGNED here, the slot unused (30 s, every slot of eight so left, in a review's
    run of the fencing test)."""
    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.steps import LeftToLease, Runner, Running
    from supersede.workflow import Context, Workflow

    runner = Runner([], ExecutorConfig(lease_ms=1_000, slots=1), outbox=None)
    ctx = Context(run_id="1-x", workflow="w", attempt=1, input={}, metadata={})
    run = Running("1-x", 0, 1, Workflow("w", []), ctx)
    runner.active[run.run_id] = run

    async def left(_: Running) -> Any:
        raise LeftToLease

    runner._run_steps = left  # type: ignore[method-assign,assignment]
    runner.slot_freed.clear()
    await runner._execute(run)
    assert runner.free() == 1 and runner.slot_freed.is_set()


async def test_a_beat_starts_a_held_run_it_renewed_unless_it_named_the_run_to_stop() -> None:
    """A run held for its renewal (its claim reply came late) starts once a beat's call
    renewed it. A run the call named to stop is still stamped (a CANCELLING run's lease is
    renewed while its handler winds down: left unstamped, the watch stopped it and its strict
    slot was refilled beside the live handler, a review) but a held one does not start."""
    from types import SimpleNamespace

    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.steps import Runner

    runner = Runner([], ExecutorConfig(lease_ms=1_000), outbox=None)
    runner._loop = asyncio.get_running_loop()
    now = time.monotonic()

    def run(held: bool) -> Any:
        return SimpleNamespace(attempt=1, reported=False, lapsed=False, lease_cell=None,
                               leased_at=now - 0.5, started=now,
                               held=asyncio.Event() if held else None)  # fmt: skip

    renewed, gone, cancelling = run(True), run(True), run(False)
    runner.active.update({"1-renewed": renewed, "1-gone": gone, "1-x": cancelling})
    calls = [("1-renewed", 1), ("1-gone", 1), ("1-x", 1)]
    await asyncio.to_thread(runner.mark_leased, calls, now, {"1-gone", "1-x"})
    await asyncio.sleep(0)  # (the loop runs what the lease thread handed it)
    assert renewed.held.is_set() and not gone.held.is_set()
    assert renewed.leased_at == gone.leased_at == cancelling.leased_at == now


async def test_a_worker_sees_the_renewals_of_its_run_but_not_of_one_named_to_stop() -> None:
    """A step in a worker process reads its run's lease stamp from shared memory. A beat that
    named the run (retried elsewhere, under the same fence) wrote it there all the same, and
    the worker called the stale attempt current until the loop stopped it (a review: 1, 1, 1
    after 0 with the loop busy). A cancelled run is shown lapsed to the worker it goes to."""
    from types import SimpleNamespace

    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.isolation import CURRENT, RENEWED
    from supersede.services.executor.steps import Runner

    runner = Runner([], ExecutorConfig(lease_ms=1_000), outbox=None)
    runner._loop = asyncio.get_running_loop()
    now = time.monotonic()
    ctx = SimpleNamespace(cancelled=False)
    kept, named = (SimpleNamespace(attempt=1, reported=False, lapsed=False, held=None,
                                   leased_at=now - 2, started=now - 2, ctx=ctx,
                                   lease_cell=[now - 2, now - 2])
                   for _ in range(2))  # fmt: skip
    runner.active.update({"1-kept": kept, "1-named": named})  # type: ignore[dict-item]
    await asyncio.to_thread(runner.mark_leased, [("1-kept", 1), ("1-named", 1)], now, {"1-named"})
    assert kept.lease_cell == [now, now]
    # (the server's lease of one named to stop is renewed while its ladder winds it down: the
    # worker's own watch reads that one, and cut the ladder's grace short, a review)
    assert named.lease_cell[CURRENT] == now - 2 and named.lease_cell[RENEWED] == now
    cell = [now, now]
    ctx.cancelled = True
    runner._share_lease(kept, cell)
    assert cell == [0.0, now] and kept.lease_cell is cell
    runner.close()


async def _registered(redis: Redis, keys: Keys, workflow: str) -> bool:
    return bool(await redis.hexists(keys.workflows_hash, workflow))


async def _past(ms: float) -> bool:
    return time.time() * 1000 > ms


CALLABLE_OBJECTS = """
import asyncio, os
from supersede import Concurrency, Context, Workflow
from supersede.config import connect_sync

_redis = connect_sync(os.environ["SUPERSEDE_REDIS_URL"])
LOG = os.environ["SUPERSEDE_NAMESPACE"] + ":test:log"


class Reply:
    async def __call__(self, ctx: Context) -> str:
        _redis.rpush(LOG, "started:" + ctx.run_id)
        if ctx.input.get("wait"):
            await asyncio.sleep(30)
        return "async object"


class Hook:
    async def __call__(self, ctx: Context) -> None:
        _redis.rpush(LOG, "hook:" + ctx.run_id)


objects = Workflow("callable-objects", on_events=["objects.item"],
                   concurrency=Concurrency(expression="input.k", max_runs=1))
objects.step(name="reply")(Reply())
objects.on_cancel(Hook())

bare = Workflow("bare-decorators", on_events=["bare.item"])


@bare.step
async def plain(ctx: Context) -> int:
    return 1


@bare.on_cancel()
def tidy(ctx: Context) -> None:
    return None
"""


async def test_an_object_with_an_async_call_is_an_async_step_and_decorators_take_no_parens(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """A step (or on_cancel hook) that is an object whose class has `async def __call__` was
    registered as a sync step, and every run failed: "the output is a coroutine (an async call
    not awaited: await it, in an async step)" (an API probe). `@wf.step` without parentheses
    failed the module's import with a TypeError; `@wf.on_cancel()` with them likewise."""
    module = tmp_path / "object_flows.py"
    module.write_text(CALLABLE_OBJECTS)
    proc = await _system_with_module(redis, keys, system, module, "callable-objects")
    await eventually(lambda: _registered(redis, keys, "bare-decorators"), timeout=30)
    await publish(redis, keys, "objects.item", k="a", wait=True)
    await eventually(lambda: logged(redis, keys, "started:"), timeout=30)
    await publish(redis, keys, "objects.item", k="a")
    await publish(redis, keys, "bare.item")
    await eventually(lambda: _states(redis, keys, {"C": 1, "S": 2}), timeout=30)
    entries = await log(redis, keys)
    first = entries[0].removeprefix("started:")
    await eventually(lambda: logged(redis, keys, f"hook:{first}"), timeout=10)
    [second] = [e.removeprefix("started:") for e in entries[1:] if e.startswith("started:")]
    run = await client.get_run(redis, second, namespace=keys.namespace)
    assert run is not None and run.outputs == {"reply": "async object"}, run
    assert "Traceback" not in await _stderr_after_sigterm(proc)
