"""Cancellation that is guaranteed to stop code: steps in worker processes are stopped by the
ladder (flag, SIGTERM after the grace period, SIGKILL after --kill-after) and their runs are
reported only once the process is gone; strict mode holds the slot until the handler really
stopped, in processes and in threads (tests/support/apps/isolated.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from supersede.client import get_run
from supersede.errors import DefinitionError
from supersede.keys import Keys
from supersede.workflow import Context, Workflow
from tests.support import MODULE_HEAD, System, eventually, records

APP = "tests.support.apps.isolated"


async def _notes(redis: Redis, keys: Keys) -> list[tuple[str, str, int, int]]:
    """(kind, run id, pid, ms) of every note."""
    out = []
    for raw in await redis.lrange(f"{keys.namespace}:test:log", 0, -1):
        kind, rid, pid, ms = raw.decode().split(":")
        out.append((kind, rid, int(pid), int(ms)))
    return out


async def _noted(redis: Redis, keys: Keys, kind: str, n: int = 1) -> bool:
    return sum(1 for x in await _notes(redis, keys) if x[0] == kind) >= n


def _gone(pid: int) -> bool:
    """The process ended (reaped, or a zombie whose code can no longer run)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # (ESRCH: reaped while it was read)
        return True


@pytest.fixture
async def running(redis: Redis, keys: Keys, system: System) -> System:
    system.start("admission", "--block-ms", "100", "--reap-interval", "0.1")
    system.start("executor", APP, "--slots", "4", "--grace", "0.3", "--kill-after", "0.3")

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == 10

    await eventually(registered, timeout=30)
    system.start("ingress", "--block-ms", "100")
    return system


async def _publish(redis: Redis, keys: Keys, name: str, **data: Any) -> None:
    await redis.xadd(keys.events_stream, {"name": name, "data": orjson.dumps(data)})


async def _recs(redis: Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    return dict(await records(redis, keys))  # (values typed Any: the tests read fields)


async def _ended(redis: Redis, keys: Keys, n: int) -> bool:
    return sum(1 for r in (await _recs(redis, keys)).values() if r["st"] in "SFC") >= n


@pytest.mark.parametrize("strict", [False, True])
async def test_a_process_that_ignores_its_flag_and_sigterm_is_killed_before_it_is_reported(
    redis: Redis, keys: Keys, running: System, strict: bool
) -> None:
    """Fails on a thread: the run was reported CANCELLED after the grace period while the
    handler went on (and, in strict mode, the newer run started beside it)."""
    event = "proc.strict" if strict else "proc.go"
    await _publish(redis, keys, event, k="a", sleep=30, ignore_term=1)
    await eventually(lambda: _noted(redis, keys, "alive"), timeout=30)
    await _publish(redis, keys, event, k="a", sleep=0)
    await eventually(lambda: _ended(redis, keys, 2), timeout=30)
    recs = await _recs(redis, keys)
    [old] = [rid for rid, r in recs.items() if r.get("why") == "superseded"]
    [new] = [rid for rid in recs if rid != old]
    assert recs[old]["st"] == "C" and recs[new]["st"] == "S"
    notes = await _notes(redis, keys)
    [pid] = {pid for kind, rid, pid, _ in notes if rid == old}
    last_alive = max(ms for kind, rid, _, ms in notes if rid == old and kind == "alive")
    assert _gone(pid)
    assert last_alive <= recs[old]["t3"]  # reported only once its code had stopped
    assert not any(kind == "finished" and rid == old for kind, rid, _, _ in notes)
    if strict:  # the newer run waited for the slot until the old handler was gone
        [new_start] = [ms for kind, rid, _, ms in notes if rid == new and kind == "started"]
        assert new_start >= last_alive


async def test_a_polite_process_step_stops_at_its_flag_and_its_worker_serves_again(
    redis: Redis, keys: Keys, running: System
) -> None:
    await _publish(redis, keys, "proc.polite", k="p", sleep=30)  # cancelled in its async step
    await eventually(lambda: _noted(redis, keys, "started"), timeout=30)
    await _publish(redis, keys, "proc.polite", k="p", sleep=0)
    await eventually(lambda: _ended(redis, keys, 2), timeout=30)
    notes = await _notes(redis, keys)
    assert any(kind == "async-cancelled" for kind, *_ in notes)  # CancelledError in the worker
    # a sync step that honours its flag returns at once: no SIGTERM, its worker lives on
    await _publish(redis, keys, "proc.polite", k="q", first_sleep=0, sleep=30)
    await eventually(lambda: _noted(redis, keys, "polite", 2), timeout=30)
    await _publish(redis, keys, "proc.polite", k="q", first_sleep=0, sleep=0)
    await eventually(lambda: _noted(redis, keys, "saw-flag"), timeout=30)
    await eventually(lambda: _ended(redis, keys, 4), timeout=30)
    notes = await _notes(redis, keys)
    [(rid, pid)] = [(rid, pid) for kind, rid, pid, _ in notes if kind == "saw-flag"]
    recs = await _recs(redis, keys)
    assert recs[rid]["st"] == "C" and not _gone(pid)
    assert sorted(r["st"] for r in recs.values()) == ["C", "C", "S", "S"]
    # the worker's context says when the executor claimed the attempt: before the step ran
    done = [r for r, rec in recs.items() if rec["st"] == "S" and rec.get("k") == "q"]
    run = await get_run(redis, done[0], namespace=keys.namespace)
    assert run is not None and run.created_ms is not None
    out = run.outputs["polite"]
    assert run.created_ms / 1000 - 1 < out["claimed_at"] <= out["at"]
    # a worker that dies while idle (OOM-killed, say) is replaced, and no run is lost with it
    # (dead: a kill still under way when a step is sent to it is a death during the step)
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: asyncio.sleep(0, _gone(pid)), timeout=10)
    for i in range(6):
        await _publish(redis, keys, "proc.go", k=f"after{i}", sleep=0)
    await eventually(lambda: _ended(redis, keys, 10), timeout=60)
    assert sorted(r["st"] for r in (await _recs(redis, keys)).values()).count("S") == 8


async def test_a_process_step_past_its_timeout_is_stopped_and_fails_the_attempt(
    redis: Redis, keys: Keys, running: System
) -> None:
    await _publish(redis, keys, "proc.timeout", sleep=30, ignore_term=1)
    await eventually(lambda: _ended(redis, keys, 1), timeout=60)
    [rec] = (await _recs(redis, keys)).values()
    assert rec["st"] == "F" and "timed out after 0.3s" in rec["err"]
    notes = await _notes(redis, keys)
    pids = {pid for kind, _, pid, _ in notes if kind == "started"}
    assert all(_gone(pid) for pid in pids)


async def test_strict_mode_holds_the_slot_until_a_thread_returns(
    redis: Redis, keys: Keys, running: System
) -> None:
    """Fails on the old code: the run was reported after the grace period (0.3 s) and the
    newer run started while the old thread still ran."""
    await _publish(redis, keys, "thread.strict", k="t", sleep=5)  # (outlasts the cancel)
    await eventually(lambda: _noted(redis, keys, "started"), timeout=30)
    await _publish(redis, keys, "thread.strict", k="t", sleep=0)
    await eventually(lambda: _ended(redis, keys, 2), timeout=30)
    notes = await _notes(redis, keys)
    started = {rid: ms for kind, rid, _, ms in notes if kind == "started"}
    old, new = sorted(started, key=started.__getitem__)
    [returned] = [ms for kind, rid, _, ms in notes if kind == "returned" and rid == old]
    assert started[new] >= returned
    recs = await _recs(redis, keys)
    assert recs[old]["st"] == "C" and recs[new]["st"] == "S"


def _sync_step(ctx: Context) -> None: ...


async def _async_step(ctx: Context) -> None: ...


@pytest.mark.parametrize(
    ("isolation", "fn", "field", "words"),
    [
        ("fiber", _sync_step, "isolation", "must be one of"),
        ("task", _sync_step, "isolation", "is sync"),
        ("thread", _async_step, "isolation", "is async"),
        ("process", lambda ctx: None, "isolation", "top level of its module"),
    ],
)
def test_a_bad_isolation_fails_at_definition_naming_the_field(
    isolation: str, fn: Any, field: str, words: str
) -> None:
    wf = Workflow("wf", on_events=["e"], isolation=isolation)
    wf.step(name="s")(fn)
    with pytest.raises(DefinitionError, match=words) as err:
        wf.definition()
    assert err.value.field == field
    per_step = Workflow("wf", on_events=["e"])
    per_step.step(name="s", isolation=isolation)(fn)
    with pytest.raises(DefinitionError) as err:
        per_step.definition()
    assert err.value.field == "steps[0].isolation"


def test_a_module_level_step_may_run_in_a_process() -> None:
    wf = Workflow("wf", on_events=["e"], isolation="process")
    wf.step()(_sync_step)
    assert wf.definition().id == "wf"
    assert wf.isolation_of(wf.steps[0]) == "process"
    assert Workflow("w", on_events=["e"]).isolation_of(wf.steps[0]) == "thread"


async def test_a_process_step_of_a_module_given_by_its_path_runs(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """`supersede executor path/to/flows.py`: the module is loaded under a name of its own,
    which a worker process must find too (it failed every run with ModuleNotFoundError). The
    forkserver imports it before it forks the workers, as it does a module given by name: it
    could not find it by its name, so each new worker imported it on its first step, inside
    that step's timeout (a module whose import took 3 s failed every run of a 2 s step)."""
    module = tmp_path / "flows_by_path.py"
    module.write_text(
        "import os\n"
        "from supersede import Workflow\n"
        "IMPORTED_IN = os.getpid()\n"
        'wf = Workflow("by-path", on_events=["by.path"], isolation="process")\n'
        "@wf.step()\n"
        "def work(ctx):\n"
        '    return {"pid": os.getpid(), "n": ctx.input["n"], "imported_in": IMPORTED_IN,\n'
        '            "env": os.environ.get("SUPERSEDE_STEP_MODULE_FILES")}\n'
    )
    await _serve(redis, keys, system, module, slots=2)
    await _publish(redis, keys, "by.path", n=7)
    await eventually(lambda: _ended(redis, keys, 1), timeout=60)
    [(rid, rec)] = (await _recs(redis, keys)).items()
    assert rec["st"] == "S", rec.get("err")
    run = await get_run(redis, rid, namespace=keys.namespace)
    assert run is not None and run.outputs["work"]["n"] == 7
    assert run.outputs["work"]["pid"] not in {p.pid for p in system.procs}  # (a worker's)
    imported_in = run.outputs["work"]["imported_in"]  # (the forkserver's: not the worker's)
    assert imported_in not in {run.outputs["work"]["pid"], *(p.pid for p in system.procs)}
    assert run.outputs["work"]["env"] is None  # (the forkserver's, read and dropped)


async def test_a_cancel_stops_an_async_step_that_awaits_redis(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """redis-py's asyncio client swallows a CancelledError that lands inside a command (about
    two cancels in three of a task looping on HGET), `ctx.still_current()`'s too: a superseded
    handler polling Redis ran to its end beside the newer run. The executor repeats the cancel
    until the step is left: every superseded handler gets CancelledError."""
    module = tmp_path / "polls_redis.py"
    module.write_text(
        "import asyncio, os, time\n"
        "from supersede import Concurrency, Workflow\n"
        "from supersede.config import connect, connect_sync\n"
        "r = connect_sync(os.environ['SUPERSEDE_REDIS_URL'])\n"
        "ar = connect(os.environ['SUPERSEDE_REDIS_URL'])\n"
        "LOG = os.environ['SUPERSEDE_NAMESPACE'] + ':test:log'\n"
        "wf = Workflow('polls', on_events=['polls.go'], concurrency=Concurrency('input.k'))\n"
        "@wf.step()\n"
        "async def poll(ctx):\n"
        "    r.rpush(LOG, f'started:{ctx.run_id}:0:0')\n"
        "    deadline = time.monotonic() + ctx.input['secs']\n"
        "    try:\n"
        "        while time.monotonic() < deadline:\n"
        "            await ctx.still_current()  # (after the cancel: False, at once)\n"
        "            await ar.hget(LOG + ':h', 'f')  # (the step's own client)\n"
        "            await asyncio.sleep(0.001)\n"
        "    except BaseException as exc:  # (CancelledError, or what a library made of it)\n"
        "        r.rpush(LOG, f'stopped-{type(exc).__name__}:{ctx.run_id}:0:0')\n"
        "        raise\n"
        "    r.rpush(LOG, f'done:{ctx.run_id}:0:0')\n"
    )
    await _serve(redis, keys, system, module, slots=40)
    n = 10
    for k in range(n):  # (10 s: a slow cancel is not mistaken for one that never came)
        await _publish(redis, keys, "polls.go", k=f"k{k}", secs=10)
    await eventually(lambda: _noted(redis, keys, "started", n), timeout=30)
    for k in range(n):  # each supersedes its key's first run, which is polling
        await _publish(redis, keys, "polls.go", k=f"k{k}", secs=0)
    await eventually(lambda: _ended(redis, keys, 2 * n), timeout=30)
    recs = await _recs(redis, keys)
    superseded = {rid for rid, r in recs.items() if r.get("why") == "superseded"}
    assert len(superseded) == n and all(recs[rid]["st"] == "C" for rid in superseded)
    notes = await _notes(redis, keys)
    stopped = {rid: kind for kind, rid, _, _ in notes if kind.startswith("stopped-")}
    missing = superseded - set(stopped)
    assert not missing, [(rid, [n[0] for n in notes if n[1] == rid], recs[rid]) for rid in missing]
    assert not {rid for kind, rid, _, _ in notes if kind == "done"} & superseded


@pytest.mark.parametrize("forever", [False, True])
async def test_a_drain_deadline_stops_an_async_step_that_swallows_its_cancel(
    redis: Redis, keys: Keys, system: System, tmp_path: Path, forever: bool
) -> None:
    """Past the drain deadline the executor cancelled a step once, and the loop's last cancel
    at exit once more: a step that swallowed both (as redis-py's client does, two in three)
    kept the process for the step's whole length, past its leases and beside its retry. The
    cancel is repeated: the executor exits within moments of the deadline. A step that
    swallows every cancel kept it for good (asyncio's own cancel at exit waits for its task):
    the process ends once such tasks have had two seconds more."""
    module = tmp_path / "swallows.py"
    swallow = "    while True:\n        try:\n            await asyncio.sleep(60)\n"
    swallow += "        except asyncio.CancelledError:\n            pass\n"
    _swallows_two_cancels(module, "swallows", then=swallow if forever else "")
    system.start("admission", "--block-ms", "100")
    executor = system.start("executor", str(module), "--drain-timeout", "1")
    await eventually(lambda: _registered(redis, keys, 1), timeout=30)
    system.start("ingress", "--block-ms", "100")
    await _publish(redis, keys, "swallows.go")
    await eventually(lambda: _noted(redis, keys, "started"), timeout=30)
    executor.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(executor.wait, 15) == 0


async def test_a_step_timeout_stops_an_async_step_that_swallows_its_cancel(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """asyncio.timeout cancels once: a step that swallowed it (as redis-py's client does, two
    in three) ran on to its end, and then succeeded, its timeout notwithstanding. The cancel
    is repeated until the step is left, and a step left after its timeout timed out, however
    it left (here: by its next CancelledError, or by returning)."""
    module = tmp_path / "slow.py"
    _swallows_two_cancels(
        module,
        "slow",
        step="timeout=0.3",
        then="    if ctx.input['returns']:\n        return 'late'\n",
    )
    await _serve(redis, keys, system, module, slots=4)
    await _publish(redis, keys, "slow.go", returns=False)
    await _publish(redis, keys, "slow.go", returns=True)
    await eventually(lambda: _ended(redis, keys, 2), timeout=30)
    recs = (await _recs(redis, keys)).values()
    assert [r["st"] for r in recs] == ["F", "F"]
    assert all("timed out after 0.3s" in str(r["err"]) for r in recs), recs


def _swallows_two_cancels(module: Path, workflow: str, *, step: str = "", then: str = "") -> None:
    """Write `module`: workflow `workflow` (event `<workflow>.go`) of one async step,
    `@wf.step(<step>)`, that swallows two cancels (as a library may), runs `then`, and then
    sleeps a minute."""
    module.write_text(
        "import asyncio, os\n"
        "from supersede import Workflow\n"
        "from supersede.config import connect_sync\n"
        "r = connect_sync(os.environ['SUPERSEDE_REDIS_URL'])\n"
        "LOG = os.environ['SUPERSEDE_NAMESPACE'] + ':test:log'\n"
        f"wf = Workflow({workflow!r}, on_events=['{workflow}.go'])\n"
        f"@wf.step({step})\n"
        "async def hold(ctx):\n"
        "    r.rpush(LOG, f'started:{ctx.run_id}:0:0')\n"
        "    for _ in range(2):\n"
        "        try:\n"
        "            await asyncio.sleep(60)\n"
        "        except asyncio.CancelledError:\n"
        "            pass\n"
        f"{then}"
        "    await asyncio.sleep(60)\n"
    )


async def _registered(redis: Redis, keys: Keys, n: int) -> bool:
    return int(await redis.hlen(keys.workflows_hash)) >= n


async def _serve(redis: Redis, keys: Keys, system: System, module: Path, *, slots: int) -> None:
    """Admission, an executor of the one workflow of `module` (a file), then ingress."""
    system.start("admission", "--block-ms", "100")
    system.start("executor", str(module), "--slots", str(slots))
    await eventually(lambda: _registered(redis, keys, 1), timeout=30)
    system.start("ingress", "--block-ms", "100")


async def test_a_worker_stopped_by_the_ladder_takes_the_processes_its_step_started(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """A step in a worker process that started a subprocess and ran past its timeout: the
    ladder stopped the worker, and the subprocess ran on, reparented (a probe: `sleep 4321`
    alive after the run FAILED). The ladder's signals go to the worker's whole group now."""
    module = tmp_path / "spawns_children.py"
    module.write_text(
        "import os, subprocess, time\n"
        "from supersede import Workflow\n"
        "from supersede.config import connect_sync\n"
        "r = connect_sync(os.environ['SUPERSEDE_REDIS_URL'])\n"
        "LOG = os.environ['SUPERSEDE_NAMESPACE'] + ':test:log'\n"
        "wf = Workflow('spawns', on_events=['spawns.go'], isolation='process')\n"
        "@wf.step(timeout=1)\n"
        "def spawn(ctx):\n"
        "    child = subprocess.Popen(['sleep', '4321'])\n"
        "    r.rpush(LOG, f'child:{ctx.run_id}:{child.pid}:0')\n"
        "    while True:  # (never looks at ctx.cancelled)\n"
        "        time.sleep(0.05)\n"
    )
    system.start("admission", "--block-ms", "100")
    system.start("executor", str(module), "--grace", "0.5", "--kill-after", "0.5")
    await eventually(lambda: _registered(redis, keys, 1), timeout=30)
    system.start("ingress", "--block-ms", "100")
    await _publish(redis, keys, "spawns.go")
    await eventually(lambda: _noted(redis, keys, "child"), timeout=30)
    [(_, rid, child, _)] = await _notes(redis, keys)
    await eventually(lambda: _ended(redis, keys, 1), timeout=30)
    assert (await _recs(redis, keys))[rid]["st"] == "F"
    await eventually(lambda: asyncio.sleep(0, _gone(child)), timeout=10)


async def test_a_step_in_a_worker_stops_within_moments_of_a_sigkill_of_its_executor(
    redis: Redis, keys: Keys, running: System
) -> None:
    """Its forkserver may live on for seconds: the worker watches the executor itself, so the
    step never runs on beside the retry that the lapsed lease brings (strict mode's promise)."""
    await _publish(redis, keys, "proc.go", k="orphan", sleep=30)
    await eventually(lambda: _noted(redis, keys, "started"), timeout=30)
    [pid] = {pid for kind, _, pid, _ in await _notes(redis, keys) if kind == "started"}
    executor = running.procs[1]  # (the fixture starts admission, the executor, ingress)
    executor.kill()  # (not reaped: a zombie executor counts as gone too)

    async def worker_gone() -> bool:
        return _gone(pid)

    await eventually(worker_gone, timeout=1.5)


async def test_a_step_in_a_worker_stops_once_its_lease_lapsed_while_its_executor_is_frozen(
    redis: Redis, keys: Keys, system: System
) -> None:
    """An executor frozen (SIGSTOP, a hung VM) renews no lease, and the run is retried
    elsewhere; its worker processes run on, so a step that ignores its flag ran beside the
    retry for as long as the freeze lasted (a fleet probe: 7.3 s, in strict mode; with the
    ladder's grace after the lapse, 6.8 s). The worker now watches the attempt's lease itself:
    the flag a tenth of a lease before it runs out, its exit when it does, while the executor
    is still frozen and before the retry starts on another executor."""
    system.start("admission", "--block-ms", "100", "--reap-interval", "0.1")
    executor = system.start(
        "executor", APP, "--slots", "4", "--lease", "2", "--grace", "0.3", "--kill-after", "0.3"
    )

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == 10

    await eventually(registered, timeout=30)
    system.start("ingress", "--block-ms", "100")
    await _publish(redis, keys, "proc.go", k="frozen", sleep=60)
    await eventually(lambda: _noted(redis, keys, "started"), timeout=30)
    [pid] = {pid for kind, _, pid, _ in await _notes(redis, keys) if kind == "started"}
    system.start("executor", APP, "--slots", "4", "--lease", "2")  # (where the retry runs)
    await eventually(registered, timeout=30)
    executor.send_signal(signal.SIGSTOP)
    try:

        async def worker_gone() -> bool:
            return _gone(pid)

        await eventually(worker_gone, timeout=10)  # (the lease, 2 s)
        assert executor.poll() is None  # (still there, frozen)
        await eventually(lambda: _noted(redis, keys, "started", 2), timeout=30)
    finally:
        executor.send_signal(signal.SIGCONT)
    # the step stopped before its retry started: strict mode's one handler at a time
    notes = await _notes(redis, keys)
    last_alive = max(ms for kind, _, p, ms in notes if p == pid)
    retried = min(ms for kind, _, p, ms in notes if kind == "started" and p != pid)
    assert last_alive < retried, (last_alive, retried)


async def test_a_cancelled_process_step_has_its_grace_period_though_it_outlasts_a_lease(
    redis: Redis, keys: Keys, system: System
) -> None:
    """The worker's own lease watch read the stamp a beat stops renewing once the run is named
    to stop, and exited a lease after the cancel, cutting the ladder's grace short (a review:
    1.9 s of a 6 s grace under a 2 s lease). It reads the server's lease, which a CANCELLING
    run keeps while its ladder winds it down."""
    system.start("admission", "--block-ms", "100", "--reap-interval", "0.1")
    system.start(
        "executor", APP, "--slots", "4", "--lease", "2", "--grace", "4", "--kill-after", "10"
    )
    await eventually(lambda: _registered(redis, keys, 10), timeout=30)
    system.start("ingress", "--block-ms", "100")
    await _publish(redis, keys, "proc.go", k="graced", sleep=30)
    await eventually(lambda: _noted(redis, keys, "started"), timeout=30)
    [first] = {pid for kind, _, pid, _ in await _notes(redis, keys) if kind == "started"}
    await _publish(redis, keys, "proc.go", k="graced", sleep=0)  # (supersedes it)
    await eventually(lambda: _noted(redis, keys, "finished"), timeout=30)

    async def first_gone() -> bool:
        return _gone(first)

    await eventually(first_gone, timeout=30)
    notes = await _notes(redis, keys)
    cancelled_at = max(ms for kind, _, pid, ms in notes if kind == "started")  # (the newer's)
    last_alive = max(ms for kind, _, pid, ms in notes if kind == "alive" and pid == first)
    assert last_alive - cancelled_at >= 3000, (last_alive - cancelled_at, notes[-3:])


async def test_a_process_step_that_ignores_its_flag_ends_at_the_ladders_sigterm(
    redis: Redis, keys: Keys, system: System
) -> None:
    """The ladder's SIGTERM ends a step at once, also in a worker forked from a forkserver that
    blocks SIGTERM (below): the run is reported at the grace period (0.3 s), long before
    --kill-after (10 s) would SIGKILL it."""
    system.start("admission", "--block-ms", "100", "--reap-interval", "0.1")
    system.start("executor", APP, "--slots", "4", "--grace", "0.3", "--kill-after", "10")
    await eventually(lambda: _registered(redis, keys, 5), timeout=30)
    system.start("ingress", "--block-ms", "100")
    await _publish(redis, keys, "proc.go", k="t", sleep=30)
    await eventually(lambda: _noted(redis, keys, "alive"), timeout=30)
    await _publish(redis, keys, "proc.go", k="t", sleep=0)
    await eventually(lambda: _ended(redis, keys, 2), timeout=30)
    recs = await _recs(redis, keys)
    [old] = [rid for rid, r in recs.items() if r.get("why") == "superseded"]
    assert recs[old]["st"] == "C"
    notes = await _notes(redis, keys)
    [pid] = {pid for _, rid, pid, _ in notes if rid == old}
    last_alive = max(ms for kind, rid, _, ms in notes if rid == old and kind == "alive")
    assert _gone(pid) and last_alive - recs[old]["tc"] < 5000, last_alive - recs[old]["tc"]


def _descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (the forkserver, its workers, the resource
    tracker), from /proc."""
    if not Path(f"/proc/{pid}/task/{pid}/children").exists():
        pytest.skip("no /proc/<pid>/task/<tid>/children here (a kernel without PROC_CHILDREN)")
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(FileNotFoundError):
                todo += [int(c) for c in (task / "children").read_text().split()]
        if parent != pid:
            found.append(parent)
    return found


@pytest.mark.parametrize("to", ["group", "cgroup"])
async def test_a_supervisors_sigterm_to_every_process_of_an_executor_fails_no_process_step(
    redis: Redis, keys: Keys, system: System, to: str
) -> None:
    """A supervisor that signals the whole process group (supervisord's stopasgroup, `kill
    -TERM -<pgid>`) reached the forkserver too, and the workers forked from it ended with it:
    the draining executor failed every process step in flight (WorkerLost). Now those steps
    finish and their runs succeed at their first attempt. One that signals every process of
    the cgroup (systemd's default KillMode) ends the workers themselves: their runs are left to
    their leases and retried by another executor, not failed."""
    system.start("admission", "--block-ms", "100", "--reap-interval", "0.1")
    executor = subprocess.Popen(
        [sys.executable, "-m", "supersede", "executor", APP, "--slots", "4", "--lease", "2",
         "--metrics-port", "0"],
        env=system.env, stderr=system.stderr, start_new_session=True,
    )  # fmt: skip
    system.procs.append(executor)
    await eventually(lambda: _registered(redis, keys, 5), timeout=30)
    system.start("ingress", "--block-ms", "100")
    for k in ("a", "b", "c"):
        await _publish(redis, keys, "proc.go", k=k, sleep=1.5)
    await eventually(lambda: _noted(redis, keys, "started", 3), timeout=30)
    if to == "group":
        os.killpg(executor.pid, signal.SIGTERM)
    else:
        pids = [executor.pid, *_descendants(executor.pid)]
        assert len(pids) >= 6  # (the executor, the forkserver, four workers)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    assert await asyncio.to_thread(executor.wait, 30) == 0
    if to == "cgroup":
        system.start("executor", APP, "--slots", "4")
    await eventually(lambda: _ended(redis, keys, 3), timeout=30)
    recs = await _recs(redis, keys)
    attempt = 1 if to == "group" else 2
    assert sorted((r["st"], r["a"]) for r in recs.values()) == [("S", attempt)] * 3, [
        r.get("err") for r in recs.values()
    ]


async def test_a_parent_named_by_its_function_and_its_bytes_reach_thread_and_process_children(
    redis: Redis, keys: Keys, running: System
) -> None:
    """A step registered with `name=` is found by its function (`parents=[fn]` refused the
    workflow, `ctx.parent(fn)` raised KeyError), and bytes in an output read back as bytes in
    a worker process and from the store (they came back as str, with surrogate escapes)."""
    await _publish(redis, keys, "named.go")
    await eventually(lambda: _ended(redis, keys, 1), timeout=30)
    [(rid, rec)] = (await _recs(redis, keys)).items()
    assert rec["st"] == "S", rec.get("err")
    run = await get_run(redis, rid, namespace=keys.namespace)
    assert run is not None
    outputs = run.outputs
    assert outputs["made-here"] == {"raw": b"\xff\xd8raw", "pair": [1, 2]}
    hexed = (b"\xff\xd8raw").hex()
    assert outputs["in-thread"] == ["bytes", "tuple", hexed]  # (the parent's own objects)
    assert outputs["in-process"] == ["bytes", "list", hexed]


async def test_messages_larger_than_the_pipe_buffer_cross_to_and_from_a_worker_process(
    redis: Redis, keys: Keys, running: System
) -> None:
    """A 900 KB input, a 1 MB exception message and a 1 MB output, each several times (the
    workers are used in turn): the input arrives, the error is the step's own, the output is
    refused by the output cap. With uvloop, whose reader left the pipe non-blocking, these
    failed as "worker process could not be reached: [Errno 11]" or "ended without answering",
    at random, and the step's exception was lost."""
    pad = "p" * 900_000
    seen: set[str] = set()
    for _ in range(5):
        for data, outcome in (({"pad": pad}, "S"), ({"raise": 1}, "raise"), ({"big": 1}, "big")):
            await _publish(redis, keys, "proc.large", **data)
            await eventually(lambda: _ended(redis, keys, len(seen) + 1), timeout=30)
            [(rid, rec)] = [(r, v) for r, v in (await _recs(redis, keys)).items() if r not in seen]
            seen.add(rid)
            err = str(rec.get("err", ""))[:300]
            if outcome == "S":
                assert rec["st"] == "S", err
                run = await get_run(redis, rid, namespace=keys.namespace)
                assert run is not None and run.outputs == {"sized": 900_000}
            elif outcome == "raise":
                assert rec["st"] == "F" and "ValueError: MMMM" in err, err
            else:
                assert rec["st"] == "F" and "WorkerLost" not in err and "output" in err, err


async def test_a_step_that_raises_in_its_worker_process_fails_with_its_own_traceback(
    redis: Redis, keys: Keys, running: System
) -> None:
    """The stored error starts at the step's own frame: the worker loop's frames, and the
    executor's above the worker's traceback, came first and said nothing. The step's
    `ctx.retry_count` is 0, then 1 on its retry (a step could not tell which try it was)."""
    await _publish(redis, keys, "proc.retried", fail="bad input")
    await eventually(lambda: _ended(redis, keys, 1), timeout=30)
    [rec] = (await _recs(redis, keys)).values()
    err = str(rec["err"])
    assert rec["st"] == "F" and "ValueError: the step failed on purpose: bad input" in err, err
    frames = [line for line in err.splitlines() if line.lstrip().startswith("File ")]
    assert frames and "isolated.py" in frames[0] and "stubborn" in frames[0], err
    assert err.startswith("step 'stubborn' failed after 2 tries:\nin its worker process:")
    tries = [kind for kind, *_ in await _notes(redis, keys) if kind.startswith("failing")]
    assert tries == ["failing0", "failing1"]


async def test_a_cancelled_error_a_worker_step_raised_by_itself_fails_its_run_with_its_place(
    redis: Redis, keys: Keys, running: System
) -> None:
    """Nothing cancelled its run: the step failed, and the error says where it raised it (it
    had no location: a review)."""
    await _publish(redis, keys, "proc.retried", cancel=1)
    await eventually(lambda: _ended(redis, keys, 1), timeout=30)
    [rec] = (await _recs(redis, keys)).values()
    err = str(rec["err"])
    assert rec["st"] == "F" and "raised CancelledError, and its run was not cancelled" in err
    assert "isolated.py" in err and "in stubborn" in err, err


async def test_a_step_that_ends_its_worker_process_fails_its_run_saying_how_in_one_line(
    redis: Redis, keys: Keys, running: System
) -> None:
    """`os._exit(7)` in a process step: its run's error was the executor's traceback (its
    `_receive`, then `WorkerLost: ... (exit code 7)`, an author probe). It is one line that
    says how the worker ended, after both tries."""
    await _publish(redis, keys, "proc.retried", exit=7)
    await eventually(lambda: _ended(redis, keys, 1), timeout=30)
    [rec] = (await _recs(redis, keys)).values()
    err = str(rec["err"])
    assert rec["st"] == "F", err
    assert err == (
        "step 'stubborn' failed after 2 tries:\nthe step's worker process ended without "
        "answering: it exited with code 7 (the step, or a library it called, ended the process: "
        "os._exit, sys.exit in a thread, or a crash)"
    ), err


@pytest.mark.parametrize("event", ["fence.out", "fence.process"])
async def test_an_output_msgpack_cannot_hold_fails_its_run_at_once_naming_the_part(
    redis: Redis, keys: Keys, running: System, event: str
) -> None:
    """A fence in an output (128 bits), in a thread or in a worker process: the run failed with
    msgpack's "Integer value out of range", after retries of the step (which repeated its side
    effects)."""
    await _publish(redis, keys, event, k="f")
    await eventually(lambda: _ended(redis, keys, 1), timeout=30)
    [rec] = (await _recs(redis, keys)).values()
    assert rec["st"] == "F"
    assert rec["err"].startswith(
        "step 'returns_its_fence' returned an output msgpack cannot hold: the output['fence'] "
        "is an integer outside msgpack's 64 bits (a fence, ctx.fence, is 128 bits: return "
        "str(ctx.fence))"
    ), rec["err"]
    assert sum(1 for kind, *_ in await _notes(redis, keys) if kind == "fence-attempt") == 1


async def test_a_worker_killed_while_its_executor_was_frozen_frees_the_slot_on_resume(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """An executor frozen (SIGSTOP) past its lease, its run's worker killed meanwhile (OOM):
    on resume the attempt is left to its lease (the reaper retried it already), and its slot
    is free again. The slot was dropped without waking the fetch loop, which waited on a full
    executor: the retry sat ASSIGNED to it, its only slot unused (every retry of eight for
    30 s in a run of the fencing test)."""
    module = tmp_path / "lost.py"
    module.write_text(
        MODULE_HEAD
        + "wf = Workflow('lost', on_events=['lost.go'], concurrency=Concurrency('input.k'),\n"
        "              isolation='process')\n"
        "@wf.step()\n"
        "def work(ctx):\n"
        "    r.rpush(LOG, f'started:{ctx.run_id}:{os.getpid()}:{ctx.attempt}')\n"
        "    while ctx.attempt == 1:\n"
        "        time.sleep(0.01)\n"
    )
    system.start("admission", "--block-ms", "100", "--reap-interval", "0.1")
    executor = system.start("executor", str(module), "--lease", "1", "--slots", "1")
    await eventually(lambda: _registered(redis, keys, 1), timeout=30)
    system.start("ingress", "--block-ms", "100")
    await _publish(redis, keys, "lost.go", k="one")
    await eventually(lambda: _noted(redis, keys, "started"), timeout=30)
    [(_, run_id, pid, _)] = await _notes(redis, keys)
    os.kill(executor.pid, signal.SIGSTOP)
    try:
        os.kill(pid, signal.SIGKILL)

        async def retried() -> bool:  # (the reaper took the lapsed lease back)
            return all(r["a"] == 2 for r in (await records(redis, keys)).values())

        await eventually(retried, timeout=30)
    finally:
        os.kill(executor.pid, signal.SIGCONT)

    async def succeeded() -> bool:
        run = await get_run(redis, run_id, namespace=keys.namespace)
        return run is not None and run.state == "SUCCEEDED"

    await eventually(succeeded, timeout=10)


async def test_a_process_steps_logs_and_warnings_are_the_executors_json_lines(
    redis: Redis, keys: Keys, system: System, tmp_path: Path
) -> None:
    """A worker process had no logging set up: a step's `logger.info` was lost, its warnings
    and `logger.warning` plain text among the executor's JSON lines (a workflow-author probe).
    They are JSON lines at the executor's level now."""
    module = tmp_path / "talks.py"
    module.write_text(
        "import logging, warnings\n"
        "from supersede import Workflow\n"
        "wf = Workflow('talks', on_events=['talks.go'], isolation='process')\n"
        "@wf.step()\n"
        "def talk(ctx):\n"
        "    logging.getLogger('talks').info('said by %s', ctx.run_id)\n"
        "    warnings.warn('an old way')\n"
        "    logging.getLogger('talks').debug('below the level')\n"
        "    return 'ok'\n"
    )
    err = tmp_path / "executor.err"
    with err.open("ab") as sink:
        executor = subprocess.Popen(
            [sys.executable, "-m", "supersede", "executor", str(module), "--metrics-port", "0"],
            env=system.env, stderr=sink,
        )  # fmt: skip
    system.procs.append(executor)
    system.start("admission", "--block-ms", "100")
    await eventually(lambda: _registered(redis, keys, 1), timeout=30)
    system.start("ingress", "--block-ms", "100")
    await _publish(redis, keys, "talks.go")
    await eventually(lambda: _ended(redis, keys, 1), timeout=30)
    [(rid, rec)] = (await _recs(redis, keys)).items()
    assert rec["st"] == "S", rec

    def lines() -> list[dict[str, Any]]:
        return [orjson.loads(x) for x in err.read_bytes().splitlines()]  # (each one JSON)

    async def logged() -> bool:
        return any(x["logger"] == "py.warnings" for x in lines())

    await eventually(logged, timeout=10)
    said = [
        (x["logger"], x["level"], x["msg"]) for x in lines() if x["logger"] != "supersede.executor"
    ]
    assert said == [
        ("talks", "info", f"said by {rid}"),
        ("py.warnings", "warning", "UserWarning: an old way"),
    ], said


async def test_a_slow_start_of_the_step_workers_says_so(
    redis: Redis, keys: Keys, tmp_path: Path, redis_url: str
) -> None:
    """A module whose import waits only in the forkserver (on a lock, a server) held the
    executor's start without a word (a review): past SLOW_START a line says what it imports."""
    module = tmp_path / "slow_in_forkserver.py"
    module.write_text(
        "import os, time\n"
        "from supersede import Workflow\n"
        "if os.environ['EXECUTOR_PID'] != str(os.getpid()):  # (the forkserver's import)\n"
        "    time.sleep(1.5)\n"
        'wf = Workflow("slow-fs", on_events=["slow.fs"], isolation="process")\n'
        "@wf.step()\n"
        "def work(ctx):\n"
        "    return 1\n"
    )
    code = (
        "import os, sys\n"
        "os.environ['EXECUTOR_PID'] = str(os.getpid())\n"
        "from supersede.services.executor import isolation\n"
        "isolation.SLOW_START = 0.3\n"
        "from supersede.launch import main\n"
        f"sys.argv = ['supersede', 'executor', {str(module)!r}, '--slots', '1', "
        "'--metrics-port', '0']\n"
        "main()\n"
    )
    env = {**os.environ, "SUPERSEDE_REDIS_URL": redis_url, "SUPERSEDE_NAMESPACE": keys.namespace,
           "SUPERSEDE_SHARDS": str(keys.shards)}  # fmt: skip
    log = tmp_path / "stderr"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=err)
    try:

        async def said(text: str) -> bool:
            return text in log.read_text()

        await eventually(lambda: said("forkserver has been importing"), timeout=30)
        await eventually(lambda: said("workflows registered"), timeout=30)  # (then started)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    text = log.read_text()
    assert "slow_in_forkserver" in text and text.count("forkserver has been importing") == 1
