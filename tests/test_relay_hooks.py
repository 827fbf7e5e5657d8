"""The protocol-neutral hooks (issue 14 part 5) over real sockets: FlowInfo says which protocol
each side speaks, and request and response bodies reach hooks streamed, chunk by chunk, with the
``body_limit`` buffering unchanged."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import pytest
import trio
from origin import EICAR
from pki import Hierarchy, good_hierarchy
from test_relay import HOST, https_via_proxy, settle, start_origin, start_proxy

from tlsmitm import Block, FlowInfo, Hooks, Request, Response
from tlsmitm._names import HostName
from tlsmitm._relay.hooks import overrides

pytestmark = pytest.mark.e2e


@pytest.fixture
def hierarchy() -> Hierarchy:
    return good_hierarchy(HOST)


class BodyWatcher(Hooks):
    """Hashes every body as it streams past, and blocks a download whose bytes hold EICAR."""

    def __init__(self, body_limit: int = 0) -> None:
        self.body_limit = body_limit
        self.flows: list[FlowInfo] = []
        self.requests: dict[bytes, tuple[int, str]] = {}  # target -> (chunks, sha256)
        self.responses: dict[bytes, tuple[int, str]] = {}
        self.buffered: dict[bytes, bytes | None] = {}
        self._running: dict[tuple[str, bytes], tuple[int, hashlib._Hash]] = {}
        self._tail = b""

    async def on_request(self, flow: FlowInfo, request: Request) -> Request | Block | None:
        self.flows.append(flow)
        return None

    async def on_response(
        self, flow: FlowInfo, request: Request, response: Response
    ) -> Response | Block | None:
        self.buffered[request.target] = response.body
        return None

    def _feed(
        self, side: str, target: bytes, chunk: bytes, end: bool
    ) -> dict[bytes, tuple[int, str]]:
        count, digest = self._running.get((side, target), (0, hashlib.sha256()))
        digest.update(chunk)
        self._running[(side, target)] = (count + 1, digest)
        out = self.requests if side == "request" else self.responses
        if end:
            out[target] = (count + 1, digest.hexdigest())
            del self._running[(side, target)]
        return out

    async def on_request_body(
        self, flow: FlowInfo, request: Request, chunk: bytes, *, end: bool
    ) -> Block | None:
        self._feed("request", request.target, chunk, end)
        return None

    async def on_response_body(
        self, flow: FlowInfo, request: Request, response: Response, chunk: bytes, *, end: bool
    ) -> Block | None:
        self._feed("response", request.target, chunk, end)
        window = self._tail + chunk
        self._tail = window[-len(EICAR) :]
        return Block(title="virus", explanation="EICAR") if EICAR in window else None


def test_body_hooks_are_only_called_when_overridden() -> None:
    assert not overrides(Hooks(), "on_response_body")
    assert overrides(BodyWatcher(), "on_response_body")
    assert overrides(BodyWatcher(), "on_request_body")


@pytest.mark.parametrize("body_limit", [0, 100_000])
async def test_bodies_stream_through_the_hooks_both_ways(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy, body_limit: int
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    hooks = BodyWatcher(body_limit=body_limit)
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=hooks)
    upload = os.urandom(1_500_000)
    results = await trio.to_thread.run_sync(
        functools.partial(
            https_via_proxy,
            setup,
            origin.port,
            [
                ("POST", "/echo", upload),
                ("GET", "/size/50000", None),
                ("GET", "/chunked/600000", None),
            ],
        )
    )
    assert [status for status, _, _ in results] == [200, 200, 200]
    assert results[0][2] == upload
    sha = hashlib.sha256
    # Every byte passed the hooks, in order, and the last call said so.
    count, digest = hooks.requests[b"/echo"]
    assert digest == sha(upload).hexdigest()
    assert count > 1  # streamed in chunks, not buffered whole
    assert hooks.responses[b"/echo"][1] == sha(upload).hexdigest()
    assert hooks.responses[b"/size/50000"][1] == sha(b"x" * 50000).hexdigest()
    assert hooks.responses[b"/chunked/600000"][1] == sha(b"y" * 600000).hexdigest()
    assert b"/size/50000" not in hooks.requests  # no body, no body hook
    # body_limit buffering works as before, beside the stream.
    expected_small = b"x" * 50000 if body_limit else None
    assert hooks.buffered[b"/size/50000"] == expected_small
    assert hooks.buffered[b"/chunked/600000"] is None
    flow = hooks.flows[0]
    assert type(flow.host) is HostName  # normalised once, at the edge, and passed along
    assert (flow.client_protocol, flow.upstream_protocol, flow.verified) == (
        "http/1.1",
        "http/1.1",
        True,
    )


async def test_a_block_in_a_streamed_body_stops_the_download(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    hooks = BodyWatcher()
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=hooks)

    def fetch() -> BaseException | bytes:
        try:
            return https_via_proxy(setup, origin.port, [("GET", "/eicar", None)])[0][2]
        except Exception as exc:  # the client sees a failed, truncated response
            return exc

    outcome = await trio.to_thread.run_sync(fetch)
    assert not (isinstance(outcome, bytes) and EICAR in outcome)
    await settle(setup)
    (record,) = [r for r in setup.records if r.port == origin.port]
    assert (record.decision, record.reason, record.relay) == (
        "intercept",
        "blocked_in_body",
        "http/1.1",
    )
