"""Faults on a timeline, applied only through the admin HTTP API of a running lab.

Nothing here touches a process directly: a fault is a request to the admin
listener of `lbsession run` (or of a scenario's own topology, which is the same
code), so every scenario also runs against a lab started in another terminal.

    kill-server          POST   /servers/{id}/kill            SIGKILL an app server
    restart-server       POST   /servers/{id}/restart         start it again on its port
    add-server           POST   /topology/servers             one more app server behind the balancer
    drain-server         POST   /servers/{id}/drain           no new clients (HAProxy's drain)
    undrain-server       POST   /servers/{id}/drain           new clients again ({"draining": false})
    deploy-server        POST   /servers/{id}/deploy          drain, out of rotation, wait in flight, restart, undrain
    remove-server        DELETE /servers/{id}                 out of the balancer
    kill-redis-primary   POST   /redis/primary/kill           SIGKILL the current Redis primary
    restart-redis        POST   /redis/{node}/restart         restart a Redis node (HA: a synced replica; empty: true)
    cut-peer             POST   /servers/{id}/cluster/cut     stop replication from a server to a peer
    heal-peer            POST   /servers/{id}/cluster/heal    resume it
    set-strategy         PUT    /strategy                     switch the balancer's strategy
    set-link             PUT    /links/{name}                 latency, blackhole, down, reset... (for_s: then heal)
    heal-link            DELETE /links/{name}                 clear every fault of a link
    partition            POST   /partitions                   cut a set of links both ways (for_s: then heal)
    heal-partition       DELETE /partitions/{name}            end it
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import aiohttp

from lbsession.errors import TopologyError
from lbsession.lab.measures import AppliedFault
from lbsession.lab.scenario import Fault

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "LBSESSION_BALANCER__ADMIN_TOKEN"  # balancer.admin_token, for a lab bound beyond loopback
ADMIN_TIMEOUT_S = 30.0  # a restart waits for the server's health check, a Redis restart for its load


def fault_request(fault: Fault) -> tuple[str, str, dict[str, Any]]:
    """The admin API call (method, path, JSON body) that applies `fault`.

    Every change is sent as JSON, `{}` when it has nothing to say: the admin API
    refuses anything else, so that a web page cannot make a browser change the lab.
    """
    server = fault.server or ""
    calls: dict[str, tuple[str, str, dict[str, Any]]] = {
        "kill-server": ("POST", f"/servers/{server}/kill", {}),
        "restart-server": ("POST", f"/servers/{server}/restart", {}),
        "add-server": ("POST", "/topology/servers", {}),
        "drain-server": ("POST", f"/servers/{server}/drain", {"draining": True}),
        "undrain-server": ("POST", f"/servers/{server}/drain", {"draining": False}),
        "deploy-server": ("POST", f"/servers/{server}/deploy", {}),
        "remove-server": ("DELETE", f"/servers/{server}", {}),
        "kill-redis-primary": ("POST", "/redis/primary/kill", {}),
        "restart-redis": ("POST", f"/redis/{fault.node}/restart", {"empty": True} if fault.empty else {}),
        "cut-peer": ("POST", f"/servers/{server}/cluster/cut", {"peer": fault.peer}),
        "heal-peer": ("POST", f"/servers/{server}/cluster/heal", {"peer": fault.peer}),
        "set-strategy": ("PUT", "/strategy", {"strategy": fault.strategy}),
        "set-link": ("PUT", f"/links/{fault.link}", fault.link_faults.body() if fault.link_faults else {}),
        "heal-link": ("DELETE", f"/links/{fault.link}", {}),
        "partition": ("POST", "/partitions", {"name": fault.partition, "cut": list(fault.cut)}),
        "heal-partition": ("DELETE", f"/partitions/{fault.partition}", {}),
    }
    return calls[fault.action]


class AdminClient:
    """The admin API of a running lab: its state, and the faults it can apply."""

    def __init__(self, admin_url: str, token: str | None = None) -> None:
        self.admin_url = admin_url.rstrip("/")
        # The variable that gives a balancer its admin token gives it to its clients too, and a
        # token in the environment does not show in `ps` as a command-line flag would.
        token = token if token is not None else os.environ.get(ADMIN_TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        timeout = aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S)
        self._http = aiohttp.ClientSession(timeout=timeout, headers=headers)

    async def close(self) -> None:
        """Close the client's connections."""
        await self._http.close()

    async def status(self) -> dict[str, Any]:
        """GET /status; TopologyError when the admin API cannot be reached."""
        status, body = await self.call("GET", "/status")
        if status != 200 or not isinstance(body, dict):
            raise TopologyError(f"{self.admin_url}/status answered {status}: is this a balancer's admin URL?")
        return body

    async def topology(self) -> dict[str, Any] | None:
        """GET /topology, or None for a bare balancer (`lbsession lb`), which has no processes to manage."""
        status, body = await self.call("GET", "/topology")
        return body if status == 200 and isinstance(body, dict) else None

    async def apply(self, fault: Fault) -> dict[str, Any]:
        """Apply one fault; TopologyError with the admin API's own explanation when it refuses."""
        method, path, body = fault_request(fault)
        status, answer = await self.call(method, path, body)
        if status >= 300:
            reason = answer.get("error") if isinstance(answer, dict) else answer
            raise TopologyError(f"{method} {path} answered {status}: {reason}")
        return answer if isinstance(answer, dict) else {"answer": answer}

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """One admin request: (status, JSON body or text); TopologyError when nothing answers."""
        try:
            async with self._http.request(method, self.admin_url + path, json=body) as response:
                if response.content_type == "application/json":
                    return response.status, await response.json()
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TopologyError(
                f"the lab's admin API at {self.admin_url} did not answer {method} {path}: {exc}"
            ) from exc


async def run_timeline(
    admin: AdminClient, faults: tuple[Fault, ...], clock: Callable[[], float], applied: list[AppliedFault]
) -> None:
    """Apply each fault at its time on the run's clock, in time order, recording how each went.

    A fault that fails is recorded with its error and the timeline goes on: the
    report then shows which fault did not happen, and the run cannot pass.
    """
    heals = [heal for fault in faults if (heal := fault.healing()) is not None]
    for fault in sorted((*faults, *heals), key=lambda f: f.at_s):
        entry = AppliedFault(fault.at_s, fault.action, fault.server, fault.describe(), link=fault.link)
        applied.append(entry)
        await asyncio.sleep(max(0.0, fault.at_s - clock()))  # a timeline: waiting for the planned time is the point
        entry.applied_s = clock()
        try:
            entry.result = await admin.apply(fault)
        except TopologyError as exc:
            entry.error = str(exc)
            log.warning("fault %s failed: %s", entry.description, exc)
        entry.took_s = clock() - entry.applied_s
