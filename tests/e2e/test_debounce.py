"""Debounce through the real services: a burst of events of one key makes one run, of the
newest event, once the key was quiet for the window; the timers live in Redis, so an admission
killed while one is pending fires it after a restart (tests/support/apps/debounced.py)."""

from __future__ import annotations

import signal

import orjson
from redis.asyncio import Redis

from supersede.keys import Keys
from tests.support import System, eventually, records

APP = "tests.support.apps.debounced"


async def _ran(redis: Redis, keys: Keys) -> list[str]:
    return [x.decode() for x in await redis.lrange(f"{keys.namespace}:test:log", 0, -1)]


async def _publish(redis: Redis, keys: Keys, user: str, text: str, name: str = "user.typed") -> int:
    data = orjson.dumps({"user": user, "text": text})
    entry = await redis.xadd(keys.events_stream, {"name": name, "data": data})
    return int(entry.split(b"-")[0])


async def test_a_burst_runs_once_with_its_newest_event_after_the_quiet_window(
    redis: Redis, keys: Keys, system: System
) -> None:
    system.start("admission", "--block-ms", "100")
    system.start("executor", APP)

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == 2

    await eventually(registered, timeout=30)
    system.start("ingress", "--block-ms", "100")
    for i in range(5):
        last = await _publish(redis, keys, "u1", f"draft{i}")
    await _publish(redis, keys, "u2", "hello")

    async def both_ran() -> bool:
        return len(await _ran(redis, keys)) >= 2

    await eventually(both_ran, timeout=30)
    ran = {x.split(":")[1]: int(x.split(":")[2]) for x in await _ran(redis, keys)}
    assert set(ran) == {"draft4", "hello"}
    assert ran["draft4"] >= last + 300  # not before the window after the last event closed

    async def states() -> list[str]:  # the log is written inside the handler, before finish
        return sorted(str(r["st"]) for r in (await records(redis, keys)).values())

    async def ended() -> bool:
        return all(s in "CSF" for s in await states())

    await eventually(ended, timeout=30)
    assert await states() == ["C", "C", "C", "C", "S", "S"]


async def test_a_timer_set_before_admission_was_killed_fires_after_its_restart(
    redis: Redis, keys: Keys, system: System
) -> None:
    admission = system.start("admission", "--block-ms", "100")
    system.start("executor", APP)

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == 2

    await eventually(registered, timeout=30)
    system.start("ingress", "--block-ms", "100")
    await _publish(redis, keys, "u1", "pending", name="user.paused")  # a 2 s window

    async def waiting() -> bool:
        return sum([int(await redis.zcard(sk.due_zset)) for sk in keys.all_shards()]) == 1

    await eventually(waiting, timeout=30)
    admission.send_signal(signal.SIGKILL)
    admission.wait(10)
    assert await waiting() and await _ran(redis, keys) == []  # killed with the timer pending
    system.start("admission", "--block-ms", "100")
    await eventually(lambda: _ran_text(redis, keys, "pending"), timeout=30)


async def _ran_text(redis: Redis, keys: Keys, text: str) -> bool:
    return any(x.split(":")[1] == text for x in await _ran(redis, keys))


async def test_debounce_timers_fire_on_the_servers_clock_whatever_admissions_is(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Admission compared the timers (the server's time) with its own clock: a minute behind,
    a 300 ms window closed a minute late (a clock probe: 61 s); ahead, it fired in a tight
    loop. It keeps the server's time now (an offset read with TIME)."""
    import subprocess
    import sys

    behind = ("import runpy, time; real = time.time; time.time = lambda: real() - 60; "
              "runpy.run_module('supersede', run_name='__main__', alter_sys=True)")  # fmt: skip
    cmd = [sys.executable, "-c", behind, "admission", "--block-ms", "100", "--metrics-port", "0"]
    system.procs.append(subprocess.Popen(cmd, env=system.env, stderr=system.stderr))
    system.start("executor", APP)

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == 2

    await eventually(registered, timeout=30)
    system.start("ingress", "--block-ms", "100")
    await _publish(redis, keys, "u1", "draft")

    async def ran() -> bool:
        return len(await _ran(redis, keys)) >= 1

    await eventually(ran, timeout=20)  # (not the minute its clock is behind)
