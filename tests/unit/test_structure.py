"""The package's import structure: no cycles, services never import each other, the package
proper imports no service, and the executor's parts form a one-way chain."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import REPO

ROOTS = {"shared": "supersede", "services": "supersede.services", "lua": "supersede.lua"}
SERVICES = ("ingress", "admission", "executor")
EXECUTOR_CHAIN = (
    "config", "metrics", "outbox", "outputs", "isolation", "steps", "lease", "cancel", "claim",
    "fetch", "service",
)  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The supersede modules `name` imports (anywhere in the file, functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` depends on the module; `from m import name` on m
            subs = [f"{node.module}.{a.name}" for a in node.names]
            targets = [s for s in subs if s in MODULES] or [node.module]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def test_the_layout_is_what_the_package_maps() -> None:
    assert "supersede" in MODULES and "supersede.protocol" in MODULES
    assert {f"supersede.services.executor.{p}" for p in EXECUTOR_CHAIN} <= set(MODULES)


def test_there_is_no_import_cycle() -> None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in GRAPH[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in GRAPH:
        if name not in state:
            visit(name, [])


def test_services_never_import_each_other() -> None:
    for name, deps in GRAPH.items():
        for service in SERVICES:
            if name.startswith(f"supersede.services.{service}"):
                others = {
                    d for d in deps
                    for other in SERVICES
                    if other != service and d.startswith(f"supersede.services.{other}")
                }  # fmt: skip
                assert not others, f"{name} imports {others}"


LAUNCHERS = {"supersede.__main__", "supersede.launch"}


def test_the_package_proper_imports_no_service() -> None:
    for name, deps in GRAPH.items():
        if name.startswith("supersede.services") or name in LAUNCHERS:
            continue  # the `supersede` command and `python -m supersede`: the CLI
        assert not {d for d in deps if d.startswith("supersede.services")}, name


def test_the_executor_parts_form_a_one_way_chain() -> None:
    prefix = "supersede.services.executor."
    for i, part in enumerate(EXECUTOR_CHAIN):
        deps = {d[len(prefix) :] for d in GRAPH[prefix + part] if d.startswith(prefix)}
        later = deps - set(EXECUTOR_CHAIN[:i])
        assert not later, f"executor.{part} imports a later part: {later}"


def test_the_package_names_import_when_asked_and_import_supersede_alone_imports_nothing() -> None:
    """`import supersede` imports no dependency (the command's launcher runs before redis is
    imported, so a Ctrl-C then is one line); every name of `__all__` is there when asked."""
    import subprocess
    import sys

    probe = (
        "import sys, supersede\n"
        "assert 'redis' not in sys.modules and 'supersede.config' not in sys.modules\n"
        "names = [getattr(supersede, n) for n in supersede.__all__]\n"
        "assert 'redis.asyncio.connection' in sys.modules\n"  # (mended on the first name)
        "assert supersede.errors.SupersedeError and supersede.client.publish_runs\n"
        "assert not hasattr(supersede, '__main__')\n"  # (it imported the launcher: the CLI ran)
        "assert getattr(supersede, 'a.b', None) is None\n"
        "try:\n"
        "    supersede.nothing_here\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "print(len(names))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    import supersede

    assert int(out.stdout) == len(supersede.__all__) == len(set(supersede.__all__))
