"""Session stores, by the name the CLI and the config use (`--backend`).

A name maps to `module:Class`, imported only when chosen, so a backend's client
library is needed only by those who pick it. Everything that lists stores reads
them here, through BACKEND_NAMES: config validation, the CLI's choices, the
matrix and its schema. So a new store is its module plus its line below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lbsession.appserver.stores.base import ClientSideStore, SessionStore, Store
from lbsession.settings import RegistryNames

if TYPE_CHECKING:
    from lbsession.appserver.config import AppServerConfig

STORES: dict[str, str] = {
    "local": "lbsession.appserver.stores.local:LocalStore",
    "redis": "lbsession.appserver.stores.redis:RedisStore",
    "cluster": "lbsession.appserver.stores.cluster:ClusterStore",
    "cookie": "lbsession.appserver.stores.cookie:CookieStore",
}
BACKEND_NAMES = RegistryNames(STORES)  # live: a store registered later is listed too


def store_class(name: str) -> type[Store]:
    """The store class registered under `name` (a SessionStore, or a ClientSideStore)."""
    module, _, cls = STORES[name].partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def create_store(config: AppServerConfig) -> Store:
    """A new store for the configured backend."""
    return store_class(config.backend).from_config(config)


__all__ = ["BACKEND_NAMES", "STORES", "ClientSideStore", "SessionStore", "Store", "create_store", "store_class"]
