"""``python -m tlsmitm serve``: run the intercepting proxy.

The flags are a contract (scripts and service units depend on them): keep them stable.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path

import trio
from cryptography import x509

from ._cli import default_state_dir
from ._errors import TlsMitmError

__all__ = ["parse_listen", "parse_resolve", "register"]

DEFAULT_LISTEN = "127.0.0.1:8080"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def parse_resolve(text: str) -> tuple[str, str]:
    """``NAME=ADDR`` (like curl's ``--resolve``) -> ``(name, address)``."""
    name, sep, address = text.partition("=")
    if not sep or not name or not address:
        raise argparse.ArgumentTypeError(f"expected NAME=ADDR, got {text!r}")
    from ._names import normalize_host

    try:
        return normalize_host(name), address
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def load_pem_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file; a clear error when there is none."""
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read certificates from {path}: {exc}") from exc
    return certs


def add_upstream_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments ``serve`` and ``check`` share."""
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the CA and state live (default: $XDG_DATA_HOME/tlsmitm)",
    )
    parser.add_argument(
        "--extra-roots",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="also trust these roots upstream (enterprise CAs); may be repeated",
    )
    parser.add_argument(
        "--resolve",
        type=parse_resolve,
        action="append",
        default=[],
        metavar="NAME=ADDR",
        help="connect to ADDR for NAME, like curl --resolve; may be repeated",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` command."""
    parser = subparsers.add_parser(
        "serve",
        help="run the intercepting proxy",
        description="Run the intercepting HTTPS proxy (explicit proxy: clients send CONNECT).",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=parse_listen(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_LISTEN}; port 0 picks a free port)",
    )
    add_upstream_arguments(parser)
    parser.add_argument(
        "--error-mode",
        choices=("native", "page"),
        default="native",
        help="how certificate errors are shown: the browser's own warning (native, default) "
        "or tlsmitm's page on https://error.invalid/ (page)",
    )
    parser.add_argument(
        "--bypass",
        action="append",
        default=[],
        metavar="PATTERN",
        help="never intercept matching connections (host, *.suffix, .suffix, CIDR, "
        "client:CIDR, port:N, category:NAME); may be repeated",
    )
    parser.add_argument("--rules", type=Path, default=None, help="bypass rules file (TOML)")
    parser.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="connections come from a TCP load balancer that sends a PROXY protocol v1/v2 "
        "header (HAProxy send-proxy-v2); needs --trusted-balancers",
    )
    parser.add_argument(
        "--trusted-balancers",
        action="append",
        default=[],
        metavar="CIDR",
        type=_network,
        help="the load balancers allowed to send PROXY headers (others are refused); repeatable",
    )
    parser.add_argument(
        "--state",
        default=None,
        metavar="URL",
        help="where the users' journey state lives (HSTS, pages, overrides, learned bypasses): "
        "redis://HOST:PORT/DB to share it between machines (default: SQLite in --state-dir)",
    )
    parser.add_argument("--keylog", type=Path, default=None, help="append TLS secrets here")
    parser.add_argument("--max-connections", type=int, default=10_000)
    parser.add_argument(
        "--upstream-pool-seconds",
        type=_non_negative_seconds,
        default=4.0,
        metavar="SECONDS",
        help="keep a clean, verified, idle upstream connection this long for the same client's "
        "next connection to the same server (default 4; 0 turns pooling off)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    parser.set_defaults(func=run)


def _network(text: str) -> IPv4Network | IPv6Network:
    try:
        return ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address or CIDR network: {text!r}") from None


def _non_negative_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {text!r}")
    return seconds


def build_interceptor(args: argparse.Namespace) -> object:
    """The :class:`~tlsmitm.Interceptor` the arguments describe."""
    from ._relay import Interceptor, InterceptorConfig

    state_dir: Path = args.state_dir or default_state_dir()
    extra_roots = [cert for path in args.extra_roots for cert in load_pem_certificates(path)]
    config = InterceptorConfig(
        resolve=dict(args.resolve),
        keylog_path=getattr(args, "keylog", None),
        max_connections=getattr(args, "max_connections", 10_000),
        upstream_pool_seconds=getattr(args, "upstream_pool_seconds", 4.0),
        proxy_protocol=getattr(args, "proxy_protocol", False),
        trusted_balancers=tuple(getattr(args, "trusted_balancers", ())),
    )
    return Interceptor.from_state_dir(
        state_dir,
        extra_roots=extra_roots,
        error_profile=getattr(args, "error_mode", "native"),
        bypass=getattr(args, "bypass", []),
        rules_file=getattr(args, "rules", None),
        config=config,
        state=getattr(args, "state", None),
    )


def warn_if_trust_store_is_old() -> None:
    """Print a warning when certifi's root bundle is older than a year (it must not rot)."""
    from datetime import UTC, datetime

    from ._verify import trust_store_warning

    warning = trust_store_warning(datetime.now(UTC))
    if warning:
        print(f"tlsmitm: warning: {warning}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Start the proxy; returns when it was stopped by SIGINT or SIGTERM."""
    from ._relay import Interceptor

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        interceptor = build_interceptor(args)
    except (TlsMitmError, argparse.ArgumentTypeError, ValueError) as exc:
        print(f"tlsmitm: {exc}", file=sys.stderr)
        return 2
    assert isinstance(interceptor, Interceptor)
    if interceptor.state_problem:
        # One line, at start: the deployer hears about it now, not at the first HSTS header.
        logging.getLogger("tlsmitm.state").warning("%s", interceptor.state_problem)
    warn_if_trust_store_is_old()
    from ._ca import ROOT_CERT_FILE

    ca_dir = interceptor.ca.ca_dir
    assert ca_dir is not None  # from_state_dir always has one
    root_pem = ca_dir / ROOT_CERT_FILE
    host, port = args.listen

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                addresses = await nursery.start(interceptor.serve, host, port)
                bound_host, bound_port = addresses[0][0], addresses[0][1]
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                proxy = f"http://{shown}:{bound_port}"
                print(f"tlsmitm is listening on {proxy}", flush=True)
                print(f"CA certificate (trust this in clients): {root_pem}")
                print(
                    "Trust it: see docs/trust.rst, or e.g. "
                    f"sudo cp {root_pem} /usr/local/share/ca-certificates/tlsmitm.crt "
                    "&& sudo update-ca-certificates"
                )
                print(f"Try it:   curl --proxy {proxy} --cacert {root_pem} https://example.com/")
                print("Stop with Ctrl-C; SIGHUP reloads the bypass rules.", flush=True)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        # Reload the bypass rule file; a broken file keeps the old rules.
                        try:
                            interceptor.policy.reload()
                            print("tlsmitm: bypass rules reloaded", flush=True)
                        except TlsMitmError as exc:
                            print(f"tlsmitm: rules not reloaded: {exc}", file=sys.stderr)
                        continue
                    print("tlsmitm: shutting down (finishing open connections)", flush=True)
                    interceptor.shutdown()
                    break

    trio.run(main)
    return 0
