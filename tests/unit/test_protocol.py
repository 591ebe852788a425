"""The wire protocol: the Lua scripts and supersede.protocol use the same names and letters."""

from __future__ import annotations

import hashlib
import re

import pytest

from supersede import codec, protocol
from supersede.keys import WORKFLOW_TAG_LEN, workflow_tag
from supersede.protocol import (
    REQUEST_FIELDS,
    RunRecord,
    RunState,
    Strategy,
    dead_letter,
    original_fields,
    pack_request,
    parse_assignment,
    parse_cancel,
)
from supersede.scripts import SCRIPT_NAMES, load_source

SOURCES = {name: load_source(name)[0] for name in SCRIPT_NAMES}
ALL_LUA = "\n".join(SOURCES.values())


def _code(text: str) -> str:
    """The Lua without its comments (the header blocks quote field names as prose)."""
    text = re.sub(r"--\[\[.*?\]\]", "", text, flags=re.DOTALL)
    return re.sub(r"--[^\n]*", "", text)


CODE = _code(ALL_LUA)


def test_every_state_letter_in_the_scripts_is_a_run_state_and_back() -> None:
    quoted = set(re.findall(r"'([A-Z])'", CODE))  # single capitals are state letters only
    table = re.search(r"local OUTCOMES = \{([^}]*)\}", SOURCES["finish"])
    assert table is not None
    outcomes = set(re.findall(r"(\w) = true", table.group(1)))
    assert outcomes == {o.value for o in protocol.Outcome}
    assert quoted | outcomes == {s.value for s in RunState}


def test_every_record_field_the_scripts_touch_is_declared() -> None:
    used = set(re.findall(r"\brec\.(\w+)", CODE))
    used |= set(re.findall(r"\brec\[\'(\w+)\'\]", CODE))  # (rec['in']: `in` is a Lua keyword)
    created = re.search(r"local rec = \{(.*?)\}", SOURCES["admit"], re.DOTALL)
    assert created is not None
    used |= set(re.findall(r"(\w+) = ", created.group(1)))
    assert used, "no record field found: the pattern no longer matches the scripts"
    assert used <= set(protocol.RECORD_FIELDS), used - set(protocol.RECORD_FIELDS)


def test_every_request_field_the_scripts_read_is_packed() -> None:
    read = set(re.findall(r"\bq\.(\w+)", CODE)) | set(re.findall(r"q\['(\w+)'\]", CODE))
    fields = {*REQUEST_FIELDS, *protocol.DEBOUNCE_FIELDS, protocol.SCOPED_FIELD}
    assert read and read <= fields, read - fields
    args = ("1-x", "g" * 16, "0" * 32, "w", "v", "k", "e", 1, Strategy.CANCEL_IN_PROGRESS)
    packed = codec.unpack(pack_request(*args, False, 3, b""))
    assert tuple(packed) == REQUEST_FIELDS


def test_stream_fields_written_by_the_scripts_match_the_protocol() -> None:
    xadds = re.findall(r"rcall\('XADD',([^)]*)\)", CODE, re.DOTALL)
    assert len(xadds) >= 3
    fields = {
        "assignments": [protocol.Assignment.RUN_ID, protocol.Assignment.ATTEMPT],
        "control": [protocol.Control.OP, protocol.Control.RUN_ID, protocol.Control.ATTEMPT,
                    protocol.Control.BY, protocol.Control.WHY, protocol.Control.DECIDED_US],
        "requests": [protocol.PAYLOADS, protocol.WRITTEN],
    }  # fmt: skip
    seen = {}
    for call in xadds:
        names = [n.encode() for n in re.findall(r"'([a-z]+)',", call + ",")]
        if "assignStream" in call:
            seen["assignments"] = names[: len(fields["assignments"])]
        elif "controlKey" in call:
            seen["control"] = [n for n in names if n != protocol.Control.CANCEL]
        elif "requestsKey" in call:
            seen["requests"] = names
    assert seen == fields
    assert re.search(r"'op', '" + protocol.Control.CANCEL.decode() + "'", CODE)


def test_the_scripts_name_assignment_streams_as_keys_py_does() -> None:
    """keys.workflow_tag is sha1 hex cut to WORKFLOW_TAG_LEN; the scripts compute the same."""
    assert f"string.sub(redis.sha1hex(rec.w), 1, {WORKFLOW_TAG_LEN})" in CODE
    assert workflow_tag("chat") == hashlib.sha1(b"chat").hexdigest()[:WORKFLOW_TAG_LEN]


def test_reason_codes_recorded_by_the_scripts_are_known() -> None:
    quoted = set(re.findall(r"'([a-z]+_[a-z_]+|superseded|manual)'", CODE))
    assert {"superseded", "no_slot", "lease_expired"} <= quoted
    reasons = {r.value for r in protocol.Reason}
    assert quoted - {"cancel"} <= reasons, quoted - reasons


def test_strategy_codes_are_those_the_scripts_branch_on() -> None:
    assert {s.code for s in Strategy} == {1, 2, 3, 4, 5}
    assert "sg == 1" in CODE and "sg == 2" in CODE  # CANCEL_IN_PROGRESS, CANCEL_NEWEST
    assert protocol.STRATEGY_CODES[Strategy.CANCEL_IN_PROGRESS] == 1
    assert protocol.STRATEGY_CODES[Strategy.CANCEL_NEWEST] == 2


def test_a_record_decodes_into_the_typed_view() -> None:
    raw = codec.pack({"st": "X", "g": "g" * 16, "s": "0" * 32, "w": "wf", "v": "1", "k": "u1",
                      "ev": "e1", "mx": 2, "sg": 1, "sx": 1, "a": 2, "m": 3, "e": "exec-1",
                      "t0": 10, "t1": 11, "t2": 12, "tc": 13, "by": "3-abc",
                      "why": "superseded"})  # fmt: skip
    rec = RunRecord.decode(b"3-x", raw)
    assert rec.id == "3-x" and rec.state is RunState.CANCELLING and rec.strict
    assert (rec.workflow, rec.key, rec.attempt, rec.max_runs) == ("wf", "u1", 2, 2)
    assert (rec.cancelled_by, rec.reason, rec.executor) == ("3-abc", "superseded", "exec-1")
    assert (rec.created_ms, rec.cancel_decided_ms, rec.ended_ms, rec.error) == (10, 13, None, None)


def test_assignment_and_cancel_messages_parse() -> None:
    assert parse_assignment({b"id": b"1-a", b"a": b"2"}) == ("1-a", 2)
    with pytest.raises(KeyError):
        parse_assignment({b"x": b"1"})
    assert parse_cancel({b"op": b"cancel", b"id": b"1-a", b"a": b"3"}) == ("1-a", 3)
    assert parse_cancel({b"op": b"cancel", b"id": b"1-a"}) == ("1-a", None)
    assert parse_cancel({b"op": b"other", b"id": b"1-a"}) is None


def test_a_dead_letter_keeps_the_original_fields_for_replay() -> None:
    fields = {b"name": b"chat", b"data": b"{}"}
    body = dead_letter(fields, b"1-0", protocol.Reason.BAD_JSON, "x" * 5000, workflow="wf")
    assert body["reason"] == "bad_json" and len(body["detail"]) == 2000
    # at most 2,000 bytes, not characters (2,000 emoji made a 25 KB letter), never a character
    # cut: 1,999 bytes of four-byte characters is 499 of them
    detail = "\U0001f600" * 2000
    body = dead_letter(fields, b"1-0", protocol.Reason.BAD_ENCODING, detail)
    assert body["detail"] == "\U0001f600" * 500
    body = dead_letter(fields, b"1-0", protocol.Reason.BAD_ENCODING, "x" + detail)
    assert body["detail"] == "x" + "\U0001f600" * 499
    as_stored = {(k.encode() if isinstance(k, str) else k): v for k, v in body.items()}
    assert original_fields(as_stored) == fields


def test_a_dead_letter_keeps_original_fields_named_like_its_own_apart() -> None:
    """A producer's `workflow` or `stream` field made a whole event's letter read as one
    workflow's or admission's (`wait_for_run(entry=...)` missed it), and its `reason` was
    overwritten by the letter's: they are kept as `~workflow`, `~reason`, ..."""
    fields = {b"name": b"chat", b"data": b"{", b"workflow": b"w", b"reason": b"mine",
              b"stream": b"s", b"~x": b"tilde", b"truncated": b"no"}  # fmt: skip
    body = dead_letter(fields, b"1-0", protocol.Reason.BAD_JSON, "bad")
    as_stored = {(k.encode() if isinstance(k, str) else k): v for k, v in body.items()}
    assert as_stored[b"reason"] == "bad_json" and b"workflow" not in as_stored
    assert b"stream" not in as_stored and b"truncated" not in as_stored
    assert as_stored[b"~reason"] == b"mine" and as_stored[b"~~x"] == b"tilde"
    assert as_stored[b"escaped"] == "1"
    assert original_fields(as_stored) == fields
    # a letter with no such field is not marked (an older build's CLI replays it as it is);
    # one of a build before the escaping keeps its fields' names, `~` and all
    plain = dead_letter({b"name": b"chat", b"data": b"{"}, b"1-0", protocol.Reason.BAD_JSON, "")
    assert "escaped" not in plain
    older = {b"name": b"chat", b"~k": b"v", b"reason": b"bad_json", b"entry": b"1-0"}
    assert original_fields(older) == {b"name": b"chat", b"~k": b"v"}


def test_a_dead_letter_of_a_flood_of_fields_or_one_huge_name_stays_small_and_unreplayable() -> None:
    """A name that alone is past the room is left out and the letter still says it was cut
    (so it cannot be replayed); a flood of fields is kept to 64 and its names to 1 KiB, at the
    cost of a few hundred of them, not all (300,000 took ingress two seconds)."""
    from supersede.services.executor.steps import capped_error

    huge = dead_letter({b"n" * 20_000: b"x"}, b"1-0", protocol.Reason.TOO_LARGE, "d")
    assert huge[protocol.Dead.TRUNCATED] == "" and not [k for k in huge if isinstance(k, bytes)]
    flood = dead_letter({f"f{i}".encode(): b"v" for i in range(300_000)}, b"1-0",
                        protocol.Reason.TOO_LARGE, "d")  # fmt: skip
    assert len([k for k in flood if isinstance(k, bytes)]) == protocol.Dead.FIELDS_MAX
    assert len(flood[protocol.Dead.TRUNCATED].encode()) <= protocol.Dead.TRUNCATED_MAX
    assert len(capped_error("x" * 100_000, 10).encode()) == 10  # (a limit below the note's room)
