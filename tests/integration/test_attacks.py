"""The attacks a session system must refuse, against every session store, on real processes.

Each check asks every app server directly (past the balancer), so "dead" means dead in
the whole system: in each server's memory, in every cluster node, in Redis.
"""

from __future__ import annotations

import secrets

import aiohttp
import pytest

from lbsession.lab.topology import Topology

pytestmark = pytest.mark.integration

# Sticky for local sessions (the user must stay where the session lives); round-robin otherwise.
BACKENDS = [("local", "sticky-cookie"), ("redis", "round-robin"), ("cluster", "round-robin")]


async def me_on_every_server(lab: Topology, session_id: str) -> list[int]:
    """The status of GET /me with this session id, asked of each app server directly."""
    statuses = []
    async with aiohttp.ClientSession(cookies={"SESSION": session_id}) as http:
        for server in lab.servers.values():
            async with http.get(server.url + "/me") as response:
                statuses.append(response.status)
    return statuses


@pytest.mark.parametrize(("backend", "strategy"), BACKENDS)
async def test_session_fixation_the_planted_id_is_dead_everywhere_after_login(start_lab, users, backend, strategy):
    lab: Topology = await start_lab(strategy, backend=backend, servers=2)
    planted = secrets.token_urlsafe(32)  # the attacker's id, set in the victim's browser beforehand
    victim = users(lab.lb.url)
    victim.http.cookie_jar.update_cookies({"SESSION": planted}, aiohttp.client.URL(lab.lb.url))

    await victim.login("victim")

    assert victim.cookie("SESSION") not in (None, planted)  # rotated at login
    assert await me_on_every_server(lab, planted) == [401, 401]
    assert (await victim.me()).status == 200


@pytest.mark.parametrize(("backend", "strategy"), BACKENDS)
async def test_guessed_and_malformed_ids_find_no_session(start_lab, users, backend, strategy):
    lab: Topology = await start_lab(strategy, backend=backend, servers=2)
    await users(lab.lb.url).login("someone")  # there is a session to find, but not by guessing

    for guess in [secrets.token_urlsafe(32), "A" * 43, "../../etc/passwd", "x" * 4000, "' OR 1=1 --"]:
        assert await me_on_every_server(lab, guess) == [401, 401], guess


@pytest.mark.parametrize(("backend", "strategy"), BACKENDS)
async def test_a_logged_out_session_id_is_dead_everywhere(start_lab, users, backend, strategy):
    lab: Topology = await start_lab(strategy, backend=backend, servers=2)
    alice = users(lab.lb.url)
    await alice.login("alice")
    stolen = alice.cookie("SESSION")
    assert stolen is not None
    if backend != "local":
        assert await me_on_every_server(lab, stolen) == [200, 200]

    assert (await alice.request("POST", "/logout")).status == 200

    assert await me_on_every_server(lab, stolen) == [401, 401]  # replaying the old cookie gets nothing


async def test_forged_and_tampered_sticky_pins_are_ignored_and_counted(start_lab, users):
    lab: Topology = await start_lab("sticky-cookie", servers=3)
    alice = users(lab.lb.url)
    home = (await alice.login("alice")).server
    genuine = alice.cookie("LBSERVER")
    server, _, tag = genuine.rpartition(".")
    other = next(s for s in lab.servers if s != home)
    flipped = tag[:-1] + ("A" if tag[-1] != "A" else "B")
    attempts = [f"{other}.{tag}", f"{server}.{flipped}", f"{other}.", "was-1", ""]

    for forged in attempts:
        async with aiohttp.ClientSession(cookies={"LBSERVER": forged}) as http, http.get(lab.lb.url + "/me") as r:
            assert r.status == 401  # routed like a new client: no session, no error
            assert "LBSERVER=" in r.headers.get("Set-Cookie", "")  # and given a genuine pin

    assert lab.lb.status()["counters"]["forged_cookies"] == len(attempts)  # an empty pin is a malformed one
