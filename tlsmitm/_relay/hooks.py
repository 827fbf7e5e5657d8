"""What the embedder sees of the traffic: flow information, messages, hooks, blocks.

These types do not depend on the protocol that carried a message: every relay of decrypted
traffic (HTTP/1.1 today; HTTP/2 and WebSocket relays register with
:mod:`tlsmitm._relay.relays`) builds them and calls the same :class:`Hooks`. Which protocol each
side speaks is in :class:`FlowInfo`; a message's own version is ``http_version`` (``b"1.1"``,
``b"1.0"``, ``b"2"``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import TlsMitmError
from .._scan._decode import BodyDecoder, parse_content_encoding
from .._websocket import DropMessage, WebSocketClose, WebSocketMessage

__all__ = [
    "Block",
    "BodyTap",
    "DropMessage",
    "FlowInfo",
    "Headers",
    "Hooks",
    "Request",
    "Response",
    "WebSocketClose",
    "WebSocketMessage",
    "first_header",
    "overrides",
]

Headers = tuple[tuple[bytes, bytes], ...]


def first_header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` in ``headers`` (case-insensitive), or ``None``."""
    lname = name.lower()
    for key, value in headers:
        if key.lower() == lname:
            return value
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowInfo:
    """What a hook knows about the connection a message travels on.

    Attributes:
        client: ``"ip:port"`` of the downstream client.
        host: the normalised host name the client asked for.
        port: the upstream port.
        verified: whether the upstream certificate verified without errors (and was not
            overridden): STS from this flow is recorded.
        client_protocol: what the client side speaks: ``"http/1.1"`` or ``"h2"``
            (``"websocket"`` for WebSocket messages, after a ``101``).
        upstream_protocol: what the upstream side speaks: ``"http/1.1"`` or ``"h2"``; the two
            differ when a relay translates (``"websocket"`` for WebSocket messages).
    """

    client: str
    host: str
    port: int
    verified: bool
    client_protocol: str = "http/1.1"
    upstream_protocol: str = "http/1.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """An HTTP request head (and its body when a hook buffered it)."""

    method: bytes
    target: bytes
    headers: Headers
    http_version: bytes = b"1.1"

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        return first_header(self.headers, name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """An HTTP response head, with ``body`` when it was buffered for a hook.

    ``body`` is ``None`` when the body was not buffered (streamed, or larger than the hook's
    ``body_limit``); ``truncated`` says the hook saw only the head because the body was larger.
    """

    status: int
    reason: bytes
    headers: Headers
    body: bytes | None = None
    truncated: bool = False
    http_version: bytes = b"1.1"

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        return first_header(self.headers, name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Block:
    """A hook's verdict: answer with a block page on the error origin instead."""

    title: str
    explanation: str


class Hooks:
    """Subclass and override to see, change or block what passes through.

    The defaults pass everything unchanged. A hook that raises closes the connection: content
    inspection fails closed. Heads are seen before anything of the message is forwarded; bodies
    are seen streamed, chunk by chunk as they are forwarded (:meth:`on_request_body`,
    :meth:`on_response_body`), whatever protocol carries them. A relay calls the body hooks only
    when a subclass overrides them, so heads-only inspection costs nothing per chunk.

    Attributes:
        body_limit: bytes of response body to buffer for :meth:`on_response` (0: heads only).
            Bodies larger than this are streamed and the hook sees ``truncated=True``; either
            way every byte of the body also passes :meth:`on_response_body`.
        decode_bodies: the body hooks get bodies with their ``Content-Encoding`` undone (gzip,
            deflate, br, zstd), as the content scanners do, under the same decompression-bomb
            bounds; the client and the origin still get the original bytes. A body that cannot
            be decoded (an unknown coding, corrupt data, a bomb) closes the connection, with
            that reason in the decision log.
    """

    body_limit: int = 0
    decode_bodies: bool = False

    async def on_request(self, flow: FlowInfo, request: Request) -> Request | Block | None:
        """Called for each request head; return a new request, a :class:`Block`, or ``None``."""
        return None

    async def on_response(
        self, flow: FlowInfo, request: Request, response: Response
    ) -> Response | Block | None:
        """Called for each response head; return a new response, a :class:`Block`, or ``None``."""
        return None

    async def on_request_body(
        self, flow: FlowInfo, request: Request, chunk: bytes, *, end: bool
    ) -> Block | None:
        """Called with each chunk of a request body before it is forwarded upstream.

        ``end`` is true on the last call (its ``chunk`` may be empty). Return a :class:`Block`
        to stop the upload: the request head has already gone upstream, so both connections
        are closed at once (decision-log reason ``blocked_in_body``) and the origin never sees
        the rest of the body.
        """
        return None

    async def on_response_body(
        self, flow: FlowInfo, request: Request, response: Response, chunk: bytes, *, end: bool
    ) -> Block | None:
        """Called with each chunk of a response body before it is forwarded to the client.

        ``end`` is true on the last call (its ``chunk`` may be empty). Return a :class:`Block`
        to stop the download: the head has already gone to the client, so both connections are
        closed at once and the client sees a truncated, failed response (reason
        ``blocked_in_body``). To answer with a block page instead, decide in
        :meth:`on_response` with ``body_limit`` set.
        """
        return None

    async def on_websocket_message(
        self, flow: FlowInfo, message: WebSocketMessage
    ) -> WebSocketMessage | DropMessage | WebSocketClose | None:
        """Called for each whole WebSocket message, either way, reassembled and decompressed.

        Return ``None`` to pass it, a :class:`WebSocketMessage` to send instead (text or binary;
        same ``from_client``), :class:`DropMessage` to leave it out, or :class:`WebSocketClose`
        to close the WebSocket on both sides.
        """
        return None


def overrides(hooks: Hooks, name: str) -> bool:
    """Does ``hooks`` replace the default :class:`Hooks` method ``name`` (or delegate it)?"""
    method = getattr(hooks, name)
    return getattr(method, "__func__", method) is not getattr(Hooks, name)


class BodyTap:
    """Feeds body chunks to the embedder's body hooks, for any relay.

    A hook costs an await per chunk, so the calls are made only when ``hooks`` overrides the
    body methods. A :class:`Block` raises :class:`~tlsmitm.TlsMitmError` with reason
    ``blocked_in_body``: the relay's caller closes both sides.
    """

    def __init__(self, hooks: Hooks, flow: FlowInfo) -> None:
        self._hooks = hooks
        self._flow = flow
        self._requests = overrides(hooks, "on_request_body")
        self._responses = overrides(hooks, "on_response_body")
        self._decode = bool(getattr(hooks, "decode_bodies", False))
        # One decoder per message whose body is under way (several at once over HTTP/2),
        # holding the message itself so that its id cannot be reused meanwhile.
        self._decoders: dict[int, tuple[object, BodyDecoder]] = {}

    def _decoded(self, message: Request | Response, chunk: bytes, *, end: bool) -> bytes:
        """``chunk`` with the message's Content-Encoding undone (when ``decode_bodies``).

        Raises:
            UpstreamError: the body cannot be decoded (``unknown_encoding``, ``bad_encoding``,
                ``decompression_bomb``).
        """
        if not self._decode:
            return chunk
        entry = self._decoders.get(id(message))
        if entry is None or entry[0] is not message:
            codings = [v for k, v in message.headers if k.lower() == b"content-encoding"]
            entry = (message, BodyDecoder(parse_content_encoding(codings)))
            if len(self._decoders) >= 256:  # bodies abandoned without an end (reset streams)
                self._decoders.clear()
            self._decoders[id(message)] = entry
        decoder = entry[1]
        out = decoder.feed(chunk)
        if end:
            del self._decoders[id(message)]
            out += decoder.finish()
        return b"".join(out)

    @property
    def sees_request_bodies(self) -> bool:
        """Whether :meth:`request` calls a hook (otherwise a relay can skip it entirely)."""
        return self._requests

    @property
    def sees_response_bodies(self) -> bool:
        """Whether :meth:`response` calls a hook (otherwise a relay can skip it entirely)."""
        return self._responses

    async def request(self, request: Request, chunk: bytes, *, end: bool) -> None:
        """Show ``chunk`` of ``request``'s body to the hooks, before it is forwarded."""
        if self._requests:
            chunk = self._decoded(request, chunk, end=end)
            outcome = await self._hooks.on_request_body(self._flow, request, chunk, end=end)
            if isinstance(outcome, Block):
                raise TlsMitmError("a hook blocked the request body", reason="blocked_in_body")

    async def response(
        self, request: Request, response: Response, chunk: bytes, *, end: bool
    ) -> None:
        """Show ``chunk`` of ``response``'s body to the hooks, before it is forwarded."""
        if self._responses:
            chunk = self._decoded(response, chunk, end=end)
            outcome = await self._hooks.on_response_body(
                self._flow, request, response, chunk, end=end
            )
            if isinstance(outcome, Block):
                raise TlsMitmError("a hook blocked the response body", reason="blocked_in_body")
