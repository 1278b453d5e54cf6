"""docker-compose.yml, checked without a Docker engine (none runs on this machine).

1. It is valid against the compose-spec schema (check-jsonschema, offline).
2. Its cross-references hold: depends_on targets exist and share a profile, mounted files
   exist, every profile has a balancer and three app servers, the README's profiles exist.
3. Every lbsession command in it is parsed by lbsession's own CLI parser and loaded by its
   own config loader with the service's environment, so a flag or setting that does not
   exist fails here.
4. Each profile is run for real as local processes: the same commands, host names mapped to
   127.0.0.1 and ports to free ones, and the profile's claim is checked through its balancer.
   That is the honest substitute for `docker compose up` here.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from lbsession.cli import build_parser, config_from_args
from lbsession.lab.process import free_port
from lbsession.lab.redis_servers import find_redis_binary
from lbsession.lab.scenario import load_scenario

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# The profiles that each bring up one fix; `lab` is the scenario runner that goes with any of them.
PROFILES = sorted({p for service in SERVICES.values() for p in service.get("profiles", [])} - {"lab"})
HOSTS = {"lb", "was1", "was2", "was3", "redis", "redis-replica", "sentinel1", "sentinel2", "sentinel3", "0.0.0.0"}


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with nothing set: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def is_lbsession(service: dict[str, Any]) -> bool:
    return service.get("image") == "lbsession:latest"


def test_the_file_is_valid_against_the_compose_spec():
    checker = shutil.which("check-jsonschema")
    assert checker, "check-jsonschema is part of the test extra: pip install -e '.[test]'"
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_cross_references_hold():
    for name, service in SERVICES.items():
        profiles = set(service.get("profiles", []))
        assert profiles, f"{name} has no profile: it would start with every profile"
        for target in service.get("depends_on", {}):
            assert target in SERVICES, f"{name} depends on unknown service {target}"
            assert profiles <= set(SERVICES[target].get("profiles", [])), f"{name} needs {target} in all its profiles"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
    for profile in PROFILES:
        aliases = [
            a for s in in_profile(profile).values() for a in s.get("networks", {}).get("default", {}).get("aliases", [])
        ]
        assert sorted(aliases) == ["lb", "was1", "was2", "was3"], f"profile {profile}: {aliases}"


def test_every_profile_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"--profile ([a-z-]+)", readme))
    assert named, "the README documents the compose profiles"
    assert named <= set(PROFILES), named - set(PROFILES)
    assert set(PROFILES) <= named, f"undocumented profiles: {set(PROFILES) - named}"
    assert "docker compose run --rm lab" in readme


@pytest.mark.parametrize("name", sorted(n for n, s in SERVICES.items() if is_lbsession(s)))
def test_every_lbsession_command_is_one_lbsession_accepts(name):
    service = SERVICES[name]
    args = build_parser().parse_args([interpolate(str(a)) for a in service["command"]])
    environ = {k: interpolate(str(v)) for k, v in service.get("environment", {}).items()}
    if args.command == "scenario":
        scenario = load_scenario(ROOT / args.name.removeprefix("/app/"))  # the image copies configs/ to /app
        assert scenario.population.addresses == "shared", "per-user 127.0.0.x sources cannot reach another container"
        assert not scenario.faults, "compose's balancer owns no processes: faults are docker compose kill"
        return
    config = config_from_args(args, environ)
    if args.command == "server":
        assert config.app.id == name.split("-")[0]  # was2-redis is was2
    else:
        assert [u.id for u in config.balancer.upstreams] == ["was1", "was2", "was3"]


def in_profile(profile: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in SERVICES.items() if profile in s.get("profiles", [])}


# --------------------------------------------------------------------------- running a profile locally


class LocalProfile:
    """The services of one profile as local processes: hosts -> 127.0.0.1, ports -> free ones."""

    def __init__(self, profile: str, workdir: Path) -> None:
        self.services = in_profile(profile)
        self.workdir = workdir
        self.ports: dict[str, int] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def local(self, token: str, *, host: bool = False) -> str:
        """A compose token as it must be locally: host:port and bare ports remapped; a bare host if `host`."""

        def port(number: str) -> str:
            return str(self.ports.setdefault(number, free_port()))

        token = interpolate(token)
        token = re.sub(
            r"\b([a-z][a-z0-9-]*|0\.0\.0\.0|127\.0\.0\.1):(\d{4,5})\b", lambda m: f"127.0.0.1:{port(m[2])}", token
        )
        if host and token in HOSTS:
            return "127.0.0.1"
        return port(token) if token.isdigit() and len(token) >= 4 else token

    def start(self, name: str) -> None:
        service = self.services[name]
        raw = [str(a) for a in service["command"]]
        host_flags = {"--replicaof", "--replica-announce-ip"}
        command = [self.local(a, host=i > 0 and raw[i - 1] in host_flags) for i, a in enumerate(raw)]
        variables = service.get("environment", {}).items()
        env = {**os.environ, **{k: self.local(str(v), host=k.endswith("_HOST")) for k, v in variables}}
        if is_lbsession(service):
            argv = [sys.executable, "-m", "lbsession", *command]
        elif "entrypoint" in service:  # a Sentinel: its writable copy of the template, as the entrypoint does
            conf = self.workdir / f"{name}.conf"
            template = (ROOT / "configs/compose/sentinel.conf").read_text()
            lines = [line.split(" ") for line in template.splitlines()]
            # `sentinel monitor <name> <host> <port> <quorum>`: the host is the fourth word.
            conf.write_text("\n".join(" ".join(self.local(t, host=i == 3) for i, t in enumerate(w)) for w in lines))
            argv = [str(find_redis_binary()), str(conf), "--sentinel", *command]
        else:
            argv = [str(find_redis_binary()), *command[1:], "--dir", str(self.workdir)]
        with open(self.workdir / f"{name}.log", "wb") as log:  # the child keeps its own copy of the descriptor
            self.processes[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=self.workdir)

    async def wait_healthy(self, name: str) -> None:
        """Wait for what the service's compose healthcheck checks."""
        service = self.services[name]
        health_url = service.get("environment", {}).get("LBSESSION_HEALTH_URL")
        async with asyncio.timeout(30):
            while not await self._healthy(service, health_url):
                if self.processes[name].poll() is not None:
                    log = (self.workdir / f"{name}.log").read_text(errors="replace")[-1500:]
                    pytest.fail(f"{name} exited with status {self.processes[name].returncode}:\n{log}")
                await asyncio.sleep(0.05)

    async def _healthy(self, service: dict[str, Any], health_url: str | None) -> bool:
        try:
            if health_url:
                async with aiohttp.ClientSession() as http, http.get(self.local(health_url)) as r:
                    return r.status == 200
            test = " ".join(service["healthcheck"]["test"])
            port = self.local(re.search(r"-p,? (\d+)", test.replace('"', ""))[1])  # type: ignore[index]
            async with aioredis.Redis(port=int(port), socket_timeout=1, decode_responses=True) as client:
                if "sentinel" in test:
                    return bool(await client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "lbsession"))
                if "master_link_status" in test:
                    return (await client.info("replication")).get("master_link_status") == "up"
                return bool(await client.ping())
        except (OSError, aiohttp.ClientError, aioredis.RedisError):
            return False

    async def up(self) -> str:
        """Start every service after its dependencies are healthy (as `depends_on` orders them)."""
        started: set[str] = set()
        while len(started) < len(self.services):
            ready = [
                n for n, s in self.services.items() if n not in started and set(s.get("depends_on", {})) <= started
            ]
            for name in ready:
                self.start(name)
            await asyncio.gather(*(self.wait_healthy(n) for n in ready))
            started.update(ready)
        return f"http://127.0.0.1:{self.ports['8080']}"

    def run_lab(self) -> subprocess.CompletedProcess[str]:
        """The `lab` service's command against this profile, remapped, shortened to two seconds."""
        lab = SERVICES["lab"]
        command = [self.local(str(a)).replace("/app/", str(ROOT) + "/") for a in lab["command"]]
        env = {**os.environ, **{k: self.local(str(v)) for k, v in lab.get("environment", {}).items()}}
        argv = [sys.executable, "-m", "lbsession", *command, "--duration", "2"]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)

    def down(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait()


async def statuses_after_login(lb_url: str) -> list[int]:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.post(lb_url + "/login", json={"username": "alice"}) as response:
            assert response.status == 200
        replies = []
        for _ in range(6):
            async with http.get(lb_url + "/me") as response:
                replies.append(response.status)
        return replies


@pytest.mark.parametrize("profile", PROFILES)
async def test_each_profile_runs_as_local_processes_and_shows_its_claim(profile, tmp_path):
    lab = LocalProfile(profile, tmp_path)
    try:
        statuses = await statuses_after_login(await lab.up())
        scenario = await asyncio.to_thread(lab.run_lab)
    finally:
        lab.down()
    assert scenario.returncode == 0, scenario.stdout + scenario.stderr
    assert "compose-lab" in scenario.stdout
    if profile == "bug":
        assert 401 in statuses and 200 in statuses  # logged in on one server, a stranger to the others
    else:
        assert statuses == [200] * 6
