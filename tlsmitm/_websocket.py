"""WebSocket messages, sans-IO: what the 101 exchange agreed, and one hop's frames and messages.

Theory of operation
-------------------
After ``101 Switching Protocols`` tlsmitm stands between two WebSocket connections: it is the
*server* of the client's connection and the *client* of the origin's. Both hops carry exactly
what the client and the origin agreed in the handshake, which tlsmitm relayed unchanged: the
``Sec-WebSocket-Extensions`` of the 101 response is the agreement (RFC 6455 §9.1), so each hop
is set up with the same extension parameters and never re-negotiates anything.
:func:`negotiated_upgrade` reads that agreement; whatever tlsmitm cannot parse frame by frame (an
upgrade to another protocol, an unknown extension, parameters RFC 7692 does not define) is
reported with the reason, and the driver relays that connection byte for byte and logs why.

One :class:`Endpoint` is one hop: a ``wsproto`` frame machine in the right role, a reassembly
buffer that turns fragments into whole messages (RFC 6455 §5.4) under a size limit, and the close
handshake's state on that hop (RFC 6455 §5.5.1, §7). Bytes go in, :data:`Received` items come out;
messages, pings, pongs and closes go in, bytes come out. Whatever a peer sends that breaks the
protocol -- a bad frame, an unmasked client frame (§5.1), text that is not UTF-8 (§8.1), a
compressed control frame -- becomes one :class:`Failure` with the close code to answer it with
(§7.4.1), and the hop receives nothing after it.

permessage-deflate (RFC 7692) is done by :class:`_Deflate`, not by ``wsproto``'s own extension:
it inflates under the message size limit (a few KiB of deflate can inflate to gigabytes), and it
never compresses with a window larger than the peer agreed to accept (zlib cannot deflate with an
8-bit window, so such a hop gets uncompressed messages, which RFC 7692 §6 allows).

No trio, no sockets, no clock. The masking keys of client frames come from ``wsproto`` (RFC 6455
§5.3: ``os.urandom``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits
from wsproto.utilities import LocalProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "CloseIn",
    "DeflateParams",
    "DropMessage",
    "EndOfStream",
    "Endpoint",
    "Failure",
    "MessageIn",
    "PingIn",
    "PongIn",
    "Received",
    "WebSocketClose",
    "WebSocketMessage",
    "WebSocketUpgrade",
    "negotiated_upgrade",
]

#: The default limit on one message, after reassembly and decompression: 16 MiB.
DEFAULT_MAX_MESSAGE: Final = 16 * 1024 * 1024

Headers = tuple[tuple[bytes, bytes], ...]

# RFC 6455 §7.4.1 and §7.4.2: codes an endpoint may put in a Close frame. 1005, 1006 and 1015
# are for reporting only ("MUST NOT be set as a status code in a Close control frame").
_SENDABLE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)
_NO_STATUS = 1005
_MAX_CLOSE_REASON = 123  # RFC 6455 §5.5: a control payload is <= 125 bytes, 2 are the code


# -- what the embedder's hook sees and answers -------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSocketMessage:
    """One whole WebSocket message, reassembled and decompressed.

    Returned from ``Hooks.on_websocket_message`` it replaces the message it was called with
    (text or binary, whichever ``data`` is). A replacement must keep ``from_client``.

    Attributes:
        from_client: ``True`` for client -> server, ``False`` for server -> client.
        data: ``str`` for a text message, ``bytes`` for a binary one.
    """

    from_client: bool
    data: str | bytes

    def __post_init__(self) -> None:
        if not isinstance(self.data, str | bytes):
            raise TypeError(f"WebSocketMessage.data must be str or bytes, not {type(self.data)}")

    @property
    def is_text(self) -> bool:
        """Whether this is a text message (``data`` is ``str``)."""
        return isinstance(self.data, str)


@dataclass(frozen=True, slots=True, kw_only=True)
class DropMessage:
    """A hook's verdict: the message is not delivered; the connection goes on."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSocketClose:
    """A hook's verdict: close the WebSocket on both sides with ``code`` and ``reason``.

    Attributes:
        code: a close code an endpoint may send (RFC 6455 §7.4): 1000-1003, 1007-1014, or an
            application code 3000-4999. 1008 ("policy violation") suits a filter's block.
        reason: a short explanation, at most 123 bytes of UTF-8 (RFC 6455 §5.5).
    """

    code: int = 1008
    reason: str = ""

    def __post_init__(self) -> None:
        if self.code not in _SENDABLE_CODES and not 3000 <= self.code <= 4999:
            raise ValueError(
                f"close code {self.code} may not be sent (RFC 6455 §7.4): use 1000-1003, "
                "1007-1014 or 3000-4999"
            )
        if len(self.reason.encode()) > _MAX_CLOSE_REASON:
            raise ValueError("a close reason is at most 123 bytes of UTF-8 (RFC 6455 §5.5)")


# -- the handshake's agreement -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DeflateParams:
    """The permessage-deflate parameters a 101 response accepted (RFC 7692 §7.1).

    Attributes:
        server_no_context_takeover: the server starts every message with a fresh compressor.
        client_no_context_takeover: the client starts every message with a fresh compressor.
        server_max_window_bits: the largest LZ77 window the server compresses with (8-15).
        client_max_window_bits: the largest LZ77 window the client compresses with (8-15).
    """

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15

    def __post_init__(self) -> None:
        for bits in (self.server_max_window_bits, self.client_max_window_bits):
            if not 8 <= bits <= 15:
                raise ValueError("max_window_bits is 8 to 15 (RFC 7692 §7.1.2)")


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSocketUpgrade:
    """What a ``101 Switching Protocols`` exchange agreed, as far as the relay is concerned.

    Attributes:
        unsupported: why the connection cannot be relayed message by message (another protocol,
            an extension tlsmitm does not implement); ``None`` when it can.
        deflate: the permessage-deflate parameters, or ``None`` when it was not negotiated.
    """

    unsupported: str | None = None
    deflate: DeflateParams | None = None

    @property
    def unsupported_protocol(self) -> bool:
        """Whether the upgrade is to something other than WebSocket."""
        return self.unsupported is not None and self.unsupported.endswith("is not WebSocket")


def _header_values(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def _tokens(headers: Headers, name: bytes) -> list[str]:
    joined = b",".join(_header_values(headers, name)).decode("latin-1")
    return [token.strip().lower() for token in joined.split(",") if token.strip()]


def negotiated_upgrade(request_headers: Headers, response_headers: Headers) -> WebSocketUpgrade:
    """Read the agreement of an upgrade from the request's and the 101 response's headers.

    Args:
        request_headers: the upgrade request as the origin received it.
        response_headers: the origin's ``101`` response.

    Returns:
        The permessage-deflate parameters when it is a WebSocket tlsmitm can parse, or the
        reason it is not.
    """
    offered = _tokens(request_headers, b"upgrade")
    chosen = _tokens(response_headers, b"upgrade")
    # RFC 6455 §4.1 (client requirement 2) and §4.2.2 (5.2): the Upgrade is "websocket".
    if "websocket" not in chosen or "websocket" not in offered:
        protocol = ", ".join(chosen) or "an unnamed protocol"
        return WebSocketUpgrade(unsupported=f"upgrade to {protocol} is not WebSocket")
    extensions = b",".join(_header_values(response_headers, b"sec-websocket-extensions"))
    deflate: DeflateParams | None = None
    for extension in extensions.decode("latin-1").split(","):
        if not extension.strip():
            continue
        name, *params = (part.strip() for part in extension.split(";"))
        if name.lower() != "permessage-deflate":
            return WebSocketUpgrade(unsupported=f"WebSocket extension {name!r} is not supported")
        if deflate is not None:
            return WebSocketUpgrade(unsupported="permessage-deflate accepted twice")
        parsed = _deflate_params(params)
        if isinstance(parsed, str):
            return WebSocketUpgrade(unsupported=parsed)
        deflate = parsed
    return WebSocketUpgrade(deflate=deflate)


def _deflate_params(params: list[str]) -> DeflateParams | str:
    """RFC 7692 §7.1: the parameters of a server's permessage-deflate response."""
    seen: dict[str, str | None] = {}
    for param in params:
        key, has_value, raw = param.partition("=")
        key = key.strip().lower()
        if key in seen:
            # RFC 7692 §7.1: "MUST NOT include multiple extension parameters with the same name".
            return f"permessage-deflate parameter {key} repeated"
        value = raw.strip().strip('"') if has_value else None
        seen[key] = value
    known = {
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    }
    unknown = sorted(set(seen) - known)
    if unknown:
        return f"permessage-deflate parameter {unknown[0]} is not defined by RFC 7692"
    bits: dict[str, int] = {}
    for key in ("server_max_window_bits", "client_max_window_bits"):
        if key not in seen:
            continue
        value = seen[key]
        # RFC 7692 §7.1.2.1 and §7.1.2.2: in a response, both carry a value from 8 to 15.
        if value is None or not value.isdigit() or not 8 <= int(value) <= 15:
            return f"permessage-deflate {key}={value} is not 8 to 15"
        bits[key] = int(value)
    for key in ("server_no_context_takeover", "client_no_context_takeover"):
        if seen.get(key) is not None:
            return f"permessage-deflate {key} takes no value"
    return DeflateParams(
        server_no_context_takeover="server_no_context_takeover" in seen,
        client_no_context_takeover="client_no_context_takeover" in seen,
        server_max_window_bits=bits.get("server_max_window_bits", 15),
        client_max_window_bits=bits.get("client_max_window_bits", 15),
    )


# -- permessage-deflate on one hop -------------------------------------------------------------


class _MessageTooBig(Exception):
    pass


class _Deflate(Extension):
    """RFC 7692 permessage-deflate with the agreed parameters, inflating under a limit."""

    name = "permessage-deflate"

    def __init__(self, params: DeflateParams, *, we_are_client: bool, max_message: int) -> None:
        self._max_message = max_message
        if we_are_client:
            send_bits, send_reset = params.client_max_window_bits, params.client_no_context_takeover
            receive_bits = params.server_max_window_bits
            receive_reset = params.server_no_context_takeover
        else:
            send_bits, send_reset = params.server_max_window_bits, params.server_no_context_takeover
            receive_bits = params.client_max_window_bits
            receive_reset = params.client_no_context_takeover
        # zlib cannot deflate with an 8-bit window (Python refuses it; the C library would use
        # 9, more than the peer agreed to): such a hop gets uncompressed messages (RFC 7692 §6).
        self._compress = send_bits >= 9
        self._send_bits = send_bits
        self._send_reset = send_reset
        self._receive_bits = receive_bits
        self._receive_reset = receive_reset
        self._compressor: zlib._Compress | None = None
        self._decompressor: zlib._Decompress | None = None
        self._inbound_compressed: bool | None = None  # of the message being received
        self._inbound_data = False  # whether the current frame is a data frame
        self._inflated = 0  # bytes inflated so far in the current message

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool | str:  # pragma: no cover - the handshake is never done here
        return False

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol():
            # RFC 7692 §6.1: RSV1 is only ever set on the first frame of a data message.
            return CloseReason.PROTOCOL_ERROR if rsv.rsv1 else RsvBits(False, False, False)
        self._inbound_data = True
        if opcode is Opcode.CONTINUATION:
            if rsv.rsv1:
                return CloseReason.PROTOCOL_ERROR  # RFC 7692 §6.1
            return RsvBits(False, False, False)
        self._inbound_compressed = rsv.rsv1
        self._inflated = 0
        if rsv.rsv1 and self._decompressor is None:
            self._decompressor = zlib.decompressobj(-self._receive_bits)
        return RsvBits(True, False, False)

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        assert self._decompressor is not None
        room = self._max_message - self._inflated
        try:
            # max_length bounds the output: an inflation bomb stops at the limit (RFC 6455
            # §10.4 asks implementations to limit frame and message sizes).
            out = self._decompressor.decompress(data, room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if len(out) > room:
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_data or not self._inbound_compressed:
            return data
        return self._inflate(data)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        was_data, self._inbound_data = self._inbound_data, False
        if not was_data or not fin:
            return None
        compressed, self._inbound_compressed = self._inbound_compressed, None
        if not compressed:
            return None
        # RFC 7692 §7.2.2: append 0x00 0x00 0xff 0xff to the message's payload, then inflate.
        tail = self._inflate(b"\x00\x00\xff\xff")
        if self._receive_reset:
            self._decompressor = None  # RFC 7692 §7.1.1.1 / §7.1.1.2: no context takeover
        return tail

    def frame_outbound(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        data: bytes,
        fin: bool,
    ) -> tuple[RsvBits, bytes]:
        if opcode.iscontrol() or not self._compress:
            return rsv, data
        if opcode is not Opcode.CONTINUATION:
            rsv = RsvBits(True, rsv.rsv2, rsv.rsv3)  # RFC 7692 §6.1: RSV1 on the first frame
        if self._compressor is None:
            self._compressor = zlib.compressobj(
                zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -self._send_bits
            )
        out = self._compressor.compress(data)
        if fin:
            # RFC 7692 §7.2.1: flush to a byte boundary and drop the trailing 0x00 0x00 0xff 0xff.
            out += self._compressor.flush(zlib.Z_SYNC_FLUSH)
            out = out[:-4]
            if self._send_reset:
                self._compressor = None
        return rsv, out


# -- one hop ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageIn:
    """A whole message arrived: ``str`` for text, ``bytes`` for binary."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class PingIn:
    """A Ping arrived (RFC 6455 §5.5.2)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PongIn:
    """A Pong arrived (RFC 6455 §5.5.3)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseIn:
    """The peer sent a Close frame; ``code`` is 1005 when it carried no status (RFC 6455 §7.1.5)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Failure:
    """The peer broke the protocol: the hop must be closed with ``code`` (RFC 6455 §7.1.7)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The transport ended without a Close frame (RFC 6455 §7.1.5: code 1006)."""


Received = MessageIn | PingIn | PongIn | CloseIn | Failure | EndOfStream


class Endpoint:
    """One hop of a relayed WebSocket: frames in and out, whole messages, the close handshake.

    Args:
        we_are_client: ``True`` on the hop to the origin (tlsmitm masks its frames and expects
            unmasked ones), ``False`` on the hop to the client.
        deflate: the permessage-deflate parameters both ends agreed, or ``None``.
        max_message: the largest message accepted, in bytes after decompression; a larger one
            fails the hop with 1009 (RFC 6455 §7.4.1).
    """

    def __init__(
        self,
        *,
        we_are_client: bool,
        deflate: DeflateParams | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        if max_message < 1:
            raise ValueError("max_message must be at least 1 byte")
        extensions: list[Extension] = []
        if deflate is not None:
            extensions.append(
                _Deflate(deflate, we_are_client=we_are_client, max_message=max_message)
            )
        role = ConnectionType.CLIENT if we_are_client else ConnectionType.SERVER
        self._conn = Connection(role, extensions)
        # Control frames only (never compressed, RFC 7692 §6.1): wsproto's connection refuses a
        # Pong once it sent its Close, but RFC 6455 §5.5.2 still owes one for every Ping.
        self._control = FrameProtocol(we_are_client, [])
        self._max_message = max_message
        self._parts: list[str] | list[bytes] | None = None
        self._size = 0
        self.close_sent = False
        self.close_received = False
        self.received_code: int | None = None  # of the peer's Close, once it came
        self.failed = False
        self.transport_gone = False

    @property
    def may_send_data(self) -> bool:
        """Whether messages, pings and pongs may be sent (no Close sent or received yet)."""
        return not (self.close_sent or self.close_received or self.transport_gone or self.failed)

    @property
    def may_send_close(self) -> bool:
        """Whether a Close frame may still be sent on this hop."""
        return not (self.close_sent or self.transport_gone)

    @property
    def receiving(self) -> bool:
        """Whether anything more can arrive on this hop."""
        return not (self.close_received or self.transport_gone or self.failed)

    @property
    def finished(self) -> bool:
        """Whether this hop is over: both Close frames exchanged, failed, or its transport gone."""
        return self.transport_gone or self.failed or (self.close_sent and self.close_received)

    @property
    def message_open(self) -> bool:
        """Whether part of a message has arrived and its final fragment has not (RFC 6455 §5.4)."""
        return self._parts is not None

    def receive(self, data: bytes | None) -> list[Received]:
        """Feed bytes from the peer (``None`` at the end of the transport); what they completed.

        After a Close frame, a :class:`Failure` or the end of the transport nothing more is
        returned (RFC 6455 §5.5.1: no data after Close).
        """
        if not self.receiving:
            return []
        if data is None:
            self.transport_gone = True
            return [EndOfStream()]
        self._conn.receive_data(data)
        out: list[Received] = []
        for event in self._conn.events():
            if isinstance(event, TextMessage | BytesMessage):
                try:
                    message = self._reassemble(event)
                except _MessageTooBig:
                    return [*out, self._fail(CloseReason.MESSAGE_TOO_BIG, "message too big")]
                if message is not None:
                    out.append(MessageIn(message))
            elif isinstance(event, Ping):
                out.append(PingIn(bytes(event.payload)))
            elif isinstance(event, Pong):
                out.append(PongIn(bytes(event.payload)))
            elif isinstance(event, CloseConnection):
                if self._conn.state in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED):
                    self.close_received = True
                    self.received_code = int(event.code)
                    out.append(CloseIn(self.received_code, event.reason or ""))
                else:
                    # wsproto reports a ParseFailed as a CloseConnection without a state change.
                    out.append(self._fail(int(event.code), event.reason or "protocol error"))
                return out
        return out

    def _fail(self, code: int, reason: str) -> Failure:
        self.failed = True
        self._parts = None
        return Failure(code, reason)

    def _reassemble(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        # RFC 6455 §5.4: a message is the concatenation of its fragments' payloads.
        if isinstance(event, TextMessage):
            self._size += len(event.data.encode())
        else:
            self._size += len(event.data)
        if self._size > self._max_message:
            raise _MessageTooBig
        if self._parts is None:
            self._parts = []
        self._parts.append(event.data)  # type: ignore[arg-type]
        if not event.message_finished:
            return None
        parts, self._parts, self._size = self._parts, None, 0
        if isinstance(event, TextMessage):
            return "".join(parts)  # type: ignore[arg-type]
        return b"".join(parts)  # type: ignore[arg-type]

    def send_message(self, data: str | bytes) -> bytes:
        """The frame for one whole message (compressed when the hop agreed to)."""
        if not self.may_send_data:
            raise LocalProtocolError("no message may be sent on a closing WebSocket")
        if isinstance(data, str):
            return self._conn.send(TextMessage(data=data))
        return self._conn.send(BytesMessage(data=data))

    def send_ping(self, payload: bytes) -> bytes:
        """A Ping frame (RFC 6455 §5.5.2)."""
        if not self.may_send_data:
            raise LocalProtocolError("no ping may be sent on a closing WebSocket")
        return self._conn.send(Ping(payload=payload))

    def send_pong(self, payload: bytes) -> bytes:
        """A Pong frame echoing a Ping's payload (RFC 6455 §5.5.3)."""
        if not self.may_send_data:
            raise LocalProtocolError("no pong may be sent on a closing WebSocket")
        return self._conn.send(Pong(payload=payload))

    def answer_ping(self, payload: bytes) -> bytes:
        """The Pong this hop owes its peer's Ping, also after tlsmitm sent its Close.

        RFC 6455 §5.5.2: a Ping is answered unless a Close was *received*; §5.5.1 forbids only
        data frames after sending one.
        """
        if self.close_received or self.transport_gone or self.failed:
            raise LocalProtocolError("a Close was received: no Pong is owed")
        return bytes(self._control.pong(payload))

    def send_close(self, code: int, reason: str = "") -> bytes:
        """The Close frame; ``code`` 1005 sends a Close without a status (RFC 6455 §5.5.1)."""
        if not self.may_send_close:
            raise LocalProtocolError("a Close was already sent on this WebSocket")
        self.close_sent = True
        if code == _NO_STATUS:
            return self._conn.send(CloseConnection(code=CloseReason.NO_STATUS_RCVD))
        if code not in _SENDABLE_CODES and not 3000 <= code <= 4999:
            code = CloseReason.PROTOCOL_ERROR
        return self._conn.send(CloseConnection(code=code, reason=reason))

    def transport_lost(self) -> None:
        """The transport broke while sending: nothing more goes either way on this hop."""
        self.transport_gone = True
