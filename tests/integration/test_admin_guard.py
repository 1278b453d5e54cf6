"""The admin API can kill servers: who may use it, and how a change must be asked for."""

from __future__ import annotations

import ipaddress

import aiohttp
import pytest

from lbsession.balancer.admin import _client_allowed
from lbsession.balancer.balancer import LoadBalancer
from lbsession.config import BalancerConfig, UpstreamConfig, load_config
from lbsession.errors import ConfigError

pytestmark = pytest.mark.integration

TOKEN = "a-long-enough-admin-token"


@pytest.fixture
async def lb():
    config = BalancerConfig(port=0, admin_port=0, upstreams=(UpstreamConfig("a", "http://127.0.0.1:9"),))
    balancer = LoadBalancer(config)
    await balancer.start()
    yield balancer
    await balancer.stop()


async def test_a_plain_cross_site_post_cannot_change_anything(lb):
    async with aiohttp.ClientSession() as http:
        # What a foreign page can make a browser send without a preflight: a form post, or no body.
        for kwargs in ({}, {"data": {"strategy": "ip-hash"}}, {"data": "x", "headers": {"Content-Type": "text/plain"}}):
            async with http.put(lb.admin_url + "/strategy", **kwargs) as r:
                assert r.status == 415, kwargs
                assert "application/json" in (await r.json())["error"]
        async with http.get(lb.admin_url + "/status") as r:
            assert (await r.json())["strategy"] == "round-robin"  # unchanged
        async with http.put(lb.admin_url + "/strategy", json={"strategy": "ip-hash"}) as r:
            assert r.status == 200  # the same change, as JSON, from the lab's own tools


async def test_with_a_token_every_change_needs_it():
    config = load_config(
        overrides={
            "balancer": {
                "port": 0,
                "admin_port": 0,
                "admin_token": TOKEN,
                "upstreams": [{"id": "a", "url": "http://127.0.0.1:9"}],
            }
        },
        environ={},
    )
    lb = LoadBalancer(config.balancer)
    await lb.start()
    try:
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}):
                async with http.put(lb.admin_url + "/strategy", json={"strategy": "ip-hash"}, headers=headers) as r:
                    assert r.status == 401, headers
            async with http.put(
                lb.admin_url + "/strategy", json={"strategy": "ip-hash"}, headers={"Authorization": f"Bearer {TOKEN}"}
            ) as r:
                assert r.status == 200
            async with http.get(lb.admin_url + "/status") as r:
                assert r.status == 200  # reading needs no token
    finally:
        await lb.stop()


def test_an_exposed_admin_listener_without_a_token_does_not_start():
    with pytest.raises(ConfigError) as error:
        load_config(overrides={"balancer.admin_host|--admin-host": "0.0.0.0"}, environ={})
    assert "--admin-host: balancer.admin_host: '0.0.0.0' exposes the admin API" in str(error.value)
    assert "admin_token" in str(error.value)
    config = load_config(overrides={"balancer": {"admin_host": "0.0.0.0", "admin_token": TOKEN}}, environ={})
    assert config.balancer.admin_token == TOKEN


@pytest.mark.parametrize(
    ("remote", "allowed", "expected"),
    [
        ("127.0.0.1", [], True),
        ("127.0.0.9", [], True),
        ("::1", [], True),
        ("10.0.0.5", [], False),
        ("10.0.0.5", ["10.0.0.0/8"], True),
        ("192.168.1.4", ["10.0.0.0/8"], False),
        (None, [], False),
        ("not-an-address", ["0.0.0.0/0"], False),
    ],
)
def test_only_loopback_and_allowed_networks_may_use_it(remote, allowed, expected):
    networks = [ipaddress.ip_network(n) for n in allowed]
    assert _client_allowed(remote, networks) is expected


async def test_without_a_token_only_loopback_names_may_be_addressed(lb):
    async with aiohttp.ClientSession() as http:
        for host, expected in (("evil.example:8081", 403), ("localhost:1", 200), ("127.0.0.1", 200), ("[::1]:80", 200)):
            async with http.get(lb.admin_url + "/status", headers={"Host": host}) as r:
                assert r.status == expected, host
        async with http.put(
            lb.admin_url + "/strategy", json={"strategy": "ip-hash"}, headers={"Host": "evil.example"}
        ) as r:
            assert r.status == 403
            assert "127.0.0.1 or localhost" in (await r.json())["error"]
