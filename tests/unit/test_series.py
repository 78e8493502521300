"""DICOM series -> Volume: ordering, multi-frame, compression, and every refusal, each on a file built for it."""

from __future__ import annotations

import random
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from node.dicom.series import VolumeError, read_series
from node.dicom.writer import SeriesInfo, series_datasets, write_series
from node.volume import Geometry, Volume

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def ramp_volume(shape=(6, 20, 24), direction=None, origin=(-40.0, -30.5, 100.25), spacing=(0.9, 0.8, 2.5)) -> Volume:
    """A CT-like volume whose every voxel value is distinct (so a wrong order or flip shows)."""
    k, j, i = shape
    array = (np.arange(k * j * i, dtype=np.int32).reshape(shape) % 2000 - 1000).astype(np.int16)
    geometry = Geometry(origin=origin, spacing=spacing, direction=direction or ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    return Volume(array, geometry)


def oblique_direction(degrees: float = 20.0):
    a = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(a / 2), -np.sin(a / 2), 0], [np.sin(a / 2), np.cos(a / 2), 0], [0, 0, 1]])
    return tuple(tuple(r) for r in rz @ rx)


@pytest.fixture
def series_dir(tmp_path: Path) -> Path:
    write_series(ramp_volume(), tmp_path / "series", SeriesInfo(uid_seed="ramp"))
    return tmp_path / "series"


def edit(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def refusal(path: Path, **kwargs) -> VolumeError:
    with pytest.raises(VolumeError) as info:
        read_series(path, **kwargs)
    return info.value


# --- what must work -------------------------------------------------------------------------


def test_round_trip_keeps_values_geometry_and_identity(series_dir: Path) -> None:
    original = ramp_volume()
    volume = read_series(series_dir)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, original.array)
    np.testing.assert_allclose(volume.geometry.affine, original.geometry.affine, atol=1e-5)
    first = pydicom.dcmread(series_dir / "IM00001.dcm")
    assert volume.source.series_uid == first.SeriesInstanceUID
    assert volume.source.frame_of_reference_uid == first.FrameOfReferenceUID
    assert volume.source.instance_uids[0] == first.SOPInstanceUID
    assert len(volume.source.instance_uids) == 6
    assert volume.source.frame_numbers == ()


def test_sorted_along_normal_not_by_instance_number_or_name(series_dir: Path, tmp_path: Path) -> None:
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    files = sorted(series_dir.iterdir())
    names = [f"x{n}.dcm" for n in range(len(files))]
    random.Random(4).shuffle(names)
    for n, (file, name) in enumerate(zip(files, names)):
        ds = pydicom.dcmread(file)
        ds.InstanceNumber = 100 - n * 7 if n % 2 else n  # neither monotonic nor meaningful
        ds.save_as(shuffled / name)
    np.testing.assert_array_equal(read_series(shuffled).array, ramp_volume().array)


def test_reversed_slice_direction_is_normalised(tmp_path: Path) -> None:
    # Slices written head-to-feet: the volume's k axis still follows the normal (row x column).
    original = ramp_volume(direction=((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    write_series(original, tmp_path / "s", SeriesInfo(uid_seed="rev"))
    for n, file in enumerate(sorted((tmp_path / "s").iterdir())):
        edit(file, InstanceNumber=100 - n)
    volume = read_series(tmp_path / "s")
    np.testing.assert_allclose(volume.geometry.affine, original.geometry.affine, atol=1e-5)


def test_oblique_geometry_round_trips(tmp_path: Path) -> None:
    original = ramp_volume(direction=oblique_direction())
    write_series(original, tmp_path / "s", SeriesInfo(uid_seed="oblique"))
    volume = read_series(tmp_path / "s")
    np.testing.assert_allclose(volume.geometry.affine, original.geometry.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.array, original.array)


def test_zip_and_single_instance_duplicates(series_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in series_dir.iterdir():
            z.write(file, f"study/{file.name}")
        z.write(series_dir / "IM00003.dcm", "study/copy-of-3.dcm")  # the same instance twice
        z.writestr("study/README.txt", "exported by a PACS")
    volume = read_series(archive)
    np.testing.assert_array_equal(volume.array, ramp_volume().array)
    assert "skipped 1 non-DICOM file(s)" in volume.notes


def test_rescale_slope_gives_float_hu(series_dir: Path) -> None:
    for file in series_dir.iterdir():
        edit(file, RescaleSlope="0.5", RescaleIntercept="-1024")
    volume = read_series(series_dir)
    assert volume.array.dtype == np.float32
    raw = ramp_volume().array.astype(np.float32) + 1024  # stored values written by the writer
    np.testing.assert_allclose(volume.array, raw * 0.5 - 1024)


@pytest.mark.parametrize(
    ("bits", "stored", "signed", "implicit"),
    [(16, 12, 1, False), (16, 12, 0, False), (16, 16, 1, True), (8, 8, 0, False), (8, 6, 1, True), (32, 20, 1, False)],
)
def test_uncompressed_pixels_read_as_pydicom_decodes_them(bits, stored, signed, implicit, series_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct read of uncompressed pixels gives pydicom's values, unused high bits included:
    random bytes, so the bits above BitsStored hold garbage that must be shifted out (sign-extended)."""
    rng = np.random.default_rng(bits + stored + signed)
    expected = []
    for n, file in enumerate(sorted(series_dir.iterdir())):
        ds = pydicom.dcmread(file)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, signed
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = rng.integers(0, 256, ds.Rows * ds.Columns * bits // 8, dtype=np.uint8).tobytes()
        if implicit:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
        ds.save_as(file, enforce_file_format=True)
        expected.append((float(ds.ImagePositionPatient[2]), pydicom.dcmread(file).pixel_array))

    def not_pydicom(ds):
        raise AssertionError("decoded by pydicom, not read directly")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(not_pydicom))
    volume = read_series(series_dir)
    reference = np.stack([a for _, a in sorted(expected, key=lambda t: t[0])]).astype(np.int64)
    assert volume.array.dtype == (np.int16 if bits < 32 else np.int32)
    np.testing.assert_array_equal(volume.array, reference)


def test_values_beyond_int16_give_int32(series_dir: Path) -> None:
    """Slice by slice into int16, widened to int32 when a later slice holds a value beyond it."""
    last = max(series_dir.iterdir())
    edit(last, RescaleIntercept="40000")
    volume = read_series(series_dir)
    assert volume.array.dtype == np.int32
    raw = ramp_volume().array.astype(np.int32) + 1024  # stored values written by the writer
    expected = raw - 1024
    k = 0 if volume.source.instance_uids[0] == pydicom.dcmread(last).SOPInstanceUID else len(raw) - 1
    expected[k] = raw[k] + 40000
    np.testing.assert_array_equal(volume.array, expected)


def test_enhanced_multiframe_matches_single_frames() -> None:
    single = read_series(SHARED / "dcmqi/synthetic_23x38x3/image")
    multi = read_series(SHARED / "dcmqi/synthetic_23x38x3/multiframe")
    np.testing.assert_array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.geometry.affine, single.geometry.affine, atol=1e-6)
    assert multi.source.frame_numbers == (1, 2, 3) or sorted(multi.source.frame_numbers) == [1, 2, 3]
    assert len(set(multi.source.instance_uids)) == 1


def test_choose_one_series_from_a_mix(series_dir: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(series_dir, mixed)
    write_series(ramp_volume(shape=(3, 10, 10)), mixed / "other", SeriesInfo(uid_seed="other", series_number=2))
    error = refusal(mixed)
    assert error.code == "mixed_series"
    assert "2 series are mixed" in str(error)
    other_uid = pydicom.dcmread(mixed / "other" / "IM00001.dcm").SeriesInstanceUID
    assert read_series(mixed, series_uid=other_uid).array.shape == (3, 10, 10)
    assert refusal(mixed, series_uid="1.2.3.4").code == "series_not_found"


# --- compressed transfer syntaxes -------------------------------------------------------------


def _compress_with_dcmtk(tool: list[str], src: Path, dst: Path) -> None:
    dst.mkdir()
    for file in sorted(src.iterdir()):
        subprocess.run([*tool, str(file), str(dst / file.name)], check=True, capture_output=True)


@pytest.mark.parametrize(
    "tool, syntax",
    [
        (["dcmcjpeg"], "1.2.840.10008.1.2.4.70"),  # JPEG lossless, first-order prediction (SV1)
        (["dcmcjpls"], "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
        (["dcmcrle"], "1.2.840.10008.1.2.5"),  # RLE lossless
    ],
)
def test_lossless_compressed_series_decode_exactly(tool, syntax, series_dir: Path, tmp_path: Path) -> None:
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} (dcmtk) is not installed")
    _compress_with_dcmtk(tool, series_dir, tmp_path / "c")
    assert pydicom.dcmread(tmp_path / "c" / "IM00001.dcm").file_meta.TransferSyntaxUID == syntax
    volume = read_series(tmp_path / "c")
    np.testing.assert_array_equal(volume.array, ramp_volume().array)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
def test_pydicom_encoded_series_decode_exactly(syntax, tmp_path: Path) -> None:
    out = tmp_path / "c"
    out.mkdir()
    volume = ramp_volume(shape=(3, 64, 64))  # OpenJPEG's default 6 resolutions need >= 32 px
    for n, ds in enumerate(series_datasets(volume, SeriesInfo(uid_seed="j2k"))):
        ds.compress(syntax)
        ds.save_as(out / f"{n}.dcm", enforce_file_format=True)
    assert pydicom.dcmread(out / "0.dcm").file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_series(out).array, volume.array)


def test_jpeg_baseline_8bit_series_decodes_close(tmp_path: Path) -> None:
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmcjpeg (dcmtk) is not installed")
    plain, lossy = tmp_path / "plain", tmp_path / "lossy"
    plain.mkdir()
    smooth = np.fromfunction(lambda k, j, i: 40 + 2 * i + 2 * j + k, (4, 32, 32)).astype(np.uint8)
    volume = Volume(smooth, Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 2.0)))
    for n, ds in enumerate(series_datasets(volume, SeriesInfo(modality="MR", uid_seed="mr8"))):
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = smooth[n].tobytes()
        ds.save_as(plain / f"{n}.dcm", enforce_file_format=True)
    # +sr: scale by the 8-bit range, not per image min/max, so stored values keep their meaning
    _compress_with_dcmtk(["dcmcjpeg", "+eb", "+q", "95", "+sr"], plain, lossy)
    assert pydicom.dcmread(lossy / "0.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    decoded = read_series(lossy).array.astype(int)
    assert np.abs(decoded - smooth.astype(int)).max() <= 4  # lossy, but the same image


# --- refusals: each with a file built for it ---------------------------------------------------


def test_refuses_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    error = refusal(tmp_path)
    assert error.code == "not_dicom"
    assert "2 file(s), none DICOM" in str(error)


def test_refuses_missing_path(tmp_path: Path) -> None:
    assert refusal(tmp_path / "absent").code == "not_found"


def test_refuses_objects_without_images(tmp_path: Path) -> None:
    shutil.copy(SHARED / "highdicom/seg_image_ct_binary.dcm", tmp_path)
    error = refusal(tmp_path)
    assert error.code == "no_images"
    assert "Segmentation" in str(error)


def test_refuses_missing_slices(series_dir: Path) -> None:
    (series_dir / "IM00003.dcm").unlink()
    error = refusal(series_dir)
    assert error.code == "missing_slices"
    assert "5.000 mm" in str(error) and "spacing is 2.500 mm (1 slice(s) missing)" in str(error)


def test_refuses_real_series_with_a_gap() -> None:
    # pydicom's CT2 sample: instance 18 lies 202.5 mm below the three contiguous slices.
    error = refusal(SHARED / "pydicom/CT2_series")
    assert error.code == "missing_slices"
    assert "161 slice(s) missing" in str(error)


def test_refuses_uneven_spacing(series_dir: Path) -> None:
    ds = pydicom.dcmread(series_dir / "IM00004.dcm")
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    edit(series_dir / "IM00004.dcm", ImagePositionPatient=[x, y, z + 0.8])
    error = refusal(series_dir)
    assert error.code == "uneven_spacing"
    assert "steps from 1.700 to 3.300 mm" in str(error)


def test_small_position_jitter_is_tolerated(series_dir: Path) -> None:
    ds = pydicom.dcmread(series_dir / "IM00004.dcm")
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    edit(series_dir / "IM00004.dcm", ImagePositionPatient=[x, y, z + 0.02])  # 0.8 % of 2.5 mm
    assert read_series(series_dir).geometry.spacing[2] == pytest.approx(2.5)
    assert refusal(series_dir, spacing_tolerance=0.001).code == "uneven_spacing"


def test_refuses_gantry_tilt(series_dir: Path) -> None:
    for n, file in enumerate(sorted(series_dir.iterdir())):
        ds = pydicom.dcmread(file)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        edit(file, ImagePositionPatient=[x, y + n * 2.5 * np.tan(np.radians(15)), z], GantryDetectorTilt=15)
    error = refusal(series_dir)
    assert error.code == "gantry_tilt"
    assert "15.00 degrees" in str(error) and "GantryDetectorTilt 15" in str(error)


def test_refuses_non_orthogonal_orientation(series_dir: Path) -> None:
    for file in series_dir.iterdir():
        edit(file, ImageOrientationPatient=[1, 0, 0, 0.2, 0.98, 0])
    error = refusal(series_dir)
    assert error.code == "non_orthogonal"


def test_refuses_mixed_orientations(series_dir: Path) -> None:
    edit(series_dir / "IM00002.dcm", ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    assert refusal(series_dir).code == "orientation_mismatch"


def test_refuses_differing_rows_and_columns(series_dir: Path) -> None:
    ds = pydicom.dcmread(series_dir / "IM00002.dcm")
    ds.Rows, ds.Columns = 10, 12
    ds.PixelData = bytes(10 * 12 * 2)
    ds.save_as(series_dir / "IM00002.dcm")
    error = refusal(series_dir)
    assert error.code == "size_mismatch"
    assert str(error) == "slices differ in size (columns x rows): 24x20 (5 slices), 12x10 (1 slices)"


def test_refuses_one_slice_where_a_volume_is_needed(series_dir: Path) -> None:
    error = refusal(series_dir / "IM00001.dcm")
    assert error.code == "single_slice"
    assert str(error) == "only 1 slice(s); a volume needs at least 2"
    assert read_series(series_dir / "IM00001.dcm", min_slices=1).array.shape == (1, 20, 24)


def test_refuses_two_images_at_one_position(series_dir: Path) -> None:
    ds = pydicom.dcmread(series_dir / "IM00002.dcm")
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.ImagePositionPatient = pydicom.dcmread(series_dir / "IM00003.dcm").ImagePositionPatient
    ds.save_as(series_dir / "IM00002.dcm")
    assert refusal(series_dir).code == "duplicate_position"


def test_refuses_missing_geometry(series_dir: Path) -> None:
    edit(series_dir / "IM00002.dcm", ImagePositionPatient=None)
    error = refusal(series_dir)
    assert error.code == "no_geometry"
    assert "ImagePositionPatient is missing" in str(error)


def test_refuses_truncated_file(series_dir: Path) -> None:
    data = (series_dir / "IM00004.dcm").read_bytes()
    (series_dir / "IM00004.dcm").write_bytes(data[: len(data) // 2])
    error = refusal(series_dir)
    assert error.code == "corrupt"
    assert "IM00004.dcm: CT Image Storage instance has no pixel data" in str(error)


def test_refuses_pixel_data_cut_short(series_dir: Path) -> None:
    data = (series_dir / "IM00004.dcm").read_bytes()
    (series_dir / "IM00004.dcm").write_bytes(data[:-100])
    error = refusal(series_dir)
    assert error.code in {"corrupt", "pixel_data"}
    assert "IM00004.dcm" in str(error)


def test_refuses_colour_images(series_dir: Path) -> None:
    ds = pydicom.dcmread(series_dir / "IM00001.dcm")
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(20 * 24 * 3)
    ds.save_as(series_dir / "IM00001.dcm")
    assert refusal(series_dir).code == "unsupported"


def test_instances_naming_themselves_only_in_the_file_meta_are_refused(tmp_path) -> None:
    """Issue 16 item 4: ``volume-info`` and ``segnode run`` (both through the loader) refuse what ingest
    refuses with 0xC010, with one code, instead of one series of UID "" and a misleading SEG error."""
    from node.pipeline import PipelineRequest, run_pipeline
    from node.segment import SegmentRequest
    from tests.corpus import CASES

    for kind, keyword in (("empty UIDs (file meta only)", "SOPClassUID"), ("empty SOP Class UID", "SOPClassUID"),
                          ("path-traversal UIDs", "SeriesInstanceUID")):
        folder = tmp_path / keyword / kind.replace(" ", "_")
        folder.mkdir(parents=True)
        case = next(c for c in CASES if c.kind == kind)
        for n, data in enumerate(case.build()):
            (folder / f"{n}.dcm").write_bytes(data)
        with pytest.raises(VolumeError) as exc:
            read_series(folder)
        assert exc.value.code == "missing_uid"
        assert f"{keyword} in the data set is " in str(exc.value)
        if kind.startswith("empty UIDs"):
            assert "SOPClassUID in the data set is empty (only the file meta has it)" in str(exc.value)
        result = run_pipeline(folder, tmp_path / "out" / kind.replace(" ", "_"),
                              PipelineRequest(segment=SegmentRequest(engine="threshold"), outputs=("seg",)))
        assert (result.state, result.error.code, result.error.stage) == ("failed", "missing_uid", "load")


@pytest.mark.parametrize("kind, code", [
    ("PixelSpacing 0\\0", "bad_pixel_spacing"), ("NaN PixelSpacing", "bad_pixel_spacing"),
    ("RescaleSlope 0", "bad_rescale"), ("RescaleSlope text", "bad_rescale"),
])
def test_odd_geometry_is_a_coded_refusal(tmp_path, kind, code) -> None:
    """Issue 16 item 2: what was internal_error (retried three times) is a code, found by the loader."""
    from tests.corpus import CASES

    case = next(c for c in CASES if c.kind == kind)
    for n, data in enumerate(case.build()):
        (tmp_path / f"{n}.dcm").write_bytes(data)
    with pytest.raises(VolumeError) as exc:
        read_series(tmp_path)
    assert exc.value.code == code
