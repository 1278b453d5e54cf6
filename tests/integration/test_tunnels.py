"""WebSocket and Upgrade tunnels through a real balancer (RFC 9110 §7.8, RFC 6455).

A scripted raw-socket upstream answers the upgrade request with exact bytes and then
speaks whatever the test wants, so the tunnel is checked byte for byte both ways, with
half-close, backpressure and its idle timeout; the real app server's `GET /ws` is
checked through a lab started as `lbsession run` starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from lbsession.balancer.balancer import LoadBalancer
from tests.integration.proxy_fixtures import (
    MIB,
    READ_TIMEOUT_S,
    Exchange,
    ProxyLab,
    RawClient,
    RawUpstream,
    Response,
    http_response,
    payload,
    strict_requests,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: lb.test\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


@pytest.fixture
async def lab() -> AsyncIterator[ProxyLab]:
    async with contextlib.AsyncExitStack() as stack:
        yield ProxyLab(stack)


async def until(condition: Callable[[], object], what: str) -> None:
    """Wait, bounded, for `condition()` to hold (a readiness poll, not a timed assertion)."""
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            while not condition():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"waited {READ_TIMEOUT_S:g} s in vain for: {what}") from None


async def switched(client: RawClient) -> bytes:
    """Send the upgrade request; return the 101's head once it arrives."""
    client.send(UPGRADE)
    response = await client.response()
    assert response.status == 101, response.head
    return response.head


async def switch_then_listen(exchange: Exchange) -> bool:
    """An upstream that agrees to switch, then reads until the balancer closes."""
    exchange.writer.write(SWITCHED)
    await exchange.reader.read()
    return False


async def one_answer(lab: ProxyLab, answer: bytes, request: bytes) -> tuple[LoadBalancer, RawUpstream, Response]:
    """Send `request` through a balancer to an upstream that writes `answer` and ends; the client's response."""

    async def respond(exchange: Exchange) -> bool:
        exchange.writer.write(answer)
        return False

    upstream = await lab.raw(respond)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    client.send(request)
    return lb, upstream, await client.response()


def tunnel_counts(lb: LoadBalancer) -> tuple[int, int]:
    """(open, opened) as the balancer's /status reports them."""
    tunnels = lb.status()["tunnels"]
    return tunnels["open"], tunnels["opened"]


# --------------------------------------------------------------------------- the tunnel itself


async def test_bytes_go_through_exactly_both_ways_and_the_tunnel_is_counted(lab: ProxyLab) -> None:
    up_bytes, down_bytes = payload(3 * MIB + 17), payload(2 * MIB + 5)
    got_up: list[bytes] = []

    async def respond(exchange: Exchange) -> bool:
        exchange.writer.write(SWITCHED + down_bytes[:100])  # the new protocol may start in the 101's packet
        got_up.append(await exchange.reader.readexactly(len(up_bytes)))
        exchange.writer.write(down_bytes[100:])
        await exchange.writer.drain()
        await exchange.reader.read()  # until the client closes
        return False

    upstream = await lab.raw(respond)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    client.send(UPGRADE + up_bytes[:10])  # and a client may start before the 101 arrives
    response = await client.response()
    assert response.status == 101
    assert response.header("upgrade") == "websocket" and response.header("connection") == "Upgrade"
    assert response.header("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert tunnel_counts(lb) == (1, 1)
    assert lb.status()["tunnels"]["by_server"] == {"raw": 1}
    assert lb.status()["servers"][0]["in_flight"] == 1  # least-conn sees a WebSocket as load
    client.send(up_bytes[10:])
    async with asyncio.timeout(READ_TIMEOUT_S):
        assert await client.reader.readexactly(len(down_bytes)) == down_bytes
    await until(lambda: got_up, "the upstream read every byte")
    assert got_up == [up_bytes]
    # What the upstream got before the switch was one strict request that asks to upgrade.
    (wire,) = upstream.requests_wire()
    head_end = wire.index(b"\r\n\r\n") + 4
    request = wire[:head_end]
    assert b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" in request
    assert b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==" in request
    assert wire[head_end:] == up_bytes
    await client.close()
    await until(lambda: tunnel_counts(lb)[0] == 0, "the tunnel closed")
    assert lb.status()["servers"][0]["in_flight"] == 0
    assert lb.status()["counters"]["responses"] == {"101": 1}


async def test_a_half_close_is_passed_on_and_the_other_way_still_flows(lab: ProxyLab) -> None:
    async def respond(exchange: Exchange) -> bool:
        exchange.writer.write(SWITCHED)
        everything = await exchange.reader.read()  # up to the EOF the balancer passed on
        exchange.writer.write(b"you said: " + everything)  # after the client's EOF, still delivered
        await exchange.writer.drain()
        return False

    upstream = await lab.raw(respond)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    await switched(client)
    client.send(b"hello, then nothing more")
    client.writer.write_eof()
    assert await client.read_to_eof() == b"you said: hello, then nothing more"
    await until(lambda: tunnel_counts(lb)[0] == 0, "both ways ended, so the tunnel did")


async def test_a_client_that_half_closed_before_the_101_has_its_eof_passed_on_after_it(lab: ProxyLab) -> None:
    async def respond(exchange: Exchange) -> bool:
        exchange.writer.write(SWITCHED)
        everything = await exchange.reader.read()
        exchange.writer.write(b"got " + everything)
        return False

    upstream = await lab.raw(respond)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    client.send(UPGRADE + b"early bytes")  # the new protocol's first bytes, then the client's EOF
    client.writer.write_eof()
    response = await client.response()
    assert response.status == 101
    assert await client.read_to_eof() == b"got early bytes"
    await until(lambda: tunnel_counts(lb) == (0, 1), "the tunnel closed")


async def test_the_upstream_half_closing_first_still_lets_the_client_speak(lab: ProxyLab) -> None:
    heard: list[bytes] = []

    async def respond(exchange: Exchange) -> bool:
        exchange.writer.write(SWITCHED + b"bye")
        exchange.writer.write_eof()
        heard.append(await exchange.reader.read())
        return False

    upstream = await lab.raw(respond)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    await switched(client)
    assert await client.read_to_eof() == b"bye"  # the upstream's EOF reached the client
    client.send(b"last words")
    client.writer.write_eof()
    await until(lambda: heard, "the upstream read to its EOF")
    assert heard == [b"last words"]
    await until(lambda: tunnel_counts(lb)[0] == 0, "the tunnel closed")


async def test_a_slow_reader_pauses_the_upstream_rather_than_filling_the_balancer(lab: ProxyLab) -> None:
    flood = payload(24 * MIB)

    async def respond(exchange: Exchange) -> bool:
        exchange.writer.write(SWITCHED + flood)  # as fast as the balancer takes it
        await exchange.writer.drain()
        await exchange.reader.read()
        return False

    upstream = await lab.raw(respond)
    lb = await lab.balancer({"raw": upstream.url})
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.setblocking(False)
    await asyncio.get_running_loop().sock_connect(slow, ("127.0.0.1", lb.port))
    reader, writer = await asyncio.open_connection(sock=slow, limit=64 * 1024)
    client = RawClient(reader, writer)
    try:
        client.send(UPGRADE)
        await until(lambda: lb.tunnels, "the tunnel opened")
        (tunnel,) = lb.tunnels
        # The client reads nothing: the balancer stops reading the upstream once its buffer is full.
        await until(lambda: not tunnel.server.transport.is_reading(), "the upstream side paused")
        assert tunnel.client.transport.get_write_buffer_size() < 2 * MIB  # bounded, though 24 MiB are on offer
        async with asyncio.timeout(READ_TIMEOUT_S * 2):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert await reader.readexactly(len(flood)) == flood  # paused and resumed, nothing lost
    finally:
        await client.close()


async def test_a_slow_upstream_pauses_the_client_rather_than_filling_the_balancer(lab: ProxyLab) -> None:
    flood = payload(24 * MIB)
    may_read = asyncio.Event()
    got: list[bytes] = []

    async def respond(exchange: Exchange) -> bool:
        exchange.writer.write(SWITCHED)
        await may_read.wait()  # reads nothing until the test has seen the pause
        got.append(await exchange.reader.readexactly(len(flood)))
        return False

    upstream = await lab.raw(respond)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    await switched(client)
    (tunnel,) = lb.tunnels
    client.send(flood)  # the client writes as fast as the balancer takes it
    await until(lambda: not tunnel.client.transport.is_reading(), "the client side paused")
    assert tunnel.server.transport.get_write_buffer_size() < 2 * MIB  # bounded, though 24 MiB are on offer
    may_read.set()
    await until(lambda: got, "the upstream read the whole flood")
    assert got == [flood]  # paused and resumed, nothing lost


async def test_tunnels_count_against_the_connection_limit(lab: ProxyLab) -> None:
    upstream = await lab.raw(switch_then_listen)
    lb = await lab.balancer({"raw": upstream.url}, max_connections=1)
    await switched(await lab.client(lb))
    late = await lab.client(lb)  # the one tunnel holds the only place
    assert (await late.request("/")).status == 503
    assert lb.shed == 1


async def test_a_silent_tunnel_is_closed_at_the_tunnel_timeout(lab: ProxyLab) -> None:
    async def respond(exchange: Exchange) -> bool:
        exchange.writer.write(SWITCHED + b"ping")
        await exchange.reader.read()  # silence, until the balancer closes
        return False

    upstream = await lab.raw(respond)
    lb = await lab.balancer({"raw": upstream.url}, tunnel_timeout_s=0.3)
    client = await lab.client(lb)
    await switched(client)
    assert await client.read_to_eof() == b"ping"  # then the balancer closed it, nobody else
    assert lb.status()["tunnels"]["timed_out"] == 1
    await asyncio.wait_for(asyncio.gather(*upstream.ended.values()), READ_TIMEOUT_S)
    assert tunnel_counts(lb) == (0, 1)


# --------------------------------------------------------------------------- answers that are not a switch


async def test_an_answer_other_than_101_is_relayed_and_the_connection_stays_http(lab: ProxyLab) -> None:
    async def respond(exchange: Exchange) -> bool:
        if b"Upgrade" in exchange.head:
            exchange.writer.write(http_response(b"no websockets here", "426 Upgrade Required", "Upgrade: h2c\r\n"))
        else:
            exchange.writer.write(http_response(b"plain"))
        return True

    upstream = await lab.raw(respond)
    lb = await lab.balancer({"raw": upstream.url})
    client = await lab.client(lb)
    client.send(UPGRADE)
    refused = await client.response()
    assert (refused.status, refused.body) == (426, b"no websockets here")
    assert refused.header("upgrade") is None  # hop-by-hop: the client did not get a switch
    plain = await client.request("/next")  # the same client connection carries on as HTTP
    assert (plain.status, plain.body) == (200, b"plain")
    assert tunnel_counts(lb) == (0, 0)
    # The upgrade's upstream connection was closed after its answer, never reused.
    first, second = upstream.exchanges
    assert first.peer_port != second.peer_port
    await asyncio.wait_for(upstream.ended[first.peer_port], READ_TIMEOUT_S)
    for wire in upstream.requests_wire():
        requests = strict_requests(wire.replace(b"\r\nUpgrade: websocket\r\nConnection: Upgrade", b""))
        assert len(requests) == 1


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        (UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\nhello"), "a body with Content-Length"),
        (UPGRADE.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), "a chunked body"),
        (UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: web socket"), "an Upgrade that is not a token list"),
    ],
    ids=["content-length", "chunked", "bad-upgrade"],
)
async def test_an_upgrade_the_balancer_cannot_tunnel_safely_is_refused(
    lab: ProxyLab, request_bytes: bytes, why: str
) -> None:
    _, upstream, response = await one_answer(lab, SWITCHED, request_bytes)
    assert response.status == 400, why
    assert upstream.exchanges == []


@pytest.mark.parametrize(
    ("request_bytes", "answer", "forwarded_upgrade"),
    [
        # RFC 9110 §7.8: a server MUST ignore Upgrade on HTTP/1.0, so the proxy drops it; a switch is unasked.
        (UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0"), SWITCHED, False),
        # An Upgrade the Connection header does not name is hop-by-hop like any other.
        (UPGRADE.replace(b"Connection: keep-alive, Upgrade", b"Connection: keep-alive"), SWITCHED, False),
        # A 101 must say what it switches to (RFC 9110 §15.2.2).
        (UPGRADE, b"HTTP/1.1 101 Switching Protocols\r\n\r\n", True),
        # ... and only to a protocol the client listed (RFC 9110 §7.8).
        (UPGRADE, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", True),
    ],
    ids=["http10", "not-in-connection", "101-without-upgrade", "101-to-another-protocol"],
)
async def test_a_switch_nobody_asked_for_or_that_names_nothing_is_a_502(
    lab: ProxyLab, request_bytes: bytes, answer: bytes, forwarded_upgrade: bool
) -> None:
    lb, upstream, response = await one_answer(lab, answer, request_bytes)
    assert response.status == 502
    (exchange,) = upstream.exchanges
    assert (b"upgrade: websocket" in exchange.head.lower()) == forwarded_upgrade
    assert tunnel_counts(lb) == (0, 0)


# --------------------------------------------------------------------------- routing


async def test_the_sticky_cookie_rides_on_the_101_and_pins_the_next_websocket(lab: ProxyLab) -> None:
    ups = {f"s{n}": (await lab.raw(switch_then_listen)) for n in range(3)}
    lb = await lab.balancer({name: u.url for name, u in ups.items()}, strategy="sticky-cookie")
    first = await lab.client(lb)
    head = await switched(first)
    cookie_line = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"set-cookie: lbserver="))
    cookie = cookie_line.split(b": ", 1)[1].split(b";", 1)[0]
    (pinned,) = [name for name, u in ups.items() if u.exchanges]
    for _ in range(3):
        again = await lab.client(lb)
        again.send(UPGRADE.replace(b"\r\n\r\n", b"\r\nCookie: " + cookie + b"\r\n\r\n"))
        response = await again.response()
        assert response.status == 101 and response.header("set-cookie") is None
    assert [name for name, u in ups.items() if u.exchanges] == [pinned]
    assert len(ups[pinned].exchanges) == 4
    assert all(b"LBSERVER" not in e.head for e in ups[pinned].exchanges)  # the balancer's own cookie stays home
    assert lb.status()["tunnels"]["by_server"][pinned] == 4


async def test_status_and_metrics_count_tunnels_up_and_down(lab: ProxyLab) -> None:
    upstream = await lab.raw(switch_then_listen)
    lb = await lab.balancer({"raw": upstream.url})
    session = await lab.session()

    async def gauge() -> tuple[int, float]:
        async with session.get(f"{lb.admin_url}/status") as response:
            status = await response.json()
        async with session.get(f"{lb.admin_url}/metrics") as response:
            text = await response.text()
        line = next(ln for ln in text.splitlines() if ln.startswith('lbsession_lb_tunnels{server="raw"}'))
        return status["tunnels"]["open"], float(line.split()[-1])

    clients = [await lab.client(lb) for _ in range(3)]
    for client in clients:
        await switched(client)
    assert await gauge() == (3, 3.0)
    for n, client in enumerate(clients, 1):
        await client.close()
        await until(lambda n=n: len(lb.tunnels) == 3 - n, "a tunnel closed")  # type: ignore[misc]
        assert await gauge() == (3 - n, 3.0 - n)


# --------------------------------------------------------------------------- the real app server


async def test_a_websocket_through_a_sticky_lab_stays_on_its_server_and_knows_the_user(start_lab) -> None:
    lab = await start_lab("sticky-cookie", servers=3)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.post(f"{lab.lb.url}/login", json={"username": "alice"}) as response:
            assert response.status == 200
            home = response.headers["X-Served-By"]
        for _ in range(3):  # each new WebSocket goes back to the server that holds the session
            await until(lambda: lab.lb.status()["tunnels"]["open"] == 0, "the last WebSocket's tunnel closed")
            async with http.ws_connect(f"{lab.lb.url}/ws") as ws:
                assert ws._response.headers["X-Served-By"] == home
                for word in ("hello", "again"):
                    await ws.send_str(word)
                    assert await ws.receive_json(timeout=READ_TIMEOUT_S) == {
                        "user": "alice",
                        "server": home,
                        "echo": word,
                    }
                status = lab.lb.status()
                assert status["tunnels"]["open"] == 1 and status["tunnels"]["by_server"][home] == 1
        await until(lambda: lab.lb.status()["tunnels"]["open"] == 0, "the tunnels closed")


@pytest.mark.parametrize("cookie", [None, "SESSION=" + "A" * 43], ids=["no-cookie", "unknown-session"])
async def test_a_websocket_without_a_session_is_closed_with_4401(start_lab, cookie: str | None) -> None:
    lab = await start_lab("round-robin", servers=1)
    headers = {"Cookie": cookie} if cookie else {}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{lab.lb.url}/ws", headers=headers) as ws:
            message = await ws.receive(timeout=READ_TIMEOUT_S)
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert (message.data, message.extra) == (4401, "login required")
        async with http.get(f"{lab.lb.url}/metrics") as response:
            metrics = await response.text()
    # Asked to log in again while it carried a session cookie: the app server's re-login, as a 401 is.
    relogins = [ln for ln in metrics.splitlines() if ln.startswith('lbsession_app_relogins_total{server="was-1"}')]
    assert relogins == ([] if cookie is None else ['lbsession_app_relogins_total{server="was-1"} 1.0'])
    ws_requests = [ln for ln in metrics.splitlines() if ln.startswith("lbsession_app_requests_total") and "/ws" in ln]
    assert ws_requests == ['lbsession_app_requests_total{method="GET",route="/ws",server="was-1",status="101"} 1.0']


async def test_a_websocket_opened_by_another_site_s_page_is_refused(start_lab) -> None:
    lab = await start_lab("round-robin", servers=1)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.post(f"{lab.lb.url}/login", json={"username": "alice"}) as response:
            assert response.status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{lab.lb.url}/ws", origin="http://evil.example")
        assert refused.value.status == 403
        async with http.ws_connect(f"{lab.lb.url}/ws", origin=lab.lb.url) as ws:  # our own page's origin
            await ws.send_str("hi")
            assert (await ws.receive_json(timeout=READ_TIMEOUT_S))["user"] == "alice"
