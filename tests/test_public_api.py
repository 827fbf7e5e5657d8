"""The public surface is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

import inspect
import subprocess
import sys

import tlsmitm

EXPECTED = {
    "ClamdScanner",
    "Clean",
    "DecodeLimits",
    "FailureMode",
    "IcapScanner",
    "Infected",
    "Replaced",
    "ScanContext",
    "ScanFailed",
    "ScanSettings",
    "ScanVerdict",
    "Scanner",
    "MAX_STS_AGE",
    "Action",
    "ActionKind",
    "Block",
    "CertError",
    "CertForge",
    "CachedStore",
    "CertificateAuthority",
    "CheckResult",
    "ClientError",
    "ClientHello",
    "ClientHelloError",
    "ConfigurationError",
    "ConnectionRecord",
    "Decision",
    "DecisionLog",
    "DropMessage",
    "ErrorResponder",
    "Fetcher",
    "FlowInfo",
    "ForgedLeaf",
    "Hooks",
    "HstsStore",
    "HttpRequest",
    "HttpResponse",
    "InterceptPolicy",
    "Interceptor",
    "InterceptorConfig",
    "InterceptorStats",
    "InvalidHostName",
    "IssuerKind",
    "KeyFileStatus",
    "KnownHost",
    "LearnedBypass",
    "MemoryStore",
    "PreloadList",
    "Request",
    "Response",
    "RevocationMode",
    "Rule",
    "RuleSet",
    "RedisStore",
    "SqliteStore",
    "StateHealth",
    "StateStore",
    "StoredItem",
    "StsPolicy",
    "TLSStream",
    "TlsMitmError",
    "TrustConfig",
    "UpstreamCertificateError",
    "UpstreamError",
    "UpstreamVerifier",
    "Verdict",
    "WebSocketClose",
    "WebSocketMessage",
    "__version__",
    "certifi_bundle_age",
    "format_record",
    "looks_like_tls",
    "normalize_host",
    "original_destination",
    "parse_client_hello",
    "parse_sts",
    "passphrase_from_env",
    "trust_store_warning",
}


def test_public_surface_is_pinned() -> None:
    assert set(tlsmitm.__all__) == EXPECTED
    for name in tlsmitm.__all__:
        assert hasattr(tlsmitm, name), name


def test_every_public_class_and_function_is_documented() -> None:
    for name in tlsmitm.__all__:
        obj = getattr(tlsmitm, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"tlsmitm.{name} has no docstring"


def test_exceptions_share_one_root() -> None:
    for name in (
        "ClientError",
        "ConfigurationError",
        "UpstreamError",
        "UpstreamCertificateError",
        "InvalidHostName",
        "ClientHelloError",
    ):
        assert issubclass(getattr(tlsmitm, name), tlsmitm.TlsMitmError)


def test_pure_modules_import_without_trio() -> None:
    """STYLE rule 1: the pure core works with trio blocked (an embedder on asyncio)."""
    code = (
        "import sys; sys.modules['trio'] = None\n"
        "import tlsmitm._ca, tlsmitm._forge, tlsmitm._verify, tlsmitm._hsts, "
        "tlsmitm._responder, tlsmitm._policy, tlsmitm._clienthello, tlsmitm._names\n"
        "import tlsmitm._scan._icap, tlsmitm._scan._decode, tlsmitm._scan._model\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "ok", result.stderr
