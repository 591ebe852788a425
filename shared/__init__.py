"""supersede: workflows triggered by events, with per-key concurrency limits enforced in Redis.

What a workflow author needs is importable from here::

    from supersede import Concurrency, Context, Strategy, Workflow, publish

The services live in `supersede.services` (`supersede ingress|admission|executor`), the Lua
scripts in `supersede.lua`; the design is in docs/design.md of the repository.

The names are imported when first asked for (PEP 562): `import supersede` alone imports no
dependency, so the `supersede` command's launcher (`supersede.launch`) is running before redis
and the rest are imported, and turns a Ctrl-C during those imports into one line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from supersede._version import __version__

if TYPE_CHECKING:
    from supersede.client import publish, publish_sync
    from supersede.config import Settings, connect, connect_sync
    from supersede.errors import ConfigError, DefinitionError, SupersedeError
    from supersede.workflow import Concurrency, Context, Step, Strategy, Workflow

_WHERE = {
    "publish": "client",
    "publish_sync": "client",
    "Settings": "config",
    "connect": "config",
    "connect_sync": "config",
    "ConfigError": "errors",
    "DefinitionError": "errors",
    "SupersedeError": "errors",
    "Concurrency": "workflow",
    "Context": "workflow",
    "Step": "workflow",
    "Strategy": "workflow",
    "Workflow": "workflow",
}

__all__ = [
    "Concurrency",
    "ConfigError",
    "Context",
    "DefinitionError",
    "Settings",
    "Step",
    "Strategy",
    "SupersedeError",
    "Workflow",
    "__version__",
    "connect",
    "connect_sync",
    "publish",
    "publish_sync",
]


if not TYPE_CHECKING:  # (for mypy, the imports above: a misspelt name is an error)

    def __getattr__(name: str) -> Any:
        where = _WHERE.get(name)
        if where is None and (name.startswith("_") or not name.isidentifier()):
            # (`hasattr(supersede, "__main__")` imported the launcher, which ran the CLI)
            raise AttributeError(f"module 'supersede' has no attribute {name!r}")
        if where is None:  # (a submodule: `import supersede; supersede.client.publish_runs`;
            # also asked by `from supersede import codec` inside the package, before it
            # imports it: nothing else may be imported then, or the imports go round)
            try:
                value = importlib.import_module(f"supersede.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"supersede.{name}":
                    raise
                raise AttributeError(f"module 'supersede' has no attribute {name!r}") from None
        else:
            importlib.import_module("supersede.config")  # (it mends redis-py: aio.mend_redis)
            value = getattr(importlib.import_module(f"supersede.{where}"), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
