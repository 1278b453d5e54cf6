"""The exceptions lbsession raises, as one tree.

    LBSessionError
    ├── ConfigError          a setting is wrong; the message names where and how to fix it
    ├── NoHealthyUpstream    the balancer has no server to send a request to
    ├── UpstreamError        an app server could not be reached or answered badly
    ├── StoreUnavailable     the session store cannot be reached (never "no session")
    └── TopologyError        a process of `lbsession run` failed to start or to stop

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


class UpstreamError(LBSessionError):
    """An upstream refused the connection, timed out or broke the protocol."""


class StoreUnavailable(LBSessionError):
    """The session store cannot be reached; the session may well still exist."""


class TopologyError(LBSessionError):
    """A managed process did not start, did not become ready, or could not be stopped."""
