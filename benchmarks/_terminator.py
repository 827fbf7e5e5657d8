"""A bare TLS terminator on tlsmitm's own engine: the ceiling for "two handshakes per connection".

One trio process, one TLS hop (``tlsmitm._tls``: pyOpenSSL in memory-BIO mode), no upstream, no
certificate minting, the same leaf for every connection, and a minimal HTTP/1.1 answerer for the
benchmark's routes. An intercepted connection costs this plus an upstream handshake plus the
relay, so tlsmitm's connection rate is judged against it.

Run as ``python -m benchmarks._terminator --cert LEAF.pem --key LEAF.key --port 0``; it prints
``listening on PORT`` and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

from ._origin import SMALL_BODY

__all__ = ["load_leaf", "main", "serve"]

_HEAD_LIMIT = 64 * 1024
# An uploaded body is read (and dropped) in pieces as large as the ciphertext refill, so that an
# upload costs what a download does: one transport read and one trip through the scheduler per
# 128 KiB, not per 64 KiB. (256 KiB is worse: glibc then trims and regrows its heap around every
# pair of transient 256 KiB buffers, a brk and page faults per read.)
_BODY_READ = 128 * 1024
_ZEROS = memoryview(bytes(1 << 20))


async def _read_head(stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[: end + 4])
            del buffer[: end + 4]
            return head
        if len(buffer) > _HEAD_LIMIT:
            return None
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data


async def _answer(stream: trio.abc.Stream, head: bytes, buffer: bytearray) -> bool:
    """Answer one request; returns whether the connection stays open."""
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    path = rest.partition(b" ")[0]
    length = 0
    keep_alive = True
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        key = key.strip().lower()
        if key == b"content-length":
            length = int(value.strip())
        elif key == b"connection" and value.strip().lower() == b"close":
            keep_alive = False
    # Read (and drop) the request body.
    dropped = min(length, len(buffer))
    del buffer[:dropped]
    while dropped < length:
        data = await stream.receive_some(_BODY_READ)
        if not data:
            return False
        dropped += len(data)
    if dropped > length:
        return False  # pipelining is not part of the benchmark
    closing = b"" if keep_alive else b"Connection: close\r\n"
    if method == b"GET" and path.startswith(b"/big/"):
        size = int(path[5:])
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (size, closing)
        )
        while size:
            n = min(size, len(_ZEROS))
            await stream.send_all(_ZEROS[:n])
            size -= n
    elif method == b"PUT":
        await stream.send_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n%s\r\n" % closing)
    else:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(SMALL_BODY), closing, SMALL_BODY)
        )
    return keep_alive


def load_leaf(cert_path: Path, key_path: Path) -> tuple[crypto.X509, crypto.PKey]:
    """The leaf and its key as pyOpenSSL objects (the fast path of ``server_connection``)."""
    certificate = crypto.X509.from_cryptography(
        x509.load_pem_x509_certificate(cert_path.read_bytes())
    )
    private_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    key = crypto.PKey.from_cryptography_key(private_key)  # type: ignore[arg-type]
    return certificate, key


async def serve(
    certificate: crypto.X509,
    key: crypto.PKey,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTPS on ``127.0.0.1:port`` presenting ``certificate``."""
    from tlsmitm._tls import TLSStream, server_connection, server_context

    context = server_context()

    async def handle(tcp: trio.SocketStream) -> None:
        tls = TLSStream(
            tcp,
            server_connection(context, certificate, key, alpn=b"http/1.1"),
            server_side=True,
            max_refill_bytes=_BODY_READ,
        )
        buffer = bytearray()
        try:
            with trio.fail_after(10):
                await tls.do_handshake()
            while True:
                head = await _read_head(tls, buffer)
                if head is None or not await _answer(tls, head, buffer):
                    break
            await tls.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ValueError):
            pass
        finally:
            await trio.aclose_forcefully(tls)

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)
    task_status.started(int(listeners[0].socket.getsockname()[1]))
    await trio.serve_listeners(handle, listeners)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks._terminator")
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    certificate, key = load_leaf(args.cert, args.key)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve, certificate, key, args.port)
                print(f"listening on {port}", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
