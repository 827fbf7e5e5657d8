"""``tlsmitm demo`` (``./run demo``): what tlsmitm does, in under a minute, without internet.

Everything runs on 127.0.0.1 in a temporary directory: a small HTTPS origin with a certificate
from a demo CA of its own (``shop.demo.test``, and ``expired.demo.test`` whose certificate
expired), the proxy (trusting the demo CA upstream, as ``--extra-roots`` would), and a client
that trusts only this installation's tlsmitm root. It shows:

1. a request going through: the origin's certificate next to the one tlsmitm forged, and the
   decision record (decision, reason, verdict);
2. an expired certificate: no forged trusted leaf, a redirect to the error page on
   ``https://error.invalid/`` (``--error-mode page``) instead;
3. an EICAR test-virus download blocked by a hook (what an antivirus product adds);
4. what to try next.
"""

from __future__ import annotations

import datetime as dt
import functools
import ssl
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from ._decisionlog import ConnectionRecord
    from ._relay import FlowInfo, Request, Response

__all__ = ["EICAR", "run_demo"]

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SHOP = "shop.demo.test"
EXPIRED = "expired.demo.test"
_TIMEOUT = 20.0


# -- the demo origin's PKI ----------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlsmitm demo origin"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _demo_pki(
    directory: Path, now: dt.datetime
) -> tuple[x509.Certificate, dict[str, tuple[Path, Path, x509.Certificate]]]:
    """A demo root and a leaf for each demo host (the second one expired)."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (
        x509.CertificateBuilder()
        .subject_name(_name("Demo Origin Root"))
        .issuer_name(_name("Demo Origin Root"))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    leaves: dict[str, tuple[Path, Path, x509.Certificate]] = {}
    for host, (start, end) in {
        SHOP: (now - dt.timedelta(days=1), now + dt.timedelta(days=20)),
        EXPIRED: (now - dt.timedelta(days=20), now - dt.timedelta(days=2)),
    }.items():
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
            )
            .sign(root_key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{host}.pem", directory / f"{host}.key"
        cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        leaves[host] = (cert_path, key_path, leaf)
    return root, leaves


# -- the demo origin ----------------------------------------------------------------------------


async def _origin_connection(stream: trio.SocketStream, context: ssl.SSLContext) -> None:
    tls = trio.SSLStream(stream, context, server_side=True)
    conn = h11.Connection(h11.SERVER)
    try:
        with trio.move_on_after(_TIMEOUT):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await tls.receive_some(65536)))
                    continue
                if not isinstance(event, h11.Request):
                    return
                while not isinstance(conn.next_event(), h11.EndOfMessage):
                    conn.receive_data(bytes(await tls.receive_some(65536)))
                if bytes(event.target) == b"/eicar.com":
                    body, kind = EICAR, b"application/octet-stream"
                else:
                    body, kind = b"Hello from the demo shop!\n", b"text/plain"
                headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
                data = conn.send(h11.Response(status_code=200, headers=headers)) or b""
                data += (conn.send(h11.Data(data=body)) or b"") + (
                    conn.send(h11.EndOfMessage()) or b""
                )
                await tls.send_all(data)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(tls)


async def _start_origin(nursery: trio.Nursery, cert: Path, key: Path) -> int:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])

    async def handler(stream: trio.SocketStream) -> None:
        await _origin_connection(stream, context)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


# -- the client ---------------------------------------------------------------------------------


async def _fetch(
    proxy_port: int, host: str, port: int, path: str, context: ssl.SSLContext
) -> tuple[int, dict[str, str], bytes, x509.Certificate]:
    """GET https://host:port/path through the proxy; status, headers, body, the leaf it saw."""
    with trio.fail_after(_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        try:
            await stream.send_all(
                f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            )
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    raise RuntimeError("the proxy closed the connection")
                answer += chunk
            tls = trio.SSLStream(stream, context, server_hostname=host)
            await tls.do_handshake()
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            leaf = x509.load_der_x509_certificate(der)
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method="GET", target=path, headers=[("Host", host), ("Connection", "close")]
            )
            await tls.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
            status, headers, body = 0, {}, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await tls.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            await trio.aclose_forcefully(tls)
            return status, headers, body, leaf
        finally:
            await trio.aclose_forcefully(stream)


def _describe(cert: x509.Certificate) -> str:
    def common_name(name: x509.Name) -> str:
        values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        value = values[0].value if values else "-"
        return value.decode("latin-1") if isinstance(value, bytes) else value

    return (
        f"subject CN={common_name(cert.subject)}, issuer CN={common_name(cert.issuer)}, "
        f"valid {cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d}, "
        f"sha256 {cert.fingerprint(hashes.SHA256()).hex()[:16]}..."
    )


# -- the demo -----------------------------------------------------------------------------------


async def run_demo(
    state_dir: Path, work_dir: Path, out: Callable[[str], None] = print
) -> dict[str, object]:
    """Run the demo; returns what it observed (for tests): records, statuses, locations."""
    from ._ca import ROOT_CERT_FILE
    from ._cli_serve import load_pem_certificates
    from ._relay import Block, Hooks, Interceptor, InterceptorConfig

    class EicarHook(Hooks):
        """What an antivirus adds: buffer response bodies and block the EICAR test file."""

        body_limit = 1 << 20

        async def on_response(
            self, flow: FlowInfo, request: Request, response: Response
        ) -> Response | Block | None:
            if response.body is not None and EICAR in response.body:
                return Block(
                    title="A virus was blocked",
                    explanation="This download contained the EICAR test virus.",
                )
            return None

    now = dt.datetime.now(dt.UTC)
    root, leaves = _demo_pki(work_dir, now)
    roots = work_dir / "demo-origin-root.pem"
    roots.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    seen: dict[str, object] = {}
    records: list[ConnectionRecord] = []
    out("tlsmitm demo: everything on 127.0.0.1, nothing from the internet.\n")
    async with trio.open_nursery() as nursery:
        shop_port = await _start_origin(nursery, *leaves[SHOP][:2])
        expired_port = await _start_origin(nursery, *leaves[EXPIRED][:2])
        interceptor = Interceptor.from_state_dir(
            state_dir,
            extra_roots=load_pem_certificates(roots),
            error_profile="page",
            hooks=EicarHook(),
            config=InterceptorConfig(resolve={SHOP: "127.0.0.1", EXPIRED: "127.0.0.1"}),
        )
        send, receive = trio.open_memory_channel["ConnectionRecord"](16)

        def note(record: ConnectionRecord) -> None:  # on the event loop's thread
            records.append(record)
            send.send_nowait(record)

        interceptor.decision_log.subscribe(note)
        addresses = await nursery.start(interceptor.serve, "127.0.0.1", 0)
        proxy_port = int(addresses[0][1])
        ca_dir = interceptor.ca.ca_dir
        assert ca_dir is not None
        tlsmitm_root = ca_dir / ROOT_CERT_FILE
        out(f"An HTTPS origin for {SHOP} and {EXPIRED} (its own demo CA) and the proxy on")
        out(f"http://127.0.0.1:{proxy_port}, which trusts the demo CA upstream (--extra-roots).")
        out(f"The client trusts only this installation's tlsmitm root: {tlsmitm_root}\n")
        client = ssl.create_default_context(cafile=str(tlsmitm_root))
        client.set_alpn_protocols(["http/1.1"])  # as browsers do: tlsmitm can then show pages

        async def settle() -> ConnectionRecord:
            with trio.fail_after(_TIMEOUT):
                return await receive.receive()

        out(f"1. GET https://{SHOP}/ through the proxy")
        status, _, body, forged = await _fetch(proxy_port, SHOP, shop_port, "/", client)
        record = await settle()
        out(f"   answer:   {status} {body.decode().strip()!r}")
        out(f"   origin's certificate: {_describe(leaves[SHOP][2])}")
        out(f"   forged by tlsmitm:    {_describe(forged)}")
        out(f"   decision: {record.decision}, reason {record.reason}, verdict {record.verdict}\n")
        seen["ok"] = (status, body, record)

        out(f"2. GET https://{EXPIRED}/ (its certificate expired two days ago)")
        status, headers, _, _ = await _fetch(proxy_port, EXPIRED, expired_port, "/", client)
        record = await settle()
        location = headers.get("location", "")
        out(f"   answer:   {status}, redirected to {location.split('?')[0]}")
        out("   Nothing from that server reached the client: the answer is a redirect to the")
        out("   error page, on its own origin, which the site's scripts cannot read.")
        out(f"   decision: {record.decision}, reason {record.reason}, verdict {record.verdict}\n")
        seen["expired"] = (status, location, record)

        out(f"3. GET https://{SHOP}/eicar.com (the EICAR test virus)")
        status, headers, _, _ = await _fetch(proxy_port, SHOP, shop_port, "/eicar.com", client)
        location = headers.get("location", "")
        out(f"   answer:   {status}, redirected to {location.split('?')[0]}")
        out("   A hook (Hooks.on_response) saw the body and blocked it: the product's part.\n")
        seen["eicar"] = (status, location)

        interceptor.shutdown()
        nursery.cancel_scope.cancel()
    out("4. Try next:")
    out("   ./run serve                      the proxy on 127.0.0.1:8080 (./run serve --help)")
    out("   ./run check example.com          verify a site as the proxy would (needs internet)")
    out("   ./run ca show                    your CA, its fingerprints and key protection")
    out("   ./run ca install --nss-db DIR    trust your CA in a browser profile (and uninstall)")
    out("   ./run serve --scan clamd:///run/clamav/clamd.ctl   scan downloads with ClamAV")
    out("   examples/eicar_filter.py         the hook above as a program; docs/tutorial.rst")
    seen["records"] = records
    return seen


def main() -> int:
    """``tlsmitm demo``: run the demo in a temporary directory; 0 when every step worked."""
    with tempfile.TemporaryDirectory(prefix="tlsmitm-demo-") as work:
        seen = trio.run(run_demo, Path(work) / "state", Path(work))
    ok_status = seen["ok"][0] if isinstance(seen.get("ok"), tuple) else 0  # type: ignore[index]
    if ok_status != 200:
        print("tlsmitm demo: the first request did not go through", file=sys.stderr)
        return 1
    return 0
