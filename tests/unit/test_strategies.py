"""Routing strategies as plain functions: a contract every registered strategy keeps, then each one's own promises.

The contract suite is parametrised over `STRATEGIES`, so registering a new
strategy is enough to have it tested. Upstreams are `FakeUpstream` records: the
`UpstreamView` protocol is three read-only fields, so test data, not a mock.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import pytest

from lbsession.balancer.strategies import STRATEGIES, RequestFacts, Route, Strategy, create_strategy, strategy_class
from lbsession.balancer.strategies.base import ROUTE_REASONS, parse_cookie_header, stable_hash
from lbsession.balancer.strategies.consistent_hash import ConsistentHashStrategy, bounded_slots
from lbsession.balancer.strategies.sticky_cookie import StickyCookieStrategy
from lbsession.config import BalancerConfig, HashConfig, StickyConfig
from lbsession.errors import NoHealthyUpstream

SECRET = "x" * 32


@dataclass(frozen=True)
class FakeUpstream:
    """An UpstreamView: what a strategy may know about a server."""

    server_id: str
    in_flight: int = 0
    draining: bool = False


def upstreams(*ids: str) -> list[FakeUpstream]:
    return [FakeUpstream(i) for i in ids]


def client_ips(count: int) -> list[str]:
    """`count` distinct, deterministic client addresses 10.x.y.z."""
    return [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(count)]


def build(name: str, hashing: HashConfig | None = None, **sticky: Any) -> Strategy:
    """A strategy made the way the balancer makes it: from a BalancerConfig via the registry."""
    sticky_config = StickyConfig(secret=SECRET, **sticky)
    return create_strategy(BalancerConfig(strategy=name, sticky=sticky_config, hash=hashing or HashConfig()))


def route_all(strategy: Strategy, ips: Sequence[str], servers: Sequence[FakeUpstream]) -> dict[str, str]:
    """Client IP -> server id, for a brand-new client at each address."""
    return {ip: strategy.choose(RequestFacts(ip), servers).upstream.server_id for ip in ips}


# --------------------------------------------------------------------------- the contract


@pytest.fixture(params=sorted(STRATEGIES))
def strategy_name(request: pytest.FixtureRequest) -> Any:
    return request.param


# Every registered strategy, and the further modes of some: case -> (registered name, build's options).
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    **{name: (name, {}) for name in STRATEGIES},
    "sticky-cookie-balanced": ("sticky-cookie", {"mode": "balanced"}),
    "consistent-hash-bounded": ("consistent-hash", {"hashing": HashConfig(balance_factor=125)}),
}


@pytest.fixture(params=sorted(CASES))
def strategy(request: pytest.FixtureRequest) -> Strategy:
    name, options = CASES[request.param]
    return build(name, **options)


def test_registered_class_carries_its_registry_name(strategy_name: str) -> None:
    assert strategy_class(strategy_name).name == strategy_name
    assert type(build(strategy_name)) is strategy_class(strategy_name)


def test_no_upstreams_raises(strategy: Strategy) -> None:
    with pytest.raises(NoHealthyUpstream):
        strategy.choose(RequestFacts("10.0.0.1"), [])


def test_all_draining_raises_for_a_new_client(strategy: Strategy) -> None:
    servers = [FakeUpstream(i, draining=True) for i in ("a", "b", "c")]
    with pytest.raises(NoHealthyUpstream):
        strategy.choose(RequestFacts("10.0.0.1"), servers)


def test_new_clients_go_to_a_given_upstream_that_is_not_draining(strategy: Strategy) -> None:
    servers = [FakeUpstream("a"), FakeUpstream("b", in_flight=0, draining=True), FakeUpstream("c", in_flight=3)]
    for ip in client_ips(200):
        route = strategy.choose(RequestFacts(ip), servers)
        assert isinstance(route, Route)
        assert any(route.upstream is s for s in servers)
        assert not route.upstream.draining
        assert route.reason in ROUTE_REASONS


def test_every_upstream_gets_new_clients(strategy: Strategy) -> None:
    servers = upstreams("a", "b", "c")
    assert set(route_all(strategy, client_ips(300), servers).values()) == {"a", "b", "c"}


def test_every_strategy_counters_are_a_json_object(strategy: Strategy) -> None:
    strategy.choose(RequestFacts("10.0.0.1"), upstreams("a", "b"))
    assert json.loads(json.dumps(strategy.counters())) == strategy.counters()


def test_strategy_module_does_not_import_aiohttp(strategy_name: str) -> None:
    module = STRATEGIES[strategy_name].partition(":")[0]
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'aiohttp'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]", f"{module} pulls in {done.stdout.strip()}"


def test_stable_hash_is_the_same_in_every_process() -> None:
    keys = ["10.0.0.1", "was-1#0", "user-42", ""]
    code = (
        "import sys; from lbsession.balancer.strategies.base import stable_hash; "
        "keys = sys.argv[1:]; print([hash(k) for k in keys]); print([stable_hash(k) for k in keys])"
    )
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code, *keys], capture_output=True, text=True, env=env, timeout=60, check=True
        )
        outputs.append(done.stdout.splitlines())
    (salted_1, stable_1), (salted_2, stable_2) = outputs
    assert salted_1 != salted_2, "the two processes must really differ in hash() salt for this test to mean anything"
    assert stable_1 == stable_2 == str([stable_hash(k) for k in keys])
    assert all(0 <= stable_hash(k) < 2**64 for k in keys)


# --------------------------------------------------------------------------- round-robin and least-conn


def test_round_robin_cycles_evenly() -> None:
    strategy = build("round-robin")
    servers = upstreams("a", "b", "c")
    picks = [strategy.choose(RequestFacts("10.0.0.1"), servers).upstream.server_id for _ in range(300)]
    assert picks[:6] == ["a", "b", "c", "a", "b", "c"]
    assert Counter(picks) == {"a": 100, "b": 100, "c": 100}


def test_round_robin_skips_draining_servers() -> None:
    strategy = build("round-robin")
    servers = [FakeUpstream("a"), FakeUpstream("b", draining=True), FakeUpstream("c")]
    picks = Counter(strategy.choose(RequestFacts("10.0.0.1"), servers).upstream.server_id for _ in range(100))
    assert picks == {"a": 50, "c": 50}


def test_least_conn_picks_the_fewest_in_flight() -> None:
    strategy = build("least-conn")
    servers = [FakeUpstream("a", in_flight=3), FakeUpstream("b", in_flight=0), FakeUpstream("c", in_flight=5)]
    picks = {strategy.choose(RequestFacts("10.0.0.1"), servers).upstream.server_id for _ in range(30)}
    assert picks == {"b"}


def test_least_conn_follows_the_load_as_it_changes() -> None:
    strategy = build("least-conn")
    servers = upstreams("a", "b", "c")
    for _ in range(30):
        chosen = strategy.choose(RequestFacts("10.0.0.1"), servers).upstream
        # The chosen server must hold the minimum before its load goes up.
        assert chosen.in_flight == min(s.in_flight for s in servers)
        servers = [replace(s, in_flight=s.in_flight + 1) if s is chosen else s for s in servers]
    assert [s.in_flight for s in servers] == [10, 10, 10]


def test_least_conn_spreads_ties() -> None:
    strategy = build("least-conn")
    idle = upstreams("a", "b", "c")
    picks = Counter(strategy.choose(RequestFacts("10.0.0.1"), idle).upstream.server_id for _ in range(300))
    assert picks == {"a": 100, "b": 100, "c": 100}
    busy_first = [FakeUpstream("a", in_flight=4), FakeUpstream("b", in_flight=1), FakeUpstream("c", in_flight=1)]
    picks = Counter(strategy.choose(RequestFacts("10.0.0.1"), busy_first).upstream.server_id for _ in range(300))
    assert set(picks) == {"b", "c"}


def test_least_conn_ignores_an_idle_draining_server() -> None:
    strategy = build("least-conn")
    servers = [FakeUpstream("a", in_flight=0, draining=True), FakeUpstream("b", in_flight=7)]
    assert strategy.choose(RequestFacts("10.0.0.1"), servers).upstream.server_id == "b"


# --------------------------------------------------------------------------- sticky-cookie


def cookie_value(set_cookie: str | None, name: str = "LBSERVER") -> str:
    """The value of a Set-Cookie header, checking its name."""
    assert set_cookie is not None
    pair = set_cookie.split(";")[0]
    assert pair.startswith(f"{name}=")
    return pair.removeprefix(f"{name}=")


def sticky(**options: Any) -> StickyCookieStrategy:
    strategy = build("sticky-cookie", **options)
    assert isinstance(strategy, StickyCookieStrategy)
    return strategy


def with_cookie(value: str, name: str = "LBSERVER") -> RequestFacts:
    return RequestFacts("10.0.0.1", f"SESSION=abc; {name}={value}; theme=dark")


def test_sticky_new_client_gets_a_cookie() -> None:
    strategy = sticky()
    route = strategy.choose(RequestFacts("10.0.0.1"), upstreams("a", "b", "c"))
    assert route.reason == "new"
    assert route.set_cookie is not None
    attributes = [part.strip() for part in route.set_cookie.split(";")]
    assert attributes[0].startswith("LBSERVER=")
    assert {"HttpOnly", "SameSite=Lax", "Path=/"} <= set(attributes)
    assert "Secure" not in attributes
    assert not any(a.startswith("Max-Age") for a in attributes)
    assert strategy.server_of(cookie_value(route.set_cookie)) == route.upstream.server_id


def test_sticky_cookie_options_are_used() -> None:
    strategy = sticky(cookie_name="SRV", secure=True, max_age_s=600)
    route = strategy.choose(RequestFacts("10.0.0.1"), upstreams("a"))
    assert route.set_cookie is not None
    attributes = [part.strip() for part in route.set_cookie.split(";")]
    assert {"Secure", "Max-Age=600", "HttpOnly", "SameSite=Lax", "Path=/"} <= set(attributes)
    value = cookie_value(route.set_cookie, "SRV")
    assert strategy.choose(with_cookie(value, "SRV"), upstreams("b", "a")).reason == "pinned"
    # A cookie under the default name means nothing to this strategy.
    assert strategy.choose(with_cookie(value, "LBSERVER"), upstreams("b", "a")).reason == "new"


def test_sticky_issued_cookie_pins_without_a_new_set_cookie() -> None:
    strategy = sticky()
    servers = upstreams("a", "b", "c")
    first = strategy.choose(RequestFacts("10.0.0.1"), servers)
    value = cookie_value(first.set_cookie)
    for _ in range(10):  # round-robin underneath would rotate; the cookie must not
        route = strategy.choose(with_cookie(value), servers)
        assert route.reason == "pinned"
        assert route.upstream is first.upstream
        assert route.set_cookie is None


def test_sticky_cookie_survives_a_new_balancer_with_the_same_secret() -> None:
    value = sticky().cookie_value("b")
    route = sticky().choose(with_cookie(value), upstreams("a", "b", "c"))
    assert (route.reason, route.upstream.server_id) == ("pinned", "b")


def flip_last_tag_char(value: str) -> str:
    return value[:-1] + ("A" if value[-1] != "A" else "B")


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(flip_last_tag_char, id="tag-char-changed"),
        pytest.param(lambda v: "c." + v.rpartition(".")[2], id="server-swapped"),
        pytest.param(lambda v: v.rpartition(".")[0], id="tag-removed"),
        pytest.param(lambda v: "c", id="bare-server-id"),
        pytest.param(
            lambda v: StickyCookieStrategy(b"another secret, 32 bytes long..").cookie_value("c"), id="other-secret"
        ),
    ],
)
def test_sticky_forged_cookie_is_replaced(tamper: Callable[[str], str]) -> None:
    strategy = sticky()
    servers = upstreams("a", "b", "c")
    forged = tamper(strategy.cookie_value("b"))
    route = strategy.choose(with_cookie(forged), servers)
    assert route.reason == "forged-cookie"
    fresh = cookie_value(route.set_cookie)
    assert fresh != forged
    assert strategy.server_of(fresh) == route.upstream.server_id
    assert not route.upstream.draining


def test_sticky_redispatches_when_the_pinned_server_is_gone() -> None:
    strategy = sticky()
    value = strategy.cookie_value("gone")
    route = strategy.choose(with_cookie(value), upstreams("a", "b"))
    assert route.reason == "redispatched"
    assert route.upstream.server_id in {"a", "b"}
    assert strategy.server_of(cookie_value(route.set_cookie)) == route.upstream.server_id


def test_sticky_without_redispatch_refuses_a_client_of_a_gone_server() -> None:
    strategy = sticky(redispatch=False)
    with pytest.raises(NoHealthyUpstream):
        strategy.choose(with_cookie(strategy.cookie_value("gone")), upstreams("a", "b"))
    assert strategy.choose(RequestFacts("10.0.0.1"), upstreams("a", "b")).reason == "new"


def test_sticky_draining_server_keeps_pinned_clients_but_gets_no_new_ones() -> None:
    strategy = sticky()
    servers = [FakeUpstream("a"), FakeUpstream("b", draining=True), FakeUpstream("c")]
    route = strategy.choose(with_cookie(strategy.cookie_value("b")), servers)
    assert (route.reason, route.upstream.server_id, route.set_cookie) == ("pinned", "b", None)
    new = {strategy.choose(RequestFacts(ip), servers).upstream.server_id for ip in client_ips(50)}
    assert new == {"a", "c"}


def test_sticky_server_id_may_contain_dots() -> None:
    strategy = sticky()
    assert strategy.server_of(strategy.cookie_value("was.1")) == "was.1"


@pytest.mark.parametrize(
    "garbage",
    ["", ".", "..", "a.", ".tag", "a.b.c", "x" * 100_000, "a." + "x" * 100_000, "é.abc", "a.é", "\udcff.x", "a b.c"],
    ids=lambda v: repr(v[:12]),
)
def test_sticky_server_of_rejects_garbage(garbage: str) -> None:
    strategy = sticky()
    assert strategy.server_of(garbage) is None
    route = strategy.choose(with_cookie(garbage), upstreams("a"))
    assert route.reason == "forged-cookie"
    assert strategy.server_of(cookie_value(route.set_cookie)) == "a"


# --------------------------------------------------------------------------- ip-hash and consistent-hash

HASHING = ["ip-hash", "consistent-hash"]


@pytest.mark.parametrize("name", HASHING)
def test_hash_maps_a_client_to_the_same_server_every_time(name: str) -> None:
    servers = upstreams("a", "b", "c")
    first = route_all(build(name), client_ips(200), servers)
    again = route_all(build(name), client_ips(200), servers)  # a fresh instance: nothing is remembered
    assert first == again
    strategy = build(name)
    routes = [strategy.choose(RequestFacts("10.0.0.7"), servers) for _ in range(20)]
    assert {r.upstream.server_id for r in routes} == {first["10.0.0.7"]}
    assert {r.reason for r in routes} == {"pinned"}


@pytest.mark.parametrize("name", HASHING)
def test_hash_spreads_clients(name: str) -> None:
    shares = Counter(route_all(build(name), client_ips(1000), upstreams("a", "b", "c")).values())
    assert set(shares) == {"a", "b", "c"}
    assert all(200 <= count <= 470 for count in shares.values()), shares


def moved_fraction(before: dict[str, str], after: dict[str, str]) -> float:
    return sum(before[ip] != after[ip] for ip in before) / len(before)


def test_consistent_hash_moves_about_a_quarter_when_a_fourth_server_joins() -> None:
    strategy = build("consistent-hash")
    ips = client_ips(1000)
    before = route_all(strategy, ips, upstreams("a", "b", "c"))
    after = route_all(strategy, ips, upstreams("a", "b", "c", "d"))
    assert 0.15 <= moved_fraction(before, after) <= 0.35
    assert {after[ip] for ip in ips if before[ip] != after[ip]} == {"d"}


def test_ip_hash_moves_about_three_quarters_when_a_fourth_server_joins() -> None:
    strategy = build("ip-hash")
    ips = client_ips(1000)
    before = route_all(strategy, ips, upstreams("a", "b", "c"))
    after = route_all(strategy, ips, upstreams("a", "b", "c", "d"))
    assert 0.65 <= moved_fraction(before, after) <= 0.85


def test_consistent_hash_moves_only_the_removed_servers_clients() -> None:
    strategy = build("consistent-hash")
    ips = client_ips(1000)
    before = route_all(strategy, ips, upstreams("a", "b", "c", "d"))
    after = route_all(strategy, ips, upstreams("a", "c", "d"))
    moved = {ip for ip in ips if before[ip] != after[ip]}
    assert moved == {ip for ip in ips if before[ip] == "b"}
    assert moved  # b did own some clients


def test_consistent_hash_ignores_server_order() -> None:
    strategy = build("consistent-hash")
    ips = client_ips(300)
    assert route_all(strategy, ips, upstreams("a", "b", "c")) == route_all(strategy, ips, upstreams("c", "a", "b"))


def test_consistent_hash_draining_server_gives_up_only_its_clients() -> None:
    strategy = build("consistent-hash")
    ips = client_ips(500)
    before = route_all(strategy, ips, upstreams("a", "b", "c"))
    servers = [FakeUpstream("a"), FakeUpstream("b", draining=True), FakeUpstream("c")]
    after = route_all(strategy, ips, servers)
    assert all(after[ip] == before[ip] for ip in ips if before[ip] != "b")


def hashing(name: str, key: str) -> Strategy:
    return create_strategy(BalancerConfig(strategy=name, hash=HashConfig(key=key)))


@pytest.mark.parametrize("name", HASHING)
@pytest.mark.parametrize(
    ("key", "facts"),
    [
        ("header:x-user", lambda ip, user: RequestFacts(ip, None, {"x-user": user})),
        ("header:X-User", lambda ip, user: RequestFacts(ip, None, {"x-user": user})),
        ("cookie:uid", lambda ip, user: RequestFacts(ip, f"a=1; uid={user}")),
    ],
)
def test_hash_key_routes_by_the_named_value(name: str, key: str, facts: Callable[[str, str], RequestFacts]) -> None:
    strategy = hashing(name, key)
    servers = upstreams("a", "b", "c")
    for user in ("alice", "bob", "carol"):
        # One user from many addresses (a phone changing networks) stays on one server.
        assert len({strategy.choose(facts(ip, user), servers).upstream.server_id for ip in client_ips(50)}) == 1
    per_user = {strategy.choose(facts("10.0.0.1", f"user-{i}"), servers).upstream.server_id for i in range(100)}
    assert per_user == {"a", "b", "c"}


@pytest.mark.parametrize("name", HASHING)
@pytest.mark.parametrize(
    ("key", "without_value"),
    [
        ("header:x-user", lambda ip: RequestFacts(ip)),
        ("header:x-user", lambda ip: RequestFacts(ip, None, {"x-user": ""})),
        ("header:x-user", lambda ip: RequestFacts(ip, None, {"x-other": "alice"})),
        ("cookie:uid", lambda ip: RequestFacts(ip)),
        ("cookie:uid", lambda ip: RequestFacts(ip, "other=alice")),
    ],
)
def test_hash_key_falls_back_to_the_client_ip(
    name: str, key: str, without_value: Callable[[str], RequestFacts]
) -> None:
    by_key, by_ip = hashing(name, key), hashing(name, "client-ip")
    servers = upstreams("a", "b", "c")
    for ip in client_ips(100):
        assert by_key.choose(without_value(ip), servers).upstream is by_ip.choose(RequestFacts(ip), servers).upstream


# --------------------------------------------------------------------------- request facts


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("", {}),
        ("a=1", {"a": "1"}),
        ("a=1; b=2", {"a": "1", "b": "2"}),
        ("  a = 1 ;b=2  ;  c=3", {"a": "1", "b": "2", "c": "3"}),
        ('a="quoted value"; b=""', {"a": "quoted value", "b": ""}),
        ("a=1; a=2; A=3", {"a": "1", "A": "3"}),
        ("junk; a=1; ; =nameless; b", {"a": "1"}),
        ("token=abc==; x=y=z", {"token": "abc==", "x": "y=z"}),
    ],
)
def test_parse_cookie_header(header: str, expected: dict[str, str]) -> None:
    assert parse_cookie_header(header) == expected


def test_request_facts_reads_cookies_and_headers() -> None:
    facts = RequestFacts("10.0.0.9", "a=1; LBSERVER=x.y", {"x-user": "alice"})
    assert facts.client_ip == "10.0.0.9"
    assert (facts.cookie("LBSERVER"), facts.cookie("a"), facts.cookie("missing")) == ("x.y", "1", None)
    assert (facts.header("x-user"), facts.header("x-missing")) == ("alice", None)
    assert RequestFacts("10.0.0.9").cookie("a") is None


# --------------------------------------------------------------------------- sticky pins with a max age


class ManualClock:
    """Wall-clock seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_pin_with_a_max_age_carries_its_issue_time_under_the_signature() -> None:
    clock = ManualClock()
    sticky = StickyCookieStrategy(b"k" * 32, max_age_s=600, clock=clock)
    pool = [FakeUpstream("was-1"), FakeUpstream("was-2")]
    first = sticky.choose(RequestFacts("10.0.0.1"), pool)
    value = first.set_cookie.split(";")[0].split("=", 1)[1]
    server, stamp, _tag = value.split(".")
    assert server == first.upstream.server_id and int(stamp, 16) == int(clock.now)
    assert "Max-Age=600" in first.set_cookie

    forged_stamp = f"{server}.{int(clock.now) + 10**6:x}.{_tag}"  # pushing the expiry out breaks the tag
    assert sticky.server_of(forged_stamp) is None


def test_an_expired_pin_is_refused_and_counted_apart_from_forgeries() -> None:
    clock = ManualClock()
    sticky = StickyCookieStrategy(b"k" * 32, max_age_s=600, clock=clock)
    pool = [FakeUpstream("was-1"), FakeUpstream("was-2")]
    cookie = sticky.choose(RequestFacts("10.0.0.1"), pool).set_cookie.split(";")[0]

    clock.now += 200
    assert sticky.choose(RequestFacts("10.0.0.1", cookie), pool).reason == "pinned"
    clock.now += 500  # 700 s old: a replay of an old pin
    replayed = sticky.choose(RequestFacts("10.0.0.1", cookie), pool)
    assert replayed.reason == "expired-cookie"
    assert replayed.set_cookie is not None  # a fresh pin replaces it


def test_an_active_users_pin_slides_at_half_its_life() -> None:
    clock = ManualClock()
    sticky = StickyCookieStrategy(b"k" * 32, max_age_s=600, clock=clock)
    pool = [FakeUpstream("was-1"), FakeUpstream("was-2")]
    cookie = sticky.choose(RequestFacts("10.0.0.1"), pool).set_cookie.split(";")[0]
    clock.now += 100
    assert sticky.choose(RequestFacts("10.0.0.1", cookie), pool).set_cookie is None
    clock.now += 250  # past half of 600 s
    refreshed = sticky.choose(RequestFacts("10.0.0.1", cookie), pool)
    assert refreshed.reason == "pinned" and refreshed.set_cookie is not None
    assert refreshed.set_cookie.split(";")[0] != cookie


def test_a_runs_random_sticky_key_survives_strategy_switches_and_reloads() -> None:
    from lbsession.balancer.balancer import LoadBalancer
    from lbsession.config import BalancerConfig, UpstreamConfig

    config = BalancerConfig(strategy="sticky-cookie", upstreams=(UpstreamConfig("a", "http://127.0.0.1:9"),))
    assert config.sticky.secret is None
    lb = LoadBalancer(config)
    pin = lb.strategy.cookie_value("a")  # type: ignore[attr-defined]

    lb.set_strategy("round-robin")
    lb.set_strategy("sticky-cookie")
    assert lb.strategy.server_of(pin) == "a"  # type: ignore[attr-defined]
    lb.reload(config)  # the file still sets no secret
    assert lb.strategy.server_of(pin) == "a"  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- consistent hashing with bounded loads


@dataclass
class LoadedUpstream:
    """An upstream whose in-flight count the test changes, as the proxy does."""

    server_id: str
    in_flight: int = 0
    draining: bool = False


def loaded(*ids: str) -> list[LoadedUpstream]:
    return [LoadedUpstream(i) for i in ids]


def test_bounded_slots_follow_haproxy_and_add_up_to_the_factor() -> None:
    # 6 in flight + the coming one, x1.25 = 8.75 -> 9 slots over 3 servers: 3 each.
    assert [bounded_slots(6, 125, 3, i) for i in range(3)] == [3, 3, 3]
    # 10 slots over 3 servers: the remainder goes to the servers in order of the cumulative weights.
    assert sum(bounded_slots(7, 125, 3, i) for i in range(3)) == 10
    assert bounded_slots(0, 125, 8, 3) == 1  # never 0: an idle balancer can always take a request


@pytest.mark.parametrize("factor", [100, 125, 150, 200])
def test_bounded_loads_hold_every_server_within_the_factor(factor: int) -> None:
    """Requests that never finish, all from one NAT address: in flight stays within factor x mean (rounded up)."""
    servers = loaded("a", "b", "c", "d")
    strategy = ConsistentHashStrategy(balance_factor=factor)
    for sent in range(1, 401):
        route = strategy.choose(RequestFacts("203.0.113.9"), servers)
        route.upstream.in_flight += 1  # type: ignore[misc]  # the view is read-only to strategies
        busiest = max(u.in_flight for u in servers)
        assert busiest <= math.ceil(sent * factor / 100 / len(servers)), (sent, [u.in_flight for u in servers])


@pytest.mark.parametrize("factor", [100, 125, 150, 200])
def test_every_bounded_decision_keeps_its_bound_and_the_strategy_counts_it(factor: int) -> None:
    """Known loads that rise and fall (requests finish between decisions): each decision checked on its own."""
    rng = random.Random(factor)
    servers = loaded("a", "b", "c")
    strategy = ConsistentHashStrategy(balance_factor=factor)
    worst = Fraction(0)
    for decision in range(1, 2001):
        for upstream in servers:  # some requests finish before the next decision, as on a real balancer
            upstream.in_flight -= sum(rng.random() < 0.15 for _ in range(upstream.in_flight))
        total = sum(u.in_flight for u in servers)
        ip = "203.0.113.9" if rng.random() < 0.8 else rng.choice(client_ips(60))  # a NAT and a few others
        chosen = strategy.choose(RequestFacts(ip), servers).upstream
        worst = max(worst, Fraction(chosen.in_flight * len(servers), total + 1))
        chosen.in_flight += 1  # type: ignore[misc]  # the view is read-only to strategies
        # After taking it, the chosen server holds at most ceil(factor x the mean with this request).
        assert chosen.in_flight <= math.ceil(Fraction((total + 1) * factor, 100 * len(servers))), decision
    counters = strategy.counters()
    assert counters == {
        "decisions": 2000,
        "bound_violations": 0,
        "bound_fallbacks": 0,
        "decision_imbalance_max": float(worst),
    }
    assert worst < Fraction(factor, 100)  # before taking it, below factor x mean: HAProxy's served < slots
    assert worst > Fraction(factor, 100) - Fraction(1, 4)  # and the NAT pressed the bound: the check is not idle


def test_a_decision_that_finds_every_server_full_is_a_counted_fallback_and_violation() -> None:
    # Only a factor under 100, which the config refuses, leaves fewer slots than requests in flight.
    strategy = ConsistentHashStrategy(balance_factor=50)
    servers = loaded("a", "b")
    servers[0].in_flight = servers[1].in_flight = 2
    owner = ConsistentHashStrategy().choose(RequestFacts("10.0.0.7"), servers).upstream
    assert strategy.choose(RequestFacts("10.0.0.7"), servers) == Route(owner, "pinned")  # HAProxy takes one anyway
    assert strategy.counters() == {
        "decisions": 1,
        "bound_violations": 1,  # 3 in flight after it, over ceil(0.5 x 5 / 2) = 2
        "bound_fallbacks": 1,
        "decision_imbalance_max": 2 * 2 / 5,
    }


def test_without_a_factor_there_is_no_bound_but_the_decision_ratio_shows_the_hot_server() -> None:
    strategy = ConsistentHashStrategy()
    servers = loaded("a", "b", "c")
    idle = {"decisions": 0, "bound_violations": None, "bound_fallbacks": None, "decision_imbalance_max": None}
    assert strategy.counters() == idle
    for _ in range(30):  # one NAT address: every request on one server, none finishing
        strategy.choose(RequestFacts("203.0.113.9"), servers).upstream.in_flight += 1  # type: ignore[misc]
    counters = strategy.counters()
    assert (counters["decisions"], counters["bound_violations"], counters["bound_fallbacks"]) == (30, None, None)
    assert counters["decision_imbalance_max"] == 29 * 3 / 30  # 29 already there, over a mean of 30 / 3


def test_bounded_loads_keep_the_owner_while_it_has_room_and_say_when_a_request_moved() -> None:
    servers = loaded("a", "b", "c")
    unbounded = ConsistentHashStrategy().choose(RequestFacts("10.0.0.7"), servers).upstream
    strategy = ConsistentHashStrategy(balance_factor=125)
    assert strategy.choose(RequestFacts("10.0.0.7"), servers) == Route(unbounded, "pinned")
    unbounded.in_flight = 5  # type: ignore[misc]
    moved = strategy.choose(RequestFacts("10.0.0.7"), servers)
    assert moved.upstream is not unbounded and moved.reason == "rehashed"
    # The next server clockwise is the same one every time: moved keys do not scatter.
    assert strategy.choose(RequestFacts("10.0.0.7"), servers).upstream is moved.upstream


def test_balance_factor_off_is_plain_consistent_hashing() -> None:
    servers = loaded("a", "b", "c")
    plain, off = ConsistentHashStrategy(), ConsistentHashStrategy(balance_factor=0)
    servers[0].in_flight = 1000  # type: ignore[misc]
    assert route_all(plain, client_ips(100), servers) == route_all(off, client_ips(100), servers)


def test_the_balance_factor_is_a_flag_of_run_and_lb_that_reaches_the_strategy() -> None:
    from lbsession.cli import build_parser, config_from_args

    for command in (["run"], ["lb", "--upstream", "http://127.0.0.1:8001"]):
        args = build_parser().parse_args([*command, "--strategy", "consistent-hash", "--hash-balance-factor", "125"])
        config = config_from_args(args, environ={}).balancer
        assert config.hash.balance_factor == 125
        servers = loaded("a", "b", "c")
        strategy = strategy_class("consistent-hash").from_config(config)
        owner = strategy.choose(RequestFacts("203.0.113.9"), servers).upstream
        owner.in_flight = 10  # type: ignore[misc]
        assert strategy.choose(RequestFacts("203.0.113.9"), servers).reason == "rehashed"


# --------------------------------------------------------------------------- sticky-cookie: persistent vs balanced


def pinned_clients(strategy: Strategy, servers: Sequence[FakeUpstream], count: int = 400) -> dict[str, str]:
    """`count` new clients: their cookie value -> the server that took them."""
    out = {}
    for ip in client_ips(count):
        route = strategy.choose(RequestFacts(ip), servers)
        assert route.set_cookie is not None
        out[route.set_cookie.split(";")[0].partition("=")[2]] = route.upstream.server_id
    return out


def where_now(strategy: Strategy, pins: dict[str, str], servers: Sequence[FakeUpstream]) -> dict[str, str]:
    return {v: strategy.choose(RequestFacts("10.9.9.9", f"LBSERVER={v}"), servers).upstream.server_id for v in pins}


def test_balanced_mode_moves_about_a_quarter_to_a_fourth_server_persistent_none() -> None:
    for mode, low, high in (("persistent", 0.0, 0.0), ("balanced", 0.17, 0.33)):
        strategy = build("sticky-cookie", mode=mode)
        pins = pinned_clients(strategy, upstreams("a", "b", "c"))
        after = where_now(strategy, pins, upstreams("a", "b", "c", "d"))
        moved = [v for v in pins if after[v] != pins[v]]
        assert low <= len(moved) / len(pins) <= high, (mode, len(moved))
        assert all(after[v] == "d" for v in moved)  # those that move, move to the new server only


def test_balanced_cookies_name_no_server_and_a_changed_key_is_forged() -> None:
    strategy = build("sticky-cookie", mode="balanced")
    value, server = next(iter(pinned_clients(strategy, upstreams("a", "b", "c"), 1).items()))
    assert value.startswith("@") and not StickyCookieStrategy.cookie_names(value, server)
    assert StickyCookieStrategy.cookie_renamed(value, server, "b") is None
    tag = value.rpartition(".")[2]
    forged = strategy.choose(RequestFacts("10.0.0.1", f"LBSERVER=@{'0' * 16}.{tag}"), upstreams("a", "b", "c"))
    assert forged.reason == "forged-cookie" and forged.set_cookie is not None
    assert strategy.describe() == {"sticky_mode": "balanced"}


def test_a_returning_server_gets_its_balanced_users_back_persistent_ones_stay_moved() -> None:
    for mode in ("persistent", "balanced"):
        strategy = build("sticky-cookie", mode=mode)
        pins = pinned_clients(strategy, upstreams("a", "b", "c"))
        on_a = [v for v, server in pins.items() if server == "a"]
        # a dies: each of its users is sent elsewhere (persistent: a new cookie; balanced: the ring, same cookie)
        moved = {}
        for value in on_a:
            route = strategy.choose(RequestFacts("10.9.9.9", f"LBSERVER={value}"), upstreams("b", "c"))
            assert route.upstream.server_id != "a"
            moved[value] = route.set_cookie.split(";")[0].partition("=")[2] if route.set_cookie else value
        back = where_now(strategy, dict.fromkeys(moved.values(), ""), upstreams("a", "b", "c"))
        returned = sum(1 for server in back.values() if server == "a")
        assert returned == (len(on_a) if mode == "balanced" else 0), mode
