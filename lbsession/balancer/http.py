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
# Every header line of a head at once: name, colon, visible characters, spaces and tabs.
# No CR, LF or NUL inside a value, and no space before the colon (RFC 9112 §5.1).
_HEADER_BLOCK = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")

# Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
# de facto Proxy-Connection. Transfer-Encoding is kept: chunked bodies pass through as they are.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"})
# Forwarding headers the proxy writes itself; a client's own are dropped unless it is a trusted proxy.
FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})


class HTTPError(Exception):
    """A message the proxy refuses; `status` is the answer to send before closing."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class RequestHead:
    """A parsed request head, already split into what is forwarded and what the proxy acts on."""

    __slots__ = (
        "chunked",
        "content_length",
        "cookie",
        "expect_continue",
        "forwarded",
        "host",
        "http10",
        "keep_alive",
        "lines",
        "method",
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
        self.lines: list[bytes] = []  # header lines to forward as they came
        self.expect_continue = False

    def header(self, name: bytes) -> bytes | None:
        """The first forwarded header called `name` (lower-case), or None."""
        for line in self.lines:
            key, _, value = line.partition(b":")
            if key.lower() == name:
                return value.strip(b" \t")
        return None


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a request head (without its final blank line); raise HTTPError if it is refused."""
    end = head.find(b"\r\n")
    request_line = head if end < 0 else head[:end]
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise HTTPError(400, "malformed request line; expected 'METHOD /path HTTP/1.1'")
    req = RequestHead()
    req.method, req.target, minor = match.groups()
    req.http10 = minor == b"0"
    if end < 0:
        block = b""
    else:
        block = head[end + 2 :] + b"\r\n"
        if _HEADER_BLOCK.fullmatch(block) is None:
            raise HTTPError(400, "malformed header line (bad name, space before ':', control character or folding)")
    connection_tokens: list[bytes] = []
    content_length: bytes | None = None
    hosts = 0
    cookies: list[bytes] = []
    lines = req.lines
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        key = name.lower()
        if key in _SPECIAL_REQUEST:
            value = value.strip(b" \t")
            if key == b"content-length":
                if (content_length is not None and value != content_length) or not value.isdigit() or len(value) > 15:
                    raise HTTPError(400, "invalid or conflicting Content-Length")
                if content_length is None:  # identical repeats are folded into one (RFC 9110 §8.6)
                    lines.append(b"Content-Length: " + value)
                content_length = value
            elif key == b"transfer-encoding":
                if req.chunked or value.lower() != b"chunked" or req.http10:
                    raise HTTPError(400, "only a single 'Transfer-Encoding: chunked' is accepted, on HTTP/1.1")
                req.chunked = True
                lines.append(line)
            elif key == b"connection":
                connection_tokens += [t.strip(b" \t").lower() for t in value.split(b",")]
            elif key == b"host":
                hosts += 1
                req.host = value
                lines.append(line)
            elif key == b"cookie":
                cookies.append(value)
            elif key == b"expect":
                req.expect_continue = value.lower() == b"100-continue"
                lines.append(line)
            elif key in FORWARDED:
                req.forwarded.append((key, value))
            # other hop-by-hop headers are dropped
        else:
            lines.append(line)
    if content_length is not None:
        if req.chunked:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding; refused (request smuggling)")
        req.content_length = int(content_length)
    if hosts != 1 and not req.http10:
        raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host header")
    if cookies:
        req.cookie = b"; ".join(cookies)
    if connection_tokens:
        if b"close" in connection_tokens:
            req.keep_alive = False
        elif req.http10 and b"keep-alive" in connection_tokens:
            req.keep_alive = True
        extra = set(connection_tokens) - {b"close", b"keep-alive"}
        if extra:  # headers the client named as hop-by-hop (RFC 9110 §7.6.1)
            req.lines = [ln for ln in lines if ln.partition(b":")[0].lower() not in extra]
    if req.http10 and b"keep-alive" not in connection_tokens:
        req.keep_alive = False
    return req


_SPECIAL_REQUEST = HOP_BY_HOP | FORWARDED | {
    b"content-length", b"transfer-encoding", b"host", b"cookie", b"expect"
}  # fmt: skip


class ResponseHead:
    """A parsed response head: its framing, whether the connection may be reused, the lines to forward."""

    __slots__ = ("chunked", "content_length", "http10", "keep_alive", "lines", "status", "status_line")

    def __init__(self) -> None:
        self.status = 0
        self.http10 = False
        self.keep_alive = True
        self.content_length: int | None = None  # None and not chunked: the body ends at close
        self.chunked = False
        self.lines: list[bytes] = []
        self.status_line = b""


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse an upstream's response head (without its final blank line); HTTPError(502) if malformed."""
    end = head.find(b"\r\n")
    status_line = head if end < 0 else head[:end]
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise HTTPError(502, "the upstream sent a malformed status line")
    resp = ResponseHead()
    resp.status_line = status_line
    resp.http10 = match.group(1) == b"0"
    resp.status = int(match.group(2))
    if end >= 0:
        block = head[end + 2 :] + b"\r\n"
        if _HEADER_BLOCK.fullmatch(block) is None:
            raise HTTPError(502, "the upstream sent a malformed header line")
        connection = b""
        for line in block.split(b"\r\n")[:-1]:
            name, _, value = line.partition(b":")
            key = name.lower()
            if key == b"content-length":
                value = value.strip(b" \t")
                if not value.isdigit() or resp.content_length not in (None, int(value)):
                    raise HTTPError(502, "the upstream sent an invalid Content-Length")
                resp.content_length = int(value)
                resp.lines.append(line)
            elif key == b"transfer-encoding":
                # Anything but a plain chunked coding is delimited by close (RFC 9112 §6.3).
                resp.chunked = value.strip(b" \t").lower() == b"chunked"
                resp.lines.append(line)
            elif key == b"connection":
                connection += value.lower()
            elif key not in HOP_BY_HOP:
                resp.lines.append(line)
        if resp.chunked:
            resp.content_length = None
        if b"close" in connection or (resp.http10 and b"keep-alive" not in connection):
            resp.keep_alive = False
    elif resp.http10:
        resp.keep_alive = False
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
        elif _HEADER_BLOCK.fullmatch(line + b"\r\n") is None:
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
