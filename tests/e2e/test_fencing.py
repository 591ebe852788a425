"""A superseded handler that ignores cancellation and writes late cannot overwrite what the
newer run of its key wrote: real services, a real executor, `set_if_newer` and
`ctx.still_current()` as user code calls them (tests/support/apps/fenced.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from supersede.fencing import read_fenced
from supersede.keys import Keys
from tests.support import MODULE_HEAD, System, eventually, records

APP = "tests.support.apps.fenced"


async def _log(redis: Redis, keys: Keys) -> list[list[str]]:
    return [x.decode().split(":") for x in await redis.lrange(f"{keys.namespace}:test:log", 0, -1)]


async def _noted(redis: Redis, keys: Keys, kind: str, n: int) -> bool:
    return sum(1 for x in await _log(redis, keys) if x[0] == kind) >= n


async def test_a_superseded_handler_writing_late_cannot_overwrite_the_newer_value(
    redis: Redis, keys: Keys, system: System
) -> None:
    system.start("admission", "--block-ms", "100")
    system.start("executor", APP, "--grace", "0.2")

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == 1

    await eventually(registered, timeout=30)
    system.start("ingress", "--block-ms", "100")

    async def publish(**data: object) -> None:
        await redis.xadd(keys.events_stream, {"name": "doc.write", "data": orjson.dumps(data)})

    await publish(doc="d1", text="old", wait=True)  # writes once the newer run has written
    await eventually(lambda: _noted(redis, keys, "started", 1), timeout=30)
    await publish(doc="d1", text="new")
    await eventually(lambda: _noted(redis, keys, "wrote", 1), timeout=30)
    await redis.set(f"{keys.namespace}:test:go", 1)
    await eventually(lambda: _noted(redis, keys, "wrote", 2), timeout=30)

    started = {rid: (int(fence), current) for _, rid, fence, current in
               [x for x in await _log(redis, keys) if x[0] == "started"]}  # fmt: skip
    wrote = {rid: (current, written) for _, rid, current, written in
             [x for x in await _log(redis, keys) if x[0] == "wrote"]}  # fmt: skip
    recs = await records(redis, keys)
    [old] = [rid for rid, rec in recs.items() if rec.get("why") == "superseded"]
    [new] = [rid for rid in recs if rid != old]
    assert recs[old]["by"] == new
    assert started[old][0] < started[new][0]  # fences follow the events' order
    assert started[old][1] == "1" and started[new][1] == "1"  # each was current when it began
    assert wrote[new] == ("1", "1")
    assert wrote[old] == ("0", "0")  # no longer current, and its late write was refused
    assert await read_fenced(redis, f"{keys.namespace}:test:doc:d1") == (b"new", started[new][0])


async def test_workflows_of_one_scope_share_a_group_per_key(
    redis: Redis, keys: Keys, system: System
) -> None:
    """`Concurrency(scope="chat-user")` on two workflows: a user's voice reply supersedes the
    same user's running text reply (one slot per user for both), another user's is untouched."""
    system.start("admission", "--block-ms", "100")
    system.start("executor", "tests.support.apps.scoped", "--grace", "0.2")

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == 2

    await eventually(registered, timeout=30)
    system.start("ingress", "--block-ms", "100")

    async def publish(name: str, **data: object) -> None:
        await redis.xadd(keys.events_stream, {"name": name, "data": orjson.dumps(data)})

    await publish("chat.text", user="u1", sleep=30)
    await publish("chat.text", user="u2", sleep=30)
    await eventually(lambda: _noted(redis, keys, "started", 2), timeout=30)
    await publish("chat.voice", user="u1", sleep=0)

    async def settled() -> bool:
        states = sorted(str(r["st"]) for r in (await records(redis, keys)).values())
        return states == ["C", "R", "S"]

    await eventually(settled, timeout=30)
    recs = await records(redis, keys)
    by_state = {str(r["st"]): (rid, r) for rid, r in recs.items()}
    old_rec, (new, new_rec) = by_state["C"][1], by_state["S"]
    assert old_rec["w"] == "reply-text" and new_rec["w"] == "reply-voice"
    assert old_rec["by"] == new and old_rec["g"] == new_rec["g"]
    assert by_state["R"][1]["g"] != new_rec["g"]  # another user: another group


@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_an_attempt_whose_lease_may_have_lapsed_is_not_current(
    redis: Redis, keys: Keys, system: System, tmp_path: Path, isolation: str
) -> None:
    """An executor paused (SIGSTOP) for longer than its lease: the reaper may retry its runs
    elsewhere, and a retry shares its run's fence, so `still_current()` read only the fence
    and called the stale attempt current until the next heartbeat let it go (a probe: three
    of five: their heartbeat came late). It is not current once its lease may have lapsed.
    A worker process, which goes on while its executor is paused, stops the step itself at
    the lapse: it never asks, and the retries run on the executor once it goes on (its slots
    were once left held: every retry ASSIGNED for 30 s). (The answers go to a file: the
    resumed executor stops its lapsed runs while the writes of this test are paused.) Before
    the pause, each asks once a lease and a half after its start: current, its lease renewed
    by the beats (a worker reads the stamp that the executor writes into its shared memory for
    the run it runs)."""
    module = tmp_path / "paused.py"
    answers = tmp_path / "answers.txt"
    module.write_text(
        MODULE_HEAD + "GO = os.environ['SUPERSEDE_NAMESPACE'] + ':test:go'\n"
        "ASK = os.environ['SUPERSEDE_NAMESPACE'] + ':test:ask'\n"
        "wf = Workflow('paused', on_events=['paused.go'], concurrency=Concurrency('input.k'),\n"
        f"              isolation={isolation!r})\n"
        "@wf.step()\n"
        "def work(ctx):\n"
        "    r.rpush(LOG, f'started:{ctx.run_id}:{ctx.attempt}')\n"
        "    while ctx.attempt == 1 and not r.exists(ASK):\n"
        "        time.sleep(0.01)\n"
        "    if ctx.attempt == 1:\n"
        "        early = int(ctx.still_current_blocking())\n"
        f"        with open({str(answers)!r}, 'a') as f:\n"
        "            f.write(f'early{early}:{ctx.run_id}:{ctx.attempt}\\n')\n"
        "    while ctx.attempt == 1 and not r.exists(GO):\n"
        "        time.sleep(0.01)\n"
        "    now = int(ctx.still_current_blocking())\n"
        f"    with open({str(answers)!r}, 'a') as f:\n"
        "        f.write(f'current{now}:{ctx.run_id}:{ctx.attempt}\\n')\n"
    )
    system.start("admission", "--block-ms", "100", "--reap-interval", "0.1")
    executor = system.start("executor", str(module), "--lease", "1", "--slots", "8")

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == 1

    await eventually(registered, timeout=30)
    system.start("ingress", "--block-ms", "100")
    n = 8
    for k in range(n):
        data = orjson.dumps({"k": f"k{k}"})
        await redis.xadd(keys.events_stream, {"name": "paused.go", "data": data})
    await eventually(lambda: _noted(redis, keys, "started", n), timeout=30)

    async def asked(when: str = "current") -> list[str]:  # what the first attempts said
        lines = answers.read_text().split() if answers.exists() else []
        return [x.split(":")[0] for x in lines
                if x.split(":")[2] == "1" and x.startswith(when)]  # fmt: skip

    async def all_asked(when: str = "current") -> bool:
        return len(await asked(when)) == n

    started = time.monotonic()
    await eventually(lambda: _past(started + 1.5), timeout=30)  # (a lease and a half)
    await redis.set(f"{keys.namespace}:test:ask", 1)
    await eventually(lambda: all_asked("early"), timeout=30)
    assert await asked("early") == ["early1"] * n

    os.kill(executor.pid, signal.SIGSTOP)
    try:

        async def reassigned() -> bool:  # (the reaper took every lapsed lease back)
            return all(r["a"] == 2 for r in (await records(redis, keys)).values())

        await eventually(reassigned, timeout=30)
        # The steps ask now (a thread once the executor goes on; a worker process stopped
        # its step at the lapse). Writes wait for a second and a half: the resumed executor's
        # heartbeat, which would let the stale attempts go, waits; the step's fence read not.
        await redis.set(f"{keys.namespace}:test:go", 1)
        if isolation == "thread":
            await redis.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
    finally:
        os.kill(executor.pid, signal.SIGCONT)
    if isolation == "process":

        async def retried() -> bool:
            lines = answers.read_text().split() if answers.exists() else []
            return sum(1 for x in lines if x.split(":")[2] == "2") == n

        await eventually(retried, timeout=15)
        assert await asked() == []  # (no first attempt asked after its lapse)
        return
    await eventually(all_asked, timeout=30)
    assert await asked() == ["current0"] * n


async def _past(when: float) -> bool:
    return time.monotonic() > when
