"""Pure-Python units of `shared`: configuration, key layout, sequence encoding, the Lua loader."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from supersede import codec, scripts
from supersede.config import Settings, pin_shard_count
from supersede.errors import ConfigError, MalformedItem, UnknownRun, raise_for_status
from supersede.keys import Keys
from supersede.model import (
    ConcurrencySpec,
    decode_seq,
    encode_seq,
    group_id,
    run_id,
    shard_of_group,
    shard_of_run,
)
from supersede.protocol import RequestPacker, RunState, Strategy, pack_request


def test_settings_defaults_and_validation() -> None:
    s = Settings.from_env({})
    assert (s.namespace, s.shards) == ("supersede", 16)
    with pytest.raises(ConfigError, match="SUPERSEDE_SHARDS"):
        Settings.from_env({"SUPERSEDE_SHARDS": "many"})
    with pytest.raises(ConfigError, match="between 1 and 4096"):
        Settings.from_env({"SUPERSEDE_SHARDS": "0"})
    with pytest.raises(ConfigError, match="SUPERSEDE_NAMESPACE"):
        Settings.from_env({"SUPERSEDE_NAMESPACE": "a{b}"})


def test_settings_that_were_silently_misread_are_named() -> None:
    """A misspelt variable was ignored (SUPERSEDE_NAMESPCE: the default namespace), a database
    path that is no number was db 0, and SUPERSEDE_CPUS=0- was CPU 0."""
    from supersede.config import unknown_variables
    from supersede.service import parse_cpus

    env = {"SUPERSEDE_NAMESPCE": "x", "SUPERSEDE_ACL_PASSWORD_READER": "p", "PATH": "/bin",
           "SUPERSEDE_NAMESPACE": "ok", "SUPERSEDE_WHATEVER": "1",
           "SUPERSEDE_ACL_PASSWORD_INGERSS": "p"}  # fmt: skip
    said = unknown_variables(env, ["INGRESS", "ADMISSION", "EXECUTOR", "READER"])
    assert said[1:] == [
        "SUPERSEDE_NAMESPCE is not a setting (did you mean SUPERSEDE_NAMESPACE?); it is ignored",
        "SUPERSEDE_WHATEVER is not a setting; it is ignored",
    ]
    # a role's password under a misspelt role (a newcomer probe: nothing said)
    assert said[0].startswith("SUPERSEDE_ACL_PASSWORD_INGERSS names no role (INGRESS, ")
    assert said[0].endswith("(did you mean SUPERSEDE_ACL_PASSWORD_INGRESS?); it is ignored")
    [lower] = unknown_variables({"SUPERSEDE_ACL_PASSWORD_ingress": "p"}, ["INGRESS"])
    assert lower.endswith("(did you mean SUPERSEDE_ACL_PASSWORD_INGRESS?); it is ignored")
    with pytest.raises(ConfigError, match=r"database \(its path\) must be a number, in .*/1x'"):
        Settings.from_env({"SUPERSEDE_REDIS_URL": "redis://127.0.0.1:6379/1x"})
    assert Settings.from_env({"SUPERSEDE_REDIS_URL": "redis://h:1/2"}).redis_url.endswith("/2")
    assert Settings.from_env({"SUPERSEDE_REDIS_URL": "unix:///tmp/r.sock?db=1"})
    with pytest.raises(ConfigError, match="SUPERSEDE_CPUS"):
        parse_cpus("0-")
    assert parse_cpus("0-1,3") == {0, 1, 3}


@pytest.mark.parametrize("value", ["0", "-1", "0.0", "nan"])
def test_a_url_timeout_of_zero_is_a_bad_setting_not_a_hung_server(value: str) -> None:
    """socket_timeout=0 in the URL made every read time out at once: each command said the
    server accepts the connection but never answers (a CLI probe). The URL's timeouts must be
    above 0, in one line naming the option; the password stays out of it."""
    for option in ("socket_timeout", "socket_connect_timeout"):
        url = f"redis://:s3cret@127.0.0.1:6379/0?{option}={value}"
        with pytest.raises(ConfigError, match=f"{option} must be a number of seconds above 0"):
            Settings.from_env({"SUPERSEDE_REDIS_URL": url})
        try:
            Settings.from_env({"SUPERSEDE_REDIS_URL": url})
        except ConfigError as exc:
            assert "s3cret" not in str(exc) and "\n" not in str(exc)
    assert Settings.from_env({"SUPERSEDE_REDIS_URL": "redis://h:1/0?socket_timeout=0.5"})


async def test_shard_count_is_pinned_on_first_use() -> None:
    redis = fakeredis.FakeAsyncRedis()
    await pin_shard_count(redis, Keys("ns", 8))
    await pin_shard_count(redis, Keys("ns", 8))
    with pytest.raises(ConfigError, match=r"created with 8 shards"):
        await pin_shard_count(redis, Keys("ns", 16))
    await pin_shard_count(redis, Keys("other", 16))


def test_every_shard_key_carries_the_shard_hash_tag() -> None:
    keys = Keys("ns", 4)
    for sk in keys.all_shards():
        names = [*sk.state_keys(), sk.requests_stream, sk.results_stream]
        assert all(name.startswith(f"{{ns:{sk.shard}}}:") for name in names)
        assert len(set(names)) == len(names)


@given(st.integers(0, 2**48), st.integers(0, 2**63), st.integers(0, 2**48), st.integers(0, 2**63))
def test_encoded_sequences_sort_like_stream_ids(ms1: int, s1: int, ms2: int, s2: int) -> None:
    a, b = encode_seq(f"{ms1}-{s1}"), encode_seq(f"{ms2}-{s2}".encode())
    assert (a < b) == ((ms1, s1) < (ms2, s2))
    assert decode_seq(a) == f"{ms1}-{s1}"


def test_ids_route_runs_and_groups_to_shards() -> None:
    gid = group_id("wf", "1", "user-42")
    assert len(gid) == 16 and group_id("wf", "2", "user-42") != gid
    shard = shard_of_group(gid, 16)
    rid = run_id(shard, "1-0", "wf")
    assert shard_of_run(rid) == shard and run_id(shard, "1-0", "wf") == rid
    with pytest.raises(ValueError, match="not a run id"):
        shard_of_run("nope")


def test_concurrency_spec_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="max_runs"):
        ConcurrencySpec("input.userId", max_runs=0)
    with pytest.raises(ValueError, match="limit_strategy"):
        ConcurrencySpec("input.userId", limit_strategy="LATEST")
    assert RunState("S").terminal and not RunState("X").terminal


def test_codec_round_trips_and_keeps_non_utf8_bytes() -> None:
    assert codec.unpack(codec.pack({"a": [1, "x"]})) == {"a": [1, "x"]}
    raw = codec.unpack(codec.pack(b"\xff\x00"))
    assert raw.encode("utf-8", "surrogateescape") == b"\xff\x00"


def test_error_mapping() -> None:
    raise_for_status([0, 1])
    with pytest.raises(UnknownRun) as info:
        raise_for_status([-2, 3])
    assert info.value.index == 2
    with pytest.raises(MalformedItem, match="field s"):
        raise_for_status([-1, 1, b"field s"])


def test_loader_inlines_includes_and_reads_key_counts(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "includes").mkdir()
    (tmp_path / "includes" / "one.lua").write_text("local one = 1\n-- @include two\n")
    (tmp_path / "includes" / "two.lua").write_text("local two = 2\n")
    (tmp_path / "includes" / "loop.lua").write_text("-- @include loop\n")
    (tmp_path / "demo.lua").write_text(
        "--[[\n  Input:\n    KEYS[1] a\n    KEYS[2..5] b\n]]\n-- @include one\nreturn one\n"
    )
    (tmp_path / "cyclic.lua").write_text("--[[\n KEYS[1] a\n]]\n-- @include loop\n")
    monkeypatch.setattr(scripts, "LUA_DIR", tmp_path)
    scripts.load_source.cache_clear()
    try:
        source, nkeys = scripts.load_source("demo")
        assert nkeys == 5
        assert "local one = 1\nlocal two = 2\n" in source and "@include" not in source
        with pytest.raises(ValueError, match="cycle"):
            scripts.load_source("cyclic")
    finally:
        scripts.load_source.cache_clear()


def test_every_shipped_script_has_a_header_and_declares_its_keys() -> None:
    for name in scripts.SCRIPT_NAMES:
        text = (scripts.LUA_DIR / f"{name}.lua").read_text()
        if text.startswith("#!lua"):  # (flags, as EVAL reads them: the first line)
            text = text.split("\n", 1)[1]
        assert text.startswith("--[[") and "Input:" in text and "Output:" in text
        assert "local rcall = redis.call" in text
        _, nkeys = scripts.load_source(name)
        assert abs(nkeys) >= 1  # negative: open-ended (KEYS[n..])


@given(
    st.text(max_size=20),
    st.text(max_size=20),
    st.integers(1, 10_000),
    st.sampled_from(list(Strategy)),
    st.booleans(),
    st.integers(1, 1000),
    st.text(max_size=30),
    st.binary(max_size=300),
    st.booleans(),
    st.booleans(),
)
def test_the_request_packer_writes_the_same_map_as_pack_request(
    workflow: str, key: str, max_runs: int, strategy: Strategy, strict: bool, attempts: int,
    event_id: str, payload: bytes, unlimited: bool, scoped: bool,
) -> None:  # fmt: skip
    packer = RequestPacker(workflow, "v1", max_runs, strategy, strict, attempts, unlimited,
                           scoped=scoped)  # fmt: skip
    args = ("3-abc", "0123456789abcdef", "0" * 32, key, event_id, payload)
    expected = pack_request(
        "3-abc", "0123456789abcdef", "0" * 32, workflow, "v1", key, event_id, max_runs, strategy,
        strict, attempts, payload, 0, unlimited, scoped=scoped,
    )  # fmt: skip
    assert codec.unpack(packer.pack(*args)) == codec.unpack(expected)


def test_readyz_follows_the_ready_flag() -> None:
    import urllib.error
    import urllib.request

    from supersede import metrics
    from supersede.server import free_port

    port = free_port()
    metrics.serve(port)
    metrics._READY.clear()  # (other tests of this process set parts of their own)
    metrics._STOPPING.clear()  # (services of other tests stopped)
    metrics.set_ready(False)
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{url}/readyz", timeout=5)
    assert info.value.code == 503
    info.value.close()
    metrics.set_ready(True)
    with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"{url}/healthz", timeout=5) as resp:
        assert resp.read() == b"ok\n"
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        assert b"python_info" in resp.read()
    # another path is 404, not the metrics (a probe's typo passed: an observability probe),
    # and HEAD answers as GET does, without a body (it was 501)
    for typo in ("/health", "/ready", "/", "/healthz/"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{url}{typo}", timeout=5)
        assert info.value.code == 404, typo
        info.value.close()
    head = urllib.request.Request(f"{url}/readyz", method="HEAD")
    with urllib.request.urlopen(head, timeout=5) as resp:
        assert resp.status == 200 and resp.read() == b""

    def status() -> int:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code)

    # Several parts in one process (`supersede serve`): ready only when every part is,
    # including one expected that has not started yet.
    metrics._READY.clear()
    metrics._STOPPING.clear()  # (services of other tests stopped)
    metrics.expect_parts("ingress", "admission", "executor")
    metrics.set_ready(True, "admission")
    metrics.set_ready(True, "executor")
    assert status() == 503
    metrics.set_ready(True, "ingress")
    assert status() == 200
    metrics.set_ready(False, "admission")
    assert status() == 503
    # A part with several readers and tasks: ready only while none of them fails (a reader
    # that went through made it ready while another failed: /readyz flipped 503 / 200).
    metrics.set_ready(True, "admission")
    metrics.report("admission", "read shard 0", False)
    metrics.report("admission", "read shard 1", True)
    metrics.report("admission", "tick", True)
    assert status() == 503
    metrics.report("admission", "read shard 0", True)
    metrics.report("admission", "tick", False)
    assert status() == 503
    metrics.report("admission", "tick", True)
    assert status() == 200
    metrics._READY.clear()
    metrics._STOPPING.clear()  # (services of other tests stopped)
    metrics._FAILING.clear()


def test_own_pending_re_reads_after_a_failure_without_starving_new_entries() -> None:
    from supersede.streams import OwnPending

    own = OwnPending([b"s1", "s2"])
    assert not own.active and own.ids() == {"s1": ">", "s2": ">"}
    own.restart()  # a batch of new entries failed: re-read own pending entries first
    assert own.active and own.ids() == {"s1": "0", "s2": "0"}
    own.advance([(b"s1", [(b"5-0", {b"r": b"x"})]), (b"s2", [])], reread=True)
    assert own.ids() == {"s1": "5-0", "s2": "0"}  # moves past what it re-read
    own.restart(failed_reread=True)  # the re-read failed too: new entries get one read first
    assert not own.active and own.ids() == {"s1": ">", "s2": ">"}
    own.advance([], reread=False)
    assert own.active and own.ids() == {"s1": "0", "s2": "0"}
    own.advance([(b"s1", []), (b"s2", [])], reread=True)  # nothing left of its own
    assert not own.active and own.ids() == {"s1": ">", "s2": ">"}


def test_any_msgpack_output_renders_as_json_and_as_text() -> None:
    """A step may return any msgpack-able value: integer map keys and bytes that are not UTF-8
    too. `supersede run` (table and --json) must show them, not fail on them."""
    import orjson

    from supersede import codec
    from supersede.services.render import run as render_run

    raw = codec.unpack(codec.pack({"s": {200: "ok", b"\xff\xfe": [b"\x80"]}}))
    safe = codec.jsonable(raw)
    assert safe == {"s": {"200": "ok", "b'\\xff\\xfe'": ["b'\\x80'"]}}
    orjson.dumps(safe)
    view = {"id": "1-a", "workflow": "w", "version": "v", "key": "k", "state": "SUCCEEDED",
            "attempt": 1, "event_id": "1-0", "outputs": safe, "timeline": []}  # fmt: skip
    assert "200" in render_run(view)


def test_any_payload_is_made_showable_as_json() -> None:
    """A run's input or outputs as its page, `supersede run` and --json show them: JSON nested
    1,000 deep (which ingress takes: orjson writes 254 levels, and deeper recursion failed), a
    msgpack timestamp, an integer past 64 bits."""
    import msgpack
    import orjson

    from supersede import codec

    deep: list[object] = []
    for _ in range(1_000):
        deep = [deep]
    shown = codec.jsonable({"x": deep, "at": msgpack.Timestamp(1, 0), "big": 2**70})
    text = orjson.dumps(shown).decode()
    assert "nested deeper than 200 levels" in text and "Timestamp" in text
    assert str(2**70) in text and codec.jsonable(2**64 - 1) == 2**64 - 1
    # a step's float NaN or infinity showed as null (JSON has no form): its text now
    nan = float("nan")
    assert codec.jsonable({"o": [nan, float("inf"), -float("inf"), 1.5]}) == {
        "o": ["nan", "inf", "-inf", 1.5]
    }


def test_a_key_cannot_forge_lines_of_the_run_view() -> None:
    """A producer's key "mallory\nstate     FAILED" printed a line of its own above the real
    state in `supersede run ID` (a probe): one-line facts show a new line as \\n."""
    from supersede.services.render import run as render_run

    forged = "mallory\nstate     FAILED\nerror     your account was deleted"
    view = {"id": "1-a", "workflow": "w", "version": "v", "key": forged, "state": "SUCCEEDED",
            "attempt": 1, "event_id": "id\nx", "executor": "e\ny", "timeline": []}  # fmt: skip
    lines = render_run(view).splitlines()
    assert [line for line in lines if line.startswith("state")] == ["state     SUCCEEDED"]
    assert "key       mallory\\nstate     FAILED\\nerror     your account was deleted" in lines
    assert not any(line.startswith(("error", "x", "y")) for line in lines), lines


def test_the_runs_table_times_a_retried_run_from_its_latest_change() -> None:
    """A run back in ASSIGNED after its first attempt's lease lapsed: `last change` showed its
    creation and `ran` counted from the dead attempt's claim ("9387 ms so far")."""
    import re
    import time

    from supersede.services.render import runs as render_runs

    now = int(time.time() * 1000)
    row = {"id": "1-a", "workflow": "w", "key": "k", "state": "ASSIGNED", "attempt": 2,
           "created_ms": now - 60_000, "claimed_ms": now - 50_000, "assigned_ms": now - 3_000,
           "ended_ms": None, "cancelled_by": None, "reason": None}  # fmt: skip
    line = render_runs([row]).splitlines()[1]
    assert re.search(r"\b3\.\d s ago", line), line
    assert "so far" not in line
    running = {**row, "state": "RUNNING", "claimed_ms": now - 1_000}
    line = render_runs([running]).splitlines()[1]
    assert re.search(r"\b1\.\d s ago", line) and "so far" in line, line


def test_the_dead_table_names_the_stream_a_refused_request_came_from() -> None:
    """A run request or result admission refused carries its stream (its shard's); the table
    showed only its entry id, which is in none of the inbox's ids (a CLI probe)."""
    import time

    from supersede.services.render import dead

    now = int(time.time() * 1000)
    rows = [{"id": f"{now}-0", "reason": "malformed", "entry": "17-3",
             "stream": "{supersede:3}:requests", "detail": "not msgpack"},
            {"id": f"{now}-1", "reason": "unrouted", "name": "ev", "entry": "18-0"}]  # fmt: skip
    lines = dead(rows).splitlines()
    assert "{supersede:3}:requests 17-3" in lines[1], lines
    assert "18-0" in lines[2] and "requests" not in lines[2], lines


def test_two_workflow_files_of_one_name_in_two_folders_are_both_loaded(tmp_path: Path) -> None:
    from supersede.services.modules import load_workflows

    for folder, wid in (("a", "wf-a"), ("b", "wf-b")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "flows.py").write_text(
            f"from supersede import Workflow\n\nwf = Workflow({wid!r}, on_events=['e'])\n\n\n"
            "@wf.step()\nasync def one(ctx):\n    return 1\n"
        )
    first = load_workflows(str(tmp_path / "a" / "flows.py"))
    second = load_workflows(str(tmp_path / "b" / "flows.py"))
    assert [w.id for w in first] == ["wf-a"] and [w.id for w in second] == ["wf-b"]


def test_a_workflow_module_given_by_path_is_the_module_its_neighbours_import(
    tmp_path: Path,
) -> None:
    """`dev --module shop_wf.py`, whose steps are partly in shop_steps.py beside it (`from
    shop_wf import shop`): the file ran twice, once by its path and once by its name, and the
    steps shop_steps.py added went to the second copy's workflow: runs ended SUCCEEDED without
    them (an API-user probe). Given by path or by name, it is one module, all of its steps."""
    from supersede.services.modules import load_workflows

    (tmp_path / "shop_wf.py").write_text(
        "from supersede import Workflow\nshop = Workflow('shop', on_events=['e'])\n"
        "@shop.step()\nasync def reserve(ctx):\n    return 1\n"
        "import shop_steps  # noqa\n"
    )
    (tmp_path / "shop_steps.py").write_text(
        "from shop_wf import shop, reserve\n"
        "@shop.step(parents=[reserve])\nasync def charge(ctx):\n    return 2\n"
    )
    try:
        [wf] = load_workflows(str(tmp_path / "shop_wf.py"))
        assert sorted(s.name for s in wf.definition().steps) == ["charge", "reserve"]
        assert sys.modules["shop_wf"].shop is wf
        [again] = load_workflows("shop_wf")  # (by name, in the same process: the same one)
        assert again is wf
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n, m in sys.modules.items() if "shop_" in n]:
            del sys.modules[name]


def test_tls_without_the_host_name_check_is_said_unverified() -> None:
    """`ssl_check_hostname=false` let any certificate the CA signed pass, without the warning
    `ssl_cert_reqs=none` gets (a security probe)."""
    from supersede.config import unverified_tls

    base = "rediss://u:p@h:6380/0?ssl_ca_certs=/ca.pem"
    assert not unverified_tls(base) and not unverified_tls(base + "&ssl_check_hostname=true")
    assert unverified_tls(base + "&ssl_check_hostname=false")
    assert unverified_tls(base + "&ssl_check_hostname=NO") and unverified_tls(
        base + "&ssl_cert_reqs=none"
    )
    assert not unverified_tls("redis://h/0?ssl_check_hostname=false")  # (no TLS: another warning)
    # redis-py before 6.0 did not check the host name unless told to (a review)
    from supersede import config

    old, config._REDIS_PY_MAJOR = config._REDIS_PY_MAJOR, 5
    try:
        assert unverified_tls(base) and not unverified_tls(base + "&ssl_check_hostname=true")
    finally:
        config._REDIS_PY_MAJOR = old


def test_a_bad_argument_is_one_line_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    """The usage came first: 11 lines for one bad --slots (an API-user probe)."""
    from supersede.services.cli import build_parser

    for args, says in ((["executor", "m.py", "--slots", "0"], "argument --slots"),
                       (["nosuch"], "invalid choice: 'nosuch'")):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(args)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and says in err, err
        assert "--help" in err


def test_an_error_of_a_module_given_by_path_is_named_by_its_module(tmp_path: Path) -> None:
    """A step's exception class of a module given by path was stored as
    `_supersede_module_df96c3a09d2e_pipe_wf.Flaky` (an API-user probe)."""
    from supersede.errors import step_traceback
    from supersede.services.modules import load_workflows

    (tmp_path / "pipe_wf.py").write_text(
        "from supersede import Workflow\nwf = Workflow('pipe', on_events=['e'])\n"
        "class Flaky(Exception):\n    pass\n"
        "@wf.step()\ndef s(ctx):\n    raise Flaky('try 3')\n"
    )
    try:
        [wf] = load_workflows(str(tmp_path / "pipe_wf.py"))
        try:
            wf.steps[0].fn(None)
        except Exception as exc:
            said = step_traceback(exc)
        assert "pipe_wf.Flaky: try 3" in said and "_supersede_module_" not in said, said
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if "pipe_wf" in n]:
            del sys.modules[name]


def test_loop_metrics_expose_what_prometheus_client_metrics_expose() -> None:
    """LoopCounter and LoopHistogram (no lock per observation) scrape exactly as
    prometheus_client's Counter and Histogram fed the same values, labels included."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from supersede.metrics import LATENCY_BUCKETS, LoopCounter, LoopHistogram

    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("t_runs_total", "Runs.", ["way"], registry=theirs)
    hist = Histogram("t_wait_seconds", "Waits.", ["hop"], buckets=LATENCY_BUCKETS, registry=theirs)
    plain = Histogram("t_plain_seconds", "Plain.", buckets=(0.1, 1), registry=theirs)
    loop_counter = LoopCounter("t_runs_total", "Runs.", ["way"], registry=ours)
    loop_hist = LoopHistogram("t_wait_seconds", "Waits.", ["hop"], buckets=LATENCY_BUCKETS,
                              registry=ours)  # fmt: skip
    loop_plain = LoopHistogram("t_plain_seconds", "Plain.", buckets=(0.1, 1), registry=ours)
    Histogram("t_idle_seconds", "Never observed.", buckets=(0.1, 1), registry=theirs)
    LoopHistogram("t_idle_seconds", "Never observed.", buckets=(0.1, 1), registry=ours)
    Counter("t_idle_total", "Never counted.", registry=theirs)
    LoopCounter("t_idle_total", "Never counted.", registry=ours)
    for way, n in (("a", 1), ("a", 2), ("b", 1)):
        counter.labels(way).inc(n)
        loop_counter.labels(way).inc(n)
    for hop, value in (("x", 0.0), ("x", 0.0005), ("x", 0.0007), ("y", 2.5), ("y", 99.0)):
        hist.labels(hop).observe(value)
        loop_hist.labels(hop).observe(value)
    for value in (0.05, 0.1, 0.5, 7.0):
        plain.observe(value)
        loop_plain.observe(value)
    assert loop_counter.labels("a") is loop_counter.labels("a")  # kept, not made per call
    assert generate_latest(ours) == generate_latest(theirs)
    with pytest.raises(ValueError, match="takes labels"):
        loop_counter.labels("a", "b")


def test_a_service_process_collects_cycles_less_often_and_skips_what_it_loaded() -> None:
    """tune_gc (every service process, at start): what is loaded is frozen out of the
    collector's scans, and the youngest generation waits for 10,000 allocations, not 700."""
    import gc

    from supersede.service import GC_THRESHOLD0, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_THRESHOLD0, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_decoded_payload_with_binary_values_packs_back_to_the_same_bytes() -> None:
    """A run record holds its input (msgpack, binary) while it is live: decoding keeps the bytes
    that are not UTF-8 as surrogate escapes, and packing turns them back."""
    from supersede import codec

    raw = codec.pack({"in": b"\x81\xa5\xff\xfe", "w": "wf"})
    assert codec.pack(codec.unpack(raw)) == raw


def test_cpu_lists_read_as_numbers_and_ranges() -> None:
    from supersede.service import parse_cpus

    assert parse_cpus("0") == {0}
    assert parse_cpus("0-2, 5") == {0, 1, 2, 5}
    for bad in ("", "a", "3-1", "-1", "0,,1"):
        with pytest.raises(ConfigError, match="SUPERSEDE_CPUS"):
            parse_cpus(bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["runs", "--limit", "-1"], "argument --limit: -1 is out of range: at least 1"),
        (["dead", "--limit", "0"], "argument --limit: 0 is out of range: at least 1"),
        (["executor", "m", "--slots", "0"], "argument --slots: 0 is out of range: at least 1"),
        (["serve", "m", "--lease", "0"], "argument --lease: 0 is out of range: at least 1"),
        (
            ["executor", "m", "--lease", "0.05"],
            "argument --lease: 0.05 is out of range: at least 1",
        ),
        (  # (1e30 overflowed the lease keeper's clock: tracebacks, finishes refused)
            ["executor", "m", "--lease", "1e30"],
            "argument --lease: 1e30 is out of range: at least 1 and at most 86400",
        ),
        (["serve", "m", "--lease", "86401"], "argument --lease: 86401 is out of range"),
        (["admission", "--block-ms", "0"], "argument --block-ms: 0 is out of range"),
        (["admission", "--retention", "nan"], "argument --retention: nan is out of range"),
        (["admission", "--max-groups", "-5"], "argument --max-groups: -5 is out of range"),
        (["ingress", "--batch", "many"], "argument --batch: not an integer: 'many'"),
        (["ingress", "--metrics-port", "70000"], "argument --metrics-port: not a port: 70000"),
        (["keda", "m", "--lag", "-3"], "argument --lag: -3 is out of range: at least 1"),
        (["retire", ""], "argument workflow: the workflow must not be empty"),
    ],
)
def test_a_bad_number_on_the_command_line_is_one_line_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A zero, negative or non-finite count or duration was taken as given: `runs --limit -1`
    listed runs, `--slots 0` started an executor that never ran anything, `--block-ms 0` would
    block a read forever. Each is refused by the parser, in a line naming the flag (exit 2);
    0 still disables what says so (a cap, a metrics port)."""
    from supersede.services.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    ok = build_parser().parse_args(["admission", "--max-groups", "0", "--metrics-port", "0"])
    assert (ok.max_groups, ok.metrics_port, ok.min_retention) == (0, 0, 300)
    # (`serve` runs an executor too: its process isolation has the executor's --kill-after)
    assert build_parser().parse_args(["serve", "m", "--kill-after", "7"]).kill_after == 7
    # --log-level after the command too (it was an error there)
    assert build_parser().parse_args(["status", "--log-level", "debug"]).log_level == "DEBUG"
    assert build_parser().parse_args(["--log-level", "error", "status"]).log_level == "ERROR"


async def test_arguments_a_command_would_ignore_are_refused() -> None:
    """`cancel ID --workflow W --key K` cancelled ID and ignored the rest; `publish --timeout`
    without --wait ignored the timeout. Both are refused, before anything is written."""

    from supersede.services import ops
    from supersede.services.cli import build_parser

    redis: Any = None  # (refused before any call)
    keys = Keys("ns", 1)
    cancel = build_parser().parse_args(["cancel", "0-1", "--workflow", "w", "--key", "k"])
    with pytest.raises(ValueError, match="ID, or --workflow and --key, not both"):
        await ops.COMMANDS["cancel"](redis, keys, cancel)
    publish = build_parser().parse_args(["publish", "e", "{}", "--timeout", "5"])
    with pytest.raises(ValueError, match="give --wait too"):
        await ops.COMMANDS["publish"](redis, keys, publish)


async def test_a_cancelled_run_is_never_current() -> None:
    """A superseded run may outlive its group's memory (a step that ignores its cancel, a
    CANCELLING run under its lease while the reaper forgets the group by --max-groups): with no
    fence left to read, still_current() must not call it current."""
    from supersede.workflow import Context

    ctx = Context(run_id="1-x", workflow="w", attempt=1, input={}, metadata={}, event="e",
                  event_id="e", key="k")  # fmt: skip
    assert await ctx.still_current() and ctx.still_current_blocking()
    ctx._cancel()
    assert not await ctx.still_current() and not ctx.still_current_blocking()


def test_a_payload_with_a_map_keyed_by_an_array_still_reads() -> None:
    """Stored before executors refused such outputs: every reader of the run raised
    `unhashable type: 'list'`; now the arrays read as tuples (and JSON shows the key as text),
    while `unpack_exact`, which the executor checks outputs with, still refuses it."""
    import pytest

    from supersede import codec

    packed = codec.pack({"out": {(1, 2): 3}, "n": 1})
    assert codec.unpack(packed) == {"out": {(1, 2): 3}, "n": 1}
    assert codec.jsonable(codec.unpack(packed)) == {"out": {"[1, 2]": 3}, "n": 1}
    with pytest.raises(TypeError):
        codec.unpack_exact(packed)


def test_a_group_lag_is_capped_by_what_the_stream_holds() -> None:
    """After a crash and an AOF restart of a trimmed stream, Redis reported a lag of 4835 for a
    group that had read an empty stream to its end: `supersede status`, the lag gauges and the
    assignment backlog KEDA scales on showed it for good. An unread entry is in the stream, so
    the lag is capped by its length less what is pending."""
    from supersede.streams import group_backlog, unread

    group = {"name": b"ingress", "pending": 0, "lag": 4835}
    assert unread(group, 0) == 0 and group_backlog([group], "ingress", 0) == 0
    assert unread(group) == 4835  # (no length: as reported)
    busy = {"name": b"ingress", "pending": 3, "lag": 7}
    assert group_backlog([busy], "ingress", 10) == 10  # a true lag is kept
    # (pending entries may be gone from the stream, trimmed by a publisher's MAXLEN: the
    # cap is the length alone)
    assert group_backlog([busy], "ingress", 5) == 8
    assert group_backlog([busy], "admission", 5) is None
    unknown = {"name": b"ingress", "pending": 3, "lag": None}  # (Redis cannot tell)
    assert unread(unknown, 10) == 7 and unread(unknown) == 0


@pytest.mark.parametrize(
    ("code", "says"),
    [
        # a dict for concurrency (an AttributeError traceback, exit 1)
        (
            "wf = Workflow('w', on_events=['e'], concurrency={'expression': 'input.k'})\n"
            "@wf.step()\nasync def one(ctx):\n    return 1\n",
            "workflow 'w' is invalid: concurrency: must be a Concurrency(...), got dict",
        ),
        # a step that is no function (every run failed: 'int' object is not callable)
        (
            "wf = Workflow('w', on_events=['e'])\nwf.step(name='x')(42)\n",
            "workflow 'w' is invalid: steps[0]: a step must be a function",
        ),
        # parents given as one name (read letter by letter), or as numbers (an AttributeError)
        (
            "wf = Workflow('w', on_events=['e'])\n@wf.step()\nasync def s0(ctx):\n    return 1\n"
            "@wf.step(parents='s0')\nasync def s1(ctx):\n    return 1\n",
            "workflow 'w' is invalid: steps[1].parents: must be a list of step names",
        ),
        (
            "wf = Workflow('w', on_events=['e'])\n@wf.step(parents=[5])\n"
            "async def s1(ctx):\n    return 1\n",
            "workflow 'w' is invalid: steps[0].parents: must be a list of step names",
        ),
        # an on-cancel hook that is no function
        (
            "wf = Workflow('w', on_events=['e'])\n@wf.step()\nasync def s0(ctx):\n    return 1\n"
            "wf.on_cancel(42)\n",
            "workflow 'w' is invalid: on_cancel: must be a function",
        ),
        # a step or hook that cannot take its context (every run failed with a TypeError)
        (
            "wf = Workflow('w', on_events=['e'])\n@wf.step()\nasync def s0():\n    return 1\n",
            "workflow 'w' is invalid: steps[0]: step 's0' must take one argument, its context "
            "(ctx), but its signature is s0()",
        ),
        (
            "wf = Workflow('w', on_events=['e'])\n@wf.step(name='two')\n"
            "def s0(ctx, extra):\n    return 1\n",
            "steps[0]: step 'two' must take one argument, its context (ctx), but its signature "
            "is s0(ctx, extra)",
        ),
        (
            "wf = Workflow('w', on_events=['e'])\n@wf.step()\nasync def s0(ctx):\n    return 1\n"
            "@wf.on_cancel\nasync def hook():\n    pass\n",
            "on_cancel: the on_cancel hook must take one argument, its context (ctx)",
        ),
        # a generator step (it registered, then every run failed: "the output is a generator")
        (
            "wf = Workflow('w', on_events=['e'])\n@wf.step()\ndef s0(ctx):\n    yield 1\n",
            "steps[0]: step 's0' is a generator function (it yields)",
        ),
        (
            "wf = Workflow('w', on_events=['e'])\n@wf.step()\nasync def s0(ctx):\n    yield 1\n",
            "steps[0]: step 's0' is a generator function (it yields)",
        ),
        # two workflows of one id (the last won, silently)
        (
            "a = Workflow('dup', on_events=['e1'])\n@a.step()\nasync def one(ctx):\n    return 1\n"
            "b = Workflow('dup', on_events=['e2'])\n@b.step()\nasync def two(ctx):\n    return 1\n",
            "defines 2 workflows with the id 'dup'",
        ),
        # a module that ends the process at import (the executor exited 0, silently)
        ("import sys\nsys.exit(0)\n", "raised SystemExit(0) while importing"),
    ],
)
def test_a_module_that_cannot_run_is_refused_in_one_line(
    tmp_path: Path, code: str, says: str
) -> None:
    from supersede.errors import ConfigError
    from supersede.services.modules import load_workflows

    path = tmp_path / "flows.py"
    path.write_text("from supersede import Workflow\n\n" + code)
    with pytest.raises(ConfigError) as info:
        load_workflows(str(path))
    assert says in str(info.value), str(info.value)


def test_a_second_name_for_one_workflow_object_is_the_same_workflow(tmp_path: Path) -> None:
    """`reply_workflow = chat` in a module stopped the executor: "defines 2 workflows with the
    id" (an API-user probe); one object under two names is one workflow."""
    from supersede.services.modules import load_workflows

    path = tmp_path / "aliased.py"
    path.write_text(
        "from supersede import Workflow\nchat = Workflow('alias', on_events=['e'])\n"
        "@chat.step()\ndef s(ctx):\n    return 1\nreply_workflow = chat\n"
    )
    [wf] = load_workflows(str(path))
    assert wf.id == "alias"


def test_workflows_a_module_makes_are_found_though_no_top_level_name_holds_them(
    tmp_path: Path,
) -> None:
    """`WORKFLOWS = [make(1), make(2)]`: such workflows were left out silently (a probe's
    `register` registered only the one a name held). The workflows of a module it imports
    are not its own (another pool's, maybe): only those its own names hold count."""
    from supersede.services.modules import load_workflows

    (tmp_path / "other_pool.py").write_text(
        "from supersede import Workflow\n"
        "theirs = Workflow('theirs', on_events=['t'])\ntheirs.step()(lambda ctx: 1)\n"
        "def make_elsewhere(n):\n    wf = Workflow(f'listed-{n}', on_events=['e'])\n"
        "    wf.step()(lambda ctx: n)\n    return wf\n"
    )
    path = tmp_path / "listed.py"
    path.write_text(
        "import other_pool\nfrom supersede import Workflow\n"
        "def make(n):\n    wf = Workflow(f'listed-{n}', on_events=['e'])\n"
        "    wf.step()(lambda ctx: n)\n    return wf\n"
        "WORKFLOWS = [make(1), make(2), other_pool.make_elsewhere(4)]\nthird = make(3)\n"
    )
    found = load_workflows(str(path))
    assert sorted(wf.id for wf in found) == ["listed-1", "listed-2", "listed-3", "listed-4"]
    # one made once no module is being imported (the executor makes one for a run it cannot
    # start) is kept by none: the list grew with every such run (a review)
    from supersede.workflow import DEFINED_IN, Workflow

    kept = sum(map(len, DEFINED_IN.values()))
    Workflow("at-run-time", on_events=["e"])
    assert sum(map(len, DEFINED_IN.values())) == kept


def test_a_workflow_id_two_modules_define_is_refused_naming_both(tmp_path: Path) -> None:
    """`serve a b` and `dev --module a --module b` kept the last module's definition of an id
    both define, and dropped the other's handlers and limits without a word; the same
    Workflow imported into a second module counts once."""
    from supersede.errors import ConfigError
    from supersede.services.modules import load_modules

    flow = "from supersede import Workflow\nwf = Workflow('chat', on_events=['e'])\n"
    step = "@wf.step()\ndef s(ctx):\n    return 1\n"
    (tmp_path / "a.py").write_text(flow + step)
    (tmp_path / "b.py").write_text(flow + step)
    a, b = str(tmp_path / "a.py"), str(tmp_path / "b.py")
    with pytest.raises(ConfigError, match=r"modules '.*a\.py' and '.*b\.py' both define .*'chat'"):
        load_modules([a, b])
    sys.path.insert(0, str(tmp_path))
    try:
        (tmp_path / "c.py").write_text("from a import wf\n")
        assert [w.id for w in load_modules(["a", "c"])] == ["chat"]
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("a", "c"):
            sys.modules.pop(name, None)


async def test_a_dashboard_page_past_its_time_is_said_slow_while_redis_answers(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page past the UI's 5 s (the status of 1,000 workflows, a state filter over a million
    retained runs) was answered "Redis is unreachable" and logged so, though Redis answered
    (a scale probe). It says the page is too slow, and what to narrow; a silent Redis is
    still said unreachable."""
    import asyncio

    from aiohttp.test_utils import make_mocked_request
    from redis.asyncio import Redis

    from supersede.services import ui

    monkeypatch.setattr(ui, "REQUEST_TIMEOUT", 0.1)

    async def slow(request: object) -> None:
        await asyncio.sleep(1)

    resp = await ui._guard(None, redis)(make_mocked_request("GET", "/"), slow)
    assert resp.status == 503 and "took over 0.1 s though Redis answers" in resp.text, resp.text
    silent = Redis.from_url("redis://10.255.255.1:6379/0", socket_connect_timeout=5)
    try:
        resp = await ui._guard(None, silent)(make_mocked_request("GET", "/"), slow)
    finally:
        await silent.aclose()
    assert resp.status == 503 and "Redis is unreachable (no answer within 0.1 s)" in resp.text


def test_the_dashboard_answers_a_redis_failure_with_its_own_500_and_headers() -> None:
    """A Redis error that is no refusal of a right: the guard's 500 page with the security
    headers (it re-raised past them: aiohttp's bare 500)."""
    import asyncio

    from aiohttp.test_utils import make_mocked_request
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoPermissionError

    from supersede.services.ui import SECURITY_HEADERS, _guard

    guard = _guard(None)

    async def answer(exc: Exception) -> tuple[int, str, dict[str, str]]:
        async def handler(request: object) -> None:
            raise exc

        resp = await guard(make_mocked_request("POST", "/runs/1-a/cancel"), handler)
        return resp.status, resp.text, dict(resp.headers)

    # (the server's address stays in the log, not for visitors: a security probe)
    status, text, headers = asyncio.run(answer(RedisConnectionError("connecting to 10.1.2.3")))
    assert status == 503 and "Redis is unreachable" in text and "10.1.2.3" not in text
    assert all(headers.get(k) == v for k, v in SECURITY_HEADERS.items())
    assert headers["Cache-Control"] == "no-store"  # (inputs, outputs, the CSRF token)
    status, text, headers = asyncio.run(answer(RuntimeError("a fault")))
    assert status == 500 and "internal error" in text
    assert all(headers.get(k) == v for k, v in SECURITY_HEADERS.items())
    status, text, headers = asyncio.run(answer(NoPermissionError("NOPERM no evalsha")))
    assert status == 403 and "operator role" in text
    assert all(headers.get(k) == v for k, v in SECURITY_HEADERS.items())


def test_every_admission_outcome_is_exported_from_the_start() -> None:
    """A counter child made on its first increment appears at 1, and increase() misses that
    first increase: the dead-letter alert never fired for a rare rejection."""
    from prometheus_client import REGISTRY, generate_latest

    import supersede.services.admission.metrics  # noqa: F401 - registers them

    text = generate_latest(REGISTRY).decode()
    for line in ('supersede_admission_requests_total{outcome="rejected"}',
                 'supersede_admission_results_total{outcome="rejected"}'):  # fmt: skip
        assert line in text


def test_log_level_takes_any_case_and_refuses_other_words_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--log-level debug` (lower case, as most type it) ended in a traceback from logging."""
    from supersede.services.cli import build_parser

    assert build_parser().parse_args(["--log-level", "debug", "status"]).log_level == "DEBUG"
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--log-level", "LOUD", "status"])
    assert exit_.value.code == 2
    assert "--log-level: one of DEBUG, INFO, WARNING, ERROR, not 'LOUD'" in capsys.readouterr().err


def test_a_python_warning_is_a_json_log_line_naming_where() -> None:
    """A library's or a step's `warnings.warn` reached stderr as plain text among the JSON
    lines (a workflow-author probe)."""
    import json
    import subprocess

    code = "from supersede import logs; import warnings; logs.setup(); warnings.warn('old way')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    line = json.loads(lines[0])
    assert line["level"] == "warning" and line["msg"] == "UserWarning: old way", line
    assert line["where"] == "<string>:1"


def test_a_failure_that_repeats_is_logged_once_per_window_with_one_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server down made every service log a traceback every 0.25-0.5 s (1.8 MB per 25 s for
    four services). The same failure is written once per window, counted, and its traceback
    once."""
    from supersede import logs

    clock = [1000.0]
    monkeypatch.setattr("supersede.logs.time.monotonic", lambda: clock[0])
    repeats = logs.Repeats()

    def record() -> logging.LogRecord:
        try:
            raise ConnectionError("Connection refused")
        except ConnectionError:
            return logging.LogRecord(
                "supersede.x", logging.ERROR, "f", 1, "batch failed", (), sys.exc_info()
            )

    first = record()
    assert repeats.filter(first) and first.exc_info
    written = 0
    for _ in range(40):  # 10 s, every 0.25 s
        clock[0] += 0.25
        r = record()
        if repeats.filter(r):
            written += 1
            assert r.exc_info is None
            assert vars(r)["error"] == "ConnectionError: Connection refused"
            assert vars(r)["repeats"] > 0
    assert written == 2, written
    other = logging.LogRecord("supersede.x", logging.ERROR, "f", 1, "other failure", (), None)
    assert repeats.filter(other)
    # the same failure of another run (an extra field) is its own line; user code's logs and
    # an exception whose str() fails are written as they come
    for run in ("a", "b"):
        r = record()
        r.run = run
        assert repeats.filter(r)
    user = record()
    user.name = "payments"
    assert repeats.filter(user) and repeats.filter(user)
    # one outage whose errors alternate as the client meets it is one line per window (a
    # probe: 34 lines per executor for 12 s of refused connections)
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    lost = [RedisConnectionError("Connection closed by server."),
            RedisConnectionError("Error while reading from 10.0.0.1:6379 : (104, 'reset')"),
            RedisTimeoutError("Timeout reading from 10.0.0.1:6379"),
            ConnectionResetError(104)]  # fmt: skip
    written = 0
    for i in range(40):
        clock[0] += 0.25
        try:
            raise lost[i % len(lost)]
        except Exception:
            r = logging.LogRecord("supersede.y", logging.ERROR, "f", 1, "read failed", (),
                                  sys.exc_info())  # fmt: skip
        written += repeats.filter(r)
    assert written == 2, written

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    bad = logging.LogRecord("supersede.x", logging.ERROR, "f", 1, "m", (),
                            (Unprintable, Unprintable(), None))  # fmt: skip
    assert repeats.filter(bad) and repeats.filter(bad)

    # A refused command quotes its arguments, timestamps among them: each second's was
    # another text, so each wrote a traceback (a server at its maxmemory: 130 KB a minute)
    def refused(ms: int) -> logging.LogRecord:
        try:
            raise ConnectionError(f"OOM command not allowed (HSET served p-fast {ms})")
        except ConnectionError:
            return logging.LogRecord(
                "supersede.x", logging.ERROR, "f", 1, "registry check failed", (), sys.exc_info()
            )

    assert repeats.filter(refused(1796518052808))
    clock[0] += 1
    assert not repeats.filter(refused(1796518053808))


async def test_a_server_that_never_answers_is_named_as_such_not_as_a_tls_mismatch() -> None:
    """A stopped server (SIGSTOP) made every command say "rediss:// only for a server with
    TLS" for a plain redis:// URL; that hint is for a rediss:// URL only."""
    import redis as redis_sync

    from supersede.config import check_server
    from supersede.errors import ConfigError

    class Silent:
        async def ping(self) -> None:
            raise redis_sync.TimeoutError("Timeout reading from socket")

    for url, hint in (("redis://h:1/0", "never answers"), ("rediss://h:1/0", "rediss://")):
        with pytest.raises(ConfigError) as info:
            await check_server(Silent(), url)
        assert hint in str(info.value), str(info.value)
        assert "\n" not in str(info.value)


async def test_a_cluster_node_that_refuses_the_credentials_is_a_setting_not_an_outage() -> None:
    """A cluster master that does not answer the start's PING is an outage (a service waits,
    a command exits 1); one that refuses the credentials (ACL users are per node) or cannot be
    reached is a setting to fix: redis-py's AuthenticationError is a ConnectionError, and the
    first form of the outage check said a master was frozen (a review)."""
    import redis as redis_sync
    from redis.asyncio.cluster import RedisCluster

    from supersede.config import ClusterNodeSilent, check_server
    from supersede.errors import ConfigError

    class Node(RedisCluster):
        def __init__(self, exc: Exception) -> None:  # (no connection: ping raises `exc`)
            self.exc = exc

        async def ping(self, *args: Any, **kwargs: Any) -> Any:
            raise self.exc

    url = "redis+cluster://h:1"
    with pytest.raises(ConfigError, match="check the user and password"):
        await check_server(Node(redis_sync.AuthenticationError("invalid password")), url)
    # redis-py's cluster client words a refused password its own way: it said "no Redis
    # Cluster at ...; (redis+cluster:// only for a cluster)" (a security probe)
    refused = redis_sync.RedisClusterException(
        "Redis Cluster cannot be connected. Please provide at least one reachable node: "
        "invalid username-password pair or user is disabled."
    )
    with pytest.raises(ConfigError, match=r"refused the credentials.*check the user and password"):
        await check_server(Node(refused), url)
    with pytest.raises(ConfigError, match="cannot reach Redis"):
        await check_server(Node(redis_sync.ConnectionError("refused")), url)
    with pytest.raises(ClusterNodeSilent, match="did not answer"):
        await check_server(Node(redis_sync.TimeoutError("Timeout reading")), url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:Tr0ub4dorZZ#3xyz@127.0.0.1:1/0",
        "redis://app:Tr0ub4dorZZ?3xyz@127.0.0.1:1/0",
        "redis://app:Tr0ub4dorZZ[3xyz@127.0.0.1:1/0",
        "redis://app:Tr0ub4dorZZ]3xyz@127.0.0.1:1/0",
        "rediss://:Tr0ub4dorZZ#3xyz@127.0.0.1:1",
        "redis+cluster://app:Tr0ub4dorZZ#3xyz@127.0.0.1:1",
        # (a review: a port that parses, the rest taken for an option's name, or the host)
        "redis://app:7?Tr0ub4dorZZ=3xyz@127.0.0.1:1/0",
        "redis+cluster://app:7?Tr0ub4dorZZ=3xyz@127.0.0.1:1",
    ],
)
def test_a_url_the_client_cannot_read_is_one_line_with_no_part_of_its_password(url: str) -> None:
    """A password holding `#` or `?` made redis-py read its first part as the port, and its
    message ("Port could not be cast to integer value as 'Tr0ub4dorZZ'") was printed and
    logged; one holding `[` or `]` was a traceback ("Invalid IPv6 URL", a security probe).
    Each is one line naming SUPERSEDE_REDIS_URL, with the percent-encoding hint, and no part
    of the password; from the sync client too."""
    from supersede.config import Settings, connect, connect_sync
    from supersede.errors import ConfigError

    makers: list[Any] = [connect, connect_sync]
    if "7?" not in url:  # (a URL that parses, its query holding an `@`: the clients refuse it)
        makers.append(lambda u: Settings.from_env({"SUPERSEDE_REDIS_URL": u}))
    for make in makers:
        with pytest.raises(ConfigError) as info:
            make(url)
        said = str(info.value)
        assert "SUPERSEDE_REDIS_URL" in said and "\n" not in said, said
        assert "Tr0ub" not in said and "3xyz" not in said, said
        assert "percent-encoded" in said, said


def test_scrub_hides_every_part_of_a_password_an_error_may_quote() -> None:
    from supersede.config import scrub

    url = "redis://u:ab%23cd#ef/gh@h:1/0?password=qq-secret"
    text = "bad 'ab%23cd#ef/gh', 'ab#cd#ef/gh', 'ef', 'gh' and qq-secret at h:1 for u"
    assert scrub(text, url) == "bad '***', '***', '***', '***' and *** at h:1 for u"
    assert scrub("nothing to hide at h:1", "redis://h:1/0") == "nothing to hide at h:1"


def test_steps_called_with_their_context_are_accepted_however_they_are_made() -> None:
    """A decorator that injects an argument (functools.wraps) was refused: the signature
    checked was the wrapped function's, not the one called."""
    import functools

    from supersede.workflow import Workflow

    def with_session(f: Any) -> Any:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return f(*args, session="s", **kwargs)

        return wrapper

    class Callable_:
        def __call__(self, ctx: Any) -> None: ...

    def two(ctx: Any, extra: Any) -> None: ...

    def defaulted(ctx: Any, extra: int = 1, *, more: int = 2) -> None: ...

    def variadic(*args: Any) -> None: ...

    wf = Workflow("w", on_events=["e"])
    wf.step(name="wrapped")(with_session(two))
    wf.step(name="partial")(functools.partial(two, extra=1))
    wf.step(name="instance")(Callable_())
    wf.step(name="defaulted")(defaulted)
    wf.step(name="variadic")(variadic)
    assert [s.name for s in wf.definition().steps] == [
        "wrapped",
        "partial",
        "instance",
        "defaulted",
        "variadic",
    ]


def test_a_parent_is_named_by_its_function_whatever_it_was_registered_as() -> None:
    from supersede.errors import DefinitionError
    from supersede.workflow import Context, Workflow

    wf = Workflow("w", on_events=["e"])

    @wf.step(name="fetch-data")
    async def fetch(ctx: Context) -> int:
        return 1

    @wf.step(parents=[fetch])
    async def use(ctx: Context) -> None: ...

    assert wf.definition().steps[1].parents == ("fetch-data",)
    ctx = Context(run_id="r", workflow="w", attempt=1, input={}, metadata={},
                  step_names=wf.step_names)  # fmt: skip
    ctx.outputs["fetch-data"] = 1
    assert ctx.parent(fetch) == 1 and ctx.parent("fetch-data") == 1
    with pytest.raises(KeyError, match=r"no output of step 'use' here: .* \['fetch-data'\]"):
        ctx.parent(use)
    # one function registered under two names is neither (not the last one, silently)
    twice = Workflow("t", on_events=["e"])
    twice.step(name="a")(fetch)
    twice.step(name="b")(fetch)
    twice.step(parents=[fetch])(use)
    with pytest.raises(DefinitionError, match=r"steps\[2\].parents: unknown step 'fetch'"):
        twice.definition()


def test_a_test_marks_a_context_cancelled_to_run_a_step_s_cancelled_branch() -> None:
    """A test of a step's cancelled branch needed the private ctx._cancel() (a newcomer
    probe): `mark_cancelled()` sets the flag and wakes `wait_cancelled()`."""
    import asyncio

    from supersede.workflow import Context

    ctx = Context(run_id="r", workflow="w", attempt=1, input={}, metadata={})
    assert not ctx.cancelled

    assert asyncio.run(_marked_and_woken(ctx))


async def _marked_and_woken(ctx: Any) -> bool:
    """`mark_cancelled()` wakes a waiting `wait_cancelled()`; then `cancelled`."""
    import asyncio

    waiter = asyncio.ensure_future(ctx.wait_cancelled())
    await asyncio.sleep(0)
    ctx.mark_cancelled()
    await asyncio.wait_for(waiter, 5)
    return bool(ctx.cancelled)


def test_a_context_a_test_builds_names_a_function_two_workflows_share_by_its_workflow(
    tmp_path: Path,
) -> None:
    """One function registered as `load` in one workflow and as `fetch` in another: in a test's
    Context, `ctx.parent(fetch)` knew neither name (KeyError), though the run succeeded in
    production (an API-user probe). The Context's `workflow` names which."""
    from supersede.services.modules import load_workflows
    from supersede.workflow import Context

    (tmp_path / "shared_steps.py").write_text(
        "from supersede import Workflow\n"
        "a = Workflow('wf-a', on_events=['e'])\nb = Workflow('wf-b', on_events=['e'])\n"
        "def fetch(ctx):\n    return 1\n"
        "def use(ctx):\n    return ctx.parent(fetch) + 1\n"
        "a.step(name='load')(fetch)\na.step(parents=[fetch])(use)\n"
        "b.step(fetch)\nb.step(parents=[fetch])(use)\n"
    )
    try:
        load_workflows(str(tmp_path / "shared_steps.py"))
        module = sys.modules["shared_steps"]
        for workflow, name in (("wf-a", "load"), ("wf-b", "fetch")):
            ctx = Context(run_id="r", workflow=workflow, attempt=1, input={}, metadata={})
            ctx.outputs[name] = module.fetch(ctx)
            assert module.use(ctx) == 2
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if "shared_steps" in n]:
            del sys.modules[name]


def test_a_context_a_test_builds_finds_parents_by_function_and_serves_several_loops() -> None:
    """A second-week probe: `ctx.parent(fetch_doc)` of a step registered with `name='fetch'`
    raised KeyError in a test's Context (it knew no step names: only the executor's did);
    one Context used by two `asyncio.run` calls failed in `wait_cancelled()` ("attached to a
    different loop"); `retry_count` could not be given."""
    import asyncio

    from supersede.workflow import Context, Workflow

    wf = Workflow("ctx-names", on_events=["e"])

    def fetch_doc(ctx: Context) -> str:
        return "doc"

    def use(ctx: Context) -> str:
        return str(ctx.parent(fetch_doc)) + "!"

    wf.step(name="fetch")(fetch_doc)
    wf.step(parents=[fetch_doc])(use)
    ctx = Context(run_id="r", workflow="w", attempt=1, input={}, metadata={}, retry_count=1)
    ctx.outputs["fetch"] = fetch_doc(ctx)
    assert use(ctx) == "doc!" and ctx.retry_count == 1

    async def cancelled_within(seconds: float) -> bool:
        waiter = asyncio.ensure_future(ctx.wait_cancelled())
        await asyncio.sleep(0)
        done, _ = await asyncio.wait([waiter], timeout=seconds)
        waiter.cancel()
        return bool(done)

    assert not asyncio.run(cancelled_within(0.01))  # (a first loop made its waiter)

    assert asyncio.run(_marked_and_woken(ctx))


def test_publish_wait_shows_a_failed_run_s_error_not_its_partial_outputs() -> None:
    """A run whose second step failed showed the first step's output in the table, and not
    why it failed (an upgrade probe)."""
    from supersede.services import render

    rows = [
        {"run": "0-a", "workflow": "w", "key": "k", "state": "FAILED", "cancelled_by": None,
         "outputs": {"first": 1}, "error": "step 'second' failed: ValueError: boom"},
        {"run": "0-b", "workflow": "w", "key": "j", "state": "SUCCEEDED", "cancelled_by": None,
         "outputs": {"first": 2}, "error": ""},
    ]  # fmt: skip
    text = render.publish({"entry": "1-0", "runs": rows})
    failed, succeeded = (line for line in text.splitlines() if line.startswith("0-"))
    assert "ValueError: boom" in failed and "first" not in failed
    assert "first" in succeeded
    # a traceback: its first and last lines, not a line of \n's (a newcomer probe)
    rows[0]["error"] = ("step 'second' failed after 1 try:\nTraceback (most recent call last):\n"
                        '  File "flows.py", line 9, in second\n    raise ValueError("boom")\n'
                        "ValueError: boom\n")  # fmt: skip
    text = render.publish({"entry": "1-0", "runs": rows})
    assert "step 'second' failed after 1 try: ValueError: boom (supersede run shows" in text
    assert "\\n" not in text and "Traceback" not in text and "flows.py" not in text


def test_an_over_long_traceparent_is_no_parent_and_writes_no_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OpenTelemetry's propagator logs a warning for each traceparent over 512 characters: a
    producer's 5,000 such events wrote 20,000 lines (one per workflow), past the sampling of
    supersede's own lines. They are no parent, without a line."""
    from supersede import tracing

    valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert tracing.context_of(valid) is not None
    with caplog.at_level(logging.DEBUG):
        for _ in range(100):
            assert tracing.context_of(("00-" + "a" * 600).encode()) is None
            assert tracing.context_of(valid + "-" + "x" * 500) is None
    assert caplog.records == []


def test_ctrl_c_ends_a_command_whose_first_cancel_a_library_swallowed() -> None:
    """asyncio.run cancels the command once at Ctrl-C; redis-py's asyncio client may swallow a
    cancel that lands inside a call, and then `publish --wait` went on waiting for its run (a
    probe: one run in 18). The CLI cancels again until the command ends: exit 130, one line."""
    import subprocess
    import time

    script = """
import asyncio, os, signal, sys
from supersede.services.cli import _until_interrupted

async def stubborn() -> int:
    asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGINT)
    for _ in range(2):
        try:
            await asyncio.sleep(20)
        except asyncio.CancelledError:
            pass  # (what a library did with the first)
    await asyncio.sleep(20)
    return 0

sys.exit(asyncio.run(_until_interrupted(stubborn, [])))
"""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 130, done.stderr.decode()[-2000:]
    assert done.stderr == b"supersede: interrupted\n"
    assert time.monotonic() - started < 10  # (a cancel a second: the command took 20 s)


def test_a_probe_client_that_gave_up_writes_no_traceback(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A probe with a 1 s timeout against a paused process: socketserver printed a traceback
    of 21 lines, not JSON, to stderr for each (a probe). None now; another failure of a
    request is one log line."""
    from supersede import metrics

    server = metrics._Server(("127.0.0.1", 0), metrics._Handler)
    try:
        for gone in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")):
            try:
                raise gone
            except OSError:
                server.handle_error(None, ("127.0.0.1", 1))
        assert capsys.readouterr().err == "" and not caplog.records
        try:
            raise ValueError("bad request line")
        except ValueError:
            server.handle_error(None, ("127.0.0.1", 1))
        assert capsys.readouterr().err == ""
        [line] = caplog.records
        assert "ValueError: bad request line" in str(vars(line)["error"])
    finally:
        server.server_close()


def test_an_entry_with_an_empty_name_is_told_apart_from_one_without() -> None:
    """An empty `name` was dead-lettered with "the entry has no `name` field" (a probe)."""
    from supersede.services.ingress.service import BadEvent, parse_event

    for fields, said in (({b"data": b"{}"}, "no `name` field"),
                         ({b"name": b"", b"data": b"{}"}, "an empty `name`")):  # fmt: skip
        with pytest.raises(BadEvent) as refused:
            parse_event(b"1-0", fields, 1 << 20, 10)
        assert refused.value.reason == "missing_name" and refused.value.detail.endswith(said)


def test_a_bad_entry_s_detail_says_what_to_send_in_the_contract_s_words() -> None:
    """A newcomer probe: `unknown `encoding` b'xml'` (a bytes repr), msgpack's own words
    (`unpack(b) received extra data`, `when strict_map_key=True`), and `JSON` refused."""
    import msgpack

    from supersede.services.ingress.service import BadEvent, parse_event

    cases = [
        ({b"encoding": b"xml"}, "bad_encoding", "unknown `encoding` 'xml'; use json or msgpack"),
        ({b"encoding": b"msgpack", b"data": msgpack.packb({"a": 1}) + b"x"}, "bad_msgpack",
         "`data` is not one msgpack map: its first value is a dict, and bytes follow it"),
        # (JSON sent as msgpack, msgpackr's records: "bytes after its first value" said
        # neither, a producer probe)
        ({b"encoding": b"msgpack", b"data": b'{"a":1}'}, "bad_msgpack",
         "`data` is not one msgpack map: its first value is the integer 123: JSON text, its "
         "encoding is json, and bytes follow it"),
        ({b"encoding": b"msgpack", b"data": bytes.fromhex("d47240c1")}, "bad_msgpack",
         "`data` is not one msgpack map: its first value is an extension type 114 (msgpackr's "
         "records: pack with useRecords: false), and bytes follow it"),
        ({b"encoding": b"msgpack", b"data": msgpack.packb({1: 2})}, "bad_msgpack",
         "`data` has a map key that is not a string (keys are strings, as in JSON)"),
        ({b"encoding": b"msgpack", b"data": b"\xc1"}, "bad_msgpack",
         "`data` is not msgpack: FormatError"),
    ]  # fmt: skip
    for fields, reason, detail in cases:
        with pytest.raises(BadEvent) as refused:
            parse_event(b"1-0", {b"name": b"e", **fields}, 1 << 20, 10)
        assert (refused.value.reason, refused.value.detail) == (reason, detail)
    event = parse_event(b"1-0", {b"name": b"e", b"encoding": b"JSON", b"data": b'{"a": 1}'},
                        1 << 20, 10)  # fmt: skip
    assert event.data == {"a": 1}


def test_a_failed_pipeline_command_is_described_without_its_arguments() -> None:
    """redis-py quotes a failed pipeline command with its arguments: a refused results XADD
    put a run's outputs (raw msgpack) into the executor's log lines (a probe)."""
    from redis.exceptions import ResponseError

    from supersede.errors import describe

    exc = ResponseError(
        "Command # 1 (XADD {ns:0}:results * p \x93\xa3secret output) of pipeline caused error: "
        "OOM command not allowed when used memory > 'maxmemory'."
    )
    said = describe(exc)
    assert "secret" not in said and "XADD" not in said
    assert said == (
        "ResponseError: command 1 of a pipeline: OOM command not allowed when used memory > "
        "'maxmemory'."
    )


async def test_a_shard_past_the_deadline_is_left_out_with_its_masters_others_until_a_probe() -> (
    None
):
    """ShardHealth (a cluster's hot calls): a call past the deadline marks its shards and every
    other shard of their master silent; a call to a silent shard fails at once, and its
    coroutine never runs; the other master's shards are called as usual; an answered probe
    brings them back."""
    import asyncio
    import time
    import warnings

    from supersede import health
    from supersede.metrics import SHARDS_SILENT

    frozen = asyncio.Event()  # set: master "a" answers again (its pending calls too)

    class Node:
        def __init__(self, name: str) -> None:
            self.name = name

    class Cluster:
        def get_node_from_key(self, key: str) -> Node:
            return Node("a" if int(key) % 2 == 0 else "b")  # (even shards on master a)

        async def exists(self, key: str) -> int:
            if int(key) % 2 == 0:
                await frozen.wait()  # (answered once it thaws)
            return 0

    redis: Any = Cluster()
    h = health.ShardHealth(redis, str, enabled=True, deadline=0.2, service="test", shards=6)
    ran: list[int] = []

    async def call(shard: int, wait: float = 0.0) -> int:
        ran.append(shard)
        await asyncio.sleep(wait)
        return shard

    with pytest.raises(health.ShardSilent):
        await h.call([2], call(2, wait=3600))
    assert h.silent == {0, 2, 4} and SHARDS_SILENT.labels("test")._value.get() == 3
    began = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a coroutine closed unstarted warns of nothing)
        with pytest.raises(health.ShardSilent):
            await h.call([4], call(4))
    assert time.monotonic() - began < 0.1 and ran == [2]
    assert await h.call([1], call(1)) == 1 and h.up(1)
    out = await h.each({0: ([0], call(0)), 3: ([3], call(3))})
    assert isinstance(out[0], health.ShardSilent) and out[3] == 3
    await asyncio.sleep(2 * health.PROBE_EVERY)
    assert h.silent == {0, 2, 4}  # (the probes go unanswered)
    frozen.set()
    deadline = time.monotonic() + 5
    while h.silent and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not h.silent and SHARDS_SILENT.labels("test")._value.get() == 0
    assert await h.call([2], call(2)) == 2
    h.close()


async def test_a_deadline_passed_while_the_loop_was_held_marks_no_master_silent() -> None:
    """On a loaded host an executor's loop was held past its calls' deadline (0.5 s), their
    answers unread, and it marked every master silent in one millisecond with no fault (a
    cluster probe: 84 lines in 10 minutes, results sent to the streams). A call whose deadline
    timer ran late fails without marking its shards; a master that does not answer while the
    loop runs is still found silent."""
    import asyncio
    import time

    from supersede import health

    class Cluster:
        def get_node_from_key(self, key: str) -> Any:
            return type("N", (), {"name": "n"})()

        async def exists(self, key: str) -> int:
            return 0

    redis: Any = Cluster()
    h = health.ShardHealth(redis, str, enabled=True, deadline=0.2, service="test", shards=2)

    async def answered(shard: int) -> int:
        await asyncio.sleep(0.05)  # (answered in time; read only once the loop runs again)
        return shard

    loop = asyncio.get_running_loop()
    loop.call_later(0.01, time.sleep, 0.6)  # (the loop held: a starved CPU, a blocking call)
    with pytest.raises(health.ShardSilent):
        await h.call([0], answered(0))
    assert h.silent == set()
    assert await h.call([0], answered(0)) == 0
    with pytest.raises(health.ShardSilent):
        await h.call([1], asyncio.sleep(3600))  # (no answer, the loop free: silent)
    assert h.silent == {1}  # (its master answers a probe: only its shard, see the next test)
    h.close()


async def test_a_call_past_its_deadline_on_a_master_that_answers_leaves_out_only_its_shards() -> (
    None
):
    """A slot left half moved: the client retries its TRYAGAIN past the deadline, and the
    master's every shard was left out, flapping, while it answered everything else (a
    cluster probe: five shards held for ten minutes by one stuck slot). A master that answers
    a probe at once is not silent: only the call's shards are left out; a master that does
    not answer is, with all its shards."""
    import asyncio

    from supersede import health

    frozen = asyncio.Event()

    class Cluster:
        def get_node_from_key(self, key: str) -> Any:
            return type("N", (), {"name": "n"})()  # (one master for every shard)

        async def exists(self, key: str) -> int:
            if frozen.is_set():
                await asyncio.sleep(3600)
            return 0

    redis: Any = Cluster()
    h = health.ShardHealth(redis, str, enabled=True, deadline=0.2, service="test", shards=4)
    with pytest.raises(health.ShardSilent):
        await h.call([2], asyncio.sleep(3600))  # (a call that never ends: TRYAGAIN retried)
    assert h.silent == {2}
    assert await h.call([1], asyncio.sleep(0, result=1)) == 1
    h.close()
    h = health.ShardHealth(redis, str, enabled=True, deadline=0.2, service="test", shards=4)
    frozen.set()
    with pytest.raises(health.ShardSilent):
        await h.call([2], asyncio.sleep(3600))
    assert h.silent == {0, 1, 2, 3}
    h.close()


def test_a_runs_timeline_labels_overlap_none_and_stay_inside() -> None:
    """Points at one ms were labelled on top of each other ("created" over "running": read
    "cruated") and the last label was cut at the bar's right edge (a UI probe)."""
    import re

    from supersede.services.ui.pages import bar

    px = 6.2  # (a character of its 11 px labels, about: pages.LABEL_CHAR_PX)

    points = [("created", 0.0), ("assigned", 0.0), ("running", 0.0), ("cancel decided", 686.2),
              ("ended", 5948.4)]  # fmt: skip
    svg = bar(points, width=900)
    labels = [(float(x), int(y), text) for x, y, text in
              re.findall(r'<text x="([0-9.]+)" y="([0-9]+)">([^<]+)</text>', svg)]  # fmt: skip
    assert len(labels) == 5
    spans = [(y, x, x + len(text) * px) for x, y, text in labels]
    for i, (y, a0, a1) in enumerate(spans):
        assert a1 <= 900, labels[i]
        for y2, b0, b1 in spans[i + 1 :]:
            assert y != y2 or a1 <= b0 or b1 <= a0, (labels, i)
    height = int(re.search(r'<svg class=timeline width="900" height="([0-9]+)"', svg)[1])
    assert height >= max(y for _, y, _ in labels) + 4


def test_the_streams_of_a_stream_read_are_found_without_asking_a_node() -> None:
    """A cluster client places XREAD and XREADGROUP itself (redis-py asked its default node,
    COMMAND GETKEYS, before every read: a silent default node held every read)."""
    from supersede.config import stream_keys

    assert stream_keys(
        "XREADGROUP", ["GROUP", "streams", "c", "COUNT", 5, "STREAMS", "a", "b", ">", ">"]
    ) == ["a", "b"]
    assert stream_keys("xread", [b"COUNT", 1, b"BLOCK", 100, b"streams", b"s", b"0-0"]) == [b"s"]
    assert stream_keys("XREAD", ["COUNT", 1]) == ()


async def test_a_probe_refused_by_the_users_rights_still_ends_a_silence() -> None:
    """A refusal is an answer: ingress's ACL user may not run EXISTS, and its probes were
    refused (NOPERM) for ever, its silent shards never back (a review)."""
    import asyncio
    import time

    from redis.exceptions import NoPermissionError

    from supersede import health

    class Refusing:
        def get_node_from_key(self, key: str) -> Any:
            return type("N", (), {"name": "a"})()

        async def exists(self, key: str) -> int:
            raise NoPermissionError("this user has no permissions to run the 'exists' command")

    redis: Any = Refusing()
    h = health.ShardHealth(redis, str, enabled=True, deadline=0.1, service="test", shards=2)
    h.went_silent([0], TimeoutError())
    assert h.silent == {0, 1}
    deadline = time.monotonic() + 5
    while h.silent and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not h.silent
    h.close()


def test_text_that_reorders_or_hides_itself_is_shown_escaped_in_tables_and_pages() -> None:
    """A key holding U+202E (a right-to-left override) printed its table row reversed, and
    the web pages sent it and a NUL raw (an observability probe). Shown escaped, as control
    characters are; a value a form sends back (a key to cancel) stays whole."""
    from supersede.services.render import printable
    from supersede.services.ui import pages

    hostile = "a\u202eb\x00c\u200bd\u2066e"
    assert printable(hostile) == "a\\u202eb\\x00c\\u200bd\\u2066e"
    assert pages.esc(hostile) == "a\\u202eb\\x00c\\u200bd\\u2066e"
    assert pages.attr(hostile) == hostile and pages.esc("<&>") == "&lt;&amp;&gt;"
    form, _ = pages.runs([], ["w"], {"state": "SUCCEEDED"}, None)
    assert '<option value="succeeded" selected>' in form  # (it showed "any")


async def test_a_service_tells_the_servers_clock_and_warns_when_its_own_is_far_off(
    redis: Any, caplog: Any, monkeypatch: Any
) -> None:
    """Debounce timers and entry ids are the server's time (see ServerClock): a host a minute
    behind is told the server's time, and its clock's offset is logged once."""
    import logging
    import time

    from supersede.service import ServerClock

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 60)
    clock = ServerClock(logging.getLogger("supersede.test"))
    with caplog.at_level(logging.WARNING, logger="supersede"):
        await clock.refresh(redis)
        await clock.refresh(redis)  # (not read again within the minute)
    assert abs(clock.now_ms() - real() * 1000) < 1_000
    [line] = [r.getMessage() for r in caplog.records]
    assert "+60" in line and "off the Redis server's" in line


async def test_a_clock_offset_within_the_reads_error_is_taken_as_none(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One host, or hosts kept by NTP: the offset read with TIME is the read's own error (half
    its round trip, more under a busy loop), and stamping with it put a run's "ingress read"
    before its inbox entry. Within that error plus a ms it is none; past it, it is kept."""
    import logging
    import time

    from supersede import service
    from supersede.service import ServerClock, server_now

    for _ in range(20):
        clock = ServerClock(logging.getLogger("supersede.test"))
        await clock.refresh(redis)
        assert clock.offset_ms == 0.0
    assert abs(server_now() - time.time()) < 0.001

    real = time.time
    with monkeypatch.context() as patched:
        patched.setattr(time, "time", lambda: real() - 0.05)
        clock = ServerClock(logging.getLogger("supersede.test"))
        await clock.refresh(redis)
        assert 45 < clock.offset_ms < 55
    # a read the server refuses (or does not answer) is none: the offset found is kept (it
    # fell back to this host's clock, the shortest round trip, and wiped it for a minute)
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def refused() -> None:
        raise RedisConnectionError("gone")

    monkeypatch.setattr(redis, "time", refused)
    clock._due = type(clock._due)(0.0)
    await clock.refresh(redis)
    assert 45 < clock.offset_ms < 55
    service._offset_ms = 0.0  # (the process's: other tests stamp on)


async def test_a_failed_pipelines_arguments_are_never_written_to_the_logs(redis: Any) -> None:
    """redis-py quotes a failed pipeline command's arguments in its message: event data and
    outputs, written with the first traceback of a failure (a probe: an outage's first line
    quoted the event's data). The logs name the command by its number."""
    import io

    from supersede import logs

    async with redis.pipeline(transaction=False) as pipe:
        pipe.set("test:logs:k", "v")
        pipe.lpush("test:logs:k", "card-4242-4242")
        try:
            await pipe.execute()
        except Exception:
            exc_info = sys.exc_info()
    await redis.delete("test:logs:k")
    assert "card-4242-4242" in str(exc_info[1])  # (redis-py's message quotes it)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    repeats = logs.Repeats()
    handler.addFilter(repeats)
    log = logging.getLogger("supersede.test.pipeline")
    log.addHandler(handler)
    try:
        for _ in range(2):
            log.error("batch failed", exc_info=exc_info)
        repeats._seen = {k: [v[0] - 10, v[1], v[2]] for k, v in repeats._seen.items()}
        log.error("batch failed", exc_info=exc_info)  # (a repeat: its `error` field)
    finally:
        log.removeHandler(handler)
    written = stream.getvalue()
    assert written.count("\n") == 2 and "command 2 of a pipeline" in written, written
    assert "card-4242" not in written, written


async def test_a_periodic_task_a_silent_master_failed_leaves_its_service_ready(
    redis: Any, redis_url: str, namespace: str
) -> None:
    """On a cluster with a master gone silent, admission's trim (every shard's streams) timed
    out and made admission not ready, for as long as the master was silent, while it admitted
    and ended runs on the other shards (a probe: SupersedeAdmissionDown's expression true,
    a critical "no run is admitted, none ends"). SupersedeShardsSilent says it: a task failed
    by a silent shard's timeout leaves the service ready; with no shard silent, it does not."""
    import asyncio

    from redis.exceptions import TimeoutError as RedisTimeoutError

    from supersede import metrics
    from supersede.config import Settings
    from supersede.service import Service

    class Probe(Service):
        name = "probe-ready"

    service = Probe(redis, Settings(redis_url=redis_url, namespace=namespace, shards=4))
    stop = asyncio.Event()

    async def trim() -> None:
        stop.set()
        raise RedisTimeoutError("Timeout reading from a silent master")

    metrics.report("probe-ready", "read", True)
    service.health.silent.add(2)
    await service._every(stop, 0.01, trim)
    assert metrics._READY["probe-ready"] is True
    service.health.silent.clear()
    stop.clear()
    await service._every(stop, 0.01, trim)
    assert metrics._READY["probe-ready"] is False
    metrics.report("probe-ready", "trim", True)


async def test_a_periodic_task_the_server_did_not_answer_is_tried_again_soon(
    redis: Any, redis_url: str, namespace: str
) -> None:
    """A service is not ready until each of its periodic tasks went through once; one the
    server did not answer was tried again at its own interval (5 s for the trims), so a
    service stayed not ready for 3-6 s after a link healed (a probe at a distance). It is
    tried again within FAILED_TASK_RETRY (0.5 s); a failure that is no outage waits its
    interval."""
    import asyncio
    import time

    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError

    from supersede import metrics
    from supersede.config import Settings
    from supersede.service import Service

    class Probe(Service):
        name = "probe-retry"

    service = Probe(redis, Settings(redis_url=redis_url, namespace=namespace, shards=1))
    metrics.report("probe-retry", "read", True)
    for error, soon in ((RedisConnectionError("Connection closed by server."), True),
                        (ResponseError("ERR a bug"), False)):  # fmt: skip
        stop = asyncio.Event()
        tries: list[float] = []

        async def trim(tries: list[float] = tries, error: Exception = error) -> None:
            tries.append(time.monotonic())
            if len(tries) == 1:
                raise error

        task = asyncio.create_task(service._every(stop, 30.0, trim))
        deadline = time.monotonic() + 2.0
        while len(tries) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        await task
        assert (len(tries) == 2) is soon, (error, tries)
        assert metrics._READY["probe-retry"] is soon, error
    metrics.report("probe-retry", "trim", True)


async def test_a_service_told_to_stop_is_not_ready_while_it_drains(
    redis: Any, redis_url: str, namespace: str
) -> None:
    """Under `supersede serve`, ingress stopped at once on SIGTERM and /readyz still said 200
    for the executor's drain (4 s, up to --drain-timeout; a probe): a service is not ready
    from the moment it is told to stop, though its calls go through while it drains, and is
    ready again once started anew."""
    import asyncio

    from supersede import metrics
    from supersede.config import Settings
    from supersede.service import Service

    draining = asyncio.Event()
    drained = asyncio.Event()

    class Probe(Service):
        name = "probe-drain"

        async def main(self, stop: asyncio.Event) -> None:
            await stop.wait()
            draining.set()
            while not drained.is_set():  # (its batches still go through)
                self.healthy()
                await asyncio.sleep(0.01)

    for _ in range(2):
        service = Probe(redis, Settings(redis_url=redis_url, namespace=namespace, shards=1))
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        for _ in range(1000):
            if metrics._READY.get("probe-drain") is True:
                break
            await asyncio.sleep(0.01)
        assert metrics._READY.get("probe-drain") is True
        stop.set()
        await asyncio.wait_for(draining.wait(), 10)
        await asyncio.sleep(0.05)
        assert metrics._READY["probe-drain"] is False
        drained.set()
        await asyncio.wait_for(task, 10)
        assert metrics._READY["probe-drain"] is False
        draining.clear()
        drained.clear()
    metrics.stopping("probe-drain", False)
    metrics._READY.pop("probe-drain")


def test_a_tests_context_needs_only_what_the_step_reads() -> None:
    """`Context(input=...)` failed with a TypeError naming four required keywords (run_id,
    workflow, attempt, metadata) a test of a step has no use for (an author probe)."""
    from supersede.workflow import Context

    ctx = Context(input={"docId": "d1"})
    assert (ctx.input, ctx.metadata, ctx.attempt, ctx.retry_count) == ({"docId": "d1"}, {}, 1, 0)
    assert Context().input == {} and Context().run_id


def test_a_decorated_step_or_hook_keeps_its_type_and_parentheses_are_optional() -> None:
    """`@wf.step()` returned `Callable[[Context], Any]`: a test calling a step saw Any (mypy
    accepted `reply(ctx)["text"]` on an async step: an API probe). The function is returned
    as it is, its type kept (`make lint` checks the assert_type lines), with or without the
    decorator's parentheses (`@wf.step` failed the import: "takes 1 positional argument")."""
    import asyncio
    import functools
    from collections.abc import Coroutine
    from typing import assert_type

    from supersede.workflow import Context, Workflow, is_async_callable

    wf = Workflow("typed", on_events=["e"])

    @wf.step()
    async def reply(ctx: Context) -> dict[str, str]:
        return {"text": "hi"}

    @wf.step
    def store(ctx: Context) -> int:
        return 1

    @wf.on_cancel()
    def hook(ctx: Context) -> None:
        return None

    class Later:
        async def __call__(self, ctx: Context) -> str:
            return "later"

    wf.step(name="later", parents=[reply])(Later())
    wf.step()(functools.partial(Later()))  # (named by its class, not its repr)
    ctx = Context(run_id="r", workflow="typed", attempt=1, input={}, metadata={})
    replied = assert_type(reply(ctx), Coroutine[Any, Any, dict[str, str]])
    assert asyncio.run(replied) == {"text": "hi"}
    assert assert_type(store(ctx), int) == 1
    assert [(s.name, s.parents, s.is_async) for s in wf.steps] == [
        ("reply", (), True),
        ("store", (), False),
        ("later", ("reply",), True),
        ("Later", (), True),
    ]
    assert wf.cancel_hook is hook and wf.definition().id == "typed"
    assert not is_async_callable(store) and not is_async_callable(Later)
    assert is_async_callable(Later()) and is_async_callable(reply)


def test_acl_apply_warns_of_passwords_a_url_must_encode_and_short_ones() -> None:
    """`acl --apply` set `ab#cd` and `a` without a word, though the processes' URLs must
    percent-encode the one and the other is guessed at once (a security probe)."""
    from supersede.acl import password_warnings

    said = password_warnings({"reader": "ab#cd", "executor": "x" * 16, "keda": "p@ss/w0rd?[]%:xx"})
    assert len(said) == 3, said
    assert said[0].startswith("SUPERSEDE_ACL_PASSWORD_READER holds #") and "%23" in said[0]
    assert "SUPERSEDE_ACL_PASSWORD_READER has 5 characters" in said[1]
    assert all(f"%{ord(c):02X}" in said[2] for c in "/?[]@%"), said[2]
    assert "%3A" not in said[2]  # (a `:` in a password parses: no warning for it)
    assert not any("EXECUTOR" in line for line in said)


def test_table_columns_stay_aligned_past_wide_characters_and_combining_marks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key of CJK characters or emoji (two columns each in a terminal) or with a combining
    mark (none) pushed the columns after it out of line (a new-user probe): every row's next
    column starts at the same terminal column, and a cut keeps within its width."""
    import unicodedata

    from supersede.services.render import table

    def columns(text: str) -> int:
        return sum(0 if unicodedata.combining(c) else
                   2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)  # fmt: skip

    keys = ["ab", "日本語キー", "🎉🎉", "e\u0301te"]
    lines = table([[k, "x"] for k in keys], ["key", "v"]).splitlines()
    starts = {columns(line[: line.rindex("x" if i else "V")]) for i, line in enumerate(lines)}
    assert len(starts) == 1, lines
    monkeypatch.setenv("COLUMNS", "60")
    wide = table([["日" * 40, "n" * 40, "end"]], ["a", "b", "c"]).splitlines()[1]
    assert columns(wide) <= 60 and "…" in wide, wide


async def test_a_deadline_round_a_run_of_redis_calls_fires(redis_url: str) -> None:
    """redis-py sends each command through asyncio.wait_for when the connection has a socket
    timeout (5 s by default since redis-py 8), and Python 3.11's wait_for loses a cancel that
    comes as the awaited call completes: a loop of PINGs under `asyncio.timeout(0.3)` ran its
    20,000 calls (2 s) and returned, and the dashboard's 5 s bound on a page never fired (a
    probe: 11 s). `supersede.aio.mend_redis` (applied by `supersede.config`) gives redis-py
    Python 3.12's wait_for, and the services use `supersede.aio.wait_for`."""
    from supersede.aio import wait_for
    from supersede.config import connect

    client = connect(redis_url)
    try:
        for _ in range(3):
            began, calls = time.monotonic(), 0
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    for _ in range(200_000):
                        await client.ping()
                        calls += 1
            assert time.monotonic() - began < 1.0, calls
        # (the same for a cancel from outside: the task ends, it does not go on)
        task = asyncio.ensure_future(_pings(client))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await wait_for(task, 1.0)

        async def slow() -> int:
            await asyncio.sleep(5)
            return 1

        with pytest.raises(TimeoutError):
            await wait_for(slow(), 0.05)
        assert await wait_for(asyncio.sleep(0, 7), None) == 7
    finally:
        await client.aclose()


async def _pings(client: Any) -> None:
    for _ in range(200_000):
        await client.ping()


async def test_a_master_that_refuses_the_user_makes_the_process_not_ready_until_it_takes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cluster master whose ACL users were changed (a password set on one node, a node
    without its users) answers every call with AuthenticationError, which the client's
    retries make a timeout: its shards went silent, and the process stayed ready, its
    refusals read as a silence (a cluster probe: /readyz 200 for 27 s, runs not started). The
    probe of a silent shard that is refused makes it not ready, in one line, until it is
    answered."""
    import asyncio
    import logging
    from typing import cast

    from redis.exceptions import AuthenticationError

    from supersede import health, metrics

    refusal: list[BaseException | int] = [AuthenticationError("invalid password")]
    answers = refusal * 2 + [1]

    class Cluster:
        async def exists(self, key: str) -> int:
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
            if isinstance(answer, BaseException):
                raise answer
            return answer

        def get_node_from_key(self, key: str) -> Any:
            return type("Node", (), {"name": "m1"})()

    h = health.ShardHealth(cast(Any, Cluster()), str, enabled=True, deadline=0.1,
                           service="refused-test", shards=2)  # fmt: skip
    metrics.set_ready(True, "refused-test")
    caplog.set_level(logging.ERROR, logger="supersede")
    h.went_silent([0], TimeoutError())
    deadline = asyncio.get_running_loop().time() + 10
    while metrics._READY["refused-test"] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert metrics._READY["refused-test"] is False
    said = [r.getMessage() for r in caplog.records if "refuses this process's user" in r.message]
    assert len(said) == 1, said
    while h.silent and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert not h.silent and metrics._READY["refused-test"] is True
    h.close()


def test_a_retire_says_one_live_run_in_the_singular() -> None:
    """ "1 live runs cancelled" (a newcomer probe)."""
    from supersede.services.render import retired

    assert "1 live run cancelled" in retired({"retired": "w", "cancelled": 1})
    assert "2 live runs cancelled now" in retired({"retired": "w", "cancelled": 2, "before": 1})


def test_the_key_page_axis_ends_at_the_last_end_once_every_run_ended() -> None:
    """The axis ran from the first run to now: runs of an hour ago were one-pixel slivers and
    the red tick of a cancel could not be told (a newcomer probe). While a run is live it
    runs to now."""
    from supersede.services.ui import pages

    hour = 3_600_000
    ended = [
        {"id": "0-a", "state": "CANCELLED", "created_ms": 1_000, "ended_ms": 3_700,
         "cancel_decided_ms": 3_600, "claimed_ms": None, "cancelled_by": "0-b"},
        {"id": "0-b", "state": "SUCCEEDED", "created_ms": 3_500, "ended_ms": 11_000,
         "cancel_decided_ms": None, "claimed_ms": None},
    ]  # fmt: skip
    k = {"key": "k", "workflow": "w", "max_runs": 1, "strategy": "CANCEL_IN_PROGRESS",
         "slots": 0, "runs": ended, "at_ms": hour}  # fmt: skip
    assert "+10.0 s</text>" in pages.key(k, None)
    live = [*ended, {**ended[1], "id": "0-c", "state": "RUNNING", "ended_ms": None}]
    assert f"+{(hour - 1_000) / 1000:.1f} s</text>" in pages.key({**k, "runs": live}, None)


def test_a_table_cell_shows_its_new_lines_and_control_characters_escaped_in_its_width() -> None:
    """A key holding a new line printed as a space; one holding ESC or U+202E was escaped after
    the widths were taken, so its row's columns drifted (a CLI probe)."""
    from supersede.services.render import printable, table

    rows = [["nl\nkey", "x"], ["\x1b[31m\u202e", "y"], [{"o": "\u202e\x7f"}, "w"],
            ["plain", "z"]]  # fmt: skip
    text = printable(table(rows, ["key", "next"]))
    lines = text.splitlines()
    assert "nl\\nkey" in lines[1] and "\\x1b[31m\\u202e" in lines[2]
    assert len({line.index(v) for line, v in zip(lines[1:], "xywz", strict=True)}) == 1, text


def test_a_run_whose_entry_id_is_ahead_of_the_clock_shows_its_hops_from_the_ingress_read() -> None:
    """A producer's own entry id (`XADD <inbox> 99999999999999-0 ...`) is no publish time: the
    run's path showed every hop after it as negative (a probe's max-id event)."""
    from supersede.services.render import run as render_run

    ahead = 99_999_999_999_999
    points = ["ingress read", "request written", "admission read", "assigned"]
    path = [{"point": "published", "at_ms": ahead}]
    path += [{"point": p, "at_ms": 1_700_000_000_000 + i * 0.25} for i, p in enumerate(points)]
    view = {"id": "1-a", "workflow": "w", "version": "v", "key": "k", "state": "ASSIGNED",
            "attempt": 1, "event_id": "e", "timeline": [], "path": path}  # fmt: skip
    text = render_run(view)
    assert "path (ms after the ingress read; each hop's share):" in text, text
    assert "its entry id is" in text and "ahead of the ingress read" in text
    shown = [line for line in text.splitlines() if line.startswith("  ") and " ms" in line]
    assert len(shown) == 4 and not any("-" in line for line in shown), shown
    assert "(+0.250 ms)" in shown[1]
    # an ordinary run: from its publication, the first hop up to 1 ms early (whole ms)
    path[0]["at_ms"] = 1_700_000_000_000
    text = render_run(view)
    assert "path (ms after it was published; each hop's share):" in text
    assert "ahead" not in text
    # a reading host's clock 2 ms behind the server's is a skew, shown as it is (a review)
    path[0]["at_ms"] = 1_700_000_000_002
    text = render_run(view)
    assert "ahead" not in text and "-2.000 ms  (-2.000 ms)" in text, text


async def test_a_shard_whose_calls_fail_while_its_master_answers_is_left_out_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slot left half moved: a multi-key call gets TRYAGAIN, which redis-py retries until
    "TTL exhausted" (a ClusterError), raised to the loop that made the call; an executor's
    claim of that shard failed each read, and no run of any shard started (a cluster probe).
    The shard alone is left out, for FAILING_FIRST seconds, doubling while its calls fail
    (each taking its time: a review found the hold reset when a failing call took over a
    second), and counted until one goes through; said once, and again when it goes through.
    A cluster down as a whole is the loop's to retry, not one shard's."""
    import asyncio
    import logging

    from redis.exceptions import ClusterDownError, ClusterError

    from supersede import health
    from supersede.metrics import SHARDS_SILENT

    class Cluster:
        def get_node_from_key(self, key: str) -> Any:
            return type("N", (), {"name": "n"})()  # (one master for every shard)

        async def exists(self, key: str) -> int:
            return 0

    async def stuck() -> int:
        await asyncio.sleep(0.2)  # (16 tries refused, at a distance)
        raise ClusterError("TTL exhausted.")

    redis: Any = Cluster()
    h = health.ShardHealth(redis, str, enabled=True, deadline=5.0, service="test", shards=4)
    said: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = said.append  # type: ignore[method-assign,assignment]
    logging.getLogger("supersede").addHandler(handler)
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(health, "FAILING_FIRST", 0.25)  # (holds of 0.25, 0.5, 1, 2 s)
    try:
        with pytest.raises(health.ShardSilent):
            await h.call([2], stuck())
        assert h.silent == {2}  # (its master's other shards go on)
        assert await h.call([1], asyncio.sleep(0, result=1)) == 1
        out = await h.each({2: ([2], asyncio.sleep(0, result=2)), 3: ([3], asyncio.sleep(0))})
        assert isinstance(out[2], health.ShardSilent) and 3 in out
        monkeypatch.setattr(health, "FAILING_QUIET", 0.3, raising=False)
        holds = []
        began = loop.time()
        for _ in range(3):  # (each hold ends, the call fails again: twice as long)
            while not h.up(2):
                await asyncio.sleep(0.01)
            holds.append(loop.time() - began)
            assert SHARDS_SILENT.labels("test")._value.get() == 1  # (between holds too)
            # a slot partly served: a single-key call goes through, a multi-key one fails
            assert await h.call([2], asyncio.sleep(0, result=2)) == 2
            assert 2 in h.held  # (it ended the failing each time: no hold grew, a probe)
            with pytest.raises(health.ShardSilent):
                await h.call([2], stuck())
            began = loop.time()
        assert 0.2 < holds[0] < 0.7 and 0.45 < holds[1] < 0.95 and 0.95 < holds[2] < 1.6, holds
        lines = [r for r in said if "fail though their master answers" in r.getMessage()]
        assert len(lines) == 1 and "TTL exhausted" in str(lines[0].__dict__["error"])
        while not h.up(2):
            await asyncio.sleep(0.01)
        # a failing shard's call waits FAILING_DEADLINE at most (a failing one held the
        # calls of other shards gathered with it), and fails as failing: held again
        began = loop.time()
        with pytest.raises(health.ShardSilent):
            await h.call([2], asyncio.sleep(3600))
        assert loop.time() - began < 1.0 and not h.up(2)
        while not h.up(2):
            await asyncio.sleep(0.01)
        assert await h.call([2], asyncio.sleep(0, result=2)) == 2  # (the slot was fixed)
        assert 2 in h.held  # (quiet for FAILING_QUIET past the hold, first)
        await asyncio.sleep(0.35)
        assert await h.call([2], asyncio.sleep(0, result=2)) == 2
        assert not h.held and SHARDS_SILENT.labels("test")._value.get() == 0
        assert sum("go through again" in r.getMessage() for r in said) == 1
        # a cluster down as a whole: raised, no shard held
        with pytest.raises(ClusterDownError):
            await h.call([0], _raises(ClusterDownError("The cluster is down")))
        assert not h.held
        with pytest.raises(health.ShardSilent):  # (a slot no master serves: that shard's)
            await h.call([0], _raises(ClusterDownError("Hash slot not served")))
        assert h.held == {0}
        # a failing shard no call reaches again is failing no more after a while
        monkeypatch.setattr(health, "FAILING_FORGET", 0.1)
        with pytest.raises(health.ShardSilent):
            await h.call([3], stuck())
        deadline = loop.time() + 5
        while 3 in h.held and loop.time() < deadline:
            await asyncio.sleep(0.02)
        assert 3 not in h.held
    finally:
        logging.getLogger("supersede").removeHandler(handler)
        h.close()


async def _raises(exc: BaseException) -> None:
    raise exc
