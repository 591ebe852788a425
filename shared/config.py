"""Process configuration from the environment, and the deployment facts pinned in Redis."""

from __future__ import annotations

import asyncio
import difflib
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis as redis_sync
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from supersede.aio import mend_redis, wait_for
from supersede.errors import ConfigError, message_of, refused_every_try
from supersede.keys import Keys

mend_redis()  # (every service, the CLI and the dashboard connect through this module)

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "supersede"
DEFAULT_SHARDS = 16
# All interfaces: a container's metrics are scraped from outside it (another pod, the
# Prometheus container); set 127.0.0.1 where the port must stay on the host.
DEFAULT_METRICS_HOST = "0.0.0.0"


@dataclass(frozen=True, slots=True)
class Settings:
    """What every process needs before it can touch Redis."""

    redis_url: str = DEFAULT_URL
    namespace: str = DEFAULT_NAMESPACE
    shards: int = DEFAULT_SHARDS
    metrics_host: str = DEFAULT_METRICS_HOST
    shards_set: bool = False  # SUPERSEDE_SHARDS was given (else `shards` is the default)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ) if env is None else env
        raw_shards = env.get("SUPERSEDE_SHARDS", str(DEFAULT_SHARDS))
        try:
            shards = int(raw_shards)
        except ValueError:
            raise ConfigError(f"SUPERSEDE_SHARDS must be an integer, got {raw_shards!r}") from None
        if not 1 <= shards <= 4096:
            raise ConfigError(f"SUPERSEDE_SHARDS must be between 1 and 4096, got {shards}")
        namespace = env.get("SUPERSEDE_NAMESPACE", DEFAULT_NAMESPACE)
        if not namespace or any(c in namespace for c in "{}: \t\n"):
            raise ConfigError(
                f"SUPERSEDE_NAMESPACE must be non-empty without braces, colons or spaces, "
                f"got {namespace!r}"
            )
        url = env.get("SUPERSEDE_REDIS_URL", DEFAULT_URL).strip()
        if not url:  # (a failed `export SUPERSEDE_REDIS_URL=$(...)`: not the default server)
            raise ConfigError(
                "SUPERSEDE_REDIS_URL is set but empty; set it to the server's URL, or unset it "
                f"for {DEFAULT_URL} (`supersede dev`: for its embedded server)"
            )
        if not url.startswith(URL_SCHEMES):
            raise ConfigError(
                f"SUPERSEDE_REDIS_URL must start with one of {', '.join(URL_SCHEMES)}, got "
                f"{redact(url)!r}"
            )
        _check_url(url)
        return cls(
            redis_url=url,
            namespace=namespace,
            shards=shards,
            metrics_host=env.get("SUPERSEDE_METRICS_HOST") or DEFAULT_METRICS_HOST,
            shards_set="SUPERSEDE_SHARDS" in env,
        )

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace, self.shards)


# Environment variables that are settings (the rest of SUPERSEDE_* is a typo: warned of);
# ACL_PASSWORD_<ROLE> for `supersede acl --apply`, TEST_ for the test suite's harness.
VARIABLES = frozenset({
    "SUPERSEDE_REDIS_URL", "SUPERSEDE_NAMESPACE", "SUPERSEDE_SHARDS", "SUPERSEDE_METRICS_HOST",
    "SUPERSEDE_CPUS", "SUPERSEDE_NICE", "SUPERSEDE_CPU_LATENCY_US", "SUPERSEDE_EVENT_LOOP",
    "SUPERSEDE_SERVER_BIN", "SUPERSEDE_UI_SECRET",
})  # fmt: skip
ACL_PASSWORD_PREFIX = "SUPERSEDE_ACL_PASSWORD_"
VARIABLE_PREFIXES = (ACL_PASSWORD_PREFIX, "SUPERSEDE_TEST_")


def unknown_variables(env: Mapping[str, str], roles: Sequence[str] = ()) -> list[str]:
    """One warning per SUPERSEDE_* variable that is no setting (a misspelt one is ignored:
    `SUPERSEDE_NAMESPCE` left the default namespace), naming the one it is likely meant as;
    and per ACL password of no role of `roles` (upper case)."""
    out = []
    for name in sorted(env):
        if not name.startswith("SUPERSEDE_") or name in VARIABLES:
            continue
        if name.startswith(ACL_PASSWORD_PREFIX) and roles:  # (a misspelt role's: `acl
            role = name.removeprefix(ACL_PASSWORD_PREFIX)  # --apply` said only that the
            if role not in roles:  # role's own was missing)
                close = difflib.get_close_matches(role.upper(), roles, n=1)
                hint = f" (did you mean {ACL_PASSWORD_PREFIX}{close[0]}?)" if close else ""
                out.append(f"{name} names no role ({', '.join(roles)}){hint}; it is ignored")
            continue
        if name.startswith(VARIABLE_PREFIXES):
            continue
        close = difflib.get_close_matches(  # (by what follows the prefix they all share)
            name.removeprefix("SUPERSEDE_"),
            sorted(v.removeprefix("SUPERSEDE_") for v in VARIABLES),
            n=1,
        )
        hint = f" (did you mean SUPERSEDE_{close[0]}?)" if close else ""
        out.append(f"{name} is not a setting{hint}; it is ignored")
    return out


def _check_url(url: str) -> None:
    """What redis-py would fail on later, with a traceback or a part of the password in its
    message: a host and port it cannot read (a password holding `#`, `?`, `[` or `]` moved
    its rest out of the authority), and a database number in the path that is no number
    (redis-py took db 0 for it)."""
    cluster = is_cluster_url(url)
    seed = cluster_seed(url) if cluster else url
    if not seed.startswith(("redis://", "rediss://")):
        return
    try:
        parts = urlsplit(seed)
        parts.port  # noqa: B018 (it raises for a port that is no number)
        path = unquote(parts.path).strip("/")  # (as redis-py reads it)
    except ValueError as exc:  # ("Invalid IPv6 URL": a `[` or `]` in a password)
        raise url_problem(url, exc) from None
    if path and not path.isdigit() and not cluster:
        raise ConfigError(  # (a path is what follows a password's `/` too: not quoted)
            f"SUPERSEDE_REDIS_URL's database (its path) must be a number, in {redact(url)!r} "
            f"({ENCODE_HINT})"
        )
    for name, value in parse_qsl(parts.query):
        if name in TIMEOUT_OPTIONS and _not_above_zero(value):
            raise ConfigError(  # (0: every read timed out at once, said as a server that hangs)
                f"SUPERSEDE_REDIS_URL's {name} must be a number of seconds above 0, not "
                f"{value!r}, in {redact(url)!r} (leave it out for the default)"
            )


TIMEOUT_OPTIONS = ("socket_timeout", "socket_connect_timeout")


def _not_above_zero(value: str) -> bool:
    try:
        return not float(value) > 0
    except ValueError:
        return False  # (redis-py says what it cannot read)


ENCODE_HINT = (
    "a password that holds /, #, ?, [ or ] must be percent-encoded: %2F, %23, %3F, %5B, %5D"
)


def url_problem(url: str, exc: Exception) -> ConfigError:
    """The one line for a URL redis-py could not make a client of (`exc`: a ValueError for
    what is no URL, a TypeError for an option it does not know, a RedisError for an option's
    value it refuses), with no part of the password: its messages quote the piece they could
    not read, and "Port could not be cast to integer value as 'Tr0ub4dor'" was the password's
    part before its `#` (a security probe)."""
    if isinstance(exc, TypeError):  # (its option's name may be a piece of the password)
        return ConfigError(scrub(unknown_option(url, exc), url) + misread_hint(url))
    said = scrub(str(exc), url)
    if isinstance(exc, ValueError):
        hint = f"; {ENCODE_HINT}" if "@" in url else ""
        return ConfigError(f"SUPERSEDE_REDIS_URL {redact(url)} is not a valid URL ({said}){hint}")
    return ConfigError(
        f"SUPERSEDE_REDIS_URL {redact(url)} has an option the client refuses ({said}); check "
        f"its options{misread_hint(url)}"
    )


def misread_hint(url: str) -> str:
    """The percent-encoding hint, for a URL whose credentials a parser does not find where
    they are written (a `#`, `?` or `/` in the password ends the authority before its `@`:
    `redis://u:12345#pw@h:1/0` reads as host `u`, port 12345, no password); "" otherwise."""
    seed = cluster_seed(url) if is_cluster_url(url) else url
    if "@" not in seed.partition("://")[2]:
        return ""
    try:
        netloc = urlsplit(seed).netloc
    except ValueError:
        return f"; {ENCODE_HINT}"
    return "" if "@" in netloc else f"; {ENCODE_HINT}"


def scrub(text: str, url: str) -> str:
    """`text`, an error about `url`, with every part of the URL's password it may echo
    replaced by `***` (the password whole, decoded, and its pieces between the characters a
    URL parser splits at)."""
    for secret in sorted(_secret_parts(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _secret_parts(url: str) -> set[str]:
    rest = url.partition("://")[2] or url
    secrets = [m.group(3) for m in _QUERY_PAIR.finditer(rest) if unquote(m.group(2)).lower()
               in SECRET_PARAMS]  # fmt: skip
    if "@" in rest:
        _, colon, password = rest.rpartition("@")[0].partition(":")
        if colon:
            secrets.append(password)
    parts = set()
    for secret in secrets:
        for part in (secret, unquote(secret), *re.split(r"[/#?\[\]@:&=]", secret)):
            if len(part) >= 2:  # (a single character tells nothing, and is everywhere)
                parts.add(part)
    return parts


CLUSTER_SCHEME = "redis+cluster://"
TLS_CLUSTER_SCHEME = "rediss+cluster://"
URL_SCHEMES = ("redis://", "rediss://", "unix://", CLUSTER_SCHEME, TLS_CLUSTER_SCHEME)
SECRET_PARAMS = {"password", "pass", "auth", "ssl_password"}
_QUERY_PAIR = re.compile(r"([?&])([^=&?]*)=([^&]*)")


def _hide_secret(pair: re.Match[str]) -> str:
    """One `name=value` of a URL's query, its value hidden when the name, decoded as redis-py
    decodes it (`p%61ssword`), is a secret's."""
    sep, name, _ = pair.groups()
    return f"{sep}{name}=***" if unquote(name).lower() in SECRET_PARAMS else pair.group(0)


def redact(url: str) -> str:
    """`url` with its password (in the authority or a query parameter) replaced by `***`:
    the only form in which a server URL is ever logged or printed. Read from the text, not
    parsed as a URL: a password holding `#`, `?` or `/` (generated ones do) moved out of the
    part a URL parser calls the authority, and was printed (a security probe). A host holds
    no `@`, so the credentials run to the last one (a query value holding one is hidden
    with them: too much rather than too little)."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # (no scheme: refused by the settings, and printed by that refusal)
        scheme, rest = "", url
    if "@" in rest:
        auth, _, host = rest.rpartition("@")
        user, colon, _ = auth.partition(":")
        rest = f"{user}:***@{host}" if colon else (f"{user}@{host}" if user else f"***@{host}")
    return scheme + sep + _QUERY_PAIR.sub(_hide_secret, rest)


UNVERIFIED_TLS = (
    "TLS without the server certificate's check (ssl_cert_reqs in SUPERSEDE_REDIS_URL), or "
    "without its host name's (ssl_check_hostname=false: any certificate the CA signed passes): "
    "anyone on the path can read and change every call; give ssl_ca_certs, and the host name "
    "the server's certificate names, instead"
)


def unverified_tls(url: str) -> bool:
    """A TLS URL that skips the server certificate's check (`ssl_cert_reqs=none`/`optional`)
    or its host name's (`ssl_check_hostname=false`): anyone on the path can read and change
    every call, credentials included."""
    if not url.startswith(("rediss://", TLS_CLUSTER_SCHEME)):
        return False
    query = [(k.lower(), v.lower()) for k, v in parse_qsl(urlsplit(url).query)]
    reqs = {v for k, v in query if k == "ssl_cert_reqs"}
    unnamed = {v for k, v in query if k == "ssl_check_hostname"}  # (redis-py's to_bool)
    if not unnamed and _REDIS_PY_MAJOR < 6:  # (before 6.0 its default was not to check)
        unnamed = {"false"}
    return bool(
        reqs & {"none", "optional", "cert_none", "cert_optional"}
        or unnamed & {"0", "f", "false", "n", "no"}
    )


_REDIS_PY_MAJOR = int(redis_sync.__version__.split(".")[0])


def is_cluster_url(url: str) -> bool:
    return url.startswith((CLUSTER_SCHEME, TLS_CLUSTER_SCHEME))


def cluster_seed(url: str) -> str:
    """The redis-py URL of a cluster URL's seed node: `redis+cluster://` -> `redis://`,
    `rediss+cluster://` -> `rediss://` (TLS, with the same query options)."""
    scheme, _, rest = url.partition("+cluster://")
    return f"{scheme}://{rest}"


_STREAM_READS = ("XREAD", "XREADGROUP")
TIME_WAIT = 2.0  # seconds a cluster's TIME may take (server_time)


POOL_WAIT = 30.0  # seconds a command waits for a free connection before it fails
POOL_POLL = 0.001  # (a cluster client's: seconds before it looks for a free connection again,
POOL_POLL_MAX = 0.05  # doubled each time up to this)
# seconds a users' cluster command every try of which was refused (redis-py's "TTL exhausted":
# redirections, TRYAGAIN) is sent again, first after REFUSED_POLL, doubling to the most
REFUSED_WAIT, REFUSED_POLL, REFUSED_POLL_MAX = 5.0, 0.05, 0.5


class _Cluster(RedisCluster):
    """redis-py's cluster client, except that the slot of a stream read (XREAD, XREADGROUP) is
    found here. redis-py cannot place their keys (they follow the STREAMS keyword) and asks one
    node (COMMAND GETKEYS) before every read: a round trip more per read, and when that node
    went silent every read of every node waited for it (a probe: healthy masters' shards
    stopped for 13 s of a 20 s freeze)."""

    waits_for_connections = True  # (see connect's `wait`)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """A command waits for a free connection of its node, as `connect`'s pool does on one
        server (up to POOL_WAIT seconds): redis-py's cluster client raised MaxConnectionsError
        past `max_connections` a node (a probe: 317 of 18,001 publishes with 200 in flight).
        The error comes before the command is sent, so it is sent once. (A pipeline's commands
        still raise it.)"""
        if not self.waits_for_connections:
            return await super().execute_command(*args, **kwargs)
        loop = asyncio.get_running_loop()
        until, pause = loop.time() + POOL_WAIT, POOL_POLL
        refused_until, refused_pause = loop.time() + REFUSED_WAIT, REFUSED_POLL
        while True:
            try:
                return await super().execute_command(*args, **kwargs)
            except redis_sync.exceptions.MaxConnectionsError:
                if loop.time() >= until:
                    raise
            except redis_sync.exceptions.ClusterError as exc:
                # "TTL exhausted": every try was refused with a redirection or TRYAGAIN, none
                # carried out (redis-py raises any other error at once): a slot mid-move, or
                # left half moved, whose ASK and MOVED sent the command back and forth (a
                # cluster probe: 14 of 4,200 publishes failed so). Sent again a while.
                if not refused_every_try(exc) or loop.time() >= refused_until:
                    raise
                await asyncio.sleep(refused_pause)
                refused_pause = min(refused_pause * 2, REFUSED_POLL_MAX)
                continue
            await asyncio.sleep(pause)  # (backing off: 200 waiters polling every 5 ms took
            pause = min(pause * 2, POOL_POLL_MAX)  # a third of a core, a review)

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if command.upper() in _STREAM_READS:
            keys = stream_keys(command, args)
            slots = {self.keyslot(key) for key in keys}
            if len(slots) == 1:
                return slots.pop()
        return await super()._determine_slot(command, *args)


def stream_keys(command: str, args: Sequence[Any]) -> Sequence[Any]:
    """The stream names of an XREAD or XREADGROUP's arguments (after the command's name): the
    first half of what follows STREAMS (after GROUP's two names in an XREADGROUP)."""
    start = 3 if command.upper() == "XREADGROUP" else 0
    for i in range(start, len(args)):
        word = args[i]
        if isinstance(word, (str, bytes)) and word.upper() in ("STREAMS", b"STREAMS"):
            rest = args[i + 1 :]
            return rest[: len(rest) // 2]
    return ()


def connect(url: str, max_connections: int = 64, *, wait: bool = True) -> Redis:
    """A client whose pool waits for a free connection instead of failing (on a cluster, its
    commands: its pipelines still raise MaxConnectionsError; `wait=False`, the services', whose
    hot calls are bounded by a deadline that a wait would pass, marking a master silent).

    Under load many coroutines issue commands at once; redis-py's default pool raises
    MaxConnectionsError past its limit, which would drop a run's result on the floor.
    A `redis+cluster://host:port` URL (`rediss+cluster://` for TLS) gives redis-py's cluster
    client (any node as seed); it
    offers the commands the services use, so it is typed as `Redis` for them.
    """
    _check_url(url)  # (Settings checks the variable; a URL given here, the same way)
    try:
        if is_cluster_url(url):
            seed = cluster_seed(url)
            cluster = cast(_Cluster, _Cluster.from_url(seed, max_connections=max_connections))
            cluster.waits_for_connections = wait
            return _parsing_streams(cluster)
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=POOL_WAIT
        )
        pool.connection_class(**pool.connection_kwargs)  # (an unknown option fails here)
    # (ValueError: a port that is not a number, a value of the wrong type; TypeError: an
    # option redis-py does not know; RedisError: an option's value it refuses, a TLS one)
    except (ValueError, TypeError, redis_sync.RedisError) as exc:
        raise url_problem(url, exc) from None
    return _parsing_streams(Redis.from_pool(pool))  # (aclose() closes the pool's too)


def _parsing_streams(client: Any) -> Redis:
    """`client`, its stream reads parsed by supersede.streams: an entry that gives a field
    name twice is seen as one (redis-py keeps the last value only, so an inbox entry of 5,000
    repeated fields passed the 64-field limit, and of 27 MB the 1 MiB one)."""
    from supersede.streams import parse_autoclaim, parse_stream_read

    client.set_response_callback("XREADGROUP", parse_stream_read)
    client.set_response_callback("XREAD", parse_stream_read)
    client.set_response_callback("XAUTOCLAIM", parse_autoclaim)
    return cast(Redis, client)


def unknown_option(url: str, exc: TypeError) -> str:
    """The one line for a URL with a query option its scheme's client does not take."""
    option = str(exc).rpartition("argument ")[2].strip("'\"") or str(exc)
    hint = " (TLS options need the rediss:// scheme)" if option.startswith("ssl") else ""
    return (
        f"SUPERSEDE_REDIS_URL {redact(url)} has an option the client does not know: "
        f"{option!r}{hint}"
    )


def connect_sync(url: str, *, timeout: float | None = None) -> redis_sync.Redis:
    """The synchronous counterpart of `connect`, for user code such as sync steps. `timeout`:
    each call fails after that many seconds without an answer (connecting included), and is
    not tried again (the caller's loop is the retry), unless the URL sets its own timeouts."""
    options: dict[str, object] = {}
    if timeout is not None:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        options = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                   "retry": Retry(NoBackoff(), 0)}  # fmt: skip
    _check_url(url)
    try:
        if is_cluster_url(url):
            return cast(
                redis_sync.Redis, redis_sync.RedisCluster.from_url(cluster_seed(url), **options)
            )
        client = redis_sync.Redis.from_url(url, **options)
        pool = client.connection_pool
        pool.connection_class(**pool.connection_kwargs)  # (an unknown option fails here)
    except (ValueError, TypeError, redis_sync.RedisError) as exc:
        raise url_problem(url, exc) from None
    except redis_sync.RedisClusterException as exc:  # (the cluster client connects at once)
        if misread_hint(url):  # (a password's piece taken for the host: said, not quoted)
            raise ConfigError(
                f"cannot reach Redis at {redact(url)} ({scrub(str(exc), url)}): check "
                f"SUPERSEDE_REDIS_URL{misread_hint(url)}"
            ) from None
        raise
    return client


async def pin_shard_count(redis: Redis, keys: Keys) -> None:
    """Store the shard count on first use; refuse to run against a different one.

    Runs are routed to shards by hash modulo the shard count, so two processes that disagree on
    it would split one group over two shards and break every per-group guarantee.
    """
    if await redis.hget(keys.config_hash, "shards") is None:  # (no write when stored: at its
        await redis.hsetnx(keys.config_hash, "shards", str(keys.shards))  # maxmemory the
    await check_shard_count(redis, keys, created=False)  # server refuses one, a probe)


async def check_shard_count(redis: Redis, keys: Keys, *, created: bool = True) -> None:
    """Refuse a shard count other than the one stored (the CLI reads with it: with another it
    would read part of the shards, or shards that do not exist). `created`: a namespace with no
    count stored yet passes (nothing was routed in it)."""
    stored = await redis.hget(keys.config_hash, "shards")
    if (stored is None and not created) or (stored is not None and int(stored) != keys.shards):
        was = stored.decode() if isinstance(stored, bytes) else stored
        raise ConfigError(
            f"namespace {keys.namespace!r} was created with {was} shards but this process "
            f"was started with SUPERSEDE_SHARDS={keys.shards} ({DEFAULT_SHARDS} when unset); use "
            "the stored value or a new namespace"
        )


async def stored_keys(redis: Redis, settings: Settings) -> Keys:
    """The keys of a command that reads (the CLI, the UI): with the stored shard count when
    SUPERSEDE_SHARDS is not set (`supersede status` refused a namespace of 4 shards unless
    told so, though the count is stored); a count set that differs is refused."""
    if not settings.shards_set:
        stored = await redis.hget(settings.keys.config_hash, "shards")
        if stored is not None and stored.isdigit():
            return Keys(settings.namespace, int(stored))
    await check_shard_count(redis, settings.keys)
    return settings.keys


def _no_password(url: str) -> str:
    """A hint for a server that wants credentials from a URL with none."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    named = parts.password or any(k.lower() in SECRET_PARAMS for k, _ in parse_qsl(parts.query))
    return "" if named else " (it names no password: redis://user:password@host:port/db)"


_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")


def _tls_options(url: str) -> dict[str, str]:
    try:
        return {
            k.lower(): v for k, v in parse_qsl(urlsplit(url).query) if k.lower().startswith("ssl")
        }
    except ValueError:
        return {}


def tls_files_problem(url: str) -> str | None:
    """The one line for a TLS option of the URL that names a file (or folder) that cannot be
    read, None when each can."""
    for option, path in _tls_options(url).items():
        if option in _TLS_FILES and path and not os.access(path, os.R_OK):
            return (
                f"SUPERSEDE_REDIS_URL {redact(url)}: its {option} {path} does not exist or cannot "
                "be read"
            )
    return None


def _tls_hint(url: str, exc: BaseException) -> str:
    """Which TLS option a failed handshake points to ('' for a URL without TLS)."""
    if not url.startswith("rediss"):
        return ""
    options, text = _tls_options(url), str(exc)
    if "PEM lib" in text or "KEY_VALUES_MISMATCH" in text:
        return (
            "; ssl_certfile and ssl_keyfile must be a client certificate and its key (the key in"
            " ssl_keyfile, unless the certificate's file holds it)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            "; the server's certificate was not verified: not signed by the CA of ssl_ca_certs "
            "(the system's when it is not set), expired, or for another host name"
        )
    closed = any(words in text for words in _CLOSED_WORDS)
    if "ssl_certfile" not in options and closed:
        return (
            "; the server closed the TLS connection: it may require a client certificate "
            "(ssl_certfile and ssl_keyfile)"
        )
    if closed:  # (an expired client certificate, or one of a CA the server does not trust,
        # said only "Connection closed by server." on a cluster: a probe)
        return (
            "; the server closed the TLS connection: it may refuse the client certificate of "
            "ssl_certfile (expired, or not signed by a CA it trusts)"
        )
    return ""


# What a server that ends the connection during a handshake makes the client say
_CLOSED_WORDS = ("CERTIFICATE_REQUIRED", "CERTIFICATE_EXPIRED", "UNKNOWN_CA", "BAD_CERTIFICATE",
                 "reset by peer", "closed by the server", "closed by server", "EOF")  # fmt: skip


async def eviction_policy(redis: Redis) -> str | None:
    """The server's maxmemory-policy when it evicts keys (anything but `noeviction`), else
    None; None too when INFO is refused (an ACL user from before services had it)."""
    return (await memory_state(redis))[0]


async def memory_state(redis: Redis) -> tuple[str | None, float | None]:
    """(the evicting maxmemory-policy, as `eviction_policy`; used_memory over maxmemory of the
    fullest node, 0.0 where no maxmemory is set), from one INFO memory; (None, None) when INFO
    is refused."""
    try:
        info = await redis.info("memory")
    except redis_sync.RedisError:
        return None, None
    nodes = [info] if "maxmemory_policy" in info else list(info.values())  # (a cluster's)
    evicting: str | None = None
    fullest = 0.0
    for node in nodes:
        if not isinstance(node, dict):
            continue
        policy = node.get("maxmemory_policy")
        if policy and policy != "noeviction" and evicting is None:
            evicting = str(policy)
        most = int(node.get("maxmemory") or 0)
        if most > 0:
            fullest = max(fullest, int(node.get("used_memory") or 0) / most)
    return evicting, fullest


async def server_time(redis: Redis) -> float:
    """The server's clock in seconds (a cluster's: one node's); this process's clock when TIME
    is refused (an ACL user from before the role had it), or on a cluster when no answer came
    within TIME_WAIT seconds (a master gone silent: the callers' periodic tasks go on)."""
    told = await server_time_read(redis)
    return time.time() if told is None else told


async def server_time_read(redis: Redis) -> float | None:
    """The server's clock in seconds, or None when TIME failed (see server_time)."""
    try:
        if isinstance(redis, RedisCluster):
            reply = await wait_for(redis.time(), TIME_WAIT)
        else:
            reply = await redis.time()
    except (redis_sync.RedisError, TimeoutError):
        return None
    if isinstance(reply, dict):  # (a cluster client: node -> reply)
        reply = next(iter(reply.values()))
    seconds, micros = reply
    return float(seconds) + float(micros) / 1e6


async def check_server(redis: Redis, url: str) -> None:
    """One PING before a process starts its work: an unreachable server, refused credentials
    or a failed TLS handshake become a ConfigError of one line that names the setting (later
    failures are retried as connections come and go)."""
    problem = tls_files_problem(url)
    if problem:
        raise ConfigError(problem)
    try:
        await _ping(redis)
    except (redis_sync.exceptions.BusyLoadingError, redis_sync.exceptions.MaxClientsReachedError,
            ClusterNodeSilent):  # fmt: skip
        raise  # (the server is there, not ready yet: a service waits, a command says so)
    except (redis_sync.RedisError, redis_sync.RedisClusterException, OSError) as exc:
        raise _server_problem(url, exc) from None


# How a server (or redis-py's cluster client, which words it its own way) refuses credentials
_CREDENTIALS_WORDS = ("NOAUTH", "WRONGPASS", "NOPERM", "invalid username-password")


def _server_problem(url: str, exc: BaseException) -> ConfigError:
    """The one line for a start's PING that failed (check_server): the setting to fix, and
    the error's text with no part of the password (scrub)."""
    said, at = scrub(str(exc), url) + misread_hint(url), redact(url)
    if isinstance(exc, redis_sync.AuthenticationError) or (
        isinstance(exc, (redis_sync.ResponseError, redis_sync.RedisClusterException))
        and any(words in str(exc) for words in _CREDENTIALS_WORDS)
    ):  # (a cluster's said "no Redis Cluster at ...", a security probe)
        return ConfigError(
            f"Redis at {at} refused the credentials ({said}); check the user and password in "
            f"SUPERSEDE_REDIS_URL{_no_password(url)}"
        )
    if isinstance(exc, redis_sync.ResponseError):
        return ConfigError(
            f"Redis at {at} refused the connection ({said}); check SUPERSEDE_REDIS_URL (its "
            "database number, for one)"
        )
    if isinstance(exc, redis_sync.TimeoutError):
        hint = (
            "rediss:// only for a server with TLS"
            if url.startswith("rediss")
            else "a server that accepts the connection but never answers: stopped, overloaded, "
            "or behind a firewall that drops packets"
        )
        return ConfigError(
            f"timed out reaching Redis at {at} ({said}); check SUPERSEDE_REDIS_URL ({hint})"
        )
    if isinstance(exc, redis_sync.RedisClusterException):
        if "Timeout" in str(exc):  # (the seed accepted the connection and never answered)
            return ConfigError(
                f"the cluster node {at} names did not answer ({said}): stopped, frozen or "
                "overloaded; check SUPERSEDE_REDIS_URL, or name another node of the cluster"
            )
        tls = _tls_hint(url, exc)
        plain = "(redis+cluster:// only for a cluster"
        if not url.startswith("rediss") and any(words in str(exc) for words in _CLOSED_WORDS):
            plain += "; a node that closes the connection at once may take TLS only: "
            plain += "rediss+cluster:// with its certificate options"
        return ConfigError(
            f"no Redis Cluster at {at} ({said}); check SUPERSEDE_REDIS_URL "
            + (f"(its TLS options{tls})" if tls else plain + ")")
        )
    if isinstance(exc, (redis_sync.ConnectionError, OSError)):
        return ConfigError(
            f"cannot reach Redis at {at} ({said}); check SUPERSEDE_REDIS_URL (host, port, and "
            f"rediss:// with its certificate options for TLS){_tls_hint(url, exc)}"
        )
    return ConfigError(  # e.g. a TLS option redis-py refuses when it connects
        f"cannot connect to Redis at {at} ({said}); check SUPERSEDE_REDIS_URL and its options"
    )


class ClusterNodeSilent(redis_sync.TimeoutError):
    """A cluster's master did not answer a start's PING (stopped, frozen, failing over) while
    the cluster itself was found: not a setting to fix (a service waits, a command says so)."""


async def _ping(redis: Redis) -> None:
    """PING the server. On a cluster, a master that does not answer is an outage, not a bad
    URL: `supersede status` run while the master redis-py pings was frozen for 7 s exited 2
    with "timed out reaching Redis ...; check SUPERSEDE_REDIS_URL", a cluster probe."""
    try:
        await redis.ping()
    except redis_sync.TimeoutError as exc:  # (not ConnectionError: refused credentials and
        # unreachable addresses are settings to fix, and redis-py's are ConnectionErrors)
        if isinstance(redis, RedisCluster) and not isinstance(exc, ClusterNodeSilent):
            raise ClusterNodeSilent(
                f"a master of the cluster did not answer ({exc}): stopped, frozen or failing "
                "over; try again once it answers or its replica took over"
            ) from None
        raise


# How a server words a right the user lacks: NOPERM from a command, and, from a command a
# script runs, "The user executing the script can't run this command" or "can't access".
_REFUSED_WORDS = ("NOPERM", "user executing the script can't", "no permissions to")


def refusal(exc: BaseException, url: str, roles: Sequence[str]) -> ConfigError | None:
    """The one line for a server error a setting fixes, None for others: a command or key the
    URL's ACL user has no right to (it needs the rights of `roles`, e.g. ["operator"]), or a
    cluster node reached with a single server's scheme."""
    text = str(exc)
    if isinstance(exc, redis_sync.exceptions.NoPermissionError) or any(
        words in text for words in _REFUSED_WORDS
    ):
        named = " and ".join(roles) + (" roles" if len(roles) > 1 else " role")
        at = f" at {redact(url)}" if url else ""
        return ConfigError(
            f"Redis{at} refused the user of SUPERSEDE_REDIS_URL a command or key "
            f"({message_of(exc)}); it needs the rights of the {named}: "
            f"`supersede acl --role {roles[0]}` prints them, with --apply (as an admin) it "
            "sets them (for the namespace of SUPERSEDE_NAMESPACE: a user made for another "
            "has no rights in this one)"
        )
    if isinstance(exc, redis_sync.exceptions.AskError):  # (MOVED is one)
        at = f" at {redact(url)}" if url else ""
        return ConfigError(
            f"Redis{at} is a node of a cluster ({exc}); write SUPERSEDE_REDIS_URL "
            "with redis+cluster:// (rediss+cluster:// for TLS)"
        )
    return None
