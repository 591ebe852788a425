"""Key expressions: CEL over `input` and `metadata`, compiled once per definition version.

A plain field path such as ``input.userId`` (the common case) is evaluated by direct lookups,
with the same results and errors as CEL gives for it; anything else runs as a compiled CEL
program. A key must be a string or an integer (not a bool) of at most 1 KiB once encoded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import cel

from supersede.errors import DefinitionError, KeyExpressionError
from supersede.protocol import Reason

MAX_KEY_BYTES = 1024
MAX_EXPRESSION_CHARS = 1000
# A comprehension's cost in the CEL library grows with the square of its list (measured: 0.4 ms
# at 100 elements, 22 ms at 1,000, 320 ms at 4,000), so an expression with one refuses inputs
# holding a longer list or map: a key_error dead letter instead of a stalled ingress.
MAX_COMPREHENSION_ITEMS = 500
KeyFn = Callable[[Any, Any], str]
# Comprehension macros: each walks a list or map of the input. One is linear in the input's size
# (which max_payload bounds); one inside another is quadratic, so a hostile event could make a
# key cost seconds on the ingress loop. They are refused at registration.
_MACRO = re.compile(r"\.\s*(map|filter|all|exists|exists_one)\s*\(")
_PATH = re.compile(r"^\s*(input|metadata)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*$")


def _as_key(value: Any, expression: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise KeyExpressionError(
            Reason.KEY_ERROR, f"{expression!r} gave {type(value).__name__}, not a string or integer"
        )
    key = value if isinstance(value, str) else str(value)
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise KeyExpressionError(
            Reason.KEY_TOO_LARGE, f"{expression!r} gave a key over {MAX_KEY_BYTES} bytes"
        )
    return key


def _check_cost(expression: str, field: str) -> None:
    """Refuse expressions whose cost can grow faster than the input: over MAX_EXPRESSION_CHARS,
    or a comprehension (map, filter, all, exists, exists_one) inside another one's arguments."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise DefinitionError(field, f"must be at most {MAX_EXPRESSION_CHARS} characters")
    depth = 0  # parentheses opened
    macro_depths: list[int] = []  # the depth each open macro's arguments started at
    i = 0
    while i < len(expression):
        ch = expression[i]
        if ch in "'\"":  # skip string literals
            end = expression.find(ch, i + 1)
            while end != -1 and expression[end - 1] == "\\":
                end = expression.find(ch, end + 1)
            i = len(expression) if end == -1 else end + 1
            continue
        macro = _MACRO.match(expression, i)
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
        if ch == "(":
            depth += 1
        elif ch == ")":
            if macro_depths and macro_depths[-1] == depth:
                macro_depths.pop()
            depth -= 1
        i += 1


def compile_key(expression: str, field: str = "concurrency.expression") -> KeyFn:
    """Compile `expression`; a syntax error or a cost over the budget (see `_check_cost`)
    raises DefinitionError naming `field`."""
    if not isinstance(expression, str) or not expression.strip():
        raise DefinitionError(field, "must be a non-empty CEL expression")
    _check_cost(expression, field)
    match = _PATH.match(expression)
    if match:
        root = match.group(1)
        parts = tuple(match.group(2)[1:].split("."))

        def lookup(input_: Any, metadata: Any) -> str:
            value = input_ if root == "input" else metadata
            for part in parts:
                if not isinstance(value, dict):
                    raise KeyExpressionError(
                        Reason.KEY_ERROR, f"{expression!r}: no field {part!r} on a non-map"
                    )
                try:
                    value = value[part]
                except KeyError:
                    raise KeyExpressionError(
                        Reason.KEY_ERROR, f"{expression!r}: no such key {part!r}"
                    ) from None
            return _as_key(value, expression)

        return lookup
    try:
        program = cel.compile(expression)
    except Exception as exc:
        raise DefinitionError(field, f"invalid CEL: {exc}") from None

    walks = _MACRO.search(expression) is not None

    def evaluate(input_: Any, metadata: Any) -> str:
        if walks:
            longest = _longest_collection((input_, metadata), MAX_COMPREHENSION_ITEMS)
            if longest > MAX_COMPREHENSION_ITEMS:
                raise KeyExpressionError(
                    Reason.KEY_ERROR,
                    f"{expression!r} walks lists or maps, and the event holds one of over "
                    f"{MAX_COMPREHENSION_ITEMS} items (the cost budget of a comprehension)",
                )
        try:
            value = program.execute({"input": input_, "metadata": metadata})
        except Exception as exc:
            raise KeyExpressionError(
                Reason.KEY_ERROR, f"{expression!r}: {type(exc).__name__}: {exc}"
            ) from None
        return _as_key(value, expression)

    return evaluate


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
