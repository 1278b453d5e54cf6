"""The lab's fault-injection route on an app server, locked by the lab's token.

The Topology that starts app servers gives each one a random token in the
environment variable LBSESSION_LAB_TOKEN. With one set, the server adds

    POST /_lab/replication   {"peer": "host:port" or null, "cut": true|false}

which stops (or resumes) replication from this node to one peer, or to all of
them: the lab's "cut a cluster peer" fault. A request without the right
`X-Lab-Token` header gets the same 404 as any unknown path, so a client going
through the balancer can neither use the route nor tell that it exists; a
server started without the variable has no such route at all.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from aiohttp import web

from lbsession.appserver.stores.base import Store

LAB_TOKEN_ENV = "LBSESSION_LAB_TOKEN"
LAB_TOKEN_HEADER = "X-Lab-Token"
REPLICATION_PATH = "/_lab/replication"


def add_lab_routes(app: web.Application, store: Store, token: str | None = None) -> None:
    """Add the token-locked lab routes when this server was given a lab token (by argument or environment)."""
    token = token if token is not None else os.environ.get(LAB_TOKEN_ENV)
    if not token:
        return

    async def replication(request: web.Request) -> web.Response:
        offered = request.headers.get(LAB_TOKEN_HEADER, "")
        # compare_digest: the time taken must not reveal how much of a guessed token was right.
        if not hmac.compare_digest(offered.encode(), token.encode()):
            raise web.HTTPNotFound()
        return await _cut_or_heal(request, store)

    app.router.add_post(REPLICATION_PATH, replication)


async def _cut_or_heal(request: web.Request, store: Store) -> web.Response:
    # Imported here: the cluster store's modules are loaded only by servers that chose it.
    from lbsession.appserver.stores.cluster import ClusterStore

    if not isinstance(store, ClusterStore):
        return _error(409, f"this server's session store is {store.name!r}, not 'cluster': nothing replicates")
    try:
        body: Any = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("cut"), bool):
        return _error(400, 'send {"peer": "127.0.0.1:7001" or null for every peer, "cut": true or false}')
    peer = body.get("peer")
    if peer is not None and not isinstance(peer, str):
        return _error(400, '"peer" must be a host:port string, or null for every peer')
    node = store.node
    try:
        peers = node.cut(peer) if body["cut"] else node.heal(peer)
    except ValueError as exc:
        return _error(404, str(exc))
    return web.json_response({"address": node.address, "peers": peers})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
