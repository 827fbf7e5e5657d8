"""Session fixtures for the real scanning engines (``benchmarks/_scan_engines.py`` starts them).

There is no network for ``freshclam``: the signature directory holds EICAR only -- a body
signature (``.ndb``, target 0 = any file, offset ``*`` = anywhere, so it also matches inside
archives and at the end of a large file) and the standard MD5 line (``.hdb``). Each engine is
started once per session, by the first test that asks for it, and stopped at the end.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import require_tool

from benchmarks._scan_engines import (
    EICAR,
    EICAR_BODY_SIGNATURE,
    Clamd,
    Icap,
    free_port,
    run_c_icap,
    run_clamd,
)
from benchmarks._system import Unavailable

__all__ = ["EICAR", "EICAR_BODY_SIGNATURE", "Clamd", "Icap", "clamd", "free_port", "icap"]


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """A private clamd with the EICAR-only signatures, for the whole session."""
    require_tool("clamd")
    try:
        with run_clamd(tmp_path_factory.mktemp("clamd")) as engine:
            yield engine
    except Unavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def icap(tmp_path_factory: pytest.TempPathFactory, clamd: Clamd) -> Iterator[Icap]:
    """A private c-icap whose ``avscan`` service scans with :func:`clamd`."""
    require_tool("c-icap")
    try:
        with run_c_icap(tmp_path_factory.mktemp("c-icap"), clamd) as engine:
            yield engine
    except Unavailable as exc:
        pytest.fail(str(exc))
