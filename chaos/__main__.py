"""`python -m chaos [--duration 180] [--cluster]`: run the whole system under faults, then check
it against the ledger and print one `CHAOS {json}` line (exit 1 when a check fails).

The system: a real redis-server with AOF `appendfsync always` (or a 3-master cluster), ingress
x2, admission x2, executors x4 with three workflow modules (pool A: chaos/pool_a.py twice, pool B:
chaos/pool_b.py, pool C: chaos/pool_c.py, whose steps run in worker processes). The workflows
cover every strategy, a dynamic max_runs, debounce and a scope shared by two workflows.
Producers publish for thousands of keys through the Python client, raw XADD and the redis-cli
binary, and republish old ids. Faults at random times: SIGKILL and SIGTERM of every service
kind, SIGSTOP of an admission process for longer than a lease, a server crash and restart (on a
cluster: a master, and a shard's slot moved to another master). Then the faults stop,
everything is brought back, and the run waits until every expected run has ended.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis as redis_sync
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from chaos import ledger
from chaos.verdict import TRIGGERS, WORKFLOWS, Observed, check, ok
from supersede import client
from supersede.config import connect
from supersede.keys import Keys
from supersede.protocol import RunRecord, request_payloads
from supersede.server import (
    EmbeddedCluster,
    EmbeddedServer,
    die_with_parent,
    find_cli_binary,
    free_port,
)

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "chaos"
SHARDS = 8


@dataclass
class Member:
    """One service process slot: restarted after every fault."""

    kind: str
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = field(default_factory=free_port)


@dataclass
class Run:
    args: argparse.Namespace
    work: Path
    server: EmbeddedServer | None = None
    cluster: EmbeddedCluster | None = None
    members: list[Member] = field(default_factory=list)
    kills: dict[int, float] = field(default_factory=dict)
    crashes: list[tuple[float, float]] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    published: dict[str, str] = field(default_factory=dict)
    payloads: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    duplicates: int = 0
    terminal_seen: dict[str, str] = field(default_factory=dict)
    terminal_changes: set[str] = field(default_factory=set)
    stopped: bool = False  # faults and producers stop
    rng: random.Random = field(default_factory=random.Random)
    made: list[dict[str, Any]] = field(default_factory=list)  # each fault: what, when, where

    # -- processes -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.cluster:
            return f"redis+cluster://127.0.0.1:{self.cluster.nodes[0].port}"
        assert self.server
        return self.server.url

    def env(self) -> dict[str, str]:
        return {**os.environ, "SUPERSEDE_REDIS_URL": self.url, "SUPERSEDE_NAMESPACE": NAMESPACE,
                "SUPERSEDE_SHARDS": str(SHARDS), "CHAOS_LEDGER": str(self.work / "ledger.jsonl"),
                "PYTHONPATH": str(ROOT)}  # fmt: skip

    def spawn(self, m: Member) -> None:
        log = open(self.work / f"{m.kind}.log", "ab")  # noqa: SIM115 - owned by the child
        cmd = [sys.executable, "-m", "supersede", m.kind, *m.args,
               "--metrics-port", str(m.metrics_port)]  # fmt: skip
        # die_with_parent: a runner killed (a test timeout, Ctrl-C) takes its services along
        m.proc = subprocess.Popen(cmd, env=self.env(), cwd=ROOT, stdout=log, stderr=log,
                                  preexec_fn=die_with_parent)  # fmt: skip
        log.close()

    def start_all(self) -> None:
        lease = str(self.args.lease)
        # 3 s of drain covers every handler (at most --long s, below it) in a SIGTERM.
        drain = str(self.args.long + 3)
        adm = ["--block-ms", "200", "--reap-interval", "0.2", "--claim-idle-ms", "2000",
               "--assign-deadline", str(max(2, self.args.lease))]  # fmt: skip
        ing = ["--block-ms", "200", "--claim-idle-ms", "2000", "--dedup-window", "3600"]
        exe = ["--lease", lease, "--slots", "200", "--claim-idle-ms", "2000",
               "--drain-timeout", drain]  # fmt: skip
        proc = ["--slots", "8", "--grace", "0.5", "--kill-after", "0.5"]
        self.members = [
            Member("admission", adm), Member("admission", adm),
            Member("executor", ["chaos.pool_a", *exe]), Member("executor", ["chaos.pool_a", *exe]),
            Member("executor", ["chaos.pool_b", *exe]),
            # one worker process per slot; a short grace, so the SIGTERM/SIGKILL ladder runs
            Member("executor", ["chaos.pool_c", *exe, *proc]),
            Member("ingress", ing), Member("ingress", ing),
        ]  # fmt: skip
        for m in self.members:
            self.spawn(m)

    def revive(self) -> None:
        """Every member running (and not stopped) again."""
        for m in self.members:
            assert m.proc
            if m.proc.poll() is not None:
                self.spawn(m)
            else:
                os.kill(m.proc.pid, signal.SIGCONT)

    def stop_all(self) -> None:
        for m in self.members:
            if m.proc and m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait(10)

    # -- faults --------------------------------------------------------------------------------
    async def faults_loop(self) -> None:
        """Faults in rounds: each round makes every fault once, in a random order."""
        kinds = ["ingress", "admission", "executor"]
        menu: list[tuple[str, str | None]] = [("sigkill", k) for k in kinds]
        menu += [("sigterm", k) for k in kinds] + [("sigstop", "admission"), ("crash", None)]
        menu += [("pause", None)]
        if self.cluster:
            menu += [("migrate", None), ("freeze", None)]
        while not self.stopped:
            for fault, kind in self.rng.sample(menu, len(menu)):
                await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.args.fault_every)
                if self.stopped:
                    return
                made = {"fault": fault, "kind": kind, "at": time.time()}
                try:
                    await getattr(self, f"_{fault}")(*([kind] if kind else []))
                except Exception as exc:  # counted: the verdict shows which faults were made
                    self.faults[f"not_made_{fault}"] += 1
                    made["not_made"] = repr(exc)
                    print(f"chaos: fault {fault} not made: {exc!r}", file=sys.stderr)
                self.made.append(made | {"until": time.time()})  # (kept with --keep)

    def _member(self, kind: str | None = None) -> Member:
        live = [m for m in self.members if (kind is None or m.kind == kind) and m.proc
                and m.proc.poll() is None]  # fmt: skip
        return self.rng.choice(live)

    async def _sigkill(self, kind: str) -> None:
        m = self._member(kind)
        assert m.proc
        self.kills[m.proc.pid] = time.time()
        m.proc.kill()
        m.proc.wait(10)
        self.faults[f"sigkill_{m.kind}"] += 1
        self.spawn(m)

    async def _sigterm(self, kind: str) -> None:
        m = self._member(kind)
        assert m.proc
        m.proc.terminate()
        self.faults[f"sigterm_{m.kind}"] += 1
        deadline = time.monotonic() + self.args.long + 10
        while m.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if m.proc.poll() is None:  # a drain that did not end: counted, then killed
            self.faults["sigterm_not_exited"] += 1
            self.kills[m.proc.pid] = time.time()
            m.proc.kill()
            m.proc.wait(10)
        self.spawn(m)

    async def _sigstop(self, kind: str) -> None:
        m = self._member(kind)
        assert m.proc
        os.kill(m.proc.pid, signal.SIGSTOP)
        self.faults["sigstop_admission"] += 1
        await asyncio.sleep(self.args.lease * 1.5)
        os.kill(m.proc.pid, signal.SIGCONT)

    async def _crash(self) -> None:
        """SIGKILL a server (a master on a cluster) and start it again on its AOF."""
        node = self.server or self.cluster.nodes[self.rng.randrange(3)]  # type: ignore[union-attr]
        assert node and node.proc
        down = time.time()
        node.proc.kill()
        node.proc.wait(10)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(node.start, 30.0)
        if self.cluster:
            await asyncio.to_thread(_wait_cluster_ok, node.port)
        self.crashes.append((down, time.time()))
        self.faults["server_crash"] += 1

    async def _freeze(self) -> None:
        """SIGSTOP a cluster master for a lease and a half (a frozen VM: its connections stay
        open), then SIGCONT: its shards' runs may lose their leases (an outage, for the
        verdict), the other masters' shards go on."""
        assert self.cluster
        node = self.cluster.nodes[self.rng.randrange(3)]
        assert node.proc
        down = time.time()
        os.kill(node.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(self.args.lease * 1.5)
        finally:
            os.kill(node.proc.pid, signal.SIGCONT)
        self.crashes.append((down, time.time()))
        self.faults["sigstop_node"] += 1

    async def _pause(self) -> None:
        """CLIENT PAUSE the server (a random master on a cluster) for half a lease: a server
        busy with an fsync, a slow disk, a loaded host. Shorter than two thirds of a lease (the
        README's bound, with margin for a loaded host), it is no outage:
        no run may be stopped and run again for it (not in `crashes`). Such a pause of one
        master stopped every run on it in a probe (lease.py's turn keys held the renewals)."""
        node = self.server or self.cluster.nodes[self.rng.randrange(3)]  # type: ignore[union-attr]
        ms = int(self.args.lease * 500)
        with redis_sync.Redis(port=node.port) as client:
            client.execute_command("CLIENT", "PAUSE", ms, "ALL")
        await asyncio.sleep(ms / 1000)
        self.faults["server_pause"] += 1

    async def _migrate(self) -> None:
        assert self.cluster
        keys = Keys(NAMESPACE, SHARDS)
        tag = keys.shard(self.rng.randrange(SHARDS)).tag
        slot = int(redis_sync.Redis(port=self.cluster.nodes[0].port).cluster("keyslot", tag))
        ports = self.cluster.master_ports()
        source = _owner(self.cluster.nodes[0].port, slot)
        target = self.rng.choice([p for p in ports if p != source])
        await asyncio.to_thread(self.cluster.migrate_slot, slot, source, target)
        self.faults["slot_migration"] += 1

    # -- producers -----------------------------------------------------------------------------
    def _event(self, n: int) -> tuple[str, str, bytes]:
        rng = self.rng
        name = rng.choices(["chat", "doc", "job", "queue", "edit", "pa", "pb"],
                           weights=[5, 2, 3, 2, 2, 1, 1])[0]  # fmt: skip
        if name == "edit":  # a few keys: bursts the debounce window collapses
            user = f"e{rng.randrange(8)}"
        elif name in ("pa", "pb"):  # the two workflows of one scope compete for these keys
            user = f"p{rng.randrange(6)}"
        elif name == "queue":  # groups full often enough that queued runs get cancelled
            user = f"q{rng.randrange(10)}"
        elif rng.random() < 0.3:
            user = f"hot{rng.randrange(50)}"
        else:
            user = f"u{rng.randrange(3000)}"
        roll = rng.random()
        if roll < 0.8:
            ms = rng.randrange(0, 200)
        elif roll < 0.95:
            ms = rng.randrange(200, 2000)
        else:  # longer than a lease
            ms = rng.randrange(int(self.args.lease * 1200), int(self.args.long * 1000))
        doc: dict[str, object] = {"user": user, "ms": ms}
        if name in ("pa", "pb"):  # 0 honours the cancel flag, 1 ignores it, 2 SIGTERM too
            doc["stubborn"] = rng.choices([0, 1, 2], weights=[6, 3, 1])[0]
        return f"ev{n}", name, orjson.dumps(doc)

    async def producer(self, way: str, first: int) -> None:
        """Publish until stopped: `client` (Python client), `xadd` (raw XADD), `cli` (the
        redis-cli binary, slower). Failed publications are retried with the same id."""
        redis = connect(self.url)
        n = first
        try:
            while not self.stopped:
                if self.published and self.rng.random() < 0.03:
                    event_id = self.rng.choice(list(self.published))  # a late duplicate
                    name, data = self.payloads[event_id]
                    if self.rng.random() < 0.5:  # ... with another payload, so another key
                        data = orjson.dumps({"user": f"other{n}", "ms": 0})
                    self.duplicates += 1
                else:
                    event_id, name, data = self._event(n)
                    n += 1
                await self._publish(redis, way, event_id, name, data)
                self.published.setdefault(event_id, name)
                self.payloads.setdefault(event_id, (name, data))
                await asyncio.sleep(1 / self.args.rate)
        finally:
            await redis.aclose()

    async def _publish(self, redis: Any, way: str, event_id: str, name: str, data: bytes) -> None:
        for _ in range(600):
            try:
                if way == "client":
                    await client.publish(redis, name, orjson.loads(data), id=event_id,
                                         namespace=NAMESPACE)  # fmt: skip
                elif way == "xadd":
                    await redis.xadd(f"{NAMESPACE}:events",
                                     {"name": name, "data": data, "id": event_id})  # fmt: skip
                else:
                    await asyncio.to_thread(self._cli_xadd, event_id, name, data)
                return
            except Exception:
                await asyncio.sleep(0.1)
        raise RuntimeError(f"could not publish {event_id}")

    def _cli_xadd(self, event_id: str, name: str, data: bytes) -> None:
        node = self.cluster.nodes[0] if self.cluster else self.server
        assert node
        cli = find_cli_binary(node.binary)
        fields = ["name", name, "data", data.decode(), "id", event_id]
        cluster = ["-c"] if self.cluster else []
        cmd = [cli, "-p", str(node.port), *cluster, "XADD", f"{NAMESPACE}:events", "*", *fields]
        out = subprocess.run(cmd, capture_output=True, timeout=10)
        # Only an entry id is a success: redis-cli exits 0 on an error reply (e.g. LOADING).
        if out.returncode != 0 or not re.fullmatch(rb"\d+-\d+\s*", out.stdout):
            raise RuntimeError(out.stdout.decode() + out.stderr.decode())

    # -- observation ---------------------------------------------------------------------------
    async def records(self, redis: Any) -> list[RunRecord]:
        out = []
        for sk in Keys(NAMESPACE, SHARDS).all_shards():
            for rid, raw in (await redis.hgetall(sk.runs_hash)).items():
                out.append(RunRecord.decode(rid, raw))
        return out

    async def watch(self) -> None:
        """Every second: runs seen terminal must never be seen in another state later."""
        redis = connect(self.url)
        try:
            while True:
                try:
                    for r in await self.records(redis):
                        seen = self.terminal_seen.get(r.id)
                        if seen is not None and seen != r.state.value:
                            self.terminal_changes.add(r.id)
                        if r.state.terminal:
                            self.terminal_seen[r.id] = r.state.value
                except Exception:
                    pass  # the server is down: look again later
                await asyncio.sleep(1.0)
        finally:
            await redis.aclose()

    async def settled(self, redis: Any) -> bool:
        want = sum(len(TRIGGERS[name]) for name in self.published.values())
        recs = await self.records(redis)
        return len(recs) >= want and all(r.state.terminal for r in recs)

    async def slots(self, redis: Any) -> dict[str, int]:
        out: dict[str, int] = {}
        for sk in Keys(NAMESPACE, SHARDS).all_shards():
            for g, n in (await redis.hgetall(sk.slots_hash)).items():
                out[g.decode()] = out.get(g.decode(), 0) + int(n)
        return out


def _owner(port: int, slot: int) -> int:
    c = redis_sync.Redis(port=port)
    try:
        for lo, hi, master, *_ in c.execute_command("CLUSTER", "SLOTS"):  # type: ignore[no-untyped-call]
            if int(lo) <= slot <= int(hi):
                return int(master[1])
    finally:
        c.close()
    raise LookupError(slot)


def _wait_cluster_ok(port: int, timeout: float = 30.0) -> None:
    c = redis_sync.Redis(port=port)
    deadline = time.monotonic() + timeout
    try:
        while b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):  # type: ignore[no-untyped-call]
            if time.monotonic() > deadline:
                raise TimeoutError("cluster not ok after a restart")
            time.sleep(0.1)
    finally:
        c.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="supersede-chaos-"))
    r = Run(args, work)
    r.rng.seed(args.seed)
    aof = ["--appendonly", "yes", "--appendfsync", "always"]
    if args.cluster:
        # (a node frozen for a lease and a half is not declared failed: with no replica, the
        # whole cluster would refuse commands until it answers)
        r.cluster = EmbeddedCluster(3, extra_args=[*aof, "--cluster-node-timeout", "30000"])
        r.cluster.start()
    else:
        r.server = EmbeddedServer()
        r.server.extra_args = aof
        r.server.start()
    redis = connect(r.url)
    started = time.monotonic()
    try:
        r.start_all()
        if not await _until(lambda: _registered(redis), 60):
            raise RuntimeError(f"the executors did not register their workflows; see {work}")
        # An event read by an ingress that has not loaded them yet is unrouted, and dropped.
        if not await _until(lambda: _ingress_routes_all(r), 60):
            raise RuntimeError(f"the ingress processes did not load the workflows; see {work}")
        tasks = [asyncio.create_task(r.producer(way, i * 10_000_000))
                 for i, way in enumerate(["client", "xadd", "cli"])]  # fmt: skip
        tasks.append(asyncio.create_task(r.faults_loop()))
        watcher = asyncio.create_task(r.watch())
        await asyncio.sleep(args.duration)
        r.stopped = True
        await asyncio.gather(*tasks)
        r.revive()
        settled = await _until(lambda: r.settled(redis), args.settle)
        watcher.cancel()
        recs = await _retrying(lambda: r.records(redis))
        slots = await _retrying(lambda: r.slots(redis))
        observed = Observed(
            published=dict(r.published),
            duplicates=r.duplicates,
            records=recs,
            ledger=ledger.read(str(work / "ledger.jsonl")),
            slots=slots,
            kills=dict(r.kills),
            crashes=list(r.crashes),
            lease=args.lease,
            terminal_changes=len(r.terminal_changes),
            faults=dict(r.faults),
            late=_late_heartbeats(work / "executor.log"),
            drain_left=_drain_left(work / "executor.log"),
        )
        verdict = check(observed)
        if verdict["runs_lost"]:
            verdict["lost_trace"] = await _retrying(lambda: _trace(redis, verdict))
        (work / "published.json").write_bytes(orjson.dumps(r.published))
        (work / "faults.json").write_bytes(orjson.dumps(r.made))  # (for a kept run's reading)
        verdict |= {
            "mode": "cluster" if args.cluster else "single",
            "duration_s": args.duration,
            "wall_s": round(time.monotonic() - started, 1),
            "seed": args.seed,
            "states": dict(Counter(rec.state.name for rec in recs)),
            "cancelled": dict(Counter(r.workflow for r in recs if r.state.name == "CANCELLED")),
        }
        verdict["settled"] = settled  # every expected run ended within --settle
        verdict["ok"] = settled and ok(verdict)
        return verdict
    finally:
        r.stop_all()
        await redis.aclose()
        if r.cluster:
            r.cluster.stop()
        elif r.server:
            r.server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"chaos: logs and ledger kept in {work}", file=sys.stderr)


async def _trace(redis: Any, verdict: dict[str, Any]) -> dict[str, Any]:
    """Where the events of lost runs are: still in the inbox (and pending there?), dead
    letters, requests in a shard's stream; for the next person to look at a failure."""
    ids = {x.split(":", 1)[0].encode() for x in verdict["lost_examples"]}
    keys = Keys(NAMESPACE, SHARDS)
    inbox = [(e, f) for e, f in await redis.xrange(keys.events_stream) if f.get(b"id") in ids]
    pending = await redis.xpending_range(keys.events_stream, "ingress", "-", "+", 10_000)
    pending_ids = {p["message_id"] for p in pending}
    dead = [f for _, f in await redis.xrange(keys.dead_stream) if f.get(b"id") in ids]
    requests = 0
    for sk in keys.all_shards():
        for _, f in await redis.xrange(sk.requests_stream):
            requests += sum(1 for r in request_payloads(f) or [] if any(i in r for i in ids))
    return {
        "inbox_entries": len(inbox),
        "inbox_pending": sum(1 for e, _ in inbox if e in pending_ids),
        "dead_letters": [f.get(b"reason", b"").decode() for f in dead],
        "requests_in_streams": requests,
    }


async def _registered(redis: Redis | RedisCluster) -> bool:
    return int(await redis.hlen("{%s}:workflows" % NAMESPACE)) >= len(WORKFLOWS)  # noqa: UP031


def _drain_left(log: Path) -> dict[int, list[str]]:
    """pid -> run ids whose results were not yet applied when its drain deadline passed."""
    out: dict[int, list[str]] = {}
    for line in log.read_bytes().splitlines() if log.exists() else []:
        if b"drain deadline passed" not in line:
            continue
        with contextlib.suppress(ValueError, KeyError):
            x = orjson.loads(line)
            out.setdefault(int(x["pid"]), []).extend(x.get("run_ids", []))
    return out


def _late_heartbeats(log: Path) -> dict[int, list[tuple[float, float]]]:
    """pid -> (from, to) of each span an executor logged renewing no lease for too long."""
    out: dict[int, list[tuple[float, float]]] = {}
    for line in log.read_bytes().splitlines() if log.exists() else []:
        if b"heartbeat late" not in line:
            continue
        with contextlib.suppress(ValueError, KeyError):
            x = orjson.loads(line)
            out.setdefault(int(x["pid"]), []).append((x["ts"] - x["late_s"], x["ts"]))
    return out


async def _ingress_routes_all(r: Run) -> bool:
    """Every ingress process has loaded every workflow (its metrics say so)."""
    for m in r.members:
        if m.kind == "ingress":
            url = f"http://127.0.0.1:{m.metrics_port}/metrics"
            try:
                text = await asyncio.to_thread(_get, url)
            except OSError:
                return False
            want = rf"^supersede_ingress_workflows {len(WORKFLOWS)}\.0$"
            if not re.search(want, text, re.MULTILINE):
                return False
    return True


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return str(resp.read().decode())


async def _until(check_fn: Any, timeout: float) -> bool:
    """Poll until check_fn() is true (True) or the timeout passed (False)."""
    deadline = time.monotonic() + timeout
    while not await _retrying(check_fn):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)
    return True


async def _retrying(fn: Any, attempts: int = 60) -> Any:
    """fn() again while the server is unreachable (this process's own connections may have
    died with a crashed server)."""
    for attempt in range(attempts):
        try:
            return await fn()
        except (redis_sync.ConnectionError, redis_sync.TimeoutError, OSError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=180, help="seconds of faults (default 180)")
    p.add_argument("--cluster", action="store_true", help="a 3-master cluster, not one server")
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--rate", type=float, default=20, help="events/s per producer (3 producers)")
    p.add_argument("--lease", type=float, default=3, help="executor lease, seconds")
    p.add_argument("--long", type=float, default=15, help="longest handler, seconds")
    p.add_argument("--fault-every", type=float, default=2.0, help="mean seconds between faults")
    p.add_argument("--settle", type=float, default=240, help="seconds to wait for the end")
    p.add_argument("--keep", action="store_true", help="keep the logs and the ledger")
    args = p.parse_args(argv)
    verdict = asyncio.run(run(args))
    print("CHAOS " + orjson.dumps(verdict).decode(), flush=True)
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
