"""The `cookie` store: the session sealed in its cookie, and the session middleware's client-side path.

The store is real (Fernet from `cryptography`), the app servers are real aiohttp
applications on free ports, and the clients are real ClientSessions with cookie jars.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncIterator

import aiohttp
import pytest
from yarl import URL

from lbsession.appserver.app import AppServer
from lbsession.appserver.stores import STORES, store_class
from lbsession.appserver.stores.cookie import CookieStore, session_handle
from lbsession.config import AppServerConfig, CookieStoreConfig, SessionConfig, load_config
from lbsession.errors import ConfigError, SessionTooLarge

KEY_A = "a" * 32 + "-first-key"
KEY_B = "b" * 32 + "-second-key"


class Clock:
    """Wall-clock seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_cookie_store_is_registered_as_shared_and_client_side() -> None:
    assert STORES["cookie"].endswith(":CookieStore")
    cls = store_class("cookie")
    assert cls.shared and cls.client_side and cls.settings == "cookie"


def test_without_keys_the_store_refuses_to_start_and_says_how_to_give_them() -> None:
    with pytest.raises(ConfigError, match="LBSESSION_APP__COOKIE__KEYS"):
        CookieStore(())
    with pytest.raises(ConfigError, match="at least 32 characters"):
        load_config(overrides={"app.cookie.keys": ["short"]}, environ={})


async def test_a_sealed_session_opens_on_any_store_with_the_key_and_carries_its_id() -> None:
    clock = Clock()
    sealer, opener = CookieStore((KEY_A,), clock=clock), CookieStore((KEY_A,), clock=clock)
    value = await sealer.seal("sid-1", {"user": "alice", "cart": ["apple"]}, ttl_s=60)
    clock.now += 10
    opened = await opener.open(value, ttl_s=60)
    assert opened is not None
    assert (opened.session_id, opened.attributes, opened.age_s) == ("sid-1", {"user": "alice", "cart": ["apple"]}, 10)
    assert "alice" not in base64.urlsafe_b64decode(value + "==").decode("latin-1")  # encrypted, not only signed


async def test_an_expired_session_is_none_and_counted_apart_from_forgeries() -> None:
    clock = Clock()
    store = CookieStore((KEY_A,), clock=clock)
    value = await store.seal("sid-1", {"user": "alice"}, ttl_s=60)
    clock.now += 61
    assert await store.open(value, ttl_s=60) is None
    assert (store.counters["expired"], store.counters["forged"]) == (1, 0)


@pytest.mark.parametrize("damage", ["tampered", "truncated", "foreign-key", "junk"])
async def test_a_damaged_cookie_is_no_session_and_counted_forged(damage: str) -> None:
    store = CookieStore((KEY_A,))
    value = await store.seal("sid-1", {"user": "alice"}, ttl_s=60)
    damaged = {
        "tampered": value[:40] + ("A" if value[40] != "A" else "B") + value[41:],
        "truncated": value[:-10],
        "foreign-key": await CookieStore((KEY_B,)).seal("sid-1", {"user": "mallory"}, ttl_s=60),
        "junk": "x" * 64,
    }[damage]
    assert await store.open(damaged, ttl_s=60) is None
    assert store.counters["forged"] == 1


async def test_every_cookie_of_a_session_leads_with_its_handle_which_opens_nothing() -> None:
    store = CookieStore((KEY_A,))
    first = await store.seal("sid-1", {"user": "alice"}, ttl_s=60)
    second = await store.seal("sid-1", {"user": "alice", "cart": ["book"]}, ttl_s=60)
    other = await store.seal("sid-2", {"user": "bob"}, ttl_s=60)
    handle = first.partition(".")[0]
    assert first != second and second.partition(".")[0] == handle == session_handle("sid-1")  # stable
    assert other.partition(".")[0] != handle and "sid-1" not in handle and len(handle) == 12
    # Another session's handle in front of a genuine token is a forgery, as a changed token is.
    assert await store.open(other.partition(".")[0] + "." + first.partition(".")[2], ttl_s=60) is None
    assert await store.open(first.partition(".")[2], ttl_s=60) is None  # no handle at all
    assert store.counters["forged"] == 2
    assert (await store.open(first, ttl_s=60)) is not None


async def test_key_rotation_new_values_under_the_first_key_old_ones_still_open() -> None:
    old = CookieStore((KEY_A,))
    rotated = CookieStore((KEY_B, KEY_A))
    before = await old.seal("sid-1", {"user": "alice"}, ttl_s=60)
    assert await rotated.open(before, ttl_s=60) is not None  # the old key still opens
    after = await rotated.seal("sid-1", {"user": "alice"}, ttl_s=60)
    assert await CookieStore((KEY_B,)).open(after, ttl_s=60) is not None  # sealed under the new first key
    assert await old.open(after, ttl_s=60) is None


async def test_a_session_too_large_for_a_cookie_is_refused_with_its_size() -> None:
    store = CookieStore((KEY_A,), max_bytes=4096)
    with pytest.raises(SessionTooLarge, match=r"session too large for the cookie store: \d+ bytes > 4096"):
        await store.seal("sid-1", {"blob": "x" * 4000}, ttl_s=60)
    assert (store.counters["too_large"], store.counters["sealed"]) == (1, 0)


# --------------------------------------------------------------------------- through real app servers


@pytest.fixture
async def two_servers() -> AsyncIterator[tuple[AppServer, AppServer]]:
    """Two app servers that share nothing but the cookie store's key."""
    servers = []
    for server_id in ("was-1", "was-2"):
        config = AppServerConfig(
            id=server_id, port=0, backend="cookie", session=SessionConfig(ttl_s=60), cookie=CookieStoreConfig((KEY_A,))
        )
        servers.append(AppServer(config))
    for server in servers:
        await server.start()
    try:
        yield servers[0], servers[1]
    finally:
        for server in servers:
            await server.stop()


def jar_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def test_a_login_on_one_server_is_known_on_the_other_without_any_shared_state(
    two_servers: tuple[AppServer, AppServer],
) -> None:
    one, two = two_servers
    async with jar_session() as http:
        async with http.post(one.url + "/login", json={"username": "alice"}) as response:
            assert response.status == 200
            set_cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
        # The jar is per host: carry the cookie over to the other server as a balancer's client would.
        value = next(m.value for m in http.cookie_jar if m.key == "SESSION")
        http.cookie_jar.update_cookies({"SESSION": value}, URL(two.url))
        async with http.get(two.url + "/me") as response:
            assert (response.status, (await response.json())["user"]) == (200, "alice")
        async with http.get(two.url + "/healthz") as response:
            assert (await response.json())["sessions"] is None  # nothing on the server to count


async def test_login_rotates_the_id_and_logout_is_not_revocation(two_servers: tuple[AppServer, AppServer]) -> None:
    one, two = two_servers
    async with jar_session() as http:
        async with http.post(one.url + "/login", json={"username": "alice"}):
            pass
        copied = next(m.value for m in http.cookie_jar if m.key == "SESSION")
        async with http.post(one.url + "/logout", json={}) as response:
            assert response.status == 200
            assert "SESSION=" in response.headers["Set-Cookie"]  # the browser's copy is expired...
    async with jar_session() as thief:
        thief.cookie_jar.update_cookies({"SESSION": copied}, URL(two.url))
        async with thief.get(two.url + "/me") as response:
            assert response.status == 200  # ...but a copy made before logout still opens: the drawback
    opened_first = await two.store.open(copied, ttl_s=60)  # type: ignore[attr-defined]
    async with jar_session() as http:
        http.cookie_jar.update_cookies({"SESSION": copied}, URL(one.url))
        async with http.post(one.url + "/login", json={"username": "bob"}):
            pass
        fresh = next(m.value for m in http.cookie_jar if m.key == "SESSION")
    opened_again = await one.store.open(fresh, ttl_s=60)  # type: ignore[attr-defined]
    assert opened_first is not None and opened_again is not None
    assert opened_again.session_id != opened_first.session_id  # a new id at login: no fixation


async def test_a_damaged_cookie_is_cleared_by_its_401_so_the_login_after_it_is_not_a_second_forgery(
    two_servers: tuple[AppServer, AppServer],
) -> None:
    one, _ = two_servers
    async with jar_session() as http:
        async with http.post(one.url + "/login", json={"username": "alice"}):
            pass
        value = next(m.value for m in http.cookie_jar if m.key == "SESSION")
        http.cookie_jar.update_cookies({"SESSION": value[:-12]}, URL(one.url))  # cut short
        async with http.get(one.url + "/me") as response:
            assert response.status == 401
            assert response.cookies["SESSION"]["max-age"] == "0"  # the damaged value is expired at once
        assert not [m for m in http.cookie_jar if m.key == "SESSION"]
        async with http.post(one.url + "/login", json={"username": "alice"}) as response:
            assert response.status == 200
        async with http.get(one.url + "/me") as response:
            assert response.status == 200 and "SESSION" not in response.cookies  # a good cookie stays as it is
    assert one.store.counters["forged"] == 1  # type: ignore[attr-defined]  # one damaged cookie, counted once


async def test_a_session_outgrowing_the_cookie_is_a_413_and_stays_as_it_was(
    two_servers: tuple[AppServer, AppServer],
) -> None:
    one, _ = two_servers
    item = "x" * 64
    async with jar_session() as http:
        async with http.post(one.url + "/login", json={"username": "alice"}):
            pass
        accepted = 0
        while True:
            async with http.post(one.url + "/cart", json={"item": item}) as response:
                if response.status != 200:
                    refusal = (response.status, await response.json())
                    break
                accepted += 1
        assert refusal[0] == 413
        assert refusal[1]["error"].startswith("session too large for the cookie store:")
        async with http.get(one.url + "/cart") as response:
            assert len((await response.json())["cart"]) == accepted  # nothing truncated, nothing lost
    assert 20 < accepted < 100


def test_the_cookie_section_is_an_app_setting() -> None:
    config = load_config(overrides={"app.backend": "cookie", "app.cookie.keys": [KEY_A]}, environ={})
    assert config.app.cookie == CookieStoreConfig(keys=(KEY_A,))
    assert dataclasses.replace(config.app.cookie, max_bytes=2048).problems() == []
