"""Issuing keys that stay in a PKCS#11 token (an HSM, a smart card, SoftHSM2).

Theory of operation
-------------------

A token key is named by a PKCS#11 URI (RFC 7512), for example
``pkcs11:token=tlsmitm;object=issuing?module-name=softhsm2``. :func:`parse_uri` reads it with
a small parser of our own (RFC 7512 §2.3 grammar); :func:`open_token_key` then

1. finds the module (the token vendor's shared library): an explicit path, the URI's
   ``module-path``, the ``TLSMITM_PKCS11_MODULE`` variable, or ``module-name`` looked up in
   p11-kit's module registry and in the usual library directories of any architecture;
2. finds exactly one token whose attributes match the URI's, and logs in with the user PIN --
   from a file or an environment variable, never from the command line or the URI itself
   (RFC 7512 §2.4's ``pin-value`` is refused: it would sit in ``ps`` output and in files);
3. finds exactly one private key matching ``object``/``id``, and its public key (the public
   key object with the same id or label), which is what certificates are built for.

The result is a :class:`TokenKey`: a ``cryptography`` ``EllipticCurvePrivateKey`` whose
:meth:`~TokenKey.sign` hashes in Python and asks the token for a raw ECDSA signature
(``CKM_ECDSA``); or, for an RSA key, a :class:`TokenRsaKey` (an ``RSAPrivateKey``, PKCS #1
v1.5 through ``CKM_SHA256_RSA_PKCS``). The private key never leaves the token:
``private_bytes`` and ``private_numbers`` refuse. Because it is a real ``cryptography`` key,
``cryptography``'s builders (CRLs, intermediates) and :class:`~tlsmitm._forge.CertForge`'s DER
templates sign through it without knowing.

Keys are ECDSA on P-256 or P-384, or RSA of 2048 bits or more (CA/B BR §6.1.5). A session is
used by one thread at a time (PKCS#11 v2.40 §5.1.1 leaves concurrent use of one session to the
module): signatures are serialised by a lock. A session that the token lost (re-inserted,
restarted, logged out) is reopened once, with the same PIN source, and must still hold the same key.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding

from ._errors import ConfigurationError

__all__ = [
    "MODULE_ENV",
    "PIN_ENV",
    "TOKEN_KEY_TYPES",
    "Pkcs11Uri",
    "TokenAccess",
    "TokenKey",
    "TokenRsaKey",
    "find_module",
    "is_pkcs11_uri",
    "open_token_key",
    "parse_uri",
]

log = logging.getLogger("tlsmitm.pkcs11")

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

PIN_ENV = "TLSMITM_PKCS11_PIN"
MODULE_ENV = "TLSMITM_PKCS11_MODULE"
SCHEME = "pkcs11:"

# RFC 7512 §2.3: pk11-path-attr-name and pk11-query-attr-name (vendor ones start with "x-").
_PATH_ATTRIBUTES = (
    "token",
    "manufacturer",
    "serial",
    "model",
    "library-manufacturer",
    "library-description",
    "library-version",
    "object",
    "type",
    "id",
    "slot-description",
    "slot-manufacturer",
    "slot-id",
)
_QUERY_ATTRIBUTES = ("pin-source", "pin-value", "module-name", "module-path")
_OBJECT_TYPES = ("public", "private", "cert", "secret-key", "data")
# RFC 7512 §2.3: pk11-pchar = unreserved / pk11-res-avail / "&" / pct-encoded, pk11-qchar =
# unreserved / pk11-res-avail / "/" / "?" / "|" / pct-encoded.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCHAR = _UNRESERVED | frozenset(":[]@!$'()*+,=&")
_QCHAR = (_UNRESERVED | frozenset(":[]@!$'()*+,=/?|")) - frozenset("&")
_HEX = frozenset("0123456789abcdefABCDEF")

# DER of the namedCurve OIDs in CKA_EC_PARAMS (RFC 5480 §2.1.1.1).
_CURVES: dict[bytes, ec.EllipticCurve] = {
    bytes.fromhex("06082a8648ce3d030107"): ec.SECP256R1(),
    bytes.fromhex("06052b81040022"): ec.SECP384R1(),
}


def _bad_uri(text: str, why: str) -> NoReturn:
    raise ConfigurationError(f"bad PKCS#11 URI {text!r}: {why} (RFC 7512)", reason="pkcs11_uri")


def is_pkcs11_uri(text: str) -> bool:
    """Whether ``text`` is meant as a PKCS#11 URI (starts with ``pkcs11:``, any case)."""
    return text[: len(SCHEME)].lower() == SCHEME


def _unescape(raw: str, allowed: frozenset[str], text: str) -> bytes:
    out = bytearray()
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == "%":
            pair = raw[index + 1 : index + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                _bad_uri(text, f"'%' not followed by two hex digits in {raw!r}")
            out.append(int(pair, 16))
            index += 3
            continue
        if char not in allowed:
            _bad_uri(text, f"character {char!r} must be percent-encoded")
        out += char.encode("ascii")
        index += 1
    return bytes(out)


def _text(value: bytes, name: str, text: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        _bad_uri(text, f"{name} is not UTF-8")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pkcs11Uri:
    """A parsed PKCS#11 URI (RFC 7512): which token, which object, and how to reach them.

    Attributes:
        path: the path attributes (``token``, ``object``, ``serial`` ...), decoded; ``id`` is
            kept as hex of its bytes.
        query: the query attributes (``module-name``, ``module-path``, ``pin-source``).
        text: the URI as given.
    """

    path: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    text: str = ""

    @property
    def key_id(self) -> bytes | None:
        """The ``id`` attribute's bytes (CKA_ID), if given."""
        value = self.path.get("id")
        return bytes.fromhex(value) if value is not None else None

    def __str__(self) -> str:
        return self.text


def parse_uri(text: str) -> Pkcs11Uri:
    """Parse ``text`` as a PKCS#11 URI (RFC 7512 §2.3).

    Raises:
        ConfigurationError: ``pkcs11_uri``: not a PKCS#11 URI, a bad character or escape, an
            unknown or repeated attribute, or ``pin-value`` (give the PIN from a file or the
            environment instead).
    """
    if not isinstance(text, str) or not is_pkcs11_uri(text):
        _bad_uri(str(text), "it must start with 'pkcs11:'")
    body = text[len(SCHEME) :]
    path_part, _, query_part = body.partition("?")
    path: dict[str, str] = {}
    query: dict[str, str] = {}
    for part, separator, known, allowed, out in (
        (path_part, ";", _PATH_ATTRIBUTES, _PCHAR, path),
        (query_part, "&", _QUERY_ATTRIBUTES, _QCHAR, query),
    ):
        if not part:
            continue
        for attribute in part.split(separator):
            name, equals, raw = attribute.partition("=")
            if not equals or not name:
                _bad_uri(text, f"{attribute!r} is not NAME=VALUE")
            name = name.lower()
            if name not in known and not name.startswith("x-"):
                _bad_uri(text, f"unknown attribute {name!r}")
            if name in out:
                # RFC 7512 §2.3: "An attribute ... MUST NOT appear more than once".
                _bad_uri(text, f"attribute {name!r} appears twice")
            value = _unescape(raw, allowed, text)
            out[name] = value.hex() if name == "id" else _text(value, name, text)
    if "pin-value" in query:
        raise ConfigurationError(
            "the PKCS#11 URI carries the PIN (pin-value): it would be visible in ps and stored "
            f"in files; remove it and give the PIN with --pin-file or {PIN_ENV}",
            reason="pkcs11_uri",
        )
    kind = path.get("type")
    if kind is not None and kind not in _OBJECT_TYPES:
        _bad_uri(text, f"type must be one of {', '.join(_OBJECT_TYPES)}")
    slot_id = path.get("slot-id")
    if slot_id is not None and not slot_id.isdigit():
        _bad_uri(text, "slot-id must be a decimal number")
    if "object" not in path and "id" not in path:
        _bad_uri(text, "name the key with object=LABEL or id=%HH...")
    return Pkcs11Uri(path=path, query=query, text=text)


# -- the module ---------------------------------------------------------------------------------

#: p11-kit's module registry (Debian, Fedora, Arch): one ``NAME.module`` file per module.
P11KIT_REGISTRIES = ("/usr/share/p11-kit/modules", "/etc/pkcs11/modules")


def _library_dirs() -> Iterator[Path]:
    """The usual library directories of every architecture (Debian multiarch and others)."""
    for pattern in (
        "/usr/lib/*-linux-*",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib/*-linux-*",
        "/usr/local/lib",
    ):
        for base in sorted(glob.glob(pattern)):
            for sub in ("", "pkcs11", "softhsm"):
                yield Path(base) / sub


def _registered_modules() -> Iterator[tuple[str, Path]]:
    """``(name, library)`` of each module registered with p11-kit whose library exists."""
    for registry in P11KIT_REGISTRIES:
        for config in sorted(glob.glob(os.path.join(registry, "*.module"))):
            try:
                lines = Path(config).read_text(encoding="utf-8").splitlines()
            except OSError:
                continue
            for line in lines:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "module":
                    library = _locate(value.strip())
                    if library is not None:
                        yield Path(config).stem, library
                    break


def _locate(library: str) -> Path | None:
    """An absolute library path as it is, or a bare file name searched in library dirs."""
    if os.path.isabs(library):
        return Path(library) if os.path.isfile(library) else None
    for directory in _library_dirs():
        candidate = directory / library
        if candidate.is_file():
            return candidate
    return None


def _by_name(name: str) -> Path | None:
    for registered, library in _registered_modules():
        if name in (registered, library.name, library.stem, library.stem.removeprefix("lib")):
            return library
    for candidate in (name, f"{name}.so", f"lib{name}.so"):
        found = _locate(candidate)
        if found is not None:
            return found
    return None


def find_module(uri: Pkcs11Uri, explicit: Path | None = None) -> Path:
    """The PKCS#11 module (shared library) to load for ``uri``.

    In order: ``explicit`` (``--pkcs11-module``); the URI's ``module-path`` (a library, or a
    directory to look for ``module-name`` in); ``$TLSMITM_PKCS11_MODULE``; the URI's
    ``module-name`` in p11-kit's registry and the usual library directories; the only module
    registered with p11-kit.

    Raises:
        ConfigurationError: ``pkcs11_module`` with what to do.
    """
    name = uri.query.get("module-name")
    for given, what in (
        (str(explicit) if explicit is not None else None, "--pkcs11-module"),
        (uri.query.get("module-path"), "module-path"),
        (os.environ.get(MODULE_ENV) or None, MODULE_ENV),
    ):
        if given is None:
            continue
        path = Path(given)
        if path.is_dir() and name is not None:
            for candidate in (name, f"{name}.so", f"lib{name}.so"):
                if (path / candidate).is_file():
                    return path / candidate
        if path.is_file():
            return path
        raise ConfigurationError(
            f"the PKCS#11 module {given} ({what}) does not exist", reason="pkcs11_module"
        )
    if name is not None:
        found = _by_name(name)
        if found is None:
            raise ConfigurationError(
                f"no PKCS#11 module named {name!r} is installed (looked in p11-kit's registry "
                "and the library directories); install it or give --pkcs11-module PATH",
                reason="pkcs11_module",
            )
        return found
    registered = list(_registered_modules())
    if len(registered) == 1:
        return registered[0][1]
    names = ", ".join(module for module, _ in registered) or "none registered"
    raise ConfigurationError(
        f"say which PKCS#11 module to use ({names}): add ?module-name=NAME to the URI, or "
        "give --pkcs11-module PATH",
        reason="pkcs11_module",
    )


# -- the PIN ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenAccess:
    """How to reach a token: the module and the user PIN (never on the command line).

    Attributes:
        module: the module's path (else found from the URI, see :func:`find_module`).
        pin: bytes, or a callable returning them (read only when a login is needed); else the
            URI's ``pin-source`` file, else ``$TLSMITM_PKCS11_PIN``.
    """

    module: Path | None = None
    pin: bytes | Callable[[], bytes] | None = field(default=None, repr=False)


def pin_from_file(path: Path) -> Callable[[], bytes]:
    """A PIN callback that reads the first line of ``path`` when called."""

    def read() -> bytes:
        try:
            with open(path, "rb") as handle:
                return handle.readline().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the PKCS#11 PIN file {path}: {exc.strerror}", reason="pkcs11_pin"
            ) from None

    return read


def pin_from_env(name: str = PIN_ENV) -> Callable[[], bytes]:
    """A PIN callback that reads the environment variable ``name`` when called."""

    def read() -> bytes:
        value = os.environ.get(name)
        if not value:
            raise ConfigurationError(
                f"the PKCS#11 PIN was to come from the environment variable {name}, which is not "
                "set or empty",
                reason="pkcs11_pin",
            )
        return os.fsencode(value)

    return read


def _pin(uri: Pkcs11Uri, access: TokenAccess) -> bytes:
    source = access.pin
    if source is None:
        pin_source = uri.query.get("pin-source")
        if pin_source is not None:
            # RFC 7512 §2.4: a URI (file:) or an application-specific value: a path here.
            location = pin_source.removeprefix("file://").removeprefix("file:")
            source = pin_from_file(Path(location))
        else:
            source = pin_from_env(PIN_ENV)
    value = source() if callable(source) else source
    if not value:
        raise ConfigurationError("the PKCS#11 PIN is empty", reason="pkcs11_pin")
    return value


# -- the key ------------------------------------------------------------------------------------


@functools.cache
def _lost_session_errors() -> tuple[type[BaseException], ...]:
    """PKCS#11 errors after which a new session may work (PKCS#11 v2.40 §5.1: CKR_SESSION_*,
    CKR_DEVICE_*, CKR_TOKEN_NOT_PRESENT, CKR_USER_NOT_LOGGED_IN). Imported on first use: a
    process without token keys never loads the module."""
    from pkcs11 import exceptions as e

    return (
        e.SessionHandleInvalid,
        e.SessionClosed,
        e.DeviceRemoved,
        e.TokenNotPresent,
        e.UserNotLoggedIn,
        e.DeviceError,
    )


def _token_error(what: str, exc: BaseException) -> NoReturn:
    detail = type(exc).__name__
    raise ConfigurationError(f"{what}: the token said {detail}", reason="pkcs11_token") from exc


class _TokenSession:
    """One key's session with its token: serialised signatures, reopened once when lost."""

    def __init__(
        self,
        *,
        uri: Pkcs11Uri,
        module: Path,
        session: Any,
        key: Any,
        public_key: PublicKey,
        reconnect: Callable[[], tuple[Any, Any, PublicKey]] | None,
    ) -> None:
        self.uri = uri
        self.module = module
        self.public_key = public_key
        self._session = session
        self._key = key
        self._reconnect = reconnect
        self._closed = False
        self._lock = threading.Lock()

    def sign(self, data: bytes, mechanism: Any) -> bytes:
        from pkcs11.exceptions import PKCS11Error

        with self._lock:
            if self._closed:
                raise ConfigurationError(
                    f"the token key {self.uri} was closed", reason="pkcs11_token"
                )
            try:
                return bytes(self._key.sign(data, mechanism=mechanism))
            except PKCS11Error as exc:
                if not isinstance(exc, _lost_session_errors()) or self._reconnect is None:
                    _token_error(f"the token key {self.uri} could not sign", exc)
                # The session is gone (the token was re-inserted, the HSM restarted, the
                # module logged out): open a new one once, with the same PIN, and sign again.
                log.warning("PKCS#11 session for %s lost (%s); reopening", self.uri, exc)
                with contextlib.suppress(PKCS11Error):
                    self._session.close()
                session, key, public = self._reconnect()
                if public != self.public_key:
                    session.close()
                    raise ConfigurationError(
                        f"the token key {self.uri} is another key since it was opened",
                        reason="pkcs11_key",
                    ) from None
                self._session, self._key = session, key
                try:
                    return bytes(self._key.sign(data, mechanism=mechanism))
                except PKCS11Error as again:
                    _token_error(f"the token key {self.uri} could not sign", again)

    def close(self) -> None:
        from pkcs11.exceptions import PKCS11Error

        with self._lock, contextlib.suppress(PKCS11Error):  # a dead session is closed
            self._closed = True
            self._session.close()


class _TokenHeldKey:
    """What every token-held key shares: where it lives, closing, and refusing export."""

    _token: _TokenSession

    @property
    def uri(self) -> Pkcs11Uri:
        """The URI the key was opened with."""
        return self._token.uri

    @property
    def module(self) -> Path:
        """The module (shared library) serving the token."""
        return self._token.module

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise TypeError("the private key stays in the PKCS#11 token")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a token key cannot be pickled")

    def close(self) -> None:
        """Log out and close the session (the key cannot sign afterwards)."""
        self._token.close()


class TokenKey(_TokenHeldKey, ec.EllipticCurvePrivateKey):
    """An ECDSA private key held in a PKCS#11 token; signatures are made by the token.

    Build one with :func:`open_token_key`. Thread-safe. The key material cannot be exported:
    :meth:`private_bytes`, :meth:`private_numbers` and :meth:`exchange` raise ``TypeError``.
    """

    def __init__(self, token: _TokenSession) -> None:
        assert isinstance(token.public_key, ec.EllipticCurvePublicKey)
        self._token = token
        self._public = token.public_key

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        """An ECDSA signature (DER, RFC 3279 §2.2.3) over ``data``, made by the token."""
        from pkcs11 import Mechanism

        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("a token EC key signs with ECDSA only")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            digest = bytes(data)
        else:
            digest = hashlib.new(algorithm.name, bytes(data)).digest()
        # PKCS#11 v2.40 §2.3.6 CKM_ECDSA: the input is the hash; the output is r || s.
        raw = self._token.sign(digest, Mechanism.ECDSA)
        half = len(raw) // 2
        return utils.encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    def exchange(
        self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey
    ) -> bytes:  # pragma: no cover - never used by tlsmitm
        raise TypeError("a token key is used for signatures only")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise TypeError("the private key stays in the PKCS#11 token")

    def __copy__(self) -> TokenKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenKey:
        return self

    def __repr__(self) -> str:
        return f"<TokenKey {self.uri} curve={self.curve.name}>"


class TokenRsaKey(_TokenHeldKey, rsa.RSAPrivateKey):
    """An RSA private key (2048 bits or more) held in a PKCS#11 token; PKCS #1 v1.5 signatures
    are made by the token (``CKM_SHA256_RSA_PKCS``, ``CKM_SHA384_RSA_PKCS``).

    Build one with :func:`open_token_key`. Thread-safe. The key material cannot be exported.
    """

    def __init__(self, token: _TokenSession) -> None:
        assert isinstance(token.public_key, rsa.RSAPublicKey)
        self._token = token
        self._public = token.public_key

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        padding: AsymmetricPadding,
        algorithm: Any,
    ) -> bytes:
        """A PKCS #1 v1.5 signature (RFC 8017 §8.2) over ``data``, made by the token."""
        from pkcs11 import Mechanism

        if not isinstance(padding, asym_padding.PKCS1v15):
            raise TypeError("a token RSA key signs with PKCS #1 v1.5 only")
        mechanisms = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS}
        if not isinstance(algorithm, hashes.HashAlgorithm) or algorithm.name not in mechanisms:
            raise TypeError("a token RSA key signs SHA-256 or SHA-384 of the data")
        return self._token.sign(bytes(data), mechanisms[algorithm.name])

    def decrypt(self, ciphertext: bytes, padding: AsymmetricPadding) -> bytes:
        raise TypeError("a token key is used for signatures only")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise TypeError("the private key stays in the PKCS#11 token")

    def __copy__(self) -> TokenRsaKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenRsaKey:
        return self

    def __repr__(self) -> str:
        return f"<TokenRsaKey {self.uri} bits={self.key_size}>"


#: Every kind of token-held key (for ``isinstance``).
TOKEN_KEY_TYPES = (TokenKey, TokenRsaKey)


def _matches(want: dict[str, str], have: dict[str, str]) -> bool:
    return all(have.get(name) == value for name, value in want.items() if name in have)


def _token_attributes(slot: Any, token: Any) -> dict[str, str]:
    serial = token.serial
    return {
        "token": str(token.label),
        "manufacturer": str(token.manufacturer_id),
        "serial": serial.decode("ascii", "replace") if isinstance(serial, bytes) else str(serial),
        "model": str(token.model),
        "slot-description": str(slot.slot_description),
        "slot-manufacturer": str(slot.manufacturer_id),
        "slot-id": str(slot.slot_id),
    }


def _public_key_of(public: Any, uri: Pkcs11Uri) -> PublicKey:
    from pkcs11 import Attribute, KeyType

    if public[Attribute.KEY_TYPE] == KeyType.RSA:
        modulus = int.from_bytes(bytes(public[Attribute.MODULUS]), "big")
        exponent = int.from_bytes(bytes(public[Attribute.PUBLIC_EXPONENT]), "big")
        try:
            rsa_key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
        except ValueError:
            raise ConfigurationError(
                f"the token's public key for {uri} is not a valid RSA key", reason="pkcs11_key"
            ) from None
        if rsa_key.key_size < 2048:  # CA/B BR §6.1.5
            raise ConfigurationError(
                f"the token key {uri} has {rsa_key.key_size} bits; tlsmitm signs with RSA keys "
                "of 2048 bits or more",
                reason="pkcs11_key",
            )
        return rsa_key
    if public[Attribute.KEY_TYPE] != KeyType.EC:
        raise ConfigurationError(f"the token key {uri} is neither EC nor RSA", reason="pkcs11_key")
    params = bytes(public[Attribute.EC_PARAMS])
    curve = _CURVES.get(params)
    if curve is None:
        raise ConfigurationError(
            f"the token key {uri} is not on P-256 or P-384; tlsmitm signs with those only",
            reason="pkcs11_key",
        )
    point = bytes(public[Attribute.EC_POINT])
    # PKCS#11 v2.40 §2.3.3: CKA_EC_POINT is the DER OCTET STRING of the encoded point (some
    # modules give the bare point).
    if point[:1] == b"\x04" and len(point) > 2 and point[1] == len(point) - 2:
        point = point[2:]
    elif point[:1] == b"\x04" and len(point) > 3 and point[1] == 0x81:
        point = point[3:]
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    except ValueError:
        raise ConfigurationError(
            f"the token's public key for {uri} is not a valid point", reason="pkcs11_key"
        ) from None


def open_token_key(
    uri: str | Pkcs11Uri, access: TokenAccess | None = None
) -> TokenKey | TokenRsaKey:
    """Open the private key named by ``uri`` in its token (see the module docstring).

    Raises:
        ConfigurationError: ``pkcs11_uri``, ``pkcs11_module``, ``pkcs11_pin`` (missing or wrong),
            ``pkcs11_token`` (no or several matching tokens, a token failure), ``pkcs11_key``
            (no, several or an unsupported key).
    """
    try:
        import pkcs11  # noqa: F401 - only to say what is missing
    except ImportError:  # pragma: no cover - the extra is not installed
        raise ConfigurationError(
            "PKCS#11 keys need python-pkcs11: pip install 'tlsmitm[pkcs11]'",
            reason="pkcs11_module",
        ) from None
    parsed = uri if isinstance(uri, Pkcs11Uri) else parse_uri(uri)
    access = access or TokenAccess()
    module = find_module(parsed, access.module)
    connect = functools.partial(_connect, parsed, module, access)
    session, key, public_key = connect()
    token = _TokenSession(
        uri=parsed,
        module=module,
        session=session,
        key=key,
        public_key=public_key,
        reconnect=connect,
    )
    token_key: TokenKey | TokenRsaKey
    # Prove the pair now rather than at the first mint: the token signs, we verify.
    probe = b"tlsmitm token key check"
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            token_key = TokenRsaKey(token)
            pkcs1 = asym_padding.PKCS1v15()
            signature = token_key.sign(probe, pkcs1, hashes.SHA256())
            public_key.verify(signature, probe, pkcs1, hashes.SHA256())
        else:
            token_key = TokenKey(token)
            scheme = ec.ECDSA(hashes.SHA256())
            public_key.verify(token_key.sign(probe, scheme), probe, scheme)
    except Exception as exc:
        token.close()
        if isinstance(exc, ConfigurationError):
            raise
        raise ConfigurationError(
            f"the token's private and public keys for {parsed} do not belong together",
            reason="pkcs11_key",
        ) from None
    return token_key


def _connect(parsed: Pkcs11Uri, module: Path, access: TokenAccess) -> tuple[Any, Any, PublicKey]:
    """Find the token, log in, find the key pair: ``(session, private key, public key)``."""
    import pkcs11
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.exceptions import PinIncorrect, PinLenRange, PKCS11Error, UserAlreadyLoggedIn

    try:
        library = pkcs11.lib(str(module))
        slots = library.get_slots(token_present=True)
        candidates = []
        for slot in slots:
            token = slot.get_token()
            if _matches(parsed.path, _token_attributes(slot, token)):
                candidates.append(token)
    except PKCS11Error as exc:
        _token_error(f"cannot list the tokens of {module}", exc)
    except RuntimeError as exc:
        raise ConfigurationError(
            f"cannot load the PKCS#11 module {module}: {exc}", reason="pkcs11_module"
        ) from exc
    if len(candidates) != 1:
        which = "no token" if not candidates else f"{len(candidates)} tokens"
        raise ConfigurationError(
            f"{which} of {module} match {parsed} (the token must be present and its token=, "
            "serial= ... attributes must single it out)",
            reason="pkcs11_token",
        )
    pin = _pin(parsed, access)
    try:
        try:
            session = candidates[0].open(user_pin=pin.decode("utf-8", "surrogateescape"))
        except UserAlreadyLoggedIn:
            # PKCS#11 v2.40 §5.6: the login belongs to the application, not to the session;
            # this process already logged in (another key of the same token): share it.
            session = candidates[0].open()
    except (PinIncorrect, PinLenRange):
        raise ConfigurationError(
            f"the token of {parsed} refused the PIN (wrong PIN)", reason="pkcs11_pin"
        ) from None
    except PKCS11Error as exc:
        _token_error(f"cannot log in to the token of {parsed}", exc)
    try:
        template: dict[Any, Any] = {}
        if "object" in parsed.path:
            template[Attribute.LABEL] = parsed.path["object"]
        if parsed.key_id is not None:
            template[Attribute.ID] = parsed.key_id
        kind = parsed.path.get("type")
        if kind not in (None, "private"):
            raise ConfigurationError(
                f"{parsed} names a {kind} object; name the private key (type=private)",
                reason="pkcs11_key",
            )
        keys = list(session.get_objects({**template, Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        if len(keys) != 1:
            which = "no private key" if not keys else f"{len(keys)} private keys"
            raise ConfigurationError(
                f"the token has {which} matching {parsed}", reason="pkcs11_key"
            )
        key = keys[0]
        publics = list(session.get_objects({**template, Attribute.CLASS: ObjectClass.PUBLIC_KEY}))
        if len(publics) != 1:
            raise ConfigurationError(
                f"the token has no single public key object matching {parsed} (same label or "
                "id as the private key); tlsmitm needs it to build certificates",
                reason="pkcs11_key",
            )
        public_key = _public_key_of(publics[0], parsed)
    except ConfigurationError:
        session.close()
        raise
    except PKCS11Error as exc:
        session.close()
        _token_error(f"cannot read the key {parsed}", exc)
    return session, key, public_key
