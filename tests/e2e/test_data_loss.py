"""A server that comes back empty (killed, restarted without its data) under running services:
they recreate what they need, the executors' workflows included, and the events published
after it run. Before, the executors registered their workflows only when they started, so
ingress acknowledged every later event with no workflow to run it, until an executor was
restarted by hand."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import orjson
import redis as redis_sync
from redis.asyncio import Redis

from supersede.keys import Keys
from supersede.server import EmbeddedServer
from tests.support import APP, APP_WORKFLOWS, System, eventually, records
from tests.support.proxy import FreezableProxy


async def test_services_carry_on_when_the_server_restarts_empty() -> None:
    keys = Keys("lost", 4)
    server = EmbeddedServer().start()
    system = System(server.url, keys)
    redis = Redis.from_url(server.url)
    try:
        system.start("admission", "--block-ms", "100")
        system.start("executor", APP)

        async def registered() -> bool:
            return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

        await eventually(registered, timeout=30)
        system.start("ingress", "--block-ms", "100")
        await redis.xadd(keys.events_stream, {"name": "work.item", "data": b"{}"})
        await eventually(lambda: _succeeded(redis, keys, 1), timeout=30)

        assert server.proc is not None
        server.proc.kill()
        server.stop()  # (its folder goes too)
        server = EmbeddedServer(port=server.port).start()  # the same address, no data
        await redis.aclose()
        redis = Redis.from_url(server.url)
        for i in range(5):
            data = orjson.dumps({"k": f"after-{i}"})
            await redis.xadd(keys.events_stream, {"name": "work.item", "data": data})
        # the executors register their workflows again, and ingress waited for them: none of
        # the five events was acknowledged with no workflow to run it
        await eventually(lambda: _succeeded(redis, keys, 5), timeout=30)
        assert int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS
        assert all(p.poll() is None for p in system.procs)
    finally:
        system.close()
        await redis.aclose()
        server.stop()


async def _succeeded(redis: Redis, keys: Keys, n: int) -> bool:
    try:
        runs = await records(redis, keys)
    except redis_sync.ConnectionError:
        return False
    return sum(1 for r in runs.values() if r["st"] == "S") >= n


async def test_a_busy_executor_is_not_ready_while_the_server_is_down(tmp_path: Path) -> None:
    """Every slot busy, the executor makes no call but its heartbeat's: a failed heartbeat
    makes /readyz answer 503 (it stayed 200 through the outage), and a good one 200 again.
    The outage is said in lines, not tracebacks (the look for a dead executor's assignments
    and the bells' loss wrote theirs: an operator's probe)."""
    import asyncio
    import urllib.error
    import urllib.request

    keys = Keys("busy", 4)
    server = EmbeddedServer().start()
    system = System(server.url, keys)
    system.stderr.close()
    system.stderr = (tmp_path / "stderr.log").open("ab")
    redis = Redis.from_url(server.url)

    def status() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    async def answers(code: int) -> bool:
        return await asyncio.to_thread(status) == code

    try:
        system.start("admission", "--block-ms", "100")
        _, port = await system.serving("executor", APP, "--slots", "1", "--lease", "3")

        async def registered() -> bool:
            return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

        await eventually(registered, timeout=30)
        system.start("ingress", "--block-ms", "100")
        data = orjson.dumps({"k": "busy", "sleep": 60})
        await redis.xadd(keys.events_stream, {"name": "stubborn.item", "data": data})

        async def running() -> bool:
            return any(r["st"] == "R" for r in (await records(redis, keys)).values())

        await eventually(running, timeout=30)
        await eventually(lambda: answers(200), timeout=10)
        assert server.proc is not None
        server.proc.kill()  # (the executor's one slot is busy: its fetch loop waits, no call)
        await eventually(lambda: answers(503), timeout=15)
        server.stop()
        server = EmbeddedServer(port=server.port).start()
        await eventually(lambda: answers(200), timeout=20)
        system.stderr.flush()
        said = (tmp_path / "stderr.log").read_text()
        assert "assignment bells lost" in said  # (the outage was seen)
        assert "Traceback" not in said, said[-3000:]
    finally:
        system.close()
        await redis.aclose()
        server.stop()


async def test_services_carry_on_when_the_server_goes_silent(
    redis_server: EmbeddedServer, keys: Keys
) -> None:
    """Every connection the services hold goes silent without closing (a dead host, a cut
    network, a failover behind a virtual IP), while new connections reach the server: each
    service's calls time out (the URL's socket_timeout), it connects again and the events
    published after it run; then each stops at SIGTERM. Before, the hot calls' connections had
    no timeout: the pipeline stalled for good and SIGTERM waited forever."""
    proxy = await FreezableProxy(redis_server.port).start()
    system = System(proxy.url("?socket_timeout=1"), keys)
    redis = Redis.from_url(redis_server.url)
    try:
        await system.pipeline(redis, keys)
        for i in range(5):
            data = orjson.dumps({"k": f"before-{i}"})
            await redis.xadd(keys.events_stream, {"name": "work.item", "data": data})
        await eventually(lambda: _succeeded(redis, keys, 5), timeout=30)
        proxy.freeze()
        for i in range(5):
            data = orjson.dumps({"k": f"after-{i}"})
            await redis.xadd(keys.events_stream, {"name": "work.item", "data": data})
        # (each ends: a step whose own connection hung at the freeze fails, as it should)
        await eventually(lambda: _ended(redis, keys, 10), timeout=60)
        for proc in system.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in system.procs:
            assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        system.close()
        await redis.aclose()
        await proxy.stop()


async def _ended(redis: Redis, keys: Keys, n: int) -> bool:
    runs = await records(redis, keys)
    return sum(1 for r in runs.values() if r["st"] in ("S", "F", "X")) >= n


async def test_an_executor_stops_within_its_drain_deadline_while_the_server_is_silent() -> None:
    """SIGTERM to an executor with runs in flight while the server is stopped (SIGSTOP): the
    drain's deadline counted from after the fetch loop's read in flight (up to --block-ms + 5
    s) and a heartbeat hung on the silent server held it a socket timeout past that, so a 30 s
    drain took up to 49 s (a kubelet's 40 s grace kills it first). The deadline now counts from
    the signal and no call outlives it: the process exits within it plus one socket timeout."""
    keys = Keys("silentdrain", 4)
    server = EmbeddedServer().start()
    system = System(server.url, keys)
    redis = Redis.from_url(server.url)
    assert server.proc is not None
    try:
        system.start("admission", "--block-ms", "100")
        executor = system.start("executor", APP, "--drain-timeout", "8", "--block-ms", "5000")

        async def registered() -> bool:
            return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

        await eventually(registered, timeout=30)
        system.start("ingress", "--block-ms", "100")
        for i in range(4):
            data = orjson.dumps({"k": f"long-{i}", "sleep": 30})
            await redis.xadd(keys.events_stream, {"name": "work.item", "data": data})

        async def running() -> bool:
            runs = await records(redis, keys)
            if sum(1 for r in runs.values() if r["st"] == "R") != 4:
                return False
            # (and each step past its first line, a sync write to the test log: one stopped
            # by the SIGSTOP held the executor's loop two socket timeouts, 1 in 5 runs)
            log = await redis.lrange(f"{keys.namespace}:test:log", 0, -1)
            return sum(1 for line in log if line.startswith(b"started:")) == 4

        await eventually(running, timeout=30)
        server.proc.send_signal(signal.SIGSTOP)
        started = asyncio.get_running_loop().time()
        executor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(executor.wait, 40) == 0
        took = asyncio.get_running_loop().time() - started
        assert took < 8 + 4, took  # (the drain, then the lease keeper's last beat at most)
    finally:
        server.proc.send_signal(signal.SIGCONT)
        system.close()
        await redis.aclose()
        server.stop()


async def test_a_run_read_by_a_frozen_idle_executor_starts_on_another_within_seconds(
    redis: Redis, keys: Keys, system: System
) -> None:
    """An idle executor with a free slot per stream waits in one XREADGROUP BLOCK, which the
    server answers even while the executor is frozen (SIGSTOP, a hung VM): the new run it
    was handed waited for the 30 s take-over (`--claim-idle-ms`) while another executor sat
    idle (a fleet probe: the newest run of a CANCEL_IN_PROGRESS key, 30.05 s). Assignments
    are taken over after 2 s now: a claim is fenced, so a taken-over run still runs once."""
    # alone first, its blocking reads a minute long: the only client blocked in XREADGROUP
    frozen = system.start("executor", APP, "--slots", "40", "--block-ms", "60000")

    async def blocked_reading() -> bool:
        if int(await redis.hlen(keys.workflows_hash)) != APP_WORKFLOWS:
            return False
        clients = await redis.client_list()
        return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in clients)

    await eventually(blocked_reading, timeout=30)  # (9 workflows x 4 shards: 36 streams)
    frozen.send_signal(signal.SIGSTOP)
    try:
        system.start("admission", "--block-ms", "100", "--reap-interval", "0.1")
        system.start("ingress", "--block-ms", "100")
        await redis.xadd(keys.events_stream, {"name": "work.item", "data": b"{}"})

        async def held() -> bool:  # (delivered to the frozen executor's blocked read)
            for sk in keys.all_shards():
                stream = sk.assignments_stream("work")
                if (
                    await redis.exists(stream)
                    and (await redis.xpending(stream, "executors"))["pending"]
                ):
                    return True
            return False

        await eventually(held, timeout=30)
        system.start("executor", APP, "--slots", "40")
        await eventually(lambda: _succeeded(redis, keys, 1), timeout=15)
    finally:
        frozen.send_signal(signal.SIGCONT)
    [rec] = (await records(redis, keys)).values()
    assert (rec["st"], rec["a"]) == ("S", 1)
