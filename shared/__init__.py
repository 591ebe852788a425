"""supersede: workflows triggered by events, with per-key concurrency limits enforced in Redis.

What a workflow author needs is importable from here::

    from supersede import Concurrency, Context, Strategy, Workflow, publish

The services live in `supersede.services` (`supersede ingress|admission|executor`), the Lua
scripts in `supersede.lua`; the design is in docs/design.md of the repository.
"""

from __future__ import annotations

from supersede._version import __version__
from supersede.client import publish, publish_sync
from supersede.config import Settings, connect, connect_sync
from supersede.errors import ConfigError, DefinitionError, SupersedeError
from supersede.workflow import Concurrency, Context, Step, Strategy, Workflow

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
