"""Exceptions, and the one place where Lua return codes become exceptions."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from supersede.protocol import Reason

if TYPE_CHECKING:
    from traceback import FrameSummary


class SupersedeError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SupersedeError):
    """The process configuration is invalid or disagrees with the deployment."""


class ScriptError(SupersedeError):
    """A Lua script refused its input; nothing was written.

    `index` is the 0-based position of the offending item in the batch that was sent.
    """

    code: int = 0
    reason: str = "script_error"

    def __init__(self, index: int, detail: str = "") -> None:
        self.index = index
        self.detail = detail
        super().__init__(f"{self.reason} at item {index}" + (f": {detail}" if detail else ""))


class MalformedItem(ScriptError):
    code = -1
    reason = Reason.MALFORMED


class UnknownRun(ScriptError):
    code = -2
    reason = Reason.UNKNOWN_RUN


class WrongShard(ScriptError):
    code = -3
    reason = Reason.WRONG_SHARD


class BadArguments(ScriptError):
    code = -4
    reason = Reason.BAD_ARGUMENTS


_BY_CODE: dict[int, type[ScriptError]] = {
    cls.code: cls for cls in (MalformedItem, UnknownRun, WrongShard, BadArguments)
}


def raise_for_status(reply: list[object]) -> None:
    """Raise the mapped exception when a script reply starts with a negative status."""
    status = int(reply[0])  # type: ignore[call-overload]
    if status >= 0:
        return
    cls = _BY_CODE.get(status, ScriptError)
    index = int(reply[1]) - 1 if len(reply) > 1 else -1  # type: ignore[call-overload]
    detail = reply[2] if len(reply) > 2 else b""
    text = detail.decode() if isinstance(detail, bytes) else str(detail)
    raise cls(index, text)


class DefinitionError(SupersedeError, ValueError):
    """A workflow definition is invalid; `field` names the bad field (e.g. `steps[1].parents`)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class WorkflowRejected(DefinitionError):
    """One definition of a registration was refused; `workflow` names it ('' when it has no
    valid id)."""

    def __init__(self, workflow: str, field: str, message: str) -> None:
        self.workflow = workflow
        super().__init__(field, message)


class KeyExpressionError(SupersedeError):
    """A key expression failed for one event; `reason` is a dead-letter reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


_PIPELINE_ARGS = re.compile(r"Command # (\d+) \(.*?\) of pipeline caused error: ", re.DOTALL)


def refused_every_try(exc: BaseException) -> bool:
    """redis-py's cluster "TTL exhausted": every try of a command was refused (ASK, MOVED,
    TRYAGAIN), none carried out (it raises any other error at once)."""
    from redis.exceptions import ClusterError

    return type(exc) is ClusterError and "TTL exhausted" in str(exc)


def describe(exc: BaseException) -> str:
    """One line for a log field or a dead letter: the exception's class and message, cut. A
    failed pipeline's command is named by its number, not quoted: its arguments are data (a
    result's outputs, an event's input) that logs must not carry."""
    message = message_of(exc)  # (some have none: msgpack's FormatError, StackError)
    return (f"{type(exc).__name__}: {message}" if message else type(exc).__name__)[:500]


def message_of(exc: BaseException) -> str:
    """`exc`'s message, a failed pipeline's command named by its number (see describe)."""
    return message_of_text(str(exc))


def message_of_text(text: str) -> str:
    """`text` (an exception's message, a traceback) with a failed pipeline's command named by
    its number, without its arguments."""
    return _PIPELINE_ARGS.sub(r"command \1 of a pipeline: ", text)


def _library_roots() -> tuple[str, ...]:
    """The folders whose frames lead into a step: this package's (two in an editable
    install) and the standard library's asyncio, concurrent.futures and threading."""
    import asyncio
    import concurrent.futures
    import os
    import sys
    import threading

    # (this file's folder is the package's; the services' is apart in an editable install)
    services = sys.modules.get("supersede.services")
    modules = [m for m in (services, asyncio, concurrent.futures) if m is not None]
    folders = [os.path.dirname(__file__), *(os.path.dirname(m.__file__ or "") for m in modules)]
    return (*(f + os.sep for f in folders if f), threading.__file__ or "threading.py")


class StepTimedOut(TimeoutError):
    """A step's `timeout` passed. `where`: the step's frames when its timeout passed (from its
    own frame; see `frames_from_step`), "" where not known (a step in a worker process)."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


def frames_from_step(frames: Sequence[FrameSummary]) -> str:
    """`frames` (outermost first) from the first frame of the user's own code, formatted as a
    traceback's lines; "" when none is the user's."""
    import traceback

    roots = _library_roots()
    first = next((i for i, f in enumerate(frames) if not f.filename.startswith(roots)), None)
    if first is None:
        return ""
    return "".join(traceback.StackSummary.from_list(list(frames[first:])).format())


def step_traceback(exc: BaseException) -> str:
    """`exc`'s traceback from the first frame of the user's own code: the frames of the
    executor and the event loop or thread pool that called the step come first and say
    nothing about the failure (and took the start of an error cut to 8 KiB). The whole
    traceback when every frame is the library's (its own failure). A step's timeout: where
    the step was when it passed (the executor's frames raised it, and say nothing either)."""
    import traceback

    if isinstance(exc, StepTimedOut):
        if exc.__cause__ is not None:  # (the error the step raised once stopped)
            caused = step_traceback(exc.__cause__)
            return (
                f"{caused}\nThe step raised it after its timeout passed:\n\nTimeoutError: {exc}\n"
            )
        where = f"Traceback (the step when its timeout passed):\n{exc.where}" if exc.where else ""
        return f"{where}TimeoutError: {exc}\n"
    roots = _library_roots()
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(roots):
        tb = tb.tb_next
    if tb is None:
        return "".join(traceback.format_exception(exc))
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return _PATH_MODULE.sub("", text)


# The name a module loaded by its path is imported under (supersede.services.modules): its
# exceptions' names said `_supersede_module_df96c3a09d2e_pipe_wf.Flaky` (an API-user probe).
_PATH_MODULE = re.compile(r"\b_supersede_module_[0-9a-f]{12}_")
