"""`supersede serve`: ingress, admission and an executor as tasks of one process (issue 16,
item 3: the all-in-one mode for small deployments). The chat scenario settles, the three
services' metrics are on one port, and SIGTERM drains a run in flight: the executor finishes
it and admission, stopped last, applies its result before the process exits."""

from __future__ import annotations

import asyncio
import signal

import pytest
from redis.asyncio import Redis

from supersede.client import get_run, publish_runs, wait_for_run
from supersede.keys import Keys
from supersede.server import free_port
from tests.support import APP, APP_WORKFLOWS, System, eventually, scrape


async def test_one_process_runs_the_system_and_drains_on_sigterm(
    redis: Redis, keys: Keys, system: System
) -> None:
    port = free_port()
    proc = system.start_with_port("serve", port, APP, "--slots", "20")

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

    await eventually(registered, timeout=30)
    ns = keys.namespace
    planned = []
    for i in range(3):  # one user's messages: only the newest may finish
        _, runs, _ = await publish_runs(redis, "chat.message", {"userId": "s", "sleep": 2, "i": i},
                                        namespace=ns)  # fmt: skip
        planned += runs
    newest = await wait_for_run(redis, planned[-1].run_id, 30, namespace=ns)
    assert newest.state == "SUCCEEDED"
    older = [await wait_for_run(redis, p.run_id, 10, namespace=ns) for p in planned[:-1]]
    assert [r.state for r in older] == ["CANCELLED", "CANCELLED"]
    assert all(r.superseded_by for r in older)

    text = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
    for service in ("ingress", "admission", "executor"):
        assert f"supersede_{service}_" in text, service

    _, [inflight], _ = await publish_runs(redis, "chat.message", {"userId": "t", "sleep": 1},
                                          namespace=ns)  # fmt: skip

    async def running() -> bool:
        run = await get_run(redis, inflight.run_id, namespace=ns)
        return run is not None and run.state == "RUNNING"

    await eventually(running)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    done = await get_run(redis, inflight.run_id, namespace=ns)
    assert (
        done is not None and done.state == "SUCCEEDED"
    )  # finished, and its result applied before the exit


async def test_a_failing_part_stops_the_others_as_sigterm_does(
    redis: Redis, redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingress fails while a run is in flight: the executor still drains it and admission,
    stopped last, applies its result; then the failure is raised (the process exits with it)."""
    # the demo app's steps log to the test's server, not to a default one
    monkeypatch.setenv("SUPERSEDE_TEST_LOG_URL", redis_url)
    monkeypatch.setenv("SUPERSEDE_NAMESPACE", keys.namespace)
    from supersede.config import Settings
    from supersede.services.executor.service import ExecutorConfig
    from supersede.services.ingress.service import IngressConfig
    from supersede.services.ingress.service import serve as serve_ingress
    from supersede.services.modules import load_workflows
    from supersede.services.serve import all_in_one

    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    ns = keys.namespace
    in_flight: list[str] = []

    async def failing_ingress(stop: asyncio.Event) -> None:
        mine = asyncio.Event()
        task = asyncio.create_task(serve_ingress(settings, IngressConfig(block_ms=100), mine))
        _, [run], _ = await publish_runs(redis, "chat.message", {"userId": "f", "sleep": 1},
                                         namespace=ns)  # fmt: skip
        in_flight.append(run.run_id)

        async def running() -> bool:
            got = await get_run(redis, run.run_id, namespace=ns)
            return got is not None and got.state == "RUNNING"

        await eventually(running, timeout=30)
        mine.set()
        await task
        raise RuntimeError("ingress broke")

    stop = asyncio.Event()
    config = ExecutorConfig(slots=4, drain_timeout=30)
    with pytest.raises(RuntimeError, match="ingress broke"):
        await asyncio.wait_for(
            all_in_one(settings, load_workflows(APP), config, stop, ingress=failing_ingress), 60
        )
    done = await get_run(redis, in_flight[0], namespace=ns)
    assert done is not None and done.state == "SUCCEEDED"  # drained, and its result applied
    assert stop.is_set()
