"""`lbsession bench`'s pure parts, and its built-in load generator against a real in-process server.

No child process is started here: wrk's output is parsed from captured text,
/proc/<pid>/stat from a written line, the configs are checked as text.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from lbsession.errors import ConfigError
from lbsession.lab.bench import (
    CASES,
    CPU_RATIO_TARGET,
    P99_RATIO_TARGET,
    BenchParams,
    Figures,
    LoadResult,
    cases_for,
    compare,
    cpu_us_per_request,
    generate_load,
    haproxy_config,
    latency_ms,
    nginx_config,
    parse_wrk,
    percentile_ms,
    plan_for,
    proc_stat_ticks,
)
from lbsession.lab.process import free_ports

WRK_MS = """\
Running 10s test @ http://127.0.0.1:50001/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.26ms  847.16us  17.77ms   76.03%
    Req/Sec    11.81k     1.04k   14.32k    76.00%
  Latency Distribution
     50%    4.26ms
     75%    4.74ms
     90%    5.19ms
     99%    5.90ms
  117580 requests in 10.01s, 14.13MB read
Requests/sec:  11750.98
Transfer/sec:      1.41MB
"""

WRK_US_WITH_ERRORS = """\
Running 5s test @ http://127.0.0.1:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   120.00us   40.00us   2.00ms   90.00%
    Req/Sec   200.00k     5.00k  210.00k    80.00%
  Latency Distribution
     50%  110.00us
     75%  130.00us
     90%  160.00us
     99%  410.00us
  1000000 requests in 5.00s, 150.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec: 200000.00
Transfer/sec:     30.00MB
"""

WRK_SECONDS = WRK_MS.replace("     50%    4.26ms", "     50%    1.05s").replace(
    "     99%    5.90ms", "     99%    2.00s"
)


def test_wrk_output_in_milliseconds() -> None:
    result = parse_wrk(WRK_MS)
    assert (result.requests, result.errors, result.duration_s, result.rps) == (117580, 0, 10.01, 11750.98)
    assert result.p50_ms == pytest.approx(4.26)
    assert result.p99_ms == pytest.approx(5.90)


def test_wrk_output_in_microseconds_counts_socket_errors_and_non_2xx() -> None:
    result = parse_wrk(WRK_US_WITH_ERRORS)
    assert (result.requests, result.rps, result.errors) == (1_000_000, 200000.0, 3 + 2 + 7)
    assert result.p50_ms == pytest.approx(0.110)
    assert result.p99_ms == pytest.approx(0.410)


def test_wrk_output_in_seconds() -> None:
    result = parse_wrk(WRK_SECONDS)
    assert result.p50_ms == pytest.approx(1050.0)
    assert result.p99_ms == pytest.approx(2000.0)


@pytest.mark.parametrize(("value", "unit", "ms"), [("850.00", "us", 0.85), ("1.20", "ms", 1.2), ("2.00", "m", 120000)])
def test_latency_units(value: str, unit: str, ms: float) -> None:
    assert latency_ms(value, unit) == pytest.approx(ms)


def test_wrk_output_without_latency_distribution_is_refused() -> None:
    without = "\n".join(line for line in WRK_MS.splitlines() if "%" not in line or "Latency " in line)
    with pytest.raises(ValueError, match="wrk --latency"):
        parse_wrk(without)


def test_cpu_per_request_is_cpu_time_over_requests() -> None:
    assert cpu_us_per_request(10.0, 11.5, 100_000) == pytest.approx(15.0)
    with pytest.raises(ValueError, match="no request"):
        cpu_us_per_request(1.0, 2.0, 0)


def test_proc_stat_ticks_adds_utime_and_stime_past_an_awkward_command_name() -> None:
    fields_after_name = ["S", "1", "2", "3", "0", "-1", "4194560", "100", "0", "0", "0", "250", "37"]
    stat = "4242 (odd ) name (x)) " + " ".join(fields_after_name + ["0"] * 38)
    assert proc_stat_ticks(stat) == 250 + 37


def test_proc_stat_ticks_of_this_process_is_a_count() -> None:
    assert proc_stat_ticks(Path("/proc/self/stat").read_text()) >= 0


def test_percentile_is_nearest_rank() -> None:
    latencies_s = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert (percentile_ms(latencies_s, 50), percentile_ms(latencies_s, 99)) == (50.0, 99.0)
    assert percentile_ms([], 99) == 0.0


def test_nginx_config_is_one_quiet_process_with_one_server_per_port(tmp_path: Path) -> None:
    text = nginx_config([8001, 8002, 8003], tmp_path)
    for directive in ("daemon off;", "master_process off;", "worker_processes 1;", "access_log off;", "events {}"):
        assert directive in text
    assert f"pid {tmp_path}/nginx.pid;" in text
    assert f"error_log {tmp_path}/error.log;" in text
    assert text.count("server {") == 3
    assert 'listen 127.0.0.1:8002; location / { return 200 "ok\\n"; }' in text
    assert text.count("{") == text.count("}")


def test_haproxy_config_balances_round_robin_over_every_upstream_with_one_thread() -> None:
    text = haproxy_config(9000, [8001, 8002])
    lines = [line.strip() for line in text.splitlines()]
    for line in ("nbthread 1", "mode http", "option http-keep-alive", "balance roundrobin", "bind 127.0.0.1:9000"):
        assert line in lines
    assert {"timeout connect 2s", "timeout client 30s", "timeout server 30s"} <= set(lines)
    assert [ln for ln in lines if ln.startswith("server ")] == ["server u1 127.0.0.1:8001", "server u2 127.0.0.1:8002"]
    assert not any(ln.startswith("log") for ln in lines)


def _figures(target: str, cpu_us: float, rps: float, p99_ms: float = 0.2) -> Figures:
    return Figures(target, LoadResult(1000, 0, 1.0, rps, 0.1, p99_ms), cpu_us, 4.0)


def test_report_ratio_and_verdict() -> None:
    report = compare("round-robin", _figures("lbsession", 12.0, 50_000), _figures("haproxy", 10.0, 100_000)).as_dict()
    assert (report["cpu_ratio"], report["rps_ratio"], report["cpu_target_met"]) == (1.2, 0.5, True)
    report = compare("round-robin", _figures("lbsession", 28.0, 30_000), _figures("haproxy", 10.0, 100_000)).as_dict()
    assert report["cpu_ratio"] > CPU_RATIO_TARGET and report["cpu_target_met"] is False


def test_report_judges_p99_against_its_own_target() -> None:
    fast, slow = _figures("lbsession", 12.0, 50_000, p99_ms=0.29), _figures("lbsession", 12.0, 50_000, p99_ms=0.31)
    haproxy = _figures("haproxy", 10.0, 100_000, p99_ms=0.2)
    assert compare("c", fast, haproxy).p99_target_met is True  # 1.45x
    assert compare("c", slow, haproxy).p99_target_met is False  # 1.55x
    assert P99_RATIO_TARGET == 1.5


def test_report_without_haproxy_has_no_ratio() -> None:
    assert "cpu_ratio" not in compare("round-robin", _figures("lbsession", 12.0, 50_000), None).as_dict()


def test_every_strategy_has_a_case_and_sticky_cookie_two() -> None:
    from lbsession.balancer.strategies import STRATEGY_NAMES

    assert [c.name for c in cases_for("all")] == [c.name for c in CASES]
    assert {c.strategy for c in CASES} == set(STRATEGY_NAMES)
    assert [(c.name, c.pinned) for c in cases_for("sticky-cookie")] == [
        ("sticky-cookie insert", False),
        ("sticky-cookie present", True),
    ]
    assert cases_for("ip-hash")[0].haproxy == ("balance source", "hash-type map-based")
    assert cases_for("no-such-strategy")[0].haproxy is None  # a plug-in without an equivalent: lbsession alone


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_haproxy_equivalent_is_a_config_haproxy_accepts(case, tmp_path: Path) -> None:
    import shutil
    import subprocess

    haproxy = shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin:/sbin") or shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    assert case.haproxy is not None
    text = haproxy_config(9000, [8001, 8002], case.haproxy, cookie=case.cookie)
    for line in case.haproxy:
        assert f"    {line}\n" in text
    assert ("server u2 127.0.0.1:8002 cookie u2" in text) is case.cookie
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(text)
    checked = subprocess.run([haproxy, "-c", "-f", str(conf)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _bench_args(**changes: object) -> BenchParams:
    defaults = {"requests": 200, "connections": 5, "servers": 3, "duration_s": 5, "tool": "builtin", "haproxy": "no"}
    return BenchParams(**{**defaults, **changes})  # type: ignore[arg-type]


def test_plan_refuses_a_non_positive_count() -> None:
    with pytest.raises(ConfigError, match="--connections: 0 must be greater than 0"):
        plan_for(_bench_args(connections=0))


def test_plan_builtin_needs_no_wrk_nor_haproxy() -> None:
    plan, haproxy = plan_for(_bench_args())
    assert (plan.wrk, haproxy, plan.requests) == (None, None, 200)


# --------------------------------------------------------------------------- the built-in generator, for real


@pytest.fixture
async def ok_server() -> AsyncIterator[int]:
    """An in-process aiohttp server answering 200 on `/` and 404 elsewhere; yields its port."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_builtin_generator_sends_exactly_the_requests_asked(ok_server: int) -> None:
    result = await generate_load(ok_server, "/", connections=5, requests=200, deadline_s=30.0)
    assert (result.requests, result.errors) == (200, 0)
    assert result.rps > 0 and 0 < result.p50_ms <= result.p99_ms


async def test_builtin_generator_counts_non_2xx_as_errors(ok_server: int) -> None:
    result = await generate_load(ok_server, "/missing", connections=2, requests=20, deadline_s=30.0)
    assert (result.requests, result.errors) == (20, 20)


async def test_builtin_generator_against_nothing_stops_with_errors() -> None:
    (port,) = free_ports(1)
    result = await generate_load(port, "/", connections=2, requests=10, deadline_s=30.0)
    assert (result.requests, result.errors, result.rps) == (0, 10, 0.0)
    assert not math.isnan(result.p99_ms)


def test_nginx_serves_a_body_file_and_holds_the_connections_asked(tmp_path: Path) -> None:
    body = tmp_path / "www" / "body"
    text = nginx_config([8001], tmp_path, body_file=body, connections=2612)
    assert f"location / {{ root {tmp_path}/www; try_files /body =404; }}" in text
    assert "events { worker_connections 2612; }" in text and "return 200" not in text
    assert text.count("{") == text.count("}")


def test_haproxy_maxconn_follows_the_run() -> None:
    assert "    maxconn 10064\n" in haproxy_config(9000, [8001], maxconn=10064)


def test_plan_refuses_more_connections_than_the_file_limit_allows() -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    with pytest.raises(ConfigError, match=f"--connections: {hard} needs about .* hard limit of {hard}"):
        plan_for(_bench_args(connections=hard))
    with pytest.raises(ConfigError, match="--body-bytes: -1 must be 0 or more"):
        plan_for(_bench_args(body_bytes=-1))
