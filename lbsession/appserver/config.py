"""The app server's settings: its id and listener, the session cookie, and each store's section.

Declared with lbsession.settings, and imported by the app server from here only:
its config depends on no other part of lbsession (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from lbsession.appserver.stores import BACKEND_NAMES
from lbsession.settings import APP_SERVERS, host_port_problems, port_problems, positive, setting

BackendName = str  # one of BACKEND_NAMES, the store registry's names, checked at load time
Replication = Literal["sync", "async"]
Membership = Literal["static", "join"]
SameSite = Literal["Lax", "Strict", "None"]


@dataclass(frozen=True)
class SessionConfig:
    """The app server's session cookie and lifetime."""

    cookie_name: str = setting("SESSION", "--session-cookie", "session cookie name", commands=("server",))
    ttl_s: float = setting(1800.0, "--session-ttl", "session lifetime in seconds", commands=("server",))
    secure: bool = setting(False, "--secure-cookies", "mark cookies Secure (HTTPS only)", commands=("server",))
    same_site: SameSite = "Lax"

    def problems(self) -> list[str]:
        out = positive(ttl_s=self.ttl_s)
        if not (self.cookie_name.isascii() and self.cookie_name.isidentifier()):
            out.append(f"cookie_name: {self.cookie_name!r} must be a plain cookie name such as SESSION")
        if self.same_site == "None" and not self.secure:
            out.append("same_site: None requires secure: true (browsers reject it otherwise)")
        return out


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
    # Sentinel: "HOST:PORT=HOST:PORT" pairs, the primary's address as Sentinel gives it -> the one to dial
    # (redis-py's force_master_ip, per address): the lab's links put a relay of its own before each node.
    address_map: tuple[str, ...] = ()
    # After each write, WAIT for this many replicas (up to wait_timeout_ms): a write they did not all
    # acknowledge is retried, then a 503, so an acknowledged write survives a failover (0: no WAIT).
    wait_replicas: int = 0
    wait_timeout_ms: int = 200
    # A failover is a delay, not a logout.
    retry_s: float = setting(
        5.0, "--redis-retry", "seconds to keep retrying a failing Redis call", commands=("server",)
    )

    def problems(self) -> list[str]:
        out = positive(timeout_s=self.timeout_s, retry_s=self.retry_s, wait_timeout_ms=self.wait_timeout_ms)
        if not 0 <= self.wait_replicas <= 8:
            out.append(f"wait_replicas: {self.wait_replicas} must be between 0 and 8")
        if self.url is not None and urlsplit(self.url).scheme not in ("redis", "rediss", "unix"):
            out.append(f"url: {self.url!r} must start with redis://, rediss:// or unix://")
        for address in self.sentinels:
            out += host_port_problems("sentinels", address)
        for pair in self.address_map:
            given, sep, dialled = pair.partition("=")
            out += host_port_problems("address_map", given) + host_port_problems("address_map", dialled)
            if not sep:
                out.append(f"address_map: {pair!r} must be SENTINEL_HOST:PORT=DIAL_HOST:PORT")
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
    # The address this node's own replication connections leave from (None: the kernel's choice). The
    # lab's links tell one sender from another by it (`bind-source-addr` in Redis' terms).
    source_host: str | None = None
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
        out = port_problems("port", self.port)
        out += positive(
            ack_timeout_s=self.ack_timeout_s, heartbeat_s=self.heartbeat_s, startup_wait_s=self.startup_wait_s
        )
        out += positive(max_message_bytes=self.max_message_bytes, tombstone_ttl_s=self.tombstone_ttl_s)
        out += positive(async_flush_ms=self.async_flush_ms)
        for address in (*self.peers, *([self.join] if self.join else [])):
            out += host_port_problems("peers", address)
        if self.secret is not None and len(self.secret) < 16:
            out.append("secret: must be at least 16 characters")
        return out


@dataclass(frozen=True)
class CookieStoreConfig:
    """The `cookie` store: the keys that seal sessions into their cookie, and the cookie's size limit."""

    keys: tuple[str, ...] = ()  # the first seals, every one opens (rotation); shared by every server
    max_bytes: int = 4096  # browsers keep about 4 KB per cookie (RFC 6265 §6.1 asks for at least 4096)
    # The usual mitigation of "logout is not revocation", at the price of the store's statelessness.
    deny_list: bool = setting(
        False, "--cookie-deny-list", "cookie store: keep logged-out session ids in Redis (--redis-url) "
        "until their max age, and refuse their cookies", commands=APP_SERVERS,
    )  # fmt: skip

    def problems(self) -> list[str]:
        out = positive(max_bytes=self.max_bytes)
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
        out = port_problems("port", self.port)
        if not self.id or not all(c.isalnum() or c in "-_." for c in self.id):
            out.append(f"id: {self.id!r} must be letters, digits, '-', '_' or '.'")
        return out
