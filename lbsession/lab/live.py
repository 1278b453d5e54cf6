"""Scenarios that a lab managed by `lbsession run` plays against itself, started from its admin API.

    GET  /scenarios          the scenario files (configs/scenarios/): name, claim, title, topology, faults
    POST /scenarios          {"name": "C6", "duration_s": 2, "users": 12}: play it against this lab, in the background
    GET  /scenarios/current  the run in progress, or the last one: live counters, then its report and verdict

A run is what `lbsession scenario C6 --target <admin URL>` does from another
terminal: users through this lab's balancer, faults through its admin API. So the
faults act on this lab (C6 kills its was-1), which is the point: the dashboard
shows them happen. One run at a time; the lab's topology is left as it is, and
where it differs from the one the scenario was written for, the run says so.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from lbsession.balancer.admin import json_error, read_json
from lbsession.balancer.strategies import create_strategy
from lbsession.errors import ConfigError
from lbsession.lab.drive import drive, mismatch_notes
from lbsession.lab.measures import balance
from lbsession.lab.report import Progress, RunReport
from lbsession.lab.scenario import Scenario, find_scenario, load_scenario, scenario_dirs

if TYPE_CHECKING:
    from lbsession.lab.control import BalancerView, LabControl

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # a file's stem or a claim id, never a path
REPORTED_METRICS = (
    "users", "requests", "relogins", "relogin_users", "errors_5xx", "errors_network",
    "imbalance", "cv", "p50_ms", "p99_ms", "stall_s",
)  # fmt: skip


def available_scenarios() -> dict[str, Scenario | str]:
    """Every scenario file by name (its stem); one that does not load maps to what is wrong with it."""
    found: dict[str, Scenario | str] = {}
    for directory in scenario_dirs():
        for path in sorted(directory.glob("*.yaml")):
            if path.stem not in found:
                try:
                    found[path.stem] = load_scenario(path)
                except ConfigError as exc:
                    found[path.stem] = str(exc)
    return found


@dataclass
class LiveRun:
    """One scenario played against the lab: its counters while it runs, then its report."""

    scenario: Scenario
    notes: list[str]  # where the lab differs from the topology the scenario was written for
    baseline: dict[str, int]  # requests per server the balancer had counted when the run started
    started_s: float = field(default_factory=time.monotonic)
    progress: Progress | None = None
    report: RunReport | None = None
    error: str | None = None
    task: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        """running, done (with a report) or failed (with an error)."""
        if self.error is not None:
            return "failed"
        return "running" if self.report is None else "done"

    def as_dict(self, balancer: BalancerView) -> dict[str, Any]:
        """The run for GET /scenarios/current: live counters, then the report's metrics and verdict."""
        s, p = self.scenario, self.progress
        served = {sid: max(0, n - self.baseline.get(sid, 0)) for sid, n in balancer.served().items()}
        out: dict[str, Any] = {
            "state": self.state,
            **summary(s),
            "elapsed_s": round(p.elapsed_s if p else time.monotonic() - self.started_s, 2),
            "requests": p.requests if p else 0,
            "relogins": p.relogins if p else 0,
            "faults_applied": p.faults_applied if p else 0,
            "imbalance": balance(served)["imbalance"],  # the balancer's count so far; the report's replaces it
            "notes": self.notes,
            "error": self.error,
        }
        return out if self.report is None else {**out, **finished(self.report, self.notes)}


def summary(scenario: Scenario) -> dict[str, Any]:
    """What a scenario is: its claim, title, the topology it was written for, its faults."""
    topology = scenario.topology
    return {
        "name": scenario.name,
        "claim": scenario.claim,
        "title": scenario.title,
        "strategy": topology.balancer.strategy,
        "strategy_settings": create_strategy(topology.balancer).describe(),  # the sticky mode, the balance factor
        "backend": topology.app.backend + (" ha" if topology.redis_server.ha else ""),
        "servers": topology.servers,
        "users": scenario.population.users,
        "duration_s": scenario.duration_s,
        "has_faults": bool(scenario.faults),
        "faults": [f"{fault.describe()} at {fault.at_s:g} s" for fault in scenario.faults],
    }


def finished(report: RunReport, notes: list[str]) -> dict[str, Any]:
    """A finished run's key measurements, checks and verdict."""
    m = report.metrics
    return {
        "elapsed_s": round(report.wall_s, 2),
        "requests": m["requests"],
        "relogins": m["relogins"],
        "faults_applied": sum(1 for f in report.faults if f.applied_s is not None),
        "imbalance": m["imbalance"],
        "verdict": report.verdict,
        "metrics": {name: m.get(name) for name in REPORTED_METRICS},
        "per_server": report.per_server,
        "fault_results": [f.as_dict() for f in report.faults],
        "checks": [c.as_dict() for c in report.checks],
        "notes": report.notes + [note for note in notes if note not in report.notes],
    }


class LiveScenarios:
    """The scenario routes of a managed lab, and the one run they may have going."""

    def __init__(self, control: LabControl) -> None:
        self.control = control
        self.run: LiveRun | None = None

    def add_routes(self, app: web.Application) -> None:
        """Add GET/POST /scenarios and GET /scenarios/current to the admin application."""
        app.router.add_get("/scenarios", self._list)
        app.router.add_post("/scenarios", self._start)
        app.router.add_get("/scenarios/current", self._current)

    async def cancel(self) -> None:
        """Stop a run in progress (the lab is stopping); its users and timeline end with it."""
        task = self.run.task if self.run is not None else None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def lab_notes(self, scenario: Scenario) -> list[str]:
        """Where this lab differs from the topology `scenario` was written for."""
        topology, balancer = self.control.topology, self.control.view
        config = topology.config
        settings = topology.lb.strategy.describe() if topology.lb is not None else None
        notes = mismatch_notes(scenario, balancer.strategy_name(), config.app.backend, settings)
        wanted = scenario.topology
        servers = len(balancer.served())
        if servers != wanted.servers:
            notes.append(f"the target has {servers} servers; the scenario was written for {wanted.servers}")
        if wanted.redis_server.ha and not (topology.redis is not None and config.redis_server.ha):
            notes.append("the scenario was written for Redis with a replica and Sentinel (run --redis-ha)")
        return notes

    async def _list(self, request: web.Request) -> web.Response:
        entries: list[dict[str, Any]] = []
        # Reading and validating every file takes tens of ms: off the loop that also runs the proxy.
        for name, scenario in (await asyncio.to_thread(available_scenarios)).items():
            if isinstance(scenario, str):
                entries.append({"name": name, "error": scenario})
            else:
                entries.append({**summary(scenario), "notes": self.lab_notes(scenario)})
        return web.json_response({"scenarios": entries})

    async def _current(self, request: web.Request) -> web.Response:
        if self.run is None:
            return web.json_response({"state": "idle"})
        return web.json_response(self.run.as_dict(self.control.view))

    async def _start(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        try:
            scenario = await asyncio.to_thread(_chosen, body)
        except _UnknownScenario as exc:
            known = await asyncio.to_thread(available_scenarios)
            names = [name for name, s in known.items() if not isinstance(s, str)]
            return web.json_response({"error": str(exc), "scenarios": names}, status=404)
        except ConfigError as exc:
            return json_error(400, str(exc))
        if self.run is not None and self.run.state == "running":
            running = self.run.scenario.name
            return json_error(409, f"{running} is running; wait for its verdict (GET /scenarios/current)")
        view = self.control.view
        run = LiveRun(scenario, self.lab_notes(scenario), view.served())
        run.task = asyncio.create_task(self._play(run), name=f"scenario-{scenario.name}")
        self.run = run
        log.info("playing scenario %s against this lab", scenario.name)
        return web.json_response(run.as_dict(view), status=202)

    async def _play(self, run: LiveRun) -> None:
        control = self.control

        def on_progress(progress: Progress) -> None:
            run.progress = progress

        try:
            run.report = await drive(
                run.scenario, control.url, on_progress=on_progress, target=control.url, lb_url=control.view.url,
                token=control.config.admin_token,
            )  # fmt: skip
        except asyncio.CancelledError:
            run.error = "stopped before its end: the lab is shutting down"
            raise
        except Exception as exc:  # a task's error would otherwise be lost: the page shows it instead
            log.exception("scenario %s failed", run.scenario.name)
            run.error = f"{type(exc).__name__}: {exc}"


class _UnknownScenario(LookupError):
    """No scenario file by that name or claim id."""


def _chosen(body: dict[str, Any]) -> Scenario:
    """The scenario a POST names, with its overrides; _UnknownScenario or ConfigError saying what is wrong."""
    name, duration_s, users = body.get("name"), body.get("duration_s"), body.get("users")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError('give {"name": "C6"}: a claim id or a file name of configs/scenarios, without .yaml')
    if duration_s is not None and (isinstance(duration_s, bool) or not isinstance(duration_s, (int, float))):
        raise ConfigError('"duration_s" must be a number of seconds')
    if users is not None and (isinstance(users, bool) or not isinstance(users, int)):
        raise ConfigError('"users" must be a whole number')
    try:
        path = find_scenario(name)
    except ConfigError as exc:
        raise _UnknownScenario(str(exc)) from None
    return load_scenario(path).with_overrides(duration_s=duration_s, users=users)
