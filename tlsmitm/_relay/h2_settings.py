"""h2's SETTINGS bookkeeping in a few hundred bytes instead of 20 KiB per connection.

h2's :class:`h2.settings.Settings` keeps each setting's values (the current one, then any not
yet acknowledged) in a ``collections.deque``: 760 bytes each, whatever it holds. An intercepted
HTTP/2 connection has two h2 connections (client side and origin side), each with local and
remote settings of five to seven entries: about 20 KiB of deques per idle connection, more than
its HPACK tables. :class:`CompactSettings` keeps the same values, in the same order, with the
same semantics, in small lists.
"""

from __future__ import annotations

import h2.settings

__all__ = ["CompactSettings"]


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
