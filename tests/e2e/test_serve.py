"""`supersede serve`: ingress, admission and an executor as tasks of one process (issue 16,
item 3: the all-in-one mode for small deployments). The chat scenario settles, the three
services' metrics are on one port, and SIGTERM drains a run in flight: the executor finishes
it and admission, stopped last, applies its result before the process exits."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import uuid
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from supersede import codec
from supersede.client import get_run, publish_runs, wait_for_run
from supersede.config import connect
from supersede.keys import Keys
from supersede.model import shard_of_run
from supersede.protocol import RunRecord, pack_input, request_payloads
from supersede.server import EmbeddedCluster
from tests.support import (
    APP,
    APP_WORKFLOWS,
    System,
    eventually,
    make_request,
    records,
    scrape,
)


async def test_one_process_runs_the_system_and_drains_on_sigterm(
    redis: Redis, keys: Keys, system: System
) -> None:
    proc, port = await system.serving("serve", APP, "--slots", "20")

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


# -- the hand-over: ingress -> admission -> executor inside the process -----------------------


async def _serve(system: System, redis: Redis, keys: Keys, *args: str) -> subprocess.Popen[bytes]:
    """`supersede serve`, once its executor registered the workflows."""
    proc = system.start("serve", *args)

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

    await eventually(registered, timeout=30)
    return proc


async def _records(redis: Redis, keys: Keys) -> dict[str, RunRecord]:
    return {rid: RunRecord.from_map(rid, rec) for rid, rec in (await records(redis, keys)).items()}


async def _entries_added(redis: Redis, stream: str) -> int:
    """Entries ever added to `stream` (0 when it was never written)."""
    if not await redis.exists(stream):
        return 0
    return int((await redis.xinfo_stream(stream))["entries-added"])


async def test_serve_hands_runs_to_its_executor_without_the_streams(
    redis: Redis, keys: Keys, system: System
) -> None:
    """With free slots, no run crosses the requests, an assignment or a results stream:
    admitted in the call that ingress makes, claimed for the executor in that same call, and
    its result applied by the process's admission (fails on the old serve, where every run
    made the three entries; the results entry on `4fefa30`)."""
    await _serve(system, redis, keys, APP, "--slots", "20")
    ns = keys.namespace
    planned = []
    for i in range(10):
        planned += (await publish_runs(redis, "work.item", {"i": i}, namespace=ns))[1]
    for user in ("a", "b", "c"):
        planned += (await publish_runs(redis, "chat.message", {"userId": user}, namespace=ns))[1]
    for p in planned:
        assert (await wait_for_run(redis, p.run_id, 30, namespace=ns)).state == "SUCCEEDED"
    recs = await _records(redis, keys)
    for p in planned:
        points = [name for name, _ in recs[p.run_id].path()]
        assert "claimed" in points and "executor read" not in points, points
        assert recs[p.run_id].executor
    for sk in keys.all_shards():
        assert await _entries_added(redis, sk.requests_stream) == 0
        assert await _entries_added(redis, sk.results_stream) == 0
        for wf in ("work", "chat-reply"):
            assert await _entries_added(redis, sk.assignments_stream(wf)) == 0


async def test_serve_never_runs_more_than_its_slots_and_the_rest_take_the_streams(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Two slots, eight runs at once: two are handed over, the others wait in their assignment
    stream until a slot frees; the step log never shows three at once."""
    await _serve(system, redis, keys, APP, "--slots", "2")
    ns = keys.namespace
    planned = []
    for i in range(8):
        planned += (await publish_runs(redis, "work.item", {"i": i, "sleep": 0.3}, namespace=ns))[1]
    for p in planned:
        assert (await wait_for_run(redis, p.run_id, 30, namespace=ns)).state == "SUCCEEDED"
    running = most = 0
    for line in await redis.lrange(f"{ns}:test:log", 0, -1):
        kind = line.decode().split(":")[0]
        running += {"started": 1, "done": -1}.get(kind, 0)
        most = max(most, running)
    assert most == 2
    recs = await _records(redis, keys)
    via_stream = [p for p in planned if "executor read" in dict(recs[p.run_id].path())]
    assert 0 < len(via_stream) < len(planned)  # both ways were taken


async def test_a_handed_over_run_is_retried_after_serve_is_killed(
    redis: Redis, keys: Keys, system: System
) -> None:
    """SIGKILL after the hand-over: the run is RUNNING under the dead process's lease, which
    lapses; the reaper retries it and the next serve process runs it to the end."""
    first = await _serve(system, redis, keys, APP, "--slots", "4", "--lease", "1")
    ns = keys.namespace
    _, [run], _ = await publish_runs(redis, "work.item", {"sleep": 1.5}, namespace=ns)

    async def running() -> bool:
        got = await get_run(redis, run.run_id, namespace=ns)
        return got is not None and got.state == "RUNNING"

    await eventually(running, timeout=30)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    system.start("serve", APP, "--slots", "4", "--lease", "1")
    done = await wait_for_run(redis, run.run_id, 60, namespace=ns)
    assert done.state == "SUCCEEDED" and done.attempt == 2


async def test_serve_takes_the_bounds_of_the_separate_services(
    redis: Redis, keys: Keys, system: System
) -> None:
    """`serve` had no --retention, --max-dead-letters, --max-payload, ...: the README's sizing
    of memory could not be applied to it. Its admission and ingress take them: an event over
    --max-payload is dead-lettered, and the dead letters are capped at --max-dead-letters."""
    await _serve(system, redis, keys, APP, "--max-payload", "200", "--max-dead-letters", "3",
                 "--retention", "600", "--max-dedup-ids", "100")  # fmt: skip
    for i in range(10):
        data = f'{{"i": {i}, "pad": "{"x" * 300}"}}'
        await redis.xadd(keys.events_stream, {"name": "work.item", "data": data})

    async def capped() -> bool:  # (all 10 dead-lettered, the oldest trimmed by admission)
        letters = await redis.xrange(keys.dead_stream)
        reasons = {f[b"reason"] for _, f in letters}
        return (
            reasons == {b"too_large"} and len(letters) <= 3 and b'"i": 9' in letters[-1][1][b"data"]
        )

    await eventually(capped, timeout=30)


async def test_a_request_the_admit_call_refuses_goes_through_the_stream(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """The hand-over never fails a batch over one request the script refuses: the shard's
    requests are appended to the stream instead, where admission dead-letters that one with
    its reason and admits the others."""
    from supersede.config import Settings
    from supersede.services.admission.service import Admission
    from supersede.services.executor.service import Executor, ExecutorConfig
    from supersede.services.modules import load_workflows
    from supersede.services.serve import HandOff

    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    admission = Admission(redis, settings)
    executor = Executor(redis, settings, load_workflows(APP), ExecutorConfig(slots=2))
    hand_off = HandOff(admission, executor, asyncio.Event())
    bad = codec.pack({"id": "0-x"})  # a request without most of its fields
    await hand_off(0, [bad])
    [(_, fields)] = await redis.xrange(keys.shard(0).requests_stream)
    assert request_payloads(fields) == [bad]
    assert not executor.runner.active and executor.runner.free() == 2

    # Assignments wait for the executor (its last read took some): they go first, and a newer
    # run takes the stream too rather than a slot they wait for.
    executor.fetcher.backlog = True
    shard, req = make_request(keys, workflow="work", event="late", seq=1, unlimited=True)
    await hand_off(shard, [req.pack()])
    assert (await records(redis, keys))[req.run_id]["st"] == "A"
    assert await redis.xlen(keys.shard(shard).assignments_stream("work")) == 1
    assert not executor.runner.active and executor.runner.reserved == 0


async def test_a_run_handed_over_counts_its_lease_from_the_admit_call(
    redis: Redis, redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admit call that hands runs over stamps their leases on the server before its reply
    comes. They counted from the reply: a reply that came late (a slow link, a server busy)
    credited them time their leases never had, so in an outage after it the watch would stop
    them only after the reaper could retry them elsewhere. They count from the call's send now,
    and one whose reply came more than a quarter lease later waits for a beat to renew it."""
    from supersede.config import Settings
    from supersede.services.admission.service import Admission
    from supersede.services.executor.service import Executor, ExecutorConfig
    from supersede.services.modules import load_workflows
    from supersede.services.serve import HandOff

    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    admission = Admission(redis, settings)
    executor = Executor(
        redis, settings, load_workflows(APP), ExecutorConfig(slots=2, lease_ms=2_000)
    )
    # (a step that starts, as on the old code, notes it on this session's server, not 6379)
    monkeypatch.setenv("SUPERSEDE_TEST_LOG_URL", redis_url)
    monkeypatch.setenv("SUPERSEDE_NAMESPACE", keys.namespace)
    beats: list[float] = []
    executor.runner.renew_soon = lambda: beats.append(time.monotonic())  # (a lease keeper's)
    admit = admission.admit_handed

    async def late_reply(*args: Any) -> Any:
        reply = await admit(*args)
        await asyncio.sleep(0.6)  # (past a quarter of the lease)
        return reply

    admission.admit_handed = late_reply  # type: ignore[assignment]
    hand_off = HandOff(admission, executor, asyncio.Event())
    body = pack_input({}, {}, "work.item", "e1")
    shard, req = make_request(keys, workflow="work", event="e1", seq=1, unlimited=True,
                              payload=body)  # fmt: skip
    sent = time.monotonic()
    await hand_off(shard, [req.pack()])
    run = executor.runner.active[req.run_id]
    try:
        assert sent <= run.leased_at < sent + 0.3  # (from the send, not the reply)
        assert run.held is not None and not run.held.is_set() and len(beats) == 1
        assert not run.ctx.outputs and run.handler_started_us == 0  # (not started yet)
    finally:
        assert run.task is not None
        run.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run.task


async def test_results_are_applied_by_the_executor_and_a_refused_one_takes_the_stream(
    redis: Redis, keys: Keys
) -> None:
    """The way back: the outbox applies a turn's results with the executor's own finish call,
    with no results-stream entry (the outbox's future says which way it went). A turn the
    call refuses (a run that no longer exists) is written to the streams, where admission's
    read dead-letters it as it would any executor's."""
    from supersede.protocol import Outcome, RunResult
    from supersede.scripts import HandOver, Scripts
    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.outbox import FinishHere, Outbox

    outbox = Outbox(redis, keys, ExecutorConfig(lease_ms=30_000))  # (bound: 10 s a call)
    outbox.sink = FinishHere(Scripts(redis, keys), "ex-1", 30_000, cluster=False)
    writer = asyncio.create_task(outbox.loop())
    try:
        shard, req = make_request(keys, workflow="work", event="e1", seq=1, unlimited=True)
        claim = HandOver("ex-1", 30_000, 1, ("work",))
        r = await Scripts(redis, keys).admit(shard, [("", req.pack())], hand_over=claim)
        assert [h.run_id for h in r.handed] == [req.run_id]
        applied = await outbox.put(shard, RunResult(req.run_id, 1, Outcome.SUCCEEDED))
        assert applied == 1  # the first turn, which set its turn key in the shard
        assert (await records(redis, keys))[req.run_id]["st"] == "S"
        assert await redis.get(keys.shard(shard).turn_string("ex-1")) == b"1|1"
        assert 0 < await redis.pttl(keys.shard(shard).turn_string("ex-1")) <= 300_000
        assert await _entries_added(redis, keys.shard(shard).results_stream) == 0

        gone = f"{shard}-gone"
        applied = await outbox.put(shard, RunResult(gone, 1, Outcome.SUCCEEDED))
        assert applied == 0
        [(_, fields)] = await redis.xrange(keys.shard(shard).results_stream)
        assert codec.unpack(fields[b"r"])["id"] == gone
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


async def test_a_stalled_finish_call_sends_the_results_to_the_stream(
    redis: Redis, keys: Keys
) -> None:
    """The in-process call is bounded (a third of a lease): one that stalls holds neither the
    results behind it nor the slots they free; the turn is written to the streams."""
    from supersede.protocol import Outcome, RunResult
    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.outbox import Outbox

    async def stalls(batches: dict[int, list[bytes]]) -> int:
        await asyncio.sleep(3600)
        return 1

    outbox = Outbox(redis, keys, ExecutorConfig(lease_ms=600))
    outbox.sink = stalls
    writer = asyncio.create_task(outbox.loop())
    try:
        written = outbox.put(1, RunResult("1-r", 1, Outcome.SUCCEEDED))
        assert await asyncio.wait_for(written, 10) == 0
        [(_, fields)] = await redis.xrange(keys.shard(1).results_stream)
        assert codec.unpack(fields[b"r"])["id"] == "1-r"
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


async def test_an_executor_refused_the_finish_script_sends_its_results_to_the_stream(
    redis: Redis, keys: Keys
) -> None:
    """A Redis user without the finish script's rights (created by an older `supersede acl`):
    the first refusal turns the executor's own finish off for good, with the turn and every
    later one written to the results streams for admission, as before."""
    from redis.exceptions import NoPermissionError

    from supersede.protocol import Outcome, RunResult
    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.outbox import Outbox

    calls = 0

    async def refused(batches: dict[int, list[bytes]]) -> int:
        nonlocal calls
        calls += 1
        raise NoPermissionError("NOPERM this user has no permissions to run the 'evalsha' command")

    outbox = Outbox(redis, keys, ExecutorConfig(lease_ms=30_000))
    outbox.sink = refused
    writer = asyncio.create_task(outbox.loop())
    try:
        for run_id in ("1-a", "1-b"):
            written = outbox.put(1, RunResult(run_id, 1, Outcome.SUCCEEDED))
            assert await asyncio.wait_for(written, 10) == 0
        assert calls == 1 and outbox.sink is None
        entries = await redis.xrange(keys.shard(1).results_stream)
        assert [codec.unpack(f[b"r"])["id"] for _, f in entries] == ["1-a", "1-b"]
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


async def test_serve_hands_runs_over_on_a_cluster(redis_cluster: EmbeddedCluster) -> None:
    """The hand-over on a 3-master cluster: one admit call per shard, each on its node."""
    keys = Keys(f"serve{uuid.uuid4().hex[:6]}", 4)
    url = f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0].port}"
    client = connect(url)
    system = System(url, keys)
    try:
        await _serve(system, client, keys, APP, "--slots", "20")
        planned = []
        for i in range(12):
            planned += (
                await publish_runs(client, "work.item", {"i": i}, namespace=keys.namespace)
            )[1]
        for p in planned:
            run = await wait_for_run(client, p.run_id, 30, namespace=keys.namespace)
            assert run.state == "SUCCEEDED"
        assert len({shard_of_run(p.run_id) for p in planned}) > 1  # several shards and nodes
        for sk in keys.all_shards():
            assert await _entries_added(client, sk.requests_stream) == 0
            assert await _entries_added(client, sk.assignments_stream("work")) == 0
    finally:
        system.close()
        await client.aclose()


async def test_an_explicit_id_naming_another_event_s_entry_id_takes_none_of_its_runs(
    redis: Redis, keys: Keys, system: System
) -> None:
    """An event without `id` is known by its inbox entry id. Before, a producer giving that
    entry id as its `id` had the same run id: published after the event, it got the event's
    (ended) run back and no run of its own; published before it (entry ids are predictable:
    milliseconds), the event itself made no run. Each has its own run now."""
    from supersede.client import plan_runs
    from supersede.registry import load_all

    system.start("serve", APP)

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

    await eventually(registered, timeout=30)
    ns = keys.namespace

    async def text_of(run_id: str) -> str:
        run = await wait_for_run(redis, run_id, 20, namespace=ns)
        assert run.state == "SUCCEEDED", run
        return str(run.outputs["reply"]["text"])

    # After: the event runs, then a producer names its entry id.
    entry, [mine], _ = await publish_runs(redis, "chat.message", {"userId": "u", "text": "mine"},
                                          namespace=ns)  # fmt: skip
    assert await text_of(mine.run_id) == "re: mine"
    _, [theirs], _ = await publish_runs(redis, "chat.message", {"userId": "u", "text": "theirs"},
                                        id=entry, namespace=ns)  # fmt: skip
    assert theirs.run_id != mine.run_id
    assert await text_of(theirs.run_id) == "re: theirs"

    # Before: a producer names an entry id to come, then the event is written at that id.
    coming = f"{int(entry.split('-')[0]) + 60_000}-0"
    _, [early], _ = await publish_runs(redis, "chat.message", {"userId": "v", "text": "early"},
                                       id=coming, namespace=ns)  # fmt: skip
    assert await text_of(early.run_id) == "re: early"
    data = {"userId": "v", "text": "on time"}
    assert codec.text(await redis.xadd(keys.events_stream, {"name": "chat.message",
                                                            "data": orjson.dumps(data)},
                                       id=coming)) == coming  # fmt: skip
    _, defs, _ = await load_all(redis, keys)
    [planned] = plan_runs(defs, "chat.message", data, coming, keys.shards)
    assert planned.run_id != early.run_id
    assert await text_of(planned.run_id) == "re: on time"


async def test_publish_runs_of_an_id_published_before_gives_the_first_event_s_run(
    redis: Redis, keys: Keys, system: System
) -> None:
    """An explicit id published again with other data (another key, so another planned run
    id) makes no run. `publish_runs` planned that other id anyway: `get_run` on it gave None
    for good (an API-user probe). The plan is now the first event's run, naming its entry."""
    system.start("serve", APP)

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

    await eventually(registered, timeout=30)
    ns = keys.namespace
    entry, [first], _ = await publish_runs(redis, "chat.message", {"userId": "a", "text": "1"},
                                           id="order-1", namespace=ns)  # fmt: skip
    done = await wait_for_run(redis, first.run_id, 20, namespace=ns)
    assert done.state == "SUCCEEDED"
    again, [planned], _ = await publish_runs(redis, "chat.message", {"userId": "b", "text": "2"},
                                             id="order-1", namespace=ns)  # fmt: skip
    assert (planned.run_id, planned.key) == (first.run_id, first.key)
    run = await get_run(redis, planned.run_id, namespace=ns)
    assert run is not None and run.outputs["reply"]["text"] == "re: 1"
    assert planned.duplicate_of == entry != again and first.duplicate_of is None
