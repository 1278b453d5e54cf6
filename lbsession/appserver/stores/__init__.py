"""Session stores, by the name the CLI and the config use (`--backend`).

A name maps to `module:Class`, imported only when chosen, so a backend's client
library is needed only by those who pick it. The names are the `BackendName`
Literal of lbsession.config; a unit test checks the two lists agree.
"""

from __future__ import annotations

import importlib

from lbsession.appserver.stores.base import ClientSideStore, SessionStore, Store
from lbsession.config import AppServerConfig

STORES: dict[str, str] = {
    "local": "lbsession.appserver.stores.local:LocalStore",
    "redis": "lbsession.appserver.stores.redis:RedisStore",
    "cluster": "lbsession.appserver.stores.cluster:ClusterStore",
    "cookie": "lbsession.appserver.stores.cookie:CookieStore",
}


def store_class(name: str) -> type[Store]:
    """The store class registered under `name` (a SessionStore, or a ClientSideStore)."""
    module, _, cls = STORES[name].partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def create_store(config: AppServerConfig) -> Store:
    """A new store for the configured backend."""
    return store_class(config.backend).from_config(config)


__all__ = ["STORES", "ClientSideStore", "SessionStore", "Store", "create_store", "store_class"]
