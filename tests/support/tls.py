"""A throwaway certificate authority and a TLS-only redis-server that requires client
certificates, for the tests (issue 14, item 1)."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from supersede.server import (
    EmbeddedServer,
    ServerStartError,
    die_with_parent,
    find_cli_binary,
    find_server_binary,
    free_cluster_port,
    free_port,
    port_taken,
)


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def query(self) -> str:
        """The URL query that makes redis-py verify the server and present the client cert."""
        return (f"ssl_ca_certs={self.ca}&ssl_certfile={self.client_cert}"
                f"&ssl_keyfile={self.client_key}&ssl_cert_reqs=required")  # fmt: skip


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_certs(folder: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, signed by the CA."""
    ca_key, ca = folder / "ca.key", folder / "ca.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
             "-days", "2", "-subj", "/CN=supersede test CA")  # fmt: skip
    made = {}
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        key, csr, crt = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
        extfile = folder / f"{name}.ext"
        extfile.write_text(ext + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                 "-subj", f"/CN={name}")  # fmt: skip
        _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                 "-out", crt, "-days", "2", "-extfile", extfile)  # fmt: skip
        made[name] = (crt, key)
    return Certs(ca, *made["server"], *made["client"])


class TlsServer:
    """redis-server with only a TLS port, client certificates required."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="supersede-tls-"))
        self.certs = make_certs(self.dir)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?{self.certs.query()}"

    def start(self, timeout: float = 15.0) -> TlsServer:
        c = self.certs
        args = [find_server_binary(), "--port", "0", "--tls-port", str(self.port),
                "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "no", "--tls-cert-file", str(c.server_cert),
                "--tls-key-file", str(c.server_key), "--tls-ca-cert-file", str(c.ca),
                "--tls-auth-clients", "yes", "--logfile", str(self.dir / "server.log")]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=die_with_parent)  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"TLS redis-server exited; see {self.dir / 'server.log'}")
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, ssl.SSLError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)  # (its certificates and keys too)


class TlsCluster:
    """A 3-master cluster whose clients and cluster bus use TLS, client certificates required.
    Each node also has a plaintext port, used only to create the cluster; a TLS client is
    given the TLS ports (CLUSTER SLOTS answers with the port of the connection's kind)."""

    def __init__(self, masters: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="supersede-tls-cluster-"))
        self.certs = make_certs(self.dir)
        self.nodes = [
            EmbeddedServer(port=free_cluster_port(), ports=free_cluster_port)
            for _ in range(masters)
        ]
        # with tls-cluster the bus port is the TLS port + 10000
        self.tls_ports = [free_cluster_port() for _ in range(masters)]

    @property
    def url(self) -> str:
        return f"rediss+cluster://127.0.0.1:{self.tls_ports[0]}/0?{self.certs.query()}"

    def start(self, timeout: float = 30.0) -> TlsCluster:
        c = self.certs
        for i, node in enumerate(self.nodes):
            for attempt in range(3):  # (a port another test session took first: another)
                node.extra_args = [
                    "--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                    "--cluster-config-file", str(Path(node.dir) / "nodes.conf"),
                    "--tls-port", str(self.tls_ports[i]), "--tls-cluster", "yes",
                    "--tls-cert-file", str(c.server_cert), "--tls-key-file", str(c.server_key),
                    "--tls-ca-cert-file", str(c.ca), "--tls-auth-clients", "yes",
                ]  # fmt: skip
                try:
                    node.start()
                    break
                except ServerStartError as exc:
                    if attempt == 2 or not port_taken(exc):
                        raise RuntimeError(f"{exc}; its log ends with:\n{exc.log}") from None
                    os.makedirs(node.dir, exist_ok=True)  # (a failed start removed it)
                    self.tls_ports[i] = free_cluster_port()
        cli = find_cli_binary(self.nodes[0].binary)
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        create = [cli, "--cluster", "create", *addrs, "--cluster-yes"]
        subprocess.run(create, check=True, capture_output=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            client = redis.Redis(port=node.port)
            try:
                while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    if time.monotonic() > deadline:
                        raise TimeoutError("TLS cluster did not reach state ok")
                    time.sleep(0.05)
            finally:
                client.close()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)  # (its certificates and keys)
