"""Several machines ("nodes"): two ``serve`` processes sharing one real Redis, then behind HAProxy.

Each node has its own state directory holding a copy of the installation's CA (as each machine
would) and shares the users' journey through ``--state redis://``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
from conftest import require_tool
from origin import OriginStats, serve_tls, server_ssl_context
from pki import DAY, NOW, good_hierarchy, make_leaf
from redis_server import RedisServer, free_port
from serve_node import Node, curl, serve_node

pytestmark = pytest.mark.e2e

GOOD = "www.example.test"  # sends Strict-Transport-Security with includeSubDomains
BAD_UNDER_HSTS = "old.www.example.test"  # an expired certificate, under GOOD's STS policy
BAD = "www.other.test"  # an expired certificate, no HSTS: the user may override
EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
HAPROXY_CFG = EXAMPLES / "haproxy.cfg"  # docs/deployment.rst shows these files as they are
REDIS_CONF = EXAMPLES / "redis.conf"

OVERRIDE_HEADERS = (
    "-H", "Origin: https://error.invalid",
    "-H", "Sec-Fetch-Site: same-origin",
    "-H", "Sec-Fetch-Mode: navigate",
    "-H", "Sec-Fetch-Dest: document",
    "-H", "Sec-Fetch-User: ?1",
)  # fmt: skip


class Origins:
    def __init__(self, good: int, bad_under_hsts: int, bad: int, roots: Path) -> None:
        self.good, self.bad_under_hsts, self.bad, self.roots = good, bad_under_hsts, bad, roots


async def start_origins(nursery: trio.Nursery, tmp: Path) -> Origins:
    hierarchy = good_hierarchy(GOOD)
    ports = []
    for leaf in (
        hierarchy.leaf,
        make_leaf(hierarchy.intermediate, BAD_UNDER_HSTS, not_before=NOW - 30 * DAY,
                  not_after=NOW - DAY),
        make_leaf(hierarchy.intermediate, BAD, not_before=NOW - 30 * DAY, not_after=NOW - DAY),
    ):  # fmt: skip
        context = server_ssl_context(leaf, tmp)

        async def handler(stream: trio.SocketStream, context: object = context) -> None:
            await serve_tls(stream, context, OriginStats())  # type: ignore[arg-type]

        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        ports.append(listeners[0].socket.getsockname()[1])
    roots = tmp / "origin-roots.pem"
    roots.write_bytes(hierarchy.root.pem)
    return Origins(ports[0], ports[1], ports[2], roots)


@asynccontextmanager
async def two_nodes(
    tmp: Path, origins: Origins, redis: RedisServer, *extra: str
) -> AsyncIterator[tuple[Node, Node]]:
    common = [
        "--workers", "1", "--error-mode", "page", "--state", redis.url,
        "--extra-roots", str(origins.roots),
        "--resolve", f"{GOOD}=127.0.0.1", "--resolve", f"{BAD_UNDER_HSTS}=127.0.0.1",
        "--resolve", f"{BAD}=127.0.0.1", *extra,
    ]  # fmt: skip
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            serve_node(tmp, "node-a", ["--state-dir", str(tmp / "a"), *common])
        )
        shutil.copytree(tmp / "a" / "ca", tmp / "b" / "ca")  # the installation's CA, on B too
        os.chmod(tmp / "b", 0o700)
        b = await stack.enter_async_context(
            serve_node(tmp, "node-b", ["--state-dir", str(tmp / "b"), *common])
        )
        yield a, b


@pytest.fixture
def redis(tmp_path: Path) -> RedisServer:
    server = RedisServer(tmp_path, REDIS_CONF)
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


def redirect_ref(result: subprocess.CompletedProcess[bytes]) -> str:
    match = re.search(
        rb"location: https://error\.invalid/error/([0-9a-f]{32})", result.stdout, re.I
    )
    assert match, result.stdout
    return match.group(1).decode()


def status_of(result: subprocess.CompletedProcess[bytes]) -> int:
    """The status of the response to the request (not of the CONNECT before it), with ``-i``."""
    statuses = re.findall(rb"^HTTP/1\.1 (\d{3}) (?!Connection established)", result.stdout, re.M)
    assert statuses, result
    return int(statuses[-1])


def form_fields(page: bytes) -> tuple[str, str]:
    ref = re.search(rb'name="ref" value="([^"]+)"', page)
    token = re.search(rb'name="token" value="([^"]+)"', page)
    assert ref, page[:2000]
    assert token, page[:2000]
    return ref.group(1).decode(), token.group(1).decode()


def decisions(node: Node, host: str) -> int:
    """How many decisions ``node`` has logged for ``host``."""
    return len(re.findall(rf"host={re.escape(host)} port=", node.log()))


async def decision_for(node: Node, host: str, count: int = 1) -> list[str]:
    """The reasons of the last decisions logged for ``host`` (waits for ``count`` of them)."""
    pattern = re.compile(rf"host={re.escape(host)} port=\d+ decision=\w+ reason=(\w+)")
    with trio.fail_after(30):
        while len(found := pattern.findall(node.log())) < count:
            await trio.sleep(0.05)
    return found


async def test_two_nodes_share_hsts_pages_and_grants_through_redis(
    nursery: trio.Nursery, tmp_path: Path, redis: RedisServer
) -> None:
    origins = await start_origins(nursery, tmp_path)
    async with two_nodes(tmp_path, origins, redis) as (a, b):
        cacert = a.cacert
        # Before: an expired certificate under www.example.test may be overridden (page).
        bad_hsts = f"https://{BAD_UNDER_HSTS}:{origins.bad_under_hsts}/"
        result = await curl(b, bad_hsts, cacert, "-i")
        redirect_ref(result)
        assert (await decision_for(b, BAD_UNDER_HSTS))[-1] == "override_page"

        # STS learned through node A ...
        result = await curl(a, f"https://{GOOD}:{origins.good}/hsts", cacert)
        assert result.stdout == b"hsts", result.stderr
        # ... is enforced on node B: no way past the error any more (RFC 6797 §12.1).
        with trio.fail_after(30):
            while True:
                result = await curl(b, bad_hsts, cacert, "-i")
                redirect_ref(result)
                reasons = await decision_for(b, BAD_UNDER_HSTS, 1)
                if reasons[-1] == "block_page":
                    break
                await trio.sleep(0.2)

        # A warning shown by node A ...
        bad = f"https://{BAD}:{origins.bad}/"
        ref = redirect_ref(await curl(a, bad, cacert, "-i"))
        # ... is served by node B (the page lives in Redis) ...
        page = await curl(b, f"https://error.invalid/error/{ref}", cacert)
        assert page.returncode == 0, page.stderr
        ref, token = form_fields(page.stdout)
        await trio.sleep(1.1)  # the page's click delay (the token is refused before 1 s)
        form = f"ref={ref}&token={token}"
        # ... refused for another client ...
        override = "https://error.invalid/override"
        other = await curl(b, override, cacert, "-i", "--interface", "127.0.0.2",
                           *OVERRIDE_HEADERS, "--data", form)  # fmt: skip
        assert status_of(other) == 403
        # ... and accepted for the client it was shown to.
        mine = await curl(b, override, cacert, "-i", *OVERRIDE_HEADERS, "--data", form)
        assert status_of(mine) == 303
        # The grant, made on B, counts on A for that client only.
        through = await curl(a, bad, cacert)
        # The origin's own content under a certificate tlsmitm signed: only an override does that
        # for an expired upstream certificate.
        assert through.stdout == b"hello from origin", through.stderr
        not_mine = await curl(a, bad, cacert, "-i", "--interface", "127.0.0.2")
        redirect_ref(not_mine)


async def test_haproxy_balances_two_nodes_sharing_redis(
    nursery: trio.Nursery, tmp_path: Path, redis: RedisServer
) -> None:
    haproxy = require_tool("haproxy")
    origins = await start_origins(nursery, tmp_path)
    async with two_nodes(
        tmp_path, origins, redis, "--proxy-protocol", "--trusted-balancers", "127.0.0.1/32"
    ) as (a, b):
        listen = free_port()
        env = {
            **os.environ,
            "TLSMITM_LISTEN": f"127.0.0.1:{listen}",
            "TLSMITM_NODE_A": f"127.0.0.1:{a.port}",
            "TLSMITM_NODE_B": f"127.0.0.1:{b.port}",
        }
        check = await trio.run_process(
            [haproxy, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_stdout=True,
            capture_stderr=True, check=False,
        )  # fmt: skip
        assert check.returncode == 0, check.stderr
        balancer = await trio.lowlevel.open_process(
            [haproxy, "-db", "-f", str(HAPROXY_CFG)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proxy = f"http://127.0.0.1:{listen}"
            with trio.fail_after(30):
                while (await curl(proxy, f"https://{GOOD}:{origins.good}/", a.cacert)).returncode:
                    await trio.sleep(0.1)  # until HAProxy listens
            # Interception and verdicts, whichever node a connection reaches (round robin: two
            # of each in a row reach both nodes).
            for url, check in (
                (f"https://{GOOD}:{origins.good}/", b"hello from origin"),
                (f"https://{GOOD}:{origins.good}/", b"hello from origin"),
                (f"https://{BAD}:{origins.bad}/", None),
                (f"https://{BAD}:{origins.bad}/", None),
            ):
                result = await curl(proxy, url, a.cacert, "-i", "--interface", "127.0.0.3")
                if check is None:
                    redirect_ref(result)  # the certificate error's page, never the content
                else:
                    assert result.stdout.endswith(check), result.stderr
            # Both nodes served, and their logs show the client's own address (127.0.0.3), not
            # HAProxy's.
            for node in (a, b):
                assert "client=127.0.0.3:" in node.log(), node.log()
                assert "reason=override_page" in node.log()
            # HSTS learned through one node is enforced by both.
            hsts = await curl(proxy, f"https://{GOOD}:{origins.good}/hsts", a.cacert)
            assert hsts.stdout == b"hsts"
            bad_hsts = f"https://{BAD_UNDER_HSTS}:{origins.bad_under_hsts}/"
            with trio.fail_after(30):
                while True:
                    for _ in range(2):  # round robin: one connection to each node
                        redirect_ref(await curl(proxy, bad_hsts, a.cacert, "-i"))
                    reasons = [(await decision_for(n, BAD_UNDER_HSTS))[-1] for n in (a, b)]
                    if reasons == ["block_page", "block_page"]:
                        break
                    await trio.sleep(0.2)
        finally:
            balancer.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await balancer.wait()
            if balancer.returncode is None:
                balancer.kill()
                await balancer.wait()


# -- when Redis goes away ----------------------------------------------------------------------

PRELOADED = "expired.example.dev"  # .dev is on Chromium's preload list with includeSubDomains


@asynccontextmanager
async def node_with_history(
    nursery: trio.Nursery, tmp: Path, redis: RedisServer
) -> AsyncIterator[tuple[Node, Origins]]:
    """One node on Redis that has learned STS for GOOD and holds an override grant for BAD
    (for client 127.0.0.1)."""
    origins = await start_origins(nursery, tmp)
    args = [
        "--workers", "1", "--error-mode", "page", "--state", redis.url,
        "--state-dir", str(tmp / "node"), "--extra-roots", str(origins.roots),
        "--resolve", f"{GOOD}=127.0.0.1", "--resolve", f"{BAD_UNDER_HSTS}=127.0.0.1",
        "--resolve", f"{BAD}=127.0.0.1", "--resolve", f"{PRELOADED}=127.0.0.1",
    ]  # fmt: skip
    async with serve_node(tmp, "node", args) as node:
        cacert = node.cacert
        assert (await curl(node, f"https://{GOOD}:{origins.good}/hsts", cacert)).stdout == b"hsts"
        bad_hsts = f"https://{BAD_UNDER_HSTS}:{origins.bad_under_hsts}/"
        with trio.fail_after(30):
            while True:
                redirect_ref(await curl(node, bad_hsts, cacert, "-i"))
                if (await decision_for(node, BAD_UNDER_HSTS))[-1] == "block_page":
                    break
                await trio.sleep(0.2)
        bad = f"https://{BAD}:{origins.bad}/"
        ref = redirect_ref(await curl(node, bad, cacert, "-i"))
        page = await curl(node, f"https://error.invalid/error/{ref}", cacert)
        ref, token = form_fields(page.stdout)
        await trio.sleep(1.1)  # the page's click delay
        granted = await curl(node, "https://error.invalid/override", cacert, "-i",
                             *OVERRIDE_HEADERS, "--data", f"ref={ref}&token={token}")  # fmt: skip
        assert status_of(granted) == 303
        assert (await curl(node, bad, cacert)).stdout == b"hello from origin"
        yield node, origins


async def test_when_redis_goes_away_responses_go_on_hsts_holds_and_no_override_is_granted(
    nursery: trio.Nursery, tmp_path: Path, redis: RedisServer
) -> None:
    async with node_with_history(nursery, tmp_path, redis) as (node, origins):
        await trio.to_thread.run_sync(redis.stop)
        cacert = node.cacert
        # Responses are delivered, also one carrying STS (its entry is kept in memory).
        for path, body in (("/", b"hello from origin"), ("/hsts", b"hsts")):
            result = await curl(node, f"https://{GOOD}:{origins.good}{path}", cacert)
            assert result.stdout == body, result.stderr
        # HSTS is enforced from the local cache ...
        bad_hsts = f"https://{BAD_UNDER_HSTS}:{origins.bad_under_hsts}/"
        seen = decisions(node, BAD_UNDER_HSTS)
        redirect_ref(await curl(node, bad_hsts, cacert, "-i"))
        assert (await decision_for(node, BAD_UNDER_HSTS, seen + 1))[-1] == "block_page"
        # ... and from the preload list.
        redirect_ref(await curl(node, f"https://{PRELOADED}:{origins.bad}/", cacert, "-i"))
        assert (await decision_for(node, PRELOADED))[-1] == "block_page"
        # The override granted before cannot be checked now: it is not granted.
        seen = decisions(node, BAD)
        redirect_ref(await curl(node, f"https://{BAD}:{origins.bad}/", cacert, "-i"))
        assert (await decision_for(node, BAD, seen + 1))[-1] == "override_page"
        assert "state store failed" in node.log()  # reported (at WARNING, rate-limited)


async def test_the_node_reconnects_when_redis_returns(
    nursery: trio.Nursery, tmp_path: Path, redis: RedisServer
) -> None:
    async with node_with_history(nursery, tmp_path, redis) as (node, origins):
        bad = f"https://{BAD}:{origins.bad}/"
        await trio.to_thread.run_sync(redis.stop)
        redirect_ref(await curl(node, bad, node.cacert, "-i"))  # no grant while Redis is away
        await trio.to_thread.run_sync(redis.start)  # same port and data (append-only file)
        with trio.fail_after(30):
            while (await curl(node, bad, node.cacert)).stdout != b"hello from origin":
                await trio.sleep(0.2)  # the grant, read from Redis again
