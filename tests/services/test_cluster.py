"""The key layout on a real cluster: one shard, one node; shards spread over the masters."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis as sync_redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from supersede.keys import Keys
from supersede.scripts import Scripts
from supersede.server import EmbeddedCluster
from tests.support import APP, System, eventually, make_request, records, run_count


async def test_keys_of_one_shard_share_a_node_and_shards_spread_over_the_masters(
    redis_cluster: EmbeddedCluster,
) -> None:
    client = RedisCluster.from_url(redis_cluster.url)
    await client.initialize()  # the slot map is loaded by the first command otherwise
    try:
        keys = Keys("layout", 16)
        nodes_of_shard = {}
        for sk in keys.all_shards():
            names = [*sk.state_keys(), sk.requests_stream, sk.results_stream, sk.ids_hash]
            ports = {client.get_node_from_key(name).port for name in names}
            assert len(ports) == 1, (sk.shard, ports)
            nodes_of_shard[sk.shard] = ports.pop()
        assert set(nodes_of_shard.values()) == {n.port for n in redis_cluster.nodes}
        # and the scripts run there unchanged
        scripts = Scripts(client, keys)
        shard, req = make_request(keys, event="e", seq=1)
        result = await scripts.admit(shard, [("0-1", req.pack())])
        assert result.created == 1 and result.assigned == 1
    finally:
        await client.aclose()


async def test_admission_runs_on_the_cluster(redis_cluster: EmbeddedCluster) -> None:
    import asyncio
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    from tests.support import eventually

    keys = Keys("clusteradm", 16)
    url = f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0].port}"
    env = {**os.environ, "SUPERSEDE_REDIS_URL": url, "SUPERSEDE_NAMESPACE": keys.namespace,
           "SUPERSEDE_SHARDS": "16"}  # fmt: skip
    client = RedisCluster.from_url(redis_cluster.url)
    # an earlier version's de-duplication sets, which admission deletes at its start (its
    # cluster pipeline's UNLINK was a coroutine never awaited: nothing deleted, a warning in
    # plain text on stderr at every start; a cluster probe)
    legacy = [sk.legacy_seen_zset for sk in keys.all_shards()]
    for key in legacy:
        await client.zadd(key, {"x": 1})
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally)
    proc = subprocess.Popen(
        [sys.executable, "-m", "supersede", "admission", "--metrics-port", "0",
         "--block-ms", "100"],
        env=env, stderr=stderr,
    )  # fmt: skip
    try:

        async def groups_ready() -> bool:
            stream = keys.shard(15).requests_stream
            return bool(await client.exists(stream)) and bool(await client.xinfo_groups(stream))

        await eventually(groups_ready, timeout=30)

        async def legacy_deleted() -> bool:
            return await client.exists(*legacy) == 0

        await eventually(legacy_deleted, timeout=10)
        stderr.seek(0)
        assert b"never awaited" not in stderr.read()
        reqs = [make_request(keys, event=f"e{i}", seq=i, key=f"user{i % 8}") for i in range(40)]
        for shard, req in reqs:
            await client.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})

        async def all_admitted() -> bool:
            return await run_count(client, keys) == len(reqs)

        await eventually(all_admitted, timeout=30)
        from supersede import codec

        states = {}
        for shard, req in reqs:
            states[req.run_id] = codec.unpack(
                await client.hget(keys.shard(shard).runs_hash, req.run_id)
            )["st"]
        # CANCEL_IN_PROGRESS, max_runs=1, 8 users x 5 events: each user's newest is assigned
        assert sorted(states.values()) == ["A"] * 8 + ["C"] * 32
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        proc.kill()
        proc.wait(5)
        stderr.close()
        await client.aclose()


async def test_the_services_survive_a_master_failover_with_runs_in_flight() -> None:
    """SIGKILL of a master while its shards have running runs: its replica takes over, the
    services reconnect and carry on, and every event still ends as exactly one run, the newest
    of each user succeeded and the older one cancelled by it."""
    try:
        cluster = EmbeddedCluster(3, replicas=1).start(timeout=60)
    except (FileNotFoundError, OSError) as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"NO FAILOVER TEST: cannot start a cluster here ({exc})")
    keys = Keys("failover", 16)
    client = RedisCluster.from_url(cluster.url)
    system = System(f"redis+cluster://127.0.0.1:{cluster.nodes[0].port}", keys)
    try:
        await client.initialize()

        def port_of(key: str) -> int:
            return int(client.get_node_from_key(key).port)

        # The victim owns shards but not the inbox or the test log, which the test writes.
        spared = {port_of(keys.events_stream), port_of(f"{keys.namespace}:test:log")}
        victim = next(p for p in cluster.master_ports() if p not in spared)
        users = [f"user{i}" for i in range(12)]
        await system.pipeline(client, keys, 2, "--slots", "30", "--lease", "6")

        async def publish(user: str, sleep: float, text: str) -> None:
            data = orjson.dumps({"userId": user, "sleep": sleep, "text": text})
            await client.xadd(keys.events_stream, {"name": "chat.message", "data": data})

        for user in users:
            await publish(user, 30.0, "old")  # (longer than the wait below: never ends S)

        async def all_running() -> bool:
            recs = await records(client, keys)
            return len(recs) == len(users) and all(r["st"] == "R" for r in recs.values())

        await eventually(all_running, timeout=30)
        shards_hit = {int(rid.split("-")[0]) for rid in await records(client, keys)}
        assert any(port_of(keys.shard(s).runs_hash) == victim for s in shards_hit)
        node = sync_redis.Redis(port=victim)
        assert node.wait(1, 5000) == 1  # its replica has every write so far
        node.close()
        proc = cluster.node(victim).proc
        assert proc is not None
        proc.kill()
        proc.wait()
        # Newer messages while the failover is under way: each must cancel its user's old run.
        for user in users:
            await publish(user, 0.05, "new")

        async def settled() -> bool:
            try:
                recs = await records(client, keys)
            except (RedisError, OSError):  # the victim's slots have no owner yet
                return False
            return len(recs) == 2 * len(users) and all(r["st"] in ("S", "C") for r in recs.values())

        # Well inside the 30 s after which XAUTOCLAIM would take over anything left behind.
        await eventually(settled, timeout=20)
        assert victim not in cluster.master_ports()
        by_user: dict[str, list[tuple[str, dict[str, object]]]] = {}
        for rid, rec in (await records(client, keys)).items():
            by_user.setdefault(str(rec["k"]), []).append((rid, rec))
        for user in users:
            (_, old), (new_id, new) = sorted(by_user[user], key=lambda x: str(x[1]["s"]))
            assert (old["st"], new["st"]) == ("C", "S"), (user, old, new)
            assert old["by"] == new_id
    finally:
        system.close()
        await client.aclose()
        cluster.stop()


async def test_the_services_carry_on_while_a_shards_slot_moves_to_another_node() -> None:
    """A shard's slot is resharded to another master while events flow: scripts meet ASK,
    TRYAGAIN and MOVED, are retried, and every event still ends as exactly one run."""
    cluster = EmbeddedCluster(3).start()
    keys = Keys("reshard", 4)
    client = RedisCluster.from_url(cluster.url)
    system = System(f"redis+cluster://127.0.0.1:{cluster.nodes[0].port}", keys)
    stop_publishing = asyncio.Event()
    published: list[str] = []
    try:
        await client.initialize()
        await system.pipeline(client, keys, 2, "--slots", "30")
        users = [f"user{i}" for i in range(16)]

        async def publisher() -> None:
            i = 0
            while not stop_publishing.is_set():
                user = users[i % len(users)]
                data = orjson.dumps({"userId": user, "sleep": 0.02, "text": f"m{i}"})
                try:
                    entry = await client.xadd(
                        keys.events_stream, {"name": "chat.message", "data": data}
                    )
                except (RedisError, OSError):
                    continue  # a producer retries; the inbox's slot may be the one moving
                published.append(entry.decode())
                i += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(publisher())
        await eventually(lambda: _runs_at_least(client, keys, 20), timeout=30)
        # Move the slot of the shard with the most runs so far.
        counts = [await client.hlen(sk.runs_hash) for sk in keys.all_shards()]
        shard = counts.index(max(counts))
        slot = key_slot(keys.shard(shard).runs_hash.encode())
        source = int(client.get_node_from_key(keys.shard(shard).runs_hash).port)
        target = next(p for p in cluster.master_ports() if p != source)
        await asyncio.to_thread(cluster.migrate_slot, slot, source, target)
        more = len(published) + 40
        await eventually(lambda: _runs_at_least(client, keys, more), timeout=30)
        stop_publishing.set()
        await task

        async def settled() -> bool:
            recs = await records(client, keys)
            return len(recs) == len(published) and all(r["st"] in ("S", "C") for r in recs.values())

        await eventually(settled, timeout=30)
        recs = await records(client, keys)
        assert sorted(str(r["ev"]) for r in recs.values()) == sorted(published)
        newest: dict[str, dict[str, object]] = {}
        for rec in recs.values():
            if str(rec["k"]) not in newest or str(rec["s"]) > str(newest[str(rec["k"])]["s"]):
                newest[str(rec["k"])] = rec
        assert all(rec["st"] == "S" for rec in newest.values())
        assert int(client.get_node_from_key(keys.shard(shard).runs_hash).port) == target
    finally:
        stop_publishing.set()
        system.close()
        await client.aclose()
        cluster.stop()


async def _runs_at_least(client: RedisCluster, keys: Keys, n: int) -> bool:
    try:
        return await run_count(client, keys) >= n
    except (RedisError, OSError):
        return False


def test_a_cluster_node_reached_with_a_single_server_url_is_one_line(
    redis_cluster: EmbeddedCluster,
) -> None:
    """`redis://` to a node of a cluster: the command and the service each say to write the
    cluster scheme, exit 2 (a MovedError traceback)."""
    import os
    import subprocess
    import sys

    url = f"redis://127.0.0.1:{redis_cluster.nodes[0].port}/0"
    env = {**os.environ, "SUPERSEDE_REDIS_URL": url, "SUPERSEDE_NAMESPACE": "moved"}
    for args in (["status"], ["publish", "some.event", "{}"], ["admission", "--metrics-port", "0"]):
        done = subprocess.run([sys.executable, "-m", "supersede", *args], env=env,
                              capture_output=True, timeout=60)  # fmt: skip
        err = done.stderr.decode()
        assert done.returncode == 2 and "Traceback" not in err, (args, err[-2000:])
        assert "redis+cluster://" in err.strip().splitlines()[-1], err


async def test_retire_deletes_a_workflows_streams_on_a_cluster(
    redis_cluster: EmbeddedCluster,
) -> None:
    """`retire` on a cluster: its assignment streams, on every master, are deleted (a cluster
    pipeline's unlink is a coroutine: none was queued, every stream stayed, and the command
    said they were deleted)."""
    from supersede.registry import register
    from supersede.services.ops import retire

    client = RedisCluster.from_url(redis_cluster.url)
    await client.initialize()
    try:
        keys = Keys("retired", 16)
        await register(client, keys, {"id": "gone", "events": ["gone.ev"]})
        streams = [sk.assignments_stream("gone") for sk in keys.all_shards()]
        for stream in streams:
            await client.xadd(stream, {"id": "x"})
        assert await retire(client, keys, "gone") == {
            "retired": "gone", "cancelled": 0, "before": False,
        }  # fmt: skip
        assert [s for s in streams if await client.exists(s)] == []
        assert await client.hget(keys.workflows_hash, "gone") is None
    finally:
        await client.aclose()


def _cluster_with_running_runs(
    namespace: str, turn: int
) -> tuple[EmbeddedCluster, Any, Keys, list[tuple[int, str, int, int]]]:
    """A 3-master cluster whose nodes are not declared failed while frozen (a cluster down
    would refuse every call), with a RUNNING run of executor `ex-1` on each of 6 shards:
    (cluster, client, keys, the rows a lease keeper's `leased()` gives for them)."""
    from supersede import codec

    try:
        cluster = EmbeddedCluster(3, extra_args=["--cluster-node-timeout", "30000"]).start()
    except (FileNotFoundError, OSError) as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"NO CLUSTER TEST: cannot start a cluster here ({exc})")
    keys = Keys(namespace, 6)
    client = sync_redis.RedisCluster.from_url(cluster.url)
    try:
        leased = []
        for shard in range(keys.shards):
            record = {"st": "R", "a": 1, "e": "ex-1", "w": "wf", "g": "g", "s": "0" * 32}
            client.hset(keys.shard(shard).runs_hash, f"{shard}-r", codec.pack(record))
            leased.append((shard, f"{shard}-r", 1, turn))
    except BaseException:
        client.close()
        cluster.stop()
        raise
    return cluster, client, keys, leased


def test_a_beat_renews_the_other_nodes_runs_while_a_master_is_frozen() -> None:
    """A master that stops answering without closing its connections (SIGSTOP here; a silent
    network link alike): the lease keeper's beat waited for it, with the client's retries and
    backoff, until it answered again, and renewed no run of any node meanwhile (a probe: 20 s
    at a 3 s lease, every run of the deployment stopped by the lease watch and retried). Its
    calls now fail after a sixth of a lease, and the other nodes' runs are renewed within the
    lease."""
    import os
    import signal
    import threading
    import time

    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.lease import LeaseKeeper

    cluster, client, keys, leased = _cluster_with_running_runs("frozen", turn=0)
    stopped = None
    try:
        renewed: list[str] = []
        runner: Any = type("R", (), {"active": {}, "leased": lambda self: list(leased),
                                     "mark_renewed": lambda self, began: None,
                                     "mark_leased": lambda self, runs, asked, gone:
                                         renewed.extend(rid for rid, _ in runs)})()  # fmt: skip
        url = cluster.url.replace("redis://", "redis+cluster://")
        keeper = LeaseKeeper(url, keys, "ex-1", ExecutorConfig(lease_ms=3_000), runner,
                             lambda rid, attempt: None)  # fmt: skip
        keeper.beat()
        assert sorted(renewed) == sorted(rid for _, rid, _, _ in leased)

        def port_of(shard: int) -> int:
            return int(client.get_node_from_key(keys.shard(shard).runs_hash).port)

        port = port_of(0)
        frozen = {rid for shard, rid, _, _ in leased if port_of(shard) == port}
        [stopped] = [n for n in cluster.nodes if n.port == port]
        assert stopped.proc is not None
        os.kill(stopped.proc.pid, signal.SIGSTOP)
        renewed.clear()
        failed: list[BaseException] = []

        def beat() -> None:
            try:
                keeper.beat()
            except Exception as exc:
                failed.append(exc)

        began = time.monotonic()
        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        thread.join(10)
        took = time.monotonic() - began
        assert not thread.is_alive(), "the beat waited for the frozen master"
        # (a call deadline and a half: one pipeline per master, at once; a cluster pipeline
        # took 2.5 s here, each of the frozen master's commands tried again on a new
        # connection; not a failed beat: the executor stays ready)
        assert took < 1.5 and not failed, (took, failed)
        assert set(renewed) == {rid for _, rid, _, _ in leased} - frozen and frozen
        # The next beats ask the frozen master still, but do not wait for it: each beat waited
        # a call deadline for it, twice with turn keys to read, too long at a short lease.
        renewed.clear()
        began = time.monotonic()
        keeper.beat()
        assert time.monotonic() - began < 0.3
        assert set(renewed) == {rid for _, rid, _, _ in leased} - frozen
        # Its runs all on the frozen master (the others' ended): not a failed beat while the
        # service found those shards silent and others answer it (a probe: 503 for that).
        leased[:] = [run for run in leased if run[1] in frozen]
        keeper.silent = lambda: {shard for shard, _, _, _ in leased}
        keeper.beat()
        keeper.silent = frozenset  # (unknown to the service: none renewed is a failed beat)
        with pytest.raises(Exception):  # noqa: B017 - whichever the client raises
            keeper.beat()
    finally:
        if stopped is not None and stopped.proc is not None:
            os.kill(stopped.proc.pid, signal.SIGCONT)
        client.close()
        cluster.stop()


def test_a_master_slow_for_a_third_of_a_lease_stops_no_run() -> None:
    """A master that answers nothing for 1.2 s, 0.4 of a 3 s lease (CLIENT PAUSE here; a
    loaded host, an fsync): its runs went two beats without a renewal, and the lease watch
    stopped them (at 0.9 of a lease) to run again elsewhere (a chaos run: 13 runs started
    twice, in three executors at once). The turn keys' read held the master's one call, and
    the next beat's renewal was refused for it; a renewal sent to a master in doubt was not
    waited for, nor counted when it answered. Now the renewals go on, and count once answered:
    no run goes 0.9 of a lease without a stamp."""
    import threading
    import time

    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.lease import LeaseKeeper

    cluster, client, keys, leased = _cluster_with_running_runs("slow", turn=7)  # (a turn: its
    keeper = None  # key is read first)
    try:
        stamps: dict[str, list[float]] = {rid: [] for _, rid, _, _ in leased}
        lock = threading.Lock()

        def mark_leased(runs: Any, asked: float, gone: Any) -> None:
            with lock:
                for rid, _ in runs:
                    stamps[rid].append(asked)

        runner: Any = type("R", (), {"active": {}, "leased": lambda self: list(leased),
                                     "mark_renewed": lambda self, began: None,
                                     "mark_leased": lambda self, runs, asked, gone:
                                         mark_leased(runs, asked, gone)})()  # fmt: skip
        url = cluster.url.replace("redis://", "redis+cluster://")
        lease = 3.0
        keeper = LeaseKeeper(url, keys, "ex-1", ExecutorConfig(lease_ms=int(lease * 1000)),
                             runner, lambda rid, attempt: None)  # fmt: skip

        def port_of(shard: int) -> int:
            return int(client.get_node_from_key(keys.shard(shard).runs_hash).port)

        port = port_of(0)
        slow = {rid for shard, rid, _, _ in leased if port_of(shard) == port}
        start = time.monotonic()
        for n in range(6):  # (a beat each third of a lease: twice the keeper's gap)
            time.sleep(max(0.0, start + n * lease / 3 - time.monotonic()))
            if n == 2:
                with sync_redis.Redis(port=port) as node:
                    node.execute_command("CLIENT", "PAUSE", 1200, "ALL")
            with contextlib.suppress(Exception):  # (a beat that renewed none raises)
                keeper.beat()
        time.sleep(0.5)  # (a renewal answered late is counted on the keeper's pool)
        for rid in slow:
            times = [start, *sorted(stamps[rid])]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert max(gaps) < 0.9 * lease, (rid, [round(g, 2) for g in gaps])
        assert slow and all(stamps[rid] for rid in stamps)
    finally:
        if keeper is not None:
            keeper._halt.set()
            if keeper._nodes is not None:
                keeper._nodes.close()
            keeper._client.close()
        client.close()
        cluster.stop()


@pytest.mark.parametrize(
    ("slots", "frozen"),
    # (fewer free slots than streams, and more; the master each client asks where a stream
    # read's keys are (redis-py's default node), and another)
    [("30", "default"), ("400", "other")],
)
async def test_the_other_masters_shards_run_while_a_master_is_frozen(
    slots: str, frozen: str
) -> None:
    """A master that stops answering without closing its connections (SIGSTOP; a frozen VM, a
    link that drops packets) held every shard's work until it answered again: the executor
    read every stream in one pipeline, and ingress's batch waited for its appends to every
    shard (a probe: 0.1-0.2 runs/s started on the healthy shards for 20 s, against 13.5).
    Now the calls of a shard whose node does not answer fail after a deadline, and that shard
    is left out until a probe of it is answered: the other masters' users are served while it
    is frozen, and its own users once it answers again. The master redis-py asked where the
    keys of every stream read are (its default node) held every read too, until the services
    found them themselves."""
    async with _freezable(default=frozen == "default") as f:
        client, keys, system = f.client, f.keys, f.system
        await system.pipeline(client, keys, 1, "--slots", slots, "--lease", "6")
        publish = functools.partial(_chat, client, keys)
        users = [f"user{i}" for i in range(40)]
        for user in users:
            await publish(user, "first")

        async def ended(n: int) -> bool:
            recs = await records(client, keys)
            return len(recs) == n and all(r["st"] == "S" for r in recs.values())

        await eventually(lambda: ended(len(users)), timeout=30)
        shard_of = {str(r["k"]): int(rid.split("-")[0]) for rid, r in
                    (await records(client, keys)).items()}  # fmt: skip
        on_frozen = {u for u in users if f.port_of(shard_of[u]) == f.port}
        healthy = [u for u in users if u not in on_frozen]
        assert on_frozen and healthy

        f.freeze()
        # The executor alone: only the healthy masters' users publish.
        for user in healthy:
            await publish(user, "second")

        async def served(times: int) -> bool:
            count = await _succeeded(client, keys, {shard_of[u] for u in healthy})
            return all(count.get(u, 0) == times for u in healthy)

        await eventually(lambda: served(2), timeout=8)
        # Ingress too: each batch also holds events of the frozen master's users.
        for user in users:
            await publish(user, "third")
        await eventually(lambda: served(3), timeout=8)
        f.freeze(False)
        await eventually(lambda: ended(3 * len(users) - len(on_frozen)), timeout=30)


async def _all_ended(client: RedisCluster, keys: Keys) -> bool:
    return all(r["st"] in ("S", "C") for r in (await records(client, keys)).values())


def _shard_apart(keys: Keys, shards: set[int]) -> int:
    """One of `shards` whose slot holds none of the deployment-wide keys."""
    deployment = {key_slot(k.encode()) for k in
                  (keys.events_stream, keys.workflows_hash, keys.config_hash)}  # fmt: skip
    return next(s for s in sorted(shards) if key_slot(keys.shard(s).runs_hash.encode())
                not in deployment)  # fmt: skip


async def _read_by_ingress(client: RedisCluster, keys: Keys) -> bool:
    """Ingress read every inbox entry and acknowledged it."""
    from supersede.protocol import INGRESS_GROUP

    last = (await client.xinfo_stream(keys.events_stream))["last-generated-id"]
    groups = await client.xinfo_groups(keys.events_stream)
    return any(g["name"] == INGRESS_GROUP.encode() and int(g["pending"]) == 0
               and g["last-delivered-id"] == last for g in groups)  # fmt: skip


def _half_move(
    cluster: EmbeddedCluster, client: RedisCluster, key: str, *, importing: bool = True
) -> list[sync_redis.Redis]:
    """Leave the slot of `key` half moved to another master (IMPORTING there unless not
    `importing`, MIGRATING on its own; no key moved: a reshard that stopped); clients of its
    master and of the other."""
    slot = key_slot(key.encode())
    source = int(client.get_node_from_key(key).port)
    target = next(p for p in cluster.master_ports() if p != source)
    nodes = [sync_redis.Redis(port=source), sync_redis.Redis(port=target)]
    src_id, dst_id = (n.execute_command("CLUSTER", "MYID").decode() for n in nodes)
    if importing:
        nodes[1].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    nodes[0].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    return nodes


async def _chat(client: RedisCluster, keys: Keys, user: str, text: str) -> str:
    """A chat message of `user` (the test app's chat.message, a 10 ms handler); its entry id."""
    data = orjson.dumps({"userId": user, "sleep": 0.01, "text": text})
    entry = await client.xadd(keys.events_stream, {"name": "chat.message", "data": data})
    return str(entry.decode())


async def _succeeded(client: RedisCluster, keys: Keys, shards: set[int]) -> dict[str, int]:
    """Key -> runs SUCCEEDED, read from the runs of `shards` only."""
    from supersede import codec

    count: dict[str, int] = {}
    for shard in shards:
        for raw in (await client.hgetall(keys.shard(shard).runs_hash)).values():
            rec = codec.unpack(raw)
            if rec["st"] == "S":
                count[str(rec["k"])] = count.get(str(rec["k"]), 0) + 1
    return count


def _namespace_to_freeze(
    client: RedisCluster, cluster: EmbeddedCluster, *, default: bool
) -> tuple[Keys, int]:
    """A namespace, and a master to freeze that holds none of its deployment-wide keys (the
    inbox, the registry, the config) nor the test's log: the client's default node, or
    another."""

    def port_of(key: str) -> int:
        return int(client.get_node_from_key(key).port)

    first = int(client.get_default_node().port)
    for i in range(1000):
        keys = Keys(f"frozen{i}", 16)
        spared = {port_of(k) for k in (keys.events_stream, f"{keys.namespace}:test:log",
                                       keys.workflows_hash, keys.config_hash)}  # fmt: skip
        free = [p for p in cluster.master_ports() if p not in spared]
        port = first if first in free else None
        if not default:
            port = next((p for p in free if p != first), None)
        if port is not None:
            return keys, port
    raise AssertionError("no namespace fits")


async def test_a_dead_executors_runs_are_retried_on_the_other_masters_while_one_is_frozen() -> None:
    """Admission's reaper reaped every shard in one gather, so a silent master held the
    reaping of all of them (retries of lapsed leases, assignments never claimed, retention):
    a dead executor's runs on the healthy masters waited for the frozen one to answer. Now a
    silent master's shards are left out of the tick and the others are reaped as usual."""
    async with _freezable() as f:
        client, keys, system = f.client, f.keys, f.system
        [first] = await system.pipeline(client, keys, 1, "--lease", "3", "--slots", "40")
        users = [f"user{i}" for i in range(24)]
        for user in users:
            data = orjson.dumps({"userId": user, "sleep": 60.0, "text": "long"})
            await client.xadd(keys.events_stream, {"name": "chat.message", "data": data})

        async def running() -> bool:
            recs = await records(client, keys)
            return len(recs) == len(users) and all(r["st"] == "R" for r in recs.values())

        await eventually(running, timeout=30)
        healthy = {
            int(rid.split("-")[0])
            for rid in await records(client, keys)
            if f.port_of(int(rid.split("-")[0])) != f.port
        }
        assert healthy and len(healthy) < len(
            {int(r.split("-")[0]) for r in await records(client, keys)}
        )
        first.kill()
        first.wait(5)
        f.freeze()
        system.start("executor", APP, "--lease", "3", "--slots", "40")

        async def retried() -> bool:
            from supersede import codec

            for shard in healthy:
                for raw in (await client.hgetall(keys.shard(shard).runs_hash)).values():
                    if int(codec.unpack(raw)["a"]) < 2:
                        return False
            return True

        await eventually(retried, timeout=12)  # (a lease, the reaper's deadline, a start)


async def test_a_frozen_masters_shards_are_served_once_its_replica_takes_over() -> None:
    """A master frozen (SIGSTOP) and replaced by its replica while it stays frozen (a failover
    the cluster decides; forced here with CLUSTER FAILOVER TAKEOVER): its shards, left out as
    silent, are served by the new master. The probes of a silent shard wait longer than a
    socket timeout, so the client reads the cluster's slots again and reaches the new master
    (a probe bounded by the call deadline never let it). Runs longer than a lease there then
    keep their leases: the lease keeper reads the slots again too (its calls on a master's own
    connection never made it, and every renewal went to the old master)."""
    async with _freezable(replicas=1) as f:
        client, keys, system, cluster = f.client, f.keys, f.system, f.cluster
        await system.pipeline(client, keys, 1, "--lease", "3", "--slots", "40")
        users = [f"user{i}" for i in range(24)]

        async def publish(text: str, sleep: float = 0.01, only: list[str] | None = None) -> None:
            for user in users if only is None else only:
                data = orjson.dumps({"userId": user, "sleep": sleep, "text": text})
                await client.xadd(keys.events_stream, {"name": "chat.message", "data": data})

        async def ended(n: int) -> bool:
            try:
                recs = await records(client, keys)
            except (RedisError, OSError):
                return False
            return len(recs) == n and all(r["st"] == "S" for r in recs.values())

        await publish("first")
        await eventually(lambda: ended(len(users)), timeout=30)
        shard_of = {str(r["k"]): int(rid.split("-")[0]) for rid, r in
                    (await records(client, keys)).items()}  # fmt: skip
        moved = [u for u in users if f.port_of(shard_of[u]) == f.port]
        assert moved
        replica = next(
            n.port for n in cluster.nodes if n.port not in cluster.master_ports()
            and _master_of(n.port) == f.port
        )  # fmt: skip
        f.freeze()
        await publish("second")
        await asyncio.sleep(3)  # (its shards found silent)
        node = sync_redis.Redis(port=replica)
        assert node.execute_command("CLUSTER FAILOVER TAKEOVER")
        node.close()
        await eventually(lambda: ended(2 * len(users)), timeout=30)
        await publish("long", sleep=8.0, only=moved)  # (over two leases, on the new master)
        await eventually(lambda: ended(2 * len(users) + len(moved)), timeout=30)
        from supersede import codec

        for shard in {shard_of[u] for u in moved}:
            for rid, raw in (await client.hgetall(keys.shard(shard).runs_hash)).items():
                assert int(codec.unpack(raw)["a"]) == 1, (rid, "retried: its lease lapsed")


def _master_of(port: int) -> int:
    """The port of the master a replica node replicates."""
    node = sync_redis.Redis(port=port)
    try:
        info = node.info("replication")
        return int(info["master_port"])
    finally:
        node.close()


@dataclass
class _Freezable:
    """A cluster, a namespace of it, its services, and one master to freeze (holding none of
    the namespace's deployment-wide keys)."""

    cluster: EmbeddedCluster
    client: RedisCluster
    keys: Keys
    port: int
    system: System
    frozen: bool = False

    def port_of(self, shard: int) -> int:
        return int(self.client.get_node_from_key(self.keys.shard(shard).runs_hash).port)

    def freeze(self, stop: bool = True) -> None:
        proc = self.cluster.node(self.port).proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP if stop else signal.SIGCONT)
        self.frozen = stop


@contextlib.asynccontextmanager
async def _freezable(*, replicas: int = 0, default: bool = False) -> AsyncIterator[_Freezable]:
    """A `_Freezable` (no node declared failed while one is frozen: the cluster node timeout
    is a minute); the master thawed and everything stopped at the end. `default`: freeze the
    client's default node."""
    try:
        cluster = EmbeddedCluster(
            3, replicas=replicas, extra_args=["--cluster-node-timeout", "60000"]
        ).start(timeout=60)
    except (FileNotFoundError, OSError) as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"NO CLUSTER TEST: cannot start a cluster here ({exc})")
    client = RedisCluster.from_url(cluster.url)
    await client.initialize()
    keys, port = _namespace_to_freeze(client, cluster, default=default)
    system = System(f"redis+cluster://127.0.0.1:{cluster.nodes[0].port}", keys)
    frozen = _Freezable(cluster, client, keys, port, system)
    try:
        yield frozen
    finally:
        if frozen.frozen:
            frozen.freeze(False)
        system.close()
        await client.aclose()
        cluster.stop()


async def test_a_command_run_while_a_master_is_frozen_does_not_blame_the_url() -> None:
    """`supersede status` run while the master redis-py pings first (its default node) was
    frozen exited 2 with "timed out reaching Redis ...; check SUPERSEDE_REDIS_URL" though the
    URL was good and the other masters answered (a cluster probe). The start's PING tries the
    other masters; what the command then reads of the frozen master fails or waits as any
    command on a silent node does."""
    async with _freezable(default=True) as f:
        await f.system.pipeline(f.client, f.keys, 1)
        seed = next(n.port for n in f.cluster.nodes[:3] if n.port != f.port)  # (answers)
        env = {**f.system.env, "SUPERSEDE_REDIS_URL": f"redis+cluster://127.0.0.1:{seed}"}
        f.freeze()
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "supersede", "status"], env=env,
            capture_output=True, timeout=120,
        )  # fmt: skip
        said = done.stderr.decode()
        assert done.returncode == 1, said  # (Redis failed the command; 2: a bad setting)
        assert "check SUPERSEDE_REDIS_URL" not in said, said
        assert "a master of the cluster did not answer" in said, said
        assert said.count("\n") == 1, said
        # the URL naming the frozen master: that node, not "redis+cluster:// only for a cluster"
        env["SUPERSEDE_REDIS_URL"] = f"redis+cluster://127.0.0.1:{f.port}"
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "supersede", "status"], env=env,
            capture_output=True, timeout=120,
        )  # fmt: skip
        said = done.stderr.decode()
        assert done.returncode == 2 and "did not answer" in said, said
        assert "only for a cluster" not in said, said


async def test_a_cluster_client_waits_for_a_free_connection_as_one_servers_does(
    redis_cluster: EmbeddedCluster,
) -> None:
    """`supersede.connect()`'s pool waits for a free connection on one server; redis-py's
    cluster client raised MaxConnectionsError past `max_connections` a node (a probe: 317 of
    18,001 publishes with 200 in flight). Commands wait for a connection there too."""
    from supersede.config import connect

    client = connect(f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0].port}",
                     max_connections=2)  # fmt: skip
    try:
        key = f"{{wait-{uuid.uuid4().hex[:8]}}}"
        done = await asyncio.gather(*(client.incr(key) for _ in range(200)))
        assert sorted(done) == list(range(1, 201))
        await client.delete(key)
    finally:
        await client.aclose()
    # (not the services': their hot calls have deadlines, which a wait would pass, marking a
    # master silent that only had its connections busy; a review)
    services = connect(f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0].port}",
                       max_connections=2, wait=False)  # fmt: skip
    try:
        tried = await asyncio.gather(*(services.incr(key) for _ in range(200)),
                                     return_exceptions=True)  # fmt: skip
        refused = [r for r in tried if isinstance(r, sync_redis.exceptions.MaxConnectionsError)]
        assert refused and len(refused) < 200
        await services.delete(key)
    finally:
        await services.aclose()


async def test_the_dashboard_says_a_cluster_unreachable_while_one_master_is_frozen() -> None:
    """A page held by a frozen master was said "took over 5 s though Redis answers" (a UI
    probe): the PING went to one node that answered. Every master must answer it."""
    from supersede.config import connect
    from supersede.services import ui

    cluster = EmbeddedCluster(3).start()
    client = connect(f"redis+cluster://127.0.0.1:{cluster.nodes[0].port}")
    try:
        assert await ui._answers(client)
        frozen = next(n for n in cluster.nodes if n.port != cluster.nodes[0].port)
        assert frozen.proc is not None
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        try:
            assert not await ui._answers(client)
        finally:
            os.kill(frozen.proc.pid, signal.SIGCONT)
    finally:
        await client.aclose()
        cluster.stop()


async def test_the_other_shards_runs_start_while_one_shards_slot_is_left_half_moved(
    redis_cluster: EmbeddedCluster,
) -> None:
    """A slot left half moved (IMPORTING and MIGRATING set, no key moved: a reshard that
    stopped) while an executor held assignments of its shard: their claim got TRYAGAIN, which
    redis-py retries until "TTL exhausted", and each read of the executor first tried again to
    learn what that failed claim did, failing the same way: no run of any shard started until
    the slot was fixed (a cluster probe, with and without latency). Admission, with requests of
    that shard to admit, said it was not ready, its other shards admitted (the probe again).
    The stuck shard is left out a while, tried again; the other shards' runs are admitted and
    start meanwhile, admission ready; once the slot is stable its runs go on, none lost."""
    from supersede.services.dev import http_status

    keys = Keys(f"halfmoved{uuid.uuid4().hex[:8]}", 4)
    client = RedisCluster.from_url(redis_cluster.url)
    system = System(f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0].port}", keys)
    nodes: list[sync_redis.Redis] = []
    slot = -1
    try:
        await client.initialize()
        admission, port = await system.serving("admission", "--block-ms", "100")
        executor = system.start("executor", APP, "--slots", "40")

        async def registered() -> bool:
            return int(await client.hlen(keys.workflows_hash)) > 0

        await eventually(registered, timeout=30)
        system.start("ingress", "--block-ms", "100")
        users = [f"user{i}" for i in range(24)]
        sent: dict[tuple[str, int], str] = {}

        async def publish_round(n: int, to: list[str]) -> None:
            for user in to:
                sent[user, n] = await _chat(client, keys, user, f"round {n}")

        async def ended(n: int, to: list[str]) -> bool:
            states = {str(r["ev"]): r["st"] for r in (await records(client, keys)).values()}
            return all(states.get(sent[u, n]) == "S" for u in to)

        await publish_round(1, users)
        await eventually(lambda: ended(1, users), timeout=30)
        shard_of = {str(r["k"]): int(rid.split("-")[0]) for rid, r in
                    (await records(client, keys)).items()}  # fmt: skip
        stuck = _shard_apart(keys, set(shard_of.values()))
        healthy = [u for u in users if shard_of[u] != stuck]
        assert healthy and len(healthy) < len(users)
        # The executor holds the stuck shard's assignments, admission its requests, when it
        # is half moved.
        executor.send_signal(signal.SIGSTOP)
        await publish_round(2, users)

        async def assigned() -> bool:
            recs = await records(client, keys)
            return sum(1 for r in recs.values() if r["st"] == "A") == len(users)

        await eventually(assigned, timeout=30)
        admission.send_signal(signal.SIGSTOP)
        await publish_round(3, users)

        await eventually(lambda: _read_by_ingress(client, keys), timeout=30)
        slot = key_slot(keys.shard(stuck).runs_hash.encode())
        nodes = _half_move(redis_cluster, client, keys.shard(stuck).runs_hash)
        executor.send_signal(signal.SIGCONT)
        admission.send_signal(signal.SIGCONT)
        readyz = f"http://127.0.0.1:{port}/readyz"
        answers: list[int] = []

        async def third_ended() -> bool:
            answers.append(await asyncio.to_thread(http_status, readyz))
            return await ended(3, healthy)

        await eventually(third_ended, timeout=20)
        for _ in range(20):  # (admission tried the stuck shard's requests meanwhile)
            answers.append(await asyncio.to_thread(http_status, readyz))
            await asyncio.sleep(0.1)
        assert set(answers) == {200}, answers
        await publish_round(4, healthy)  # (after the failed claims and admits)
        await eventually(lambda: ended(4, healthy), timeout=20)
        for node in nodes:
            node.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        slot = -1
        await eventually(lambda: ended(3, users), timeout=30)
        # (a superseded round 2 may still be stopping)
        await eventually(lambda: _all_ended(client, keys), timeout=30)
        recs = await records(client, keys)
        assert sorted(str(r["ev"]) for r in recs.values()) == sorted(sent.values())
    finally:
        if slot >= 0:
            for node in nodes:
                with contextlib.suppress(RedisError):
                    node.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        for node in nodes:
            node.close()
        system.close()
        await client.aclose()


async def test_a_users_command_refused_while_its_slot_is_half_moved_is_sent_again(
    redis_cluster: EmbeddedCluster,
) -> None:
    """A slot MIGRATING on its master with no node IMPORTING it: a command of a key not there
    is sent to the target (ASK), which sends it back (MOVED), until redis-py gives up ("TTL
    exhausted"; none was carried out). `supersede.connect()`'s client sends it again a while:
    publishes failed so during a reshard (a cluster probe: 14 of 4,200). Applied once."""
    from supersede.config import connect

    client = connect(f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0].port}")
    key = f"refused-{uuid.uuid4().hex[:8]}"
    raw = RedisCluster.from_url(redis_cluster.url)
    nodes: list[sync_redis.Redis] = []
    slot = key_slot(key.encode())
    try:
        await raw.initialize()
        source = int(raw.get_node_from_key(key).port)
        target = next(p for p in redis_cluster.master_ports() if p != source)
        nodes = [sync_redis.Redis(port=source), sync_redis.Redis(port=target)]
        dst_id = nodes[1].execute_command("CLUSTER", "MYID").decode()
        nodes[0].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        with pytest.raises(RedisError, match="TTL exhausted"):  # (redis-py's own client)
            await raw.xadd(key, {"n": "0"})
        loop = asyncio.get_running_loop()
        fixed = loop.call_later(0.4, nodes[0].execute_command, "CLUSTER", "SETSLOT", slot,
                                "STABLE")  # fmt: skip
        await client.xadd(key, {"n": "1"})
        fixed.cancel()
        assert await client.xlen(key) == 1
    finally:
        for node in nodes:
            with contextlib.suppress(RedisError):
                node.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
            node.close()
        with contextlib.suppress(RedisError):
            await client.delete(key)
        await client.aclose()
        await raw.aclose()


async def test_a_trim_over_shards_goes_on_past_one_whose_slot_is_half_moved(
    redis_cluster: EmbeddedCluster,
) -> None:
    """Admission trims every shard's control stream in one pipeline: one stream of a slot left
    half moved ("TTL exhausted" in its reply) failed the whole trim task, every shard's trims
    and the forgetting of gone consumers skipped, the service not ready (a cluster probe). The
    others are trimmed; that one waits for the next trim."""
    from supersede.trim import trim_older_than

    client = RedisCluster.from_url(redis_cluster.url)
    tag = uuid.uuid4().hex[:8]
    streams = [f"{{trim{tag}:{i}}}:control" for i in range(6)]
    nodes: list[sync_redis.Redis] = []
    try:
        await client.initialize()
        for stream in streams[1:]:  # (the first is on neither node: ASK there, MOVED back)
            await client.xadd(stream, {"f": "old"}, id="1-1")
        nodes = _half_move(redis_cluster, client, streams[0], importing=False)
        removed = await trim_older_than(client, streams, 1000, 10_000)
        assert removed == dict.fromkeys(streams[1:], 1)
    finally:
        for node in nodes:
            with contextlib.suppress(RedisError):
                node.execute_command("CLUSTER", "SETSLOT", key_slot(streams[0].encode()), "STABLE")
            node.close()
        await client.aclose()
