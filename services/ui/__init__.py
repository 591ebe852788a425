"""`supersede ui`: a web dashboard over the same Redis (aiohttp, server-rendered HTML, one small
vendored script for live pages). Read-only unless started with --allow-actions; actions go
through the scripts the CLI uses, behind a CSRF token. Data comes from the indexes the CLI reads
(`supersede.services.ops`, `supersede.lookups`), never from a scan of the records."""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import logging
import re
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web  # the `ui` extra (the CLI says so when it is missing)
from aiohttp.http_exceptions import HttpProcessingError
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from supersede import codec, lookups
from supersede.config import refusal
from supersede.errors import ConfigError, describe
from supersede.keys import Keys
from supersede.logs import Sampled
from supersede.model import group_id, shard_of_group, shard_of_run
from supersede.protocol import RunState, unpack_input
from supersede.registry import load_all
from supersede.scripts import Scripts
from supersede.services import ops
from supersede.services.ui import pages
from supersede.services.ui.activity import Activity

log = logging.getLogger("supersede.ui")
STATIC = Path(__file__).resolve().parent / "static"
# No inline script or style, nothing from another origin, no framing.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
KEY_RUNS = 50  # runs of one key drawn on a page of it (older ones: the next pages)
SUPERSEDED_WINDOW_MS = 60_000


_CURSOR = re.compile(r"(\d{1,19})-(\d{1,19})(/\d{1,9})?")


def _cursor(text: str | None, param: str = "before") -> str | None:
    """A page cursor from a query, checked: `<ms>-<seq>[/<n>]`, a stream id above 0-0."""
    if text is None:
        return None
    m = _CURSOR.fullmatch(text)
    if m is None or int(m[1]) == int(m[2]) == 0:  # (19 digits stay below 2**64)
        raise web.HTTPBadRequest(text=f"{param}: not a cursor: {text!r}")
    return text


def _int(text: str | None, default: int, lo: int, hi: int, param: str) -> int:
    try:
        return max(lo, min(int(text or default), hi))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{param}: not a number: {text!r}") from None


def _ms_of(text: str, param: str = "ended_before") -> int:
    """Epoch ms of an ISO date and time ("2026-12-03T12:15", as UTC)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{param}: not a date and time: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(1, int(when.timestamp() * 1000))


def shown(value: Any) -> str:
    """A run's input or outputs (made `codec.jsonable`) as indented JSON for its page. A msgpack
    timestamp, JSON nested 260 deep (orjson writes 254 levels at most) answered 500 with a
    traceback (a probe)."""
    try:
        return ops.dumps(value)
    except (TypeError, RecursionError) as exc:  # (what jsonable leaves that orjson refuses)
        return f"(not shown: {exc})"


class UI:
    def __init__(
        self, redis: Redis, keys: Keys, *, allow_actions: bool, secret: str | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts(redis, keys)
        self.allow_actions = allow_actions
        self.activity = Activity(redis, keys)
        # The forms' CSRF token, readable only by a page of this origin (the Host check below
        # keeps a rebound DNS name from being this origin): this process's own secret, or one
        # derived from SUPERSEDE_UI_SECRET, which several dashboards behind one load balancer
        # share (a form of one posted to another was refused, its notices not shown)
        self.token = (
            hmac.new(secret.encode(), b"supersede ui: forms", "sha256").hexdigest()
            if secret
            else secrets.token_urlsafe(32)
        )
        # the notices' MAC key: another secret (the token is printed in every page's forms)
        self._notices = (
            hmac.new(secret.encode(), b"supersede ui: notices", "sha256").digest()
            if secret
            else secrets.token_bytes(32)
        )

    # -- helpers ---------------------------------------------------------------------------
    def signed(self, value: str, *about: str) -> str:
        """`value` with a MAC of it and what it is `about`: a notice an action's redirect
        carries, which a link from elsewhere cannot forge ("Cancelled 999999 live runs")."""
        mac = hmac.new(self._notices, "\n".join((value, *about)).encode(), "sha256")
        return f"{value}.{mac.hexdigest()[:16]}"

    def verified(self, text: str | None, *about: str) -> str | None:
        """The value of a `signed` notice, or None (absent, or not this process's)."""
        value = (text or "").rpartition(".")[0]
        ok = text is not None and hmac.compare_digest(text, self.signed(value, *about))
        return value if ok else None

    def csrf(self, request: web.Request) -> str | None:
        """The forms' CSRF token, or None when actions are off."""
        return self.token if self.allow_actions else None

    def respond(
        self, request: web.Request, title: str, body: str, *, live: bool = False, head: str = ""
    ) -> web.Response:
        """The page, or with ?fragment=1 (a live page refreshing) only its body."""
        if request.query.get("fragment"):
            text = body
        else:
            text = pages.page(title, body, live=live, head=head)
        return web.Response(text=text, content_type="text/html")

    async def check_action(self, request: web.Request) -> dict[str, str]:
        """The posted form, once actions are allowed, the request comes from a page of this
        origin (its Origin header, or the browser's Sec-Fetch-Site) and carries the token."""
        if not self.allow_actions:
            raise web.HTTPForbidden(text="read-only: start `supersede ui --allow-actions`")
        origin = request.headers.get("Origin")
        # (the host part only: behind a TLS proxy the page is https and this side http)
        if origin is not None and _bare(urlsplit(origin).netloc) != _bare(request.host):
            raise web.HTTPForbidden(text=f"a form posted from another origin: {origin}")
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise web.HTTPForbidden(text="a form posted from another site")
        form = await request.post()
        sent = str(form.get("csrf", "")).encode()
        if not hmac.compare_digest(sent, self.token.encode()):
            raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page")
        return {k: str(v) for k, v in form.items()}

    # -- pages -----------------------------------------------------------------------------
    async def overview(self, request: web.Request) -> web.Response:
        s = await ops.status(self.redis, self.keys)
        await self.activity.look()
        body = pages.overview(s, self.activity.series())
        return self.respond(request, "Overview", body, live=True)

    async def runs(self, request: web.Request) -> web.Response:
        f: dict[str, Any] = {
            "workflow": request.query.get("workflow") or None,
            "key": request.query.get("key") or None,
            "state": request.query.get("state") or None,
            "limit": _int(request.query.get("limit"), 50, 1, 1000, "limit"),
            "before": request.query.get("before") or None,
            "ended_before": request.query.get("ended_before") or None,
        }
        if f["state"] and f["state"].upper() not in RunState.__members__:
            raise web.HTTPBadRequest(text=f"state: no state {f['state']!r}")
        if f["workflow"]:  # (a misspelt name in a link listed no runs and said nothing)
            try:
                await lookups.require_workflow(self.redis, self.keys, f["workflow"])
            except LookupError as exc:
                raise web.HTTPNotFound(text=f"workflow: {exc}") from None
        before = f["before"]
        if before is None and f["ended_before"]:  # a time (the form's local time, as UTC)
            before = f"{_ms_of(f['ended_before'])}-0"
        before = _cursor(before)
        rows, nxt = await ops.runs_page(
            self.redis, self.keys, workflow=f["workflow"], key=f["key"], state=f["state"],
            limit=f["limit"], before=before,
        )  # fmt: skip
        _, defs, _ = await load_all(self.redis, self.keys)
        head, body = pages.runs(rows, sorted(defs), f, nxt)
        return self.respond(request, "Runs", body, live=before is None, head=head)

    async def run(self, request: web.Request) -> web.Response:
        rid = request.match_info["rid"]
        try:
            shard_of_run(rid)
        except ValueError:
            raise web.HTTPNotFound(text=f"no run {rid!r}: not a run id") from None
        r = await ops.get_run(self.redis, self.keys, rid)
        if r is None:
            raise web.HTTPNotFound(text=f"no run {rid!r} (never created, or past its retention)")
        rid = r["id"]  # (a planned id whose run went to another shard: see lookups.moved_run)
        sk = self.keys.shard(shard_of_run(rid))
        raw = await self.redis.hget(sk.inputs_hash, rid)
        if raw is None:  # (an input of at most 1 KiB is kept in the record of a live run)
            record = await self.redis.hget(sk.runs_hash, rid)
            inline = codec.unpack(codec.blob(record)).get("in") if record else None
            raw = codec.blob(inline) if inline is not None else None
        if raw:
            r["input"] = shown(codec.jsonable(unpack_input(codec.blob(raw))))
        if r.get("outputs"):
            r["outputs"] = shown(r["outputs"])
        cancelled = await self._superseded_by(r)
        asked = request.match_info["rid"]
        unchanged = self.verified(request.query.get("not"), asked) is not None
        body = pages.run(r, cancelled, self.csrf(request), not_cancelled=unchanged)
        return self.respond(request, f"Run {rid}", body)

    async def _superseded_by(self, r: dict[str, Any]) -> list[dict[str, Any]]:
        """The runs `r` cancelled: of its key, the live ones and those that ended within
        SUPERSEDED_WINDOW_MS of its creation (a cancel is decided when the newer run is
        admitted), from the indexes, a page of each."""
        wf, key, rid = r["workflow"], r["key"], r["id"]
        page = functools.partial(ops.runs_page, self.redis, self.keys, workflow=wf, key=key)
        pages_ = [page(state="cancelling", limit=KEY_RUNS)]
        if r.get("created_ms"):
            before = f"{r['created_ms'] + SUPERSEDED_WINDOW_MS}-0"
            pages_.append(page(state="cancelled", limit=KEY_RUNS, before=before))
        found: dict[str, dict[str, Any]] = {}
        for rows, _ in await asyncio.gather(*pages_):
            found.update((x["id"], x) for x in rows if x.get("cancelled_by") == rid)
        return sorted(found.values(), key=lambda x: x["created_ms"] or 0)

    async def key(self, request: web.Request) -> web.Response:
        workflow = request.query.get("workflow", "")
        value = request.query.get("key")
        if not workflow or value is None:
            raise web.HTTPBadRequest(text="a key page needs ?workflow=…&key=…")
        before = _cursor(request.query.get("before") or None)
        runs, nxt = await ops.runs_page(self.redis, self.keys, workflow=workflow, key=value,
                                        limit=KEY_RUNS, before=before)  # fmt: skip
        runs.sort(key=lambda r: (r["created_ms"] or 0, r["id"]))
        _, defs, _ = await load_all(self.redis, self.keys)
        wf = defs.get(workflow)
        conc = wf.concurrency if wf else None
        slots = 0
        if wf is not None and conc is not None:
            gid = group_id(workflow, wf.version, value, conc.scope)
            shard = self.keys.shard(shard_of_group(gid, self.keys.shards))
            slots = int(await self.redis.hget(shard.slots_hash, gid) or 0)
        k = {
            "workflow": workflow,
            "key": value,
            "runs": runs,
            "slots": slots,
            "max_runs": conc.max_runs if conc else "unlimited",
            "strategy": str(conc.limit_strategy) if conc else "none",
            "at_ms": int(time.time() * 1000),
            "next": nxt,
            "before": before,
            "notice": _key_notice(
                self.verified(request.query.get("cancelled"), workflow, value),
                workflow,
                wf is not None,
            ),
        }
        body = pages.key(k, self.csrf(request))
        return self.respond(request, f"Key {value}", body, live=before is None)

    async def dead(self, request: web.Request) -> web.Response:
        rows = await ops.dead_letters(self.redis, self.keys, limit=100)
        replayed = self.verified(request.query.get("replayed"), "replayed")
        notice = f"Replayed as inbox entry {replayed}." if replayed else ""
        return self.respond(request, "Dead letters", pages.dead(rows, self.csrf(request), notice))

    # -- actions ---------------------------------------------------------------------------
    async def cancel_run(self, request: web.Request) -> web.Response:
        await self.check_action(request)
        rid = request.match_info["rid"]
        try:
            await lookups.require_run(self.redis, self.keys, rid)
        except (LookupError, ValueError) as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        done = await lookups.cancel_runs(self.scripts, [rid])
        unchanged = urlencode({"not": self.signed("1", rid)})
        raise web.HTTPSeeOther(f"/runs/{rid}" if done.get(rid) else f"/runs/{rid}?{unchanged}")

    async def cancel_key(self, request: web.Request) -> web.Response:
        form = await self.check_action(request)
        workflow, value = form.get("workflow", ""), form.get("key")
        if "key_hex" in form:  # (a browser sends a lone LF or CR as CRLF, a NUL not at all)
            try:
                value = bytes.fromhex(form["key_hex"]).decode()
            except (ValueError, UnicodeDecodeError):
                raise web.HTTPBadRequest(text="a key's cancel needs the key in hex") from None
        if not workflow or value is None:
            raise web.HTTPBadRequest(text="a key's cancel needs the workflow and the key")
        done = await lookups.cancel_key(self.redis, self.scripts, workflow, value)
        cancelled = sum(1 for ok in done.values() if ok)
        raise web.HTTPSeeOther(
            "/key?"
            + urlencode(
                {
                    "workflow": workflow,
                    "key": value,
                    "cancelled": self.signed(str(cancelled), workflow, value),
                }
            )
        )

    async def replay(self, request: web.Request) -> web.Response:
        await self.check_action(request)
        entry = request.match_info["entry"]
        try:
            new_id = await ops.replay_dead(self.redis, self.keys, entry)
        except (LookupError, ValueError) as exc:
            return web.Response(
                text=pages.message("Not replayed", str(exc), "/dead"),
                content_type="text/html",
                status=409,
            )
        # (the page said nothing: the letter was gone, or still there, refused again, a probe)
        raise web.HTTPSeeOther("/dead?" + urlencode({"replayed": self.signed(new_id, "replayed")}))


SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",  # (inputs, outputs and the CSRF token stay out of caches)
}


REQUEST_TIMEOUT = 5.0  # seconds a page may take: past it, Redis is said not to answer
PING_WITHIN = 1.0  # seconds a PING may take, past a page's timeout, for Redis to be said up


async def _answers(redis: Redis) -> bool:
    """Redis answers a PING within PING_WITHIN: on a cluster, every master (one node's answer
    said a page held by a frozen master was too slow, "though Redis answers", a UI probe)."""
    try:
        async with asyncio.timeout(PING_WITHIN):
            if isinstance(redis, RedisCluster):
                await redis.ping(target_nodes=RedisCluster.PRIMARIES)
            else:
                await redis.ping()
    except (RedisError, TimeoutError, OSError):
        return False
    return True


def _guard(hosts: frozenset[str] | None, redis: Redis | None = None) -> Any:
    """A middleware: only requests addressed to one of `hosts` (None: any) are served, so a
    DNS name rebound to this address cannot read the pages; a bad parameter is a 400, an
    unknown run a 404, never a traceback; every answer carries the security headers. A page
    past REQUEST_TIMEOUT while `redis` answers a PING is said to be too slow, not Redis
    unreachable (a scale probe: the status of 1,000 workflows)."""

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if hosts is not None and _bare(request.host) not in hosts:
                raise web.HTTPMisdirectedRequest(text=f"not served for host {request.host!r}")
            # (a hung server: no answer at all; an action is not cut short, half done)
            within = REQUEST_TIMEOUT if request.method in ("GET", "HEAD") else None
            async with asyncio.timeout(within):
                resp: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(SECURITY_HEADERS)
            raise
        except (ValueError, LookupError) as exc:  # a parameter the page could not use
            resp = web.Response(text=f"bad request: {exc}", status=400)
        except AuthenticationError:  # (a ConnectionError to redis-py: not an outage)
            log.warning("ui request: Redis refused the credentials", extra={"path": request.path})
            resp = web.Response(status=503, text=(
                "Redis refused the UI's credentials (its password changed, or its user was "
                "removed): restart `supersede ui` with the new SUPERSEDE_REDIS_URL"))  # fmt: skip
        except (RedisConnectionError, RedisTimeoutError, TimeoutError) as exc:  # (down, hung)
            said = describe(exc) if str(exc) else f"no answer within {REQUEST_TIMEOUT:g} s"
            if not str(exc) and redis is not None and await _answers(redis):
                log.warning("ui request: the page took too long", extra={
                    "path": request.path, "within_s": REQUEST_TIMEOUT})  # fmt: skip
                text = (
                    f"this page took over {REQUEST_TIMEOUT:g} s though Redis answers: what "
                    "it reads is too large, or each call to Redis is slow (a distant or loaded "
                    "server); narrow it (a workflow, a key, a state)"
                )
                resp = web.Response(text=text, status=503)
                resp.headers.update(SECURITY_HEADERS)
                return resp
            log.warning("ui request: Redis unreachable", extra={"error": said})
            after = (
                "the page is up to date again once it answers"
                if request.method in ("GET", "HEAD")
                else "the action may be partly done: look again once it answers"
            )
            # (the server's address and the error stay in the UI's log, not for visitors)
            why = "the UI's log says why" if str(exc) else said
            resp = web.Response(text=f"Redis is unreachable ({why}): {after}", status=503)
        except Exception as exc:
            # (a right the user lacks, the reader's asked to cancel say: what it needs)
            roles = ("operator",) if request.method == "POST" else ("reader",)
            refused = refusal(exc, "", roles) if isinstance(exc, RedisError) else None
            if refused is not None:
                log.warning("ui request refused by Redis", extra={"error": str(refused)})
                resp = web.Response(text=str(refused), status=403)
            else:
                log.exception("ui request failed", extra={"path": request.path})
                resp = web.Response(text="internal error (the UI's log has it)", status=500)
        resp.headers.update(SECURITY_HEADERS)
        return resp

    return guard


ANY_INTERFACE = ("0.0.0.0", "::", "0", "::0", "")


def _key_notice(cancelled: str | None, workflow: str, known: bool) -> str:
    """What a key page says after a cancel of its live runs, or of a workflow not registered."""
    if not known:
        return f"No workflow {workflow!r} is registered."
    if cancelled is None:
        return ""
    n = int(cancelled) if cancelled.isdigit() else 0
    return f"Cancelled {n} live run{'s' if n != 1 else ''}." if n else "No live run to cancel."


def _bare(host: str) -> str:
    """A Host header or an origin's host part without a default port (80, 443): a proxy on
    443 may forward `name` or `name:443`, and the browser's Origin says `https://name`."""
    host = host.lower()
    for default in (":80", ":443"):
        if host.endswith(default):
            return host[: -len(default)]
    return host


def served_hosts(host: str, port: int, allowed: Sequence[str] = ()) -> frozenset[str] | None:
    """The Host headers the UI answers: its address and the loopback names with its port (80
    or 443: also without), and `allowed` (the names a proxy in front of it forwards) with the
    port and without (a proxy on 80 or 443 forwards the bare name); None (any) when it listens
    on every interface and no name is given (put a proxy in front of it)."""
    if host in ANY_INTERFACE and not allowed:
        return None
    names = {"127.0.0.1", "localhost", "[::1]", *allowed}
    if host not in ANY_INTERFACE:
        names |= {host, f"[{host}]"}
    out = {f"{n}:{port}".lower() for n in names} | {_bare(n) for n in allowed}
    if port in (80, 443):  # (a Host with a default port is compared without it: see _bare)
        out |= {n.lower() for n in names}
    return frozenset(out)


async def _no_icon(request: web.Request) -> web.Response:
    """No icon, and no 404 for it: a browser asks on every page, and logged an error each time."""
    return web.Response(status=204)


def make_app(
    redis: Redis,
    keys: Keys,
    *,
    allow_actions: bool = False,
    hosts: frozenset[str] | None = None,
    secret: str | None = None,
) -> web.Application:
    ui = UI(redis, keys, allow_actions=allow_actions, secret=secret)
    app = web.Application(middlewares=[_guard(hosts, redis)])
    app.add_routes(
        [
            web.get("/", ui.overview),
            web.get("/runs", ui.runs),
            web.get("/runs/{rid}", ui.run),
            web.get("/key", ui.key),
            web.get("/dead", ui.dead),
            web.get("/favicon.ico", _no_icon),
            web.post("/runs/{rid}/cancel", ui.cancel_run),
            web.post("/key/cancel", ui.cancel_key),
            web.post("/dead/{entry}/replay", ui.replay),
            web.static("/static", STATIC),
        ]
    )
    return app


async def check_actions(redis: Redis, keys: Keys, url: str) -> None:
    """`--allow-actions` under a user without the operator's rights (the reader's) would show
    buttons that every press then refuses: refuse to start instead, naming the role. A cancel
    of a run that cannot exist tells (its script checks the rights, then finds no run and
    writes nothing)."""
    try:
        await lookups.cancel_runs(Scripts(redis, keys), ["0-" + "0" * 20])
    except Exception as exc:
        refused = refusal(exc, url, ("operator",))
        if refused is not None:
            raise ConfigError(f"--allow-actions: {refused}") from None


class _BadRequests(logging.Filter):
    """aiohttp's line for a request it could not read (a request line of 100 KB, any client
    may send one): one line, at most one a kind every few seconds, not a traceback each (a
    security probe: any client could fill the dashboard's log)."""

    def __init__(self) -> None:
        super().__init__()
        self.sampled = Sampled()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        repeats = self.sampled.due(type(exc).__name__)
        if repeats is None:
            return False
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "a client"
        record.msg = f"{remote}: a request not read, answered {exc.code}: {type(exc).__name__}"
        record.msg += f" ({repeats} more since the last said)" if repeats else ""
        record.args = ()  # (aiohttp before 3.11.12 passes none: the line had a bare %s)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


async def serve(
    redis: Redis,
    keys: Keys,
    host: str,
    port: int,
    allow_actions: bool,
    allowed_hosts: Sequence[str] = (),
    secret: str | None = None,
) -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _BadRequests) for f in server_log.filters):
        server_log.addFilter(_BadRequests())
    hosts = served_hosts(host, port, allowed_hosts)
    app = make_app(redis, keys, allow_actions=allow_actions, hosts=hosts, secret=secret)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        # (a port in use or below 1024; anything else is the host: a name that does not
        # resolve, an address not this machine's; it said "set --port" for `--host '[::]'`)
        setting = "--port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "--host"
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}): set {setting}"
        ) from None
    mode = "actions allowed" if allow_actions else "read-only"
    print(f"supersede ui: http://{host}:{port}/ ({mode})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
