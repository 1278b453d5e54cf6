"""The exceptions lbsession raises, as one tree.

    LBSessionError
    ├── ConfigError          a setting is wrong; the message names where and how to fix it
    │   └── ServerIdInUse    an upstream id that the balancer already has (the admin API's 409)
    ├── NoHealthyUpstream    the balancer has no server to send a request to
    ├── StoreUnavailable     the session store cannot be reached (never "no session")
    ├── SessionTooLarge      a session outgrew what its store can carry (the cookie store's 4 KB)
    ├── PeerRefused          a cluster peer refused this node (it is not in the peer's list)
    └── TopologyError        a process of `lbsession run` failed to start or to stop

The proxy's own failures to reach an upstream are not exceptions at all: the data
path answers them with a 502/503/504 and a short reason, as HAProxy does.

Lower-level errors (OSError, aiohttp and redis errors) are translated into these
at the boundary where they occur, so callers only ever catch this tree.
"""

from __future__ import annotations


class LBSessionError(Exception):
    """The root of every error lbsession raises on purpose."""


class ConfigError(LBSessionError):
    """A configuration value is missing, malformed or not one of the valid choices."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class NoHealthyUpstream(LBSessionError):
    """Every upstream is down, draining or removed."""


class ServerIdInUse(ConfigError):
    """The upstream id given to the balancer is taken by another upstream."""


class StoreUnavailable(LBSessionError):
    """The session store cannot be reached; the session may well still exist."""


class SessionTooLarge(LBSessionError):
    """The session would not fit its store (a cookie over the browsers' 4 KB); it stays as it was."""


class PeerRefused(LBSessionError):
    """A cluster peer answered the handshake with a refusal: static membership, and we are not listed."""


class TopologyError(LBSessionError):
    """A managed process did not start, did not become ready, or could not be stopped."""
