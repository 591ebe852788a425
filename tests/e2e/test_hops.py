"""Per-hop timing (issue 16, item 1): every run records when each hop read and wrote it, `supersede
run` shows the breakdown, and each service exports the hops it ends as a histogram."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Callable
from subprocess import Popen

from redis.asyncio import Redis

from supersede.client import publish_runs, wait_for_run
from supersede.keys import Keys
from supersede.protocol import RunRecord, RunState
from tests.support import APP, APP_WORKFLOWS, System, eventually, scrape

PATH = ["published", "ingress read", "request written", "admission read", "assigned",
        "executor read", "claimed", "handler started", "ended"]  # fmt: skip
HOPS_BY = {"ingress": ["inbox", "ingress"], "admission": ["requests", "admission"],
           "executor": ["assignments", "claim", "start"]}  # fmt: skip


async def test_a_run_records_every_hop_in_order_and_each_service_exports_its_hops(
    redis: Redis, keys: Keys, system: System
) -> None:
    ports: dict[str, int] = {}
    _, ports["admission"] = await system.serving("admission", "--block-ms", "100")
    _, ports["executor"] = await system.serving("executor", APP)

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

    await eventually(registered, timeout=30)
    _, ports["ingress"] = await system.serving("ingress", "--block-ms", "100")
    data = {"userId": "hop", "sleep": 0.05}
    _, [planned], _ = await publish_runs(redis, "chat.message", data, namespace=keys.namespace)
    run = await wait_for_run(redis, planned.run_id, 30, namespace=keys.namespace)
    assert run.state == "SUCCEEDED"
    raw = await redis.hget(keys.shard(int(run.id.split("-")[0])).runs_hash, run.id)
    path = RunRecord.decode(run.id, raw).path()
    assert [name for name, _ in path] == PATH
    times = [ms for _, ms in path]
    # one machine, one clock: each point after the last (the first step from the inbox entry's
    # whole ms, so it may read up to 1 ms early)
    assert times[1:] == sorted(times[1:]) and times[1] >= times[0], path
    assert times[-1] - times[-2] >= 50  # the handler slept
    # µs, not whole ms: the points between the inbox entry and the end are not all whole ms
    assert any(ms != int(ms) for ms in times[1:-1]), path

    shown = subprocess.run([sys.executable, "-m", "supersede", "run", run.id], env=system.env,
                           capture_output=True, check=True, timeout=60).stdout.decode()  # fmt: skip
    assert "path (ms after it was published" in shown
    point = r"^  {} +-?\d+\.\d{{3}} ms"  # (µs: three decimals)
    assert all(re.search(point.format(re.escape(p)), shown, re.M) for p in PATH), shown

    for service, hops in HOPS_BY.items():
        url = f"http://127.0.0.1:{ports[service]}/metrics"

        async def exported(url: str = url, hops: list[str] = hops) -> bool:
            text = await asyncio.to_thread(scrape, url)
            counts = dict(re.findall(r'^supersede_hop_seconds_count\{hop="(\w+)"\} (\S+)$',
                                     text, re.M))  # fmt: skip
            return all(float(counts.get(h, 0)) >= 1 for h in hops)

        await eventually(exported, timeout=20)


async def test_a_run_cancelled_while_running_shows_when_its_handler_started(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A run superseded while its handler ran ended CANCELLED with no "handler started" point
    in its path, as if it never ran (the finish script kept the point only for runs that
    ended RUNNING, not CANCELLING)."""
    await system.pipeline(redis, keys)
    data = {"userId": "superseded", "sleep": 30}
    _, [first], _ = await publish_runs(redis, "chat.message", data, namespace=keys.namespace)
    shard = int(first.run_id.split("-")[0])

    async def running() -> bool:
        raw = await redis.hget(keys.shard(shard).runs_hash, first.run_id)
        return raw is not None and RunRecord.decode(first.run_id, raw).state == RunState.RUNNING

    await eventually(running, timeout=30)
    await publish_runs(redis, "chat.message", {"userId": "superseded"}, namespace=keys.namespace)
    run = await wait_for_run(redis, first.run_id, 30, namespace=keys.namespace)
    assert run.state == "CANCELLED"
    raw = await redis.hget(keys.shard(shard).runs_hash, first.run_id)
    names = [name for name, _ in RunRecord.decode(first.run_id, raw).path()]
    assert "handler started" in names, names


async def test_hops_and_the_path_are_the_servers_time_whatever_each_hosts_clock_is(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Each service stamped a run's path and timed its hops with its own clock, against stream
    ids (the server's): an executor a minute ahead added a minute to every run's wait for an
    executor, in the metrics and in `supersede run`. Each keeps the server's time now (the
    offset it reads with TIME): here ingress is a minute ahead, admission a minute behind and
    the executor two minutes ahead."""
    from tests.support import listening

    def skewed(service: str, seconds: int, *args: str) -> Callable[[int], Popen[bytes]]:
        shifted = ("import runpy, time; real, ns = time.time, time.time_ns; "
                   f"time.time = lambda: real() + {seconds}; "
                   f"time.time_ns = lambda: ns() + {seconds * 10**9}; "
                   "runpy.run_module('supersede', run_name='__main__', alter_sys=True)"
                   )  # fmt: skip

        def start(port: int) -> Popen[bytes]:
            cmd = [sys.executable, "-c", shifted, service, *args, "--metrics-port", str(port)]
            proc = subprocess.Popen(cmd, env=system.env, stderr=system.stderr)
            system.procs.append(proc)
            return proc

        return start

    ports: dict[str, int] = {}
    _, ports["admission"] = await listening(skewed("admission", -60, "--block-ms", "100"),
                                            "/healthz")  # fmt: skip
    _, ports["executor"] = await listening(skewed("executor", 120, APP), "/healthz")

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

    await eventually(registered, timeout=30)
    _, ports["ingress"] = await listening(skewed("ingress", 60, "--block-ms", "100"), "/healthz")
    _, [planned], _ = await publish_runs(redis, "chat.message", {"userId": "skewed"},
                                         namespace=keys.namespace)  # fmt: skip
    run = await wait_for_run(redis, planned.run_id, 30, namespace=keys.namespace)
    assert run.state == "SUCCEEDED"
    raw = await redis.hget(keys.shard(int(run.id.split("-")[0])).runs_hash, run.id)
    path = RunRecord.decode(run.id, raw).path()
    published = path[0][1]
    assert all(-50 < ms - published < 5_000 for _, ms in path), path  # (not a minute off)
    for service, hops in HOPS_BY.items():
        text = await asyncio.to_thread(scrape, f"http://127.0.0.1:{ports[service]}/metrics")
        for hop in hops:
            [total] = re.findall(rf'^supersede_hop_seconds_sum\{{hop="{hop}"\}} (\S+)$', text, re.M)
            assert float(total) < 5, (service, hop, total)
