"""`cookie`: no server state at all; the whole session travels in the client's cookie, sealed.

As Rails' cookie store, Django's `signed_cookies` backend, aiohttp-session's
EncryptedCookieStorage and Flask's default session do. The value is a Fernet
token (AES-128-CBC + HMAC-SHA256, from the `cryptography` package: never
hand-rolled crypto) of `{"sid", "iat", "max_age", "data"}`: authenticated, so a
client cannot change it, and encrypted, so it cannot read it. Each configured
key is stretched by HKDF into a Fernet key; new values are sealed under the
first key and every key still opens them (rotation: put the new key first,
drop the old one a max age later).

The token changes with every seal (Fernet draws a fresh IV and stamps the time),
so the cookie leads with the session's handle, `<handle>.<token>`: a one-way hash
of the session id, the same in every cookie of one session, which opens nothing
and tells nothing of the session. Whatever groups requests by session without the
keys (the balancer's event stream, the dashboard) reads that part alone. A handle
that does not match the id sealed behind it is a forgery like any other.

It cures the re-login under any strategy and survives every app-server death
with nothing to configure. Its drawbacks are the lab's to measure: logout is not
revocation (a copy of the cookie stays valid until its max age), a session must
fit in a cookie (about 4 KB in browsers: past it, a 413 rather than a truncated
session), and every response rewrites the whole session, so two concurrent
requests that change different attributes lose one of the changes.

With `deny_list` (`--cookie-deny-list`), the usual mitigation of the first drawback:
the ids of sessions given up at logout (and at login's rotation) are kept in Redis
until their cookies' max age has passed, and a cookie naming one is refused. The
store is then no longer stateless: every request carrying a session asks Redis,
and a Redis that cannot be reached is a 503, as for the `redis` store.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lbsession.appserver.config import AppServerConfig, CookieStoreConfig
from lbsession.appserver.stores.base import ClientSideStore, Opened, SessionStore, StoreStat
from lbsession.appserver.stores.codec import encode_attributes
from lbsession.errors import ConfigError, SessionTooLarge

_HKDF_INFO = b"lbsession cookie store v1"
REVOKED_PREFIX = "lbsession:revoked:"  # the deny-list's keys in Redis, apart from the redis store's sessions


def session_handle(session_id: str) -> str:
    """The public name of a session in its cookie: stable, one-way, 12 characters of base64url."""
    digest = hashlib.blake2b(session_id.encode(), digest_size=9, person=b"lbs-handle").digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")


def fernet_key(secret: str) -> bytes:
    """A Fernet key (32 bytes, base64url) derived from a configured secret of any length."""
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret.encode())
    return base64.urlsafe_b64encode(derived)


class CookieStore(ClientSideStore):
    """Sessions sealed into their cookie, under a list of keys (the first seals, all open)."""

    name = "cookie"
    settings = "cookie"

    def __init__(
        self,
        keys: tuple[str, ...],
        *,
        cookie_name: str = "SESSION",
        attributes: str = "; Path=/; HttpOnly; SameSite=Lax",
        max_bytes: int = 4096,
        clock: Callable[[], float] = time.time,
        deny_list: SessionStore | None = None,
    ) -> None:
        if not keys:
            raise ConfigError(
                "backend cookie needs at least one key of 32 characters or more: set LBSESSION_APP__COOKIE__KEYS "
                "to the same list on every server (the first seals, every one opens)"
            )
        self._fernet = MultiFernet([Fernet(fernet_key(key)) for key in keys])
        # RFC 6265 §6.1 measures a cookie as its name, value and attributes together.
        self._overhead = len(cookie_name) + 1 + len(attributes)
        self._max_bytes = max_bytes
        self._clock = clock
        self._deny_list = deny_list  # revoked session ids, by id, with the time their cookies may still live
        self.counters = {"sealed": 0, "opened": 0, "forged": 0, "expired": 0, "revoked": 0, "too_large": 0}
        self.counters["bytes_sealed"] = 0
        self._largest = 0  # the largest cookie sealed, in bytes

    @classmethod
    def from_config(cls, config: AppServerConfig) -> CookieStore:
        cookie: CookieStoreConfig = config.cookie
        session = config.session
        attributes = f"; Path=/; HttpOnly; SameSite={session.same_site}" + ("; Secure" if session.secure else "")
        deny_list = None
        if cookie.deny_list:
            if config.redis.url is None and not config.redis.sentinels:
                raise ConfigError(
                    "--cookie-deny-list keeps logged-out ids in Redis: give --redis-url redis://host:port/0"
                )
            from lbsession.appserver.stores.redis import RedisStore  # only servers with a deny-list need redis-py

            deny_list = RedisStore(dataclasses.replace(config.redis, key_prefix=REVOKED_PREFIX))
        return cls(
            cookie.keys,
            cookie_name=session.cookie_name,
            attributes=attributes,
            max_bytes=cookie.max_bytes,
            deny_list=deny_list,
        )

    async def start(self) -> None:
        if self._deny_list is not None:
            await self._deny_list.start()

    async def close(self) -> None:
        if self._deny_list is not None:
            await self._deny_list.close()

    async def open(self, value: str, ttl_s: float) -> Opened | None:
        """The sealed session, or None for a value that is forged, foreign, truncated or past its max age."""
        handle, _, token = value.partition(".")
        try:
            payload = json.loads(self._fernet.decrypt(token.encode("ascii")))
            session_id, issued, max_age, data = payload["sid"], payload["iat"], payload["max_age"], payload["data"]
            if session_handle(session_id) != handle:
                raise ValueError("the handle names another session")
        except (InvalidToken, UnicodeEncodeError, ValueError, KeyError, TypeError, AttributeError):
            # Tampered, truncated, sealed under a key we no longer hold: a fresh anonymous session, counted.
            self.counters["forged"] += 1
            return None
        age_s = self._clock() - float(issued)
        if not (isinstance(session_id, str) and isinstance(data, dict)) or age_s > min(float(max_age), ttl_s):
            self.counters["expired"] += 1
            return None
        # A genuine cookie of a session given up at logout: refused, if the store keeps a deny-list.
        if self._deny_list is not None and await self._deny_list.load(session_id) is not None:
            self.counters["revoked"] += 1
            return None
        self.counters["opened"] += 1
        return Opened(session_id, data, max(age_s, 0.0))

    async def revoke(self, session_id: str, ttl_s: float) -> None:
        """With a deny-list, refuse `session_id`'s cookies until the last of them is past its max age."""
        if self._deny_list is not None:
            await self._deny_list.save(session_id, {"revoked": round(self._clock(), 3)}, set(), ttl_s)

    async def seal(self, session_id: str, attributes: Mapping[str, Any], ttl_s: float) -> str:
        """The sealed value; SessionTooLarge (nothing set, nothing lost) when the cookie would pass max_bytes."""
        encode_attributes(attributes)  # TypeError naming an attribute that is not JSON, as every store does
        payload = {"sid": session_id, "iat": round(self._clock(), 3), "max_age": ttl_s, "data": dict(attributes)}
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        value = f"{session_handle(session_id)}.{self._fernet.encrypt(text.encode()).decode('ascii')}"
        size = self._overhead + len(value)
        if size > self._max_bytes:
            self.counters["too_large"] += 1
            raise SessionTooLarge(f"session too large for the cookie store: {size} bytes > {self._max_bytes}")
        self.counters["sealed"] += 1
        self.counters["bytes_sealed"] += size
        self._largest = max(self._largest, size)
        return value

    def describe(self) -> dict[str, Any]:
        """Where the sessions are (in the clients), the largest cookie it may set, the cookies it refused."""
        facts: dict[str, Any] = {"sessions_in": "clients", "max_cookie_bytes": self._max_bytes}
        facts.update({key: self.counters[key] for key in ("forged", "revoked", "too_large")})
        if self.counters["sealed"]:  # what each response uploads to the client, and each request brings back
            facts["cookie_bytes_mean"] = round(self.counters["bytes_sealed"] / self.counters["sealed"])
            facts["cookie_bytes_max"] = self._largest
        if self._deny_list is not None:
            facts["deny_list"] = self._deny_list.describe().get("redis")
        return facts

    def stats(self) -> list[StoreStat]:
        """Seals and openings, forged and expired values, sessions refused as too large, bytes sealed."""
        helps = {
            "sealed": "Sessions sealed into a cookie",
            "opened": "Cookies opened into a session",
            "forged": "Cookies that failed authentication (tampered, truncated, foreign key)",
            "expired": "Genuine cookies past their max age",
            "revoked": "Genuine cookies refused because their session was logged out (the deny-list)",
            "too_large": "Sessions refused because their cookie would pass the size limit",
            "bytes_sealed": "Bytes of cookies set (name, value and attributes)",
        }
        return [StoreStat(f"lbsession_cookie_{key}", text, self.counters[key]) for key, text in helps.items()]
