"""HTTP Strict Transport Security: the header parser, the known-host store, the preload list.

Theory of operation
-------------------

A browser behind tlsmitm never sees the origin's real certificate, so it cannot apply HSTS's one
hard rule -- no click-through for a certificate error on a known HSTS host (RFC 6797 §8.4, §12.1).
tlsmitm applies it instead, and for that it must know at least every host the browser knows:

* :func:`parse_sts` reads a ``Strict-Transport-Security`` value exactly as Chromium does
  (RFC 6797 §6.1; the choices where browsers disagree are listed in ``docs/hsts.rst``).
* :class:`HstsStore` notes the policy of every verified HTTPS response (§8.1) in a
  :class:`~tlsmitm.StateStore` (one namespace, ``"hsts"``, keyed by the normalised host, expiring
  at ``now + max-age``), and answers :meth:`HstsStore.is_known_host` by §8.2 matching: a
  congruent entry, or a superdomain entry that asserted ``includeSubDomains``.
* :class:`PreloadList` is Chromium's preload list held in memory (a dict looked up once per
  suffix of the name): the bundled copy from the ``hstspreload`` package, or a newer
  ``transport_security_state_static.json`` the deployer ships.

Lookups never parse a file: the preload list is a dict, and observed entries are fetched from
the store for every suffix of the name in one query when the store offers ``get_many`` (SQLite
does) or one ``get`` per suffix otherwise. The store stays the single source of truth, so several
processes sharing one SQLite file see each other's observations at once.

No clock (``now`` is a parameter) and no sockets. The only file access is decoding the bundled
preload list (once per process) and :meth:`HstsStore.open`, which opens a ``SqliteStore``.
"""

from __future__ import annotations

import enum
import functools
import importlib.resources
import json
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, runtime_checkable

from ._errors import ConfigurationError
from ._names import InvalidHostName, is_ip_literal, normalize_host
from ._store import MemoryStore, StateStore, StoredItem

__all__ = [
    "MAX_STS_AGE",
    "HstsStore",
    "KnownHost",
    "PreloadList",
    "StsPolicy",
    "parse_sts",
]

#: The longest max-age tlsmitm honours: one year, Chromium's ``kMaxHSTSAgeSecs``. Longer values
#: (however many digits) are clipped to it, not rejected.
MAX_STS_AGE = 86400 * 365

NAMESPACE = "hsts"
_REFRESH_SLACK = 86400.0  # seconds: see HstsStore.observe


class _Unanswered(enum.Enum):
    UNANSWERED = "unanswered"


#: What :meth:`HstsStore.known_host_nowait` returns when only the store can answer.
UNANSWERED: Final = _Unanswered.UNANSWERED


def _never_answered(namespace: str, names: Sequence[str]) -> None:
    return None


_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Parsing (RFC 6797 §6.1)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StsPolicy:
    """A valid ``Strict-Transport-Security`` header, as parsed by :func:`parse_sts`.

    Attributes:
        max_age: seconds the host stays a Known HSTS Host, ``0 <= max_age <= MAX_STS_AGE``.
            ``0`` means "forget this host" (RFC 6797 §6.1.1).
        include_subdomains: whether the policy covers every subdomain too (§6.1.2).
    """

    max_age: int
    include_subdomains: bool

    def __post_init__(self) -> None:
        if type(self.max_age) is not int or not 0 <= self.max_age <= MAX_STS_AGE:
            raise ValueError(f"max_age must be an int in [0, {MAX_STS_AGE}], not {self.max_age!r}")
        if type(self.include_subdomains) is not bool:
            raise ValueError(f"include_subdomains must be a bool, not {self.include_subdomains!r}")


# RFC 2616 §2.2: token = 1*<any CHAR except CTLs or separators>.
_SEPARATORS = frozenset('()<>@,;:\\"/[]?={} \t')
_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - _SEPARATORS
_DIGITS = frozenset("0123456789")
_SP_HT = frozenset(" \t")


def _skip_lws(text: str, pos: int) -> int:
    """Skip implied LWS = [CRLF] 1*( SP | HT ) (RFC 2616 §2.2), folded lines included."""
    end = len(text)
    while pos < end:
        char = text[pos]
        if char in _SP_HT:
            pos += 1
        elif (
            char == "\r"
            and text.startswith("\r\n", pos)
            and pos + 2 < end
            and text[pos + 2] in _SP_HT
        ):
            pos += 3
        else:
            break
    return pos


def _token_end(text: str, pos: int) -> int:
    end = len(text)
    while pos < end and text[pos] in _TOKEN_CHARS:
        pos += 1
    return pos


def _quoted_string(text: str, pos: int) -> tuple[str, int] | None:
    """Parse the quoted-string starting at ``text[pos] == '"'``; ``(content, next pos)`` or None.

    RFC 2616 §2.2: qdtext is any octet except CTLs and ``"`` (LWS allowed); quoted-pair is
    ``\\`` followed by any US-ASCII character.
    """
    out: list[str] = []
    end = len(text)
    pos += 1
    while pos < end:
        char = text[pos]
        if char == '"':
            return "".join(out), pos + 1
        if char == "\\":
            if pos + 1 >= end or text[pos + 1] > "\x7f":
                return None
            out.append(text[pos + 1])
            pos += 2
        elif char == "\r":
            after = _skip_lws(text, pos)
            if after == pos:
                return None  # a CR that does not start folding whitespace
            out.append(" ")
            pos = after
        elif (char < " " and char != "\t") or char == "\x7f" or char > "\xff":
            return None
        else:
            out.append(char)
            pos += 1
    return None  # unterminated


def _directives(text: str) -> list[tuple[str, str | None]] | None:
    """Split a header value into ``(lower-case name, value or None)`` pairs; None if malformed.

    Grammar (RFC 6797 §6.1)::

        [ directive ] *( ";" [ directive ] )
        directive = directive-name [ "=" directive-value ]
        directive-value = token | quoted-string
    """
    result: list[tuple[str, str | None]] = []
    end = len(text)
    pos = 0
    while True:
        pos = _skip_lws(text, pos)
        name_end = _token_end(text, pos)
        if name_end > pos:  # a directive (otherwise an empty one between semicolons)
            # Names are tokens, hence ASCII: lower() is the ASCII case folding §6.1 item 3 needs.
            name = text[pos:name_end].lower()
            value: str | None = None
            pos = _skip_lws(text, name_end)
            if pos < end and text[pos] == "=":
                pos = _skip_lws(text, pos + 1)
                if pos < end and text[pos] == '"':
                    quoted = _quoted_string(text, pos)
                    if quoted is None:
                        return None
                    value, pos = quoted
                else:
                    value_end = _token_end(text, pos)
                    if value_end == pos:
                        return None  # "name=" with no value
                    value, pos = text[pos:value_end], value_end
                pos = _skip_lws(text, pos)
            result.append((name, value))
        if pos == end:
            return result
        if text[pos] != ";":
            return None  # anything else does not conform: ignore the whole header (§6.1 item 4)
        pos += 1


def _delta_seconds(value: str | None) -> int | None:
    """max-age's value after unquoting: 1*DIGIT, clipped to MAX_STS_AGE (Chromium); else None."""
    if not value or not _DIGITS.issuperset(value):
        return None  # no sign, no fraction, no spaces (RFC 6797 §6.1.1 delta-seconds)
    digits = value.lstrip("0") or "0"
    if len(digits) > len(str(MAX_STS_AGE)):
        return MAX_STS_AGE  # huge numbers clip instead of overflowing (Chromium)
    return min(int(digits), MAX_STS_AGE)


def parse_sts(value: str | bytes) -> StsPolicy | None:
    """Parse one ``Strict-Transport-Security`` header value (RFC 6797 §6.1).

    Directive names are case-insensitive; values are tokens or quoted-strings; empty directives
    between semicolons are allowed; unknown directives are ignored. The whole header is void --
    ``None`` -- when ``max-age`` is missing, malformed or repeated, when ``includeSubDomains`` is
    repeated or has a value, or when anything does not conform to the grammar.

    Args:
        value: the field value, as text or as the raw octets (read as ISO-8859-1). One trailing
            CRLF (the end of the header line) is tolerated.

    Returns:
        The policy, or ``None`` if the header must be ignored. Never raises for any input.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("latin-1")
    elif isinstance(value, str):
        text = value
    else:
        return None
    if text.endswith("\r\n"):
        text = text[:-2]  # the header line's terminator, as curl passes it
    directives = _directives(text)
    if directives is None:
        return None
    max_age: int | None = None
    include_subdomains = False
    for name, directive_value in directives:
        if name == "max-age":
            if max_age is not None:
                return None  # §6.1 item 2: each directive at most once
            max_age = _delta_seconds(directive_value)
            if max_age is None:
                return None  # §6.1.1: delta-seconds, after quoted-string unescaping
        elif name == "includesubdomains":
            if include_subdomains:
                return None  # §6.1 item 2
            if directive_value is not None:
                return None  # §6.1.2: valueless; even ="" is refused (Chromium)
            include_subdomains = True
        # §6.1 item 5: unknown directives are ignored. Like Chromium (and Firefox), a repeated
        # *unknown* directive does not void the header: tlsmitm must know every host the
        # browser knows.
    if max_age is None:
        return None  # §6.1.1: max-age is REQUIRED
    return StsPolicy(max_age=max_age, include_subdomains=include_subdomains)


# --------------------------------------------------------------------------------------------
# Matching helpers (RFC 6797 §8.2)
# --------------------------------------------------------------------------------------------


def _suffixes(host: str) -> list[str]:
    """``a.b.c`` -> ``["a.b.c", "b.c", "c"]``: the name, then its superdomains."""
    result = [host]
    pos = host.find(".")
    while pos != -1:
        result.append(host[pos + 1 :])
        pos = host.find(".", pos + 1)
    return result


@functools.lru_cache(maxsize=8192)
def _canonical(host: str | bytes) -> tuple[str, bool] | None:
    """``(normalised name, is an IP literal)``, or None for an invalid name; memoised.

    Normalisation (IDNA 2008, lower case, trailing dot) costs more than the rest of a lookup,
    and the same few names are looked up again and again; the cache is bounded.
    """
    try:
        normalized = normalize_host(host)
    except (InvalidHostName, TypeError, ValueError):
        return None
    return normalized, is_ip_literal(normalized)


def _normalized_or_none(host: str | bytes) -> str | None:
    """The normalised DNS name, or None for invalid names *and* IP literals."""
    if not isinstance(host, str | bytes):
        return None
    canonical = _canonical(host)
    return None if canonical is None or canonical[1] else canonical[0]


def _is_localhost(host: str) -> bool:
    # RFC 6761 §6.3; Chromium ignores STS headers for [*.]localhost (kIgnoreHSTSForLocalhost).
    return host == "localhost" or host.endswith(".localhost")


# --------------------------------------------------------------------------------------------
# Preload list
# --------------------------------------------------------------------------------------------

_BUNDLED: PreloadList | None = None
_BUNDLED_LOCK = threading.Lock()


class PreloadList:
    """Chromium's HSTS preload list, held in memory; immutable.

    Only entries with ``"mode": "force-https"`` are HSTS entries; pinning-only entries are left
    out. An entry with ``include_subdomains`` covers all its subdomains.
    """

    __slots__ = ("_entries",)

    def __init__(self, entries: dict[str, bool]) -> None:
        """Wrap ``{normalised name: include_subdomains}`` (copied); prefer the class methods."""
        self._entries = dict(entries)

    @classmethod
    def empty(cls) -> PreloadList:
        """A list with no entries (preloading disabled)."""
        return cls({})

    @classmethod
    def bundled(cls) -> PreloadList:
        """The list shipped in the ``hstspreload`` package, decoded once and then shared.

        Raises:
            ConfigurationError: the installed ``hstspreload`` has a data format this version of
                tlsmitm cannot read (pin ``hstspreload`` or load a list with
                :meth:`from_chromium_json`).
        """
        global _BUNDLED
        with _BUNDLED_LOCK:
            if _BUNDLED is None:
                _BUNDLED = cls(_decode_hstspreload())
            return _BUNDLED

    @classmethod
    def from_chromium_json(cls, text: str) -> PreloadList:
        """Load Chromium's ``net/http/transport_security_state_static.json``.

        The file is JSON with ``//`` line comments. ``pinsets`` and pinning-only entries are
        ignored; ``entries`` with ``"mode": "force-https"`` are kept.

        Raises:
            ConfigurationError: ``reason="preload_list"``, with what is wrong and where.
        """
        try:
            document = json.loads(_strip_json_comments(text))
        except json.JSONDecodeError as exc:
            raise _preload_error(f"not JSON (after removing // comments): {exc}") from exc
        if not isinstance(document, dict) or not isinstance(document.get("entries"), list):
            raise _preload_error('the top level must be an object with an "entries" array')
        entries: dict[str, bool] = {}
        for index, entry in enumerate(document["entries"]):
            name, include_subdomains, force_https = _read_entry(index, entry)
            if force_https:
                entries[name] = entries.get(name, False) or include_subdomains
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<PreloadList with {len(self._entries)} entries>"

    def is_preloaded(self, host: str) -> bool:
        """Whether ``host`` (any spelling; normalised here) is covered by the list.

        Invalid names and IP literals are never preloaded.
        """
        normalized = _normalized_or_none(host)
        return normalized is not None and self.match(normalized) is not None

    def match(self, host: str) -> tuple[str, bool] | None:
        """The applicable entry ``(name, include_subdomains)`` for a *normalised* host, or None.

        A congruent entry applies always, a superdomain entry only with include_subdomains;
        the most specific applicable entry is returned ("applicability before specificity",
        Chromium crbug 821811).
        """
        entries = self._entries
        if not entries:
            return None
        include_subdomains = entries.get(host)
        if include_subdomains is not None:
            return host, include_subdomains
        pos = host.find(".")
        while pos != -1:
            suffix = host[pos + 1 :]
            if entries.get(suffix):
                return suffix, True
            pos = host.find(".", pos + 1)
        return None


def _preload_error(why: str) -> ConfigurationError:
    return ConfigurationError(
        f"the HSTS preload list cannot be loaded: {why}; ship an unmodified "
        "transport_security_state_static.json from Chromium",
        reason="preload_list",
    )


def _read_entry(index: int, entry: object) -> tuple[str, bool, bool]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise _preload_error(f'entries[{index}] is not an object with a "name" string')
    include_subdomains = entry.get("include_subdomains", False)
    mode = entry.get("mode")
    if not isinstance(include_subdomains, bool):
        raise _preload_error(f'entries[{index}] ("{entry["name"]}"): include_subdomains not bool')
    if mode is not None and not isinstance(mode, str):
        raise _preload_error(f'entries[{index}] ("{entry["name"]}"): mode is not a string')
    try:
        name = normalize_host(entry["name"])
    except InvalidHostName as exc:
        raise _preload_error(f"entries[{index}]: {exc}") from exc
    if is_ip_literal(name):
        raise _preload_error(f'entries[{index}] ("{name}") is an IP address, not a host name')
    return name, include_subdomains, mode == "force-https"


def _strip_json_comments(text: str) -> str:
    """Remove ``//`` comments that are outside JSON strings (a URL in a string stays)."""
    out: list[str] = []
    pos = 0
    end = len(text)
    in_string = False
    start = 0
    while pos < end:
        char = text[pos]
        if in_string:
            if char == "\\":
                pos += 2
                continue
            if char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "/" and text.startswith("//", pos):
            out.append(text[start:pos])
            newline = text.find("\n", pos)
            pos = end if newline == -1 else newline
            start = pos
            continue
        pos += 1
    out.append(text[start:])
    return "".join(out)


_LEAF = 0x80  # hstspreload's flags byte: this record is a whole name ...
_INCLUDE_SUBDOMAINS = 0x40  # ... and it covers the subdomains


def _decode_hstspreload() -> dict[str, bool]:
    """Read every force-https entry out of the ``hstspreload`` package's data file.

    The package answers one name at a time by seeking in ``hstspreload.bin`` (about 640
    lookups/s). Its builder writes only ``force-https`` entries: each layer (label depth) has a
    jump table of ``(offset, length)`` blocks of ``flags, length, bytes`` records, and the
    records flagged as leaves carry a full name and its include_subdomains bit. Reading every
    leaf gives the whole list. (The package stores names of at most five labels.)
    """
    try:
        import hstspreload
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigurationError(
            "the hstspreload package is not installed; pip install hstspreload, or pass "
            "preload=PreloadList.from_chromium_json(...)",
            reason="preload_list",
        ) from exc
    try:
        data = importlib.resources.files("hstspreload").joinpath("hstspreload.bin").read_bytes()
        layers: Any = hstspreload._JUMPTABLE
        entries: dict[str, bool] = {}
        for layer in layers:
            for block in layer:
                if block is None:
                    continue
                offset, length = block
                pos, stop = offset, offset + length
                if not 0 <= offset <= stop <= len(data):
                    raise ValueError(f"block {block} outside the data file")
                while pos < stop:
                    flags, size = data[pos], data[pos + 1]
                    pos += 2 + size
                    if pos > stop:
                        raise ValueError("record runs past its block")
                    if flags & _LEAF:
                        name = data[pos - size : pos].decode("ascii").lower()
                        if not name or name.startswith(".") or ".." in name:
                            raise ValueError(f"bad name {name!r}")
                        entries[name] = entries.get(name, False) or bool(
                            flags & _INCLUDE_SUBDOMAINS
                        )
    except (AttributeError, TypeError, ValueError, IndexError, OSError) as exc:
        raise ConfigurationError(
            f"cannot read the preload list of hstspreload "
            f"{getattr(hstspreload, '__version__', '?')}: {exc}; install a hstspreload release "
            "this tlsmitm supports, or pass preload=PreloadList.from_chromium_json(...)",
            reason="preload_list",
        ) from exc
    if not entries:
        raise ConfigurationError(
            "the hstspreload package holds no entries; reinstall it",
            reason="preload_list",
        )
    return entries


# --------------------------------------------------------------------------------------------
# Known hosts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KnownHost:
    """Why a host is a Known HSTS Host.

    Attributes:
        host: the name of the entry that matched (the host itself or a superdomain).
        include_subdomains: whether that entry covers subdomains.
        expires: when an observed entry stops applying; ``None`` for a preloaded one.
        source: ``"preload"`` or ``"observed"``.
    """

    host: str
    include_subdomains: bool
    expires: datetime | None
    source: str

    def __post_init__(self) -> None:
        if self.source not in ("preload", "observed"):
            raise ValueError(f"source must be 'preload' or 'observed', not {self.source!r}")
        if (self.expires is None) != (self.source == "preload"):
            raise ValueError("expires is None exactly for preloaded entries")


@runtime_checkable
class _BatchGet(Protocol):
    """An optional store extension: every present key of a list, in one round trip."""

    def get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, StoredItem]: ...


class _Closable(Protocol):
    def close(self) -> None: ...


def _timestamp(now: datetime) -> float:
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise ValueError(f"now must be a timezone-aware datetime (UTC), not {now!r}")
    return now.timestamp()


def _encode(policy: StsPolicy, observed: float) -> bytes:
    record = {
        "v": _FORMAT_VERSION,
        "include_subdomains": policy.include_subdomains,
        "observed": observed,
    }
    return json.dumps(record, separators=(",", ":")).encode()


def _include_subdomains_of(item: StoredItem) -> bool:
    """The includeSubDomains flag of a stored entry.

    A value this version cannot read (another writer sharing the store) still makes the host
    itself known, but not its subdomains: unreadable state never weakens protection of the host.
    """
    try:
        record = json.loads(item.value)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and record.get("include_subdomains") is True


def _as_datetime(expires: float) -> datetime:
    try:
        return datetime.fromtimestamp(expires, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.max.replace(tzinfo=UTC)


class HstsStore:
    """The Known HSTS Hosts (RFC 6797 §8): observed policies plus the preload list.

    Args:
        store: where observed policies live (namespace ``"hsts"``); ``None`` for a fresh
            :class:`~tlsmitm.MemoryStore`.
        preload: the preload list; ``None`` for :meth:`PreloadList.bundled`, and
            :meth:`PreloadList.empty` to disable preloading.
        max_entries: the most observed entries kept. When a stream of headers would exceed it,
            the soonest-expiring (and all expired) entries are evicted, in batches of about 1 %.
    """

    def __init__(
        self,
        store: StateStore | None = None,
        *,
        preload: PreloadList | None = None,
        max_entries: int = 100_000,
    ) -> None:
        if type(max_entries) is not int or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, not {max_entries!r}")
        self._store: StateStore = MemoryStore() if store is None else store
        self._bundled = preload is None
        # The bundled list takes ~0.3 s to decode: loaded at first use (or by warm_up()).
        self._preload_given = preload
        self._max_entries = max_entries
        # Evict before every `batch`-th write, down to max_entries - batch: between two
        # evictions at most `batch` writes land, so the cap holds for this writer.
        self._batch = max(1, max_entries // 100)
        self._writes_until_evict = 0  # evict on the first write: the store may be over the cap
        self._evict_lock = threading.Lock()
        self._get_many = self._store.get_many if isinstance(self._store, _BatchGet) else None
        self._owned: _Closable | None = None

    @classmethod
    def open(cls, state_dir: Path, **kw: Any) -> HstsStore:
        """An :class:`HstsStore` persisted in ``state_dir / "state.sqlite3"``.

        Keyword arguments go to :class:`HstsStore`. :meth:`close` closes the file.

        Raises:
            ConfigurationError: see :class:`~tlsmitm.SqliteStore`.
        """
        from ._sqlite_store import SqliteStore  # the only I/O-backed store; imported on demand

        sqlite = SqliteStore(Path(state_dir) / "state.sqlite3")
        try:
            hsts = cls(sqlite, **kw)
        except BaseException:
            sqlite.close()
            raise
        hsts._owned = sqlite
        return hsts

    def close(self) -> None:
        """Close the store if :meth:`open` created it; a store passed in stays the caller's."""
        if self._owned is not None:
            self._owned.close()

    def __enter__(self) -> HstsStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def reload_preload(self) -> bool:
        """Re-read the ``hstspreload`` package's list (after an upgrade) if this store uses it.

        Returns whether the list was re-read. A store built with its own list keeps it.

        Raises:
            ConfigurationError: the installed package cannot be read; the old list stays.
        """
        if not self._bundled:
            return False
        global _BUNDLED
        import importlib

        import hstspreload

        importlib.reload(hstspreload)
        fresh = PreloadList(_decode_hstspreload())
        with _BUNDLED_LOCK:
            _BUNDLED = fresh
        self._preload_given = fresh
        return True

    @property
    def preload(self) -> PreloadList:
        """The preload list in use."""
        given = self._preload_given
        return PreloadList.bundled() if given is None else given

    def warm_up(self) -> None:
        """Decode the bundled preload list now, not at the first lookup (``serve`` does it in a
        thread right after it listens)."""
        _ = self.preload

    @property
    def store(self) -> StateStore:
        """The state store holding observed entries."""
        return self._store

    # -- noting policies ---------------------------------------------------------------------

    def observe(
        self,
        host: str,
        header_values: Sequence[str | bytes],
        *,
        now: datetime,
        secure_and_verified: bool,
    ) -> StsPolicy | None:
        """Note the ``Strict-Transport-Security`` header(s) of one response from ``host``.

        Args:
            host: the host the response came from (any spelling; normalised here).
            header_values: the values of every ``Strict-Transport-Security`` field of the
                response, in order; only the first counts.
            now: the time of the response (aware, UTC).
            secure_and_verified: the response came over TLS whose certificate chain verified
                with no error at all -- not even one a user overrode.

        Returns:
            The policy noted (``max_age == 0`` means the host's own entry was removed), or
            ``None`` when the header was ignored.
        """
        if isinstance(header_values, str | bytes):
            raise TypeError("header_values must be a sequence of values, e.g. [value]")
        now_ts = _timestamp(now)
        if not secure_and_verified:
            return None  # RFC 6797 §8.1: only over secure transport without errors or warnings
        if not header_values:
            return None
        normalized = _normalized_or_none(host)
        if normalized is None:
            return None  # §8.1.1: never for an IP-literal host (nor for a malformed name)
        if _is_localhost(normalized):
            return None  # Chromium: no STS for [*.]localhost (kIgnoreHSTSForLocalhost)
        policy = parse_sts(header_values[0])  # §8.1: process only the first such header field
        if policy is None:
            return None
        if policy.max_age == 0:
            # §6.1.1: cease to regard *this* host as known; superdomain entries are untouched
            # (§8.1.1, matrix M-14/M-17).
            self._store.delete(NAMESPACE, normalized)
            return policy
        expires = now_ts + policy.max_age
        existing = self._store.get(NAMESPACE, normalized)
        if (
            existing is not None
            and _include_subdomains_of(existing) == policy.include_subdomains
            and 0.0 <= expires - existing.expires < min(_REFRESH_SLACK, policy.max_age * 0.01)
        ):
            # Most sites send the same header on every response: re-writing (and, with SQLite,
            # syncing to disk) an entry whose expiry would move by less than 1 % of max-age (at
            # most a day) buys nothing, so an unchanged policy costs one read, not one fsync.
            return policy
        self._evict_if_due(now_ts)
        self._store.put(NAMESPACE, normalized, _encode(policy, now_ts), expires=expires)
        return policy

    def _evict_if_due(self, now_ts: float) -> None:
        with self._evict_lock:
            if self._writes_until_evict > 0:
                self._writes_until_evict -= 1
                return
            self._writes_until_evict = self._batch - 1
        self._store.evict(NAMESPACE, now=now_ts, keep=self._max_entries - self._batch)

    def forget(self, host: str) -> None:
        """Remove the observed entry for exactly ``host`` (a preloaded entry stays).

        Invalid names and IP literals are ignored: they cannot have an entry.
        """
        normalized = _normalized_or_none(host)
        if normalized is not None:
            self._store.delete(NAMESPACE, normalized)

    def purge(self, *, now: datetime) -> int:
        """Remove expired entries (and enforce ``max_entries``); returns how many went."""
        return self._store.evict(NAMESPACE, now=_timestamp(now), keep=self._max_entries)

    # -- lookups -----------------------------------------------------------------------------

    def is_known_host(self, host: str, *, now: datetime) -> bool:
        """Whether ``host`` is a Known HSTS Host at ``now`` (RFC 6797 §8.2).

        True for a congruent entry, or a superdomain entry with includeSubDomains, observed and
        unexpired or preloaded. Invalid names and IP literals are never known.
        """
        return self.known_host(host, now=now) is not None

    def known_host(self, host: str, *, now: datetime) -> KnownHost | None:
        """The entry that makes ``host`` a Known HSTS Host at ``now``, or ``None``.

        The preload list is consulted first (it never expires); then observed entries, most
        specific first, skipping entries that do not apply (a more specific entry without
        includeSubDomains does not hide a less specific one with it: Chromium crbug 821811).
        """
        result = self._known_host(host, now, self._fetch)
        if result is UNANSWERED:  # pragma: no cover - _fetch always answers
            raise AssertionError("the store did not answer")
        return result

    def known_host_nowait(self, host: str, *, now: datetime) -> KnownHost | _Unanswered | None:
        """:meth:`known_host` answered from memory alone, or :data:`UNANSWERED`.

        For a driver on an event loop: when the store can answer without I/O (the preload list,
        or a :class:`~tlsmitm.CachedStore` whose entries are fresh) the answer comes at once;
        otherwise the result is :data:`UNANSWERED` and the caller asks :meth:`known_host` from
        a thread.
        """
        peek = getattr(self._store, "peek_many", None)
        if peek is None:
            if isinstance(self._store, MemoryStore):
                return self._known_host(host, now, self._fetch)
            peek = _never_answered
        return self._known_host(host, now, lambda names: peek(NAMESPACE, names))

    def _known_host(
        self,
        host: str,
        now: datetime,
        fetch: Callable[[Sequence[str]], Mapping[str, StoredItem] | None],
    ) -> KnownHost | _Unanswered | None:
        now_ts = _timestamp(now)
        normalized = _normalized_or_none(host)
        if normalized is None:
            return None  # malformed names and IP literals never match
        preloaded = self.preload.match(normalized)
        if preloaded is not None:
            name, include_subdomains = preloaded
            return KnownHost(
                host=name, include_subdomains=include_subdomains, expires=None, source="preload"
            )
        suffixes = _suffixes(normalized)
        found = fetch(suffixes)
        if found is None:
            return UNANSWERED
        for index, name in enumerate(suffixes):
            item = found.get(name)
            if item is None or not item.expires > now_ts:
                continue  # absent, or expired: an expired entry is not known (§8.1.1)
            include_subdomains = _include_subdomains_of(item)
            if index == 0 or include_subdomains:  # congruent, or superdomain match (§8.2)
                return KnownHost(
                    host=name,
                    include_subdomains=include_subdomains,
                    expires=_as_datetime(item.expires),
                    source="observed",
                )
        return None

    def _fetch(self, names: Sequence[str]) -> dict[str, StoredItem]:
        if self._get_many is not None:
            return self._get_many(NAMESPACE, names)
        result: dict[str, StoredItem] = {}
        for name in names:
            item = self._store.get(NAMESPACE, name)
            if item is not None:
                result[name] = item
        return result

    def observed_entries(self, *, now: datetime) -> Iterable[KnownHost]:
        """Every unexpired observed entry (for diagnostics and export), in no particular order."""
        now_ts = _timestamp(now)
        for item in self._store.items(NAMESPACE):
            if item.expires > now_ts:
                yield KnownHost(
                    host=item.key,
                    include_subdomains=_include_subdomains_of(item),
                    expires=_as_datetime(item.expires),
                    source="observed",
                )
