"""Undo ``Content-Encoding`` for scanners, incrementally, with decompression-bomb bounds.

Pure (sans-IO): bytes in, bytes out. The client always receives the original bytes; only the
scanners and hooks see the decoded body.

RFC 9110 §8.4: the codings are listed in the order they were applied, so they are undone from
the last to the first. ``gzip`` (RFC 1952, several members allowed), ``deflate`` (RFC 1950 zlib;
a raw RFC 1951 stream, which some servers send, is accepted too), ``br`` (RFC 7932) and ``zstd``
(RFC 8878) are known; ``identity`` is no coding. Any other coding cannot be decoded, and then the
body cannot be scanned: :class:`~tlsmitm.UpstreamError` with reason ``"unknown_encoding"``.

Bombs: every step's output is produced in bounded pieces (zlib's ``max_length``, brotli's
``output_buffer_limit``, zstd fed in small slices), and the decoder stops with reason
``"decompression_bomb"`` as soon as the decoded size passes ``max_decoded`` bytes, or passes
``ratio_floor`` bytes while being more than ``max_ratio`` times the encoded size.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import brotli
import zstandard

from .._errors import UpstreamError

__all__ = ["BodyDecoder", "DecodeLimits", "parse_content_encoding"]

_PIECE = 64 * 1024  # largest piece of output produced at once by one step
_SLICE = 16 * 1024  # encoded input decoded at once
_ZSTD_SLICE = 256  # zstd input fed at once: at most ~8 MiB of output (128 KiB per 4-byte block)


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeLimits:
    """Bounds on a decoded body.

    Attributes:
        max_decoded: the decoded body may not exceed this many bytes.
        max_ratio: decoded/encoded ratio above which a body is a bomb...
        ratio_floor: ...once it has decoded to more than this many bytes (small, very
            compressible bodies such as a page of spaces are normal).
    """

    max_decoded: int = 256 * 1024 * 1024
    max_ratio: int = 200
    ratio_floor: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_decoded < 1 or self.max_ratio < 1 or self.ratio_floor < 0:
            raise ValueError("DecodeLimits must be positive")


def parse_content_encoding(values: list[bytes]) -> list[str]:
    """The codings of every ``Content-Encoding`` field value, in the order applied.

    ``identity`` is dropped (RFC 9110 §8.4.1); names are case-insensitive.
    """
    codings: list[str] = []
    for value in values:
        for part in value.split(b","):
            name = part.strip().lower().decode("latin-1")
            if name and name != "identity":
                codings.append(name)
    return codings


class _Step:
    """One coding undone: ``feed`` returns output pieces, each at most ~``_PIECE`` bytes."""

    def feed(self, data: bytes, sink: Callable[[bytes], None]) -> None:
        raise NotImplementedError

    def finish(self, sink: Callable[[bytes], None]) -> None:
        raise NotImplementedError


def _bad(detail: str) -> UpstreamError:
    return UpstreamError(f"undecodable body: {detail}", reason="bad_encoding")


class _Zlib(_Step):
    def __init__(self, coding: str) -> None:
        self._coding = coding
        # gzip: wbits 31 (RFC 1952 header); deflate: 15 (RFC 1950 zlib header), or -15 for a
        # raw RFC 1951 stream when the first two bytes are no zlib header.
        self._obj: zlib._Decompress | None = zlib.decompressobj(31) if coding == "gzip" else None
        self._head = b""
        self._in_stream = False

    def _start_deflate(self, data: bytes) -> bytes:
        self._head += data
        if len(self._head) < 2:
            return b""
        cmf, flg = self._head[0], self._head[1]
        zlib_header = cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0  # RFC 1950 §2.2
        self._obj = zlib.decompressobj(15 if zlib_header else -15)
        data, self._head = self._head, b""
        return data

    def feed(self, data: bytes, sink: Callable[[bytes], None]) -> None:
        if self._obj is None:
            data = self._start_deflate(data)
        obj = self._obj
        while data and obj is not None:
            if obj.eof:
                if self._coding != "gzip":
                    return  # bytes after the end of a deflate stream: ignored
                # RFC 1952 §2.2: a gzip body is a series of members.
                data = obj.unused_data + data
                obj = self._obj = zlib.decompressobj(31)
                continue
            self._in_stream = True
            try:
                out = obj.decompress(data, _PIECE)
            except zlib.error as exc:
                raise _bad(f"{self._coding}: {exc}") from exc
            if out:
                sink(out)
            data = obj.unconsumed_tail
        if obj is not None:
            self._in_stream = not obj.eof

    def finish(self, sink: Callable[[bytes], None]) -> None:
        if self._obj is None:
            if self._head:
                raise _bad(f"{self._coding}: truncated stream")
            return
        if self._in_stream and not self._obj.eof:
            raise _bad(f"{self._coding}: truncated stream")


class _Brotli(_Step):
    def __init__(self) -> None:
        self._obj = brotli.Decompressor()
        self._seen = False

    def feed(self, data: bytes, sink: Callable[[bytes], None]) -> None:
        self._seen = self._seen or bool(data)
        try:
            out = self._obj.process(data, output_buffer_limit=_PIECE)
            if out:
                sink(out)
            while not self._obj.can_accept_more_data():
                out = self._obj.process(b"", output_buffer_limit=_PIECE)
                if not out:
                    break
                sink(out)
        except brotli.error as exc:
            raise _bad(f"br: {exc}") from exc

    def finish(self, sink: Callable[[bytes], None]) -> None:
        try:
            while self._seen and not self._obj.is_finished():
                out = self._obj.process(b"", output_buffer_limit=_PIECE)
                if not out:
                    raise _bad("br: truncated stream")
                sink(out)
        except brotli.error as exc:
            raise _bad(f"br: {exc}") from exc


class _Zstd(_Step):
    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False

    def feed(self, data: bytes, sink: Callable[[bytes], None]) -> None:
        for start in range(0, len(data), _ZSTD_SLICE):
            piece = data[start : start + _ZSTD_SLICE]
            while piece:
                self._in_frame = True
                try:
                    out = self._obj.decompress(piece)
                except zstandard.ZstdError as exc:
                    raise _bad(f"zstd: {exc}") from exc
                if out:
                    sink(out)
                if not self._obj.eof:
                    break
                # RFC 8878 §3.1: frames may follow one another.
                piece = self._obj.unused_data
                self._obj = self._dctx.decompressobj()
                self._in_frame = False

    def finish(self, sink: Callable[[bytes], None]) -> None:
        if self._in_frame:
            raise _bad("zstd: truncated stream")


def _step(coding: str) -> _Step:
    if coding in ("gzip", "x-gzip"):
        return _Zlib("gzip")
    if coding == "deflate":
        return _Zlib("deflate")
    if coding == "br":
        return _Brotli()
    if coding == "zstd":
        return _Zstd()
    raise UpstreamError(f"cannot decode Content-Encoding {coding!r}", reason="unknown_encoding")


class BodyDecoder:
    """Decodes a body encoded with ``codings`` (as :func:`parse_content_encoding` gives them).

    Call :meth:`feed` with each piece of the encoded body and :meth:`finish` at its end; both
    return the decoded bytes produced so far. Raises :class:`~tlsmitm.UpstreamError` with reason
    ``"unknown_encoding"`` (at construction), ``"bad_encoding"`` or ``"decompression_bomb"``.
    """

    def __init__(self, codings: list[str], limits: DecodeLimits | None = None) -> None:
        self.limits = limits or DecodeLimits()
        # Undone last-applied first (RFC 9110 §8.4).
        self._steps = [_step(c) for c in reversed(codings)]
        self.encoded_bytes = 0
        self.decoded_bytes = 0

    @property
    def identity(self) -> bool:
        """Whether there is nothing to decode."""
        return not self._steps

    def feed(self, data: bytes) -> list[bytes]:
        """Decode the next piece of the encoded body."""
        if not self._steps:
            self.encoded_bytes += len(data)
            self._count(len(data))
            return [data] if data else []
        out: list[bytes] = []
        # Counted in slices, so that the ratio compares with what was consumed so far.
        for start in range(0, len(data), _SLICE):
            piece = data[start : start + _SLICE]
            self.encoded_bytes += len(piece)
            out += self._run(0, [piece], final=False)
        return out

    def finish(self) -> list[bytes]:
        """The end of the encoded body: flush, and check every stream ended properly."""
        if not self._steps:
            return []
        return self._run(0, [], final=True)

    def _run(self, index: int, inputs: list[bytes], *, final: bool) -> list[bytes]:
        step = self._steps[index]
        produced: list[bytes] = []
        last = index == len(self._steps) - 1

        def sink(out: bytes) -> None:
            if last:
                self._count(len(out))
            produced.append(out)

        for data in inputs:
            step.feed(data, sink)
        if final:
            step.finish(sink)
        if last:
            return produced
        return self._run(index + 1, produced, final=final)

    def _count(self, n: int) -> None:
        self.decoded_bytes += n
        limits = self.limits
        if self.decoded_bytes > limits.max_decoded:
            raise UpstreamError(
                f"decoded body over {limits.max_decoded} bytes", reason="decompression_bomb"
            )
        if self.decoded_bytes > limits.ratio_floor and self.decoded_bytes > limits.max_ratio * max(
            self.encoded_bytes, 1
        ):
            raise UpstreamError(
                f"decoded body {self.decoded_bytes} bytes from {self.encoded_bytes}: "
                f"over {limits.max_ratio}x",
                reason="decompression_bomb",
            )
