"""A real balancer's run is judged against its own documented behaviour: the expectations it changes, and why."""

from __future__ import annotations

from lbsession.lab.balancers.expected import expected_for
from lbsession.lab.scenario import Expectation, find_scenario, load_scenario


def _expect(balancer: str, claim: str) -> tuple[set[str], list[str]]:
    scenario, why = expected_for(balancer, load_scenario(find_scenario(claim)))
    return {str(e) for e in scenario.expect}, why


def test_lbsession_and_agreeing_balancers_keep_the_file_s_expectations() -> None:
    scenario = load_scenario(find_scenario("C2"))
    assert expected_for("lbsession", scenario) == (scenario, [])
    assert expected_for("haproxy", scenario) == (scenario, [])


def test_nginx_session_hash_expects_re_logins_where_a_sticky_cookie_has_none() -> None:
    expect, why = _expect("nginx", "C2")
    assert "relogins > 0" in expect and "relogins == 0" not in expect
    assert len(why) == 1 and "rotates at login" in why[0]
    expect, _ = _expect("nginx", "C6")
    assert "relogins_before_fault > 0" in expect
    assert not any(e.startswith("bystander_relogins") for e in expect)  # no longer a prediction


def test_nginx_ip_hash_puts_one_slash24_on_one_server_and_moves_it_whole() -> None:
    expect, why = _expect("nginx", "C3")
    assert "hottest_share == 1" in expect and "first three octets" in why[0]
    expect, _ = _expect("nginx", "B1")
    assert "moved_share == 1" in expect
    expect, why = _expect("nginx", "C5")  # two /24s (the NAT's is apart): no prediction of one server
    assert why == []


def test_haproxy_obeys_a_forged_cookie() -> None:
    expect, why = _expect("haproxy", "C12")
    assert str(Expectation("relogins", ">", 0)) in expect and "unsigned" in why[0]
    expect, why = _expect("nginx", "C12")
    assert "tampered == 0" in expect and "no server cookie" in why[-1]
