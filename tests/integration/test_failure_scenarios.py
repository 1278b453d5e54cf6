"""The F family (issue 14): failures as production has them, each scenario file run as shipped."""

from __future__ import annotations

import pytest

from lbsession.lab.report import PASS, RunReport
from lbsession.lab.runner import run_scenario
from lbsession.lab.scenario import find_scenario, load_scenario

pytestmark = pytest.mark.integration


async def measure(claim: str, tmp_path) -> RunReport:
    """Run the scenario of `claim` at its own length (its link faults are timed against it)."""
    scenario = load_scenario(find_scenario(claim))
    report = await run_scenario(scenario, log_dir=tmp_path / "lab")
    assert report.verdict == PASS, (report.checks, report.metrics, [f.error for f in report.faults])
    return report


async def test_f3_a_primary_restarted_empty_while_primary_loses_every_session(tmp_path):
    m = (await measure("F3", tmp_path)).metrics
    assert m["relogin_users"] == m["users"]


async def test_f4_a_slow_store_adds_its_delay_once_per_read_then_503s_and_never_a_logout(tmp_path):
    m = (await measure("F4", tmp_path)).metrics
    assert 50 <= m["p50_ms"] < 100  # +50 ms once: a read is one store call
    assert m["errors_5xx"] > 0 and m["relogins"] == 0


async def test_f6_a_drained_rolling_deploy_with_redis_costs_nothing(tmp_path):
    m = (await measure("F6", tmp_path)).metrics
    assert m["reconfigured_servers"] == 3 and m["relogins"] == 0 and m["errors_5xx"] == 0


async def test_f7_a_slow_server_under_round_robin_slows_everyone_s_tail(tmp_path):
    m = (await measure("F7", tmp_path)).metrics
    assert m["p99_ms"] >= 200 > m["p50_ms"]


async def test_f5_a_split_cluster_loses_cart_writes_but_no_session_whole(tmp_path):
    m = (await measure("F5", tmp_path)).metrics
    assert m["lost_updates"] > 0 and m["relogins"] == 0


async def test_f1_writes_to_an_isolated_old_primary_vanish_when_it_is_demoted(tmp_path):
    m = (await measure("F1", tmp_path)).metrics
    assert m["lost_updates"] > 0


async def test_f2_min_replicas_to_write_turns_most_lost_writes_into_503s(tmp_path):
    m = (await measure("F2", tmp_path)).metrics
    assert m["lost_updates"] > 0 and m["errors_5xx"] > 0 and m["relogins"] == 0


async def test_waiting_for_every_replica_loses_no_acknowledged_write_in_the_split_brain(tmp_path):
    m = (await measure("wait-zero-loss", tmp_path)).metrics
    assert m["lost_updates"] == 0 and m["errors_5xx"] > 0
