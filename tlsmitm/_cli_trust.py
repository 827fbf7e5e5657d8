"""``tlsmitm ca install`` / ``ca uninstall``: put the root where clients look for it, and take it
out again. Both are idempotent (running one twice changes nothing the second time).

* ``--nss-db DIR``: a browser profile's NSS database (Chromium on Linux: ``~/.pki/nssdb``;
  Firefox: the profile directory), through NSS's ``certutil``.
* ``--system``: Debian's system store, through ``update-ca-certificates`` (as root). The root
  goes to ``/usr/local/share/ca-certificates/tlsmitm-<installation>.crt``. ``--root-dir DIR``
  does the same under ``DIR`` instead of ``/`` (image builds, tests).
* Neither: the instructions for what cannot be automated from here (macOS, Windows, Firefox's
  enterprise roots, Java, phones).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from ._errors import ConfigurationError

__all__ = ["register_actions"]

_NICKNAME = "tlsmitm"


def register_actions(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``install`` and ``uninstall`` to ``tlsmitm ca``."""
    for name, func, verb in (
        ("install", _install, "trust the root in"),
        ("uninstall", _uninstall, "remove the root from"),
    ):
        parser = actions.add_parser(
            name,
            parents=[common],
            help=f"{verb} a browser's NSS database or the system store (idempotent)",
            description=f"{verb.capitalize()} a browser profile's NSS database (--nss-db, via "
            "certutil) or Debian's system store (--system, via update-ca-certificates, as "
            "root). Without either, print how to do it elsewhere (macOS, Windows, Firefox). "
            "Running it twice changes nothing the second time.",
        )
        target = parser.add_mutually_exclusive_group()
        target.add_argument(
            "--nss-db",
            type=Path,
            metavar="DIR",
            help="an NSS database directory (Chromium on Linux: ~/.pki/nssdb)",
        )
        target.add_argument(
            "--system", action="store_true", help="Debian's system trust store (as root)"
        )
        parser.add_argument(
            "--root-dir",
            type=Path,
            default=Path("/"),
            metavar="DIR",
            help="with --system: the file-system root to work under (default /)",
        )
        parser.add_argument(
            "--nickname", default=_NICKNAME, help=f"the NSS nickname (default {_NICKNAME})"
        )
        parser.set_defaults(func=func)


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigurationError(
            f"{name} is not installed; install it (Debian: apt-get install {package})",
            reason="tool_missing",
        )
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _root(args: argparse.Namespace) -> tuple[bytes, str]:
    """The root certificate (PEM) and this installation's id."""
    from ._ca import CertificateAuthority
    from ._cli_ca import _state_dir

    ca = CertificateAuthority.load(_state_dir(args))
    return ca.export_root(der=False), ca.installation_id


# -- NSS ----------------------------------------------------------------------------------------


def _nss_database(directory: Path) -> str:
    if not (directory / "cert9.db").is_file():
        raise ConfigurationError(
            f"no NSS database in {directory} (no cert9.db); give a profile's database, such as "
            "~/.pki/nssdb after Chromium ran once, or create one: certutil -d sql:DIR -N "
            "--empty-password",
            reason="nss_db",
        )
    return f"sql:{directory}"


def _nss_installed(certutil: str, database: str, nickname: str) -> bytes | None:
    result = _run([certutil, "-d", database, "-L", "-n", nickname, "-a"])
    return result.stdout.encode() if result.returncode == 0 else None


def _same_certificate(a: bytes, b: bytes) -> bool:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(a) == x509.load_pem_x509_certificate(b)
    except ValueError:
        return False


def _nss_install(args: argparse.Namespace, pem: bytes) -> str:
    certutil = _tool("certutil", "libnss3-tools")
    database = _nss_database(args.nss_db)
    present = _nss_installed(certutil, database, args.nickname)
    if present is not None and _same_certificate(present, pem):
        return f"already trusted in {args.nss_db} (nickname {args.nickname}); nothing changed"
    if present is not None:  # another certificate under our nickname: an older tlsmitm root
        _run([certutil, "-d", database, "-D", "-n", args.nickname])
    result = subprocess.run(
        [certutil, "-d", database, "-A", "-t", "C,,", "-n", args.nickname, "-a"],
        input=pem.decode(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise ConfigurationError(
            f"certutil could not add the root to {args.nss_db}: {result.stderr.strip()}; is the "
            "browser still running with that profile? close it and try again",
            reason="nss_db",
        )
    return f"trusted in {args.nss_db} as {args.nickname!r}; restart the browser to use it"


def _nss_uninstall(args: argparse.Namespace, pem: bytes) -> str:
    certutil = _tool("certutil", "libnss3-tools")
    database = _nss_database(args.nss_db)
    removed = 0
    while _nss_installed(certutil, database, args.nickname) is not None and removed < 10:
        _run([certutil, "-d", database, "-D", "-n", args.nickname])
        removed += 1
    if not removed:
        return f"not in {args.nss_db} (nickname {args.nickname}); nothing changed"
    return f"removed from {args.nss_db}; restart the browser to forget it"


# -- Debian's system store ----------------------------------------------------------------------


def _system_paths(root: Path, installation: str) -> tuple[Path, list[str]]:
    local = root / "usr/local/share/ca-certificates"
    target = local / f"tlsmitm-{installation}.crt"
    options: list[str] = []
    if root != Path("/"):
        options = [
            *("--localcertsdir", str(local)),
            *("--certsdir", str(root / "usr/share/ca-certificates")),
            *("--etccertsdir", str(root / "etc/ssl/certs")),
            *("--certsconf", str(root / "etc/ca-certificates.conf")),
            *("--hooksdir", str(root / "etc/ca-certificates/update.d")),
        ]
    return target, options


def _update(options: list[str]) -> None:
    tool = _tool("update-ca-certificates", "ca-certificates")
    result = _run([tool, *options])
    if result.returncode != 0:
        raise ConfigurationError(
            f"update-ca-certificates failed: {(result.stderr or result.stdout).strip()}; it "
            "needs root (run with sudo)",
            reason="system_store",
        )


def _system_install(args: argparse.Namespace, pem: bytes, installation: str) -> str:
    target, options = _system_paths(args.root_dir, installation)
    if target.is_file() and target.read_bytes() == pem:
        return f"already in the system store ({target}); nothing changed"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pem)
    except PermissionError:
        raise ConfigurationError(
            f"cannot write {target}: permission denied; run it as root (sudo)",
            reason="system_store",
        ) from None
    _update(options)
    return f"added to the system store ({target}) and ran update-ca-certificates"


def _system_uninstall(args: argparse.Namespace, pem: bytes, installation: str) -> str:
    target, options = _system_paths(args.root_dir, installation)
    if not target.exists():
        return f"not in the system store ({target}); nothing changed"
    try:
        target.unlink()
    except PermissionError:
        raise ConfigurationError(
            f"cannot remove {target}: permission denied; run it as root (sudo)",
            reason="system_store",
        ) from None
    _update([*options, "--fresh"])
    return f"removed from the system store ({target}) and ran update-ca-certificates"


# -- the actions --------------------------------------------------------------------------------


def _instructions(args: argparse.Namespace) -> int:
    from ._cli_ca import _state_dir, trust_instructions

    print("Automated here: --nss-db DIR (a browser's NSS database) or --system (Debian, root).")
    print("Elsewhere, by hand (Firefox enterprise roots, macOS, Windows, Java, phones):")
    for line in trust_instructions(_state_dir(args)):
        print(f"  {line}")
    print(
        "Firefox: set security.enterprise_roots.enabled (or policies.json ImportEnterpriseRoots) "
        "to use the system store, or install into the profile: --nss-db ~/.mozilla/firefox/PROFILE"
    )
    return 0


def _install(args: argparse.Namespace) -> int:
    if args.nss_db is None and not args.system:
        return _instructions(args)
    pem, installation = _root(args)
    if args.nss_db is not None:
        print(f"tlsmitm root {_nss_install(args, pem)}")
    else:
        print(f"tlsmitm root {_system_install(args, pem, installation)}")
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    if args.nss_db is None and not args.system:
        return _instructions(args)
    pem, installation = _root(args)
    if args.nss_db is not None:
        print(f"tlsmitm root {_nss_uninstall(args, pem)}")
    else:
        print(f"tlsmitm root {_system_uninstall(args, pem, installation)}")
    return 0
