"""``tlsmitm systemd-unit`` (a hardened systemd service unit for ``serve``) and ``tlsmitm demo``
(an offline tour, :mod:`tlsmitm._demo`)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

__all__ = ["register"]


def _default_executable() -> str:
    """The ``tlsmitm`` script next to this Python, else on ``PATH``, else ``python -m``."""
    beside = Path(sys.executable).with_name("tlsmitm")
    if beside.is_file():
        return str(beside.absolute())
    found = shutil.which("tlsmitm")
    if found:
        return str(Path(found).absolute())
    return f"{Path(sys.executable).absolute()} -m tlsmitm"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``systemd-unit`` command."""
    from ._cli_serve import DEFAULT_LISTEN, parse_listen

    parser = subparsers.add_parser(
        "systemd-unit",
        help="print a hardened systemd unit for serve",
        description="Print a hardened systemd service unit (Type=notify, DynamicUser, "
        "StateDirectory, ProtectSystem=strict, NoNewPrivileges) that runs tlsmitm serve. "
        "Install it with: tlsmitm systemd-unit | sudo tee /etc/systemd/system/tlsmitm.service",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=parse_listen(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"the address serve listens on (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--user",
        default=None,
        help="run as this dedicated system user (default: DynamicUser=yes)",
    )
    parser.add_argument(
        "--transparent",
        action="store_true",
        help="grant the capabilities transparent mode needs (CAP_NET_ADMIN, CAP_NET_RAW)",
    )
    parser.add_argument(
        "--executable",
        default=None,
        metavar="PATH",
        help="the tlsmitm script ExecStart runs (default: the one of this installation)",
    )
    parser.set_defaults(func=_systemd_unit)

    demo = subparsers.add_parser(
        "demo",
        help="a one-minute tour on 127.0.0.1, without internet",
        description="Start a local HTTPS origin and the proxy on 127.0.0.1 (in a temporary "
        "directory), then show a request going through, an expired certificate answered by the "
        "error page, and an EICAR download blocked by a hook.",
    )
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ._demo import main

    return main()


def _systemd_unit(args: argparse.Namespace) -> int:
    from ._systemd import systemd_unit

    host, port = args.listen
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sys.stdout.write(
        systemd_unit(
            executable=args.executable or _default_executable(),
            listen=listen,
            transparent=args.transparent,
            user=args.user,
        )
    )
    return 0
