"""Run one scenario: on a topology of its own, or against a running lab (`--target ADMIN_URL`).

Either way the run speaks to the lab only over HTTP: users through the
balancer's public URL, faults and counters through its admin URL. A scenario's
own topology is started with the same Topology class as `lbsession run`, so the
only difference between the two is who started the processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import tempfile
import time
from pathlib import Path

from lbsession.config import Config
from lbsession.lab.balancers.expected import expected_for
from lbsession.lab.drive import ProgressCallback, drive
from lbsession.lab.forks import Forks
from lbsession.lab.link_service import LinkService
from lbsession.lab.report import Progress, RunReport
from lbsession.lab.scenario import Scenario
from lbsession.lab.topology import Topology


def lab_config(scenario: Scenario) -> Config:
    """The scenario's topology, with a sticky secret of its own (no warning about a random one)."""
    config = scenario.topology
    if config.balancer.sticky.secret is None:
        sticky = dataclasses.replace(config.balancer.sticky, secret=secrets.token_urlsafe(24))
        config = dataclasses.replace(config, balancer=dataclasses.replace(config.balancer, sticky=sticky))
    return config


async def run_scenario(
    scenario: Scenario,
    *,
    target: str | None = None,
    lb_url: str | None = None,
    log_dir: Path | None = None,
    on_progress: ProgressCallback | None = None,
    balancer: str = "lbsession",
    links: LinkService | None = None,
    forks: Forks | None = None,
) -> RunReport:
    """Run `scenario` and return its report; against `target` (an admin URL) or on a topology of its own.

    `lb_url` is where users reach the target's balancer, when that differs from the URL the
    balancer reports about itself (in containers, it knows itself as 127.0.0.1). `balancer`
    is the one a topology of its own puts in front (lbsession.lab.balancers); its run is
    judged against that balancer's documented behaviour (lbsession.lab.balancers.expected).
    `links` is a links process to reuse for the topology's links, `forks` a warm parent to fork
    its first app servers from (lbsession.lab.forks); the caller stops both.
    """
    if target is not None:
        return await drive(scenario, target, on_progress=on_progress, target=target, lb_url=lb_url)
    scenario, differences = expected_for(balancer, scenario)
    started = time.monotonic()
    if on_progress is not None:  # starting a lab with Redis and Sentinels takes a few seconds: say so
        on_progress(Progress(f"{scenario.label} {scenario.name} (starting the lab)", 0.0, scenario.duration_s, 0, 0, 0))
    with contextlib.ExitStack() as stack:
        if log_dir is None:  # the processes' logs matter only while they run, unless asked to keep them
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lbsession-scenario-")))
        async with Topology(
            lab_config(scenario), log_dir=log_dir, balancer=balancer, links=links, forks=forks
        ) as topology:
            setup_s = time.monotonic() - started
            report = await drive(scenario, topology.admin_url, on_progress=on_progress)
    report.setup_s = setup_s
    report.notes += differences
    return report
