"""Whether to intercept a connection or splice it untouched: bypass rules and learned bypasses.

Theory of operation
-------------------

:class:`InterceptPolicy` is asked once per connection, after the ClientHello has been peeked and
before any TLS handshake, whether tlsmitm should terminate TLS (*intercept*) or copy bytes both
ways untouched (*bypass*, also called *splice*). The answer is a :class:`Decision` that names its
reason and the rule that produced it, so that every bypass can be explained to an auditor.

The checks run in a fixed order; the first one that applies decides:

1. **Static rules** (:class:`Rule`) without a category, in the order they were loaded: the rules
   passed to the constructor, then the rule file, then ``--bypass`` strings. Reason ``"rule"``.
2. **Learned bypasses** kept in a :class:`~tlsmitm.StateStore`:

   * ``(host, port)`` whose verified upstream demanded a client certificate -- reason
     ``"learned_client_cert"``;
   * ``(client, host, port)`` whose client repeatedly rejected tlsmitm's leaf (a pinning
     app) -- reason ``"learned_pinning"``.

3. **Category rules**: only if some rule names a category is the embedder's category callback
   asked about the host. Reason ``"category"``.
4. No host name at all (a transparent connection without SNI): bypass, reason ``"no_sni"``. There
   is no name to verify the upstream certificate against, and splicing lets the client do
   whatever checks it does itself.
5. Otherwise intercept, reason ``"default"``.

A bypass never makes a user less safe than a direct connection: the client then talks TLS to the
real server and verifies its certificate itself. What a bypass costs is inspection, so learned
bypasses are built from signals that a remote party cannot produce for a host it does not control
(see ``docs/policy.rst``, "What a remote party can and cannot trigger"), they are keyed by exact
host (never by suffix), they expire, and there is a cap on how many are kept.

Everything here is pure: no clock reads (``now`` is a parameter), no I/O besides the injected
store and the rule file that :meth:`InterceptPolicy.reload` is explicitly asked to read.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import re
import threading
import tomllib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeAlias

from ._decisionlog import ConnectionRecord, DecisionLog, format_record
from ._errors import ConfigurationError
from ._names import ip_address_of, normalize_host
from ._store import MemoryStore, StateStore

__all__ = [
    "CategoryCallback",
    "ConnectionRecord",  # re-exported from _decisionlog
    "Decision",
    "DecisionLog",  # re-exported from _decisionlog
    "InterceptPolicy",
    "LearnedBypass",
    "Rule",
    "RuleSet",
    "format_record",  # re-exported from _decisionlog
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
CategoryCallback: TypeAlias = Callable[[str], "str | Awaitable[str | None] | None"]
"""The embedder's URL-category engine: normalised host -> category name, or ``None``."""

# A reason code: lower-case identifier, so it can appear unquoted in the decision log.
_TOKEN = re.compile(r"[a-z][a-z0-9_]{0,63}")
_CATEGORY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_PORT_TEXT = re.compile(r"[0-9]{1,5}")

# Store namespaces. Keys are the human-readable text that Decision.rule carries.
_NS_CLIENT_CERT = "policy.learned.client_cert"
_NS_PINNING = "policy.learned.pinning"
_NS_STRIKES = "policy.pinning_strikes"

_KEYWORDS = frozenset({"host", "dest", "client", "port", "category"})

_GRAMMAR_HINT = (
    "a bypass rule is one or more space-separated terms, all of which must match: "
    "'bank.example' (exact host), '*.bank.example' (hosts below, not the apex), "
    "'.bank.example' (apex and below), an optional ':PORT' after a host, "
    "'10.0.0.0/8' or '10.0.0.0/8:5223' or '[2001:db8::/32]:443' (destination address), "
    "'port:5223', 'client:192.168.1.50' or 'client:192.168.1.0/24', 'category:finance'; "
    "prefix 'host:' or 'dest:' to force a reading"
)


# ---------------------------------------------------------------------------------------------
# Decision


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Whether to intercept one connection, and why.

    Attributes:
        intercept: ``True`` to terminate TLS and inspect, ``False`` to splice bytes untouched.
        reason: a stable code: ``"default"``, ``"rule"``, ``"category"``,
            ``"learned_client_cert"``, ``"learned_pinning"``, ``"no_sni"``, or a code of the
            relay's own such as ``"not_tls"``. A lower-case identifier.
        rule: the canonical text of the rule that matched (:attr:`Rule.text`), or the key of the
            learned entry (``"bank.example:443"``, ``"192.168.1.5 app.example:443"``), or
            ``None`` when no rule was involved.
    """

    intercept: bool
    reason: str
    rule: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.intercept, bool):
            raise TypeError(f"Decision.intercept must be a bool, not {self.intercept!r}")
        if not isinstance(self.reason, str) or not _TOKEN.fullmatch(self.reason):
            raise ValueError(
                f"Decision.reason must be a lower-case identifier such as 'rule', "
                f"not {self.reason!r}"
            )
        if self.rule is not None and not isinstance(self.rule, str):
            raise TypeError(f"Decision.rule must be a str or None, not {self.rule!r}")

    @property
    def action(self) -> Literal["intercept", "bypass"]:
        """``"intercept"`` or ``"bypass"``, as written in the decision log."""
        return "intercept" if self.intercept else "bypass"


# ---------------------------------------------------------------------------------------------
# Parsing helpers (each raises ConfigurationError(reason="bad_rule") with a plain explanation)


def _bad(why: str) -> ConfigurationError:
    return ConfigurationError(why, reason="bad_rule")


def _normalize_host_pattern(pattern: str) -> str:
    """The canonical form of a host pattern: ``name``, ``*.name`` or ``.name``.

    ``name`` goes through :func:`~tlsmitm.normalize_host`, so U-labels become A-labels, case and
    one trailing dot are folded, and empty labels are refused.
    """
    if not isinstance(pattern, str):
        raise _bad(f"a host pattern must be a string, not {type(pattern).__name__}")
    if pattern.startswith("*."):
        prefix, base = "*.", pattern[2:]
    elif pattern.startswith("."):
        prefix, base = ".", pattern[1:]
    else:
        prefix, base = "", pattern
    if "*" in base:
        raise _bad(
            f"host pattern {pattern!r}: '*' is allowed only as the whole left-most label, "
            "as in '*.bank.example'"
        )
    try:
        name = normalize_host(base)
    except ValueError as exc:  # InvalidHostName
        raise _bad(f"host pattern {pattern!r}: {exc}") from exc
    if prefix and ip_address_of(name) is not None:
        raise _bad(
            f"host pattern {pattern!r}: a wildcard or suffix cannot apply to an IP address; "
            "write the address range as a CIDR such as '10.0.0.0/8'"
        )
    return prefix + name


def _host_matches(pattern: str, host: str) -> bool:
    """Whether normalised ``host`` matches normalised ``pattern``, at label boundaries only.

    ``*.bank.example`` matches any number of labels below ``bank.example`` but never
    ``bank.example`` itself, ``notbank.example`` nor ``bank.example.evil.test``;
    ``.bank.example`` also matches the apex.
    """
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])  # ".bank.example": a label boundary by construction
    if pattern.startswith("."):
        return host == pattern[1:] or host.endswith(pattern)
    return host == pattern


def _parse_port(text: str | int, what: str = "port") -> int:
    if isinstance(text, bool):
        raise _bad(f"{what} must be a number from 1 to 65535, not {text!r}")
    if isinstance(text, str):
        if not _PORT_TEXT.fullmatch(text):
            raise _bad(f"{what} {text!r} is not a number from 1 to 65535")
        value = int(text)
    elif isinstance(text, int):
        value = text
    else:
        raise _bad(f"{what} must be a number from 1 to 65535, not {text!r}")
    if not 1 <= value <= 65535:
        raise _bad(f"{what} {value} is out of range; ports run from 1 to 65535")
    return value


def _parse_network(text: str, what: str) -> IPNetwork:
    """A CIDR (``10.0.0.0/8``) or single address (``10.1.2.3``, ``2001:db8::1``)."""
    if not isinstance(text, str):
        raise _bad(f"{what} must be a string such as '10.0.0.0/8', not {type(text).__name__}")
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        network = ipaddress.ip_network(inner, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            suggestion = ipaddress.ip_network(inner, strict=False)
            raise _bad(
                f"{what} {text!r} has bits set below the prefix length; did you mean "
                f"'{suggestion}'?"
            ) from exc
        raise _bad(
            f"{what} {text!r} is not an IP address or CIDR such as '10.0.0.0/8' or "
            f"'2001:db8::/32' ({exc})"
        ) from exc
    return _unmap_network(network)


def _unmap_network(network: IPNetwork) -> IPNetwork:
    """``::ffff:10.0.0.0/104`` is the IPv4 range ``10.0.0.0/8`` (RFC 4291 §2.5.5.2)."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network


def _unmap(address: IPAddress) -> IPAddress:
    """A dual-stack socket reports IPv4 peers as ``::ffff:a.b.c.d`` (RFC 4291 §2.5.5.2)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _parse_address(text: str, what: str) -> IPAddress:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    address = ip_address_of(text)
    if address is None:
        raise ValueError(f"{what} {text!r} is not an IP address")
    return _unmap(address)


def _network_text(network: IPNetwork) -> str:
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _split_port(value: str) -> tuple[str, int | None, bool]:
    """Split ``addr:port`` / ``[v6]:port``; returns (address text, port, was bracketed).

    A value with more than one colon and no brackets is an IPv6 address without a port.
    """
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise _bad(f"{value!r}: '[' without a closing ']'")
        inner, rest = value[1:end], value[end + 1 :]
        if rest == "":
            return inner, None, True
        if not rest.startswith(":"):
            raise _bad(f"{value!r}: expected ':PORT' after ']'")
        return inner, _parse_port(rest[1:]), True
    if value.count(":") == 1:
        address, _, port = value.partition(":")
        return address, _parse_port(port), False
    return value, None, False


def _normalize_category(value: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"a category must be a string, not {type(value).__name__}")
    name = value.strip().lower()
    if not _CATEGORY.fullmatch(name):
        raise _bad(
            f"category {value!r} must be a name of letters, digits, '_', '.' or '-' "
            "(up to 64 characters), such as 'finance'"
        )
    return name


# ---------------------------------------------------------------------------------------------
# Rule


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One bypass rule: every condition it sets must hold for a connection to be spliced.

    Build rules with :meth:`parse` (the ``--bypass`` grammar), from a TOML rule file through
    :class:`RuleSet`, or directly (values are validated and normalised when built).

    Attributes:
        host: a host pattern: ``bank.example`` (exactly that host), ``*.bank.example`` (one or
            more labels below, never the apex) or ``.bank.example`` (the apex and everything
            below). Stored normalised: A-labels, lower case, no trailing dot.
        destination: the destination address range (the address tlsmitm connects to, or the
            CONNECT / SNI host when that is an IP literal).
        port: the destination port.
        client: the client address range (an exempt device or network).
        category: a category name the embedder's category callback returns for the host.
        origin: where the rule came from (``rules.toml:12``, ``--bypass``); not compared.
    """

    host: str | None = None
    destination: IPNetwork | None = None
    port: int | None = None
    client: IPNetwork | None = None
    category: str | None = None
    origin: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.host is not None:
            object.__setattr__(self, "host", _normalize_host_pattern(self.host))
        for name in ("destination", "client"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
                raise _bad(
                    f"Rule.{name} must be an ipaddress network (use Rule.parse for text), "
                    f"not {value!r}"
                )
            object.__setattr__(self, name, _unmap_network(value))
        if self.port is not None:
            object.__setattr__(self, "port", _parse_port(self.port))
        if self.category is not None:
            object.__setattr__(self, "category", _normalize_category(self.category))
        if (
            self.host is None
            and self.destination is None
            and self.port is None
            and self.client is None
            and self.category is None
        ):
            raise _bad(
                "a bypass rule needs at least one condition (host, destination, port, client "
                "or category); a rule that matched everything would switch interception off"
            )

    @classmethod
    def parse(cls, text: str, *, origin: str | None = None) -> Rule:
        """Parse one rule in the ``--bypass`` grammar.

        Space-separated terms, all of which must match::

            bank.example            exact host
            *.bank.example          any host below bank.example (not bank.example itself)
            .bank.example           bank.example and any host below it
            bank.example:8443       a host pattern on one port
            10.0.0.0/8              destination address range (a single address works too)
            10.0.0.0/8:5223         ... on one port; IPv6 with a port: [2001:db8::/32]:443
            port:5223               any destination on that port
            client:192.168.1.50     connections from that client (a CIDR works too)
            category:finance        hosts the category callback puts in "finance"
            host:NAME / dest:ADDR   force a reading (a host literally named "port", an IP host)

        Example: ``client:192.168.1.0/24 category:health``.

        Raises:
            ConfigurationError: ``reason="bad_rule"``; the message names the bad term.
        """
        if not isinstance(text, str):
            raise TypeError(f"Rule.parse takes a str, not {type(text).__name__}")
        try:
            values = _parse_terms(text)
            return cls(origin=origin, **values)
        except ConfigurationError as exc:
            raise _bad(f"bypass rule {text!r}: {exc}; {_GRAMMAR_HINT}") from exc

    @property
    def text(self) -> str:
        """The canonical ``--bypass`` text of this rule; :meth:`parse` reads it back as equal."""
        terms: list[str] = []
        if self.client is not None:
            terms.append("client:" + _network_text(self.client))
        port_attached = False
        if self.host is not None:
            host = self.host
            is_ip = ip_address_of(host) is not None
            forced = is_ip or host in _KEYWORDS
            if self.port is not None:
                shown = f"[{host}]" if ":" in host else host
                terms.append(("host:" if forced else "") + f"{shown}:{self.port}")
                port_attached = True
            else:
                terms.append(("host:" if forced else "") + host)
        if self.destination is not None:
            dest = _network_text(self.destination)
            if self.port is not None and not port_attached:
                shown = f"[{dest}]" if self.destination.version == 6 else dest
                terms.append(f"{shown}:{self.port}")
                port_attached = True
            else:
                terms.append(dest)
        if self.port is not None and not port_attached:
            terms.append(f"port:{self.port}")
        if self.category is not None:
            terms.append("category:" + self.category)
        return " ".join(terms)

    def __str__(self) -> str:
        return self.text

    def matches(
        self,
        *,
        client_ip: str,
        host: str | None,
        port: int,
        destination_ip: str | None = None,
        category: str | None = None,
    ) -> bool:
        """Whether this rule applies to a connection (inputs are normalised first).

        Raises:
            InvalidHostName: ``host`` is malformed.
            ValueError: an address is not an IP address or the port is out of range.
        """
        query = _Query.build(
            client_ip=client_ip, host=host, port=port, destination_ip=destination_ip
        )
        if not self._matches_connection(query):
            return False
        if self.category is None:
            return True
        return category is not None and _normalize_category(category) == self.category

    def _matches_connection(self, query: _Query) -> bool:
        """Every condition except the category."""
        if self.client is not None and query.client not in self.client:
            return False
        if self.port is not None and query.port != self.port:
            return False
        if self.host is not None and (
            query.host is None or not _host_matches(self.host, query.host)
        ):
            return False
        return self.destination is None or any(
            address in self.destination for address in query.destinations
        )


def _parse_terms(text: str) -> dict[str, Any]:
    terms = text.split()
    if not terms:
        raise _bad("empty rule")
    values: dict[str, Any] = {}

    def put(key: str, value: object) -> None:
        if key in values:
            raise _bad(f"{key} given twice; one rule has at most one of each")
        values[key] = value

    for term in terms:
        keyword, colon, rest = term.partition(":")
        if colon and keyword in _KEYWORDS:
            if not rest:
                raise _bad(f"{term!r}: nothing after '{keyword}:'")
            if keyword == "port":
                put("port", _parse_port(rest))
            elif keyword == "category":
                put("category", _normalize_category(rest))
            elif keyword == "client":
                if rest.startswith("[") or rest.count(":") == 1:
                    address, port, _ = _split_port(rest)
                    if port is not None:
                        raise _bad(f"{term!r}: a client rule takes no port")
                    rest = address
                put("client", _parse_network(rest, "client address"))
            elif keyword == "dest":
                address, port, _ = _split_port(rest)
                put("destination", _parse_network(address, "destination"))
                if port is not None:
                    put("port", port)
            else:  # host
                address, port, bracketed = _split_port(rest)
                if bracketed and ip_address_of(address) is None:
                    raise _bad(f"{term!r}: only IPv6 addresses go in brackets")
                put("host", _normalize_host_pattern(address))
                if port is not None:
                    put("port", port)
            continue
        # A bare term: an address range, or else a host pattern; either may carry ':PORT'.
        if colon and rest.count(":") == 0 and not _PORT_TEXT.fullmatch(rest):
            raise _bad(
                f"{term!r}: {keyword!r} is not a kind of term (host, dest, client, port, "
                f"category) and {rest!r} is not a port"
            )
        address, port, bracketed = _split_port(term)
        if bracketed or "/" in address or ip_address_of(address) is not None:
            put("destination", _parse_network(address, "destination"))
        else:
            put("host", _normalize_host_pattern(address))
        if port is not None:
            put("port", port)
    return values


# ---------------------------------------------------------------------------------------------
# RuleSet and the TOML rule file


@dataclass(frozen=True, slots=True)
class RuleSet:
    """An ordered, immutable collection of bypass rules.

    Rule file format (TOML, one ``[[bypass]]`` table per rule; every key set in a table must
    match)::

        [[bypass]]
        host = "*.bank.example"       # or "bank.example" (exact) or ".bank.example" (apex too)
        comment = "legal: banking"    # free text, ignored

        [[bypass]]
        destination = "10.0.0.0/8"
        port = 5223

        [[bypass]]
        client = "192.168.1.50"

        [[bypass]]
        category = "finance"
    """

    rules: tuple[Rule, ...] = ()
    _index: _RuleIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        for rule in rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"RuleSet holds Rule objects, not {rule!r}")
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "_index", _RuleIndex(rules))

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    @property
    def has_category_rules(self) -> bool:
        """Whether any rule needs the category callback."""
        return self._index.has_category_rules

    @classmethod
    def from_strings(cls, texts: Sequence[str], *, source: str = "--bypass") -> RuleSet:
        """Rules in the ``--bypass`` grammar (:meth:`Rule.parse`), one per string.

        Raises:
            ConfigurationError: ``reason="bad_rules"``, naming the bad string.
        """
        if isinstance(texts, str | bytes):
            raise TypeError("RuleSet.from_strings takes a sequence of rule strings, not one string")
        rules = []
        for text in texts:
            try:
                rules.append(Rule.parse(text, origin=source))
            except ConfigurationError as exc:
                raise ConfigurationError(f"{source}: {exc}", reason="bad_rules") from exc
        return cls(tuple(rules))

    @classmethod
    def from_toml_file(cls, path: Path | str) -> RuleSet:
        """Read a TOML rule file.

        Raises:
            ConfigurationError: ``reason="bad_rules"``: the file cannot be read, is not UTF-8,
                is not TOML, or holds a bad rule; the message names the file and the line.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read bypass rule file {path}: {exc.strerror or exc}; check the path "
                "and that tlsmitm may read it",
                reason="bad_rules",
            ) from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise ConfigurationError(
                f"{path}, line {line}: not UTF-8 text (byte {data[exc.start]:#04x}); "
                "save the rule file as UTF-8",
                reason="bad_rules",
            ) from exc
        return cls.from_toml_text(text, source=str(path))

    @classmethod
    def from_toml_text(cls, text: str, *, source: str = "<string>") -> RuleSet:
        """Parse rule-file text; see the class docstring for the format.

        Raises:
            ConfigurationError: ``reason="bad_rules"``, naming ``source`` and the line.
        """
        return cls(tuple(_load_toml_rules(text, source)))

    def merged(self, other: RuleSet) -> RuleSet:
        """This set followed by the rules of ``other`` that are not already in it."""
        seen = set(self.rules)
        extra = []
        for rule in other.rules:
            if rule not in seen:
                seen.add(rule)
                extra.append(rule)
        return RuleSet((*self.rules, *extra))

    def _first_match(self, query: _Query, *, category: str | None = None) -> Rule | None:
        """The first rule matching a connection; category rules only when ``category`` is given."""
        for position in self._index.candidates(query.host):
            rule = self.rules[position]
            if rule.category is not None and rule.category != category:
                continue
            if rule._matches_connection(query):
                return rule
        return None


class _RuleIndex:
    """Host rules by the name they hang off, so a decision costs O(labels), not O(rules).

    Every rule sits in exactly one bucket: exact names, ``.suffix`` names, ``*.suffix`` names, or
    the list of rules without a host (scanned for every connection). Candidates come back in load
    order, so the first matching rule is the one reported, as with a linear scan.
    """

    __slots__ = ("exact", "has_category_rules", "hostless", "suffix", "wildcard")

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.exact: dict[str, list[int]] = {}
        self.suffix: dict[str, list[int]] = {}
        self.wildcard: dict[str, list[int]] = {}
        self.hostless: list[int] = []
        self.has_category_rules = any(rule.category is not None for rule in rules)
        for position, rule in enumerate(rules):
            host = rule.host
            if host is None:
                self.hostless.append(position)
            elif host.startswith("*."):
                self.wildcard.setdefault(host[2:], []).append(position)
            elif host.startswith("."):
                self.suffix.setdefault(host[1:], []).append(position)
            else:
                self.exact.setdefault(host, []).append(position)

    def candidates(self, host: str | None) -> list[int]:
        found = list(self.hostless)
        if host is not None:
            found += self.exact.get(host, ())
            found += self.suffix.get(host, ())
            parent = host
            while (dot := parent.find(".")) >= 0:
                parent = parent[dot + 1 :]  # each proper parent, at label boundaries
                found += self.suffix.get(parent, ())
                found += self.wildcard.get(parent, ())
        found.sort()
        return found


_TOML_POSITION = re.compile(
    r"^(?P<what>.*?) \((?:at line (?P<line>\d+), column (?P<col>\d+)|at end of document)\)$"
)
_TOML_KEYS = ("host", "destination", "port", "client", "category", "comment")


def _toml_syntax_error(exc: tomllib.TOMLDecodeError, text: str, source: str) -> ConfigurationError:
    message = str(exc)
    found = _TOML_POSITION.match(message)
    if found is None:
        where = "somewhere"
        what = message
    elif found.group("line") is not None:
        where = f"line {found.group('line')}, column {found.group('col')}"
        what = found.group("what")
    else:
        last = max(1, len(text.rstrip("\n").split("\n")))
        where = f"line {last} (end of file)"
        what = found.group("what") + " (an unterminated string, array or table above?)"
    return ConfigurationError(
        f"{source}, {where}: not valid TOML: {what}; fix the syntax there "
        "(each rule is a [[bypass]] table)",
        reason="bad_rules",
    )


def _parse_toml_network(value: object, key: str) -> IPNetwork:
    if not isinstance(value, str):
        raise _bad(f"{key} must be a string such as '10.0.0.0/8', not {value!r}")
    _, port, _ = _split_port(value)
    if port is not None:
        raise _bad(f"{key} {value!r}: give the port as its own key (port = {port})")
    return _parse_network(value, key)


def _find_line(lines: Sequence[str], key: str, start: int, end: int) -> int | None:
    """1-based number of the first line in ``lines[start:end]`` that sets ``key``."""
    pattern = re.compile(rf"""^\s*["']?{re.escape(key)}["']?\s*=""")
    for index in range(start, min(end, len(lines))):
        if pattern.match(lines[index]):
            return index + 1
    return None


def _find_text(lines: Sequence[str], needle: str) -> int | None:
    for index, line in enumerate(lines):
        if needle and needle in line:
            return index + 1
    return None


def _find_inline(lines: Sequence[str], key: str, value: object) -> int | None:
    """Best guess at the line of ``key = value`` inside an inline table."""
    setter = re.compile(rf"""(^|[\s{{,])["']?{re.escape(key)}["']?\s*=""")
    shown = str(value).lower() if isinstance(value, bool) else str(value)
    with_key = [index + 1 for index, line in enumerate(lines) if setter.search(line)]
    for number in with_key:
        if shown in lines[number - 1]:
            return number
    return with_key[0] if with_key else _find_text(lines, shown)


def _load_toml_rules(text: str, source: str) -> list[Rule]:
    if not isinstance(text, str):
        raise TypeError(f"rule-file text must be a str, not {type(text).__name__}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_syntax_error(exc, text, source) from exc
    lines = text.split("\n")

    def fail(why: str, line: int | None, rule_number: int | None = None) -> ConfigurationError:
        where = f", line {line}" if line is not None else ""
        which = f" (rule #{rule_number})" if rule_number is not None else ""
        return ConfigurationError(f"{source}{where}{which}: {why}", reason="bad_rules")

    for key in data:
        if key != "bypass":
            line = _find_line(lines, key, 0, len(lines)) or _find_text(lines, f"[{key}")
            raise fail(f"unknown setting {key!r}; a rule file holds only [[bypass]] tables", line)
    entries = data.get("bypass", [])
    if not isinstance(entries, list):
        line = _find_text(lines, "[bypass]") or _find_line(lines, "bypass", 0, len(lines))
        raise fail("'bypass' must be an array of tables: write [[bypass]] (two brackets)", line)

    header = re.compile(r"^\s*\[\[\s*bypass\s*\]\]\s*(#.*)?$")
    headers = [index for index, line in enumerate(lines) if header.match(line)]
    if len(headers) != len(entries):
        headers = []  # inline form (bypass = [{...}]) or a header inside a string: search values

    inline_line = _find_line(lines, "bypass", 0, len(lines))  # "bypass = [...]", if written so
    rules: list[Rule] = []
    for number, entry in enumerate(entries, start=1):
        if headers:
            start = headers[number - 1]
            end = headers[number] if number < len(headers) else len(lines)
            table_line: int | None = start + 1
        else:
            start, end, table_line = 0, len(lines), None

        def line_of(key: str, value: object, start: int = start, end: int = end) -> int | None:
            if headers:
                return _find_line(lines, key, start + 1, end) or start + 1
            return _find_inline(lines, key, value) or inline_line

        if not isinstance(entry, dict):
            raise fail(
                'rule must be a table such as { host = "bank.example" }',
                table_line or inline_line,
                number,
            )
        for key, value in entry.items():
            if key not in _TOML_KEYS:
                raise fail(
                    f"unknown key {key!r}; a rule may set {', '.join(_TOML_KEYS)}",
                    line_of(key, key),
                    number,
                )
            if key == "comment" and not isinstance(value, str):
                raise fail("'comment' must be a string", line_of(key, value), number)
        values: dict[str, Any] = {}
        for key, value in entry.items():
            try:
                if key == "host":
                    values["host"] = _normalize_host_pattern(value)
                elif key == "destination":
                    values["destination"] = _parse_toml_network(value, "destination")
                elif key == "client":
                    values["client"] = _parse_toml_network(value, "client")
                elif key == "port":
                    if not isinstance(value, int) or isinstance(value, bool):
                        raise _bad(f"port must be a number from 1 to 65535, not {value!r}")
                    values["port"] = _parse_port(value)
                elif key == "category":
                    values["category"] = _normalize_category(value)
            except ConfigurationError as exc:
                raise fail(str(exc), line_of(key, value), number) from exc
        line = (
            table_line
            or (line_of(next(iter(entry)), next(iter(entry.values()))) if entry else None)
            or inline_line
        )
        origin = f"{source}:{line}" if line is not None else f"{source} rule #{number}"
        try:
            rules.append(Rule(origin=origin, **values))
        except ConfigurationError as exc:
            raise fail(str(exc), line, number) from exc
    return rules


# ---------------------------------------------------------------------------------------------
# The connection being decided


@dataclass(frozen=True, slots=True, kw_only=True)
class _Query:
    client: IPAddress
    host: str | None
    port: int
    destinations: tuple[IPAddress, ...]

    @classmethod
    def build(
        cls, *, client_ip: str, host: str | None, port: int, destination_ip: str | None
    ) -> _Query:
        client = _parse_address(client_ip, "client_ip")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
            raise ValueError(f"port must be an int from 1 to 65535, not {port!r}")
        name = None
        if host is not None:
            if not isinstance(host, str):
                raise TypeError(f"host must be a str or None, not {type(host).__name__}")
            name = normalize_host(host)  # raises InvalidHostName: the relay refuses the client
        destinations: list[IPAddress] = []
        if destination_ip is not None:
            destinations.append(_parse_address(destination_ip, "destination_ip"))
        if name is not None:
            literal = ip_address_of(name)
            if literal is not None and _unmap(literal) not in destinations:
                destinations.append(_unmap(literal))
        return cls(client=client, host=name, port=port, destinations=tuple(destinations))


# ---------------------------------------------------------------------------------------------
# Learned bypasses


@dataclass(frozen=True, slots=True, kw_only=True)
class LearnedBypass:
    """One learned bypass, as listed by :meth:`InterceptPolicy.learned` for support tooling.

    Attributes:
        kind: ``"client_cert"`` (the upstream demanded a client certificate; applies to every
            client) or ``"pinning"`` (this client rejected tlsmitm's leaf; applies to it only).
        key: the entry's key, as carried in :attr:`Decision.rule`.
        host: the normalised host.
        port: the destination port.
        client: the client address for ``"pinning"`` entries, else ``None``.
        learned_at: when the entry was (last) recorded, if the store still knows.
        expires: when the entry stops applying.
    """

    kind: Literal["client_cert", "pinning"]
    key: str
    host: str
    port: int
    client: str | None
    learned_at: datetime | None
    expires: datetime


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_hostport(text: str) -> tuple[str, int] | None:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _client_cert_key(host: str, port: int) -> str:
    return _hostport(host, port)


def _pinning_key(client: IPAddress, host: str, port: int) -> str:
    return f"{client} {_hostport(host, port)}"


def _parse_key(kind: str, key: str) -> tuple[str | None, str, int] | None:
    """(client, host, port) from a store key; ``None`` if the key is not one of ours."""
    client: str | None = None
    rest = key
    if kind == "pinning":
        client, space, rest = key.partition(" ")
        if not space:
            return None
    split = _split_hostport(rest)
    if split is None:
        return None
    return client, split[0], split[1]


def _posix(now: datetime) -> float:
    if not isinstance(now, datetime):
        raise TypeError(f"now must be a datetime, not {type(now).__name__}")
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime, e.g. datetime.now(timezone.utc)")
    return now.timestamp()


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("ascii")


def _unjson(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


class InterceptPolicy:
    """Decides per connection, before any handshake, whether to intercept or splice.

    Args:
        rules: rules given in code; they come first.
        store: where learned bypasses live (default: a :class:`~tlsmitm.MemoryStore`). Share a
            persistent store to keep them across restarts or machines.
        category: the embedder's category engine: called with the normalised (A-label) host,
            returns a category name or ``None``; may be a coroutine function. Called only when a
            category rule exists and no earlier check decided. Exceptions it raises propagate
            out of :meth:`decide`: return ``None`` instead if connections should go on when the
            engine is down.
        rules_file: a TOML rule file, read now and again by :meth:`reload`.
        extra_rules: ``--bypass`` strings (:meth:`Rule.parse`); they come last.
        learn_client_cert_ttl: how long a learned client-certificate bypass lasts; zero turns
            that learning off.
        learn_pinning_ttl: how long a learned pinning bypass lasts; zero turns that learning off.
        pinning_threshold: how many leaf rejections by one client for one host, within
            ``pinning_window``, make a pinning bypass.
        max_learned: the most entries kept of each kind; when full, the soonest-expiring go.
        pinning_window: the window in which rejections are counted.

    Raises:
        ConfigurationError: a rule is malformed (``reason="bad_rules"``) or a setting is out of
            range (``reason="bad_policy"``).
    """

    def __init__(
        self,
        rules: RuleSet | None = None,
        *,
        store: StateStore | None = None,
        category: CategoryCallback | None = None,
        rules_file: Path | None = None,
        extra_rules: Sequence[str] = (),
        learn_client_cert_ttl: timedelta = timedelta(days=7),
        learn_pinning_ttl: timedelta = timedelta(days=1),
        pinning_threshold: int = 3,
        max_learned: int = 10_000,
        pinning_window: timedelta = timedelta(minutes=10),
    ) -> None:
        for name, ttl in (
            ("learn_client_cert_ttl", learn_client_cert_ttl),
            ("learn_pinning_ttl", learn_pinning_ttl),
            ("pinning_window", pinning_window),
        ):
            if not isinstance(ttl, timedelta) or ttl < timedelta(0):
                raise ConfigurationError(
                    f"{name} must be a non-negative timedelta, not {ttl!r}", reason="bad_policy"
                )
        if (
            isinstance(pinning_threshold, bool)
            or not isinstance(pinning_threshold, int)
            or (pinning_threshold < 1)
        ):
            raise ConfigurationError(
                f"pinning_threshold must be an int of at least 1, not {pinning_threshold!r}; "
                "to turn pinning learning off set learn_pinning_ttl=timedelta(0)",
                reason="bad_policy",
            )
        if isinstance(max_learned, bool) or not isinstance(max_learned, int) or max_learned < 1:
            raise ConfigurationError(
                f"max_learned must be an int of at least 1, not {max_learned!r}; to turn "
                "learning off set the learn_*_ttl settings to timedelta(0)",
                reason="bad_policy",
            )
        if category is not None and not callable(category):
            raise TypeError(f"category must be callable, not {category!r}")
        if rules is not None and not isinstance(rules, RuleSet):
            raise TypeError(f"rules must be a RuleSet, not {type(rules).__name__}")
        self._base_rules = rules if rules is not None else RuleSet()
        self._extra_rules = RuleSet.from_strings(extra_rules, source="--bypass")
        self._rules_file = Path(rules_file) if rules_file is not None else None
        self._store: StateStore = store if store is not None else MemoryStore()
        self._category = category
        self._client_cert_ttl = learn_client_cert_ttl.total_seconds()
        self._pinning_ttl = learn_pinning_ttl.total_seconds()
        self._pinning_window = pinning_window.total_seconds()
        self._pinning_threshold = pinning_threshold
        self._max_learned = max_learned
        self._lock = threading.Lock()  # read-modify-write of strike counters
        self._rules = self._load_rules()

    # -- rules ---------------------------------------------------------------------------------

    @property
    def rules(self) -> RuleSet:
        """The rules in force: constructor rules, then the rule file, then ``extra_rules``."""
        return self._rules

    @property
    def rules_file(self) -> Path | None:
        """The TOML rule file :meth:`reload` reads, if any."""
        return self._rules_file

    def _load_rules(self) -> RuleSet:
        rules = self._base_rules
        if self._rules_file is not None:
            rules = rules.merged(RuleSet.from_toml_file(self._rules_file))
        return rules.merged(self._extra_rules)

    def reload(self) -> None:
        """Re-read the rule file; connections decided afterwards use the new rules.

        Raises:
            ConfigurationError: the file is unreadable or malformed; the rules in force are
                kept unchanged (never replaced by an empty set).
        """
        self._rules = self._load_rules()  # assigned only once the whole file has parsed

    # -- deciding ------------------------------------------------------------------------------

    async def decide(
        self,
        *,
        client_ip: str,
        host: str | None,
        port: int,
        destination_ip: str | None = None,
        now: datetime,
    ) -> Decision:
        """Decide for one connection, awaiting the category callback if it is asynchronous.

        This module imports no event loop: ``decide`` suspends only if the category callback
        does, so it is not a checkpoint by itself.

        Args:
            client_ip: the client's address (``::ffff:a.b.c.d`` is read as IPv4).
            host: the CONNECT host or SNI name, ``None`` if the client sent none.
            port: the destination port.
            destination_ip: the address tlsmitm will connect to, if known.
            now: the current time (aware).

        Raises:
            InvalidHostName: ``host`` is malformed; refuse the connection.
            ValueError: an address or the port is malformed.
        """
        query = _Query.build(
            client_ip=client_ip, host=host, port=port, destination_ip=destination_ip
        )
        decision = self._decide_before_category(query, _posix(now))
        if decision is not None:
            return decision
        if query.host is not None and self._category is not None and self._rules.has_category_rules:
            result = self._category(query.host)
            if inspect.isawaitable(result):
                result = await result
            decision = self._category_decision(query, result)
            if decision is not None:
                return decision
        return self._fallback(query)

    def decide_sync(
        self,
        *,
        client_ip: str,
        host: str | None,
        port: int,
        destination_ip: str | None = None,
        now: datetime,
    ) -> Decision:
        """:meth:`decide` for callers without an event loop.

        Raises:
            TypeError: the category callback returned an awaitable (it is closed, never left
                pending); use :meth:`decide` with an asynchronous callback.
            InvalidHostName: ``host`` is malformed.
            ValueError: an address or the port is malformed.
        """
        query = _Query.build(
            client_ip=client_ip, host=host, port=port, destination_ip=destination_ip
        )
        decision = self._decide_before_category(query, _posix(now))
        if decision is not None:
            return decision
        if query.host is not None and self._category is not None and self._rules.has_category_rules:
            result = self._category(query.host)
            if inspect.isawaitable(result):
                close = getattr(result, "close", None)
                if callable(close):
                    close()  # a coroutine never awaited would warn at garbage collection
                raise TypeError(
                    "the category callback is asynchronous; call 'await policy.decide(...)' "
                    "instead of policy.decide_sync(...)"
                )
            decision = self._category_decision(query, result)
            if decision is not None:
                return decision
        return self._fallback(query)

    @property
    def store(self) -> StateStore:
        """Where learned bypasses live."""
        return self._store

    def learned_lookups(
        self, *, client_ip: str, host: str | None, port: int
    ) -> tuple[tuple[str, str], ...]:
        """The (namespace, key) pairs :meth:`decide` reads from the store for this connection.

        A driver fetches them off its event loop first (into a cache such as
        :class:`~tlsmitm.CachedStore`), so that :meth:`decide` itself does no I/O.

        Raises:
            InvalidHostName: ``host`` is malformed.
            ValueError: the address or the port is malformed.
        """
        query = _Query.build(client_ip=client_ip, host=host, port=port, destination_ip=None)
        if query.host is None:
            return ()
        return (
            (_NS_CLIENT_CERT, _client_cert_key(query.host, query.port)),
            (_NS_PINNING, _pinning_key(query.client, query.host, query.port)),
        )

    def _decide_before_category(self, query: _Query, now: float) -> Decision | None:
        rule = self._rules._first_match(query)
        if rule is not None:
            return Decision(intercept=False, reason="rule", rule=rule.text)
        if query.host is None:
            return None
        key = _client_cert_key(query.host, query.port)
        item = self._store.get(_NS_CLIENT_CERT, key)
        if item is not None and item.expires > now:
            return Decision(intercept=False, reason="learned_client_cert", rule=key)
        key = _pinning_key(query.client, query.host, query.port)
        item = self._store.get(_NS_PINNING, key)
        if item is not None and item.expires > now:
            return Decision(intercept=False, reason="learned_pinning", rule=key)
        return None

    def _category_decision(self, query: _Query, result: object) -> Decision | None:
        if result is None:
            return None
        if not isinstance(result, str):
            raise TypeError(
                f"the category callback must return a str or None, not {type(result).__name__}"
            )
        rule = self._rules._first_match(query, category=result.strip().lower())
        if rule is None:
            return None
        return Decision(intercept=False, reason="category", rule=rule.text)

    @staticmethod
    def _fallback(query: _Query) -> Decision:
        if query.host is None:
            return Decision(intercept=False, reason="no_sni")
        return Decision(intercept=True, reason="default")

    # -- learning ------------------------------------------------------------------------------

    def note_client_certificate_requested(
        self, *, host: str, port: int, upstream_verified: bool, now: datetime
    ) -> bool:
        """Record that the upstream for ``host:port`` demanded a client certificate.

        From the next connection on, ``host:port`` is spliced for every client, so the client
        talks to the server directly and can present the user's certificate. The entry is for
        this exact host and port only, never its subdomains or parent.

        The relay may also save the current connection: the client's ClientHello was only
        peeked, so after this returns ``True`` it can drop the upstream connection, open a new
        one, replay the ClientHello bytes and splice.

        Args:
            host: the name tlsmitm sent as SNI upstream.
            port: the upstream port.
            upstream_verified: ``True`` only if the upstream chain verified OK for ``host`` and
                the CertificateRequest is authenticated by it: TLS 1.3 (the server's
                CertificateVerify signs a transcript that includes the CertificateRequest,
                RFC 8446 §4.4.3), or TLS 1.2 once the server's Finished has been checked
                (RFC 5246 §7.4.9). Alerts alone, unverified chains and unauthenticated requests
                must not count: anyone on the network path can forge those.
            now: the current time (aware).

        Returns:
            Whether a bypass is now recorded for ``host:port``.
        """
        name = normalize_host(host)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
            raise ValueError(f"port must be an int from 1 to 65535, not {port!r}")
        when = _posix(now)
        if upstream_verified is not True or self._client_cert_ttl <= 0:
            return False
        key = _client_cert_key(name, port)
        value = _json({"host": name, "port": port, "learned": when})
        self._store.put(_NS_CLIENT_CERT, key, value, expires=when + self._client_cert_ttl)
        self._store.evict(_NS_CLIENT_CERT, now=when, keep=self._max_learned)
        return self._store.get(_NS_CLIENT_CERT, key) is not None

    def note_client_rejected_leaf(
        self, *, client_ip: str, host: str, port: int, now: datetime
    ) -> bool:
        """Count one rejection of tlsmitm's leaf by a client; bypass at the threshold.

        Call it only when the client rejected a leaf tlsmitm expected it to accept (a normal
        intercepted connection after a verified upstream): a certificate alert from the client
        during the handshake (``bad_certificate``, ``unknown_ca``, ``certificate_unknown``,
        ``unsupported_certificate``; RFC 8446 §6.2), or a close before the client's Finished.
        Never for the deliberately untrusted leaves of error passthrough, which the client
        *should* reject, and which an upstream can provoke at will.

        Args:
            client_ip: the client's address; the bypass applies to this client only.
            host: the host the leaf was for.
            port: the destination port.
            now: the current time (aware).

        Returns:
            ``True`` once ``pinning_threshold`` rejections fell within ``pinning_window`` and
            the bypass for (client, host, port) is recorded.
        """
        client = _parse_address(client_ip, "client_ip")
        name = normalize_host(host)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
            raise ValueError(f"port must be an int from 1 to 65535, not {port!r}")
        when = _posix(now)
        if self._pinning_ttl <= 0:
            return False
        key = _pinning_key(client, name, port)
        with self._lock:
            item = self._store.get(_NS_STRIKES, key)
            count, first = 0, when
            stored = _unjson(item.value) if item is not None and item.expires > when else None
            if stored is not None:
                stored_count, stored_first = stored.get("count"), stored.get("first")
                if isinstance(stored_count, int) and isinstance(stored_first, int | float):
                    count, first = stored_count, float(stored_first)
            count += 1
            if count < self._pinning_threshold:
                self._store.put(
                    _NS_STRIKES,
                    key,
                    _json({"count": count, "first": first}),
                    expires=first + self._pinning_window,
                )
                self._store.evict(_NS_STRIKES, now=when, keep=self._max_learned)
                return False
            self._store.delete(_NS_STRIKES, key)
            value = _json({"client": str(client), "host": name, "port": port, "learned": when})
            self._store.put(_NS_PINNING, key, value, expires=when + self._pinning_ttl)
            self._store.evict(_NS_PINNING, now=when, keep=self._max_learned)
            return self._store.get(_NS_PINNING, key) is not None

    def forget_learned(self, host: str | None = None) -> int:
        """Drop learned bypasses (and pending rejection counts) for ``host``, or all of them.

        Returns:
            How many learned bypasses were removed (expired ones included).

        Raises:
            InvalidHostName: ``host`` is malformed.
        """
        name = normalize_host(host) if host is not None else None
        removed = 0
        with self._lock:
            for namespace, kind in (
                (_NS_CLIENT_CERT, "client_cert"),
                (_NS_PINNING, "pinning"),
                (_NS_STRIKES, "pinning"),
            ):
                for item in list(self._store.items(namespace)):
                    parsed = _parse_key(kind, item.key)
                    if name is not None and (parsed is None or parsed[1] != name):
                        continue
                    self._store.delete(namespace, item.key)
                    if namespace != _NS_STRIKES:
                        removed += 1
        return removed

    def learned(self, *, now: datetime) -> list[LearnedBypass]:
        """The learned bypasses in force at ``now``, sorted by kind, host, port and client."""
        when = _posix(now)
        entries: list[LearnedBypass] = []
        kinds: tuple[tuple[str, Literal["client_cert", "pinning"]], ...] = (
            (_NS_CLIENT_CERT, "client_cert"),
            (_NS_PINNING, "pinning"),
        )
        for namespace, kind in kinds:
            for item in self._store.items(namespace):
                if item.expires <= when:
                    continue
                parsed = _parse_key(kind, item.key)
                if parsed is None:
                    continue
                client, host, port = parsed
                stored = _unjson(item.value) or {}
                learned_at = stored.get("learned")
                entries.append(
                    LearnedBypass(
                        kind=kind,
                        key=item.key,
                        host=host,
                        port=port,
                        client=client,
                        learned_at=(
                            datetime.fromtimestamp(learned_at, tz=UTC)
                            if isinstance(learned_at, int | float)
                            else None
                        ),
                        expires=datetime.fromtimestamp(item.expires, tz=UTC),
                    )
                )
        entries.sort(key=lambda entry: (entry.kind, entry.host, entry.port, entry.client or ""))
        return entries
