"""The balancers a lab can put in front of its app servers: lbsession's own, HAProxy, nginx.

    lbsession   lbsession/balancer, in the lab's own process (the default)
    haproxy     Debian's HAProxy 2.6, a child process (lbsession.lab.balancers.haproxy)
    nginx       Debian's nginx 1.22, open source, a child process (lbsession.lab.balancers.nginx)

A real balancer's module is imported only when chosen, as a strategy or a store
is. Each declares what a client needs to judge it (`Cookie`: the name of its
server cookie and how that names a server) and what it cannot show
(`BalancerFront.unseen`), so a check that needs a counter it lacks is
reported as not applicable rather than failed.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from lbsession.balancer.strategies import strategy_class
from lbsession.config import Config
from lbsession.errors import ConfigError

if TYPE_CHECKING:
    from lbsession.lab.balancers.base import BalancerFront
    from lbsession.lab.users import CookieFormat

BalancerName = Literal["lbsession", "haproxy", "nginx"]
BALANCER_NAMES: tuple[str, ...] = get_args(BalancerName)
REAL_BALANCERS: dict[str, str] = {
    "haproxy": "lbsession.lab.balancers.haproxy:HaproxyFront",
    "nginx": "lbsession.lab.balancers.nginx:NginxFront",
}
APT_PACKAGES: dict[str, str] = {"haproxy": "haproxy", "nginx": "nginx"}  # the binary's Debian package


def find_binary(name: str) -> str | None:
    """The path of an installed balancer's binary, looking in sbin too (Debian puts both there)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def require_binary(name: str) -> str:
    """The binary of balancer `name`; ConfigError (exit 2) naming the apt package when it is missing."""
    path = find_binary(name)
    if path is None:
        raise ConfigError(f"--balancer {name}: {name} is not installed; apt-get install {APT_PACKAGES[name]}")
    return path


def installed_balancers() -> list[str]:
    """lbsession, then every real balancer whose binary is installed (`--balancer all`)."""
    return ["lbsession", *(name for name in REAL_BALANCERS if find_binary(name) is not None)]


def front_class(name: str) -> type[BalancerFront]:
    """The class that runs balancer `name` as a child of the lab (imported now)."""
    if name not in REAL_BALANCERS:
        raise ConfigError(f"balancer {name!r} is not a real balancer; choose one of: {', '.join(REAL_BALANCERS)}")
    module, _, attr = REAL_BALANCERS[name].partition(":")
    cls: type[BalancerFront] = getattr(importlib.import_module(module), attr)
    return cls


PRINTED_LOG_DIR = Path("/run/lbsession")  # where a printed config puts its socket, pid and logs


def printed_config(name: str, config: Config) -> str:
    """The config balancer `name` would be given for `config`, for `--print-config`.

    The app servers' ports are the lab's to choose when it runs (port 0); printed, they are
    8001, 8002, ... in order, as a user copying the file would run them.
    """
    cls = front_class(name)
    cls.refuse(config)
    front = cls(config, PRINTED_LOG_DIR)
    front.servers = {f"was-{n}": 8000 + n for n in range(1, config.servers + 1)}
    front.states = dict.fromkeys(front.servers, "ready")
    return front.render()


@dataclass(frozen=True)
class ServerIdCookie:
    """A cookie whose value is the server id itself, as HAProxy's `cookie LBSERVER insert` writes it."""

    @staticmethod
    def cookie_names(value: str, server_id: str) -> bool:
        """Does the cookie's value name `server_id`?"""
        return value == server_id

    @staticmethod
    def cookie_renamed(value: str, server_id: str, other_id: str) -> str | None:
        """A forgery claiming `other_id`: plain text, nothing to sign."""
        return other_id if value == server_id else None


def client_cookie(status: Mapping[str, Any], sticky_cookie: str) -> tuple[str | None, CookieFormat]:
    """The server cookie of the balancer whose `GET /status` is `status`: its name (None: it sets none) and format.

    lbsession's own names its cookie in the lab's config (`sticky_cookie`) and its strategy
    says how to read it; a real balancer's view says the name, and its value is the server id.
    """
    if status.get("balancer", "lbsession") == "lbsession":
        return sticky_cookie, strategy_class(str(status["strategy"]))
    cookie = status.get("cookie")
    return (str(cookie) if cookie else None), ServerIdCookie()
