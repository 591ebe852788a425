"""The wire codec of internal payloads: msgpack.

Payloads are read by Lua's cmsgpack, which predates msgpack's bin type, so everything is packed
in the old format (bytes and str both as raw). Decoding turns raw into str and keeps bytes that
are not UTF-8 reversible through surrogate escapes, and packing reverses them: a decoded record
(whose `in` field holds the run's input, binary) packs back to the same bytes.

Step outputs, which no script reads (finish stores them as one opaque string), and the messages
of the worker processes are packed with the bin type (`pack_value`): bytes read back as bytes.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

_packer = msgpack.Packer(use_bin_type=False, unicode_errors="surrogateescape")
_value_packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")


def pack(obj: Any) -> bytes:
    return _packer.pack(obj)  # type: ignore[no-any-return]


def pack_value(obj: Any) -> bytes:
    """A value no Lua script reads (step outputs): bytes packed as bin, read back as bytes."""
    return _value_packer.pack(obj)  # type: ignore[no-any-return]


def unpack_exact(data: bytes) -> Any:
    """The value packed, as Python gives it back: a map keyed by an array raises TypeError."""
    return msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape", strict_map_key=False)


def unpack(data: bytes) -> Any:
    """`unpack_exact`, except that a payload holding a map keyed by an array (stored before
    executors refused such outputs) reads with its arrays as tuples instead of raising."""
    try:
        return unpack_exact(data)
    except TypeError:
        return msgpack.unpackb(
            data, raw=False, unicode_errors="surrogateescape", strict_map_key=False,
            use_list=False,
        )  # fmt: skip


def blob(value: str | bytes) -> bytes:
    """Bytes of a binary value nested in a payload (it decodes as str; see the module doc)."""
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


JSONABLE_DEPTH = 200  # levels of a payload shown; orjson writes 254 at most, and a parser
# took 1,024 (an input nested 500 deep raised RecursionError on its run's page, a review)


def jsonable(value: Any, depth: int = JSONABLE_DEPTH) -> Any:
    """A decoded payload made safe for JSON, to show: map keys as text, a string that held
    bytes which are not UTF-8 (surrogate escapes) as the repr of those bytes, a value JSON has
    no form for (a msgpack timestamp or extension type, a float NaN or infinity) as its text,
    and levels past `depth`
    as a string that says they are cut."""
    if isinstance(value, dict | list | tuple) and depth <= 0:
        return f"... ({type(value).__name__} nested deeper than {JSONABLE_DEPTH} levels)"
    if isinstance(value, dict):
        return {_key(k): jsonable(v, depth - 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth - 1) for v in value]
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return repr(blob(value))
        return value
    if isinstance(value, bytes):
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # ("nan", "inf", "-inf": JSON has no form, orjson wrote null)
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int) and -(2**63) <= value < 2**64:  # (orjson's range)
        return value
    return str(value)


def _key(key: Any) -> str:
    text_key = jsonable(key)
    return text_key if isinstance(text_key, str) else str(text_key)


def text(value: str | bytes) -> str:
    """A Redis reply value (bytes, or str with decode_responses) as text."""
    return value.decode() if isinstance(value, bytes) else value
