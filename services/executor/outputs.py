"""Step outputs: packed as msgpack (bin type: bytes read back as bytes; tuples read back as
lists), refused with a message that names the part msgpack cannot hold."""

from __future__ import annotations

import inspect
from typing import Any

from supersede import codec
from supersede.errors import describe

_DEPTH = 64  # (the walk that names the culprit stops there; msgpack refuses deeper anyway)


class OutputError(TypeError):
    """A step returned an output that cannot be stored: the step's failure, not retried (the
    same code returns the same kind of output; a retry would only repeat its side effects)."""


def readable(output: Any, step: str) -> bytes:
    """`output` as msgpack, once it is sure to read back: a map keyed by an array packs but does
    not unpack in Python (its key would be a list), and every reader of the run would fail."""
    try:
        packed = codec.pack_value(output)
    except Exception as exc:
        where, what = _culprit(output, "the output", 0) or ("the output", output)
        raise OutputError(
            f"step {step!r} returned an output msgpack cannot hold: {where} is {_kind(what)} "
            f"({describe(exc)})"
        ) from None
    if isinstance(output, dict | list | tuple):
        try:
            codec.unpack_exact(packed)
        except Exception as exc:
            raise OutputError(
                f"step {step!r} returned an output that cannot be read back ({describe(exc)}): "
                "use str, int, float, bool or None as map keys"
            ) from None
    return packed


def _culprit(value: Any, where: str, depth: int) -> tuple[str, Any] | None:
    """(where, what) of the first part of `value` that msgpack cannot pack."""
    if depth < _DEPTH and isinstance(value, dict):
        for k, v in value.items():
            found = _culprit(k, f"a key of {where}", depth + 1)
            found = found or _culprit(v, f"{where}[{k!r}]", depth + 1)
            if found:
                return found
        return None
    if depth < _DEPTH and isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _culprit(v, f"{where}[{i}]", depth + 1)
            if found:
                return found
        return None
    try:
        codec.pack_value(value)
    except Exception:
        return where, value
    return None


def _kind(value: Any) -> str:
    name = type(value).__name__
    a = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(value, dict | list | tuple):  # (the walk stopped at _DEPTH)
        return f"{a} {name} nested too deep (or holding itself)"
    if isinstance(value, int) and not isinstance(value, bool):
        return (
            "an integer outside msgpack's 64 bits (a fence, ctx.fence, is 128 bits: return "
            "str(ctx.fence))"
        )
    if inspect.isawaitable(value):
        return f"{a} {name} (an async call not awaited: await it, in an async step)"
    return f"{a} {name} (return str, bytes, numbers, bool, None, lists or maps)"
