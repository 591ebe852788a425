"""Small builders shared by the tests."""

from __future__ import annotations

from redis.asyncio import Redis

from shared.keys import Keys
from shared.model import RunRequest, Strategy, group_id, run_id, shard_of_group


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
) -> tuple[int, RunRequest]:
    """A request routed the way ingress routes it: (shard, request)."""
    gid = group_id(workflow, version, key)
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
    )
    return shard, req


async def create_groups(redis: Redis, keys: Keys) -> None:
    for sk in keys.all_shards():
        for stream, group in (
            (sk.requests_stream, "admission"),
            (sk.results_stream, "admission"),
            (sk.assignments_stream, "executors"),
        ):
            await redis.xgroup_create(stream, group, id="0", mkstream=True)
