"""PROXY protocol on the listening port: the balancer's client address is the one used."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

import pytest
import trio
from pki import Hierarchy, good_hierarchy
from test_relay import HOST, Setup, settle, start_origin, start_proxy

from tlsmitm import InterceptorConfig
from tlsmitm._proxy_protocol import V2_SIGNATURE

pytestmark = pytest.mark.e2e


@pytest.fixture
def hierarchy() -> Hierarchy:
    return good_hierarchy(HOST)


def v2_header(source: str, sport: int) -> bytes:
    block = (
        ipaddress.ip_address(source).packed
        + ipaddress.ip_address("127.0.0.1").packed
        + struct.pack("!HH", sport, 8080)
    )
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(block)) + block


def fetch_with_prefix(setup: Setup, origin_port: int, prefix: bytes) -> bytes:
    """Send ``prefix`` then CONNECT + TLS + GET on one socket; the body, or b"" if closed."""
    with socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=20) as sock:
        sock.sendall(prefix + f"CONNECT {HOST}:{origin_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                return b""  # closed with our bytes unread: a reset
            if not chunk:
                return b""
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        context = setup.client_context()
        with context.wrap_socket(sock, server_hostname=HOST) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
    return response


def config(*balancers: str) -> InterceptorConfig:
    return InterceptorConfig(
        resolve={HOST: "127.0.0.1"},
        proxy_protocol=True,
        trusted_balancers=tuple(ipaddress.ip_network(b) for b in balancers),
    )


@pytest.mark.parametrize("version", [1, 2])
async def test_the_carried_client_address_is_logged(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy, version: int
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config("127.0.0.0/8"))
    if version == 1:
        prefix = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 8080\r\n"
    else:
        prefix = v2_header("203.0.113.9", 40000)
    response = await trio.to_thread.run_sync(fetch_with_prefix, setup, origin.port, prefix)
    assert response.endswith(b"hello from origin")
    await settle(setup)
    assert setup.records[-1].client == "203.0.113.9:40000"
    assert setup.records[-1].decision == "intercept"


async def test_connections_from_untrusted_addresses_are_refused(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config("192.0.2.0/24"))
    prefix = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 8080\r\n"
    response = await trio.to_thread.run_sync(fetch_with_prefix, setup, origin.port, prefix)
    assert response == b""  # closed: 127.0.0.1 is not a trusted balancer
    assert origin.stats.requests == []


@pytest.mark.parametrize(
    "prefix",
    [
        b"",
        b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x99\x11\x00\x00",
    ],
)
async def test_a_trusted_balancer_without_a_valid_header_is_refused(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy, prefix: bytes
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config("127.0.0.1/32"))
    response = await trio.to_thread.run_sync(fetch_with_prefix, setup, origin.port, prefix)
    assert response == b""
    assert origin.stats.requests == []


def test_proxy_protocol_needs_trusted_balancers() -> None:
    with pytest.raises(ValueError, match="trusted_balancers"):
        InterceptorConfig(proxy_protocol=True)


async def test_the_allow_list_judges_the_carried_address(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    from tlsmitm._access import AccessPolicy

    origin = await start_origin(nursery, tmp_path, hierarchy)
    allowing = InterceptorConfig(
        resolve={HOST: "127.0.0.1"},
        proxy_protocol=True,
        trusted_balancers=(ipaddress.ip_network("127.0.0.1/32"),),
        access=AccessPolicy.build(allow=["203.0.113.0/24"]),  # not the balancer's 127.0.0.1
    )
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=allowing)
    inside = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 8080\r\n"
    response = await trio.to_thread.run_sync(fetch_with_prefix, setup, origin.port, inside)
    assert response.endswith(b"hello from origin")

    def refused() -> bytes:
        outside = b"PROXY TCP4 198.51.100.7 127.0.0.1 40001 8080\r\n"
        with socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=20) as sock:
            sock.sendall(
                outside + f"CONNECT {HOST}:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            return sock.recv(4096)

    answer = await trio.to_thread.run_sync(refused)
    assert answer.startswith(b"HTTP/1.1 403"), answer
