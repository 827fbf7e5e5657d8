"""``python -m tlsmitm ca init|export|show|rotate|issue-node-intermediate|…``: manage the CA.

Every action takes ``--state-dir`` (default: ``$XDG_DATA_HOME/tlsmitm``, else
``~/.local/share/tlsmitm``; ``TLSMITM_STATE_DIR`` overrides both). Passphrases never come from the
command line itself (it is visible to other users in ``ps``): ``--passphrase-file``,
``--passphrase-env`` (default variable ``TLSMITM_CA_PASSPHRASE``, read when set) or
``--ask-passphrase``. A PKCS#11 token's PIN likewise: ``--pin-file``, ``--pin-env`` (default
variable ``TLSMITM_PKCS11_PIN``) or the URI's ``pin-source``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import logging
import os
import stat
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ._ca import (
    KEY_TYPES,
    PASSPHRASE_ENV,
    CertificateAuthority,
    KeyFileStatus,
    Passphrase,
    PrivateKey,
    _io_errors,
    _is_encrypted_pem,
    _parse_private_key,
    _plain_private_key,
    _write_atomic,
    inspect_intermediate,
    passphrase_from_env,
)
from ._cli import UsageError, default_state_dir
from ._errors import ConfigurationError
from ._pkcs11 import (
    PIN_ENV,
    TokenAccess,
    is_pkcs11_uri,
    open_token_key,
    pin_from_env,
    pin_from_file,
)

__all__ = [
    "add_ca_source_arguments",
    "add_token_arguments",
    "ca_for_serve",
    "register",
    "token_access",
    "trust_instructions",
]

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
    token = argparse.ArgumentParser(add_help=False)
    add_token_arguments(token)
    parser.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS, help="see ACTION -h")
    actions = parser.add_subparsers(dest="ca_action", metavar="ACTION", required=True)

    init = actions.add_parser(
        "init",
        parents=[common, secret, token],
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
    add_ca_source_arguments(init)
    init.set_defaults(func=_init)

    export = actions.add_parser(
        "export",
        parents=[common, secret, token],
        help="write the root certificate (or the CRL) to stdout",
        description="Write the root certificate to stdout as PEM (or DER with --der), or the "
        "CRL as DER with --crl. The error CA is never exported.",
    )
    export.add_argument("--der", action="store_true", help="DER instead of PEM")
    export.add_argument("--crl", action="store_true", help="the CRL (DER) instead of the root")
    _add_root_key(
        export, "with --crl: the root key to re-sign a CRL that is due, when it was moved offline"
    )
    export.set_defaults(func=_export)

    show = actions.add_parser(
        "show",
        parents=[common, token],
        help="describe the CA: subjects, validity, fingerprints, key protection",
    )
    show.set_defaults(func=_show)

    rotate = actions.add_parser(
        "rotate",
        parents=[common, secret, token],
        help="replace the intermediate (the trusted root stays the same)",
        description="Replace the online intermediate; the old one is revoked in the CRL. Needs "
        "the root key once. Restart running proxies afterwards.",
    )
    _add_root_key(rotate)
    rotate.add_argument(
        "--compromised",
        action="store_true",
        help="the old intermediate key may have leaked (CRL reason cACompromise)",
    )
    rotate.add_argument(
        "--ca-key",
        metavar="PKCS11-URI",
        help="the new intermediate is for this key in a PKCS#11 token (RFC 7512 URI); required "
        "when the current key is in a token",
    )
    rotate.set_defaults(func=_rotate)

    from ._cli_trust import register_actions

    register_actions(actions, common)  # install, uninstall

    issue = actions.add_parser(
        "issue-node-intermediate",
        parents=[common, secret, token],
        help="issue one node's own intermediate, signed by the root",
        description="Issue an intermediate for one node of a multi-node installation, signed by "
        "this installation's root. Writes OUT/NODE.pem (the intermediate, then the root) and "
        "OUT/NODE.key (0600; not with --key). On the node: ca init --import-intermediate "
        "NODE.pem NODE.key. A compromised node is revoked alone with revoke-node-intermediate.",
    )
    issue.add_argument("node", metavar="NODE", help="the node's name ([a-z0-9-], <= 32)")
    issue.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="where to write NODE.pem/.key"
    )
    issue.add_argument(
        "--key",
        metavar="PKCS11-URI",
        help="certify this token key (the node's own token) instead of generating a key",
    )
    _add_root_key(issue)
    issue.set_defaults(func=_issue_node)

    revoke = actions.add_parser(
        "revoke-node-intermediate",
        parents=[common, secret, token],
        help="revoke one node's intermediate (listed in a new CRL)",
        description="Revoke a node's intermediate: a new CRL signed by the root lists it (reason "
        "cACompromise). The root and the other nodes are unaffected. Distribute the CRL (ca "
        "export --crl).",
    )
    revoke.add_argument("node", metavar="NODE")
    _add_root_key(revoke)
    revoke.set_defaults(func=_revoke_node)


def _add_root_key(
    parser: argparse.ArgumentParser,
    help: str = "the root key, when it was moved offline (a file, or a PKCS#11 URI of it in a "
    "token)",
) -> None:
    """``--root-key PATH|PKCS11-URI``: where the root key is when it was moved offline."""
    parser.add_argument("--root-key", type=_root_key_location, metavar="PATH|PKCS11-URI", help=help)


def _root_key_location(text: str) -> Path | str:
    """``--root-key``: a PKCS#11 URI (kept as text) or a file path."""
    return text if is_pkcs11_uri(text) else Path(text)


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pkcs11-module``, ``--pin-file``, ``--pin-env``: how to reach a PKCS#11 token."""
    parser.add_argument(
        "--pkcs11-module",
        type=Path,
        metavar="PATH",
        help="the PKCS#11 module (library) of the token (default: from the URI's module-path or "
        "module-name, or the only module registered with p11-kit)",
    )
    pin = parser.add_mutually_exclusive_group()
    pin.add_argument(
        "--pin-file", type=Path, metavar="PATH", help="read the token's user PIN from PATH"
    )
    pin.add_argument(
        "--pin-env",
        metavar="VAR",
        help=f"read the token's user PIN from the environment variable VAR (default: {PIN_ENV})",
    )


def add_ca_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--import-intermediate CERT KEY``, ``--chain``, ``--ca-key`` (``ca init``, ``serve``)."""
    parser.add_argument(
        "--import-intermediate",
        nargs=2,
        metavar=("CERT", "KEY"),
        help="sign leaves with this intermediate issued by your organisation's root (or by this "
        "installation's root for a node); CERT may hold its chain up to the root; KEY is a PEM "
        "file or a PKCS#11 URI",
    )
    parser.add_argument(
        "--chain",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="more certificates of the imported intermediate's chain, up to and including the "
        "root; may be repeated",
    )
    parser.add_argument(
        "--ca-key",
        metavar="PKCS11-URI",
        help="keep the issuing (intermediate) key in a PKCS#11 token, e.g. "
        "'pkcs11:token=tlsmitm;object=issuing?module-name=softhsm2' (RFC 7512)",
    )


def token_access(args: argparse.Namespace) -> TokenAccess:
    """The :class:`~tlsmitm._pkcs11.TokenAccess` that ``add_token_arguments`` options describe."""
    pin_file: Path | None = getattr(args, "pin_file", None)
    pin_env: str | None = getattr(args, "pin_env", None)
    pin = None
    if pin_file is not None:
        pin = pin_from_file(pin_file)
    elif pin_env is not None:
        pin = pin_from_env(pin_env)
    return TokenAccess(module=getattr(args, "pkcs11_module", None), pin=pin)


def _read_certificates(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read {path}: {exc.strerror}", reason="import_refused"
        ) from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise ConfigurationError(
                f"{path} holds no PEM or DER certificate", reason="import_refused"
            ) from None


def import_from_args(args: argparse.Namespace, state_dir: Path) -> CertificateAuthority:
    """Import ``--import-intermediate CERT KEY`` (and ``--chain``) into ``state_dir``."""
    cert_path, key_text = args.import_intermediate
    certificates = _read_certificates(Path(cert_path))
    for path in args.chain:
        certificates += _read_certificates(path)
    key: PrivateKey | str = (
        key_text if is_pkcs11_uri(key_text) else load_key_file(Path(key_text), _passphrase(args))
    )
    return CertificateAuthority.import_intermediate(
        state_dir,
        certificates=certificates,
        key=key,
        now=_now(),
        token=token_access(args),
    )


def ca_for_serve(args: argparse.Namespace, state_dir: Path) -> CertificateAuthority | None:
    """The CA ``serve``'s CA options describe, or ``None`` for the default (load or create).

    ``--import-intermediate`` imports into a state directory without a CA, and otherwise
    requires the one there to be that same intermediate; ``--ca-key`` creates a CA around the
    token key, or requires the existing one to sign with it.
    """
    if getattr(args, "chain", None) and not getattr(args, "import_intermediate", None):
        raise UsageError("--chain goes with --import-intermediate")
    options = ("import_intermediate", "ca_key", "pin_file", "pin_env", "pkcs11_module")
    if not any(getattr(args, name, None) for name in options):
        return None
    token = token_access(args)
    if args.import_intermediate:
        if args.ca_key:
            raise UsageError(
                "give the token key as --import-intermediate CERT 'pkcs11:...', not with --ca-key"
            )
        try:
            ca = CertificateAuthority.load(state_dir, token=token)
        except ConfigurationError as exc:
            if exc.reason != "state_missing":
                raise
            imported = import_from_args(args, state_dir)
            for warning in inspect_intermediate(imported.intermediate_certificate, now=_now()):
                logging.getLogger("tlsmitm.ca").warning("%s", warning)
            return imported
        wanted = _read_certificates(Path(args.import_intermediate[0]))[0]
        if ca.intermediate_certificate != wanted:
            raise ConfigurationError(
                f"the CA in {ca.ca_dir} signs with another intermediate "
                f"({ca.intermediate_certificate.subject.rfc4514_string()}); import into a new "
                "--state-dir",
                reason="state_exists",
            )
        return ca
    return CertificateAuthority.load_or_create(
        state_dir, now=_now(), intermediate_key=args.ca_key, token=token
    )


def load_key_file(path: Path, passphrase: Passphrase | None) -> PrivateKey:
    """A PEM private key file (encrypted ones with the passphrase options)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the key {path}: {exc.strerror}", reason="import_refused"
        ) from None
    secret = None
    if _is_encrypted_pem(data) and passphrase is not None:
        secret = passphrase() if callable(passphrase) else passphrase
    return _parse_private_key(data, path, secret, role="imported intermediate")


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
    if args.import_intermediate and args.ca_key:
        print(
            "tlsmitm: give the token key as --import-intermediate CERT 'pkcs11:...', not with "
            "--ca-key",
            file=sys.stderr,
        )
        return 2
    if args.chain and not args.import_intermediate:
        print("tlsmitm: --chain goes with --import-intermediate", file=sys.stderr)
        return 2
    try:
        existing = CertificateAuthority.load(state_dir, token=token_access(args))
    except ConfigurationError as exc:
        if exc.reason != "state_missing":
            return _fail(exc)
    else:
        if args.import_intermediate:
            print(
                f"tlsmitm: a CA already exists in {existing.ca_dir}; it was left unchanged. "
                "Import into a new --state-dir",
                file=sys.stderr,
            )
            return 1
        print(f"A CA already exists in {existing.ca_dir}; it was left unchanged.")
        print("Root SHA-256: " + _colon_hex(existing.root_certificate.fingerprint(hashes.SHA256())))
        print(f"Inspect it with: python -m tlsmitm ca show{_state_dir_option(state_dir)}")
        return 0
    if args.import_intermediate:
        return _init_imported(args, state_dir)
    passphrase = _passphrase(args)
    try:
        ca = CertificateAuthority.create(
            state_dir,
            passphrase=passphrase,
            key_type=args.key_type,
            name_constraints_excluded=args.exclude,
            organization=args.organization,
            now=_now(),
            intermediate_key=args.ca_key,
            token=token_access(args),
        )
    except ConfigurationError as exc:
        return _fail(exc)
    if ca.intermediate_key_uri is not None:
        print(f"Issuing key:  in the PKCS#11 token, {ca.intermediate_key_uri}")
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


def _init_imported(args: argparse.Namespace, state_dir: Path) -> int:
    try:
        ca = import_from_args(args, state_dir)
    except ConfigurationError as exc:
        return _fail(exc)
    now = _now()
    for warning in inspect_intermediate(ca.intermediate_certificate, now=now):
        print(f"tlsmitm: warning: {warning}", file=sys.stderr)
    key_text = args.import_intermediate[1]
    if not is_pkcs11_uri(key_text):
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(os.stat(key_text).st_mode)
            if mode & 0o077:
                print(
                    f"tlsmitm: warning: {key_text} is readable by others (mode {mode:04o}); "
                    f"tlsmitm keeps its own 0600 copy in {ca.ca_dir}: delete the original, or "
                    f"chmod 600 {key_text}",
                    file=sys.stderr,
                )
    print(f"Imported the intermediate into {ca.ca_dir}")
    print(f"Intermediate: {ca.intermediate_certificate.subject.rfc4514_string()}")
    print(f"Issued by:    {ca.root_certificate.subject.rfc4514_string()} (the root clients trust)")
    print(f"Root SHA-256: {_colon_hex(ca.root_certificate.fingerprint(hashes.SHA256()))}")
    print(f"Chain sent after each leaf: {len(ca.intermediate_chain)} certificate(s)")
    if ca.intermediate_key_uri is not None:
        print(f"Issuing key:  in the PKCS#11 token, {ca.intermediate_key_uri}")
    print("Clients that trust that root accept the proxy's leaves; nothing new to install.")
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
        ca = CertificateAuthority.load(state_dir, token=token_access(args))
        if args.crl:
            data = ca.export_crl(
                now=_now(), passphrase=_passphrase(args), root_key_file=args.root_key
            )
        else:
            data = ca.export_root(der=args.der)
    except ConfigurationError as exc:
        return _fail(exc)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def _describe_key_file(status: KeyFileStatus) -> str:
    if status.token_uri is not None:
        return f"in the PKCS#11 token {status.token_uri} (never leaves it)"
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
        ca = CertificateAuthority.load(state_dir, token=token_access(args))
    except ConfigurationError as exc:
        return _fail(exc)
    now = _now()
    files = {status.role: status for status in ca.key_files()}
    lines = [f"tlsmitm CA in {ca.ca_dir} (installation {ca.installation_id})", ""]
    lines.append("Root (the certificate clients trust):")
    lines += _certificate_lines(ca.root_certificate, now)
    if ca.imported:
        lines.append("  key file: not here (the root of the PKI that issued the intermediate)")
    else:
        lines.append(f"  key file: {_describe_key_file(files['root'])}")
    lines.append("")
    if ca.imported:
        lines.append("Intermediate, imported (online; signs every leaf):")
    else:
        lines.append(f"Intermediate, generation {ca.generation} (online; signs every leaf):")
    lines += _certificate_lines(ca.intermediate_certificate, now)
    lines.append(f"  key file: {_describe_key_file(files['intermediate'])}")
    for certificate in ca.intermediate_chain[1:]:
        lines.append(f"  then:     {certificate.subject.rfc4514_string()} (sent with each leaf)")
    lines.append("")
    lines.append("Error CA (never exported, never trusted; for the clients' own warnings):")
    lines += _certificate_lines(ca.error_ca_certificate, now)[:2]
    lines.append(f"  key file: {_describe_key_file(files['error-ca'])}")
    lines.append("")
    for node in ca.node_intermediates:
        state = f"REVOKED {node.revoked:%Y-%m-%d}" if node.revoked is not None else "in force"
        lines.append(
            f"Node intermediate {node.name}: serial {node.certificate.serial_number:x}, issued "
            f"{node.issued:%Y-%m-%d}, {state}"
        )
    if ca.node_intermediates:
        lines.append("")
    crl = ca.stored_crl
    if crl is None:
        lines.append("CRL: none here (the PKI that issued the intermediate publishes it)")
    elif crl.next_update_utc is not None:
        revoked = sum(1 for node in ca.node_intermediates if node.revoked is not None)
        lines.append(
            f"CRL: number {ca.crl_number}, issued {crl.last_update_utc:%Y-%m-%d}, next "
            f"update {crl.next_update_utc:%Y-%m-%d}, {len(ca.retired_intermediates)} retired "
            f"intermediate(s) and {revoked} node intermediate(s) revoked"
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
    out: list[str] = []
    option = _state_dir_option(ca.state_dir or default_state_dir())
    if ca.imported:
        out += inspect_intermediate(ca.intermediate_certificate, now=now)
    elif ca.intermediate_certificate.not_valid_after_utc - now < dt.timedelta(days=60):
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
    next_update = ca.stored_crl.next_update_utc if ca.stored_crl is not None else None
    if next_update is not None and next_update <= now:
        out.append("the CRL has expired; re-sign it with: python -m tlsmitm ca export --crl")
    return out


def _rotate(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    passphrase = _passphrase(args)
    try:
        ca = CertificateAuthority.load(state_dir, token=token_access(args))
        old = ca.intermediate_certificate
        ca.rotate_intermediate(
            now=_now(),
            passphrase=passphrase,
            root_key_file=args.root_key,
            compromised=args.compromised,
            intermediate_key=args.ca_key,
            token=token_access(args),
        )
    except ConfigurationError as exc:
        return _fail(exc)
    print(f"Rotated the intermediate of {ca.ca_dir}: generation {ca.generation}.")
    print(f"Revoked (in the CRL): serial {old.serial_number:x}")
    fingerprint = _colon_hex(ca.intermediate_certificate.fingerprint(hashes.SHA256()))
    print(f"New intermediate SHA-256: {fingerprint}")
    print("The root is unchanged: clients keep trusting it. Restart running proxies.")
    return 0


def _issue_node(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    out: Path = args.out
    try:
        ca = CertificateAuthority.load(state_dir, token=token_access(args))
        public_key = None
        if args.key is not None:
            token_key = open_token_key(args.key, token_access(args))
            public_key = token_key.public_key()
            token_key.close()
        for name in (f"{args.node}.pem", f"{args.node}.key"):
            if (out / name).exists():
                raise ConfigurationError(
                    f"{out / name} exists; it was left untouched (choose another --out)",
                    reason="node_exists",
                )
        node, key = ca.issue_node_intermediate(
            args.node,
            now=_now(),
            passphrase=_passphrase(args),
            root_key_file=args.root_key,
            public_key=public_key,
        )
        pem = serialization.Encoding.PEM
        with _io_errors(f"cannot write the node's files to {out}"):
            out.mkdir(mode=0o700, parents=True, exist_ok=True)
            if key is not None:
                _write_atomic(out, f"{args.node}.key", _plain_private_key(key))
            _write_atomic(
                out,
                f"{args.node}.pem",
                node.certificate.public_bytes(pem) + ca.root_certificate.public_bytes(pem),
            )
    except ConfigurationError as exc:
        return _fail(exc)
    print(f"Issued node {node.name}'s intermediate: serial {node.certificate.serial_number:x}")
    print(f"Certificate and root: {out / (args.node + '.pem')}")
    if key is not None:
        print(
            f"Private key (0600):   {out / (args.node + '.key')} -- move it to the node, then "
            "delete it here"
        )
        key_arg = f"{args.node}.key"
    else:
        key_arg = f"'{args.key}'"
    print(f"On the node: python -m tlsmitm ca init --import-intermediate {args.node}.pem {key_arg}")
    return 0


def _revoke_node(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    try:
        ca = CertificateAuthority.load(state_dir, token=token_access(args))
        node = ca.revoke_node_intermediate(
            args.node, now=_now(), passphrase=_passphrase(args), root_key_file=args.root_key
        )
    except ConfigurationError as exc:
        return _fail(exc)
    print(
        f"Revoked node {node.name}'s intermediate (serial {node.certificate.serial_number:x}) in "
        f"CRL number {ca.crl_number}."
    )
    print(
        "Distribute the CRL: python -m tlsmitm ca export --crl"
        + _state_dir_option(state_dir)
        + " > tlsmitm.crl"
    )
    return 0
