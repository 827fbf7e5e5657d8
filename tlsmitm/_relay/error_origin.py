"""tlsmitm's own origin, ``https://error.invalid/``: error, block and override pages.

Nothing here is ever served inside a site's origin: a connection that needs a page answers its
first request with a redirect to this origin (:func:`redirect_to_error`), and a hook's
:class:`~tlsmitm.Block` becomes the same redirect (:func:`block_answer`). The pages themselves
come from :class:`~tlsmitm.ErrorResponder`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import h11
import trio

from .._errors import ClientError
from .._forge import IssuerKind
from .._responder import Action, HttpRequest
from .._tls import TLSStream, server_connection
from .h1 import BlockAnswer
from .hooks import Block, Headers
from .plan import Decision
from .state import FlowRecord, FlowState
from .streams import HEAD_LIMIT, RECEIVE, close, send_response

if TYPE_CHECKING:
    from .interceptor import Interceptor

__all__ = ["block_answer", "redirect_to_error", "serve_error_origin"]


def block_answer(ix: Interceptor, host: str, port: int) -> BlockAnswer:
    """Turns a hook's :class:`Block` into the redirect to the error origin's block page."""

    async def answer(block: Block, target: bytes) -> tuple[int, bytes, Headers, bytes]:
        ix.stats.blocked += 1
        response = await trio.to_thread.run_sync(  # the page goes to the shared state store
            functools.partial(
                ix.responder.block,
                host=host,
                title=block.title,
                explanation=block.explanation,
                now=ix.clock(),
                port=port,
            )
        )
        return response.status, response.reason, response.headers, response.body

    return answer


async def redirect_to_error(
    ix: Interceptor, downstream: trio.abc.Stream, action: Action, port: int, client: str
) -> None:
    """Answer the first request with a redirect to the error origin, then close.

    ``client`` (:func:`~tlsmitm._responder.client_identity`) is the only client that may use
    the page's override.
    """
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
    with trio.fail_after(ix.config.head_timeout):
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                parser.receive_data(bytes(await downstream.receive_some(RECEIVE)))
                continue
            break
    if not isinstance(event, h11.Request):
        return
    # The page is written to the shared state store: in a thread, never on the event loop.
    response = await trio.to_thread.run_sync(
        functools.partial(
            ix.responder.redirect_for,
            action,
            request_target=bytes(event.target),
            port=port,
            now=ix.clock(),
            client=client,
        )
    )
    await send_response(
        parser, downstream, response.status, response.reason, response.headers, response.body
    )
    await downstream.aclose()


async def serve_error_origin(
    ix: Interceptor, client_stream: trio.abc.Stream, initial: bytes, conn: FlowRecord
) -> None:
    """Terminate TLS for ``error.invalid`` with a trusted leaf and serve its pages."""
    conn.enter(FlowState.ERROR_ORIGIN)
    conn.decide(Decision.INTERCEPT, "error_origin")
    ix.stats.error_origin += 1
    peeked, hello = await ix._downstream.peek_hello(client_stream, initial)
    host = ix.responder.error_origin_host
    leaf = ix.forge.leaf_for(host, None, issuer=IssuerKind.TRUSTED, now=ix.clock())
    alpn = b"http/1.1" if b"http/1.1" in hello.alpn_protocols else None
    context = ix._downstream.context_for(leaf)
    downstream = TLSStream(
        client_stream,
        server_connection(context, leaf.ssl_certificate, leaf.ssl_key, alpn=alpn),
        server_side=True,
        initial_data=peeked,
    )
    try:
        with trio.fail_after(ix.config.handshake_timeout):
            await downstream.do_handshake()
        await _serve_requests(ix, downstream, conn.identity)
    finally:
        await close(downstream)


async def _serve_requests(ix: Interceptor, stream: trio.abc.Stream, client: str) -> None:
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
    while True:
        request: h11.Request | None = None
        body = bytearray()
        with trio.move_on_after(ix.config.head_timeout) as idle:
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    parser.receive_data(bytes(await stream.receive_some(RECEIVE)))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > HEAD_LIMIT:
                        raise ClientError("request body too large", reason="body_too_large")
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
        if idle.cancelled_caught or request is None:
            return
        # Pages, nonces and grants live in the shared state store: answered in a thread.
        response = await trio.to_thread.run_sync(
            functools.partial(
                ix.responder.handle,
                HttpRequest(
                    method=bytes(request.method),
                    target=bytes(request.target),
                    headers=tuple((bytes(k), bytes(v)) for k, v in request.headers),
                    body=bytes(body),
                ),
                now=ix.clock(),
                client=client,
            )
        )
        if (
            request.method == b"POST"
            and bytes(request.target).split(b"?")[0] == b"/override"
            and response.status < 400
        ):
            ix.stats.override_grants += 1
        await send_response(
            parser, stream, response.status, response.reason, response.headers, response.body
        )
        if parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
            return
        parser.start_next_cycle()
