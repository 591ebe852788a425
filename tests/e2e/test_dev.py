"""`supersede dev`: the one-command demo on an embedded server, ending cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis


def _descendants(pid: int) -> set[int]:
    """Processes below `pid` now (from /proc: only what this test started, nothing else)."""
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent_of.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_dev_runs_the_demo_on_an_embedded_server_and_exits_0() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "supersede", "dev", "--duration", "5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    for raw in proc.stdout:
        lines.append(raw.decode())
        if "services up" in lines[-1]:
            break
    children = _descendants(proc.pid)
    assert len(children) >= 5  # the server, admission, two executors, ingress
    # the embedded server wants this run's password: printed once, in the redis-cli line
    line = proc.stdout.readline().decode()
    lines.append(line)
    url = re.search(r"redis-cli -u (\S+) XADD", line)
    assert url and ":***@" not in url.group(1), line
    password = url.group(1).split("@")[0].rsplit(":", 1)[1]
    port = int(url.group(1).rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    assert redis.Redis.from_url(url.group(1)).ping()
    rest, err = proc.communicate(timeout=90)
    out = "".join(lines) + rest.decode()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "supersede dev: Redis at redis://:***@127.0.0.1:" in out
    assert out.count(password) == 1 and password not in err.decode()
    assert "succeeded" in out and "superseded by" in out  # CANCEL_IN_PROGRESS at work
    assert "summary (runs by workflow and final state):" in out
    assert [pid for pid in children if _alive(pid)] == []


def test_ctrl_c_stops_the_services_before_the_embedded_server() -> None:
    """A terminal's Ctrl-C signals the whole foreground process group: the console must still
    stop the services (drained, no connection errors) before it stops the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "supersede", "dev"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    for raw in proc.stdout:
        lines.append(raw.decode())
        if "superseded by" in lines[-1]:  # the demo is under way: runs are in flight
            break
    logfile = next(line for line in lines if "services up" in line).split("logs: ")[1].rstrip(")\n")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "summary (runs by workflow and final state):" in rest.decode()
    log = Path(logfile).read_text()
    Path(logfile).unlink()
    assert "Connection closed" not in log and "Traceback" not in log, log[-3000:]
