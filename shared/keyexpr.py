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
KeyFn = Callable[[Any, Any], str]
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


def compile_key(expression: str, field: str = "concurrency.expression") -> KeyFn:
    """Compile `expression`; a syntax error raises DefinitionError naming `field`."""
    if not isinstance(expression, str) or not expression.strip():
        raise DefinitionError(field, "must be a non-empty CEL expression")
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

    def evaluate(input_: Any, metadata: Any) -> str:
        try:
            value = program.execute({"input": input_, "metadata": metadata})
        except Exception as exc:
            raise KeyExpressionError(
                Reason.KEY_ERROR, f"{expression!r}: {type(exc).__name__}: {exc}"
            ) from None
        return _as_key(value, expression)

    return evaluate
