"""Absolute-form ``http://`` proxying: plain HTTP through the HTTP/1.1 relay and the hooks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .._edge import AbsoluteUrl, BadRequest, parse_absolute_url, via_names, via_value
from .._errors import ClientError, UpstreamError
from .error_origin import block_answer
from .hooks import Block, FlowInfo, Hooks, Request, Response, WebSocketMessage
from .plan import Decision, RelayKind
from .relays import RelayJob, run_relays
from .scanning import note_scan
from .state import FlowRecord, FlowState
from .streams import close, send_simple

if TYPE_CHECKING:
    from .interceptor import Interceptor

__all__ = ["plain_http"]


async def plain_http(
    ix: Interceptor,
    stream: trio.abc.Stream,
    raw: bytes,
    url: AbsoluteUrl,
    conn: FlowRecord,
) -> None:
    """Relay absolute-form ``http://`` requests (no TLS, no HSTS recording: RFC 6797 §8.1).

    Each request forwarded carries this proxy's ``Via`` member (RFC 9110 §7.6.3); a request
    that already carries it went round a loop and is refused.
    """
    name, port = url.authority.host, url.authority.port
    conn.host, conn.port = name, port
    conn.enter(FlowState.PLAIN_HTTP)
    conn.decide(Decision.INTERCEPT, "plain_http")
    ix.stats.plain_http += 1
    try:
        upstream = await ix._upstreams.connect(name, port)
    except UpstreamError as exc:
        if exc.reason == "loop":
            await send_simple(stream, 508, b"Loop Detected")
        else:
            await send_simple(stream, 502, b"Bad Gateway")
        raise
    via = via_value(ix._loop.pseudonym).encode("ascii")

    def to_origin_form(request: Request) -> Request:
        path = request.target
        if not path.startswith(b"/"):
            parsed = parse_absolute_url(request.target)
            if parsed.authority != url.authority:
                raise ClientError("one proxy connection, one origin", reason="origin_changed")
            path = parsed.target
        if ix._loop.seen_in(via_names([v for k, v in request.headers if k.lower() == b"via"])):
            raise BadRequest("request already passed through this proxy", reason="loop")
        headers = tuple(
            (k, v)
            for k, v in request.headers
            if k.lower() not in (b"proxy-connection", b"proxy-authorization")
        )
        return Request(
            method=request.method,
            target=path,
            headers=(*headers, (b"via", via)),
            http_version=request.http_version,
        )

    hooks = _RewritingHooks(ix.hooks, to_origin_form)
    job = RelayJob(
        client=stream,
        upstream=upstream,
        flow=FlowInfo(client=conn.client, host=name, port=port, verified=False),
        hooks=hooks,
        on_sts=None,
        answer_block=block_answer(ix, name, port),
        idle_timeout=ix.config.idle_timeout,
        head_timeout=ix.config.head_timeout,
        should_stop=lambda: ix._draining,
        websocket_max_message=ix.config.websocket_max_message,
        stopping=ix._stopping,
        record=conn,
        to_upstream=raw,
        scan=ix.config.scan,
        on_scan=functools.partial(note_scan, ix.stats, conn),
    )
    try:
        await run_relays(job, RelayKind.H1, None, spliced=ix.stats.spliced)
    finally:
        await close(upstream)


class _RewritingHooks(Hooks):
    """Rewrites absolute-form targets to origin form before the embedder's hooks see them."""

    def __init__(self, inner: Hooks, rewrite: Callable[[Request], Request]) -> None:
        self._inner = inner
        self._rewrite = rewrite
        self.body_limit = inner.body_limit
        self.decode_bodies = inner.decode_bodies

    async def on_request(self, flow: FlowInfo, request: Request) -> Request | Block | None:
        rewritten = self._rewrite(request)
        outcome = await self._inner.on_request(flow, rewritten)
        return rewritten if outcome is None else outcome

    async def on_response(self, flow: FlowInfo, request: Request, response: Any) -> Any:
        return await self._inner.on_response(flow, request, response)

    async def on_request_body(
        self, flow: FlowInfo, request: Request, chunk: bytes, *, end: bool
    ) -> Block | None:
        return await self._inner.on_request_body(flow, request, chunk, end=end)

    async def on_response_body(
        self, flow: FlowInfo, request: Request, response: Response, chunk: bytes, *, end: bool
    ) -> Block | None:
        return await self._inner.on_response_body(flow, request, response, chunk, end=end)

    async def on_websocket_message(self, flow: FlowInfo, message: WebSocketMessage) -> Any:
        return await self._inner.on_websocket_message(flow, message)
