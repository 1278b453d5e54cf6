"""HTTP/1.1 framing for the proxy: parse and rewrite heads, find where bodies end.

Only what a reverse proxy needs (RFC 9112), done in one pass per head and kept
to plain bytes operations, because this runs for every request:

- a request head is validated (request line, header syntax, Host, the framing
  headers) and rewritten for the upstream in the same loop; a request to
  upgrade (RFC 9110 §7.8) keeps `Upgrade` and `Connection: Upgrade`, the only
  hop-by-hop headers that go on;
- a response head is parsed for its framing and stripped of hop-by-hop headers;
- ChunkedScanner walks a chunked body to find its end, so bodies stream through
  unchanged, yet the next pipelined message starts at the right byte.

Anything ambiguous is refused rather than guessed: both Content-Length and
Transfer-Encoding, differing Content-Lengths, an unknown transfer coding,
obsolete line folding, whitespace before a colon. A proxy that guesses where a
request ends differently from the server behind it is open to request smuggling
(RFC 9112 §6.3, §11.2).
"""

from __future__ import annotations

import re
from collections.abc import Set
from http import HTTPStatus
from typing import Final

# RFC 9110 §5.6.2 token characters.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])")
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
# The header block of a head at once, each line led by its CRLF: a token, a colon, then visible
# characters, spaces and tabs. So no CR, LF or NUL inside a value, no space before the colon
# (RFC 9112 §5.1) and no obsolete line folding. One pass in C, whatever the number of headers.
_FIELDS: Final = re.compile(rb"(?:\r\n" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*)*")
# A whole request head checked in one call: each call of a pattern costs more than its bytes here.
_REQUEST_HEAD: Final = re.compile(_REQUEST_LINE.pattern + _FIELDS.pattern)
# A chunk-size line without its CRLF (RFC 9112 §7.1.1): hex digits, then extensions, each
# `BWS ; BWS name [BWS = BWS (token / quoted-string)]`. Nothing else: no trailing space, no bare CR.
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_CHUNK_LINE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,15})(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
)
# uri-host [ ":" port ] (RFC 9110 §7.2, RFC 3986 §3.2.2): an IP literal or a reg-name. No userinfo,
# no space, no "/": a Host the upstream would read differently from us is refused, never forwarded.
_SUB_DELIMS = rb"!$&'()*+,;="
_URI_HOST = (
    rb"(?:\[(?:[0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~:" + _SUB_DELIMS + rb"]+)\]"
    rb"|(?:[A-Za-z0-9\-._~" + _SUB_DELIMS + rb"]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)
_HOST: Final = re.compile(_URI_HOST)
# An absolute-form target (RFC 9112 §3.2.2): scheme, authority, then path and query.
_ABSOLUTE_TARGET: Final = re.compile(rb"https?://([^/?#]*)([/?][\x21-\x7e]*)?", re.I)
# An Upgrade field value (RFC 9110 §7.8): a list of protocol-name ["/" protocol-version].
_PROTOCOL = _TOKEN + rb"(?:/" + _TOKEN + rb")?"
_UPGRADE: Final = re.compile(_PROTOCOL + rb"(?:[ \t]*,[ \t]*" + _PROTOCOL + rb")*")

# Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
# de facto Proxy-Connection. Transfer-Encoding is kept: chunked bodies pass through as they are.
# Trailer is not among them: it announces the trailer fields, which are end-to-end (RFC 9110 §6.6.2).
HOP_BY_HOP: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade"})
# Forwarding headers the proxy writes itself; a client's own are dropped unless it is a trusted proxy.
FORWARDED: Final = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})

_HOP = rb"connection|keep-alive|proxy-connection|te|upgrade"
_FWD = rb"x-forwarded-for|x-forwarded-proto|x-forwarded-host|forwarded"
# The request headers the proxy acts on, found in one pass; and the ones it never forwards as they came.
_REQUEST_SPECIAL: Final = re.compile(
    rb"\r\n(content-length|transfer-encoding|host|cookie|" + _HOP + rb"|" + _FWD + rb"):([^\r\n]*)", re.I
)
_REQUEST_DROP: Final = re.compile(rb"\r\n(?:" + _HOP + rb"|" + _FWD + rb"):[^\r\n]*", re.I)
_CONTENT_LENGTH_LINES: Final = re.compile(rb"\r\ncontent-length:[^\r\n]*", re.I)
_COOKIE_LINES: Final = re.compile(rb"\r\ncookie:[^\r\n]*", re.I)
_RESPONSE_SPECIAL: Final = re.compile(rb"\r\n(content-length|transfer-encoding|" + _HOP + rb"):([^\r\n]*)", re.I)
_RESPONSE_DROP: Final = re.compile(rb"\r\n(?:" + _HOP + rb"):[^\r\n]*", re.I)
_HOST_LINES: Final = re.compile(rb"\r\nhost:[^\r\n]*", re.I)
# What an HTTP/1.0 client must not get once the proxy has decoded the chunked body for it.
_CHUNKED_FRAMING: Final = re.compile(rb"\r\n(?:transfer-encoding|trailer):[^\r\n]*", re.I)


class HTTPError(Exception):
    """A message the proxy refuses; `status` is the answer to send before closing."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class RequestHead:
    """A parsed request head: what the proxy acts on, and the head to forward (`out`)."""

    __slots__ = (
        "chunked",
        "content_length",
        "cookie",
        "forwarded",
        "host",
        "http10",
        "keep_alive",
        "method",
        "out",
        "target",
        "upgrade",
    )  # fmt: skip

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.http10 = False
        self.keep_alive = True
        self.content_length = 0
        self.chunked = False
        self.host: bytes | None = None
        self.cookie: bytes | None = None  # every Cookie header joined, or None
        self.forwarded: tuple[tuple[bytes, bytes], ...] = ()  # the client's X-Forwarded-* (name, value)
        self.upgrade: bytes | None = None  # the protocols asked for, when the request asks to upgrade
        # The request line and header block to forward, without the final blank line; the client's
        # hop-by-hop and forwarding headers are already gone. Usually the head exactly as it came.
        self.out = b""

    def get(self, name: str, default: None = None, /) -> str | None:
        """A forwarded header's value by (any-case) name, or None: what hashing strategies read."""
        match = re.search(rb"\r\n" + re.escape(name.encode()) + rb":[ \t]*([^\r\n]*)", self.out, re.I)
        return default if match is None else match.group(1).rstrip(b" \t").decode("latin-1")

    def without_cookie_lines(self) -> bytes:
        """`out` with its Cookie headers removed (the proxy re-adds a filtered one)."""
        return _COOKIE_LINES.sub(b"", self.out)


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a request head (without its final blank line); raise HTTPError if it is refused."""
    match = _REQUEST_HEAD.fullmatch(head)  # the request line and every header line, in one pass
    if match is None:
        raise _request_head_error(head)
    req = RequestHead()
    req.method, req.target, minor = match.groups()
    req.http10 = minor == b"0"
    end = match.end(3)  # the request line's end: the header block follows, each line led by its CRLF
    if end < len(head):
        drop = _read_request_specials(req, head)  # the request line holds no CRLF: only header lines match
    else:
        drop = []
        req.keep_alive = not req.http10  # HTTP/1.0 without a Connection header: close (RFC 9112 §9.3)
    if req.host is None and not req.http10:
        raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host header")
    authority = None if req.target[0] == 47 else _other_target_form(req)  # 47: b"/", the origin-form
    block = head[end:]
    if authority is not None:
        # The target's authority wins over Host; never forward the two disagreeing (RFC 9112 §3.2.2).
        # The upstream is an origin server: it gets the origin-form (RFC 9112 §3.2.1).
        req.host = authority
        block = _HOST_LINES.sub(b"", block) + b"\r\nHost: " + authority
        drop.append(b"host")
    if drop or req.http10:
        block = _REQUEST_DROP.sub(b"", block) if drop else block
        if b"content-length" in drop:  # identical repeats are folded into one (RFC 9110 §8.6)
            block = _CONTENT_LENGTH_LINES.sub(b"", block) + b"\r\nContent-Length: %d" % req.content_length
        extra = {name for name in drop if name not in HOP_BY_HOP and name not in FORWARDED and name not in _REBUILT}
        if extra:  # headers the client named in Connection are hop-by-hop too (RFC 9110 §7.6.1)
            block = _without_fields(block, extra)
        if req.upgrade is not None:  # hop-by-hop, yet the upstream must see the request to switch (RFC 9110 §7.8)
            block += b"\r\nUpgrade: " + req.upgrade + b"\r\nConnection: Upgrade"
        head = b"%s %s HTTP/1.1%s" % (req.method, req.target, block)
    req.out = head
    return req


def _request_head_error(head: bytes) -> HTTPError:
    """Why `head` failed `_REQUEST_HEAD`: its request line, or one of its header lines."""
    end = head.find(b"\r\n")
    if _REQUEST_LINE.fullmatch(head if end < 0 else head[:end]) is None:
        return HTTPError(400, "malformed request line; expected 'METHOD /path HTTP/1.1'")
    return HTTPError(400, "malformed header line (bad name, space before ':', control character or folding)")


def _without_fields(block: bytes, names: Set[bytes]) -> bytes:
    """`block` (header lines, each after a CRLF) without the lines whose lower-case name is in `names`."""
    lines = block.split(b"\r\n")[1:]
    return b"".join(b"\r\n" + line for line in lines if line.partition(b":")[0].lower() not in names)


def _other_target_form(req: RequestHead) -> bytes | None:
    """Check a target that is not origin-form; return the authority of an absolute-form one, else None."""
    target = req.target
    if target == b"*":
        if req.method != b"OPTIONS":  # the asterisk-form is for a server-wide OPTIONS only (RFC 9112 §3.2.4)
            raise HTTPError(400, "the request target '*' is allowed with OPTIONS only")
        return None
    match = _ABSOLUTE_TARGET.fullmatch(target)
    if match is None:  # the authority-form belongs to CONNECT (RFC 9112 §3.2.3), which a gateway does not tunnel
        raise HTTPError(400, "the request target must be a path ('/...') or an absolute http(s) URI")
    authority, path = match.groups()
    if not authority or _HOST.fullmatch(authority) is None:
        raise HTTPError(400, "the request target's authority is not a valid host[:port] (userinfo is refused)")
    req.target = b"/" if path is None else path if path[0] == 47 else b"/" + path  # an empty path is "/"
    return authority


def _valid_host(value: bytes) -> bool:
    """True if `value` is a valid uri-host[:port]; a site sends few distinct ones, so they are remembered."""
    if value in _VALID_HOSTS:
        return True
    if _HOST.fullmatch(value) is None:
        return False
    if len(_VALID_HOSTS) >= 256:  # a bound, so a client inventing names cannot grow it
        _VALID_HOSTS.clear()
    _VALID_HOSTS.add(value)
    return True


_VALID_HOSTS: Final[set[bytes]] = set()
_REBUILT: Final = frozenset({b"content-length", b"host"})  # dropped, then written again by the parser


def _read_request_specials(req: RequestHead, head: bytes) -> list[bytes]:
    """Fill `req` from the headers of `head` the proxy acts on; return the names not to forward as they are."""
    drop: list[bytes] = []
    lengths: list[bytes] = []
    cookies: list[bytes] = []
    connection: list[bytes] = []
    upgrade: list[bytes] = []
    hosts = 0
    for raw_name, raw_value in _REQUEST_SPECIAL.findall(head):
        name, value = raw_name.lower(), raw_value.strip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or len(value) > 15 or (lengths and value != lengths[0]):
                raise HTTPError(400, "invalid or conflicting Content-Length")
            lengths.append(value)
        elif name == b"transfer-encoding":
            if req.chunked or value.lower() != b"chunked" or req.http10:
                raise HTTPError(400, "only a single 'Transfer-Encoding: chunked' is accepted, on HTTP/1.1")
            req.chunked = True
        elif name == b"host":
            hosts += 1
            if not _valid_host(value):  # RFC 9112 §3.2: 400 for an invalid Host field value
                raise HTTPError(400, "the Host header is not a valid host[:port]")
            req.host = value
        elif name == b"cookie":
            cookies.append(value)
        elif name in FORWARDED:
            req.forwarded += ((name, value),)
            drop.append(name)
        else:  # hop-by-hop
            if name == b"connection":
                connection += [t.strip(b" \t").lower() for t in value.split(b",")]
            elif name == b"upgrade":
                upgrade.append(value)
            drop.append(name)
    if hosts > 1:
        raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host header")
    if lengths:
        if req.chunked:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding; refused (request smuggling)")
        req.content_length = int(lengths[0])
        if len(lengths) > 1:
            drop.append(b"content-length")
    if cookies:
        req.cookie = b"; ".join(cookies)
    if b"close" in connection or (req.http10 and b"keep-alive" not in connection):
        req.keep_alive = False
    if connection:
        if not _FRAMING_NAMES.isdisjoint(connection):
            # Dropping these as hop-by-hop would forward a body with no framing: the upstream would read
            # the body as the next request (request smuggling). No honest client asks for it.
            raise HTTPError(400, "the Connection header must not name Content-Length, Transfer-Encoding or Host")
        drop += [t for t in connection if t not in (b"close", b"keep-alive") and t]
    # An Upgrade the Connection header does not name is not a request to upgrade (RFC 9110 §7.8), nor
    # is one on HTTP/1.0, which a server must ignore; both are dropped as hop-by-hop like any other.
    if upgrade and b"upgrade" in connection and not req.http10:
        _read_upgrade(req, b", ".join(upgrade))
    return drop


def _read_upgrade(req: RequestHead, value: bytes) -> None:
    """Accept a request to switch protocols, or refuse one that cannot be tunnelled safely."""
    if _UPGRADE.fullmatch(value) is None:
        raise HTTPError(400, "the Upgrade header must list protocols like 'websocket'")
    if req.chunked or req.content_length:
        # RFC 9110 §7.8 would have the body read first, then the switch; no WebSocket client sends
        # one, and a body ahead of the new protocol is a place for two readings to differ. Refused.
        raise HTTPError(400, "a request to upgrade must not have a body")
    req.upgrade = value


_FRAMING_NAMES: Final = frozenset({b"content-length", b"transfer-encoding", b"host"})


class ResponseHead:
    """A parsed response head: its framing, whether the connection may be reused, the head to forward."""

    __slots__ = ("chunked", "codings", "content_length", "http10", "keep_alive", "out", "status", "upgrade")

    def __init__(self) -> None:
        self.status = 0
        self.http10 = False
        self.keep_alive = True
        self.content_length: int | None = None  # None and not chunked: the body ends at close
        self.chunked = False
        self.codings = False  # a transfer coding other than chunked was applied (gzip, ...)
        self.upgrade: bytes | None = None  # the protocol a 101 switches to
        self.out = b""  # status line (as HTTP/1.1) and headers, hop-by-hop ones gone, no final blank line

    def without_transfer_encoding(self) -> bytes:
        """`out` without Transfer-Encoding (and Trailer), for a body the proxy decodes for an HTTP/1.0 client."""
        return _CHUNKED_FRAMING.sub(b"", self.out)


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse an upstream's response head (without its final blank line); HTTPError(502) if malformed."""
    end = head.find(b"\r\n")
    resp = ResponseHead()
    resp.http10, resp.status = _status_line(head if end < 0 else head[:end])
    block = b"" if end < 0 else head[end:]
    if block and _FIELDS.fullmatch(block) is None:
        raise HTTPError(502, "the upstream sent a malformed header line")
    connection = b""
    codings = b""
    lengths = 0
    drops = 0  # hop-by-hop lines
    hop_line = b""  # the last one, as it came
    for raw_name, raw_value in _RESPONSE_SPECIAL.findall(block):
        name, value = raw_name.lower(), raw_value.strip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or len(value) > 15:
                raise HTTPError(502, "the upstream sent an invalid Content-Length")
            length = int(value)
            if resp.content_length is not None and resp.content_length != length:
                raise HTTPError(502, "the upstream sent an invalid Content-Length")
            resp.content_length = length
            lengths += 1
        elif name == b"transfer-encoding":
            codings += b"," + value.lower()  # repeated lines are one list (RFC 9110 §5.3)
        else:
            drops += 1
            hop_line = b"\r\n" + raw_name + b":" + raw_value
            if name == b"connection":
                connection += b"," + value.lower()
            elif name == b"upgrade":
                resp.upgrade = value
    if codings:
        _read_codings(resp, codings)
    # find(), not `in`: `bytes in bytes` first tries its operand as an integer, and builds and drops
    # a TypeError on every call, a cost this per-response check does not need.
    if connection.find(b"close") >= 0 or (resp.http10 and connection.find(b"keep-alive") < 0):
        resp.keep_alive = False
    drop = drops > 0
    if drop:
        # The usual case, one hop-by-hop line (nginx's `Connection: keep-alive`), is cut out by its text.
        block = _without_line(block, hop_line) if drops == 1 else _RESPONSE_DROP.sub(b"", block)
        if connection not in _USUAL_CONNECTION:  # a list naming fields: they are hop-by-hop too (RFC 9110 §7.6.1)
            block = _without_connection_options(block, connection)
    if lengths and (codings or lengths > 1):
        # Transfer-Encoding overrides Content-Length, and an intermediary must remove the latter
        # before forwarding (RFC 9112 §6.3 rule 3); identical repeats are folded into one (§6.3 rule 5).
        block = _CONTENT_LENGTH_LINES.sub(b"", block)
        if not codings:
            block += b"\r\nContent-Length: %d" % (resp.content_length or 0)
        drop = True
    status_rest = head[8:] if end < 0 else head[8:end]  # a head may be a status line alone
    resp.out = head if not (drop or resp.http10) else b"HTTP/1.1" + status_rest + block
    return resp


def _status_line(line: bytes) -> tuple[bool, int]:
    """(HTTP/1.0?, status) of a valid status line; an upstream sends few distinct ones, so they are remembered."""
    known = _STATUS_LINES.get(line)
    if known is not None:
        return known
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise HTTPError(502, "the upstream sent a malformed status line")
    known = (match.group(1) == b"0", int(match.group(2)))
    if len(_STATUS_LINES) >= 256:  # a bound, so an upstream inventing reason phrases cannot grow it
        _STATUS_LINES.clear()
    _STATUS_LINES[line] = known
    return known


_STATUS_LINES: Final[dict[bytes, tuple[bool, int]]] = {}


def _without_line(block: bytes, line: bytes) -> bytes:
    """`block` without `line`: a whole header line, led by its CRLF, that the special-header pass found once.

    Cheaper than a second regular-expression pass, and exact: the line is in `block`, and no earlier
    line can begin with its text (its name, then its colon), since that line would have been found too.
    """
    start = block.find(line)
    return block[:start] + block[start + len(line) :]


# Connection values that name no field: the usual ones are checked without splitting a list.
_USUAL_CONNECTION: Final = frozenset({b"", b",keep-alive", b",close", b",upgrade"})
_CONNECTION_OPTIONS: Final = frozenset({b"", b"close", b"keep-alive", b"upgrade"})


def _without_connection_options(block: bytes, connection: bytes) -> bytes:
    """`block` without the fields the response's Connection header names; 502 if it names the framing."""
    named = {token.strip(b" \t") for token in connection.split(b",")} - _CONNECTION_OPTIONS
    if named & {b"content-length", b"transfer-encoding"}:
        # Dropping them would leave a body nobody can delimit; no honest server asks for it.
        raise HTTPError(502, "the upstream's Connection header names Content-Length or Transfer-Encoding")
    return _without_fields(block, named) if named else block


def _read_codings(resp: ResponseHead, codings: bytes) -> None:
    """Frame a response by its transfer codings (RFC 9112 §6.3 rule 4): chunked if it is the final one."""
    resp.content_length = None
    if codings == b",chunked":  # the usual case, without a list to split
        resp.chunked = True
        return
    names = [c.strip(b" \t").partition(b";")[0].rstrip(b" \t") for c in codings.split(b",")]
    names = [c for c in names if c]  # empty list elements are ignored (RFC 9110 §5.6.1)
    if names.count(b"chunked") > 1:  # RFC 9112 §7: chunked is never applied twice
        raise HTTPError(502, "the upstream applied the chunked transfer coding twice")
    # Any other final coding leaves the body delimited by close.
    resp.chunked = bool(names) and names[-1] == b"chunked"
    resp.codings = len(names) > resp.chunked


def switch_asked_for(switched: bytes, asked: bytes) -> bool:
    """True if the protocols a 101's Upgrade names are among those the request's listed (by name, any case)."""
    names = {p.strip(b" \t").partition(b"/")[0].lower() for p in asked.split(b",")}
    return all(p.strip(b" \t").partition(b"/")[0].lower() in names for p in switched.split(b","))


def response_has_body(method: bytes, status: int) -> bool:
    """False for the responses that never carry a body (RFC 9112 §6.3 rule 1)."""
    return not (method == b"HEAD" or status < 200 or status in (204, 304))


class ChunkedScanner:
    """Walk a chunked body (RFC 9112 §7.1) to find its end; optionally collect the decoded data.

    `feed` returns how many of the given bytes belong to the body, so whatever
    follows it (the next pipelined message) is left for the caller. Framing
    errors raise HTTPError, because forwarding a body whose end we cannot agree
    on with the other side is how smuggling starts.
    """

    __slots__ = ("_line", "_remaining", "_state", "decoded", "limit", "total")

    # The scanner's states; one name a line, as a compiled class body takes them (no tuple unpacking).
    _SIZE = 0
    _DATA = 1
    _DATA_END = 2
    _TRAILER = 3
    _DONE = 4
    _MAX_LINE = 4096

    def __init__(self, limit: int, decode: bool = False) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""
        self.total = 0
        self.limit = limit
        self.decoded: list[bytes] | None = [] if decode else None

    @property
    def done(self) -> bool:
        """True once the last chunk and the trailer section have been seen."""
        return self._state == self._DONE

    def feed(self, data: bytes, status: int = 400) -> int:
        """Consume body bytes; return how many belong to the body. `status` is the error to raise."""
        pos, size = 0, len(data)
        while pos < size and self._state != self._DONE:
            if self._state == self._DATA:
                take = min(self._remaining, size - pos)
                if self.decoded is not None:
                    self.decoded.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._DATA_END
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                if len(self._line) > self._MAX_LINE:
                    raise HTTPError(status, "chunk size or trailer line too long")
                return size
            line = self._line + data[pos : newline + 1]
            self._line = b""
            pos = newline + 1
            if len(line) > self._MAX_LINE or not line.endswith(b"\r\n"):
                raise HTTPError(status, "chunk line must be short and end with CRLF")
            self._line_done(line[:-2], status)
        return pos

    def _line_done(self, line: bytes, status: int) -> None:
        if self._state == self._DATA_END:
            if line:
                raise HTTPError(status, "chunk data longer than its declared size")
            self._state = self._SIZE
        elif self._state == self._SIZE:
            match = _CHUNK_LINE.fullmatch(line)
            if match is None:  # forwarded as is, so only a line every recipient reads alike
                raise HTTPError(status, "invalid chunk size line")
            chunk = int(match.group(1), 16)
            self.total += chunk
            if self.total > self.limit:
                raise HTTPError(413 if status == 400 else status, "body larger than the configured limit")
            self._state = self._DATA if chunk else self._TRAILER
            self._remaining = chunk
        elif not line:  # the blank line that ends the trailer section
            self._state = self._DONE
        elif _FIELDS.fullmatch(b"\r\n" + line) is None:
            raise HTTPError(status, "malformed trailer line")


def error_response(status: int, reason: str, *, close: bool, extra: bytes = b"") -> bytes:
    """A short plain-text response the proxy sends itself (502, 503, 504, 4xx)."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {reason}\n".encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
    ).encode()
    return head + extra + (b"Connection: close\r\n\r\n" if close else b"\r\n") + body
