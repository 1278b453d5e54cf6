"""The links of a lab in a process of their own, controlled over a small loopback HTTP API.

`python -m lbsession links --ready-line` runs the relays (lbsession.lab.links)
outside the balancer's process, so their work never shares the balancer's event
loop, and prints one JSON line with its control port once listening. The lab
(`LinkService`, below) creates the links it puts in a topology's paths, then
forwards the user's fault requests here.

    GET    /links                       every link: from, to, faults, bytes and connections each way
    DELETE /links                       remove every link and partition: the process is ready for another lab
    POST   /links                       {"name", "from", "to", "target": "host:port"[, "listen": "host:port"]
                                         [, "sources": [client hosts]]}: a second link on a listen
                                         address shares its listener, told apart by the sources
    PUT    /links/{name}                set faults: {"latency_ms": 200, "jitter_ms": 20, "direction": "both"}
    DELETE /links/{name}                heal every fault of the link
    POST   /links/{name}/probe          ask the target now; refuse as it does (the lab just killed it)
    GET    /partitions                  the partitions in force
    POST   /partitions                  {"name": "p1", "cut": [link names]}: cut them both ways, bytes held
    DELETE /partitions/{name}           heal it

A request is checked whole before anything changes: a 400 names what is wrong.
Every request must carry the lab's token (`X-Lab-Token`, from LBSESSION_LAB_TOKEN),
since a link can be pointed at any port of the machine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from lbsession.appserver.lab_control import LAB_TOKEN_ENV, LAB_TOKEN_HEADER
from lbsession.errors import TopologyError
from lbsession.lab.links import Link, LinkError, UnknownLink, parse_faults
from lbsession.lab.process import HOST, Child, child_environ, python_module, read_ready_line, spawn

READY_TIMEOUT_S = 20.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _address(text: object, what: str) -> tuple[str, int]:
    if not isinstance(text, str) or text.count(":") != 1:
        raise LinkError(f'{what} must be "host:port", not {text!r}')
    host, port = text.split(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise LinkError(f"{what}: port {port!r} is not a number from 0 to 65535")
    return host, int(port)


class LinkRegistry:
    """The links and partitions of one lab, and the HTTP API that changes them."""

    def __init__(self) -> None:
        self.links: dict[str, Link] = {}
        self.partitions: dict[str, tuple[str, ...]] = {}

    async def create(self, body: dict[str, Any]) -> Link:
        """Start one link from its description; LinkError when it is wrong."""
        name, source, dest = body.get("name"), body.get("from"), body.get("to")
        for key, value in (("name", name), ("from", source), ("to", dest)):
            if not isinstance(value, str) or not value:
                raise LinkError(f"{key} must be a non-empty string, not {value!r}")
        assert isinstance(name, str) and isinstance(source, str) and isinstance(dest, str)
        if name in self.links:
            raise LinkError(f"a link named {name!r} exists already")
        target_host, target_port = _address(body.get("target"), "target")
        listen_host, listen_port = _address(body.get("listen", f"{HOST}:0"), "listen")
        sources = body.get("sources", [])
        if not isinstance(sources, list) or not all(isinstance(h, str) and h for h in sources):
            raise LinkError(f'sources must be a list of client hosts, e.g. ["127.0.3.2"], not {sources!r}')
        link = Link(name, source, dest, target_host, target_port, listen_host, listen_port, tuple(sources))
        owner = self._listener(link)
        if owner is not None:
            owner.share(link)  # before start: the sibling must not bind the address itself
        await link.start()
        self.links[name] = link
        return link

    def _listener(self, link: Link) -> Link | None:
        """The link that listens already where `link` would (it then shares that listener); LinkError if it may not."""
        owner = next((o for o in self.links.values() if o.listen_port and not o.borrows_listener
                      and (o.listen_host, o.listen_port) == (link.listen_host, link.listen_port)), None)  # fmt: skip
        if owner is None:
            return None
        where = f"{link.listen_host}:{link.listen_port}"
        if not link.sources:
            raise LinkError(f"{where} is {owner.name}'s listener: a link sharing it must name its sources")
        if (owner.target_host, owner.target_port) != (link.target_host, link.target_port):
            raise LinkError(f"{where} forwards to {owner.target_host}:{owner.target_port}: a link sharing it must too")
        taken = [h for h in link.sources if h in owner.sources or owner.source_link(h) is not owner]
        if taken:
            raise LinkError(f"sources {', '.join(taken)} on {where} are another link's already")
        return owner

    def link(self, name: str) -> Link:
        """The link named `name`; LinkError listing the known ones otherwise."""
        if name not in self.links:
            raise UnknownLink(f"no link {name!r}; known: {', '.join(self.links) or 'none'}")
        return self.links[name]

    async def cut(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start a partition: every link it names held both ways until it is healed."""
        name, cut = body.get("name"), body.get("cut")
        problems = [f"unknown key {key!r} (known: name, cut)" for key in body if key not in ("name", "cut")]
        if not isinstance(name, str) or not name:
            problems.append(f"name must be a non-empty string, not {name!r}")
        elif name in self.partitions:
            problems.append(f"a partition named {name!r} is in force already; DELETE /partitions/{name} first")
        if not isinstance(cut, list) or not cut or not all(isinstance(n, str) for n in cut):
            problems.append(f"cut must be a non-empty list of link names, not {cut!r}")
        else:
            problems += [f"no link {n!r} in cut; known: {', '.join(self.links)}" for n in cut if n not in self.links]
        if problems:
            raise LinkError("; ".join(problems))
        assert isinstance(name, str) and isinstance(cut, list)
        self.partitions[name] = tuple(cut)
        for link_name in cut:
            await self.links[link_name].set_partition(name, True)
        return {"name": name, "cut": list(cut)}

    async def heal_partition(self, name: str) -> dict[str, Any]:
        """End partition `name`: its links carry bytes again, the held ones first."""
        if name not in self.partitions:
            raise UnknownLink(f"no partition {name!r}; in force: {', '.join(self.partitions) or 'none'}")
        cut = self.partitions.pop(name)
        for link_name in cut:
            await self.links[link_name].set_partition(name, False)
        return {"name": name, "healed": list(cut)}

    async def stop(self) -> None:
        """Stop every link."""
        await asyncio.gather(*(link.stop() for link in self.links.values()))

    async def clear(self) -> int:
        """Stop and forget every link and partition, for the next lab; how many links there were."""
        await self.stop()
        count = len(self.links)
        self.links.clear()
        self.partitions.clear()
        return count

    # ------------------------------------------------------------------ HTTP

    def application(self, token: str) -> web.Application:
        """The control API, locked by `token`."""

        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not hmac.compare_digest(request.headers.get(LAB_TOKEN_HEADER, "").encode(), token.encode()):
                return _error(403, f"the links API needs the lab's {LAB_TOKEN_HEADER}")
            try:
                return await handler(request)
            except LinkError as exc:
                return _error(404 if isinstance(exc, UnknownLink) else 400, str(exc))

        app = web.Application(middlewares=[guard])
        app.router.add_get("/links", self._get_links)
        app.router.add_post("/links", self._post_link)
        app.router.add_delete("/links", self._delete_links)
        app.router.add_get("/links/{name}", self._get_link)
        app.router.add_put("/links/{name}", self._put_link)
        app.router.add_delete("/links/{name}", self._delete_link)
        app.router.add_post("/links/{name}/probe", self._post_probe)
        app.router.add_get("/partitions", self._get_partitions)
        app.router.add_post("/partitions", self._post_partition)
        app.router.add_delete("/partitions/{name}", self._delete_partition)
        return app

    async def _get_links(self, request: web.Request) -> web.Response:
        return web.json_response({"links": [link.describe() for link in self.links.values()]})

    async def _post_link(self, request: web.Request) -> web.Response:
        return web.json_response((await self.create(await _body(request))).describe(), status=201)

    async def _delete_links(self, request: web.Request) -> web.Response:
        return web.json_response({"removed": await self.clear()})

    async def _get_link(self, request: web.Request) -> web.Response:
        return web.json_response(self.link(request.match_info["name"]).describe())

    async def _put_link(self, request: web.Request) -> web.Response:
        link = self.link(request.match_info["name"])
        changes, directions = parse_faults(await _body(request))
        await link.apply(changes, directions)
        return web.json_response(link.describe())

    async def _delete_link(self, request: web.Request) -> web.Response:
        link = self.link(request.match_info["name"])
        await link.heal()
        return web.json_response(link.describe())

    async def _post_probe(self, request: web.Request) -> web.Response:
        link = self.link(request.match_info["name"])
        return web.json_response({"accepts": await link.probe_target(), **link.describe()})

    async def _get_partitions(self, request: web.Request) -> web.Response:
        return web.json_response({"partitions": [{"name": n, "cut": list(c)} for n, c in self.partitions.items()]})

    async def _post_partition(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cut(await _body(request)), status=201)

    async def _delete_partition(self, request: web.Request) -> web.Response:
        return web.json_response(await self.heal_partition(request.match_info["name"]))


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise LinkError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise LinkError("the body must be a JSON object")
    return body


async def serve_links(ready: Callable[[int], None], port: int = 0) -> None:
    """Run the links process: the control API on loopback until cancelled (`lbsession links`)."""
    token = os.environ.get(LAB_TOKEN_ENV)
    if not token:
        raise TopologyError(f"the links process needs the lab's token in {LAB_TOKEN_ENV}")
    registry = LinkRegistry()
    runner = web.AppRunner(registry.application(token), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, port).start()
        ready(runner.addresses[0][1])
        await asyncio.Event().wait()
    finally:
        await registry.stop()
        await runner.cleanup()


class LinkService:
    """The lab's handle on its links process: start it, create links, forward requests, stop it.

    A topology starts and stops one of its own, or is given one to reuse (`lbsession matrix`:
    one links process for all its runs, which spares each run a Python start and stop). A reused
    one is cleared when its lab stops (`clear`), so each lab starts with no link of another's.
    """

    def __init__(self, log_path: Path, token: str) -> None:
        self.log_path = log_path
        self.token = token
        self.process: Child | None = None
        self.port = 0
        self._http: aiohttp.ClientSession | None = None

    @property
    def running(self) -> bool:
        """Whether the links process has been started and has not exited."""
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start `lbsession links` and wait for its ready line."""
        await self.stop()  # a process that died (or a second start) leaves nothing behind
        argv = python_module("lbsession", "links", "--ready-line")
        self.process = spawn("links", argv, self.log_path, env=child_environ({LAB_TOKEN_ENV: self.token}),
                             ready_line=True)  # fmt: skip
        self.port = (await read_ready_line(self.process, READY_TIMEOUT_S))["port"]
        self._http = aiohttp.ClientSession(
            f"http://{HOST}:{self.port}",
            headers={LAB_TOKEN_HEADER: self.token},
            timeout=aiohttp.ClientTimeout(total=10.0),
        )

    async def stop(self) -> None:
        """Stop the links process (its links close with it)."""
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self.process is not None:
            await self.process.stop()

    async def clear(self) -> None:
        """Remove every link and partition (the lab using it stops), for the next lab to start clean."""
        status, answer = await self.call("DELETE", "/links")
        if status != 200:
            raise TopologyError(f"the links process did not clear its links: {answer.get('error', status)}")

    def as_dict(self) -> dict[str, Any]:
        """The links process as the ready file and /topology show it."""
        return {"pid": self.process.pid if self.process is not None else None, "control_port": self.port}

    async def add(
        self,
        name: str,
        source: str,
        dest: str,
        target_port: int,
        listen_port: int = 0,
        listen_host: str = HOST,
        sources: tuple[str, ...] = (),
    ) -> int:
        """Put a link named `name` in front of `target_port` (for clients from `sources`); the port it listens on."""
        body = {"name": name, "from": source, "to": dest, "target": f"{HOST}:{target_port}",
                "listen": f"{listen_host}:{listen_port}", "sources": list(sources)}  # fmt: skip
        status, answer = await self.call("POST", "/links", body)
        if status != 201:
            raise TopologyError(f"the links process refused link {name}: {answer.get('error', status)}")
        return int(answer["listen"].rsplit(":", 1)[1])

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request to the links API: (status, JSON answer); TopologyError when it does not answer."""
        if self._http is None:
            raise TopologyError("the links process is not started")
        data = None if body is None else json.dumps(body)
        try:
            async with self._http.request(
                method, path, data=data, headers={"Content-Type": "application/json"}
            ) as response:
                return response.status, await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TopologyError(f"the links process did not answer {method} {path}: {exc}") from None
