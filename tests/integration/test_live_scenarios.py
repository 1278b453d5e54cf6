"""A lab plays a scenario against itself from its admin API (lbsession.lab.live): what the dashboard's panel uses."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from lbsession.lab.topology import Topology

pytestmark = pytest.mark.integration

POLL_S = 0.1
RUN_TIMEOUT_S = 30.0  # a 0.8 s scenario, and the time a loaded 2-core machine takes to report it
STRATEGY_NOTE = "the target's strategy is round-robin; the scenario was written for sticky-cookie"


async def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    """One admin API call: its status and JSON body."""
    async with http.request(method, url, **kwargs) as response:
        return response.status, await response.json()


async def finished(http: aiohttp.ClientSession, admin_url: str) -> dict[str, Any]:
    """Poll GET /scenarios/current until the run is no longer running; its last state."""
    async with asyncio.timeout(RUN_TIMEOUT_S):
        while True:
            status, current = await call(http, "GET", admin_url + "/scenarios/current")
            assert status == 200, current
            if current["state"] != "running":
                return dict(current)
            await asyncio.sleep(POLL_S)


async def test_the_lab_lists_its_scenarios_and_what_they_were_written_for(start_lab) -> None:
    lab: Topology = await start_lab("round-robin")
    assert lab.lb is not None
    async with aiohttp.ClientSession() as http:
        status, body = await call(http, "GET", lab.admin_url + "/scenarios")
        idle = await call(http, "GET", lab.admin_url + "/scenarios/current")

    assert status == 200
    by_claim = {s["claim"]: s for s in body["scenarios"]}
    assert by_claim["C1"]["name"] == "c01-round-robin-local" and by_claim["C1"]["title"]
    assert by_claim["C1"]["has_faults"] is False and by_claim["C1"]["notes"] == []
    assert by_claim["C6"]["has_faults"] is True and by_claim["C6"]["faults"] == ["kill-server was-1 at 1 s"]
    assert by_claim["C6"]["notes"] == [STRATEGY_NOTE]
    assert idle == (200, {"state": "idle"})


async def test_a_scenario_runs_against_the_lab_one_at_a_time_to_its_verdict(start_lab) -> None:
    lab: Topology = await start_lab("round-robin")
    assert lab.lb is not None
    url = lab.admin_url + "/scenarios"
    async with aiohttp.ClientSession() as http:
        started = await call(http, "POST", url, json={"name": "C1", "duration_s": 0.8, "users": 6})
        again = await call(http, "POST", url, json={"name": "C2"})
        current = await finished(http, lab.admin_url)
        unknown = await call(http, "POST", url, json={"name": "C99"})
        not_json = await call(http, "POST", url, data="name=C1", headers={"Content-Type": "text/plain"})

    assert started[0] == 202 and started[1]["state"] == "running" and started[1]["claim"] == "C1"
    assert again[0] == 409 and "c01-round-robin-local is running" in again[1]["error"]
    assert current["state"] == "done", current
    assert current["verdict"] == "PASS", (current["checks"], current["notes"])
    assert current["relogins"] > 0 and current["metrics"]["relogin_users"] == 6
    assert current["requests"] == current["metrics"]["requests"] > 0
    assert current["imbalance"] is not None and current["metrics"]["p99_ms"] is not None
    assert all(check["passed"] for check in current["checks"])
    assert unknown[0] == 404 and "c01-round-robin-local" in unknown[1]["scenarios"]
    assert not_json[0] == 415


async def test_a_scenario_s_fault_acts_on_the_lab_and_its_differences_are_noted(start_lab) -> None:
    lab: Topology = await start_lab("round-robin", balancer={"admin_token": "t0ken-of-the-lab"})
    assert lab.lb is not None
    url = lab.admin_url + "/scenarios"
    async with aiohttp.ClientSession() as http:
        assert (await call(http, "POST", url, json={"name": "C6"}))[0] == 401
        bearer = {"Authorization": "Bearer t0ken-of-the-lab"}
        status, _ = await call(http, "POST", url, json={"name": "C6", "duration_s": 0.8}, headers=bearer)
        assert status == 202  # and the run's own calls to the admin API (the kill) carry the token
        current = await finished(http, lab.admin_url)

    assert current["state"] == "done" and current["faults_applied"] == 1
    assert current["fault_results"][0]["result"]["signal"] == "SIGKILL"
    assert lab.servers["was-1"].pid is None  # killed in this lab, as the dashboard shows it
    assert STRATEGY_NOTE in current["notes"]
    assert current["verdict"] == "FAIL"  # round-robin re-logs everyone in: not the sticky claim's outcome
