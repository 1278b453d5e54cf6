"""The contract every session store keeps, run against every registered backend.

Two parts. What *every* store must do, server-side or client-side (the cookie is
the session): a session reads back as written, an unknown one is None (never an
error), a store that cannot be reached raises StoreUnavailable (never None), a
session expires after its TTL, values are JSON, and a login gives a fresh
session id. These run on the `any_store` fixture, through `Handle`, which hides
whether the client holds an id or the sealed session. Then what only
*server-side* stores do (by id, attribute by attribute): concurrent saves of
different attributes both survive, `count()`, deltas, renewal on read. These run
on the `backend` fixture, which skips client-side stores by their declaration
(`client_side`, on the plug-in).

Each backend is built by one entry of FACTORIES: an async context manager that
yields a StoreUnderTest and cleans up after. Registering a store without adding
a factory here fails the suite, so a new backend cannot go untested.

A backend that can be deployed in more than one way (Redis: one server, or a
Redis Cluster; the cookie store with a deny-list) adds a case per further
deployment to VARIANTS, with its own factory: those cases run the contract too.

Time: a backend with an injectable clock (`local`, `cookie`) advances it; one that
can only expire in real time (Redis) uses a short `ttl_s` and sleeps past it, which
is deterministic there because an expired key is never returned.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lbsession.appserver.app import create_app
from lbsession.appserver.stores import STORES, ClientSideStore, SessionStore, Store, store_class
from lbsession.appserver.stores.cluster import ClusterStore
from lbsession.appserver.stores.cookie import REVOKED_PREFIX, CookieStore
from lbsession.appserver.stores.local import LocalStore
from lbsession.appserver.stores.redis import RedisStore
from lbsession.config import BACKEND_NAMES, AppServerConfig, ClusterConfig, RedisConfig, SessionConfig
from lbsession.errors import StoreUnavailable
from lbsession.lab.process import free_port

COOKIE_KEY = "contract-test-key-of-at-least-32-characters"


@dataclass
class StoreUnderTest:
    """A started store, the TTL the tests use with it, how to make time pass, and how to see it fail."""

    store: Store
    ttl_s: float
    elapse: Callable[[float], Awaitable[None]]
    # The same kind of store pointed at a backend that does not answer; None: it has nothing to reach.
    unreachable: Callable[[], AbstractAsyncContextManager[Store]] | None = None


class Handle:
    """What a client holds of a session, whichever kind of store: the id, or the sealed session itself."""

    def __init__(self, under_test: StoreUnderTest) -> None:
        self.under_test = under_test

    async def create(self, session_id: str, attributes: Mapping[str, Any]) -> str:
        """Store a new session; the value the client would then hold in its cookie."""
        store, ttl_s = self.under_test.store, self.under_test.ttl_s
        if isinstance(store, ClientSideStore):
            return await store.seal(session_id, attributes, ttl_s)
        assert isinstance(store, SessionStore)
        await store.save(session_id, attributes, set(), ttl_s)
        return session_id

    async def read(self, value: str) -> dict[str, Any] | None:
        """The session's attributes as the next request would see them, or None."""
        store, ttl_s = self.under_test.store, self.under_test.ttl_s
        if isinstance(store, ClientSideStore):
            opened = await store.open(value, ttl_s)
            return None if opened is None else opened.attributes
        assert isinstance(store, SessionStore)
        return await store.load(value)

    async def session_id(self, value: str) -> str | None:
        """The session id behind a cookie value (for a client-side store, sealed inside it)."""
        store = self.under_test.store
        if isinstance(store, ClientSideStore):
            opened = await store.open(value, self.under_test.ttl_s)
            return None if opened is None else opened.session_id
        return value


class FakeClock:
    """A clock that moves only when told (wall-clock-like, so a cookie's issued-at reads sanely)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def clocked_store(make: Callable[[FakeClock], Store]) -> AsyncIterator[StoreUnderTest]:
    """A store on a clock of the test's: started, and closed after."""
    clock = FakeClock()
    store = make(clock)
    await store.start()
    try:
        yield StoreUnderTest(store=store, ttl_s=60.0, elapse=clock.advance)
    finally:
        await store.close()


def local_store(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[StoreUnderTest]:
    return clocked_store(lambda clock: LocalStore(clock=clock))


@asynccontextmanager
async def redis_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreUnderTest]:
    # A real server (tests/conftest.py); a key prefix of its own isolates each test.
    async with started_redis_store(RedisConfig(url=request.getfixturevalue("redis_server").url)) as under_test:
        yield under_test


@asynccontextmanager
async def redis_cluster_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreUnderTest]:
    # A real three-primary Redis Cluster (tests/conftest.py), reached through one node as a user
    # gives it; each session id hashes to its own slot, so a test's sessions spread over the nodes.
    url = request.getfixturevalue("redis_cluster").url
    async with started_redis_store(RedisConfig(url=url, cluster=True)) as under_test:
        yield under_test


@asynccontextmanager
async def unreachable_redis_store() -> AsyncIterator[Store]:
    """A RedisStore pointed at a port where nothing listens, retrying briefly."""
    store = RedisStore(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", retry_s=0.2, timeout_s=0.2))
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def started_redis_store(config: RedisConfig) -> AsyncIterator[StoreUnderTest]:
    config = replace(config, key_prefix=f"test:{uuid.uuid4().hex}:", retry_s=1.0)
    store = RedisStore(config)
    await store.start()
    try:
        # Redis expires keys with millisecond precision and never returns an expired key,
        # so sleeping past a short TTL is deterministic there.
        yield StoreUnderTest(store=store, ttl_s=0.3, elapse=asyncio.sleep, unreachable=unreachable_redis_store)
    finally:
        await store.close()


def cluster_store(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[StoreUnderTest]:
    # A single node: the contract is about the store, replication has its own tests.
    config = ClusterConfig(secret="contract-test-secret", port=0)
    return clocked_store(lambda clock: ClusterStore("node-1", config, clock=clock))


def cookie_store(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[StoreUnderTest]:
    # Nothing to start and nothing to reach: the session is in the value the client holds.
    return clocked_store(lambda clock: CookieStore((COOKIE_KEY,), clock=clock))


@asynccontextmanager
async def cookie_deny_list_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreUnderTest]:
    # The deny-list lives in a real Redis, whose TTLs run in real time: a short TTL and real sleeps.
    redis = RedisConfig(
        url=request.getfixturevalue("redis_server").url, key_prefix=f"{REVOKED_PREFIX}{uuid.uuid4().hex}:"
    )
    deny_list = RedisStore(replace(redis, retry_s=1.0))
    store = CookieStore((COOKIE_KEY,), deny_list=deny_list)

    @asynccontextmanager
    async def unreachable() -> AsyncIterator[Store]:
        async with unreachable_redis_store() as dead:
            assert isinstance(dead, RedisStore)
            yield CookieStore((COOKIE_KEY,), deny_list=dead)

    await store.start()
    try:
        yield StoreUnderTest(store=store, ttl_s=0.3, elapse=asyncio.sleep, unreachable=unreachable)
    finally:
        await store.close()


# One entry per registered backend, and one per variant. A factory asks `request` for the servers it needs.
FACTORIES: dict[str, Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[StoreUnderTest]]] = {
    "local": local_store,
    "redis": redis_store,
    "redis-cluster": redis_cluster_store,
    "cluster": cluster_store,
    "cookie": cookie_store,
    "cookie-deny-list": cookie_deny_list_store,
}
# Further deployments of a registered backend: case -> the registered name whose class it builds.
VARIANTS: dict[str, str] = {"redis-cluster": "redis", "cookie-deny-list": "cookie"}
EVERY_CASE = [*sorted(STORES), *sorted(VARIANTS)]


@pytest.fixture(params=EVERY_CASE)
async def any_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreUnderTest]:
    """Every registered store and every variant: the contract of every store."""
    name = request.param
    factory = FACTORIES.get(name)
    if factory is None:
        pytest.fail(f"store {name!r} is registered in STORES but has no factory in {__name__}.FACTORIES; add one")
    async with factory(request) as under_test:
        assert isinstance(under_test.store, store_class(VARIANTS.get(name, name)))
        yield under_test


@pytest.fixture(params=[c for c in EVERY_CASE if not store_class(VARIANTS.get(c, c)).client_side])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[StoreUnderTest]:
    """The server-side stores only (by id, attribute by attribute), as each declares itself."""
    async with FACTORIES[request.param](request) as under_test:
        yield under_test


@pytest.fixture
def store(backend: StoreUnderTest) -> SessionStore:
    assert isinstance(backend.store, SessionStore)
    return backend.store


def new_id(label: str) -> str:
    return f"contract-{label}-0123456789abcdef0123456789"


# --------------------------------------------------------------------------- the registry


def test_registry_names_match_the_config_literal() -> None:
    assert sorted(STORES) == sorted(BACKEND_NAMES)


@pytest.mark.parametrize("name", sorted(STORES))
def test_every_registered_store_has_a_factory(name: str) -> None:
    assert name in FACTORIES, f"store {name!r} is registered in STORES but has no factory in FACTORIES; add one"


@pytest.mark.parametrize("name", sorted(STORES))
def test_every_store_declares_its_kind_by_its_class(name: str) -> None:
    cls = store_class(name)
    assert cls.client_side == issubclass(cls, ClientSideStore) != issubclass(cls, SessionStore)


@pytest.mark.parametrize("case", sorted(VARIANTS))
def test_every_variant_deploys_a_registered_store_and_has_a_factory(case: str) -> None:
    assert VARIANTS[case] in STORES, f"variant {case!r} deploys {VARIANTS[case]!r}, which is not in STORES"
    assert case in FACTORIES, f"variant {case!r} has no factory in FACTORIES; add one"


@pytest.mark.parametrize("name", sorted(STORES))
def test_registered_class_carries_its_name(name: str) -> None:
    assert store_class(name).name == name


# --------------------------------------------------------------------------- what every store must do


async def test_every_store_reads_back_what_it_was_given(any_store: StoreUnderTest) -> None:
    handle = Handle(any_store)
    value = await handle.create(new_id("every-rt"), {"user": "alice", "cart": ["apple"], "n": 1})
    assert await handle.read(value) == {"user": "alice", "cart": ["apple"], "n": 1}


async def test_every_store_says_none_for_an_unknown_session(any_store: StoreUnderTest) -> None:
    handle = Handle(any_store)
    unknown = "x" * 64 if isinstance(any_store.store, ClientSideStore) else new_id("every-unknown")
    assert await handle.read(unknown) is None


async def test_every_store_that_cannot_reach_its_backend_raises_never_says_none(any_store: StoreUnderTest) -> None:
    if any_store.unreachable is None:
        pytest.skip(f"{any_store.store.name}: nothing to reach, so nothing can be out")
    value = await Handle(any_store).create(new_id("every-outage"), {"user": "alice"})
    async with any_store.unreachable() as dead:
        with pytest.raises(StoreUnavailable):
            await Handle(StoreUnderTest(dead, any_store.ttl_s, any_store.elapse)).read(value)


async def test_every_store_expires_a_session_after_its_ttl(any_store: StoreUnderTest) -> None:
    handle = Handle(any_store)
    value = await handle.create(new_id("every-ttl"), {"user": "alice"})
    await any_store.elapse(any_store.ttl_s * 0.5)
    assert await handle.read(value) == {"user": "alice"}
    await any_store.elapse(any_store.ttl_s * 0.7)
    assert await handle.read(value) is None


@pytest.mark.parametrize("bad", [object(), {1, 2}, b"bytes", float("nan")], ids=["object", "set", "bytes", "nan"])
async def test_every_store_refuses_a_value_that_is_not_json(any_store: StoreUnderTest, bad: Any) -> None:
    with pytest.raises(TypeError, match="'bad' is not JSON-serialisable"):
        await Handle(any_store).create(new_id("every-bad"), {"ok": 1, "bad": bad})


async def test_every_store_round_trips_nested_json(any_store: StoreUnderTest) -> None:
    values: dict[str, Any] = {
        "list": [1, "two", [3.5, None]],
        "dict": {"nested": {"deep": [True, False]}, "empty": {}},
        "int": -42,
        "big": 2**53 + 1,
        "float": 0.1,
        "bool": True,
        "none": None,
        "unicode": "세션 ✓ café 🍪",
        "empty-string": "",
    }
    handle = Handle(any_store)
    loaded = await handle.read(await handle.create(new_id("json"), values))
    assert loaded == values
    assert loaded is not None and loaded["bool"] is True and loaded["none"] is None


async def test_every_store_gives_a_fresh_session_id_at_login(any_store: StoreUnderTest) -> None:
    """Through the session middleware of a real app server: a login rotates the id (against fixation)."""
    config = AppServerConfig(id="was-1", port=0, session=SessionConfig(ttl_s=any_store.ttl_s))
    handle = Handle(any_store)
    runner = web.AppRunner(create_app(config, any_store.store))  # the fixture owns the store's start and close
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        values: list[str] = []
        ids: list[str | None] = []
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            for _ in range(2):
                async with http.post(url + "/login", json={"username": "alice"}) as response:
                    assert response.status == 200
                values.append(next(m.value for m in http.cookie_jar if m.key == "SESSION"))
                ids.append(await handle.session_id(values[-1]))  # now: the next login may revoke it
            async with http.get(url + "/me") as response:
                assert (response.status, (await response.json())["user"]) == (200, "alice")
    finally:
        await runner.cleanup()
    first, second = ids
    assert first is not None and second is not None and first != second
    if isinstance(any_store.store, SessionStore) or "deny_list" in any_store.store.describe():
        assert await handle.read(values[0]) is None  # the id given up is dead (client-side: on the deny-list)


# --------------------------------------------------------------------------- what only server-side stores do


async def test_delete_and_delete_again(backend: StoreUnderTest, store: SessionStore) -> None:
    await store.save(new_id("del"), {"user": "alice"}, set(), backend.ttl_s)
    await store.delete(new_id("del"))
    assert await store.load(new_id("del")) is None
    await store.delete(new_id("del"))  # idempotent
    await store.delete(new_id("never-existed"))


async def test_session_expires_after_ttl(backend: StoreUnderTest, store: SessionStore) -> None:
    await store.save(new_id("ttl"), {"user": "alice"}, set(), backend.ttl_s)
    await backend.elapse(backend.ttl_s * 0.5)
    assert await store.load(new_id("ttl")) == {"user": "alice"}
    await backend.elapse(backend.ttl_s * 0.7)
    assert await store.load(new_id("ttl")) is None
    assert await store.count() == 0


async def test_load_without_ttl_does_not_renew(backend: StoreUnderTest, store: SessionStore) -> None:
    await store.save(new_id("plain"), {"user": "alice"}, set(), backend.ttl_s)
    await backend.elapse(backend.ttl_s * 0.6)
    assert await store.load(new_id("plain")) is not None
    await backend.elapse(backend.ttl_s * 0.6)
    assert await store.load(new_id("plain")) is None


async def test_load_with_ttl_renews(backend: StoreUnderTest, store: SessionStore) -> None:
    await store.save(new_id("slide"), {"user": "alice"}, set(), backend.ttl_s)
    await backend.elapse(backend.ttl_s * 0.6)
    assert await store.load(new_id("slide"), backend.ttl_s) == {"user": "alice"}
    await backend.elapse(backend.ttl_s * 0.6)  # 1.2 ttl after the save, 0.6 after the renewal
    assert await store.load(new_id("slide")) == {"user": "alice"}


async def test_save_renews(backend: StoreUnderTest, store: SessionStore) -> None:
    await store.save(new_id("save-renews"), {"a": 1}, set(), backend.ttl_s)
    await backend.elapse(backend.ttl_s * 0.6)
    await store.save(new_id("save-renews"), {"b": 2}, set(), backend.ttl_s)
    await backend.elapse(backend.ttl_s * 0.6)
    assert await store.load(new_id("save-renews")) == {"a": 1, "b": 2}


async def test_attribute_deltas(backend: StoreUnderTest, store: SessionStore) -> None:
    sid = new_id("delta")
    await store.save(sid, {"user": "alice", "cart": ["apple"], "theme": "dark"}, set(), backend.ttl_s)
    await store.save(sid, {"cart": ["apple", "pear"]}, set(), backend.ttl_s)
    assert await store.load(sid) == {"user": "alice", "cart": ["apple", "pear"], "theme": "dark"}
    await store.save(sid, {}, {"theme"}, backend.ttl_s)
    assert await store.load(sid) == {"user": "alice", "cart": ["apple", "pear"]}
    await store.save(sid, {"lang": "ko"}, {"cart", "not-there"}, backend.ttl_s)
    assert await store.load(sid) == {"user": "alice", "lang": "ko"}


async def test_concurrent_saves_of_different_attributes_both_survive(
    backend: StoreUnderTest, store: SessionStore
) -> None:
    sid = new_id("race")
    await store.save(sid, {"user": "alice"}, set(), backend.ttl_s)
    await asyncio.gather(
        store.save(sid, {"cart": ["apple"]}, set(), backend.ttl_s),
        store.save(sid, {"theme": "dark"}, set(), backend.ttl_s),
    )
    assert await store.load(sid) == {"user": "alice", "cart": ["apple"], "theme": "dark"}


async def test_concurrent_creates_of_one_session_both_survive(backend: StoreUnderTest, store: SessionStore) -> None:
    sid = new_id("race-create")
    await asyncio.gather(
        store.save(sid, {"a": 1}, set(), backend.ttl_s),
        store.save(sid, {"b": 2}, set(), backend.ttl_s),
    )
    assert await store.load(sid) == {"a": 1, "b": 2}


async def test_count_is_live_sessions(backend: StoreUnderTest, store: SessionStore) -> None:
    assert await store.count() == 0
    await store.save(new_id("c1"), {"u": 1}, set(), backend.ttl_s)
    await store.save(new_id("c2"), {"u": 2}, set(), backend.ttl_s)
    assert await store.count() == 2
    await store.delete(new_id("c1"))
    assert await store.count() == 1
    await backend.elapse(backend.ttl_s * 1.2)
    assert await store.count() == 0


async def test_removing_every_attribute_removes_the_session(backend: StoreUnderTest, store: SessionStore) -> None:
    # As a Redis hash whose last field is deleted: a session that holds nothing does not exist.
    await store.save(new_id("empty"), {"user": "alice"}, set(), backend.ttl_s)
    await store.save(new_id("empty"), {}, {"user"}, backend.ttl_s)
    assert await store.load(new_id("empty")) is None
    await store.save(new_id("nothing"), {}, set(), backend.ttl_s)
    assert await store.load(new_id("nothing")) is None
    assert await store.count() == 0


async def test_loaded_dict_is_a_copy(backend: StoreUnderTest, store: SessionStore) -> None:
    await store.save(new_id("copy"), {"cart": ["apple"], "prefs": {"theme": "dark"}}, set(), backend.ttl_s)
    loaded = await store.load(new_id("copy"))
    assert loaded is not None
    loaded["cart"].append("pear")
    loaded["prefs"]["theme"] = "light"
    loaded["user"] = "mallory"
    assert await store.load(new_id("copy")) == {"cart": ["apple"], "prefs": {"theme": "dark"}}


async def test_saved_values_are_copied(backend: StoreUnderTest, store: SessionStore) -> None:
    cart = ["apple"]
    await store.save(new_id("copy-in"), {"cart": cart}, set(), backend.ttl_s)
    cart.append("pear")
    assert await store.load(new_id("copy-in")) == {"cart": ["apple"]}


@pytest.mark.parametrize("bad", [object(), {1, 2}, b"bytes", float("nan")], ids=["object", "set", "bytes", "nan"])
async def test_non_json_value_is_a_type_error_and_changes_nothing(
    backend: StoreUnderTest, store: SessionStore, bad: Any
) -> None:
    await store.save(new_id("bad"), {"user": "alice"}, set(), backend.ttl_s)
    with pytest.raises(TypeError):
        await store.save(new_id("bad"), {"ok": 1, "bad": bad}, {"user"}, backend.ttl_s)
    assert await store.load(new_id("bad")) == {"user": "alice"}


# --------------------------------------------------------------------------- local only: the sweep


class WatchedLocalStore(LocalStore):
    """LocalStore telling the test when a purge found something."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock, sweep_interval_s=0.001)
        self.purged: list[int] = []
        self.swept = asyncio.Event()

    def purge_expired(self) -> int:
        purged = super().purge_expired()
        if purged:
            self.purged.append(purged)
            self.swept.set()
        return purged


def sweep_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "lbsession-local-store-sweep"]


async def test_local_sweep_reclaims_expired_sessions() -> None:
    clock = FakeClock()
    store = WatchedLocalStore(clock)
    await store.start()
    try:
        await store.save(new_id("sweep"), {"user": "alice"}, set(), 10.0)
        await store.save(new_id("keep"), {"user": "bob"}, set(), 100.0)
        await clock.advance(20.0)
        async with asyncio.timeout(5):
            await store.swept.wait()  # the background sweep, not a load, found the expired session
        assert store.purged == [1]
        assert await store.load(new_id("keep")) == {"user": "bob"}
        assert len(sweep_tasks()) == 1
    finally:
        await store.close()
    assert sweep_tasks() == []


async def test_local_close_is_safe_without_start_and_twice() -> None:
    store = LocalStore()
    await store.close()
    await store.start()
    await store.close()
    await store.close()
    assert sweep_tasks() == []


def test_local_rejects_a_non_positive_sweep_interval() -> None:
    with pytest.raises(ValueError, match="sweep_interval_s"):
        LocalStore(sweep_interval_s=0)
