"""The contract every session store keeps, run against every registered backend.

The `store` fixture is parametrised over `lbsession.appserver.stores.STORES`.
Each backend is built by one entry of FACTORIES: an async context manager that
yields a StoreUnderTest and cleans up after. Registering a store without adding
a factory here fails the suite, so a new backend cannot go untested.

A backend that can be deployed in more than one way (Redis: one server, or a
Redis Cluster) adds a case per further deployment to VARIANTS, with its own
factory: those cases run the whole contract too, on top of the registered names.

Time: a backend with an injectable clock (`local`) advances it; one that can
only expire in real time (Redis) uses a short `ttl_s` and sleeps past it, which
is deterministic there because an expired key is never returned.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest

from lbsession.appserver.stores import STORES, SessionStore, store_class
from lbsession.appserver.stores.cluster import ClusterStore
from lbsession.appserver.stores.local import LocalStore
from lbsession.appserver.stores.redis import RedisStore
from lbsession.config import BACKEND_NAMES, ClusterConfig, RedisConfig


@dataclass
class StoreUnderTest:
    """A started store, the TTL the tests use with it, and how to make time pass for it."""

    store: SessionStore
    ttl_s: float
    elapse: Callable[[float], Awaitable[None]]


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def local_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreUnderTest]:
    clock = FakeClock()
    store = LocalStore(clock=clock)
    await store.start()
    try:
        yield StoreUnderTest(store=store, ttl_s=60.0, elapse=clock.advance)
    finally:
        await store.close()


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
async def started_redis_store(config: RedisConfig) -> AsyncIterator[StoreUnderTest]:
    config = replace(config, key_prefix=f"test:{uuid.uuid4().hex}:", retry_s=1.0)
    store = RedisStore(config)
    await store.start()
    try:
        # Redis expires keys with millisecond precision and never returns an expired key,
        # so sleeping past a short TTL is deterministic there.
        yield StoreUnderTest(store=store, ttl_s=0.3, elapse=asyncio.sleep)
    finally:
        await store.close()


@asynccontextmanager
async def cluster_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreUnderTest]:
    # A single node: the contract is about the store, replication has its own tests.
    clock = FakeClock()
    store = ClusterStore("node-1", ClusterConfig(secret="contract-test-secret", port=0), clock=clock)
    await store.start()
    try:
        yield StoreUnderTest(store=store, ttl_s=60.0, elapse=clock.advance)
    finally:
        await store.close()


# One entry per registered backend, and one per variant. A factory asks `request` for the servers it needs.
FACTORIES: dict[str, Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[StoreUnderTest]]] = {
    "local": local_store,
    "redis": redis_store,
    "redis-cluster": redis_cluster_store,
    "cluster": cluster_store,
}
# Further deployments of a registered backend: case -> the registered name whose class it builds.
VARIANTS: dict[str, str] = {"redis-cluster": "redis"}


# This suite is the server-side stores' contract (by id, attribute by attribute); a client-side store
# (the cookie is the session) keeps its own, through the session middleware: tests/unit/test_cookie_store.py.
SERVER_SIDE = sorted(name for name in STORES if not store_class(name).client_side)


@pytest.fixture(params=[*SERVER_SIDE, *sorted(VARIANTS)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[StoreUnderTest]:
    name = request.param
    factory = FACTORIES.get(name)
    if factory is None:
        pytest.fail(f"store {name!r} is registered in STORES but has no factory in {__name__}.FACTORIES; add one")
    async with factory(request) as under_test:
        assert isinstance(under_test.store, store_class(VARIANTS.get(name, name)))
        yield under_test


@pytest.fixture
def store(backend: StoreUnderTest) -> SessionStore:
    return backend.store


def new_id(label: str) -> str:
    return f"contract-{label}-0123456789abcdef0123456789"


# --------------------------------------------------------------------------- the registry


def test_registry_names_match_the_config_literal() -> None:
    assert sorted(STORES) == sorted(BACKEND_NAMES)


@pytest.mark.parametrize("name", SERVER_SIDE)
def test_every_registered_store_has_a_factory(name: str) -> None:
    assert name in FACTORIES, f"store {name!r} is registered in STORES but has no factory in FACTORIES; add one"


@pytest.mark.parametrize("case", sorted(VARIANTS))
def test_every_variant_deploys_a_registered_store_and_has_a_factory(case: str) -> None:
    assert VARIANTS[case] in STORES, f"variant {case!r} deploys {VARIANTS[case]!r}, which is not in STORES"
    assert case in FACTORIES, f"variant {case!r} has no factory in FACTORIES; add one"


@pytest.mark.parametrize("name", sorted(STORES))
def test_registered_class_carries_its_name(name: str) -> None:
    assert store_class(name).name == name


# --------------------------------------------------------------------------- the contract


async def test_round_trip(backend: StoreUnderTest, store: SessionStore) -> None:
    await store.save(new_id("rt"), {"user": "alice", "n": 1}, set(), backend.ttl_s)
    assert await store.load(new_id("rt")) == {"user": "alice", "n": 1}


async def test_missing_session_is_none(store: SessionStore) -> None:
    assert await store.load(new_id("missing")) is None
    assert await store.load(new_id("missing"), 30.0) is None


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


async def test_json_round_trip_of_nested_values(backend: StoreUnderTest, store: SessionStore) -> None:
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
    await store.save(new_id("json"), values, set(), backend.ttl_s)
    loaded = await store.load(new_id("json"))
    assert loaded == values
    assert loaded is not None and loaded["bool"] is True and loaded["none"] is None


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
