"""The ICAP client: :class:`IcapScanner`, a pool of persistent connections to one service.

The messages are built and parsed by :mod:`._icap` (sans-IO); this module only moves bytes.
"""

from __future__ import annotations

import math
import select
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import trio

from .._errors import UpstreamError
from ._icap import (
    LAST_CHUNK,
    PREVIEW_EOF,
    IcapOptions,
    IcapResponse,
    ResponseParser,
    build_options,
    build_request,
    encode_chunk,
    http_request_head,
    http_response_head,
    parse_options,
    threat_of,
)
from ._model import Clean, Infected, Replaced, ScanContext, ScanFailed, Scanner, ScanVerdict

__all__ = ["IcapScanner"]

_RECEIVE = 64 * 1024
_SEND = 256 * 1024  # body bytes per chunk sent
_DEFAULT_MAX_CONNECTIONS = 16
# Hop-by-hop and framing fields do not describe the decoded body the server is sent.
_FRAMING = frozenset(
    {b"content-length", b"content-encoding", b"transfer-encoding", b"connection", b"keep-alive"}
)


@dataclass(slots=True)
class _Connection:
    stream: trio.SocketStream
    leftover: bytes = b""

    def stale(self) -> bool:
        """An idle connection the server closed (or wrote to) cannot be reused."""
        readable, _, _ = select.select([self.stream.socket.fileno()], [], [], 0)
        return bool(readable)


class _Failure(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class IcapScanner(Scanner):
    """Scans bodies through an ICAP service (RFC 3507): RESPMOD for responses, REQMOD for uploads.

    At :meth:`open` (and whenever ``Options-TTL`` has run out) the service is asked ``OPTIONS``:
    its methods, preview size, ISTag and connection limit. Every body is sent with ``Allow:
    204`` and, when the server asked for one, a preview; a server that answers with a
    modified message (a cleaned body, or a block page of its own) gets it served as
    :class:`Replaced`, and one that reports a threat (``X-Infection-Found``...) gives
    :class:`Infected`.

    Args:
        host: the ICAP server's address.
        port: its port (1344 is ICAP's).
        service: the service path (``"avscan"``, ``"virus_scan"``...).
        connect_timeout: seconds to establish a connection.
        max_connections: at most this many connections at once; by default the server's
            ``Max-Connections``, else 16.
        max_replacement: bytes of replaced body accepted from the server.
        clock: seconds for the ``Options-TTL`` (default ``trio.current_time``).
    """

    def __init__(
        self,
        host: str,
        port: int = 1344,
        service: str = "avscan",
        *,
        connect_timeout: float = 5.0,
        max_connections: int | None = None,
        max_replacement: int = 16 * 1024 * 1024,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.service = service.strip("/")
        self.name = f"icap://{host}:{port}/{self.service}"
        self.connect_timeout = connect_timeout
        self.max_replacement = max_replacement
        self._configured_max = max_connections
        self._clock = clock or trio.current_time
        self.options: IcapOptions | None = None
        self._options_expire = -math.inf
        self._options_lock = trio.Lock()
        self._idle: list[_Connection] = []
        self._limit = trio.CapacityLimiter(max_connections or _DEFAULT_MAX_CONNECTIONS)
        host_part = f"[{host}]" if ":" in host else host
        self._url = f"icap://{host_part}:{port}/{self.service}".encode("ascii")
        self._host_header = f"{host_part}:{port}".encode("ascii")
        self.connections_made = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Ask the service ``OPTIONS``; raises :class:`~tlsmitm.UpstreamError` when it fails."""
        try:
            await self._refresh_options()
        except _Failure as exc:
            raise UpstreamError(f"{self.name}: {exc.detail}", reason=exc.reason) from exc

    async def aclose(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.stream.aclose()

    async def _refresh_options(self) -> IcapOptions:
        async with self._options_lock:
            if self.options is not None and self._clock() < self._options_expire:
                return self.options
            response = await self._roundtrip_simple(build_options(self._url, self._host_header))
            try:
                options = parse_options(response)
            except UpstreamError as exc:
                raise _Failure("protocol", str(exc)) from exc
            self.options = options
            # RFC 3507 §4.10.2: Options-TTL; without it the options stay valid.
            self._options_expire = (
                self._clock() + options.ttl if options.ttl is not None else math.inf
            )
            if self._configured_max is None and options.max_connections:
                self._limit.total_tokens = options.max_connections
            return options

    # -- connections -------------------------------------------------------------------------

    async def _connect(self) -> _Connection:
        with trio.move_on_after(self.connect_timeout):
            try:
                stream = await trio.open_tcp_stream(self.host, self.port)
            except OSError as exc:
                raise _Failure("unreachable", f"{self.name}: {exc}") from exc
            self.connections_made += 1
            return _Connection(stream=stream)
        raise _Failure("unreachable", f"{self.name}: no connection in {self.connect_timeout} s")

    async def _checkout(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.stale():
                return conn
            await conn.stream.aclose()
        return await self._connect()

    def _checkin(self, conn: _Connection, response: IcapResponse) -> bool:
        if response.keep_alive and not conn.leftover:
            self._idle.append(conn)
            return True
        return False

    async def _read_response(self, conn: _Connection, max_body: int) -> IcapResponse:
        parser = ResponseParser(max_body=max_body)
        data, conn.leftover = conn.leftover, b""
        try:
            while True:
                if data:
                    response = parser.feed(data)
                    if response is not None:
                        conn.leftover = parser.trailing
                        return response
                data = bytes(await conn.stream.receive_some(_RECEIVE))
                if not data:
                    raise _Failure("connection_lost", f"{self.name}: closed before answering")
        except UpstreamError as exc:
            raise _Failure("protocol", f"{self.name}: {exc}") from exc

    async def _roundtrip_simple(self, request: bytes) -> IcapResponse:
        async with self._limit:
            conn = await self._checkout()
            kept = False
            try:
                await conn.stream.send_all(request)
                response = await self._read_response(conn, self.max_replacement)
                kept = self._checkin(conn, response)
                return response
            except (OSError, trio.BrokenResourceError) as exc:
                raise _Failure("connection_lost", f"{self.name}: {exc}") from exc
            finally:
                if not kept:
                    await trio.aclose_forcefully(conn.stream)

    # -- scanning ----------------------------------------------------------------------------

    async def scan(self, context: ScanContext, body: AsyncIterator[bytes]) -> ScanVerdict:
        """Send ``body`` through RESPMOD (a response) or REQMOD (a request body)."""
        try:
            return await self._scan(context, body)
        except _Failure as exc:
            return ScanFailed(scanner=self.name, reason=exc.reason, detail=exc.detail)

    async def _scan(self, context: ScanContext, body: AsyncIterator[bytes]) -> ScanVerdict:
        options = await self._refresh_options()
        method = "RESPMOD" if context.direction == "response" else "REQMOD"
        if method not in options.methods:
            raise _Failure("unsupported", f"{self.name} does not offer {method}")
        request_head = http_request_head(
            context.method, context.target, _unframed(context.request_headers)
        )
        response_head = None
        if context.direction == "response":
            response_head = http_response_head(
                context.status, context.reason or b"-", _unframed(context.response_headers)
            )
        # Collect the preview (RFC 3507 §4.5) before anything is sent: a body that fits in it
        # is sent whole, ended by "0; ieof".
        preview_size = options.preview
        first = bytearray()
        body_done = False
        if preview_size is not None:
            while len(first) <= preview_size:
                chunk = await anext(body, None)
                if chunk is None:
                    body_done = True
                    break
                first += chunk
        else:
            chunk = await anext(body, None)
            body_done = chunk is None
            first += chunk or b""
        has_body = bool(first) or not body_done
        head = build_request(
            method.encode(),
            self._url,
            self._host_header,
            request_head=request_head,
            response_head=response_head,
            has_body=has_body,
            preview=preview_size if has_body else None,
        )
        async with self._limit:
            conn = await self._checkout()
            kept = False
            try:
                response = await self._exchange(
                    conn, head, bytes(first), body, body_done, preview_size, has_body
                )
                kept = self._checkin(conn, response)
            except (OSError, trio.BrokenResourceError) as exc:
                raise _Failure("connection_lost", f"{self.name}: {exc}") from exc
            finally:
                if not kept:
                    await trio.aclose_forcefully(conn.stream)
        return self._verdict(response)

    async def _exchange(
        self,
        conn: _Connection,
        head: bytes,
        first: bytes,
        body: AsyncIterator[bytes],
        body_done: bool,
        preview_size: int | None,
        has_body: bool,
    ) -> IcapResponse:
        if not has_body:
            await conn.stream.send_all(head)
            return await self._read_response(conn, self.max_replacement)
        if preview_size is not None:
            preview, rest = first[:preview_size], first[preview_size:]
            ending = PREVIEW_EOF if body_done and not rest else LAST_CHUNK
            await conn.stream.send_all(head + encode_chunk(preview) + ending)
            response = await self._read_response(conn, self.max_replacement)
            if response.status != 100 or ending == PREVIEW_EOF:
                if response.status == 100:
                    raise _Failure("protocol", f"{self.name}: 100 Continue after ieof")
                return response  # §4.5: 204 or 200 after the preview; the rest is not wanted
            await self._send_rest(conn, rest, body, body_done)
            return await self._read_response(conn, self.max_replacement)
        await conn.stream.send_all(head)
        await self._send_rest(conn, first, body, body_done)
        return await self._read_response(conn, self.max_replacement)

    async def _send_rest(
        self, conn: _Connection, pending: bytes, body: AsyncIterator[bytes], body_done: bool
    ) -> None:
        # The body is sent whole before the answer is read: servers (c-icap among them) answer
        # a non-preview request only after its last chunk.
        buffered = bytearray(pending)  # small pieces go out together, as one chunk
        if not body_done:
            async for chunk in body:
                buffered += chunk
                if len(buffered) >= _SEND:
                    await conn.stream.send_all(encode_chunk(bytes(buffered)))
                    buffered.clear()
        await conn.stream.send_all(encode_chunk(bytes(buffered)) + LAST_CHUNK)

    def _verdict(self, response: IcapResponse) -> ScanVerdict:
        if response.status == 204:  # RFC 3507 §4.6: unmodified
            return Clean(scanner=self.name)
        if response.status != 200:
            return ScanFailed(
                scanner=self.name,
                reason="engine_error",
                detail=f"{self.name} answered ICAP {response.status} {response.reason!r}",
            )
        threat = threat_of(response.headers) or threat_of(response.http_headers)
        if threat is not None:
            return Infected(scanner=self.name, threat=threat)
        if response.http_status is not None:
            return Replaced(
                scanner=self.name,
                status=response.http_status,
                reason=response.http_reason,
                headers=response.http_headers,
                body=response.body,
            )
        return ScanFailed(
            scanner=self.name,
            reason="unsupported",
            detail=f"{self.name} modified the request itself; only responses can be replaced",
        )


def _unframed(headers: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...]:
    """The fields without framing ones: the server gets the decoded body, chunked."""
    return tuple((k, v) for k, v in headers if k.lower() not in _FRAMING)
