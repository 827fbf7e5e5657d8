"""The PROXY protocol v1/v2 parser: tables of real headers, and properties over any bytes."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsmitm._clienthello import NEED_MORE
from tlsmitm._proxy_protocol import (
    MAX_PROXY_HEADER_BYTES,
    V2_SIGNATURE,
    ProxyCommand,
    ProxyHeader,
    ProxyProtocolError,
    is_trusted,
    parse_proxy_header,
    parse_trusted_networks,
)

IP = ipaddress.ip_address


def v2(
    command: int = 1,
    family: int = 1,
    protocol: int = 1,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    version: int = 2,
) -> bytes:
    payload = addresses + tlvs
    return (
        V2_SIGNATURE
        + bytes([(version << 4) | command, (family << 4) | protocol])
        + struct.pack("!H", len(payload))
        + payload
    )


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return IP(src).packed + IP(dst).packed + struct.pack("!HH", sport, dport)


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return IP(src).packed + IP(dst).packed + struct.pack("!HH", sport, dport)


# -- version 1 --------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n"
    header = parse_proxy_header(line + b"CONNECT x:443 HTTP/1.1\r\n")
    assert header == ProxyHeader(
        version=1,
        command=ProxyCommand.PROXY,
        source=(IP("192.0.2.7"), 56324),
        destination=(IP("198.51.100.1"), 443),
        length=len(line),
    )


def test_v1_tcp6_and_unknown() -> None:
    header = parse_proxy_header(b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n")
    assert not isinstance(header, type(NEED_MORE))
    assert header.source == (IP("2001:db8::1"), 65535)
    assert header.destination == (IP("::1"), 0)
    unknown = parse_proxy_header(b"PROXY UNKNOWN whatever goes here\r\nrest")
    assert not isinstance(unknown, type(NEED_MORE))
    assert unknown.source is None
    assert unknown.length == len(b"PROXY UNKNOWN whatever goes here\r\n")


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",  # a field missing
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443 x\r\n",  # one too many
        b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 192.0.2.7 ::1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n",  # port out of range
        b"PROXY TCP4 192.0.2.7 198.51.100.1 0443 443\r\n",  # leading zero
        b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 443\r\n",
        b"PROXY TCP4 192.0.2.07 198.51.100.1 1 443\r\n",  # not a dotted quad
        b"PROXY TCP4  192.0.2.7 198.51.100.1 1 443\r\n",  # double space
        b"PROXY TCP5 192.0.2.7 198.51.100.1 1 443\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 443\n",  # bare LF
        b"PROXY TCP4 192.0.2.7\r198.51.100.1 1 443\r\n",  # bare CR
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 \x00443\r\n",  # control byte
        b"PROXY TCP6 fe80::1%eth0 ::1 1 443\r\n",  # scoped address
    ],
)
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse_proxy_header(line)
    assert info.value.reason == "malformed"


def test_v1_too_long_is_final() -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse_proxy_header(b"PROXY UNKNOWN " + b"a" * 200)
    assert info.value.reason == "too_large"


@pytest.mark.parametrize(
    "data", [b"CONNECT a:443 HTTP/1.1\r\n", b"\x16\x03\x01", b"GET / HTTP/1.1", b"PROXZ"]
)
def test_not_a_header(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse_proxy_header(data)
    assert info.value.reason == "not_proxy"


# -- version 2 --------------------------------------------------------------------------------


def test_v2_inet_with_tlvs() -> None:
    tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP with three bytes
    raw = v2(addresses=inet4("203.0.113.9", "10.0.0.1", 40000, 8080), tlvs=tlv)
    header = parse_proxy_header(raw + b"\x16\x03\x01")
    assert header == ProxyHeader(
        version=2,
        command=ProxyCommand.PROXY,
        source=(IP("203.0.113.9"), 40000),
        destination=(IP("10.0.0.1"), 8080),
        length=len(raw),
    )


def test_v2_inet6_local_unspec_unix() -> None:
    six = parse_proxy_header(v2(family=2, addresses=inet6("2001:db8::5", "::1", 1, 2)))
    assert not isinstance(six, type(NEED_MORE))
    assert six.source == (IP("2001:db8::5"), 1)
    local = parse_proxy_header(v2(command=0, family=1, addresses=b"\x00" * 12))
    assert not isinstance(local, type(NEED_MORE))
    assert (local.command, local.source) == (ProxyCommand.LOCAL, None)
    unspec = parse_proxy_header(v2(family=0, protocol=0))
    assert not isinstance(unspec, type(NEED_MORE))
    assert unspec.source is None
    unix = parse_proxy_header(v2(family=3, addresses=b"\x00" * 216))
    assert not isinstance(unix, type(NEED_MORE))
    assert unix.source is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (v2(version=1, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)), "malformed"),
        (v2(command=2, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)), "malformed"),
        (v2(family=4), "malformed"),
        (v2(protocol=3), "malformed"),
        (v2(protocol=2, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)), "malformed"),  # UDP
        (v2(addresses=b"\x01\x02\x03"), "malformed"),  # short address block
        (v2(family=2, addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2)), "malformed"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "too_large"),
        (b"\r\n\r\n\x00\r\nQUIX\n", "not_proxy"),
    ],
)
def test_v2_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse_proxy_header(raw)
    assert info.value.reason == reason


# -- properties -------------------------------------------------------------------------------

addresses4 = st.ip_addresses(v=4)
addresses6 = st.ip_addresses(v=6)
ports = st.integers(0, 65535)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, tuple[object, int], tuple[object, int]]:
    family = draw(st.sampled_from([4, 6]))
    pool = addresses4 if family == 4 else addresses6
    src, dst = (draw(pool), draw(pool))
    sport, dport = draw(ports), draw(ports)
    if draw(st.booleans()):
        raw = f"PROXY TCP{family} {src} {dst} {sport} {dport}\r\n".encode()
    else:
        block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        tlvs = draw(st.binary(max_size=64))
        raw = v2(family=1 if family == 4 else 2, addresses=block, tlvs=tlvs)
    return raw, (src, sport), (dst, dport)


@given(headers(), st.binary(max_size=32))
def test_every_valid_header_round_trips_and_its_prefixes_ask_for_more(
    case: tuple[bytes, tuple[object, int], tuple[object, int]], tail: bytes
) -> None:
    raw, source, destination = case
    header = parse_proxy_header(raw + tail)
    assert isinstance(header, ProxyHeader)
    assert (header.source, header.destination, header.length) == (source, destination, len(raw))
    for cut in range(len(raw)):
        assert parse_proxy_header(raw[:cut]) is NEED_MORE


@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_more_or_a_proxy_protocol_error(data: bytes) -> None:
    try:
        result = parse_proxy_header(data)
    except ProxyProtocolError as exc:
        reason = exc.reason
        assert reason in ("not_proxy", "malformed", "too_large")
        return
    if result is not NEED_MORE:
        assert isinstance(result, ProxyHeader)
        assert result.length <= len(data)


@given(st.binary(min_size=1, max_size=64))
def test_after_a_signature_any_bytes_are_answered(junk: bytes) -> None:
    for prefix in (b"PROXY ", V2_SIGNATURE):
        data = prefix + junk
        try:
            result = parse_proxy_header(data)
        except ProxyProtocolError:
            continue
        assert result is NEED_MORE or isinstance(result, ProxyHeader)


def test_never_asks_for_more_than_the_maximum() -> None:
    big = v2(addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=b"\x04" + b"\x00" * 2030)
    assert len(big) <= MAX_PROXY_HEADER_BYTES
    assert isinstance(parse_proxy_header(big), ProxyHeader)
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(b"PROXY " + b"x" * MAX_PROXY_HEADER_BYTES)


# -- trusted balancers ------------------------------------------------------------------------


def test_trusted_networks() -> None:
    networks = parse_trusted_networks(["10.0.0.0/8", "::1", "192.0.2.7"])
    assert is_trusted("10.1.2.3", networks)
    assert is_trusted("::ffff:10.1.2.3", networks)  # mapped IPv4 peer on a dual-stack socket
    assert is_trusted("::1", networks)
    assert is_trusted("192.0.2.7", networks)
    assert not is_trusted("192.0.2.8", networks)
    assert not is_trusted("127.0.0.1", networks)
    assert not is_trusted("not an address", networks)
    with pytest.raises(ValueError, match="not-a-cidr"):
        parse_trusted_networks(["not-a-cidr"])
