"""nginx (Debian's 1.22, open source) in front of the lab: its config from the topology, changes by reload.

    round-robin      (nginx's default)
    least-conn       least_conn
    sticky-cookie    not in nginx 1.22 open source (`sticky` arrived in open source with 1.29.6); what
                     nginx users do instead, and what the lab generates, labelled as such:
                     hash $cookie_SESSION consistent (the app's own session cookie)
    ip-hash          ip_hash (hashes the first three octets of an IPv4 address: one /24 is one server);
                     keyed by a header or a cookie: hash $http_<name> / hash $cookie_<name>
    consistent-hash  hash $remote_addr consistent (or $http_<name>, $cookie_<name>, as the key says);
                     no bounded loads: a lab with --hash-balance-factor is refused

Open-source nginx has passive health checks only: a server is skipped for
`fail_timeout` after `max_fails` failed attempts (the lab's `fall`, and its
interval times fall + rise). No active check, no drain, no per-server counter,
no runtime API: a change rewrites the config and reloads it (SIGHUP to the
master, what `nginx -s reload` sends), after `nginx -t` has accepted it. A
drained server is marked `down` (nginx has no drain: its clients move at once),
a removed one leaves the file.
"""

from __future__ import annotations

import asyncio
import grp
import math
import os
import pwd
import signal
from pathlib import Path
from typing import ClassVar

from lbsession.config import Config
from lbsession.errors import TopologyError
from lbsession.lab.balancers.base import READY_TIMEOUT_S, BalancerFront
from lbsession.lab.process import HOST, POLL_S

UPSTREAM = "be"
BALANCE: dict[str, str | None] = {
    "round-robin": None,
    "least-conn": "least_conn;",
    "sticky-cookie": "hash $cookie_{app_cookie} consistent;",
    "ip-hash": "ip_hash;",  # a header or cookie key: `hash <its variable>;` (see hash_line)
    "consistent-hash": "hash {key} consistent;",
}


def hash_variable(key: str) -> str | None:
    """nginx's variable for the hashing strategies' key: $remote_addr, $http_<name>, $cookie_<name>."""
    kind, _, name = key.partition(":")
    if kind == "header":
        return "$http_" + name.lower().replace("-", "_")
    if kind == "cookie":
        return "$cookie_" + name
    return None


NO_STICKY = (
    "sticky-cookie: nginx 1.22 open source has no sticky cookie (open-source `sticky` arrived in 1.29.6); "
    "generated instead is what nginx users do: hash the app's session cookie ({app_cookie}), which moves a "
    "user whenever the app rotates its session id (at every login)"
)
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def _worker_user() -> str | None:
    """`user` for the workers when the lab runs as root (nginx would look for a group `nobody` Debian lacks)."""
    if os.geteuid() != 0:
        return None
    try:
        nobody = pwd.getpwnam("nobody")
        return f"nobody {grp.getgrgid(nobody.pw_gid).gr_name}"
    except KeyError:
        return "root root"


class NginxFront(BalancerFront):
    """nginx as a child of the lab (master in the foreground), changed by rewriting its config and reloading."""

    name: ClassVar[str] = "nginx"
    unseen: ClassVar[dict[str, str]] = {
        "bound_violations": "nginx shows no routing decision against its bound: the audit is lbsession's",
        "bound_fallbacks": "nginx shows no routing decision against its bound",
        "decision_imbalance_max": "nginx shows no routing decision's load",
        "forged_cookies": "nginx sets no cookie of its own, so there is none to forge",
        "tamper_detected_share": "nginx sets no cookie of its own",
        "cookie_names_server": "nginx sets no cookie naming a server",
    }

    def notes(self) -> list[str]:
        """What differs from the strategy asked for."""
        if self.config.balancer.strategy != "sticky-cookie":
            return []
        return [NO_STICKY.format(app_cookie=self.config.app.session.cookie_name)]

    @classmethod
    def refusals(cls, config: Config) -> list[str]:
        """Those of every real balancer, and bounded loads, which nginx open source lacks."""
        out = super().refusals(config)
        if config.balancer.strategy == "consistent-hash" and config.balancer.hash.balance_factor:
            out.append(
                "--hash-balance-factor: nginx's `hash ... consistent` has no bounded loads (ingress-nginx adds "
                "them in Lua); run it with --balancer lbsession or haproxy (hash-balance-factor), or drop the factor"
            )
        return out

    def render(self) -> str:
        """The whole nginx.conf for the lab's topology (`daemon off` is given on the command line)."""
        balancer = self.config.balancer
        limits, health = balancer.limits, balancer.health
        fail_timeout_s = max(1, math.ceil(health.interval_s * (health.fall + health.rise)))  # whole seconds only
        method = BALANCE[balancer.strategy]
        variable = hash_variable(balancer.hash.key)
        if balancer.strategy == "ip-hash" and variable is not None:
            method = f"hash {variable};"
        key = variable or "$remote_addr"
        upstream = [method.format(app_cookie=self.config.app.session.cookie_name, key=key)] if method else []
        for server_id in self.active():
            down = " down" if self.states[server_id] == "drain" else ""
            upstream.append(
                f"server {HOST}:{self.servers[server_id]} max_fails={health.fall} fail_timeout={fail_timeout_s}s"
                f"{down};  # {server_id}"
            )
        upstream.append("keepalive 32;")  # after the balancing method, as nginx requires
        temp = self.log_dir / "nginx-temp"
        user = _worker_user()
        lines = [
            f"# generated by lbsession: strategy {balancer.strategy}, {self.config.servers} app servers",
            *(f"# {note}" for note in self.notes()),
            *([f"user {user};"] if user else []),
            "worker_processes 1;",
            f"pid {self.log_dir / 'nginx.pid'};",
            f"error_log {self.log_dir / 'nginx-error.log'} warn;",
            "events { worker_connections 4096; }",
            "http {",
            "    access_log off;",
            *(f"    {kind}_temp_path {temp / kind};" for kind in TEMP_PATHS),
            f"    upstream {UPSTREAM} {{",
            *(f"        {line}" for line in upstream),
            "    }",
            "    server {",
            f"        listen {self.listen};",
            f"        client_header_timeout {round(limits.header_timeout_s)}s;",
            f"        keepalive_timeout {round(limits.idle_timeout_s)}s;",
            "        location / {",
            f"            proxy_pass http://{UPSTREAM};",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            proxy_set_header Host $host;",
            "            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
            f"            proxy_connect_timeout {max(1, round(limits.connect_timeout_s))}s;",
            f"            proxy_read_timeout {max(1, round(limits.read_timeout_s))}s;",
            "        }",
            "    }",
            "}",
        ]
        return "\n".join(lines) + "\n"

    def argv(self, config_path: Path) -> list[str]:
        """The master in the foreground (`daemon off`), its prefix, pid and error log in the log folder."""
        return [self.binary, *self._paths(config_path), "-g", "daemon off;"]

    def check_argv(self, config_path: Path) -> list[str]:
        """`nginx -t -c`."""
        return [self.binary, "-t", "-q", *self._paths(config_path)]

    def _paths(self, config_path: Path) -> list[str]:
        (self.log_dir / "nginx-temp").mkdir(parents=True, exist_ok=True)
        return ["-p", str(self.log_dir), "-e", str(self.log_dir / "nginx-error.log"), "-c", str(config_path)]

    async def apply(self, server_id: str) -> None:
        """Rewrite the config, have `nginx -t` accept it, then SIGHUP the master; return once only new workers run."""
        if self.process is None or self.process.pid is None:
            raise TopologyError("nginx is not running")
        self.write_config()
        await self.check_config()
        before = self.workers()
        self.process.send_signal(signal.SIGHUP)  # what `nginx -s reload` sends, to the master the lab owns
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                # Until only new workers remain: an old one still accepts for a moment after the HUP.
                while set(self.workers()) & set(before) or not self.workers():  # noqa: ASYNC110 - nothing to wait on but /proc
                    await asyncio.sleep(POLL_S)
        except TimeoutError:
            raise TopologyError(
                f"nginx did not start new workers after the reload; see {self.process.log_path}"
            ) from None

    def workers(self) -> list[int]:
        """The master's children now (its workers; new ones once a reload took)."""
        if self.process is None or self.process.pid is None:
            return []
        pid = self.process.pid
        try:
            return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []
