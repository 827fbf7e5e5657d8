"""UpstreamPool on its own: bounds, expiry, routes, and the liveness check of real sockets."""

from __future__ import annotations

import socket
from typing import Any, cast

import pytest
import trio

from tlsmitm._relay.h1 import _binds_connection, _keep_alive_timeout
from tlsmitm._relay.pool import (
    REPEAT_WINDOW,
    PooledUpstream,
    PoolKey,
    UpstreamPool,
    _transport_quiet,
)
from tlsmitm._tls import TLSStream


class _Stream:
    """Stands in for an idle TLSStream (the pool only asks is_idle and looks for .socket)."""

    def __init__(self, name: str, *, idle: bool = True, transport: Any = None) -> None:
        self.name = name
        self.idle = idle
        self.transport_stream = transport

    def is_idle(self) -> bool:
        return self.idle


def _entry(stream: _Stream, expires: float) -> PooledUpstream:
    return PooledUpstream(stream=cast(TLSStream, stream), verdict=cast(Any, None), expires=expires)


def _key(
    client: str = "10.0.0.1",
    host: str = "a.test",
    sni: str = "a.test",
    alpn: tuple[bytes, ...] = (b"http/1.1",),
) -> PoolKey:
    return PoolKey(client_ip=client, host=host, port=443, tls_name=sni, alpn_offer=alpn)


def _returning(pool: UpstreamPool, *keys: PoolKey, now: float) -> None:
    """The client was here before: a connection for each key was asked for (and none kept)."""
    for key in keys:
        assert pool.take(key, now) == (None, [])


def test_a_first_visit_is_not_kept_a_return_within_the_window_is() -> None:
    pool = UpstreamPool(max_idle=10, max_per_key=4, idle_seconds=5)
    first, second, later = _Stream("first"), _Stream("second"), _Stream("later")
    assert pool.put(_key(), _entry(first, 105), now=100) == [first]  # never seen: closed
    assert pool.put(_key(), _entry(second, 115), now=110) == []  # seen 10 s ago: kept
    assert pool.take(_key(), now=111)[0] is not None
    # Seen last at 111: a visit more than REPEAT_WINDOW later is a first visit again.
    assert pool.put(_key(), _entry(later, 300), now=111 + REPEAT_WINDOW + 1) == [later]


def test_would_keep_says_no_to_a_first_visit_and_notes_it() -> None:
    pool = UpstreamPool(max_idle=10, max_per_key=4, idle_seconds=5)
    assert not pool.would_keep(_key(), now=100)  # first visit: relayed as without a pool
    assert pool.would_keep(_key(), now=110)  # a return within the window
    assert not pool.would_keep(_key(host="b.test", sni="b.test"), now=110)  # another key
    assert pool.put(_key(), _entry(_Stream("kept"), 115), now=111) == []
    assert not pool.would_keep(_key(), now=111 + REPEAT_WINDOW + 1)  # the window passed
    off = UpstreamPool(max_idle=0, max_per_key=4, idle_seconds=5)
    assert not off.would_keep(_key(), now=100)
    assert not off.would_keep(_key(), now=101)


def test_take_returns_the_newest_live_connection_and_drops_dead_ones() -> None:
    pool = UpstreamPool(max_idle=10, max_per_key=4, idle_seconds=5)
    old, dead = _Stream("old"), _Stream("dead", idle=False)
    _returning(pool, _key(), now=99)
    assert pool.put(_key(), _entry(old, 105), now=100) == []
    assert pool.put(_key(), _entry(dead, 105), now=100) == []
    assert pool.has_route("10.0.0.1", "a.test", 443)
    taken, stale = pool.take(_key(), now=101)
    assert taken is not None
    assert taken.stream is old
    assert stale == [dead]
    assert len(pool) == 0
    assert not pool.has_route("10.0.0.1", "a.test", 443)
    assert (pool.reused, pool.stale) == (1, 1)


def test_keys_separate_clients_names_and_alpn() -> None:
    pool = UpstreamPool(max_idle=10, max_per_key=4, idle_seconds=5)
    _returning(pool, _key(), now=99)
    pool.put(_key(), _entry(_Stream("x"), 105), now=100)
    assert pool.take(_key(client="10.0.0.2"), now=101) == (None, [])
    assert pool.take(_key(sni="b.test"), now=101) == (None, [])
    assert pool.take(_key(alpn=()), now=101) == (None, [])
    assert pool.has_route("10.0.0.1", "a.test", 443)
    assert not pool.has_route("10.0.0.2", "a.test", 443)


def test_bounds_per_key_and_in_all_drop_the_oldest() -> None:
    pool = UpstreamPool(max_idle=3, max_per_key=2, idle_seconds=5)
    streams = [_Stream(str(i)) for i in range(5)]
    _returning(pool, _key(), _key(host="b.test"), _key(host="c.test"), now=99)
    assert pool.put(_key(), _entry(streams[0], 105), now=100) == []
    assert pool.put(_key(), _entry(streams[1], 105), now=100) == []
    assert pool.put(_key(), _entry(streams[2], 105), now=100) == [streams[0]]
    assert pool.put(_key(host="b.test"), _entry(streams[3], 105), now=100) == []
    assert pool.put(_key(host="c.test"), _entry(streams[4], 105), now=100) == [streams[1]]
    assert len(pool) == 3
    assert sorted(s.name for s in cast(list[_Stream], pool.drain())) == ["2", "3", "4"]
    assert len(pool) == 0
    assert not pool.has_route("10.0.0.1", "a.test", 443)


def test_expiry() -> None:
    pool = UpstreamPool(max_idle=10, max_per_key=4, idle_seconds=5)
    early, late = _Stream("early"), _Stream("late")
    _returning(pool, _key(), now=99)
    pool.put(_key(), _entry(early, 105), now=100)
    pool.put(_key(), _entry(late, 108), now=103)
    assert pool.expire(now=106) == [early]
    assert pool.take(_key(), now=108) == (None, [late])  # expired when asked for


def test_deadline_follows_the_servers_keep_alive_timeout() -> None:
    pool = UpstreamPool(max_idle=10, max_per_key=4, idle_seconds=4)
    assert pool.deadline(100, None) == 104
    assert pool.deadline(100, 3.0) == 102  # a second less than the server keeps it
    assert pool.deadline(100, 60.0) == 104
    assert pool.deadline(100, 1.0) is None  # too short to be worth keeping
    assert UpstreamPool(max_idle=0, max_per_key=1, idle_seconds=4).deadline(100, None) is None
    off = UpstreamPool(max_idle=10, max_per_key=1, idle_seconds=0)
    _returning(off, _key(), now=99)
    stream = _Stream("x")
    assert off.put(_key(), _entry(stream, 100), now=100) == [stream]
    with pytest.raises(ValueError):
        UpstreamPool(max_idle=10, max_per_key=0, idle_seconds=4)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"timeout=5", 5.0),
        (b"timeout=5, max=100", 5.0),
        (b"max=100, Timeout = 15", 15.0),
        (b'timeout="7"', 7.0),
        (b"max=100", None),
        (b"timeout=soon", None),
        (b"timeout=-1", None),
        (b"timeout=nan", None),
        (b"", None),
    ],
)
def test_keep_alive_timeout(value: bytes, seconds: float | None) -> None:
    assert _keep_alive_timeout(value) == seconds


@pytest.mark.parametrize(
    ("headers", "bound"),
    [
        ([(b"Authorization", b"NTLM TlRMTVNTUAAB")], True),
        ([(b"authorization", b"negotiate YIIJ")], True),
        ([(b"Authorization", b"Kerberos x")], True),
        ([(b"Authorization", b"Bearer abc")], False),
        ([(b"Authorization", b"Basic dXNlcjpwYXNz")], False),
        ([(b"Authorization", b"  ")], False),
        ([(b"X-Auth", b"NTLM abc")], False),
    ],
)
def test_connection_bound_authentication_schemes(
    headers: list[tuple[bytes, bytes]], bound: bool
) -> None:
    assert _binds_connection(headers, b"authorization") is bound


async def test_the_liveness_check_sees_a_peer_that_closed_or_spoke() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        pairs = []
        for _ in range(3):
            ours = trio.socket.from_stdlib_socket(socket.create_connection(listener.getsockname()))
            theirs, _ = listener.accept()
            pairs.append((trio.SocketStream(ours), theirs))
        quiet, closed, spoke = pairs
        closed[1].close()
        spoke[1].sendall(b"\x15")
        await trio.sleep(0.05)
        try:
            assert _transport_quiet(cast(TLSStream, _Stream("q", transport=quiet[0])))
            assert not _transport_quiet(cast(TLSStream, _Stream("c", transport=closed[0])))
            assert not _transport_quiet(cast(TLSStream, _Stream("s", transport=spoke[0])))
        finally:
            for stream, peer in pairs:
                await stream.aclose()
                peer.close()
