"""The import rules of docs/architecture.md ("Parts and import rules"), read from every import statement.

Function-level imports and those under `if TYPE_CHECKING:` count too: a rule that only
held at import time would still let a part lean on another in ways a reader must follow.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import lbsession

PACKAGE = Path(lbsession.__file__).parent
FORBIDDEN_FOR_BALANCER = ("lbsession.appserver", "lbsession.dashboard", "lbsession.lab")


def module_name(path: Path) -> str:
    """lbsession/balancer/proxy.py -> lbsession.balancer.proxy; a package's __init__ is the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


@functools.cache
def imported(name: str) -> frozenset[str]:
    """Every lbsession module the module `name` imports, anywhere in its body."""
    return frozenset(_imports(name))


def _imports(name: str) -> Iterator[str]:
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            # `from lbsession.x import y` imports lbsession.x, and lbsession.x.y when y is a module
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        yield from (t for t in targets if t in MODULES)


@functools.cache
def reachable(start: str) -> dict[str, list[str]]:
    """Every module `start` reaches through imports, each with the chain that reaches it."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        current = todo.pop()
        for target in imported(current):
            if target not in chains:
                chains[target] = [*chains[current], target]
                todo.append(target)
    return chains


def folder(name: str) -> str:
    """The part a module belongs to: lbsession.balancer.strategies.base -> lbsession.balancer."""
    return ".".join(name.split(".")[:2]) if MODULES[name].parent != PACKAGE else name


def test_the_balancer_imports_nothing_of_the_app_server_the_dashboard_or_the_lab() -> None:
    balancer_modules = [name for name in MODULES if name.startswith("lbsession.balancer")]
    assert len(balancer_modules) > 10  # the walk found the package
    for name in balancer_modules:
        for target, chain in reachable(name).items():
            assert not target.startswith(FORBIDDEN_FOR_BALANCER), " -> ".join(chain)


def test_the_app_server_imports_nothing_of_the_balancer_the_dashboard_or_the_lab() -> None:
    forbidden = ("lbsession.balancer", "lbsession.dashboard", "lbsession.lab")
    for name in (n for n in MODULES if n.startswith("lbsession.appserver")):
        for target, chain in reachable(name).items():
            assert not target.startswith(forbidden), " -> ".join(chain)


def test_no_import_cycle_crosses_folders() -> None:
    for name in MODULES:
        for target, chain in reachable(name).items():
            if target != name and folder(target) != folder(name) and name in reachable(target):
                back = reachable(target)[name]
                raise AssertionError(f"cycle: {' -> '.join(chain)} -> {' -> '.join(back[1:])}")


def test_the_walk_sees_function_level_and_type_checking_imports() -> None:
    # lbsession.balancer.balancer imports its admin app inside a function, and only for types at the top.
    assert "lbsession.balancer.admin" in (imported("lbsession.balancer.balancer"))
    assert "lbsession.balancer.balancer" in (imported("lbsession.balancer.admin"))
