"""HTTP/1.1 framing for the proxy: parse and rewrite heads, find where bodies end.

Only what a reverse proxy needs (RFC 9112), done in one pass per head and kept
to plain bytes operations, because this runs for every request:

- a request head is validated (request line, header syntax, Host, the framing
  headers) and rewritten for the upstream in the same loop;
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
from http import HTTPStatus

# RFC 9110 §5.6.2 token characters.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
# The header block of a head at once, each line led by its CRLF: a token, a colon, then visible
# characters, spaces and tabs. So no CR, LF or NUL inside a value, no space before the colon
# (RFC 9112 §5.1) and no obsolete line folding. One pass in C, whatever the number of headers.
_FIELDS = re.compile(rb"(?:\r\n" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*)*")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")

# Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
# de facto Proxy-Connection. Transfer-Encoding is kept: chunked bodies pass through as they are.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"})
# Forwarding headers the proxy writes itself; a client's own are dropped unless it is a trusted proxy.
FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})

_HOP = rb"connection|keep-alive|proxy-connection|te|trailer|upgrade"
_FWD = rb"x-forwarded-for|x-forwarded-proto|x-forwarded-host|forwarded"
# The request headers the proxy acts on, found in one pass; and the ones it never forwards as they came.
_REQUEST_SPECIAL = re.compile(
    rb"\r\n(content-length|transfer-encoding|host|cookie|" + _HOP + rb"|" + _FWD + rb"):([^\r\n]*)", re.I
)
_REQUEST_DROP = re.compile(rb"\r\n(?:" + _HOP + rb"|" + _FWD + rb"):[^\r\n]*", re.I)
_CONTENT_LENGTH_LINES = re.compile(rb"\r\ncontent-length:[^\r\n]*", re.I)
_COOKIE_LINES = re.compile(rb"\r\ncookie:[^\r\n]*", re.I)
_RESPONSE_SPECIAL = re.compile(rb"\r\n(content-length|transfer-encoding|" + _HOP + rb"):([^\r\n]*)", re.I)
_RESPONSE_DROP = re.compile(rb"\r\n(?:" + _HOP + rb"):[^\r\n]*", re.I)
_TRANSFER_ENCODING = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*", re.I)


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
        self.forwarded: list[tuple[bytes, bytes]] = []  # the client's X-Forwarded-* (name, value)
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
    end = head.find(b"\r\n")
    match = _REQUEST_LINE.fullmatch(head if end < 0 else head[:end])
    if match is None:
        raise HTTPError(400, "malformed request line; expected 'METHOD /path HTTP/1.1'")
    block = b"" if end < 0 else head[end:]
    if block and _FIELDS.fullmatch(block) is None:
        raise HTTPError(400, "malformed header line (bad name, space before ':', control character or folding)")
    req = RequestHead()
    req.method, req.target, minor = match.groups()
    req.http10 = minor == b"0"
    drop = _read_request_specials(req, block) if block else []
    if req.host is None and not req.http10:
        raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host header")
    if drop or req.http10:
        block = _REQUEST_DROP.sub(b"", block) if drop else block
        if b"content-length" in drop:  # identical repeats are folded into one (RFC 9110 §8.6)
            block = _CONTENT_LENGTH_LINES.sub(b"", block) + b"\r\nContent-Length: %d" % req.content_length
        extra = {
            name for name in drop if name not in HOP_BY_HOP and name not in FORWARDED and name != b"content-length"
        }
        if extra:  # headers the client named in Connection are hop-by-hop too (RFC 9110 §7.6.1)
            block = b"".join(
                b"\r\n" + line for line in block.split(b"\r\n")[1:] if line.partition(b":")[0].lower() not in extra
            )
        head = b"%s %s HTTP/1.1%s" % (req.method, req.target, block)
    req.out = head
    return req


def _read_request_specials(req: RequestHead, block: bytes) -> list[bytes]:
    """Fill `req` from the headers the proxy acts on; return the names that must not be forwarded as they are."""
    drop: list[bytes] = []
    lengths: list[bytes] = []
    cookies: list[bytes] = []
    connection: list[bytes] = []
    hosts = 0
    for raw_name, raw_value in _REQUEST_SPECIAL.findall(block):
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
            req.host = value
        elif name == b"cookie":
            cookies.append(value)
        elif name in FORWARDED:
            req.forwarded.append((name, value))
            drop.append(name)
        else:  # hop-by-hop
            if name == b"connection":
                connection += [t.strip(b" \t").lower() for t in value.split(b",")]
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
    if _FRAMING_NAMES.intersection(connection):
        # Dropping these as hop-by-hop would forward a body with no framing: the upstream would read
        # the body as the next request (request smuggling). No honest client asks for it.
        raise HTTPError(400, "the Connection header must not name Content-Length, Transfer-Encoding or Host")
    drop += [t for t in connection if t not in (b"close", b"keep-alive") and t]
    return drop


_FRAMING_NAMES = frozenset({b"content-length", b"transfer-encoding", b"host"})


class ResponseHead:
    """A parsed response head: its framing, whether the connection may be reused, the head to forward."""

    __slots__ = ("chunked", "content_length", "http10", "keep_alive", "out", "status")

    def __init__(self) -> None:
        self.status = 0
        self.http10 = False
        self.keep_alive = True
        self.content_length: int | None = None  # None and not chunked: the body ends at close
        self.chunked = False
        self.out = b""  # status line (as HTTP/1.1) and headers, hop-by-hop ones gone, no final blank line

    def without_transfer_encoding(self) -> bytes:
        """`out` without Transfer-Encoding, for a body the proxy decodes for an HTTP/1.0 client."""
        return _TRANSFER_ENCODING.sub(b"", self.out)


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse an upstream's response head (without its final blank line); HTTPError(502) if malformed."""
    end = head.find(b"\r\n")
    match = _STATUS_LINE.fullmatch(head if end < 0 else head[:end])
    if match is None:
        raise HTTPError(502, "the upstream sent a malformed status line")
    block = b"" if end < 0 else head[end:]
    if block and _FIELDS.fullmatch(block) is None:
        raise HTTPError(502, "the upstream sent a malformed header line")
    resp = ResponseHead()
    resp.http10 = match.group(1) == b"0"
    resp.status = int(match.group(2))
    connection = b""
    drop = False
    for raw_name, raw_value in _RESPONSE_SPECIAL.findall(block):
        name, value = raw_name.lower(), raw_value.strip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or len(value) > 15 or resp.content_length not in (None, int(value)):
                raise HTTPError(502, "the upstream sent an invalid Content-Length")
            resp.content_length = int(value)
        elif name == b"transfer-encoding":
            # Anything but a plain chunked coding is delimited by close (RFC 9112 §6.3).
            resp.chunked = value.lower() == b"chunked"
        else:
            drop = True
            if name == b"connection":
                connection += b"," + value.lower()
    if resp.chunked:
        resp.content_length = None
    if b"close" in connection or (resp.http10 and b"keep-alive" not in connection):
        resp.keep_alive = False
    if drop:
        block = _RESPONSE_DROP.sub(b"", block)
    status_rest = head[8:] if end < 0 else head[8:end]  # a head may be a status line alone
    resp.out = head if not (drop or resp.http10) else b"HTTP/1.1" + status_rest + block
    return resp


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

    _SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
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
            size_text = line.partition(b";")[0].rstrip(b" \t")
            if _HEX.fullmatch(size_text) is None:
                raise HTTPError(status, "invalid chunk size")
            chunk = int(size_text, 16)
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
