"""Decoders for the encapsulated SEG frames pydicom 3.0 cannot decode: RLE Lossless with Bits Allocated 1,
and Deflated Image Frame Compression (``1.2.840.10008.1.2.8.1``). Each takes one frame's bytes (as
:func:`pydicom.encaps.generate_frames` gives them) and returns its values as a ``(rows, cols)`` array.

* RLE (PS3.5 Annex G): a 64-byte header (number of segments, then 15 offsets, little endian uint32)
  and PackBits byte segments (G.3.1: header byte n in 0..127 copies the next n+1 bytes; n in 129..255,
  i.e. -127..-1 signed, repeats the next byte 257-n times; 128 is a no-op). With Bits Allocated 1 the
  one segment holds the frame bit-packed as in native encoding (PS3.5 8.1.1, first pixel in the least
  significant bit), as pydicom 3.1 and dcmqi write it; some older writers put one byte per pixel
  there instead. The decoded length tells which, and both are read.
* Deflated Image Frame Compression (PS3.5 8.2.16, Supplement 244): each frame is the native
  frame (bit-packed for Bits Allocated 1) compressed with Deflate (RFC 1951), raw; a zlib-wrapped
  stream is accepted too.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

RLE_LOSSLESS = "1.2.840.10008.1.2.5"
DEFLATED_IMAGE_FRAME = "1.2.840.10008.1.2.8.1"
#: Encapsulated transfer syntaxes decoded here (the others go to pydicom and its plugins).
OWN_DECODERS = {RLE_LOSSLESS: "RLE Lossless", DEFLATED_IMAGE_FRAME: "Deflated Image Frame Compression"}


def packbits_decode(src: bytes) -> bytes:
    """One RLE byte segment decoded (PS3.5 G.3.2)."""
    out = bytearray()
    i, n = 0, len(src)
    while i < n:
        header = src[i]
        i += 1
        if header < 128:
            out += src[i:i + header + 1]
            i += header + 1
        elif header > 128:
            if i < n:
                out += src[i:i + 1] * (257 - header)
            i += 1
    return bytes(out)


def rle_segments(frame: bytes) -> list[bytes]:
    """The decoded byte segments of one RLE frame (PS3.5 G.5)."""
    if len(frame) < 64:
        raise ValueError(f"an RLE frame of {len(frame)} bytes has no 64-byte header")
    count, *offsets = struct.unpack("<16I", frame[:64])
    if not 1 <= count <= 15:
        raise ValueError(f"RLE header says {count} segments (1 to 15 allowed)")
    bounds = list(offsets[:count]) + [len(frame)]
    if bounds[0] != 64 or any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=True)):
        raise ValueError(f"RLE segment offsets {bounds[:-1]} are not in order after the header")
    return [packbits_decode(frame[bounds[s]:bounds[s + 1]]) for s in range(count)]


def _single_bit(data: bytes, rows: int, cols: int) -> np.ndarray:
    """A 1-bit frame from its decoded bytes: bit-packed (LSB first), or one byte per pixel."""
    n = rows * cols
    if len(data) >= n and n > 8:  # one byte per pixel (a packed frame is an eighth of this)
        return (np.frombuffer(data, np.uint8, count=n) != 0).astype(np.uint8).reshape(rows, cols)
    if len(data) * 8 < n:
        raise ValueError(f"a decoded 1-bit frame of {len(data)} bytes holds fewer than {rows}x{cols} pixels")
    return np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:n].reshape(rows, cols)


def _values(data: bytes, rows: int, cols: int, bits: int) -> np.ndarray:
    if bits == 1:
        return _single_bit(data, rows, cols)
    dtype = {8: np.dtype(np.uint8), 16: np.dtype("<u2"), 32: np.dtype("<u4")}.get(bits)
    if dtype is None:
        raise ValueError(f"Bits Allocated {bits} is not supported")
    if len(data) < rows * cols * dtype.itemsize:
        raise ValueError(f"a decoded frame of {len(data)} bytes is shorter than "
                         f"{rows}x{cols}x{dtype.itemsize}")
    return np.frombuffer(data, dtype, count=rows * cols).reshape(rows, cols)


def decode_rle_frame(frame: bytes, rows: int, cols: int, bits: int) -> np.ndarray:
    """One RLE Lossless frame of a single-sample image."""
    segments = rle_segments(frame)
    if bits <= 8:
        return _values(segments[0], rows, cols, bits)
    # Bits Allocated 16/32: one segment per byte, most significant first (G.2)
    size = bits // 8
    if len(segments) != size:
        raise ValueError(f"{len(segments)} RLE segments for Bits Allocated {bits}")
    n = rows * cols
    planes = np.stack([np.frombuffer(s, np.uint8, count=n) for s in reversed(segments)], axis=1)
    return planes.reshape(-1).view(f"<u{size}").reshape(rows, cols)


def inflate_frame(frame: bytes, rows: int, cols: int, bits: int) -> np.ndarray:
    """One Deflated Image Frame Compression frame."""
    try:
        data = zlib.decompress(frame, wbits=-15)
    except zlib.error:
        data = zlib.decompress(frame)  # zlib-wrapped (RFC 1950): tolerated
    return _values(data, rows, cols, bits)


DECODERS = {RLE_LOSSLESS: decode_rle_frame, DEFLATED_IMAGE_FRAME: inflate_frame}
