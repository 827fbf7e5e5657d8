"""Run inside a private network namespace (``unshare --net``): transparent interception for real.

iptables redirects connections for 127.0.0.3:443 to tlsmitm's transparent listener, which reads
the original destination with SO_ORIGINAL_DST and intercepts; the origin listens on
127.0.0.1:443 (the interceptor's ``resolve`` maps the original destination there, so its own
upstream connection is not redirected again). Prints one JSON line with what the client saw.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).parent))

from origin import OriginStats, serve_tls, server_ssl_context
from pki import good_hierarchy

from tlsmitm import (
    CertificateAuthority,
    HstsStore,
    Interceptor,
    InterceptorConfig,
    PreloadList,
    TrustConfig,
    UpstreamVerifier,
    original_destination,
)

HOST = "www.example.test"
PROXY_PORT = 15001


def setup_namespace() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(
        [
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "127.0.0.3",
            "--dport",
            "443",
            "-j",
            "REDIRECT",
            "--to-ports",
            str(PROXY_PORT),
        ],
        check=True,
    )


async def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    hierarchy = good_hierarchy(HOST)
    origin_context = server_ssl_context(hierarchy.leaf, tmp)
    stats = OriginStats()
    ca = CertificateAuthority.ephemeral(now=dt.datetime.now(dt.UTC))
    interceptor = Interceptor(
        ca=ca,
        verifier=UpstreamVerifier(
            TrustConfig(
                replace_bundle=(hierarchy.root.cert,), own_certificates=ca.own_certificates()
            )
        ),
        hsts=HstsStore(preload=PreloadList.empty()),
        config=InterceptorConfig(resolve={"127.0.0.3": "127.0.0.1"}),
    )
    destinations: list[tuple[str, int]] = []

    async def transparent(stream: trio.SocketStream) -> None:
        destination = original_destination(stream.socket)  # type: ignore[arg-type]
        destinations.append(destination)
        peer = stream.socket.getpeername()
        await interceptor.handle(stream, client=(peer[0], peer[1]), destination=destination)

    async def origin(stream: trio.SocketStream) -> None:
        await serve_tls(stream, origin_context, stats)

    def client() -> dict[str, object]:
        context = ssl.create_default_context(cadata=ca.export_root().decode())
        context.set_alpn_protocols(["http/1.1"])
        import socket

        with (
            socket.create_connection(("127.0.0.3", 443), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=HOST) as tls,
        ):
            issuer = dict(x[0] for x in tls.getpeercert()["issuer"])
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        return {"body": data.split(b"\r\n\r\n", 1)[1].decode(), "issuer": issuer}

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(trio.serve_tcp, origin, 443, host="127.0.0.1"))
        await nursery.start(
            functools.partial(trio.serve_tcp, transparent, PROXY_PORT, host="127.0.0.1")
        )
        with trio.fail_after(20):
            seen = await trio.to_thread.run_sync(client)
        nursery.cancel_scope.cancel()
    print(
        json.dumps({**seen, "destinations": destinations, "origin_requests": len(stats.requests)})
    )


if __name__ == "__main__":
    setup_namespace()
    trio.run(main)
