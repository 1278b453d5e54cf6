"""The optional compiled build of the data path's hot modules, and the choice to load it or not.

`pip install .` compiles the balancer's hot modules with mypyc when a C compiler
and Python's headers are present (setup.py); the same `.py` files are the pure
build, used when there is no compiler. The compiled modules are built here,
under this package, never beside their sources: an `.so` next to `http.py`
would shadow any later edit of `http.py` in an editable install, and tests would
run stale code. Instead, setup.py records a hash of each source it compiled
(`build.json`), and `install()` maps the hot modules' names to the compiled
files only when every recorded hash matches the `.py` on disk. Otherwise, or
with `LBSESSION_PURE=1`, every module stays pure: mypyc's modules call each
other directly, so it is all of them or none.

`build()` says which one runs ("compiled (mypyc 1.x)" / "pure Python (why)"),
for `lbsession lb`'s startup log, `GET /status` and `lbsession bench`.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).parent
BALANCER = HERE.parent  # the folder of the sources the build compiled
RECORD = "build.json"
PURE_ENV = "LBSESSION_PURE"
# The modules setup.py compiles, as mypyc groups them in one library. setup.py reads this list (and
# source_hash) from this file, so the build and the check at import cannot disagree.
HOT_MODULES = (
    "lbsession.balancer.http",
    "lbsession.balancer.proxy",
    "lbsession.balancer.upstream",
    "lbsession.balancer.balancer",
    "lbsession.balancer.events",
    "lbsession.balancer.strategies.base",
    "lbsession.balancer.strategies.round_robin",
    "lbsession.balancer.strategies.least_conn",
    "lbsession.balancer.strategies.sticky_cookie",
    "lbsession.balancer.strategies.ip_hash",
    "lbsession.balancer.strategies.consistent_hash",
)
GROUP = "lbsession.balancer.compiled.native"  # mypyc's shared library: native__mypyc<suffix> in this folder


@dataclass(frozen=True)
class Build:
    """Which build of the hot modules this process runs, and why."""

    compiled: bool
    description: str  # "compiled (mypyc 2.4.1)", "pure Python (LBSESSION_PURE=1)"
    modules: tuple[str, ...] = ()  # the compiled modules' names, when compiled
    suffix: str = ""  # their files' extension-module suffix, when compiled


def source_hash(path: Path) -> str:
    """The hash the build records for a source file, and compares at import."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compiled_name(module: str) -> str:
    """The compiled name of a hot module: lbsession.balancer.X.Y is lbsession.balancer.compiled.X__Y."""
    return "lbsession.balancer.compiled." + "__".join(module.split(".")[2:])


def compiled_path(module: str, suffix: str, folder: Path = HERE) -> Path:
    """Where the compiled file of `module` lives: X__Y<suffix> in this folder (its init is still PyInit_Y)."""
    return folder / (compiled_name(module).rpartition(".")[2] + suffix)


def source_file(module: str) -> str:
    """A hot module's source, relative to the folder holding lbsession/ (setup.py's view)."""
    return module.replace(".", "/") + ".py"


def source_path(module: str, balancer: Path = BALANCER) -> Path:
    """The `.py` a hot module (lbsession.balancer.X.Y) is compiled from."""
    return balancer.joinpath(*module.split(".")[2:]).with_suffix(".py")


def choose(folder: Path = HERE, balancer: Path = BALANCER) -> Build:
    """Read the build record in `folder` and the sources under `balancer`; decide, without importing anything."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return Build(False, f"pure Python ({PURE_ENV}={os.environ[PURE_ENV]})")
    try:
        record = json.loads((folder / RECORD).read_text())
    except FileNotFoundError:
        return Build(False, "pure Python (no compiled build installed: no C compiler then, or never built)")
    except ValueError as exc:
        return Build(False, f"pure Python (the build record {RECORD} is unreadable: {exc}; reinstall)")
    suffix = record["suffix"]
    if suffix not in importlib.machinery.EXTENSION_SUFFIXES:
        return Build(False, f"pure Python (compiled for another Python: {suffix}; reinstall)")
    for module, digest in record["sources"].items():
        source = source_path(module, balancer)
        if not source.exists() or source_hash(source) != digest:
            return Build(False, f"pure Python (compiled build is stale: {source.name} changed since; reinstall)")
        if not compiled_path(module, suffix, folder).exists():
            return Build(False, f"pure Python (compiled build incomplete: {module} missing; reinstall)")
    return Build(True, f"compiled ({record['compiler']})", tuple(record["sources"]), suffix)


class CompiledFinder(importlib.abc.MetaPathFinder):
    """Finds a hot module's compiled file in place of its source, for the modules of one checked build."""

    def __init__(self, modules: tuple[str, ...], suffix: str) -> None:
        self.paths = {module: str(compiled_path(module, suffix)) for module in modules}

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """The compiled module's spec, for the names of the build; None lets the usual finders look."""
        found = self.paths.get(fullname)
        if found is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, found, loader=importlib.machinery.ExtensionFileLoader(fullname, found)
        )


_build: Build | None = None


def install() -> Build:
    """Decide once per process, and when compiled, put the finder first; lbsession.balancer calls it."""
    global _build
    if _build is None:
        _build = choose()
        if _build.compiled:
            sys.meta_path.insert(0, CompiledFinder(_build.modules, _build.suffix))
    return _build


def build() -> Build:
    """Which build this process runs (decided when lbsession.balancer was first imported)."""
    return install()


def loaded() -> dict[str, bool]:
    """For each hot module imported so far: is it the compiled one? (What `build()` reported must match.)"""
    return {
        name: getattr(module, "__file__", "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        for name, module in list(sys.modules.items())
        if name in HOT_MODULES
    }
