"""Least-privilege ACL users (issue 14, item 2): `supersede acl --apply` creates one user per
role on a real server and on a real cluster (every node); the whole system runs with each
service under its own user, the CLI under the operator and reader users, and no command of the
run is refused (the ACL log stays empty); then each user is refused what its role does not do."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis as redis_sync
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from supersede import acl
from supersede.config import connect
from supersede.keys import Keys
from supersede.registry import register
from supersede.server import free_port
from tests.e2e.test_ui import get, up
from tests.support import APP_WORKFLOWS, System, eventually

PASSWORDS = {role: f"pw-{role}-3e1d5a7c9b" for role in acl.ROLE_NAMES}  # (16 or more)


def as_user(url: str, user: str, password: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{user}:{password}@{rest}"


@pytest.fixture(params=["single", "cluster"])
async def admin(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, str, list[int]]]:
    """(admin client, admin URL, ports of every node) on one server or the 3-master cluster."""
    if request.param == "single":
        url = request.getfixturevalue("redis_url")
        ports = [request.getfixturevalue("redis_server").port]
    else:
        cluster = request.getfixturevalue("redis_cluster")
        ports = [node.port for node in cluster.nodes]
        url = f"redis+cluster://127.0.0.1:{ports[0]}"
    client = connect(url)
    yield client, url, ports
    await client.aclose()


def env_of(url: str, keys: Keys) -> dict[str, str]:
    return {**os.environ, "SUPERSEDE_REDIS_URL": url, "SUPERSEDE_NAMESPACE": keys.namespace,
            "SUPERSEDE_SHARDS": str(keys.shards)}  # fmt: skip


def acl_log(ports: list[int], users: set[str]) -> list[dict[str, Any]]:
    out = []
    for port in ports:
        with redis_sync.Redis(port=port) as node:
            out += [e for e in node.acl_log(count=1000) if str(e.get("username")) in users]
    return out


def cli(env: dict[str, str], *args: str) -> Any:
    proc = subprocess.run([sys.executable, "-m", "supersede", *args, "--json"], env=env,
                          capture_output=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return orjson.loads(proc.stdout)


async def test_each_service_runs_under_its_own_user_and_nothing_else_is_allowed(
    admin: tuple[Any, str, list[int]], keys: Keys
) -> None:
    client, url, ports = admin
    ns = keys.namespace
    users = {acl.user_name(ns, r) for r in acl.ROLE_NAMES}
    env = {**env_of(url, keys), **{acl.password_env(r): p for r, p in PASSWORDS.items()}}
    applied = subprocess.run([sys.executable, "-m", "supersede", "acl", "--apply"], env=env,
                             capture_output=True, timeout=60)  # fmt: skip
    assert applied.returncode == 0, applied.stderr.decode()
    assert not any(p.encode() in applied.stdout + applied.stderr for p in PASSWORDS.values())
    # the test servers have no ACL file: the users are in memory only, and it says so (the
    # README said it, the command printed "set" only: a security probe)
    [said] = applied.stderr.decode().splitlines()
    assert "no ACL file" in said and "gone when it restarts" in said, said
    await _users_are_on_every_node(client, ports, users)
    url_of = {r: as_user(url, acl.user_name(ns, r), p) for r, p in PASSWORDS.items()}
    # --apply as a user who may not create users: one line naming the setting (a traceback)
    not_admin = subprocess.run([sys.executable, "-m", "supersede", "acl", "--apply"],
                               env={**env, "SUPERSEDE_REDIS_URL": url_of["reader"]},
                               capture_output=True, timeout=60)  # fmt: skip
    err = not_admin.stderr.decode()
    assert not_admin.returncode == 2 and "Traceback" not in err, err
    assert err.count("\n") == 1 and "must name an admin user" in err, err
    for port in ports:
        with redis_sync.Redis(port=port) as node:
            node.acl_log_reset()

    systems = {r: System(url_of[r], keys) for r in ("admission", "executor", "ingress")}
    systems["executor"].env["SUPERSEDE_TEST_LOG_URL"] = url  # user code has its own rights
    operator, reader = (env_of(url_of[r], keys) for r in ("operator", "reader"))
    publisher = connect(url_of["producer"])  # (an application's user: XADD to the inbox)
    try:
        systems["admission"].start("admission", "--block-ms", "100", "--reap-interval", "0.1",
                                   "--trim-interval", "0.5")  # fmt: skip
        for _ in range(2):
            systems["executor"].start("executor", "tests.support.apps.demo", "--slots", "20")

        async def registered() -> bool:
            return int(await client.hlen(keys.workflows_hash)) == APP_WORKFLOWS

        await eventually(registered, timeout=30)
        systems["ingress"].start("ingress", "--block-ms", "100", "--trim-interval", "0.5")

        users_n, burst = 6, 3
        for i in range(burst):
            for u in range(users_n):
                data = orjson.dumps({"userId": f"user{u}", "sleep": 0.3 if i < burst - 1 else 0.05})
                await publisher.xadd(keys.events_stream, {"name": "chat.message", "data": data})
        published = cli(operator, "publish", "chat.message", '{"userId": "solo", "sleep": 0.01}')
        assert published
        await asyncio.to_thread(_operator_publishes_twice_and_cancels, operator)

        def settled() -> list[Any] | None:
            runs = cli(reader, "runs", "--workflow", "chat-reply", "--limit", "1000")
            done = all(r["state"] in ("SUCCEEDED", "CANCELLED") for r in runs)
            return runs if len(runs) == users_n * burst + 1 and done else None

        async def check() -> bool:
            return await asyncio.to_thread(settled) is not None

        await eventually(check, timeout=60)
        runs = settled() or []
        by_user: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            by_user.setdefault(r["key"], []).append(r)
        for user, mine in by_user.items():
            mine.sort(key=lambda r: tuple(int(x) for x in r["event_id"].split("-")))
            assert mine[-1]["state"] == "SUCCEEDED", user
            assert all(r["state"] == "CANCELLED" for r in mine[:-1]), user
        status = cli(reader, "status")
        assert status["workflows"]["chat-reply"]["runs"]["SUCCEEDED"] == users_n + 1
        await _reader_pages_live_runs(client, keys, publisher, reader)
        await _ui_pages_answer_as(reader, runs)
        assert cli(reader, "dead") == []
        # the operator retires the workflow no executor serves (the ACL log, checked below,
        # shows it was refused nothing: its script's INCR was, half-way, leaving the registry
        # without the workflow and the epoch unchanged)
        retired = cli(operator, "retire", "orphan")
        assert retired["retired"] == "orphan" and retired["cancelled"] >= 2

        # the inbox and the requests are trimmed by their own consumers' users
        async def trimmed() -> bool:
            lengths = [int(await client.xlen(keys.events_stream))]
            lengths += [int(await client.xlen(sk.requests_stream)) for sk in keys.all_shards()]
            return sum(lengths) == 0

        await eventually(trimmed, timeout=30)
        refused = await asyncio.to_thread(acl_log, ports, users)
        assert refused == [], refused
        producer = {**reader, "SUPERSEDE_REDIS_URL": url_of["producer"]}
        await _the_dashboard_allows_actions_under_the_operator_only(reader, operator, producer)
    finally:
        await publisher.aclose()
        for system in systems.values():
            system.close()

    await _each_user_is_refused_what_its_role_does_not_do(url_of, keys)
    _a_user_without_the_rights_is_told_which_role_it_needs(url_of, keys)
    await _publish_as_the_producer_is_refused_before_publishing(client, url_of, keys)


async def _users_are_on_every_node(client: Any, ports: list[int], users: set[str]) -> None:
    """ACL users are per node: every node the cluster lists has them, replicas included (a
    failover makes one the master; the client's node list held the masters only)."""
    if isinstance(client, RedisCluster):
        await client.initialize()
        node = client.get_random_node()
        listing = await client.execute_command("CLUSTER NODES", target_nodes=node)
        ports = sorted(int(address.rsplit(":", 1)[1]) for address in listing)
    for port in ports:
        with redis_sync.Redis(port=port) as node:
            assert users <= {str(u) for u in node.acl_users()}, port


def _operator_publishes_twice_and_cancels(operator: dict[str, str]) -> None:
    """The operator's rights cover a duplicate --id (found through the ids hash and the
    records) and cancel's check for an unknown run."""
    once = cli(operator, "publish", "work.item", '{"sleep": 0}', "--id", "acl-1", "--wait")
    again = cli(operator, "publish", "work.item", '{"sleep": 0}', "--id", "acl-1", "--wait")
    assert again["runs"][0]["run"] == once["runs"][0]["run"]
    assert again["runs"][0]["state"] == "SUCCEEDED" and again["runs"][0]["duplicate_of"]
    rid = "0-" + "deadbeef" * 2 + "0123"
    unknown = subprocess.run([sys.executable, "-m", "supersede", "cancel", rid],
                             env=operator, capture_output=True, timeout=60)  # fmt: skip
    assert unknown.returncode == 1 and unknown.stderr == f"supersede: no run {rid!r}\n".encode()
    # `register` (a pool's workflows ahead of its start) is the operator's too
    [row] = cli(operator, "register", "tests.support.apps.pool_b")
    assert row["workflow"] == "resize"
    assert cli(operator, "retire", "resize")["retired"] == "resize"  # (no pool of it here)


async def _reader_pages_live_runs(
    client: Any, keys: Keys, publisher: Any, reader: dict[str, str]
) -> None:
    """A page of `runs` full of live runs asks the server's clock for the next page's cursor
    (the reader had no TIME): runs of a workflow no executor serves stay ASSIGNED."""
    await register(client, keys, {"id": "orphan", "events": ["orphan.event"]})

    async def waiting() -> bool:
        await publisher.xadd(keys.events_stream, {"name": "orphan.event", "data": "{}"})
        rows = await asyncio.to_thread(cli, reader, "runs", "--workflow", "orphan")
        return len(rows) >= 2

    await eventually(waiting, timeout=30)
    assert len(cli(reader, "runs", "--limit", "1")) == 1


async def _ui_pages_answer_as(env: dict[str, str], runs: list[dict[str, Any]]) -> None:
    """`supersede ui` under the reader user: every page answers (the ACL log, checked after,
    shows it was refused nothing)."""
    port = free_port()
    cmd = [sys.executable, "-m", "supersede", "ui", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        await up(base)
        cancelled = next(r for r in runs if r["state"] == "CANCELLED")
        paths = ["/", "/runs", "/runs?state=cancelled&limit=2", f"/runs/{cancelled['id']}",
                 f"/key?workflow=chat-reply&key={cancelled['key']}", "/dead"]  # fmt: skip
        for path in paths:
            code, text = await asyncio.to_thread(get, base + path)
            assert code == 200, (path, text[-500:])
        code, _ = await asyncio.to_thread(get, base + "/runs?limit=1&before=1-0")
        assert code == 200
    finally:
        proc.kill()
        proc.wait(5)


async def _refused(client: Any, *command: Any) -> None:
    with pytest.raises((NoPermissionError, ResponseError), match=r"NOPERM|permission"):
        if isinstance(client, RedisCluster) and command[0] in ("FLUSHALL", "CONFIG"):
            await client.initialize()
            await client.get_random_node().execute_command(*command)  # no key to route by
        else:
            await client.execute_command(*command)


async def _each_user_is_refused_what_its_role_does_not_do(
    url_of: dict[str, str], keys: Keys
) -> None:
    sk = keys.shard(0)
    other = Keys("other-ns", keys.shards).shard(0)
    clients = {r: connect(u) for r, u in url_of.items()}
    try:
        for c in clients.values():
            await _refused(c, "FLUSHALL")
            await _refused(c, "CONFIG", "SET", "maxmemory", "1")
            await _refused(c, "HGET", other.runs_hash, "x")  # another namespace
        ex, ing, adm = clients["executor"], clients["ingress"], clients["admission"]
        await _refused(ex, "XADD", keys.events_stream, "*", "name", "x")
        await _refused(ex, "XADD", sk.requests_stream, "*", "r", "x")
        await _refused(ex, "XRANGE", sk.requests_stream, "-", "+")
        await _refused(ing, "HGET", sk.runs_hash, "x")
        await _refused(ing, "XADD", sk.assignments_stream("chat-reply"), "*", "id", "x")
        await _refused(ing, "HSET", keys.workflows_hash, "x", "{}")
        await _refused(adm, "XADD", keys.events_stream, "*", "name", "x")
        await _refused(adm, "HSET", keys.workflows_hash, "x", "{}")
        await _refused(clients["reader"], "XADD", keys.events_stream, "*", "name", "x")
        await _refused(clients["reader"], "HSET", sk.runs_hash, "x", "y")
        producer = clients["producer"]
        await _refused(producer, "XRANGE", keys.events_stream, "-", "+")
        await _refused(producer, "XDEL", keys.events_stream, "1-0")
        await _refused(producer, "XTRIM", keys.events_stream, "MAXLEN", "0")
        await _refused(producer, "XADD", sk.requests_stream, "*", "r", "x")
        await _refused(producer, "HGET", sk.runs_hash, "x")
        await _refused(clients["keda"], "HGET", sk.runs_hash, "x")
        await _refused(clients["keda"], "XRANGE", sk.assignments_stream("chat-reply"), "-", "+")
        assert isinstance(
            await clients["keda"].xinfo_groups(sk.assignments_stream("chat-reply")), list
        )
        assert await clients["reader"].hlen(keys.workflows_hash) == APP_WORKFLOWS  # (retired)
    finally:
        for c in clients.values():
            await c.aclose()


def _a_user_without_the_rights_is_told_which_role_it_needs(
    url_of: dict[str, str], keys: Keys
) -> None:
    """The CLI writing as the reader, an executor started as the reader: one line that names
    the role whose rights the user needs, exit 2 (each was a traceback)."""
    reader = env_of(url_of["reader"], keys)
    cases = {
        ("publish", "chat.message", '{"userId": "u"}'): "operator role",
        ("executor", "tests.support.apps.demo", "--metrics-port", "0"): "executor role",
    }
    for args, says in cases.items():
        done = subprocess.run([sys.executable, "-m", "supersede", *args], env=reader,
                              capture_output=True, timeout=60)  # fmt: skip
        err = done.stderr.decode()
        assert done.returncode == 2 and "Traceback" not in err, (args, err[-2000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith("supersede: ") and says in last and "supersede acl" in last, err


async def _publish_as_the_producer_is_refused_before_publishing(
    client: Any, url_of: dict[str, str], keys: Keys
) -> None:
    """`supersede publish` under the producer user (it may XADD, not read the registry) is
    refused in one line naming the operator role, and nothing is published: it published the
    event, then failed reading the registry, and said nothing of it (a retry published it
    twice; a security probe)."""
    before = int(await client.xlen(keys.events_stream))
    producer = env_of(url_of["producer"], keys)
    args = [sys.executable, "-m", "supersede", "publish", "chat.message", '{"userId": "p"}']
    done = await asyncio.to_thread(subprocess.run, args, env=producer, capture_output=True,
                                   timeout=60)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert "operator role" in err.strip().splitlines()[-1], err
    assert int(await client.xlen(keys.events_stream)) == before


async def _the_dashboard_allows_actions_under_the_operator_only(
    reader: dict[str, str], operator: dict[str, str], producer: dict[str, str]
) -> None:
    """`ui --allow-actions` under the reader user refuses to start, in one line that names the
    operator role (it started, and showed buttons that every press refused); under the
    operator it starts. `ui` under a user that cannot read (the producer's) refuses in one
    line naming the reader role (a traceback: a security probe)."""
    ui = [sys.executable, "-m", "supersede", "ui", "--port", str(free_port())]
    done = subprocess.run(ui, env=producer, capture_output=True, timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert "reader role" in err.strip().splitlines()[-1], err
    cmd = [sys.executable, "-m", "supersede", "ui", "--port", str(free_port()), "--allow-actions"]
    done = subprocess.run(cmd, env=reader, capture_output=True, timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "--allow-actions" in last and "operator role" in last, err
    port = free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    proc = subprocess.Popen(cmd, env=operator, stderr=subprocess.DEVNULL)
    try:
        await up(f"http://127.0.0.1:{port}")
    finally:
        proc.kill()
        proc.wait(5)


async def test_acl_apply_reaches_every_node_of_a_cluster_replicas_included(keys: Keys) -> None:
    """ACL users are per node, and a failover makes a replica the master: --apply sets them on
    every node CLUSTER NODES lists (the client's node list held the masters only), says on
    which, and exits 1 naming a node it could not reach (it said "set" for every role)."""
    import signal

    from supersede.server import EmbeddedCluster

    cluster = EmbeddedCluster(3, replicas=1).start()
    try:
        # (every node known to the first and out of its handshake: on a slow host a replica
        # can still be joining when the cluster answers, and --apply rightly skips it)
        async def all_joined() -> bool:
            with redis_sync.Redis(port=cluster.nodes[0].port) as first:
                text = first.execute_command("CLUSTER", "NODES")
            lines = [ln.split() for ln in (text.decode() if isinstance(text, bytes) else text)
                     .splitlines() if ln.strip()]  # fmt: skip
            return len(lines) == 6 and all(
                "handshake" not in ln[2] and ln[7] == "connected" for ln in lines
            )

        await eventually(all_joined, timeout=60)
        url = f"redis+cluster://127.0.0.1:{cluster.nodes[0].port}"
        env = {**env_of(url, keys), **{acl.password_env(r): p for r, p in PASSWORDS.items()}}
        cmd = [sys.executable, "-m", "supersede", "acl", "--apply", "--role", "executor"]
        done = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True,
                                       timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        assert b"on 6 nodes" in done.stdout, done.stdout
        name = acl.user_name(keys.namespace, "executor")
        for node in cluster.nodes:
            with redis_sync.Redis(port=node.port) as client:
                assert name in {str(u) for u in client.acl_users()}, node.port
        # a replica down: the others get the users, and the command names it, exit 1
        gone = cluster.nodes[-1]
        assert gone.proc is not None
        gone.proc.send_signal(signal.SIGKILL)
        gone.proc.wait(10)
        done = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True,
                                       timeout=60)  # fmt: skip
        err = done.stderr.decode()
        assert done.returncode == 1 and f":{gone.port}" in err and "again" in err, err
        assert "Traceback" not in err
    finally:
        cluster.stop()


def test_acl_prints_one_rule_per_role_scoped_to_the_namespace() -> None:
    for role in acl.ROLE_NAMES:
        line = acl.setuser_line("my*ns", role)
        assert line.startswith(f"ACL SETUSER my*ns-{role} reset on resetchannels -@all ")
        patterns = [t for t in line.split() if "~" in t]
        assert patterns and all("my\\*ns" in p for p in patterns), line
        assert "+@all" not in line and "allkeys" not in line and "~*" not in line.split()


async def test_serve_runs_under_the_serve_user(
    admin: tuple[Any, str, list[int]], keys: Keys
) -> None:
    """`supersede serve` runs the three services on one connection, so one user: no role had
    their rights together (its refusal named three roles, and no user could have them). The
    serve role does: a chat burst runs under it, with nothing refused."""
    from supersede.client import publish_runs, wait_for_run

    client, url, ports = admin
    ns = keys.namespace
    env = {**env_of(url, keys), acl.password_env("serve"): PASSWORDS["serve"]}
    applied = subprocess.run([sys.executable, "-m", "supersede", "acl", "--apply", "--role",
                              "serve"], env=env, capture_output=True, timeout=60)  # fmt: skip
    assert applied.returncode == 0, applied.stderr.decode()
    user = acl.user_name(ns, "serve")
    for port in ports:
        with redis_sync.Redis(port=port) as node:
            node.acl_log_reset()
    system = System(as_user(url, user, PASSWORDS["serve"]), keys)
    system.env["SUPERSEDE_TEST_LOG_URL"] = url  # user code has its own rights
    try:
        system.start("serve", "tests.support.apps.demo", "--slots", "10")

        async def registered() -> bool:
            return int(await client.hlen(keys.workflows_hash)) == APP_WORKFLOWS

        await eventually(registered, timeout=30)
        planned = []
        for i in range(3):  # one user's messages: only the newest may finish
            data = {"userId": "s", "sleep": 0.5, "i": i}
            planned += (await publish_runs(client, "chat.message", data, namespace=ns))[1]
        runs = [await wait_for_run(client, p.run_id, 30, namespace=ns) for p in planned]
        assert [r.state for r in runs] == ["CANCELLED", "CANCELLED", "SUCCEEDED"]
        assert acl_log(ports, {user}) == []
    finally:
        system.close()


async def test_apply_without_roles_needs_no_serve_password(
    admin: tuple[Any, str, list[int]], keys: Keys
) -> None:
    """The serve role came with this build: `acl --apply` of every role must not start asking
    a deployment of the separate services for a password of a user it has no use for."""
    _, url, ports = admin
    env = {**env_of(url, keys), **{acl.password_env(r): p for r, p in PASSWORDS.items()
                                   if r not in acl.OPTIONAL_ROLES}}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "supersede", "acl", "--apply"], env=env,
                          capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    with redis_sync.Redis(port=ports[0]) as node:
        users = {str(u) for u in node.acl_users()}
    assert acl.user_name(keys.namespace, "executor") in users
    assert acl.user_name(keys.namespace, "serve") not in users
