"""``./run soak [MINUTES]``: a hostile mix against one ``tlsmitm serve``; a good client measures.

The mix (issue 15): malformed heads, bad TLS, resets, slow heads, held tunnels, self-CONNECTs and
HTTP/2 abuse (random frames after the preface on an intercepted h2 connection), all at once and
bounded in concurrency, against one ``serve`` process with one worker. Meanwhile a well-behaved
client sends an HTTPS request through the proxy every 200 ms and times it.

Printed: the process's descriptors and RSS before, every 10 s during, and after (once the mix
stopped and the held tunnels closed); the good client's request count, p50 and p99; and any
crash. Exit status 1 when the process died, descriptors leaked (more after than before, plus a
small allowance), or the good client was refused or failed.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from origin import OriginStats, serve_tls, server_ssl_context  # noqa: E402
from pki import good_hierarchy  # noqa: E402
from strategies import H2_PREFACE, h2_frame, hello_message, records, sni_ext  # noqa: E402

HOST = "good.example.test"
HELD_TUNNELS = 200
LEAK_ALLOWANCE = 8  # descriptors: the pool's idle upstreams, a log file, the state store


@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    hostile: dict[str, int] = field(default_factory=dict)


def proc_status(pid: int) -> tuple[int, int]:
    """(open descriptors, RSS in KiB) of ``pid``."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return fds, rss


async def send_and_drain(port: int, payload: bytes, *, reset: bool = False) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        with trio.move_on_after(5):
            await stream.send_all(payload)
            if reset:
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                return
            while await stream.receive_some(65536):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def malformed_head(rng: random.Random) -> bytes:
    base = bytearray(b"GET http://h.test:8080/path HTTP/1.1\r\nHost: h.test\r\nX-A: b\r\n\r\n")
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(base))
        choice = rng.random()
        if choice < 0.4:
            base[i] = rng.randrange(256)
        elif choice < 0.7:
            del base[i]
        else:
            base[i:i] = rng.choice([b"\n", b"\r", b":99999", b"[", b"\x00", b" ", b"%"])
    return bytes(base)


async def hostile_worker(
    kind: str, port: int, own: str, sink: int, sample: Sample, stop: trio.Event
) -> None:
    rng = random.Random(hash(kind) & 0xFFFF)
    while not stop.is_set():
        try:
            if kind == "malformed":
                await send_and_drain(port, malformed_head(rng))
            elif kind == "bad_tls":
                hello = records(hello_message(extensions=[(0, sni_ext(HOST.encode()))]))
                cut = hello[: rng.randrange(1, len(hello))] + bytes(
                    rng.randrange(256) for _ in range(rng.randrange(64))
                )
                await send_and_drain(
                    port, f"CONNECT {HOST}:{sink} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + cut
                )
            elif kind == "reset":
                await send_and_drain(port, f"CONNECT {HOST}:443 HTTP/1.1\r\n".encode(), reset=True)
            elif kind == "slow":
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                with trio.move_on_after(15):
                    try:
                        for byte in (
                            b"GET http://h.test/ HTTP/1.1\r\nHost: h.test\r\n" + b"X: y\r\n" * 50
                        ):
                            await stream.send_all(bytes([byte]))
                            await trio.sleep(0.5)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                await trio.aclose_forcefully(stream)
            elif kind == "self_connect":
                await send_and_drain(
                    port, f"CONNECT {own} HTTP/1.1\r\nHost: {own}\r\n\r\n".encode() * 500
                )
            elif kind == "h2_abuse":
                await h2_abuse(port, rng)
            sample.hostile[kind] = sample.hostile.get(kind, 0) + 1
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError):
            sample.hostile[kind] = sample.hostile.get(kind, 0) + 1
        await trio.sleep(0.02)


CLIENT_CONTEXT: ssl.SSLContext | None = None


async def h2_abuse(port: int, rng: random.Random) -> None:
    assert CLIENT_CONTEXT is not None
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        with trio.move_on_after(10):
            await stream.send_all(f"CONNECT {HOST}:{H2_PORT} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            if not (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200"):
                return
            tls = trio.SSLStream(stream, H2_CONTEXT, server_hostname=HOST)
            await tls.do_handshake()
            frames = b"".join(
                h2_frame(
                    rng.randrange(12),
                    rng.randrange(256),
                    rng.randrange(8),
                    rng.randbytes(rng.randrange(40)),
                )
                for _ in range(rng.randrange(1, 20))
            )
            await tls.send_all(H2_PREFACE + frames)
            while await tls.receive_some(65536):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


H2_PORT = 0
H2_CONTEXT: ssl.SSLContext


async def hold_tunnels(port: int, sink: int, stop: trio.Event, sample: Sample) -> None:
    held = []
    try:
        for _ in range(HELD_TUNNELS):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            held.append(stream)
            await stream.send_all(f"CONNECT 127.0.0.1:{sink} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            with trio.move_on_after(10):
                answer = await stream.receive_some(4096)
                if answer.startswith(b"HTTP/1.1 200"):
                    await stream.send_all(b"held: raw bytes, then quiet")
        sample.hostile["held_tunnels"] = len(held)
        await stop.wait()
    finally:
        for stream in held:
            await trio.aclose_forcefully(stream)


def good_request(port: int, root: Path, origin_port: int) -> float:
    context = ssl.create_default_context(cafile=str(root))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    conn.set_tunnel(HOST, origin_port)
    start = time.perf_counter()
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200 or body != b"hello from origin":
            raise RuntimeError(f"status {response.status}")
    finally:
        conn.close()
    return time.perf_counter() - start


async def good_client(
    port: int, root: Path, origin_port: int, stop: trio.Event, sample: Sample
) -> None:
    while not stop.is_set():
        try:
            sample.latencies.append(
                await trio.to_thread.run_sync(good_request, port, root, origin_port)
            )
        except Exception as exc:
            sample.failures.append(f"{type(exc).__name__}: {exc}")
        await trio.sleep(0.2)


async def soak(seconds: float) -> int:
    global H2_PORT, H2_CONTEXT, CLIENT_CONTEXT
    tmp = Path(tempfile.mkdtemp(prefix="tlsmitm-soak-"))
    hierarchy = good_hierarchy(HOST)
    roots = tmp / "origin-root.pem"
    roots.write_bytes(hierarchy.root.pem)
    stats = OriginStats()
    sample = Sample()
    code = 0
    async with trio.open_nursery() as nursery:
        context = server_ssl_context(hierarchy.leaf, tmp)
        h2_context = server_ssl_context(hierarchy.leaf, tmp, alpn=("h2",))

        async def origin(stream: trio.SocketStream) -> None:
            await serve_tls(stream, context, stats)

        async def h2_origin(stream: trio.SocketStream) -> None:
            tls = trio.SSLStream(stream, h2_context, server_side=True)
            try:
                with trio.move_on_after(20):
                    await tls.do_handshake()
                    while await tls.receive_some(65536):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
                pass
            finally:
                await trio.aclose_forcefully(tls)

        async def sink(stream: trio.SocketStream) -> None:  # reads, never answers, closes at EOF
            try:
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        origin_port = (await nursery.start(trio.serve_tcp, origin, 0))[0].socket.getsockname()[1]
        H2_PORT = (await nursery.start(trio.serve_tcp, h2_origin, 0))[0].socket.getsockname()[1]
        sink_port = (await nursery.start(trio.serve_tcp, sink, 0))[0].socket.getsockname()[1]
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "tlsmitm",
                "serve",
                "--workers",
                "1",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                str(tmp / "state"),
                "--extra-roots",
                str(roots),
                "--resolve",
                f"{HOST}=127.0.0.1",
                "--log-level",
                "warning",
                "--head-timeout",
                "5",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdout is not None
        assert process.stderr is not None
        errors = bytearray()

        async def drain() -> None:
            assert process.stderr is not None
            while chunk := await process.stderr.receive_some(65536):
                errors.extend(chunk)

        nursery.start_soon(drain)
        banner = b""
        with trio.fail_after(60):
            while b"Stop with Ctrl-C" not in banner:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    print("serve did not start:", errors.decode()[-2000:])
                    return 1
                banner += chunk
        text = banner.decode()
        port = int(text.split("listening on http://127.0.0.1:")[1].split()[0])
        root = Path(text.split("CA certificate (trust this in clients): ")[1].split()[0])
        CLIENT_CONTEXT = ssl.create_default_context(cafile=str(root))
        H2_CONTEXT = ssl.create_default_context(cafile=str(root))
        H2_CONTEXT.set_alpn_protocols(["h2"])
        # Warm up (the first mint, the first verification), then the baseline.
        await trio.to_thread.run_sync(good_request, port, root, origin_port)
        fds_before, rss_before = proc_status(process.pid)
        print(f"before: {fds_before} descriptors, RSS {rss_before // 1024} MiB", flush=True)
        stop = trio.Event()
        own = f"127.0.0.1:{port}"
        async with trio.open_nursery() as load:
            load.start_soon(hold_tunnels, port, sink_port, stop, sample)
            load.start_soon(good_client, port, root, origin_port, stop, sample)
            for kind in ("malformed", "bad_tls", "reset", "slow", "self_connect", "h2_abuse"):
                for _ in range(3 if kind != "slow" else 20):
                    load.start_soon(hostile_worker, kind, port, own, sink_port, sample, stop)
            deadline = trio.current_time() + seconds
            while trio.current_time() < deadline:
                await trio.sleep(min(10, deadline - trio.current_time()))
                if process.poll() is not None:
                    break
                fds, rss = proc_status(process.pid)
                print(
                    f"during: {fds} descriptors, RSS {rss // 1024} MiB, good requests "
                    f"{len(sample.latencies)}, failures {len(sample.failures)}",
                    flush=True,
                )
            stop.set()
        alive = process.poll() is None
        fds_after = rss_after = 0
        if alive:
            with trio.move_on_after(30):  # closed tunnels and slow heads drain
                while True:
                    fds_after, rss_after = proc_status(process.pid)
                    if fds_after <= fds_before + LEAK_ALLOWANCE:
                        break
                    await trio.sleep(0.5)
            print(f"after:  {fds_after} descriptors, RSS {rss_after // 1024} MiB", flush=True)
        latencies = sorted(sample.latencies)
        if latencies:
            p50 = statistics.median(latencies) * 1000
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
            print(f"good client: {len(latencies)} requests, p50 {p50:.0f} ms, p99 {p99:.0f} ms")
        print("hostile mix: " + ", ".join(f"{k} {v}" for k, v in sorted(sample.hostile.items())))
        if not alive:
            print(f"FAIL: serve died (exit {process.returncode}): {errors.decode()[-2000:]}")
            code = 1
        elif fds_after > fds_before + LEAK_ALLOWANCE:
            print(f"FAIL: descriptors leaked: {fds_before} before, {fds_after} after")
            code = 1
        if sample.failures:
            print(
                f"FAIL: the good client failed {len(sample.failures)} times: {sample.failures[:3]}"
            )
            code = 1
        if not latencies:
            print("FAIL: the good client got no answer at all")
            code = 1
        if b"Traceback" in errors:
            print("FAIL: a traceback in the log:", errors.decode()[-2000:])
            code = 1
        print("crashes: 0" if alive else "crashes: 1")
        process.terminate()
        with trio.fail_after(30):
            await process.wait()
        nursery.cancel_scope.cancel()
    shutil.rmtree(tmp, ignore_errors=True)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(prog="./run soak", description=__doc__.splitlines()[0])
    parser.add_argument("minutes", nargs="?", type=float, default=10.0, help="default 10")
    parser.add_argument("--seconds", type=float, default=None, help="instead of minutes")
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    return trio.run(soak, seconds)


if __name__ == "__main__":
    raise SystemExit(main())
