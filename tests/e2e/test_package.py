"""The distribution as a user gets it: a wheel built from the repository with its declared build
requirements, installed into a fresh virtualenv outside the repository, running the workflows of
an application that has `shared/` and `services/` packages of its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import redis

from supersede.keys import Keys
from tests.support import REPO

APP = """
from shared.naming import reply_text  # the application's own `shared`, not supersede's
from services.store import remember   # the application's own `services`

from supersede import Concurrency, Context, Workflow

greet = Workflow("app-greet", on_events=["app.hello"],
                 concurrency=Concurrency(expression="input.user", max_runs=1))


@greet.step()
def hello(ctx: Context) -> dict:
    text = reply_text(ctx.input["user"])
    remember(text)
    return {"text": text}
"""


def _run(*cmd: str | Path, cwd: Path | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc.stdout.decode()


def _app(root: Path, url: str, note_key: str) -> None:
    (root / "shared").mkdir()
    (root / "shared" / "__init__.py").write_text("")
    (root / "shared" / "naming.py").write_text("def reply_text(user): return f'hi {user}'\n")
    (root / "services").mkdir()
    (root / "services" / "__init__.py").write_text("")
    (root / "services" / "store.py").write_text(
        f"import redis\n_r = redis.Redis.from_url({url!r})\n"
        f"def remember(text): _r.rpush({note_key!r}, text)\n"
    )
    (root / "app_workflows.py").write_text(textwrap.dedent(APP))


def test_the_wheel_adds_only_supersede_and_runs_an_app_with_its_own_shared_package(
    tmp_path: Path, redis_url: str, keys: Keys
) -> None:
    # Build from a copy of what the Dockerfile copies: a build leaves build/ and *.egg-info
    # beside the sources, which must not appear in the repository.
    src, dist = tmp_path / "src", tmp_path / "dist"
    for name in ("shared", "services", "lua"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
        capture_output=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr.decode()[-3000:]
    # every folder it ships is a listed package (setuptools warns of the others, to a newcomer's
    # alarm, and means to stop shipping them)
    assert b"is absent from the `packages` configuration" not in build.stderr
    (wheel,) = dist.glob("supersede-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/", 1)[0] for n in names if ".dist-info/" not in n}
    assert tops == {"supersede"}
    assert "supersede/lua/admit.lua" in names and "supersede/lua/includes/runs.lua" in names
    assert "supersede/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)  # (MIT, said and shipped)
    assert "supersede/services/ui/static/ui.css" in names  # (the dashboard's data files)

    venv = tmp_path / "venv"
    # (a venv without pip of its own, filled by this one's pip, and its modules compiled as they
    # are imported: 7 s less of the suite's CPU, on two cores shared by three workers)
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
         "--no-compile", "--disable-pip-version-check", str(wheel))  # fmt: skip
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run(venv / "bin" / "python", "-c", purelib).strip())
    (record,) = site.glob("supersede-*.dist-info/RECORD")
    installed = {
        line.split(",", 1)[0].split("/", 1)[0]
        for line in record.read_text().splitlines()
        if line and ".dist-info/" not in line and not line.startswith("..")
    }
    assert installed == {"supersede"}
    assert not (site / "shared").exists() and not (site / "services").exists()
    assert _run(venv / "bin" / "supersede", "--version").startswith("supersede ")

    app = tmp_path / "app"
    app.mkdir()
    note_key = f"{keys.namespace}:app:notes"
    _app(app, redis_url, note_key)
    env = {"SUPERSEDE_REDIS_URL": redis_url, "SUPERSEDE_NAMESPACE": keys.namespace,
           "SUPERSEDE_SHARDS": str(keys.shards), "PATH": "/usr/bin:/bin"}  # fmt: skip
    exe = venv / "bin" / "supersede"
    log = (tmp_path / "services.log").open("wb")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> None:
        cmd = [exe, *args, "--metrics-port", "0"]
        procs.append(subprocess.Popen(cmd, cwd=app, env=env, stderr=log))

    client = redis.Redis.from_url(redis_url)
    try:
        start("admission")
        start("executor", "app_workflows")
        deadline = time.monotonic() + 60
        while not client.hexists(keys.workflows_hash, "app-greet"):
            assert time.monotonic() < deadline, "the executor did not register app-greet"
            assert all(p.poll() is None for p in procs), (tmp_path / "services.log").read_text()
            time.sleep(0.05)
        start("ingress")  # after the registration: an event nobody listens to is not run
        client.xadd(keys.events_stream, {"name": "app.hello", "data": '{"user":"ada"}'})
        while client.lrange(note_key, 0, -1) != [b"hi ada"]:
            assert time.monotonic() < deadline, "the run did not complete"
            time.sleep(0.05)
        while not _succeeded(client, keys):
            assert time.monotonic() < deadline, "the run was not recorded as succeeded"
            time.sleep(0.05)
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
        client.close()
        log.close()


def _succeeded(client: redis.Redis, keys: Keys) -> bool:
    from supersede import codec

    for sk in keys.all_shards():
        for raw in client.hvals(sk.runs_hash):
            if codec.unpack(raw).get("st") == "S":
                return True
    return False


SLOW_IMPORT = """
import importlib.abc, os, pathlib, sys, time

class SlowRedis(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "redis":  # (said, then slow: a loaded host's imports took 2-3 s)
            pathlib.Path(os.environ["SUPERSEDE_TEST_IMPORTING"]).touch()
            time.sleep(60)
        return None

sys.meta_path.insert(0, SlowRedis())
"""


def test_ctrl_c_while_the_command_imports_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """The `supersede` command and `python -m supersede` interrupted while Python imports
    redis (a second or two on a loaded host): one line, exit 130 (the console script imported
    the CLI, and redis with it, before any handler: a traceback, killed by SIGINT; two probes).
    The importing is made slow and said by a `sitecustomize` of the test's own."""
    import os
    import signal

    (tmp_path / "sitecustomize.py").write_text(SLOW_IMPORT)
    exe = Path(sys.executable).with_name("supersede")
    for cmd in ([str(exe), "status"], [sys.executable, "-m", "supersede", "dev", "--ui-port", "0"]):
        marker = tmp_path / "importing"
        marker.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(tmp_path), "SUPERSEDE_TEST_IMPORTING": str(marker)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not marker.exists():
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        text = err.decode()
        assert proc.returncode == 130 and "Traceback" not in text, (cmd, proc.returncode, text)
        assert text.strip().splitlines() == ["supersede: interrupted"], text
