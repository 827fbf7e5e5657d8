"""The sans-IO WebSocket core: the handshake's agreement and one hop's frames, without I/O."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from tlsmitm._websocket import (
    CloseIn,
    DeflateParams,
    EndOfStream,
    Endpoint,
    Failure,
    MessageIn,
    PingIn,
    WebSocketClose,
    WebSocketMessage,
    WebSocketUpgrade,
    negotiated_upgrade,
)

REQUEST = ((b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"))


def _response(*extensions: bytes) -> tuple[tuple[bytes, bytes], ...]:
    return (
        (b"Upgrade", b"WebSocket"),
        (b"Connection", b"Upgrade"),
        *((b"Sec-WebSocket-Extensions", value) for value in extensions),
    )


@pytest.mark.parametrize(
    ("extensions", "expected"),
    [
        ((), WebSocketUpgrade()),
        ((b"permessage-deflate",), WebSocketUpgrade(deflate=DeflateParams())),
        (
            (
                b"permessage-deflate; server_no_context_takeover; client_max_window_bits=9;"
                b' server_max_window_bits="10"',
            ),
            WebSocketUpgrade(
                deflate=DeflateParams(
                    server_no_context_takeover=True,
                    client_max_window_bits=9,
                    server_max_window_bits=10,
                )
            ),
        ),
        (
            (b"PerMessage-Deflate;client_no_context_takeover",),
            WebSocketUpgrade(deflate=DeflateParams(client_no_context_takeover=True)),
        ),
        ((b"x-webkit-deflate-frame",), "'x-webkit-deflate-frame' is not supported"),
        ((b"permessage-deflate", b"permessage-deflate"), "accepted twice"),
        ((b"permessage-deflate, permessage-deflate",), "accepted twice"),
        ((b"permessage-deflate; server_max_window_bits=7",), "is not 8 to 15"),
        ((b"permessage-deflate; server_max_window_bits=16",), "is not 8 to 15"),
        ((b"permessage-deflate; client_max_window_bits",), "is not 8 to 15"),
        ((b"permessage-deflate; server_max_window_bits=x",), "is not 8 to 15"),
        ((b"permessage-deflate; client_no_context_takeover=1",), "takes no value"),
        ((b"permessage-deflate; mystery",), "mystery is not defined by RFC 7692"),
        (
            (b"permessage-deflate; server_no_context_takeover; server_no_context_takeover",),
            "repeated",
        ),
    ],
)
def test_negotiated_upgrade_reads_the_101_agreement(
    extensions: tuple[bytes, ...], expected: WebSocketUpgrade | str
) -> None:
    upgrade = negotiated_upgrade(REQUEST, _response(*extensions))
    if isinstance(expected, str):
        assert upgrade.unsupported is not None
        assert expected in upgrade.unsupported
        assert upgrade.deflate is None
    else:
        assert upgrade == expected


def test_an_upgrade_to_another_protocol_is_not_relayed_by_message() -> None:
    upgrade = negotiated_upgrade(
        ((b"Upgrade", b"h2c"),), ((b"Upgrade", b"h2c"), (b"Connection", b"Upgrade"))
    )
    assert upgrade.unsupported == "upgrade to h2c is not WebSocket"
    upgrade = negotiated_upgrade(((b"Upgrade", b"websocket"),), ())
    assert upgrade.unsupported == "upgrade to an unnamed protocol is not WebSocket"


def test_hook_values_are_validated() -> None:
    with pytest.raises(ValueError, match="may not be sent"):
        WebSocketClose(code=1006)
    with pytest.raises(ValueError, match="may not be sent"):
        WebSocketClose(code=2999)
    with pytest.raises(ValueError, match="123 bytes"):
        WebSocketClose(code=1008, reason="é" * 62)
    assert WebSocketClose(code=4001, reason="x" * 123).code == 4001
    with pytest.raises(TypeError):
        WebSocketMessage(from_client=True, data=bytearray(b"x"))  # type: ignore[arg-type]
    assert WebSocketMessage(from_client=True, data="hi").is_text
    assert not WebSocketMessage(from_client=False, data=b"hi").is_text
    with pytest.raises(ValueError, match="8 to 15"):
        DeflateParams(client_max_window_bits=16)


# -- one hop -------------------------------------------------------------------------------------


def _peer(we_are_client: bool, deflate: DeflateParams | None = None) -> Connection:
    """A wsproto connection playing the hop's peer, with the same agreement."""
    extensions = []
    if deflate is not None:
        extension = PerMessageDeflate()
        offer = "permessage-deflate"
        if deflate.server_no_context_takeover:
            offer += "; server_no_context_takeover"
        if deflate.client_no_context_takeover:
            offer += "; client_no_context_takeover"
        offer += f"; server_max_window_bits={max(deflate.server_max_window_bits, 9)}"
        offer += f"; client_max_window_bits={max(deflate.client_max_window_bits, 9)}"
        extension.finalize(offer)
        extensions.append(extension)
    role = ConnectionType.SERVER if we_are_client else ConnectionType.CLIENT
    return Connection(role, extensions)


def test_fragments_are_one_message() -> None:
    hop = Endpoint(we_are_client=False)
    peer = _peer(False)
    data = peer.send(TextMessage(data="héllo ", message_finished=False))
    data += peer.send(Ping(payload=b"between fragments"))  # RFC 6455 §5.4: may interleave
    data += peer.send(TextMessage(data="wörld", message_finished=True))
    data += peer.send(BytesMessage(data=b"\x00\x01", message_finished=False))
    data += peer.send(BytesMessage(data=b"\x02", message_finished=True))
    # Byte by byte: the reassembly does not depend on how the transport cut the stream.
    received = [item for byte in data for item in hop.receive(bytes([byte]))]
    assert received == [
        PingIn(b"between fragments"),
        MessageIn("héllo wörld"),
        MessageIn(b"\0\1\2"),
    ]


def test_close_handshake_state() -> None:
    hop = Endpoint(we_are_client=True)
    peer = _peer(True)
    assert hop.receive(peer.send(CloseConnection(code=4000, reason="done"))) == [
        CloseIn(4000, "done")
    ]
    assert not hop.may_send_data
    assert not hop.finished
    assert hop.receive(b"ignored after Close") == []  # RFC 6455 §5.5.1
    frame = hop.send_close(4000, "done")
    assert hop.finished
    peer.receive_data(frame)
    assert [(e.code, e.reason) for e in peer.events()] == [(4000, "done")]


def test_a_close_without_status_is_forwarded_without_status() -> None:
    hop = Endpoint(we_are_client=False)
    peer = _peer(False)
    assert hop.receive(peer.send(CloseConnection(code=CloseReason.NO_STATUS_RCVD))) == [
        CloseIn(1005, "")
    ]
    upstream = Endpoint(we_are_client=True)
    frame = upstream.send_close(1005)
    assert frame[1] & 0x7F == 0  # an empty Close payload (RFC 6455 §5.5.1)


def _masked_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    mask = b"\x01\x02\x03\x04"
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    header = bytes([first])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    elif len(payload) < 65536:
        header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x81\x02hi", 1002),  # RFC 6455 §5.1: client frames are masked
        (_masked_frame(0x1, b"\xff\xfe"), 1007),  # RFC 6455 §8.1: text is UTF-8
        (_masked_frame(0x3, b"x"), 1002),  # a reserved opcode
        (_masked_frame(0x9, b"x", fin=False), 1002),  # a fragmented control frame
        (_masked_frame(0x0, b"x"), 1002),  # a continuation without a message
        (_masked_frame(0x1, b"x", rsv1=True), 1002),  # RSV1 without permessage-deflate
        (_masked_frame(0x8, b"\x03"), 1002),  # a one-byte Close payload
        (_masked_frame(0x8, b"\x03\xee"), 1002),  # close code 1006 on the wire
        (_masked_frame(0x9, b"p" * 126), 1002),  # a control frame over 125 bytes
        (b"GET / HTTP/1.1\r\n\r\n", 1002),  # not WebSocket at all
    ],
)
def test_hostile_frames_fail_the_hop_with_the_right_code(data: bytes, code: int) -> None:
    hop = Endpoint(we_are_client=False)
    received = hop.receive(data)
    assert len(received) == 1
    assert isinstance(received[0], Failure)
    assert received[0].code == code
    assert hop.failed
    assert hop.finished
    assert hop.receive(_masked_frame(0x1, b"later")) == []
    frame = hop.send_close(received[0].code, received[0].reason)
    assert struct.unpack("!H", frame[2:4])[0] == code  # the server's Close is unmasked


def test_a_message_over_the_limit_fails_with_1009_before_it_is_complete() -> None:
    hop = Endpoint(we_are_client=False, max_message=1000)
    frame = _masked_frame(0x2, b"x" * 5000)
    received = hop.receive(frame[:1500])  # the limit is enforced on arrival, not at the end
    assert received == [Failure(1009, "message too big")]
    hop = Endpoint(we_are_client=False, max_message=1000)
    peer = _peer(False)
    data = b"".join(
        peer.send(TextMessage(data="é" * 100, message_finished=False)) for _ in range(6)
    )
    received = hop.receive(data)  # 1,200 bytes of UTF-8 in 600 characters
    assert received == [Failure(1009, "message too big")]


def test_an_inflation_bomb_stops_at_the_limit() -> None:
    limit = 64 * 1024
    hop = Endpoint(we_are_client=False, deflate=DeflateParams(), max_message=limit)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = compressor.compress(b"\0" * (64 * 1024 * 1024)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert len(payload) < 100 * 1024  # 64 MiB of zeros, in less than 100 KiB
    received = hop.receive(_masked_frame(0x2, payload[:-4], rsv1=True))
    assert received == [Failure(1009, "error in extension")]


def test_corrupt_deflate_data_fails_with_1007() -> None:
    hop = Endpoint(we_are_client=False, deflate=DeflateParams())
    received = hop.receive(_masked_frame(0x2, b"\xff\xff\xff\xff", rsv1=True))
    assert received == [Failure(1007, "error in extension")]


def test_a_compressed_control_frame_fails_with_1002() -> None:
    hop = Endpoint(we_are_client=False, deflate=DeflateParams())
    received = hop.receive(_masked_frame(0x9, b"", rsv1=True))  # RFC 7692 §6.1
    assert received == [Failure(1002, "error in extension")]


def test_end_of_transport() -> None:
    hop = Endpoint(we_are_client=True)
    assert hop.receive(None) == [EndOfStream()]
    assert hop.finished
    assert not hop.may_send_close


@st.composite
def _deflate(draw: st.DrawFn) -> DeflateParams | None:
    if draw(st.booleans()):
        return None
    return DeflateParams(
        server_no_context_takeover=draw(st.booleans()),
        client_no_context_takeover=draw(st.booleans()),
        server_max_window_bits=draw(st.integers(8, 15)),
        client_max_window_bits=draw(st.integers(8, 15)),
    )


_messages = st.lists(
    st.one_of(st.text(max_size=300), st.binary(max_size=300), st.just(b"ab" * 5000)),
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(deflate=_deflate(), messages=_messages, cut=st.integers(1, 5000))
def test_two_hops_agree_on_every_message(
    deflate: DeflateParams | None, messages: list[str | bytes], cut: int
) -> None:
    """A client hop and a server hop with the same agreement carry any message unchanged."""
    client = Endpoint(we_are_client=True, deflate=deflate)
    server = Endpoint(we_are_client=False, deflate=deflate)
    for sender, receiver in ((client, server), (server, client)):
        wire = b"".join(sender.send_message(message) for message in messages)
        received = []
        for start in range(0, len(wire), cut):
            received += receiver.receive(wire[start : start + cut])
        assert received == [MessageIn(message) for message in messages]


@pytest.mark.parametrize(
    "deflate",
    [
        DeflateParams(),
        DeflateParams(server_no_context_takeover=True, client_no_context_takeover=True),
        DeflateParams(server_max_window_bits=9, client_max_window_bits=10),
    ],
)
def test_deflate_interoperates_with_wsproto(deflate: DeflateParams) -> None:
    """Frames compressed by wsproto's own extension inflate here, and the other way round."""
    for we_are_client in (True, False):
        hop = Endpoint(we_are_client=we_are_client, deflate=deflate)
        peer = _peer(we_are_client, deflate)
        for text in ("a" * 5000, "second message, same context", "é" * 10):
            assert hop.receive(peer.send(TextMessage(data=text))) == [MessageIn(text)]
            frame = hop.send_message(text)
            assert frame[0] & 0x40  # RSV1: compressed (RFC 7692 §6)
            peer.receive_data(frame)
            assert [e.data for e in peer.events()] == [text]


@settings(max_examples=200, deadline=None)
@given(
    we_are_client=st.booleans(),
    deflate=_deflate(),
    chunks=st.lists(st.binary(max_size=200), max_size=8),
)
def test_any_bytes_end_in_items_or_one_failure_never_an_exception(
    we_are_client: bool, deflate: DeflateParams | None, chunks: list[bytes]
) -> None:
    """Hostile input of any shape: the hop reports it, it never raises (RFC 6455 §7.1.7)."""
    hop = Endpoint(we_are_client=we_are_client, deflate=deflate, max_message=1000)
    received = [item for chunk in chunks for item in hop.receive(chunk)]
    failures = [item for item in received if isinstance(item, Failure)]
    assert len(failures) <= 1
    if failures:
        assert received[-1] == failures[0]
        assert failures[0].code in (1002, 1007, 1009)
        assert hop.receive(b"\x81\x00") == []
        assert hop.send_close(failures[0].code, failures[0].reason)


def test_a_ping_is_answered_after_our_close_but_not_after_theirs() -> None:
    """RFC 6455 §5.5.2: a Pong is owed unless a Close was received (§5.5.1: only data stops)."""
    hop = Endpoint(we_are_client=False)
    peer = _peer(False)
    hop.send_close(1000)
    assert hop.receive(peer.send(Ping(payload=b"p"))) == [PingIn(b"p")]
    frame = hop.answer_ping(b"p")
    assert frame == b"\x8a\x01p"  # unmasked from the server side
    with pytest.raises(LocalProtocolError):
        hop.send_message("data after our Close")
    hop.receive(peer.send(CloseConnection(code=1000)))
    with pytest.raises(LocalProtocolError):
        hop.answer_ping(b"p")
