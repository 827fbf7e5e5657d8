"""HTTP/2 peers written with ``h2`` directly, for the relay's tests: a client (well-behaved or
hostile: it can stop acknowledging data, reset, flood) and a small origin with a few routes.

Both run over any ``trio.abc.Stream`` (socket pairs, TLS streams).
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from hyperframe.frame import GoAwayFrame
from origin import EICAR

from tlsmitm._relay.h2 import _GracefulGoaway

Headers = list[tuple[bytes, bytes]]


@dataclass
class Exchange:
    """What one stream received."""

    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: Headers = field(default_factory=list)
    informational: list[int] = field(default_factory=list)
    reset: int | None = None
    ended: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    request_headers: Headers = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class H2Peer:
    """One end of an HTTP/2 connection.

    Args:
        stream: the transport.
        client: client role (else server role, answering with ``handler``).
        auto_ack: acknowledge received DATA at once (``False``: the window stays closed until
            :meth:`ack_all`, a client that stops reading).
        handler: the server role's request handler ``(peer, stream_id, exchange)``.
        settings: SETTINGS to send in the preface.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client: bool = True,
        auto_ack: bool = True,
        handler: Callable[[H2Peer, int, Exchange], Awaitable[None]] | None = None,
        settings: dict[int, int] | None = None,
    ) -> None:
        config = h2.config.H2Configuration(client_side=client, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        if client:
            # Streams up to a graceful GOAWAY's last stream id still complete (RFC 9113 §6.8).
            self.conn.state_machine = _GracefulGoaway()
        if settings:
            self.conn.local_settings = h2.settings.Settings(
                client=client,
                initial_values={h2.settings.SettingCodes(k): v for k, v in settings.items()},
            )
        self.stream = stream
        self.auto_ack = auto_ack
        self.handler = handler
        self.exchanges: dict[int, Exchange] = {}
        self.unacked: dict[int, int] = {}
        self.received = 0
        self.sent = 0
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.error: h2.exceptions.ProtocolError | None = None
        self.closed = trio.Event()
        self._windows = trio.lowlevel.ParkingLot()
        self._lock = trio.Lock()
        self.remote_settings_seen = trio.Event()
        self.conn.initiate_connection()  # the preface goes out first, whoever flushes

    async def flush(self) -> None:
        async with self._lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def send_raw(self, data: bytes) -> None:
        """Write frames built by hand (hostile tests), after what h2 has queued."""
        await self.flush()
        async with self._lock:
            await self.stream.send_all(data)

    async def run(self) -> None:
        """Read until the connection ends (EOF, GOAWAY or a broken transport)."""
        await self.flush()
        try:
            writable = True
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        data = await self.stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    if not data:
                        break
                    self.received += len(data)
                    try:
                        events = self.conn.receive_data(data)
                    except h2.exceptions.ProtocolError as exc:
                        self.error = exc
                        break
                    for event in events:
                        self._on_event(event, nursery)
                    if writable:
                        try:
                            await self.flush()
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            # The peer stopped reading (a flood answered with GOAWAY, say);
                            # what it sent before closing, the GOAWAY, may still be unread.
                            writable = False
                nursery.cancel_scope.cancel()
        finally:
            for exchange in self.exchanges.values():
                exchange.done.set()
            self.closed.set()

    async def _handle(self, stream_id: int, ex: Exchange) -> None:
        assert self.handler is not None
        try:
            await self.handler(self, stream_id, ex)
        except (
            h2.exceptions.ProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ):
            return  # reset or closed by the peer meanwhile

    def _on_event(self, event: h2.events.Event, nursery: trio.Nursery) -> None:
        sid = getattr(event, "stream_id", None)
        ex = self.exchanges.get(sid) if sid else None
        if isinstance(event, h2.events.RequestReceived):
            ex = self.exchanges[event.stream_id] = Exchange(request_headers=list(event.headers))
            ex.ended = event.stream_ended is not None
            if self.handler is not None:
                nursery.start_soon(self._handle, event.stream_id, ex)
        elif isinstance(event, h2.events.ResponseReceived) and ex is not None:
            ex.headers = list(event.headers)
            ex.status = int(dict(event.headers)[b":status"])
        elif isinstance(event, h2.events.InformationalResponseReceived) and ex is not None:
            ex.informational.append(int(dict(event.headers)[b":status"]))
        elif isinstance(event, h2.events.DataReceived):
            if ex is not None:
                ex.body += event.data
            if self.auto_ack or ex is None:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                self.unacked[event.stream_id] = (
                    self.unacked.get(event.stream_id, 0) + event.flow_controlled_length
                )
        elif isinstance(event, h2.events.TrailersReceived) and ex is not None:
            ex.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded) and ex is not None:
            ex.ended = True
            if self.conn.config.client_side:
                ex.done.set()
        elif isinstance(event, h2.events.StreamReset):
            self._windows.unpark_all()
            if ex is not None:
                ex.reset = event.error_code
                ex.done.set()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._windows.unpark_all()
            if isinstance(event, h2.events.RemoteSettingsChanged):
                self.remote_settings_seen.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event
            last = event.last_stream_id or 0
            for sid_, exchange in self.exchanges.items():
                if event.error_code or sid_ > last:
                    exchange.done.set()

    def ack_all(self) -> None:
        for sid, size in self.unacked.items():
            self.conn.acknowledge_received_data(size, sid)
        self.unacked.clear()

    async def send_body(self, stream_id: int, body: bytes, *, end: bool = True) -> None:
        view = memoryview(body)
        while view:
            window = self.conn.local_flow_control_window(stream_id)
            if window <= 0:
                await self._windows.park()
                continue
            size = min(window, self.conn.max_outbound_frame_size, len(view))
            self.conn.send_data(stream_id, bytes(view[:size]))
            self.sent += size
            view = view[size:]
            await self.flush()
        if end:
            self.conn.end_stream(stream_id)
            await self.flush()

    async def request(
        self,
        path: bytes,
        *,
        method: bytes = b"GET",
        authority: bytes = b"www.example.test",
        body: bytes | None = None,
        headers: Headers | None = None,
        wait: bool = True,
    ) -> tuple[int, Exchange]:
        """Send a request; returns its stream and (when ``wait``) the finished exchange."""
        sid = self.conn.get_next_available_stream_id()
        ex = self.exchanges[sid] = Exchange()
        head = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", authority),
            (b":path", path),
            *(headers or []),
        ]
        self.conn.send_headers(sid, head, end_stream=body is None)
        await self.flush()
        if body is not None:
            await self.send_body(sid, body)
        if wait:
            await ex.done.wait()
        return sid, ex

    async def respond(
        self,
        stream_id: int,
        status: int,
        body: bytes = b"",
        *,
        headers: Headers | None = None,
        trailers: Headers | None = None,
    ) -> None:
        head = [(b":status", str(status).encode()), *(headers or [])]
        self.conn.send_headers(stream_id, head, end_stream=not body and not trailers)
        await self.flush()
        if body:
            await self.send_body(stream_id, body, end=not trailers)
        if trailers:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
            await self.flush()


async def read_request_body(peer: H2Peer, ex: Exchange) -> None:
    """Wait until the request's body has fully arrived at ``peer`` (server role)."""
    while not ex.ended and ex.reset is None and not peer.closed.is_set():
        await trio.sleep(0.005)


def pattern(size: int) -> bytes:
    """``size`` bytes that are not all alike (so reordering or loss shows)."""
    block = hashlib.sha256(b"tlsmitm").digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


async def origin_handler(peer: H2Peer, stream_id: int, ex: Exchange) -> None:
    """The test origin's routes (h2):

    ``/`` hello; ``/echo`` the request body back, with gRPC-like trailers; ``/big/N`` N bytes;
    ``/sts`` a Strict-Transport-Security header; ``/reset`` RST_STREAM; ``/cookies`` the
    cookie headers it got.
    """
    path = dict(ex.request_headers).get(b":path", b"/")
    if path == b"/echo":
        await read_request_body(peer, ex)
        await peer.respond(
            stream_id,
            200,
            bytes(ex.body),
            headers=[(b"content-type", b"application/octet-stream")],
            trailers=[(b"grpc-status", b"0")],
        )
    elif path.startswith(b"/big/"):
        # Generated as it is sent: the origin itself holds no more than a block.
        size = int(path[5:])
        length = [(b"content-length", b"%d" % size)]
        peer.conn.send_headers(stream_id, [(b":status", b"200"), *length], end_stream=not size)
        await peer.flush()
        block = pattern(1 << 16)
        for offset in range(0, size, len(block)):
            chunk = block[: min(len(block), size - offset)]
            await peer.send_body(stream_id, chunk, end=offset + len(chunk) >= size)
    elif path == b"/eicar":  # a download: Content-Disposition attachment
        attachment = [(b"content-disposition", b'attachment; filename="eicar.txt"')]
        await peer.respond(stream_id, 200, b"virus: " + EICAR, headers=attachment)
    elif path == b"/page":
        page = b"<!doctype html><title>h2 page</title><p id=hello>hello over h2</p>"
        await peer.respond(stream_id, 200, page, headers=[(b"content-type", b"text/html")])
    elif path == b"/sts":
        await peer.respond(
            stream_id, 200, b"sts", headers=[(b"strict-transport-security", b"max-age=600")]
        )
    elif path == b"/reset":
        peer.conn.reset_stream(stream_id, 8)
        await peer.flush()
    elif path == b"/goaway":
        # A graceful GOAWAY in the middle of this response: it still completes.
        peer.conn.send_headers(stream_id, [(b":status", b"200")])
        frame = GoAwayFrame(0)
        frame.last_stream_id = stream_id
        await peer.send_raw(frame.serialize())
        await peer.send_body(stream_id, pattern(200_000))
    elif path == b"/hold":
        await trio.sleep_forever()  # an answer that takes its time
    elif path == b"/cookies":
        cookies = b"|".join(v for k, v in ex.request_headers if k == b"cookie")
        await peer.respond(stream_id, 200, cookies)
    else:
        await peer.respond(stream_id, 200, b"hello", headers=[(b"content-type", b"text/plain")])


async def serve_h2_tls(stream: trio.abc.Stream, context: ssl.SSLContext) -> None:
    """A real HTTP/2 origin over TLS (the routes of :func:`origin_handler`) on ``stream``.

    Speaks HTTP/2 when ALPN selected ``h2``, else HTTP/1.1 (``origin.serve_http``).
    """
    from origin import OriginStats, serve_http

    tls = trio.SSLStream(stream, context, server_side=True)
    try:
        await tls.do_handshake()
        if tls.selected_alpn_protocol() == "h2":
            await H2Peer(tls, client=False, handler=origin_handler).run()
        else:
            await serve_http(tls, OriginStats())
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(tls)
