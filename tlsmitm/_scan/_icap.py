"""ICAP (RFC 3507) messages, sans-IO: requests built as bytes, responses parsed from bytes.

Theory of operation
-------------------
An ICAP request is an HTTP-like head (``RESPMOD icap://host/service ICAP/1.0``) whose
``Encapsulated`` header (§4.4.1) gives the offsets of the encapsulated HTTP heads that follow it
(``req-hdr``, ``res-hdr``) and names the body part (``req-body``, ``res-body`` or
``null-body``). Bodies always travel in HTTP/1.1 chunked encoding (§4.4.1).

With *preview* (§4.5) the client sends the first ``Preview`` bytes and a zero chunk -- ``0;
ieof`` when that was the whole body -- and waits: ``100 Continue`` asks for the rest, ``204 No
Content`` (only when the request said ``Allow: 204``, §4.6) means the message is unmodified,
``200 OK`` carries a modified message. :class:`ResponseParser` turns the server's bytes into one
:class:`IcapResponse` (head, encapsulated HTTP head, de-chunked body), incrementally.

c-icap and the commercial engines report a threat in ``X-Infection-Found`` (``Type=0;
Resolution=2; Threat=NAME;``), ``X-Virus-ID`` or ``X-Violations-Found``; :func:`threat_of`
reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .._errors import UpstreamError

__all__ = [
    "IcapOptions",
    "IcapResponse",
    "ResponseParser",
    "build_options",
    "build_request",
    "encode_chunk",
    "http_request_head",
    "http_response_head",
    "parse_options",
    "threat_of",
]

Headers = tuple[tuple[bytes, bytes], ...]

LAST_CHUNK = b"0\r\n\r\n"
PREVIEW_EOF = b"0; ieof\r\n\r\n"  # RFC 3507 §4.5: the preview was the whole body
MAX_HEAD = 64 * 1024
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _error(detail: str) -> UpstreamError:
    return UpstreamError(f"ICAP: {detail}", reason="icap_protocol")


def encode_chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk (RFC 9112 §7.1); empty data encodes to nothing."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _head_lines(headers: Headers) -> bytes:
    out = bytearray()
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or b"\r" in value or b"\n" in value:
            raise ValueError(f"invalid header field {name!r}")
        out += name + b": " + value + b"\r\n"
    return bytes(out)


def http_request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """An encapsulated HTTP request head (request line, fields, blank line)."""
    return method + b" " + target + b" HTTP/1.1\r\n" + _head_lines(headers) + b"\r\n"


def http_response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """An encapsulated HTTP response head (status line, fields, blank line)."""
    return b"HTTP/1.1 %d %b\r\n" % (status, reason) + _head_lines(headers) + b"\r\n"


def build_options(url: bytes, host: bytes) -> bytes:
    """An ``OPTIONS`` request (RFC 3507 §4.10)."""
    return (
        b"OPTIONS " + url + b" ICAP/1.0\r\nHost: " + host + b"\r\nEncapsulated: null-body=0\r\n\r\n"
    )


def build_request(
    method: bytes,
    url: bytes,
    host: bytes,
    *,
    request_head: bytes | None,
    response_head: bytes | None,
    has_body: bool,
    preview: int | None,
    allow_204: bool = True,
) -> bytes:
    """A ``RESPMOD`` or ``REQMOD`` head with its encapsulated HTTP heads (RFC 3507 §4.4, §4.8).

    The body, when there is one, follows in chunks (:func:`encode_chunk`), ended by
    :data:`LAST_CHUNK` (or :data:`PREVIEW_EOF` when the preview holds the whole body).
    """
    if method not in (b"RESPMOD", b"REQMOD"):
        raise ValueError(f"not an ICAP modification method: {method!r}")
    parts: list[bytes] = []
    offset = 0
    encapsulated: list[bytes] = []
    if request_head is not None:
        encapsulated.append(b"req-hdr=%d" % offset)
        parts.append(request_head)
        offset += len(request_head)
    if response_head is not None:
        encapsulated.append(b"res-hdr=%d" % offset)
        parts.append(response_head)
        offset += len(response_head)
    body_name = b"res-body" if method == b"RESPMOD" else b"req-body"
    # RFC 3507 §4.4.1: exactly one body entity (or null-body), last.
    encapsulated.append(b"%b=%d" % (body_name if has_body else b"null-body", offset))
    head = [method + b" " + url + b" ICAP/1.0", b"Host: " + host]
    if allow_204:
        head.append(b"Allow: 204")  # §4.6: the server may answer "unmodified" with no body
    if preview is not None and has_body:
        head.append(b"Preview: %d" % preview)  # §4.5
    head.append(b"Encapsulated: " + b", ".join(encapsulated))
    return b"\r\n".join(head) + b"\r\n\r\n" + b"".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class IcapOptions:
    """What an ``OPTIONS`` response says about a service (RFC 3507 §4.10.2).

    Attributes:
        methods: the methods the service supports (``RESPMOD``, ``REQMOD``).
        istag: the service's state tag (changes when its signatures change).
        preview: bytes the server wants as preview, or ``None`` (no preview).
        allow_204: whether the server may answer ``204`` outside a preview.
        max_connections: the server's connection limit, if it gave one.
        ttl: seconds these options stay valid, if it said.
    """

    methods: frozenset[str]
    istag: str = ""
    preview: int | None = None
    allow_204: bool = False
    max_connections: int | None = None
    ttl: float | None = None


def _int_field(headers: Headers, name: bytes) -> int | None:
    value = _get(headers, name)
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise _error(f"{name.decode()} is not a number: {value!r}") from None
    if number < 0:
        raise _error(f"{name.decode()} is negative")
    return number


def _get(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def parse_options(response: IcapResponse) -> IcapOptions:
    """The service's parameters from its ``OPTIONS`` response."""
    if response.status != 200:
        raise _error(f"OPTIONS answered {response.status}")
    headers = response.headers
    methods_value = _get(headers, b"methods") or b""
    methods = frozenset(
        m.strip().upper().decode("ascii", "replace") for m in methods_value.split(b",") if m.strip()
    )
    allow = _get(headers, b"allow") or b""
    ttl = _int_field(headers, b"options-ttl")
    return IcapOptions(
        methods=methods,
        istag=(_get(headers, b"istag") or b"").strip(b'" ').decode("ascii", "replace"),
        preview=_int_field(headers, b"preview"),
        allow_204=b"204" in [a.strip() for a in allow.split(b",")],
        max_connections=_int_field(headers, b"max-connections"),
        ttl=float(ttl) if ttl is not None else None,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class IcapResponse:
    """One ICAP response, parsed.

    Attributes:
        status: the ICAP status code (``100``, ``200``, ``204``, ``4xx``, ``5xx``).
        reason: its reason phrase.
        headers: the ICAP header fields.
        http_status: the encapsulated HTTP response's status, or ``None``.
        http_reason: its reason phrase.
        http_headers: its fields (or the encapsulated request's, for REQMOD).
        http_request_line: the encapsulated HTTP request line when the server sent a request.
        body: the de-chunked encapsulated body (empty when there was none).
    """

    status: int
    reason: bytes
    headers: Headers
    http_status: int | None = None
    http_reason: bytes = b""
    http_headers: Headers = ()
    http_request_line: bytes | None = None
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request."""
        connection = _get(self.headers, b"connection") or b""
        return b"close" not in connection.lower()


def threat_of(headers: Headers) -> str | None:
    """The threat's name an ICAP server reported, or ``None``.

    Reads ``X-Infection-Found`` (``Threat=NAME;``, draft-stecher-icap-subid), ``X-Virus-ID``,
    and ``X-Violations-Found`` (a count, then per violation: file, threat, ...).
    """
    found = _get(headers, b"x-infection-found")
    if found is not None:
        for part in found.split(b";"):
            key, _, value = part.strip().partition(b"=")
            if key.strip().lower() == b"threat" and value.strip():
                return value.strip().decode("utf-8", "replace")
        return "unknown threat"
    virus = _get(headers, b"x-virus-id")
    if virus is not None and virus.strip():
        return virus.strip().decode("utf-8", "replace")
    violations = _get(headers, b"x-violations-found")
    if violations is not None:
        lines = [line.strip() for line in violations.splitlines() if line.strip()]
        if len(lines) >= 3:
            return lines[2].decode("utf-8", "replace")
        return "unknown threat"
    return None


def _parse_fields(block: bytes) -> tuple[bytes, Headers]:
    """The first line and the header fields of a head (without its blank line)."""
    lines = block.split(b"\r\n")
    first = lines[0]
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:  # obsolete line folding
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line.strip())
            continue
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise _error(f"malformed header line {line[:80]!r}")
        fields.append((name.lower(), value.strip()))
    return first, tuple(fields)


def _parse_encapsulated(value: bytes) -> list[tuple[bytes, int]]:
    entries: list[tuple[bytes, int]] = []
    for part in value.split(b","):
        name, sep, offset = part.strip().partition(b"=")
        if not sep or not offset.strip().isdigit():
            raise _error(f"malformed Encapsulated {value!r}")
        entries.append((name.strip().lower(), int(offset)))
    offsets = [o for _, o in entries]
    if offsets != sorted(offsets) or not entries:
        raise _error(f"Encapsulated offsets out of order: {value!r}")
    if entries[-1][0] not in (b"req-body", b"res-body", b"null-body", b"opt-body"):
        raise _error(f"Encapsulated does not end with a body: {value!r}")  # §4.4.1
    return entries


@dataclass
class ResponseParser:
    """Parses one ICAP response from bytes fed to it (RFC 3507 §4.3.3, §4.4).

    Call :meth:`feed` with received bytes; it returns the :class:`IcapResponse` once complete,
    ``None`` while more is needed. After completion, :attr:`trailing` holds bytes that followed.

    Args:
        max_body: bytes of encapsulated body accepted (a replaced body is held in memory).
    """

    max_body: int = 16 * 1024 * 1024
    trailing: bytes = b""
    _buffer: bytearray = field(default_factory=bytearray)
    _head: IcapResponse | None = None
    _encapsulated: list[tuple[bytes, int]] = field(default_factory=list)
    _body: bytearray = field(default_factory=bytearray)
    _in_body: bool = False
    _done: bool = False

    def feed(self, data: bytes) -> IcapResponse | None:
        """Add received bytes; the response when it is complete."""
        if self._done:
            self.trailing += data
            return None
        self._buffer += data
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    raise _error("response head too large")
                return None
            self._head = self._parse_head(bytes(self._buffer[:end]))
            del self._buffer[: end + 4]
            if self._head.status == 100 or not self._encapsulated:
                return self._finish()
        if not self._in_body:
            result = self._parse_http_heads()
            if result is not None:
                return result
            if not self._in_body:
                return None
        return self._parse_chunks()

    def _parse_head(self, block: bytes) -> IcapResponse:
        first, headers = _parse_fields(block)
        version, _, rest = first.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version != b"ICAP/1.0" or len(code) != 3 or not code.isdigit():
            raise _error(f"malformed status line {first[:80]!r}")
        encapsulated = _get(headers, b"encapsulated")
        if encapsulated is not None:
            self._encapsulated = _parse_encapsulated(encapsulated)
        return IcapResponse(status=int(code), reason=reason, headers=headers)

    def _parse_http_heads(self) -> IcapResponse | None:
        assert self._head is not None
        body_name, body_offset = self._encapsulated[-1]
        if len(self._buffer) < body_offset:
            if len(self._buffer) > MAX_HEAD:
                raise _error("encapsulated head too large")
            return None
        heads = bytes(self._buffer[:body_offset])
        del self._buffer[:body_offset]
        head = self._head
        for index, (name, offset) in enumerate(self._encapsulated[:-1]):
            end = self._encapsulated[index + 1][1]
            block = heads[offset:end]
            if not block.endswith(b"\r\n\r\n"):
                raise _error(f"encapsulated {name.decode()} does not end its head")
            first, fields = _parse_fields(block[:-4])
            if name == b"res-hdr":
                _version, _, rest = first.partition(b" ")
                code, _, reason = rest.partition(b" ")
                if not code.isdigit() or len(code) != 3:
                    raise _error(f"malformed encapsulated status line {first[:80]!r}")
                head = replace(head, http_status=int(code), http_reason=reason, http_headers=fields)
            elif name == b"req-hdr":
                if head.http_status is None:
                    head = replace(head, http_request_line=first, http_headers=fields)
            else:
                raise _error(f"unexpected Encapsulated entry {name!r}")
        self._head = head
        if body_name == b"null-body":
            return self._finish()
        self._in_body = True
        return None

    def _parse_chunks(self) -> IcapResponse | None:
        while True:
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                if len(self._buffer) > 1024:
                    raise _error("chunk size line too long")
                return None
            size_text = bytes(self._buffer[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _error(f"malformed chunk size {size_text[:20]!r}") from None
            if size == 0:
                # The last chunk; no trailer fields in ICAP bodies, just the blank line.
                end = self._buffer.find(b"\r\n", line_end + 2)
                if end < 0:
                    return None
                del self._buffer[: end + 2]
                return self._finish()
            if len(self._buffer) < line_end + 2 + size + 2:
                return None
            start = line_end + 2
            if self._buffer[start + size : start + size + 2] != b"\r\n":
                raise _error("chunk not followed by CRLF")
            self._body += self._buffer[start : start + size]
            if len(self._body) > self.max_body:
                raise _error(f"encapsulated body over {self.max_body} bytes")
            del self._buffer[: start + size + 2]

    def _finish(self) -> IcapResponse:
        assert self._head is not None
        self._done = True
        self.trailing = bytes(self._buffer)
        self._buffer = bytearray()
        return replace(self._head, body=bytes(self._body))
