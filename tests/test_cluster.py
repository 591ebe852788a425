"""The key layout on a real cluster: one shard, one node; shards spread over the masters."""

from __future__ import annotations

from redis.asyncio.cluster import RedisCluster

from shared.keys import Keys
from shared.scripts import Scripts
from shared.server import EmbeddedCluster
from tests.helpers import make_request


async def test_keys_of_one_shard_share_a_node_and_shards_spread_over_the_masters(
    redis_cluster: EmbeddedCluster,
) -> None:
    client = RedisCluster.from_url(redis_cluster.url)
    await client.initialize()  # the slot map is loaded by the first command otherwise
    try:
        keys = Keys("layout", 16)
        nodes_of_shard = {}
        for sk in keys.all_shards():
            names = [*sk.state_keys(), sk.requests_stream, sk.results_stream, sk.seen_zset]
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

    from tests.helpers import eventually

    keys = Keys("clusteradm", 16)
    url = f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0].port}"
    env = {**os.environ, "SUPERSEDE_REDIS_URL": url, "SUPERSEDE_NAMESPACE": keys.namespace,
           "SUPERSEDE_SHARDS": "16"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "admission", "--metrics-port", "0",
         "--block-ms", "100"],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = RedisCluster.from_url(redis_cluster.url)
    try:

        async def groups_ready() -> bool:
            stream = keys.shard(15).requests_stream
            return bool(await client.exists(stream)) and bool(await client.xinfo_groups(stream))

        await eventually(groups_ready, timeout=30)
        reqs = [make_request(keys, event=f"e{i}", seq=i, key=f"user{i % 8}") for i in range(40)]
        for shard, req in reqs:
            await client.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})

        async def all_admitted() -> bool:
            total = sum([await client.hlen(sk.runs_hash) for sk in keys.all_shards()])
            return total == len(reqs)

        await eventually(all_admitted, timeout=30)
        from shared import codec

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
        await client.aclose()
