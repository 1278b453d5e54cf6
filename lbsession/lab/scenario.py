"""Scenarios: a topology, virtual users, their steps, faults on a timeline, and the predicted outcome.

A scenario is one YAML file in `configs/scenarios/`, labelled with the claim of
the seed it measures (the id families are CLAIM_FAMILIES below):

    claim: C6
    title: sticky cookie + local sessions, a server killed: its users log in again
    seed: 6
    duration_s: 3
    topology: {balancer: {strategy: sticky-cookie}, app: {backend: local}}   # as in configs/*.yaml
    population: {users: 12, addresses: distinct}
    steps: {reads: 3, think_ms: 40}
    faults:
      - {at_s: 1.0, action: kill-server, server: was-1}
    expect:
      victim_relogin_share: "== 1"
      bystander_relogins: "== 0"

The file is validated like a config file (the same loader, lbsession.config):
every mistake is reported at once, naming the file, the key, the bad value and
the valid choices. `expect` maps a metric (lbsession.lab.measures.METRICS) to a
condition `<op> <number>`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from lbsession.config import BACKEND_NAMES, STRATEGY_NAMES, BackendName, Config, StrategyName, build_dataclass
from lbsession.errors import ConfigError
from lbsession.lab.measures import METRICS
from lbsession.settings import choice

AddressMode = Literal["distinct", "shared"]
FaultAction = Literal[
    "kill-server",
    "restart-server",
    "add-server",
    "drain-server",
    "undrain-server",
    "deploy-server",
    "remove-server",
    "kill-redis-primary",
    "restart-redis",
    "cut-peer",
    "heal-peer",
    "set-strategy",
    "set-link",
    "heal-link",
    "partition",
    "heal-partition",
]
FAULT_ACTIONS: tuple[str, ...] = get_args(FaultAction)
SERVER_FAULTS = (
    "kill-server", "restart-server", "drain-server", "undrain-server", "deploy-server", "remove-server", "cut-peer",
    "heal-peer",
)  # fmt: skip
LINK_FAULTS = ("set-link", "heal-link", "partition", "heal-partition")
TIMED_FAULTS = {"set-link": "heal-link", "partition": "heal-partition"}  # those that take `for_s`, and their heal
OPERATORS = (">=", "<=", "==", "!=", ">", "<")
# Every family of claim ids, in one place: the file check, the lookup by id and the hints follow it.
CLAIM_FAMILIES: dict[str, str] = {
    "C": "C1..C12 (the seed's claims)",
    "B": "B1.. (beyond the seed)",
    "F": "F1.. (failures)",
}
_OPEN_FAMILIES = "".join(family for family in CLAIM_FAMILIES if family != "C")  # C stops at the seed's 12
CLAIM_PATTERN = re.compile(rf"^(C([1-9]|1[0-2])|[{_OPEN_FAMILIES}][1-9][0-9]?)$")
_CLAIM_ID = re.compile(rf"([{''.join(CLAIM_FAMILIES)}])(\d{{1,2}})", re.IGNORECASE)


def claim_families() -> str:
    """Every family of claim ids in words, for hints: `C1..C12 (the seed's claims), B1.. (...) or F1.. (...)`."""
    *first, last = CLAIM_FAMILIES.values()
    return f"{', '.join(first)} or {last}" if first else last


# What a scenario's topology starts from: free ports, and health checks fast enough that a
# killed server is noticed within a fraction of a second of a run lasting a few seconds.
LAB_TOPOLOGY: dict[str, Any] = {
    "balancer": {"port": 0, "admin_port": 0, "health": {"interval_s": 0.2, "timeout_s": 0.5, "rise": 1, "fall": 1}}
}


@dataclass(frozen=True)
class Population:
    """Who the virtual users are and where they come from."""

    users: int = 12
    addresses: AddressMode = "distinct"  # distinct: 127.0.0.2, 127.0.0.3...; shared: all from 127.0.0.1
    nat_users: int = 0  # of the users, this many share one address (a NAT or a corporate proxy)
    heavy_users: int = 0  # this many think `heavy_weight` times less, so send that many times more
    heavy_weight: float = 8.0
    tamper_users: int = 0  # this many forge their sticky cookie once, halfway through the run
    replay_users: int = 0  # halfway through, this many copy their session cookie, log out, and replay the copy
    forge_session_users: int = 0  # halfway through, this many damage their session cookie (tamper, truncate, ...)
    ramp_s: float = 0.5  # users arrive one by one over this time, in the seeded order

    def problems(self) -> list[str]:
        out = [] if 1 <= self.users <= 500 else [f"users: {self.users} must be between 1 and 500"]
        for name in ("nat_users", "heavy_users", "tamper_users", "replay_users", "forge_session_users"):
            value = getattr(self, name)
            if not 0 <= value <= self.users:
                out.append(f"{name}: {value} must be between 0 and users ({self.users})")
        if self.nat_users and self.addresses == "shared":
            out.append("nat_users: needs addresses: distinct (with shared, every user is behind one address)")
        if self.heavy_weight < 1:
            out.append(f"heavy_weight: {self.heavy_weight} must be at least 1")
        return out + ([] if self.ramp_s >= 0 else [f"ramp_s: {self.ramp_s} must not be negative"])


@dataclass(frozen=True)
class Steps:
    """What every user does once logged in, visit after visit, until the run ends."""

    reads: int = 3  # GET /me per visit
    cart_writes: int = 0  # POST /cart per visit
    cart_parallel: bool = False  # send a visit's cart (and prefs) writes at once, as two browser tabs would
    prefs_writes: int = 0  # POST /prefs per visit: another attribute of the session than the cart
    item_chars: int = 0  # pad each cart item to this many characters (at most 64), to grow the session
    think_ms: float = 50.0  # pause after each request (seeded jitter of +-20%)
    work_ms: int = 0  # each read and cart write waits this long on the server (?work_ms=): requests pile up in flight
    logout: bool = False  # POST /logout when the run ends
    # Reads are messages on a WebSocket (GET /ws) held open across visits, not GET /me; a lost
    # socket is opened again at the next read, as a web app reconnects (B6).
    websocket: bool = False

    def problems(self) -> list[str]:
        out = [f"{k}: {v} must be between 0 and 100" for k, v in self._counts().items() if not 0 <= v <= 100]
        if self.reads + self.cart_writes + self.prefs_writes == 0:
            out.append("reads: a visit needs at least one read, cart write or prefs write")
        if self.websocket and (self.cart_writes or self.prefs_writes or self.work_ms or self.reads == 0):
            out.append(
                "websocket: a WebSocket visit is reads only (messages); set cart_writes, prefs_writes and work_ms "
                "to 0 and reads above 0"
            )
        if not 0 <= self.item_chars <= 64:
            out.append(f"item_chars: {self.item_chars} must be between 0 and 64")
        if not 0 <= self.work_ms <= 1000:
            out.append(f"work_ms: {self.work_ms} must be between 0 and 1000")
        return out + ([] if self.think_ms >= 0 else [f"think_ms: {self.think_ms} must not be negative"])

    def _counts(self) -> dict[str, int]:
        return {"reads": self.reads, "cart_writes": self.cart_writes, "prefs_writes": self.prefs_writes}


@dataclass(frozen=True)
class LinkFaults:
    """What `set-link` sets on a link (lbsession.lab.links: the same names, the same meaning)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_kb_s: float = 0.0
    blackhole: bool = False
    slow_close_ms: float = 0.0
    down: bool = False
    reset: bool = False
    direction: Literal["both", "upstream", "downstream"] = "both"

    def problems(self) -> list[str]:
        numbers = {"latency_ms": self.latency_ms, "jitter_ms": self.jitter_ms, "bandwidth_kb_s": self.bandwidth_kb_s,
                   "slow_close_ms": self.slow_close_ms}  # fmt: skip
        return [f"{name}: {value:g} must be from 0 to 600000" for name, value in numbers.items()
                if not 0 <= value <= 600_000]  # fmt: skip

    def body(self) -> dict[str, Any]:
        """The PUT /links/{name} body: the faults set, and the direction."""
        set_ = {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) and f.name != "direction"}
        return {**set_, "direction": self.direction}


@dataclass(frozen=True)
class Fault:
    """One change applied through the lab's admin API at a time on the run's clock."""

    at_s: float
    action: FaultAction
    server: str | None = None  # kill/restart/drain/remove/cut/heal: the app server, e.g. was-1
    peer: str | None = None  # cut-peer/heal-peer: the peer it stops (resumes) replicating to; none: all
    node: str = "redis-1"  # restart-redis: the Redis node
    empty: bool = False  # restart-redis under Sentinel: as an empty master (the hazard), not a synced replica
    strategy: StrategyName | None = choice(None, lambda: STRATEGY_NAMES)  # set-strategy
    link: str | None = None  # set-link/heal-link: the link's name, e.g. was-1->redis-1 (GET /links)
    link_faults: LinkFaults | None = None  # set-link: what to set
    partition: str | None = None  # partition/heal-partition: its name
    cut: tuple[str, ...] = ()  # partition: the links it cuts
    for_s: float | None = None  # set-link/partition: healed this long after (none: left as it is)

    def problems(self) -> list[str]:
        out = [] if self.at_s >= 0 else [f"at_s: {self.at_s} must not be negative"]
        out += self._link_problems()
        if self.action in SERVER_FAULTS and self.server is None:
            out.append(f"server: is required for {self.action} (e.g. server: was-1)")
        if self.action == "set-strategy" and self.strategy is None:
            out.append(f"strategy: is required for set-strategy; choose one of: {', '.join(STRATEGY_NAMES)}")
        if self.peer is not None and self.action not in ("cut-peer", "heal-peer"):
            out.append(f"peer: only cut-peer and heal-peer take a peer, not {self.action}")
        return out

    def _link_problems(self) -> list[str]:
        out = []
        if self.action in ("set-link", "heal-link") and not self.link:
            out.append(f"link: is required for {self.action} (e.g. link: was-1->redis-1; GET /links lists them)")
        if self.action == "set-link" and (self.link_faults is None or len(self.link_faults.body()) == 1):
            out.append("link_faults: is required for set-link, e.g. link_faults: {latency_ms: 50}")
        if self.action in ("partition", "heal-partition") and not self.partition:
            out.append(f"partition: is required for {self.action} (a name of your choice, e.g. partition: p1)")
        if self.action == "partition" and not self.cut:
            out.append("cut: is required for partition: the links it cuts, e.g. cut: [lb->was-1, was-1->redis-1]")
        if self.for_s is not None and (self.action not in TIMED_FAULTS or self.for_s <= 0):
            out.append(f"for_s: only set-link and partition take one, a positive number of seconds; not {self.action}")
        return out

    def healing(self) -> Fault | None:
        """The fault that ends this one `for_s` later (set-link -> heal-link, partition -> heal-partition)."""
        if self.for_s is None or self.action not in TIMED_FAULTS:
            return None
        heal: Any = TIMED_FAULTS[self.action]
        return Fault(self.at_s + self.for_s, heal, link=self.link, partition=self.partition)

    def describe(self) -> str:
        """The fault in a few words, as reports show it."""
        if self.action in LINK_FAULTS:
            what = self.link or self.partition
            detail = self.link_faults.body() if self.link_faults is not None else list(self.cut) or ""
            return f"{self.action} {what} {detail}".strip() + (f" for {self.for_s:g} s" if self.for_s else "")
        target = self.server or (self.strategy if self.action == "set-strategy" else None)
        if self.action == "restart-redis":
            target = f"{self.node} empty" if self.empty else self.node
        text = f"{self.action} {target}" if target else self.action
        return f"{text}->{self.peer}" if self.peer else text


@dataclass(frozen=True)
class Expectation:
    """A predicted outcome: `metric op value`, e.g. relogins > 0."""

    metric: str
    op: str
    value: float

    def check(self, measured: float | None) -> bool:
        """True when the measured value satisfies the prediction (a metric not measured never does)."""
        if measured is None:
            return False
        compare = {
            ">": measured > self.value,
            ">=": measured >= self.value,
            "<": measured < self.value,
            "<=": measured <= self.value,
            "==": abs(measured - self.value) < 1e-9,
            "!=": abs(measured - self.value) >= 1e-9,
        }
        return compare[self.op]

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


@dataclass(frozen=True)
class Scenario:
    """A whole scenario; built by `load_scenario`, adjusted by `with_overrides`."""

    name: str = ""  # the file's stem unless given
    claim: str | None = None
    title: str = ""
    seed: int = 1
    duration_s: float = 3.0
    settle_s: float = 1.0  # traffic goes on at least this long after the last fault took effect
    topology: Config = field(default_factory=Config)
    population: Population = field(default_factory=Population)
    steps: Steps = field(default_factory=Steps)
    faults: tuple[Fault, ...] = ()
    expect: tuple[Expectation, ...] = ()  # parsed from the file's `expect` mapping, not by the loader
    # The matrix runs the scenario once on each of these backends, its re-login expectation for the
    # victims of its fault taken from the theory (lbsession.lab.matrix.fault_theory); none: as written.
    backends: tuple[BackendName, ...] = ()
    source: str = ""  # the file it was read from (set by the loader)

    def problems(self) -> list[str]:
        out = [] if 0.2 <= self.duration_s <= 600 else [f"duration_s: {self.duration_s} must be 0.2 to 600"]
        if self.claim is not None and not CLAIM_PATTERN.match(self.claim):
            out.append(f"claim: {self.claim!r} is not a claim id; use {claim_families()}")
        if not 0 <= self.settle_s <= 60:
            out.append(f"settle_s: {self.settle_s} must be between 0 and 60")
        for backend in self.backends:
            if backend not in BACKEND_NAMES:
                out.append(f"backends: {backend!r} is not valid; choose one of: {', '.join(BACKEND_NAMES)}")
        if self.backends and not (self.faults and self.faults[0].action == "kill-server"):
            out.append("backends: the theory judges the victims of a server killed: make the first fault a kill-server")
        if self.population.ramp_s >= self.duration_s:
            out.append(f"population.ramp_s: {self.population.ramp_s:g} must be shorter than duration_s")
        return out

    def timeline_problems(self) -> list[str]:
        """Faults that do not fit the topology or the duration (checked once every part is valid on its own)."""
        return [f"faults[{i}].{p}" for i, fault in enumerate(self.faults) for p in self._fault_problems(fault)]

    def _fault_problems(self, fault: Fault) -> list[str]:
        out = [] if fault.at_s < self.duration_s else [f"at_s: {fault.at_s:g} is not before duration_s"]
        if fault.for_s is not None and fault.at_s + fault.for_s >= self.duration_s:
            # Else a lab run with --target would keep the fault after the scenario.
            out.append(f"for_s: the heal at {fault.at_s + fault.for_s:g} s is not before duration_s")
        if fault.action in LINK_FAULTS and self.topology.links == "off":
            out.append(f"action: {fault.action} needs the topology's links (topology: {{links: on}})")
        backend = self.topology.app.backend
        needs = {"kill-redis-primary": "redis", "restart-redis": "redis", "cut-peer": "cluster", "heal-peer": "cluster"}
        if fault.action in needs and backend != needs[fault.action]:
            out.append(f"action: {fault.action} needs backend {needs[fault.action]}, and this topology's is {backend}")
        known = self.server_ids(until_s=fault.at_s)
        for key in ("server", "peer"):
            value = getattr(fault, key)
            if value is not None and value not in known:
                out.append(f"{key}: {value!r} is not a server of this topology then; choose one of: {', '.join(known)}")
        return out

    def server_ids(self, until_s: float | None = None) -> list[str]:
        """The app servers of the topology, with those added by faults up to `until_s` (all when None)."""
        added = sum(1 for f in self.faults if f.action == "add-server" and (until_s is None or f.at_s < until_s))
        return [f"was-{n}" for n in range(1, self.topology.servers + added + 1)]

    @property
    def label(self) -> str:
        """The claim id, or `-` for a scenario that measures no claim."""
        return self.claim or "-"

    def with_overrides(
        self, *, seed: int | None = None, users: int | None = None, duration_s: float | None = None
    ) -> Scenario:
        """The same scenario with another seed, population size or duration (its timeline scaled to fit)."""
        out = self
        if seed is not None:
            out = dataclasses.replace(out, seed=seed)
        if users is not None:
            out = dataclasses.replace(out, population=_scaled_population(out.population, users))
        if duration_s is not None:
            scale = duration_s / out.duration_s
            faults = tuple(dataclasses.replace(f, at_s=round(f.at_s * scale, 3)) for f in out.faults)
            population = dataclasses.replace(out.population, ramp_s=round(out.population.ramp_s * scale, 3))
            out = dataclasses.replace(out, duration_s=duration_s, faults=faults, population=population)
        problems = out.problems() + [f"population.{p}" for p in out.population.problems()] + out.timeline_problems()
        if problems:
            raise ConfigError([f"{out.source or out.name} (with overrides): {p}" for p in problems])
        return out


def _scaled_population(population: Population, users: int) -> Population:
    def scaled(count: int) -> int:
        return 0 if count == 0 else max(1, round(count * users / population.users))

    return dataclasses.replace(
        population,
        users=users,
        nat_users=scaled(population.nat_users),
        heavy_users=scaled(population.heavy_users),
        tamper_users=scaled(population.tamper_users),
        replay_users=scaled(population.replay_users),
        forge_session_users=scaled(population.forge_session_users),
    )


# --------------------------------------------------------------------------- loading


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate one scenario file; ConfigError listing every problem otherwise."""
    path = Path(path)
    label = str(path)
    data = _read_mapping(path)
    expect_data = data.pop("expect", {})
    data["topology"] = _deep_merge(LAB_TOPOLOGY, data.get("topology") or {})
    sources = dict.fromkeys(data, label)
    problems: list[str] = []
    scenario: Scenario | None = build_dataclass(Scenario, data, "", sources, problems)
    expect = parse_expectations(expect_data, label, problems)
    if scenario is not None and not problems:
        problems += [f"{label}: {p}" for p in scenario.timeline_problems()]
    if problems or scenario is None:
        raise ConfigError(problems or [f"{label}: not a valid scenario"])
    return dataclasses.replace(scenario, name=scenario.name or path.stem, source=label, expect=expect)


def parse_expectations(data: Any, label: str, problems: list[str]) -> tuple[Expectation, ...]:
    """`{metric: "op number"}` as Expectations; problems naming the file, key and value are appended."""
    if not isinstance(data, Mapping):
        problems.append(f"{label}: expect: must map metrics to conditions, like relogins: '> 0'")
        return ()
    out: list[Expectation] = []
    for metric, condition in data.items():
        where = f"{label}: expect.{metric}"
        if metric not in METRICS:
            problems.append(f"{where}: unknown metric; choose one of: {', '.join(METRICS)}")
            continue
        for one in condition if isinstance(condition, list) else [condition]:  # a range: [">= 50", "< 100"]
            parsed = _parse_condition(one)
            if parsed is None:
                ops = ", ".join(OPERATORS)
                problems.append(f"{where}: {one!r} is not a condition; write '<op> <number>' with op one of {ops}")
                continue
            out.append(Expectation(str(metric), *parsed))
    return tuple(out)


def _parse_condition(condition: Any) -> tuple[str, float] | None:
    if isinstance(condition, (int, float)) and not isinstance(condition, bool):
        return "==", float(condition)
    if not isinstance(condition, str):
        return None
    text = condition.strip()
    for op in OPERATORS:  # two-character operators first, so ">=" is not read as ">" and "=0"
        if text.startswith(op):
            try:
                return op, float(text[len(op) :])
            except ValueError:
                return None
    return None


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the scenario file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the scenario file is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a scenario must be a mapping with topology, population, steps, faults, expect")
    return data


def _deep_merge(base: Mapping[str, Any], over: Any) -> Any:
    """`over` on top of `base`, mapping by mapping; a non-mapping `over` is left for the validator to report."""
    if not isinstance(over, Mapping):
        return over
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _deep_merge(base[key], value) if isinstance(base.get(key), Mapping) else value
    return merged


# --------------------------------------------------------------------------- finding files


# The scenarios shipped in the package: in a checkout a link to configs/scenarios, in a wheel a copy.
PACKAGED_SCENARIOS = Path(__file__).parent / "scenarios"


def scenario_dirs() -> list[Path]:
    """Where scenario names are looked up: ./configs/scenarios, then the ones shipped in the package."""
    here = Path("configs") / "scenarios"  # relative, so reports name the file as the user would
    return [here] if here.resolve() == PACKAGED_SCENARIOS.resolve() else [here, PACKAGED_SCENARIOS]


def find_scenario(name: str) -> Path:
    """A scenario file from a path, a file name without .yaml, or a claim id (C6); ConfigError listing choices."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return Path(name)
    known: dict[str, Path] = {}
    for directory in scenario_dirs():
        for path in sorted(directory.glob("*.yaml")):
            known.setdefault(path.stem, path)
    if name in known:
        return known[name]
    by_claim = [p for stem, p in known.items() if stem.split("-", 1)[0].upper() == _claim_prefix(name)]
    if len(by_claim) == 1:
        return by_claim[0]
    if by_claim:  # B7 is one claim measured by several files (one per balance factor)
        names = ", ".join(p.stem for p in by_claim)
        raise ConfigError(f"scenario {name!r}: this claim has {len(by_claim)} files; choose one of: {names}")
    choices = ", ".join(known) or f"none found in {', '.join(str(d) for d in scenario_dirs())}"
    raise ConfigError(
        f"scenario {name!r}: no such file or claim; choose a file, a claim id ({claim_families()}) or: {choices}"
    )


def _claim_prefix(name: str) -> str:
    """`C6` -> `C06`, the prefix of claim files (c06-...), so that c1 and c10 are not confused."""
    match = _CLAIM_ID.fullmatch(name)
    return f"{match.group(1).upper()}{int(match.group(2)):02d}" if match else name.upper()
