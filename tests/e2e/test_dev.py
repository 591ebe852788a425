"""`supersede dev`: the one-command demo on an embedded server, ending cleanly."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from supersede.keys import Keys


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
    # Its dashboard port is in use (a second console, another program): it takes another
    # and says so, naming the flag.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "supersede", "dev", "--duration", "5", "--ui-port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out = _the_demo_runs(proc)
        assert f"(port {port} is in use: the dashboard takes " in out and "--ui-port" in out
    finally:  # (a failed check leaves no console running into the next test)
        taken.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _the_demo_runs(proc: subprocess.Popen[bytes]) -> str:
    """Its output, once it ended."""
    assert proc.stdout is not None
    lines = []
    for raw in proc.stdout:
        lines.append(raw.decode())
        if "services up" in lines[-1]:
            break
    children = _descendants(proc.pid)
    assert len(children) >= 5  # the server, admission, two executors, ingress (and the UI)
    # the embedded server wants this run's password: printed once, in the export line
    while "export SUPERSEDE_REDIS_URL=" not in lines[-1]:
        lines.append(proc.stdout.readline().decode())
    url = re.search(r"export SUPERSEDE_REDIS_URL=(\S+)", lines[-1])
    assert url and ":***@" not in url.group(1), lines[-1]
    password = url.group(1).split("@")[0].rsplit(":", 1)[1]
    port = int(url.group(1).rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    assert redis.Redis.from_url(url.group(1)).ping()
    # the line that publishes with redis-cli works as printed (it read the URL's empty user
    # name as a user named "": WRONGPASS, nothing published, exit 0)
    while "with any Redis client:" not in lines[-1]:
        lines.append(proc.stdout.readline().decode())
    command = lines[-1].split("with any Redis client:", 1)[1].strip()
    env = {**os.environ, "SUPERSEDE_REDIS_URL": url.group(1)}
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, timeout=30)
    entry = done.stdout.decode().strip()
    assert re.fullmatch(r"\d+-\d+", entry), (command, done.stdout, done.stderr)
    assert redis.Redis.from_url(url.group(1)).xrange("supersede:events", entry, entry)
    # the dashboard beside the services (read-only), showing the demo's workflows
    while "dashboard (read-only):" not in lines[-1]:
        lines.append(proc.stdout.readline().decode())
        assert lines[-1], "".join(lines)  # (the output ended without it)
    board = re.search(r"dashboard \(read-only\):  (\S+)", lines[-1])
    assert board is not None
    with urllib.request.urlopen(board.group(1), timeout=10) as page:
        assert "demo-chat-reply" in page.read().decode()
    # (communicate() would skip what the line reads above buffered)
    rest, err = proc.stdout.read(), proc.stderr.read() if proc.stderr else b""
    proc.wait(90)
    proc.stdout.close()
    if proc.stderr:
        proc.stderr.close()
    out = "".join(lines) + rest.decode()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "supersede dev: Redis at redis://default:***@127.0.0.1:" in out
    assert out.count(password) == 1 and password not in err.decode()
    assert "succeeded" in out and "superseded by" in out  # CANCEL_IN_PROGRESS at work
    # the rules it demonstrates, one sentence each, and how to publish without redis-cli
    assert "demo-chat-reply: runs on chat.message; key = input.userId; at most 1 at once" in out
    # (the autosave's rule says both its windows: the quiet time and the longest wait)
    assert "no newer event for 300 ms, but no longer than 2000 ms after the first" in out
    assert 'publish:  supersede publish chat.message \'{"userId":"u1"}\'' in out
    assert "outcomes per key:" in out and "not ended" in out
    assert [pid for pid in children if _alive(pid)] == []
    return out


def _transitions(out: str) -> list[tuple[float, str]]:
    return [
        (float(m.group(1)), m.group(2)) for m in re.finditer(r"^ +(\d+\.\d+)s  (.*)$", out, re.M)
    ]


def test_dev_console_prints_transitions_in_time_order_and_how_each_run_was_cancelled() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    done = subprocess.run([sys.executable, "-m", "supersede", "dev", "--duration", "6"], env=env,
                          capture_output=True, timeout=120)  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lines = _transitions(out)
    assert lines and [t for t, _ in lines] == sorted(t for t, _ in lines)
    # every superseding run's start comes after the cancel of the run it replaced
    started = {text.split()[2]: i for i, (_, text) in enumerate(lines) if text.endswith("started")}
    for i, (_, text) in enumerate(lines):
        m = re.search(r"cancelled while (queued|running): superseded by (\S+)", text)
        if m and m.group(2) in started and m.group(1) == "running":
            assert started[m.group(2)] > i, out
    assert "cancelled while queued: superseded by" in out or "cancelled while running" in out
    assert re.search(
        r"cancelled while running: superseded by \S+ \((its run ended \d+ ms later|"
        r"stopping its handler)\)",
        out,
    )
    table = out.split("outcomes per key:")[1].splitlines()
    assert table[1].split()[:2] == ["workflow", "key"]
    assert any(row.split()[:2] == ["demo-chat-reply", "ada"] for row in table[2:])
    # the debounced autosave: one run per burst of edits saved, the others superseded waiting
    assert "demo-autosave: runs on doc.edited" in out and "debounced" in out
    assert any(row.split()[:2] == ["demo-autosave", "readme"] for row in table[2:])
    # the final states only: nothing is listed as `started`
    assert "started" not in out.split("outcomes per key:")[1]


def test_ctrl_c_stops_the_services_before_the_embedded_server(tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals the whole foreground process group: the console must still
    stop the services (drained, no connection errors) before it stops the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    env["TMPDIR"] = str(tmp_path)  # (its folders alone there: not another test's console's)
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
    children = _descendants(proc.pid)
    mine = set(tmp_path.glob("supersede-dev-*"))
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "outcomes per key:" in rest.decode()
    # no error line anywhere, no process left, and the log folder is gone
    assert err.decode().strip() == "", err.decode()[-3000:]
    assert "Traceback" not in rest.decode() and "Error" not in rest.decode()
    assert [pid for pid in children if _alive(pid)] == []
    assert mine and not any(p.exists() for p in mine)  # its log folder, not another run's


def test_a_console_whose_reader_goes_away_stops_everything_quietly(tmp_path: Path) -> None:
    """`supersede dev | head`: the reader gone, the console stops the services and the server
    and exits as a command killed by SIGPIPE would (141), without a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    env["TMPDIR"] = str(tmp_path)  # (its folders alone there: not another test's console's)
    proc = subprocess.Popen(
        [sys.executable, "-m", "supersede", "dev", "--ui-port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    for raw in proc.stdout:
        if b"superseded by" in raw:  # the demo is under way: the console keeps printing
            break
    children = _descendants(proc.pid)
    mine = set(tmp_path.glob("supersede-dev-*"))
    proc.stdout.close()
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 141, err[-3000:]
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    assert children and [pid for pid in children if _alive(pid)] == []
    assert mine and not any(p.exists() for p in mine)


def test_keep_logs_keeps_each_services_log_without_connection_errors() -> None:
    """Ctrl-C with --keep-logs: the services were stopped before the server, so their logs
    hold no connection error or traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "supersede", "dev", "--keep-logs"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for raw in proc.stdout:
        if b"superseded by" in raw:
            break
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    folder = Path(re.findall(r"logs kept in (\S+)", rest.decode())[0])
    logs = {p.name: p.read_text() for p in folder.glob("*.log")}
    shutil.rmtree(folder)
    assert {"admission.log", "ingress.log", "executor-1-1.log", "executor-1-2.log"} <= set(logs)
    for name, text in logs.items():
        assert "Connection closed" not in text and "Traceback" not in text, (name, text[-3000:])


def test_dev_runs_several_modules_of_your_own_instead_of_the_demo(tmp_path: Path) -> None:
    for name, event in (("flows_a", "a.happened"), ("flows_b", "b.happened")):
        (tmp_path / f"{name}.py").write_text(
            "from supersede import Context, Workflow\n\n"
            f"wf = Workflow({name!r}, on_events=[{event!r}])\n\n\n"
            "@wf.step()\nasync def one(ctx: Context) -> int:\n    return 1\n"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    args = ["dev", "--module", "flows_a.py", "--module", "flows_b", "--duration", "3"]
    done = subprocess.run([sys.executable, "-m", "supersede", *args], cwd=tmp_path, env=env,
                          capture_output=True, timeout=120)  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert "flows_a: runs on a.happened; no limit" in out
    assert "flows_b: runs on b.happened; no limit" in out
    assert "demo-chat-reply" not in out  # no demo executors, no demo events
    # (the hint knows the key's field, not what the handlers read: it says so)
    assert (
        "publish:  supersede publish a.happened '{}'   (with the fields your handlers read)" in out
    )


@pytest.mark.parametrize("spec", ["flows_typo", "flows_typo.py", "sub/flows.py"])
def test_dev_names_a_module_that_is_not_there_before_it_starts_a_server(
    tmp_path: Path, spec: str
) -> None:
    """A misspelt --module was said only once the embedded server had started (a new-user
    probe): now at once, in one line, exit 2, no server started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    done = subprocess.run([sys.executable, "-m", "supersede", "dev", "--module", spec],
                          cwd=tmp_path, env=env, capture_output=True, timeout=60)  # fmt: skip
    [line] = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2 and spec.removesuffix(".py").split("/")[-1] in line, line
    assert "Redis at" not in done.stdout.decode()  # (no server was started)


def test_dev_serves_a_module_that_reads_the_server_url_at_import(tmp_path: Path) -> None:
    """The README's fencing block reads SUPERSEDE_REDIS_URL when it is imported: `dev` on its
    embedded server imported the module before the server existed (KeyError, exit 2, the
    error placed in `<frozen os>`). A module that fails at import is named at its own line."""
    from tests.e2e.test_first_hour import readme_block

    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    (tmp_path / "fenced.py").write_text(readme_block("fencing"))
    done = subprocess.run(
        [sys.executable, "-m", "supersede", "dev", "--module", str(tmp_path / "fenced.py"),
         "--duration", "1", "--no-demo-events", "--ui-port", "0"],
        env=env, capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    (tmp_path / "broken.py").write_text('import os\n\nTOKEN = os.environ["NO_SUCH_SETTING"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "supersede", "dev", "--module", str(tmp_path / "broken.py"),
         "--duration", "1", "--ui-port", "0"],
        env=env, capture_output=True, timeout=120,
    )  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and f"{tmp_path / 'broken.py'}:3: " in err, err
    assert "NO_SUCH_SETTING" in err and "Traceback" not in err


async def test_dev_on_a_server_of_yours_keeps_out_of_a_namespace_with_other_workflows(
    redis_url: str, keys: Keys
) -> None:
    """With SUPERSEDE_REDIS_URL set, dev registered its demo workflows, and published demo
    events, in a namespace a deployment served (the default one), and left them there. It
    refuses a namespace holding workflows it does not define, naming the setting; its own
    (an earlier dev run's) are fine."""
    from supersede.config import connect
    from supersede.registry import register

    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    env.update(SUPERSEDE_REDIS_URL=redis_url, SUPERSEDE_NAMESPACE=keys.namespace,
               SUPERSEDE_SHARDS=str(keys.shards))  # fmt: skip
    client = connect(redis_url)
    try:
        await register(client, keys, {"id": "theirs", "events": ["their.event"]})
        cmd = [sys.executable, "-m", "supersede", "dev", "--duration", "1", "--ui-port", "0"]
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
        err = done.stderr.decode()
        assert done.returncode == 2 and "Traceback" not in err, err[-2000:]
        assert "holds workflows dev does not define (theirs)" in err
        assert "SUPERSEDE_NAMESPACE" in err.strip().splitlines()[-1]
        assert await client.hkeys(keys.workflows_hash) == [b"theirs"]  # (nothing registered)
    finally:
        await client.aclose()


async def test_dev_exits_1_naming_why_when_its_services_refuse_to_start(
    redis_url: str, keys: Keys, tmp_path: Path
) -> None:
    """A namespace created with another shard count: every service refused to start, yet dev
    said "services up" (its workflows were in the registry from an earlier run), went on
    reading nothing, and exited 0 (a newcomer's probe). It waits for each service's /readyz
    now, and says why one exited."""
    from supersede.config import connect

    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    env.update(SUPERSEDE_REDIS_URL=redis_url, SUPERSEDE_NAMESPACE=keys.namespace,
               SUPERSEDE_SHARDS=str(keys.shards * 2), TMPDIR=str(tmp_path))  # fmt: skip
    # (TMPDIR: the logs it keeps go where the test's files go)
    client = connect(redis_url)
    try:
        await client.hset(keys.config_hash, "shards", keys.shards)  # (an earlier run's count)
        cmd = [sys.executable, "-m", "supersede", "dev", "--duration", "30", "--ui-port", "0",
               "--no-demo-events"]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    finally:
        await client.delete(keys.config_hash)
        await client.aclose()
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 1 and "services up" not in out, (out, err)
    assert "services failed to start (" in err and "Traceback" not in err, err
    assert f"was created with {keys.shards} shards" in err and "SUPERSEDE_SHARDS" in err
    assert f"logs kept in {tmp_path}" in out


def test_dev_stops_and_exits_1_when_a_service_dies(tmp_path: Path) -> None:
    """A service of dev SIGKILLed (or exiting on its own): dev went on without it (no ingress:
    no event read) and exited 0 at Ctrl-C. It stops the others and says which one died."""
    code, _, text = _killed_under_a_console(tmp_path, b"ingress", "--no-demo-events")
    assert code == 1, text
    assert "a service stopped (ingress exited with -9" in text and "Traceback" not in text, text


def _killed_under_a_console(tmp_path: Path, name: bytes, *args: str) -> tuple[int, str, str]:
    """Start `supersede dev` (its folders in `tmp_path`), SIGKILL the one process below it
    whose command line holds `name` once the console is up; its exit code, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    env["TMPDIR"] = str(tmp_path)  # (the logs it keeps go where the test's files go)
    cmd = [sys.executable, "-m", "supersede", "dev", "--ui-port", "0", "--duration", "120",
           *args]  # fmt: skip
    with _console(cmd, env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"Ctrl-C stops" in line:
                break
        [victim] = [p for p in _descendants(proc.pid)
                    if name in Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    return proc.returncode, out.decode(), err.decode()


@contextlib.contextmanager
def _console(
    cmd: list[str], env: dict[str, str], **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """A console process, killed on the way out if it still runs (a failed check)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **popen)  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_dev_interrupted_while_a_module_imports_removes_the_server_and_its_folder(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """A signal while dev imports a slow module: Ctrl-C blamed the module ("raised
    KeyboardInterrupt() while importing", exit 2); SIGTERM and SIGHUP (the terminal closed)
    ended dev at once, leaving the embedded server's folder behind, its password file in it
    (a newcomer's probe). Each is one line now, exit 128 + the signal, nothing left."""
    module = tmp_path / "slow.py"
    module.write_text(
        "import time\n"
        "time.sleep(60)  # (a heavy import)\n"
        "from supersede import Workflow\n"
        "wf = Workflow('slow', on_events=['slow.go'])\n"
    )
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    env["TMPDIR"] = str(temp)
    cmd = [sys.executable, "-m", "supersede", "dev", "--module", str(module), "--ui-port", "0"]
    with _console(cmd, env) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # (said once the server answers, before the import)
        assert b"supersede dev: Redis at" in line, line
        assert [p.name for p in temp.iterdir() if p.name.startswith("supersede-redis-")]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    text = err.decode()
    assert proc.returncode == 128 + sig, (proc.returncode, text)
    assert text.strip().splitlines() == ["supersede dev: interrupted"], text
    assert list(temp.iterdir()) == []


def test_dev_on_a_server_of_yours_shows_only_the_runs_of_this_console(
    redis_url: str, keys: Keys
) -> None:
    """A second console on the same server and namespace printed the runs of the first, their
    times negative (-121.45s), and counted them in its outcomes (a newcomer's probe; then,
    with a margin of 5 s for clocks that differ, those of a console that had just ended: a
    second probe). The console counts from the server's clock, which the runs' times are."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    env.update(SUPERSEDE_REDIS_URL=redis_url, SUPERSEDE_NAMESPACE=keys.namespace,
               SUPERSEDE_SHARDS=str(keys.shards))  # fmt: skip
    cmd = [sys.executable, "-m", "supersede", "dev", "--ui-port", "0", "--duration"]
    first = subprocess.run([*cmd, "3"], env=env, capture_output=True, timeout=120)
    assert first.returncode == 0 and "started" in first.stdout.decode(), first.stderr
    second = subprocess.run([*cmd, "1", "--no-demo-events"], env=env, capture_output=True,
                            timeout=120)  # fmt: skip
    out = second.stdout.decode()
    assert second.returncode == 0, second.stderr
    assert "(no runs)" in out and not re.search(r"^\s*-\d", out, re.M), out


def test_dev_started_with_sighup_ignored_leaves_it_ignored() -> None:
    """`nohup supersede dev &`: the console caught SIGHUP to stop as on Ctrl-C, so closing the
    terminal stopped what nohup was asked to keep running (a review)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    cmd = [sys.executable, "-m", "supersede", "dev", "--no-demo-events", "--ui-port", "0",
           "--duration", "120"]  # fmt: skip

    def nohup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    with _console(cmd, env, preexec_fn=nohup) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"Ctrl-C stops" in line:
                break
        status = Path(f"/proc/{proc.pid}/status").read_text()
        masks = {k: int(v, 16) for k, v in (x.split(":\t") for x in status.splitlines()
                                            if x.startswith(("SigIgn", "SigCgt")))}  # fmt: skip
        bit = 1 << (signal.SIGHUP - 1)
        assert masks["SigIgn"] & bit and not masks["SigCgt"] & bit, masks
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_dev_whose_server_dies_says_so_in_one_line(tmp_path: Path) -> None:
    """The embedded server killed under a running console: a 67-line traceback of the
    console's next read, exit 1, its logs removed (a newcomer's probe). One line now."""
    code, out, text = _killed_under_a_console(tmp_path, b"redis-server")
    assert code == 1 and "Traceback" not in text, text
    assert "supersede dev: Redis at redis://" in text and "failed (" in text, text
    assert "logs kept in" in out


def test_dev_stopped_while_its_services_start_exits_128_plus_the_signal(tmp_path: Path) -> None:
    """SIGTERM while the services start (an executor importing a slow module): exit 130, as
    for Ctrl-C, whichever signal came (a newcomer's probe). 128 + the signal now."""
    module = tmp_path / "slow_there.py"
    module.write_text(
        "import sys, time\n"
        "if 'executor' in sys.argv:  # (slow in the executors only, not in the console)\n"
        "    time.sleep(60)\n"
        "from supersede import Workflow\n"
        "wf = Workflow('slow', on_events=['slow.go'])\n"
        "@wf.step()\n"
        "def s(ctx):\n"
        "    return None\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    env["TMPDIR"] = str(tmp_path)
    cmd = [sys.executable, "-m", "supersede", "dev", "--module", str(module), "--ui-port", "0"]
    with _console(cmd, env) as proc:

        def executor_started() -> bool:
            return any(b"executor" in Path(f"/proc/{p}/cmdline").read_bytes()
                       for p in _descendants(proc.pid))  # fmt: skip

        deadline = time.monotonic() + 60
        while not executor_started() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.decode().strip().splitlines() == ["supersede dev: interrupted"], err


def test_dev_says_what_it_waits_for_when_its_services_take_a_while_to_stop(
    tmp_path: Path,
) -> None:
    """Ctrl-C with a sync step that never returns: dev waited for its executor's drain and
    exit, ~8 s, without a line (a probe). Past a second it says what it waits for."""
    marker = tmp_path / "started"
    (tmp_path / "stuck.py").write_text(
        "import pathlib, time\n\nfrom supersede import Context, Workflow\n\n"
        "wf = Workflow('stuck', on_events=['stuck.go'])\n\n\n"
        "@wf.step()\ndef never_returns(ctx: Context) -> None:\n"
        f"    pathlib.Path({str(marker)!r}).touch()\n    time.sleep(60)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    cmd = [sys.executable, "-m", "supersede", "dev", "--module", "stuck.py", "--no-demo-events",
           "--ui-port", "0"]  # fmt: skip
    with _console(cmd, env, cwd=tmp_path) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        line = ""
        while "export SUPERSEDE_REDIS_URL=" not in line:
            line = proc.stdout.readline().decode()
            assert line, "the console ended before it said its server's URL"
        url = re.search(r"export SUPERSEDE_REDIS_URL=(\S+)", line)
        assert url is not None
        client = redis.Redis.from_url(url.group(1))
        client.xadd("supersede:events", {"name": "stuck.go", "data": "{}"})
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline, "the stuck step never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "supersede dev: stopping: the executors drain their runs" in err.decode()
