"""The edge parsers: what a stranger sends the proxy port is refused with a status, never a crash.

Issue 15: fault 1 (``GET http://h:99999/`` ended the process) and the smaller faults of item 8
(``http://[::1/``, malformed hosts, bare-LF heads) at the level of the pure parsers; the end-to-end
regressions against ``serve`` are in ``tests/test_hostile.py``.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    absolute_urls,
    authorities,
    connect_targets,
    invalid_ports,
    mangled_heads,
    request_heads,
)

from tlsmitm._edge import (
    AbsoluteUrl,
    Authority,
    BadRequest,
    find_head_end,
    parse_absolute_url,
    parse_connect_target,
    parse_port,
    via_names,
    via_value,
)
from tlsmitm._names import normalize_host


def test_port_range() -> None:  # fault 1
    assert parse_port("1") == 1
    assert parse_port("65535") == 65535
    assert parse_port(b"00443") == 443
    for bad in ("0", "65536", "99999", "", "-1", "+1", "1e3", "٣", "123456", " 1"):
        with pytest.raises(BadRequest) as caught:
            parse_port(bad)
        assert caught.value.status == 400
        assert caught.value.reason == "bad_port"


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        (b"example.test:443", "example.test", 443),
        (b"EXAMPLE.test.:8443", "example.test", 8443),
        (b"192.0.2.1:1", "192.0.2.1", 1),
        (b"[2001:DB8::1]:443", "2001:db8::1", 443),
        (b"[::ffff:192.0.2.1]:443", "::ffff:c000:201", 443),
        (b"xn--bcher-kva.test:443", "xn--bcher-kva.test", 443),
    ],
)
def test_connect_target(target: bytes, host: str, port: int) -> None:
    assert parse_connect_target(target) == Authority(host=host, port=port)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (b"h.test:99999", "bad_port"),
        (b"h.test:0", "bad_port"),
        (b"h.test", "bad_port"),
        (b"h.test:", "bad_port"),
        (b"[::1:443", "bad_ipv6"),
        (b"[::1]443", "bad_host"),
        (b"::1:443", "bad_ipv6"),
        (b"[1.2.3.4]:443", "bad_ipv6"),
        (b"[fe80::1%eth0]:443", "bad_ipv6"),
        (b"a..b:443", "bad_host"),
        (b"999.1.1.1:443", "bad_host"),
        (b"user@h.test:443", "bad_target"),
        (b"h.test:443/x", "bad_target"),
        (b"h\xff.test:443", "bad_target"),
        (b"", "bad_target"),
    ],
)
def test_bad_connect_targets(target: bytes, reason: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_connect_target(target)
    assert caught.value.reason == reason
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("url", "host", "port", "path"),
    [
        (b"http://h.test/", "h.test", 80, b"/"),
        (b"http://h.test", "h.test", 80, b"/"),
        (b"http://h.test?q=1", "h.test", 80, b"/?q=1"),
        (b"HTTP://H.test:8080/a/b?c", "h.test", 8080, b"/a/b?c"),
        (b"http://h.test:/x", "h.test", 80, b"/x"),
        (b"http://[::1]:8080/", "::1", 8080, b"/"),
        (b"http://[::1]/", "::1", 80, b"/"),
    ],
)
def test_absolute_url(url: bytes, host: str, port: int, path: bytes) -> None:
    assert parse_absolute_url(url) == AbsoluteUrl(
        authority=Authority(host=host, port=port), target=path
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (b"http://h:99999/", "bad_port"),  # fault 1
        (b"http://[::1/", "bad_ipv6"),  # item 8: was mis-parsed
        (b"http://[::1]x/", "bad_host"),
        (b"http://::1/", "bad_ipv6"),
        (b"http://h_/", None),  # underscores are allowed in names: not an error
        (b"http://a..b/", "bad_host"),
        (b"http://user:pw@h.test/", "userinfo"),
        (b"https://h.test/", "unsupported_scheme"),
        (b"ftp://h.test/", "unsupported_scheme"),
        (b"/just/a/path", "bad_target"),
        (b"http://h.test/#frag", "bad_target"),
        (b"http://h.test/a b", "bad_target"),
        (b"http:///", "bad_host"),
    ],
)
def test_bad_absolute_urls(url: bytes, reason: str | None) -> None:
    if reason is None:
        parse_absolute_url(url)
        return
    with pytest.raises(BadRequest) as caught:
        parse_absolute_url(url)
    assert caught.value.reason == reason


def test_long_targets_are_414() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_absolute_url(b"http://h.test/" + b"a" * 9000)
    assert caught.value.status == 414
    with pytest.raises(BadRequest) as caught:
        parse_connect_target(b"a" * 9000 + b":443")
    assert caught.value.status == 414


def test_head_end() -> None:
    head = b"GET http://h.test/ HTTP/1.1\r\nHost: h.test\r\n\r\n"
    assert find_head_end(head) == len(head)
    assert find_head_end(head + b"body") == len(head)
    assert find_head_end(head[:-1]) is None
    assert find_head_end(head[:-2] + b"\r") is None  # a CR at the end may still get its LF
    assert find_head_end(b"") is None


@pytest.mark.parametrize(
    ("data", "reason", "status"),
    [
        (b"GET / HTTP/1.1\nHost: h\n\n", "bare_lf", 400),  # item 8: hung for 30 s
        (b"GET / HTTP/1.1\n", "bare_lf", 400),  # at once, before the head is complete
        (b"\n", "bare_lf", 400),
        (b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", "bare_cr", 400),
        (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70_000, "head_too_large", 431),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", "head_too_large", 431),
    ],
)
def test_bad_heads_are_refused_at_once(data: bytes, reason: str, status: int) -> None:
    with pytest.raises(BadRequest) as caught:
        find_head_end(data)
    assert (caught.value.reason, caught.value.status) == (reason, status)


def test_head_limit_is_a_parameter() -> None:
    with pytest.raises(BadRequest):
        find_head_end(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 10, limit=32)
    assert find_head_end(b"GET / HTTP/1.1\r\n\r\n", limit=18) == 18


def test_via() -> None:
    assert via_value("tlsmitm-abc") == "1.1 tlsmitm-abc"
    values = [b"1.0 fred, 1.1 p.example.net (Apache/1.1)", b"HTTP/1.1 TLSMITM-abc", b"junk"]
    assert via_names(values) == ["fred", "p.example.net", "tlsmitm-abc"]
    assert via_names([b"\xff\xfe 1.1"]) == []


# -- properties: every input gets a value or a BadRequest, nothing else -------------------------


@given(connect_targets())
@settings(max_examples=300)
def test_connect_targets_property(case: tuple[bytes, bool]) -> None:
    target, valid = case
    try:
        authority = parse_connect_target(target)
    except BadRequest as exc:
        refused: BadRequest | None = exc
    else:
        refused = None
    if refused is not None:
        assert not valid, f"{target!r} refused: {refused}"
        assert refused.status in (400, 414)
        return
    if not valid:
        return  # random bytes that happen to be a valid authority
    host, _, port = target.decode().rpartition(":")
    assert authority.port == int(port)
    assert authority.host == normalize_host(host)
    # The authority writes itself back as a target that parses to the same value.
    assert parse_connect_target(authority.text().encode()) == authority


@given(absolute_urls())
@settings(max_examples=300)
def test_absolute_urls_property(case: tuple[bytes, bool]) -> None:
    url, valid = case
    try:
        parsed = parse_absolute_url(url)
    except BadRequest as exc:
        refused: BadRequest | None = exc
    else:
        refused = None
    if refused is not None:
        assert not valid, f"{url!r} refused: {refused}"
        return
    if valid:
        assert 1 <= parsed.authority.port <= 65535
        assert parsed.target.startswith(b"/")
        again = b"http://" + parsed.authority.text(default_port=80).encode() + parsed.target
        assert parse_absolute_url(again) == parsed


@given(authorities(), invalid_ports)
def test_no_out_of_range_port_is_ever_accepted(authority: tuple[str, int], port: str) -> None:
    host, _ = authority
    for parse in (parse_connect_target, parse_absolute_url):
        text = f"{host}:{port}" if parse is parse_connect_target else f"http://{host}:{port}/"
        with pytest.raises(BadRequest):
            parse(text.encode("utf-8"))


@given(request_heads())
@settings(max_examples=200)
def test_well_formed_heads_are_found(head: bytes) -> None:
    assert find_head_end(head) == len(head)
    assert find_head_end(head + b"\x16\x03\x01") == len(head)  # a pipelined ClientHello after it
    for cut in range(len(head) - 1, max(0, len(head) - 6), -1):
        assert find_head_end(head[:cut]) is None


@given(mangled_heads())
@settings(max_examples=300)
def test_mangled_heads_never_hang_or_crash(data: bytes) -> None:
    try:
        end = find_head_end(data)
    except BadRequest as exc:
        status: int | None = exc.status
    else:
        status = None
    if status is not None:
        assert status in (400, 431)
        return
    if end is None:
        # Only a valid prefix may ask for more, and never past the limit.
        assert b"\n" not in data.replace(b"\r\n", b"")
        assert len(data) < 64 * 1024
    else:
        assert data[end - 4 : end] == b"\r\n\r\n"


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_random_bytes(data: bytes) -> None:
    for parse in (parse_connect_target, parse_absolute_url, find_head_end):
        with contextlib.suppress(BadRequest):
            parse(data)
    via_names([data])
