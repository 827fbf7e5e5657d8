"""What the embedder sees of the traffic: flow information, messages, hooks, blocks.

These types do not depend on the protocol that carried a message: every relay of decrypted
traffic builds them and calls the same :class:`Hooks`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Block", "FlowInfo", "Headers", "Hooks", "Request", "Response", "first_header"]

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
        verified: whether the upstream certificate verified without errors.
    """

    client: str
    host: str
    port: int
    verified: bool


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

    Every method may be a coroutine; the defaults pass everything unchanged. A hook that raises
    is logged and the connection is closed: content inspection fails closed.

    Attributes:
        body_limit: bytes of response body to buffer for :meth:`on_response` (0: heads only).
            Bodies larger than this are streamed and the hook sees ``truncated=True``.
    """

    body_limit: int = 0

    async def on_request(self, flow: FlowInfo, request: Request) -> Request | Block | None:
        """Called for each request head; return a new request, a :class:`Block`, or ``None``."""
        return None

    async def on_response(
        self, flow: FlowInfo, request: Request, response: Response
    ) -> Response | Block | None:
        """Called for each response head; return a new response, a :class:`Block`, or ``None``."""
        return None
