"""Process placement (issue 16, item 3): a service runs at the niceness and on the CPUs its
SUPERSEDE_NICE and SUPERSEDE_CPUS give it, every thread of it, holds the host's CPUs out of deep
idle states while SUPERSEDE_CPU_LATENCY_US asks it to, and a value it cannot apply is one line
naming the setting."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supersede import service
from supersede.errors import ConfigError
from supersede.server import EmbeddedServer, die_with_parent
from supersede.service import CPU_LATENCY_DEVICE, cpu_list, hold_cpu_latency, place_process
from tests.support import REPO

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")


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


def _threads(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


@contextlib.contextmanager
def _service(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`supersede <args>` once it logged that it started; killed on the way out."""
    cmd = [sys.executable, "-m", "supersede", *args, "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE,
                            preexec_fn=die_with_parent)  # fmt: skip
    try:
        assert proc.stderr
        lines = []
        for line in proc.stderr:
            lines.append(line.decode())
            if f"{args[0]} started" in lines[-1]:
                break
        else:
            raise AssertionError("".join(lines)[-2000:])
        yield proc
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def _stops_cleanly(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_a_service_runs_at_the_niceness_and_on_the_cpus_it_was_given(url: str) -> None:
    # (a workflow module that starts a thread at import: it is placed too)
    cpu = min(os.sched_getaffinity(0))
    nice = min(19, max(7, os.getpriority(os.PRIO_PROCESS, 0) + 1))
    env = _env(url, SUPERSEDE_NICE=str(nice), SUPERSEDE_CPUS=str(cpu))
    with _service(["executor", "tests.support.apps.threaded"], env) as proc:
        threads = _threads(proc.pid)
        assert len(threads) > 1
        assert {os.getpriority(os.PRIO_PROCESS, tid) for tid in threads} == {nice}
        assert all(os.sched_getaffinity(tid) == {cpu} for tid in threads)
        _stops_cleanly(proc)


def test_a_placement_that_cannot_be_applied_stops_the_service_in_one_line(url: str) -> None:
    bad = str(max(os.sched_getaffinity(0)) + 1)
    cmd = [sys.executable, "-m", "supersede", "ingress", "--metrics-port", "0"]
    for command in (cmd, [sys.executable, "-m", "supersede", "dev", "--duration", "1"]):
        done = subprocess.run(command, env=_env(url, SUPERSEDE_CPUS=bad), capture_output=True,
                              timeout=60)  # fmt: skip
        err = done.stderr.decode()
        assert done.returncode == 2, err[-2000:]
        assert err.strip().splitlines()[-1].startswith(f"supersede: SUPERSEDE_CPUS={bad}: CPUs")
        assert "Traceback" not in err


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("SUPERSEDE_NICE", "fast", "SUPERSEDE_NICE must be an integer"),
        ("SUPERSEDE_NICE", "40", "SUPERSEDE_NICE must be from -20 to 19"),
        ("SUPERSEDE_CPUS", "0-x", "SUPERSEDE_CPUS must list CPU numbers"),
        ("SUPERSEDE_CPUS", "0-99999999999", "SUPERSEDE_CPUS: '0-99999999999' is not a range"),
        ("SUPERSEDE_CPU_LATENCY_US", "low", "SUPERSEDE_CPU_LATENCY_US must be an integer"),
        ("SUPERSEDE_CPU_LATENCY_US", "-1", "SUPERSEDE_CPU_LATENCY_US must be from 0 to"),
    ],
)
def test_a_bad_placement_value_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, setting: str, value: str, says: str
) -> None:
    monkeypatch.setenv(setting, value)
    with pytest.raises(ConfigError, match=f"^{re.escape(says)}"):
        place_process(apply=False)


def test_a_niceness_below_the_current_one_without_the_right_names_what_allows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_: int) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "setpriority", refuse)
    monkeypatch.setenv("SUPERSEDE_NICE", "-5")
    with pytest.raises(ConfigError, match=r"SUPERSEDE_NICE=-5: .*CAP_SYS_NICE.*RLIMIT_NICE"):
        place_process()


def test_cpu_lists_print_as_ranges() -> None:
    assert cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


HELD_US = 1_999_999_000  # (a value no other holder is likely to ask for, and harmless)


def _host_cpu_latency() -> int:
    """The host's constraint now: the lowest value any process holds."""
    with open(CPU_LATENCY_DEVICE, "rb") as device:
        (value,) = struct.unpack("=i", device.read(4))
    return int(value)


def _device_writable() -> bool:
    """Opening it is the test (as root, a container's device rules can still refuse)."""
    try:
        os.close(os.open(CPU_LATENCY_DEVICE, os.O_WRONLY))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _device_writable(), reason=f"{CPU_LATENCY_DEVICE} cannot be written")
def test_a_service_holds_the_cpus_out_of_deep_idle_while_it_runs(url: str) -> None:
    if _host_cpu_latency() <= HELD_US:
        pytest.skip("another process holds a lower CPU latency on this host")
    with _service(["ingress"], _env(url, SUPERSEDE_CPU_LATENCY_US=str(HELD_US))) as proc:
        fds = [os.readlink(f"/proc/{proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{proc.pid}/fd")]
        assert fds.count(CPU_LATENCY_DEVICE) == 1
        assert _host_cpu_latency() == HELD_US  # the kernel took the value as written
        _stops_cleanly(proc)
        assert _host_cpu_latency() > HELD_US  # released with the process


def test_the_cpu_latency_is_written_as_the_device_reads_it_and_held(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"")
    monkeypatch.setattr(service, "CPU_LATENCY_DEVICE", str(device))
    monkeypatch.setattr(service, "_cpu_latency_requests", [])
    hold_cpu_latency("25")
    try:
        assert struct.unpack("=i", device.read_bytes()) == (25,)
        (fd,) = service._cpu_latency_requests
        assert os.readlink(f"/proc/self/fd/{fd}") == str(device)  # open: the request holds
    finally:
        for fd in service._cpu_latency_requests:
            os.close(fd)


def test_a_cpu_latency_the_host_cannot_hold_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(service, "CPU_LATENCY_DEVICE", str(tmp_path / "missing"))
    monkeypatch.setenv("SUPERSEDE_CPU_LATENCY_US", "0")
    for apply in (True, False):  # (False: `dev`, before it starts services that would fail)
        with pytest.raises(ConfigError, match=r"^SUPERSEDE_CPU_LATENCY_US=0: there is no "):
            place_process(apply=apply)

    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"")
    monkeypatch.setattr(service, "CPU_LATENCY_DEVICE", str(device))
    refusals = [
        (PermissionError(13, "Permission denied"), "not writable .*root"),
        (OSError(30, "Read-only file system"), "Read-only file system"),
    ]
    for error, says in refusals:

        def refuse(*_: object, error: OSError = error) -> int:
            raise error

        monkeypatch.setattr(os, "open", refuse)
        with pytest.raises(ConfigError, match=f"^SUPERSEDE_CPU_LATENCY_US=0: .*{says}"):
            place_process()
        with pytest.raises(ConfigError, match=f"^SUPERSEDE_CPU_LATENCY_US=0: .*{says}"):
            place_process(apply=False)  # (`dev` tries it too, before it starts its services)
