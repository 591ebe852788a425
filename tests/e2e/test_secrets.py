"""No secret printed or logged, and clear start-up errors (issue 14, items 3, 4 and 7 in part):
the services, the CLI and `supersede dev` run against a password-protected server and no line
they write holds the password; a metrics port in use is one line naming the setting."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pty
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from supersede import __version__
from supersede.config import cluster_seed, redact
from supersede.server import EmbeddedServer, die_with_parent, free_port
from tests.support import REPO
from tests.support.tls import TlsCluster, TlsServer, make_certs

SECRET = "pw-7f3c9a-do-not-print"


def test_redact_hides_the_password_wherever_a_url_carries_it() -> None:
    assert redact(f"redis://:{SECRET}@h:6379/0") == "redis://:***@h:6379/0"
    assert redact(f"rediss://app:{SECRET}@h:6380") == "rediss://app:***@h:6380"
    assert redact(f"redis+cluster://:{SECRET}@h:7000") == "redis+cluster://:***@h:7000"
    hidden = redact(f"redis://h/0?password={SECRET}&ssl_cert_reqs=none")
    assert hidden == "redis://h/0?password=***&ssl_cert_reqs=none"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    # a password holding #, ? or / (generated ones do) left the authority a URL parser reads,
    # and was printed; so were a TLS key's passphrase and a URL without a scheme (a probe)
    for odd in ("Se#cret", "k8s/Gen+Pw==", "Se?cret", "p@ss"):
        assert redact(f"redis://app:{odd}{SECRET}@h:1/0") == "redis://app:***@h:1/0"
    tls = redact(f"rediss://h:1/0?ssl_password={SECRET}&ssl_cert_reqs=none")
    assert tls == "rediss://h:1/0?ssl_password=***&ssl_cert_reqs=none"
    assert redact(f"app:{SECRET}@h:1/0") == "app:***@h:1/0"
    # a parameter's name percent-encoded, as redis-py decodes it (a review)
    assert redact(f"redis://h:1/0?p%61ssword={SECRET}&db=0") == "redis://h:1/0?p%61ssword=***&db=0"


@pytest.mark.parametrize(
    "url", [f"redis://app:k8s/{SECRET}@127.0.0.1:1/0", f"redis://app:a#{SECRET}@127.0.0.1:1/0",
            f"app:{SECRET}@127.0.0.1:1/0"],
)  # fmt: skip
def test_a_url_the_settings_refuse_is_not_printed_with_its_password(url: str) -> None:
    env = {**_env(url)}
    done = subprocess.run([sys.executable, "-m", "supersede", "status"], env=env,
                          capture_output=True, timeout=60)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and SECRET not in err and "SUPERSEDE_REDIS_URL" in err, err


def test_a_refusal_does_not_quote_the_pipeline_command_it_names() -> None:
    """A refused command of a pipeline: redis-py's message quotes its arguments (an event's
    data, a prefix of it in a dead letter), which the refusal's line carried (a probe)."""
    from redis.exceptions import NoPermissionError

    from supersede.config import refusal

    exc = NoPermissionError(
        f"Command # 2 (XADD ns:dead * data {SECRET}) of pipeline caused error: No permissions "
        "to run the 'xadd' command"
    )
    refused = refusal(exc, "redis://h:1/0", ("ingress",))
    assert refused is not None and SECRET not in str(refused) and "command 2" in str(refused)


@pytest.fixture
def protected() -> Iterator[str]:
    server = EmbeddedServer().start()
    redis_sync.Redis(port=server.port).config_set("requirepass", SECRET)
    try:
        yield f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
    finally:
        server.stop()


def _env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    return {**env, "SUPERSEDE_REDIS_URL": url, "SUPERSEDE_NAMESPACE": "secrets",
            "SUPERSEDE_SHARDS": "2"}  # fmt: skip


def _until_line(proc: subprocess.Popen[bytes], needle: bytes, lines: list[bytes]) -> None:
    assert proc.stderr
    for line in proc.stderr:
        lines.append(line)
        if needle in line:
            return
    raise AssertionError(b"".join(lines).decode()[-2000:])


def test_services_cli_and_dev_never_print_the_password(protected: str) -> None:
    out: list[bytes] = []
    redacted = redact(protected).encode()
    for service in ("admission", "ingress"):
        cmd = [sys.executable, "-m", "supersede", service, "--metrics-port", "0"]
        proc = subprocess.Popen(cmd, env=_env(protected), stderr=subprocess.PIPE,
                                preexec_fn=die_with_parent)  # fmt: skip
        try:
            lines: list[bytes] = []
            _until_line(proc, f"{service} started".encode(), lines)
            # the start line names the server (redacted), the namespace, the shard count and
            # the version (a rolling upgrade's progress: an upgrade probe)
            assert redacted in lines[-1] and b"secrets" in lines[-1]
            assert f'"version":"{__version__}"'.encode() in lines[-1], lines[-1]
            out += lines
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=30)
            out.append(rest or b"")
        finally:
            proc.kill()
            proc.wait(10)
    for args in (["status"], ["runs", "--limit", "5"], ["publish", "e", "{}"]):
        done = subprocess.run([sys.executable, "-m", "supersede", *args], env=_env(protected),
                              capture_output=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        out += [done.stdout, done.stderr]
    dev = subprocess.run(
        [sys.executable, "-m", "supersede", "dev", "--duration", "2", "--no-demo-events"],
        env=_env(protected), capture_output=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert dev.returncode == 0, dev.stderr.decode()[-2000:]
    assert (
        redacted in dev.stdout and b'redis-cli -u "$(printf %s "$SUPERSEDE_REDIS_URL"' in dev.stdout
    )
    out += [dev.stdout, dev.stderr]
    assert SECRET.encode() not in b"".join(out)


def test_a_metrics_port_in_use_is_one_line_naming_the_setting(protected: str) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "supersede", "admission", "--metrics-port", str(port)]
        done = subprocess.run(cmd, env=_env(protected), capture_output=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert lines[-1].startswith("supersede: cannot serve metrics") and "--metrics-port" in lines[-1]
    assert "Traceback" not in done.stderr.decode()
    # the address is a setting too, and a wrong one is refused the same way
    env = {**_env(protected), "SUPERSEDE_METRICS_HOST": "192.0.2.1"}  # not an address here
    cmd[-1] = str(free_port())
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert done.returncode == 2 and "192.0.2.1" in done.stderr.decode().splitlines()[-1]


def test_start_up_failures_are_one_line_naming_the_setting(protected: str) -> None:
    """An unreachable server, a URL without a scheme, refused credentials: exit 2 with one
    line that says what to fix, for a service and for the CLI alike."""
    wrong = protected.replace(SECRET, "not-the-password")
    cases = {
        f"redis://127.0.0.1:{free_port()}/0": "cannot reach Redis",
        "127.0.0.1:6379": "must start with one of redis://",
        wrong: "refused",
        # (no password at all: said so, beside Redis's words about HELLO)
        protected.replace(f":{SECRET}@", ""): "names no password",
        # (a database the server does not have, TLS to a server without it, a cluster URL for
        # one server, a port that is not a number: each was a traceback)
        protected.rsplit("/", 1)[0] + "/99": "refused",
        protected.replace("redis://", "rediss://", 1): "timed out",
        protected.replace("redis://", "redis+cluster://", 1): "no Redis Cluster",
        "redis://127.0.0.1:notaport/0": "SUPERSEDE_REDIS_URL",
        # (an option redis-py refuses only when it connects: a traceback)
        f"rediss://127.0.0.1:{free_port()}/0?ssl_cert_reqs=bogus": "its options",
        # (an option the client does not take: a traceback, a TypeError, whatever the scheme)
        protected + "?foo=bar": "does not know: 'foo'",
        protected + "?ssl_cert_reqs=none": "need the rediss:// scheme",
        protected.replace("redis://", "redis+cluster://", 1) + "?foo=bar": "does not know",
        # (set but empty, a failed `export SUPERSEDE_REDIS_URL=$(...)`: the default server)
        "": "set but empty",
    }
    # (`dev` too: it went on to start the services, then died in a traceback)
    commands = (["admission", "--metrics-port", "0"], ["status"],
                ["dev", "--ui-port", "0", "--duration", "1"])  # fmt: skip
    runs = [(url, says, args) for url, says in cases.items() for args in commands]

    def run(url: str, args: list[str]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "supersede", *args], env=_env(url),
                              capture_output=True, timeout=60)  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # (39 processes: a few at a time)
        results = list(pool.map(lambda case: run(case[0], case[2]), runs))
    for (url, says, args), done in zip(runs, results, strict=True):
        err = done.stderr.decode()
        assert done.returncode == 2, (url, args, err[-1500:])
        last = err.strip().splitlines()[-1]
        assert last.startswith("supersede: ") and says in last and "SUPERSEDE_REDIS_URL" in last
        assert "Traceback" not in err and "not-the-password" not in err
        if args == ["status"]:  # a command's error is that one line (a service logs it too)
            assert err.strip().splitlines() == [last], err


def test_a_failed_tls_handshake_is_one_line_naming_the_setting(redis_tls: TlsServer) -> None:
    """The server requires a client certificate and this URL has none."""
    url = f"rediss://127.0.0.1:{redis_tls.port}/0?ssl_ca_certs={redis_tls.certs.ca}"
    for args in (["admission", "--metrics-port", "0"], ["status"]):
        done = subprocess.run([sys.executable, "-m", "supersede", *args], env=_env(url),
                              capture_output=True, timeout=60)  # fmt: skip
        err = done.stderr.decode()
        assert done.returncode == 2, err[-1500:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("supersede: cannot reach Redis at rediss://") and "TLS" in last
        assert "Traceback" not in err
        assert "it may require a client certificate (ssl_certfile and ssl_keyfile)" in last


def test_a_tls_option_that_fails_is_named(redis_tls: TlsServer) -> None:
    """A TLS failure printed the ssl library's words only ("PEM lib", "No such file or
    directory", "certificate verify failed") and a generic hint: the line now names the
    option to fix."""
    certs, base = redis_tls.certs, f"rediss://127.0.0.1:{redis_tls.port}/0?"
    cases = [
        (f"ssl_ca_certs=/nonexistent/ca.crt&ssl_certfile={certs.client_cert}",
         "its ssl_ca_certs /nonexistent/ca.crt does not exist or cannot be read"),
        (f"ssl_ca_certs={certs.ca}&ssl_certfile={certs.client_cert}",
         "ssl_certfile and ssl_keyfile must be a client certificate and its key"),
        (f"ssl_ca_certs={certs.client_cert}&ssl_certfile={certs.client_cert}"
         f"&ssl_keyfile={certs.client_key}",
         "the server's certificate was not verified: not signed by the CA of ssl_ca_certs"),
    ]  # fmt: skip
    for query, says in cases:
        done = subprocess.run([sys.executable, "-m", "supersede", "status"],
                              env=_env(base + query), capture_output=True, timeout=60)  # fmt: skip
        err = done.stderr.decode()
        assert done.returncode == 2 and err.count("\n") == 1, err[-1500:]
        assert says in err and "Traceback" not in err, err


def test_a_failed_tls_handshake_with_a_cluster_names_the_certificate_or_the_scheme(
    redis_tls_cluster: TlsCluster, tmp_path: Path
) -> None:
    """No client certificate, one of a CA the nodes do not trust, and a plain
    `redis+cluster://` to their TLS port all said the same on a cluster: "no Redis Cluster at
    ... (Connection closed by server.); ... (redis+cluster:// only for a cluster)" (a cluster
    probe). Each names what to fix."""
    certs, port = redis_tls_cluster.certs, redis_tls_cluster.tls_ports[0]
    foreign = make_certs(tmp_path)
    base = f"rediss+cluster://127.0.0.1:{port}/0?ssl_ca_certs={certs.ca}"
    cases = [
        (base, "it may require a client certificate (ssl_certfile and ssl_keyfile)"),
        (f"{base}&ssl_certfile={foreign.client_cert}&ssl_keyfile={foreign.client_key}",
         "it may refuse the client certificate of ssl_certfile"),
        (f"redis+cluster://127.0.0.1:{port}/0", "may take TLS only: rediss+cluster://"),
    ]  # fmt: skip

    def run(url: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "supersede", "status"], env=_env(url),
                              capture_output=True, timeout=60)  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, [url for url, _ in cases]))
    for (url, says), done in zip(cases, results, strict=True):
        err = done.stderr.decode()
        assert done.returncode == 2 and err.count("\n") == 1, err[-1500:]
        assert says in err and "Traceback" not in err, (url, err)


def test_cluster_urls_keep_their_scheme_for_the_seed_node() -> None:
    assert cluster_seed("redis+cluster://h:7000") == "redis://h:7000"
    assert cluster_seed("rediss+cluster://:pw@h:7000/0?ssl_ca_certs=/ca.crt") == (
        "rediss://:pw@h:7000/0?ssl_ca_certs=/ca.crt"
    )


def test_dev_s_redis_cli_line_reaches_a_tls_server(redis_tls: TlsServer) -> None:
    """The publishing line `supersede dev` prints works as printed against a server that needs
    TLS options (redis-cli reads none of a URL's query: they become its flags)."""
    dev = subprocess.run(
        [sys.executable, "-m", "supersede", "dev", "--duration", "1", "--no-demo-events"],
        env=_env(redis_tls.url), capture_output=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert dev.returncode == 0, dev.stderr.decode()[-2000:]
    [line] = [x for x in dev.stdout.decode().splitlines() if "with any Redis client:" in x]
    command = line.split("with any Redis client:", 1)[1].strip()
    assert "--cacert" in command and "--cert" in command and "--key" in command
    done = subprocess.run(["bash", "-c", command], env=_env(redis_tls.url),
                          capture_output=True, timeout=30)  # fmt: skip
    assert done.returncode == 0 and b"-" in done.stdout, done.stderr.decode() + line
    inbox = redis_sync.Redis.from_url(redis_tls.url).xrange("secrets:events", count=10)
    assert any(fields.get(b"name") for _, fields in inbox)


def test_a_service_refused_at_a_terminal_says_it_in_one_line() -> None:
    """At a terminal a service's start-up refusal is the one plain line (its JSON log line is
    for log collectors: written when stderr is not a terminal, as above)."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    cmd = [sys.executable, "-m", "supersede", "ingress", "--metrics-port", "0"]
    main, secondary = pty.openpty()
    try:
        done = subprocess.run(cmd, env=_env(url), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=secondary, timeout=60)  # fmt: skip
        os.close(secondary)
        out = b""
        with contextlib.suppress(OSError):  # (EIO: the terminal's other end closed)
            while chunk := os.read(main, 4096):
                out += chunk
    finally:
        os.close(main)
    lines = out.decode().strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("supersede: cannot reach Redis"), lines


def test_a_service_warns_of_tls_without_the_servers_certificate_check(
    redis_tls: TlsServer,
) -> None:
    """`ssl_cert_reqs=none` was taken without a word (a security probe): anyone on the path
    reads and changes every call. A service says so in its log at start."""
    certs = redis_tls.certs
    url = (f"rediss://127.0.0.1:{redis_tls.port}/0?ssl_certfile={certs.client_cert}"
           f"&ssl_keyfile={certs.client_key}&ssl_cert_reqs=none")  # fmt: skip
    cmd = [sys.executable, "-m", "supersede", "admission", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, env=_env(url), stderr=subprocess.PIPE, preexec_fn=die_with_parent)
    try:
        lines: list[bytes] = []
        _until_line(proc, b"admission started", lines)
        warned = [x for x in lines if b"without the server certificate's check" in x]
        assert len(warned) == 1 and b"ssl_ca_certs" in warned[0], lines
    finally:
        proc.kill()
        proc.communicate(timeout=10)  # (its pipe closed)
