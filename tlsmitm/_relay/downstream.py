"""The client side of a connection: peeking the ClientHello and the handshake with our leaf."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio
from cryptography import x509
from OpenSSL import SSL

from .._clienthello import NEED_MORE, ClientHello, ClientHelloError, parse_client_hello
from .._errors import ClientError
from .._forge import ForgedLeaf, IssuerKind
from .._tls import TLSStream, server_connection, server_context
from .streams import RECEIVE

if TYPE_CHECKING:
    from .interceptor import Interceptor

__all__ = ["Downstream", "NotTLS"]

# Alerts a client sends when it rejects our certificate (RFC 8446 §6.2): the pinning signal.
_REJECTION_ALERTS = frozenset({"unknown_ca", "bad_certificate", "certificate_unknown"})


class NotTLS(Exception):
    """The client's first bytes are not a TLS ClientHello; ``args[0]`` holds them."""


class Downstream:
    """Peeks ClientHellos and runs client handshakes for one :class:`~tlsmitm.Interceptor`.

    Keeps one server ``SSL.Context`` per leaf chain (the intermediates sent with leaves).

    Args:
        interceptor: whose config, policy, clock and stats are used.
        keylog: the TLS key log callback, if any.
    """

    def __init__(self, interceptor: Interceptor, keylog: Callable[[bytes], None] | None) -> None:
        self._ix = interceptor
        self._keylog = keylog
        self._contexts: dict[tuple[x509.Certificate, ...], SSL.Context] = {}

    async def peek_hello(
        self, stream: trio.abc.Stream, initial: bytes
    ) -> tuple[bytes, ClientHello]:
        """Read until a complete ClientHello is in hand; returns the bytes read and the hello.

        Raises:
            NotTLS: the bytes are not TLS (they travel in the exception).
            ClientError: the client closed first, or sent a malformed hello.
            trio.TooSlowError: no complete hello within ``handshake_timeout``.
        """
        data = bytearray(initial)
        with trio.fail_after(self._ix.config.handshake_timeout):
            while True:
                if data:
                    try:
                        result = parse_client_hello(bytes(data))
                    except ClientHelloError as exc:
                        if exc.reason == "not_tls":
                            raise NotTLS(bytes(data)) from exc
                        raise
                    if result is not NEED_MORE:
                        assert isinstance(result, ClientHello)
                        return bytes(data), result
                chunk = await stream.receive_some(RECEIVE)
                if not chunk:
                    raise ClientError(
                        "client closed before its ClientHello was complete",
                        reason="truncated_hello",
                    )
                data += chunk

    def context_for(self, leaf: ForgedLeaf) -> SSL.Context:
        """The server context that sends ``leaf``'s chain (one per chain, built once)."""
        context = self._contexts.get(leaf.chain)
        if context is None:
            context = server_context(leaf.ssl_chain, keylog=self._keylog)
            self._contexts[leaf.chain] = context
        return context

    async def handshake(
        self,
        client_stream: trio.abc.Stream,
        peeked: bytes,
        leaf: ForgedLeaf,
        alpn: bytes | None,
        client: tuple[str, int],
        name: str,
        port: int,
    ) -> TLSStream:
        """Step 8: the TLS handshake with the client, presenting ``leaf`` and ``alpn``.

        A client that rejects a trusted leaf with a certificate alert is noted for the policy
        (pinning: the next connection is bypassed).
        """
        ix = self._ix
        context = self.context_for(leaf)
        connection = server_connection(context, leaf.ssl_certificate, leaf.ssl_key, alpn=alpn)
        downstream = TLSStream(
            client_stream,
            connection,
            server_side=True,
            initial_data=peeked,
            max_refill_bytes=RECEIVE,
        )
        try:
            with trio.fail_after(ix.config.handshake_timeout):
                await downstream.do_handshake()
        except ClientError as exc:
            ix.stats.client_handshake_failures += 1
            alert = getattr(exc, "alert", None)
            if leaf.issuer is IssuerKind.TRUSTED and alert in _REJECTION_ALERTS:
                # A store write: queued to the state writer's thread, off the event loop.
                ix.state_writer.submit(
                    functools.partial(
                        ix.policy.note_client_rejected_leaf,
                        client_ip=client[0],
                        host=name,
                        port=port,
                        now=ix.clock(),
                    )
                )
            raise
        except trio.TooSlowError as exc:
            raise ClientError("client TLS handshake timed out", reason="handshake_timeout") from exc
        return downstream
