"""The first hour of a new user (issue 15): the README's first workflow runs exactly as written,
step outputs are stored and reachable from the CLI and from Python, `publish` says which runs it
makes (or that none will), and the CLI reads well in a terminal."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from supersede.client import get_run, publish_runs, wait_for_run
from supersede.keys import Keys
from tests.support import REPO, System, eventually

BIN = str(Path(sys.executable).parent)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra}


def readme_block(marker: str) -> str:
    """The fenced block right after `<!-- test: marker -->` in the README."""
    text = (REPO / "README.md").read_text()
    found = re.search(rf"<!-- test: {re.escape(marker)} -->\n```\w*\n(.*?)```", text, re.S)
    assert found, marker
    return found.group(1)


def test_the_readme_first_workflow_runs_exactly_as_written(tmp_path: Path) -> None:
    (tmp_path / "my_workflows.py").write_text(readme_block("my_workflows.py"))
    [serve] = readme_block("terminal 1").strip().splitlines()
    commands = [c for c in readme_block("terminal 2").strip().splitlines() if c.strip()]
    dev = subprocess.Popen(shlex.split(serve), cwd=tmp_path, env=_clean_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)  # fmt: skip
    try:
        assert dev.stdout is not None
        lines: list[str] = []
        for raw in dev.stdout:
            lines.append(raw.decode())
            if "export SUPERSEDE_REDIS_URL=" in lines[-1]:
                break
        url = lines[-1].split("export SUPERSEDE_REDIS_URL=")[1].strip()
        env = _clean_env(SUPERSEDE_REDIS_URL=url)
        outs = []
        for command in commands:
            done = subprocess.run(command, shell=True, cwd=tmp_path, env=env,
                                  capture_output=True, timeout=60)  # fmt: skip
            assert done.returncode == 0, (command, done.stderr.decode())
            outs.append(done.stdout.decode())
        # the second draft's run succeeded with the steps' outputs; the first was superseded
        assert "SUCCEEDED" in outs[1] and '"summary":"readme: 4 words"' in outs[1], outs[1]
        second = outs[1].splitlines()[2].split()[0]
        runs = subprocess.run(["supersede", "runs", "--workflow", "summarize-draft", "--json"],
                              env=env, capture_output=True, check=True)  # fmt: skip
        by_state = {r["state"]: r for r in orjson.loads(runs.stdout)}
        assert set(by_state) == {"SUCCEEDED", "CANCELLED"}
        assert by_state["CANCELLED"]["cancelled_by"] == by_state["SUCCEEDED"]["id"] == second
        assert by_state["CANCELLED"]["id"] in outs[0]  # publish printed the id of its run
        assert second in outs[2] and by_state["CANCELLED"]["id"] in outs[2]
        shown = subprocess.run(["supersede", "run", second], env=env, capture_output=True,
                               check=True).stdout.decode()  # fmt: skip
        assert 'summary: "readme: 4 words"' in shown and " UTC (" in shown
    finally:
        os.killpg(dev.pid, signal.SIGINT)
        rest, err = dev.communicate(timeout=60)
    assert dev.returncode == 0, err.decode()[-2000:]
    assert "superseded by" in "".join(lines) + rest.decode()


MODULE = """
import asyncio

from supersede import Concurrency, Context, Strategy, Workflow

doubler = Workflow("out-double", on_events=["out.double"])


@doubler.step()
async def double(ctx: Context) -> dict[str, int]:
    return {"n": ctx.input["n"] * 2}


@doubler.step(parents=["double"])
async def describe(ctx: Context) -> str:
    return f"twice {ctx.input['n']} is {ctx.outputs['double']['n']}"


big = Workflow("out-big", on_events=["out.big"])


@big.step()
async def huge(ctx: Context) -> str:
    return "x" * 100_000


latest = Workflow(
    "out-latest",
    on_events=["out.latest"],
    concurrency=Concurrency(expression="input.k", max_runs=1,
                            limit_strategy=Strategy.CANCEL_IN_PROGRESS),
)


@latest.step()
async def slow(ctx: Context) -> int:
    await asyncio.sleep(ctx.input["sleep"])
    return ctx.input["i"]
"""


@pytest.fixture
def outputs_system(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[tuple[System, Path]]:
    module = tmp_path / "out_flows.py"
    module.write_text(textwrap.dedent(MODULE))
    system = System(redis_url, keys)
    yield system, module
    system.close()


async def test_outputs_are_stored_read_back_and_removed_with_the_record(
    redis: Redis, keys: Keys, outputs_system: tuple[System, Path]
) -> None:
    system, module = outputs_system
    system.start("admission", "--block-ms", "100", "--reap-interval", "0.1", "--retention", "3",
                  "--min-retention", "0")  # fmt: skip
    system.start("executor", str(module))  # a path, not a module name

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == 3

    await eventually(registered, timeout=30)
    system.start("ingress", "--block-ms", "100")
    ns = keys.namespace
    _, planned, known = await publish_runs(redis, "out.double", {"n": 21}, namespace=ns)
    assert [p.workflow for p in planned] == ["out-double"] and "out.big" in known
    run = await wait_for_run(redis, planned[0].run_id, 30, namespace=ns)
    assert run.state == "SUCCEEDED" and run.outputs == {
        "double": {"n": 42},
        "describe": "twice 21 is 42",
    }
    # over the cap: the run fails, and the error names the step and the setting
    _, [big], _ = await publish_runs(redis, "out.big", {}, namespace=ns)
    failed = await wait_for_run(redis, big.run_id, 30, namespace=ns)
    assert failed.state == "FAILED" and failed.outputs == {}
    assert "step 'huge' returned 100,005 bytes" in (failed.error or "")
    assert "65,536-byte cap" in (failed.error or "") and "--max-output-bytes" in (
        failed.error or ""
    )
    # an event ingress refuses (over its --max-payload) makes no run: waiting for the run it
    # planned says so at once, with the dead letter's reason (it waited out the timeout,
    # "not created yet")
    from supersede.client import DeadLettered

    entry, [refused], _ = await publish_runs(
        redis, "out.latest", {"k": "big", "pad": "x" * 1_100_000}, namespace=ns
    )
    started = asyncio.get_running_loop().time()
    with pytest.raises(DeadLettered) as info:
        await wait_for_run(redis, refused.run_id, 60, namespace=ns, entry=entry)
    assert info.value.reason == "too_large" and "supersede dead" in str(info.value)
    assert asyncio.get_running_loop().time() - started < 30
    # the supersede chain: older runs of one key point at the newest one, which succeeded
    rids = []
    for i in range(3):
        data = {"k": "a", "i": i, "sleep": 1.0 if i < 2 else 0.01}
        _, [p], _ = await publish_runs(redis, "out.latest", data, namespace=ns)
        rids.append(p.run_id)
        await asyncio.sleep(0.3)
    first = await wait_for_run(redis, rids[0], 30, namespace=ns)
    newest = await wait_for_run(redis, rids[2], 30, namespace=ns)
    assert first.state == "CANCELLED" and first.superseded_by[-1] == rids[2]
    assert first.superseded_by[0] == first.cancelled_by
    assert newest.state == "SUCCEEDED" and newest.outputs == {"slow": 2}
    # deleted with the record once the retention passed
    sk = keys.shard(int(planned[0].run_id.split("-")[0]))

    async def gone() -> bool:
        return not await redis.hexists(sk.outputs_hash, planned[0].run_id)

    await eventually(gone, timeout=30)
    assert await get_run(redis, planned[0].run_id, namespace=ns) is None


def _pty_run(args: list[str], env: dict[str, str], columns: int) -> str:
    """Run the CLI on a pseudo-terminal `columns` wide; its output as the terminal shows it."""
    proc, leader = _pty_start(args, env, columns)
    out = _pty_read(leader, None)
    proc.wait(30)
    return out


def _pty_start(
    args: list[str], env: dict[str, str], columns: int
) -> tuple[subprocess.Popen[bytes], int]:
    """The CLI started on a pseudo-terminal `columns` wide, and the terminal's end."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-m", "supersede", *args], env=env, stdin=follower,
                            stdout=follower, stderr=follower)  # fmt: skip
    os.close(follower)
    return proc, leader


def _pty_read(leader: int, until: str | None) -> str:
    """What the terminal shows: until `until` appears (the terminal stays open), or until the
    program's end (it is closed); 30 s at most without output."""
    out = b""
    while until is None or until.encode() not in out:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    if until is None:
        os.close(leader)
    return out.decode().replace("\r\n", "\n")


async def test_the_cli_fits_the_terminal_and_says_what_publish_did(
    redis: Redis, keys: Keys, outputs_system: tuple[System, Path]
) -> None:
    system, module = outputs_system
    system.start("admission", "--block-ms", "100")
    system.start("executor", str(module))

    async def registered() -> bool:
        return int(await redis.hlen(keys.workflows_hash)) == 3

    await eventually(registered, timeout=30)
    system.start("ingress", "--block-ms", "100")
    env = system.env

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "supersede", *args], env=env,
                              capture_output=True, timeout=60)  # fmt: skip

    # a typo: published, exit 0, and a warning that lists the events workflows listen to
    typo = await asyncio.to_thread(cli, "publish", "out.dubble", '{"n": 1}')
    assert typo.returncode == 0 and b"published inbox entry" in typo.stdout
    assert b"no workflow listens to 'out.dubble'" in typo.stderr
    assert b"out.big, out.double, out.latest" in typo.stderr
    # the run ids publish names are the runs that happen; --wait prints their outcome
    done = await asyncio.to_thread(cli, "publish", "out.double", '{"n": 2}', "--wait", "--json")
    published = orjson.loads(done.stdout)
    [row] = published["runs"]
    assert row["workflow"] == "out-double" and row["state"] == "SUCCEEDED"
    assert row["outputs"]["describe"] == "twice 2 is 4" and done.returncode == 0
    for i in range(3):  # runs with long keys, a cancelled one with its `by`
        data = orjson.dumps({"k": "k" * 40 + str(i % 2), "i": i, "sleep": 0.3}).decode()
        assert (await asyncio.to_thread(cli, "publish", "out.latest", data)).returncode == 0
    listed: list[dict[str, Any]] = []

    async def ended() -> bool:
        listed[:] = orjson.loads((await asyncio.to_thread(cli, "runs", "--json")).stdout)
        return len(listed) == 4 and all(r["state"] in ("SUCCEEDED", "CANCELLED") for r in listed)

    await eventually(ended, timeout=30)
    table = await asyncio.to_thread(_pty_run, ["runs"], env, 100)
    lines = table.strip().splitlines()
    assert lines[0].split()[:4] == ["ID", "WORKFLOW", "KEY", "STATE"]
    assert all(len(line) <= 100 for line in lines), table
    assert "None" not in table
    for r in listed:  # ids are whole, and a cancelled run names the run that superseded it
        assert r["id"] in table
        if r["state"] == "CANCELLED":
            assert re.search(
                rf"{re.escape(r['id'])}.*CANCELLED.*{re.escape(r['cancelled_by'])}", table
            )
    shown = await asyncio.to_thread(_pty_run, ["run", row["run"]], env, 100)
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC \(\d+\.\d s ago\)", shown)
    assert "twice 2 is 4" in shown and "None" not in shown
    status = await asyncio.to_thread(_pty_run, ["status"], env, 80)
    assert all(len(line) <= 80 for line in status.splitlines()), status
    assert "1 per input.k, CANCEL_IN_PROGRESS" in status
    # --wait's exit code says how the runs ended: a failed run (its output over the cap) ...
    failed = await asyncio.to_thread(cli, "publish", "out.big", "{}", "--wait")
    assert failed.returncode == 4 and b"FAILED" in failed.stdout, failed.stderr
    # ... and a run superseded while it ran, by an event published once it was running
    # (on a terminal, with the run's id at once: a newcomer saw nothing until the runs ended)
    slow = orjson.dumps({"k": "waited", "i": 0, "sleep": 30}).decode()
    proc, leader = _pty_start(["publish", "out.latest", slow, "--wait"], env, 200)
    said = await asyncio.to_thread(_pty_read, leader, "(Ctrl-C stops the wait")
    assert "waiting up to 60 s for its run(s) to end: " in said and proc.poll() is None, said
    waiting = asyncio.create_task(asyncio.to_thread(_pty_read, leader, None))

    async def running() -> bool:
        rows = orjson.loads((await asyncio.to_thread(cli, "runs", "--json")).stdout)
        return any(r["state"] == "RUNNING" and r["key"].startswith("waited") for r in rows)

    await eventually(running, timeout=30)
    newer = orjson.dumps({"k": "waited", "i": 1, "sleep": 0}).decode()
    assert (await asyncio.to_thread(cli, "publish", "out.latest", newer)).returncode == 0
    cancelled = await waiting
    assert proc.wait(30) == 5 and "CANCELLED" in cancelled, cancelled
    assert "superseded" in cancelled  # (why: a no_slot cancel looked the same)
    # an explicit id published again (another key, so another planned run id) makes no run:
    # publish says so, and --wait shows the run the first publish made
    first = orjson.dumps({"k": "dup-a", "i": 7, "sleep": 0}).decode()
    once = await asyncio.to_thread(cli, "publish", "out.latest", first, "--id", "order-1",
                                   "--wait", "--json")  # fmt: skip
    [made] = orjson.loads(once.stdout)["runs"]
    again = orjson.dumps({"k": "dup-b", "i": 8, "sleep": 0}).decode()
    twice = await asyncio.to_thread(cli, "publish", "out.latest", again, "--id", "order-1",
                                    "--wait", "--timeout", "20", "--json")  # fmt: skip
    assert twice.returncode == 0, twice.stderr
    assert b"event id 'order-1' was published before" in twice.stderr
    [shown_row] = orjson.loads(twice.stdout)["runs"]
    assert shown_row["run"] == made["run"] and shown_row["state"] == "SUCCEEDED"
    assert shown_row["outputs"] == made["outputs"] and shown_row["duplicate_of"]
    assert shown_row["reason"] is None and shown_row["cancelled_by"] is None
    # the row is that run's: its key, not the one this event's data would have given
    assert made["key"].startswith("dup-a") and shown_row["key"] == made["key"]
    third = await asyncio.to_thread(cli, "publish", "out.latest", again, "--id", "order-1",
                                    "--json")  # fmt: skip
    [row] = orjson.loads(third.stdout)["runs"]
    assert row["run"] == made["run"] and row["key"] == made["key"], row
    # --timeout passing first still prints what is known, with exit code 1
    stuck = orjson.dumps({"k": "stuck", "i": 0, "sleep": 30}).decode()
    late = await asyncio.to_thread(cli, "publish", "out.latest", stuck, "--wait", "--timeout",
                                   "1", "--json")  # fmt: skip
    assert late.returncode == 1 and b"has not ended after 1.0s" in late.stderr
    [late_row] = orjson.loads(late.stdout)["runs"]
    assert late_row["timed_out"] and late_row["state"] in ("QUEUED", "ASSIGNED", "RUNNING")


@pytest.mark.parametrize("command", ["runs", "publish", "executor", "admission", "dev", "acl"])
def test_every_help_shows_defaults_and_environment(command: str) -> None:
    done = subprocess.run([sys.executable, "-m", "supersede", command, "--help"],
                          capture_output=True, check=True)  # fmt: skip
    text = done.stdout.decode()
    assert "SUPERSEDE_REDIS_URL" in text and "SUPERSEDE_NAMESPACE" in text
    if command in ("runs", "executor", "admission", "publish"):
        assert "(default: " in text
    if command == "dev":  # (it said the default server was 6379, and named no SERVER_BIN)
        assert "SUPERSEDE_SERVER_BIN" in text and "6379" not in text


def test_a_broken_workflow_module_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import supersede\nsteps = (\n")
    (tmp_path / "raises.py").write_text("from supersede import Workflow\n\nraise KeyError('x')\n")
    env = _clean_env(SUPERSEDE_REDIS_URL="redis://127.0.0.1:1/0")
    for spec, where, what in [
        ("broken.py", "broken.py:2", "syntax error"),
        ("raises", "raises.py:3", "KeyError"),
        ("missing.py", "missing.py", "no such file"),
        ("missing", "missing", "give its path"),
    ]:
        done = subprocess.run([sys.executable, "-m", "supersede", "executor", spec], cwd=tmp_path,
                              env=env, capture_output=True, timeout=60)  # fmt: skip
        err = done.stderr.decode()
        assert done.returncode == 2, err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("supersede: ") and where in last and what in last, last


def test_an_embedded_server_that_will_not_start_is_one_line(tmp_path: Path) -> None:
    """A broken redis-server first on PATH: `dev` ended in a traceback and left its temporary
    folder behind."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    # (one that exits at once, one that is no program, one that does not exist)
    for binary in ("/bin/false", str(folder), str(tmp_path / "missing")):
        env = _clean_env(SUPERSEDE_SERVER_BIN=binary, TMPDIR=str(tmp_path))
        env.pop("SUPERSEDE_REDIS_URL", None)
        cmd = [sys.executable, "-m", "supersede", "dev", "--duration", "1", "--ui-port", "0"]
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
        err = done.stderr.decode()
        assert done.returncode == 2 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert "the embedded server would not start" in last and "SUPERSEDE_REDIS_URL" in last
        assert not list(tmp_path.glob("supersede-redis-*")), binary


def test_a_restart_that_fails_keeps_the_server_s_folder() -> None:
    """After a crash the folder holds the server's data (its AOF): a restart that fails must
    leave it, and the process, as they are (a large AOF may still be loading)."""
    from supersede.server import EmbeddedServer, ServerStartError

    server = EmbeddedServer().start()
    try:
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        server.binary = "/bin/false"
        with pytest.raises(ServerStartError):
            server.start()
        assert Path(server.dir).is_dir()
    finally:
        server.stop()


def test_a_cluster_start_survives_a_taken_bus_port_and_leaves_no_server_when_it_fails() -> None:
    """A node's cluster bus port (port + 10000) lies in the range the kernel gives outgoing
    connections: one taken between the choice and the start failed the whole cluster ("Failed
    listening on port …"), and the nodes started before it kept running (a later test failed
    on their ResourceWarning). The node now takes another port; a start that fails for good
    stops the nodes it started."""
    import socket

    from supersede.server import EmbeddedCluster, ServerStartError

    cluster = EmbeddedCluster(3)
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", cluster.nodes[1].port + 10000))
        taken.listen()
        blocked = cluster.nodes[1].port
        cluster.start()
        assert cluster.nodes[1].port != blocked
        assert all(n.proc is not None and n.proc.poll() is None for n in cluster.nodes)
    finally:
        taken.close()
        cluster.stop()

    broken = EmbeddedCluster(3)
    broken.nodes[2].binary = "/bin/false"
    with pytest.raises(ServerStartError):
        broken.start()
    started = broken.nodes[:2]
    assert all(n.proc is not None and n.proc.poll() is not None for n in started)
    assert not any(Path(n.dir).exists() for n in broken.nodes)


@pytest.mark.parametrize("by", ["a server", "a socket"])
def test_a_server_start_survives_its_port_taken_before_it_and_answers_as_itself(by: str) -> None:
    """The port a server chose, taken between the choice and the start (two test workers, or
    any other program): the start failed ("Address already in use"), or, taken by another
    server, returned as soon as that one answered. It now takes another port, and checks
    that the server answering is its own."""
    import socket

    import redis

    from supersede.server import EmbeddedServer

    other = EmbeddedServer().start() if by == "a server" else None
    taken = socket.socket()
    server = EmbeddedServer()
    try:
        if other is not None:
            server.port = other.port
        else:
            taken.bind(("127.0.0.1", server.port))
            taken.listen()
        blocked = server.port
        server.start()
        assert server.port != blocked and server.proc is not None
        with redis.Redis(port=server.port) as client:
            assert int(client.info("server")["process_id"]) == server.proc.pid
    finally:
        taken.close()
        server.stop()
        if other is not None:
            other.stop()


def test_the_readmes_test_of_a_workflow_passes_as_written(tmp_path: Path) -> None:
    """The "Testing your workflows" block, run by pytest beside the "Writing workflows" module
    as `my_app`; and a step that calls `ctx.still_current()` without awaiting it fails the
    `ctx.check_awaited()` the block shows (such a slip passed a test built as the README says,
    then failed every run, an author probe)."""
    (tmp_path / "my_app.py").write_text(readme_block("writing workflows"))
    block = readme_block("testing workflows")
    slip = (
        "\n\ndef test_a_slip() -> None:\n"
        "    import pytest\n"
        "    from supersede.workflow import NotAwaited\n"
        '    ctx = Context(run_id="t-2", workflow="w", attempt=1, input={}, metadata={})\n'
        "    assert ctx.still_current()  # (the slip: a coroutine, true)\n"
        "    with pytest.raises(NotAwaited, match='without awaiting it'):\n"
        "        ctx.check_awaited()\n"
    )
    (tmp_path / "test_readme_block.py").write_text(block + slip)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "test_readme_block.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout + done.stderr


async def test_the_readme_workflow_and_fencing_blocks_run_as_written(
    redis: Redis, redis_url: str, keys: Keys, tmp_path: Path
) -> None:
    """The "Writing workflows" and "Fencing" blocks, each a module as written, served by an
    executor of its own: a second message of one user supersedes the first; the chat run
    that survives stores its reply's length, and the fenced write holds the newer reply. (The
    first block's runs failed: its reply step returned None; the second named `model` and
    `redis` without defining them.)"""
    from supersede.fencing import read_fenced

    (tmp_path / "writing.py").write_text(readme_block("writing workflows"))
    (tmp_path / "fenced.py").write_text(readme_block("fencing"))
    system = System(redis_url, keys)
    try:
        system.start("admission", "--block-ms", "100")
        system.start("executor", str(tmp_path / "writing.py"))
        system.start("executor", str(tmp_path / "fenced.py"))

        async def registered() -> bool:
            return int(await redis.hlen(keys.workflows_hash)) == 2

        await eventually(registered, timeout=30)
        system.start("ingress", "--block-ms", "100")
        ns = keys.namespace
        _, older, _ = await publish_runs(redis, "chat.message", {"userId": "u1", "text": "hi"},
                                         namespace=ns)  # fmt: skip
        _, newer, _ = await publish_runs(redis, "chat.message", {"userId": "u1", "text": "bye"},
                                         namespace=ns)  # fmt: skip
        by_workflow = {p.workflow: p.run_id for p in newer}
        kept = await wait_for_run(redis, by_workflow["chat-reply"], 30, namespace=ns)
        assert kept.state == "SUCCEEDED", kept.error
        assert kept.outputs == {"reply": {"text": "you said 'bye'"}, "store": 14}
        [first] = [p.run_id for p in older if p.workflow == "chat-reply"]
        superseded = await wait_for_run(redis, first, 30, namespace=ns)
        assert superseded.state == "CANCELLED"
        fenced = await wait_for_run(redis, by_workflow["chat-fenced"], 30, namespace=ns)
        assert fenced.state == "SUCCEEDED", fenced.error
        value, fence = await read_fenced(redis, "reply:u1")
        assert value == b"BYE" and fence is not None
    finally:
        system.close()
        await redis.delete("reply:u1")
