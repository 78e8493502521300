"""SEG pixel encodings from other systems: RLE Lossless with Bits Allocated 1 (bit-packed, and one byte per
pixel), Deflated Image Frame Compression, FRACTIONAL with its threshold in the notes, and transfer syntaxes
nobody here decodes as a coded ``SegError`` naming them, never a traceback. Each file is the node's own
SEG of the TINY phantom, re-encoded with pydicom the way those systems write it."""

from __future__ import annotations

import copy
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels.utils import pack_bits

from node.dicom.frame_codecs import packbits_decode
from node.dicom.seg import SegError, read_seg
from node.dicom.series import read_series
from tests.phantom_seg import phantom_seg


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory):
    phantom, run = phantom_seg(tmp_path_factory.mktemp("encodings"))
    native = pydicom.dcmread(run.paths["seg"])
    frames = native.pixel_array.reshape(int(native.NumberOfFrames), native.Rows, native.Columns)
    return phantom, run, native, frames, read_series(phantom["dicom"])


def packbits(data: bytes) -> bytes:
    """PackBits (PS3.5 G.3.1): replicate runs of 3 or more, literal runs otherwise, at most 128 each."""
    out, i, n = bytearray(), 0, len(data)
    while i < n:
        run = 1
        while i + run < n and run < 128 and data[i + run] == data[i]:
            run += 1
        if run >= 3:
            out += bytes([257 - run, data[i]])
            i += run
            continue
        start = i
        while i < n and i - start < 128 and not (i + 2 < n and data[i] == data[i + 1] == data[i + 2]):
            i += 1
        out += bytes([i - start - 1]) + data[start:i]
    return bytes(out)


def rle_frame(payload: bytes) -> bytes:
    segment = packbits(payload)
    segment += b"\x00" * (len(segment) % 2)  # byte segments are padded to even length (G.5)
    return struct.pack("<16I", 1, 64, *([0] * 14)) + segment


def encapsulated(native: pydicom.Dataset, transfer_syntax: str, fragments: list[bytes]) -> pydicom.Dataset:
    ds = copy.deepcopy(native)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


PLACEHOLDER = pydicom.uid.JPEGBaseline8Bit  # 22 characters, encapsulated, explicit VR little endian


def saved(ds: pydicom.Dataset, path: Path) -> Path:
    """``ds`` as a file; a transfer syntax pydicom 3.0 will not write goes into the file meta by hand."""
    uid = str(ds.file_meta.TransferSyntaxUID)
    if uid in pydicom.uid.PrivateTransferSyntaxes or pydicom.uid.UID(uid).is_transfer_syntax:
        ds.save_as(path, enforce_file_format=True)
        return path
    wanted = uid.encode() + b"\0" * (len(uid) % 2)
    assert len(wanted) == len(PLACEHOLDER)
    ds.file_meta.TransferSyntaxUID = PLACEHOLDER
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    path.write_bytes(data.replace(PLACEHOLDER.encode(), wanted, 1))
    return path


def test_packbits_round_trip_and_its_edge_headers() -> None:
    data = bytes([0] * 300 + [1, 2, 3] + [7] * 2 + list(range(200)))
    assert packbits_decode(packbits(data)) == data
    assert packbits_decode(bytes([128, 254, 9, 1, 4, 5])) == bytes([9, 9, 9, 4, 5])  # 128 is a no-op


@pytest.mark.parametrize("layout", ["bit-packed", "byte per pixel"])
def test_rle_single_bit_frames_read_voxel_exact(made, layout: str, tmp_path: Path) -> None:
    phantom, run, native, frames, ct = made
    payloads = [pack_bits(f.ravel()) if layout == "bit-packed" else f.astype(np.uint8).tobytes() for f in frames]
    ds = encapsulated(native, pydicom.uid.RLELossless, [rle_frame(p) for p in payloads])
    back = read_seg(saved(ds, tmp_path / "rle.dcm"), ct)
    np.testing.assert_array_equal(back.array, run.labels.array)


def test_deflated_image_frame_compression_reads_voxel_exact(made, tmp_path: Path) -> None:
    phantom, run, native, frames, ct = made
    fragments = []
    for frame in frames:
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw Deflate, RFC 1951
        fragments.append(deflate.compress(pack_bits(frame.ravel())) + deflate.flush())
    path = saved(encapsulated(native, "1.2.840.10008.1.2.8.1", fragments), tmp_path / "deflated.dcm")
    back = read_seg(path, ct)
    np.testing.assert_array_equal(back.array, run.labels.array)


def test_jpeg_2000_single_bit_frames_are_decoded_by_pydicoms_plugin(made) -> None:
    """What highdicom writes for BINARY with JPEG 2000 Lossless: pydicom (pylibjpeg-openjpeg) decodes it."""
    from openjpeg import encode

    phantom, run, native, frames, ct = made
    fragments = [encode(f.astype(np.uint8), bits_stored=1, use_mct=False, codec_format=0) for f in frames]
    back = read_seg(encapsulated(native, pydicom.uid.JPEG2000Lossless, fragments), ct)
    np.testing.assert_array_equal(back.array, run.labels.array)


def test_fractional_threshold_is_applied_and_said(made) -> None:
    phantom, run, native, frames, ct = made
    ds = copy.deepcopy(native)
    ds.SegmentationType, ds.SegmentationFractionalType, ds.MaximumFractionalValue = "FRACTIONAL", "PROBABILITY", 200
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    values = frames.astype(np.uint8) * 100  # exactly half of 200: inside
    values[frames == 0] = 99  # just below half: outside
    ds.PixelData = values.tobytes()
    back = read_seg(ds, ct)
    np.testing.assert_array_equal(back.array, run.labels.array)
    assert ("FRACTIONAL (PROBABILITY) SEG read as binary: a voxel is in a segment where its value is at "
            "least 100 (half of MaximumFractionalValue 200)") in back.notes


@pytest.mark.parametrize(("uid", "code", "words"), [
    ("1.2.840.10008.1.2.4.100", "unsupported_transfer_syntax", "1.2.840.10008.1.2.4.100 (MPEG2 Main Profile"),
    ("1.2.826.0.1.3680043.99", "unsupported_transfer_syntax", "transfer syntax 1.2.826.0.1.3680043.99 is not one"),
    (pydicom.uid.RLELossless, "pixel_data", "RLE Lossless pixel data cannot be decoded"),
])
def test_what_cannot_be_decoded_is_a_coded_error(made, uid: str, code: str, words: str, tmp_path: Path) -> None:
    phantom, run, native, frames, ct = made
    fragments = [b"\x01\x00\x00\x00garbage!" for _ in frames]  # an RLE header with no offsets
    path = saved(encapsulated(native, uid, fragments), tmp_path / "odd.dcm")
    with pytest.raises(SegError) as caught:
        read_seg(path, ct)
    assert caught.value.code == code and words in str(caught.value)
    if code != "unsupported_transfer_syntax" or uid.startswith("1.2.840"):
        return
    from typer.testing import CliRunner

    from node.cli import app

    done = CliRunner().invoke(app, ["seg", "to-nifti", str(path), str(tmp_path / "x.nii.gz")])
    assert done.exit_code == 1 and f"[{code}]" in done.output and "Traceback" not in done.output
