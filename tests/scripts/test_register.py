"""The registry on a real server: a registration bumps the epoch only on change, and a version
names one definition for good (registering other content under it is refused)."""

from __future__ import annotations

import orjson
import pytest
from redis.asyncio import Redis

from supersede.errors import DefinitionError, WorkflowRejected
from supersede.keys import Keys
from supersede.registry import load_all, register, register_all
from tests.support import workflow_body as definition


async def test_register_stores_and_bumps_the_epoch_only_on_change(redis: Redis, keys: Keys) -> None:
    await register(redis, keys, definition())
    await register(redis, keys, definition())
    epoch, defs, errors = await load_all(redis, keys)
    assert epoch == 1 and list(defs) == ["chat-reply"] and errors == {}
    await register(redis, keys, definition(events=["chat.message", "chat.edit"]))
    await redis.hset(keys.workflows_hash, "broken", b"{not json")
    epoch, defs, errors = await load_all(redis, keys)
    assert epoch == 2 and defs["chat-reply"].events == ("chat.message", "chat.edit")
    assert list(errors) == ["broken"]
    with pytest.raises(DefinitionError):
        await register(redis, keys, definition(id=""))


async def test_an_explicit_version_reused_with_other_limits_is_refused(
    redis: Redis, keys: Keys
) -> None:
    """Refill reads a group's limits from its runs, so version "v1" changed from max_runs 3 to
    1 in place would keep 3 running; the change needs a new version."""
    three = {"expression": "input.userId", "max_runs": 3}
    await register(redis, keys, definition(version="v1", concurrency=three))
    before = await redis.hget(keys.workflows_hash, "chat-reply")
    one = {"expression": "input.userId", "max_runs": 1}
    with pytest.raises(DefinitionError) as info:
        await register(redis, keys, definition(version="v1", concurrency=one))
    assert info.value.field == "version" and "'v1'" in str(info.value)
    assert await redis.hget(keys.workflows_hash, "chat-reply") == before
    assert int(await redis.get(keys.registry_epoch)) == 1
    await register(redis, keys, definition(version="v2", concurrency=one))  # the way to change
    _, defs, _ = await load_all(redis, keys)
    assert defs["chat-reply"].version == "v2" and defs["chat-reply"].concurrency.max_runs == 1
    # a definition without a version gets one from its content: a change never collides
    await register(redis, keys, definition(concurrency=three))
    await register(redis, keys, definition(concurrency=one))


async def test_retention_is_kept_beside_the_definition_and_changes_no_version(
    redis: Redis, keys: Keys
) -> None:
    """A storage setting: setting or changing it keeps the version (and so the groups, whose
    limits apply across the change), and it can change under an explicit version too."""
    plain = await register(redis, keys, definition())
    kept = await register(redis, keys, definition(retention=3600))
    assert kept.version == plain.version and kept.retention == 3600
    assert int(await redis.get(keys.registry_epoch)) == 1  # the definition did not change
    assert await redis.hget(keys.retentions_hash, "chat-reply") == b"3600"
    await register(redis, keys, definition(version="v1", retention=60))
    await register(redis, keys, definition(version="v1", retention=120))
    assert await redis.hget(keys.retentions_hash, "chat-reply") == b"120"
    await register(redis, keys, definition(version="v1"))  # back to admission's default
    assert await redis.hget(keys.retentions_hash, "chat-reply") is None
    with pytest.raises(DefinitionError) as info:
        await register(redis, keys, definition(retention=0))
    assert info.value.field == "retention"


async def test_the_registry_remembers_the_versions_of_a_workflow(redis: Redis, keys: Keys) -> None:
    # a definition stored before versions were kept: its version is remembered first
    await redis.hset(keys.workflows_hash, "chat-reply", orjson.dumps(definition(version="v0")))
    for v in ("v1", "v2", "v1"):
        await register(redis, keys, definition(version=v, max_attempts=int(v[1:]) + 1))
    assert orjson.loads(await redis.hget(keys.workflow_versions_hash, "chat-reply")) == [
        "v0", "v2", "v1"
    ]  # fmt: skip


async def test_a_scope_changes_its_limits_when_its_workflows_register_together(
    redis: Redis, keys: Keys
) -> None:
    """The workflows of a scope must agree on its limits, so one registered alone with new
    limits is refused; the module that holds them all registers them in one call, all or none,
    so the scope's limits can change (they could not: each was checked against the others'
    stored limits, one at a time) and no reader ever sees the scope half changed."""
    one = {"expression": "input.k", "max_runs": 1, "scope": "s1"}
    two = {**one, "max_runs": 2}
    await register_all(redis, keys, [definition(id="a", concurrency=one),
                                     definition(id="b", concurrency=one)])  # fmt: skip
    assert int(await redis.get(keys.registry_epoch)) == 1  # one bump for the call
    with pytest.raises(WorkflowRejected) as info:
        await register(redis, keys, definition(id="a", concurrency=two))
    assert info.value.workflow == "a" and info.value.field == "concurrency.scope"
    assert "with workflow 'b'" in str(info.value)
    # both, in one call: accepted, one bump
    await register_all(redis, keys, [definition(id="a", concurrency=two),
                                     definition(id="b", concurrency=two)])  # fmt: skip
    epoch, defs, errors = await load_all(redis, keys)
    assert errors == {} and epoch == 2
    assert defs["a"].concurrency.max_runs == defs["b"].concurrency.max_runs == 2
    # the set must agree within itself too
    with pytest.raises(WorkflowRejected) as info:
        await register_all(redis, keys, [definition(id="a", concurrency=one),
                                         definition(id="b", concurrency=two)])  # fmt: skip
    assert info.value.field == "concurrency.scope"


async def test_a_registration_is_all_or_none(redis: Redis, keys: Keys) -> None:
    """A refused definition (here a version stored with other content) writes none of the
    call's others, and names itself."""
    await register(redis, keys, definition(id="b", version="v1"))
    before = await redis.hgetall(keys.workflows_hash)
    with pytest.raises(WorkflowRejected) as info:
        changed = definition(id="b", version="v1", max_attempts=9)
        await register_all(redis, keys, [definition(id="a"), changed])
    assert info.value.workflow == "b" and info.value.field == "version"
    assert await redis.hgetall(keys.workflows_hash) == before
    assert int(await redis.get(keys.registry_epoch)) == 1
    with pytest.raises(WorkflowRejected) as info:
        await register_all(redis, keys, [definition(id="a"), definition(id="a")])
    assert info.value.workflow == "a" and info.value.field == "id"
    with pytest.raises(WorkflowRejected) as info:
        bad = {"expression": "input.k", "max_runs": 0}
        await register_all(redis, keys, [definition(id="a"), definition(id="c", concurrency=bad)])
    assert info.value.workflow == "c" and info.value.field == "concurrency.max_runs"


async def test_a_definition_stored_before_a_stricter_check_is_still_served(
    redis: Redis, keys: Keys
) -> None:
    """The checks added at registration (a step timeout's ceiling, control characters, the
    trial of expressions) do not apply to what an older executor stored: ingress would skip
    it, and acknowledge its events with no run."""
    old = definition(id="legacy", steps=[{"name": "s", "timeout": 40 * 86_400}],
                     concurrency={"expression": "input.a + suffix"})  # fmt: skip
    await redis.hset(keys.workflows_hash, "legacy", orjson.dumps({**old, "version": "v1"}))
    _, defs, errors = await load_all(redis, keys)
    assert errors == {} and defs["legacy"].steps[0].timeout == 40 * 86_400
    with pytest.raises(WorkflowRejected) as info:  # registering it now is refused
        await register(redis, keys, old)
    assert info.value.field in ("steps[0].timeout", "concurrency.expression")


async def test_retiring_removes_the_definition_unless_an_executor_served_it_lately(
    redis: Redis, keys: Keys
) -> None:
    """retire_workflow.lua: refused while an executor said it serves the workflow within the
    window (by the server's clock), done otherwise or when forced: the definition and its
    served mark go, the epoch moves (ingress reloads), its versions stay remembered."""
    import time

    from supersede.scripts import Scripts

    scripts = Scripts(redis, keys)
    await register(redis, keys, definition())
    epoch, _, _ = await load_all(redis, keys)
    now_ms = int(time.time() * 1000)
    await redis.hset(keys.workflows_served_hash, "chat-reply", now_ms - 2000)
    ago = await scripts.retire_workflow("chat-reply", 15_000)
    assert ago is not None and 1000 <= ago < 15_000
    assert await redis.hget(keys.workflows_hash, "chat-reply") is not None
    await redis.hset(keys.workflows_served_hash, "chat-reply", now_ms - 60_000)
    assert await scripts.retire_workflow("chat-reply", 15_000) is None
    after, defs, _ = await load_all(redis, keys)
    assert defs == {} and after == epoch + 1
    assert await redis.hget(keys.workflows_served_hash, "chat-reply") is None
    assert await redis.hget(keys.workflow_versions_hash, "chat-reply") is not None
    with pytest.raises(LookupError, match="no workflow 'chat-reply'"):
        await scripts.retire_workflow("chat-reply", 0)
    await register(redis, keys, definition())
    await redis.hset(keys.workflows_served_hash, "chat-reply", now_ms)
    assert await scripts.retire_workflow("chat-reply", 0) is None  # (forced)


async def test_retire_leaves_a_workflow_registered_again_meanwhile_alone(
    redis: Redis, keys: Keys
) -> None:
    """An executor that starts while retire waits for ingress and admission registers the
    workflow again (or one from before served marks, which passes the check): retire stops
    there, its runs and streams untouched (it cancelled them and deleted the streams, the
    executors' group and pending entries with them)."""
    import asyncio

    from supersede.services.ops import retire

    await register(redis, keys, definition())
    stream = keys.shard(0).assignments_stream("chat-reply")
    await redis.xadd(stream, {"id": "x"})
    task = asyncio.create_task(retire(redis, keys, "chat-reply"))
    await asyncio.sleep(0.5)  # (within its wait for ingress to reload)
    await register(redis, keys, definition())
    with pytest.raises(ValueError, match="registered again meanwhile") as info:
        await task
    assert await redis.exists(stream)
    # (it says what the gap cost: it said only "left as they are")
    assert "its events published then made no run of it" in str(info.value)


async def test_retire_refuses_a_workflow_an_older_executor_reads(redis: Redis, keys: Keys) -> None:
    """An executor from before the served marks writes none, but reads the workflow's
    assignment streams: retire is refused by those reads (it went through, and the old
    executor registered the workflow again a second later)."""
    from supersede.protocol import EXECUTOR_GROUP
    from supersede.services.ops import retire

    await register(redis, keys, definition())
    stream = keys.shard(3).assignments_stream("chat-reply")
    await redis.xgroup_create(stream, EXECUTOR_GROUP, id="0", mkstream=True)
    await redis.xadd(stream, {"id": "x"})  # (a read that gets nothing makes no consumer on 7.0)
    await redis.xreadgroup(EXECUTOR_GROUP, "executor-old-1", {stream: ">"}, count=1)
    with pytest.raises(ValueError, match="executor-old-1 read its assignments lately"):
        await retire(redis, keys, "chat-reply")
    assert await redis.hget(keys.workflows_hash, "chat-reply") is not None


async def test_the_registry_reads_at_maxmemory(redis: Redis, keys: Keys) -> None:
    """A server at its maxmemory (noeviction) refuses a MULTI, read-only or not: the registry
    was read in one, so `status`, admission's trim (which frees memory) and ingress's reload
    failed exactly when memory was full. It is read without one, and as it is."""
    from supersede.services import ops

    await register(redis, keys, definition())
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory", used // 2)
    try:
        with pytest.raises(Exception, match=r"used memory > .maxmemory"):  # (it refuses writes)
            await redis.set(f"{keys.namespace}:test:x", "x")
        epoch, defs, errors = await load_all(redis, keys)
        assert list(defs) == ["chat-reply"] and not errors and epoch == 1
        status = await ops.COMMANDS["status"](redis, keys, None)
        assert "chat-reply" in str(status)
    finally:
        await redis.config_set("maxmemory", 0)


async def test_status_names_a_stored_definition_this_build_would_refuse(
    redis: Redis, keys: Keys
) -> None:
    """A definition an older build stored, which this build refuses at registration (a
    comprehension reading the event): ingress serves it, but no executor of this build can
    register it, and status only showed its runs waiting. It says why."""
    from supersede.registry import parse
    from supersede.scripts import Scripts
    from supersede.services import ops
    from supersede.services.render import render

    expression = "input.a.exists(x, x in input.b) ? 'y' : 'n'"
    wf = parse(definition(concurrency={"expression": expression}), strict=False)
    body = orjson.dumps(wf.stored_body())
    await Scripts(redis, keys).register_workflows([(wf.id, wf.version, body, wf.retention)])
    status = await ops.status(redis, keys)
    assert "reads `input` inside its arguments" in status["refused_workflows"][wf.id]
    assert f"workflow {wf.id} is served as stored, but executors of this build refuse" in render(
        "status", status
    )
    await register(redis, keys, definition(id="fine"))
    assert list((await ops.status(redis, keys))["refused_workflows"]) == [wf.id]


async def test_status_shows_a_workflow_s_debounce_window_and_scope(
    redis: Redis, keys: Keys
) -> None:
    """status listed the key, max_runs, strategy and strict of each workflow but not its
    debounce window or scope, so a debounced run's QUEUED wait looked unexplained."""
    from supersede.services import ops
    from supersede.services.render import render
    from supersede.services.ui.pages import overview

    concurrency = {"expression": "input.docId", "max_runs": 1, "debounce_ms": 300,
                   "max_wait_ms": 2000, "scope": "docs"}  # fmt: skip
    await register(redis, keys, definition(id="autosave", concurrency=concurrency))
    await register(redis, keys, definition(id="plain"))
    status = await ops.status(redis, keys)
    saved, plain = status["workflows"]["autosave"], status["workflows"]["plain"]
    assert (saved["debounce_ms"], saved["max_wait_ms"], saved["scope"]) == (300, 2000, "docs")
    assert (plain["debounce_ms"], plain["scope"]) == (0, None)
    text = render("status", status)
    [row] = [line for line in text.splitlines() if line.startswith("autosave")]
    assert "scope docs, debounced 300 ms (at most 2000 ms)" in row
    assert "debounced" not in text.replace(row, "")
    page = overview(status, [])
    assert "debounced 300 ms (at most 2000 ms)" in page and "scope docs" in page


async def test_a_registration_names_its_version_and_marks_it_in_the_same_step(
    redis: Redis, keys: Keys
) -> None:
    """The executors' definition heal reads which version was registered last and whether an
    executor served it since. Written after the registration, apart from it, two registrations
    at once left one version stored and the other named (an upgrade probe: 50 of 400), and the
    heal off for good. An executor's registration marks its version served at once (a late
    executor killed before its first mark left its definition for good); `supersede
    register`'s leaves it unmarked (ahead of a deploy: kept until served)."""
    import asyncio

    bodies = [{"id": "w", "events": ["e"], "version": v} for v in ("v1", "v2")]
    for _ in range(100):
        await asyncio.gather(*(register_all(redis, keys, [b], serving=True) for b in bodies))
        stored = orjson.loads(await redis.hget(keys.workflows_hash, "w"))["version"]
        named = await redis.hget(keys.registered_versions_hash, "w")
        assert named == stored.encode(), (named, stored)
    seconds, _ = await redis.time()
    mark = await redis.hget(keys.served_versions_hash, f"w\n{stored}")
    assert mark is not None and abs(int(mark) - seconds * 1000) < 5_000
    other = "v1" if stored == "v2" else "v2"
    await register_all(redis, keys, [{"id": "w", "events": ["e"], "version": other}])
    assert await redis.hget(keys.registered_versions_hash, "w") == other.encode()
    assert await redis.hget(keys.served_versions_hash, f"w\n{other}") is None
    # Every value of the served-versions hash is a number: 0.3.15 and older executors read
    # each as one, and the version names 0.3.16 kept there made each fail its registry task
    # and turn not ready, for good after a rollback (an upgrade probe). A registration deletes
    # the name an 0.3.16 build left.
    await redis.hset(keys.served_versions_hash, "w", "v0")
    await register_all(redis, keys, [{"id": "w", "events": ["e"], "version": stored}])
    for field, value in (await redis.hgetall(keys.served_versions_hash)).items():
        assert value.isdigit(), (field, value)
