"""The registry on a real server: a registration bumps the epoch only on change, and a version
names one definition for good (registering other content under it is refused)."""

from __future__ import annotations

import orjson
import pytest
from redis.asyncio import Redis

from supersede.errors import DefinitionError
from supersede.keys import Keys
from supersede.registry import load_all, register
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
