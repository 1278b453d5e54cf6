"""Play a scenario against a running lab: users through its balancer, faults through its control API.

Both `lbsession scenario` (on a lab of its own, see lbsession.lab.runner) and a lab
playing a scenario on itself (lbsession.lab.live) come here. It speaks to the lab
only over HTTP, so it imports no topology: whoever started the processes, the run
is the same.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from lbsession.balancer.strategies import create_strategy
from lbsession.lab.balancers import client_cookie
from lbsession.lab.faults import AdminClient, run_timeline
from lbsession.lab.measures import AppliedFault, RunData, UserOutcome, compute_metrics, named_users, per_server
from lbsession.lab.report import Progress, RunReport
from lbsession.lab.scenario import Scenario
from lbsession.lab.users import Record, VirtualUser, plan_population

ProgressCallback = Callable[[Progress], None]
TICK_S = 0.2  # how often the progress bar is redrawn
SAMPLE_S = 0.02  # how often the balancer's in-flight requests are sampled


async def drive(
    scenario: Scenario,
    admin_url: str,
    *,
    on_progress: ProgressCallback | None = None,
    target: str | None = None,
    lb_url: str | None = None,
    token: str | None = None,
) -> RunReport:
    """Play the population and the fault timeline against the lab whose admin API is at `admin_url`."""
    admin = AdminClient(admin_url, token)  # token None: LBSESSION_BALANCER__ADMIN_TOKEN's, if set
    try:
        status_before = await admin.status()
        topology_before = await admin.topology()
        servers = [s["id"] for s in status_before["servers"]]
        started = time.monotonic()
        records, users, applied, in_flight = await _play(
            scenario, admin, status_before, lb_url or status_before["url"], on_progress
        )
        wall_s = time.monotonic() - started
        status_after = await admin.status()
        topology_after = await admin.topology()
        store_counts = await store_counters(topology_after)
    finally:
        await admin.close()
    routes = _routes_delta(status_before, status_after)
    counters, counter_notes = strategy_counters_delta(status_before, status_after)
    outcomes = [_outcome(user) for user in users]
    data = RunData(
        records, outcomes, applied, servers, routes, topology_before, topology_after, in_flight, store_counts,
        counters,
    )  # fmt: skip
    backend = (topology_before or {}).get("backend") or scenario.topology.app.backend
    report = RunReport(
        scenario=scenario,
        strategy=status_before["strategy"],
        backend=str(backend),
        target=target,
        metrics=compute_metrics(data),
        per_server=per_server(records, servers),
        routes=routes,
        faults=applied,
        setup_s=0.0,
        wall_s=wall_s,
        servers=len(servers),
        sample_cookie=next((u.sample_cookie for u in users if u.sample_cookie), None),
        notes=mismatch_notes(scenario, status_before["strategy"], str(backend), status_before.get("strategy_settings"))
        if target
        else [],
        balancer=str(status_before.get("balancer", "lbsession")),
        named_users=named_users(outcomes),
    )
    report.notes += [str(note) for note in status_before.get("notes", [])] + counter_notes
    report.evaluate(scenario.expect, unseen=status_before.get("unseen"))
    return report


async def _play(
    scenario: Scenario,
    admin: AdminClient,
    status: dict[str, Any],
    lb_url: str,
    on_progress: ProgressCallback | None,
) -> tuple[list[Record], list[VirtualUser], list[AppliedFault], list[dict[str, int]]]:
    """The users, the faults and the in-flight samples, from time 0 to the end of the scenario's duration."""
    servers = [s["id"] for s in status["servers"]]
    origin = time.perf_counter()

    def clock() -> float:  # not loop.time(): uvloop's counts whole milliseconds, too coarse for latencies
        return time.perf_counter() - origin

    records: list[Record] = []
    applied: list[AppliedFault] = []
    plans = plan_population(scenario.population, scenario.steps, scenario.seed, scenario.duration_s)
    # The balancer in front declares its cookie: lbsession's through its strategy, a real one through its view.
    cookie, cookie_format = client_cookie(status, scenario.topology.balancer.sticky.cookie_name)
    session_cookie = scenario.topology.app.session.cookie_name
    users = [
        VirtualUser(plan, scenario.steps, lb_url, clock, records, sticky_cookie=cookie, cookie_format=cookie_format,
                    server_ids=servers, session_cookie=session_cookie)
        for plan in plans
    ]  # fmt: skip
    deadline = Deadline(scenario.duration_s, scenario.settle_s, pending=bool(scenario.faults))
    timeline = asyncio.create_task(run_timeline(admin, scenario.faults, clock, applied))
    timeline.add_done_callback(lambda _: deadline.faults_done(clock()))
    ticker = asyncio.create_task(_tick(scenario, clock, records, applied, on_progress))
    in_flight: list[dict[str, int]] = []
    sampler = asyncio.create_task(_sample_in_flight(admin, in_flight))
    try:
        await asyncio.gather(*(user.run(deadline) for user in users))
        await timeline
    finally:
        for task in (timeline, ticker, sampler):
            task.cancel()
        await asyncio.gather(timeline, ticker, sampler, return_exceptions=True)
    return records, users, applied, in_flight


async def _sample_in_flight(admin: AdminClient, samples: list[dict[str, int]]) -> None:
    """Every SAMPLE_S, the balancer's in-flight requests per healthy server (what bounded loads cap)."""
    while True:
        status = await admin.status()
        samples.append({s["id"]: int(s["in_flight"]) for s in status["servers"] if s.get("healthy")})
        await asyncio.sleep(SAMPLE_S)  # a sampling period, not a wait for readiness


class Deadline:
    """When the traffic stops: the scenario's duration, stretched so that `settle_s` of traffic follows the faults.

    Applying a fault takes a time that depends on the machine (starting a server
    imports aiohttp); a fixed duration would leave a slow machine no traffic to
    measure the fault's effect with. Until the last fault is applied, no user stops.
    """

    def __init__(self, duration_s: float, settle_s: float, *, pending: bool) -> None:
        self.end_s = duration_s
        self.settle_s = settle_s
        self.pending = pending

    def __call__(self) -> float:
        return math.inf if self.pending else self.end_s

    def faults_done(self, now_s: float) -> None:
        """The timeline is over: traffic goes on until the duration, or `settle_s` from now if that is later."""
        self.pending = False
        self.end_s = max(self.end_s, now_s + self.settle_s)


async def _tick(
    scenario: Scenario,
    clock: Callable[[], float],
    records: list[Record],
    applied: list[AppliedFault],
    on_progress: ProgressCallback | None,
) -> None:
    if on_progress is None:
        return
    while True:
        relogins = sum(1 for r in records if r.relogin)
        done = sum(1 for f in applied if f.applied_s is not None)
        label = f"{scenario.label} {scenario.name}"
        on_progress(Progress(label, clock(), scenario.duration_s, len(records), relogins, done))
        await asyncio.sleep(TICK_S)


def _routes_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """The balancer's routing decisions during the run, by reason (new, pinned, redispatched...)."""
    then = before["counters"]["routes"]
    return {reason: count - then.get(reason, 0) for reason, count in after["counters"]["routes"].items()}


COUNTED = ("decisions", "bound_violations", "bound_fallbacks")  # counts of the strategy's audit, taken as deltas


def strategy_counters_delta(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """What the strategy counted during the run (GET /status `strategy_counters`), and what to note of it.

    Counts are deltas; a worst value cannot be, so it covers the decisions before the run too,
    which a lab serving traffic before the run (`--target`, a live lab) says in a note.
    """
    then, now = before.get("strategy_counters") or {}, after.get("strategy_counters")
    if not now:
        return None, []
    if before.get("strategy") != after.get("strategy") or then.get("decisions", 0) > now.get("decisions", 0):
        then = {}  # the strategy was built again during the run (switched, reloaded): its counts began again
    delta = {
        key: value - (then.get(key) or 0) if key in COUNTED and isinstance(value, int) else value
        for key, value in now.items()
    }
    earlier = then.get("decisions") or 0
    if not earlier or now.get("decision_imbalance_max") is None:
        return delta, []
    return delta, [f"decision_imbalance_max includes the {earlier} routing decisions made before this run"]


def _outcome(user: VirtualUser) -> UserOutcome:
    return UserOutcome(
        index=user.plan.index,
        name=user.plan.name,
        relogins=user.relogins,
        tampered=user.tampered,
        cookie_checks=user.cookie_checks,
        cookie_matches=user.cookie_matches,
        cart_acked=user.cart_acked,
        cart_seen=user.cart_seen,
        prefs_acked=user.prefs_acked,
        prefs_seen=user.prefs_seen,
        replayed=bool(user.replays.logged_out_s),
        replays_accepted=user.replays.accepted,
        replays_refused=user.replays.refused,
        replay_window_s=user.replays.window_s,
        forged_answers=dict(user.forged_answers),
        ws_reconnects=user.ws_reconnects,
        pinned_server=user.pinned_server(),
    )


STORE_COUNTERS = ("forged", "revoked", "too_large")  # what a client-side store counts and shows on /healthz


async def store_counters(topology: dict[str, Any] | None) -> dict[str, int] | None:
    """The stores' own counters, summed over the running app servers' /healthz; None when they cannot be asked.

    Only a lab that lists its servers (GET /topology) can be asked, and only if the servers are reachable
    from here (not in containers): then None, and the metrics that need it are not measured.
    """
    servers = [s for s in (topology or {}).get("servers", []) if s.get("pid")]
    if not servers:
        return None
    totals = dict.fromkeys(STORE_COUNTERS, 0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as http:
        for server in servers:
            try:
                async with http.get(server["url"] + "/healthz") as response:
                    facts = await response.json()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return None
            for key in STORE_COUNTERS:
                totals[key] += int(facts.get(key) or 0)
    return totals


def mismatch_notes(
    scenario: Scenario, strategy: str, backend: str, settings: dict[str, Any] | None = None
) -> list[str]:
    """Against a running lab, say where it differs from the topology the scenario was written for.

    `settings` are the running strategy's (GET /status `strategy_settings`); None: not known, not compared.
    """
    wanted = scenario.topology
    notes = []
    if wanted.balancer.strategy != strategy:
        notes.append(f"the target's strategy is {strategy}; the scenario was written for {wanted.balancer.strategy}")
    elif settings is not None:
        written = create_strategy(wanted.balancer).describe()
        notes += [
            f"the target's {key} is {settings.get(key)}; the scenario was written for {value}"
            for key, value in written.items()
            if settings.get(key) != value
        ]
    if wanted.app.backend != backend:
        notes.append(f"the target's backend is {backend}; the scenario was written for {wanted.app.backend}")
    return notes
