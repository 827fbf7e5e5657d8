"""systemd integration: the ``sd_notify`` protocol and a hardened service unit.

The notify protocol (``sd_notify(3)``) is a datagram of ``KEY=VALUE`` lines sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract
namespace (the ``@`` stands for a leading NUL byte). ``serve`` sends ``READY=1`` once it listens,
``STOPPING=1`` when it starts to shut down, and ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC``
(when ``$WATCHDOG_PID`` is unset or is this process), as ``sd_watchdog_enabled(3)`` advises.
Without ``$NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "systemd_unit", "watchdog_interval"]


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(message: str, *, environ: dict[str, str] | None = None) -> bool:
    """Send ``message`` (``"READY=1"``...) to systemd; ``False`` when there is no socket.

    Never raises for a missing or broken socket: a notification is advice to the supervisor,
    and the proxy keeps working without it.
    """
    env = os.environ if environ is None else environ
    name = env.get("NOTIFY_SOCKET")
    if not name or not (name.startswith(("/", "@"))):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(name))
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def watchdog_interval(*, environ: dict[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or ``None``."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


def systemd_unit(
    *,
    executable: str,
    listen: str = "127.0.0.1:8080",
    transparent: bool = False,
    user: str | None = None,
) -> str:
    """A hardened ``tlsmitm.service`` for ``serve``.

    Args:
        executable: the absolute path of the ``tlsmitm`` script.
        listen: the ``--listen`` address.
        transparent: the proxy runs in transparent mode (iptables REDIRECT/TPROXY); only then it
            is given ``CAP_NET_ADMIN``/``CAP_NET_RAW`` (and ``CAP_NET_BIND_SERVICE``).
        user: a dedicated system user; ``None`` uses ``DynamicUser=yes``.
    """
    port = int(listen.rpartition(":")[2])
    capabilities: list[str] = []
    if transparent:
        capabilities += ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    if port < 1024:
        capabilities.append("CAP_NET_BIND_SERVICE")
    who = f"User={user}\nGroup={user}" if user else "DynamicUser=yes"
    caps = " ".join(capabilities)
    lines = [
        "[Unit]",
        "Description=tlsmitm TLS-intercepting proxy",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={executable} serve --listen {listen} --state-dir ${{STATE_DIRECTORY}} "
        "--log-format json",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "WatchdogSec=30s",
        "TimeoutStopSec=20s",
        who,
        "StateDirectory=tlsmitm",
        "StateDirectoryMode=0700",
        "Environment=PYTHONUNBUFFERED=1",
        "LimitNOFILE=65536",
        f"CapabilityBoundingSet={caps}",
        f"AmbientCapabilities={caps}",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)
