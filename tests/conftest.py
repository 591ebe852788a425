from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from supersede.config import connect
from supersede.keys import Keys
from supersede.scripts import Scripts
from supersede.server import EmbeddedCluster, EmbeddedServer
from tests.support import System
from tests.support.tls import TlsCluster, TlsServer


@pytest.fixture(scope="session", autouse=True)
def _no_terminal_size() -> None:
    """The CLI's tables fit COLUMNS when it is set; the tests read whole values. (A pytest-xdist
    worker has COLUMNS=80 and LINES=24 in its environment, which the services and commands the
    tests start would inherit.)"""
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedServer]:
    """One real server per test session, on a free port, never the shared 6379."""
    server = EmbeddedServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedCluster]:
    """A real 3-master cluster on loopback ports, started once per session on first use."""
    try:
        cluster = EmbeddedCluster(3).start()
    except (FileNotFoundError, OSError) as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"NO CLUSTER TESTS: cannot start a cluster here ({exc})")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_tls() -> Iterator[TlsServer]:
    """A TLS-only server that requires client certificates (a throwaway CA), on first use."""
    server = TlsServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_tls_cluster() -> Iterator[TlsCluster]:
    """A 3-master cluster with TLS for clients and the cluster bus, on first use."""
    cluster = TlsCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedServer) -> str:
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    """Each test gets its own namespace instead of flushing the database."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace, 4)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def scripts(redis: Redis, keys: Keys) -> Scripts:
    return Scripts(redis, keys)


@pytest.fixture(params=["single", "cluster", "tls", "tls-cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, str]]:
    """(client, SUPERSEDE_REDIS_URL) on one server, on the session's 3-master cluster, on a
    TLS-only server, or on a TLS cluster (client certificates required on both)."""
    if request.param == "single":
        url = request.getfixturevalue("redis_url")
        client: Any = Redis.from_url(url)
    elif request.param == "tls":
        url = request.getfixturevalue("redis_tls").url
        client = Redis.from_url(url)
    elif request.param == "tls-cluster":
        url = request.getfixturevalue("redis_tls_cluster").url
        client = connect(url)
    else:
        cluster = request.getfixturevalue("redis_cluster")
        client = RedisCluster.from_url(cluster.url)
        url = f"redis+cluster://127.0.0.1:{cluster.nodes[0].port}"
    yield client, url
    await client.aclose()


@pytest.fixture
def system(redis_url: str, keys: Keys) -> Iterator[System]:
    """Service subprocesses of this test's namespace, all killed at its end."""
    s = System(redis_url, keys)
    yield s
    s.close()
