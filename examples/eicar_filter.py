"""A tiny "antivirus" built on tlsmitm: block HTTPS responses that carry the EICAR test string.

Run it, point a client at it, and fetch a page that contains the EICAR test string: the client is
redirected to a block page on tlsmitm's error origin (``https://error.invalid/``), never shown a
page inside the site's own origin.

    .venv/bin/python examples/eicar_filter.py --listen 127.0.0.1:8080 --state-dir /tmp/eicar-state

To try it without internet, point it at a local test server (its root in ``--extra-roots``,
its name mapped to 127.0.0.1 with ``--resolve``), exactly as ``tlsmitm serve`` takes them::

    .venv/bin/python examples/eicar_filter.py --state-dir /tmp/eicar-state \
        --extra-roots origin-root.pem --resolve shop.test=127.0.0.1

This is the shape of a real product: the interception, verification, HSTS and error handling come
from tlsmitm; the product adds its own inspection in :class:`Hooks`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import trio
from cryptography import x509

import tlsmitm

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


class EicarScanner(tlsmitm.Hooks):
    """Buffers up to 8 MiB of each response and blocks it when it contains EICAR."""

    body_limit = 8 * 1024 * 1024

    def __init__(self) -> None:
        self.blocked = 0

    async def on_response(
        self, flow: tlsmitm.FlowInfo, request: tlsmitm.Request, response: tlsmitm.Response
    ) -> tlsmitm.Response | tlsmitm.Block | None:
        if response.body is not None and EICAR in response.body:
            self.blocked += 1
            logging.getLogger("eicar").warning("blocked EICAR from %s", flow.host)
            return tlsmitm.Block(
                title="A virus was blocked",
                explanation="This download contained the EICAR test virus, so it was stopped.",
            )
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8080")
    parser.add_argument("--state-dir", type=Path, default=Path("eicar-state"))
    parser.add_argument(
        "--extra-roots", type=Path, action="append", default=[], help="also trust these roots"
    )
    parser.add_argument(
        "--resolve", action="append", default=[], metavar="NAME=ADDR", help="like curl"
    )
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO)
    roots = [
        cert
        for path in args.extra_roots
        for cert in x509.load_pem_x509_certificates(path.read_bytes())
    ]
    resolve = dict(entry.split("=", 1) for entry in args.resolve)
    interceptor = tlsmitm.Interceptor.from_state_dir(
        args.state_dir,
        hooks=EicarScanner(),
        extra_roots=roots,
        config=tlsmitm.InterceptorConfig(resolve=resolve),
    )

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(interceptor.serve, host, int(port))
            bound = f"{addresses[0][0]}:{addresses[0][1]}"
            print(f"trust {args.state_dir / 'ca' / 'root.pem'} and use http://{bound} as proxy")
            print("listening", flush=True)

    trio.run(serve)


if __name__ == "__main__":
    main()
