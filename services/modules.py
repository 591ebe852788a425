"""Loading a workflow module given by name or by path, with import failures as one line."""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from supersede.errors import ConfigError, DefinitionError

PATH_MODULE_PREFIX = "_supersede_module_"  # the name of a module loaded from its path


def module_file(module: str) -> str | None:
    """The file of a workflow module loaded by its path (None for one imported by name): a
    worker process loads it from there before it looks a step up by its module's name."""
    if not module.startswith(PATH_MODULE_PREFIX):
        return None
    return getattr(sys.modules.get(module), "__file__", None)


def check_found(spec: str) -> None:
    """Fail as `import_module` would for a module that is not there (a path to no file, a
    name no folder on sys.path holds), importing nothing: `supersede dev` checks this before
    it starts its server (a typo took the server's start to be said, a new-user probe)."""
    if spec.endswith(".py") or os.sep in spec:
        if not os.path.isfile(os.path.abspath(spec)):
            raise ConfigError(f"workflow module {spec!r}: no such file")
        return
    top = spec.partition(".")[0]
    found = bool(top) and (
        importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path]) is not None
        or importlib.util.find_spec(top) is not None  # (a module known otherwise: built in)
    )
    if not found:
        raise ConfigError(
            f"no workflow module {spec!r} (looked in {os.getcwd()} and on sys.path): run from "
            "its folder, or give its path, such as path/to/my_workflows.py"
        )


def import_module(spec: str) -> Any:
    """Import a workflow module given as a dotted name (`my_workflows`, from the current folder
    or anything on sys.path) or as a path (`my_workflows.py`, `src/app/flows.py`: its folder is
    put on sys.path). Any failure is one ConfigError that names the file and line."""
    import traceback

    name = spec
    path = None
    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise ConfigError(f"workflow module {spec!r}: no such file")
        folder, name = os.path.split(path)
        name = name.removesuffix(".py")
        if folder not in sys.path:
            sys.path.insert(0, folder)  # for its own imports of modules beside it
    elif os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name) if path is None else _import_path(path, name)
    except SyntaxError as exc:
        where = f"{exc.filename}:{exc.lineno}"
        raise ConfigError(f"{where}: syntax error in workflow module {spec!r}: {exc.msg}") from None
    except ModuleNotFoundError as exc:
        if exc.name == name or name.startswith(f"{exc.name}."):
            raise ConfigError(
                f"no workflow module {name!r} (looked in {os.getcwd()} and on sys.path): run from "
                "its folder, or give its path, such as path/to/my_workflows.py"
            ) from None
        raise ConfigError(f"workflow module {spec!r} failed to import: {exc}") from None
    except KeyboardInterrupt:  # (Ctrl-C while a slow module imports: the user's, not its)
        raise
    except SystemExit as exc:  # (a module that ends the process)
        raise ConfigError(
            f"workflow module {spec!r} raised {type(exc).__name__}({exc}) while importing: a "
            "module of workflows defines them, and runs nothing at import"
        ) from None
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        mine = [f for f in frames if "importlib" not in f.filename] or frames
        frame = next(
            (
                f
                for f in reversed(mine)
                if "site-packages" not in f.filename and not f.filename.startswith("<")
            ),
            mine[-1],
        )  # fmt: skip (the user's line: not a library's, nor a frozen module's as `os`)
        raise ConfigError(
            f"{frame.filename}:{frame.lineno}: workflow module {spec!r} failed to import: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _import_path(path: str, name: str) -> ModuleType:
    """The module of a file, by its path, under a name of its own: two files of one name in two
    folders, or a file named like a module already imported (queue.py), are still both
    themselves. (The same name in every process: a step in process isolation is found by it.)
    It is also the module of its plain name, when that name is free and imports this file: a
    module beside it that imports it by name (`import shop_wf` in shop_steps.py) ran it a
    second time, and the steps it added went to that copy's workflow, dropped without a word
    (an API-user probe)."""
    digest = hashlib.sha1(path.encode(errors="surrogateescape")).hexdigest()[:12]
    unique = f"{PATH_MODULE_PREFIX}{digest}_{name.replace('.', '_')}"
    if unique in sys.modules:
        return sys.modules[unique]
    loader_spec = importlib.util.spec_from_file_location(unique, path)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    names = [unique, *([name] if _imports_as(name, path) else [])]
    for each in names:
        sys.modules[each] = module
    loader_spec._initializing = True  # type: ignore[attr-defined]  # (as importlib marks a
    try:  # module being imported: Workflow.__post_init__ reads it)
        loader_spec.loader.exec_module(module)
    except BaseException:
        for each in names:
            del sys.modules[each]
        raise
    finally:
        loader_spec._initializing = False  # type: ignore[attr-defined]
    return module


def _imports_as(name: str, path: str) -> bool:
    """Whether `import name` would import the file at `path` and has not imported anything."""
    if "." in name or name in sys.modules:
        return False
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    origin = found.origin if found is not None else None
    return origin is not None and os.path.realpath(origin) == os.path.realpath(path)


def load_workflows(spec: str) -> list[Any]:
    """Import MODULE (see `import_module`) and return its Workflow objects, each validated."""
    from supersede.registry import repeated
    from supersede.workflow import DEFINED_IN, Workflow

    module = import_module(spec)
    # Its top-level names, and the Workflow objects its own code made (in a list, a factory's
    # registry...: not those of the modules it imports, another pool's maybe). By identity: a
    # second name for one Workflow object is the same workflow.
    found = [v for v in vars(module).values() if isinstance(v, Workflow)]
    found += DEFINED_IN.get(module.__name__, [])
    workflows = list({id(v): v for v in found}.values())
    if not workflows:
        raise ConfigError(f"module {spec!r} defines no Workflow")
    ids = [wf.id for wf in workflows]
    twice = repeated(ids)
    if twice is not None:
        raise ConfigError(
            f"module {spec!r} defines {ids.count(twice)} workflows with the id {twice!r}: the id "
            "names one workflow (give each its own)"
        )
    for wf in workflows:
        try:
            wf.definition()
        except DefinitionError as exc:
            raise ConfigError(f"workflow {wf.id!r} is invalid: {exc}") from None
    return workflows


def load_modules(specs: Sequence[str]) -> list[Any]:
    """The workflows of every module of `specs` (see `load_workflows`). An id that two modules
    define is refused, naming both: one definition silently replaced the other, its handlers
    and limits with it. The same Workflow object reached through two modules counts once."""
    seen: dict[str, tuple[str, Any]] = {}
    out = []
    for spec in specs:
        for wf in load_workflows(spec):
            first = seen.setdefault(wf.id, (spec, wf))
            if first[1] is wf and first[0] == spec:
                out.append(wf)
            elif first[1] is not wf:
                raise ConfigError(
                    f"modules {first[0]!r} and {spec!r} both define a workflow with the id "
                    f"{wf.id!r}: the id names one workflow (give each its own, or import it "
                    "from one module into the other)"
                )
    return out
