"""The measurements and reports of a run, computed from hand-made records."""

from __future__ import annotations

import jsonschema
import pytest

from lbsession.lab.matrix import failed_run, matrix_document, matrix_schema
from lbsession.lab.measures import (
    METRICS,
    AppliedFault,
    RunData,
    UserOutcome,
    compute_metrics,
    longest_stall,
    named_users,
)
from lbsession.lab.report import FAIL, PASS, ProgressBar, RunReport, format_matrix, format_run, to_markdown
from lbsession.lab.scenario import Expectation, Scenario
from lbsession.lab.users import Record

SCHEMA = matrix_schema()


def rec(user: int, t: float, status: int, server: str | None, *, action: str = "me", relogin: bool = False,
        latency: float = 0.002) -> Record:  # fmt: skip
    return Record(user, action, t, latency, status, server, relogin)


def data(records: list[Record], users: int = 2, faults: list[AppliedFault] | None = None, **kwargs) -> RunData:
    outcomes = [UserOutcome(i, relogins=sum(r.relogin for r in records if r.user == i)) for i in range(users)]
    return RunData(records, outcomes, faults or [], ["was-1", "was-2", "was-3"], kwargs.get("routes", {}),
                   kwargs.get("before"), kwargs.get("after"))  # fmt: skip


def kill(at: float, server: str = "was-1") -> AppliedFault:
    return AppliedFault(at, "kill-server", server, f"kill-server {server}", applied_s=at)


def test_relogins_users_and_errors_are_counted():
    records = [
        rec(0, 0.0, 200, "was-1", action="login"),
        rec(0, 0.1, 401, "was-2", relogin=True),
        rec(0, 0.2, 200, "was-3", action="login"),
        rec(1, 0.0, 200, "was-1", action="login"),
        rec(1, 0.1, 503, "was-2"),
        rec(1, 0.2, 0, None),
    ]
    m = compute_metrics(data(records))
    assert list(m) == list(METRICS)  # every metric, in the documented order
    assert (m["requests"], m["logins"], m["relogins"], m["relogin_users"]) == (6, 3, 1, 1)
    assert (m["relogin_user_share"], m["errors_5xx"], m["errors_network"]) == (0.5, 1, 1)
    assert m["victim_users"] is None and m["moved_share"] is None  # no fault, nothing to say


def test_balance_counts_an_idle_server_as_part_of_the_imbalance():
    records = [rec(0, i / 10, 200, "was-1") for i in range(6)] + [rec(1, i / 10, 200, "was-2") for i in range(3)]
    m = compute_metrics(data(records))
    assert m["imbalance"] == pytest.approx(6 / 3)  # mean over was-1, was-2 and the idle was-3
    assert m["hottest_share"] == pytest.approx(6 / 9, abs=1e-3)
    assert m["cv"] == pytest.approx(0.816, abs=1e-3)


def test_in_flight_imbalance_is_the_busiest_over_the_mean_in_samples_with_a_request_per_server():
    samples = [
        {"was-1": 1, "was-2": 0, "was-3": 0},  # one request in an idle lab: not a sample of load
        {"was-1": 6, "was-2": 3, "was-3": 3},  # 6 / 4
        {"was-1": 4, "was-2": 4, "was-3": 4},  # 1
        {"was-1": 9, "was-2": 0, "was-3": 0},  # 3
    ]
    records = [rec(0, 0.0, 200, "was-1")]
    m = compute_metrics(RunData(records, [UserOutcome(0)], [], ["was-1", "was-2", "was-3"], {}, None, None, samples))
    assert (m["inflight_imbalance_max"], m["inflight_imbalance_p95"]) == (3.0, 3.0)
    m = compute_metrics(RunData(records, [UserOutcome(0)], [], ["was-1"], {}, None, None, samples[:3]))
    assert m["inflight_imbalance_max"] == 1.5
    assert compute_metrics(data(records))["inflight_imbalance_max"] is None  # nothing sampled


def test_the_balancers_audit_of_its_decisions_is_read_as_deltas_and_its_worst_ratio_never_rounds_up():
    from lbsession.lab.drive import strategy_counters_delta

    def status(decisions: int, violations: int | None, worst: float | None, strategy="consistent-hash") -> dict:
        counters = {"decisions": decisions, "bound_violations": violations, "bound_fallbacks": violations,
                    "decision_imbalance_max": worst}  # fmt: skip
        return {"strategy": strategy, "strategy_counters": counters}

    counters, notes = strategy_counters_delta(status(0, 0, None), status(500, 0, 37 / 29.7))  # 1.24579...
    assert (counters, notes) == ({**status(500, 0, 37 / 29.7)["strategy_counters"]}, [])
    records = [rec(0, 0.0, 200, "was-1")]
    m = compute_metrics(RunData(records, [UserOutcome(0)], [], ["was-1"], {}, None, None, strategy_counters=counters))
    assert (m["bound_violations"], m["bound_fallbacks"], m["decision_imbalance_max"]) == (0, 0, 1.245)
    m = compute_metrics(RunData(records, [UserOutcome(0)], [], ["was-1"], {}, None, None,
                                strategy_counters={"decision_imbalance_max": 1.2499999}))  # fmt: skip
    assert m["decision_imbalance_max"] == 1.249  # "< 1.25" must still hold once rounded
    # A lab that served traffic before the run: counts are deltas, the worst ratio says it covers both.
    counters, notes = strategy_counters_delta(status(40, 1, 1.2), status(140, 3, 1.2))
    assert (counters["decisions"], counters["bound_violations"], counters["bound_fallbacks"]) == (100, 2, 2)
    assert notes == ["decision_imbalance_max includes the 40 routing decisions made before this run"]
    # The strategy built again during the run (a reload, a switch): its counts began again.
    assert strategy_counters_delta(status(40, 1, 1.2), status(10, 0, 1.1))[0]["decisions"] == 10
    assert strategy_counters_delta(status(40, 1, 1.2, "round-robin"), status(50, 0, 1.1))[0]["decisions"] == 50
    # Without a factor there is no bound; a strategy that counts nothing gives nothing.
    assert strategy_counters_delta(status(0, None, None), status(9, None, 2.4))[0]["bound_violations"] is None
    assert strategy_counters_delta({"strategy": "round-robin"}, {"strategy_counters": {}}) == (None, [])
    assert compute_metrics(data(records))["decision_imbalance_max"] is None


def test_rehashed_share_and_users_spread_over_servers():
    records = [rec(0, 0.0, 200, "was-1"), rec(0, 0.1, 200, "was-2"), rec(1, 0.0, 200, "was-3")]
    records.append(rec(1, 0.2, 503, "was-1"))  # an error page from another server is not a move
    m = compute_metrics(data(records, routes={"pinned": 3, "rehashed": 1}))
    assert (m["spread_users"], m["rehashed_share"]) == (1, 0.25)


def test_session_cookie_effects_sizes_lost_prefs_replays_and_forgeries():
    records = [rec(0, 0.0, 200, "was-1"), rec(0, 0.1, 413, "was-2"), rec(1, 0.0, 200, "was-1")]
    records[0].session_bytes, records[1].session_bytes = 4000, 3000
    users = [
        UserOutcome(0, prefs_acked=4, prefs_seen=3, replayed=True, replays_accepted=5, replay_window_s=0.8),
        UserOutcome(1, prefs_acked=2, prefs_seen=2, forged_answers={401: 2, 200: 1}),
    ]
    m = compute_metrics(RunData(records, users, [], ["was-1", "was-2"], {}, None, None, [], {"forged": 2}))
    assert (m["prefs_writes"], m["lost_prefs"], m["too_large"]) == (6, 1, 1)
    assert (m["session_cookie_bytes_max"], m["session_bytes_per_request"]) == (4000, round(7000 / 3, 1))
    assert (m["replay_users"], m["replays_accepted"], m["replays_refused"], m["replay_window_s"]) == (1, 5, 0, 0.8)
    assert (m["session_forgeries"], m["forged_anonymous"], m["forged_accepted"], m["forged_errors"]) == (3, 2, 1, 0)
    assert m["forged_sessions"] == 2
    quiet = compute_metrics(data(records))
    assert quiet["replays_accepted"] is None and quiet["forged_sessions"] is None and quiet["lost_prefs"] is None


def test_the_longest_stall_runs_from_the_first_failure_to_the_next_good_answer():
    records = [
        rec(0, 1.0, 200, "was-1", latency=0.01),
        rec(0, 1.1, 503, "was-1", latency=0.5),
        rec(0, 1.7, 0, None, latency=0.2),
        rec(0, 2.0, 200, "was-2", latency=0.3),  # good again at 2.3: 1.2 s after the failures began
        rec(1, 1.0, 200, "was-2", latency=0.9),  # one slow request
    ]
    assert longest_stall(records) == pytest.approx(1.2)
    assert longest_stall([]) is None


def test_victims_of_a_killed_server_and_bystanders():
    records = [
        rec(0, 0.5, 200, "was-1"),  # user 0 is on was-1: a victim
        rec(1, 0.5, 200, "was-2"),  # user 1 is not
        rec(2, 0.5, 200, "was-1"),  # user 2 is a victim that is never asked again
        rec(0, 1.5, 401, "was-2", relogin=True),
        rec(0, 1.6, 200, "was-2", action="login"),
        rec(1, 1.5, 401, "was-3", relogin=True),
        rec(2, 1.5, 200, "was-3"),
    ]
    m = compute_metrics(data(records, users=3, faults=[kill(1.0)]))
    assert (m["relogins_before_fault"], m["relogins_after_fault"]) == (0, 2)
    assert (m["victim_users"], m["victim_relogin_share"], m["bystander_relogins"]) == (2, 0.5, 1)
    assert m["moved_share"] == 1.0  # all three answered elsewhere at the end


def test_added_servers_cookies_carts_and_reconfiguration():
    added = AppliedFault(1.0, "add-server", None, "add-server", applied_s=1.0, result={"id": "was-4"})
    records = [rec(0, 0.5, 200, "was-1"), rec(0, 1.5, 401, "was-4", relogin=True), rec(1, 1.5, 200, "was-4")]
    run = data(records, faults=[added], routes={"forged-cookie": 2})
    run.users[0].tampered, run.users[1].tampered = 1, 1
    run.users[0].cookie_checks, run.users[0].cookie_matches = 4, 4
    run.users[1].cart_acked, run.users[1].cart_seen = 5, 3
    run.topology_before = {"servers": [{"id": "was-1", "pid": 10, "restarts": 0}]}
    run.topology_after = {"servers": [{"id": "was-1", "pid": 10, "restarts": 0}, {"id": "was-4", "pid": 11}]}
    m = compute_metrics(run)
    assert (m["requests_on_added"], m["relogins_on_added"]) == (2, 1)
    assert (m["tampered"], m["forged_cookies"], m["tamper_detected_share"], m["cookie_names_server"]) == (2, 2, 1, 1)
    assert (m["cart_writes"], m["lost_updates"]) == (5, 2)
    assert m["reconfigured_servers"] == 0


def test_the_last_seconds_share_of_added_and_returned_servers_and_relogins_after_the_last_fault():
    added = AppliedFault(1.0, "add-server", None, "add-server", applied_s=1.0, result={"id": "was-4"})
    back = AppliedFault(2.0, "restart-server", "was-1", "restart-server was-1", applied_s=2.0)
    records = [rec(0, 0.5, 200, "was-1"), rec(0, 2.5, 401, "was-4", relogin=True), rec(1, 2.6, 200, "was-1")]
    records += [rec(1, 2.2, 200, "was-2"), rec(1, 1.5, 401, "was-2", relogin=True)]
    m = compute_metrics(data(records, faults=[added, back]))
    assert (m["added_share_final"], m["returned_share_final"]) == (round(1 / 3, 3), round(1 / 3, 3))
    assert (m["relogins_after_fault"], m["relogins_after_last_fault"]) == (2, 1)


def test_a_slowed_servers_share_and_the_latency_of_the_users_pinned_to_it_against_the_others():
    slow = AppliedFault(0.0, "set-link", None, "set-link lb->was-2", applied_s=0.0, link="lb->was-2")
    records = [rec(0, 0.1 * i, 200, "was-2", latency=0.21) for i in range(3)]
    records += [rec(1, 0.1 * i, 200, "was-1", latency=0.004) for i in range(5)]
    records += [rec(2, 0.1, 200, "was-3", latency=0.002), rec(2, 0.2, 0, None, latency=5.0)]  # no answer: no latency
    run = data(records, users=3, faults=[slow])
    for user, server in zip(run.users, ["was-2", "was-1", "was-3"], strict=True):
        user.pinned_server = server
    m = compute_metrics(run)
    assert m["slowed_share"] == round(3 / 9, 3)  # of the answers: the request without one is not counted
    assert (m["slowed_users"], m["slowed_users_p50_ms"], m["other_users_p50_ms"]) == (1, 210.0, 4.0)
    for user in run.users:  # no sticky cookie: nobody is pinned, so no per-user figures
        user.pinned_server = None
    m = compute_metrics(run)
    assert m["slowed_share"] == round(3 / 9, 3) and m["slowed_users"] is m["slowed_users_p50_ms"] is None
    m = compute_metrics(data(records, users=3))  # no slowed link
    assert m["slowed_share"] is m["slowed_users"] is m["other_users_p50_ms"] is None


def test_the_users_who_lost_writes_or_logged_in_again_are_named_the_most_first_in_every_report():
    users = [UserOutcome(i, name=f"user-{i:03d}") for i in range(14)]
    for user in users[:12]:  # twelve lose writes: more than the text reports show
        user.cart_acked, user.cart_seen = 4, 3
    users[5].cart_seen, users[13].relogins, users[13].cart_seen = 1, 2, 0
    named = named_users(users)
    assert named["lost_updates"][0] == {"user": "user-005", "count": 3} and len(named["lost_updates"]) == 12
    assert named["relogins"] == [{"user": "user-013", "count": 2}]
    report = make_report()
    report.named_users = named
    text = format_run(report)
    assert "lost writes  user-005 (3), user-000 (1), user-001 (1)," in text and "user-009 (1) +2 more" in text
    assert "re-logged in user-013 (2)" in text
    assert "- c01-test: lost writes: user-005 (3)" in to_markdown([report], "runs")
    assert report.as_dict()["named_users"] == named
    jsonschema.validate(matrix_document([report], 1.0, {"seed": None, "users": None, "duration_s": None}), SCHEMA)


def make_report(verdict_metric: int = 3, *, claim: str = "C1") -> RunReport:
    scenario = Scenario(name="c01-test", claim=claim, title="a test", expect=(Expectation("relogins", ">", 0),))
    records = [rec(0, 0.1, 401, "was-2", relogin=verdict_metric > 0), rec(1, 0.1, 200, "was-1")]
    report = RunReport(scenario, "round-robin", "local", None, compute_metrics(data(records, faults=[kill(1.0)])),
                       {"was-1": 1, "was-2": 1, "was-3": 0}, {"new": 2}, [kill(1.0)], 0.4, 2.0, 3,
                       sample_cookie="was-1.abc")  # fmt: skip
    report.evaluate(scenario.expect)
    return report


def test_verdicts_tables_and_markdown():
    good, bad = make_report(), make_report(0, claim="C2")
    assert (good.verdict, bad.verdict) == (PASS, FAIL)
    text = format_run(good)
    assert "C1  c01-test  [PASS]" in text and "relogins > 0: 1" in text and "was-1.abc" in text
    table = format_matrix([good, bad])
    assert table.splitlines()[0].split()[:3] == ["claim", "scenario", "strategy"]
    assert "C2   FAIL  c01-test: relogins > 0: 0" in table
    markdown = to_markdown([good, bad], "lbsession matrix")
    assert (
        markdown.startswith("# lbsession matrix\n")
        and "| C1 | c01-test | a test | relogins > 0: 1 | PASS |" in markdown
    )


def test_a_run_shows_the_decisions_audit_only_when_the_strategy_keeps_one():
    report = make_report()
    assert "decisions" not in format_run(report)
    report.metrics.update(bound_violations=0, bound_fallbacks=0, decision_imbalance_max=1.245)
    assert "the worst 1.245   over their bound 0   every server full 0" in format_run(report)
    report.metrics.update(bound_violations=None, bound_fallbacks=None, decision_imbalance_max=2.8)
    assert "the worst 2.800   no bound\n" in format_run(report)
    report.metrics["decision_imbalance_max"] = 1.245
    report.evaluate((*report.scenario.expect, Expectation("decision_imbalance_max", "<", 1.25)))
    assert report.checks[-1].describe() == "decision_imbalance_max < 1.25: 1.245"  # not 1.25, which would fail it
    assert report.checks[0].describe() == "relogins > 0: 1"


def test_a_failed_fault_fails_the_run():
    report = make_report()
    report.faults[0].error = "POST /servers/was-1/kill answered 409: was-1 is not running"
    report.evaluate(report.scenario.expect)
    assert report.verdict == FAIL and "was-1 is not running" in report.notes[0]


def test_the_matrix_document_follows_its_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    documented = SCHEMA["$defs"]["run"]["properties"]["metrics"]["properties"]
    assert {name: d["description"] for name, d in documented.items()} == METRICS  # one vocabulary, one meaning
    error = failed_run(Scenario(name="broken", claim="C3"), "valkey-server not found")
    reports = [make_report(), make_report(0, claim="C2"), error, make_report(claim="F7"), make_report(claim="B13")]
    document = matrix_document(reports, 12.5, {"seed": 3})
    document["overrides"] = {"seed": 3, "users": None, "duration_s": None}
    jsonschema.validate(document, SCHEMA)
    claims = {"C1": PASS, "C2": FAIL, "C3": "ERROR", "F7": PASS, "B13": PASS}
    assert (document["verdict"], document["claims"]) == (FAIL, claims)
    for wrong in ("F0", "X1", "C13"):  # the claim ids of the scenario files, no other
        document["claims"] = {wrong: PASS}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(document, SCHEMA)


class FakeTerminal:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_the_progress_bar_draws_only_on_a_terminal_but_always_says_how_it_ended(tty):
    from lbsession.lab.report import Progress

    stream = FakeTerminal(tty)
    bar = ProgressBar(stream)  # type: ignore[arg-type]
    bar(Progress("C6 c06", 1.5, 3.0, 120, 4, 1))
    bar.finish("C6 PASS")
    assert ("[##############" in stream.text) is tty
    assert stream.text.endswith("C6 PASS\n")


def test_a_target_whose_strategy_settings_differ_is_noted() -> None:
    from lbsession.lab.drive import mismatch_notes
    from lbsession.lab.scenario import find_scenario, load_scenario

    scenario = load_scenario(find_scenario("b12-sticky-scale-out-balanced-redis"))
    assert mismatch_notes(scenario, "sticky-cookie", "redis", {"sticky_mode": "balanced"}) == []
    assert mismatch_notes(scenario, "sticky-cookie", "redis", {"sticky_mode": "persistent"}) == [
        "the target's sticky_mode is persistent; the scenario was written for balanced"
    ]
    assert mismatch_notes(scenario, "sticky-cookie", "redis") == []  # settings unknown: not compared


def test_a_partition_is_counted_in_the_table_and_listed_in_the_run():
    report = make_report()
    cut = "['sentinels->redis-1', 'was-2->redis-1', 'was-3->redis-1']"
    report.faults = [AppliedFault(1.0, "partition", None, f"partition split-brain {cut} for 6 s", applied_s=1.0)]
    assert report.fault_text == "partition split-brain (3 links) for 6 s@1s"
    assert "(3 links)" in format_matrix([report])
    assert f"partition split-brain {cut} for 6 s at 1 s" in format_run(report)


def test_a_long_timeline_is_clipped_in_the_table_only():
    report = make_report()
    report.faults = [kill(at / 10) for at in range(12)]
    fault_cell = format_matrix([report]).splitlines()[2].split("  ")
    assert any(cell.endswith("…") and len(cell) == 48 for cell in fault_cell)
    assert report.fault_text.count("kill-server") == 12
