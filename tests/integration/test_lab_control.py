"""Faults through the admin API, the token-locked cut of a cluster link, and the lab commands end to end."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import aiohttp
import jsonschema
import pytest

from lbsession.appserver.lab_control import LAB_TOKEN_HEADER, REPLICATION_PATH
from lbsession.errors import TopologyError
from lbsession.lab.faults import AdminClient
from lbsession.lab.matrix import matrix_schema
from lbsession.lab.scenario import Fault
from lbsession.lab.topology import Topology

pytestmark = pytest.mark.integration

SCHEMA = matrix_schema()


async def post(url: str, body: dict | None = None, token: str | None = None) -> tuple[int, object]:
    headers = {LAB_TOKEN_HEADER: token} if token else {}
    body = {} if body is None else body  # the admin API takes changes as JSON only
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as response:
        is_json = response.content_type == "application/json"
        return response.status, await (response.json() if is_json else response.text())


async def test_every_fault_action_applies_through_the_admin_api(start_lab):
    lab: Topology = await start_lab("round-robin", backend="cluster")
    admin = AdminClient(lab.admin_url)
    try:
        for fault in [
            Fault(0, "cut-peer", server="was-1", peer="was-2"),
            Fault(0, "heal-peer", server="was-1", peer="was-2"),
            Fault(0, "kill-server", server="was-3"),
            Fault(0, "restart-server", server="was-3"),
            Fault(0, "add-server"),
            Fault(0, "drain-server", server="was-4"),
            Fault(0, "remove-server", server="was-4"),
            Fault(0, "set-strategy", strategy="sticky-cookie"),
        ]:
            await admin.apply(fault)
        with pytest.raises(TopologyError, match="answered 404: no managed server 'was-9'; known: was-1"):
            await admin.apply(Fault(0, "kill-server", server="was-9"))
        with pytest.raises(TopologyError, match="answered 409: this lab did not start a Redis"):
            await admin.apply(Fault(0, "kill-redis-primary"))
    finally:
        await admin.close()
    assert lab.lb.strategy.name == "sticky-cookie"
    assert list(lab.lb.pool.upstreams) == ["was-1", "was-2", "was-3"]  # was-4 added, then removed
    assert lab.servers["was-3"].restarts == 1 and lab.servers["was-3"].pid is not None


async def test_the_cut_route_is_locked_by_the_lab_token_and_invisible_through_the_balancer(start_lab):
    lab: Topology = await start_lab("round-robin", backend="cluster", servers=2)
    was1 = lab.servers["was-1"]
    peer = lab.servers["was-2"].cluster_address

    through_lb = await post(lab.lb.url + REPLICATION_PATH, {"peer": None, "cut": True}, token="guess")
    wrong = await post(was1.url + REPLICATION_PATH, {"peer": None, "cut": True}, token="not-the-token")
    unknown = await post(was1.url + "/no-such-route")
    right = await post(was1.url + REPLICATION_PATH, {"peer": peer, "cut": True}, token=lab._lab_token)
    bad_peer = await post(was1.url + REPLICATION_PATH, {"peer": "127.0.0.1:1", "cut": True}, token=lab._lab_token)

    assert through_lb[0] == wrong[0] == 404 and wrong[1] == unknown[1]  # the same 404 as any unknown path
    assert right[0] == 200 and right[1]["peers"] == [{"address": peer, "state": "up", "last_error": None, "cut": True}]
    assert bad_peer[0] == 404 and "not a peer of this node" in bad_peer[1]["error"]


async def test_a_cut_link_loses_new_sessions_and_healing_it_catches_the_peer_up(start_lab, users):
    lab: Topology = await start_lab("round-robin", backend="cluster", servers=2)
    was1, was2 = lab.servers["was-1"].url, lab.servers["was-2"].url
    async with aiohttp.ClientSession(base_url=lab.admin_url) as admin:
        async with admin.post("/servers/was-1/cluster/cut", json={"peer": "was-2"}) as r:
            assert r.status == 200
        alice = users(was1)  # straight to was-1, which no longer replicates to was-2
        await alice.login("alice")
        cookie = {"SESSION": alice.cookie("SESSION")}
        assert await status_of(was2 + "/me", cookie) == 401
        async with admin.post("/servers/was-1/cluster/heal", json={"peer": "was-2"}) as r:
            assert r.status == 200 and (await r.json())["cut"] is False
    async with asyncio.timeout(10):  # the link reconnects and its snapshot carries alice's session over
        while await status_of(was2 + "/me", cookie) != 200:
            await asyncio.sleep(0.05)


async def test_cutting_replication_in_a_lab_without_a_cluster_is_refused(start_lab):
    lab: Topology = await start_lab("round-robin", servers=1)
    status, body = await post(lab.admin_url + "/servers/was-1/cluster/cut")
    assert status == 409 and body["error"] == "the backend is local, not cluster: nothing replicates"


async def status_of(url: str, cookies: dict[str, str | None]) -> int:
    async with aiohttp.ClientSession(cookies=cookies) as http, http.get(url) as response:
        return response.status


# --------------------------------------------------------------------------- the commands


async def lbsession(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbsession", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def finished(*args: str, timeout_s: float = 90) -> tuple[int, str, str]:
    process = await lbsession(*args)
    async with asyncio.timeout(timeout_s):
        out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_a_scenario_runs_against_a_running_lab_and_applies_its_faults_there(tmp_path):
    ready = tmp_path / "ready.json"
    run = await lbsession("run", "--strategy", "sticky-cookie", "--port", "0", "--admin-port", "0",
                          "--ready-file", str(ready))  # fmt: skip
    try:
        async with asyncio.timeout(30):
            while not ready.exists():
                assert run.returncode is None, "lbsession run exited"
                await asyncio.sleep(0.05)
        info = json.loads(ready.read_text())
        out_dir = tmp_path / "out"
        code, out, err = await finished("scenario", "C6", "--target", info["admin"], "--duration", "1.5",
                                        "--out", str(out_dir))  # fmt: skip
        report = json.loads((out_dir / "c06-sticky-server-killed.json").read_text())
        async with aiohttp.ClientSession() as http, http.get(info["admin"] + "/topology") as response:
            after = await response.json()
    finally:
        run.send_signal(signal.SIGTERM)
        await run.communicate()
    assert code == 0, err
    assert "C6  c06-sticky-server-killed  [PASS]" in out and f"against {info['admin']}" in out
    assert report["target"] == info["admin"] and report["faults"][0]["result"]["signal"] == "SIGKILL"
    assert (out_dir / "c06-sticky-server-killed.md").read_text().startswith("# C6 c06-sticky-server-killed")
    was1 = next(s for s in after["servers"] if s["id"] == "was-1")
    assert was1["pid"] is None  # the fault happened in that lab: was-1 is dead


async def test_a_short_matrix_writes_json_that_follows_its_schema_and_markdown(tmp_path):
    code, out, err = await finished("matrix", "--only", "C1", "--only", "C9", "--only", "grid-least-conn-redis",
                                    "--duration", "1", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, out + err
    document = json.loads((tmp_path / "matrix.json").read_text())
    jsonschema.validate(document, SCHEMA)
    assert [r["scenario"] for r in document["runs"]] == [
        "c01-round-robin-local", "grid-least-conn-redis", "c09-redis-scale-out"
    ]  # fmt: skip
    assert document["claims"] == {"C1": "PASS", "C9": "PASS"} and document["verdict"] == "PASS"
    assert document["overrides"] == {"seed": None, "users": None, "duration_s": 1.0}
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["claim", "scenario"] and "3 runs in" in out
    assert "[ 3/3] C9   PASS  c09-redis-scale-out" in err  # one line per run on stderr
    assert "| C9 | c09-redis-scale-out |" in (tmp_path / "matrix.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scenario", "C99"], "error: scenario 'C99': no such file or claim; choose a file, a claim id"),
        (["scenario", "C6", "--users", "0"], "population.users: 0 must be between 1 and 500"),
        (["scenario", "C6", "--target", "ftp://x"], "error: --target: 'ftp://x' must start with http://"),
        (["matrix", "--only", "C77"], "error: --only C77: selects no run"),
    ],
)
async def test_lab_command_mistakes_are_one_line_and_status_2(args, message):
    code, _, err = await finished(*args)
    assert code == 2 and message in err and "Traceback" not in err, err
