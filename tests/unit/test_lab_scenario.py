"""Scenario files: every shipped one is valid, and every mistake is named with its file, key and choices."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from lbsession.appserver.stores import STORES
from lbsession.balancer.strategies import STRATEGIES
from lbsession.errors import ConfigError
from lbsession.lab.faults import fault_request
from lbsession.lab.matrix import CELL_CLAIMS, fault_theory, load_directory, matrix_plan, theory
from lbsession.lab.scenario import FAULT_ACTIONS, Expectation, Fault, LinkFaults, find_scenario, load_scenario
from lbsession.lab.users import NAT_ADDRESS, plan_population

SCENARIOS = Path(__file__).resolve().parents[2] / "configs" / "scenarios"
CLAIMS = [f"C{n}" for n in range(1, 13)]


def write(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    return info.value.problems


F_CLAIMS = ["F1", "F2", "F3", "F4", "F5", "F6", "F7"]  # failures as production has them (issue 14), so far


def test_every_claim_of_the_seed_has_exactly_one_scenario_file_labelled_with_it():
    scenarios = load_directory(SCENARIOS)
    by_claim = {s.claim: s for s in scenarios if s.claim}
    assert sorted(c for c in by_claim if c.startswith("C")) == sorted(CLAIMS)
    assert {f"B{n}" for n in range(1, 7)} <= set(by_claim)
    seed_files = [s for s in scenarios if s.claim and s.claim.startswith("C")]
    assert len(seed_files) == len(CLAIMS)  # one file per claim of the seed; beyond it, one per variant (B7)
    assert sorted(c for c in by_claim if c.startswith("F")) == sorted(F_CLAIMS)
    for scenario in scenarios:
        if scenario.claim:
            assert scenario.expect, f"{scenario.name} states no expected outcome"
            assert f"claim: {scenario.claim}\n" in Path(scenario.source).read_text()
            assert Path(scenario.source).name.startswith(scenario.claim[0].lower() + scenario.claim[1:].zfill(2))


def test_the_grid_claims_have_the_standard_population_so_the_grid_compares_like_with_like():
    scenarios = {s.name: s for s in load_directory(SCENARIOS)}
    standard = scenarios["standard"]
    for scenario in scenarios.values():
        if scenario.claim in CELL_CLAIMS:
            same = ("population", "steps", "duration_s", "seed", "faults")
            assert [getattr(scenario, k) for k in same] == [getattr(standard, k) for k in same], scenario.name


def test_the_matrix_plan_is_the_grid_then_every_other_claim():
    plan = matrix_plan(load_directory(SCENARIOS))
    size = len(STRATEGIES) * len(STORES)  # every registered strategy x every registered store
    grid, claims = plan[:size], plan[size:]
    cells = {(s.topology.balancer.strategy, s.topology.app.backend) for s in grid}
    assert len(cells) == size
    assert [s.claim for s in grid if s.claim] == ["C1", "C2", "C3"]
    first = [*CLAIMS[3:], "B1", "B2", "B3", "B4", "B5", "B6", "B6", "B6"]  # B6: one file, run per backend
    assert [s.claim for s in claims][: len(first)] == first
    beyond = [s.claim for s in claims[len(first) :] if s.claim]
    b_numbers = [int(c[1:]) for c in beyond if c.startswith("B")]
    assert b_numbers == sorted(b_numbers)  # B7, B7..., B8, ..., B13: by number, a claim's files together
    f_runs = [c for c in beyond if not c.startswith("B")]  # then the F family, after every B
    assert sorted(set(f_runs)) == F_CLAIMS and f_runs == sorted(f_runs, key=lambda c: int(c[1:]))
    assert beyond[-len(f_runs) :] == f_runs and f_runs.count("F6") > 1  # F6 and F7: one file per variant, as B7
    assert [s.claim for s in matrix_plan(load_directory(SCENARIOS), ["F"])] == f_runs  # --only F: one family
    assert matrix_plan(load_directory(SCENARIOS), ["C6", "grid-least-conn"])[0].name == "grid-least-conn-local"
    with pytest.raises(ConfigError, match="selects no run"):
        matrix_plan(load_directory(SCENARIOS), ["C99"])


@pytest.mark.parametrize(
    ("strategy", "backend", "relogins_expected"),
    [("round-robin", "local", True), ("least-conn", "local", True), ("ip-hash", "local", False),
     ("round-robin", "redis", False), ("least-conn", "cluster", False)],
)  # fmt: skip
def test_the_grid_theory(strategy, backend, relogins_expected):
    (expectation,) = theory(strategy, backend)
    assert expectation.check(5) is relogins_expected
    assert expectation.check(0) is not relogins_expected


def test_a_scenario_listing_backends_runs_once_on_each_judged_by_the_theory():
    b6 = load_scenario(find_scenario("B6"))
    runs = matrix_plan(load_directory(SCENARIOS), ["B6"])
    assert [r.topology.app.backend for r in runs] == list(b6.backends) == ["local", "redis", "cluster"]
    assert len({r.name for r in runs}) == 3
    for run in runs:
        judged = [e for e in run.expect if e.metric == "victim_relogin_share"]
        assert judged == [fault_theory(run.topology.app.backend)]
        assert {e.metric for e in run.expect} == {e.metric for e in b6.expect}  # the rest as the file says
    # The file, run alone on its own backend, expects what the theory does.
    assert fault_theory(b6.topology.app.backend) in b6.expect
    assert fault_theory("local").value == 1 and fault_theory("redis").value == 0 == fault_theory("cluster").value


def test_find_by_claim_id_does_not_confuse_c1_and_c10():
    assert find_scenario("C1").name.startswith("c01-")
    assert find_scenario("c10").name.startswith("c10-")
    assert find_scenario("b2").name.startswith("b02-")
    with pytest.raises(ConfigError, match="choose a file, a claim id") as info:
        find_scenario("C13")
    assert "c06-sticky-server-killed" in str(info.value)


def assert_reported(found: list[str], expected: list[str]) -> None:
    for start in expected:
        assert any(p.startswith(start) for p in found), (start, found)
    assert len(found) == len(expected), found


def test_every_mistake_is_reported_at_once_with_file_key_value_and_choices(tmp_path):
    path = write(
        tmp_path,
        """
claim: C13
topology: {balancer: {strategy: sticky}, app: {backend: local}}
population: {users: 4, nat_users: 9, colour: blue}
faults:
  - {at_s: 1, action: explode}
expect:
  relogin: "> 0"
  relogins: "about 3"
""",
    )
    label = str(path)
    assert_reported(
        problems(path),
        [
            f"{label}: topology.balancer.strategy: 'sticky' is not valid; choose one of: round-robin, least-conn, "
            "sticky-cookie, ip-hash, consistent-hash",
            f"{label}: population.colour: unknown setting; valid ones here are: addresses, forge_session_users,",
            f"{label}: population.nat_users: 9 must be between 0 and users (4)",
            f"{label}: faults[0].action: 'explode' is not valid; choose one of: kill-server, restart-server,",
            f"{label}: claim: 'C13' is not a claim id; use C1..C12",
            f"{label}: expect.relogin: unknown metric; choose one of: users, requests,",
            f"{label}: expect.relogins: 'about 3' is not a condition; write '<op> <number>' with op one of >=, <=,",
        ],
    )


def test_a_timeline_that_does_not_fit_its_topology_is_reported_whole(tmp_path):
    path = write(
        tmp_path,
        """
duration_s: 2
faults:
  - {at_s: 5, action: kill-server, server: was-7}
  - {at_s: 1, action: kill-redis-primary}
""",
    )
    label = str(path)
    assert_reported(
        problems(path),
        [
            f"{label}: faults[0].at_s: 5 is not before duration_s",
            f"{label}: faults[0].server: 'was-7' is not a server of this topology then; choose one of: was-1, was-2,"
            " was-3",
            f"{label}: faults[1].action: kill-redis-primary needs backend redis, and this topology's is local",
        ],
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a list", "a scenario must be a mapping"),
        ("claim: [unclosed", "not valid YAML at line 1"),
        ("faults: [{at_s: 1, action: set-strategy}]", "faults[0].strategy: is required for set-strategy; choose"),
        ("faults: [{at_s: 1, action: drain-server}]", "faults[0].server: is required for drain-server"),
        ("faults: [{at_s: 1, action: add-server, peer: was-2}]", "faults[0].peer: only cut-peer and heal-peer"),
        ("topology: {app: {backend: cluster}}\nfaults: [{at_s: 1, action: cut-peer, server: was-1, peer: was-4}]",
         "faults[0].peer: 'was-4' is not a server of this topology then"),
        ("population: {addresses: shared, nat_users: 2}", "population.nat_users: needs addresses: distinct"),
        ("steps: {reads: 0}", "steps.reads: a visit needs at least one read"),
        ("steps: {websocket: true, cart_writes: 1}", "steps.websocket: a WebSocket visit is reads only"),
        ("backends: [local, mongo]", "backends: 'mongo' is not valid; choose one of: local, redis, cluster"),
        ("backends: [local, redis]", "backends: the theory judges the victims of a server killed"),
        ("expect: [relogins]", "expect: must map metrics to conditions"),
    ],
)  # fmt: skip
def test_single_mistakes(tmp_path, text, message):
    assert any(message in p for p in problems(write(tmp_path, text))), problems(write(tmp_path, text))


def test_a_fault_may_name_a_server_that_an_earlier_fault_added(tmp_path):
    text = "faults: [{at_s: 0.5, action: add-server}, {at_s: 1, action: kill-server, server: was-4}]"
    assert [f.server for f in load_scenario(write(tmp_path, text)).faults] == [None, "was-4"]


def test_overrides_scale_the_timeline_and_are_validated():
    scenario = load_scenario(find_scenario("C6"))
    short = scenario.with_overrides(duration_s=1.25, users=6, seed=99)
    assert (short.duration_s, short.population.users, short.seed) == (1.25, 6, 99)
    assert short.faults[0].at_s == pytest.approx(scenario.faults[0].at_s / 2)
    assert short.population.ramp_s == pytest.approx(scenario.population.ramp_s / 2)
    nat = load_scenario(find_scenario("C5")).with_overrides(users=6)
    assert nat.population.nat_users == 4  # 8 of 12 -> 4 of 6: the same share behind the NAT
    with pytest.raises(ConfigError, match=r"\(with overrides\): population.users: 0 must be between 1 and 500"):
        scenario.with_overrides(users=0)


@pytest.mark.parametrize(
    ("condition", "measured", "passed"),
    [(">", 2, True), (">", 1, False), (">=", 1, True), ("<", 0, True), ("<=", 2, False), ("==", 1, True),
     ("!=", 1, False), ("==", None, False)],
)  # fmt: skip
def test_expectations(condition, measured, passed):
    expectation = Expectation("relogins", condition, 1)
    assert expectation.check(measured) is passed


def test_every_fault_action_maps_to_an_admin_api_call():
    link = {"link": "lb->was-2", "link_faults": LinkFaults(latency_ms=50), "partition": "p1", "cut": ("lb->was-2",)}
    routes = {action: fault_request(Fault(1.0, action, server="was-2", peer="was-3", strategy="ip-hash", **link))  # type: ignore[arg-type]
              for action in FAULT_ACTIONS}  # fmt: skip
    assert routes["kill-server"] == ("POST", "/servers/was-2/kill", {})
    assert routes["remove-server"] == ("DELETE", "/servers/was-2", {})
    assert routes["cut-peer"] == ("POST", "/servers/was-2/cluster/cut", {"peer": "was-3"})
    assert routes["set-strategy"] == ("PUT", "/strategy", {"strategy": "ip-hash"})
    assert routes["restart-redis"] == ("POST", "/redis/redis-1/restart", {})
    assert routes["set-link"] == ("PUT", "/links/lb->was-2", {"latency_ms": 50, "direction": "both"})
    assert routes["partition"] == ("POST", "/partitions", {"name": "p1", "cut": ["lb->was-2"]})
    assert routes["heal-partition"] == ("DELETE", "/partitions/p1", {})
    assert all(re.fullmatch(r"/[a-z0-9/{}_>-]+", path) for _, path, _ in routes.values())


def test_a_timed_link_fault_is_healed_for_s_later_and_checked_against_the_duration(tmp_path):
    fault = Fault(1.0, "set-link", link="lb->was-1", link_faults=LinkFaults(blackhole=True), for_s=0.5)
    assert fault.healing() == Fault(1.5, "heal-link", link="lb->was-1")
    path = tmp_path / "f.yaml"
    path.write_text(
        "duration_s: 2\ntopology: {app: {backend: local}}\nfaults:\n"
        "  - {at_s: 1.0, action: set-link, link: lb->was-1, link_faults: {latency_ms: -1}, for_s: 5}\n"
        "  - {at_s: 1.0, action: partition}\n"
        "  - {at_s: 1.0, action: kill-server, server: was-1, for_s: 1}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_scenario(path)
    message = str(caught.value)
    for part in ("latency_ms: -1 must be", "partition: is required", "cut: is required",
                 "for_s: only set-link and partition"):  # fmt: skip
        assert part in message, message


def test_the_same_seed_gives_the_same_population_and_order():
    scenario = load_scenario(find_scenario("C5"))
    scenario = dataclasses.replace(scenario, population=dataclasses.replace(scenario.population, heavy_users=2))
    args = (scenario.population, scenario.steps)
    first, again = plan_population(*args, 5, 3.0), plan_population(*args, 5, 3.0)
    other = plan_population(*args, 6, 3.0)
    assert first == again
    assert [p.index for p in first] != [p.index for p in other]
    nat = [p for p in first if p.behind_nat]
    assert len(nat) == 8 and {p.source_ip for p in nat} == {NAT_ADDRESS}
    own = [p.source_ip for p in first if not p.behind_nat]
    assert len(set(own)) == len(own) == 4
    heavy = [p for p in first if p.heavy]
    assert len(heavy) == 2 and all(p.think_s < first[0].think_s or first[0].heavy for p in heavy)
    assert [p.position for p in first] == list(range(12))
    assert [p.start_s for p in first] == sorted(p.start_s for p in first)


def test_traffic_waits_for_the_faults_and_then_settles():
    from lbsession.lab.drive import Deadline

    deadline = Deadline(3.0, 1.0, pending=True)
    assert deadline() == float("inf")  # a fault still being applied: nobody stops
    deadline.faults_done(1.2)
    assert deadline() == 3.0  # applied in time: the scenario's own duration
    late = Deadline(3.0, 1.0, pending=True)
    late.faults_done(2.5)
    assert late() == 3.5  # applied late (a slow machine): its effect still gets a second of traffic
    assert Deadline(3.0, 1.0, pending=False)() == 3.0
