"""Hypothesis strategies shared by the property tests of every edge parser (and ./run fuzz).

What a stranger can send the proxy: request heads, CONNECT targets, absolute URLs, ClientHellos,
Strict-Transport-Security values and HTTP/2 frames -- each as well-formed values (to round-trip a
parser) and as near-misses (to show it refuses them cleanly). The ClientHello encoder here follows
RFC 8446 §4.1.2 / RFC 5246 §7.4.1.2.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import strategies as st

TLS12 = 0x0303
ECH_EXTENSION = 0xFE0D  # draft-ietf-tls-esni §11.1

# -- ClientHello encoder ------------------------------------------------------------------------


def u8(n: int) -> bytes:
    return bytes([n])


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def vec8(b: bytes) -> bytes:
    return u8(len(b)) + b


def vec16(b: bytes) -> bytes:
    return u16(len(b)) + b


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    return vec16(b"".join(u8(name_type) + vec16(n) for n in names))


def alpn_ext(protocols: list[bytes]) -> bytes:
    return vec16(b"".join(vec8(p) for p in protocols))


def versions_ext(versions: list[int]) -> bytes:
    return vec8(b"".join(u16(v) for v in versions))


def hello_message(
    *,
    legacy_version: int = TLS12,
    session_id: bytes = b"\x11" * 32,
    cipher_suites: list[int] | None = None,
    compression: bytes = b"\x00",
    extensions: list[tuple[int, bytes]] | None = None,
    omit_extensions: bool = False,
    raw_extensions: bytes | None = None,
) -> bytes:
    """A handshake message (header included) holding a ClientHello."""
    suites = [0x1301, 0x1302] if cipher_suites is None else cipher_suites
    body = (
        u16(legacy_version)
        + b"\x42" * 32
        + vec8(session_id)
        + vec16(b"".join(u16(s) for s in suites))
        + vec8(compression)
    )
    if raw_extensions is not None:
        body += vec16(raw_extensions)
    elif not omit_extensions:
        body += vec16(b"".join(u16(t) + vec16(d) for t, d in (extensions or [])))
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes: list[int] | None = None, version: int = 0x0301) -> bytes:
    """``message`` in handshake records of the given payload sizes (the last takes the rest)."""
    out = b""
    pos = 0
    for size in sizes or []:
        if pos >= len(message):
            break
        chunk = message[pos : pos + size]
        out += b"\x16" + u16(version) + u16(len(chunk)) + chunk
        pos += len(chunk)
    while pos < len(message):
        chunk = message[pos : pos + 16384]
        out += b"\x16" + u16(version) + u16(len(chunk)) + chunk
        pos += len(chunk)
    return out


# -- host names, ports, authorities -------------------------------------------------------------

_LABEL_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"

labels = st.text(_LABEL_CHARS, min_size=1, max_size=12).filter(
    lambda t: not t.startswith("xn--")
) | st.text(_LABEL_CHARS + "-", min_size=3, max_size=12).filter(
    lambda t: t[0] != "-" and t[-1] != "-" and t[2:4] != "--"
)


@st.composite
def dns_names(draw: st.DrawFn) -> str:
    """A valid host name (at least one label with a letter, so it is not a number)."""
    parts = draw(st.lists(labels, min_size=1, max_size=4))
    tld = draw(st.text("abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=6))
    name = ".".join([*parts, tld])
    if draw(st.booleans()):
        name = name.upper() if draw(st.booleans()) else name
    return name


ipv4_literals = st.ip_addresses(v=4).map(str)
ipv6_addresses = st.ip_addresses(v=6).map(str)
hosts = dns_names() | ipv4_literals | ipv6_addresses.map(lambda a: f"[{a}]")
valid_ports = st.integers(1, 65535)
invalid_ports = st.one_of(
    st.just("0"),
    st.integers(65536, 10**12).map(str),
    st.just("-1"),
    st.just("+80"),
    st.just("8O"),
    st.just("\u0663"),  # an Arabic-Indic digit: isdigit() but not DIGIT
    st.just(" 80"),
    st.text("0123456789", min_size=6, max_size=12).filter(lambda t: len(t) > 5),
)
invalid_hosts = st.one_of(
    st.just(""),
    st.just("[::1"),
    st.just("::1"),
    st.just("[1.2.3.4]"),
    st.just("[fe80::1%25eth0]"),
    st.just("a..b"),
    st.just("-a.b"),
    st.just("999.1.1.1"),
    st.just("a b"),
    st.just("a%2eb"),
    st.just("\x00"),
    st.text(min_size=1, max_size=20).filter(lambda t: any(c in t for c in " %/@[]\\<>")),
)


@st.composite
def authorities(draw: st.DrawFn) -> tuple[str, int]:
    """A valid (host as written, port)."""
    return draw(hosts), draw(valid_ports)


@st.composite
def connect_targets(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(CONNECT target, whether it is valid)."""
    host, port = draw(authorities())
    kind = draw(st.sampled_from(["ok", "bad_port", "no_port", "bad_host", "junk"]))
    if kind == "ok":
        return f"{host}:{port}".encode(), True
    if kind == "bad_port":
        return f"{host}:{draw(invalid_ports)}".encode(), False
    if kind == "no_port":
        return host.encode(), False
    if kind == "bad_host":
        return f"{draw(invalid_hosts)}:{port}".encode(), False
    return draw(st.binary(max_size=40)), False


@st.composite
def absolute_urls(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(absolute-form target, whether it is valid)."""
    host, port = draw(authorities())
    path = draw(st.sampled_from(["", "/", "/a/b", "/?q=1", "?q", "/%20x"]))
    scheme = draw(st.sampled_from(["http", "HTTP", "Http"]))
    kind = draw(
        st.sampled_from(["ok", "ok_default", "bad_port", "bad_host", "userinfo", "scheme", "junk"])
    )
    if kind == "ok":
        return f"{scheme}://{host}:{port}{path}".encode(), True
    if kind == "ok_default":
        return f"{scheme}://{host}{path}".encode(), True
    if kind == "bad_port":
        return f"http://{host}:{draw(invalid_ports)}{path}".encode(), False
    if kind == "bad_host":
        return f"http://{draw(invalid_hosts)}:{port}/".encode(), False
    if kind == "userinfo":
        return f"http://user:pw@{host}/".encode(), False
    if kind == "scheme":
        return f"{draw(st.sampled_from(['https', 'ftp', 'ws', '']))}://{host}/".encode(), False
    return draw(st.binary(max_size=60)), False


# -- request heads -----------------------------------------------------------------------------

field_names = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20).filter(
    lambda t: t[0] != "-"
)
field_values = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,;=./:-_", max_size=40
).map(str.strip)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """A well-formed HTTP/1.1 request head a client may send a proxy, CRLF CRLF included."""
    if draw(st.booleans()):
        host, port = draw(authorities())
        line = f"CONNECT {host}:{port} HTTP/1.1"
    else:
        url, _ = draw(absolute_urls().filter(lambda u: u[1]))
        method = draw(st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "DELETE"]))
        line = f"{method} {url.decode()} HTTP/1.1"
    fields = draw(st.lists(st.tuples(field_names, field_values), max_size=8))
    lines = [line, "Host: h.test", *(f"{k}: {v}" for k, v in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@st.composite
def mangled_heads(draw: st.DrawFn) -> bytes:
    """A request head with one kind of damage a hostile client sends."""
    head = draw(request_heads())
    kind = draw(st.sampled_from(["bare_lf", "bare_cr", "cut", "flip", "nul", "huge"]))
    if kind == "bare_lf":
        return head.replace(b"\r\n", b"\n", draw(st.integers(1, 3)))
    if kind == "bare_cr":
        i = head.index(b"\r\n")
        return head[:i] + b"\rX" + head[i:]
    if kind == "cut":
        return head[: draw(st.integers(0, len(head) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(head) - 1))
        return head[:i] + bytes([draw(st.integers(0, 255))]) + head[i + 1 :]
    if kind == "nul":
        i = draw(st.integers(0, len(head) - 1))
        return head[:i] + b"\x00" + head[i:]
    return head[:-2] + b"X-Pad: " + b"a" * draw(st.integers(70_000, 80_000)) + b"\r\n\r\n"


# -- ClientHellos --------------------------------------------------------------------------------


@st.composite
def client_hellos(draw: st.DrawFn) -> bytes:
    """A ClientHello in records (maybe fragmented), with SNI, ALPN, versions and maybe ECH."""
    extensions: list[tuple[int, bytes]] = []
    if draw(st.booleans()):
        name = draw(dns_names() | ipv4_literals)
        extensions.append((0, sni_ext(name.encode())))
    if draw(st.booleans()):
        protocols = draw(st.lists(st.sampled_from([b"h2", b"http/1.1", b"acme"]), min_size=1))
        extensions.append((16, alpn_ext(protocols)))
    if draw(st.booleans()):
        extensions.append((43, versions_ext(draw(st.lists(st.integers(0, 0xFFFF), min_size=1)))))
    if draw(st.booleans()):
        enc = draw(st.binary(max_size=40))
        payload = draw(st.binary(min_size=1, max_size=300))
        suite = draw(st.binary(min_size=4, max_size=4))
        body = b"\x00" + suite + u8(draw(st.integers(0, 255))) + vec16(enc) + vec16(payload)
        extensions.append((ECH_EXTENSION, body))
    message = hello_message(extensions=list(draw(st.permutations(extensions))))
    sizes = draw(st.lists(st.integers(1, 400), max_size=4))
    return records(message, sizes)


@st.composite
def damaged_client_hellos(draw: st.DrawFn) -> bytes:
    """A ClientHello with bytes flipped, cut or inserted."""
    raw = bytearray(draw(client_hellos()))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(raw) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            raw[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del raw[i:]
            if not raw:
                raw = bytearray(b"\x16")
        else:
            raw[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


# -- Strict-Transport-Security values (RFC 6797 §6.1) -------------------------------------------


@st.composite
def sts_headers(draw: st.DrawFn) -> str:
    """An STS value: valid directives mixed with the near-misses servers really send."""
    directives = draw(
        st.lists(
            st.one_of(
                st.integers(0, 10**12).map(lambda n: f"max-age={n}"),
                st.integers(0, 10**9).map(lambda n: f'max-age="{n}"'),
                st.just("includeSubDomains"),
                st.just("INCLUDESUBDOMAINS"),
                st.just("preload"),
                st.just("max-age="),
                st.just("max-age=-1"),
                st.just('max-age="1'),
                st.text(min_size=0, max_size=12),
                st.tuples(field_names, field_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
            ),
            max_size=6,
        )
    )
    separator = draw(st.sampled_from([";", "; ", " ;", ";;"]))
    return separator.join(directives)


# -- HTTP/2 frames (RFC 9113 §4.1) ----------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4


def h2_frame(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """One frame: length(24) type(8) flags(8) R(1) stream identifier(31), then the payload."""
    return (
        len(payload).to_bytes(3, "big")
        + bytes([frame_type, flags])
        + struct.pack("!I", stream_id & 0x7FFFFFFF)
        + payload
    )


@st.composite
def h2_frames(draw: st.DrawFn) -> bytes:
    """A frame of any type (DATA..CONTINUATION and unknown), odd flags and stream ids."""
    frame_type = draw(st.integers(0, 10) | st.integers(0, 255))
    flags = draw(st.integers(0, 255))
    stream_id = draw(st.sampled_from([0, 1, 3, 2, 0x7FFFFFFF]) | st.integers(0, 2**31 - 1))
    payload = draw(st.binary(max_size=64))
    if frame_type == 4 and draw(st.booleans()):  # SETTINGS: well-formed 6-byte entries
        entries = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 2**32 - 1))))
        payload = b"".join(struct.pack("!HI", k, v) for k, v in entries)
    return h2_frame(frame_type, flags, stream_id, payload)


h2_streams = st.lists(h2_frames(), max_size=8).map(lambda frames: H2_PREFACE + b"".join(frames))


def is_ipv6(text: str) -> bool:
    """Whether ``text`` is an IPv6 address (for tests that tell literals apart)."""
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False
