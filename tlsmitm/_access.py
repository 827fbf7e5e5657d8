"""Who may use the proxy: an allow-list of client networks and proxy authentication (pure).

An open proxy is found and abused within hours. :class:`AccessPolicy` holds the two ways to close
one, either or both:

* an **allow-list** of client networks (``--allow CIDR``): a client outside it gets ``403`` (or,
  in transparent mode, a closed connection) before anything else happens;
* **proxy authentication** (``Proxy-Authorization: Basic``, RFC 7617 over RFC 9110 §11.7): the
  credentials file holds one ``user:hash`` line per user, the hash scrypt (``hashlib.scrypt``,
  RFC 7914) or Argon2 (RFC 9106, with the ``argon2-cffi`` package) -- never a plain password. A
  request without valid credentials gets ``407`` with a ``Proxy-Authenticate`` challenge.

:func:`open_proxy_refusal` says why ``serve`` must not start on a non-loopback address with
neither. Nothing here does I/O: the caller reads the file and passes its text, and runs the
(deliberately slow) password checks off its event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from ._errors import ConfigurationError

__all__ = [
    "PROXY_AUTHENTICATE",
    "AccessPolicy",
    "Credentials",
    "hash_password",
    "open_proxy_refusal",
    "parse_basic",
    "parse_network",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The challenge sent with ``407`` (RFC 7617 §2: the realm; §2.1: UTF-8 user names and passwords).
PROXY_AUTHENTICATE: Final = b'Basic realm="tlsmitm", charset="UTF-8"'

_SCRYPT_PREFIX: Final = "$scrypt$"
_ARGON2_PREFIX: Final = "$argon2"
# OWASP Password Storage Cheat Sheet: scrypt N=2^17, r=8, p=1 (128 MiB, a fraction of a second).
_SCRYPT_LOG_N: Final = 17
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
_SALT_BYTES: Final = 16
_KEY_BYTES: Final = 32
_MAX_HEADER: Final = 4096


def parse_network(text: str) -> IPNetwork:
    """``192.168.1.0/24``, ``2001:db8::/32`` or one address (a /32 or /128).

    Raises:
        ValueError: not a network; the message says what was expected.
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a network; write an address or CIDR such as 192.168.1.0/24"
        ) from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: bytes, salt: bytes, log_n: int, r: int, p: int, length: int) -> bytes:
    n = 1 << log_n
    # OpenSSL refuses when 128*r*N*p exceeds maxmem: give it what the parameters need.
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, maxmem=129 * r * n * p + (1 << 20), dklen=length
    )


def hash_password(password: str, *, salt: bytes | None = None, log_n: int = _SCRYPT_LOG_N) -> str:
    """An scrypt hash of ``password`` for the credentials file (RFC 7914).

    The format is ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<key>`` (base64 without padding).
    """
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(password.encode("utf-8"), salt, log_n, _SCRYPT_R, _SCRYPT_P, _KEY_BYTES)
    return f"{_SCRYPT_PREFIX}ln={log_n},r={_SCRYPT_R},p={_SCRYPT_P}${_b64(salt)}${_b64(key)}"


@dataclass(frozen=True, slots=True)
class _Scrypt:
    log_n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @classmethod
    def parse(cls, text: str) -> _Scrypt:
        parts = text[len(_SCRYPT_PREFIX) :].split("$")
        if len(parts) != 3:
            raise ValueError("expected $scrypt$ln=N,r=R,p=P$SALT$KEY")
        params = dict(item.partition("=")[::2] for item in parts[0].split(","))
        try:
            log_n, r, p = int(params["ln"]), int(params["r"]), int(params["p"])
            salt, key = _unb64(parts[1]), _unb64(parts[2])
        except (KeyError, ValueError, binascii.Error):
            raise ValueError("expected $scrypt$ln=N,r=R,p=P$SALT$KEY (base64)") from None
        if not (10 <= log_n <= 22 and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError("scrypt parameters out of range (ln 10..22, r 1..32, p 1..16)")
        if len(salt) < 8 or len(key) < 16:
            raise ValueError("scrypt salt or key too short")
        return cls(log_n, r, p, salt, key)

    def verify(self, password: bytes) -> bool:
        key = _scrypt(password, self.salt, self.log_n, self.r, self.p, len(self.key))
        return hmac.compare_digest(key, self.key)


class _Argon2:
    def __init__(self, text: str) -> None:
        try:
            from argon2 import PasswordHasher
            from argon2.exceptions import InvalidHashError
        except ImportError:  # pragma: no cover - depends on the installation
            raise ValueError(
                "an argon2 hash needs the argon2-cffi package (pip install argon2-cffi); "
                "or use a scrypt line from `tlsmitm passwd`"
            ) from None
        self._hasher = PasswordHasher()
        self._text = text
        try:
            from argon2 import extract_parameters

            extract_parameters(text)
        except (InvalidHashError, ValueError):
            raise ValueError("not a valid argon2 hash") from None

    def verify(self, password: bytes) -> bool:
        from argon2.exceptions import VerificationError, VerifyMismatchError

        try:
            return bool(self._hasher.verify(self._text, password))
        except (VerifyMismatchError, VerificationError):
            return False


_Verifier = _Scrypt | _Argon2


@dataclass(frozen=True, slots=True)
class Credentials:
    """Proxy users and their password hashes, from a credentials file.

    Build with :meth:`parse`. A file line is ``user:hash``; ``#`` starts a comment line.
    """

    _users: Mapping[str, _Verifier]
    _dummy: _Scrypt = field(
        default_factory=lambda: _Scrypt.parse(hash_password("", salt=b"\x00" * 16, log_n=10))
    )

    @classmethod
    def parse(cls, text: str, *, source: str = "credentials file") -> Credentials:
        """Read ``user:hash`` lines.

        Raises:
            ConfigurationError: a line is not ``user:hash`` with a scrypt or argon2 hash (a plain
                password is refused), a user appears twice, or the file names no user.
        """
        users: dict[str, _Verifier] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            where = f"{source} line {number}"
            if not sep or not user or ":" in user:
                raise ConfigurationError(
                    f"{where}: expected USER:HASH (make one with `tlsmitm passwd USER`)",
                    reason="credentials",
                )
            try:
                if hashed.startswith(_SCRYPT_PREFIX):
                    verifier: _Verifier = _Scrypt.parse(hashed)
                elif hashed.startswith(_ARGON2_PREFIX):
                    verifier = _Argon2(hashed)
                else:
                    raise ValueError(
                        "not a scrypt or argon2 hash; passwords are never stored in plain text: "
                        "make the line with `tlsmitm passwd USER`"
                    )
            except ValueError as exc:
                raise ConfigurationError(f"{where}: {exc}", reason="credentials") from None
            if user in users:
                raise ConfigurationError(
                    f"{where}: user {user!r} appears twice", reason="credentials"
                )
            users[user] = verifier
        if not users:
            raise ConfigurationError(
                f"{source} names no user; add lines from `tlsmitm passwd USER`",
                reason="credentials",
            )
        return cls(users)

    @property
    def users(self) -> frozenset[str]:
        """The user names in the file."""
        return frozenset(self._users)

    def verify(self, user: str, password: str) -> bool:
        """Whether ``password`` is ``user``'s. Slow on purpose: call it off the event loop.

        An unknown user costs a hash check too, so timing does not tell which users exist.
        """
        verifier = self._users.get(user)
        secret = password.encode("utf-8")
        if verifier is None:
            self._dummy.verify(secret)
            return False
        return verifier.verify(secret)


def parse_basic(value: bytes) -> tuple[str, str] | None:
    """``Basic <token68>`` -> ``(user, password)``, or ``None`` when malformed (RFC 7617 §2).

    The scheme is case-insensitive (RFC 9110 §11.1); user and password are UTF-8 (RFC 7617
    §2.1); a user-id may not contain a colon.
    """
    if len(value) > _MAX_HEADER:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return None
    return user, password


def _unmap(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress._BaseAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessPolicy:
    """Which clients may use the proxy.

    Attributes:
        allow: client networks allowed; empty allows every address (then authentication, or a
            loopback listener, is what keeps strangers out).
        credentials: proxy users; ``None`` turns proxy authentication off.
    """

    allow: tuple[IPNetwork, ...] = ()
    credentials: Credentials | None = None

    @classmethod
    def build(
        cls, *, allow: Iterable[str | IPNetwork] = (), credentials: Credentials | None = None
    ) -> AccessPolicy:
        """An access policy from networks written as text or already parsed."""
        networks = tuple(n if not isinstance(n, str) else parse_network(n) for n in allow)
        return cls(allow=networks, credentials=credentials)

    @property
    def restricted(self) -> bool:
        """Whether strangers are kept out at all (an allow-list or authentication)."""
        return bool(self.allow) or self.credentials is not None

    def client_allowed(self, address: str) -> bool:
        """Whether a client at ``address`` may connect (``::ffff:a.b.c.d`` is read as IPv4)."""
        if not self.allow:
            return True
        try:
            ip = _unmap(ipaddress.ip_address(address.split("%", 1)[0]))
        except ValueError:
            return False
        return any(ip.version == n.version and ip in n for n in self.allow)


def open_proxy_refusal(host: str, policy: AccessPolicy) -> str | None:
    """Why ``serve`` must not listen on ``host`` with ``policy``, or ``None`` when it may.

    A loopback listener is reachable only from this machine; any other address needs an
    allow-list or proxy authentication.
    """
    if policy.restricted:
        return None
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (
        f"refusing to listen on {host} without --allow or --auth-file: an open proxy is found "
        "and abused within hours; add --allow CIDR (your clients' network) or --auth-file FILE "
        "(lines from `tlsmitm passwd USER`)"
    )
