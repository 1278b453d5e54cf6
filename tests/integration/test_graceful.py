"""Graceful operations: draining a server, and stopping the balancer with requests in flight."""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
import pytest
from aiohttp import web

from lbsession.lab.topology import Topology

pytestmark = pytest.mark.integration


async def test_a_drained_server_keeps_its_pinned_users_until_the_timeout_then_lets_them_go(start_lab, users):
    lab: Topology = await start_lab("sticky-cookie", servers=3)
    people = [users(lab.lb.url) for _ in range(6)]
    homes = [(await p.login(f"user{n}")).server for n, p in enumerate(people)]
    drained = homes[0]
    pinned_there = [p for p, home in zip(people, homes, strict=True) if home == drained]

    async with aiohttp.ClientSession() as admin:
        async with admin.post(f"{lab.admin_url}/servers/{drained}/drain", json={"timeout_s": 30}) as r:
            assert r.status == 200 and (await r.json())["draining"]
        during = [await p.me() for p in pinned_there]
        newcomers = [await users(lab.lb.url).login(f"new{n}") for n in range(6)]
        # The timeout passing is simulated by shortening it: drain again with 0 s.
        async with admin.post(f"{lab.admin_url}/servers/{drained}/drain", json={"timeout_s": 0}) as r:
            assert r.status == 200
        upstream = lab.lb.pool.upstreams[drained]
        async with asyncio.timeout(5):
            while not upstream.drained:
                await asyncio.sleep(0.01)
        after = [await p.me() for p in pinned_there]
        async with admin.post(f"{lab.admin_url}/servers/{drained}/drain", json={"timeout_s": "soon"}) as r:
            assert r.status == 400 and "timeout_s" in (await r.json())["error"]

    assert all((r.status, r.server) == (200, drained) for r in during)  # pinned users still served there
    assert drained not in {r.server for r in newcomers}  # no new sessions pinned to it
    assert all(r.server != drained for r in after)  # redispatched once the drain timed out
    assert lab.lb.routes["redispatched"] >= len(pinned_there)


async def listener_closed(url: str) -> None:
    """Return once nothing accepts connections at `url` any more: shutdown has begun."""
    host, port = url.removeprefix("http://").split(":")
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except ConnectionRefusedError:
                return
            except ConnectionResetError:  # accepted into the backlog as the listener closed: ask again
                continue
            writer.close()
            await asyncio.sleep(0.01)


async def test_sigterm_lets_requests_in_flight_finish():
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="finished")

    app = web.Application()
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    upstream = f"http://127.0.0.1:{runner.addresses[0][1]}"
    lb = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbsession", "lb", "--port", "0", "--admin-port", "0", "--upstream", upstream,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(lb.stdout.readline(), 30)).decode()
        url = line.split(" on ")[1].split(" ")[0]
        async with aiohttp.ClientSession() as http:
            request = asyncio.create_task(http.get(url + "/slow"))
            await asyncio.wait_for(arrived.wait(), 10)
            lb.send_signal(signal.SIGTERM)  # a request is in flight
            await listener_closed(url)  # the balancer is shutting down, with that request open
            release.set()
            async with await request as response:
                assert (response.status, await response.text()) == (200, "finished")
        assert await asyncio.wait_for(lb.wait(), 10) == 0
    finally:
        if lb.returncode is None:
            lb.kill()
            await lb.wait()
        await runner.cleanup()


async def test_past_the_connection_limit_a_client_gets_a_503_at_once_not_a_queue():
    from lbsession.balancer.balancer import LoadBalancer
    from lbsession.config import BalancerConfig, LimitsConfig, UpstreamConfig

    config = BalancerConfig(
        port=0,
        admin_port=0,
        upstreams=(UpstreamConfig("a", "http://127.0.0.1:9"),),
        limits=LimitsConfig(max_connections=2),
    )
    lb = LoadBalancer(config)
    await lb.start()
    held = []
    try:
        for _ in range(2):  # the two it admits, idle
            held.append(await asyncio.open_connection("127.0.0.1", lb.port))
        async with asyncio.timeout(5):
            while len(lb.clients) < 2:  # both accepted on the balancer's side
                await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        async with asyncio.timeout(2):  # at once: nothing to wait for
            answer = await reader.read()
        writer.close()
    finally:
        for _, w in held:
            w.close()
        await lb.stop()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"Retry-After: 1" in answer and b"connection limit" in answer
    assert lb.status()["counters"]["shed_connections"] == 1


async def test_sighup_reloads_the_config_and_a_broken_one_leaves_the_running_config(tmp_path):
    runners = []
    for name in ("a", "b"):

        async def hello(request: web.Request, name: str = name) -> web.Response:
            return web.Response(text=name)

        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
    url_a, url_b = (f"http://127.0.0.1:{r.addresses[0][1]}" for r in runners)
    config = tmp_path / "lb.yaml"
    config.write_text(f"balancer:\n  strategy: round-robin\n  upstreams: [{{id: a, url: '{url_a}'}}]\n")
    lb = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbsession", "lb", "--config", str(config), "--port", "0", "--admin-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(lb.stdout.readline(), 30)).decode()
        admin = line.rsplit("admin on ", 1)[1].strip()

        async def status() -> dict:
            async with aiohttp.ClientSession() as http, http.get(admin + "/status") as r:
                return await r.json()

        config.write_text(
            f"balancer:\n  strategy: ip-hash\n  upstreams: [{{id: a, url: '{url_a}'}}, {{id: b, url: '{url_b}'}}]\n"
        )
        lb.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            current = await status()
            while [s["id"] for s in current["servers"]] != ["a", "b"]:
                await asyncio.sleep(0.02)
                current = await status()
        assert current["strategy"] == "ip-hash"

        config.write_text("balancer:\n  strategy: nope\n  upstreams: []\n")  # a mistake
        lb.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while b"reload refused" not in (said := await lb.stderr.readline()):
                assert said, "the balancer exited instead of refusing the reload"
        after = await status()
        async with aiohttp.ClientSession() as http, http.get(line.split(" on ")[1].split(" ")[0] + "/") as r:
            served = (r.status, await r.text())
    finally:
        lb.terminate()
        await lb.wait()
        for runner in runners:
            await runner.cleanup()
    assert b"balancer.strategy: 'nope' is not valid" in said
    assert [s["id"] for s in after["servers"]] == ["a", "b"] and after["strategy"] == "ip-hash"
    assert served[0] == 200 and served[1] in ("a", "b")
