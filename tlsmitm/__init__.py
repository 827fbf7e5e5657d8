"""tlsmitm: TLS interception that never leaves its users less safe."""

from __future__ import annotations

from ._errors import (
    CertError,
    ClientError,
    ConfigurationError,
    TlsMitmError,
    UpstreamCertificateError,
    UpstreamError,
)
from ._names import InvalidHostName, normalize_host
from ._store import MemoryStore, StateStore, StoredItem

__version__ = "0.1.0"

__all__ = [
    "CertError",
    "ClientError",
    "ConfigurationError",
    "InvalidHostName",
    "MemoryStore",
    "StateStore",
    "StoredItem",
    "TlsMitmError",
    "UpstreamCertificateError",
    "UpstreamError",
    "__version__",
    "normalize_host",
]
