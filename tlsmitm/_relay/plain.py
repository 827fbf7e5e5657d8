"""Absolute-form ``http://`` proxying: plain HTTP through the HTTP/1.1 relay and the hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .._errors import ClientError, UpstreamError
from .._names import normalize_host
from .error_origin import block_answer
from .hooks import Block, FlowInfo, Hooks, Request
from .plan import Decision, RelayKind
from .relays import RelayJob, run_relays
from .state import FlowRecord, FlowState
from .streams import close, send_simple
from .targets import split_http_url

if TYPE_CHECKING:
    from .interceptor import Interceptor

__all__ = ["plain_http"]


async def plain_http(
    ix: Interceptor,
    stream: trio.abc.Stream,
    raw: bytes,
    target: bytes,
    conn: FlowRecord,
) -> None:
    """Relay absolute-form ``http://`` requests (no TLS, no HSTS recording: RFC 6797 §8.1)."""
    host, port, _ = split_http_url(target)
    name = normalize_host(host)
    conn.host, conn.port = name, port
    conn.enter(FlowState.PLAIN_HTTP)
    conn.decide(Decision.INTERCEPT, "plain_http")
    ix.stats.plain_http += 1
    try:
        upstream = await ix._upstreams.connect(name, port)
    except UpstreamError:
        await send_simple(stream, 502, b"Bad Gateway")
        raise

    def to_origin_form(request: Request) -> Request:
        if not request.target.startswith(b"http://"):
            return request
        req_host, req_port, path = split_http_url(request.target)
        if normalize_host(req_host) != name or req_port != port:
            raise ClientError("one proxy connection, one origin", reason="origin_changed")
        headers = tuple(
            (k, v)
            for k, v in request.headers
            if k.lower() not in (b"proxy-connection", b"proxy-authorization")
        )
        return Request(
            method=request.method,
            target=path,
            headers=headers,
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
        should_stop=lambda: ix._draining,
        record=conn,
        to_upstream=raw,
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

    async def on_request(self, flow: FlowInfo, request: Request) -> Request | Block | None:
        rewritten = self._rewrite(request)
        outcome = await self._inner.on_request(flow, rewritten)
        return rewritten if outcome is None else outcome

    async def on_response(self, flow: FlowInfo, request: Request, response: Any) -> Any:
        return await self._inner.on_response(flow, request, response)
