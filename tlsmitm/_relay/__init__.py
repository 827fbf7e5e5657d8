"""The trio driver: listeners, intake, the flow of one intercepted connection, and the relays.

One module per concern (see ``docs/relay.rst``):

* :mod:`.interceptor` -- :class:`Interceptor` (the parts, listeners, lifecycle), its config
  and stats;
* :mod:`.intake` -- CONNECT, absolute-form ``http://``, transparent destinations;
  :mod:`tlsmitm._edge` parses what a client asks for;
* :mod:`.flow` -- one intercepted connection: peek, policy, upstream, plan, forge, handshake,
  relay; :mod:`.upstream` and :mod:`.downstream` are its two sides;
* :mod:`.hooks` -- what embedders see (:class:`FlowInfo`, :class:`Request`, :class:`Response`,
  :class:`Block`, :class:`Hooks`);
* :mod:`.h1` (HTTP/1.1 through h11), :mod:`.h2` (HTTP/2 through h2, either side, translated
  to and from HTTP/1.1 with :mod:`.exchange`), :mod:`.ws` (WebSocket messages through wsproto,
  after a ``101``), :mod:`.splice` (raw bytes), :mod:`.plain` (``http://`` proxying);
* :mod:`.pool` -- idle upstream connections; :mod:`.error_origin` -- ``https://error.invalid/``.
"""

from __future__ import annotations

from . import (
    h2,  # noqa: F401 -- registers the HTTP/2 relay in relays.RELAYS
    ws,  # noqa: F401 -- registers the WebSocket relay in relays.RELAYS
)
from .hooks import Block, FlowInfo, Hooks, Request, Response
from .interceptor import (
    CheckResult,
    Interceptor,
    InterceptorConfig,
    InterceptorStats,
    original_destination,
)

__all__ = [
    "Block",
    "CheckResult",
    "FlowInfo",
    "Hooks",
    "Interceptor",
    "InterceptorConfig",
    "InterceptorStats",
    "Request",
    "Response",
    "original_destination",
]
