"""Access control, pure part: credentials files, Basic credentials, the allow-list (issue 15)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsmitm._access import (
    AccessPolicy,
    Credentials,
    hash_password,
    open_proxy_refusal,
    parse_basic,
    parse_network,
)
from tlsmitm._errors import ConfigurationError

FAST = 10  # scrypt log2(N) for tests; the default (17) costs ~0.3 s per check


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_scrypt_lines_verify_and_never_hold_the_password() -> None:
    line = f"alice:{hash_password('s3cret pw', log_n=FAST)}"
    assert "s3cret" not in line
    assert line.startswith("alice:$scrypt$ln=10,r=8,p=1$")
    creds = Credentials.parse(line + "\n# a comment\n\n")
    assert creds.users == {"alice"}
    assert creds.verify("alice", "s3cret pw")
    assert not creds.verify("alice", "s3cret")
    assert not creds.verify("bob", "s3cret pw")
    # The salt is random: two hashes of one password differ.
    assert hash_password("x", log_n=FAST) != hash_password("x", log_n=FAST)


def test_the_default_cost_follows_owasp() -> None:
    assert hash_password("x").startswith("$scrypt$ln=17,r=8,p=1$")


def test_argon2_lines_verify() -> None:
    from argon2 import PasswordHasher

    creds = Credentials.parse(f"carol:{PasswordHasher(time_cost=1, memory_cost=8192).hash('pw')}")
    assert creds.verify("carol", "pw")
    assert not creds.verify("carol", "pW")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("alice:hunter2", "plain text"),  # a plain password is refused
        ("alice", "USER:HASH"),
        (":$scrypt$ln=10,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "USER:HASH"),
        ("alice:$scrypt$ln=10,r=8$x$y", "scrypt"),
        ("alice:$scrypt$ln=40,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "out of range"),
        ("alice:$scrypt$ln=10,r=8,p=1$!!$AAAA", "base64"),
        ("alice:$argon2id$garbage", "argon2"),
        ("# only a comment\n", "names no user"),
    ],
)
def test_bad_credentials_files_are_refused_with_the_line(text: str, needle: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Credentials.parse(text, source="users.txt")
    assert needle in str(caught.value)
    assert "users.txt" in str(caught.value)


def test_a_user_twice_is_refused() -> None:
    line = f"alice:{hash_password('a', log_n=FAST)}"
    with pytest.raises(ConfigurationError, match="twice"):
        Credentials.parse(f"{line}\n{line}")


def test_parse_basic() -> None:
    assert parse_basic(basic("alice", "pw:with:colons")) == ("alice", "pw:with:colons")
    assert parse_basic(b"basic " + base64.b64encode("jürgen:pässword".encode())) == (
        "jürgen",
        "pässword",
    )
    for bad in (
        b"",
        b"Bearer abc",
        b"Basic",
        b"Basic !!!",
        b"Basic " + base64.b64encode(b"nocolon"),
        b"Basic " + base64.b64encode(b":pw"),
        b"Basic " + base64.b64encode(b"\xff\xfe:x"),
        b"Basic " + b"A" * 5000,
    ):
        assert parse_basic(bad) is None, bad


@given(st.binary(max_size=200))
def test_parse_basic_never_raises(value: bytes) -> None:
    parse_basic(value)


def test_allow_list() -> None:
    policy = AccessPolicy.build(allow=["192.168.1.0/24", "2001:db8::/32", "10.0.0.7"])
    assert policy.client_allowed("192.168.1.200")
    assert policy.client_allowed("::ffff:192.168.1.5")  # IPv4-mapped reads as IPv4
    assert policy.client_allowed("2001:db8::1")
    assert policy.client_allowed("10.0.0.7")
    assert not policy.client_allowed("10.0.0.8")
    assert not policy.client_allowed("192.168.2.1")
    assert not policy.client_allowed("not an address")
    assert AccessPolicy().client_allowed("203.0.113.9")  # no list: every address
    with pytest.raises(ValueError, match="CIDR"):
        parse_network("192.168.1.0/33")


def test_an_open_proxy_on_a_public_address_is_refused() -> None:
    open_policy = AccessPolicy()
    for host in ("0.0.0.0", "::", "192.0.2.10", "[2001:db8::1]"):
        message = open_proxy_refusal(host, open_policy)
        assert message is not None
        assert "--allow" in message
        assert "--auth-file" in message
        assert "\n" not in message
    for host in ("127.0.0.1", "::1", "127.0.0.53", "localhost"):
        assert open_proxy_refusal(host, open_policy) is None
    creds = Credentials.parse(f"a:{hash_password('b', log_n=FAST)}")
    assert open_proxy_refusal("0.0.0.0", AccessPolicy(credentials=creds)) is None
    assert open_proxy_refusal("0.0.0.0", AccessPolicy.build(allow=["10.0.0.0/8"])) is None
