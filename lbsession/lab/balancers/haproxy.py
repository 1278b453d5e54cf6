"""HAProxy (Debian's 2.6) in front of the lab: its config from the topology, changes through its Runtime API.

    round-robin      balance roundrobin
    least-conn       balance leastconn
    sticky-cookie    balance roundrobin + cookie LBSERVER insert indirect nocache httponly + option redispatch
    ip-hash          balance source + hash-type map-based (a header key: balance hdr(<name>); a
                     cookie key: balance hash req.cook(<name>))
    consistent-hash  the same balance + hash-type consistent (+ hash-balance-factor P, bounded loads)

A balanced sticky mode (--sticky-mode balanced) is lbsession's own: a lab asking
HAProxy or nginx for it is refused, as is nginx asked for bounded loads.

Health is HAProxy's active check with the lab's settings (`option httpchk GET
/healthz`, `http-check send ... hdr Host` when a Host is set, `http-check expect
status 200-399`, `inter`, `rise`, `fall`). The stats socket (`level admin`, a unix
socket in the run's log folder) is how the lab reads `show stat` and changes
servers while HAProxy runs.

Scale-out uses pre-declared slots, not `add server`: HAProxy 2.6 refuses a
dynamic server a `cookie` ("'cookie' option is not accepted for dynamic
server") and refuses dynamic servers in a map-based `balance source` backend
("Backend must use a dynamic load balancing"). So the backend declares was-4..
(each with its cookie value) disabled, and an added server takes the next slot:
`set server be/was-4 addr 127.0.0.1 port P`, then `state ready`. Drain is
`state drain` (pinned clients stay, no new ones), removal `state maint`.
"""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path
from typing import ClassVar

from lbsession.errors import TopologyError
from lbsession.lab.balancers.base import READY_TIMEOUT_S, BalancerFront
from lbsession.lab.process import HOST, wait_until

BACKEND = "be"
EXTRA_SLOTS = 5  # disabled servers declared beyond the lab's own, for scale-out (was-4..was-8 for 3 servers)
SOCKET_TIMEOUT_S = 5.0
MAX_SOCKET_PATH = 107
BALANCE: dict[str, list[str]] = {
    "round-robin": ["balance roundrobin"],
    "least-conn": ["balance leastconn"],
    "sticky-cookie": ["balance roundrobin"],
    "ip-hash": ["hash-type map-based"],
    "consistent-hash": ["hash-type consistent"],
}


def hash_balance(key: str) -> str:
    """HAProxy's `balance` line for the hashing strategies' key (client-ip, header:<name>, cookie:<name>)."""
    kind, _, name = key.partition(":")
    if kind == "header":
        return f"balance hdr({name})"
    if kind == "cookie":
        return f"balance hash req.cook({name})"
    return "balance source"


RUNTIME_STATE = {"ready": "ready", "drain": "drain", "removed": "maint"}


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class HaproxyFront(BalancerFront):
    """HAProxy as a child of the lab, changed at run time through its stats socket."""

    name: ClassVar[str] = "haproxy"
    unseen: ClassVar[dict[str, str]] = {
        "bound_violations": "HAProxy shows no routing decision against its bound: the audit is lbsession's",
        "bound_fallbacks": "HAProxy shows no routing decision against its bound",
        "decision_imbalance_max": "HAProxy shows no routing decision's load",
        "forged_cookies": "HAProxy counts no forged cookie: its cookie is the server's name in clear, and any "
        "valid name is obeyed",
        "tamper_detected_share": "HAProxy counts no forged cookie",
        "rehashed_share": "HAProxy does not say which requests hash-balance-factor sent past their key's server "
        "(spread_users and the in-flight balance show its effect)",
    }

    @property
    def socket_path(self) -> Path:
        """The stats socket (`level admin`) in the run's log folder."""
        return self.log_dir / "haproxy.sock"

    @property
    def cookie(self) -> str | None:
        """LBSERVER (the lab's sticky cookie name) with sticky-cookie; no cookie otherwise."""
        balancer = self.config.balancer
        return balancer.sticky.cookie_name if balancer.strategy == "sticky-cookie" else None

    def slots(self) -> list[str]:
        """Every server line of the backend: the lab's servers, then the disabled slots for scale-out."""
        count = self.config.servers + EXTRA_SLOTS
        return [*self.servers, *(f"was-{n}" for n in range(1, count + 1) if f"was-{n}" not in self.servers)]

    def render(self) -> str:
        """The whole haproxy.cfg for the lab's topology."""
        balancer = self.config.balancer
        limits, health, sticky = balancer.limits, balancer.health, balancer.sticky
        backend = list(BALANCE[balancer.strategy])
        if balancer.strategy in ("ip-hash", "consistent-hash"):
            backend.insert(0, hash_balance(balancer.hash.key))
        if balancer.strategy == "consistent-hash" and balancer.hash.balance_factor:
            backend.append(f"hash-balance-factor {balancer.hash.balance_factor}")
        if balancer.strategy == "sticky-cookie":
            flags = " secure" if sticky.secure else ""
            flags += f" maxlife {sticky.max_age_s}s" if sticky.max_age_s else ""
            backend += [f"cookie {sticky.cookie_name} insert indirect nocache httponly{flags}"]
            backend += ["option redispatch" if sticky.redispatch else "no option redispatch"]
        else:  # a failed connect is retried on another server, as lbsession does
            backend += ["option redispatch"]
        # lbsession resends an idempotent request whose (reused) connection closed without a byte of answer
        # (RFC 9110 9.2.2), so a server killed under a GET costs no 5xx; HAProxy's L7 retries do that when
        # told, here for GET and HEAD only (the other methods are not resent, as lbsession's are not).
        backend += ["retry-on conn-failure empty-response", "http-request disable-l7-retry unless METH_GET"]
        if health.host is None:
            backend += [f"option httpchk {health.method} {health.path}"]
        else:  # a Host header needs HTTP/1.1, which `http-check send` writes
            backend += [
                "option httpchk",
                f"http-check send meth {health.method} uri {health.path} ver HTTP/1.1 hdr Host {health.host}",
            ]
        backend += [
            f"http-check expect status {health.expect}",  # the same grammar as lbsession's: 200-399,404
            f"default-server inter {_ms(health.interval_s)} rise {health.rise} fall {health.fall}",
        ]
        cookie = balancer.strategy == "sticky-cookie"
        for server_id in self.slots():
            port = self.servers.get(server_id)
            line = f"server {server_id} {HOST}:{port or 1} check" + (f" cookie {server_id}" if cookie else "")
            state = self.states.get(server_id, "removed") if port else "removed"
            backend.append(line + (" disabled" if state == "removed" else ""))
        lines = [
            f"# generated by lbsession: strategy {balancer.strategy}, {self.config.servers} app servers",
            "global",
            "    nbthread 1",
            f"    maxconn {limits.max_connections}",
            f"    stats socket {self.socket_path} mode 600 level admin",
            "",
            "defaults",
            "    mode http",
            "    option http-keep-alive",
            "    retries 3",
            f"    timeout connect {_ms(limits.connect_timeout_s)}",
            f"    timeout client {_ms(limits.idle_timeout_s)}",
            f"    timeout server {_ms(limits.read_timeout_s)}",
            f"    timeout http-request {_ms(limits.header_timeout_s)}",
            f"    timeout check {_ms(health.timeout_s)}",
            "",
            "frontend public",
            f"    bind {self.listen}",
            f"    default_backend {BACKEND}",
            "",
            f"backend {BACKEND}",
            *(f"    {line}" for line in backend),
        ]
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        """The config, once the socket's path is known to fit a unix socket address."""
        if len(str(self.socket_path)) > MAX_SOCKET_PATH:  # sun_path holds 108 bytes, its NUL included
            raise TopologyError(f"the log folder {self.log_dir} is too long a path for haproxy's stats socket")
        super().write_config()

    def argv(self, config_path: Path) -> list[str]:
        """`haproxy -db`: in the foreground, so the lab owns the process; its pid file in the log folder."""
        return [self.binary, "-db", "-f", str(config_path), "-p", str(self.log_dir / "haproxy.pid")]

    def check_argv(self, config_path: Path) -> list[str]:
        """`haproxy -c -f`."""
        return [self.binary, "-c", "-q", "-f", str(config_path)]

    # ------------------------------------------------------------------ the Runtime API

    async def command(self, line: str) -> str:
        """One Runtime API command over the stats socket; its answer (TopologyError if it is refused)."""
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
                try:
                    writer.write(line.encode() + b"\n")
                    await writer.drain()
                    answer = (await reader.read()).decode(errors="replace")
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            raise TopologyError(f"haproxy's stats socket {self.socket_path} did not answer {line!r}: {exc}") from None
        first = answer.strip().splitlines()[0] if answer.strip() else ""
        if first.startswith(("No such", "Unknown", "Require", "Invalid", "'set server")):
            raise TopologyError(f"haproxy refused {line!r}: {first}")
        return answer

    async def show_stat(self) -> list[dict[str, str]]:
        """`show stat` for the backend's servers, one dict per server (HAProxy's CSV columns)."""
        text = await self.command("show stat")
        rows = csv.DictReader(text.lstrip("# ").splitlines())
        return [r for r in rows if r.get("pxname") == BACKEND and r.get("svname") not in ("BACKEND", "FRONTEND")]

    async def refresh(self) -> None:
        """Per server, from `show stat`: requests (`stot`: each HTTP request is a stream of its own), in flight
        (`scur`: the streams on it now, the load `hash-balance-factor` bounds) and whether its check counts it UP."""
        rows = await self.show_stat()
        self.counts = {r["svname"]: int(r.get("stot") or 0) for r in rows}
        self.in_flight = {r["svname"]: int(r.get("scur") or 0) for r in rows}
        self.up = {r["svname"]: r.get("status", "").startswith("UP") for r in rows}

    async def server_status(self, server_id: str) -> str:
        """HAProxy's own word for a server: UP, DOWN, MAINT, DRAIN, `UP 1/2`..."""
        for row in await self.show_stat():
            if row["svname"] == server_id:
                return row.get("status", "")
        raise TopologyError(f"haproxy has no server {BACKEND}/{server_id}")

    async def wait_up(self, server_id: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return once HAProxy's own check counts `server_id` UP (rise); TopologyError past `timeout_s`."""

        async def up() -> bool:
            return await self.server_status(server_id) == "UP"

        if self.process is None:
            raise TopologyError("haproxy is not running")
        await wait_until(self.process, up, f"haproxy to count {server_id} UP", timeout_s)

    async def add(self, server_id: str, port: int) -> None:
        """Bring the slot named `server_id` up at `port` (the slots are named as the lab names its servers)."""
        if server_id not in self.slots():
            slots = self.slots()
            raise TopologyError(f"haproxy has no slot for {server_id}: its config declared {slots[0]}..{slots[-1]}")
        await super().add(server_id, port)

    async def apply(self, server_id: str) -> None:
        """`set server be/<id> addr ... port ...` for a new one, then `set server be/<id> state ...`."""
        target = f"{BACKEND}/{server_id}"
        if self.states[server_id] == "ready":
            await self.command(f"set server {target} addr {HOST} port {self.servers[server_id]}")
        await self.command(f"set server {target} state {RUNTIME_STATE[self.states[server_id]]}")
