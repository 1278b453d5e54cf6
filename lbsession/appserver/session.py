"""The session layer: a cookie names a session id, a store holds the attributes.

Modelled on aiohttp-session, cut to what the lab needs:

- `session_middleware(store, config, server_id=...)` gives each request a lazy
  session; a handler calls `await get_session(request)`. A request that never
  asks for its session costs no store round trip and can never be turned into
  a 503 by a dead store (a 404 or a health check stays what it is).
- After the handler, only what changed is written (`store.save(id, changed,
  removed, ttl_s)`), so two servers updating different attributes of one
  session at once both keep their change. A session that holds nothing is
  never created: no store write, no cookie.
- Reading a session renews its lifetime (`store.load(id, ttl_s)`, sliding
  expiry). The cookie carries no Max-Age: the store's TTL is the one clock. A
  cookie with Max-Age set at login would expire `ttl_s` after login even for a
  user active all along, unless it were re-sent on every response, and that
  forced re-login is exactly the symptom this lab must not fake.
- An unknown, expired or malformed cookie is simply "no session". A store that
  cannot answer is a 503 naming the reason, never a silent logout.

A client-side store (lbsession.appserver.stores.base.ClientSideStore) keeps no
state: the cookie's value is the sealed session itself. Its slot opens the value
instead of loading an id, and seals the whole session into a new value on every
response that changed it (and once past half its lifetime, so an active user's
session slides). A session too large for a cookie is a 413 that says so, and the
client keeps the cookie it had: nothing is truncated.
"""

from __future__ import annotations

import copy
import re
import secrets
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, TypedDict

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from lbsession.appserver.config import SessionConfig
from lbsession.appserver.stores.base import ClientSideStore, SessionStore, Store
from lbsession.errors import SessionTooLarge, StoreUnavailable

# token_urlsafe(32): 256 random bits in 43 characters; OWASP asks for at least 64, this project for 128 (SECURITY.md).
_ID_BYTES = 32
# Any id we could have issued: the base64url alphabet, 128 bits (22 chars) or more, and a sane bound,
# so junk never reaches the store (nor a log line, nor a Redis key).
_VALID_ID = re.compile(r"[A-Za-z0-9_-]{22,128}")
# A sealed value (a handle, a dot, a Fernet token: base64url with padding) of at most the browsers' 4 KB
# per cookie, and a bit.
_VALID_SEALED = re.compile(r"[A-Za-z0-9_=.-]{32,8192}")
_MISSING = object()


def new_session_id() -> str:
    """A fresh, unguessable session id."""
    return secrets.token_urlsafe(_ID_BYTES)


class Session(MutableMapping[str, Any]):
    """One client's session during one request: a dict that knows what it must write back."""

    def __init__(self, session_id: str | None, data: Mapping[str, Any] | None = None) -> None:
        self._id = session_id
        self._data: dict[str, Any] = dict(data or {})
        # A deep copy, so an in-place change (`session["cart"].append(x)`) is noticed too.
        self._stored: dict[str, Any] = copy.deepcopy(self._data)
        self._assigned: set[str] = set()
        self._dead_ids: list[str] = []

    @property
    def id(self) -> str | None:
        """The id the store knows this session by; None until a new session is first saved."""
        return self._id

    @property
    def new(self) -> bool:
        """True when the session has no id yet, so saving it issues one and sets the cookie."""
        return self._id is None

    @property
    def dead_ids(self) -> tuple[str, ...]:
        """Ids given up by `rotate` or `invalidate`, to delete from the store."""
        return tuple(self._dead_ids)

    def rotate(self) -> None:
        """Move the attributes to a fresh id and kill the old one (at login, against session fixation)."""
        if self._id is not None:
            self._dead_ids.append(self._id)
        self._id = None
        self._stored = {}  # nothing is stored under the coming id, so every attribute is written

    def invalidate(self) -> None:
        """Destroy the session (at logout): deleted from the store, cookie expired."""
        self.rotate()
        self._data.clear()
        self._assigned.clear()

    def issue_id(self) -> str:
        """Give a new session its id; called once, when it is first saved."""
        if self._id is not None:
            raise RuntimeError(f"session {self._id!r} already has an id")
        self._id = new_session_id()
        return self._id

    def changes(self) -> tuple[dict[str, Any], set[str]]:
        """(attributes to write, attribute names to remove) since the session was loaded."""
        changed = {
            key: value
            for key, value in self._data.items()
            if key in self._assigned or self._stored.get(key, _MISSING) != value
        }
        return changed, set(self._stored) - set(self._data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value
        self._assigned.add(key)

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self._assigned.discard(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<Session id={self._id!r} new={self.new} keys={sorted(self._data)}>"


class _CookieAttributes(TypedDict):
    """What set_cookie and del_cookie share, so the deleting cookie matches the one it deletes."""

    path: str
    secure: bool | None
    httponly: bool
    samesite: str


class _SessionSlot:
    """The session of one request, whichever kind of store holds it."""

    async def get(self) -> Session:
        """The session, loaded on first use."""
        raise NotImplementedError

    async def commit(self, response: web.StreamResponse) -> None:
        """Write back what the handler changed, before `response` is sent."""
        raise NotImplementedError


class _Slot(_SessionSlot):
    """The session of one request in a server-side store: loaded on first use, committed after the handler."""

    def __init__(self, store: SessionStore, config: SessionConfig, cookie: str | None) -> None:
        self._store = store
        self._config = config
        self._cookie = cookie if cookie is not None and _VALID_ID.fullmatch(cookie) else None
        self._session: Session | None = None

    async def get(self) -> Session:
        if self._session is None:
            data = None if self._cookie is None else await self._store.load(self._cookie, self._config.ttl_s)
            self._session = Session(None) if data is None else Session(self._cookie, data)
        return self._session

    async def commit(self, response: web.StreamResponse) -> None:
        session = self._session
        if session is None:
            return  # never asked for: nothing to write, nothing to renew
        changed, removed = session.changes()
        if not (changed or removed or session.dead_ids):
            return
        _check_not_sent(response)
        cookie = _cookie_attributes(self._config)
        if session.id is None and changed:
            session_id = session.issue_id()
            await self._store.save(session_id, changed, set(), self._config.ttl_s)
            response.set_cookie(self._config.cookie_name, session_id, **cookie)
        elif session.id is not None:
            await self._store.save(session.id, changed, removed, self._config.ttl_s)
        # Delete given-up ids only once their successor is saved: if the store fails in between,
        # the client gets a 503 and keeps a working session rather than none.
        for dead in session.dead_ids:
            await self._store.delete(dead)
        if session.id is None and session.dead_ids:
            response.del_cookie(self._config.cookie_name, **cookie)


def _check_not_sent(response: web.StreamResponse) -> None:
    if response.prepared:
        raise RuntimeError("the session changed after the response was sent; it cannot be saved")


def _cookie_attributes(config: SessionConfig) -> _CookieAttributes:
    return _CookieAttributes(path="/", secure=config.secure or None, httponly=True, samesite=config.same_site)


class _SealedSlot(_SessionSlot):
    """The session of one request in a client-side store: opened from the cookie, sealed back into it."""

    def __init__(self, store: ClientSideStore, config: SessionConfig, cookie: str | None) -> None:
        self._store = store
        self._config = config
        self._presented = cookie is not None
        self._cookie = cookie if cookie is not None and _VALID_SEALED.fullmatch(cookie) else None
        self._session: Session | None = None
        self._renew = False
        self._clear = False  # the cookie presented opened to nothing: expire it in the answer

    async def get(self) -> Session:
        if self._session is None:
            opened = None if self._cookie is None else await self._store.open(self._cookie, self._config.ttl_s)
            if opened is None:
                self._session = Session(None)
                # Damaged, foreign, expired or revoked: cleared at once, so the client stops presenting it
                # (to be decrypted and counted again, by the login that follows the 401, say).
                self._clear = self._presented
            else:
                self._session = Session(opened.session_id, opened.attributes)
                self._renew = opened.age_s > self._config.ttl_s / 2  # slide, as the server stores' reads do
        return self._session

    async def commit(self, response: web.StreamResponse) -> None:
        session = self._session
        if session is None:
            return
        changed, removed = session.changes()
        if not (changed or removed or session.dead_ids or self._renew or self._clear):
            return
        _check_not_sent(response)
        cookie = _cookie_attributes(self._config)
        if session.id is None and not session:  # logged out, a new session that holds nothing, a cookie refused
            for dead in session.dead_ids:
                await self._store.revoke(dead, self._config.ttl_s)
            if self._presented:
                response.del_cookie(self._config.cookie_name, **cookie)
            return
        session_id = session.id if session.id is not None else session.issue_id()
        value = await self._store.seal(session_id, dict(session), self._config.ttl_s)  # may be SessionTooLarge
        for dead in session.dead_ids:
            await self._store.revoke(dead, self._config.ttl_s)
        response.set_cookie(self._config.cookie_name, value, **cookie)


_SLOT = web.RequestKey("lbsession_session", _SessionSlot)


async def get_session(request: web.Request) -> Session:
    """The request's session, loaded from the store on first call (an empty new one if none)."""
    try:
        slot = request[_SLOT]
    except KeyError:
        raise RuntimeError("get_session() needs session_middleware installed on the application") from None
    return await slot.get()


def session_middleware(store: Store, config: SessionConfig, *, server_id: str) -> Middleware:
    """The middleware that loads sessions lazily, saves their changes, and maps StoreUnavailable to 503."""

    def slot_for(cookie: str | None) -> _SessionSlot:
        if isinstance(store, ClientSideStore):
            return _SealedSlot(store, config, cookie)
        assert isinstance(store, SessionStore), f"{store!r} is neither a server-side nor a client-side store"
        return _Slot(store, config, cookie)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        slot = slot_for(request.cookies.get(config.cookie_name))
        request[_SLOT] = slot
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # a redirect or an error still carries the session's cookie
                await slot.commit(exc)
                raise
            await slot.commit(response)
            return response
        except StoreUnavailable as exc:
            return store_unavailable_response(exc, server_id)
        except SessionTooLarge as exc:  # the client keeps the cookie it had: the session stays as it was
            return web.json_response({"error": str(exc), "server": server_id}, status=413)

    return middleware


def store_unavailable_response(exc: StoreUnavailable, server_id: str) -> web.Response:
    """The 503 for an unreachable store: the session may well exist, so this must not read as a logout."""
    return web.json_response(
        {"error": "session store unavailable", "reason": str(exc), "server": server_id},
        status=503,
    )
