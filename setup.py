"""The optional compiled build of the balancer's hot modules (mypyc); everything else is in pyproject.toml.

`pip install .` (or `-e .`) compiles the modules listed in
lbsession/balancer/compiled/__init__.py (HOT_MODULES) into that folder, under
their own names, and records a hash of each source compiled (build.json). Any
failure, from mypyc's type check to a missing C compiler or Python.h, leaves a
warning in pip's log and no record, and lbsession runs the same sources as pure
Python: installing never requires a compiler. LBSESSION_PURE_BUILD=1 skips the
build on purpose.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent


def load_compiled_module() -> Any:
    """lbsession/balancer/compiled/__init__.py alone (stdlib only), without importing lbsession."""
    spec = importlib.util.spec_from_file_location(
        "_lbsession_compiled", ROOT / "lbsession/balancer/compiled/__init__.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


compiled = load_compiled_module()
# What the build makes, named before mypyc runs (setuptools plans outputs from it): one shim per
# module under lbsession.balancer.compiled, and the shared library holding their code.
EXTENSION_NAMES = [compiled.GROUP + "__mypyc"] + [compiled.compiled_name(module) for module in compiled.HOT_MODULES]


def warn(message: str) -> None:
    """A line in pip's log (shown with -v, or when the install fails for another reason)."""
    print(f"lbsession: {message}; lbsession will run as pure Python", file=sys.stderr)


class OptionalMypycBuild(build_ext):
    """Runs mypyc at build time (not at every setup.py call), then builds what it made, all or nothing."""

    def run(self) -> None:
        record = Path(self.get_ext_fullpath(EXTENSION_NAMES[0])).parent / compiled.RECORD
        record.unlink(missing_ok=True)  # a failed rebuild must not leave the last build's claim behind
        self.extensions = self.mypyc_extensions()
        if not self.extensions:
            return
        super().run()
        built = [Path(self.get_ext_fullpath(ext.name)) for ext in self.extensions]
        if not all(path.exists() for path in built):
            warn("the compiled build failed (no C compiler or no Python.h?)")
            return
        from mypy.version import __version__ as mypy_version

        record.write_text(
            json.dumps(
                {
                    "compiler": f"mypyc {mypy_version}",
                    "suffix": sysconfig.get_config_var("EXT_SUFFIX"),
                    "sources": {m: compiled.source_hash(ROOT / compiled.source_file(m)) for m in compiled.HOT_MODULES},
                },
                indent=2,
            )
            + "\n"
        )

    def mypyc_extensions(self) -> list[Extension]:
        """mypyc's C sources for the hot modules, as optional extensions under their compiled names; [] on failure."""
        if os.environ.get("LBSESSION_PURE_BUILD", "") not in ("", "0"):
            warn("LBSESSION_PURE_BUILD is set, the compiled build is skipped")
            return []
        try:
            from mypyc.build import mypycify
        except ImportError as exc:
            warn(f"mypyc is not importable ({exc})")
            return []
        sources = [compiled.source_file(m) for m in compiled.HOT_MODULES]
        # Type-checked on its own: no config file (the project's strict one is for development), and the
        # runtime dependencies, absent from pip's build environment, are left as Any.
        options = ["--config-file", os.devnull, "--ignore-missing-imports", "--follow-imports", "silent"]
        try:
            made = mypycify(
                options + sources, group_name=compiled.GROUP, target_dir=os.path.join(self.build_temp, "mypyc")
            )
        except (Exception, SystemExit) as exc:  # mypyc exits on a type error
            warn(f"mypyc could not compile the hot modules ({exc!r})")
            return []
        planned = {ext.name: ext for ext in self.extensions}  # already set up by finalize_options
        for ext in made:
            name = ext.name if ext.name == EXTENSION_NAMES[0] else compiled.compiled_name(ext.name)
            # mypyc's sources and compiler flags, into the extension setuptools planned under that name.
            # (Its name and optional=True stay: a compiler that fails must leave a pure install, not an error.)
            kept = ("name", "optional")
            vars(planned[name]).update({k: v for k, v in vars(ext).items() if not k.startswith("_") and k not in kept})
        return list(planned.values())


setup(
    ext_modules=[Extension(name, sources=[], optional=True) for name in EXTENSION_NAMES],
    cmdclass={"build_ext": OptionalMypycBuild},
)
