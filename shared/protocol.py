"""The wire protocol between the services, in one place.

Everything that crosses a stream or sits in a run record is named here: consumer groups, stream
field names, run-state letters, outcome and strategy codes, dead-letter fields and reason codes,
with the helpers that pack and unpack them. Ingress, admission, the executor, the operator
commands and the dev console use these names; none of them spells a field as a literal.

The Lua scripts (lua/) keep their own literals, as Lua must; tests/unit/test_protocol.py reads
the scripts and checks that both sides use the same names and letters (design invariant 4 rests
on it: the model and the scripts must mean the same thing by a state).

Streams (keys in `supersede.keys`):

| stream | group | fields |
|---|---|---|
| `<ns>:events` (public inbox) | `ingress` | `name`, `data`, `id`, `metadata`, `encoding` |
| `{<ns>:<shard>}:requests` | `admission` | `r`: msgpack `RunRequest` |
| `{<ns>:<shard>}:assignments` | `executors` | `id` run id, `a` attempt |
| `{<ns>:<shard>}:control` | | `op` = `cancel`, `id`, `a`, `by`, `why` |
| `{<ns>:<shard>}:results` | `admission` | `r`: msgpack `RunResult` |
| `<ns>:dead` | | the original fields, `reason`, `detail`, `entry` [, `stream`, `workflow`] |
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from supersede import codec

# -- consumer groups ------------------------------------------------------------------------------
INGRESS_GROUP = "ingress"
ADMISSION_GROUP = "admission"
EXECUTOR_GROUP = "executors"

Entry = tuple[bytes, dict[bytes, bytes]]
"""One stream entry as redis-py returns it: (entry id, field -> value)."""
StreamReply = list[tuple[bytes, list[Entry]]]
"""An XREAD/XREADGROUP reply: (stream name, entries) per stream."""


# -- stream fields --------------------------------------------------------------------------------
class Inbox:
    """Fields of an inbox entry: the public contract any Redis client may XADD."""

    NAME = b"name"
    DATA = b"data"
    ID = b"id"
    METADATA = b"metadata"
    ENCODING = b"encoding"
    JSON = b"json"
    MSGPACK = b"msgpack"
    TRACEPARENT = b"traceparent"  # optional W3C trace context: the run's spans continue it
    # optional: the one workflow of those listening to `name` that the event is for (a replayed
    # dead letter of one workflow's key error is not for the others, which made their runs)
    ONLY_WORKFLOW = b"only_workflow"
    # every field of the contract; others are ignored, counted and said (a typo: `metdata`)
    FIELDS = frozenset((NAME, DATA, ID, METADATA, ENCODING, TRACEPARENT, ONLY_WORKFLOW))
    MAX_ID_BYTES = 1024  # an `id` is 1..this many bytes of UTF-8
    MAX_FIELDS = 64  # an entry with more fields is refused (too_large)
    MAX_BYTES = 1 << 20  # ingress's --max-payload unless set: a larger entry is too_large


# The config hash field where admission publishes its assignment deadline (ms) for the finish
# calls of executors.
ASSIGN_DEADLINE_FIELD = "assign_deadline_ms"
PAYLOAD = b"r"
"""The field of results entries (and of requests entries an earlier ingress wrote) that holds
the item: a msgpack map."""
PAYLOADS = b"rs"
"""The field of requests entries that holds their items: a msgpack array of packed requests,
all that one ingress call appended to the shard (one entry per call, not per request)."""
WRITTEN = b"t"
"""Requests entries only: when the request was written, epoch µs (lua/append_requests.lua)."""


def request_payloads(fields: dict[bytes, bytes]) -> list[bytes] | None:
    """The packed requests of a requests-stream entry, of either form (PAYLOADS, or one
    PAYLOAD); None when it holds neither, or a PAYLOADS that is no array of byte strings."""
    many = fields.get(PAYLOADS)
    if many is None:
        one = fields.get(PAYLOAD)
        return None if one is None else [one]
    try:
        items = msgpack.unpackb(many, raw=True)  # (packed as raw strings: see codec)
    except Exception:
        return None
    if not isinstance(items, list) or not all(isinstance(x, bytes) for x in items):
        return None
    return items


class Assignment:
    """Fields of an assignments entry (written by the scripts)."""

    RUN_ID = b"id"
    ATTEMPT = b"a"
    RUNG = b"r"  # b"1": the writer rang the stream's bell for it (absent: no bell came)


class Control:
    """Fields of a control entry (written by the scripts; every executor XREADs them)."""

    OP = b"op"
    CANCEL = b"cancel"
    RUN_ID = b"id"
    ATTEMPT = b"a"
    BY = b"by"
    WHY = b"why"
    BY_TRACEPARENT = b"btp"  # the superseding run's trace context (only when it is traced)
    DECIDED_US = b"du"  # when the cancel was decided, server µs (the entry id has whole ms)


class Dead:
    """Fields a dead letter adds to the entry it copies."""

    REASON = "reason"
    DETAIL = "detail"
    ENTRY = "entry"
    STREAM = "stream"  # set for refused requests and results; inbox events have none
    WORKFLOW = "workflow"
    TRUNCATED = "truncated"  # names of the original fields cut or left out, comma separated
    ESCAPED = "escaped"  # "1": an original field's name is escaped (see ESCAPE)

    FIELD_MAX = 4096  # bytes of each original field a dead letter keeps
    TOTAL_MAX = 16_384  # bytes of original fields (names and values) a dead letter keeps in all
    FIELDS_MAX = 64  # original fields a dead letter keeps at most
    TRUNCATED_MAX = 1024  # bytes of the names listed in TRUNCATED (whole names only)
    DETAIL_MAX = 2000  # bytes of the detail (UTF-8; never a character split)
    ADDED = frozenset(
        f.encode() for f in (REASON, DETAIL, ENTRY, STREAM, WORKFLOW, TRUNCATED, ESCAPED)
    )
    # An original field named like one of ADDED, or starting with ESCAPE, is kept as ESCAPE +
    # its name, and the letter says so in ESCAPED (a producer's `workflow` field made a whole
    # event's letter read as one workflow's; its `reason` was overwritten). Only such a letter
    # is unescaped: one of a build before, or without such a field, is replayed as it is.
    ESCAPE = b"~"


class Reason(enum.StrEnum):
    """Reason codes: of dead letters, and of cancellations recorded on runs."""

    # inbox events ingress refuses
    TOO_LARGE = "too_large"
    MISSING_NAME = "missing_name"
    REPEATED_FIELD = "repeated_field"  # a field name given twice in one entry
    BAD_ENCODING = "bad_encoding"
    BAD_ID = "bad_id"
    BAD_JSON = "bad_json"
    BAD_MSGPACK = "bad_msgpack"
    KEY_ERROR = "key_error"
    KEY_TOO_LARGE = "key_too_large"
    MAX_RUNS_ERROR = "max_runs_error"  # a dynamic max_runs failed or gave no 1..10000 integer
    INTERNAL = "internal"  # handling the entry raised; the detail names the exception
    # entries the scripts refuse (supersede.errors maps the codes)
    MALFORMED = "malformed"
    UNKNOWN_RUN = "unknown_run"
    WRONG_SHARD = "wrong_shard"
    BAD_ARGUMENTS = "bad_arguments"
    # why a run ended without succeeding (the record's `why`)
    SUPERSEDED = "superseded"
    NO_SLOT = "no_slot"
    MANUAL = "manual"
    RETIRED = "retired"  # `supersede retire` cancelled it with its workflow
    EXECUTOR = "executor"  # the executor reported the attempt cancelled
    LEASE_EXPIRED = "lease_expired"
    HANDED_BACK = "handed_back"  # drains stopped it past its free hand-backs and its attempts


# The reasons ingress dead-letters an inbox entry for (its counter exports each from the start)
INBOX_REASONS = (Reason.TOO_LARGE, Reason.MISSING_NAME, Reason.REPEATED_FIELD, Reason.BAD_ENCODING,
                 Reason.BAD_ID, Reason.BAD_JSON, Reason.BAD_MSGPACK, Reason.KEY_ERROR,
                 Reason.KEY_TOO_LARGE, Reason.MAX_RUNS_ERROR, Reason.INTERNAL)  # fmt: skip


# -- states and codes -----------------------------------------------------------------------------
class RunState(enum.StrEnum):
    """States as stored in run records (one letter on the wire, to keep records small)."""

    QUEUED = "Q"
    ASSIGNED = "A"
    RUNNING = "R"
    CANCELLING = "X"
    SUCCEEDED = "S"
    FAILED = "F"
    CANCELLED = "C"

    @property
    def terminal(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)

    @property
    def live(self) -> bool:
        """A run that a manual cancel can still stop (CANCELLING is already stopping)."""
        return self in (RunState.QUEUED, RunState.ASSIGNED, RunState.RUNNING)


class Strategy(enum.StrEnum):
    """Per-group limit strategies (see docs/design.md, "Strategies")."""

    CANCEL_IN_PROGRESS = "CANCEL_IN_PROGRESS"
    CANCEL_NEWEST = "CANCEL_NEWEST"
    GROUP_ROUND_ROBIN = "GROUP_ROUND_ROBIN"
    CANCEL_QUEUED_EXCEPT_NEWEST = "CANCEL_QUEUED_EXCEPT_NEWEST"
    CANCEL_QUEUED_EXCEPT_OLDEST = "CANCEL_QUEUED_EXCEPT_OLDEST"

    @property
    def code(self) -> int:
        """The number the scripts know the strategy by (a request's `st`, a record's `sg`)."""
        return STRATEGY_CODES[self]


STRATEGY_CODES = {
    Strategy.CANCEL_IN_PROGRESS: 1,
    Strategy.CANCEL_NEWEST: 2,
    Strategy.GROUP_ROUND_ROBIN: 3,
    Strategy.CANCEL_QUEUED_EXCEPT_NEWEST: 4,
    Strategy.CANCEL_QUEUED_EXCEPT_OLDEST: 5,
}


class Outcome(enum.StrEnum):
    """What an executor reports for one attempt of a run."""

    SUCCEEDED = "S"
    FAILED = "F"
    CANCELLED = "C"


# -- run requests (ingress -> admission) ----------------------------------------------------------
REQUEST_FIELDS = ("id", "g", "s", "w", "v", "k", "ev", "max", "st", "x", "m", "in", "iu", "u", "tp")
DEBOUNCE_FIELDS = ("db", "dw")  # only in requests of a debounced workflow (ms: window, longest)
"""Keys of a packed run request, read by lua/admit.lua (lua/includes/validate.lua)."""
SCOPED_FIELD = "sc"  # 1, only in requests of a workflow with a scope (its groups span versions)


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What ingress appends to a shard's requests stream for one (event, workflow)."""

    run_id: str
    group: str
    seq: str
    workflow: str
    version: str
    key: str
    event_id: str
    max_runs: int
    strategy: Strategy
    strict: bool = False
    max_attempts: int = 3
    input: bytes = b""
    ingress_read_us: int = 0  # when ingress read the event, µs (a point of the path); 0: unknown
    unlimited: bool = False  # the workflow has no concurrency limit: no group, assigned at once
    traceparent: str = ""  # the run's trace context (tracing on), else ''
    debounce_ms: int = 0  # > 0: the run waits for its group's debounce window
    max_wait_ms: int = 0
    scoped: bool = False  # its workflow has a scope: its group may hold runs of other versions

    def pack(self) -> bytes:
        return pack_request(
            self.run_id, self.group, self.seq, self.workflow, self.version, self.key,
            self.event_id, self.max_runs, self.strategy, self.strict, self.max_attempts,
            self.input, self.ingress_read_us, self.unlimited, self.traceparent,
            self.debounce_ms, self.max_wait_ms, self.scoped,
        )  # fmt: skip


class RequestPacker:
    """Packs the run requests of one workflow version; its constant fields are encoded once.

    Produces the same map as `pack_request` (a test checks it), at about half the
    cost, because ingress packs one request per event and workflow.
    """

    __slots__ = ("_head", "_tail")

    def __init__(
        self,
        workflow: str,
        version: str,
        max_runs: int | None,
        strategy: Strategy,
        strict: bool,
        max_attempts: int,
        unlimited: bool = False,
        debounce_ms: int = 0,
        max_wait_ms: int = 0,
        scoped: bool = False,
    ) -> None:
        """`max_runs` None: computed per event (a dynamic limit), given to each `pack`."""
        constant: dict[str, Any] = {
            "w": workflow,
            "v": version,
            "max": max_runs,
            "st": STRATEGY_CODES[strategy],
            "x": 1 if strict else 0,
            "m": max_attempts,
            "u": 1 if unlimited else 0,
        }
        if max_runs is None:
            del constant["max"]
        if debounce_ms:
            constant.update(db=debounce_ms, dw=max_wait_ms)
        if scoped:
            constant[SCOPED_FIELD] = 1
        self._tail = b"".join(codec.pack(k) + codec.pack(v) for k, v in constant.items())
        # the map's header: 8 fields per request, the constant ones, and max when per request
        size = 8 + len(constant) + (1 if max_runs is None else 0)
        self._head = bytes([0x80 | size]) if size < 16 else b"\xde" + size.to_bytes(2, "big")

    def pack(
        self,
        rid: str,
        group: str,
        seq: str,
        key: str,
        event_id: str,
        payload: bytes,
        read_us: int = 0,
        traceparent: str = "",
        max_runs: int | None = None,
    ) -> bytes:
        """One request; `max_runs` only for a packer made without one (a dynamic limit)."""
        p = codec.pack
        limit = b"" if max_runs is None else b"\xa3max" + p(max_runs)
        return b"".join(
            (
                self._head, b"\xa2id", p(rid), b"\xa1g", p(group), b"\xa1s", p(seq),
                b"\xa1k", p(key), b"\xa2ev", p(event_id), b"\xa2in", p(payload),
                b"\xa2iu", p(read_us), b"\xa2tp", p(traceparent), limit, self._tail,
            )
        )  # fmt: skip


def pack_request(
    rid: str,
    group: str,
    seq: str,
    workflow: str,
    version: str,
    key: str,
    event_id: str,
    max_runs: int,
    strategy: Strategy,
    strict: bool,
    max_attempts: int,
    payload: bytes,
    ingress_read_us: int = 0,
    unlimited: bool = False,
    traceparent: str = "",
    debounce_ms: int = 0,
    max_wait_ms: int = 0,
    scoped: bool = False,
) -> bytes:
    """The wire form of a run request (read by lua/admit.lua); `ingress_read_us` is when
    ingress read the event (µs; 0: unknown), kept as a point of the run's path; `unlimited`: the
    workflow has no concurrency limit (the run is assigned at once, outside any group);
    `scoped`: the workflow has a scope (its groups span versions, whose strategies may differ)."""
    return codec.pack(
        {
            "id": rid,
            "g": group,
            "s": seq,
            "w": workflow,
            "v": version,
            "k": key,
            "ev": event_id,
            "max": max_runs,
            "st": STRATEGY_CODES[strategy],
            "x": 1 if strict else 0,
            "m": max_attempts,
            "in": payload,
            "iu": ingress_read_us,
            "u": 1 if unlimited else 0,
            "tp": traceparent,
            **({"db": debounce_ms, "dw": max_wait_ms} if debounce_ms else {}),
            **({SCOPED_FIELD: 1} if scoped else {}),
        }
    )


def pack_input(data: Any, metadata: Any, event: str, event_id: str) -> bytes:
    """A run's input as stored beside its record and handed to the executor on claim: with
    msgpack's bin type, so that the bytes of an event's msgpack data reach its handler as
    bytes (no script reads it: the scripts keep it as one opaque string)."""
    return codec.pack_value(
        {"input": data, "metadata": metadata, "event": event, "event_id": event_id}
    )


def unpack_input(raw: bytes) -> dict[str, Any]:
    """Inverse of `pack_input`; an empty input is an empty map."""
    body = codec.unpack(raw) if raw else {}
    return body if isinstance(body, dict) else {}


# -- results (executor -> finish script) ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RunResult:
    """An executor's outcome of one attempt: applied by its own finish call, or appended to a
    shard's results stream for admission when that call does not take it."""

    run_id: str
    attempt: int
    outcome: Outcome
    error: str = ""
    outputs: bytes | None = None  # msgpack map: step name -> output (ended runs keep it)
    handler_started_us: int = 0  # a point of the run's path (µs); 0: the handler never started

    def pack(self) -> bytes:
        body: dict[str, Any] = {"id": self.run_id, "a": self.attempt, "o": self.outcome.value}
        if self.error:
            body["err"] = self.error
        if self.outputs is not None:
            body["out"] = self.outputs
        if self.handler_started_us:
            body["hu"] = self.handler_started_us
        return codec.pack(body)


# -- assignments and control (scripts -> executors) -----------------------------------------------
def parse_assignment(fields: dict[bytes, bytes]) -> tuple[str, int]:
    """(run id, attempt) of an assignments entry; KeyError/ValueError when it is not one."""
    return fields[Assignment.RUN_ID].decode(), int(fields[Assignment.ATTEMPT])


def assignment_rung(fields: dict[bytes, bytes]) -> bool:
    """Whether the writer of an assignments entry rang the stream's bell for it."""
    return fields.get(Assignment.RUNG) == b"1"


def parse_cancel(fields: dict[bytes, bytes]) -> tuple[str, int | None] | None:
    """(run id, attempt or None for any attempt) of a cancel message; None for another op."""
    if fields.get(Control.OP) != Control.CANCEL:
        return None
    return fields.get(Control.RUN_ID, b"").decode(), int(fields.get(Control.ATTEMPT, 0)) or None


# -- run records ----------------------------------------------------------------------------------
RECORD_FIELDS = {
    "st": "state letter (RunState)",
    "g": "group id",
    "s": "sequence (encode_seq of the inbox entry id)",
    "w": "workflow id",
    "v": "workflow version",
    "k": "key value; absent when it equals the event id (every run without a limit)",
    "ev": "event id",
    "mx": "max_runs of the group",
    "u": "1: the workflow has no concurrency limit (no slot, queue or active zset entry)",
    "tp": "the run's W3C traceparent (its ingress span), only when traced",
    "sg": "strategy code (absent on a run without a limit)",
    "sx": "1: strict mode (absent when off)",
    "sc": "1: its workflow has a scope, so its group may keep a queue of another version's "
    "strategy (absent without one)",
    "a": "attempt",
    "m": "max attempts",
    "hb": "hand-backs by draining executors (the first 10 use none of the max attempts)",
    "hq": "1 from a hand-back until the run's next claim (which tells the executor)",
    "e": "executor that claimed the attempt",
    "ea": "the last 5 earlier attempts, each [attempt, executor, claimed (µs after the inbox "
    "entry, 0: not known), ended ms, reason]: their lease lapsed, or a draining executor "
    "handed them back",
    "in": "the run's input while it is live, when at most 1 KiB (else in the inputs hash)",
    "h": "1 while a CANCELLING run still holds its slot (strict mode)",
    "ra": "the reaper's looks at an unclaimed ASSIGNED attempt (each writes a fresh assignment "
    "entry unless the last one still waits unread)",
    "c": "1: counted in the shard's counts hash (every run created since it exists)",
    "tr": "ms of the last of those",
    "ai": "id of the run's last assignment entry, until its claim (the reaper's: was it "
    "delivered?)",
    "t0": "created ms",
    "t1": "assigned ms (the reaper's; also point pg of the path, in µs)",
    "t2": "claimed ms (records from before the path; point pc now, removed when claimed)",
    "tc": "cancel decided ms",
    "t3": "ended ms",
    "by": "id of the newer run that superseded this one",
    "pi": "ingress read the event, µs after the inbox entry's ms (a point of the path)",
    "pw": "request written to the shard stream (server clock), µs after the inbox entry",
    "pa": "admission read the request, µs after the inbox entry",
    "pg": "assigned (server clock), µs after the inbox entry: the last attempt's",
    "pe": "executor read the assignment, µs after the inbox entry",
    "pc": "claimed (server clock), µs after the inbox entry",
    "px": "cancel decided (server clock), µs after the inbox entry (tc in µs)",
    "ph": "handler started, µs after the inbox entry",
    "er": "executor read, ms after the inbox entry (records from before the path; claim drops it)",
    "hs": "handler started, ms after the inbox entry (the same)",
    "why": "reason code (Reason) of a cancel or failure",
    "err": "error text of a failed attempt",
}
"""Keys of a run record (msgpack map in the runs hash), as lua/includes/runs.lua writes them."""

PATH_POINTS = (
    ("ingress read", "pi"), ("request written", "pw"), ("admission read", "pa"),
    ("assigned", "pg"), ("executor read", "pe"), ("claimed", "pc"), ("handler started", "ph"),
)  # fmt: skip
"""The points of a run's path after its publication, in order, with their record keys (µs after
the inbox entry's ms)."""

OLD_PATH_FIELDS = {"ir": "pi", "rw": "pw", "ar": "pa", "er": "pe", "hs": "ph"}
"""Record keys of records written before the path was kept in µs: the same points in ms (and
t1/t2, assigned/claimed epoch ms)."""


def _opt_str(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _opt_int(value: Any) -> int | None:
    return int(value) if value not in (None, "", 0) else None


def decode_seq(seq: str) -> str:
    """Inverse of `model.encode_seq`: the stream id '<ms>-<seq>' of a 32-digit sequence."""
    return f"{int(seq[:16], 16)}-{int(seq[16:], 16)}"


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run record decoded: the one reading of the runs hash for the CLI and dev console."""

    id: str
    state: RunState
    workflow: str
    version: str
    key: str
    group: str
    seq: str
    event_id: str
    attempt: int  # every start counts, hand-backs included
    max_attempts: int
    max_runs: int  # 0: the workflow has no concurrency limit
    strict: bool
    executor: str | None
    cancelled_by: str | None
    reason: str | None
    error: str | None
    created_ms: int | None
    assigned_ms: int | None
    claimed_ms: int | None
    cancel_decided_ms: float | None  # (µs in the fraction, from px; whole ms from tc before it)
    ended_ms: int | None
    points: dict[str, int] = field(default_factory=dict)  # PATH_POINTS key -> µs after inbox
    hand_backs: int = 0  # times a draining executor stopped it and handed it back (hb)
    earlier: tuple[EarlierAttempt, ...] = ()  # how the last earlier attempts ended (ea)

    @property
    def entry(self) -> str | None:
        """The inbox entry of its event ('<ms>-<seq>', as the sequence encodes it), None for a
        sequence of another form."""
        seq = self.seq
        if len(seq) != 32 or not all(c in "0123456789abcdef" for c in seq):
            return None
        return decode_seq(seq)

    def path(self) -> list[tuple[str, float]]:
        """The run's way through the system, (point, epoch ms with µs in the fraction) in order:
        published (the inbox entry's ms: the first step carries up to 1 ms of its rounding),
        read by ingress, request written, read by admission, assigned, read by an executor,
        claimed, handler started, ended (whole ms); points not recorded are left out. The last
        attempt's points; three clocks (services' for reads, the server's for writes), so skew
        between machines shifts them."""
        published = int(self.seq[:16], 16) if len(self.seq) >= 16 else None
        if published is None:
            return []
        path: list[tuple[str, float]] = [("published", published)]
        for name, key in PATH_POINTS:
            if key in self.points:
                path.append((name, published + self.points[key] / 1000))
        if self.ended_ms:
            path.append(("ended", self.ended_ms))
        return path

    @classmethod
    def decode(cls, rid: str | bytes, raw: bytes | str) -> RunRecord:
        """Decode one HGET/HSCAN value of the runs hash."""
        return cls.from_map(rid, codec.unpack(codec.blob(raw)))

    @classmethod
    def from_map(cls, rid: str | bytes, rec: dict[str, Any]) -> RunRecord:
        return cls(
            id=rid.decode() if isinstance(rid, bytes) else rid,
            state=RunState(rec["st"]),
            workflow=str(rec.get("w", "")),
            version=str(rec.get("v", "")),
            key=str(rec["k"] if "k" in rec else rec.get("ev", "")),
            group=str(rec.get("g", "")),
            seq=str(rec.get("s", "")),
            event_id=str(rec.get("ev", "")),
            attempt=int(rec.get("a", 1)),
            max_attempts=int(rec.get("m", 1)),
            max_runs=0 if rec.get("u") == 1 else int(rec.get("mx", 1)),
            strict=rec.get("sx") == 1,
            executor=_opt_str(rec.get("e")),
            cancelled_by=_opt_str(rec.get("by")),
            reason=_opt_str(rec.get("why")),
            error=_opt_str(rec.get("err")),
            created_ms=_opt_int(rec.get("t0")),
            assigned_ms=_opt_int(rec.get("t1")),
            claimed_ms=_opt_int(rec.get("t2")) or _at(rec, "pc"),
            cancel_decided_ms=_at_us(rec, "px") or _opt_int(rec.get("tc")),
            ended_ms=_opt_int(rec.get("t3")),
            points=_points(rec),
            hand_backs=int(rec.get("hb", 0)),
            earlier=_earlier(rec),
        )


@dataclass(frozen=True, slots=True)
class EarlierAttempt:
    """An attempt of a run that ended when another started: its lease lapsed (`reason`
    lease_expired: its executor died, hung or was cut off) or its draining executor handed it
    back (handed_back)."""

    attempt: int
    executor: str
    claimed_ms: int | None
    ended_ms: int
    reason: str


def _earlier(rec: dict[str, Any]) -> tuple[EarlierAttempt, ...]:
    out = []
    published = _inbox_ms(rec)
    for item in rec.get("ea") or ():
        if not isinstance(item, list) or len(item) < 5:  # (a later version's shape: skipped)
            continue
        attempt, executor, claimed_us, ended, why = item[:5]
        claimed = None
        if published is not None and _num(claimed_us) and claimed_us > 0:
            claimed = published + int(claimed_us) // 1000
        out.append(EarlierAttempt(int(attempt), str(executor), claimed, int(ended), str(why)))
    return tuple(out)


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _inbox_ms(rec: dict[str, Any]) -> int | None:
    seq = rec.get("s")
    return int(seq[:16], 16) if isinstance(seq, str) and len(seq) >= 16 else None


def _at(rec: dict[str, Any], key: str) -> int | None:
    """Point `key` of a record's path as epoch ms, or None."""
    published = _inbox_ms(rec)
    if published is None or not _num(rec.get(key)):
        return None
    return published + int(rec[key]) // 1000


def _at_us(rec: dict[str, Any], key: str) -> float | None:
    """Point `key` of a record as epoch ms with the µs in the fraction, or None."""
    published = _inbox_ms(rec)
    if published is None or not _num(rec.get(key)):
        return None
    return published + int(rec[key]) / 1000


def _points(rec: dict[str, Any]) -> dict[str, int]:
    """The path points of a record in µs after the inbox entry (older records: ms fields)."""
    out = {new: int(rec[old]) * 1000 for old, new in OLD_PATH_FIELDS.items() if _num(rec.get(old))}
    out.update({key: int(rec[key]) for _, key in PATH_POINTS if _num(rec.get(key))})
    published = _inbox_ms(rec)
    if published is not None:
        for old, new in (("t1", "pg"), ("t2", "pc")):
            # (a point in ms only, or one an earlier version's process rewrote later: the ms)
            if _num(rec.get(old)):
                at = (int(rec[old]) - published) * 1000
                if new not in out or abs(out[new] - at) >= 1000:
                    out[new] = at
    return out


# -- dead letters ---------------------------------------------------------------------------------
class CutFields(dict[bytes, bytes]):
    """The fields of an inbox entry larger than ingress takes, as the take-over returns it
    (lua/take_inbox.lua): its first fields, each value cut, with the whole entry's `size`
    (bytes of names and values) and `count` (fields). Its dead letter says it is cut."""

    __slots__ = ("count", "size")

    def __init__(self, flat: list[bytes], size: int, count: int) -> None:
        it = iter(flat)
        super().__init__(zip(it, it, strict=True))
        self.size = size
        self.count = count


def dead_letter(
    fields: dict[bytes, bytes],
    entry_id: bytes,
    reason: str,
    detail: str,
    *,
    stream: bytes | None = None,
    workflow: str | None = None,
) -> dict[Any, Any]:
    """The fields of a dead letter: the original entry's fields, each value cut to
    Dead.FIELD_MAX bytes (at a UTF-8 character boundary), names and values to Dead.TOTAL_MAX
    in all and at most Dead.FIELDS_MAX fields (a field whose name does not fit is left out),
    the cut or left out ones named in `truncated`; plus why the entry was refused."""
    body: dict[Any, Any] = {}
    cut: list[bytes] = []  # (their names, in at most TRUNCATED_MAX bytes)
    cut_bytes, truncated = 0, False
    room = Dead.TOTAL_MAX
    for name, value in fields.items():
        keep = min(len(value), Dead.FIELD_MAX, max(0, room - len(name)))
        if len(name) > room or len(body) >= Dead.FIELDS_MAX:
            keep = -1  # (left out: its name alone is past the room, or too many fields)
        elif keep < len(value):
            while 0 < keep < len(value) and value[keep] & 0xC0 == 0x80:
                keep -= 1  # never split a UTF-8 character
        if keep < len(value):
            truncated = True
            named = name if isinstance(name, bytes) else str(name).encode()
            if cut_bytes + len(named) + 1 <= Dead.TRUNCATED_MAX:
                cut.append(named)
                cut_bytes += len(named) + 1
            elif len(body) >= Dead.FIELDS_MAX:
                break  # (nothing more can be kept or named: a flood of fields costs no more)
        if keep > 0 or (keep == 0 and len(value) == 0):
            body[_escaped(name)] = value[:keep]
            room -= len(name) + keep
    truncated = truncated or isinstance(fields, CutFields)  # (cut as it was read)
    if truncated:  # (even when no name fits the list: such a dead letter cannot be replayed)
        body[Dead.TRUNCATED] = b",".join(cut).decode("utf-8", "replace")
    cut_detail = detail.encode("utf-8", "surrogatepass")[: Dead.DETAIL_MAX]
    said = cut_detail.decode("utf-8", "ignore")  # (a character cut at the end is left out)
    added = {Dead.REASON: str(reason), Dead.DETAIL: said, Dead.ENTRY: entry_id,
             Dead.STREAM: stream, Dead.WORKFLOW: workflow or None}  # fmt: skip
    if any(isinstance(k, bytes) and k.startswith(Dead.ESCAPE) for k in body):
        added[Dead.ESCAPED] = "1"  # (only an escaped name starts with it now)
    body.update((k, v) for k, v in added.items() if v is not None)
    return body


def _escaped(name: Any) -> Any:
    """An original field's name in a dead letter (see Dead.ESCAPE)."""
    raw = name if isinstance(name, bytes) else str(name).encode()
    return Dead.ESCAPE + raw if raw in Dead.ADDED or raw.startswith(Dead.ESCAPE) else name


def original_fields(dead: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The fields of the entry a dead letter copied (to replay it)."""
    escaped = dead.get(Dead.ESCAPED.encode()) in (b"1", "1")  # (as stored, or as written)
    return {
        (k[1:] if escaped and k.startswith(Dead.ESCAPE) else k): v
        for k, v in dead.items()
        if k not in Dead.ADDED
    }
