"""A body held until the scanners' verdict: in memory up to a bound, then in a private file.

The file is created 0600 (``mkstemp``) and unlinked at once, so it has no name another process
could open and it disappears with the last descriptor, even if the proxy is killed. Writes and
reads run in a worker thread (``trio.wrap_file``), off the event loop.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from trio._file_io import AsyncIOWrapper

__all__ = ["SpooledBody"]

_READ = 1024 * 1024
_BLOCK = 1024 * 1024


class SpooledBody:
    """Bytes appended while a body arrives, read back once its verdict is known.

    Args:
        memory_limit: bytes kept in memory; past this, everything moves to a temporary file.
        directory: where the temporary file is made (default: the system's temp directory).
    """

    def __init__(self, memory_limit: int = 1 << 20, directory: Path | None = None) -> None:
        self.memory_limit = memory_limit
        self.directory = directory
        self.size = 0
        self._memory = bytearray()
        self._file: AsyncIOWrapper[io.BufferedRandom] | None = None
        self._closed = False

    @property
    def on_disk(self) -> bool:
        """Whether the body moved to a temporary file."""
        return self._file is not None

    def fileno(self) -> int | None:
        """The temporary file's descriptor (for tests and diagnostics), or ``None``."""
        if self._file is None:
            return None
        fd: int = self._file.wrapped.fileno()
        return fd

    async def write(self, data: bytes) -> None:
        """Append ``data``."""
        if self._closed:
            raise trio.ClosedResourceError("spool closed")
        if not data:
            return
        self.size += len(data)
        if self._file is None and len(self._memory) + len(data) <= self.memory_limit:
            self._memory += data
            return
        # On disk: written in blocks of about _BLOCK bytes, one worker-thread trip each.
        self._memory += data
        if len(self._memory) >= _BLOCK or self._file is None:
            await self._flush()

    async def _flush(self) -> None:
        if self._file is None:
            self._file = await trio.to_thread.run_sync(self._open_file)
        held, self._memory = bytes(self._memory), bytearray()
        if held:
            await self._file.write(held)

    def _open_file(self) -> AsyncIOWrapper[io.BufferedRandom]:
        fd, name = tempfile.mkstemp(prefix="tlsmitm-spool-", dir=self.directory)  # mode 0600
        try:
            os.unlink(name)  # no name left: nobody else can open it, nothing to clean up
            raw = io.open(fd, "w+b")  # noqa: SIM115, UP020 - closed by aclose()
        except BaseException:
            os.close(fd)
            raise
        return trio.wrap_file(raw)

    async def chunks(self, size: int = _READ) -> AsyncIterator[bytes]:
        """The body from its start, in pieces of at most ``size`` bytes."""
        if self._file is None:
            view = bytes(self._memory)
            for start in range(0, len(view), size):
                yield view[start : start + size]
            return
        if self._memory:
            await self._flush()
        await self._file.seek(0)
        while True:
            data = await self._file.read(size)
            if not data:
                return
            yield bytes(data)

    async def aclose(self) -> None:
        """Drop the body (the file's space is freed with its descriptor)."""
        self._closed = True
        self._memory = bytearray()
        if self._file is not None:
            file, self._file = self._file, None
            with trio.CancelScope(shield=True):
                await file.aclose()
