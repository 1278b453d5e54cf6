"""`lbsession bench` end to end, small: real upstreams, a real lbsession and (when installed) a real HAProxy."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from lbsession.balancer.compiled import build
from lbsession.lab.bench import BenchParams, run_bench
from lbsession.lab.process import HOST

pytestmark = pytest.mark.integration


def _installed(name: str) -> bool:
    return (shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")) is not None


async def test_sticky_cookie_is_measured_inserted_and_present_on_both_balancers():
    params = BenchParams(requests=300, connections=4, servers=3, strategy="sticky-cookie", tool="builtin")
    report = await run_bench(params)
    assert [c.case for c in report.cases] == ["sticky-cookie insert", "sticky-cookie present"]
    balancers = ["lbsession", "haproxy"] if _installed("haproxy") else ["lbsession"]
    expected = [f"{b} {case}" for case in ("sticky-cookie insert", "sticky-cookie present") for b in balancers]
    assert [f.target for f in report.figures][1:] == expected
    for case in report.cases:
        assert (case.lbsession.load.requests, case.lbsession.load.errors) == (300, 0)
        if case.haproxy is not None:
            assert (case.haproxy.load.requests, case.haproxy.load.errors) == (300, 0)
            assert case.p99_ratio is not None and case.rps_ratio is not None  # CPU: few ticks in 300 requests
    assert HOST == "127.0.0.1"  # loopback only


async def test_a_body_size_is_served_by_nginx_through_the_balancer():
    if not _installed("nginx"):
        pytest.skip("nginx is not installed (apt-get install nginx)")
    params = BenchParams(requests=200, connections=4, strategy="round-robin", tool="builtin", haproxy="no")
    report = await run_bench(dataclasses.replace(params, body_bytes=65536))
    assert report.upstream == "nginx" and [c.case for c in report.cases] == ["round-robin"]
    assert (report.cases[0].lbsession.load.requests, report.cases[0].lbsession.load.errors) == (200, 0)
    assert report.cases[0].haproxy is None and report.cases[0].haproxy_config == "HAProxy not run"


async def test_the_bench_says_which_build_of_lbsession_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    params = BenchParams(requests=100, connections=2, strategy="round-robin", tool="builtin", haproxy="no")
    assert (await run_bench(params)).build == build().description  # the child's /status, as this process chose
    monkeypatch.setenv("LBSESSION_PURE", "1")
    assert (await run_bench(params)).build == "pure Python (LBSESSION_PURE=1)"
