"""``python -m tlsmitm check HOST[:PORT]``: would tlsmitm intercept this site, and if not, why?

The support engineer's tool for "the site works without the filter but not with it": it connects
exactly as the proxy does, runs the same verification and the same error plan, and prints the
verdict, the chain and the reasons.

Exit codes (stable, documented in docs/cli.rst):

* 0 -- the upstream verified; it would be intercepted normally.
* 2 -- usage or configuration error.
* 3 -- certificate error a user may override (expired, unknown issuer, name mismatch...).
* 4 -- certificate error with no way through (revoked, weak crypto, HSTS host...).
* 5 -- cannot connect (DNS, refused, timeout).
* 6 -- the TLS handshake failed (e.g. the server speaks only TLS 1.0 or broken suites).
* 7 -- the server asks for a client certificate (tlsmitm would splice it, not intercept).
"""

from __future__ import annotations

import argparse
import sys

import trio
from cryptography.hazmat.primitives import hashes

from ._errors import CertError, TlsMitmError, UpstreamError

__all__ = ["EXIT_CODES", "register"]

EXIT_CODES = {
    "ok": 0,
    "usage": 2,
    "overridable": 3,
    "refused": 4,
    "connect": 5,
    "handshake": 6,
    "client_certificate": 7,
}


def _split_target(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "443"
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, "443"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}")
    return host, int(port)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``check`` command."""
    from ._cli_serve import add_upstream_arguments

    parser = subparsers.add_parser(
        "check",
        help="check an upstream exactly as the proxy would",
        description="Connect to HOST[:PORT] (default port 443), verify it as the proxy would "
        "and print the verdict. Exit status: 0 intercepted normally, 3 overridable certificate "
        "error, 4 refused with no override, 5 cannot connect, 6 TLS handshake failed, "
        "7 client certificate required (would be spliced).",
    )
    parser.add_argument("target", type=_split_target, metavar="HOST[:PORT]")
    add_upstream_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the check and print the result."""
    from ._cli_serve import build_interceptor, warn_if_trust_store_is_old
    from ._relay import Interceptor
    from ._responder import ActionKind

    args.error_mode = "native"
    try:
        interceptor = build_interceptor(args)
    except (TlsMitmError, argparse.ArgumentTypeError) as exc:
        print(f"tlsmitm: {exc}", file=sys.stderr)
        return EXIT_CODES["usage"]
    assert isinstance(interceptor, Interceptor)
    warn_if_trust_store_is_old()
    host, port = args.target
    try:
        result = trio.run(interceptor.check_upstream, host, port)
    except UpstreamError as exc:
        print(f"{host}:{port}: cannot connect: {exc}")
        return EXIT_CODES["connect"]
    except TlsMitmError as exc:
        print(f"{host}:{port}: {exc}")
        return EXIT_CODES["usage"]
    out = sys.stdout
    print(f"host:        {result.host}:{result.port}", file=out)
    print(f"TLS:         {result.tls_version or '-'} {result.cipher or ''}".rstrip(), file=out)
    print(f"ALPN:        {(result.alpn or b'-').decode('ascii', 'replace')}", file=out)
    print(f"HSTS known:  {'yes' if result.hsts_known else 'no'}", file=out)
    for index, cert in enumerate(result.chain):
        fingerprint = cert.fingerprint(hashes.SHA256()).hex(":")
        print(f"chain[{index}]:    {cert.subject.rfc4514_string()}", file=out)
        print(f"             issuer {cert.issuer.rfc4514_string()}", file=out)
        print(
            f"             valid {cert.not_valid_before_utc:%Y-%m-%d} .. "
            f"{cert.not_valid_after_utc:%Y-%m-%d}  sha256 {fingerprint}",
            file=out,
        )
    if result.client_certificate_requested:
        print(
            "verdict:     the server asks for a client certificate; tlsmitm splices such "
            "sites (the browser talks to them directly)",
            file=out,
        )
        return EXIT_CODES["client_certificate"]
    verdict = result.verdict
    assert verdict is not None
    assert result.action is not None
    if verdict.ok:
        print("verdict:     OK -- would be intercepted normally", file=out)
        return EXIT_CODES["ok"]
    error = verdict.error
    print(
        f"verdict:     REFUSED -- {error.value if error else 'error'}: {verdict.detail}", file=out
    )
    print(f"action:      {result.action.kind.value}", file=out)
    if error is CertError.PROTOCOL:
        return EXIT_CODES["handshake"]
    if result.action.kind in (ActionKind.PASSTHROUGH_UNTRUSTED, ActionKind.OVERRIDE_PAGE):
        print(
            "             (a user may choose to proceed, in the browser's own warning or on "
            "tlsmitm's page)",
            file=out,
        )
        return EXIT_CODES["overridable"]
    print(
        "             (no way through: not overridable"
        + (", and the host is a known HSTS host)" if result.hsts_known else ")"),
        file=out,
    )
    return EXIT_CODES["refused"]
