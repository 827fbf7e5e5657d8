"""The HTTP/2 relay's compact SETTINGS and HPACK bookkeeping behaves exactly like h2's own."""

from __future__ import annotations

import collections

import h2.connection
import h2.events
import h2.settings
import hpack.exceptions
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsmitm._relay.h2 import _QUIET, _open_connection
from tlsmitm._relay.h2_rules import H2Limits
from tlsmitm._relay.h2_settings import (
    CompactSettings,
    compact_frame_dispatch,
    compact_header_tables,
)

CODES = h2.settings.SettingCodes
# (a setting h2 knows, with values valid for it; and one it does not know)
VALUES = {
    CODES.HEADER_TABLE_SIZE: st.integers(0, 2**16),
    CODES.ENABLE_PUSH: st.integers(0, 1),
    CODES.INITIAL_WINDOW_SIZE: st.integers(0, 2**31 - 1),
    CODES.MAX_FRAME_SIZE: st.integers(2**14, 2**24 - 1),
    CODES.MAX_CONCURRENT_STREAMS: st.integers(0, 1000),
    CODES.MAX_HEADER_LIST_SIZE: st.integers(0, 2**20),
    0x99: st.integers(0, 2**32 - 1),
}
OPERATION = st.one_of(
    st.just(("acknowledge",)),
    st.sampled_from(sorted(VALUES)).flatmap(
        lambda code: VALUES[code].map(lambda value: ("set", code, value))
    ),
    st.just(("set", CODES.ENABLE_PUSH, 2)),  # invalid: refused by both alike
)


def _value(settings: h2.settings.Settings, code: int) -> object:
    try:
        return settings[code]
    except KeyError:  # (h2: a setting sent but not acknowledged yet is not there yet)
        return KeyError


def _view(settings: h2.settings.Settings) -> tuple[object, ...]:
    return (
        {code: _value(settings, code) for code in settings},
        len(settings),
        sorted(settings),
        settings.header_table_size,
        settings.initial_window_size,
        settings.max_frame_size,
        settings.max_concurrent_streams,
        settings.max_header_list_size,
        settings.enable_push,
    )


@given(client=st.booleans(), operations=st.lists(OPERATION, max_size=25))
def test_compact_settings_answer_as_h2s_settings(
    client: bool, operations: list[tuple[object, ...]]
) -> None:
    initial = {CODES.MAX_CONCURRENT_STREAMS: 100, CODES.INITIAL_WINDOW_SIZE: 1 << 20}
    theirs = h2.settings.Settings(client=client, initial_values=dict(initial))
    ours = CompactSettings(client=client, initial_values=dict(initial))
    assert _view(ours) == _view(theirs)
    for operation in operations:
        if operation[0] == "acknowledge":
            changed = [
                {k: (v.setting, v.original_value, v.new_value) for k, v in side.items()}
                for side in (ours.acknowledge(), theirs.acknowledge())
            ]
            assert changed[0] == changed[1]
        else:
            _, code, value = operation
            outcomes = []
            for settings in (theirs, ours):
                try:
                    settings[code] = value  # type: ignore[index]
                except h2.exceptions.InvalidSettingsValueError as exc:
                    outcomes.append(exc.error_code)
                else:
                    outcomes.append(None)
            assert outcomes[0] == outcomes[1]
        assert _view(ours) == _view(theirs)


def test_the_relays_h2_connections_hold_no_settings_deque() -> None:
    """Memory: h2 keeps each setting in a 760-byte deque (about 20 KiB per intercepted h2
    connection); the relay's connections keep them in small lists, also after the SETTINGS
    exchange has added the peer's."""
    client = _open_connection(H2Limits(), client_side=True)
    server = _open_connection(H2Limits(), client_side=False)
    server.receive_data(client.data_to_send())
    events = client.receive_data(server.data_to_send())
    events += server.receive_data(client.data_to_send())
    events += client.receive_data(server.data_to_send())
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in events)
    for conn in (client, server):
        for settings in (conn.local_settings, conn.remote_settings):
            assert isinstance(settings, CompactSettings)
            stored = settings._settings.values()
            assert not any(isinstance(values, collections.deque) for values in stored)
        for table in (conn.encoder.header_table, conn.decoder.header_table):
            assert not isinstance(table.dynamic_entries, collections.deque)
    assert client.remote_settings.max_concurrent_streams == H2Limits().max_concurrent_streams
    assert server.remote_settings.enable_push == 0


HEADER = st.tuples(
    st.sampled_from([b"x-a", b"x-b", b"cookie", b"user-agent", b"x-long-" + b"n" * 40]),
    st.binary(max_size=300),
)
STEP = st.one_of(
    st.lists(HEADER, min_size=1, max_size=8),
    st.integers(0, 4096),  # a new table size (eviction, and 0 empties it)
)


@given(steps=st.lists(STEP, max_size=30))
def test_compact_hpack_tables_encode_and_decode_as_hpacks(steps: list[object]) -> None:
    stock = h2.connection.H2Connection()
    compact = h2.connection.H2Connection()
    compact_header_tables(compact)
    for step in steps:
        if isinstance(step, int):
            for conn in (stock, compact):
                conn.encoder.header_table_size = step  # (the next block tells the decoder)
            continue
        assert isinstance(step, list)
        blocks = [conn.encoder.encode(step) for conn in (stock, compact)]
        assert blocks[0] == blocks[1]
        outcomes: list[object] = []
        for conn in (stock, compact):
            try:
                outcomes.append(conn.decoder.decode(blocks[0], raw=True))
            except hpack.exceptions.HPACKError as exc:  # (hpack's own, alike for both)
                outcomes.append(type(exc))
        assert outcomes[0] == outcomes[1]
        assert list(compact.encoder.header_table.dynamic_entries) == list(
            stock.encoder.header_table.dynamic_entries
        )
        assert list(compact.decoder.header_table.dynamic_entries) == list(
            stock.decoder.header_table.dynamic_entries
        )


def test_the_relays_frame_dispatch_resolves_h2s_handlers() -> None:
    """Memory: the relay's h2 connections look a frame's handler up per frame instead of
    holding a table of bound methods (1.7 KiB each); every frame class (h2's and the relay's
    quiet subclasses) gets the handler h2's own table would give it."""
    ours = _open_connection(H2Limits(), client_side=True)
    again = _open_connection(H2Limits(), client_side=False)
    stock = h2.connection.H2Connection()
    table = ours._frame_dispatch_table
    assert not isinstance(table, dict)
    for frame_type, handler in stock._frame_dispatch_table.items():
        for cls in (frame_type, _QUIET.get(frame_type)):
            if cls is None:
                continue
            resolved = table[cls]
            assert resolved.__func__ is handler.__func__  # type: ignore[attr-defined]
            assert resolved.__self__ is ours  # type: ignore[attr-defined]
    with pytest.raises(KeyError):
        table[int]
    assert again._frame_dispatch_table._names is table._names  # type: ignore[attr-defined]


def test_a_foreign_handler_keeps_the_table() -> None:
    conn = h2.connection.H2Connection()
    conn._frame_dispatch_table[int] = print  # type: ignore[index]
    compact_frame_dispatch(conn)
    assert isinstance(conn._frame_dispatch_table, dict)


def test_an_h2_without_the_dispatch_table_still_opens_relay_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The quiet frames and the compact dispatch both reach into h2's private table: an h2
    without it gets connections that work as h2 made them."""
    original = h2.connection.H2Connection.__init__

    def without_table(self: h2.connection.H2Connection, *args: object, **kw: object) -> None:
        original(self, *args, **kw)  # type: ignore[arg-type]
        del self._frame_dispatch_table

    monkeypatch.setattr(h2.connection.H2Connection, "__init__", without_table)
    conn = _open_connection(H2Limits(), client_side=True)
    assert not hasattr(conn, "_frame_dispatch_table")
    assert conn.data_to_send().startswith(b"PRI * HTTP/2.0")
