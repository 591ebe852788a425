"""The code-first workflow API (close to Hatchet's SDK).

    chat = Workflow("chat-reply", on_events=["chat.message"],
                    concurrency=Concurrency(expression="input.userId", max_runs=1,
                                            limit_strategy=Strategy.CANCEL_IN_PROGRESS))

    @chat.step()
    async def reply(ctx: Context) -> dict[str, str]: ...

    @chat.step(parents=[reply], timeout=30, retries=2)
    def store(ctx: Context) -> None: ...   # sync steps run in a thread pool

Nothing is validated at import time: `Workflow.definition()` validates through the registry
and raises DefinitionError naming the field, which stops `supersede executor` at start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib
import inspect
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from supersede.errors import DefinitionError
from supersede.protocol import Strategy
from supersede.registry import WorkflowDef, definition_body, parse

__all__ = ["ISOLATIONS", "Concurrency", "Context", "Step", "Strategy", "Workflow"]

StepNames = dict[tuple[str, str], str]  # (module, qualname) of a step's function -> its name

# A step or hook as its decorator returns it: the function itself, its type kept for the
# caller's type checker (a test that calls a step sees what it returns)
F = TypeVar("F", bound=Callable[["Context"], Any])


def _unwrapped(fn: Any) -> Any:
    """The callable a functools.partial (of a partial ...) wraps; `fn` itself otherwise."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def is_async_callable(fn: Any) -> bool:
    """True when calling `fn` gives a coroutine: an async function (a functools.partial of one
    too), or an object whose class has an `async def __call__` (treated as sync, every run
    failed with "the output is a coroutine")."""
    fn = _unwrapped(fn)  # (a partial of an object with an async call)
    if _is_coroutine_function(fn):
        return True
    if inspect.isroutine(fn) or inspect.isclass(fn) or not callable(fn):
        return False
    return _is_coroutine_function(type(fn).__call__)


def _is_coroutine_function(fn: Any) -> bool:
    # inspect's: asyncio.iscoroutinefunction warns from Python 3.14 on. Before, asyncio's also
    # sees the marker some objects carry (AsyncMock before 3.12, Cython's async functions).
    if inspect.iscoroutinefunction(fn):
        return True
    return sys.version_info < (3, 14) and asyncio.iscoroutinefunction(fn)


def fn_key(fn: Any) -> tuple[str, str] | None:
    """What names a step's function across processes (a worker imports it by these)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return (module, qualname) if isinstance(module, str) and isinstance(qualname, str) else None


def step_name(names: StepNames, fn: Any) -> Any:
    """The name `fn` was registered under as a step (`name=`, or its own): a function given as
    a parent or to ctx.parent(). A function registered under two names is neither: its own.
    Without `names` (a Context a test built), the name any workflow registered it under."""
    key = fn_key(fn)
    if key is None:
        return getattr(fn, "__name__", fn)
    return (names or REGISTERED_STEPS).get(key) or getattr(fn, "__name__", fn)


# every workflow's step functions -> the name each was registered under ("" when two names)
REGISTERED_STEPS: StepNames = {}


# How a step runs (`isolation=`): "task" an asyncio task (async steps; cancelled at the next
# await), "thread" the executor's thread pool (sync steps; cooperative: ctx.cancelled), "process"
# a pre-started worker process (either kind; stopped for sure: flag, SIGTERM, SIGKILL).
ISOLATIONS = ("task", "thread", "process")


def resolve(module: str, qualname: str) -> Any:
    """The object `qualname` of `module`: how a worker process finds a step's function."""
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def importable(fn: Callable[..., Any]) -> bool:
    """True when a worker process can find `fn` by its module and qualified name."""
    try:
        return resolve(fn.__module__, fn.__qualname__) is fn
    except Exception:
        return False


@dataclass(frozen=True, slots=True)
class Concurrency:
    expression: str
    max_runs: int | str = 1  # or a CEL expression over input/metadata giving 1..10000
    limit_strategy: Strategy | str = Strategy.CANCEL_IN_PROGRESS
    strict: bool = False
    scope: str | None = None  # workflows of one scope share their groups (one per key value)
    debounce_ms: int = 0  # > 0: a run waits until its key had no newer event for this long
    max_wait_ms: int = 0  # > 0: but no longer than this after the window's first event


@dataclass(slots=True)
class Step:
    name: str
    fn: Callable[[Context], Any]
    parents: tuple[str, ...] = ()
    timeout: float | None = None
    retries: int = 0
    isolation: str | None = None  # None: the workflow's, else "task" (async) / "thread" (sync)
    is_async: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # (asked for at every call of the step: iscoroutinefunction cost a no-op run 3% of an
        # executor's CPU)
        self.is_async = is_async_callable(self.fn)


class _Flag:
    """A run's cancel flag: set once, read by a sync step's thread (a plain attribute is
    enough under the GIL; a threading.Event cost every run 2 µs to build, 3% of an executor's
    CPU under load). Worker processes swap in a process-shared event with the same methods."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False


# how many coroutines of `still_current()` a step's Context keeps to check (see its doc)
ASKED_KEPT = 16


class NotAwaited(RuntimeError):
    """A step called `ctx.still_current()` and never awaited it: the step's failure, not
    retried (the same code skips the same check again)."""


class Context:
    """What a step sees: its run's input and metadata, its parents' outputs, cancellation,
    and its fencing token (`fence`, `still_current()`: see `supersede.fencing`)."""

    def __init__(
        self,
        *,
        run_id: str = "test-run",  # (defaults for a test's Context: the executor gives each)
        workflow: str = "",
        attempt: int = 1,
        input: Any = None,  # ({} when None)
        metadata: Any = None,  # ({} when None)
        event: str = "",
        event_id: str = "",
        key: str = "",
        loop: asyncio.AbstractEventLoop | None = None,
        fence: int = 0,
        current: Callable[[], Awaitable[bool]] | None = None,
        claimed_at: float = 0.0,
        step_names: StepNames | None = None,
        retry_count: int = 0,
    ) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self.attempt = attempt
        self.input = {} if input is None else input
        self.metadata = {} if metadata is None else metadata
        self.event = event
        self.event_id = event_id
        self.key = key
        # the run's fencing token: its sequence as an integer, monotonic per key, the same for
        # every attempt (supersede.fencing.set_if_newer guards a write with it)
        self.fence = fence
        # when this executor claimed the attempt (epoch seconds, its clock): the attempt's lease
        # runs from then, before the first step starts
        self.claimed_at = claimed_at
        # the step's retries so far: 0 on its first try, 1 on its first retry (`retries=`);
        # a new attempt of the run (its lease lapsed, a hand-back) starts again from 0
        self.retry_count = retry_count
        self._current = current
        self._step_names: StepNames = step_names or {}
        self.outputs: dict[str, Any] = {}
        self._flag: _Flag = _Flag()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        # still_current()'s coroutines and where each was asked ("file:line"), see its doc
        self._asked: list[tuple[Coroutine[Any, Any, bool], str]] = []
        # how long `still_current_blocking()` waits for the loop's answer unless told: the
        # executor sets it to a lease and a second (the answer comes within the lease)
        self._answer_within = 10.0

    @property
    def cancelled(self) -> bool:
        """True once the run was cancelled, or a draining executor stops this attempt at its
        deadline (the run is handed back and runs again elsewhere); sync steps poll it
        (cooperative cancellation) and return."""
        return self._flag.is_set()

    def parent(self, step: str | Callable[..., Any]) -> Any:
        """The output of a parent step, by name or by function (the name it was registered
        under: `name=` or the function's own)."""
        if isinstance(step, str):
            name = step
        elif self._step_names:
            name = step_name(self._step_names, step)
        else:  # (a Context a test built: its workflow's name for it first, then any's)
            name = _name_in(self.workflow, step) or step_name({}, step)
        try:
            return self.outputs[name]
        except KeyError:
            raise KeyError(
                f"no output of step {name!r} here: ctx.parent() takes a step that ran before "
                f"this one, one it lists in parents= (by name or function); outputs so far: "
                f"{sorted(self.outputs)}"
            ) from None

    def still_current(self) -> Coroutine[Any, Any, bool]:
        """False once a newer run of this run's key was admitted (one read of the group's
        fence), or once this run was cancelled (whatever its group still remembers); otherwise
        True for a workflow without a concurrency limit (every run is its own key). Ask before
        costly work; guard the write itself with `fencing.set_if_newer`. Await it (a sync step
        calls `still_current_blocking()`): a call the step never awaited fails the step as it
        returns, since the coroutine reads as true (`if not ctx.still_current(): return` in a
        sync step never returned, and fencing was skipped without a word, a probe), naming the
        line that asked, and is not retried (each retry did the unguarded work again)."""
        coro = self._still_current()
        asked = self._asked
        if len(asked) >= ASKED_KEPT:  # (bounded: a step may ask in a loop)
            asked[:] = [a for a in asked if inspect.getcoroutinestate(a[0]) == inspect.CORO_CREATED]
            del asked[: max(0, len(asked) - ASKED_KEPT + 1)]
        caller = sys._getframe(1)
        asked.append((coro, f"{caller.f_code.co_filename}:{caller.f_lineno}"))
        return coro

    def check_awaited(self, step: str = "step") -> None:
        """After a step returned: NotAwaited when it called `still_current()` without awaiting
        it (those coroutines are closed: no RuntimeWarning beside the error), as the executor
        fails it. A test calls it after the step (a slip passed a test, then failed every run,
        an author probe)."""
        unawaited = [
            (coro, where)
            for coro, where in self._asked
            if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED
        ]
        self._asked.clear()
        for coro, _ in unawaited:
            coro.close()
        if unawaited:
            raise NotAwaited(
                f"{unawaited[0][1]}: step {step!r} called ctx.still_current() without awaiting "
                "it: a coroutine, which reads as true; await it in an async step, call "
                "ctx.still_current_blocking() in a sync one (not retried: the work it was to "
                "guard ran)"
            )

    async def _still_current(self) -> bool:
        if self.cancelled:
            return False
        current = self._current
        if current is None:
            return True
        loop = self._loop
        if loop is None or asyncio.get_running_loop() is loop:
            return await current()
        # Awaited on a loop of the step's own (`asyncio.run(ctx.still_current())` in a sync
        # step): the read goes to the executor's loop, whose client it uses (run here, it put
        # connections of another loop in the executor's pool, and other runs failed with
        # "Event loop is closed", an author probe). No answer in time: not known to be current.

        async def ask() -> bool:
            return await current()

        answer = asyncio.run_coroutine_threadsafe(ask(), loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(answer), self._answer_within)
        except TimeoutError:
            answer.cancel()
            return False

    def still_current_blocking(self, timeout: float | None = None) -> bool:
        """`still_current()` for a sync step (it runs in a thread; not on the event loop).
        False when no answer came within `timeout` seconds (default: the run's lease and a
        second; the event loop blocked, say): not known to be current."""
        if self.cancelled:
            return False
        loop = self._loop
        if loop is None or self._current is None:
            return True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("still_current_blocking() on the event loop: await still_current()")
        answer = asyncio.run_coroutine_threadsafe(self._still_current(), loop)
        try:
            return answer.result(self._answer_within if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            answer.cancel()
            return False

    async def wait_cancelled(self) -> None:
        """Resolves when the run is cancelled."""
        if self._flag.is_set():
            return
        loop = asyncio.get_running_loop()
        if self._waiter is None or self._waiter.get_loop() is not loop:  # (a test's next
            self._waiter = loop.create_future()  # asyncio.run: "attached to a different loop")
        await asyncio.shield(self._waiter)

    def mark_cancelled(self) -> None:
        """Set `cancelled` (and wake `wait_cancelled()`) as the executor does when the run is
        cancelled: for a test of a step's cancelled branch. It cancels nothing in Redis
        (`supersede.client.cancel` does), nor a running async step's task (the executor
        also cancels it: in a test, cancel the task that runs the step)."""
        self._cancel()

    def _cancel(self) -> None:
        """Called by the executor on its loop."""
        self._flag.set()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _own_name(fn: Any) -> str:
    """A step's name when `name=` gives none: its function's, the wrapped function's of a
    functools.partial, else its class's (an object's repr, `<app.Reply object at 0x7f..>`,
    went into the definition's version: a new version at every start, a review)."""
    fn = _unwrapped(fn)
    own = getattr(fn, "__name__", None)
    return own if isinstance(own, str) else type(fn).__name__


def _check_takes_context(where: str, what: str, fn: Any, not_callable: str) -> None:
    """A step or hook is called with one argument, its context: refused at registration when
    it cannot be (rather than failing every run with a TypeError)."""
    if not callable(fn):
        raise DefinitionError(where, f"{not_callable}, got {fn!r}")
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise DefinitionError(  # (every run failed: "the output is a generator")
            where,
            f"{what} is a generator function (it yields): its output is what it returns; "
            "return a list instead",
        )
    try:
        signature = inspect.signature(fn, follow_wrapped=False)  # (what is called)
    except (TypeError, ValueError):  # (some builtins have none: called as they are)
        return
    try:
        signature.bind(None)
    except TypeError:
        raise DefinitionError(
            where,
            f"{what} must take one argument, its context (ctx), but its signature is "
            f"{getattr(fn, '__name__', 'fn')}{signature}",
        ) from None


# module name -> the Workflow objects its code made (see Workflow.__post_init__)
DEFINED_IN: dict[str, list[Workflow]] = {}


def _name_in(workflow: str, fn: Any) -> str | None:
    """The name a workflow of id `workflow` that a module made registered `fn` under, for a
    Context a test built: a function registered in two workflows under two names is neither
    name without them (an API-user probe's test failed, its run in production succeeded)."""
    key = fn_key(fn)
    if key is None:
        return None
    for made in reversed(DEFINED_IN.values()):  # (the newest module first)
        for wf in made:
            name = wf.step_names.get(key) if wf.id == workflow else None
            if name:
                return name
    return None


def _module_importing(frame: Any) -> str | None:
    """The name of the innermost module, from `frame` outwards, that is being imported."""
    for _ in range(50):
        if frame is None:
            return None
        name = frame.f_globals.get("__name__")
        spec = getattr(sys.modules.get(name), "__spec__", None) if isinstance(name, str) else None
        if getattr(spec, "_initializing", False):
            return str(name)
        frame = frame.f_back
    return None


@dataclass
class Workflow:
    id: str
    on_events: list[str]
    concurrency: Concurrency | None = None
    max_attempts: int = 3
    version: str = ""
    steps: list[Step] = field(default_factory=list)
    cancel_hook: Callable[[Context], Any] | None = None
    retention: int | None = None  # seconds an ended run is kept; None: admission's --retention
    isolation: str | None = None  # of the steps that set none (ISOLATIONS); executor-side only
    # the names the steps' functions were registered under (see step_name)
    step_names: StepNames = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # (the module being imported whose code made it, a factory's caller's too:
        # `load_workflows` finds it there even when it is no top-level name, `WORKFLOWS =
        # [make(1), make(2)]` say; such ones were left out, silently. Only while a module is
        # imported: one made later, as the executor does for a run it cannot start, is no
        # module's, and is not kept.)
        made_by = _module_importing(sys._getframe(2))
        if made_by is not None:
            DEFINED_IN.setdefault(made_by, []).append(self)

    @overload
    def step(self, fn: F, /) -> F: ...

    @overload
    def step(
        self,
        fn: None = None,
        /,
        *,
        parents: list[Callable[..., Any] | str] | tuple[Callable[..., Any] | str, ...] = (),
        timeout: float | None = None,
        retries: int = 0,
        name: str | None = None,
        isolation: str | None = None,
    ) -> Callable[[F], F]: ...

    def step(
        self,
        fn: Any = None,
        /,
        *,
        parents: list[Callable[..., Any] | str] | tuple[Callable[..., Any] | str, ...] = (),
        timeout: float | None = None,
        retries: int = 0,
        name: str | None = None,
        isolation: str | None = None,
    ) -> Any:
        """Register the decorated function as a step: `@wf.step()` with options, or `@wf.step`
        with none. It returns the function itself (a test calls it with a Context)."""

        def register(fn: F) -> F:
            # (checked by definition(), which names the field: here, keep what was given)
            given: Any = parents
            names: Any = (
                tuple(p if isinstance(p, str) else step_name(self.step_names, p) for p in given)
                if isinstance(given, list | tuple)
                else given
            )
            registered = _own_name(fn) if name is None else name
            self.steps.append(Step(registered, fn, names, timeout, retries, isolation))
            key = fn_key(fn)
            if key is not None:  # (one function registered under two names: by neither)
                for names in (self.step_names, REGISTERED_STEPS):
                    if names.setdefault(key, registered) != registered:
                        names[key] = ""
            return fn

        return register if fn is None else register(fn)

    @overload
    def on_cancel(self, fn: F, /) -> F: ...

    @overload
    def on_cancel(self, fn: None = None, /) -> Callable[[F], F]: ...

    def on_cancel(self, fn: Any = None, /) -> Any:
        """Register a clean-up hook run (shielded) when a run of this workflow is cancelled:
        `@wf.on_cancel`, or `@wf.on_cancel()`."""

        def register(fn: F) -> F:
            self.cancel_hook = fn
            return fn

        return register if fn is None else register(fn)

    def definition(self) -> WorkflowDef:
        """Validate; raises DefinitionError naming the bad field."""
        if self.concurrency is not None and not isinstance(self.concurrency, Concurrency):
            raise DefinitionError(
                "concurrency",
                f"must be a Concurrency(...), got {type(self.concurrency).__name__} "
                f"{self.concurrency!r}",
            )
        for i, step in enumerate(self.steps):
            _check_takes_context(
                f"steps[{i}]", f"step {step.name!r}", step.fn,
                "a step must be a function of its context",
            )  # fmt: skip
        if self.cancel_hook is not None:
            _check_takes_context(
                "on_cancel", "the on_cancel hook", self.cancel_hook, "must be a function"
            )
        body = definition_body(
            self.id,
            self.on_events,
            self.concurrency,
            self.steps,
            self.max_attempts,
            self.version,
            self.retention,
        )
        if not self.steps:
            raise DefinitionError("steps", "a workflow needs at least one step")
        for i, step in enumerate(self.steps):
            self._check_isolation(i, step)
        try:
            return parse(body)
        except DefinitionError as exc:  # (the stored body's `events` is the argument on_events)
            if exc.field == "events" or exc.field.startswith("events["):
                raise DefinitionError("on_events" + exc.field[6:], exc.message) from None
            raise

    def isolation_of(self, step: Step) -> str:
        """How `step` runs: its own isolation, else the workflow's, else by its kind."""
        return step.isolation or self.isolation or ("task" if step.is_async else "thread")

    def _check_isolation(self, i: int, step: Step) -> None:
        where = f"steps[{i}].isolation" if step.isolation else "isolation"
        chosen = step.isolation or self.isolation
        if chosen is None:
            return
        if chosen not in ISOLATIONS:
            raise DefinitionError(where, f"must be one of {list(ISOLATIONS)}, got {chosen!r}")
        if chosen == "task" and not step.is_async:
            raise DefinitionError(
                where, f"step {step.name!r} is sync: it runs in a 'thread' or a 'process'"
            )
        if chosen == "thread" and step.is_async:
            raise DefinitionError(
                where, f"step {step.name!r} is async: it runs as a 'task' or in a 'process'"
            )
        if chosen == "process" and not importable(step.fn):
            raise DefinitionError(
                where,
                f"step {step.name!r} must be a function defined at the top level of its module "
                "(a worker process imports it by name)",
            )

    def ordered_steps(self) -> list[Step]:
        """Steps in dependency order (parents first), stable otherwise."""
        done: set[str] = set()
        out: list[Step] = []
        pending = list(self.steps)
        while pending:
            ready = [s for s in pending if all(p in done for p in s.parents)]
            if not ready:  # a cycle; definition() rejects it before any run starts
                raise ValueError(f"cyclic steps in workflow {self.id!r}")
            for s in ready:
                out.append(s)
                done.add(s.name)
                pending.remove(s)
        return out
