"""A tiny "antivirus" built on tlsmitm: block HTTPS responses that carry the EICAR test string.

Run it, point a client at it, and fetch a page that contains the EICAR test string: the client is
redirected to a block page on tlsmitm's error origin (``https://error.invalid/``), never shown a
page inside the site's own origin.

    python examples/eicar_filter.py --listen 127.0.0.1:8080 --state-dir /tmp/eicar-state

This is the shape of a real product: the interception, verification, HSTS and error handling come
from tlsmitm; the product adds its own inspection in :class:`Hooks`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import trio

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
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO)
    interceptor = tlsmitm.Interceptor.from_state_dir(args.state_dir, hooks=EicarScanner())
    print(f"trust {args.state_dir / 'ca' / 'root.pem'} and use http://{args.listen} as proxy")
    trio.run(interceptor.serve, host, int(port))


if __name__ == "__main__":
    main()
