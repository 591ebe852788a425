"""Loading a workflow module given by name or by path, with import failures as one line."""

from __future__ import annotations

import os
import sys
from typing import Any

from supersede.errors import ConfigError, DefinitionError


def import_module(spec: str) -> Any:
    """Import a workflow module given as a dotted name (`my_workflows`, from the current folder
    or anything on sys.path) or as a path (`my_workflows.py`, `src/app/flows.py`: its folder is
    put on sys.path). Any failure is one ConfigError that names the file and line."""
    import importlib
    import traceback

    name = spec
    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise ConfigError(f"workflow module {spec!r}: no such file")
        folder, name = os.path.split(path)
        name = name.removesuffix(".py")
        if folder not in sys.path:
            sys.path.insert(0, folder)
    elif os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except SyntaxError as exc:
        where = f"{exc.filename}:{exc.lineno}"
        raise ConfigError(f"{where}: syntax error in workflow module {spec!r}: {exc.msg}") from None
    except ModuleNotFoundError as exc:
        if exc.name == name or name.startswith(f"{exc.name}."):
            raise ConfigError(
                f"no workflow module {name!r} (looked in {os.getcwd()} and on sys.path): run from "
                "its folder, or give its path, e.g. `supersede executor path/to/my_workflows.py`"
            ) from None
        raise ConfigError(f"workflow module {spec!r} failed to import: {exc}") from None
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        mine = [f for f in frames if "importlib" not in f.filename] or frames
        frame = next((f for f in reversed(mine) if "site-packages" not in f.filename), mine[-1])
        raise ConfigError(
            f"{frame.filename}:{frame.lineno}: workflow module {spec!r} failed to import: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def load_workflows(spec: str) -> list[Any]:
    """Import MODULE (see `import_module`) and return its Workflow objects, each validated."""
    from supersede.workflow import Workflow

    module = import_module(spec)
    workflows = [v for v in vars(module).values() if isinstance(v, Workflow)]
    if not workflows:
        raise ConfigError(f"module {spec!r} defines no Workflow")
    for wf in workflows:
        try:
            wf.definition()
        except DefinitionError as exc:
            raise ConfigError(f"workflow {wf.id!r} is invalid: {exc}") from None
    return workflows
