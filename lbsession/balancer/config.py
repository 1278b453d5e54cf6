"""The balancer's settings: listeners, upstreams, strategy, sticky cookie, hashing, health, limits.

Declared with lbsession.settings, and imported by the balancer from here only: the
balancer's config depends on no other part of lbsession (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from lbsession.balancer.strategies import STRATEGY_NAMES
from lbsession.settings import (
    LISTENERS,
    addresses_overlap,
    is_loopback,
    parse_http_url,
    port_problems,
    positive,
    setting,
)

StrategyName = str  # one of STRATEGY_NAMES, the strategy registry's names, checked at load time
StickyMode = Literal["persistent", "balanced"]


@dataclass(frozen=True)
class UpstreamConfig:
    """One app server behind the balancer."""

    id: str
    url: str

    def problems(self) -> list[str]:
        try:
            parse_http_url(self.url)
        except ValueError as exc:
            return [f"url: {exc}"]
        return [] if self.id else ["id: must not be empty"]

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the upstream."""
        return parse_http_url(self.url)


@dataclass(frozen=True)
class StickyConfig:
    """The LB-inserted server cookie (HAProxy `cookie SERVERID insert`, AWS ELB's AWSELB)."""

    cookie_name: str = "LBSERVER"
    # ingress-nginx's affinity-mode. persistent: a pin names its server and holds until that server dies.
    # balanced: a pin is a random key placed on a ring of the healthy servers, so a new server takes ~1/N.
    mode: StickyMode = setting(
        "persistent", "--sticky-mode", "sticky-cookie: persistent pins stay put on scale-out; balanced ones "
        "move ~1/N of the users to a new server", commands=LISTENERS,
    )  # fmt: skip
    secret: str | None = setting(  # None: a random one per start, and a warning
        None, "--sticky-secret", "HMAC key of the sticky cookie", commands=LISTENERS, default_text="random per start"
    )
    max_age_s: int | None = None  # None: a browser-session cookie
    secure: bool = False
    redispatch: bool = True  # HAProxy `option redispatch`: re-pin when the server is down

    def problems(self) -> list[str]:
        out = (
            []
            if self.cookie_name.isascii() and self.cookie_name.isidentifier()
            else [f"cookie_name: {self.cookie_name!r} must be a plain cookie name such as LBSERVER"]
        )
        if self.max_age_s is not None:
            out += positive(max_age_s=self.max_age_s)
        if self.secret is not None and len(self.secret) < 16:
            out.append("secret: must be at least 16 characters, or left out to generate one")
        return out


@dataclass(frozen=True)
class HashConfig:
    """The key and ring of the `ip-hash` and `consistent-hash` strategies."""

    key: str = "client-ip"  # or "header:<name>" or "cookie:<name>"
    vnodes: int = 160  # points per server on the ring, as in ketama
    # Consistent hashing with bounded loads: no server above this % of the mean in-flight (HAProxy's unit).
    balance_factor: int = setting(
        0, "--hash-balance-factor", "consistent-hash: cap each server's in-flight requests at this % of the mean, "
        "e.g. 125; 0 = off", commands=LISTENERS, metavar="PERCENT",
    )  # fmt: skip

    def problems(self) -> list[str]:
        out = positive(vnodes=self.vnodes)
        if self.balance_factor != 0 and not 100 <= self.balance_factor <= 10000:
            out.append(f"balance_factor: {self.balance_factor} must be 0 (off) or a percentage from 100, e.g. 125")
        kind, _, name = self.key.partition(":")
        if not (self.key == "client-ip" or (kind in ("header", "cookie") and name)):
            out.append(f"key: {self.key!r} is not valid; choose client-ip, header:<name> or cookie:<name>")
        return out


# A request target's path and query as RFC 9112 §3.2.1 allows them (visible ASCII), a method as a
# token (RFC 9110 §9.1), a Host value as uri-host[:port] (RFC 9110 §7.2) with a reg-name or an IP literal.
_PATH = re.compile(r"/[\x21-\x7e]*")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]+)(?::[0-9]{1,5})?")
_HEALTH = ("lb",)  # what an app server of `run` answers is known; `lb` fronts any app


@dataclass(frozen=True)
class HealthConfig:
    """Active health checks like HAProxy's `option httpchk` + `http-check expect status`, `inter`, `rise`, `fall`."""

    active: bool = setting(
        True,
        "--health",
        "active health checks; off: passive only (a server that refuses a connection is left out "
        "for --health-interval, then tried again)",
        commands=_HEALTH,
        metavar="on|off",
        switch=True,
    )
    path: str = setting("/healthz", "--health-path", "the path (and query) each check asks for", commands=_HEALTH)
    method: str = setting("GET", "--health-method", "the check's method, e.g. GET, HEAD or OPTIONS", commands=_HEALTH)
    host: str | None = setting(
        None,
        "--health-host",
        "the Host header the check sends, for an app that checks it (Django's ALLOWED_HOSTS)",
        commands=_HEALTH,
        default_text="the upstream's host:port",
    )
    expect: str = setting(
        "200-399",  # HAProxy's httpchk default: 2xx and 3xx pass
        "--health-expect",
        "the statuses that pass: a range, a list or both, e.g. 200-399 or 200,204",
        commands=_HEALTH,
    )
    interval_s: float = setting(1.0, "--health-interval", "seconds between two checks of a server", commands=LISTENERS)
    timeout_s: float = setting(1.0, "--health-timeout", "seconds a check may take before it fails", commands=LISTENERS)
    rise: int = setting(2, "--health-rise", "passed checks in a row that bring a server back up", commands=LISTENERS)
    fall: int = setting(2, "--health-fall", "failed checks in a row that take a server down", commands=LISTENERS)

    def problems(self) -> list[str]:
        out = positive(interval_s=self.interval_s, timeout_s=self.timeout_s, rise=self.rise, fall=self.fall)
        if not _PATH.fullmatch(self.path):
            out.append(f"path: {self.path!r} must start with / and hold no spaces, like /healthz")
        if not _TOKEN.fullmatch(self.method):
            out.append(f"method: {self.method!r} is not an HTTP method; give one like GET, HEAD or OPTIONS")
        if self.host is not None and not _HOST.fullmatch(self.host):
            out.append(f"host: {self.host!r} is not a host name with an optional port, like app.example or app:8000")
        try:
            self.statuses()
        except ValueError as exc:
            out.append(f"expect: {exc}")
        return out

    def statuses(self) -> frozenset[int]:
        """The statuses that pass, from `expect`; ValueError naming the first bad item."""
        passing: set[int] = set()
        for item in self.expect.split(","):
            low, dash, high = item.strip().partition("-")
            bounds = [low.strip(), high.strip()] if dash else [low.strip()]
            if not all(b.isdecimal() and 100 <= int(b) <= 599 for b in bounds):
                raise ValueError(
                    f"{item.strip()!r} is not an HTTP status (100-599) or a range of them; "
                    "give a range or a list, like 200-399 or 200,204"
                )
            if int(bounds[0]) > int(bounds[-1]):
                raise ValueError(f"the range {item.strip()!r} ends before it starts; give the low status first")
            passing.update(range(int(bounds[0]), int(bounds[-1]) + 1))
        return frozenset(passing)

    def describe(self) -> str:
        """The check in one line, for `/status` and the logs."""
        host = f" (Host: {self.host})" if self.host else ""
        return (
            f"{self.method} {self.path}{host} expecting {self.expect}, every {self.interval_s:g} s, "
            f"timeout {self.timeout_s:g} s, rise {self.rise}, fall {self.fall}"
        )


@dataclass(frozen=True)
class LimitsConfig:
    """Timeouts and size limits of the proxy."""

    connect_timeout_s: float = 2.0
    read_timeout_s: float = 30.0  # upstream silence while a response is due (HAProxy `timeout server`)
    header_timeout_s: float = 10.0  # a request head must arrive within this (slowloris)
    idle_timeout_s: float = 60.0  # client keep-alive idle time
    pool_idle_s: float = 15.0  # idle upstream connections; below aiohttp's 75 s keep-alive
    # A WebSocket (any Upgrade tunnel) with no byte either way for this long is closed: HAProxy's
    # `timeout tunnel`, which replaces the client and server timeouts once a connection is upgraded.
    tunnel_timeout_s: float = setting(
        3600.0, "--tunnel-timeout", "seconds a WebSocket/Upgrade tunnel may stay silent", commands=LISTENERS
    )
    max_head_bytes: int = 32768
    max_body_bytes: int = 64 * 1024 * 1024
    # Client connections at once; past it a new one gets a 503 at once rather than a place in an
    # unbounded queue (HAProxy's maxconn queues instead). Each may hold an upstream connection too,
    # so keep it under half the file descriptors (the balancer raises its soft limit to the hard one).
    max_connections: int = setting(
        8192, "--max-connections", "client connections at once; more get a 503", commands=LISTENERS
    )

    def problems(self) -> list[str]:
        return positive(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


@dataclass(frozen=True)
class BalancerConfig:
    """`lbsession lb`: one public listener that proxies, one admin listener."""

    host: str = setting("127.0.0.1", "--host", "public listen address", commands=LISTENERS)
    port: int = setting(8080, "--port", "public port; 0 = any free port", commands=LISTENERS)
    # Loopback: the admin API changes routing, and under `run` it kills servers.
    admin_host: str = setting(
        "127.0.0.1", "--admin-host", "admin listen address; off loopback it needs an admin token", commands=LISTENERS
    )
    admin_port: int = setting(8081, "--admin-port", "admin port; 0 = any free port", commands=LISTENERS)
    strategy: StrategyName = setting(
        "round-robin", "--strategy", "routing", commands=LISTENERS, choices=lambda: STRATEGY_NAMES
    )
    upstreams: tuple[UpstreamConfig, ...] = ()
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For is believed
    drain_timeout_s: float = 30.0  # a drained server keeps its pinned clients this long
    admin_allow: tuple[str, ...] = ()  # CIDRs besides loopback that may use the admin API
    admin_token: str | None = None  # required for changes when set; an exposed admin listener must set it
    sticky: StickyConfig = field(default_factory=StickyConfig)
    hash: HashConfig = field(default_factory=HashConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def problems(self) -> list[str]:
        out = port_problems("port", self.port) + port_problems("admin_port", self.admin_port)
        if self.admin_port == self.port != 0 and addresses_overlap(self.host, self.admin_host):
            out.append(f"admin_port: {self.port} is the public port too; give the two listeners different ports")
        if not is_loopback(self.admin_host) and not self.admin_token:
            out.append(
                f"admin_host: {self.admin_host!r} exposes the admin API, which can change the upstream pool "
                "(and, in a lab, kill servers): set balancer.admin_token (LBSESSION_BALANCER__ADMIN_TOKEN), "
                "or bind it to 127.0.0.1"
            )
        if self.admin_token is not None and len(self.admin_token) < 16:
            out.append("admin_token: must be at least 16 characters")
        for key, cidrs in (("trusted_proxies", self.trusted_proxies), ("admin_allow", self.admin_allow)):
            for cidr in cidrs:
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    out.append(f"{key}: {cidr!r} is not an address or CIDR like 10.0.0.0/8")
        ids = [u.id for u in self.upstreams]
        out += [f"upstreams: id {i!r} appears twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
        return out
