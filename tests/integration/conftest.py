"""Fixtures that start real labs: the balancer in the test's loop, app servers as real processes."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lbsession.config import Config, load_config
from lbsession.lab.topology import Topology

# Fast health checks so a killed server is noticed in a fraction of a second.
FAST_HEALTH = {"interval_s": 0.2, "timeout_s": 0.5, "rise": 1, "fall": 1}


def lab_config(strategy: str, backend: str = "local", servers: int = 3, **sections: dict[str, Any]) -> Config:
    """A lab config on free ports, with fast health checks and a fixed sticky secret.

    `sections` add to the top-level sections: `redis_server={"ha": True}`, `app={"redis": {...}}`.
    """
    balancer = {
        "port": 0,
        "admin_port": 0,
        "strategy": strategy,
        "health": FAST_HEALTH,
        "sticky": {"secret": "integration-test-secret"},
        **sections.pop("balancer", {}),
    }
    app = {"backend": backend, **sections.pop("app", {})}
    return load_config(overrides={"servers": servers, "balancer": balancer, "app": app, **sections}, environ={})


@pytest.fixture
async def start_lab(tmp_path: Any) -> AsyncIterator[Callable[..., Any]]:
    """Start labs on demand; every one is stopped at the end of the test, pass or fail."""
    labs: list[Topology] = []

    async def start(
        strategy: str, backend: str = "local", servers: int = 3, in_front: str = "lbsession", **sections: Any
    ) -> Topology:
        # A real balancer's log folder holds HAProxy's stats socket, whose path must stay short (108 bytes).
        base = tmp_path if in_front == "lbsession" else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        config = lab_config(strategy, backend, servers, **sections)
        topology = Topology(config, log_dir=base / f"lab{len(labs)}", balancer=in_front)
        labs.append(topology)
        await topology.start()
        return topology

    with contextlib.ExitStack() as stack:
        yield start
        for topology in reversed(labs):
            await topology.stop()


@dataclass
class Reply:
    """What a user saw: the status, the server that answered, the JSON body."""

    status: int
    server: str | None
    body: Any


class User:
    """A browser-like client: its own cookie jar, optionally its own source address."""

    def __init__(self, base_url: str, source_ip: str | None = None) -> None:
        self.base_url = base_url
        connector = aiohttp.TCPConnector(local_addr=(source_ip, 0) if source_ip else None)
        # unsafe=True: keep cookies set by an IP-address host (127.0.0.1), as browsers do.
        self.http = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        """Send one request and record who answered."""
        async with self.http.request(method, self.base_url + path, allow_redirects=False, **kwargs) as response:
            body = await response.json() if response.content_type == "application/json" else await response.text()
            return Reply(response.status, response.headers.get("X-Served-By"), body)

    async def login(self, username: str) -> Reply:
        """Log in and return the reply (the server that created the session)."""
        reply = await self.request("POST", "/login", json={"username": username})
        assert reply.status == 200, reply
        return reply

    async def me(self) -> Reply:
        """Ask who we are."""
        return await self.request("GET", "/me")

    def cookie(self, name: str) -> str | None:
        """The value of a cookie in this user's jar."""
        for morsel in self.http.cookie_jar:
            if morsel.key == name:
                return morsel.value
        return None

    async def close(self) -> None:
        """Close the client's connections."""
        await self.http.close()


async def logged_in_users(lab: Topology, users: Callable[..., User], count: int) -> list[User]:
    """`count` users, user0..userN, each logged in through the lab's balancer."""
    people = [users(lab.lb.url) for _ in range(count)]
    for n, person in enumerate(people):
        await person.login(f"user{n}")
    return people


@pytest.fixture
async def users() -> AsyncIterator[Callable[..., User]]:
    """Make users on demand; all are closed at the end of the test."""
    made: list[User] = []

    def make(base_url: str, source_ip: str | None = None) -> User:
        user = User(base_url, source_ip)
        made.append(user)
        return user

    yield make
    for user in made:
        with contextlib.suppress(Exception):
            await user.close()
