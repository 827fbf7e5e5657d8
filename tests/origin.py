"""A small real HTTPS origin server for relay tests (trio + stdlib ssl + h11).

Routes: ``/`` (hello), ``/size/N`` (N bytes, Content-Length), ``/chunked/N`` (N bytes chunked),
``/echo`` (POST: the body back), ``/hsts`` (with Strict-Transport-Security; ``/hsts0`` with
max-age=0), ``/eicar`` (the EICAR test string), ``/ws`` (101 to the protocol asked for, then a
raw echo), ``/headers`` (the request headers as text), ``/slow`` (answers after 0.3 s),
``/keep-alive/N`` (hello, announcing ``Keep-Alive: timeout=N``).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h11
import trio
from pki import Issued

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def server_ssl_context(
    leaf: Issued,
    tmp: Path,
    *,
    alpn: Sequence[str] = ("http/1.1",),
) -> ssl.SSLContext:
    """A stdlib server context presenting ``leaf`` (and its chain)."""
    cert_path, key_path = leaf.write(tmp, f"origin-{id(leaf)}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


@dataclass
class OriginStats:
    connections: int = 0
    resumed: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    headers: list[list[tuple[bytes, bytes]]] = field(default_factory=list)


async def send_events(conn: h11.Connection, stream: trio.abc.Stream, *events: object) -> None:
    """Serialise ``events`` with ``conn`` and send them in one write (as nginx does)."""
    data = b"".join(conn.send(event) or b"" for event in events)  # type: ignore[arg-type]
    if data:
        await stream.send_all(data)


async def read_request(
    conn: h11.Connection, stream: trio.abc.Stream
) -> tuple[h11.Request, bytes] | None:
    """The next whole request (head and body), or ``None`` when the peer closed or broke."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        else:
            return None


async def serve_http(stream: trio.abc.Stream, stats: OriginStats) -> None:
    """Serve HTTP/1.1 on an already-decrypted stream until the peer closes."""
    conn = h11.Connection(h11.SERVER)
    while True:
        received = await read_request(conn, stream)
        if received is None:
            return
        request, body = received
        stats.requests.append((bytes(request.method), bytes(request.target)))
        stats.headers.append([(bytes(k), bytes(v)) for k, v in request.headers])
        target = bytes(request.target)
        headers: list[tuple[bytes, bytes]] = [(b"content-type", b"text/plain")]
        upgrade = next((v for k, v in request.headers if k == b"upgrade"), None)
        if target == b"/ws" and upgrade is not None:
            await send_events(
                conn,
                stream,
                h11.InformationalResponse(
                    status_code=101,
                    headers=[(b"upgrade", bytes(upgrade)), (b"connection", b"upgrade")],
                ),
            )
            pending, _ = conn.trailing_data
            if pending:
                await stream.send_all(pending)
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                await stream.send_all(data)
        if target.startswith(b"/size/"):
            payload = b"x" * int(target[6:])
        elif target.startswith(b"/chunked/"):
            size = int(target[9:])
            await send_events(conn, stream, h11.Response(status_code=200, headers=headers))
            sent = 0
            while sent < size:
                n = min(65536, size - sent)
                await send_events(conn, stream, h11.Data(data=b"y" * n))
                sent += n
            await send_events(conn, stream, h11.EndOfMessage())
            conn.start_next_cycle()
            continue
        elif target == b"/echo":
            payload = bytes(body)
        elif target == b"/hsts0":
            payload = b"hsts0"
            headers.append((b"strict-transport-security", b"max-age=0"))
        elif target == b"/hsts":
            payload = b"hsts"
            headers.append((b"strict-transport-security", b"max-age=1000; includeSubDomains"))
        elif target == b"/eicar":
            payload = b"virus: " + EICAR
        elif target == b"/headers":
            payload = b"\n".join(k + b": " + v for k, v in request.headers)
        elif target == b"/stall":
            # Promise a body, send part of it, then stall.
            await send_events(
                conn,
                stream,
                h11.Response(status_code=200, headers=[*headers, (b"content-length", b"1000")]),
            )
            await send_events(conn, stream, h11.Data(data=b"z" * 10))
            await trio.sleep(60)
            return
        elif target.startswith(b"/keep-alive/"):
            payload = b"hello from origin"
            headers.append((b"keep-alive", b"timeout=" + target.rsplit(b"/", 1)[1]))
        elif target == b"/slow":
            await trio.sleep(0.3)
            payload = b"slow"
        else:
            payload = b"hello from origin"
        headers.append((b"content-length", str(len(payload)).encode()))
        await send_events(
            conn,
            stream,
            h11.Response(status_code=200, headers=headers),
            h11.Data(data=payload),
            h11.EndOfMessage(),
        )
        if conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


async def serve_tls(stream: trio.abc.Stream, context: ssl.SSLContext, stats: OriginStats) -> None:
    """TLS-terminate ``stream`` with ``context`` and serve HTTP on it."""
    stats.connections += 1
    tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
    try:
        await tls.do_handshake()
        if tls.session_reused:
            stats.resumed += 1
        await serve_http(tls, stats)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(tls)
