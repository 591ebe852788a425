"""Process placement (issue 16, item 3): a service runs at the niceness and on the CPUs its
SUPERSEDE_NICE and SUPERSEDE_CPUS give it, and a value it cannot apply is one line naming the
setting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supersede.server import EmbeddedServer, die_with_parent


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = EmbeddedServer().start()
    try:
        yield server.url
    finally:
        server.stop()


def _env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    return {**env, "SUPERSEDE_REDIS_URL": url, "SUPERSEDE_NAMESPACE": "placed", **extra}


def _niceness(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # (field 19 of the whole line)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_a_service_runs_at_the_niceness_and_on_the_cpus_it_was_given(url: str) -> None:
    cpu = min(os.sched_getaffinity(0))
    env = _env(url, SUPERSEDE_NICE="7", SUPERSEDE_CPUS=str(cpu))
    cmd = [sys.executable, "-m", "supersede", "admission", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
    try:
        assert proc.stderr
        lines = []
        for line in proc.stderr:
            lines.append(line.decode())
            if "admission started" in lines[-1]:
                break
        else:
            raise AssertionError("".join(lines)[-2000:])
        assert _niceness(proc.pid) == 7
        assert os.sched_getaffinity(proc.pid) == {cpu}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("SUPERSEDE_NICE", "fast", "SUPERSEDE_NICE must be an integer"),
        ("SUPERSEDE_NICE", "40", "SUPERSEDE_NICE must be from -20 to 19"),
        ("SUPERSEDE_CPUS", "0-x", "SUPERSEDE_CPUS must list CPU numbers"),
        ("SUPERSEDE_CPUS", "4096", "SUPERSEDE_CPUS=4096: CPUs 4096 are not available"),
    ],
)
def test_a_placement_that_cannot_be_applied_is_one_line_naming_the_setting(
    url: str, setting: str, value: str, says: str
) -> None:
    cmd = [sys.executable, "-m", "supersede", "ingress", "--metrics-port", "0"]
    done = subprocess.run(cmd, env=_env(url, **{setting: value}), capture_output=True, timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"supersede: {says}")
    assert "Traceback" not in err
