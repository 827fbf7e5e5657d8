"""h2's per-connection bookkeeping, smaller: about 26 KiB less per idle intercepted connection.

h2's :class:`h2.settings.Settings` keeps each setting's values (the current one, then any not
yet acknowledged) in a ``collections.deque``: 760 bytes each, whatever it holds. An intercepted
HTTP/2 connection has two h2 connections (client side and origin side), each with local and
remote settings of five to seven entries: about 20 KiB of deques per idle connection, more than
its HPACK tables. :class:`CompactSettings` keeps the same values, in the same order, with the
same semantics, in small lists. HPACK's dynamic tables (one per direction and h2 connection,
four per intercepted connection) are deques too: :func:`compact_header_tables` gives them a
list with the ``appendleft`` they use (the table holds a few dozen entries at most). And each
h2 connection builds a dispatch table of twelve bound methods (1.7 KiB):
:func:`compact_frame_dispatch` has the handler looked up per frame instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.connection
import h2.settings

__all__ = ["CompactSettings", "compact_frame_dispatch", "compact_header_tables"]


class _Values(list[int | None]):
    """A setting's values, current first: the part of ``deque`` that h2 uses, in a list."""

    __slots__ = ()

    def popleft(self) -> int | None:
        return self.pop(0)


class CompactSettings(h2.settings.Settings):
    """:class:`h2.settings.Settings` with each setting's values in a small list (see above)."""

    def __init__(
        self,
        client: bool = True,
        initial_values: dict[h2.settings.SettingCodes, int] | None = None,
    ) -> None:
        super().__init__(client=client, initial_values=initial_values)
        self._settings = {key: _Values(values) for key, values in self._settings.items()}  # type: ignore[misc]

    def __setitem__(self, key: h2.settings.SettingCodes | int, value: int) -> None:
        super().__setitem__(key, value)  # (validates; a new key gets a deque)
        values = self._settings[key]
        if not isinstance(values, _Values):
            self._settings[key] = _Values(values)  # type: ignore[assignment]


class _Entries(list[tuple[bytes, bytes]]):
    """An HPACK dynamic table's entries, newest first: what hpack uses of ``deque``, in a list."""

    __slots__ = ()

    def appendleft(self, entry: tuple[bytes, bytes]) -> None:
        self.insert(0, entry)


def compact_header_tables(conn: h2.connection.H2Connection) -> None:
    """Give ``conn``'s two HPACK tables (encoder and decoder) a list for their entries."""
    for table in (conn.encoder.header_table, conn.decoder.header_table):
        table.dynamic_entries = _Entries(table.dynamic_entries)  # type: ignore[assignment]


# Frame type -> handler name tables, shared by every connection whose table has the same content
# (one or two distinct ones in a process: h2's, and h2's with the relay's frame subclasses).
_SHARED_TABLES: dict[frozenset[tuple[type, str]], dict[type, str]] = {}


class _FrameDispatch:
    """h2's frame dispatch table for one connection, resolved per frame (same handlers; a frame
    type without one raises ``KeyError`` as the dict does)."""

    __slots__ = ("_conn", "_names")

    def __init__(self, conn: h2.connection.H2Connection, names: dict[type, str]) -> None:
        self._conn = conn
        self._names = names

    def __getitem__(self, frame_type: type) -> Callable[..., Any]:
        handler: Callable[..., Any] = getattr(self._conn, self._names[frame_type])
        return handler


def compact_frame_dispatch(conn: h2.connection.H2Connection) -> None:
    """Replace ``conn``'s table of bound methods with a per-frame lookup of the same methods.

    Call it after any change to the table. A table holding anything but ``conn``'s own methods
    is left as it is, and so is an h2 without this (private) table.
    """
    table = getattr(conn, "_frame_dispatch_table", None)
    if not isinstance(table, dict):
        return
    names: dict[type, str] = {}
    for frame_type, handler in table.items():
        if getattr(handler, "__self__", None) is not conn:
            return
        names[frame_type] = handler.__name__
    shared = _SHARED_TABLES.setdefault(frozenset(names.items()), names)
    conn._frame_dispatch_table = _FrameDispatch(conn, shared)  # type: ignore[assignment]
