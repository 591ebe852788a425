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
