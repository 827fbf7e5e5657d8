"""The clamd client: :class:`ClamdScanner`, ``INSTREAM`` over a Unix socket or TCP.

clamd's protocol (clamd(8)): a command prefixed with ``z`` is ended by a NUL byte, and so is its
reply. ``zINSTREAM\\0`` is followed by chunks, each a 4-byte big-endian length and the bytes, and
a zero-length chunk ends the stream; the reply is ``stream: OK``, ``stream: NAME FOUND`` or
``... ERROR``. clamd refuses a stream longer than its ``StreamMaxLength`` (25 MiB by default)
with ``INSTREAM size limit exceeded. ERROR`` and closes the connection: tlsmitm knows that length
and does not start a body it already knows to be longer, and it reads either case as
"could not scan", never as clean.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import trio

from .._errors import UpstreamError
from ._model import Clean, Infected, ScanContext, ScanFailed, Scanner, ScanVerdict

__all__ = ["ClamdScanner", "instream_chunk", "parse_reply"]

DEFAULT_STREAM_MAX_LENGTH = 25 * 1024 * 1024  # clamd.conf(5) StreamMaxLength default
_CHUNK = 256 * 1024  # fewer, larger chunks: clamd spends per chunk (measured: 64 KiB ~1.6x slower)
_MAX_REPLY = 4096
_DIRECT = 64 * 1024  # pieces at least this large are sent without being gathered


def instream_chunk(data: bytes) -> bytes:
    """One ``INSTREAM`` chunk: the length as 4 bytes in network order, then the bytes."""
    return struct.pack(">I", len(data)) + data


def parse_reply(reply: bytes) -> tuple[str, str]:
    """``("ok", "")``, ``("found", threat)``, ``("too_large", text)`` or ``("error", text)``."""
    text = reply.rstrip(b"\0").strip().decode("utf-8", "replace")
    _, sep, result = text.partition(": ")
    if not sep:
        result = text
    if result == "OK":
        return "ok", ""
    if result.endswith(" FOUND"):
        return "found", result[: -len(" FOUND")].strip() or "unknown threat"
    if "size limit exceeded" in text:
        return "too_large", text
    return "error", text or "empty reply"


class ClamdScanner(Scanner):
    """Scans bodies with clamd's ``INSTREAM``.

    Give ``socket_path`` (a Unix socket) or ``host`` and ``port`` (TCP).

    Args:
        socket_path: clamd's ``LocalSocket``.
        host: clamd's ``TCPAddr``.
        port: clamd's ``TCPSocket``.
        stream_max_length: clamd's ``StreamMaxLength``: a longer body is not sent
            (:class:`ScanFailed` ``"too_large"``).
        chunk_size: bytes per ``INSTREAM`` chunk.
        connect_timeout: seconds to connect.
    """

    def __init__(
        self,
        *,
        socket_path: str | None = None,
        host: str | None = None,
        port: int | None = None,
        stream_max_length: int = DEFAULT_STREAM_MAX_LENGTH,
        chunk_size: int = _CHUNK,
        connect_timeout: float = 5.0,
    ) -> None:
        if (socket_path is None) == (host is None or port is None):
            raise ValueError("ClamdScanner needs socket_path, or host and port")
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.stream_max_length = stream_max_length
        self.chunk_size = chunk_size
        self.connect_timeout = connect_timeout
        self.name = f"clamd://{host}:{port}" if socket_path is None else f"clamd://{socket_path}"
        self.version: str | None = None

    async def _connect(self) -> trio.abc.Stream:
        with trio.move_on_after(self.connect_timeout):
            try:
                if self.socket_path is not None:
                    return await trio.open_unix_socket(self.socket_path)
                assert self.host is not None
                assert self.port is not None
                return await trio.open_tcp_stream(self.host, self.port)
            except OSError as exc:
                raise UpstreamError(f"{self.name}: {exc}", reason="unreachable") from exc
        raise UpstreamError(
            f"{self.name}: no connection in {self.connect_timeout} s", reason="unreachable"
        )

    async def _command(self, command: bytes) -> bytes:
        stream = await self._connect()
        async with stream:
            await stream.send_all(b"z" + command + b"\0")
            return await _read_reply(stream)

    async def open(self) -> None:
        """``PING`` (the daemon answers ``PONG``) and ``VERSION``."""
        try:
            pong = await self._command(b"PING")
            if pong.rstrip(b"\0").strip() != b"PONG":
                raise UpstreamError(f"{self.name}: PING answered {pong!r}", reason="protocol")
            self.version = (
                (await self._command(b"VERSION")).rstrip(b"\0").decode("utf-8", "replace")
            )
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamError(f"{self.name}: {exc}", reason="unreachable") from exc

    async def scan(self, context: ScanContext, body: AsyncIterator[bytes]) -> ScanVerdict:
        """Stream ``body`` to clamd and read its verdict."""
        try:
            stream = await self._connect()
        except UpstreamError as exc:
            return ScanFailed(scanner=self.name, reason="unreachable", detail=str(exc))
        sent = 0
        async with stream:
            try:
                await stream.send_all(b"zINSTREAM\0")
                pending = bytearray()  # small pieces are sent together, up to chunk_size
                async for data in body:
                    sent += len(data)
                    if sent > self.stream_max_length:
                        return ScanFailed(
                            scanner=self.name,
                            reason="too_large",
                            detail=f"body over clamd's StreamMaxLength "
                            f"({self.stream_max_length} bytes)",
                        )
                    if not pending and len(data) >= _DIRECT:
                        # A large piece goes as it is: length, then the bytes (no copy).
                        for start in range(0, len(data), self.chunk_size):
                            piece = data[start : start + self.chunk_size]
                            await stream.send_all(struct.pack(">I", len(piece)))
                            await stream.send_all(piece)
                        continue
                    pending += data
                    while len(pending) >= self.chunk_size:
                        await stream.send_all(instream_chunk(bytes(pending[: self.chunk_size])))
                        del pending[: self.chunk_size]
                await stream.send_all(
                    instream_chunk(bytes(pending)) + instream_chunk(b"")
                    if pending
                    else instream_chunk(b"")
                )
            except (OSError, trio.BrokenResourceError):
                pass  # clamd may have refused and closed: its reply says why
            try:
                reply = await _read_reply(stream)
            except (OSError, trio.BrokenResourceError, UpstreamError) as exc:
                return ScanFailed(scanner=self.name, reason="connection_lost", detail=str(exc))
        kind, detail = parse_reply(reply)
        if kind == "ok":
            return Clean(scanner=self.name)
        if kind == "found":
            return Infected(scanner=self.name, threat=detail)
        reason = "too_large" if kind == "too_large" else "engine_error"
        return ScanFailed(scanner=self.name, reason=reason, detail=f"{self.name}: {detail}")


async def _read_reply(stream: trio.abc.Stream) -> bytes:
    reply = bytearray()
    while not reply.endswith(b"\0"):
        data = await stream.receive_some(_MAX_REPLY)
        if not data:
            if reply:
                break
            raise UpstreamError("clamd closed without a reply", reason="connection_lost")
        reply += data
        if len(reply) > _MAX_REPLY:
            raise UpstreamError("clamd reply too long", reason="protocol")
    return bytes(reply)
