"""HTTP/2 through tlsmitm, against tlsmitm's own HTTP/1.1 in the same run.

One ``tlsmitm serve`` (one worker) in front of nginx speaking ``h2`` and ``http/1.1``:

* requests/s over HTTP/2: 1 connection x 100 concurrent streams, and 16 connections x 10
  streams (a small body each), against HTTP/1.1 keep-alive over 16 connections;
* bulk download and upload MB/s over HTTP/2 against HTTP/1.1 (one connection, one transfer),
  with the proxy's peak RSS.

The HTTP/2 client is Python (``h2`` under trio, in this process): it costs about as much CPU
per request as the proxy's HTTP/2 side, so on a small machine the request rates say as much
about the client as about tlsmitm; the ratios between protocols are the figures to read.

For the bulk transfers the client is made a cheap load generator, so that the figure measures
the proxy and not the client sharing its cores: it advertises large windows (16 MiB per stream,
1 GiB per connection) and a 1 MiB SETTINGS_MAX_FRAME_SIZE (the proxy may send its DATA in few,
large frames), it acknowledges what one read delivered with one WINDOW_UPDATE pair instead
of one per frame, and its TLS decrypts all that one socket read brought at once (``_Tls``).
"""

from __future__ import annotations

import datetime as dt
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

from ._client import Target, keepalive_rate, transfer
from ._measure import component_main
from ._origin import NginxOrigin
from ._pki import make_pki
from ._proc import RssSampler, descendants
from .bench_scan import _proxy

BULK = 64 * 2**20
NAME = "bench.test"
_STREAM_WINDOW = 2**24  # the client's windows and frame size: see the module's docstring
_CONNECTION_WINDOW = 2**30
_MAX_FRAME = 2**20


class _Tls:
    """TLS over a trio socket through :class:`ssl.MemoryBIO`: each receive decrypts everything
    one socket read brought (``trio.SSLStream`` returns one TLS record, 16 KiB at most, per
    ``receive_some``: for a bulk download, one pass through the client's h2 per record)."""

    def __init__(self, tcp: trio.SocketStream, context: ssl.SSLContext, name: str) -> None:
        self.tcp = tcp
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_hostname=name)

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self.tcp.send_all(data)

    async def _fill(self) -> bool:
        data = await self.tcp.receive_some(2**20)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def do_handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise RuntimeError("the proxy closed during the TLS handshake") from None
            else:
                await self._flush()
                return

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    async def send_all(self, data: bytes) -> None:
        self._ssl.write(data)  # (into a memory BIO: always whole)
        await self._flush()

    async def receive_some(self, max_bytes: int = 2**20) -> bytes:
        """What one socket read decrypts to (``b""`` at the end)."""
        chunks: list[bytes] = []
        while True:
            try:
                while piece := self._ssl.read(max_bytes):
                    chunks.append(piece)
                return b"".join(chunks)  # (close_notify)
            except ssl.SSLWantReadError:
                if chunks:
                    return b"".join(chunks)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b"".join(chunks)
            if not await self._fill():
                continue  # the end: the next read says so

    async def aclose(self) -> None:
        await self.tcp.aclose()


Opened = tuple[_Tls, h2.connection.H2Connection]


async def _open(target: Target) -> Opened:
    tcp = await trio.open_tcp_stream(*target.address)
    authority = f"{NAME}:{target.port}".encode()
    await tcp.send_all(b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await tcp.receive_some(4096)
        if not chunk:
            raise RuntimeError("the proxy closed during CONNECT")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"CONNECT refused: {head[:60]!r}")
    context = ssl.create_default_context(cafile=target.cafile)
    context.set_alpn_protocols(["h2"])
    tls = _Tls(tcp, context, NAME)
    await tls.do_handshake()
    if tls.selected_alpn_protocol() != "h2":
        raise RuntimeError(f"ALPN {tls.selected_alpn_protocol()}, not h2")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    codes = h2.settings.SettingCodes
    conn.local_settings = h2.settings.Settings(
        client=True,
        initial_values={
            codes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
            codes.MAX_FRAME_SIZE: _MAX_FRAME,
            codes.ENABLE_PUSH: 0,
        },
    )
    conn.max_inbound_frame_size = _MAX_FRAME
    conn.initiate_connection()
    conn.increment_flow_control_window(_CONNECTION_WINDOW - 65_535)
    await tls.send_all(conn.data_to_send())
    return tls, conn


def _request(conn: h2.connection.H2Connection, target: Target, path: str, **kw: object) -> int:
    sid = conn.get_next_available_stream_id()
    headers = [
        (":method", str(kw.get("method", "GET"))),
        (":scheme", "https"),
        (":authority", f"{NAME}:{target.port}"),
        (":path", path),
    ]
    conn.send_headers(sid, headers, end_stream=not kw.get("body"))
    return sid


async def _exchanges(
    opened: Opened, target: Target, streams: int, deadline: float, done: list[int]
) -> None:
    """Keep ``streams`` requests in flight on one connection until ``deadline`` (or, with a
    deadline in the past, until the first ``streams`` answers arrived)."""
    tls, conn = opened
    for _ in range(streams):
        _request(conn, target, "/small")
    await tls.send_all(conn.data_to_send())
    answered = 0
    while time.monotonic() < deadline or answered < streams:
        data = await tls.receive_some(65536)
        if not data:
            raise RuntimeError("the proxy closed the connection")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                answered += 1
                if time.monotonic() < deadline:
                    done[0] += 1
                    _request(conn, target, "/small")
            elif isinstance(event, h2.events.StreamReset):
                raise RuntimeError(f"stream reset {event.error_code}")
        out = conn.data_to_send()
        if out:
            await tls.send_all(out)


async def _rate(target: Target, connections: int, streams: int, seconds: float) -> float:
    """Requests/s once every connection is open and has answered once (connection setup is
    what the setup benchmarks measure, not this one)."""
    opened: list[Opened] = []
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(connections):

                async def one() -> None:
                    pair = await _open(target)
                    opened.append(pair)
                    await _exchanges(pair, target, 1, 0.0, [0])

                nursery.start_soon(one)
        done = [0]
        started = time.monotonic()
        deadline = started + seconds
        async with trio.open_nursery() as nursery:
            for pair in opened:
                nursery.start_soon(_exchanges, pair, target, streams, deadline, done)
        return done[0] / (time.monotonic() - started)
    finally:
        for tls, _ in opened:
            await trio.aclose_forcefully(tls)


async def _bulk(target: Target, direction: str, size: int) -> float:
    tls, conn = await _open(target)
    try:
        started = time.monotonic()
        if direction == "download":
            sid = _request(conn, target, f"/big/{size}")
        else:
            sid = _request(conn, target, f"/upload/h2-{size}", method="PUT", body=True)
        await tls.send_all(conn.data_to_send())
        sent = 0
        block = b"u" * 65536
        received = 0
        ended = False
        while not ended:
            if direction == "upload" and sent < size:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                while window > 0 and sent < size:
                    piece = block[: min(window, size - sent)]
                    conn.send_data(sid, piece, end_stream=sent + len(piece) == size)
                    sent += len(piece)
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                await tls.send_all(conn.data_to_send())
            data = await tls.receive_some(2**20)
            if not data:
                raise RuntimeError("the proxy closed the connection")
            taken = 0
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data)
                    taken += event.flow_controlled_length
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
                elif isinstance(event, h2.events.StreamReset):
                    raise RuntimeError(f"stream reset {event.error_code}")
            if taken and not ended:  # one acknowledgement per read, not one per frame
                conn.acknowledge_received_data(taken, sid)
            out = conn.data_to_send()
            if out:
                await tls.send_all(out)
        if direction == "download" and received != size:
            raise RuntimeError(f"received {received} of {size} bytes")
        return size / (time.monotonic() - started) / 1e6
    finally:
        await trio.aclose_forcefully(tls)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldH2:
    """What :func:`hold_idle` saw.

    Attributes:
        opened: connections that answered their first request over HTTP/2.
        answered: held connections that answered once more after the measurement.
        open_seconds: how long opening them took.
        errors: failures while opening, by kind.
    """

    opened: int
    answered: int
    open_seconds: float
    errors: dict[str, int]


def _count(errors: dict[str, int], exc: Exception) -> None:
    kind = f"{type(exc).__name__}: {str(exc)[:80]}"
    errors[kind] = errors.get(kind, 0) + 1


async def _hold_idle(
    target: Target, count: int, open_seconds: float, while_held: Callable[[], None]
) -> HeldH2:
    opened: list[Opened] = []
    errors: dict[str, int] = {}
    limiter = trio.CapacityLimiter(32)
    started = time.monotonic()

    async def open_one() -> None:
        async with limiter:
            try:
                pair = await _open(target)
            except (OSError, RuntimeError, trio.BrokenResourceError) as exc:
                _count(errors, exc)
                return
            try:
                await _exchanges(pair, target, 1, 0.0, [0])
            except (OSError, RuntimeError, trio.BrokenResourceError) as exc:
                _count(errors, exc)
                await trio.aclose_forcefully(pair[0])
                return
            opened.append(pair)

    answered = [0]

    async def ask_again(pair: Opened) -> None:
        with trio.move_on_after(30):
            try:
                await _exchanges(pair, target, 1, 0.0, [0])
            except (OSError, RuntimeError, trio.BrokenResourceError):
                return
            answered[0] += 1

    try:
        with trio.move_on_after(open_seconds):
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(open_one)
        took = time.monotonic() - started
        await trio.sleep(0.5)  # the proxy settles: every connection idle
        await trio.to_thread.run_sync(while_held)
        async with trio.open_nursery() as nursery:
            for pair in opened:
                nursery.start_soon(ask_again, pair)
    finally:
        for tls, _ in opened:
            await trio.aclose_forcefully(tls)
    return HeldH2(opened=len(opened), answered=answered[0], open_seconds=took, errors=errors)


def hold_idle(
    target: Target, *, count: int, open_seconds: float, while_held: Callable[[], None]
) -> HeldH2:
    """Open ``count`` intercepted HTTP/2 connections (one request each) and hold them idle.

    ``while_held`` runs once they are all open and idle (measure memory there); then every
    held connection asks once more and the answers are counted; then all are closed.
    """
    return trio.run(_hold_idle, target, count, open_seconds, while_held)


def rate(target: Target, *, connections: int, streams: int, seconds: float) -> float:
    """HTTP/2 requests/s over ``connections`` connections, ``streams`` in flight on each."""
    return trio.run(_rate, target, connections, streams, seconds)


def bulk(target: Target, *, direction: str, size: int) -> float:
    """MB/s of one HTTP/2 download or upload of ``size`` bytes on one connection."""
    return trio.run(_bulk, target, direction, size)


def run(seconds: float = 2.0) -> dict[str, float]:
    """Measure; ``seconds`` per request-rate figure."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tlsmitm-bench-h2-") as scratch:
        work = Path(scratch)
        pki = make_pki(work, now=dt.datetime.now(dt.UTC))
        origin = NginxOrigin.start(pki, big_sizes=(BULK,), http2=True)
        try:
            with _proxy(work, origin.port, pki.root_pem, []) as (target, pid):
                trio.run(_rate, target, 1, 10, 0.5)  # warm: the name's leaf and upstream
                figures["h2_c1x100_req_s"] = trio.run(_rate, target, 1, 100, seconds)
                figures["h2_c16x10_req_s"] = trio.run(_rate, target, 16, 10, seconds)
                figures["h1_c16_req_s"] = keepalive_rate(
                    target, name=NAME, seconds=seconds, connections=16
                )
                for direction in ("download", "upload"):
                    with RssSampler(descendants(pid)) as sampler:
                        figures[f"h2_{direction}_mb_s"] = trio.run(_bulk, target, direction, BULK)
                    figures[f"h2_{direction}_peak_rss_mib"] = sampler.peak / 2**20
                    with RssSampler(descendants(pid)) as sampler:
                        result = transfer(
                            target, name=NAME, direction=direction, size=BULK, timeout=300
                        )
                    if result.error is not None:
                        raise RuntimeError(f"HTTP/1.1 {direction}: {result.error}")
                    figures[f"h1_{direction}_mb_s"] = result.megabytes_per_second
                    figures[f"h1_{direction}_peak_rss_mib"] = sampler.peak / 2**20
        finally:
            origin.stop()
    figures["h2_c16x10_over_h1_c16"] = figures["h2_c16x10_req_s"] / figures["h1_c16_req_s"]
    for direction in ("download", "upload"):
        figures[f"h2_over_h1_{direction}"] = (
            figures[f"h2_{direction}_mb_s"] / figures[f"h1_{direction}_mb_s"]
        )
    return figures


__all__ = ["HeldH2", "bulk", "hold_idle", "rate", "run"]

if __name__ == "__main__":
    sys.exit(component_main(run, sys.argv[1:]))
