"""The strings extension key expressions may call (cel-go's names), with a cost budget.

The CEL library implements the core specification only; cel-go's strings extension
(`lowerAscii`, `split`, `replace`, ...) is what users reach for to normalise a key. These are
small implementations of it, given to an evaluation that calls them. Ingress evaluates keys for
every event on its loop, so each evaluation has a budget, shared by every call it makes: at most
MAX_PARTS list items made by `split` and MAX_CHARS characters of strings made in all. A call
that would pass it raises before it builds its result (`replace` of a field by another field,
`split` inside a comprehension: the product of two sizes from one hostile event), and the event
is a dead letter naming the budget.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

MAX_PARTS = 500  # list items `split` may make in one evaluation (a comprehension's budget)
MAX_CHARS = 4 << 20  # characters of strings the functions may make in one evaluation


class _Spent(threading.local):
    parts = 0
    chars = 0


_SPENT = _Spent()


def reset() -> None:
    """A new evaluation: its budget is whole again."""
    _SPENT.parts = _SPENT.chars = 0


def _spend(*, parts: int = 0, chars: int = 0) -> None:
    """Charge this evaluation's budget; past it, raise (the library names the function)."""
    _SPENT.parts += parts
    _SPENT.chars += chars
    if _SPENT.parts > MAX_PARTS:
        raise ValueError(
            f"would bring the parts made to {_SPENT.parts:,}, over the "
            f"{MAX_PARTS} an expression may make (its cost budget)"
        )
    if _SPENT.chars > MAX_CHARS:
        raise ValueError(
            f"would bring the characters made to {_SPENT.chars:,}, over the "
            f"{MAX_CHARS:,} an expression may make (its cost budget)"
        )


def _text(function: str, value: Any, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{function}() takes {what}, not {type(value).__name__}")
    return value


def _index(function: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{function}() takes an integer index, not {type(value).__name__}")
    return value


def _in_range(function: str, index: int, text: str) -> int:
    if not 0 <= index <= len(text):
        raise IndexError(f"{function}(): {index} is out of range for a string of {len(text)}")
    return index


def char_at(s: Any, index: Any) -> str:
    text = _text("charAt", s)
    i = _in_range("charAt", _index("charAt", index), text)
    return text[i : i + 1]


def index_of(s: Any, sub: Any, offset: Any = 0) -> int:
    text, sub = _text("indexOf", s), _text("indexOf", sub)
    return text.find(sub, _in_range("indexOf", _index("indexOf", offset), text))


def last_index_of(s: Any, sub: Any, offset: Any = None) -> int:
    text, sub = _text("lastIndexOf", s), _text("lastIndexOf", sub)
    if offset is None:
        return text.rfind(sub)
    end = _in_range("lastIndexOf", _index("lastIndexOf", offset), text)
    return text.rfind(sub, 0, end + len(sub))


def substring(s: Any, start: Any, end: Any = None) -> str:
    text = _text("substring", s)
    first = _in_range("substring", _index("substring", start), text)
    last = len(text) if end is None else _in_range("substring", _index("substring", end), text)
    if first > last:
        raise IndexError(f"substring(): start {first} is after end {last}")
    _spend(chars=last - first)
    return text[first:last]


def replace(s: Any, old: Any, new: Any, limit: Any = -1) -> str:
    text, old, new = _text("replace", s), _text("replace", old), _text("replace", new)
    limit = _index("replace", limit)
    count = text.count(old) if limit < 0 else min(text.count(old), limit)
    _spend(chars=len(text) + count * (len(new) - len(old)))
    return text.replace(old, new, limit)


def split(s: Any, sep: Any, limit: Any = None) -> list[str]:
    text, sep = _text("split", s), _text("split", sep)
    limit = -1 if limit is None else _index("split", limit)
    if limit == 0:
        return []
    parts = len(text) if sep == "" else text.count(sep) + 1
    if limit > 0:
        parts = min(parts, limit)
    _spend(parts=parts, chars=len(text))
    if sep != "":
        return text.split(sep, limit - 1 if limit > 0 else -1)
    if limit < 0 or limit >= len(text):
        return list(text)
    return [*text[: limit - 1], text[limit - 1 :]]


def join(items: Any, sep: Any = "") -> str:
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise TypeError("join() takes a list of strings")
    between = _text("join", sep)
    _spend(chars=sum(map(len, items)) + len(between) * max(0, len(items) - 1))
    return between.join(items)


def lower_ascii(s: Any) -> str:
    text = _text("lowerAscii", s)
    _spend(chars=len(text))
    # (bytes.lower changes ASCII letters only, and UTF-8 encodes every other character in
    # bytes >= 0x80: the ASCII-only lowering, at C speed)
    return text.encode("utf-8", "surrogatepass").lower().decode("utf-8", "surrogatepass")


def upper_ascii(s: Any) -> str:
    text = _text("upperAscii", s)
    _spend(chars=len(text))
    return text.encode("utf-8", "surrogatepass").upper().decode("utf-8", "surrogatepass")


def trim(s: Any) -> str:
    text = _text("trim", s)
    _spend(chars=len(text))
    return text.strip()


def reverse(value: Any) -> Any:
    if isinstance(value, list):
        _spend(chars=len(value))  # (a copy of the list: as long as it)
        return value[::-1]
    text = _text("reverse", value, "a string or a list")
    _spend(chars=len(text))
    return text[::-1]


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "charAt": char_at,
    "indexOf": index_of,
    "lastIndexOf": last_index_of,
    "substring": substring,
    "replace": replace,
    "split": split,
    "join": join,
    "lowerAscii": lower_ascii,
    "upperAscii": upper_ascii,
    "trim": trim,
    "reverse": reverse,
}
