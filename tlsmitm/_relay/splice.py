"""Raw relaying: bytes copied both ways, unchanged, until both directions ended."""

from __future__ import annotations

import trio

from .state import FlowRecord
from .streams import RECEIVE

__all__ = ["splice"]


async def splice(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    conn: FlowRecord,
    *,
    idle_timeout: float,
    to_upstream: bytes = b"",
    to_client: bytes = b"",
) -> None:
    """Copy bytes both ways until both directions ended; ``a`` is the client side.

    ``to_upstream`` and ``to_client`` are sent first (bytes already read from the other side).
    Both directions end after ``idle_timeout`` seconds without a byte in either.
    """
    if to_upstream:
        await b.send_all(to_upstream)
        conn.bytes_up += len(to_upstream)
    if to_client:
        await a.send_all(to_client)
        conn.bytes_down += len(to_client)
    last_activity = [trio.current_time()]
    conn.idle_since = last_activity[0]  # a quiet tunnel may be shed near the connection cap

    async def pump(source: trio.abc.Stream, sink: trio.abc.Stream, up: bool) -> None:
        while True:
            data = await source.receive_some(RECEIVE)
            if not data:
                break
            last_activity[0] = conn.idle_since = trio.current_time()
            if up:
                conn.bytes_up += len(data)
            else:
                conn.bytes_down += len(data)
            await sink.send_all(data)
        if isinstance(sink, trio.abc.HalfCloseableStream):
            await sink.send_eof()
        else:
            await sink.aclose()

    async with trio.open_nursery() as nursery:

        async def watchdog() -> None:
            while True:
                deadline = last_activity[0] + idle_timeout
                if trio.current_time() >= deadline:
                    nursery.cancel_scope.cancel()
                    return
                await trio.sleep_until(deadline)

        async def both() -> None:
            async with trio.open_nursery() as pumps:
                pumps.start_soon(pump, a, b, True)
                pumps.start_soon(pump, b, a, False)
            nursery.cancel_scope.cancel()

        nursery.start_soon(watchdog)
        nursery.start_soon(both)
