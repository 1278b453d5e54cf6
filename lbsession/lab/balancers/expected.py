"""What a real balancer is documented to do differently from lbsession's own, scenario by scenario.

A scenario's expectations are written for lbsession's balancer. Run through
HAProxy or nginx, each is judged against that balancer's own documented
behaviour: where it differs, the expectation is replaced by what it does, and
the run says why. So an expected difference is a PASS with its explanation;
only a balancer failing its own expectations is a FAIL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from lbsession.appserver.stores import store_class
from lbsession.lab.scenario import Expectation, Scenario

RELOGIN_METRICS = ("relogins", "relogin_users", "relogins_before_fault")
# Who logs in again after a fault, once every user re-logs in at random anyway: no longer a prediction.
UNDETERMINED_BY_SESSION_HASH = ("bystander_relogins",)
NGINX_SLASH24 = (
    "nginx ip_hash hashes only the first three octets of an IPv4 address: every user in 127.0.0.0/24 "
    "lands on one server, as every client behind one /24 NAT would"
)
NGINX_SLASH24_MOVES = (
    NGINX_SLASH24 + "; a server added moves that /24 all at once (nginx's hash of 127.0.0 is 4040: the third "
    "server of three, then the first of four)"
)
NGINX_SESSION_HASH = (
    "nginx 1.22 open source has no sticky cookie; its usual substitute, hash $cookie_SESSION consistent, "
    "hashes the app's session id, which the app rotates at login: a user is sent elsewhere right after "
    "logging in, and asked to log in again"
)
NGINX_NO_COOKIE = "nginx sets no server cookie, so the users have none to forge"
HAPROXY_CLEAR_COOKIE = (
    "HAProxy's cookie is the server's name in clear, unsigned: a forged one is obeyed, so a tampering user "
    "is sent to the server it claimed and, with sessions in memory, asked to log in again"
)


@dataclass(frozen=True)
class Difference:
    """One documented difference: when it applies, the expectations it changes, and why."""

    balancer: str
    applies: Callable[[Scenario], bool]
    change: Callable[[Expectation], list[Expectation]]  # what replaces it: [e] keeps it, [] drops it
    why: str
    adds: tuple[Expectation, ...] = ()


def _one_slash24(scenario: Scenario) -> bool:
    population = scenario.population
    return scenario.topology.balancer.strategy == "ip-hash" and population.nat_users == 0 and population.users < 250


def _one_slash24_steady(scenario: Scenario) -> bool:
    return _one_slash24(scenario) and not any(f.action == "add-server" for f in scenario.faults)


def _one_slash24_scaled_out(scenario: Scenario) -> bool:
    return _one_slash24(scenario) and any(f.action == "add-server" for f in scenario.faults)


def _local_sessions(scenario: Scenario) -> bool:
    return not store_class(scenario.topology.app.backend).shared


def _session_hash(scenario: Scenario) -> bool:
    return scenario.topology.balancer.strategy == "sticky-cookie" and _local_sessions(scenario)


def _no_relogin_becomes_relogins(e: Expectation) -> list[Expectation]:
    if e.metric in UNDETERMINED_BY_SESSION_HASH:
        return []
    return [Expectation(e.metric, ">", 0) if e.metric in RELOGIN_METRICS and (e.op, e.value) == ("==", 0) else e]


def _tamper_goes_unseen(e: Expectation) -> list[Expectation]:
    return [Expectation("tampered", "==", 0) if e.metric == "tampered" else e]


def _keep(e: Expectation) -> list[Expectation]:
    return [e]


def _tampers(scenario: Scenario) -> bool:
    return scenario.population.tamper_users > 0 and scenario.topology.balancer.strategy == "sticky-cookie"


DIFFERENCES: tuple[Difference, ...] = (
    Difference("nginx", _one_slash24_steady, _keep, NGINX_SLASH24, adds=(Expectation("hottest_share", "==", 1),)),
    Difference(
        "nginx", _one_slash24_scaled_out, _keep, NGINX_SLASH24_MOVES, adds=(Expectation("moved_share", "==", 1),)
    ),
    Difference("nginx", _session_hash, _no_relogin_becomes_relogins, NGINX_SESSION_HASH),
    Difference("nginx", _tampers, _tamper_goes_unseen, NGINX_NO_COOKIE),
    Difference(
        "haproxy",
        lambda s: _tampers(s) and _local_sessions(s),
        _keep,
        HAPROXY_CLEAR_COOKIE,
        adds=(Expectation("relogins", ">", 0),),
    ),
)


def expected_for(balancer: str, scenario: Scenario) -> tuple[Scenario, list[str]]:
    """`scenario` with the expectations of `balancer`'s own behaviour, and the explanation of each change."""
    expect = list(scenario.expect)
    why: list[str] = []
    for difference in DIFFERENCES:
        if difference.balancer != balancer or not difference.applies(scenario):
            continue
        changed = [replacement for e in expect for replacement in difference.change(e)]
        added = [e for e in difference.adds if e not in changed]
        if changed != expect or added:
            expect = changed + added
            why.append(f"expected difference: {difference.why}")
    return dataclasses.replace(scenario, expect=tuple(expect)), why
