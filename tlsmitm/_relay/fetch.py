"""A small HTTP/1.1 client for AIA, OCSP and CRL fetching (plain HTTP, bounded, timed)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable

import h11
import trio

from .._errors import UpstreamError

__all__ = ["fetch_http"]

_RECEIVE_SIZE = 128 * 1024

Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]


async def fetch_http(
    url: str,
    body: bytes | None,
    *,
    connect: Connector,
    max_bytes: int = 1 << 20,
    seconds: float = 5.0,
) -> bytes:
    """GET ``url`` (or POST ``body`` as an OCSP request) over plain HTTP; return the body.

    Only ``http://`` URLs are fetched (AIA, OCSP and CRL URLs are plain HTTP by design, RFC 5280
    §4.2.2.1; their content is signed). Raises :class:`UpstreamError` on any failure, on a
    non-200 status, on a body over ``max_bytes`` and after ``seconds`` seconds.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise UpstreamError(f"not fetching {url!r}: only http:// URLs", reason="fetch_refused")
    host = parts.hostname
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = [(b"host", parts.netloc.encode("ascii", "replace")), (b"connection", b"close")]
    if body is not None:
        headers += [
            (b"content-type", b"application/ocsp-request"),
            (b"content-length", str(len(body)).encode()),
        ]
    with trio.move_on_after(seconds) as scope:
        try:
            stream = await connect(host, port)
        except OSError as exc:
            raise UpstreamError(f"fetching {url}: {exc}", reason="fetch_failed") from exc
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            method = b"POST" if body is not None else b"GET"
            data = conn.send(h11.Request(method=method, target=target, headers=headers))
            if body is not None:
                data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
            data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
            await stream.send_all(data)
            out = bytearray()
            status = 0
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    raise UpstreamError(f"fetching {url}: {exc}", reason="fetch_failed") from exc
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(_RECEIVE_SIZE)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    out += event.data
                    if len(out) > max_bytes:
                        raise UpstreamError(
                            f"fetching {url}: over {max_bytes} bytes", reason="fetch_too_large"
                        )
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if status != 200:
                raise UpstreamError(f"fetching {url}: HTTP {status}", reason="fetch_failed")
            return bytes(out)
    assert scope.cancelled_caught
    raise UpstreamError(f"fetching {url}: timed out after {seconds} s", reason="fetch_timeout")
