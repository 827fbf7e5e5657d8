"""``python -m tlsmitm ca init|export|show|rotate``: manage the interception CA.

Every action takes ``--state-dir`` (default: ``$XDG_DATA_HOME/tlsmitm``, else
``~/.local/share/tlsmitm``; ``TLSMITM_STATE_DIR`` overrides both). Passphrases never come from the
command line itself (it is visible to other users in ``ps``): ``--passphrase-file``,
``--passphrase-env`` (default variable ``TLSMITM_CA_PASSPHRASE``, read when set) or
``--ask-passphrase``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ._ca import (
    KEY_TYPES,
    PASSPHRASE_ENV,
    CertificateAuthority,
    KeyFileStatus,
    Passphrase,
    passphrase_from_env,
)
from ._cli import default_state_dir
from ._errors import ConfigurationError

__all__ = ["register", "trust_instructions"]

_DOCS = "docs/trust.rst in the tlsmitm documentation"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``ca`` command and its actions."""
    parser = subparsers.add_parser(
        "ca",
        help="create, inspect, export and rotate the interception CA",
        description="Manage the per-installation interception certificate authority.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="where the CA lives (default: $XDG_DATA_HOME/tlsmitm or ~/.local/share/tlsmitm)",
    )
    secret = argparse.ArgumentParser(add_help=False)
    source = secret.add_mutually_exclusive_group()
    source.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="PATH",
        help="read the root key passphrase from the first line of PATH",
    )
    source.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help=f"read the root key passphrase from the environment variable VAR (default: "
        f"{PASSPHRASE_ENV}, when it is set)",
    )
    source.add_argument(
        "--ask-passphrase", action="store_true", help="prompt for the root key passphrase"
    )
    parser.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS, help="see ACTION -h")
    actions = parser.add_subparsers(dest="ca_action", metavar="ACTION", required=True)

    init = actions.add_parser(
        "init",
        parents=[common, secret],
        help="create the CA (nothing happens if it exists)",
        description="Create the CA and print how to trust its root. With a passphrase the root "
        "key is stored encrypted. An existing CA is left untouched.",
    )
    init.add_argument("--key-type", choices=KEY_TYPES, default="ec256", help="default: ec256")
    init.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NAME|CIDR",
        help="name constraint: the CA can never vouch for NAME (and every name below it) or "
        "addresses in CIDR; may be repeated",
    )
    init.add_argument("--organization", default="tlsmitm", help="the O= of the CA subjects")
    init.set_defaults(func=_init)

    export = actions.add_parser(
        "export",
        parents=[common, secret],
        help="write the root certificate (or the CRL) to stdout",
        description="Write the root certificate to stdout as PEM (or DER with --der), or the "
        "CRL as DER with --crl. The error CA is never exported.",
    )
    export.add_argument("--der", action="store_true", help="DER instead of PEM")
    export.add_argument("--crl", action="store_true", help="the CRL (DER) instead of the root")
    export.set_defaults(func=_export)

    show = actions.add_parser(
        "show",
        parents=[common],
        help="describe the CA: subjects, validity, fingerprints, key protection",
    )
    show.set_defaults(func=_show)

    rotate = actions.add_parser(
        "rotate",
        parents=[common, secret],
        help="replace the intermediate (the trusted root stays the same)",
        description="Replace the online intermediate; the old one is revoked in the CRL. Needs "
        "the root key once. Restart running proxies afterwards.",
    )
    rotate.add_argument(
        "--root-key", type=Path, metavar="PATH", help="the root key, when it was moved offline"
    )
    rotate.add_argument(
        "--compromised",
        action="store_true",
        help="the old intermediate key may have leaked (CRL reason cACompromise)",
    )
    rotate.set_defaults(func=_rotate)


# -- helpers ------------------------------------------------------------------------------------


def _state_dir(args: argparse.Namespace) -> Path:
    given: Path | None = getattr(args, "state_dir", None)
    return given if given is not None else default_state_dir()


def _passphrase(args: argparse.Namespace) -> Passphrase | None:
    path: Path | None = getattr(args, "passphrase_file", None)
    if path is not None:

        def from_file() -> bytes:
            try:
                with open(path, "rb") as handle:
                    return handle.readline().rstrip(b"\r\n")
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read the passphrase file {path}: {exc.strerror}", reason="passphrase"
                ) from None

        return from_file
    variable: str | None = getattr(args, "passphrase_env", None)
    if variable is not None:
        return passphrase_from_env(variable)
    if getattr(args, "ask_passphrase", False):

        def ask() -> bytes:
            return getpass.getpass("CA root key passphrase: ").encode("utf-8")

        return ask
    if os.environ.get(PASSPHRASE_ENV):
        return passphrase_from_env(PASSPHRASE_ENV)
    return None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _colon_hex(data: bytes) -> str:
    return ":".join(f"{byte:02X}" for byte in data)


def _key_description(certificate: x509.Certificate) -> str:
    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__  # pragma: no cover - tlsmitm only makes EC and RSA keys


def _state_dir_option(state_dir: Path) -> str:
    return "" if state_dir == default_state_dir() else f" --state-dir {state_dir}"


def trust_instructions(state_dir: Path) -> list[str]:
    """One line per platform: how to trust the root exported from ``state_dir``."""
    export = f"python -m tlsmitm ca export{_state_dir_option(state_dir)}"
    return [
        f"Debian/Ubuntu:   {export} | sudo tee /usr/local/share/ca-certificates/tlsmitm.crt "
        "&& sudo update-ca-certificates",
        f"Fedora/RHEL:     {export} | sudo tee /etc/pki/ca-trust/source/anchors/tlsmitm.pem "
        "&& sudo update-ca-trust",
        f"Chromium/NSS:    {export} > tlsmitm.pem && certutil -d sql:$HOME/.pki/nssdb -A "
        '-t "C,," -n tlsmitm -i tlsmitm.pem',
        "Firefox:         policies.json Certificates.Install (or ImportEnterpriseRoots) -- see "
        "the docs",
        f"macOS:           {export} > tlsmitm.pem && sudo security add-trusted-cert -d -r "
        "trustRoot -k /Library/Keychains/System.keychain tlsmitm.pem",
        f"Windows:         {export} --der > tlsmitm.cer, then (admin) certutil -addstore Root "
        "tlsmitm.cer, or Group Policy for a domain",
        f"Java:            {export} > tlsmitm.pem && keytool -importcert -cacerts -alias tlsmitm "
        "-file tlsmitm.pem",
        "Android/iOS:     install as a user CA profile; apps opt in (Android) -- see the docs",
    ]


# -- actions ------------------------------------------------------------------------------------


def _fail(exc: ConfigurationError) -> int:
    print(f"tlsmitm: {exc}", file=sys.stderr)
    return 1


def _init(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    try:
        existing = CertificateAuthority.load(state_dir)
    except ConfigurationError as exc:
        if exc.reason != "state_missing":
            return _fail(exc)
    else:
        print(f"A CA already exists in {existing.ca_dir}; it was left unchanged.")
        print("Root SHA-256: " + _colon_hex(existing.root_certificate.fingerprint(hashes.SHA256())))
        print(f"Inspect it with: python -m tlsmitm ca show{_state_dir_option(state_dir)}")
        return 0
    passphrase = _passphrase(args)
    try:
        ca = CertificateAuthority.create(
            state_dir,
            passphrase=passphrase,
            key_type=args.key_type,
            name_constraints_excluded=args.exclude,
            organization=args.organization,
            now=_now(),
        )
    except ConfigurationError as exc:
        return _fail(exc)
    protection = "encrypted with your passphrase" if passphrase is not None else "not encrypted"
    print(f"Created a new tlsmitm CA in {ca.ca_dir}")
    print(f"Root:         {ca.root_certificate.subject.rfc4514_string()}")
    print(f"Root SHA-256: {_colon_hex(ca.root_certificate.fingerprint(hashes.SHA256()))}")
    print(f"Root key:     {ca.ca_dir}/root.key ({protection}, mode 0600)")
    if ca.name_constraints_excluded:
        print(f"Never vouches for: {', '.join(ca.name_constraints_excluded)}")
    print()
    print("Trust the root on each client (details and removal: " + _DOCS + "):")
    for line in trust_instructions(state_dir):
        print(f"  {line}")
    return 0


def _export(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    binary = args.der or args.crl
    if binary and sys.stdout.isatty():
        print(
            "tlsmitm: refusing to write DER to a terminal; redirect it to a file (> root.cer)",
            file=sys.stderr,
        )
        return 2
    try:
        ca = CertificateAuthority.load(state_dir)
        if args.crl:
            data = ca.export_crl(now=_now(), passphrase=_passphrase(args))
        else:
            data = ca.export_root(der=args.der)
    except ConfigurationError as exc:
        return _fail(exc)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def _describe_key_file(status: KeyFileStatus) -> str:
    if not status.present:
        if status.role == "root":
            return f"{status.path}: not here (offline); rotation needs --root-key PATH"
        return f"{status.path}: MISSING"
    encrypted = "passphrase-encrypted" if status.encrypted else "not encrypted"
    mode = f"mode {status.mode:04o}" if status.mode is not None else "mode unknown"
    warning = ""
    if status.mode is not None and status.mode & 0o077:
        warning = f" -- TOO OPEN, run: chmod 600 {status.path}"
    owner = f", owner uid {status.owner_uid}" if status.owner_uid is not None else ""
    return f"{status.path}: {encrypted}, {mode}{owner}{warning}"


def _certificate_lines(certificate: x509.Certificate, now: dt.datetime) -> list[str]:
    not_before = certificate.not_valid_before_utc
    not_after = certificate.not_valid_after_utc
    days = (not_after - now).days
    state = "EXPIRED" if not_after <= now else f"{days} days left"
    return [
        f"  subject:  {certificate.subject.rfc4514_string()}",
        f"  valid:    {not_before:%Y-%m-%d %H:%M:%S} UTC to {not_after:%Y-%m-%d %H:%M:%S} UTC "
        f"({state})",
        f"  key:      {_key_description(certificate)}",
        f"  serial:   {certificate.serial_number:x}",
        f"  SHA-256:  {_colon_hex(certificate.fingerprint(hashes.SHA256()))}",
        f"  SHA-1:    {_colon_hex(certificate.fingerprint(hashes.SHA1()))}  (Windows "  # noqa: S303
        "thumbprint)",
    ]


def _show(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    try:
        ca = CertificateAuthority.load(state_dir)
    except ConfigurationError as exc:
        return _fail(exc)
    now = _now()
    files = {status.role: status for status in ca.key_files()}
    lines = [f"tlsmitm CA in {ca.ca_dir} (installation {ca.installation_id})", ""]
    lines.append("Root (the certificate clients trust):")
    lines += _certificate_lines(ca.root_certificate, now)
    lines.append(f"  key file: {_describe_key_file(files['root'])}")
    lines.append("")
    lines.append(f"Intermediate, generation {ca.generation} (online; signs every leaf):")
    lines += _certificate_lines(ca.intermediate_certificate, now)
    lines.append(f"  key file: {_describe_key_file(files['intermediate'])}")
    lines.append("")
    lines.append("Error CA (never exported, never trusted; for the clients' own warnings):")
    lines += _certificate_lines(ca.error_ca_certificate, now)[:2]
    lines.append(f"  key file: {_describe_key_file(files['error-ca'])}")
    lines.append("")
    crl = ca.stored_crl
    next_update = crl.next_update_utc
    lines.append(
        f"CRL: number {ca.crl_number}, issued {crl.last_update_utc:%Y-%m-%d}, next "
        f"update {next_update:%Y-%m-%d}, {len(ca.retired_intermediates)} retired "
        "intermediate(s) revoked"
        if next_update is not None
        else f"CRL: number {ca.crl_number}"
    )
    constraints = ", ".join(ca.name_constraints_excluded) or "none"
    lines.append(f"Name constraints (never vouches for): {constraints}")
    warnings = _warnings(ca, files, now)
    if warnings:
        lines.append("")
        lines += [f"WARNING: {text}" for text in warnings]
    print("\n".join(lines))
    return 0


def _warnings(
    ca: CertificateAuthority, files: dict[str, KeyFileStatus], now: dt.datetime
) -> list[str]:
    out = []
    option = _state_dir_option(ca.state_dir or default_state_dir())
    if ca.intermediate_certificate.not_valid_after_utc - now < dt.timedelta(days=60):
        out.append(
            "the intermediate expires within 60 days; run: python -m tlsmitm ca rotate" + option
        )
    if ca.root_certificate.not_valid_after_utc - now < dt.timedelta(days=365):
        out.append("the root expires within a year; plan a new CA and re-trust it on clients")
    root = files["root"]
    if root.present and not root.encrypted:
        out.append(
            "the root key is stored unencrypted; consider moving it offline (see docs/ca.rst)"
        )
    next_update = ca.stored_crl.next_update_utc
    if next_update is not None and next_update <= now:
        out.append("the CRL has expired; re-sign it with: python -m tlsmitm ca export --crl")
    return out


def _rotate(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    passphrase = _passphrase(args)
    try:
        ca = CertificateAuthority.load(state_dir)
        old = ca.intermediate_certificate
        ca.rotate_intermediate(
            now=_now(),
            passphrase=passphrase,
            root_key_file=args.root_key,
            compromised=args.compromised,
        )
    except ConfigurationError as exc:
        return _fail(exc)
    print(f"Rotated the intermediate of {ca.ca_dir}: generation {ca.generation}.")
    print(f"Revoked (in the CRL): serial {old.serial_number:x}")
    fingerprint = _colon_hex(ca.intermediate_certificate.fingerprint(hashes.SHA256()))
    print(f"New intermediate SHA-256: {fingerprint}")
    print("The root is unchanged: clients keep trusting it. Restart running proxies.")
    return 0
