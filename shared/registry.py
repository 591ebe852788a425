"""The workflow registry: definitions validated by shared code and stored in Redis.

Executors register the workflows of their module at start; ingress and admission read them, so
neither needs user code. A definition's version is a hash of its content unless given, so any
change gives a new version (and so new concurrency groups). Readers notice changes through a
counter (`registry_epoch`) that every effective registration increments.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from redis.asyncio import Redis

from supersede.errors import DefinitionError, SupersedeError, WorkflowRejected, describe
from supersede.keyexpr import compile_key, compile_limit
from supersede.keys import Keys
from supersede.model import ConcurrencySpec
from supersede.protocol import Strategy
from supersede.scripts import Scripts

MAX_NAME = 200
MAX_RETENTION = 366 * 86_400  # seconds
MAX_DEBOUNCE_MS = 86_400_000  # a debounce window or its longest wait: a day at most
MAX_STEP_TIMEOUT = 30 * 86_400  # seconds: a month (an infinite one is no timeout: leave it out)


@dataclass(frozen=True, slots=True)
class StepDef:
    name: str
    parents: tuple[str, ...] = ()
    timeout: float | None = None
    retries: int = 0


@dataclass(frozen=True, slots=True)
class WorkflowDef:
    """What the registry stores for one workflow (no user code)."""

    id: str
    events: tuple[str, ...]
    concurrency: ConcurrencySpec | None = None
    steps: tuple[StepDef, ...] = ()
    max_attempts: int = 3
    version: str = field(default="", compare=False)
    retention: int | None = None  # seconds an ended run is kept; None: admission's --retention

    def to_dict(self) -> dict[str, Any]:
        return definition_body(
            self.id,
            self.events,
            self.concurrency,
            self.steps,
            self.max_attempts,
            self.version,
            self.retention,
        )

    def content_version(self) -> str:
        body = self.stored_body()
        body.pop("version")
        return hashlib.blake2b(
            orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=6
        ).hexdigest()

    def stored_body(self) -> dict[str, Any]:
        """What the registry stores: the definition without `retention`, a storage setting
        kept beside it (changing it changes neither the version nor the groups)."""
        body = self.to_dict()
        body.pop("retention", None)
        return body

    def with_version(self) -> WorkflowDef:
        return self if self.version else _replace_version(self, self.content_version())


def definition_body(
    wid: str,
    events: Any,
    concurrency: Any,
    steps: Any,
    max_attempts: int,
    version: str,
    retention: Any = None,
) -> dict[str, Any]:
    """The dict form of a definition, from a WorkflowDef or a code-first Workflow (both have
    concurrency objects with expression/max_runs/limit_strategy/strict and steps with
    name/parents/timeout/retries). Not validated: `parse` does that, naming the field."""
    conc = concurrency
    body: dict[str, Any] = {
        "id": wid,
        "version": version,
        "events": list(events) if isinstance(events, list | tuple) else events,
        "concurrency": None
        if conc is None
        else {
            "expression": conc.expression,
            "max_runs": conc.max_runs,
            "limit_strategy": getattr(conc.limit_strategy, "value", conc.limit_strategy),
            "strict": conc.strict,
            # (only when set: a field every stored body gained would change every version)
            **({"scope": conc.scope} if getattr(conc, "scope", None) is not None else {}),
            **({"debounce_ms": conc.debounce_ms} if getattr(conc, "debounce_ms", 0) else {}),
            **({"max_wait_ms": conc.max_wait_ms} if getattr(conc, "max_wait_ms", 0) else {}),
        },
        "steps": [
            {
                "name": s.name,
                # (anything else, a string say, is kept for `parse` to refuse, naming the field)
                "parents": list(s.parents) if isinstance(s.parents, list | tuple) else s.parents,
                "timeout": s.timeout,
                "retries": s.retries,
            }
            for s in steps
        ],
        "max_attempts": max_attempts,
    }
    if retention is not None:
        body["retention"] = retention
    return body


def _replace_version(wf: WorkflowDef, version: str) -> WorkflowDef:
    return replace(wf, version=version)


def _name(value: Any, field_name: str, strict: bool = True) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise DefinitionError(field_name, f"must be a non-empty string of at most {MAX_NAME} chars")
    if strict and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise DefinitionError(field_name, f"must not hold control characters, got {value!r}")
    if strict and not value.strip():
        raise DefinitionError(field_name, f"must not be blank, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # (a lone surrogate: no JSON, no Redis key can hold it)
        raise DefinitionError(field_name, f"must be valid Unicode text, got {value!r}") from None
    return value


def _event_name(value: Any, field_name: str, strict: bool) -> str:
    """An event name: matched exactly (`chat.*` and ` chat.message` registered, and never
    matched what their author meant: an API-user probe)."""
    name = _name(value, field_name, strict)
    if strict and name != name.strip():
        raise DefinitionError(field_name, f"must not start or end with spaces, got {name!r}")
    if strict and "*" in name:
        raise DefinitionError(
            field_name, f"event names are matched exactly, with no wildcard: got {name!r}"
        )
    return name


def _int(value: Any, field_name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DefinitionError(
            field_name, f"must be an integer between {lo} and {hi}, got {value!r}"
        )
    return value


def parse(body: Any, *, strict: bool = True) -> WorkflowDef:
    """Build and validate a definition from its dict form; errors name the field. `strict`
    False (a definition read back from the registry): the checks added since it may have been
    stored are left out (control characters in names, a step timeout's ceiling, the trial
    evaluation of expressions), so an older executor's definition keeps being served."""
    if not isinstance(body, dict):
        raise DefinitionError("definition", "must be an object")
    if strict:  # (read back: a newer executor's field is left to it)
        _known_fields(body, TOP_FIELDS, "")
    wid = _name(body.get("id"), "id", strict)
    events = body.get("events")
    if not isinstance(events, list | tuple) or not events:
        raise DefinitionError("events", "must be a non-empty list of event names")
    names = tuple(_event_name(e, f"events[{i}]", strict) for i, e in enumerate(events))
    if len(set(names)) < len(names):
        if strict:
            i = next(i for i, e in enumerate(names) if e in names[:i])
            raise DefinitionError(f"events[{i}]", f"{names[i]!r} is listed twice")
        names = tuple(dict.fromkeys(names))  # (read back: its events once each)
    spec = _parse_concurrency(body.get("concurrency"), strict)
    steps = _parse_steps(body.get("steps", []), strict)
    max_attempts = _int(body.get("max_attempts", 3), "max_attempts", 1, 1000)
    version = body.get("version") or ""
    if not isinstance(version, str):
        raise DefinitionError("version", f"must be a string, got {type(version).__name__}")
    if version:
        version = _name(version, "version", strict)
    retention = body.get("retention")
    if retention is not None:
        retention = _int(retention, "retention", 1, MAX_RETENTION)
    return WorkflowDef(wid, names, spec, steps, max_attempts, version, retention).with_version()


TOP_FIELDS = ("id", "version", "events", "concurrency", "steps", "max_attempts", "retention")
CONCURRENCY_FIELDS = (
    "expression", "max_runs", "limit_strategy", "strict", "scope", "debounce_ms", "max_wait_ms"
)  # fmt: skip
STEP_FIELDS = ("name", "parents", "timeout", "retries")


def _known_fields(body: dict[Any, Any], known: Sequence[str], prefix: str) -> None:
    """Refuse a field a definition does not have (a misspelt one would be ignored: a
    `strategy` left the limit strategy at its default, which cancels runs)."""
    for name in body:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            raise DefinitionError(f"{prefix}{name}", f"is not a field of a definition{hint}")


def _parse_concurrency(conc: Any, strict: bool = True) -> ConcurrencySpec | None:
    if conc is None:
        return None
    if not isinstance(conc, dict):
        raise DefinitionError("concurrency", "must be an object or null")
    if strict:
        _known_fields(conc, CONCURRENCY_FIELDS, "concurrency.")
    expression = conc.get("expression")
    if not isinstance(expression, str):
        raise DefinitionError("concurrency.expression", "must be a CEL expression string")
    compile_key(expression, "concurrency.expression", trial=strict)
    raw_max = conc.get("max_runs", 1)
    if isinstance(raw_max, str):  # dynamic: a CEL expression evaluated per event
        compile_limit(raw_max, "concurrency.max_runs", trial=strict)
        max_runs: int | str = raw_max
    else:
        max_runs = _int(raw_max, "concurrency.max_runs", 1, 10_000)
    raw_strategy = conc.get("limit_strategy", Strategy.CANCEL_IN_PROGRESS.value)
    try:
        strategy = Strategy(raw_strategy)
    except ValueError:
        raise DefinitionError(
            "concurrency.limit_strategy",
            f"must be one of {[s.value for s in Strategy]}, got {raw_strategy!r}",
        ) from None
    overlap_strict = conc.get("strict", False)  # (the limit's strict mode, not this parse's)
    if not isinstance(overlap_strict, bool):
        raise DefinitionError("concurrency.strict", f"must be a boolean, got {overlap_strict!r}")
    scope = conc.get("scope")
    if scope is not None:
        scope = _name(scope, "concurrency.scope", strict)
    debounce = _int(conc.get("debounce_ms", 0), "concurrency.debounce_ms", 0, MAX_DEBOUNCE_MS)
    max_wait = _int(conc.get("max_wait_ms", 0), "concurrency.max_wait_ms", 0, MAX_DEBOUNCE_MS)
    if max_wait and not debounce:
        raise DefinitionError("concurrency.max_wait_ms", "needs concurrency.debounce_ms")
    if max_wait and max_wait < debounce:
        raise DefinitionError(
            "concurrency.max_wait_ms", f"must be at least debounce_ms ({debounce}), or 0"
        )
    spec = ConcurrencySpec(
        expression, max_runs, strategy, overlap_strict, scope, debounce, max_wait
    )
    return spec


def _parse_steps(raw: Any, strict: bool = True) -> tuple[StepDef, ...]:
    if not isinstance(raw, list | tuple):
        raise DefinitionError("steps", "must be a list")
    steps: list[StepDef] = []
    seen: set[str] = set()
    for i, s in enumerate(raw):
        if not isinstance(s, dict):
            raise DefinitionError(f"steps[{i}]", "must be an object")
        if strict:
            _known_fields(s, STEP_FIELDS, f"steps[{i}].")
        name = _name(s.get("name"), f"steps[{i}].name", strict)
        if name in seen:
            raise DefinitionError(f"steps[{i}].name", f"duplicate step name {name!r}")
        seen.add(name)
        parents = s.get("parents", [])
        if not isinstance(parents, list | tuple) or not all(isinstance(p, str) for p in parents):
            raise DefinitionError(f"steps[{i}].parents", "must be a list of step names")
        timeout = s.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= (MAX_STEP_TIMEOUT if strict else math.inf)  # (False for NaN)
        ):
            raise DefinitionError(
                f"steps[{i}].timeout",
                f"must be a number of seconds above 0 and at most {MAX_STEP_TIMEOUT:,}, "
                f"got {timeout!r}",
            )
        retries = _int(s.get("retries", 0), f"steps[{i}].retries", 0, 100)
        steps.append(StepDef(name, tuple(parents), timeout, retries))
    for i, step in enumerate(steps):
        for parent in step.parents:
            if parent not in seen:
                raise DefinitionError(f"steps[{i}].parents", f"unknown step {parent!r}")
    _check_acyclic(steps)
    return tuple(steps)


def _check_acyclic(steps: list[StepDef]) -> None:
    parents = {s.name: s.parents for s in steps}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*path[path.index(name) :], name])
            index = next(i for i, s in enumerate(steps) if s.name == name)
            raise DefinitionError(f"steps[{index}].parents", f"cycle {cycle}")
        state[name] = 1
        for parent in parents[name]:
            visit(parent, [*path, name])
        state[name] = 2

    for step in steps:
        visit(step.name, [])


async def register(
    redis: Redis, keys: Keys, definition: WorkflowDef | dict[str, Any]
) -> WorkflowDef:
    """Validate and store one definition (see `register_all`)."""
    [wf] = await register_all(redis, keys, [definition])
    return wf


def repeated(ids: Sequence[str]) -> str | None:
    """The first workflow id given more than once, or None: an id names one workflow."""
    seen: set[str] = set()
    for wid in ids:
        if wid in seen:
            return wid
        seen.add(wid)
    return None


async def register_all(
    redis: Redis,
    keys: Keys,
    definitions: Sequence[WorkflowDef | dict[str, Any]],
    *,
    serving: bool = False,
) -> list[WorkflowDef]:
    """Validate and store definitions in one call, all or none (an executor's module): a reader
    never sees part of them, so the workflows of a scope can change their limits together.
    Bumps the registry epoch only when something changed. Raises WorkflowRejected (naming the
    workflow and the field) for the first one refused: invalid, a scope whose limits differ
    from another workflow's of that scope (registered here, or stored and not registered
    here), or an existing version with other content. `serving`: the caller is an executor
    that serves them from now (their versions are marked served, see Keys.served_versions_hash);
    otherwise they count as not served since (registered ahead of a deploy)."""
    wfs = []
    for definition in definitions:
        raw = definition.to_dict() if isinstance(definition, WorkflowDef) else definition
        try:
            wfs.append(parse(raw))
        except DefinitionError as exc:
            wid = raw.get("id") if isinstance(raw, dict) else None
            raise WorkflowRejected(
                wid if isinstance(wid, str) else "", exc.field, exc.message
            ) from None
    twice = repeated([wf.id for wf in wfs])
    if twice is not None:
        raise WorkflowRejected(twice, "id", f"{twice!r} is registered twice in one call")
    if any(wf.concurrency is not None and wf.concurrency.scope for wf in wfs):
        _, stored, _ = await load_all(redis, keys)
        others = {**stored, **{wf.id: wf for wf in wfs}}
        for wf in wfs:
            error = scope_conflict(wf, [d for d in others.values() if d.id != wf.id])
            if error:
                raise WorkflowRejected(wf.id, "concurrency.scope", error)
    items = [(wf.id, wf.version, orjson.dumps(wf.stored_body()), wf.retention) for wf in wfs]
    if items:
        await Scripts(redis, keys).register_workflows(items, serving=serving)
    return wfs


def served_version_field(wid: str, version: str) -> str:
    """The field of a workflow's version in Keys.served_versions_hash (a name holds no
    control character: the newline cannot be part of either)."""
    return f"{wid}\n{version}"


LOAD_TRIES = 10  # reads of the registry, while changes come between its epoch's two reads


async def load_all(redis: Redis, keys: Keys) -> tuple[int, dict[str, WorkflowDef], dict[str, str]]:
    """(epoch, valid definitions by id, errors by id) as stored now. Not a transaction: a
    server at its maxmemory refuses a MULTI however read-only (`status`, admission's trim and
    ingress's reload failed exactly when memory was full). The epoch is read before and after,
    and read again while a change (each bumps it in its script) came between."""
    for _ in range(LOAD_TRIES):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.registry_epoch)
            pipe.hgetall(keys.workflows_hash)
            pipe.get(keys.registry_epoch)
            epoch, raw, after = await pipe.execute()
        if epoch == after:
            break
    else:
        raise SupersedeError(f"the registry changed during each of {LOAD_TRIES} reads; try again")
    defs: dict[str, WorkflowDef] = {}
    errors: dict[str, str] = {}
    for wid, body in raw.items():
        name = wid.decode()
        try:
            defs[name] = parse(orjson.loads(body), strict=False)
        except Exception as exc:  # whatever is stored, the valid ones are still served
            errors[name] = str(exc) if isinstance(exc, DefinitionError) else describe(exc)
    # Workflows of one scope share groups, so they must agree on its rules: the first by id
    # sets them, and one that disagrees (registered meanwhile by a racing executor) is skipped.
    kept: list[WorkflowDef] = []
    for wf in sorted(defs.values(), key=lambda w: w.id):
        error = scope_conflict(wf, kept)
        if error:
            errors[wf.id] = f"concurrency.scope: {error}"
            del defs[wf.id]
        else:
            kept.append(wf)
    return int(epoch or 0), defs, errors


def scope_conflict(wf: WorkflowDef, others: list[WorkflowDef]) -> str | None:
    """Why `wf` cannot share its scope with `others` (they disagree on max_runs, strategy,
    strict, debounce or max_wait), or None."""
    conc = wf.concurrency
    if conc is None or not conc.scope:
        return None
    for other in sorted(others, key=lambda w: w.id):
        oc = other.concurrency
        if oc is not None and oc.scope == conc.scope and oc.rules() != conc.rules():
            return (
                f"scope {conc.scope!r} is shared with workflow {other.id!r}, whose limits differ "
                f"((max_runs, strategy, strict, debounce_ms, max_wait_ms) = {oc.rules()} there, "
                f"{conc.rules()} here); "
                "workflows of one scope share their groups, so they must set the same limits"
            )
    return None
