"""Telling HTTP from other protocols on a decrypted connection that negotiated no ALPN."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import trio

from .plan import RelayKind, SniffResult, SpliceReason, relay_after_sniff, sniff
from .streams import RECEIVE

__all__ = ["FirstBytes", "first_bytes"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FirstBytes:
    """What the first bytes of a connection decided, and the bytes already read."""

    relay: RelayKind
    splice_reason: SpliceReason | None
    from_client: bytes
    from_server: bytes


async def first_bytes(
    client: trio.abc.Stream,
    server: trio.abc.Stream,
    *,
    idle_timeout: float,
    relays: Collection[RelayKind],
) -> FirstBytes | None:
    """No ALPN was negotiated: is this HTTP? Waits for the first bytes of either side.

    An HTTP server never speaks first (RFC 9112 §2.1: the client sends a request), so bytes
    from the server before any request mean a banner protocol (SMTP, IMAP, FTP): spliced. The
    client's bytes are classified by :func:`~tlsmitm._relay.plan.sniff`. Returns ``None`` when a
    side closed before anything was said. A cancelled receive leaves a TLS stream usable, so the
    side that lost the race loses nothing.

    Raises:
        trio.TooSlowError: neither side said anything for ``idle_timeout`` seconds.
    """
    client_data = bytearray()
    server_data = bytearray()
    ended = [False, False]  # client, server
    with trio.fail_after(idle_timeout):
        async with trio.open_nursery() as nursery:

            async def from_client() -> None:
                while sniff(bytes(client_data)) is SniffResult.NEED_MORE:
                    data = await client.receive_some(RECEIVE)
                    if not data:
                        ended[0] = True
                        break
                    client_data.extend(data)
                nursery.cancel_scope.cancel()

            async def from_server() -> None:
                data = await server.receive_some(RECEIVE)
                server_data.extend(data)
                ended[1] = not data
                nursery.cancel_scope.cancel()

            nursery.start_soon(from_client)
            nursery.start_soon(from_server)
    if server_data:
        return FirstBytes(
            relay=RelayKind.SPLICE,
            splice_reason=SpliceReason.SERVER_SPOKE_FIRST,
            from_client=bytes(client_data),
            from_server=bytes(server_data),
        )
    if ended[1] or (ended[0] and not client_data):
        return None
    result = sniff(bytes(client_data))
    if result is SniffResult.NEED_MORE:  # the client stopped in the middle of a method
        result = SniffResult.NOT_HTTP
    relay, reason = relay_after_sniff(result, relays)
    return FirstBytes(
        relay=relay, splice_reason=reason, from_client=bytes(client_data), from_server=b""
    )
