"""The pure rules of the HTTP/2 relay: its limits, flood counting, and the translation of heads
between HTTP/2 and HTTP/1.1 (RFC 9113 §8). No I/O: the driver is :mod:`.h2`."""

from __future__ import annotations

import http
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from .._errors import ClientError, UpstreamError
from .._names import try_normalize_host
from .hooks import Headers, Request, Response

__all__ = [
    "HOP_BY_HOP",
    "FloodGuard",
    "H2Limits",
    "HeadWatch",
    "forwardable",
    "h1_request_headers",
    "h2_request_headers",
    "h2_response_headers",
    "request_from_h2",
    "response_from_h2",
    "same_authority_only",
]


# RFC 9113 §8.2.2: connection-specific header fields are not allowed in HTTP/2; RFC 9110 §7.6.1
# hop-by-hop fields are not forwarded by a proxy either.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"http2-settings",
        b"host",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class H2Limits:
    """The bounds one HTTP/2 connection lives within.

    Attributes:
        max_concurrent_streams: SETTINGS_MAX_CONCURRENT_STREAMS we advertise (RFC 9113 §6.5.2).
        stream_window: our initial stream window: what the proxy buffers per stream at most.
            A sender can have no more than this in flight, so a stream moves at most one
            window per acknowledgement round trip (through the scheduler of both ends under
            load); 512 KiB let a bulk body keep pace with HTTP/1.1 where 256 KiB did not.
        connection_window: our connection window: what it buffers per connection at most.
        max_header_list_size: decoded header-list bytes accepted (HPACK bombs, RFC 9113 §6.5.2).
        stall_timeout: seconds a peer may keep a window at zero, or not drain its socket,
            before the stream is reset or the connection closed.
        flood_window: seconds over which the flood counters below are kept.
        max_resets: streams the client may reset per window (rapid reset, CVE-2023-44487).
        max_settings: SETTINGS frames per window.
        max_pings: PING frames per window.
        max_empty_frames: DATA frames without payload nor END_STREAM, and PRIORITY frames,
            per window.
    """

    max_concurrent_streams: int = 100
    stream_window: int = 512 * 1024
    connection_window: int = 2 * 1024 * 1024
    max_header_list_size: int = 64 * 1024
    stall_timeout: float = 60.0
    flood_window: float = 10.0
    max_resets: int = 200
    max_settings: int = 100
    max_pings: int = 100
    max_empty_frames: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.max_concurrent_streams <= 10_000:
            raise ValueError("max_concurrent_streams must be within 1..10000")
        # RFC 9113 §6.9.1: windows are at most 2**31 - 1.
        if not 65_535 <= self.stream_window <= 2**31 - 1:
            raise ValueError("stream_window must be within 65535..2**31-1")
        if not self.stream_window <= self.connection_window <= 2**31 - 1:
            raise ValueError("connection_window must be within stream_window..2**31-1")
        if self.max_header_list_size < 4096:
            raise ValueError("max_header_list_size must be at least 4096")


@dataclass(slots=True)
class FloodGuard:
    """Counts frames by kind over a fixed window; says when a peer went over a limit.

    Pure: the caller passes ``now``. A new window starts ``window`` seconds after the last one
    began, with all counts at zero.
    """

    window: float
    limits: dict[str, int]
    _start: float = 0.0
    _counts: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str, now: float) -> bool:
        """Count one ``kind`` frame at ``now``; ``True`` when the limit for it is exceeded."""
        if now - self._start >= self.window:
            self._start = now
            self._counts.clear()
        seen = self._counts.get(kind, 0) + 1
        self._counts[kind] = seen
        return seen > self.limits[kind]


_PREFACE_SIZE = 24  # RFC 9113 §3.4: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER = 9  # RFC 9113 §4.1
_HEADERS, _CONTINUATION = 0x1, 0x9  # RFC 9113 §6.2, §6.10
_END_HEADERS = 0x4


@dataclass(slots=True)
class HeadWatch:
    """Says since when a client's *head* has been incomplete, from the raw bytes it sends.

    An HTTP/2 head is the connection preface with the first SETTINGS frame (RFC 9113 §3.4),
    then each header block: a HEADERS frame and its CONTINUATION frames up to END_HEADERS
    (RFC 9113 §4.3, §6.10). ``since`` is when the incomplete head began (the connection's
    start for the preface, the first byte of the HEADERS frame for a block), ``None`` while
    none is open; the driver holds each head to a total deadline from there, however slowly
    its bytes trickle in. Pure: the caller passes ``now``; frames are only delimited, never
    decoded (``h2`` does that and enforces the protocol).
    """

    since: float | None
    _preface_left: int = _PREFACE_SIZE
    _greeting: bool = True  # the first frame after the preface is the client's SETTINGS
    _in_block: bool = False
    _header: bytearray = field(default_factory=bytearray)
    _frame_start: float = 0.0
    _payload_left: int = 0
    _head_frame: bool = False
    _ends_head: bool = False

    def feed(self, data: bytes, now: float) -> None:
        """Account for ``data``, the next bytes from the client, received at ``now``."""
        view = memoryview(data)
        while view:
            if self._preface_left:
                taken = min(self._preface_left, len(view))
                self._preface_left -= taken
            elif self._payload_left:
                taken = min(self._payload_left, len(view))
                self._payload_left -= taken
                if not self._payload_left:
                    self._frame_done()
            else:
                if not self._header:
                    self._frame_start = now
                taken = min(_FRAME_HEADER - len(self._header), len(view))
                self._header += view[:taken]
                if len(self._header) == _FRAME_HEADER:
                    self._frame_begins()
            view = view[taken:]

    def _frame_begins(self) -> None:
        header, self._header = self._header, bytearray()
        self._payload_left = int.from_bytes(header[:3], "big")
        kind, flags = header[3], header[4]
        self._head_frame = self._greeting or self._in_block or kind == _HEADERS
        self._ends_head = self._greeting or (
            kind in (_HEADERS, _CONTINUATION) and bool(flags & _END_HEADERS)
        )
        if self._head_frame and self.since is None:
            self.since = self._frame_start
        if not self._payload_left:
            self._frame_done()

    def _frame_done(self) -> None:
        if not self._head_frame:
            return
        if self._ends_head:
            self.since = None
            self._greeting = self._in_block = False
        else:
            self._in_block = True


# -- header translation (pure) ---------------------------------------------------------------


def request_from_h2(headers: Iterable[tuple[bytes, bytes]]) -> Request:
    """The protocol-neutral request for an h2 header list (pseudo-headers checked).

    ``:authority`` becomes the first ``host`` header, as an HTTP/1.1 request carries it
    (RFC 9113 §8.3.1); split ``cookie`` fields stay split (joined only towards HTTP/1.1).

    Raises:
        ClientError: a pseudo-header is missing or repeated (RFC 9113 §8.3.1).
    """
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name.startswith(b":"):
            if name in pseudo:
                raise ClientError(f"repeated {name.decode()}", reason="bad_http2")
            pseudo[name] = value
        else:
            regular.append((name, value))
    method = pseudo.get(b":method")
    if method is None:
        raise ClientError("request without :method", reason="bad_http2")
    authority = pseudo.get(b":authority")
    if method == b"CONNECT":
        target = authority or b""
    else:
        path = pseudo.get(b":path")
        if not path or pseudo.get(b":scheme") is None:
            raise ClientError("request without :path or :scheme", reason="bad_http2")
        target = path
    if authority is None:
        authority = first_value(regular, b"host") or b""
    head = [(b"host", authority)] if authority else []
    head += [(k, v) for k, v in regular if k != b"host"]
    return Request(method=method, target=target, headers=tuple(head), http_version=b"2")


def first_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _connection_options(value: bytes) -> set[bytes]:
    """The header names one ``Connection`` field lists (RFC 9110 §7.6.1): hop-by-hop too."""
    return {option.strip().lower() for option in value.split(b",") if option.strip()}


def forwardable(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` lower-cased, without hop-by-hop and connection-specific fields.

    One pass: the names a ``Connection`` field lists are taken out afterwards (it may come
    after them), only when there is such a field.
    """
    listed: set[bytes] = set()
    out: list[tuple[bytes, bytes]] = []
    for key, value in headers:
        name = key.lower()
        if name == b"connection":
            listed |= _connection_options(value)
        elif not name.startswith(b":") and name not in HOP_BY_HOP:
            out.append((name, value))
    if listed:
        out = [(name, value) for name, value in out if name not in listed]
    return out


def h2_request_headers(request: Request) -> list[tuple[bytes, bytes]]:
    """The h2 header list for ``request`` (RFC 9113 §8.3.1); ``Host`` becomes ``:authority``."""
    authority = request.header(b"host") or b""
    if request.method == b"CONNECT":
        out = [(b":method", request.method), (b":authority", request.target)]
    else:
        out = [
            (b":method", request.method),
            (b":scheme", b"https"),
            (b":authority", authority),
            (b":path", request.target),
        ]
    rest = forwardable(request.headers)
    te = request.header(b"te")
    if te is not None and te.strip().lower() == b"trailers":
        rest.append((b"te", b"trailers"))  # RFC 9113 §8.2.2: the one TE value allowed
    return out + rest


def h1_request_headers(request: Request, *, has_body: bool) -> list[tuple[bytes, bytes]]:
    """The HTTP/1.1 header list for ``request`` coming from an h2 client.

    ``Host`` first; split ``cookie`` fields joined with ``"; "`` (RFC 9113 §8.2.3); a request
    with a body and no length is sent chunked (h2 frames bodies itself, RFC 9112 §6.1 does not).
    """
    host = request.header(b"host")
    out = [(b"host", host)] if host is not None else []
    cookies: list[bytes] = []
    for name, value in forwardable(request.headers):
        if name == b"cookie":
            cookies.append(value)
        else:
            out.append((name, value))
    if cookies:
        out.append((b"cookie", b"; ".join(cookies)))
    if has_body and first_value(out, b"content-length") is None:
        out.append((b"transfer-encoding", b"chunked"))
    return out


def h2_response_headers(status: int, headers: Headers) -> list[tuple[bytes, bytes]]:
    """The h2 header list of a response (RFC 9113 §8.3.2): ``:status`` and no hop-by-hop."""
    return [(b":status", str(status).encode()), *forwardable(headers)]


def response_from_h2(headers: Iterable[tuple[bytes, bytes]]) -> Response:
    """The protocol-neutral response for an h2 response header list.

    Raises:
        UpstreamError: ``:status`` is missing or not a number.
    """
    status = None
    regular: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b":status":
            status = value
        elif not name.startswith(b":"):
            regular.append((name, value))
    if status is None or not status.isdigit():
        raise UpstreamError("h2 response without a valid :status", reason="bad_http2")
    code = int(status)
    return Response(
        status=code, reason=_reason_phrase(code), headers=tuple(regular), http_version=b"2"
    )


def _reason_phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def same_authority_only(host: str, port: int) -> Callable[[bytes], Awaitable[str | None]]:
    """The strictest coalescing rule: only the connection's own host and port.

    Returns a ``misdirected`` callback for :class:`H2Front`: any other authority gets 421
    and its own connection, where it is decided on its own.
    """

    # The exact ``:authority`` values already found to be this connection's own (a browser
    # sends the same bytes on every stream): the answer depends on nothing else, so those
    # skip the parsing and normalising. Bounded; other values are judged every time.
    approved: set[bytes] = set()

    async def misdirected(authority: bytes) -> str | None:
        if authority in approved:
            return None
        name, port_of = _split_authority(authority)
        normal = try_normalize_host(name) if name else None
        if normal != host or (port_of if port_of is not None else 443) != port:
            return f"{authority.decode('ascii', 'replace')} is not this connection's origin"
        if len(approved) < _APPROVED_AUTHORITIES:
            approved.add(authority)
        return None

    return misdirected


_APPROVED_AUTHORITIES = 4  # spellings of a connection's own authority remembered per connection


def _split_authority(authority: bytes) -> tuple[bytes, int | None]:
    """``host`` and ``port`` of an ``:authority`` value (``[v6]:port`` included)."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            return b"", None
        host, rest = authority[1:end], authority[end + 1 :]
        port = rest[1:] if rest.startswith(b":") else b""
    else:
        host, _, port = authority.rpartition(b":") if b":" in authority else (authority, b"", b"")
    if port and not port.isdigit():
        return b"", None
    return host, int(port) if port else None
