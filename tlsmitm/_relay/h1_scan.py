"""The HTTP/1.1 relay's scanning steps: a body held until the scanners answer.

Functions over an :class:`~tlsmitm._relay.h1.HttpRelay`, kept out of the class so that it stays
small: :func:`scanned_response` holds a response body, :func:`exchange_scanned_request` a
request body (``--scan-requests``), :func:`.h1.send_replaced` answers with a replacement (a hook's
or a scanner's). The protocol-neutral parts -- what scanners are told, how a decision is
answered and logged -- are in :mod:`.scanning`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import h11
import trio

from .._errors import ClientError, UpstreamError
from .._scan import BodyInspection, ScanDecision, open_inspection
from . import h1 as _h1
from .hooks import Request, Response
from .scanning import (
    ScanReport,
    block_for,
    content_encoding,
    request_context,
    response_context,
)

if TYPE_CHECKING:
    from .h1 import HttpRelay, Switched

__all__ = ["exchange_scanned_request", "scanned_response"]


async def exchange_scanned_request(
    relay: HttpRelay, request: Request, event: h11.Request, first: Any
) -> Switched | None:
    """Hold the request body until the scanners answer (``--scan-requests``), then send
    the request upstream, or answer the client with a block and end."""
    assert relay.scan is not None
    if relay._down.they_are_waiting_for_100_continue:
        # RFC 9110 §10.1.1: the client waits for 100 before sending its body; the proxy
        # needs the body first, so it answers the expectation itself and drops it.
        await relay._send(
            relay._down, relay.client, h11.InformationalResponse(status_code=100, headers=[])
        )
        kept = [(k, v) for k, v in event.headers if bytes(k).lower() != b"expect"]
        event = h11.Request(method=event.method, target=event.target, headers=kept)
    context = request_context(relay.flow, request)
    async with open_inspection(
        relay.scan, context, content_encoding(request.headers)
    ) as inspection:
        complete, first = await _hold(
            relay,
            inspection,
            request,
            first,
            (relay._down, relay.client, "client"),
            ClientError("client closed during the request body", reason="client_gone"),
        )
        out = bytearray(relay._up.send(event) or b"")
        async for chunk in inspection.spool.chunks():
            await relay._bodies.request(request, chunk, end=False)
            out += relay._up.send(h11.Data(data=chunk)) or b""
            if len(out) >= _h1._RECEIVE_SIZE:
                await relay.upstream.send_all(out)
                out.clear()
        if complete:
            await relay._bodies.request(request, b"", end=True)
            out += relay._up.send(first) or b""  # (the EndOfMessage, with any trailers)
        await relay.upstream.send_all(out)
        relay._touch()
    if complete:
        return await relay._forward_response(request, None)
    result: list[Switched | None] = [None]
    async with trio.open_nursery() as nursery:  # unscanned (--scan-failure open): stream on
        nursery.start_soon(_h1._forward_request_body, relay, request)
        result[0] = await relay._forward_response(request, nursery.cancel_scope)
        if relay._down.their_state is not h11.DONE:
            nursery.cancel_scope.cancel()
    return result[0]


async def _hold(
    relay: HttpRelay,
    inspection: BodyInspection,
    request: Request,
    event: Any,
    source: tuple[h11.Connection, trio.abc.Stream, str],
    closed: Exception,
) -> tuple[bool, Any]:
    """Feed a body's events (``event`` first, then those read from ``source``) to the
    scanners until they settle or the body ends; then answer a block or a replacement (which
    ends the relay) or return for a delivery.

    Returns:
        whether the body is complete, and the last event (the ``EndOfMessage`` if complete).

    Raises:
        Exception: ``closed``, when the peer closes before the body ends.
    """
    complete = False
    while True:
        if event is h11.NEED_DATA:
            event = await relay._next_event(*source)
        if isinstance(event, h11.Data):
            await inspection.feed(bytes(event.data))
            if inspection.settled:
                break
        elif isinstance(event, h11.EndOfMessage):
            complete = True
            break
        else:
            raise closed
        event = h11.NEED_DATA
    decision = await _decide(relay, inspection, complete)
    await _answer_unless_delivered(relay, decision, request)
    return complete, event


async def _decide(relay: HttpRelay, inspection: BodyInspection, complete: bool) -> ScanDecision:
    """Wait for the verdicts (the clients waits: nothing has been sent yet) and report."""
    assert relay.scan is not None
    # The scanners may take up to their timeout after the last byte: not an idle peer.
    relay._idle_scope.deadline = trio.current_time() + relay.idle_timeout + relay.scan.timeout
    decision = await inspection.finish(complete=complete)
    relay._touch()
    relay.on_scan(
        ScanReport(
            host=relay.flow.host,
            direction=inspection.context.direction,
            decision=decision,
            latencies=inspection.latencies,
            size=inspection.spool.size,
        )
    )
    return decision


async def _answer_unless_delivered(
    relay: HttpRelay, decision: ScanDecision, request: Request
) -> None:
    """A block or a replacement is answered here and ends the relay; a delivery returns."""
    if decision.action == "block":
        await _h1.answer_locally(relay, block_for(decision), request)
        raise _h1._Blocked
    if decision.action == "replace":
        replaced = decision.replacement
        assert replaced is not None
        await _h1.send_replaced(
            relay,
            Response(
                status=replaced.status,
                reason=replaced.reason,
                headers=replaced.headers,
                body=replaced.body,
            ),
        )


async def scanned_response(
    relay: HttpRelay, request: Request, response: Response, parsed: h11.Response
) -> None:
    """The verdict before the first byte: hold the body until the scanners answer.

    The client gets nothing meanwhile (it waits on an open connection); then either the
    original bytes (head, body as received), or a redirect to the block page, never a
    byte of the response.
    """
    assert relay.scan is not None
    event = _h1._parsed_event(relay._up, "upstream")
    if isinstance(event, h11.EndOfMessage):  # an empty body: nothing to scan
        head = await _hooked_head(relay, request, response, parsed, b"", complete=True)
        await relay._bodies.response(request, response, b"", end=True)
        await relay.client.send_all(head + (relay._down.send(event) or b""))
        relay._touch()
        return
    context = response_context(relay.flow, request, response)
    async with open_inspection(
        relay.scan, context, content_encoding(response.headers)
    ) as inspection:
        complete, event = await _hold(
            relay,
            inspection,
            request,
            event,
            (relay._up, relay.upstream, "upstream"),
            UpstreamError("origin closed during the response", reason="upstream_gone"),
        )
        spool = inspection.spool
        small = b""
        if complete and 0 < spool.size <= relay.hooks.body_limit:
            small = b"".join([chunk async for chunk in spool.chunks()])
        out = bytearray(
            await _hooked_head(relay, request, response, parsed, small, complete=complete)
        )
        async for chunk in spool.chunks():
            await relay._bodies.response(request, response, chunk, end=False)
            out += relay._down.send(h11.Data(data=chunk)) or b""
            if len(out) >= _h1._RECEIVE_SIZE:
                await relay._flush(out)
    if complete:
        await relay._bodies.response(request, response, b"", end=True)
        out += relay._down.send(event) or b""  # (the EndOfMessage, with any trailers)
        await relay._flush(out)
    else:  # delivered unscanned (--scan-failure open): the rest streams as it comes
        await relay._stream_response_body(bytes(out), request, response)


async def _hooked_head(
    relay: HttpRelay,
    request: Request,
    response: Response,
    parsed: h11.Response,
    body: bytes,
    *,
    complete: bool,
) -> bytes:
    """``on_response`` on a delivered response (with its body when it fits the hook's
    ``body_limit``); the serialised head to send, unsent."""
    limit = relay.hooks.body_limit
    shown = response
    if limit > 0:
        fits = complete and len(body) <= limit
        shown = replace(response, body=body if fits else None, truncated=not fits)
    outcome = await relay.hooks.on_response(relay.flow, request, shown)
    if isinstance(outcome, Response) and outcome.body is not None and shown.body is not None:
        await _h1.send_replaced(relay, outcome)
    return await relay._response_outcome(outcome, response, request, buffered=b"", parsed=parsed)
