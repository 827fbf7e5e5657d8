"""tlsmitm: TLS interception that never leaves its users less safe.

Everything a user needs is exported here; the modules behind it are private. The parts:

* :class:`CertificateAuthority` and :class:`CertForge` -- the per-installation CA and leaf minting;
* :class:`UpstreamVerifier` -- browser-grade checks of the real server's certificate;
* :class:`HstsStore` -- RFC 6797 with Chromium's preload list;
* :class:`ErrorResponder` -- errors shown by the browser itself or on ``https://error.invalid/``;
* :class:`InterceptPolicy` -- what not to intercept, and the :class:`DecisionLog`;
* :class:`Interceptor` -- the trio driver that wires them together, with :class:`Hooks` for the
  embedder's inspection.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._ca import CertificateAuthority, IssuerKind, KeyFileStatus, passphrase_from_env
from ._clienthello import ClientHello, ClientHelloError, looks_like_tls, parse_client_hello
from ._decisionlog import ConnectionRecord, DecisionLog, format_record
from ._errors import (
    CertError,
    ClientError,
    ConfigurationError,
    TlsMitmError,
    UpstreamCertificateError,
    UpstreamError,
)
from ._forge import CertForge, ForgedLeaf
from ._hsts import MAX_STS_AGE, HstsStore, KnownHost, PreloadList, StsPolicy, parse_sts
from ._names import InvalidHostName, normalize_host
from ._policy import Decision, InterceptPolicy, LearnedBypass, Rule, RuleSet
from ._responder import Action, ActionKind, ErrorResponder, HttpRequest, HttpResponse
from ._sqlite_store import SqliteStore
from ._store import MemoryStore, StateStore, StoredItem
from ._store_cache import CachedStore, StateHealth
from ._verify import (
    Fetcher,
    RevocationMode,
    TrustConfig,
    UpstreamVerifier,
    Verdict,
    certifi_bundle_age,
    trust_store_warning,
)
from ._websocket import DropMessage, WebSocketClose, WebSocketMessage

if TYPE_CHECKING:
    from ._redis_store import RedisStore
    from ._relay import (
        Block,
        CheckResult,
        FlowInfo,
        Hooks,
        Interceptor,
        InterceptorConfig,
        InterceptorStats,
        Request,
        Response,
        original_destination,
    )
    from ._scan import (
        ClamdScanner,
        Clean,
        DecodeLimits,
        FailureMode,
        IcapScanner,
        Infected,
        Replaced,
        ScanContext,
        ScanFailed,
        Scanner,
        ScanSettings,
        ScanVerdict,
    )
    from ._tls import TLSStream

# The driver (trio, sockets) is imported on first use, so that the pure core -- CA, forge,
# verifier, HSTS, responder, policy -- can be used by an embedder that does not run trio.
_LAZY = {
    "Block": "_relay",
    "FlowInfo": "_relay",
    "Hooks": "_relay",
    "Request": "_relay",
    "Response": "_relay",
    "CheckResult": "_relay",
    "Interceptor": "_relay",
    "InterceptorConfig": "_relay",
    "InterceptorStats": "_relay",
    "original_destination": "_relay",
    "TLSStream": "_tls",
    "RedisStore": "_redis_store",  # needs the redis package: pip install 'tlsmitm[redis]'
    "ClamdScanner": "_scan",
    "Clean": "_scan",
    "DecodeLimits": "_scan",
    "FailureMode": "_scan",
    "IcapScanner": "_scan",
    "Infected": "_scan",
    "Replaced": "_scan",
    "ScanContext": "_scan",
    "ScanFailed": "_scan",
    "ScanSettings": "_scan",
    "ScanVerdict": "_scan",
    "Scanner": "_scan",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tlsmitm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "MAX_STS_AGE",
    "Action",
    "ActionKind",
    "Block",
    "CachedStore",
    "CertError",
    "CertForge",
    "CertificateAuthority",
    "CheckResult",
    "ClamdScanner",
    "Clean",
    "ClientError",
    "ClientHello",
    "ClientHelloError",
    "ConfigurationError",
    "ConnectionRecord",
    "Decision",
    "DecisionLog",
    "DecodeLimits",
    "DropMessage",
    "ErrorResponder",
    "FailureMode",
    "Fetcher",
    "FlowInfo",
    "ForgedLeaf",
    "Hooks",
    "HstsStore",
    "HttpRequest",
    "HttpResponse",
    "IcapScanner",
    "Infected",
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
    "RedisStore",
    "Replaced",
    "Request",
    "Response",
    "RevocationMode",
    "Rule",
    "RuleSet",
    "ScanContext",
    "ScanFailed",
    "ScanSettings",
    "ScanVerdict",
    "Scanner",
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
]
