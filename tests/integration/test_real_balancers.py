"""HAProxy and nginx in front of the lab: generated configs, real binaries, runtime changes, clean stops.

Debian's haproxy and nginx packages are real children of the lab here; a machine
without them skips, naming the package to install (.ci/run installs both).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lbsession.balancer.strategies import STRATEGY_NAMES
from lbsession.cli import main
from lbsession.lab.balancers import APT_PACKAGES, REAL_BALANCERS, find_binary, front_class, printed_config
from lbsession.lab.matrix import matrix_document, run_matrix
from lbsession.lab.report import NO_CLAIM, PASS, RunReport
from lbsession.lab.runner import run_scenario
from lbsession.lab.scenario import find_scenario, load_scenario
from lbsession.lab.topology import Topology
from tests.integration.conftest import lab_config


def needs(name: str) -> pytest.MarkDecorator:
    """Skip unless balancer `name`'s binary is installed, saying which package brings it."""
    return pytest.mark.skipif(
        find_binary(name) is None, reason=f"{name} is not installed: apt-get install {APT_PACKAGES[name]}"
    )


REAL = [pytest.param(name, marks=needs(name)) for name in REAL_BALANCERS]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A log folder with a short path: HAProxy's stats socket lives there, and a unix socket path is short."""
    path = Path(tempfile.mkdtemp(prefix="lbs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("balancer", REAL)
async def test_generated_config_passes_the_binarys_own_check(balancer: str, strategy: str, short_dir: Path) -> None:
    front = front_class(balancer)(lab_config(strategy), short_dir)
    front.servers = {"was-1": 8001, "was-2": 8002, "was-3": 8003}
    front.states = dict.fromkeys(front.servers, "ready")
    front.write_config()
    await front.check_config()  # `haproxy -c -f`, `nginx -t -c`: raises with the binary's complaint
    text = front.config_path.read_text()
    expected = {
        ("haproxy", "round-robin"): "balance roundrobin",
        ("haproxy", "least-conn"): "balance leastconn",
        ("haproxy", "sticky-cookie"): "cookie LBSERVER insert indirect nocache httponly",
        ("haproxy", "ip-hash"): "hash-type map-based",
        ("haproxy", "consistent-hash"): "hash-type consistent",
        ("nginx", "round-robin"): "upstream be {\n        server",
        ("nginx", "least-conn"): "least_conn;",
        ("nginx", "sticky-cookie"): "hash $cookie_SESSION consistent;",
        ("nginx", "ip-hash"): "ip_hash;",
        ("nginx", "consistent-hash"): "hash $remote_addr consistent;",
    }
    assert expected[(balancer, strategy)] in text


HASH_LINES = {
    ("haproxy", "ip-hash", "header:X-User"): ["balance hdr(X-User)", "hash-type map-based"],
    ("haproxy", "consistent-hash", "cookie:SESSION"): ["balance hash req.cook(SESSION)", "hash-type consistent"],
    ("nginx", "ip-hash", "header:X-User"): ["hash $http_x_user;"],
    ("nginx", "consistent-hash", "cookie:SESSION"): ["hash $cookie_SESSION consistent;"],
}


@pytest.mark.parametrize(("balancer", "strategy", "key"), [pytest.param(*k, marks=needs(k[0])) for k in HASH_LINES])
async def test_a_hash_key_other_than_the_address_is_the_balancers_own(
    balancer: str, strategy: str, key: str, short_dir: Path
) -> None:
    front = front_class(balancer)(lab_config(strategy, balancer={"hash": {"key": key}}), short_dir)
    front.servers = {"was-1": 8001, "was-2": 8002}
    front.states = dict.fromkeys(front.servers, "ready")
    front.write_config()
    await front.check_config()
    lines = [line.strip() for line in front.config_path.read_text().splitlines()]
    assert all(line in lines for line in HASH_LINES[(balancer, strategy, key)]), lines
    assert "balance source" not in lines and "hash $remote_addr consistent;" not in lines


@needs("haproxy")
async def test_haproxy_bounds_loads_with_the_labs_balance_factor(short_dir: Path) -> None:
    front = front_class("haproxy")(lab_config("consistent-hash", balancer={"hash": {"balance_factor": 125}}), short_dir)
    front.servers = {"was-1": 8001}
    front.states = {"was-1": "ready"}
    front.write_config()
    await front.check_config()
    assert "    hash-balance-factor 125" in front.config_path.read_text().splitlines()


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (
            ["--balancer", "nginx", "--strategy", "consistent-hash", "--hash-balance-factor", "125"],
            "--hash-balance-factor",
        ),
        (
            ["--balancer", "haproxy", "--strategy", "sticky-cookie", "--sticky-mode", "balanced"],
            "--sticky-mode balanced",
        ),
        (["--balancer", "nginx", "--strategy", "sticky-cookie", "--sticky-mode", "balanced"], "--sticky-mode balanced"),
    ],
)
def test_a_setting_the_balancer_lacks_is_refused_not_ignored(
    argv: list[str], refused: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", *argv, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert refused in err and "cannot run this lab" in err and "--balancer lbsession" in err


async def test_the_matrix_does_not_run_what_a_balancer_lacks_and_judges_no_claim_by_it() -> None:
    scenario = load_scenario(find_scenario("b07-bounded-hash-nat-125"))
    reports, _ = await run_matrix([scenario], balancers=["nginx"])  # refused before any process starts
    (report,) = reports
    assert report.verdict == NO_CLAIM
    assert "nginx cannot run it: --hash-balance-factor" in report.notes[0]
    assert "B7" not in matrix_document(reports, 0.0, {})["claims"]


@needs("haproxy")
async def test_b7_through_haproxy_bounds_the_nat_by_its_own_hash_balance_factor(short_dir: Path) -> None:
    bounded = await through("haproxy", "b07-bounded-hash-nat-125", short_dir / "125")
    unbounded = await through("haproxy", "b07-bounded-hash-nat-off", short_dir / "off")
    # In flight per server from HAProxy's own `show stat` (scur): the factor spreads the NAT's users.
    assert bounded.metrics["spread_users"] > 0 and unbounded.metrics["spread_users"] == 0
    assert bounded.metrics["inflight_imbalance_p95"] < unbounded.metrics["inflight_imbalance_p95"]


@needs("haproxy")
def test_haproxy_config_carries_health_socket_and_scale_out_slots() -> None:
    text = printed_config("haproxy", lab_config("sticky-cookie"))
    assert "option httpchk GET /healthz" in text
    assert "default-server inter 200ms rise 1 fall 1" in text  # the lab's fast health settings
    assert "stats socket /run/lbsession/haproxy.sock mode 600 level admin" in text
    assert "option redispatch" in text
    for n in range(4, 9):
        assert f"server was-{n} 127.0.0.1:1 check cookie was-{n} disabled" in text


@needs("haproxy")
async def test_haproxy_checks_with_the_labs_method_path_host_and_statuses(short_dir: Path) -> None:
    from tests.integration.conftest import FAST_HEALTH

    health = {**FAST_HEALTH, "method": "HEAD", "path": "/ready", "host": "app.example", "expect": "200-299,404"}
    front = front_class("haproxy")(lab_config("round-robin", balancer={"health": health}), short_dir)
    front.servers = {"was-1": 8001}
    front.states = {"was-1": "ready"}
    front.write_config()
    await front.check_config()
    lines = [line.strip() for line in front.config_path.read_text().splitlines()]
    assert "option httpchk" in lines
    assert "http-check send meth HEAD uri /ready ver HTTP/1.1 hdr Host app.example" in lines
    assert "http-check expect status 200-299,404" in lines


async def dies_under_each_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An app server that passes its health check and closes on any other request without a byte of answer."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while b" /healthz " in (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0] + b" ":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    writer.close()


@needs("haproxy")
async def test_haproxy_resends_a_get_whose_server_died_under_it_elsewhere_and_never_a_post(short_dir: Path) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="answered")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    dying = await asyncio.start_server(dies_under_each_request, "127.0.0.1", 0)
    front = front_class("haproxy")(lab_config("round-robin"), short_dir)
    try:
        await front.start({"was-1": dying.sockets[0].getsockname()[1], "was-2": runner.addresses[0][1]})
        for server_id in front.servers:
            await front.wait_up(server_id)
        # A connection per request, so round-robin alternates and each first request reaches the dying server.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            gets = [(r.status, await r.text()) for r in [await http.get(front.url + "/cart") for _ in range(4)]]
            posts = [(await http.post(front.url + "/cart", data=b"item")).status for _ in range(4)]
    finally:
        await front.stop()
        dying.close()
        await runner.cleanup()
    assert gets == [(200, "answered")] * 4  # retried on was-2 (retry-on empty-response + option redispatch)
    assert posts.count(502) == 2 and posts.count(200) == 2  # not resent: it may have been acted on


@needs("nginx")
def test_nginx_config_has_passive_checks_and_says_it_has_no_sticky_cookie() -> None:
    text = printed_config("nginx", lab_config("sticky-cookie"))
    assert "max_fails=1 fail_timeout=1s" in text
    assert "no sticky cookie" in text and "1.29.6" in text


@pytest.mark.parametrize("balancer", REAL)
def test_print_config_prints_what_the_lab_would_write(balancer: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--balancer", balancer, "--print-config", "--strategy", "ip-hash"]) == 0
    assert ("balance source" if balancer == "haproxy" else "ip_hash;") in capsys.readouterr().out


def test_print_config_needs_a_real_balancer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--print-config"]) == 2
    assert "add --balancer haproxy or nginx" in capsys.readouterr().err


def test_a_missing_binary_is_one_line_naming_the_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)  # sbin too: a machine without it
    assert main(["run", "--balancer", "haproxy", "--port", "0", "--admin-port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --balancer haproxy: haproxy is not installed; apt-get install haproxy"]


async def _servers_answering(lab: Topology, requests: int = 24) -> set[str]:
    """Who answers `requests` fresh clients through the balancer (no cookie: each one is a new user)."""
    url = lab.ready_info()["lb"] + "/healthz"
    async with aiohttp.ClientSession() as http:
        answers = [await http.get(url) for _ in range(requests)]
    return {str(a.headers.get("X-Served-By")) for a in answers}


async def _admin(lab: Topology, method: str, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.request(method, lab.admin_url + path, json={}) as response:
        assert response.status < 300, await response.text()
        body: dict[str, Any] = await response.json()
        return body


@needs("haproxy")
async def test_haproxy_runtime_add_drain_remove_through_its_socket(start_lab: Callable[..., Any]) -> None:
    lab = await start_lab("round-robin", in_front="haproxy")
    front = lab.front
    assert front is not None
    added = await _admin(lab, "POST", "/topology/servers")
    assert added["id"] == "was-4"
    assert await front.server_status("was-4") == "UP"  # the slot, given an address and a port, passed its check
    assert "was-4" in await _servers_answering(lab)
    await _admin(lab, "POST", "/servers/was-2/drain")
    await _admin(lab, "DELETE", "/servers/was-3")
    assert await front.server_status("was-2") == "DRAIN"
    assert await front.server_status("was-3") == "MAINT"
    assert await _servers_answering(lab) == {"was-1", "was-4"}  # round-robin: a drained server gets no new user
    status = await _admin(lab, "GET", "/status")
    assert [s["id"] for s in status["servers"]] == ["was-1", "was-2", "was-4"]
    assert status["servers"][2]["requests"] > 0  # HAProxy's own count, from `show stat`
    await _admin(lab, "POST", "/servers/was-4/kill")  # the lab's own fault, whatever the balancer
    await _admin(lab, "POST", "/servers/was-4/restart")  # returns once HAProxy's check counts it UP again
    assert await front.server_status("was-4") == "UP"


@needs("nginx")
async def test_nginx_add_drain_remove_by_rewritten_config_and_reload(start_lab: Callable[..., Any]) -> None:
    lab = await start_lab("round-robin", in_front="nginx")
    await _admin(lab, "POST", "/topology/servers")
    assert "was-4" in await _servers_answering(lab)
    await _admin(lab, "POST", "/servers/was-2/drain")
    await _admin(lab, "DELETE", "/servers/was-3")
    assert await _servers_answering(lab) == {"was-1", "was-4"}
    status = await _admin(lab, "GET", "/status")
    assert "cookie_names_server" in status["unseen"]  # what nginx cannot show, said rather than guessed
    async with aiohttp.ClientSession() as http, http.get(lab.admin_url + "/") as page:
        text = await page.text()
    assert "What nginx cannot show" in text and "<td>was-4</td><td>ready</td><td>not shown</td>" in text


@pytest.mark.parametrize("balancer", REAL)
async def test_real_balancer_stops_cleanly(balancer: str, start_lab: Callable[..., Any]) -> None:
    lab = await start_lab("round-robin", in_front=balancer)
    front = lab.front
    assert front is not None and front.process is not None and front.process.pid is not None
    pids = [front.process.pid, *getattr(front, "workers", list)()]
    await lab.stop()
    assert front.process.returncode is not None
    assert [pid for pid in pids if os.path.exists(f"/proc/{pid}")] == []  # no worker left behind either


async def through(balancer: str, claim: str, log_dir: Path) -> RunReport:
    """Run `claim`'s scenario through `balancer`, judged against that balancer's documented behaviour."""
    scenario = load_scenario(find_scenario(claim))
    report = await run_scenario(scenario, log_dir=log_dir, balancer=balancer)
    assert report.balancer == balancer
    assert report.verdict == PASS, (report.checks, report.notes, report.metrics)
    return report


@needs("haproxy")
@pytest.mark.parametrize("claim", ["C1", "C2", "C3", "C6"])
async def test_claims_through_haproxy_pass_as_through_lbsession(claim: str, short_dir: Path) -> None:
    report = await through("haproxy", claim, short_dir)
    m = report.metrics
    assert not [n for n in report.notes if n.startswith("expected difference")]  # the same verdicts as lbsession's
    if claim == "C1":
        assert m["relogin_users"] == m["users"]
    if claim == "C2":  # HAProxy's cookie is the server id in clear: LBSERVER=was-2
        assert report.sample_cookie in {"was-1", "was-2", "was-3"} and m["cookie_names_server"] == 1
    if claim in ("C2", "C3"):
        assert m["relogins"] == 0
    if claim == "C6":  # HAProxy's active check took was-1 out, option redispatch re-pinned its users
        assert m["victim_relogin_share"] == 1 and m["bystander_relogins"] == 0 and m["errors_5xx"] == 0


@needs("nginx")
async def test_c1_through_nginx_is_the_bug_too(short_dir: Path) -> None:
    m = (await through("nginx", "C1", short_dir)).metrics
    assert m["relogins"] > 0 and m["relogin_users"] == m["users"]


@needs("nginx")
async def test_c3_through_nginx_puts_a_whole_slash24_on_one_server(short_dir: Path) -> None:
    report = await through("nginx", "C3", short_dir)
    assert report.metrics["relogins"] == 0
    assert report.metrics["hottest_share"] == 1  # ip_hash: 127.0.0.2..13 share their first three octets
    assert any("first three octets" in note for note in report.notes)


@needs("haproxy")
async def test_a_counter_haproxy_lacks_is_not_applicable_rather_than_failed(short_dir: Path) -> None:
    report = await through("haproxy", "C12", short_dir)
    unseen = {c.expectation.metric: c.not_applicable for c in report.checks if c.not_applicable}
    assert set(unseen) == {"tamper_detected_share"}
    assert "HAProxy counts no forged cookie" in str(unseen["tamper_detected_share"])
    assert report.metrics["tampered"] > 0 and report.metrics["relogins"] > 0  # a forged cookie is obeyed


@needs("haproxy")
async def test_matrix_rows_say_whether_a_real_balancer_agrees_with_lbsession(short_dir: Path) -> None:
    scenario = load_scenario(find_scenario("C1")).with_overrides(duration_s=1.0)
    reports, _ = await run_matrix([scenario], balancers=["lbsession", "haproxy"])
    assert [(r.balancer, r.verdict, r.agrees) for r in reports] == [("lbsession", PASS, None), ("haproxy", PASS, "yes")]
    assert reports[1].as_dict()["topology"]["balancer"] == "haproxy"
    assert NO_CLAIM not in {r.verdict for r in reports}


def test_a_real_balancer_goes_with_a_lab_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenario", "C1", "--balancer", "haproxy", "--target", "http://127.0.0.1:9"]) == 2
    assert "--balancer starts a lab of its own" in capsys.readouterr().err


@needs("nginx")
def test_scenario_command_through_nginx(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenario", "C3", "--balancer", "nginx", "--duration", "1"]) == 0
    out = capsys.readouterr().out
    assert "ip-hash + local through nginx" in out and "expected difference" in out
