"""Least-privilege ACL users, one per role: the commands and key patterns each role uses, and
nothing else (``supersede acl`` prints them; ``--apply`` creates them).

Patterns are scoped to one namespace (``<ns>:*``, ``{<ns>}:*``, ``{<ns>:<shard>}:*``). A key a
role passes to a script needs read and write rights (Redis checks EVALSHA's keys as read-write
whatever the script does with them, and the commands inside against the same user), so those keys
get ``~``; keys a role only reads or only appends to get ``%R~`` or ``%W~``. Pub/Sub: every
user has ``resetchannels``; the roles whose scripts write assignments may publish on the
assignment streams' bells (shard channels named as the streams), and executors subscribe to
them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from supersede.config import cluster_seed, connect
from supersede.errors import ConfigError


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Every role: the connection and the cluster client's start-up (slot map, command table).
_BASE = _words("ping hello select cluster|slots cluster|shards command readonly asking")
# Redis 7.2 and later: client libraries announce their name and version on connect.
SETINFO = "client|setinfo"
# What a service does on every start: pin the shard count, load its scripts.
_SERVICE = _words("hget hsetnx evalsha script|load info")  # (info: maxmemory-policy)
# Reading the registry: one MULTI/EXEC of its hashes and epoch.
_REGISTRY = _words("multi exec get hgetall")
_CONSUMER = _words("xreadgroup xack xautoclaim xpending xgroup|create xinfo|groups")
# lua/heal_lag.lua, the lag Redis before 7.2.4 restores wrong: ingress's and admission's (an
# executor's role had them in 0.3.18, and could move admission's group on its results stream);
# xrange: it counts a few unread entries (0.3.21)
_HEAL = _words("xinfo|stream xgroup|setid xrange")
# Forgetting the consumers of gone processes (lua/forget_consumers.lua): the trimming services.
_FORGET = _words("xinfo|consumers xgroup|delconsumer")
# The commands inside the scripts that change run states (admit, finish, reap, cancel).
_STATE_SCRIPTS = _words(
    "time hget hmget hset hdel hincrby hgetall exists del zadd zrem zrange zrangebylex "
    "zrangebyscore xadd xack xrange xrevrange xtrim xlen xinfo|groups spublish"
)
# The bells: the shard channels named as the assignment streams (lua/includes/transitions.lua).
_BELLS = ("&{@:*}:assignments:*",)
_READ = _words(
    "hget hmget hgetall hkeys hvals hlen hscan exists get xlen xrange xrevrange xinfo|groups "
    "xinfo|consumers xinfo|stream zrange zrangebylex zrevrangebylex zrangebyscore zcard zscore"
    " time"  # (a page of `runs` full of live runs: the next page's cursor is the server's now)
)


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    about: str
    commands: tuple[str, ...]
    keys: tuple[str, ...]  # patterns with '@' for the namespace
    channels: tuple[str, ...] = ()  # Pub/Sub channel patterns, '@' for the namespace


def _shard(*suffixes: str) -> tuple[str, ...]:
    return tuple(f"~{{@:*}}:{s}" for s in suffixes)


_READS_REGISTRY = ("%R~{@}:workflows", "%R~{@}:workflows:*")
# The shard keys the finish script is passed (read and write, as every EVALSHA key), by
# admission and by executors (which apply their own results): the state keys, the results
# stream (XACKed; a turn an executor's call refuses is written there), the newest runs and
# the outputs; the ended and assignment streams it writes under their prefixes.
_FINISH_KEYS = (
    "runs", "inputs", "outputs", "queue", "active", "slots", "leases", "ended", "ended:*",
    "assignments", "assignments:*", "control", "counts", "results", "newest", "newest-at",
)  # fmt: skip

ROLES: tuple[Role, ...] = (
    Role(
        "ingress",
        "reads the inbox, appends run requests, writes dead letters",
        (
            *_BASE,
            *_SERVICE,
            *_CONSUMER,
            *_HEAL,
            *_FORGET,
            *_REGISTRY,
            # (zcard: claim_ids' cap on the explicit ids a shard keeps, lua/includes/cap.lua;
            # xlen: the inbox lag's cap, supersede.streams.unread; xinfo|stream: its last id)
            *_words("xtrim xadd zadd zrem zrangebyscore zcard hset hdel time xlen xinfo|stream"),
        ),
        (
            "~@:events",
            "~@:config",
            "%W~@:dead",
            *_READS_REGISTRY,
            *_shard("requests", "ids", "ids-at"),
        ),
    ),
    Role(
        "admission",
        "admits requests and results, reaps, trims the shard streams",
        (
            *_BASE,
            *_SERVICE,
            *_CONSUMER,
            *_HEAL,
            *_FORGET,
            *_STATE_SCRIPTS,
            *_REGISTRY,
            *_words("hkeys unlink zcard set"),  # (set: lua/reap.lua keeps its outcome)
        ),
        (
            "~@:config",
            "%W~@:dead",
            *_READS_REGISTRY,
            *_shard(
                "requests",
                *_FINISH_KEYS,
                "fences",
                "debounce",
                "due",
                "terminal",
                "seen",
                "reaped:*",  # (its reap calls' outcomes)
            ),
        ),
        _BELLS,
    ),
    Role(
        "executor",
        "claims and runs assignments, applies its results (finish), registers its workflows",
        (
            *_BASE,
            *_SERVICE,
            *_CONSUMER,
            *_STATE_SCRIPTS,
            *_REGISTRY,
            *_words("xread xrevrange incr set ssubscribe sunsubscribe"),  # (set: turn keys)
        ),
        (
            "~@:config",
            "%W~@:dead",
            "~{@}:workflows",
            "~{@}:workflows:*",
            *_shard(*_FINISH_KEYS, "turn:*"),  # (its finish calls' turn keys)
            "%R~{@:*}:fences",  # ctx.still_current()
        ),
        _BELLS,
    ),
    Role(
        "operator",
        "the CLI: everything `reader` does, plus publish, cancel, dead-letter replay and retire",
        (
            *_BASE,
            *_READ,
            *_REGISTRY,
            *_STATE_SCRIPTS,
            # (retire: incr, the registry's epoch in its script; xpending, whether admission
            # admitted the requests written before; unlink, the streams)
            *_words("evalsha script|load xadd xdel unlink incr xpending"),
        ),
        ("~@:*", "~{@}:*", "~{@:*}:*"),
        _BELLS,
    ),
    Role(
        "producer",
        "an application that publishes events: XADD to the inbox, nothing else",
        (*_BASE, "xadd"),
        ("%W~@:events",),
    ),
    Role(
        "reader",
        "the CLI's read-only commands (runs, run, status, dead) and dashboards",
        (*_BASE, *_READ, *_REGISTRY),
        ("%R~@:*", "%R~{@}:*", "%R~{@:*}:*"),
    ),
    Role(
        "keda",
        "KEDA's redis-streams scaler: the executor group's pending and lag counts",
        (*_BASE, *_words("xinfo|groups xpending xlen")),
        ("%R~{@:*}:assignments:*",),
    ),
)


def _union(name: str, about: str, parts: Sequence[Role]) -> Role:
    def merged(lists: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(item for items in lists for item in items))

    return Role(
        name,
        about,
        merged(r.commands for r in parts),
        merged(r.keys for r in parts),
        merged(r.channels for r in parts),
    )


# (a connection has one user: `supersede serve` needs one with the three services' rights)
ROLES += (
    _union(
        "serve",
        "`supersede serve`: ingress, admission and an executor in one process",
        [r for r in ROLES if r.name in ("ingress", "admission", "executor")],
    ),
)
ROLE_NAMES = tuple(r.name for r in ROLES)
# Roles `supersede acl --apply` without --role creates only when their password is set (a
# deployment of the separate services has no use for them, nor a password for them).
OPTIONAL_ROLES = ("serve", "producer")


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def user_name(namespace: str, role: str) -> str:
    return f"{namespace}-{role}"


def role(name: str) -> Role:
    for r in ROLES:
        if r.name == name:
            return r
    raise ConfigError(f"unknown ACL role {name!r}: one of {', '.join(ROLE_NAMES)}")


def rules(namespace: str, role_name: str, extra: Sequence[str] = ()) -> list[str]:
    """The ACL SETUSER rules of one role (no password: add '>secret' or '#<sha256>'), with the
    `extra` commands (SETINFO on servers that have it)."""
    r = role(role_name)
    ns = _glob_escape(namespace)
    commands = sorted({*r.commands, *extra})
    keys = [k.replace("@", ns) for k in (*r.keys, *r.channels)]
    return ["reset", "on", "resetchannels", "-@all", *[f"+{c}" for c in commands], *keys]


def setuser_line(namespace: str, role_name: str) -> str:
    return " ".join(
        ["ACL", "SETUSER", user_name(namespace, role_name), *rules(namespace, role_name)]
    )


def password_env(role_name: str) -> str:
    return f"SUPERSEDE_ACL_PASSWORD_{role_name.upper()}"


def passwords_from_env(roles: Sequence[str], env: dict[str, str] | None = None) -> dict[str, str]:
    """The password of each role from SUPERSEDE_ACL_PASSWORD_<ROLE>; all must be set."""
    env = dict(os.environ) if env is None else env
    missing = [password_env(r) for r in roles if not env.get(password_env(r))]
    if missing:
        raise ConfigError(f"set {', '.join(missing)} (the password of each user to create)")
    return {r: env[password_env(r)] for r in roles}


# What a URL's parser splits at, or decodes: a password holding one is percent-encoded there
URL_UNSAFE = "/#?[]@%"
MIN_PASSWORD = 16


def password_warnings(passwords: dict[str, str]) -> list[str]:
    """One warning per password of `passwords` (role -> password) that the processes' URLs
    must percent-encode, or that is short (`--apply` took `ab#cd` and `a` silently)."""
    out = []
    for role_name, password in passwords.items():
        env = password_env(role_name)
        unsafe = sorted({c for c in password if c in URL_UNSAFE})
        if unsafe:
            codes = ", ".join(f"{c} as %{ord(c):02X}" for c in unsafe)
            out.append(f"{env} holds {' '.join(unsafe)}: percent-encode it in the processes' "
                       f"SUPERSEDE_REDIS_URL ({codes})")  # fmt: skip
        if len(password) < MIN_PASSWORD:
            out.append(f"{env} has {len(password)} characters: give it {MIN_PASSWORD} or more "
                       "(`openssl rand -hex 16`)")  # fmt: skip
    return out


async def apply(
    redis: Any, namespace: str, passwords: dict[str, str], url: str
) -> tuple[list[str], list[str], list[str], bool]:
    """Create (or reset) the user of each role in `passwords` on one server, or on every node a
    cluster's CLUSTER NODES lists, replicas included (ACL users are per node, and a replica
    becomes the master in a failover); each node is reached at its address with `url`'s
    credentials and options. Returns (user names, nodes set, nodes missed: failing or not
    reachable, to apply again once they are back, whether a server or node has no ACL file:
    its users are lost when it restarts)."""
    from redis.asyncio.cluster import RedisCluster

    if not isinstance(redis, RedisCluster):
        await _setusers(redis, namespace, passwords)
        saved = await _save(redis)
        return [user_name(namespace, r) for r in passwords], [], [], not saved
    listing = await redis.execute_command("CLUSTER NODES", target_nodes=redis.get_random_node())
    done, missed, unsaved = [], [], False
    for address, info in sorted(listing.items()):
        flags = set(str(info.get("flags", "")).split(","))
        if flags & {"fail", "fail?", "noaddr", "handshake"} or not info.get("connected", True):
            missed.append(address)
            continue
        host, _, port = address.rpartition(":")
        host = str(info.get("hostname") or host)  # (the name a TLS certificate may carry)
        node = connect(_node_url(url, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))
        try:
            await _setusers(node, namespace, passwords)
            unsaved |= not await _save(node)
            done.append(address)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            missed.append(f"{address} ({type(exc).__name__})")
        except RedisError as exc:
            if "LOADING" not in str(exc):
                raise
            missed.append(f"{address} (loading)")
        finally:
            await node.aclose()
    return [user_name(namespace, r) for r in passwords], done, missed, unsaved


def _node_url(url: str, address: str) -> str:
    """`url` (a cluster URL) pointed at one node, as a single server's URL."""
    parts = urlsplit(cluster_seed(url))
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@{address}" if auth else address
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def _setusers(redis: Any, namespace: str, passwords: dict[str, str]) -> None:
    from redis.exceptions import ResponseError

    for role_name, password in passwords.items():
        name = user_name(namespace, role_name)
        args = ["ACL", "SETUSER", name, *rules(namespace, role_name, [SETINFO]), f">{password}"]
        try:
            await redis.execute_command(*args)
        except ResponseError as exc:  # before Redis 7.2, which has no CLIENT SETINFO
            if SETINFO not in str(exc):
                raise
            await redis.execute_command(*args[:3], *rules(namespace, role_name), f">{password}")


async def _save(redis: Any) -> bool:
    """ACL SAVE on a server (a node) that has an ACL file, so the users survive a restart:
    True; False without one (they live in memory only: `--apply` says so)."""
    from redis.exceptions import ResponseError

    try:
        await redis.execute_command("ACL", "SAVE")
    except ResponseError as exc:
        if "ACL file" not in str(exc) and "aclfile" not in str(exc).lower():
            raise
        return False
    return True
