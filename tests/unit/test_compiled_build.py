"""The optional compiled build: what `build()` reports is what was loaded, and a stale build is never used."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lbsession.balancer import compiled
from lbsession.balancer.compiled import HOT_MODULES, RECORD, build, choose, loaded, source_hash, source_path

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_the_build_reported_is_the_one_loaded() -> None:
    for module in HOT_MODULES:
        importlib.import_module(module)
    assert set(loaded()) == set(HOT_MODULES)
    assert set(loaded().values()) == {build().compiled}, (build(), loaded())
    assert build().description.startswith("compiled (mypyc " if build().compiled else "pure Python (")


def test_lbsession_pure_forces_the_pure_sources() -> None:
    probe = (
        "import importlib; from lbsession.balancer.compiled import HOT_MODULES, build, loaded;"
        "[importlib.import_module(m) for m in HOT_MODULES]; print(build().description, sorted(set(loaded().values())))"
    )
    env = {**os.environ, "LBSESSION_PURE": "1"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "pure Python (LBSESSION_PURE=1) [False]"


def record(folder: Path, sources: dict[str, str], suffix: str = SUFFIX) -> None:
    (folder / RECORD).write_text(json.dumps({"compiler": "mypyc 9.9", "suffix": suffix, "sources": sources}))


def current_hashes() -> dict[str, str]:
    return {module: source_hash(source_path(module)) for module in HOT_MODULES}


def test_without_a_record_it_is_pure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LBSESSION_PURE", raising=False)
    assert choose(tmp_path) == compiled.Build(
        False, "pure Python (no compiled build installed: no C compiler then, or never built)"
    )


def test_a_source_edited_since_the_build_makes_it_pure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LBSESSION_PURE", raising=False)
    hashes = current_hashes()
    for module in HOT_MODULES:
        compiled.compiled_path(module, SUFFIX, tmp_path).touch()
    record(tmp_path, hashes)
    assert choose(tmp_path).compiled  # every hash matches and every file is there
    record(tmp_path, {**hashes, "lbsession.balancer.http": source_hash(Path(__file__))})
    assert choose(tmp_path).description == "pure Python (compiled build is stale: http.py changed since; reinstall)"


def test_a_missing_compiled_file_or_another_python_makes_it_pure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LBSESSION_PURE", raising=False)
    record(tmp_path, current_hashes())
    assert "compiled build incomplete: lbsession.balancer.http missing" in choose(tmp_path).description
    record(tmp_path, current_hashes(), suffix=".cpython-27-x86_64-linux-gnu.so")
    assert "compiled for another Python" in choose(tmp_path).description
    (tmp_path / RECORD).write_text("{not json")
    assert "unreadable" in choose(tmp_path).description


def test_the_balancer_says_which_build_runs() -> None:
    from lbsession.balancer.balancer import LoadBalancer
    from lbsession.config import BalancerConfig, UpstreamConfig

    lb = LoadBalancer(BalancerConfig(upstreams=(UpstreamConfig(id="a", url="http://127.0.0.1:9"),)))
    assert lb.status()["build"] == build().description
