"""The fuzz targets of ``./run fuzz`` (issue 15): bytes in; only the exception each allows out.

A target returns normally for every input, or raises the one exception type its contract names
(:class:`~tlsmitm._clienthello.ClientHelloError`, :class:`~tlsmitm._edge.BadRequest`, ...).
Anything else -- an ``IndexError``, a ``ValueError`` from deep inside, a broken invariant -- is a
crash: ``tests/fuzz.py`` saves the input under ``tests/data/fuzz/<target>/`` and
``tests/test_fuzz_regressions.py`` replays every saved input on each test run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable

from tlsmitm._clienthello import ClientHello, ClientHelloError, parse_client_hello
from tlsmitm._edge import (
    BadRequest,
    find_head_end,
    parse_absolute_url,
    parse_connect_target,
    via_names,
)
from tlsmitm._errors import ConfigurationError
from tlsmitm._hsts import StsPolicy, parse_sts
from tlsmitm._names import InvalidHostName
from tlsmitm._policy import InterceptPolicy, RuleSet
from tlsmitm._responder import ErrorResponder, HttpRequest, HttpResponse

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def clienthello(data: bytes) -> None:
    """The sans-IO ClientHello parser: a hello, NEED_MORE, or ClientHelloError."""
    try:
        result = parse_client_hello(data)
    except ClientHelloError:
        return
    if isinstance(result, ClientHello):
        assert result.raw_length <= len(data), "raw_length past the data"
        if result.server_name is not None:
            assert result.server_name.isascii()


def heads(data: bytes) -> None:
    """The edge parsers: a value or BadRequest, with a status a client can be answered with."""
    for parse in (find_head_end, parse_connect_target, parse_absolute_url):
        try:
            parse(data)
        except BadRequest as exc:
            status = exc.status
        else:
            status = 400
        assert status in (400, 414, 431), status
    try:
        end = find_head_end(data)
    except BadRequest:
        end = None
    if end is not None:
        assert data[end - 4 : end] == b"\r\n\r\n"
    via_names([data])


def sts(data: bytes) -> None:
    """The RFC 6797 header parser: a policy or None, as bytes and as text."""
    for value in (data, data.decode("latin-1")):
        policy = parse_sts(value)
        assert policy is None or isinstance(policy, StsPolicy)


_POLICY = InterceptPolicy(
    RuleSet.from_strings(["bank.example", "*.corp.example", "10.0.0.0/8", "client:192.0.2.0/24"])
)


def policy(data: bytes) -> None:
    """Rule parsing (ConfigurationError) and matching (InvalidHostName/ValueError for junk)."""
    text = data.decode("utf-8", "replace")
    with contextlib.suppress(ConfigurationError):
        RuleSet.from_strings([text])
    host, _, rest = text.partition("|")
    client, _, destination = rest.partition("|")
    with contextlib.suppress(InvalidHostName, ValueError):
        decision = _POLICY.decide_sync(
            client_ip=client or "192.0.2.1",
            host=host or None,
            port=443,
            destination_ip=destination or None,
            now=NOW,
        )
        assert isinstance(decision.intercept, bool)


_RESPONDER = ErrorResponder(profile="page", random=lambda n: b"\x07" * n)


def error_origin(data: bytes) -> None:
    """ErrorResponder.handle never raises, whatever request arrives at the error origin."""
    parts = data.split(b"\n")
    method = parts[0][:16] if parts else b"GET"
    target = parts[1] if len(parts) > 1 else b"/"
    headers = tuple(
        (name.strip().lower(), value.strip())
        for line in parts[2:-1]
        for name, _, value in [line.partition(b":")]
    )
    body = parts[-1] if len(parts) > 2 else b""
    response = _RESPONDER.handle(
        HttpRequest(method=method, target=target, headers=headers, body=body), now=NOW
    )
    assert isinstance(response, HttpResponse)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "clienthello": clienthello,
    "heads": heads,
    "sts": sts,
    "policy": policy,
    "error_origin": error_origin,
}
