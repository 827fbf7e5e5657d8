"""InterceptPolicy: rule grammar and matching, the TOML rule file, reload, category callbacks,
and the learned bypasses (client certificates, pinning apps) with their expiry and caps."""

from __future__ import annotations

import ast
import inspect
import ipaddress
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlsmitm._errors import ConfigurationError
from tlsmitm._names import InvalidHostName
from tlsmitm._policy import (
    _NS_CLIENT_CERT,
    _NS_PINNING,
    _NS_STRIKES,
    Decision,
    InterceptPolicy,
    LearnedBypass,
    Rule,
    RuleSet,
)
from tlsmitm._store import MemoryStore

NOW = datetime(2026, 5, 9, 12, 0, tzinfo=UTC)
CLIENT = "192.168.1.5"


def decide(
    policy: InterceptPolicy,
    host: str | None,
    port: int = 443,
    *,
    client_ip: str = CLIENT,
    destination_ip: str | None = None,
    now: datetime = NOW,
) -> Decision:
    return policy.decide_sync(
        client_ip=client_ip, host=host, port=port, destination_ip=destination_ip, now=now
    )


def policy_with(*rules: str, **kwargs: object) -> InterceptPolicy:
    return InterceptPolicy(RuleSet.from_strings(rules), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The --bypass grammar


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("bank.example", "bank.example"),
        ("BANK.Example.", "bank.example"),
        ("*.Bank.Example.", "*.bank.example"),
        (".bank.example", ".bank.example"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("bank.example:8443", "bank.example:8443"),
        ("*.bank.example:443", "*.bank.example:443"),
        ("intranet", "intranet"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3", "10.1.2.3"),
        ("10.1.2.3/32", "10.1.2.3"),
        ("10.0.0.0/8:5223", "10.0.0.0/8:5223"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("[2001:db8::/32]", "2001:db8::/32"),
        ("[2001:db8::/32]:443", "[2001:db8::/32]:443"),
        ("dest:::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("port:5223", "port:5223"),
        ("client:192.168.1.50", "client:192.168.1.50"),
        ("client:192.168.1.0/24", "client:192.168.1.0/24"),
        ("client:[2001:db8::/64]", "client:2001:db8::/64"),
        ("category:Finance", "category:finance"),
        ("client:192.168.1.0/24 category:health", "client:192.168.1.0/24 category:health"),
        ("category:health   client:192.168.1.0/24", "client:192.168.1.0/24 category:health"),
        ("host:port", "host:port"),
        ("host:port:443", "host:port:443"),
        ("host:10.1.2.3", "host:10.1.2.3"),
        ("host:[::1]:443", "host:[::1]:443"),
        ("x.example 10.0.0.0/8:443", "x.example:443 10.0.0.0/8"),
        ("10.0.0.0/8 port:443", "10.0.0.0/8:443"),
    ],
)
def test_rule_parse_canonical_text(text: str, canonical: str) -> None:
    rule = Rule.parse(text)
    assert rule.text == canonical
    assert str(rule) == canonical
    assert Rule.parse(rule.text) == rule


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty rule"),
        ("   ", "empty rule"),
        ("*", "whole left-most label"),
        ("*.", "empty"),
        ("w*.example.com", "whole left-most label"),
        ("*w.example.com", "whole left-most label"),
        ("*.*.example.com", "whole left-most label"),
        ("www.*.example.com", "whole left-most label"),
        ("a..example", "empty label"),
        ("..example", "empty label"),
        ("exa mple.com\x00", "NUL"),
        ("ex%41mple.com", "not allowed"),
        ("999.1.1.1", "numeric name"),
        ("host:*.10.1.2.3", "cannot apply to an IP address"),
        ("host:.10.1.2.3", "cannot apply to an IP address"),
        ("10.0.0.1/8", "did you mean '10.0.0.0/8'"),
        ("10.0.0.0/33", "not an IP address or CIDR"),
        ("[bank.example]:443", "not an IP address or CIDR"),
        ("host:[bank.example]:443", "only IPv6 addresses go in brackets"),
        ("[2001:db8::1", "without a closing"),
        ("[2001:db8::1]443", "expected ':PORT'"),
        ("bank.example:0", "out of range"),
        ("bank.example:65536", "out of range"),
        ("bank.example:99999", "out of range"),
        ("bank.example:-1", "not a port"),
        ("port:", "nothing after"),
        ("port:https", "not a number"),
        ("port:70000", "out of range"),
        ("client:192.168.1.5:80", "takes no port"),
        ("client:bank.example", "not an IP address or CIDR"),
        ("category:", "nothing after"),
        ("category:a/b", "letters, digits"),
        ("foo:bar", "'foo' is not a kind of term"),
        ("a.example b.example", "host given twice"),
        ("port:1 port:2", "port given twice"),
        ("bank.example:443 port:443", "port given twice"),
    ],
)
def test_rule_parse_errors_say_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Rule.parse(text)
    assert caught.value.reason == "bad_rule"
    message = str(caught.value)
    assert complaint in message
    assert repr(text) in message  # the rule is named
    assert "'*.bank.example'" in message  # and the grammar is recalled


def test_rule_parse_rejects_non_text() -> None:
    with pytest.raises(TypeError):
        Rule.parse(b"bank.example")  # type: ignore[arg-type]


def test_rule_constructor_validates_and_normalises() -> None:
    rule = Rule(host="*.BÜCHER.example.")
    assert rule.host == "*.xn--bcher-kva.example"
    assert Rule(client=ipaddress.ip_network("::ffff:192.168.0.0/120")).client == (
        ipaddress.ip_network("192.168.0.0/24")
    )
    with pytest.raises(ConfigurationError, match="at least one condition"):
        Rule()
    with pytest.raises(ConfigurationError, match="at least one condition"):
        Rule(origin="x")
    with pytest.raises(ConfigurationError, match=r"use Rule\.parse"):
        Rule(destination="10.0.0.0/8")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="out of range"):
        Rule(port=0)
    with pytest.raises(ConfigurationError, match="1 to 65535"):
        Rule(port=True)
    # origin does not take part in equality
    assert Rule(host="a.example", origin="x") == Rule(host="a.example", origin="y")


# ---------------------------------------------------------------------------------------------
# Host matching


HOST_TABLE = [
    # exact
    ("bank.example", "bank.example", True),
    ("bank.example", "BANK.example.", True),  # case and one trailing dot fold
    ("bank.example.", "bank.example", True),
    ("bank.example", "www.bank.example", False),
    ("bank.example", "example", False),
    ("bank.example", "bank.example.evil.test", False),
    ("bank.example", "notbank.example", False),
    # *.suffix: one or more labels below, never the apex
    ("*.bank.example", "www.bank.example", True),
    ("*.bank.example", "a.b.c.bank.example", True),
    ("*.bank.example", "WWW.BANK.EXAMPLE.", True),
    ("*.bank.example.", "www.bank.example", True),
    ("*.bank.example", "bank.example", False),
    ("*.bank.example", "notbank.example", False),
    ("*.bank.example", "www.notbank.example", False),
    ("*.bank.example", "xbank.example", False),
    ("*.bank.example", "bank.example.evil.test", False),
    ("*.bank.example", "www.bank.example.evil.test", False),
    ("*.bank.example", "www.bank.example-evil.test", False),
    ("*.bank.example", "www-bank.example", False),
    ("*.example.com", "example.com", False),
    ("*.example.com", "notexample.com", False),
    ("*.example.com", "example.com.evil.test", False),
    ("*.example.com", "com", False),
    # .suffix: apex and below
    (".bank.example", "bank.example", True),
    (".bank.example", "login.bank.example", True),
    (".bank.example", "bank.example.", True),
    (".bank.example", "notbank.example", False),
    (".bank.example", "bank.example.evil.test", False),
    (".bank.example", "example", False),
    # IDN: rules and hosts are compared as A-labels, whichever form either was written in
    ("bücher.example", "xn--bcher-kva.example", True),
    ("xn--bcher-kva.example", "bücher.example", True),
    ("*.bücher.example", "www.xn--bcher-kva.example", True),
    ("*.bücher.example", "www.BÜCHER.example", True),
    (".bücher.example", "xn--bcher-kva.example.", True),
    ("bücher.example", "bucher.example", False),
    ("*.paypal.example", "www.pаypal.example", False),  # Cyrillic 'а' is another name
    ("*.xn--bcher-kva.example", "xn--bcher-kva.example", False),
    # IP-literal hosts only match host rules that name that exact address
    ("host:10.1.2.3", "10.1.2.3", True),
    ("host:2001:db8::1", "[2001:DB8:0::1]", True),
    ("host:10.1.2.3", "10.1.2.4", False),
    ("bank.example", "10.1.2.3", False),
]


@pytest.mark.parametrize(("pattern", "host", "expected"), HOST_TABLE)
def test_host_matching_table(pattern: str, host: str, expected: bool) -> None:
    rule = Rule.parse(pattern)
    assert rule.matches(client_ip=CLIENT, host=host, port=443) is expected
    decision = decide(policy_with(pattern), host)
    assert decision.intercept is not expected
    assert decision.reason == ("rule" if expected else "default")
    assert decision.rule == (rule.text if expected else None)


def test_host_rule_never_matches_connection_without_name() -> None:
    assert not Rule.parse(".bank.example").matches(client_ip=CLIENT, host=None, port=443)


_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwyz0123456789", min_size=1, max_size=6).filter(
    lambda label: not label.isdigit()
)
_LABELS = st.lists(_LABEL, min_size=1, max_size=4)


@st.composite
def _suffix_and_host(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """A suffix and a host that is the suffix, below it, a near miss, or unrelated."""
    suffix = draw(_LABELS)
    prefix = draw(st.lists(_LABEL, min_size=0, max_size=3))
    shape = draw(st.sampled_from(["below", "glued", "suffix_then_more", "changed", "unrelated"]))
    if shape == "below":
        host = prefix + suffix
    elif shape == "glued":  # "notbank.example"
        host = [*prefix, draw(_LABEL) + suffix[0], *suffix[1:]]
    elif shape == "suffix_then_more":  # "bank.example.evil.test"
        host = prefix + suffix + draw(_LABELS)
    elif shape == "changed":
        position = draw(st.integers(0, len(suffix) - 1))
        host = [*prefix, *suffix[:position], suffix[position] + "x", *suffix[position + 1 :]]
    else:
        host = draw(_LABELS)
    return suffix, host


@settings(max_examples=300, deadline=None)
@given(_suffix_and_host())
def test_no_host_outside_a_suffix_ever_matches(case: tuple[list[str], list[str]]) -> None:
    suffix, host_labels = case
    host = ".".join(host_labels)
    below = len(host_labels) > len(suffix) and host_labels[-len(suffix) :] == suffix
    apex = host_labels == suffix
    name = ".".join(suffix)
    for pattern, expected in (
        ("*." + name, below),
        ("." + name, below or apex),
        (name, apex),
    ):
        rule = Rule.parse(pattern)
        for written in (host, host.upper(), host + "."):
            assert rule.matches(client_ip=CLIENT, host=written, port=443) is expected, (
                pattern,
                written,
            )


_CATEGORY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=8)
_NETWORK = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
).map(lambda pair: ipaddress.ip_network(f"{pair[0]}/{pair[1]}", strict=False))
_HOST_PATTERN = st.one_of(
    st.sampled_from(["port", "host", "client", "dest", "category", "10.1.2.3", "2001:db8::1"]),
    st.tuples(st.sampled_from(["", "*.", "."]), _LABELS).map(lambda p: p[0] + ".".join(p[1])),
)


@st.composite
def _rules(draw: st.DrawFn) -> Rule:
    values = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "host": _HOST_PATTERN,
                "destination": _NETWORK,
                "port": st.integers(1, 65535),
                "client": _NETWORK,
                "category": _CATEGORY.filter(lambda c: c[0] not in "_.-"),
            },
        ).filter(bool)
    )
    if values.get("host") is not None and values["host"][:1] in "*." and ":" in values["host"]:
        values["host"] = values["host"].lstrip("*.")
    return Rule(**values)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(_rules())
def test_rule_text_round_trips(rule: Rule) -> None:
    assert Rule.parse(rule.text) == rule
    assert RuleSet.from_strings([rule.text]).rules == (rule,)


_SMALL_LABEL = st.sampled_from(["a", "b", "bank", "example", "xn--bcher-kva"])
_SMALL_NAME = st.lists(_SMALL_LABEL, min_size=1, max_size=4).map(".".join)
_SMALL_RULE = st.one_of(
    st.tuples(st.sampled_from(["", "*.", "."]), _SMALL_NAME).map("".join),
    st.tuples(st.sampled_from(["", "*.", "."]), _SMALL_NAME, st.sampled_from([443, 8443])).map(
        lambda p: f"{p[0]}{p[1]}:{p[2]}"
    ),
    st.sampled_from(["port:8443", "client:10.0.0.0/8", "category:finance", "10.0.0.0/8"]),
    st.tuples(st.sampled_from(["", "*.", "."]), _SMALL_NAME).map(
        lambda p: f"{p[0]}{p[1]} category:finance"
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_SMALL_RULE, max_size=12),
    _SMALL_NAME,
    st.sampled_from([443, 8443]),
    st.sampled_from([None, "finance"]),
)
def test_indexed_lookup_equals_a_linear_scan(
    texts: list[str], host: str, port: int, category: str | None
) -> None:
    rules = RuleSet.from_strings(texts)
    policy = InterceptPolicy(rules, category=lambda name: category)
    expected = next(
        (
            rule
            for rule in rules
            if rule.category is None
            and rule.matches(client_ip="10.1.1.1", host=host, port=port, destination_ip="10.2.2.2")
        ),
        None,
    )
    if expected is None and category is not None:
        expected = next(
            (
                rule
                for rule in rules
                if rule.category is not None
                and rule.matches(
                    client_ip="10.1.1.1",
                    host=host,
                    port=port,
                    destination_ip="10.2.2.2",
                    category=category,
                )
            ),
            None,
        )
    decision = decide(policy, host, port, client_ip="10.1.1.1", destination_ip="10.2.2.2")
    assert decision.rule == (expected.text if expected is not None else None)
    assert decision.intercept is (expected is None)


# ---------------------------------------------------------------------------------------------
# Destinations, ports and clients


@pytest.mark.parametrize(
    ("rule", "connection", "bypass"),
    [
        ("10.0.0.0/8", {"destination_ip": "10.2.3.4"}, True),
        ("10.0.0.0/8", {"destination_ip": "11.0.0.1"}, False),
        ("10.0.0.0/8", {"destination_ip": "::ffff:10.2.3.4"}, True),  # dual-stack socket
        ("10.0.0.0/8", {"host": "10.2.3.4"}, True),  # CONNECT to an IP literal
        ("10.0.0.0/8", {"host": "[::ffff:10.2.3.4]"}, True),
        ("10.0.0.0/8", {"host": "ten.example"}, False),  # no address known
        ("10.0.0.0/8", {"host": "ten.example", "destination_ip": "10.9.9.9"}, True),
        ("10.0.0.0/8:5223", {"destination_ip": "10.2.3.4", "port": 5223}, True),
        ("10.0.0.0/8:5223", {"destination_ip": "10.2.3.4", "port": 443}, False),
        ("[2001:db8::/32]:443", {"destination_ip": "2001:db8:1::7"}, True),
        ("[2001:db8::/32]:443", {"destination_ip": "2001:db9::7"}, False),
        ("2001:db8::/32", {"destination_ip": "10.2.3.4"}, False),
        ("port:5223", {"host": "push.example", "port": 5223}, True),
        ("port:5223", {"host": "push.example", "port": 5224}, False),
        ("bank.example:8443", {"host": "bank.example", "port": 8443}, True),
        ("bank.example:8443", {"host": "bank.example", "port": 443}, False),
        ("client:192.168.1.50", {"client_ip": "192.168.1.50"}, True),
        ("client:192.168.1.50", {"client_ip": "::ffff:192.168.1.50"}, True),
        ("client:192.168.1.50", {"client_ip": "192.168.1.51"}, False),
        ("client:192.168.1.0/24", {"client_ip": "192.168.1.51"}, True),
        ("client:192.168.1.0/24", {"client_ip": "192.168.2.1"}, False),
        ("client:fd00::/8", {"client_ip": "fd12::1"}, True),
        ("client:fd00::/8", {"client_ip": "[fd12::1]"}, True),
        ("client:192.168.1.50 *.bank.example", {"client_ip": "192.168.1.50"}, True),
        ("client:192.168.1.50 *.bank.example", {"client_ip": "192.168.1.51"}, False),
        ("client:192.168.1.50 *.bank.example", {"host": "www.other.example"}, False),
    ],
)
def test_address_port_and_client_rules(
    rule: str, connection: dict[str, object], bypass: bool
) -> None:
    connection = {"client_ip": "192.168.1.50", "host": "www.bank.example", **connection}
    decision = decide(policy_with(rule), **connection)  # type: ignore[arg-type]
    assert decision.intercept is not bypass
    if bypass:
        assert decision == Decision(intercept=False, reason="rule", rule=Rule.parse(rule).text)


def test_connection_without_name_is_spliced_unless_a_rule_says_more() -> None:
    policy = policy_with("client:192.168.1.50", ".bank.example")
    assert decide(policy, None) == Decision(intercept=False, reason="no_sni", rule=None)
    assert decide(policy, None, client_ip="192.168.1.50") == Decision(
        intercept=False, reason="rule", rule="client:192.168.1.50"
    )
    assert decide(policy, "other.example") == Decision(intercept=True, reason="default")


def test_first_rule_wins_and_is_named() -> None:
    policy = policy_with(".bank.example", "*.bank.example", "port:443")
    decision = decide(policy, "www.bank.example")
    assert decision.rule == ".bank.example"
    assert decide(policy, "other.example").rule == "port:443"


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"host": "a..b"}, InvalidHostName, "empty label"),
        ({"host": "bad host"}, InvalidHostName, "not allowed"),
        ({"host": b"bank.example"}, TypeError, "str or None"),
        ({"client_ip": "not-an-ip"}, ValueError, "client_ip"),
        ({"client_ip": "fe80::1%eth0"}, ValueError, "client_ip"),
        ({"destination_ip": "bank.example"}, ValueError, "destination_ip"),
        ({"port": 0}, ValueError, "port"),
        ({"port": 65536}, ValueError, "port"),
        ({"port": True}, ValueError, "port"),
        ({"now": datetime(2026, 5, 9, 12, 0)}, ValueError, "timezone-aware"),
    ],
)
def test_decide_refuses_bad_input_cleanly(
    kwargs: dict[str, object], error: type[Exception], text: str
) -> None:
    arguments: dict[str, object] = {
        "client_ip": CLIENT,
        "host": "bank.example",
        "port": 443,
        "now": NOW,
        **kwargs,
    }
    policy = policy_with("port:5223")
    with pytest.raises(error, match=text):
        policy.decide_sync(**arguments)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Decision


def test_decision_is_a_validated_value() -> None:
    decision = Decision(intercept=False, reason="not_tls")
    assert decision.action == "bypass"
    assert Decision(intercept=True, reason="default").action == "intercept"
    with pytest.raises(TypeError):
        Decision(intercept="yes", reason="rule")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lower-case identifier"):
        Decision(intercept=True, reason="Bad Reason")
    with pytest.raises(ValueError, match="lower-case identifier"):
        Decision(intercept=True, reason="")
    with pytest.raises(TypeError):
        Decision(intercept=True, reason="rule", rule=3)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        decision.intercept = True  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# The rule file

GOOD_FILE = """\
# tlsmitm bypass rules
[[bypass]]
host = "*.bank.example"      # banking: legal requirement
comment = "legal"

[[bypass]]
host = ".Bücher.example."

[[bypass]]
destination = "10.0.0.0/8"
port = 5223

[[bypass]]
client = "192.168.1.50"

[[bypass]]
category = "Finance"

[[bypass]]
"host" = 'gov.example'
client = "fd00::/8"
"""


def test_rule_file_loads_every_kind() -> None:
    rules = RuleSet.from_toml_text(GOOD_FILE, source="rules.toml")
    assert [rule.text for rule in rules] == [
        "*.bank.example",
        ".xn--bcher-kva.example",
        "10.0.0.0/8:5223",
        "client:192.168.1.50",
        "category:finance",
        "client:fd00::/8 gov.example",
    ]
    assert [rule.origin for rule in rules] == [
        "rules.toml:2",
        "rules.toml:6",
        "rules.toml:9",
        "rules.toml:13",
        "rules.toml:16",
        "rules.toml:19",
    ]
    assert len(rules) == 6
    assert rules.has_category_rules


def test_empty_rule_file_is_an_empty_rule_set() -> None:
    assert len(RuleSet.from_toml_text("# nothing bypassed yet\n")) == 0
    assert len(RuleSet.from_toml_text("bypass = []\n")) == 0


def test_inline_rule_array_is_accepted() -> None:
    rules = RuleSet.from_toml_text('bypass = [{ host = "a.example" }, { port = 5223 }]\n')
    assert [rule.text for rule in rules] == ["a.example", "port:5223"]
    assert rules.rules[0].origin == "<string>:1"


@pytest.mark.parametrize(
    ("text", "where", "complaint"),
    [
        # TOML syntax: tomllib's position, restated
        ('[[bypass]]\nhost = "a.example\n', "line 2, column 18", "not valid TOML"),
        ("[[bypass]]\nhost = a.example\n", "line 2", "not valid TOML"),
        ('[[bypass]]\nhost = "a.example"\nhost = "b.example"\n', "line 3", "not valid TOML"),
        ('[[bypass]]\nhost = """a.example\n\n', "line 2 (end of file)", "unterminated"),
        # values
        (
            '[[bypass]]\nhost = "a.example"\n\n[[bypass]]\nhost = "w*.bank.example"\n',
            "line 5 (rule #2)",
            "whole left-most label",
        ),
        ('[[bypass]]\nhost = "a..example"\n', "line 2 (rule #1)", "empty label"),
        (
            '[[bypass]]\nport = 443\ndestination = "10.0.0.1/8"\n',
            "line 3 (rule #1)",
            "did you mean '10.0.0.0/8'",
        ),
        (
            '[[bypass]]\ndestination = "10.0.0.0/8:443"\n',
            "line 2 (rule #1)",
            "give the port as its own key (port = 443)",
        ),
        ('[[bypass]]\ndestination = "[2001:db8::/32]:443"\n', "line 2 (rule #1)", "its own key"),
        ("[[bypass]]\ndestination = 10\n", "line 2 (rule #1)", "must be a string"),
        ('[[bypass]]\nclient = "192.168.1.300"\n', "line 2 (rule #1)", "not an IP address"),
        ('[[bypass]]\nclient = "192.168.1.5:80"\n', "line 2 (rule #1)", "its own key"),
        ('[[bypass]]\nhost = "a.example"\nport = 70000\n', "line 3 (rule #1)", "out of range"),
        ('[[bypass]]\nhost = "a.example"\nport = 0\n', "line 3 (rule #1)", "out of range"),
        ('[[bypass]]\nhost = "a.example"\nport = true\n', "line 3 (rule #1)", "1 to 65535"),
        ('[[bypass]]\nhost = "a.example"\nport = "443"\n', "line 3 (rule #1)", "1 to 65535"),
        ('[[bypass]]\nhost = "a.example"\nport = 44.3\n', "line 3 (rule #1)", "1 to 65535"),
        ('[[bypass]]\nhost = ["a.example"]\n', "line 2 (rule #1)", "must be a string"),
        ('[[bypass]]\ncategory = "a b"\n', "line 2 (rule #1)", "letters, digits"),
        ('[[bypass]]\nhots = "a.example"\n', "line 2 (rule #1)", "unknown key 'hots'"),
        ('[[bypass]]\nhost = "a.example"\ncomment = 3\n', "line 3 (rule #1)", "'comment'"),
        ('[[bypass]]\ncomment = "only a comment"\n', "line 1 (rule #1)", "at least one condition"),
        (
            '[[bypass]]\nhost = "a.example"\n[[bypass]]\n',
            "line 3 (rule #2)",
            "at least one condition",
        ),
        # structure
        ('[[bypas]]\nhost = "a.example"\n', "line 1", "unknown setting 'bypas'"),
        ('version = 2\n[[bypass]]\nhost = "a.example"\n', "line 1", "unknown setting"),
        ('[bypass]\nhost = "a.example"\n', "line 1", "two brackets"),
        ('bypass = ["a.example"]\n', "line 1 (rule #1)", "must be a table"),
        (
            '# rules\nbypass = [\n  { host = "a.example" },\n  { port = 0 },\n]\n',
            "line 4 (rule #2)",
            "out of range",
        ),
        (
            'bypass = [\n  { host = "a.example", port = 1 },\n  { port = 1, x = 2 },\n]\n',
            "line 3 (rule #2)",
            "unknown key 'x'",
        ),
        (
            '[[bypass]]\nhost = "a.example"\n[bypass.sub]\nx = 1\n',
            "line 1 (rule #1)",
            "unknown key 'sub'",
        ),
        (
            'bypass = [{ host = "a.example" }, { host = "b..example" }]\n',
            "line 1 (rule #2)",
            "empty label",
        ),
    ],
)
def test_malformed_rule_file_names_the_line(text: str, where: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        RuleSet.from_toml_text(text, source="/etc/tlsmitm/rules.toml")
    message = str(caught.value)
    assert caught.value.reason == "bad_rules"
    assert message.startswith("/etc/tlsmitm/rules.toml")
    assert where in message
    assert complaint in message


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return repr(value)


_TOML_SCALAR = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["*.bank.example", ".a.example", "10.0.0.0/8", "fd00::/8", "finance", "x"]),
    st.integers(-5, 70000),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
)
_TOML_TABLE = st.dictionaries(
    st.sampled_from(["host", "destination", "port", "client", "category", "comment", "hots"]),
    st.one_of(_TOML_SCALAR, st.lists(_TOML_SCALAR, max_size=2)),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_TOML_TABLE, max_size=4), st.booleans())
def test_any_rule_file_loads_or_names_a_line(tables: list[dict[str, object]], inline: bool) -> None:
    if inline:
        text = (
            "bypass = [\n"
            + "".join(
                "  { " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in table.items()) + " },\n"
                for table in tables
            )
            + "]\n"
        )
    else:
        text = "".join(
            "[[bypass]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
            for table in tables
        )
    try:
        rules: RuleSet | ConfigurationError = RuleSet.from_toml_text(text, source="fuzz.toml")
    except ConfigurationError as exc:
        rules = exc
    if isinstance(rules, ConfigurationError):
        assert rules.reason == "bad_rules"
        assert re.match(r"fuzz\.toml, line [0-9]+", str(rules)), str(rules)
    else:
        assert len(rules) == len(tables)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_is_a_rule_or_a_clean_error(text: str) -> None:
    try:
        rule: Rule | ConfigurationError = Rule.parse(text)
    except ConfigurationError as exc:
        rule = exc
    if isinstance(rule, ConfigurationError):
        assert rule.reason == "bad_rule"
    else:
        assert Rule.parse(rule.text) == rule


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_file_text_is_rules_or_a_clean_error(text: str) -> None:
    try:
        result: RuleSet | ConfigurationError = RuleSet.from_toml_text(text, source="fuzz.toml")
    except ConfigurationError as exc:
        result = exc
    if isinstance(result, ConfigurationError):
        assert result.reason == "bad_rules"
        assert str(result).startswith("fuzz.toml")


def test_rule_file_errors_for_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigurationError, match=r"cannot read bypass rule file .*missing\.toml"):
        RuleSet.from_toml_file(missing)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[[bypass]]\nhost = "b\xfccher.example"\n')
    with pytest.raises(ConfigurationError, match=r"latin1.toml, line 2: not UTF-8"):
        RuleSet.from_toml_file(latin1)
    directory = tmp_path / "dir.toml"
    directory.mkdir()
    with pytest.raises(ConfigurationError, match="cannot read"):
        RuleSet.from_toml_file(directory)


def test_rule_file_from_path(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(GOOD_FILE, encoding="utf-8")
    rules = RuleSet.from_toml_file(path)
    assert len(rules) == 6
    assert rules.rules[0].origin == f"{path}:2"


def test_from_strings_names_the_bad_string() -> None:
    with pytest.raises(ConfigurationError) as caught:
        RuleSet.from_strings(["a.example", "w*.b.example"])
    assert caught.value.reason == "bad_rules"
    assert str(caught.value).startswith("--bypass: bypass rule 'w*.b.example'")
    with pytest.raises(TypeError, match="sequence of rule strings"):
        RuleSet.from_strings("a.example")
    with pytest.raises(TypeError):
        RuleSet(("a.example",))  # type: ignore[arg-type]


def test_merged_keeps_order_and_drops_duplicates() -> None:
    first = RuleSet.from_strings(["a.example", "port:5223"])
    second = RuleSet.from_strings(["A.example.", "b.example"])
    merged = first.merged(second)
    assert [rule.text for rule in merged] == ["a.example", "port:5223", "b.example"]
    assert len(merged) == 3
    assert len(first) == 2  # immutable
    assert not merged.has_category_rules


# ---------------------------------------------------------------------------------------------
# Reload


def test_reload_applies_new_rules_and_keeps_cli_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[[bypass]]\nhost = "a.example"\n', encoding="utf-8")
    policy = InterceptPolicy(
        RuleSet.from_strings(["code.example"], source="code"),
        rules_file=path,
        extra_rules=["cli.example"],
    )
    assert policy.rules_file == path
    assert [rule.text for rule in policy.rules] == ["code.example", "a.example", "cli.example"]
    assert not decide(policy, "a.example").intercept
    assert decide(policy, "b.example").intercept

    path.write_text('[[bypass]]\nhost = "b.example"\n', encoding="utf-8")
    policy.reload()
    assert decide(policy, "a.example").intercept
    assert not decide(policy, "b.example").intercept
    assert not decide(policy, "cli.example").intercept
    assert not decide(policy, "code.example").intercept


@pytest.mark.parametrize(
    "breakage",
    [
        '[[bypass]]\nhost = "b.example\n',  # syntax
        '[[bypass]]\nhost = "b.example"\n[[bypass]]\nport = 99999\n',  # a bad rule
        None,  # file removed
    ],
)
def test_reload_error_keeps_the_old_rules(tmp_path: Path, breakage: str | None) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[[bypass]]\nhost = "a.example"\n', encoding="utf-8")
    policy = InterceptPolicy(rules_file=path)
    before = policy.rules
    if breakage is None:
        path.unlink()
    else:
        path.write_text(breakage, encoding="utf-8")
    with pytest.raises(ConfigurationError) as caught:
        policy.reload()
    assert str(path) in str(caught.value)
    assert policy.rules is before
    assert not decide(policy, "a.example").intercept  # never an empty rule set


def test_constructor_refuses_malformed_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text("[[bypass]]\nport = 0\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"rules.toml, line 2 \(rule #1\)"):
        InterceptPolicy(rules_file=path)
    with pytest.raises(ConfigurationError, match="--bypass"):
        InterceptPolicy(extra_rules=["*"])


def test_reload_without_rule_file_keeps_rules() -> None:
    policy = policy_with("a.example")
    policy.reload()
    assert [rule.text for rule in policy.rules] == ["a.example"]


# ---------------------------------------------------------------------------------------------
# Category callbacks


def test_sync_category_callback() -> None:
    asked: list[str] = []

    def category(host: str) -> str | None:
        asked.append(host)
        return {"bank.example": " Finance ", "xn--bcher-kva.example": "books"}.get(host)

    policy = policy_with("category:finance", category=category)
    assert decide(policy, "BANK.example.") == Decision(
        intercept=False, reason="category", rule="category:finance"
    )
    assert decide(policy, "bücher.example") == Decision(intercept=True, reason="default")
    assert decide(policy, "news.example").intercept
    assert asked == ["bank.example", "xn--bcher-kva.example", "news.example"]  # A-labels


async def test_async_category_callback() -> None:
    async def category(host: str) -> str | None:
        await trio.lowlevel.checkpoint()  # a real suspension, as a network lookup would be
        return "health" if host.endswith("clinic.example") else None

    policy = policy_with("client:192.168.1.0/24 category:health", category=category)
    decision = await policy.decide(
        client_ip="192.168.1.7", host="www.clinic.example", port=443, now=NOW
    )
    assert decision == Decision(
        intercept=False, reason="category", rule="client:192.168.1.0/24 category:health"
    )
    other_client = await policy.decide(
        client_ip="10.0.0.7", host="www.clinic.example", port=443, now=NOW
    )
    assert other_client.intercept
    assert (await policy.decide(client_ip=CLIENT, host="x.example", port=443, now=NOW)).intercept
    assert (await policy.decide(client_ip=CLIENT, host=None, port=443, now=NOW)).reason == "no_sni"


async def test_async_decide_with_sync_callback_and_rules() -> None:
    policy = policy_with("category:finance", "*.bank.example", category=lambda host: "finance")
    decision = await policy.decide(client_ip=CLIENT, host="www.bank.example", port=443, now=NOW)
    assert decision.reason == "rule"  # plain rules are checked before categories
    decision = await policy.decide(client_ip=CLIENT, host="x.example", port=443, now=NOW)
    assert decision.reason == "category"


def test_decide_sync_refuses_an_async_callback_and_closes_it() -> None:
    created: list[object] = []

    async def lookup(host: str) -> str | None:
        return "finance"

    def category(host: str) -> object:
        coroutine = lookup(host)
        created.append(coroutine)
        return coroutine

    policy = policy_with("category:finance", category=category)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"await policy\.decide"):
        decide(policy, "bank.example")
    assert inspect.getcoroutinestate(created[0]) == inspect.CORO_CLOSED  # type: ignore[arg-type]


def test_category_callback_is_asked_only_when_needed() -> None:
    asked: list[str] = []

    def category(host: str) -> str | None:
        asked.append(host)
        return None

    without_category_rules = policy_with("a.example", category=category)
    decide(without_category_rules, "b.example")
    with_rules = policy_with("a.example", "category:finance", category=category)
    decide(with_rules, "a.example")  # a plain rule decided first
    decide(with_rules, None)  # no name to classify
    assert asked == []
    decide(with_rules, "b.example")
    assert asked == ["b.example"]


def test_category_callback_errors() -> None:
    policy = policy_with("category:finance", category=lambda host: 42)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="str or None"):
        decide(policy, "bank.example")

    def broken(host: str) -> str | None:
        raise LookupError("category engine down")

    policy = policy_with("category:finance", category=broken)
    with pytest.raises(LookupError, match="engine down"):
        decide(policy, "bank.example")
    with pytest.raises(TypeError, match="callable"):
        InterceptPolicy(category="finance")  # type: ignore[arg-type]


def test_category_rule_without_callback_never_matches() -> None:
    policy = policy_with("category:finance")
    assert decide(policy, "bank.example") == Decision(intercept=True, reason="default")


# ---------------------------------------------------------------------------------------------
# Learned bypass: the upstream demands a client certificate


def test_client_cert_bypass_needs_a_verified_upstream() -> None:
    policy = InterceptPolicy()
    # An unverified upstream (a network attacker without bank.example's key) changes nothing.
    assert not policy.note_client_certificate_requested(
        host="bank.example", port=443, upstream_verified=False, now=NOW
    )
    assert decide(policy, "bank.example") == Decision(intercept=True, reason="default")
    assert policy.learned(now=NOW) == []
    # Only a real bool True counts.
    assert not policy.note_client_certificate_requested(
        host="bank.example",
        port=443,
        upstream_verified=1,  # type: ignore[arg-type]
        now=NOW,
    )
    assert policy.learned(now=NOW) == []


def test_client_cert_bypass_is_for_that_host_and_port_only() -> None:
    policy = InterceptPolicy()
    assert policy.note_client_certificate_requested(
        host="Bank.Example.", port=443, upstream_verified=True, now=NOW
    )
    expected = Decision(intercept=False, reason="learned_client_cert", rule="bank.example:443")
    assert decide(policy, "bank.example") == expected
    assert decide(policy, "bank.example", client_ip="10.9.9.9") == expected  # every client
    assert decide(policy, "bank.example", 8443).intercept
    assert decide(policy, "www.bank.example").intercept
    assert decide(policy, "example").intercept
    assert decide(policy, "notbank.example").intercept


def test_a_server_asking_for_client_certs_only_bypasses_itself() -> None:
    policy = InterceptPolicy()
    assert policy.note_client_certificate_requested(
        host="evil.test", port=443, upstream_verified=True, now=NOW
    )
    assert not decide(policy, "evil.test").intercept
    for victim in ("bank.example", "www.evil.test", "evil.test.bank.example"):
        assert decide(policy, victim).intercept


def test_client_cert_bypass_expires_and_can_be_refreshed() -> None:
    policy = InterceptPolicy(learn_client_cert_ttl=timedelta(days=7))
    policy.note_client_certificate_requested(
        host="bank.example", port=443, upstream_verified=True, now=NOW
    )
    almost = NOW + timedelta(days=7) - timedelta(seconds=1)
    assert not decide(policy, "bank.example", now=almost).intercept
    assert decide(policy, "bank.example", now=NOW + timedelta(days=7)).intercept
    assert policy.learned(now=NOW + timedelta(days=7)) == []

    policy.note_client_certificate_requested(
        host="bank.example", port=443, upstream_verified=True, now=NOW + timedelta(days=6)
    )
    assert not decide(policy, "bank.example", now=NOW + timedelta(days=12)).intercept
    assert decide(policy, "bank.example", now=NOW + timedelta(days=13)).intercept


def test_client_cert_learning_can_be_turned_off() -> None:
    policy = InterceptPolicy(learn_client_cert_ttl=timedelta(0))
    assert not policy.note_client_certificate_requested(
        host="bank.example", port=443, upstream_verified=True, now=NOW
    )
    assert decide(policy, "bank.example").intercept


def test_client_cert_bypass_idn_and_ip_hosts() -> None:
    policy = InterceptPolicy()
    policy.note_client_certificate_requested(
        host="bücher.example", port=443, upstream_verified=True, now=NOW
    )
    policy.note_client_certificate_requested(
        host="[2001:DB8::1]", port=8443, upstream_verified=True, now=NOW
    )
    assert decide(policy, "xn--bcher-kva.example").rule == "xn--bcher-kva.example:443"
    assert decide(policy, "2001:db8::1", 8443).rule == "[2001:db8::1]:8443"
    hosts = [(entry.host, entry.port) for entry in policy.learned(now=NOW)]
    assert hosts == [("2001:db8::1", 8443), ("xn--bcher-kva.example", 443)]


def test_learning_refuses_bad_input() -> None:
    policy = InterceptPolicy()
    with pytest.raises(InvalidHostName):
        policy.note_client_certificate_requested(
            host="bank..example", port=443, upstream_verified=True, now=NOW
        )
    with pytest.raises(ValueError, match="port"):
        policy.note_client_certificate_requested(
            host="bank.example", port=0, upstream_verified=True, now=NOW
        )
    with pytest.raises(ValueError, match="timezone-aware"):
        policy.note_client_certificate_requested(
            host="bank.example",
            port=443,
            upstream_verified=True,
            now=datetime(2026, 1, 1),
        )
    with pytest.raises(ValueError, match="client_ip"):
        policy.note_client_rejected_leaf(client_ip="me", host="a.example", port=443, now=NOW)
    with pytest.raises(InvalidHostName):
        policy.note_client_rejected_leaf(client_ip=CLIENT, host="a b", port=443, now=NOW)
    with pytest.raises(ValueError, match="port"):
        policy.note_client_rejected_leaf(client_ip=CLIENT, host="a.example", port=-1, now=NOW)
    assert policy.learned(now=NOW) == []


# ---------------------------------------------------------------------------------------------
# Learned bypass: the client rejects tlsmitm's leaf (a pinning app)


def _reject(
    policy: InterceptPolicy, at: datetime, client: str = CLIENT, host: str = "app.example"
) -> bool:
    return policy.note_client_rejected_leaf(client_ip=client, host=host, port=443, now=at)


def test_pinning_bypass_after_threshold_for_that_client_only() -> None:
    policy = InterceptPolicy()  # threshold 3
    assert not _reject(policy, NOW)
    assert not _reject(policy, NOW + timedelta(seconds=1))
    assert decide(policy, "app.example").intercept
    assert _reject(policy, NOW + timedelta(seconds=2))
    later = NOW + timedelta(seconds=3)
    assert decide(policy, "app.example", now=later) == Decision(
        intercept=False, reason="learned_pinning", rule="192.168.1.5 app.example:443"
    )
    assert decide(policy, "app.example", client_ip="::ffff:192.168.1.5", now=later).reason == (
        "learned_pinning"
    )
    assert decide(policy, "app.example", client_ip="192.168.1.6", now=later).intercept
    assert decide(policy, "app.example", 8443, now=later).intercept
    assert decide(policy, "www.app.example", now=later).intercept


def test_pinning_rejections_from_different_clients_do_not_add_up() -> None:
    policy = InterceptPolicy()
    for index in range(5):
        assert not _reject(policy, NOW, client=f"192.168.1.{10 + index}")
    assert decide(policy, "app.example", client_ip="192.168.1.10").intercept


def test_pinning_rejections_count_within_the_window_only() -> None:
    policy = InterceptPolicy(pinning_window=timedelta(minutes=10))
    assert not _reject(policy, NOW)
    assert not _reject(policy, NOW + timedelta(minutes=6))
    # The window opened at NOW; at +12 min it is over, so counting starts again.
    assert not _reject(policy, NOW + timedelta(minutes=12))
    assert not _reject(policy, NOW + timedelta(minutes=13))
    assert decide(policy, "app.example", now=NOW + timedelta(minutes=13)).intercept
    assert _reject(policy, NOW + timedelta(minutes=14))


def test_pinning_bypass_expires() -> None:
    policy = InterceptPolicy(pinning_threshold=1, learn_pinning_ttl=timedelta(days=1))
    assert _reject(policy, NOW)
    assert not decide(policy, "app.example", now=NOW + timedelta(hours=23)).intercept
    assert decide(policy, "app.example", now=NOW + timedelta(days=1)).intercept
    # after expiry it takes a full threshold again (here: one rejection)
    assert _reject(policy, NOW + timedelta(days=2))


def test_pinning_learning_can_be_turned_off() -> None:
    policy = InterceptPolicy(pinning_threshold=1, learn_pinning_ttl=timedelta(0))
    assert not _reject(policy, NOW)
    assert decide(policy, "app.example").intercept


def test_decision_log_types_are_reachable_from_the_policy_module() -> None:
    from tlsmitm import _decisionlog, _policy

    assert _policy.ConnectionRecord is _decisionlog.ConnectionRecord
    assert _policy.DecisionLog is _decisionlog.DecisionLog


def test_policy_settings_are_validated() -> None:
    for kwargs in (
        {"pinning_threshold": 0},
        {"pinning_threshold": True},
        {"max_learned": 0},
        {"learn_client_cert_ttl": timedelta(seconds=-1)},
        {"learn_pinning_ttl": 3600},
        {"pinning_window": timedelta(days=-1)},
    ):
        with pytest.raises(ConfigurationError) as caught:
            InterceptPolicy(**kwargs)  # type: ignore[arg-type]
        assert caught.value.reason == "bad_policy"
    with pytest.raises(TypeError, match="RuleSet"):
        InterceptPolicy(["a.example"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Caps, listing, forgetting, the store


def test_learned_entries_are_capped_keeping_the_latest() -> None:
    policy = InterceptPolicy(max_learned=3)
    for index in range(5):
        assert policy.note_client_certificate_requested(
            host=f"h{index}.example",
            port=443,
            upstream_verified=True,
            now=NOW + timedelta(minutes=index),
        )
    at = NOW + timedelta(minutes=5)
    assert [entry.host for entry in policy.learned(now=at)] == [
        "h2.example",
        "h3.example",
        "h4.example",
    ]
    assert decide(policy, "h0.example", now=at).intercept  # evicted: soonest to expire
    assert not decide(policy, "h4.example", now=at).intercept


def test_pinning_entries_and_pending_counts_are_capped() -> None:
    store = MemoryStore()
    policy = InterceptPolicy(store=store, max_learned=2, pinning_threshold=2)
    for index in range(6):
        _reject(policy, NOW + timedelta(seconds=index), host=f"p{index}.example")
    assert len(list(store.items(_NS_STRIKES))) == 2
    for index in range(4):
        at = NOW + timedelta(seconds=10 + index)
        _reject(policy, at, host=f"q{index}.example")
        assert _reject(policy, at, host=f"q{index}.example")
    assert len(list(store.items(_NS_PINNING))) == 2
    at = NOW + timedelta(seconds=20)
    assert [entry.host for entry in policy.learned(now=at)] == ["q2.example", "q3.example"]


def test_learned_lists_entries_for_support() -> None:
    policy = InterceptPolicy(pinning_threshold=1)
    policy.note_client_certificate_requested(
        host="bank.example", port=443, upstream_verified=True, now=NOW
    )
    _reject(policy, NOW + timedelta(hours=1))
    assert policy.learned(now=NOW + timedelta(hours=2)) == [
        LearnedBypass(
            kind="client_cert",
            key="bank.example:443",
            host="bank.example",
            port=443,
            client=None,
            learned_at=NOW,
            expires=NOW + timedelta(days=7),
        ),
        LearnedBypass(
            kind="pinning",
            key="192.168.1.5 app.example:443",
            host="app.example",
            port=443,
            client="192.168.1.5",
            learned_at=NOW + timedelta(hours=1),
            expires=NOW + timedelta(days=1, hours=1),
        ),
    ]


def test_forget_learned() -> None:
    policy = InterceptPolicy()
    for host in ("bank.example", "other.example"):
        policy.note_client_certificate_requested(
            host=host, port=443, upstream_verified=True, now=NOW
        )
    for _ in range(3):
        _reject(policy, NOW, host="bank.example")
    _reject(policy, NOW, host="app.example")  # a pending count
    assert policy.forget_learned("BANK.example.") == 2
    assert decide(policy, "bank.example").intercept
    assert not decide(policy, "other.example").intercept
    assert policy.forget_learned("nothing.example") == 0
    assert policy.forget_learned() == 1
    assert policy.learned(now=NOW) == []
    # pending counts went too: two more rejections do not reach the threshold of three
    assert not _reject(policy, NOW, host="app.example")
    assert not _reject(policy, NOW, host="app.example")
    with pytest.raises(InvalidHostName):
        policy.forget_learned("a..b")


def test_learned_entries_live_in_the_shared_store() -> None:
    store = MemoryStore()
    first = InterceptPolicy(store=store)
    second = InterceptPolicy(store=store)
    first.note_client_certificate_requested(
        host="bank.example", port=443, upstream_verified=True, now=NOW
    )
    assert decide(second, "bank.example").reason == "learned_client_cert"
    item = store.get(_NS_CLIENT_CERT, "bank.example:443")
    assert item is not None
    assert item.expires == (NOW + timedelta(days=7)).timestamp()
    assert json.loads(item.value) == {
        "host": "bank.example",
        "port": 443,
        "learned": NOW.timestamp(),
    }


def test_corrupt_store_entries_do_not_break_decisions() -> None:
    store = MemoryStore()
    expires = (NOW + timedelta(days=1)).timestamp()
    store.put(_NS_CLIENT_CERT, "bank.example:443", b"\xff not json", expires=expires)
    store.put(_NS_CLIENT_CERT, "garbage-key", b"{}", expires=expires)
    store.put(_NS_PINNING, "no-space-key", b"[]", expires=expires)
    store.put(_NS_STRIKES, "192.168.1.5 app.example:443", b'{"count": "x"}', expires=expires)
    policy = InterceptPolicy(store=store)
    assert decide(policy, "bank.example").reason == "learned_client_cert"
    (entry,) = policy.learned(now=NOW)
    assert entry.host == "bank.example"
    assert entry.learned_at is None
    assert not _reject(policy, NOW)  # an unreadable count starts again at one
    assert not _reject(policy, NOW)
    assert _reject(policy, NOW)


# ---------------------------------------------------------------------------------------------
# Purity


_ALLOWED_IMPORTS = {
    "__future__",
    "collections",
    "dataclasses",
    "datetime",
    "enum",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "math",
    "pathlib",
    "re",
    "threading",
    "tomllib",
    "typing",
}


@pytest.mark.parametrize("module", ["_policy.py", "_decisionlog.py"])
def test_policy_modules_are_pure(module: str) -> None:
    path = Path(__file__).resolve().parent.parent / "tlsmitm" / module
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] in _ALLOWED_IMPORTS, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert (node.module or "").split(".")[0] in _ALLOWED_IMPORTS, node.module
            else:
                assert node.module in {"_decisionlog", "_errors", "_names", "_store"}, node.module
        elif isinstance(node, ast.Attribute):
            # no clock reads: time is always a parameter (and the time module is not imported)
            assert node.attr not in {"now", "utcnow", "today"}, node.attr
