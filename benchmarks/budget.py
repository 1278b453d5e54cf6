"""Where the Python of one proxied request goes: each step of the data path timed alone.

`benchmarks/datapath.py` gives the whole Python cost of a request (both protocols
fed in memory). This splits it: each step the proxy takes for a request is run
alone, many times, on the bench's own request and response, and its microseconds
printed beside the whole. What no step accounts for is the glue: the protocol
state machine, method calls and attribute lookups between the steps.

    python benchmarks/budget.py                  # round-robin
    python benchmarks/budget.py sticky-cookie    # any strategy name

The figures are per request on this machine's Python; compare them with each
other and with datapath.py's total, run in the same minute.
"""

from __future__ import annotations

import asyncio
import sys
import timeit
from collections.abc import Callable

from datapath import REQUEST, RESPONSE, MemoryTransport, measure

from lbsession.balancer.balancer import LoadBalancer
from lbsession.balancer.compiled import build
from lbsession.balancer.http import parse_request_head, parse_response_head, response_has_body
from lbsession.balancer.proxy import ClientConnection
from lbsession.balancer.strategies.base import RequestFacts
from lbsession.config import STRATEGY_NAMES, BalancerConfig, StickyConfig, UpstreamConfig

ROUNDS = 200_000


def per_call_us(step: Callable[[], object], rounds: int = ROUNDS) -> float:
    """The best of three runs of `rounds` calls, in microseconds per call."""
    return min(timeit.repeat(step, number=rounds, repeat=3)) / rounds * 1e6


def budget(strategy: str) -> list[tuple[str, float]]:
    """Each step of one request through `strategy`, in µs, in the order the proxy takes them."""
    upstreams = tuple(UpstreamConfig(id=f"was-{i}", url=f"http://127.0.0.1:{9001 + i}") for i in range(3))
    lb = LoadBalancer(BalancerConfig(strategy=strategy, upstreams=upstreams, sticky=StickyConfig(secret="b" * 32)))
    client = ClientConnection(lb)
    client.connection_made(MemoryTransport())  # type: ignore[arg-type]
    request, response = REQUEST, RESPONSE
    if strategy == "sticky-cookie":  # a returning user: the pin is present and must be checked
        facts = RequestFacts("127.0.0.1", None, parse_request_head(REQUEST[:-4]))
        pin = lb.strategy.choose(facts, lb.pool.candidates).set_cookie
        assert pin is not None
        request = REQUEST[:-2] + b"Cookie: " + pin.split(";")[0].encode() + b"\r\n\r\n"
    head = request[: request.find(b"\r\n\r\n")]
    req = parse_request_head(head)
    cookies = client._cookies(req.cookie) if req.cookie is not None else {}
    resp_head = response[: response.find(b"\r\n\r\n")]
    resp = parse_response_head(resp_head)
    candidates, statuses, routes, limits = lb.pool.candidates, lb.statuses, lb.routes, lb.limits

    def route() -> object:
        return lb.strategy.choose(RequestFacts("127.0.0.1", None, req, cookies), candidates)

    def count() -> None:
        statuses[200] = statuses.get(200, 0) + 1
        routes["retried"] += 1  # any reason: one dict update, as the proxy does

    steps: list[tuple[str, Callable[[], object]]] = [
        ("head search (find CRLF CRLF, slice)", lambda: request[: request.find(b"\r\n\r\n", 0)]),
        ("request head validation and rewrite", lambda: parse_request_head(head)),
        ("route (request facts + strategy.choose)", route),
        ("upstream head (cookies, X-Forwarded-*)", lambda: lb.upstream_head(req, client)),
        ("response head parse", lambda: parse_response_head(resp_head)),
        ("response framing (has body, keep-alive)", lambda: response_has_body(req.method, resp.status)),
        ("client head (+ Set-Cookie, CRLF CRLF)", lambda: resp.out + b"\r\n\r\n"),
        ("event publishing (nobody watching)", lambda: lb.events.active),
        ("counters (status, route)", count),
        ("timeouts (a deadline set)", lambda: lb.clock + limits.read_timeout_s),
    ]
    return [(name, per_call_us(step)) for name, step in steps]


def main() -> None:
    names = sys.argv[1:] or ["round-robin"]
    print(f"build: {build().description}")  # LBSESSION_PURE=1 for the pure one beside it
    for name in names:
        if name not in STRATEGY_NAMES:
            raise SystemExit(f"error: unknown strategy {name!r}; choose from {', '.join(STRATEGY_NAMES)}")
        total = asyncio.run(measure(name))
        rows = budget(name)
        print(f"{name}: {total:.2f} us of Python per proxied request (datapath.py)")
        for step, us in rows:
            print(f"  {step:<42}{us:6.2f} us")
        steps = sum(us for _, us in rows)
        print(f"  {'sum of the steps':<42}{steps:6.2f} us")
        print(f"  {'glue (state machine, calls, buffers)':<42}{total - steps:6.2f} us")


if __name__ == "__main__":
    main()
