"""Key expressions: CEL over `input` and `metadata`, compiled once per definition version.

A plain field path such as ``input.userId`` (the common case) is evaluated by direct lookups,
with the same results and errors as CEL gives for it; anything else runs as a compiled CEL
program. A key must be a string or an integer (not a bool) of at most 1 KiB once encoded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from supersede import celstrings
from supersede.errors import DefinitionError, KeyExpressionError
from supersede.protocol import Reason

MAX_KEY_BYTES = 1024
MAX_RUNS = 10_000  # the largest max_runs, fixed or computed
MAX_EXPRESSION_CHARS = 1000
# A comprehension's cost in the CEL library grows with the square of its list (measured: 0.4 ms
# at 100 elements, 22 ms at 1,000, 320 ms at 4,000), so an expression with one refuses inputs
# holding a longer list or map: a key_error dead letter instead of a stalled ingress.
MAX_COMPREHENSION_ITEMS = 500
# The CEL library converts each value an expression reads into its own types first: 0.1 s for a
# list of 500,000 numbers, whatever the expression does with it. An expression reading values
# of more items than this (lists, maps and what they hold, counted together) refuses the event
# (a key_error / max_runs_error dead letter) rather than stall ingress on it.
MAX_READ_ITEMS = 10_000
# A comprehension that builds a list (map, filter) copies the list it built so far at each item,
# deeply: its cost is the items walked times the size of what it builds (measured: filter over
# 500 maps of two fields, 60 ms; one item of 7,400 numbers first, 0.3 s; map(t, t) over 500
# strings of 20 KB, 0.4 s). An event for which the items walked x the size of what is built
# (see `_Build`, `_units`) exceed this is refused (a key_error dead letter); at most ~25 ms of
# ingress (about 50 ns a unit).
MAX_BUILD_COST = 500_000
KeyFn = Callable[[Any, Any], str]
# Comprehension macros: each walks a list or map of the input. One is linear in the input's size
# (which max_payload bounds); one inside another is quadratic, so a hostile event could make a
# key cost seconds on the ingress loop. They are refused at registration.
# The comprehension macros (existsOne: the library's other spelling of exists_one)
_MACROS = "map|filter|all|exists|exists_one|existsOne"
_MACRO = re.compile(rf"\.\s*({_MACROS})\s*\(")
# the macros that build a list, with the field path they walk when it is one
_BUILDS = re.compile(
    r"(?:\b(input|metadata)((?:\s*\.\s*[A-Za-z_][A-Za-z0-9_]*)*?)\s*)?\.\s*(map|filter)\s*\("
)
_PATH = re.compile(r"^\s*(input|metadata)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*$")


def _as_key(value: Any, expression: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        what = type(value).__name__
        if isinstance(value, float):  # (JSON numbers with a fraction, an exponent, or too big)
            what = (
                "a float (a number with a fraction or an exponent, or an integer too large for "
                "64 bits: send such a key as a string)"
            )
        raise KeyExpressionError(
            Reason.KEY_ERROR, f"{expression!r} gave {what}, not a string or integer"
        )
    key = value if isinstance(value, str) else str(value)
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise KeyExpressionError(
            Reason.KEY_TOO_LARGE, f"{expression!r} gave a key over {MAX_KEY_BYTES} bytes"
        )
    return key


_TRIPLES = ("'''", '"""')


def _code_only(expression: str) -> str:
    """`expression` with every string and bytes literal (quoted, triple-quoted, raw) and every
    `//` comment blanked out: what is left is code, so a macro name inside a literal or a
    comment is not taken for a call."""
    return _code_and_literals(expression)[0]


def _code_and_literals(expression: str) -> tuple[str, dict[int, str]]:
    """`_code_only`, and each literal blanked: the index of the space standing for it in the
    code -> its text in `expression` (quotes and prefix included)."""
    out: list[str] = []
    literals: dict[int, str] = {}
    i, n = 0, len(expression)
    while i < n:
        if expression.startswith("//", i):
            end = expression.find("\n", i)
            i = n if end == -1 else end
            continue
        j = i
        while j < n and j - i < 2 and expression[j] in "rRbB":
            j += 1  # a string prefix: r, b, rb, br (any case)
        if j < n and expression[j] in "'\"" and (j == i or not expression[i - 1 : i].isalnum()):
            raw = "r" in expression[i:j].lower()
            quote = expression[j : j + 3] if expression[j : j + 3] in _TRIPLES else expression[j]
            k = j + len(quote)
            while k < n and not expression.startswith(quote, k):
                k += 2 if expression[k] == "\\" and not raw else 1
            end = min(n, k + len(quote))
            literals[len(out)] = expression[i:end]
            i = end
            out.append(" ")
            continue
        out.append(expression[i])
        i += 1
    return "".join(out), literals


def _roots(code: str) -> list[re.Match[str]]:
    """Each use of the name `input` or `metadata` in `code` (not a field or a call of that
    name: `x.input`, `input(`)."""
    return [m for m in _ROOT.finditer(code) if not code[m.end() :].lstrip().startswith("(")]


_ROOT = re.compile(r"(?<![\w.])(input|metadata)\b")
_FIELD = re.compile(r"\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")


def _check_cost(expression: str, field: str, *, strict: bool = True) -> None:
    """Refuse expressions whose cost can grow faster than the input: over MAX_EXPRESSION_CHARS,
    a comprehension (map, filter, all, exists, exists_one) inside another one's arguments, or
    one whose arguments read `input` or `metadata`: the CEL library copies the event for each
    use, so that costs the items walked times the event's size (a probe: 24 s for one event
    of `input.a.all(x, input.b == input.c)`, the ingress loop stalled meanwhile). Not `strict`
    (a definition read back from the registry, maybe stored before that rule): the last rule
    is left out, so the workflow keeps its runs until its executors register it again."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise DefinitionError(field, f"must be at most {MAX_EXPRESSION_CHARS} characters")
    code = _code_only(expression)
    roots = {m.start(): m.group(1) for m in _roots(code)}
    depth = 0  # parentheses opened
    macro_depths: list[int] = []  # the depth each open macro's arguments started at
    i = 0
    while i < len(code):
        macro = _MACRO.match(code, i)
        if macro:
            if macro_depths:
                raise DefinitionError(
                    field,
                    f"nested comprehension `.{macro.group(1)}()` inside another: its cost grows "
                    "with the square of the input; compute the key with one pass",
                )
            depth += 1
            macro_depths.append(depth)
            i = macro.end()
            continue
        if strict and macro_depths and _MATCHES.match(code, i):
            raise DefinitionError(
                field,
                "matches() inside a comprehension: CEL compiles its pattern again for each item "
                "(a list of 500 costs seconds); match one value, or use startsWith, endsWith "
                "or contains",
            )
        if strict and macro_depths and i in roots:
            raise DefinitionError(
                field,
                f"a comprehension reads `{roots[i]}` inside its arguments: the event is copied "
                "for each item it walks, so its cost grows with the square of the input; "
                "compare each item with constants only",
            )
        if code[i] == "(":
            depth += 1
        elif code[i] == ")":
            if macro_depths and macro_depths[-1] == depth:
                macro_depths.pop()
            depth -= 1
        i += 1


_TARGET = re.compile(
    r"\b(input|metadata)((?:\s*\.\s*[A-Za-z_][A-Za-z0-9_]*)*?)\s*\.\s*"
    rf"(?:{_MACROS})\s*\("
)


def _walked_paths(code: str) -> list[tuple[str, tuple[str, ...]]] | None:
    """The field paths the comprehensions of `code` walk (`input.items.map(...)` walks
    input.items), or None when one walks something else (a literal, a function's result):
    then every list and map of the event counts against the budget."""
    macros = len(_MACRO.findall(code))
    paths = [
        (m.group(1), tuple(p.strip() for p in m.group(2).split(".") if p.strip()))
        for m in _TARGET.finditer(code)
    ]
    return paths if len(paths) == macros else None


def _walked_size(paths: list[tuple[str, tuple[str, ...]]] | None, input_: Any, meta: Any) -> int:
    """The largest list or map a comprehension of the expression would walk."""
    if paths is None:
        return _longest_collection((input_, meta), MAX_COMPREHENSION_ITEMS)
    longest = 0
    for root, parts in paths:
        value = input_ if root == "input" else meta
        for part in parts:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, dict | list | tuple):
            longest = max(longest, len(value))
    return longest


def compile_key(
    expression: str, field: str = "concurrency.expression", *, trial: bool = False
) -> KeyFn:
    """Compile `expression`; a syntax error or a cost over the budget (see `_check_cost`)
    raises DefinitionError naming `field`; with `trial` (at registration), so does a name
    that is not `input` or `metadata`, or a constant that is no key."""

    def key(input_: Any, metadata: Any) -> str:
        return _as_key(raw(input_, metadata), expression)

    raw = _compile(
        expression, field, Reason.KEY_ERROR, (lambda v: _as_key(v, expression)) if trial else None
    )
    return key


LimitFn = Callable[[Any, Any], int]


def compile_limit(
    expression: str, field: str = "concurrency.max_runs", *, trial: bool = False
) -> LimitFn:
    """Compile a dynamic `max_runs`: a CEL expression over `input` and `metadata` giving an
    integer in 1..MAX_RUNS; an event it fails for, or gives anything else for, raises
    KeyExpressionError with reason `max_runs_error` (a dead letter)."""

    def checked(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RUNS:
            raise KeyExpressionError(
                Reason.MAX_RUNS_ERROR,
                f"max_runs {expression!r} gave {value!r}, not an integer in 1..{MAX_RUNS}",
            )
        return value

    def limit(input_: Any, metadata: Any) -> int:
        return checked(raw(input_, metadata))

    raw = _compile(expression, field, Reason.MAX_RUNS_ERROR, checked if trial else None)
    return limit


def _compile(
    expression: str, field: str, reason: str, check: Callable[[Any], Any] | None
) -> Callable[[Any, Any], Any]:
    """The value of `expression` for an event; its failures raise KeyExpressionError(reason).
    `check` (at registration: see `_trial`) validates a value, raising KeyExpressionError."""
    if not isinstance(expression, str) or not expression.strip():
        raise DefinitionError(field, "must be a non-empty CEL expression")
    _check_cost(expression, field, strict=check is not None)
    match = _PATH.match(expression)
    if match:
        return _path_lookup(match, expression, reason)
    import cel  # (here: its import pulls in a REPL's toolkit, 0.1 s a CLI command need not pay)

    try:
        program = cel.compile(expression)
    except Exception as exc:
        # (the parser's message is several lines: the error, then the expression and a caret)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DefinitionError(field, f"invalid CEL: {first}") from None
    code, literals = _code_and_literals(expression)
    called = _calls(code)
    functions = {
        name: celstrings.FUNCTIONS[name] for name, _ in called if name in celstrings.FUNCTIONS
    }
    if functions:  # (the library logs each failure of a Python function: an event's failure
        logging.getLogger("cel").setLevel(logging.CRITICAL)  # is its dead letter, not a line)
    if check is not None:
        _refuse_unknown_calls(called, expression, field)
        _refuse_costly_patterns(code, literals, expression, field)
        _refuse_always_bool(code, expression, field, reason)
        _refuse_never_a_key(code, expression, field, reason)
        _trial(program, expression, field, check, functions)

    walks = _MACRO.search(code) is not None
    paths = _walked_paths(code) if walks else None
    builds = _builds(code)
    read = _fields_read(code)
    only_in, only_md = read.get("input", frozenset()), read.get("metadata", frozenset())

    def evaluate(input_: Any, metadata: Any) -> Any:
        # (the fields it reads only: the library converts all it is given, 0.3 s for a 1 MB
        # event whatever the expression reads)
        input_, metadata = _only(input_, only_in), _only(metadata, only_md)
        if _items_over([input_, metadata], MAX_READ_ITEMS):
            raise KeyExpressionError(
                reason,
                f"{expression!r} reads values of over {MAX_READ_ITEMS:,} items (lists and maps "
                "with what they hold), over what an expression may read (its cost budget)",
            )
        if walks:
            _check_walks(expression, reason, paths, builds, [input_, metadata])
        try:
            if functions:
                celstrings.reset()
                return program.execute({"input": input_, "metadata": metadata, **functions})
            return program.execute({"input": input_, "metadata": metadata})
        except Exception as exc:
            raise KeyExpressionError(reason, f"{expression!r}: {_explained(exc, code)}") from None

    return evaluate


def _check_walks(
    expression: str,
    reason: str,
    paths: list[tuple[str, tuple[str, ...]]] | None,
    builds: list[_Build],
    roots: list[Any],
) -> None:
    """Refuse an event whose comprehensions would walk over MAX_COMPREHENSION_ITEMS items, or
    build lists costing over MAX_BUILD_COST."""
    longest = _walked_size(paths, *roots)
    if longest > MAX_COMPREHENSION_ITEMS:
        raise KeyExpressionError(
            reason,
            f"{expression!r} walks a list or map of {longest} items, over the "
            f"{MAX_COMPREHENSION_ITEMS} a comprehension may walk (its cost budget)",
        )
    cost = 0
    for build in builds:
        cost += build.cost(roots, MAX_BUILD_COST - cost + 1)
        if cost > MAX_BUILD_COST:
            raise KeyExpressionError(
                reason,
                f"{expression!r} builds a list (map, filter) costing over {MAX_BUILD_COST:,} "
                "for this event (its cost budget): the library copies the list built so far at "
                "each item, so the items walked x the size of what is built (1 per value, a "
                "string 1 more per 512 characters, a map's entry 1 more); walk fewer or smaller "
                "items, map them to a field of each, or test them with exists() or all()",
            )


@dataclass(frozen=True, slots=True)
class _Build:
    """A comprehension of a key expression that builds a list (map, filter): what it walks
    (`path`: root and fields; None: what a function made, `split`'s parts, or a literal), and
    what it makes of each item: a filter keeps the item; a map makes what its body reads of the
    item (`uses`: each use of its variable, by the fields it reads of it, () for all of it),
    a unit, and the elements of the list and map literals it writes (`literals`)."""

    path: tuple[str, tuple[str, ...]] | None
    uses: tuple[tuple[str, ...], ...] | None  # None: a filter
    literals: int

    def cost(self, roots: list[Any], limit: int) -> int:
        """Items walked x the size of what is built from them, counted up to past `limit`."""
        if self.path is None:  # (up to as many items; each built from anything read)
            per_item = max(1, len(self.uses or ()) + self.literals)
            n = MAX_COMPREHENSION_ITEMS * per_item
            return n * _units(roots, limit // n + 1)
        value = roots[0] if self.path[0] == "input" else roots[1]
        for part in self.path[1]:
            value = value.get(part) if isinstance(value, dict) else None
        items = list(value) if isinstance(value, dict | list | tuple) else []
        if not items:
            return 0
        n, room = len(items), limit // len(items) + 1
        if self.uses is None:
            return n * _units(items, room)
        built = n * (1 + self.literals)  # (what it makes, and the literals' elements)
        for item in items:
            for fields in self.uses:
                built += _units([_field_of(item, fields)], room - built)
            if built > room:
                break
        return n * built


def _field_of(item: Any, fields: tuple[str, ...]) -> Any:
    for name in fields:
        item = item.get(name) if isinstance(item, dict) else None
    return item


_USE_TAIL = re.compile(r"((?:\s*\.\s*[A-Za-z_][A-Za-z0-9_]*)*)(\s*\()?")


def _builds(code: str) -> list[_Build]:
    """The comprehensions of `code` that build a list (see _Build)."""
    out = []
    for m in _BUILDS.finditer(code):
        path = None
        if m.group(1):
            path = (m.group(1), tuple(p.strip() for p in m.group(2).split(".") if p.strip()))
        args = _arguments(code, m.end())
        name = args[0].strip()
        if m.group(3) == "filter" or len(args) < 2 or not name.isidentifier():
            out.append(_Build(path, None, 0))
            continue
        body = args[-1]
        uses = []
        for use in re.finditer(rf"(?<![\w.]){re.escape(name)}\b", body):
            tail = _USE_TAIL.match(body, use.end())
            fields = [f.strip() for f in tail.group(1).split(".") if f.strip()] if tail else []
            if tail and tail.group(2) and fields:  # (a method's result: about its receiver)
                fields.pop()
            uses.append(tuple(fields))
        # (each element of a literal is built per item: `[t, 0, 0, ...]` cost seconds)
        literals = body.count(",") + body.count("[") + body.count("{")
        out.append(_Build(path, tuple(uses), literals))
    return out


_MATCHES = re.compile(r"\.\s*matches\s*\(")
# How many copies of a Unicode class a `matches` pattern may compile into: the CEL library
# compiles it again at each evaluation, on ingress's loop, for every event (a probe: an email
# pattern with `[\w.+-]{1,64}` took 56 ms, 13 events a second). Counted from the pattern, not
# timed: a limit on compile time measured as the pattern registered (40 times a plain `\w`'s)
# flapped on a busy machine, an executor refused on one start and not on the next (an upgrade
# probe: `^\w{1,24}$` measured 25 to 83 times). A plain `\w` compiles in 0.2-0.3 ms here,
# `^\w{1,16}$` in 16-19 times that, `^\w{1,32}$` 95 times, `[\w.]{1,64}` 237 times; `\d` a
# fifteenth of `\w`, ASCII classes, `.`, `\s` and negated ASCII classes a hundredth or less.
MATCHES_UNITS_MOST = 24

_HEAVY = 1.0  # \w \W \p{..} \P{..}, or a class that holds one (a negated one: \W-like)
_NOT_DIGIT = 0.45  # \D, or a negated class that holds \d
_DIGIT = 0.1  # \d (Unicode digits), or a class that holds it
_WIDE = 0.04  # \S
_ANY = 0.015  # `.`, \s, a negated class of ASCII (each a few UTF-8 ranges)
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}\??")
_FLAGS = re.compile(r"\(\?([a-zA-Z]*)(?:-([a-zA-Z]*))?(:|\))")
_POSIX = re.compile(r"\[:\^?[A-Za-z]+:\]")
_TIMES_MOST = 10**6  # (a repetition counted past this is refused anyway)


def pattern_units(pattern: str) -> float:
    r"""The copies of Unicode classes `pattern` compiles into, by its text (see
    MATCHES_UNITS_MOST): `\w`, `\W`, `\p{..}`, `\P{..}` or a class holding one count 1, `\D`
    0.45, `\d` a tenth, `\S` 0.04, `.`, `\s` and negated ASCII classes 0.015, literals and
    ASCII classes nothing; a repetition `{m,n}` multiplies what it repeats by n (`{m}` by m,
    `{m,}` by m + 1), `+`, `*` and `?` by 1; under `(?-u)` nothing counts (ASCII classes);
    `(?x)` skips spaces and comments. A pattern the regex library refuses is its to say."""
    # a frame per open group: [units before its last atom, units of its last atom, unicode,
    # verbose]
    stack: list[list[Any]] = [[0.0, 0.0, True, False]]
    i, n = 0, len(pattern)

    def atom(units: float) -> None:
        top = stack[-1]
        top[0] += top[1]
        top[1] = units if top[2] else 0.0

    while i < n:
        c = pattern[i]
        repeat = _REPEAT.match(pattern, i)
        if stack[-1][3] and (c.isspace() or c == "#"):  # ((?x): spaces and comments)
            i = (pattern.find("\n", i) + 1 or n) if c == "#" else i + 1
        elif c == "\\" and i + 1 < n:
            units, i = _escape_units(pattern, i)
            atom(units)
        elif c == "[":
            units, i = _class_units(pattern, i)
            atom(units)
        elif c == "(":
            i = _open_group(pattern, i, stack, atom)
        elif c == ")" and len(stack) > 1:
            top = stack.pop()
            i += 1
            atom(top[0] + top[1])
            stack[-1][1] = top[0] + top[1]  # (whatever the group's own flags)
        elif repeat:
            low, high = int(repeat.group(1)), repeat.group(2)
            times = low + 1 if high == "" else int(high) if high else low
            stack[-1][1] *= min(max(times, 1), _TIMES_MOST)
            i = repeat.end()
        elif c in "*+?":  # (what they repeat counts once: `\w*{100}` is 100 of it)
            i += 1
        else:
            atom(_ANY if c == "." else 0.0)  # (a literal, or `|`)
            i += 1
    while len(stack) > 1:  # (unbalanced: the library refuses it)
        top = stack.pop()
        stack[-1][0] += top[0] + top[1]
    return float(stack[0][0] + stack[0][1])


def _escape_units(pattern: str, i: int) -> tuple[float, int]:
    """The units of the escape at `i` (see pattern_units), and where the next atom starts."""
    e = pattern[i + 1]
    i += 2
    if e in "pP":  # (\pL, \p{Letter})
        if pattern.startswith("{", i):
            return _HEAVY, pattern.find("}", i) + 1 or len(pattern)
        return _HEAVY, i + 1
    return _CLASS_ESCAPES.get(e, 0.0), i


_CLASS_ESCAPES = {"w": _HEAVY, "W": _HEAVY, "D": _NOT_DIGIT, "d": _DIGIT, "S": _WIDE, "s": _ANY}


def _class_units(pattern: str, i: int) -> tuple[float, int]:
    """The units of the class `[...]` at `i` (see pattern_units), and where it ends."""
    j, n, depth, units = i + 1, len(pattern), 1, 0.0
    negated = pattern.startswith("^", j)
    if negated:
        j += 1
    if pattern.startswith("]", j):  # (a first `]` is a literal)
        j += 1
    while j < n and depth:
        d = pattern[j]
        posix = _POSIX.match(pattern, j) if d == "[" else None
        if d == "\\" and j + 1 < n:
            e = pattern[j + 1]
            units = max(units, _HEAVY if e in "pP" else _CLASS_ESCAPES.get(e, 0.0))
            j += 2
        elif posix:  # ([[:alpha:]]: ASCII)
            j = posix.end()
        else:
            depth += 1 if d == "[" else -1 if d == "]" else 0
            j += 1
    if negated:  # (its complement: \W-like with \w, \D-like with \d, else most of Unicode)
        units = _NOT_DIGIT if units == _DIGIT else max(units, _ANY)
    return units, j


def _open_group(pattern: str, i: int, stack: list[list[Any]], atom: Callable[[float], None]) -> int:
    """At `(`: a frame for the group (or, for `(?flags)` alone, the flags set in the enclosing
    one); where its inside starts."""
    unicode, verbose = stack[-1][2], stack[-1][3]
    flags = _FLAGS.match(pattern, i)
    if flags:
        on, off, end = flags.group(1), flags.group(2) or "", flags.group(3)
        unicode = (unicode or "u" in on) and "u" not in off
        verbose = (verbose or "x" in on) and "x" not in off
        if end == ")":  # ((?-u) alone: to the end of the enclosing group)
            atom(0.0)
            stack[-1][2], stack[-1][3] = unicode, verbose
            return flags.end()
        i = flags.end()
    else:
        i += 1
        if pattern.startswith(("?P<", "?<"), i) and not pattern.startswith(("?<=", "?<!"), i):
            i = pattern.find(">", i) + 1 or len(pattern)
    stack.append([0.0, 0.0, unicode, verbose])
    return i


def _refuse_costly_patterns(
    code: str, literals: dict[int, str], expression: str, field: str
) -> None:
    r"""Refuse a `matches` whose pattern is not a string literal (an event would choose what the
    regex costs to compile), that the regex library refuses, or that compiles into over
    MATCHES_UNITS_MOST copies of a Unicode class."""
    for match in _MATCHES.finditer(code):
        [argument, *more] = _arguments(code, match.end())
        start = match.end()
        at = [i for i in range(start, start + len(argument)) if i in literals]
        if more or len(at) != 1 or argument.strip():
            raise DefinitionError(
                field,
                f"matches() in {expression!r} takes one string literal as its pattern (an "
                "event's value would choose what the regex costs to compile, at every event)",
            )
        pattern = literals[at[0]]
        try:
            _compile_pattern(pattern)
        except Exception as exc:  # (it failed for every event: each a dead letter)
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            why = next((line for line in lines if line.startswith("error:")), lines[0])
            why = why.removeprefix("error: ").split(". Check function")[0]
            raise DefinitionError(field, f"the regex library refuses {pattern}: {why}") from None
        units = pattern_units(_unquoted(pattern))
        if units > MATCHES_UNITS_MOST:
            raise DefinitionError(
                field,
                f"the pattern {pattern} compiles into {units:.0f} copies of a Unicode class "
                f"(at most {MATCHES_UNITS_MOST}), and CEL compiles it at every evaluation, for "
                "every event: a counted repetition of a Unicode class (`[\\w.]{1,64}`) is "
                "the usual cost; use ASCII classes ((?-u:\\w), [A-Za-z0-9_]) or + and * for "
                "the count",
            )


def _compile_pattern(pattern: str) -> None:
    """The CEL library compiles `pattern` (a literal) in a `matches`; raises what it raises."""
    import cel

    cel.compile(f"s.matches({pattern})").execute({"s": ""})


def _unquoted(literal: str) -> str:
    """The text of a CEL string literal (quotes and prefix included), as CEL reads it (its
    escapes undone: `'\\x5cw'` is `\\w`)."""
    import cel

    try:
        value = cel.evaluate(literal)
    except Exception:  # (the library refused the pattern first, in _compile_pattern)
        return literal
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _arguments(code: str, start: int) -> list[str]:
    """The arguments of the call whose `(` ends just before `start`, as text."""
    depth, parts, begin = 0, [], start
    for i in range(start, len(code)):
        c = code[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if not depth:
                break
            depth -= 1
        elif c == "," and not depth:
            parts.append(code[begin:i])
            begin = i + 1
    else:
        i = len(code)
    parts.append(code[begin:i])
    return parts


def _units(roots: list[Any], limit: int) -> int:
    """The size of `roots` as a list-building comprehension copies it: 1 per value, a string
    (or bytes) 1 more per 512 characters, a list 1 plus its items, a map 1 plus 1 per entry
    (its key, with the key's length) plus its values. Stops counting past `limit`."""
    units = 0
    todo = list(roots)
    while todo and units <= limit:
        node = todo.pop()
        units += 1
        if isinstance(node, str | bytes):
            units += len(node) >> 9
        elif isinstance(node, dict):
            for k, v in node.items():
                units += 1 + (len(k) >> 9 if isinstance(k, str | bytes) else 0)
                todo.append(v)
        elif isinstance(node, list | tuple):
            todo.extend(node)
    return units


def _fields_read(code: str) -> dict[str, frozenset[str] | None]:
    """For `input` and `metadata`, the top-level fields `code` reads (`input.a.b` reads a);
    None where it uses the whole map (`size(input)`, `'a' in input`, `input['a']`); a root it
    never names is absent."""
    out: dict[str, set[str] | None] = {}
    for use in _roots(code):
        root = use.group(1)
        name = _FIELD.match(code, use.end())
        if name is None or code[name.end() :].lstrip().startswith("("):
            out[root] = None  # (the map as one, or a method of it: `input.size()`)
        elif root not in out or out[root] is not None:
            out.setdefault(root, set()).add(name.group(1))  # type: ignore[union-attr]
    return {root: None if fields is None else frozenset(fields) for root, fields in out.items()}


def _only(value: Any, fields: frozenset[str] | None) -> Any:
    """`value` cut to `fields` when it is a map (None: all of it)."""
    if fields is None or not isinstance(value, dict):
        return value
    return {f: value[f] for f in fields if f in value}


_UNDEFINED = re.compile(r"Undefined variable or function: '(\w+)'")
_FUNCTION_FAILED = re.compile(
    r"Function '([\w.]+)' error: Python function call failed: \w+: (.*?)\.? Check function",
    re.DOTALL,
)


def _explained(exc: Exception, code: str) -> str:
    """The CEL library's message of a failed evaluation; a function it calls undefined, which
    the expression calls, is one it has no overload for with that value (`string([1])`,
    `size(1)`, `bool('x')`): the detail says that instead of a misleading "undefined"."""
    text = str(exc)
    failed = _FUNCTION_FAILED.match(text)  # (one of the strings extension's, by its own words)
    if failed:
        return f"{failed[1]}(): {failed[2]}"
    match = _UNDEFINED.match(text)
    if match and re.search(rf"\b{re.escape(match.group(1))}\s*\(", code):
        return f"{match.group(1)}() cannot take the value it was given (no overload for it)"
    if isinstance(exc, KeyError):  # (a map without the field: as a plain path says it)
        return f"no such key {text}"
    return f"{type(exc).__name__}: {text}"


def _path_lookup(match: re.Match[str], expression: str, reason: str) -> Callable[[Any, Any], Any]:
    """A plain field path (`input.a.b`) by direct lookups, as CEL would read it."""
    root = match.group(1)
    parts = tuple(match.group(2)[1:].split("."))

    def lookup(input_: Any, metadata: Any) -> Any:
        value = input_ if root == "input" else metadata
        for part in parts:
            if not isinstance(value, dict):
                raise KeyExpressionError(reason, f"{expression!r}: no field {part!r} on a non-map")
            try:
                value = value[part]
            except KeyError:
                raise KeyExpressionError(reason, f"{expression!r}: no such key {part!r}") from None
        return value

    return lookup


def _trial(
    program: Any,
    expression: str,
    field: str,
    check: Callable[[Any], Any],
    functions: dict[str, Callable[..., Any]],
) -> None:
    """Evaluate `program` once for an empty event, at registration: a name other than `input`
    and `metadata` (a typo, `max_runs="two"`) would fail for every event, and so would a
    constant that is no key or limit (`max_runs="'a'"`); refuse them now. Other failures (a
    field the empty event lacks) are the events' to meet."""
    code = _code_only(expression)
    names = {m.group(1) for m in _IDENT.finditer(code)}
    bound = {name for pair in _BOUND.findall(code) for name in pair if name}
    free = sorted(names - bound - _KNOWN)
    if free:
        raise DefinitionError(
            field,
            f"unknown name {free[0]!r} in {expression!r}: an expression reads `input` (the "
            "event's data) and `metadata`",
        )
    try:
        celstrings.reset()
        value = program.execute({"input": {}, "metadata": {}, **functions})
    except Exception as exc:
        text = str(exc)
        if isinstance(exc, RuntimeError) and text.startswith("Undefined variable or function"):
            raise DefinitionError(
                field,
                f"{text.split('. Check', 1)[0]} in {expression!r}: an expression reads `input` "
                "(the event's data) and `metadata`",
            ) from None
        if not names & {"input", "metadata"}:  # a constant: it fails for every event
            why = " ".join(_explained(exc, code).split())  # (one line: a parse error has more)
            raise DefinitionError(field, f"{expression!r} fails for every event: {why}") from None
        return
    if not names & {"input", "metadata"}:  # a constant: the same for every event
        try:
            check(value)
        except KeyExpressionError as exc:
            raise DefinitionError(field, exc.detail) from None


# A name that is not a field (no dot before it) nor a call (no parenthesis after it); the
# variables a comprehension binds; and the names CEL itself gives a meaning.
_IDENT = re.compile(r"(?<![\w.])([A-Za-z_][A-Za-z0-9_]*)\b(?!\s*\()")
_BOUND = re.compile(
    rf"\.\s*(?:{_MACROS})\s*\(\s*([A-Za-z_]\w*)\s*,"
    r"(?:\s*([A-Za-z_]\w*)\s*,)?"
)
_KNOWN = frozenset(
    {"input", "metadata", "true", "false", "null", "in", "int", "uint", "double", "bool",
     "string", "bytes", "list", "map", "null_type", "type", "dyn", "optional"}
)  # fmt: skip

# The functions the CEL library itself implements (the core specification), as it takes them:
# as methods (`x.contains(y)`) or as functions (`int(x)`). It reports any other call only when
# an event is evaluated, "undefined", for every event: registration refuses one (it registered,
# and every event became a dead letter).
_NATIVE_METHODS = frozenset(
    {"size", "contains", "startsWith", "endsWith", "matches", "all", "exists", "exists_one",
     "existsOne", "map", "filter", "getFullYear", "getMonth", "getDate", "getDayOfMonth",
     "getDayOfWeek", "getDayOfYear", "getHours", "getMinutes", "getSeconds",
     "getMilliseconds", "hasValue", "value", "orValue", "or"}
)  # fmt: skip
_NATIVE_FUNCTIONS = frozenset(
    {"size", "int", "uint", "double", "string", "bytes", "timestamp", "duration", "dyn",
     "type", "has", "optional.of", "optional.none", "optional.ofNonZeroValue"}
)  # fmt: skip
_CALL = re.compile(r"(?<![\w])([A-Za-z_]\w*)\s*\(")
_QUALIFIER = re.compile(r"(?<![\w.])(optional)\s*\.\s*$")
_DOT_BEFORE = re.compile(r"\.\s*$")
_OPERATORS = frozenset({"in"})  # (`x in(['a'])`: an operator before a parenthesis)


def _calls(code: str) -> frozenset[tuple[str, bool]]:
    """The functions `code` calls: (name, called as a method `x.f()`); `optional.of` by its
    namespaced name, as a function."""
    calls = set()
    for match in _CALL.finditer(code):
        name = match.group(1)
        if name in _OPERATORS:
            continue
        if _QUALIFIER.search(code, 0, match.start()):
            calls.add((f"optional.{name}", False))
        else:
            calls.add((name, _DOT_BEFORE.search(code, 0, match.start()) is not None))
    return frozenset(calls)


def _refuse_unknown_calls(called: frozenset[tuple[str, bool]], expression: str, field: str) -> None:
    for name, method in sorted(called):
        if name in celstrings.FUNCTIONS or name in (
            _NATIVE_METHODS if method else _NATIVE_FUNCTIONS
        ):
            continue
        if not method and name in _NATIVE_METHODS:
            raise DefinitionError(
                field,
                f"{name}() in {expression!r} is a method in CEL: call it on its value "
                f"(`x.{name}(...)`)",
            )
        raise DefinitionError(
            field,
            f"unknown function {name}() in {expression!r}: an expression may call CEL's "
            f"standard functions and the strings extension ({', '.join(celstrings.FUNCTIONS)})",
        )


_COMPARISON = re.compile(r"==|!=|<=|>=|<|>|&&|\|\||(?<![\w.])in(?!\w)")
_LAST_CALL = re.compile(r"([A-Za-z_]\w*)\s*\(\s*\)\s*$")
_PREDICATES = frozenset(
    {"contains", "startsWith", "endsWith", "matches", "has", "all", "exists", "exists_one",
     "existsOne", "hasValue"}
)  # fmt: skip


def _refuse_always_bool(code: str, expression: str, field: str, reason: str) -> None:
    """Refuse an expression that gives a bool whatever the event (a comparison, `!x`, a
    predicate such as `input.a.contains('x')`, outside a ternary): no key nor limit is a
    bool, so every event would be a dead letter."""
    code = code.strip()
    while code.startswith("(") and _top_level(code).strip() == "(" + " " * (len(code) - 2) + ")":
        code = code[1:-1].strip()  # (`(input.a == 1)`: what the parentheses hold)
    top = _top_level(code).strip()
    if "?" in top:  # (a ternary: its branches give the value)
        return
    last = _LAST_CALL.search(top)  # (what the outermost call holds is blanked)
    if not (_COMPARISON.search(top) or top.startswith("!") or (last and last[1] in _PREDICATES)):
        return
    wanted = "a string or an integer" if reason == Reason.KEY_ERROR else "an integer"
    raise DefinitionError(
        field, f"{expression!r} gives a bool (true or false) for every event, not {wanted}"
    )


# What the outermost call gives, where it is no key nor limit whatever the event: by function
# (`double(input.n)`) and by method (`input.a.split(',')`).
_NOT_A_KEY_FUNCTIONS = {
    "double": "a double", "bytes": "bytes", "timestamp": "a timestamp", "duration": "a duration",
    "type": "a type", "optional.of": "an optional", "optional.none": "an optional",
    "optional.ofNonZeroValue": "an optional",
}  # fmt: skip
_NOT_A_KEY_METHODS = {"split": "a list", "map": "a list", "filter": "a list"}
# What may stand before the outermost call: a receiver (`input.a.`, `input.a.trim().`), no
# operator (what brackets hold is blanked)
_RECEIVER = re.compile(r"[\w.\s()\[\]]*")


def _refuse_never_a_key(code: str, expression: str, field: str, reason: str) -> None:
    """Refuse an expression whose value is no string nor integer whatever the event: a list
    or map literal, or an outermost call that gives a list, a double, bytes, a timestamp, a
    duration, a type or an optional (every event was a `key_error` dead letter, an author
    probe). What an index, an operator or a ternary makes of them is left to the trial."""
    top = _top_level(code.strip()).strip()
    while top.startswith("(") and top.endswith(")") and not top[1:-1].strip():
        code = code.strip()[1:-1]  # (`(input.a.split(','))`: what the parentheses hold)
        top = _top_level(code.strip()).strip()
    what = None
    if re.fullmatch(r"\[\s*\]", top):
        what = "a list"
    elif re.fullmatch(r"\{\s*\}", top):
        what = "a map"
    elif (last := _LAST_CALL.search(top)) and _RECEIVER.fullmatch(top, 0, last.start()):
        before = top[: last.start()].replace(" ", "")
        name = last[1]
        if before == "optional.":
            what = _NOT_A_KEY_FUNCTIONS.get(f"optional.{name}")
        elif before.endswith("."):
            what = _NOT_A_KEY_METHODS.get(name)
        elif not before:
            what = _NOT_A_KEY_FUNCTIONS.get(name)
    if what is None:
        return
    wanted = "a string or an integer" if reason == Reason.KEY_ERROR else "an integer"
    raise DefinitionError(field, f"{expression!r} gives {what} for every event, not {wanted}")


def _top_level(code: str) -> str:
    """`code` with what its parentheses, brackets and braces hold blanked out (their
    delimiters kept): the operators left are the expression's outermost ones."""
    out: list[str] = []
    depth = 0
    for char in code:
        if char in ")]}":
            depth = max(0, depth - 1)
        out.append(char if depth == 0 else " ")
        if char in "([{":
            depth += 1
    return "".join(out)


def _items_over(roots: list[Any], limit: int) -> bool:
    """Whether `roots` hold more than `limit` items: lists' and maps' entries, nested ones
    too (stops counting past `limit`, so an event of any size costs at most that)."""
    items = 0
    todo = roots
    while todo:
        node = todo.pop()
        if isinstance(node, dict | list | tuple):
            items += len(node)
            if items > limit:
                return True
            todo.extend(node.values() if isinstance(node, dict) else node)
    return False


def _longest_collection(root: Any, limit: int) -> int:
    """The length of the longest list or map inside `root` (stops once one exceeds `limit`)."""
    longest = 0
    todo = [root]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            longest = max(longest, len(node))
            todo.extend(node.values())
        elif isinstance(node, list | tuple):
            longest = max(longest, len(node))
            todo.extend(node)
        if longest > limit:
            break
    return longest
