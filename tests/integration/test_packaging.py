"""The package as `pip install .` builds it: the scenario files travel inside it (issue 11's first-run defect),
and so does the compiled build of the hot modules where a C compiler is, while an install without one succeeds.

The wheel is built for real by pip (its build backend in an isolated environment), unpacked
outside the checkout, and `lbsession scenario` is run from a folder with no configs/ in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from lbsession.lab.scenario import PACKAGED_SCENARIOS, scenario_dirs

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "configs" / "scenarios"


def test_the_packaged_scenarios_are_the_configs_ones() -> None:
    assert PACKAGED_SCENARIOS.resolve() == SOURCE.resolve()
    assert PACKAGED_SCENARIOS in scenario_dirs() or Path("configs/scenarios").resolve() == SOURCE.resolve()


def build_wheel(tmp_path_factory: pytest.TempPathFactory, **env: str) -> Path:
    """`pip wheel` of a copy of the checkout, with `env` added to pip's environment."""
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    # A copy of what the build reads, links kept as links, so the build's leftovers stay out of the checkout.
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("lbsession", "configs"):
        ignore = shutil.ignore_patterns("__pycache__", "*.so", "build.json")  # an in-place build's outputs
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **env},
    )  # fmt: skip
    if built.returncode != 0 and "No matching distribution" in built.stderr:
        pytest.skip(f"pip cannot fetch the build backend here: {built.stderr.strip()[-300:]}")
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("lbsession-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory)


def installed_build(wheel: Path, site: Path) -> str:
    """What the unpacked wheel's balancer reports as its build, and whether every hot module loaded that way."""
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import importlib; from lbsession.balancer.compiled import HOT_MODULES, build, loaded;"
        "[importlib.import_module(m) for m in HOT_MODULES]; print(build().description, sorted(set(loaded().values())))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=site, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def compiler_here() -> bool:
    return (
        shutil.which(sysconfig.get_config_var("CC").split()[0]) is not None
        and Path(sysconfig.get_paths()["include"], "Python.h").exists()
    )


def test_the_wheel_holds_the_compiled_build_where_a_compiler_is(wheel: Path, tmp_path: Path) -> None:
    if not compiler_here():
        pytest.skip("no C compiler or no Python.h here: the wheel is pure Python, as the next test checks")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lbsession/balancer/compiled/build.json" in names
    assert installed_build(wheel, tmp_path / "site").endswith(") [True]")  # "compiled (mypyc X) [True]"


def test_without_a_compiler_the_install_succeeds_as_pure_python(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    pure = build_wheel(tmp_path_factory, CC="/bin/false")
    names = zipfile.ZipFile(pure).namelist()
    assert not [name for name in names if name.endswith(".so") or name.endswith("build.json")], names
    described = installed_build(pure, tmp_path / "site")
    assert described == "pure Python (no compiled build installed: no C compiler then, or never built) [False]"


def test_the_wheel_holds_every_scenario_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"lbsession/lab/scenarios/{p.name}" for p in SOURCE.glob("*.yaml")}
    assert expected and expected <= names, expected - names


def test_a_scenario_runs_from_any_folder_with_the_installed_package(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip installs, without the checkout behind it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "lbsession", "scenario", "C1", "--duration", "1", "--users", "4"],
        cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "relogins > 0" in done.stdout
    code = "from lbsession.lab.scenario import find_scenario; print(find_scenario('C6').resolve())"
    where = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(site), where  # the package's copy, not the checkout's
