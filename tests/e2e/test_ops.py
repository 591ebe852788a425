"""The operator CLI end to end: real services as processes, events published with plain XADD,
final states read through the CLI's --json output."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

import supersede
from supersede.keys import Keys
from supersede.registry import register
from supersede.services import render
from tests.support import APP_WORKFLOWS, System, eventually, records

DOC = {"id": "doc", "events": ["doc.saved"]}


@pytest.fixture
def system(redis_url: str, keys: Keys) -> Iterator[System]:
    s = System(redis_url, keys)
    yield s
    s.close()


def cli(system: System, *args: str) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "supersede", *args, "--json"],
        env=system.env, capture_output=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    return orjson.loads(proc.stdout)


async def acli(system: System, *args: str) -> Any:
    return await asyncio.to_thread(cli, system, *args)


async def test_a_publish_refused_at_maxmemory_names_the_fix(
    redis: Redis, keys: Keys, system: System
) -> None:
    """At the server's maxmemory `supersede publish` said "try again, or check the server"
    (an operator's probe): the services' lines name maxmemory, the CLI's did not."""
    cmd = [sys.executable, "-m", "supersede", "publish", "chat.message", '{"userId": "u1"}']
    await redis.config_set("maxmemory", 1)  # (noeviction: every write is refused)
    try:
        done = await asyncio.to_thread(subprocess.run, cmd, env=system.env,
                                       capture_output=True, timeout=60)  # fmt: skip
    finally:
        await redis.config_set("maxmemory", 0)
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err, err
    assert "free memory or raise maxmemory" in err and len(err.strip().splitlines()) == 1, err


async def test_runs_run_status_and_cancel_through_the_cli(
    redis: Redis, keys: Keys, system: System
) -> None:
    await system.pipeline(redis, keys, 1)
    await redis.xadd(
        keys.events_stream, {"name": "chat.message", "data": '{"userId":"u1","sleep":30}'}
    )

    async def one_running() -> bool:
        runs = await acli(
            system, "runs", "--workflow", "chat-reply", "--key", "u1", "--state", "running"
        )
        return len(runs) == 1

    await eventually(one_running, timeout=30)
    published = await acli(system, "publish", "chat.message", '{"userId":"u1","sleep":30}')
    assert "-" in published["entry"]

    async def superseded() -> bool:
        runs = await acli(system, "runs", "--workflow", "chat-reply", "--key", "u1")
        return sorted(r["state"] for r in runs) == ["CANCELLED", "RUNNING"]

    await eventually(superseded, timeout=30)
    runs = await acli(system, "runs", "--workflow", "chat-reply", "--key", "u1")
    old = next(r for r in runs if r["state"] == "CANCELLED")
    new = next(r for r in runs if r["state"] == "RUNNING")
    assert old["cancelled_by"] == new["id"] and old["reason"] == "superseded"
    detail = await acli(system, "run", old["id"])
    events = [e["event"] for e in detail["timeline"]]
    assert events[0] == "created" and any(e.startswith("claimed by executor-") for e in events)
    assert f"cancel decided (superseded) by {new['id']}" in events
    assert events[-1] == "ended CANCELLED"

    status = await acli(system, "status")
    chat = status["workflows"]["chat-reply"]
    assert chat["runs"] == {"CANCELLED": 1, "RUNNING": 1}
    assert chat["events"] == ["chat.message"] and chat["key"] == "input.userId"
    assert (chat["strategy"], chat["max_runs"], chat["strict"]) == ("CANCEL_IN_PROGRESS", 1, False)
    # registered workflows without runs are listed too, with the limits they declare
    assert status["workflows"]["work"]["runs"] == {} and status["workflows"]["work"]["registered"]
    [(executor, serves)] = status["executors"].items()
    # (a consumer shows up on a workflow's streams once it has read them)
    assert executor.startswith("executor-") and "chat-reply" in serves
    assert set(serves) <= set(status["workflows"])
    assert status["streams"]["inbox"]["lag"] == 0

    assert await acli(system, "cancel", "--workflow", "chat-reply", "--key", "u1") == {
        new["id"]: True
    }

    async def all_cancelled() -> bool:
        runs = await acli(system, "runs", "--workflow", "chat-reply", "--key", "u1")
        return {r["state"] for r in runs} == {"CANCELLED"}

    await eventually(all_cancelled, timeout=30)
    assert (await acli(system, "run", new["id"]))["reason"] == "manual"
    # A misspelt workflow listed no runs and cancelled nothing, with exit 0: now it is named
    for args in (["runs", "--workflow", "chat-rpely"],
                 ["cancel", "--workflow", "chat-rpely", "--key", "u1"]):  # fmt: skip
        typo = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "supersede", *args],
            env=system.env, capture_output=True, timeout=60,
        )  # fmt: skip
        [line] = typo.stderr.decode().splitlines()
        assert typo.returncode == 1 and "no workflow 'chat-rpely' is registered" in line, line
        assert "chat-reply" in line.split("registered:")[1]


async def test_an_interrupted_publish_wait_says_the_event_was_published_with_its_ids(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Ctrl-C (or a Redis failure) while `publish --wait` waited printed asyncio's traceback
    (or "try again") and no ids: the event was published, and publishing it again ran its
    work twice. One line says it was published, with the entry and run ids; exit 130."""
    import signal

    await system.pipeline(redis, keys, 1)
    cmd = [sys.executable, "-m", "supersede", "publish", "chat.message",
           '{"userId": "waited", "sleep": 30}', "--wait"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=system.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:

        async def running() -> bool:
            runs = await acli(system, "runs", "--key", "waited", "--state", "running")
            return len(runs) == 1

        await eventually(running, timeout=30)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    [run] = await acli(system, "runs", "--key", "waited")
    text = err.decode()
    assert proc.returncode == 130 and "Traceback" not in text, text
    [line] = text.strip().splitlines()
    assert "the event was published (inbox entry " in line and run["id"] in line, line
    assert "do not publish it again" in line


async def test_a_publish_whose_xadd_got_no_reply_says_the_event_may_be_published(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A server that hung as `publish` sent its XADD (past the client's socket timeout), or a
    Ctrl-C then: it said "try again" (or only "interrupted"), and the event landed once the
    server went on, so a retry published it twice (a CLI probe). It says the event may have
    been published, and to look for its runs first. The hang: CLIENT PAUSE of writes, which
    lets the registry reads through and holds the XADD (a paused server drops it when the
    client goes; a frozen one, SIGSTOP, applies it when it goes on)."""
    import signal

    await system.pipeline(redis, keys, 1)
    url = system.env["SUPERSEDE_REDIS_URL"]
    env = {**system.env, "SUPERSEDE_REDIS_URL": url + ("&" if "?" in url else "?")
           + "socket_timeout=1"}  # fmt: skip
    cmd = [sys.executable, "-m", "supersede", "publish", "chat.message", '{"userId": "hung"}']
    # (paused until the command returned: a pause of 4 s ran out before a loaded machine's
    # process had sent its XADD, which then landed)
    await redis.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
    try:
        timed_out = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True,
                                            timeout=60)  # fmt: skip
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
    err = timed_out.stderr.decode()
    assert timed_out.returncode == 1 and "Traceback" not in err, err
    assert "the event may have been published" in err and "try again" not in err, err
    # Ctrl-C while the XADD waits: the same words, exit 130
    await redis.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
    try:
        proc = subprocess.Popen([*cmd[:-1], '{"userId": "hung2"}', "--id", "hung-2"],
                                env=system.env, stderr=subprocess.PIPE)  # fmt: skip

        async def sent() -> bool:
            clients = await redis.execute_command("CLIENT", "LIST")
            text = clients.decode() if isinstance(clients, bytes) else str(clients)
            return "cmd=xadd" in text

        await eventually(sent, timeout=30)
        proc.send_signal(signal.SIGINT)
        _, raw = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
    said = raw.decode()
    assert proc.returncode == 130 and "Traceback" not in said, said
    [line] = said.strip().splitlines()
    assert "the event may have been published" in line and "--id hung-2" in line, line


async def test_retire_removes_a_workflow_no_executor_serves_with_its_runs_and_streams(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A workflow no executor serves any more: its events made runs that stayed ASSIGNED for
    good (record, lease, input, assignment entry each) and nothing removed it. `retire`
    removes it from the registry, cancels those runs and deletes its streams; it refuses a
    workflow live executors serve (they would register it again), and an unknown one."""
    orphan = {"id": "orphan", "events": ["orphan.ev"],
              "concurrency": {"expression": "input.k", "max_runs": 2,
                              "limit_strategy": "GROUP_ROUND_ROBIN"}}  # fmt: skip
    await register(redis, keys, orphan)
    await system.pipeline(redis, keys, 1, expected_workflows=APP_WORKFLOWS + 1)
    for i in range(30):
        await redis.xadd(keys.events_stream, {"name": "orphan.ev", "data": f'{{"k": "k{i % 5}"}}'})

    async def stuck() -> bool:
        counts = (await acli(system, "status"))["workflows"]["orphan"]["runs"]
        return bool(counts == {"ASSIGNED": 10, "QUEUED": 20})

    await eventually(stuck, timeout=30)
    status = (await acli(system, "status"))["workflows"]
    assert (
        status["orphan"]["served_ms_ago"] is None and status["chat-reply"]["served_ms_ago"] < 5000
    )
    refused = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "supersede", "retire", "chat-reply"],
        env=system.env, capture_output=True, timeout=60,
    )  # fmt: skip
    # (by the served mark, or first by its reads, when its scans reached those streams yet)
    assert refused.returncode == 2 and b"'chat-reply' is served by" in refused.stderr
    unknown = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "supersede", "retire", "nope"],
        env=system.env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert unknown.returncode == 1 and b"no workflow 'nope'" in unknown.stderr
    done = await acli(system, "retire", "orphan")
    assert done == {"retired": "orphan", "cancelled": 30, "before": False}
    assert await redis.hget(keys.workflows_hash, "orphan") is None
    assert await redis.hget(keys.workflows_hash, "chat-reply") is not None
    for sk in keys.all_shards():
        assert not await redis.exists(sk.assignments_stream("orphan"))
    counts = (await acli(system, "status"))["workflows"]["orphan"]
    assert counts["runs"] == {"CANCELLED": 30} and not counts.get("registered")
    # their reason says the retire did it (it said `manual`, as an operator's cancel)
    recs = await records(redis, keys)
    assert {r["why"] for r in recs.values() if r["w"] == "orphan"} == {"retired"}
    # its events make no run now; the other workflows run on
    await redis.xadd(keys.events_stream, {"name": "orphan.ev", "data": '{"k": "late"}'})
    assert len((await acli(system, "publish", "chat.message", '{"userId": "u9"}'))["runs"]) == 1

    async def served() -> bool:
        run = await acli(system, "runs", "--workflow", "chat-reply", "--key", "u9")
        return [r["state"] for r in run] == ["SUCCEEDED"]

    await eventually(served, timeout=30)
    assert (await acli(system, "status"))["workflows"]["orphan"]["runs"] == {"CANCELLED": 30}
    assert await acli(system, "runs", "--workflow", "orphan", "--key", "late") == []
    # run again (an interrupted retire: the registry had lost it, so it said "no workflow"),
    # it sees to the runs and streams once more, and says it was retired before (it said
    # "retired" as the first time: an operator probe)
    again = {"retired": "orphan", "cancelled": 0, "before": True}
    assert await acli(system, "retire", "orphan") == again
    assert render.retired(again).startswith("workflow orphan was retired before (it is not")


async def test_a_dead_letter_is_replayed_after_fixing_the_workflow(
    redis: Redis, keys: Keys, system: System
) -> None:
    await register(redis, keys, {"id": "reindex", "events": ["doc.saved"],
                                 "concurrency": {"expression": "input.docId"}})  # fmt: skip
    system.start("ingress", "--block-ms", "100")
    await redis.xadd(keys.events_stream, {"name": "doc.saved", "data": '{"document": "d1"}'})

    async def one_dead() -> bool:
        return len(await acli(system, "dead")) == 1

    await eventually(one_dead, timeout=30)
    [dead] = await acli(system, "dead")
    assert dead["reason"] == "key_error" and dead["workflow"] == "reindex"
    # Fix the workflow: the producers send `document`, not `docId`.
    await register(redis, keys, {"id": "reindex", "events": ["doc.saved"],
                                 "concurrency": {"expression": "input.document"}})  # fmt: skip

    async def routed() -> bool:
        requests = sum([await redis.xlen(sk.requests_stream) for sk in keys.all_shards()])
        return requests == 1

    # Ingress sees the new version within its refresh interval; a replay that lands before
    # that is dead-lettered again and replayed again.
    async def replay_until_routed() -> bool:
        dead_now = await acli(system, "dead")
        if dead_now:
            await acli(system, "dead", "--replay", dead_now[0]["id"])
        return await routed()

    await eventually(replay_until_routed, timeout=30)
    assert await acli(system, "dead") == [] or all(
        d["reason"] == "key_error" for d in await acli(system, "dead")
    )


async def test_a_replayed_key_error_makes_the_run_of_its_workflow_only(
    redis: Redis, keys: Keys, system: System
) -> None:
    """An event (no `id`) for four workflows, two of which fail on its key: replaying one
    letter, after its workflow was fixed, made the run of that workflow, ran the event again
    for the two that had made their runs (new run ids: the entry id was the event's id), and
    dead-lettered it again for the other (two letters of it then). Now: one run more, one
    letter less."""

    def keyed(wf: str, expression: str) -> dict[str, Any]:
        return {"id": wf, "events": ["doc.saved"], "concurrency": {"expression": expression}}

    wfs = [keyed("index", "input.document"), {"id": "notify", "events": ["doc.saved"]},
           keyed("reindex", "input.docId"), keyed("audit", "input.auditId")]  # fmt: skip
    for wf in wfs:
        await register(redis, keys, wf)
    system.start("admission", "--block-ms", "100")
    system.start("ingress", "--block-ms", "100")
    await redis.xadd(keys.events_stream, {"name": "doc.saved", "data": '{"document": "d1"}'})

    async def runs_of() -> list[str]:
        return sorted(str(r["w"]) for r in (await records(redis, keys)).values())

    async def first_routed() -> bool:
        return len(await acli(system, "dead")) == 2 and await runs_of() == ["index", "notify"]

    await eventually(first_routed, timeout=30)
    letters = {d["workflow"]: d["id"] for d in await acli(system, "dead")}
    assert set(letters) == {"reindex", "audit"}
    await register(redis, keys, keyed("reindex", "input.document"))

    async def replay_until_run() -> bool:  # (ingress sees the new version within a second)
        for d in await acli(system, "dead"):
            if d["workflow"] == "reindex":
                await acli(system, "dead", "--replay", d["id"])
        return "reindex" in await runs_of()

    await eventually(replay_until_run, timeout=30)
    assert await runs_of() == ["index", "notify", "reindex"]
    assert [(d["workflow"], d["id"]) for d in await acli(system, "dead")] == [
        ("audit", letters["audit"])
    ]
    # every run is the first entry's event (its id, the entry id)
    [entry] = [d["entry"] for d in await acli(system, "dead")]
    assert {r["ev"] for r in (await records(redis, keys)).values()} == {entry}
    # a second replay of it (a crash between the XADD and the XDEL on a cluster) makes nothing
    event_id = entry
    await redis.xadd(keys.events_stream, {"name": "doc.saved", "data": '{"document": "d1"}',
                                          "id": event_id, "only_workflow": "reindex"})  # fmt: skip
    await redis.xadd(keys.events_stream, {"name": "doc.saved", "data": '{"document": "d2"}',
                                          "only_workflow": "notify"})  # fmt: skip

    async def last_routed() -> bool:
        return len(await runs_of()) == 4

    await eventually(last_routed, timeout=30)
    assert await runs_of() == ["index", "notify", "notify", "reindex"]
    # a letter whose workflow no longer listens to the event is kept, not replayed to nobody
    await register(redis, keys, {**keyed("audit", "input.auditId"), "events": ["doc.moved"]})
    refused = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "supersede", "dead", "--replay", letters["audit"]],
        env=system.env, capture_output=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode != 0 and b"no longer listens to 'doc.saved'" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert [d["id"] for d in await acli(system, "dead")] == [letters["audit"]]


async def test_a_replay_adds_its_fields_only_where_an_event_has_room(
    redis: Redis, keys: Keys
) -> None:
    """An event may have 64 fields: a replay of one of 64 adds no `id` (the entry went over
    the limit, and its new letter could never be replayed), and one of one workflow's key that
    has no room to name it is refused, the letter kept. A letter naming a workflow, `internal`
    too, is replayed for that workflow only; a whole event no workflow listens to is kept."""
    from supersede.services.ops import replay_dead

    await register(redis, keys, {"id": "w", "events": ["e"]})

    async def letter(n: int, **added: Any) -> str:
        fields: dict[Any, Any] = {"name": "e", **{f"f{i}": "x" for i in range(n - 1)}}
        fields.update(entry="1-0", **added)
        entry = await redis.xadd(keys.dead_stream, fields)
        return str(entry.decode())

    async def replayed(entry: str) -> dict[bytes, bytes]:
        new = await replay_dead(redis, keys, entry)
        [(_, fields)] = await redis.xrange(keys.events_stream, min=new, max=new)
        return dict(fields)

    assert (await replayed(await letter(63, reason="bad_json")))[b"id"] == b"1-0"
    assert b"id" not in await replayed(await letter(64, reason="bad_json"))
    full = await replayed(await letter(63, reason="key_error", workflow="w"))
    assert full[b"only_workflow"] == b"w" and b"id" not in full and len(full) == 64
    kept = await letter(64, reason="key_error", workflow="w")
    with pytest.raises(ValueError, match="over the 64 an event may have"):
        await replay_dead(redis, keys, kept)
    assert await redis.xrange(keys.dead_stream, min=kept, max=kept)
    # an `internal` letter of one workflow is replayed for it alone: the event's id (the entry
    # id) no longer gives the first entry's run ids, so the others would run again; a letter of
    # the whole event names no workflow (a producer's `workflow` field is kept as `~workflow`)
    internal = await replayed(await letter(3, reason="internal", workflow="w"))
    assert internal[b"only_workflow"] == b"w" and internal[b"id"] == b"1-0"
    whole = await replayed(await letter(3, reason="internal", **{"~workflow": "w", "escaped": 1}))
    assert b"only_workflow" not in whole and whole[b"workflow"] == b"w"
    # a letter of a build before names were escaped: a whole event's, with a producer's field
    old = await replayed(await letter(3, reason="bad_json", workflow="w"))
    assert b"only_workflow" not in old and old[b"name"] == b"e"
    # a whole event's letter whose name no workflow listens to (a repeated `name`, the letter
    # keeping the last) is kept: replayed, it was acknowledged without a run, and lost
    nobody = await letter(3, reason="repeated_field", name="other")
    with pytest.raises(ValueError, match="no registered workflow listens to"):
        await replay_dead(redis, keys, nobody)
    assert await redis.xrange(keys.dead_stream, min=nobody, max=nobody)


async def test_publish_wait_reports_an_event_dead_lettered_for_its_key(
    redis: Redis, keys: Keys, system: System
) -> None:
    """`publish --wait` of an event whose key expression fails: ingress dead-letters it for the
    workflow, and the wait says so with exit 4 (it planned no run, so it waited for nothing and
    exited 0); a published value's control characters print escaped (a key, an event name,
    raw, were terminal escape sequences)."""
    await register(redis, keys, {"id": "reindex", "events": ["doc.saved"],
                                 "concurrency": {"expression": "input.docId"}})  # fmt: skip
    system.start("ingress", "--block-ms", "100")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "supersede", "publish", "doc.saved", '{"document": "d1"}',
         "--wait", "--timeout", "20"],
        env=system.env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 4, (done.stdout, done.stderr)
    assert b"DEAD_LETTERED" in done.stdout and b"key_error" in done.stdout
    assert b"reindex" in done.stdout and b"dead-lettered for it" in done.stderr
    # --json: a dead-lettered row has every field a run's row has (it had no `outputs`,
    # `timed_out` nor `duplicate_of`: an operator probe)
    as_json = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "supersede", "publish", "doc.saved", '{"document": "d2"}',
         "--wait", "--timeout", "20", "--json"],
        env=system.env, capture_output=True, timeout=60,
    )  # fmt: skip
    [row] = orjson.loads(as_json.stdout)["runs"]
    assert row["state"] == "DEAD_LETTERED" and set(row) == {
        "workflow", "key", "run", "duplicate_of", "state", "error", "outputs", "cancelled_by",
        "reason", "timed_out",
    }, row  # fmt: skip
    # a hostile event name, straight into the inbox: its dead letter prints escaped
    await redis.xadd(keys.events_stream, {"name": "\x1b]0;owned\x07\x1b[2Jevil", "data": "bad"})

    async def three_dead() -> bool:
        return len(await acli(system, "dead")) == 3

    await eventually(three_dead, timeout=30)
    table = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "supersede", "dead"], env=system.env,
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert table.returncode == 0 and b"evil" in table.stdout
    assert b"\x1b" not in table.stdout and b"\x07" not in table.stdout
    assert b"\\x1b]0;owned\\x07\\x1b[2Jevil" in table.stdout


async def test_a_dead_letter_of_an_event_with_its_own_id_keeps_its_own_id(
    redis: Redis, keys: Keys, system: System
) -> None:
    """An event's `id` field (its idempotency key) must not stand in for the dead letter's id:
    the table crashed on it (int('order')) and --replay was given an id it cannot find."""
    await register(redis, keys, DOC)  # (with no workflow at all, the inbox waits)
    system.start("ingress", "--block-ms", "100")
    await redis.xadd(
        keys.events_stream, {"name": "doc.saved", "data": "not json", "id": "order-42"}
    )

    async def one_dead() -> bool:
        return len(await acli(system, "dead")) == 1

    await eventually(one_dead, timeout=30)
    [dead] = await acli(system, "dead")
    [(entry_id, _)] = await redis.xrange(keys.dead_stream)
    assert dead["id"] == entry_id.decode() and dead["event_id_field"] == "order-42"
    table = subprocess.run([sys.executable, "-m", "supersede", "dead"], env=system.env,
                           capture_output=True, timeout=30)  # fmt: skip
    assert table.returncode == 0, table.stderr.decode()
    assert entry_id.decode() in table.stdout.decode()
    # a field that is no UTF-8 (a binary payload) shows every byte: replacement characters
    # kept none of them
    binary = b"\x93\xff\x00\xfe"
    await redis.xadd(keys.events_stream, {"name": "doc.saved", "data": binary})
    await eventually(lambda: asyncio.sleep(0, len(cli(system, "dead")) == 2), timeout=30)
    newest = (await acli(system, "dead"))[0]
    assert newest["data"] == repr(binary) and newest["reason"] == "bad_encoding", newest


async def test_status_shows_the_waiting_runs_of_a_workflow_no_executor_ever_served(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Its assignment stream exists without the executors' group: status crashed (NOGROUP)
    and counted none of its entries as waiting."""
    await register(redis, keys, {"id": "orphan", "events": ["orphan.go"]})
    system.start("admission", "--block-ms", "100")
    system.start("ingress", "--block-ms", "100")
    await redis.xadd(keys.events_stream, {"name": "orphan.go", "data": "{}"})

    async def assigned() -> bool:
        return (
            sum([await redis.xlen(sk.assignments_stream("orphan")) for sk in keys.all_shards()]) > 0
        )

    await eventually(assigned, timeout=30)
    status = await acli(system, "status")
    assert status["streams"]["assignments"]["lag"] >= 1
    assert status["workflows"]["orphan"]["runs"] == {"ASSIGNED": 1}
    assert status["executors"] == {}


async def test_status_lists_an_executor_whose_slots_are_all_busy_and_not_one_that_exited(
    redis: Redis, keys: Keys, system: System
) -> None:
    """An executor running as many runs as it has slots reads no stream, and its consumers
    looked idle: `status` said "live executors: 0" while it ran them (a CLI probe). Each says
    it runs every second; one that exited is gone from the list at once (it stayed for
    seconds, by its consumers' idle time)."""
    import signal

    [executor] = await system.pipeline(redis, keys, 1, "--slots", "2", "--drain-timeout", "1")
    for user in ("busy-1", "busy-2", "busy-3"):
        data = orjson.dumps({"userId": user, "sleep": 60})
        await redis.xadd(keys.events_stream, {"name": "chat.message", "data": data})

    async def full() -> bool:
        return len(await acli(system, "runs", "--state", "running")) == 2

    await eventually(full, timeout=30)
    await asyncio.sleep(6)  # (past the 5 s of idle reads that counted as live)
    status = await acli(system, "status")
    [(name, serves)] = status["executors"].items()
    assert "chat-reply" in serves, status["executors"]
    executor.send_signal(signal.SIGTERM)
    await asyncio.to_thread(executor.wait, 60)
    assert executor.returncode == 0
    assert (await acli(system, "status"))["executors"] == {}
    assert await redis.hexists(keys.executors_hash, name) == 0


def test_publish_and_replay_refuse_ids_that_cannot_be(system: System) -> None:
    """It printed a run id for `--id ''` (or one over 1 KiB) and exited 0; ingress then
    dead-lettered the event as bad_id, so that run never existed."""
    for bad in ("", "x" * 1025):
        done = subprocess.run([sys.executable, "-m", "supersede", "publish", "ev.a", "{}", "--id",
                               bad], env=system.env, capture_output=True, timeout=30)  # fmt: skip
        err = done.stderr.decode()
        # (a bad argument: 2, as argparse's; 1 was also a --wait timeout's)
        assert done.returncode == 2 and "Traceback" not in err, err
        assert "the CLI's --id) must be 1..1024 bytes" in err.strip().splitlines()[-1]
    # and a dead letter id that cannot be one is one line too, not Redis's traceback
    done = subprocess.run([sys.executable, "-m", "supersede", "dead", "--replay", "garbage"],
                          env=system.env, capture_output=True, timeout=30)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err and "garbage" in err, err


async def test_publish_where_no_workflow_is_registered_says_the_event_waits_in_the_inbox(
    redis: Redis, keys: Keys, system: System
) -> None:
    """It said "no workflow listens to 'app.chat', so this event makes no run (known events:
    none: no workflow is registered)", but ingress reads nothing while none is registered:
    the event waited and made its runs once a pool started (an API probe; one told "no run"
    publishes again, and gets two)."""
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "supersede", "publish", "app.chat", "{}"],
        env=system.env, capture_output=True, timeout=30,
    )  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 0 and "makes no run" not in err, err
    assert "no workflow is registered in this namespace yet" in err
    assert "the event waits in the inbox" in err
    assert await redis.xlen(keys.events_stream) == 1


async def test_the_cli_refuses_another_shard_count_an_unknown_run_and_a_closed_pipe_quietly(
    redis: Redis, keys: Keys, system: System
) -> None:
    """With another SUPERSEDE_SHARDS, `status` and `runs` read part of the shards (or shards
    that do not exist) and exit 0; without it they read the stored count (they refused the
    namespace unless told its count: a probe); `cancel` of an unknown id said "tuple index out
    of range" or "unknown_run at item 0"; `runs | head` ended in a BrokenPipeError traceback."""
    await redis.hset(keys.config_hash, "shards", keys.shards)

    def run(*args: str, shards: int = keys.shards) -> subprocess.CompletedProcess[bytes]:
        env = {**system.env, "SUPERSEDE_SHARDS": str(shards)}
        return subprocess.run([sys.executable, "-m", "supersede", *args], env=env,
                              capture_output=True, timeout=30)  # fmt: skip

    for command in ("status", "runs"):
        other = await asyncio.to_thread(run, command, shards=keys.shards + 1)
        err = other.stderr.decode()
        assert other.returncode == 2 and err.count("\n") == 1, err
        assert f"was created with {keys.shards} shards" in err and "SUPERSEDE_SHARDS" in err
        unset = {k: v for k, v in system.env.items() if k != "SUPERSEDE_SHARDS"}
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "supersede", command, "--json"], env=unset,
            capture_output=True, timeout=30)  # fmt: skip
        assert done.returncode == 0 and not done.stderr, done.stderr
    digest = "deadbeef" * 2 + "0123"  # (a run id's tail: 20 hex digits)
    for unknown in (f"{keys.shards}-{digest}", f"0-{digest}"):
        done = await asyncio.to_thread(run, "cancel", unknown)
        assert done.returncode == 1
        assert done.stderr.decode() == f"supersede: no run {unknown!r}\n"
    # (a run deleted after its retention is one too: `run` names the setting, a probe)
    done = await asyncio.to_thread(run, "run", f"0-{digest}")
    assert done.returncode == 1 and "--retention" in done.stderr.decode(), done.stderr
    # no run id at all is a bad argument (2), as `supersede run` says of it (it said 1); so is
    # a shard number before a tail that no run id has (`run 3-zz` said "no run", exit 1)
    for command, nonsense in (("cancel", "nonsense"), ("run", "3-zz"), ("cancel", "0-deadbeef")):
        done = await asyncio.to_thread(run, command, nonsense)
        assert done.returncode == 2, (command, nonsense, done.stderr)
        assert done.stderr.decode().startswith(f"supersede: not a run id: {nonsense!r}")
        assert done.stderr.count(b"\n") == 1, done.stderr

    def closed_early() -> tuple[int, bytes]:
        env = {**system.env, "SUPERSEDE_SHARDS": str(keys.shards)}
        env.pop("PYTHONUNBUFFERED", None)  # (stdout to a pipe is block-buffered, as usual)
        proc = subprocess.Popen([sys.executable, "-m", "supersede", "runs"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # (the reader is gone before the command writes)
        with proc.stderr:
            err = proc.stderr.read()
        return proc.wait(30), err

    code, said = await asyncio.to_thread(closed_early)
    assert code == 141 and b"Traceback" not in said, said


@pytest.fixture
async def on_backend(backend: tuple[Any, str], keys: Keys) -> Any:
    """(client, system) on one server, or on the session's 3-master cluster."""
    client, url = backend
    system = System(url, keys)
    yield client, system
    system.close()


async def test_chat_scenario_only_each_users_newest_message_succeeds(
    on_backend: Any, keys: Keys
) -> None:
    """Bursts for many users: the newest run of each user succeeds, every older one is
    cancelled, and no handler is still running after its cancel. The same code runs on one
    server and on a real cluster; final states are read through the CLI's --json output."""
    redis, system = on_backend
    await system.pipeline(redis, keys, 2, "--slots", "30")
    users, burst = 12, 4
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(burst):
            for u in range(users):
                sleep = 0.3 if i < burst - 1 else 0.05
                data = orjson.dumps({"userId": f"user{u}", "sleep": sleep, "text": f"m{i}"})
                pipe.xadd(keys.events_stream, {"name": "chat.message", "data": data})
        await pipe.execute()

    async def settled() -> bool:
        runs = await acli(system, "runs", "--workflow", "chat-reply", "--limit", "1000")
        return len(runs) == users * burst and all(
            r["state"] in ("SUCCEEDED", "CANCELLED") for r in runs
        )

    await eventually(settled, timeout=60)
    runs = await acli(system, "runs", "--workflow", "chat-reply", "--limit", "1000")
    by_user: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_user.setdefault(r["key"], []).append(r)
    for user, mine in by_user.items():
        mine.sort(key=lambda r: tuple(int(x) for x in r["event_id"].split("-")))
        newest, older = mine[-1], mine[:-1]
        assert newest["state"] == "SUCCEEDED", user
        assert all(r["state"] == "CANCELLED" for r in older), user
    log = [x.decode() for x in await redis.lrange(f"{keys.namespace}:test:log", 0, -1)]
    cancelled = {x.split(":")[1] for x in log if x.startswith("cancelled:")}
    stored = {x.split(":")[1] for x in log if x.startswith("stored:")}
    # A handler that saw its cancel never reached its next step; only the newest were stored.
    assert not cancelled & stored
    assert len(stored) == users


async def test_one_event_fans_out_to_two_workflows(
    redis: Redis, keys: Keys, system: System
) -> None:
    await register(redis, keys, {"id": "chat-audit", "events": ["chat.message"]})
    await system.pipeline(redis, keys, 1, expected_workflows=APP_WORKFLOWS + 1)
    await redis.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId":"f1"}'})

    async def both() -> bool:
        runs = await acli(system, "runs", "--key", "f1")
        audit = await acli(system, "runs", "--workflow", "chat-audit")
        return [r["state"] for r in runs] == ["SUCCEEDED"] and len(audit) == 1

    await eventually(both, timeout=30)


async def test_the_runs_of_an_event_are_found_by_the_id_a_producer_knows(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A producer with any Redis client knows the entry id XADD returned, or the `id` it sent;
    `supersede run` took only a run id, which it cannot make (the run's shard is its key's
    group's), so it could not find its runs (a producer probe). `runs --event ID` finds them,
    one per workflow that listens to the event, and `run` with an event's id says so."""
    await register(redis, keys, {"id": "chat-audit", "events": ["chat.message"]})
    await system.pipeline(redis, keys, 1, expected_workflows=APP_WORKFLOWS + 1)
    added = await redis.xadd(
        keys.events_stream, {"name": "chat.message", "data": '{"userId":"e1"}'}
    )
    entry = added.decode()
    await redis.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId":"e2"}',
                                          "id": "order-42"})  # fmt: skip
    await redis.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId":"e3"}',
                                          "id": "17-1"})  # fmt: skip

    async def ended(event: str, n: int) -> bool:  # (no executor serves chat-audit: it waits)
        runs = await acli(system, "runs", "--event", event)
        states = {r["workflow"]: r["state"] for r in runs}
        return len(runs) == n and states.get("chat-reply") == "SUCCEEDED"

    for event in (entry, "order-42", "17-1"):
        await eventually(lambda event=event: ended(event, 2), timeout=30)
    runs = await acli(system, "runs", "--event", "order-42")
    assert {r["workflow"] for r in runs} == {"chat-reply", "chat-audit"}
    assert {r["key"] for r in runs if r["workflow"] == "chat-reply"} == {"e2"}
    only = await acli(system, "runs", "--event", entry, "--workflow", "chat-reply")
    assert [r["key"] for r in only] == ["e1"]
    assert await acli(system, "runs", "--event", "never-sent") == []
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "supersede", "run", entry],
        env=system.env, capture_output=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2 and b"supersede runs --event " + entry.encode() in proc.stderr


async def test_a_dead_letter_is_replayed_on_one_server_and_on_a_cluster(
    on_backend: Any, keys: Keys
) -> None:
    """`dead --replay` wrote the event and deleted the dead letter in one transaction, which a
    cluster refuses (the inbox and the dead letters are in two slots): it failed every time
    there, from the CLI and the UI."""
    redis, system = on_backend
    await register(redis, keys, DOC)  # (with no workflow at all, the inbox waits)
    system.start("ingress", "--block-ms", "100")
    await redis.xadd(keys.events_stream, {"name": "doc.saved", "data": "not json"})

    async def dead_ids() -> list[str]:
        return [d["id"] for d in await acli(system, "dead")]

    async def one_dead() -> bool:
        return len(await dead_ids()) == 1

    await eventually(one_dead, timeout=30)
    [first] = await dead_ids()
    replayed = await acli(system, "dead", "--replay", first)
    assert replayed["replayed"] == first

    async def dead_again() -> bool:  # (still not JSON: the replayed event is dead-lettered anew)
        now = await dead_ids()
        return len(now) == 1 and now[0] != first

    await eventually(dead_again, timeout=30)


async def test_the_client_helpers_refuse_what_they_cannot_use_and_bound_their_waits(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """A client made with decode_responses=True failed with a UnicodeDecodeError of 34 lines
    (get_run) or an AttributeError (publish_runs); a blocking one with "object bytes can't be
    used in 'await' expression". A wait on a server that stopped answering ended after 5.5 s
    with redis-py's TimeoutError (no builtin TimeoutError), not at its timeout; a wait in a
    namespace where nothing is said only "not created yet"; timeout=-1 waited."""
    import signal

    import redis as redis_sync

    from supersede import client
    from supersede.server import EmbeddedServer

    rid = "0-" + "ab" * 10
    texts = Redis.from_url(redis_url, decode_responses=True)
    blocking = redis_sync.Redis.from_url(redis_url)
    try:
        for call in (
            lambda r: client.get_run(r, rid),
            lambda r: client.wait_for_run(r, rid, 1),
            lambda r: client.publish_runs(r, "e", {}, namespace=keys.namespace),
            lambda r: client.cancel(r, rid),
        ):
            with pytest.raises(ValueError, match="without decode_responses=True"):
                await call(texts)
            with pytest.raises(TypeError, match=r"take a redis\.asyncio client"):
                await call(blocking)
        # (publish took such a client, and still does: it reads nothing back)
        assert "-" in await client.publish(texts, "e", {}, namespace=keys.namespace)
        # publish_sync given an asyncio client returned '<coroutine object ...>' as the entry
        # id and published nothing (an API probe)
        before = await redis.xlen(keys.events_stream)
        with pytest.raises(TypeError, match=r"publish_sync takes a blocking client"):
            client.publish_sync(redis, "e", {}, namespace=keys.namespace)
        assert await redis.xlen(keys.events_stream) == before
    finally:
        await texts.aclose()
        blocking.close()
    with pytest.raises(ValueError, match="timeout must be 0 or more"):
        await client.wait_for_run(redis, rid, -1)
    # wrong types said by argument (a TypeError from deep inside: "'<' not supported ...")
    with pytest.raises(TypeError, match="timeout must be a number of seconds, got '5'"):
        await client.wait_for_run(redis, rid, "5")
    with pytest.raises(TypeError, match="key must be a str, got int 1"):
        await client.cancel_key(redis, "w", 1, namespace=keys.namespace)
    # a database that is no number: the CLI refused it, connect() used database 0
    from supersede.errors import ConfigError

    for connect in (supersede.connect, supersede.connect_sync):
        with pytest.raises(ConfigError, match=r"database \(its path\) must be a number"):
            connect(redis_url.rstrip("/") + "/1x")
    with pytest.raises(client.WaitTimeout, match="nothing is in namespace 'nowhere'"):
        await client.wait_for_run(redis, rid, 0.2, namespace="nowhere")

    server = EmbeddedServer().start()
    frozen = Redis.from_url(server.url)
    try:
        await frozen.ping()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(client.WaitTimeout, match=r"has not ended after 0\.5s"):
            await client.wait_for_run(frozen, rid, 0.5)
        assert time.monotonic() - started < 3.0  # (at its timeout, plus a second's look)
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)
        await frozen.aclose(close_connection_pool=True)
        server.stop()


async def test_a_run_and_a_key_are_cancelled_from_python(
    redis: Redis, keys: Keys, system: System
) -> None:
    """supersede.client.cancel and cancel_key: a web backend's "stop" button (only the CLI
    could cancel)."""
    from supersede import client

    await system.pipeline(redis, keys, 1)
    ns = keys.namespace
    _, [one], _ = await client.publish_runs(
        redis, "chat.message", {"userId": "p1", "sleep": 30}, namespace=ns
    )

    async def running() -> bool:
        run = await client.get_run(redis, one.run_id, namespace=ns)
        return run is not None and run.state == "RUNNING"

    await eventually(running, timeout=30)
    assert await client.cancel(redis, one.run_id, namespace=ns) is True
    ended = await client.wait_for_run(redis, one.run_id, 10, namespace=ns)
    assert (ended.state, ended.reason) == ("CANCELLED", "manual")
    assert await client.cancel(redis, one.run_id, namespace=ns) is False  # (ended already)
    with pytest.raises(LookupError, match=r"no run '0-0{20}'"):
        await client.cancel(redis, "0-" + "0" * 20, namespace=ns)
    for nope in ("nope", "0-nope"):
        with pytest.raises(ValueError, match=f"not a run id: '{nope}'"):
            await client.cancel(redis, nope, namespace=ns)

    # every live run of a key (here one: the newer event's run superseded the older one's)
    for text in ("a", "b"):
        await client.publish(redis, "chat.message", {"userId": "p2", "sleep": 30, "t": text},
                             namespace=ns)  # fmt: skip

    async def superseded_once() -> bool:
        runs = await acli(system, "runs", "--workflow", "chat-reply", "--key", "p2")
        return sorted(r["state"] for r in runs) == ["CANCELLED", "RUNNING"]

    await eventually(superseded_once, timeout=30)
    [live] = [r["id"] for r in await acli(system, "runs", "--workflow", "chat-reply",
                                           "--key", "p2", "--state", "running")]  # fmt: skip
    assert await client.cancel_key(redis, "chat-reply", "p2", namespace=ns) == [live]
    assert await client.cancel_key(redis, "chat-reply", "p2", namespace=ns) == []
    with pytest.raises(LookupError, match="no workflow 'chat-rpely' is registered"):
        await client.cancel_key(redis, "chat-rpely", "p2", namespace=ns)
    # a namespace nothing ever ran in (namespace= forgotten): said as such
    with pytest.raises(LookupError, match="nothing in namespace 'elsewhere' yet"):
        await client.cancel_key(redis, "chat-reply", "p2", namespace="elsewhere")
    with pytest.raises(ValueError, match="not a run id: 'nope'"):
        await client.cancel(redis, "nope", namespace="elsewhere")
    # a workflow without a limit is keyed by the event id: here one shaped like an entry id,
    # whose run id is hashed apart from the entry ids'
    _, [work], _ = await client.publish_runs(redis, "work.item", {"sleep": 30}, id="77-1",
                                             namespace=ns)  # fmt: skip

    async def working() -> bool:
        run = await client.get_run(redis, work.run_id, namespace=ns)
        return run is not None and run.state == "RUNNING"

    await eventually(working, timeout=30)
    assert await client.cancel_key(redis, "work", "77-1", namespace=ns) == [work.run_id]


async def test_publish_takes_metadata_for_keys_that_read_it(
    redis: Redis, keys: Keys, system: System
) -> None:
    """`supersede publish` had no way to give `metadata`: a workflow keyed by it could not be
    tried from the CLI (an API-user probe). `--metadata` is a JSON object, checked as the data
    is, in one line naming the option."""
    body = {"id": "tenant", "events": ["tenant.ev"],
            "concurrency": {"expression": "metadata.tenant", "max_runs": 1}}  # fmt: skip
    await register(redis, keys, body)
    await redis.hset(keys.config_hash, "shards", keys.shards)  # (as a service pins it)
    published = await acli(system, "publish", "tenant.ev", "{}", "--metadata", '{"tenant": "acme"}')
    assert [r["key"] for r in published["runs"]] == ["acme"]
    [(_, fields)] = await redis.xrange(keys.events_stream)
    assert orjson.loads(fields[b"metadata"]) == {"tenant": "acme"}
    bad = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "supersede", "publish", "tenant.ev", "{}", "--metadata", "[1]"],
        env=system.env, capture_output=True, timeout=30,
    )  # fmt: skip
    lines = bad.stderr.decode().strip().splitlines()
    assert (
        bad.returncode != 0 and len(lines) == 1 and "--metadata must be a JSON object" in lines[0]
    )
    # a max_runs expression that fails for an event: no run planned, and said (a run id was
    # printed, exit 0, for an event ingress dead-letters for that workflow: an API-user probe)
    plan = {"id": "by-plan", "events": ["tenant.ev"],
            "concurrency": {"expression": "metadata.tenant",
                            "max_runs": "metadata.plan == 'pro' ? 5 : 1"}}  # fmt: skip
    await register(redis, keys, plan)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "supersede", "publish", "tenant.ev", "{}", "--metadata",
         '{"tenant": "acme"}', "--json"],
        env=system.env, capture_output=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r["workflow"] for r in orjson.loads(done.stdout)["runs"]] == ["tenant"]
    said = done.stderr.decode()
    assert "no run of 'by-plan'" in said and "max_runs expression fails" in said, said
    pro = await acli(system, "publish", "tenant.ev", "{}", "--metadata",
                     '{"tenant": "acme", "plan": "pro"}')  # fmt: skip
    assert sorted(r["workflow"] for r in pro["runs"]) == ["by-plan", "tenant"]


async def test_publish_reads_data_past_an_arguments_limit_from_stdin_or_a_file(
    redis: Redis, keys: Keys, system: System, tmp_path: Any
) -> None:
    """The data was an argument only: past ~128 KiB the OS refused the command ("Argument list
    too long"), though the inbox takes 1 MiB (a new-user probe). `-` reads it from stdin,
    `@PATH` from a file; a missing file is one line naming it."""
    body = {"id": "big", "events": ["big.ev"], "concurrency": {"expression": "input.k"}}
    await register(redis, keys, body)
    await redis.hset(keys.config_hash, "shards", keys.shards)  # (as a service pins it)
    data = orjson.dumps({"k": "big", "text": "word " * 100_000})  # (500 KB)
    path = tmp_path / "data.json"
    path.write_bytes(data)
    for args, stdin in ((["-"], data), ([f"@{path}"], b"")):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "supersede", "publish", "big.ev", *args,
                             "--json"],
            env=system.env, input=stdin, capture_output=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        assert [r["key"] for r in orjson.loads(done.stdout)["runs"]] == ["big"]
        assert not done.stderr  # (under 1 MiB: no warning)
    entries = await redis.xrange(keys.events_stream)
    assert [orjson.loads(f[b"data"]) for _, f in entries] == [orjson.loads(data)] * 2
    # past ingress's default 1 MiB: published, with a warning that it is dead-lettered (it
    # said nothing, exit 0; a CLI probe); an integer past 64 bits is refused (it became a float)
    huge = orjson.dumps({"k": "huge", "text": "word " * 250_000})
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "supersede", "publish", "big.ev", "-"],
        env=system.env, input=huge, capture_output=True, timeout=30,
    )  # fmt: skip
    said = done.stderr.decode()
    assert done.returncode == 0 and "over ingress's default --max-payload" in said, said
    long_int = b'{"k": "n", "n": 123456789012345678901234567890}'
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "supersede", "publish", "big.ev", "-"],
        env=system.env, input=long_int, capture_output=True, timeout=30,
    )  # fmt: skip
    [line] = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2 and "an integer past 64 bits" in line, line
    assert await redis.xlen(keys.events_stream) == 3
    gone = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "supersede", "publish", "big.ev", "@/nonexistent"],
        env=system.env, capture_output=True, timeout=30,
    )  # fmt: skip
    [line] = gone.stderr.decode().strip().splitlines()
    assert gone.returncode == 2 and "'/nonexistent'" in line and "No such file" in line, line


async def test_a_planned_run_id_finds_its_run_after_a_new_version_moved_it(
    redis: Redis, keys: Keys, system: System
) -> None:
    """`publish` plans run ids from the registry when it writes the event; a new version of
    the workflow registered before ingress read it puts the run's group, so its shard,
    elsewhere: the ids printed named no run, `--wait` said NOT_CREATED for a run that had
    succeeded, `wait_for_run` timed out (a rolling-deploy probe: 10% of the ids published).
    The tail of the id stays (the event and the workflow): `supersede run` finds the run by
    it, and `wait_for_run(entry=)` follows it to the event's own run, never to a run of
    another event that shares the tail (an explicit id published again once forgotten)."""
    import os
    import signal

    from supersede.client import get_run, publish_runs, wait_for_run
    from supersede.lookups import moved_run

    moves = {"id": "moves", "events": ["moves.ev"],
             "concurrency": {"expression": "input.k", "max_runs": 1}}  # fmt: skip
    await register(redis, keys, moves)
    await system.pipeline(redis, keys, 1, expected_workflows=APP_WORKFLOWS + 1)
    ingress = system.procs[-1]
    os.kill(ingress.pid, signal.SIGSTOP)
    try:
        published = []
        for i in range(8):
            entry, (plan,), _ = await publish_runs(redis, "moves.ev", {"k": f"k{i}"},
                                                   namespace=keys.namespace)  # fmt: skip
            published.append((entry, plan))
        await register(redis, keys, {**moves, "concurrency": {"expression": "input.k",
                                                              "max_runs": 2}})  # fmt: skip
    finally:
        os.kill(ingress.pid, signal.SIGCONT)

    async def created() -> bool:
        recs = await records(redis, keys)
        return sum(1 for r in recs.values() if r["w"] == "moves") == len(published)

    await eventually(created, timeout=30)
    actual = {rid for rid, r in (await records(redis, keys)).items() if r["w"] == "moves"}
    moved = [(e, p) for e, p in published if p.run_id not in actual]
    assert moved, "no run changed shards (1 in 16**8): the test shows nothing"
    for _, p in published:
        shown = await acli(system, "run", p.run_id)
        assert shown["id"] in actual and shown["key"] == p.key
        assert shown["id"].partition("-")[2] == p.run_id.partition("-")[2]
    entry, plan = moved[0]
    assert await get_run(redis, plan.run_id, namespace=keys.namespace) is None  # (exact)
    own = (await moved_run(redis, keys, plan.run_id, entry)).id
    assert await moved_run(redis, keys, plan.run_id, "1-1") is None  # (another event's)
    # an id of no shard of this namespace is no run, not another shard's (it showed one)
    tail = plan.run_id.partition("-")[2]
    for stray in (f"{keys.shards}-{tail}", f"99-{tail}"):
        assert await moved_run(redis, keys, stray) is None
        gone = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "supersede", "run", stray],
            env=system.env, capture_output=True, timeout=60,
        )  # fmt: skip
        assert gone.returncode == 1 and b"no run" in gone.stderr, gone.stderr
    assert await acli(system, "cancel", own) == {own: True}
    ended = await wait_for_run(redis, plan.run_id, timeout=10, namespace=keys.namespace,
                               entry=entry)  # fmt: skip
    assert ended.id == own and ended.state == "CANCELLED" and ended.entry == entry

    # `publish --wait` whose run moves and does not end in time: the row shows the run's own
    # id and state, and does not call it a duplicate (it did, the review of the first mend)
    from supersede.model import group_id, shard_of_group

    v1 = (await register(redis, Keys("scratch", keys.shards), moves)).version
    v2 = (await register(redis, Keys("scratch", keys.shards), {**moves, "concurrency": {
        "expression": "input.k", "max_runs": 3}})).version  # fmt: skip
    key = next(
        f"w{i}"
        for i in range(100)
        if shard_of_group(group_id("moves", v1, f"w{i}"), keys.shards)
        != shard_of_group(group_id("moves", v2, f"w{i}"), keys.shards)
    )
    await register(redis, keys, moves)  # (v1 again: its events planned on v1's shards)
    os.kill(ingress.pid, signal.SIGSTOP)
    try:
        inbox = await redis.xlen(keys.events_stream)
        waiting = asyncio.ensure_future(asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "supersede", "publish", "moves.ev",
                             orjson.dumps({"k": key}).decode(), "--wait", "--timeout", "6",
                             "--json"],
            env=system.env, capture_output=True, timeout=60,
        ))  # fmt: skip

        async def written() -> bool:
            return await redis.xlen(keys.events_stream) > inbox

        await eventually(written, timeout=30)
        await register(redis, keys, {**moves, "concurrency": {"expression": "input.k",
                                                              "max_runs": 3}})  # fmt: skip
    finally:
        os.kill(ingress.pid, signal.SIGCONT)
    done = await waiting
    [row] = orjson.loads(done.stdout)["runs"]
    assert row["state"] == "ASSIGNED" and row["timed_out"], row
    assert row["duplicate_of"] is None, row
    assert row["run"] in {rid for rid, r in (await records(redis, keys)).items() if r["k"] == key}


async def test_a_run_waiting_for_an_executor_says_none_serves_its_workflow(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A run of a workflow whose pool is scaled to zero showed only ASSIGNED, in `supersede
    run` and in `publish --wait`'s timeout; only `status` said that no executor serves it (a
    probe). Both say it now."""
    await register(redis, keys, DOC)  # (registered ahead of its pool, which never starts)
    system.start("admission", "--block-ms", "100")
    system.start("ingress", "--block-ms", "100")

    async def pinned() -> bool:  # (the shard count a publish plans its run ids with)
        return bool(await redis.exists(keys.config_hash))

    await eventually(pinned, timeout=30)
    waited = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "supersede", "publish", "doc.saved", "{}", "--wait",
         "--timeout", "2"],
        env=system.env, capture_output=True, timeout=60,
    )  # fmt: skip
    said = waited.stderr.decode()
    assert waited.returncode != 0 and "(ASSIGNED; no executor serves workflow doc now)" in said, (
        said
    )
    [rid] = list(await records(redis, keys))
    shown = await acli(system, "run", rid)
    assert shown["state"] == "ASSIGNED" and shown["workflow_served_ms_ago"] is None, shown
    text = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "supersede", "run", rid], env=system.env,
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert "waits     for an executor: none serves workflow doc (none ever said so)" in (
        text.stdout.decode()
    ), text.stdout.decode()
