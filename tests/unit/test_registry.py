"""Workflow definitions: validation names the field; storage bumps the epoch; key expressions."""

from __future__ import annotations

import time
from typing import Any

import cel
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supersede.errors import DefinitionError, KeyExpressionError
from supersede.keyexpr import compile_key
from supersede.registry import parse
from tests.support import workflow_body as definition


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"id": ""}, "id"),
        ({"events": []}, "events"),
        ({"events": ["ok", 3]}, "events[1]"),
        ({"concurrency": {"expression": "input.userId", "max_runs": 0}}, "concurrency.max_runs"),
        (
            {"concurrency": {"expression": "input.u", "limit_strategy": "LATEST"}},
            "concurrency.limit_strategy",
        ),
        ({"concurrency": {"expression": "input.userId +"}}, "concurrency.expression"),
        ({"concurrency": {"expression": "input.u", "strict": "yes"}}, "concurrency.strict"),
        (
            {"steps": [{"name": "a", "parents": ["b"]}, {"name": "b", "parents": ["a"]}]},
            "steps[0].parents",
        ),
        ({"steps": [{"name": "a", "parents": ["zzz"]}]}, "steps[0].parents"),
        ({"steps": [{"name": "a"}, {"name": "a"}]}, "steps[1].name"),
        ({"steps": [{"name": "a", "timeout": -1}]}, "steps[0].timeout"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"concurrency": {"expression": "input.u", "scope": ""}}, "concurrency.scope"),
        ({"concurrency": {"expression": "input.u", "scope": 7}}, "concurrency.scope"),
        ({"concurrency": {"expression": "input.u", "max_runs": "input."}}, "concurrency.max_runs"),
        # definitions that could never run a single event (each accepted before):
        ({"steps": [{"name": "a", "timeout": float("nan")}]}, "steps[0].timeout"),
        ({"steps": [{"name": "a", "timeout": float("inf")}]}, "steps[0].timeout"),
        ({"steps": [{"name": "a", "timeout": 1e300}]}, "steps[0].timeout"),
        ({"steps": [{"name": "a"}, {"name": "b", "parents": "a"}]}, "steps[1].parents"),
        ({"concurrency": {"expression": "foo.bar"}}, "concurrency.expression"),
        ({"concurrency": {"expression": "input.a + suffix"}}, "concurrency.expression"),
        ({"concurrency": {"expression": "nosuchfn(1)"}}, "concurrency.expression"),
        ({"concurrency": {"expression": "1.5"}}, "concurrency.expression"),
        ({"concurrency": {"expression": "input.u", "max_runs": "two"}}, "concurrency.max_runs"),
        ({"concurrency": {"expression": "input.u", "max_runs": "'a'"}}, "concurrency.max_runs"),
        ({"id": "rt\nnl"}, "id"),
        ({"events": ["ok", "bell\x07"]}, "events[1]"),
        # a field a definition does not have (a misspelt one was ignored: `strategy` left the
        # default CANCEL_IN_PROGRESS, which cancels runs); a scope with a control character
        # under a non-strict limit (the limit's `strict` stood in for the parse's)
        ({"concurrency": {"expression": "input.u", "strategy": "GROUP_ROUND_ROBIN"}},
         "concurrency.strategy"),
        ({"evnts": ["a"]}, "evnts"),
        ({"steps": [{"name": "a", "timout": 5}]}, "steps[0].timout"),
        ({"concurrency": {"expression": "input.u", "scope": "a\x01b"}}, "concurrency.scope"),
        # a constant that fails for every event; a name no JSON or key can hold; a version
        # too long (it said "must be a string") or blank; an event listed twice (routed twice)
        ({"concurrency": {"expression": "'a'.matches('(((') ? 'a' : 'b'"}},
         "concurrency.expression"),
        ({"concurrency": {"expression": "string(1/0)"}}, "concurrency.expression"),
        ({"concurrency": {"expression": "input.u", "max_runs": "1/0"}}, "concurrency.max_runs"),
        ({"id": "w\ud800"}, "id"),
        ({"version": "v" * 10_000}, "version"),
        ({"version": " "}, "version"),
        ({"events": ["e", "f", "e"]}, "events[2]"),
        # `matches`, compiled again at each evaluation by the CEL library: a costly pattern
        # (56 ms an event: 13 events a second), one inside a comprehension (once per item), one
        # an event chooses, one that is no regex (a dead letter for every event): a probe
        ({"concurrency": {"expression": r"input.e.matches('^[\\w.+-]{1,64}@') ? 'a' : 'b'"}},
         "concurrency.expression"),
        ({"concurrency": {"expression": "input.t.exists(t, t.matches('^a')) ? 'a' : 'b'"}},
         "concurrency.expression"),
        ({"concurrency": {"expression": "input.e.matches(input.re) ? 'a' : 'b'"}},
         "concurrency.expression"),
        ({"concurrency": {"expression": "input.e.matches('[') ? 'a' : 'b'"}},
         "concurrency.expression"),
        ({"concurrency": {"expression": "input.u",
                          "max_runs": r"input.e.matches('^[\\w-]{1,63}$') ? 2 : 1"}},
         "concurrency.max_runs"),
        # names matched exactly that match nothing meant (an API-user probe)
        ({"events": ["chat.*"]}, "events[0]"),
        ({"events": ["e", " chat.message"]}, "events[1]"),
    ],
)  # fmt: skip
def test_a_bad_definition_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(DefinitionError) as info:
        parse(definition(**overrides))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert "\n" not in str(info.value)  # (one line: a CEL parse error was three)


def test_a_matches_pattern_is_refused_by_the_unicode_classes_it_compiles_into(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The limit is counted from the pattern: one on compile time measured as it registered (40
    times a plain `\\w`'s) flapped on a busy machine, an executor refused on one start and not
    the next (an upgrade probe). A clock that makes every compile look slow changes nothing."""
    from supersede.keyexpr import MATCHES_UNITS_MOST, compile_key, pattern_units

    ticks = iter(range(10**9))
    monkeypatch.setattr(
        time, "perf_counter", lambda: next(ticks) * (0.05 if next(ticks) % 4 else 1e-5)
    )
    fine = (r"^\w{2,8}$", r"^\w{1,16}$", r"^\w{1,24}$", r"^[a-z0-9._%+-]+@[a-z0-9.-]+$",
            r"^\p{L}+$", r"(?-u:\w){1,64}", r"(?-u)^[\w.]{1,64}$", r"^\d{1,64}$",
            r"[[:alpha:]]{64}", r"[[:a]]", r"(?x)a#{" + "9" * 400 + "}", r".{1,64}")  # fmt: skip
    for pattern in fine:  # (`[[:a]]` looped for good, the 400 digits raised: a review)
        compile_key(f"input.e.matches(r'{pattern}') ? input.e : 'x'", "k", trial=True)
        compile_key(f"input.e.matches('{pattern.replace(chr(92), chr(92) * 2)}') ? 'a' : 'x'", "k")
    assert [pattern_units(p) for p in (r"\w", r"^\w{1,16}$", r"(\w\w){8}", r"a|\w{30}",
            r"(?<n>\w{5}){5}", r"[\p{L}\p{N}]{3,}", r"\d{1,64}", r"(?i)[^\w]{2}")] == [
        1, 16, 16, 30, 25, 4, 6.4, 2]  # fmt: skip
    # (and those a review found counted as cheap: a repeated `*`, `(?x)`, an escaped
    # backslash, `.`, `\S` and `\D` many times over)
    for pattern in (r"^\w{1,25}$", r"^[\w-]{1,63}$", r"(\pL\pN){13}", r"(?-u:a)\w{30}",
                    r"\w*{100}", r"(?x)\w {100}", r".{1,8000}", r"\S{1,3000}", r"\D{240}",
                    r"[[:a]]\w{100}:]"):  # fmt: skip
        with pytest.raises(DefinitionError) as info:
            compile_key(f"input.e.matches(r'{pattern}') ? input.e : 'x'", "k", trial=True)
        assert f"(at most {MATCHES_UNITS_MOST})" in str(info.value)
    with pytest.raises(DefinitionError, match="100 copies"):
        compile_key(r"input.e.matches('\x5cw{100}') ? 'a' : 'x'", "k", trial=True)


def test_a_misspelt_field_names_the_one_meant_and_read_back_is_left_to_newer_builds() -> None:
    body = definition(concurrency={"expression": "input.u", "strategy": "GROUP_ROUND_ROBIN"})
    with pytest.raises(DefinitionError, match="did you mean 'limit_strategy'"):
        parse(body)
    # a definition read back from the registry may carry a newer build's field
    assert parse({**definition(), "priority": 3}, strict=False).id == definition()["id"]
    # ... or an event listed twice (accepted before): each once
    assert parse(definition(events=["e", "f", "e"]), strict=False).events == ("e", "f")


def test_a_change_gives_a_new_version() -> None:
    a = parse(definition())
    assert a.version and parse(definition()).version == a.version
    changed = parse(definition(concurrency={"expression": "input.userId", "max_runs": 2}))
    assert changed.version != a.version
    assert parse(definition(version="v7")).version == "v7"


def test_a_scope_changes_the_groups_and_leaves_other_versions_alone() -> None:
    """Stored bodies gain `scope` only when it is set: the version of every workflow without
    one is what it was before scopes existed (or each would get new groups on upgrade)."""
    plain = parse(definition())
    assert "scope" not in plain.stored_body()["concurrency"]
    scoped = parse(definition(concurrency={"expression": "input.userId", "scope": "chat"}))
    assert scoped.version != plain.version and scoped.concurrency is not None
    assert scoped.concurrency.scope == "chat"
    from supersede.model import group_id

    assert group_id("a", "1", "k", "chat") == group_id("b", "2", "k", "chat")
    assert group_id("a", "1", "k", "chat") != group_id("a", "1", "k")
    assert group_id("a", "1", "k", "chat") != group_id("a", "1", "k", "other")


def test_key_expressions() -> None:
    key = compile_key("input.user.id")
    assert key({"user": {"id": 42}}, {}) == "42"
    assert compile_key("metadata.tenant")({}, {"tenant": "t1"}) == "t1"
    assert compile_key('input.a + "-" + metadata.b')({"a": "x"}, {"b": "y"}) == "x-y"
    with pytest.raises(KeyExpressionError) as info:
        key({"user": {}}, {})
    assert info.value.reason == "key_error"
    with pytest.raises(KeyExpressionError, match="not a string or integer"):
        compile_key("input.flag")({"flag": True}, {})
    # a JSON integer past 64 bits reaches the key as a float: the error says so
    big = orjson.loads(b'{"u": 123456789012345678901234567890}')
    with pytest.raises(KeyExpressionError, match="too large for 64 bits: send such a key as a"):
        compile_key("input.u")(big, {})
    with pytest.raises(KeyExpressionError) as info:
        compile_key("input.k")({"k": "x" * 1025}, {})
    assert info.value.reason == "key_too_large"
    with pytest.raises(DefinitionError):
        compile_key("input.(")
    # the CEL library calls a function given a value it has no overload for "undefined"
    for expression, value in (("string(input.n)", [1]), ("input.n.size()", 1)):
        name = expression.split("(")[0].rsplit(".", 1)[-1]
        with pytest.raises(KeyExpressionError) as info:
            compile_key(expression)({"n": value}, {})
        assert f"{name}() cannot take the value it was given" in info.value.detail
        assert "Undefined" not in info.value.detail


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3)


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=5),
    _nested,
    max_leaves=6,
)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), values, max_size=3),
       st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3))  # fmt: skip
def test_the_field_path_fast_path_agrees_with_cel(data: dict[str, Any], path: list[str]) -> None:
    expression = "input." + ".".join(path)
    fast = compile_key(expression)
    program = cel.compile(expression)
    try:
        expected: Any = program.execute({"input": data, "metadata": {}})
    except Exception:
        expected = KeyExpressionError
    try:
        got: Any = fast(data, {})
    except KeyExpressionError:
        got = KeyExpressionError
    if (
        expected is KeyExpressionError
        or isinstance(expected, bool)
        or not isinstance(expected, str | int)
    ):
        assert got is KeyExpressionError
    else:
        assert got == str(expected)


@pytest.mark.parametrize(
    "expression",
    [
        'input.a == "\\\\" || input.l.exists(x, input.l.exists(y, y == x))',
        "input.a == r'C:\\' || input.l.exists(x, input.l.exists(y, y == x))",
        "input.a == '''it's''' || input.l.exists(x, input.l.exists(y, y == x))",
        "input.items.map(x, x.tags.map(t, t)).size()",
        "input.a.exists(x, input.b.filter(y, y == x).size() > 0)",
        "string(input.a.all(x, x > 0)) + string(input.b.map(y, [1].exists(z, z == y)))",
        "x" * 1001,
        "size(input.a.map(x, input.s + input.s)) > 0 ? 'y' : 'n'",
        "input.a.exists(x, x in input.b) ? 'y' : 'n'",
        "input.a.all(x, input.b == input.c) ? 'y' : 'n'",
        "input.a.exists(x, x == metadata.m) ? 'y' : 'n'",
        "input.a.map(x, size( input )).size() > 0 ? 'y' : 'n'",
        "input.a.existsOne(x, x == input.b) ? 'y' : 'n'",  # (the library's other spelling)
        "input.a.existsOne(x, input.b.exists(y, y == x)) ? 'y' : 'n'",
    ],
)
def test_a_key_expression_whose_cost_can_outgrow_its_input_is_refused(expression: str) -> None:
    """Nested comprehensions cost seconds per event on a hostile input (quadratic), and so does
    one that reads the event in its arguments (the library copies it for each item: a probe,
    24 s for one event)."""
    with pytest.raises(DefinitionError, match=r"concurrency\.expression"):
        compile_key(expression, trial=True)


def test_a_stored_expression_that_reads_the_event_in_a_comprehension_is_still_served() -> None:
    """Refused at registration since 2026-12-05; one stored before is served as it was (not
    skipped, which would leave its events without runs) until its executors register again."""
    expression = "input.a.exists(x, x in input.b) ? 'y' : 'n'"
    with pytest.raises(DefinitionError, match="reads `input` inside its arguments"):
        parse(definition(concurrency={"expression": expression}))
    stored = parse(definition(concurrency={"expression": expression}), strict=False)
    assert stored.concurrency is not None
    assert compile_key(stored.concurrency.expression)({"a": [1], "b": [1]}, {}) == "y"  # ingress


def test_one_pass_comprehensions_and_macro_names_in_strings_are_fine() -> None:
    assert compile_key("string(input.items.map(x, x * 2).size())")({"items": [1, 2]}, {}) == "2"
    sequential = compile_key(
        "(input.a.filter(x, x > 1).size() > 0 ? 'f' : '-') + (input.b.exists(y, y) ? 'e' : '-')"
    )
    assert sequential({"a": [1, 2], "b": [True]}, {}) == "fe"
    assert compile_key("input.name + '.map(x, y.map(z, z))'")({"name": "n"}, {}) == (
        "n.map(x, y.map(z, z))"
    )


@pytest.mark.parametrize(
    "expression",
    [
        "input.a + string(input.b.c)",
        "has(input.k) ? input.k : 'none'",
        "has(input.z) ? 'y' : 'n'",
        "size(input) > 3 ? 'many' : 'few'",
        "'k' in input ? 'y' : 'n'",
        "input['a']",
        "metadata.m + input . a",
        "size(metadata) == 1 ? input.a : 'n'",
        "input.b.c == 2 ? 'two' : 'no'",
        # a method of the map itself: the whole map (they read a field named size, exists...)
        "string(input.size())",
        "input.exists(k, k == 'k') ? 'y' : 'n'",
        "input.all(k, k != 'a') ? 'y' : 'n'",
        "input.filter(k, k.startsWith('a')).size() > 0 ? 'y' : 'n'",
        "string(metadata.size()) + input.a",
    ],
)
def test_an_expression_given_only_the_fields_it_reads_gives_what_cel_gives(
    expression: str,
) -> None:
    """The library is given the fields an expression reads (it converted the whole event: 0.3
    s for 1 MB), or the whole map where the expression uses it as one."""
    import cel

    event = {"a": "x", "b": {"c": 2}, "k": "v", "big": list(range(1000))}
    meta = {"m": "M"}
    expected = cel.evaluate(expression, {"input": event, "metadata": meta})
    assert compile_key(expression)(event, meta) == str(expected)


def test_a_comprehension_over_a_list_longer_than_its_budget_is_a_key_error() -> None:
    """The CEL library's comprehensions are quadratic: a 150,000-item list took over a minute
    on the ingress loop. Over MAX_COMPREHENSION_ITEMS the key is refused at once."""
    import time

    from supersede.keyexpr import MAX_COMPREHENSION_ITEMS

    key = compile_key("input.items.map(x, x + 1).size() > 0 ? 'some' : 'none'")
    assert key({"items": list(range(MAX_COMPREHENSION_ITEMS))}, {}) == "some"
    started = time.perf_counter()
    with pytest.raises(KeyExpressionError, match="cost budget"):
        key({"items": list(range(150_000))}, {})
    # only what the comprehension walks counts: another big list in the event is fine
    assert key({"items": [1], "other": list(range(10_000))}, {}) == "some"
    anything = compile_key("[input.a].map(x, x + 1).size() > 0 ? 'y' : 'n'")
    with pytest.raises(KeyExpressionError, match="cost budget"):  # not a field path: all count
        anything({"a": {"deep": {"more": list(range(MAX_COMPREHENSION_ITEMS + 1))}}}, {})
    # ... of the fields it reads: the others are not given to the library
    assert anything({"a": 1, "deep": {"more": list(range(MAX_COMPREHENSION_ITEMS + 1))}}, {})
    assert time.perf_counter() - started < 10.0  # (unbounded, the walk took minutes)
    plain = compile_key("input.a + input.b")  # no comprehension: no budget to check
    assert plain({"a": "x", "b": "y", "big": list(range(150_000))}, {}) == "xy"


def test_a_comprehension_that_builds_a_list_is_refused_past_its_items_times_its_size() -> None:
    """The CEL library copies the list a map or filter built so far at each item, deeply: a
    probe's 34 KB event of 500 items whose first held 7,400 numbers took 0.3 s of ingress
    (200 of them stalled every workflow for 89 s), a map(t, t) over 500 strings of 20 KB 0.4 s.
    Past MAX_BUILD_COST (items walked x copies built x units read) the key is refused at once;
    exists() builds nothing and is fine; within the budget the key is evaluated."""
    first = compile_key("input.items.filter(i, i.kind == 'a')[0].id")
    small = [{"id": i, "kind": "a"} for i in range(499)]
    hostile = {"items": [{"id": "h", "kind": "a", "x": [0] * 7400}, *small]}
    with pytest.raises(KeyExpressionError, match=r"builds a list .* \(its cost budget\)"):
        first(hostile, {})
    with pytest.raises(KeyExpressionError, match="cost budget"):  # 60 ms of copies each
        first({"items": small}, {})
    assert first({"items": small[:300]}, {}) == "0"  # (about 20 ms)
    none_b = compile_key("input.items.exists(i, i.kind == 'b') ? 'b' : 'none'")
    assert none_b(hostile, {}) == "none"
    # a map is charged what it makes of each item: `t + t + t` three copies of it, `i.sku` the
    # field only (a review: projections of 200 line items of 11 fields were refused, 7 ms),
    # and each element of a literal it writes (`[t, 0, 0, ...]`: seconds an event, uncounted)
    strings = {"items": ["s" * 20] * 400}
    once = compile_key("string(size(input.items.map(t, t)))")
    thrice = compile_key("string(size(input.items.map(t, t + t + t)))")
    assert once(strings, {}) == "400"
    with pytest.raises(KeyExpressionError, match="cost budget"):
        thrice(strings, {})
    lines = {"items": [{"sku": f"s{i}", **{f"f{j}": "v" for j in range(10)}} for i in range(200)]}
    skus = compile_key("input.items.map(i, i.sku.lowerAscii()).join(',').size() > 0 ? 'k' : 'k'")
    assert skus(lines, {}) == "k"
    with pytest.raises(KeyExpressionError, match="cost budget"):
        compile_key("string(size(input.items.map(i, i)))")(lines, {})
    padded = compile_key("string(size(input.items.map(t, [t" + ", 0" * 200 + "])))")
    assert padded({"items": list(range(10))}, {}) == "10"
    with pytest.raises(KeyExpressionError, match="cost budget"):
        padded({"items": list(range(200))}, {})
    # a walk of what a function made (split's parts, up to 500) counts 500 items
    parts = compile_key("string(size(input.s.split(',').map(t, t)))")
    assert parts({"s": ",".join(["z" * 20] * 10)}, {}) == "10"
    with pytest.raises(KeyExpressionError, match="cost budget"):
        parts({"s": ",".join(["z" * 2000] * 499)}, {})  # (a 1 MB string: 0.1 s and more)


def test_an_expression_reading_a_value_of_too_many_items_is_refused_before_the_library() -> None:
    """The CEL library converts each value an expression reads first: 0.09 s for a list of
    500,000 numbers, 0.17 s for a map of 80,000 keys (a probe: 15 such events a second took
    other events' start from 4 ms to 7 s). Over MAX_READ_ITEMS items, nested ones counted, the
    key or the computed max_runs is refused without that cost; within it, it is evaluated."""
    import time

    from supersede.keyexpr import MAX_READ_ITEMS, compile_limit

    key = compile_key("input.k + ':' + string(size(input.n))")
    limit = compile_limit("metadata.plan == 'pro' ? 5 : 1")
    at_most = MAX_READ_ITEMS - 2  # (with the fields k and n)
    assert key({"k": "h", "n": list(range(at_most))}, {}) == f"h:{at_most}"
    assert limit({}, {"plan": "pro", "more": list(range(500_000))}) == 5  # (not read)
    started = time.process_time()  # (this process's CPU: other processes' load not counted)
    for _ in range(10):
        with pytest.raises(KeyExpressionError, match="over 10,000 items") as refused:
            key({"k": "h", "n": [0] * 500_000}, {})
        assert refused.value.reason == "key_error"
        with pytest.raises(KeyExpressionError, match="cost budget"):
            key({"k": "h", "n": {str(i): [i, i] for i in range(4_000)}}, {})  # (12,000 in all)
        with pytest.raises(KeyExpressionError, match="over 10,000 items") as refused:
            limit({}, {"plan": [0] * 500_000})
        assert refused.value.reason == "max_runs_error"
    assert time.process_time() - started < 0.5  # (the library's conversion: 2.6 s)


def test_names_inputs_and_constants_that_can_run_are_still_accepted() -> None:
    """The trial evaluation refuses names other than input and metadata, not expressions that
    fail for an empty event (a missing field) or read a comprehension's own variable."""
    for expression in (
        "input.userId",
        "'global'",
        "input.a + metadata.b",
        "size(input.items)",
        "input.items.map(x, x.id)[0]",
        "[1, 2].map(x, x * 2)[0]",
        "has(input.k) ? input.k : 'none'",
        "type(input.a) == int ? 'i' : 's'",
        "input.m.all(k, k != '') ? 'y' : 'n'",
        "input.a in ['x'] ? 'y' : 'n'",
    ):
        parse(definition(concurrency={"expression": expression}))
    limited = {"expression": "input.u", "max_runs": "has(input.pro) ? 3 : 1"}
    parse(definition(concurrency=limited))
    parse(definition(concurrency={"expression": "input.u", "max_runs": "2"}))


@pytest.mark.parametrize(
    ("on_events", "field"), [("chat.message", "on_events"), (["ok", 3], "on_events[1]")]
)
def test_a_bad_on_events_names_the_argument_not_the_stored_field(
    on_events: Any, field: str
) -> None:
    """`Workflow(..., on_events="x")` said `events: must be a non-empty list`: the stored
    definition's name, not the argument the author wrote (an API-user probe)."""
    from supersede.workflow import Workflow

    wf = Workflow("w", on_events=on_events)

    @wf.step()
    def s(ctx: Any) -> int:
        return 1

    with pytest.raises(DefinitionError) as info:
        wf.definition()
    assert info.value.field == field


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("input.user.email.lowerAscii()", "bob@acme.com"),
        ("lowerAscii(input.user.email)", "bob@acme.com"),
        ("input.path.split('/')[2].trim()", "b"),
        ("input.tags.join('+')", "x+y"),
        ("input.user.email.substring(0, 3).upperAscii()", "BOB"),
        ("input.path.replace('/', ':')", ":a: b :c"),
        ("string(input.path.indexOf('b')) + input.path.charAt(1)", "4a"),
        ("input.user.email.lowerAscii() + 'ÀB€'.lowerAscii()", "bob@acme.comÀb€"),  # (ASCII only)
        ("input.path.replace('/', '', 1)", "a/ b /c"),
        ("input.path in(['a', 'b']) ? 'y' : 'n'", "n"),  # (`in` is no function)
        ("optional.none().orValue(input.tags[1])", "y"),
    ],
)
def test_a_key_may_call_the_strings_extension(expression: str, expected: str) -> None:
    """cel-go's strings extension (lowerAscii, split, ...), as methods or functions: the CEL
    library has them, opt-in. They registered before and failed for every event ("no
    overload"): each event a dead letter."""
    key = compile_key(expression, trial=True)
    event = {"user": {"email": "Bob@Acme.com"}, "path": "/a/ b /c", "tags": ["x", "y"]}
    assert key(event, {}) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "frobnicate(input.x)",
        "input.x.frobnicate()",
        "lower(input.email)",  # (the strings extension's is lowerAscii)
        "input.a.format([1])",  # (strings.format is not implemented by the library)
        "math.abs(input.n)",  # (not given: math.bitShiftLeft(1, n) would be a memory bomb)
        "input.a + string(max(1, 2))",
        "strings.quote(input.a)",  # (cel-go's: not given, a loop in Python per character)
        "contains(input.a, 'x') ? 'y' : 'n'",  # (a method in this library: x.contains(y))
        "string(getFullYear(timestamp(input.t)))",
    ],
)
def test_an_expression_calling_a_function_cel_lacks_is_refused_at_registration(
    expression: str,
) -> None:
    """The library reports an unknown function only for an event, as for every event: it was
    registered, then every event was dead-lettered `key_error`."""
    with pytest.raises(
        DefinitionError, match=r"concurrency\.expression: (unknown function|.*is a method)"
    ):
        compile_key(expression, trial=True)
    compile_key(expression)  # (a definition read back from the registry is served as it was)


@pytest.mark.parametrize(
    "expression",
    [
        "input.x == 1",
        "input.a.contains('x')",
        "has(input.a)",
        "!input.a",
        "input.a && input.b",
        "'k' in input",
        "input.n < 3 || input.m > 4",
        "input.tags.exists(t, t == 'vip')",
        "(input.x == 1)",
        "((input.a.contains('x')))",
    ],
)
def test_an_expression_that_always_gives_a_bool_is_refused_at_registration(
    expression: str,
) -> None:
    """No key is a bool: such an expression registered, then dead-lettered every event. A
    comparison inside a ternary or a call is fine."""
    from supersede.keyexpr import compile_limit

    with pytest.raises(DefinitionError, match=r"concurrency\.expression: .* gives a bool"):
        compile_key(expression, trial=True)
    with pytest.raises(DefinitionError, match=r"concurrency\.max_runs: .* gives a bool"):
        compile_limit(expression, trial=True)
    for fine in ("input.x == 1 ? 'one' : 'other'", "string(input.n < 3)", "input.a[0]"):
        compile_key(fine, trial=True)


@pytest.mark.parametrize(
    ("expression", "what"),
    [
        ("double(input.n)", "a double"),
        ("[input.a]", "a list"),
        ("{'a': input.a}", "a map"),
        ("input.a.split(',')", "a list"),
        ("input.a.trim().split(',')", "a list"),
        ("(input.a + input.b).split(',')", "a list"),
        ("input.a.map(x, x)", "a list"),
        ("input.tags.filter(t, t != '')", "a list"),
        ("timestamp(input.t)", "a timestamp"),
        ("duration(input.d)", "a duration"),
        ("bytes(input.b)", "bytes"),
        ("optional.of(input.a)", "an optional"),
        ("type(input.a)", "a type"),
        ("(double(input.n))", "a double"),
    ],
)
def test_an_expression_that_never_gives_a_key_is_refused_at_registration(
    expression: str, what: str
) -> None:
    """A list, a map, a double, bytes, a timestamp, a duration, a type or an optional is no
    key nor limit: such an expression registered, then dead-lettered every event (an author
    probe). What an index, a conversion, an operator or a ternary makes of one is fine."""
    from supersede.keyexpr import compile_limit

    with pytest.raises(DefinitionError, match=rf"concurrency\.expression: .* gives {what} "):
        compile_key(expression, trial=True)
    with pytest.raises(DefinitionError, match=rf"concurrency\.max_runs: .* gives {what} "):
        compile_limit(expression, trial=True)
    for fine in ("input.a.split(',')[0]", "[input.a][0]", "string(double(input.n))",
                 "size(input.a.split(','))", "{'a': input.a}.a", "input.a.split(',').size()",
                 "string(bytes(input.b))", "input.n > 1 ? 'a' : 'b'"):  # fmt: skip
        compile_key(fine, trial=True)


def test_the_strings_extension_cannot_grow_one_event_past_its_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`replace` with a field for its new text, or `split('')` then `join`, could make a
    string of the product of two fields' lengths from one hostile event: refused (a key_error
    dead letter naming the budget) at once, without a log line per event."""
    import time

    started = time.perf_counter()
    replace = compile_key("input.s.replace('a', input.t)")
    with pytest.raises(KeyExpressionError, match=r"replace\(\): would bring the characters"):
        replace({"s": "a" * 1_000_000, "t": "b" * 1_000_000}, {})
    explode = compile_key("input.s.split('').join(input.t)")
    with pytest.raises(KeyExpressionError, match=r"split\(\): would bring the parts made to 1,0"):
        explode({"s": "a" * 1_000_000, "t": "b" * 1_000_000}, {})
    # the budget is the evaluation's, not each call's: a split inside a comprehension made 500
    # parts per call, and one event of 500 x 499 took 10 s (a review)
    nested = compile_key("input.q.split('&').map(kv, kv.split('='))[0][1]")
    with pytest.raises(KeyExpressionError, match="cost budget"):
        nested({"q": "&".join(["a" + "=b" * 499] * 500)}, {})
    assert nested({"q": "a=1&b=2"}, {}) == "1"  # (and each evaluation has its whole budget)
    assert time.perf_counter() - started < 5.0  # (unbounded: a terabyte string)
    assert replace({"s": "xa", "t": "b"}, {}) == "xb"
    assert not [r for r in caplog.records if r.name == "cel"]  # (the letter says it)


def test_a_missing_field_is_said_as_a_plain_path_says_it_not_as_python_s_key_error() -> None:
    """`max_runs_error ... KeyError: 'plan'` (a newcomer probe): Python's words for a map
    without the field."""
    from supersede.keyexpr import compile_limit

    with pytest.raises(KeyExpressionError, match=r": no such key 'plan'$"):
        compile_limit("metadata.plan == 'pro' ? 5 : 1")({}, {})
    with pytest.raises(KeyExpressionError, match=r": no such key 'plan'$"):
        compile_key("metadata.plan")({}, {})  # (the plain path's own words)


def test_an_output_msgpack_cannot_hold_is_named_with_its_article() -> None:
    from supersede.services.executor.outputs import OutputError, readable

    with pytest.raises(OutputError, match=r"the output is an object \(return str"):
        readable(object(), "s")
    with pytest.raises(OutputError, match=r"the output\['a'\] is a set \(return str"):
        readable({"a": {1}}, "s")


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("charAt", ("héllo", 1)), ("charAt", ("abc", 3)), ("charAt", ("abc", 4)),
        ("indexOf", ("a/b/c", "/")), ("indexOf", ("a/b/c", "/", 2)), ("indexOf", ("abc", "x", 9)),
        ("lastIndexOf", ("a/b/c", "/")), ("lastIndexOf", ("a/b/c", "/", 2)),
        ("substring", ("héllo", 1)), ("substring", ("héllo", 1, 3)), ("substring", ("ab", 2, 1)),
        ("replace", ("a-b-c", "-", "+")), ("replace", ("a-b-c", "-", "+", 1)),
        ("replace", ("abc", "", "."))   ,
        ("split", ("a,b,,c", ",")), ("split", ("a,b,c", ",", 2)), ("split", ("abc", "")),
        ("split", ("abc", "", 2)), ("split", ("abc", ",", 0)), ("split", ("", ",")),
        ("join", (["a", "b"], "-")), ("join", (["a", "b"],)), ("join", ([],)),
        ("lowerAscii", ("ÀbC-Ω",)), ("upperAscii", ("àbc-ω",)), ("trim", ("  a b \n",)),
        ("reverse", ("abc",)), ("reverse", (["a", "b"],)),
    ],
)  # fmt: skip
def test_the_strings_extension_gives_what_the_cel_library_s_own_gives(
    name: str, args: tuple[Any, ...]
) -> None:
    """Ours are bounded and faster (lowerAscii was a loop in Python per character: 0.1 s per
    MiB on the ingress loop); their results are the library's (cel-go's semantics)."""
    from cel.stdlib import EXTENSIONS

    from supersede import celstrings

    def outcome(fn: Any) -> Any:
        try:
            return fn(*args)
        except (IndexError, ValueError, TypeError) as exc:
            return type(exc).__name__ if not isinstance(exc, IndexError) else "IndexError"

    celstrings.reset()
    assert outcome(celstrings.FUNCTIONS[name]) == outcome(EXTENSIONS["strings"][name])


def test_ingress_remembers_the_groups_of_a_bounded_number_of_keys_in_all() -> None:
    """Each workflow with a limit remembered the groups of 100,000 key values: about 21 MB of
    ingress per workflow under many keys, kept for good (a churn probe: 45 MB to 131 MB with
    five workflows). The workflows with a limit share 100,000; one without keeps none."""
    from supersede.services.ingress.service import GROUP_MEMO, build_routes

    defs = {f"w{i}": parse(definition(id=f"w{i}", events=["e"])) for i in range(10)}
    defs["free"] = parse({"id": "free", "events": ["e"], "steps": [{"name": "s"}]})
    [free] = [r for r in build_routes(defs)["e"] if r.workflow.id == "free"]
    routes = [r for r in build_routes(defs)["e"] if r.workflow.id != "free"]
    assert free.key is None and {r.memo for r in routes} == {GROUP_MEMO // 10}
    one = routes[0]
    for i in range(GROUP_MEMO // 10 + 5):
        one.group_of(f"user-{i}", 16)
        assert len(one.groups) <= one.memo
    assert len(one.groups) == 5  # (emptied once full, then the last five)
    # a workflow without a limit: its key is the event's id, never seen again; it kept 100,000
    # of them, about 22 MB of ingress per such workflow (a soak probe)
    got = [free.group_of(f"1-{i}", 16) for i in range(1_000)]
    assert free.groups == {} and got[7] == free.group_of("1-7", 16)


def test_an_integer_key_is_its_decimal_text_and_the_readmes_way_to_tell_them_apart() -> None:
    """`{"k": 42}` and `{"k": "42"}` are one key (a new-user probe asked); the README says so,
    and its expression that keeps them apart registers and does."""
    import re
    from pathlib import Path

    from supersede.registry import parse

    assert compile_key("input.k")({"k": 42}, {}) == compile_key("input.k")({"k": "42"}, {})
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    [expression] = re.findall(r"make the expression say so\s+\(`([^`]+)`\)", readme)
    parse({"id": "x", "events": ["e"], "concurrency": {"expression": expression}})
    key = compile_key(expression)
    assert key({"k": 42}, {}) != key({"k": "42"}, {})


def test_a_step_named_empty_is_refused_naming_the_field() -> None:
    """`@wf.step(name="")` fell back to the function's name without a word (a new-user
    probe): a name given is the name, and an empty one fails registration naming it."""
    from supersede.errors import DefinitionError
    from supersede.workflow import Workflow

    wf = Workflow("w", on_events=["e"])

    @wf.step(name="")
    def a(ctx: Any) -> None:
        return None

    with pytest.raises(DefinitionError, match=r"steps\[0\]\.name"):
        wf.definition()
