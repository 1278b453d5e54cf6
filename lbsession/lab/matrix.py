"""`lbsession matrix`: every strategy x every store, then every claim's own scenario, in one table.

The first part is the grid: the standard population (configs/scenarios/standard.yaml)
on every registered strategy x every registered store, without a fault. Three cells are claims of
the seed and have files of their own, with the same population: C1 (round-robin +
local), C2 (sticky-cookie + local) and C3 (ip-hash + local). Every other cell is
checked against the theory, from what each plug-in declares of itself: a session
survives a change of server when the store is `shared` (or replicated); otherwise
only a strategy that `pins` a user to one server avoids the re-login.

The second part is every other scenario file with a claim (C4..C12, then B1..),
each with its own topology, population, faults and expectations. A scenario that
lists `backends` (B6) is run once on each, and its victims' re-logins are judged by
the theory again: the users of a killed server keep their sessions exactly when
the store is shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import secrets
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lbsession import __version__
from lbsession.appserver.stores import STORES, store_class
from lbsession.balancer.strategies import STRATEGIES, strategy_class
from lbsession.errors import ConfigError, LBSessionError
from lbsession.lab.balancers import front_class
from lbsession.lab.forks import Forks
from lbsession.lab.link_service import LinkService
from lbsession.lab.measures import METRICS
from lbsession.lab.report import FAIL, NO_CLAIM, PASS, ProgressBar, RunReport
from lbsession.lab.runner import lab_config, run_scenario
from lbsession.lab.scenario import (
    CLAIM_FAMILIES,
    CLAIM_PATTERN,
    FAULT_ACTIONS,
    Expectation,
    Scenario,
    load_scenario,
    scenario_dirs,
)

SCHEMA_ID = "lbsession-matrix/1"
SCHEMA_TEMPLATE = Path(__file__).with_name("matrix.schema.json")
CELL_CLAIMS = ("C1", "C2", "C3")  # the seed's claims that are a cell of the grid
ERROR = "ERROR"


def theory(strategy: str, backend: str) -> tuple[Expectation, ...]:
    """What the seed predicts for a cell of the grid: re-logins, or none."""
    if store_class(backend).shared or strategy_class(strategy).pins:
        return (Expectation("relogins", "==", 0),)
    return (Expectation("relogins", ">", 0),)


def fault_theory(backend: str) -> Expectation:
    """What the seed predicts for the users of a killed server: all log in again, or none (a shared store)."""
    return Expectation("victim_relogin_share", "==", 0 if store_class(backend).shared else 1)


@functools.cache
def _schema_template() -> str:
    return SCHEMA_TEMPLATE.read_text(encoding="utf-8")


def matrix_schema() -> dict[str, Any]:
    """The JSON schema of the matrix document, its strategy and store names taken from the registries.

    matrix.schema.json is the template; the enums of names are filled in here, at run time,
    so a new plug-in is valid in the document without anyone editing the schema; so are the
    claim ids, from the pattern the scenario files are checked with.
    """
    schema: dict[str, Any] = json.loads(_schema_template())
    topology = schema["$defs"]["run"]["properties"]["topology"]["properties"]
    topology["strategy"] = {"enum": list(STRATEGIES)}
    topology["backend"] = {"enum": list(STORES)}
    schema["$defs"]["fault"]["properties"]["action"] = {"enum": list(FAULT_ACTIONS)}
    claim = {"type": "string", "pattern": CLAIM_PATTERN.pattern}  # every family of CLAIM_FAMILIES
    schema["properties"]["claims"]["propertyNames"] = claim
    schema["$defs"]["run"]["properties"]["claim"] = {"anyOf": [claim, {"type": "null"}]}
    return schema


def load_directory(directory: Path | None = None) -> list[Scenario]:
    """Every scenario file of `directory` (default: the first configs/scenarios found), all validated."""
    directory = directory or next((d for d in scenario_dirs() if d.is_dir()), None)
    if directory is None or not directory.is_dir():
        raise ConfigError(f"no scenario directory: looked in {', '.join(str(d) for d in scenario_dirs())}")
    scenarios: list[Scenario] = []
    problems: list[str] = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            scenarios.append(load_scenario(path))
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return scenarios


def matrix_plan(scenarios: Sequence[Scenario], only: Sequence[str] = ()) -> list[Scenario]:
    """The runs of the matrix, in order: the grid, then the claims; `only` keeps those it names."""
    standard = next((s for s in scenarios if s.name == "standard"), None)
    if standard is None:
        raise ConfigError("the scenario directory has no standard.yaml, the grid's population")
    grid = [_cell(standard, scenarios, strategy, backend) for backend in STORES for strategy in STRATEGIES]
    claims = sorted((s for s in scenarios if s.claim and s.claim not in CELL_CLAIMS), key=_claim_order)
    claims = [run for s in claims for run in _across_backends(s)]
    plan = grid + claims
    if only:
        plan = [s for s in plan if any(_selects(word, s) for word in only)]
        if not plan:
            raise ConfigError(f"--only {' '.join(only)}: selects no run; give claim ids (C6) or scenario names")
    return plan


def _cell(standard: Scenario, scenarios: Sequence[Scenario], strategy: str, backend: str) -> Scenario:
    for s in scenarios:
        if s.claim in CELL_CLAIMS and (s.topology.balancer.strategy, s.topology.app.backend) == (strategy, backend):
            return s
    topology = standard.topology
    topology = dataclasses.replace(
        topology,
        balancer=dataclasses.replace(topology.balancer, strategy=strategy),
        app=dataclasses.replace(topology.app, backend=backend),
    )
    expect = theory(strategy, backend)
    title = f"{strategy} + {backend}: {'re-logins' if expect[0].op == '>' else 'no re-login'}, by the theory"
    return dataclasses.replace(
        standard, name=f"grid-{strategy}-{backend}", title=title, topology=topology, expect=expect
    )


def _across_backends(scenario: Scenario) -> list[Scenario]:
    """The scenario as written, or once per backend it lists, with the theory's expectation for each."""
    if not scenario.backends:
        return [scenario]
    runs = []
    for backend in scenario.backends:
        theory = fault_theory(backend)
        expect = (*(e for e in scenario.expect if e.metric != theory.metric), theory)
        app = dataclasses.replace(scenario.topology.app, backend=backend)
        topology = dataclasses.replace(scenario.topology, app=app)
        name = f"{scenario.name}-{backend}"
        runs.append(dataclasses.replace(scenario, name=name, topology=topology, expect=expect))
    return runs


def _claim_order(scenario: Scenario) -> tuple[int, int]:
    claim = scenario.claim or "C0"
    return list(CLAIM_FAMILIES).index(claim[0]), int(claim[1:])  # the seed's claims first, then B, then F


def _selects(word: str, scenario: Scenario) -> bool:
    families = "".join(CLAIM_FAMILIES)
    if re.fullmatch(rf"[{families}]\d{{1,2}}", word, re.IGNORECASE):
        return (scenario.claim or "").upper() == word.upper()
    if re.fullmatch(rf"[{families}]", word, re.IGNORECASE):  # a whole family: --only F
        return (scenario.claim or "").upper().startswith(word.upper())
    return word in scenario.name


async def run_matrix(
    plan: Sequence[Scenario], *, progress: ProgressBar | None = None, balancers: Sequence[str] = ("lbsession",)
) -> tuple[list[RunReport], float]:
    """Run every scenario of `plan` through each of `balancers`, each on its own topology; reports and wall time.

    A real balancer's run is compared with lbsession's own on the same scenario (`agrees`).
    The runs share one links process, cleared after each, and fork their first app servers from
    one warm parent (lbsession.lab.forks): each run is spared four Python starts and a stop.
    """
    started = time.monotonic()
    reports: list[RunReport] = []
    runs = [(scenario, balancer) for scenario in plan for balancer in balancers]
    async with contextlib.AsyncExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lbsession-matrix-")))
        links = LinkService(log_dir / "links.log", secrets.token_urlsafe(32))
        stack.push_async_callback(links.stop)
        forks = Forks(log_dir / "forks.log")
        stack.push_async_callback(forks.stop)
        await _run_all(runs, reports, links, forks, progress)
    return reports, time.monotonic() - started


async def _run_all(
    runs: Sequence[tuple[Scenario, str]],
    reports: list[RunReport],
    links: LinkService,
    forks: Forks,
    progress: ProgressBar | None,
) -> None:
    """Each run of `runs` in turn, its report appended to `reports`."""
    for index, (scenario, balancer) in enumerate(runs, 1):
        run_started = time.monotonic()
        refused = [] if balancer == "lbsession" else front_class(balancer).refusals(lab_config(scenario))
        if refused:  # a setting this balancer lacks: nothing to judge, and not its failure
            report = failed_run(scenario, f"{balancer} cannot run it: " + "; ".join(refused), balancer, NO_CLAIM)
        else:
            try:
                report = await run_scenario(scenario, on_progress=progress, balancer=balancer, links=links, forks=forks)
            except LBSessionError as exc:  # one lab that cannot start must not cost the other runs
                report = failed_run(scenario, str(exc), balancer)
        if balancer != "lbsession" and not refused:
            own = next((r for r in reports if r.scenario.name == scenario.name and r.balancer == "lbsession"), None)
            report.agrees = agreement(report, own)
        reports.append(report)
        if progress is not None:
            took = time.monotonic() - run_started
            name = scenario.name + ("" if balancer == "lbsession" else f" via {balancer}")
            progress.finish(f"[{index:2}/{len(runs)}] {scenario.label:<4} {report.verdict:<5} {name} ({took:.1f} s)")


def agreement(report: RunReport, own: RunReport | None) -> str | None:
    """Do a real balancer's verdict and headline figure (re-logins or none) agree with lbsession's on the scenario?"""
    if own is None:
        return None

    def relogged(r: RunReport) -> bool:
        return bool(r.metrics.get("relogins"))

    if report.verdict == own.verdict and relogged(report) == relogged(own):
        return "yes"
    figures = f"re-logins {report.metrics.get('relogins')} vs {own.metrics.get('relogins')}"
    if any(note.startswith("expected difference") for note in report.notes):
        return f"no, as expected ({figures}; see its note)"
    return f"no ({figures}; {report.verdict} vs {own.verdict})"


def failed_run(scenario: Scenario, error: str, balancer: str = "lbsession", verdict: str = ERROR) -> RunReport:
    """The report of a run whose lab could not be started or reached (or, verdict `-`, was not tried)."""
    report = RunReport(
        scenario=scenario,
        strategy=scenario.topology.balancer.strategy,
        backend=scenario.topology.app.backend,
        target=None,
        metrics=dict.fromkeys(METRICS),
        per_server={},
        routes={},
        faults=[],
        setup_s=0.0,
        wall_s=0.0,
        servers=scenario.topology.servers,
        notes=[f"the run did not happen: {error}"],
        balancer=balancer,
    )
    report.verdict = verdict
    return report


def matrix_document(reports: Sequence[RunReport], wall_s: float, overrides: dict[str, Any]) -> dict[str, Any]:
    """The matrix as JSON, as lbsession/lab/matrix.schema.json describes it."""
    claims: dict[str, str] = {}
    for report in reports:
        claim = report.scenario.claim
        if claim is not None and report.verdict != NO_CLAIM:  # a run not tried judges no claim
            claims[claim] = FAIL if claims.get(claim, PASS) != PASS else report.verdict
    judged = [r.verdict for r in reports if r.verdict != "-"]
    return {
        "schema": SCHEMA_ID,
        "lbsession_version": __version__,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(wall_s, 3),
        "overrides": overrides,
        "verdict": PASS if all(v == PASS for v in judged) else FAIL,
        "claims": claims,
        "runs": [r.as_dict() for r in reports],
    }
