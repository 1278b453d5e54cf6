"""The `cookie` store in a whole lab, run as a user runs it: `lbsession run --strategy round-robin --backend cookie`.

The issue's "done when": with the session in the client, round-robin keeps every user
logged in across a killed server and an added one, with nothing shared between servers.
"""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from tests.integration.test_cli import lbsession, wait_for_file

pytestmark = pytest.mark.integration


async def admin(http: aiohttp.ClientSession, method: str, url: str) -> dict:
    async with http.request(method, url, json={}) as response:
        assert response.status < 300, await response.text()
        return await response.json()  # type: ignore[no-any-return]


async def test_round_robin_with_the_cookie_store_keeps_everyone_logged_in_across_a_kill_and_an_add(tmp_path):
    ready = tmp_path / "ready.json"
    process = await lbsession(
        "run", "--strategy", "round-robin", "--backend", "cookie", "--servers", "3",
        "--port", "0", "--admin-port", "0", "--ready-file", str(ready),
    )  # fmt: skip
    jars = [aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) for _ in range(6)]
    try:
        info = await wait_for_file(ready, process)
        lb, admin_url = info["lb"], info["admin"]
        for n, jar in enumerate(jars):
            async with jar.post(lb + "/login", json={"username": f"user{n}"}) as response:
                assert response.status == 200
        async with aiohttp.ClientSession() as http:
            await admin(http, "POST", f"{admin_url}/servers/was-2/kill")
            added = await admin(http, "POST", f"{admin_url}/topology/servers")  # started, then put in the pool
        seen: dict[int, set[str]] = {}
        for n, jar in enumerate(jars):
            for _ in range(8):
                async with jar.get(lb + "/me") as response:
                    body = await response.json()
                    assert (response.status, body["user"]) == (200, f"user{n}"), body
                    seen.setdefault(n, set()).add(response.headers["X-Served-By"])
        servers = set().union(*seen.values())
        assert added["id"] in servers  # the newcomer opened cookies it never issued
        assert "was-2" not in servers and {"was-1", "was-3"} <= servers
    finally:
        for jar in jars:
            await jar.close()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await process.communicate()
            except TimeoutError:
                process.kill()
                await process.wait()
