"""A real Chromium ClientHello through tlsmitm's sans-IO parser.

``tests/data/chromium_clienthello.bin`` is what Debian's Chromium 156 sent to a raw socket on
127.0.0.1 for ``https://www.example.test/`` (regenerate with
``python tests/conformance/harness.py``): GREASE values, ECH GREASE, ALPS and a post-quantum key
share (X25519MLKEM768) that makes it about 1.9 KiB. The recorded file keeps the parser honest
without a browser; the live test checks that today's Chromium still parses the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require_tool
from harness import capture_chromium_client_hello

from tlsmitm._clienthello import NEED_MORE, ClientHello, is_grease, parse_client_hello

RECORDED = Path(__file__).resolve().parents[1] / "data" / "chromium_clienthello.bin"
TLS13, TLS12 = 0x0304, 0x0303
EXT_ECH = 0xFE0D  # draft-ietf-tls-esni: Chromium sends ECH GREASE


def _check(data: bytes) -> ClientHello:
    hello = parse_client_hello(data)
    assert isinstance(hello, ClientHello), hello
    assert hello.server_name == "www.example.test"
    assert hello.alpn_protocols == (b"h2", b"http/1.1")
    versions = [v for v in hello.supported_versions if not is_grease(v)]
    assert versions == [TLS13, TLS12]
    assert hello.highest_version == TLS13
    assert hello.legacy_version == TLS12
    assert any(is_grease(v) for v in hello.supported_versions)  # RFC 8701 GREASE kept as sent
    assert hello.raw_length == len(data)
    return hello


def test_recorded_chromium_client_hello_parses() -> None:
    data = RECORDED.read_bytes()
    hello = _check(data)
    assert EXT_ECH in hello.extensions
    assert len(data) > 1500  # the ML-KEM key share: larger than one typical TCP segment
    # Every proper prefix is a valid beginning: the relay keeps reading, it never gives up.
    for cut in (1, 5, 6, 100, 1400, len(data) - 1):
        assert parse_client_hello(data[:cut]) is NEED_MORE


@pytest.mark.browser
def test_todays_chromium_client_hello_parses() -> None:
    require_tool("chromium")
    _check(capture_chromium_client_hello())
