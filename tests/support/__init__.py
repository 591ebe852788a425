"""What the tests share: builders, pollers, the subprocess harness. Test files import helpers
from here only, never from one another."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from supersede.keys import Keys
from supersede.model import group_id, run_id, shard_of_group
from supersede.protocol import RunRequest, Strategy


def make_request(
    keys: Keys,
    *,
    workflow: str = "wf",
    key: str = "k",
    event: str,
    seq: int,
    max_runs: int = 1,
    strategy: Strategy = Strategy.CANCEL_IN_PROGRESS,
    strict: bool = False,
    max_attempts: int = 3,
    version: str = "1",
    payload: bytes = b"{}",
    unlimited: bool = False,
    debounce_ms: int = 0,
    max_wait_ms: int = 0,
    scope: str | None = None,
) -> tuple[int, RunRequest]:
    """A request routed the way ingress routes it: (shard, request)."""
    gid = group_id(workflow, version, key, scope)
    shard = shard_of_group(gid, keys.shards)
    req = RunRequest(
        run_id=run_id(shard, event, workflow),
        group=gid,
        seq=f"{seq:032x}",
        workflow=workflow,
        version=version,
        key=key,
        event_id=event,
        max_runs=max_runs,
        strategy=strategy,
        strict=strict,
        max_attempts=max_attempts,
        input=payload,
        unlimited=unlimited,
        debounce_ms=debounce_ms,
        max_wait_ms=max_wait_ms,
        scoped=bool(scope),
    )
    return shard, req


async def snapshot(redis: Redis, keys: Keys) -> dict[str, object]:
    """Every key of the namespace with its full content, to prove a call wrote nothing."""
    out: dict[str, object] = {}
    patterns = [f"{{{keys.namespace}:*", f"{keys.namespace}:*"]
    for pattern in patterns:
        async for raw in redis.scan_iter(match=pattern, count=1000):
            key = raw.decode()
            kind = (await redis.type(key)).decode()
            if kind == "hash":
                out[key] = await redis.hgetall(key)
            elif kind == "zset":
                out[key] = await redis.zrange(key, 0, -1, withscores=True)
            elif kind == "stream":
                groups = await redis.xinfo_groups(key)
                out[key] = (
                    await redis.xrange(key),
                    sorted((g["name"], g["pending"], g["last-delivered-id"]) for g in groups),
                )
            else:
                out[key] = await redis.dump(key)
    return out


async def records(redis: Redis, keys: Keys) -> dict[str, dict[str, object]]:
    """All run records of the namespace, decoded."""
    from supersede import codec

    out: dict[str, dict[str, object]] = {}
    for sk in keys.all_shards():
        for rid, raw in (await redis.hgetall(sk.runs_hash)).items():
            out[rid.decode()] = codec.unpack(raw)
    return out


async def pending_count(redis: Any, streams: Iterable[str], group: str) -> int:
    """Entries delivered to `group` on `streams` and not yet acknowledged, in all."""
    return sum([int((await redis.xpending(s, group))["pending"]) for s in streams])


async def run_count(redis: Any, keys: Keys) -> int:
    """Run records of the namespace, over every shard."""
    return sum([int(await redis.hlen(sk.runs_hash)) for sk in keys.all_shards()])


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll `check` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def requests_in_streams(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """Every run request appended to the shard streams, decoded."""
    from supersede import codec
    from supersede.protocol import request_payloads

    out = []
    for sk in keys.all_shards():
        for _, fields in await redis.xrange(sk.requests_stream):
            out += [codec.unpack(p) for p in request_payloads(fields) or []]
    return out


async def scrape_when(url: str, check: Callable[[str], bool], timeout: float = 10) -> str:
    """The metrics page once `check` holds for it: a counter is incremented after the effect a
    test waits for (the reply of the write that made it), so one scrape may come too early."""
    body = ""

    async def holds() -> bool:
        nonlocal body
        body = await asyncio.to_thread(scrape, url)
        return check(body)

    await eventually(holds, timeout=timeout)
    return body


async def listening(
    start: Callable[[int], subprocess.Popen[bytes]], path: str, tries: int = 3
) -> tuple[subprocess.Popen[bytes], int]:
    """A process `start(port)` began on a free port, once GET `path` there answers 200. A port is
    only free when picked: another process (a test's server, a client connection's ephemeral
    port) may take it before the process binds, which then exits; that is retried on another."""
    import urllib.error
    import urllib.request

    from supersede.server import free_port

    def answers(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return int(resp.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    for _ in range(tries):
        port = free_port()
        proc = start(port)
        deadline = time.monotonic() + 30
        while proc.poll() is None:
            if await asyncio.to_thread(answers, f"http://127.0.0.1:{port}{path}"):
                return proc, port
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{proc.args!r} did not answer {path} on {port} within 30s")
            await asyncio.sleep(0.05)
    raise AssertionError(f"{proc.args!r} exited {tries} times (rc {proc.returncode}); see stderr")


def scrape(url: str) -> str:
    """GET a metrics endpoint, retrying while the server starts (blocking: use a thread)."""
    import urllib.request

    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return str(resp.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


REPO = Path(__file__).resolve().parents[2]
APP = "tests.support.apps.demo"
APP_WORKFLOWS = 9  # the workflows APP defines
CLI = [sys.executable, "-m", "supersede"]


def workflow_body(**overrides: Any) -> dict[str, Any]:
    """A valid stored-definition body (the registry's dict form), with fields overridden."""
    body: dict[str, Any] = {
        "id": "chat-reply",
        "events": ["chat.message"],
        "concurrency": {"expression": "input.userId", "max_runs": 1},
        "steps": [{"name": "reply"}, {"name": "store", "parents": ["reply"], "retries": 2}],
    }
    body.update(overrides)
    return body


def exposed() -> dict[str, str]:
    """Metric name -> type of every supersede_ metric the services register in this process."""
    from prometheus_client import REGISTRY, generate_latest

    import supersede.services.admission.metrics
    import supersede.services.executor.metrics
    import supersede.services.ingress.metrics  # noqa: F401 - importing registers the metrics

    text = generate_latest(REGISTRY).decode()
    return dict(re.findall(r"^# TYPE (supersede_\S+) (\S+)$", text, re.MULTILINE))


# The head of a workflow module a test writes to a file: a connection of its own, and the
# test's log list.
MODULE_HEAD = (
    "import os, time\n"
    "from supersede import Concurrency, Workflow\n"
    "from supersede.config import connect_sync\n"
    "r = connect_sync(os.environ['SUPERSEDE_REDIS_URL'])\n"
    "LOG = os.environ['SUPERSEDE_NAMESPACE'] + ':test:log'\n"
)


class System:
    """Subprocesses of one test's namespace; all killed at the end."""

    def __init__(self, url: str, keys: Keys) -> None:
        self.env = {**os.environ, "SUPERSEDE_REDIS_URL": url, "SUPERSEDE_NAMESPACE": keys.namespace,
                    "SUPERSEDE_SHARDS": str(keys.shards)}  # fmt: skip
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stderr = open(os.environ.get("SUPERSEDE_TEST_STDERR", os.devnull), "ab")  # noqa: SIM115

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "supersede", *args, "--metrics-port", "0"]
        proc = subprocess.Popen(cmd, env=self.env, stderr=self.stderr)
        self.procs.append(proc)
        return proc

    def start_with_port(self, service: str, port: int, *args: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "supersede", service, *args, "--metrics-port", str(port)]
        proc = subprocess.Popen(cmd, env=self.env, stderr=self.stderr)
        self.procs.append(proc)
        return proc

    async def serving(self, service: str, *args: str) -> tuple[subprocess.Popen[bytes], int]:
        """A service with its metrics on a free port, once that port answers /healthz (a port
        taken between the pick and the bind is retried on another)."""
        return await listening(lambda port: self.start_with_port(service, port, *args), "/healthz")

    async def pipeline(
        self,
        redis: Redis,
        keys: Keys,
        executors: int = 1,
        *executor_args: str,
        expected_workflows: int = APP_WORKFLOWS,
    ) -> list[subprocess.Popen[bytes]]:
        """Admission and executors, then ingress once the executors registered the workflows
        (an event of a workflow not registered yet, while others are, is acknowledged, not
        run)."""
        self.start("admission", "--block-ms", "100", "--reap-interval", "0.1")
        procs = [self.start("executor", APP, *executor_args) for _ in range(executors)]

        async def registered() -> bool:
            return int(await redis.hlen(keys.workflows_hash)) == expected_workflows

        await eventually(registered, timeout=30)
        self.start("ingress", "--block-ms", "100")
        return procs

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(5)
        self.stderr.close()


class RoundTrips:
    """Counts the round trips of asyncio clients while in use (`with RoundTrips() as trips:`
    ... `trips.sent`): each send of one command, or of one pipeline, is one."""

    def __init__(self) -> None:
        self.sent = 0
        self._patch: Any = None

    def __enter__(self) -> RoundTrips:
        import pytest
        from redis.asyncio.connection import Connection

        send = Connection.send_packed_command

        async def counted(conn: Connection, command: Any, check_health: bool = True) -> None:
            self.sent += 1
            await send(conn, command, check_health)

        self._patch = pytest.MonkeyPatch()
        self._patch.setattr(Connection, "send_packed_command", counted)
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch.undo()
