"""The upstream side of a connection: dialling, the TLS handshake, verification, and caches.

:class:`Upstreams` keeps what outlives one connection on the upstream side: TLS sessions for
resumption and recent successful verdicts. It reads the interceptor's configuration, verifier,
clock and stats when it needs them, so an embedder that replaces one of them is obeyed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from .._errors import CertError, UpstreamError
from .._names import is_ip_literal, normalize_host
from .._tls import TLSStream, upstream_connection, upstream_context
from .._verify import UpstreamVerifier, Verdict
from .fetch import fetch_http
from .streams import RECEIVE, Connector, close

if TYPE_CHECKING:
    from .interceptor import Interceptor

__all__ = ["UpstreamProbe", "Upstreams"]


@dataclass(slots=True, kw_only=True)
class UpstreamProbe:
    """The upstream side of one connection after the handshake and verification."""

    stream: TLSStream
    verdict: Verdict | None  # None when the server asked for a client certificate
    client_certificate_requested: bool = False


class Upstreams:
    """Opens and checks upstream connections for one :class:`~tlsmitm.Interceptor`.

    Args:
        interceptor: whose config, verifier, clock and stats are used.
        connector: opens TCP connections.
        keylog: the TLS key log callback, if any.
    """

    def __init__(
        self,
        interceptor: Interceptor,
        connector: Connector,
        keylog: Callable[[bytes], None] | None,
    ) -> None:
        self._ix = interceptor
        self._connector = connector
        self.context = upstream_context(keylog=keylog)
        self._sessions: OrderedDict[tuple[str, int], SSL.Session] = OrderedDict()
        self._verdicts: OrderedDict[tuple[str, bytes], tuple[Verdict, datetime]] = OrderedDict()
        # Chain digest -> a success for one of its hosts, the verifier that gave it, expiry.
        self._chains: OrderedDict[bytes, tuple[Verdict, UpstreamVerifier, datetime]] = OrderedDict()

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        """Open a TCP connection to ``host:port`` (``resolve`` applied), within the timeout."""
        config = self._ix.config
        target = config.resolve.get(host, host)
        loop = self._ix._loop
        if loop.is_self(target, port):
            raise UpstreamError(f"{host}:{port} is this proxy itself", reason="loop")
        try:
            with trio.fail_after(config.connect_timeout):
                stream = await self._connector(target, port)
        except trio.TooSlowError as exc:
            raise UpstreamError(
                f"connecting to {host}:{port} timed out", reason="connect_timeout"
            ) from exc
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to {host}:{port}: {exc}", reason="connect_failed"
            ) from exc
        # A name that resolved to one of our own listening addresses (issue 15 fault 2).
        peer = getattr(getattr(stream, "socket", None), "getpeername", None)
        if peer is not None:
            try:
                address = peer()
            except OSError:
                address = None
            if address is not None and loop.is_self(str(address[0]), int(address[1])):
                await close(stream)
                raise UpstreamError(f"{host}:{port} resolves to this proxy itself", reason="loop")
        return stream

    async def probe(
        self, upstream_tcp: trio.abc.Stream, name: str, port: int, offer: Sequence[bytes]
    ) -> UpstreamProbe:
        """Steps 4 and 5: the upstream TLS handshake and the verification of what it presented.

        A failed handshake is not raised: it becomes a :data:`CertError.PROTOCOL` verdict (a
        server speaking only TLS 1.0, or only broken suites), which no profile lets a user
        override. This is exactly what ``python -m tlsmitm check`` runs.
        """
        upstream = TLSStream(
            upstream_tcp,
            upstream_connection(
                self.context,
                server_name=None if is_ip_literal(name) else name,
                alpn_offer=offer,
                session=self._sessions.get((name, port)),
            ),
            server_side=False,
            max_refill_bytes=RECEIVE,
        )
        try:
            with trio.fail_after(self._ix.config.handshake_timeout):
                await upstream.do_handshake()
        except UpstreamError as exc:
            if upstream.client_certificate_requested():
                return UpstreamProbe(
                    stream=upstream, verdict=None, client_certificate_requested=True
                )
            self._ix.stats.upstream_failures += 1
            verdict = Verdict(
                host=name,
                ok=False,
                error=CertError.PROTOCOL,
                detail=f"the TLS handshake with the server failed: {exc}",
                chain=(),
                leaf=None,
                leaf_sha256=None,
            )
            return UpstreamProbe(stream=upstream, verdict=verdict)
        except trio.TooSlowError as exc:
            await close(upstream)
            raise UpstreamError(
                f"TLS handshake with {name}:{port} timed out", reason="handshake_timeout"
            ) from exc
        if upstream.client_certificate_requested():
            return UpstreamProbe(stream=upstream, verdict=None, client_certificate_requested=True)
        verdict = await self.verify(
            upstream.peer_certificate_chain(), name, upstream.stapled_ocsp()
        )
        return UpstreamProbe(stream=upstream, verdict=verdict)

    async def verify(
        self, chain: Sequence[x509.Certificate], name: str, stapled_ocsp: bytes | None
    ) -> Verdict:
        """Verify ``chain`` for ``name``, reusing a recent *successful* verdict for it.

        Browsers cache verification results too. Only successes are cached, keyed by the host,
        the exact chain presented and the stapled OCSP response, for at most
        ``verdict_cache_seconds`` and never past the expiry of any certificate in the path.
        A success also answers for *another* host on the same chain and stapled response, under
        the same bounds, once :meth:`~tlsmitm.UpstreamVerifier.verdict_for_host` has run the
        name checks for that host (anything it cannot decide is verified in full).
        """
        config = self._ix.config
        now = self._ix.clock()
        key = (
            name,
            hashlib.sha256(
                b"".join(c.public_bytes(Encoding.DER) for c in chain) + (stapled_ocsp or b"")
            ).digest(),
        )
        cached = self._verdicts.get(key)
        if cached is not None and cached[1] > now:
            self._verdicts.move_to_end(key)
            return cached[0]
        verifier = self._ix.verifier
        # Another name on the same chain (a wildcard or multi-name certificate): the chain's
        # verdict carries over once the name checks pass for this name (verdict_for_host).
        # Only tlsmitm's own verifier: a subclass may judge more than the chain and the name.
        same_chain = self._chains.get(key[1]) if type(verifier) is UpstreamVerifier else None
        if same_chain is not None and same_chain[1] is verifier and same_chain[2] > now:
            carried = verifier.verdict_for_host(same_chain[0], name, now=now)
            if carried is not None:
                self._chains.move_to_end(key[1])
                self._remember(key, carried, same_chain[2])
                return carried
        verdict = await verifier.verify_with_fetching(
            chain, name, now=now, fetcher=self.fetch, stapled_ocsp=stapled_ocsp
        )
        if verdict.ok and config.verdict_cache_seconds > 0:
            expires = min(
                [now + timedelta(seconds=config.verdict_cache_seconds)]
                + [c.not_valid_after_utc for c in verdict.chain]
            )
            self._remember(key, verdict, expires)
            self._chains[key[1]] = (verdict, verifier, expires)
            self._chains.move_to_end(key[1])
            while len(self._chains) > config.verdict_cache_size:
                self._chains.popitem(last=False)
        return verdict

    def _remember(self, key: tuple[str, bytes], verdict: Verdict, expires: datetime) -> None:
        self._verdicts[key] = (verdict, expires)
        self._verdicts.move_to_end(key)
        while len(self._verdicts) > self._ix.config.verdict_cache_size:
            self._verdicts.popitem(last=False)

    def remember_session(self, key: tuple[str, int], session: SSL.Session) -> None:
        """Keep ``session`` to resume the next connection to ``key`` (bounded, LRU)."""
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        while len(self._sessions) > self._ix.config.session_cache_size:
            self._sessions.popitem(last=False)

    async def fetch(self, url: str, body: bytes | None) -> bytes:
        """Fetch an AIA/OCSP/CRL URL through the same connector (the verifier's fetcher)."""

        async def connect(host: str, port: int) -> trio.abc.Stream:
            return await self.connect(normalize_host(host), port)

        return await fetch_http(url, body, connect=connect, seconds=self._ix.config.fetch_timeout)
