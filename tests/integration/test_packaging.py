"""The package as `pip install .` builds it: the scenario files travel inside it (issue 11's first-run defect).

The wheel is built for real by pip (its build backend in an isolated environment), unpacked
outside the checkout, and `lbsession scenario` is run from a folder with no configs/ in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    # A copy of what the build reads, links kept as links, so the build's leftovers stay out of the checkout.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("lbsession", "configs"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if built.returncode != 0 and "No matching distribution" in built.stderr:
        pytest.skip(f"pip cannot fetch the build backend here: {built.stderr.strip()[-300:]}")
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("lbsession-*.whl")
    return path


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
