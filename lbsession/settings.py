"""Settings: how a config dataclass is declared, validated and passed on, for every part.

The parts' configs (lbsession.balancer.config, lbsession.appserver.config) and the
whole topology's (lbsession.config) are frozen dataclasses built by one validating
builder, `build_dataclass`, so a mistake reads the same wherever it is made. This
module imports no part of lbsession but its errors, so each part can declare its
settings without depending on another.

A setting is declared once, on its field: `setting(default, "--flag", "help",
commands=...)` puts a `Flag` in the field's metadata, from which the CLI builds
its flags (with the default and the variable's name in `--help`) and maps them
back to key paths; `env_name` gives the variable of any key path, and
`to_environ` turns a section into the variables a child process loads it from.
A field with `choices` (a plug-in's name) is checked against them at load time.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

ENV_PREFIX = "LBSESSION_"
FLAG = "lbsession.flag"  # the metadata key of a setting's command-line flag
CHOICES = "lbsession.choices"  # the metadata key of a callable giving a setting's valid values

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
    switch: bool = False  # a bool given as `--flag on|off` (default for a bool: a flag that sets it true)


def setting(
    default: Any,
    flag: str,
    help: str,
    *,
    commands: tuple[str, ...],
    **options: Any,
) -> Any:
    """A dataclass field with a default and the command-line flag that sets it (see `Flag`).

    With `choices` (a callable, read at each use), the loader also refuses any other value:
    a plug-in's name is checked against its registry, never against a hand-kept list.
    """
    metadata: dict[str, Any] = {FLAG: Flag(flag, help, commands, **options)}
    if options.get("choices") is not None:
        metadata[CHOICES] = options["choices"]
    return field(default=default, metadata=metadata)


def choice(default: Any, choices: Callable[[], Sequence[str]]) -> Any:
    """A dataclass field whose value must be one of `choices()` (read at load time), without a flag."""
    return field(default=default, metadata={CHOICES: choices})


class RegistryNames(Sequence[str]):
    """The names of a plug-in registry as a live, read-only sequence: what is registered now."""

    def __init__(self, registry: Mapping[str, str]) -> None:
        self._registry = registry

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return list(self._registry)[index]

    def __len__(self) -> int:
        return len(self._registry)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._registry))

    def __contains__(self, name: object) -> bool:
        return name in self._registry

    def __repr__(self) -> str:
        return f"RegistryNames({list(self._registry)})"


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


def declared_settings(cls: type, prefix: str = "") -> list[DeclaredSetting]:
    """Every setting with a flag under the dataclass `cls`, depth first."""
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def addresses_overlap(a: str, b: str) -> bool:
    """True when listeners on `a` and `b` with one port would collide (the same address, or a wildcard)."""
    return a == b or {a, b} & {"0.0.0.0", "::", ""} != set()


def port_problems(name: str, port: int) -> list[str]:
    return [] if 0 <= port <= 65535 else [f"{name}: {port} is not a TCP port (0-65535, 0 = any free port)"]


def positive(**values: float) -> list[str]:
    return [f"{k}: {v} must be greater than 0" for k, v in values.items() if v <= 0]


def host_port_problems(name: str, address: str) -> list[str]:
    host, _, port = address.rpartition(":")
    if host and port.isdecimal() and 0 < int(port) <= 65535:
        return []
    return [f"{name}: {address!r} must be host:port, like 127.0.0.1:26379"]


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
            choices = f.metadata.get(CHOICES)
            if ok and choices is not None and value is not None and value not in choices():
                report(f.name, f"{value!r} is not valid; choose one of: {', '.join(choices())}")
            elif ok:
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
