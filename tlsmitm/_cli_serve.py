"""``tlsmitm serve``: run the intercepting proxy.

The flags are a contract (scripts and service units depend on them): keep them stable. Every flag
is validated while the arguments are parsed (exit status 2, one line on stderr); what can only
fail at run time (a port in use, an unreadable state directory) exits with 1, also one line.
"""

from __future__ import annotations

import argparse
import errno
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from cryptography import x509

from ._cli import UsageError, default_state_dir
from ._errors import ConfigurationError, TlsMitmError
from ._metrics import MULTIPROC_ENV
from ._websocket import DEFAULT_MAX_MESSAGE

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._access import AccessPolicy
    from ._scan import ScanSettings

__all__ = ["parse_bypass", "parse_listen", "parse_resolve", "register"]

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_SHUTDOWN_GRACE = 5.0

_Number = TypeVar("_Number", int, float)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> ``(host, port)``.

    The host must be an address of this machine's families or a name that resolves now, so that
    a typo fails here rather than after start-up.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080, got {text!r}"
        )
    if host.startswith("[") != host.endswith("]"):
        raise argparse.ArgumentTypeError(f"unbalanced brackets in {text!r}; write [::1]:8080")
    host = host[1:-1] if host.startswith("[") else host
    host = host or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (OSError, UnicodeError):
            raise argparse.ArgumentTypeError(
                f"cannot listen on {text!r}: {host!r} is neither an IP address nor a name that "
                "resolves; use an address such as 127.0.0.1 or 0.0.0.0"
            ) from None
    return host, int(port)


def parse_resolve(text: str) -> tuple[str, str]:
    """``NAME=ADDR`` (like curl's ``--resolve``) -> ``(name, address)``; ADDR is an IP address."""
    name, sep, address = text.partition("=")
    if not sep or not name or not address:
        raise argparse.ArgumentTypeError(
            f"expected NAME=ADDR such as example.test=127.0.0.1, got {text!r}"
        )
    from ._names import normalize_host

    try:
        address = str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {address!r} is not an IP address; write NAME=ADDR such as {name}=127.0.0.1"
        ) from None
    try:
        return normalize_host(name), address
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from exc


def parse_bypass(text: str) -> str:
    """A ``--bypass`` rule, checked now (:meth:`~tlsmitm.Rule.parse`); returned unchanged.

    The command line has no URL-category engine, so a ``category:`` rule (which could never
    match) is refused too.
    """
    from ._policy import Rule

    try:
        rule = Rule.parse(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if rule.category is not None:
        raise argparse.ArgumentTypeError(
            f"bypass rule {text!r} can never match: the command line has no URL-category "
            "engine (an embedder passes InterceptPolicy(category=...)); bypass by host instead, "
            "such as '.bank.example'"
        )
    return text


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
        type=parse_bypass,
        action="append",
        default=[],
        metavar="PATTERN",
        help="never intercept matching connections (host, *.suffix, .suffix, CIDR, "
        "client:CIDR, port:N); may be repeated",
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
    parser.add_argument(
        "--workers",
        type=_workers_count,
        default=None,
        metavar="N|auto",
        help="worker processes sharing the port (SO_REUSEPORT) under a small supervisor; "
        "default auto = the usable CPUs; 1 = one process, no supervisor",
    )
    parser.add_argument("--worker-of-supervisor", default=None, help=argparse.SUPPRESS)
    add_hostile_client_arguments(parser)
    parser.add_argument(
        "--upstream-pool-seconds",
        type=_non_negative_seconds,
        default=4.0,
        metavar="SECONDS",
        help="keep a clean, verified, idle upstream connection this long for the same client's "
        "next connection to the same server (default 4; 0 turns pooling off)",
    )
    add_scan_arguments(parser)
    parser.add_argument(
        "--websocket-max-message",
        type=_positive_bytes,
        default=DEFAULT_MAX_MESSAGE,
        metavar="BYTES",
        help="the largest WebSocket message relayed, after reassembly and decompression; a "
        "larger one closes the WebSocket with 1009 (default 16 MiB)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=_non_negative_seconds,
        default=DEFAULT_SHUTDOWN_GRACE,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, exchanges in flight get this long to finish (default "
        f"{DEFAULT_SHUTDOWN_GRACE:g}); idle connections are closed at once; a second Ctrl-C "
        "exits immediately",
    )
    parser.add_argument(
        "--metrics",
        type=parse_listen,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics and a health check on "
        "/healthz (off by default); with several workers the supervisor serves the sum",
    )
    add_logging_arguments(parser)
    from ._cli_ca import add_ca_source_arguments, add_token_arguments

    add_ca_source_arguments(parser)
    add_token_arguments(parser)
    parser.set_defaults(func=run)


def add_hostile_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Access control, limits and deadlines (docs/security.rst, "Hostile clients")."""
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR",
        type=_network,
        help="only clients from this network may use the proxy (403 for others); repeatable",
    )
    parser.add_argument(
        "--auth-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="require Proxy-Authorization: Basic; FILE holds USER:HASH lines made with "
        "`tlsmitm passwd USER` (scrypt or argon2, never plain text)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="connections at once (default 10000, lowered to what the descriptor limit allows); "
        "beyond it idle ones are shed, then new clients get 503",
    )
    parser.add_argument(
        "--max-connections-per-client",
        type=_non_negative_int,
        default=512,
        metavar="N",
        help="connections one client address may hold (default 512; 0: no limit); then 429",
    )
    for name, default, what in (
        ("head-timeout", 10.0, "for a whole request head, on the proxy port and in tunnels"),
        ("handshake-timeout", 10.0, "for a ClientHello and each TLS handshake"),
        ("idle-timeout", 300.0, "without a byte either way before a connection is closed"),
    ):
        parser.add_argument(
            f"--{name}",
            type=_positive_seconds,
            default=default,
            metavar="SECONDS",
            help=f"seconds {what} (default {default:g})",
        )
    parser.add_argument(
        "--override-minutes",
        type=_positive_minutes,
        default=60,
        metavar="MINUTES",
        help="how long a user's override of a certificate error lasts, for that user only "
        "(--error-mode page; default 60, at most 43200)",
    )


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _number(text: str, convert: Callable[[str], _Number], what: str) -> _Number:
    """``text`` read by ``convert``; not readable: an argparse error saying it is not ``what``."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def _non_negative_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    seconds = _non_negative_seconds(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return seconds


def _positive_minutes(text: str) -> float:
    minutes = _positive_seconds(text)
    if minutes > 30 * 24 * 60:
        raise argparse.ArgumentTypeError(f"at most 43200 minutes (30 days): {text!r}")
    return minutes


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-format``, ``--log-level`` and ``--access-log``."""
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines (default), or one JSON object per line with stable keys "
        "(keys: see the logging section of docs/cli.rst)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="also log one line per HTTP exchange (method, host, status, protocol, duration; "
        "never the path)",
    )


def _workers_count(text: str) -> int:
    from ._workers import parse_workers

    return parse_workers(text)


def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    """The content-scanning options (``docs/scanning.rst``)."""
    from ._scan import parse_size

    def size(text: str) -> int:
        try:
            return parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def seconds(text: str) -> float:
        value = _non_negative_seconds(text)
        if value == 0:
            raise argparse.ArgumentTypeError("must be more than 0 seconds")
        return value

    group = parser.add_argument_group("content scanning")
    group.add_argument(
        "--scan",
        type=_scan_url,
        action="append",
        default=[],
        metavar="URL",
        help="hold every response body until this scanner has answered: "
        "icap://HOST:PORT/SERVICE (RESPMOD/REQMOD), clamd:///PATH/clamd.sock or "
        "clamd://HOST:PORT (INSTREAM); may be repeated (blocked when any finds something)",
    )
    group.add_argument(
        "--scan-failure",
        choices=("open", "closed"),
        default="closed",
        help="when a scanner cannot give a verdict (down, timeout, error, too large): block "
        "(closed, default) or deliver unscanned and log it (open)",
    )
    group.add_argument(
        "--scan-max-bytes",
        type=size,
        default=64 * 1024 * 1024,
        metavar="N",
        help="decoded bytes of a body sent to the scanners (default 64M); a larger body is "
        "handled by --scan-failure",
    )
    group.add_argument(
        "--scan-requests",
        action="store_true",
        help="also scan request bodies (uploads), through REQMOD or clamd",
    )
    group.add_argument(
        "--scan-timeout",
        type=seconds,
        default=60.0,
        metavar="SECONDS",
        help="seconds a scan may take, from the body's first byte (default 60); "
        "then it counts as failed",
    )


def build_scan_settings(args: argparse.Namespace) -> ScanSettings | None:
    """The :class:`~tlsmitm._scan.ScanSettings` of the ``--scan*`` options, or ``None``."""
    urls: list[str] = getattr(args, "scan", [])
    if not urls:
        return None
    from ._scan import DecodeLimits, FailureMode, ScanSettings, scanner_from_url

    max_bytes: int = args.scan_max_bytes
    return ScanSettings(
        scanners=tuple(scanner_from_url(url) for url in urls),
        failure=FailureMode(args.scan_failure),
        max_bytes=max_bytes,
        timeout=args.scan_timeout,
        scan_requests=args.scan_requests,
        decode_limits=DecodeLimits(max_decoded=max_bytes),
    )


def _scan_url(text: str) -> str:
    """A ``--scan`` URL, checked when parsed (the scanner itself is made later)."""
    from ._scan import scanner_from_url

    try:
        scanner_from_url(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--scan {text!r}: ")) from None
    return text


def _network(text: str) -> IPv4Network | IPv6Network:
    try:
        return ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address or CIDR network: {text!r}") from None


def _positive_bytes(text: str) -> int:
    size = _number(text, int, "a number of bytes")
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return size


def _non_negative_seconds(text: str) -> float:
    seconds = _number(text, float, "a number of seconds")
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {text!r}")
    return seconds


def build_interceptor(args: argparse.Namespace) -> object:
    """The :class:`~tlsmitm.Interceptor` the arguments describe.

    Raises:
        UsageError: a file named on the command line is unusable.
        ConfigurationError: the state directory is unreadable or corrupt.
    """
    from ._relay import Interceptor, InterceptorConfig

    state_dir: Path = args.state_dir or default_state_dir()
    try:
        extra_roots = [cert for path in args.extra_roots for cert in load_pem_certificates(path)]
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"--extra-roots: {exc}") from None
    rules: Path | None = getattr(args, "rules", None)
    if rules is not None:
        _check_readable(rules, "--rules")
    _check_state_dir(state_dir)
    access = _access_policy(args)
    try:
        config = InterceptorConfig(
            resolve=dict(args.resolve),
            keylog_path=getattr(args, "keylog", None),
            max_connections=getattr(args, "max_connections", 10_000),
            max_connections_per_client=getattr(args, "max_connections_per_client", 512),
            head_timeout=getattr(args, "head_timeout", 10.0),
            handshake_timeout=getattr(args, "handshake_timeout", 10.0),
            idle_timeout=getattr(args, "idle_timeout", 300.0),
            access=access,
            upstream_pool_seconds=getattr(args, "upstream_pool_seconds", 4.0),
            websocket_max_message=getattr(args, "websocket_max_message", DEFAULT_MAX_MESSAGE),
            shutdown_grace=getattr(args, "shutdown_grace", DEFAULT_SHUTDOWN_GRACE),
            proxy_protocol=getattr(args, "proxy_protocol", False),
            trusted_balancers=tuple(getattr(args, "trusted_balancers", ())),
            scan=build_scan_settings(args),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from ._cli_ca import ca_for_serve
    from ._workers import state_lock

    # Under the state directory's lock: workers (and supervisors) starting together on a fresh
    # directory create one CA, not one each.
    try:
        with state_lock(state_dir):
            return Interceptor.from_state_dir(
                state_dir,
                extra_roots=extra_roots,
                error_profile=getattr(args, "error_mode", "native"),
                bypass=getattr(args, "bypass", []),
                rules_file=getattr(args, "rules", None),
                config=config,
                state=getattr(args, "state", None),
                ca=ca_for_serve(args, state_dir),
                override_ttl=timedelta(minutes=getattr(args, "override_minutes", 60)),
            )
    except PermissionError as exc:
        raise ConfigurationError(
            f"cannot use the state directory {state_dir}: {exc.strerror} ({exc.filename}); "
            f"make it readable and writable by this user (chown -R $(id -un) {state_dir}) or "
            "pick another with --state-dir",
            reason="state_unreadable",
        ) from exc
    except OSError as exc:
        raise ConfigurationError(
            f"cannot use the state directory {state_dir}: {exc}; fix it or pick another with "
            "--state-dir",
            reason="state_unreadable",
        ) from exc


def _access_policy(args: argparse.Namespace) -> AccessPolicy:
    """``--allow`` and ``--auth-file``; refuses an open proxy on a non-loopback address."""
    from ._access import AccessPolicy, Credentials, open_proxy_refusal

    credentials = None
    auth_file: Path | None = getattr(args, "auth_file", None)
    if auth_file is not None:
        _check_readable(auth_file, "--auth-file")
        credentials = Credentials.parse(
            auth_file.read_text(encoding="utf-8", errors="replace"), source=str(auth_file)
        )
    policy = AccessPolicy.build(allow=getattr(args, "allow", ()), credentials=credentials)
    listen = getattr(args, "listen", None)
    if listen is not None:
        refusal = open_proxy_refusal(listen[0], policy)
        if refusal is not None:
            raise UsageError(refusal)
    return policy


def _fit_descriptor_budget(args: argparse.Namespace) -> str | None:
    """Raise the descriptor limit to the hard limit; lower --max-connections to fit it.

    Returns a line for the banner when the cap was lowered.
    """
    from ._relay.guard import connection_cap, raise_descriptor_limit

    soft, _ = raise_descriptor_limit()
    pool = 256 if getattr(args, "upstream_pool_seconds", 4.0) > 0 else 0
    wanted = getattr(args, "max_connections", 10_000)
    cap = connection_cap(soft, wanted, idle_upstreams=pool)
    args.max_connections = cap
    if cap < wanted:
        return (
            f"At most {cap} connections at once: the descriptor limit is {soft} (two per "
            "connection); raise it (ulimit -n, LimitNOFILE=) for more"
        )
    return None


def _check_readable(path: Path, option: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror}; give a readable file") from None


def _check_state_dir(state_dir: Path) -> None:
    """A state directory that exists must be a directory this user can read and write."""
    import os

    if not state_dir.exists():
        return
    if not state_dir.is_dir():
        raise ConfigurationError(
            f"the state directory {state_dir} is not a directory; remove it or pick another "
            "with --state-dir",
            reason="state_unreadable",
        )
    if not os.access(state_dir, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"the state directory {state_dir} is not readable and writable by this user; "
            f"chown -R $(id -un) {state_dir}, or pick another with --state-dir",
            reason="state_unreadable",
        )


def warn_if_trust_store_is_old(logger: logging.Logger | None = None) -> None:
    """Warn when certifi's root bundle is older than a year (it must not rot).

    To ``logger`` when given (``serve``: the line follows ``--log-format``), else on stderr.
    """
    from datetime import UTC, datetime

    from ._verify import trust_store_warning

    warning = trust_store_warning(datetime.now(UTC))
    if warning and logger is not None:
        logger.warning("%s", warning, extra={"event": "trust_store_old"})
    elif warning:
        print(f"tlsmitm: warning: {warning}", file=sys.stderr)


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """The listening sockets for ``host:port``, with one-line errors a person can act on.

    Raises:
        ConfigurationError: the port is in use, needs privileges, or the address is not here.
    """
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise listen_error(exc, host, port) from exc


def listen_error(exc: OSError, host: str, port: int) -> ConfigurationError:
    """The one-line error for a failed ``bind``/``listen`` on ``host:port``."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        message = (
            f"cannot listen on {where}: the port is already in use (another tlsmitm?); stop "
            "that program or pick another port with --listen HOST:PORT"
        )
    elif exc.errno in (errno.EACCES, errno.EPERM):
        message = (
            f"cannot listen on {where}: permission denied (ports below 1024 need root or "
            "CAP_NET_BIND_SERVICE); use a port of 1024 or more, or run it as the systemd "
            "unit of `tlsmitm systemd-unit`"
        )
    elif exc.errno == errno.EADDRNOTAVAIL:
        message = (
            f"cannot listen on {where}: {host} is not an address of this machine; use one "
            "of its addresses, 127.0.0.1, or 0.0.0.0 for all"
        )
    else:
        message = f"cannot listen on {where}: {exc.strerror or exc}; check --listen"
    return ConfigurationError(message, reason="listen")


async def open_scanners(interceptor: object) -> None:
    """Ask every scanner for its parameters (ICAP OPTIONS, clamd PING/VERSION); one that does
    not answer is reported, and bodies meet ``--scan-failure`` until it does."""
    from ._relay import Interceptor

    assert isinstance(interceptor, Interceptor)
    settings = interceptor.config.scan
    if settings is None:
        return
    for scanner in settings.scanners:
        try:
            with trio.fail_after(settings.timeout):
                await scanner.open()
        except (TlsMitmError, trio.TooSlowError) as exc:
            logging.getLogger("tlsmitm.scan").warning(
                "scanner %s is not answering (%s); bodies are handled by --scan-failure %s "
                "until it does",
                scanner.name,
                exc,
                settings.failure.value,
                extra={"event": "scanner_down"},
            )
        else:
            print(f"Scanning with {scanner.name}", flush=True)


def _warm_up(interceptor: Any) -> None:
    from ._verify import warm_up

    warm_up()
    interceptor.hsts.warm_up()


async def warm_up_then_freeze(interceptor: Any) -> None:
    """Load the big tables in a thread, then move everything alive to the permanent generation.

    The preload list, the public suffixes and the trust store are some 46,000 objects that live
    as long as the process. Left to the cyclic garbage collector, every full collection walks
    them all (27 ms on the 2-core benchmark machine, a stall for every connection of the
    worker, seen as p99 latency). :func:`gc.freeze` after start-up takes them out of its view;
    what connections allocate later is collected as before.
    """
    await trio.to_thread.run_sync(_warm_up, interceptor)
    gc.collect()
    gc.freeze()


async def _watchdog(interval: float) -> None:
    from . import _systemd

    while True:
        _systemd.notify("WATCHDOG=1")
        await trio.sleep(interval)


def open_metrics_sockets(args: argparse.Namespace) -> list[socket.socket]:
    """The ``--metrics`` listening sockets (none without the option), one-line errors.

    Opened before anything else starts, so a busy metrics port fails like a busy proxy port.
    """
    if getattr(args, "metrics", None) is None:
        return []
    host, port = args.metrics
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return [socket.create_server((host, port), family=family)]
    except OSError as exc:
        error = listen_error(exc, host, port)
        message = str(error).replace("--listen HOST:PORT", "--metrics HOST:PORT")
        raise ConfigurationError(
            message.replace("cannot listen on", "cannot serve --metrics on"), reason="listen"
        ) from exc


def _http_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def metrics_listeners(sockets: list[socket.socket]) -> list[trio.SocketListener]:
    """``sockets`` as trio listeners (inside ``trio.run``)."""
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in sockets]


def run(args: argparse.Namespace) -> int:
    """Start the proxy; returns when it was stopped by SIGINT or SIGTERM."""
    from ._ca import ROOT_CERT_FILE
    from ._logs import configure_logging
    from ._relay import Interceptor

    configure_logging(
        log_format=args.log_format,
        level="debug" if getattr(args, "debug", False) else args.log_level,
        access_log=args.access_log,
    )
    descriptor_note = _fit_descriptor_budget(args)
    from ._workers import bind_shared_port, reuse_port_listener, supervise, usable_cpus

    worker_index = getattr(args, "worker_of_supervisor", None)  # "INDEX:SUPERVISOR_PID"

    workers = args.workers if getattr(args, "workers", None) is not None else usable_cpus()
    if workers > 1 and worker_index is None:
        # The same checks and one-line errors as one process -- and the CA created once, here,
        # before any worker starts.
        first = build_interceptor(args)
        problem = getattr(first, "state_problem", None)
        if problem:  # said once, by the supervisor, not once per worker
            logging.getLogger("tlsmitm.state").warning("%s", problem)
        close_store = getattr(getattr(getattr(first, "hsts", None), "store", None), "close", None)
        if callable(close_store):
            close_store()
        host, port = args.listen
        metrics_sockets = open_metrics_sockets(args)
        try:
            holder = bind_shared_port(host, port)
        except OSError as exc:
            raise listen_error(exc, host, port) from exc
        return supervise(args, workers, holder, metrics_sockets)
    interceptor = build_interceptor(args)
    assert isinstance(interceptor, Interceptor)
    interceptor.access_log = args.access_log
    if interceptor.state_problem and worker_index is None:
        # One line, at start: the deployer hears about it now, not at the first HSTS header.
        logging.getLogger("tlsmitm.state").warning("%s", interceptor.state_problem)
    log = logging.getLogger("tlsmitm.serve")
    warn_if_trust_store_is_old(log)
    ca_dir = interceptor.ca.ca_dir
    assert ca_dir is not None  # from_state_dir always has one
    root_pem = ca_dir / ROOT_CERT_FILE
    host, port = args.listen

    async def main() -> None:
        try:
            await open_scanners(interceptor)
            await serve_until_signal()
        finally:
            scan = interceptor.config.scan
            with trio.CancelScope(shield=True):
                for scanner in scan.scanners if scan is not None else ():
                    await scanner.aclose()

    metrics_sockets = open_metrics_sockets(args) if worker_index is None else []
    metrics = None
    if metrics_sockets or (worker_index is not None and os.environ.get(MULTIPROC_ENV)):
        from ._metrics import Metrics

        metrics = Metrics()  # a worker's values go to the supervisor's multiprocess directory
        interceptor.metrics = metrics

    async def serve_until_signal() -> None:
        from . import _systemd

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            if worker_index is None:
                listeners = await open_listeners(host, port)
            else:  # one of the supervisor's workers: its own socket on the shared port
                listeners = [reuse_port_listener(host, port)]
            listening = False
            async with trio.open_nursery() as nursery:

                async def serve_then_stop(
                    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
                ) -> None:
                    await interceptor.serve_listeners(listeners, task_status=task_status)
                    nursery.cancel_scope.cancel()  # served to the end: stop the signal loop too

                if metrics is not None:
                    from ._metrics import interceptor_health, serve_metrics

                    nursery.start_soon(metrics.run_sampler, interceptor)
                    if metrics_sockets:

                        async def health() -> str | None:
                            return await interceptor_health(interceptor, lambda: listening)

                        await nursery.start(
                            serve_metrics,
                            metrics_listeners(metrics_sockets),
                            metrics.registry,
                            health,
                        )
                if worker_index is not None:
                    from ._workers import watch_supervisor

                    supervisor_pid = int(worker_index.split(":")[1])
                    # Cancelled with the nursery when serving ends.
                    nursery.start_soon(watch_supervisor, supervisor_pid, trio.Event())
                addresses = await nursery.start(serve_then_stop)
                listening = True
                # Listening first, then the big tables (preload list, public suffixes) in a
                # thread: a warm start is listening in well under a second (docs/operations).
                nursery.start_soon(warm_up_then_freeze, interceptor)
                bound_host, bound_port = addresses[0][0], addresses[0][1]
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                proxy = f"http://{shown}:{bound_port}"
                print(f"tlsmitm is listening on {proxy}", flush=True)
                if descriptor_note:
                    print(descriptor_note, flush=True)
                print(f"CA certificate (trust this in clients): {root_pem}")
                print(
                    "Trust it: see docs/trust.rst, or e.g. "
                    f"sudo cp {root_pem} /usr/local/share/ca-certificates/tlsmitm.crt "
                    "&& sudo update-ca-certificates"
                )
                print(
                    f"Try it (needs internet): curl --proxy {proxy} --cacert {root_pem} "
                    "https://example.com/"
                )
                for sock in metrics_sockets:
                    print(f"Metrics:  {_http_url(sock)}/metrics (health: /healthz)")
                print("Offline, `./run demo` (tlsmitm demo) shows it all on 127.0.0.1 in seconds.")
                print(
                    "Stop with Ctrl-C; SIGHUP reloads the bypass rules, the trust store and the "
                    "preload list.",
                    flush=True,
                )
                if worker_index is None:  # a worker's supervisor speaks to systemd for it
                    _systemd.notify(f"READY=1\nSTATUS=listening on {proxy}\nMAINPID={os.getpid()}")
                    interval = _systemd.watchdog_interval()
                    if interval is not None:
                        nursery.start_soon(_watchdog, interval)
                stopping = False
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        reload(interceptor, args)
                        continue
                    if stopping:
                        log.warning("stopping now", extra={"event": "shutdown"})
                        nursery.cancel_scope.cancel()
                        break
                    stopping = True
                    listening = False
                    if worker_index is None:
                        _systemd.notify("STOPPING=1")
                    log.warning(
                        "shutting down (idle connections closed now, exchanges in flight get "
                        "%g s; Ctrl-C again to stop now)",
                        interceptor.config.shutdown_grace,
                        extra={"event": "shutdown"},
                    )
                    interceptor.shutdown()

    trio.run(main)
    return 0


def reload(interceptor: Any, args: argparse.Namespace) -> None:
    """SIGHUP: re-read the rules, the trust store and the preload list; connections go on.

    Each part is replaced only when its new version loads: a broken file keeps the old one and
    says why.
    """
    from datetime import UTC, datetime

    from ._verify import TrustConfig, UpstreamVerifier

    try:
        interceptor.policy.reload()
        print("tlsmitm: bypass rules reloaded", flush=True)
    except TlsMitmError as exc:
        print(f"tlsmitm: rules not reloaded: {exc}", file=sys.stderr)
    try:
        extra_roots = [cert for path in args.extra_roots for cert in load_pem_certificates(path)]
        trust = TrustConfig(
            extra_roots=tuple(extra_roots), own_certificates=interceptor.ca.own_certificates()
        )
        interceptor.verifier = UpstreamVerifier(trust)  # new connections verify with it
        print("tlsmitm: trust store reloaded", flush=True)
        warning = _trust_store_warning(datetime.now(UTC))
        if warning:
            print(f"tlsmitm: warning: {warning}", file=sys.stderr)
    except (TlsMitmError, argparse.ArgumentTypeError, ValueError) as exc:
        print(f"tlsmitm: trust store not reloaded: {exc}", file=sys.stderr)
    try:
        if interceptor.hsts.reload_preload():
            print("tlsmitm: HSTS preload list reloaded", flush=True)
    except (TlsMitmError, ImportError) as exc:
        print(f"tlsmitm: preload list not reloaded: {exc}", file=sys.stderr)


def _trust_store_warning(now: Any) -> str | None:
    from ._verify import trust_store_warning

    warning: str | None = trust_store_warning(now)
    return warning
