"""The code-first workflow API (close to Hatchet's SDK).

    chat = Workflow("chat-reply", on_events=["chat.message"],
                    concurrency=Concurrency(expression="input.userId", max_runs=1,
                                            limit_strategy=Strategy.CANCEL_IN_PROGRESS))

    @chat.step()
    async def reply(ctx: Context) -> dict: ...

    @chat.step(parents=[reply], timeout=30, retries=2)
    def store(ctx: Context) -> None: ...   # sync steps run in a thread pool

Nothing is validated at import time: `Workflow.definition()` validates through the registry
and raises DefinitionError naming the field, which stops `supersede executor` at start.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from supersede.errors import DefinitionError
from supersede.protocol import Strategy
from supersede.registry import WorkflowDef, definition_body, parse

__all__ = ["Concurrency", "Context", "Step", "Strategy", "Workflow"]


@dataclass(frozen=True, slots=True)
class Concurrency:
    expression: str
    max_runs: int = 1
    limit_strategy: Strategy | str = Strategy.CANCEL_IN_PROGRESS
    strict: bool = False


@dataclass(slots=True)
class Step:
    name: str
    fn: Callable[[Context], Any]
    parents: tuple[str, ...] = ()
    timeout: float | None = None
    retries: int = 0

    @property
    def is_async(self) -> bool:
        return asyncio.iscoroutinefunction(self.fn)


class Context:
    """What a step sees: its run's input and metadata, its parents' outputs, cancellation,
    and its fencing token (`fence`, `still_current()`: see `supersede.fencing`)."""

    def __init__(
        self,
        *,
        run_id: str,
        workflow: str,
        attempt: int,
        input: Any,
        metadata: Any,
        event: str = "",
        event_id: str = "",
        key: str = "",
        loop: asyncio.AbstractEventLoop | None = None,
        fence: int = 0,
        current: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self.attempt = attempt
        self.input = input
        self.metadata = metadata
        self.event = event
        self.event_id = event_id
        self.key = key
        # the run's fencing token: its sequence as an integer, monotonic per key, the same for
        # every attempt (supersede.fencing.set_if_newer guards a write with it)
        self.fence = fence
        self._current = current
        self.outputs: dict[str, Any] = {}
        self._flag = threading.Event()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    @property
    def cancelled(self) -> bool:
        """True once the run was cancelled; sync steps poll it (cooperative cancellation)."""
        return self._flag.is_set()

    def parent(self, step: str | Callable[..., Any]) -> Any:
        """The output of a parent step, by name or by function."""
        name = step if isinstance(step, str) else step.__name__
        return self.outputs[name]

    async def still_current(self) -> bool:
        """False once a newer run of this run's key was admitted (one read of the group's
        fence); always True for a workflow without a concurrency limit (every run is its own
        key). Ask before costly work; guard the write itself with `fencing.set_if_newer`."""
        return True if self._current is None else await self._current()

    def still_current_blocking(self, timeout: float = 10.0) -> bool:
        """`still_current()` for a sync step (it runs in a thread; not on the event loop)."""
        loop = self._loop
        if loop is None or self._current is None:
            return True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("still_current_blocking() on the event loop: await still_current()")
        return asyncio.run_coroutine_threadsafe(self.still_current(), loop).result(timeout)

    async def wait_cancelled(self) -> None:
        """Resolves when the run is cancelled."""
        if self._flag.is_set():
            return
        loop = asyncio.get_running_loop()
        if self._waiter is None:
            self._waiter = loop.create_future()
        await asyncio.shield(self._waiter)

    def _cancel(self) -> None:
        """Called by the executor on its loop."""
        self._flag.set()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


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

    def step(
        self,
        *,
        parents: list[Callable[..., Any] | str] | tuple[Callable[..., Any] | str, ...] = (),
        timeout: float | None = None,
        retries: int = 0,
        name: str | None = None,
    ) -> Callable[[Callable[[Context], Any]], Callable[[Context], Any]]:
        def register(fn: Callable[[Context], Any]) -> Callable[[Context], Any]:
            names = tuple(p if isinstance(p, str) else p.__name__ for p in parents)
            self.steps.append(Step(name or fn.__name__, fn, names, timeout, retries))
            return fn

        return register

    def on_cancel(self, fn: Callable[[Context], Any]) -> Callable[[Context], Any]:
        """Register a clean-up hook run (shielded) when a run of this workflow is cancelled."""
        self.cancel_hook = fn
        return fn

    def definition(self) -> WorkflowDef:
        """Validate; raises DefinitionError naming the bad field."""
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
        return parse(body)

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
