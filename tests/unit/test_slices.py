"""PNG slices: radiological orientation, square pixels, windowing, overlay, slices.json corners."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from node.artifacts.slices import WINDOWS, SliceOptions, plane_view, window_range, write_slices
from node.classes import LabelClass, LabelVolume
from node.phantom import TINY, make_phantom
from node.volume import Geometry, Volume


def marker_volume(direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
                  spacing=(1.0, 1.0, 3.0)) -> tuple[Volume, LabelVolume]:
    """A 20 x 16 x 10 (i, j, k) CT of -1000 with bright blocks at known patient places (LPS):
    patient right-anterior-inferior corner region and left-posterior-superior."""
    a = np.full((10, 16, 20), -1000, np.int16)
    g = Geometry(origin=(0.0, 0.0, 0.0), spacing=spacing, direction=tuple(tuple(r) for r in direction))
    labels = np.zeros(a.shape, np.uint8)
    # Find array indices of the extreme corners in LPS terms through the geometry.
    k, j, i = np.meshgrid(np.arange(10), np.arange(16), np.arange(20), indexing="ij")
    lps = g.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)).reshape(10, 16, 20, 3)
    x, y, z = lps[..., 0], lps[..., 1], lps[..., 2]
    rai = (x <= np.quantile(x, 0.2)) & (y <= np.quantile(y, 0.2)) & (z <= np.quantile(z, 0.2))  # right-ant-inf
    lps_ = (x >= np.quantile(x, 0.8)) & (y >= np.quantile(y, 0.8)) & (z >= np.quantile(z, 0.8))  # left-post-sup
    a[rai] = 1000
    a[lps_] = 200
    labels[rai] = 1
    labels[lps_] = 2
    classes = {1: LabelClass(1, "rai", (255, 0, 0)), 2: LabelClass(2, "lps", (0, 255, 0))}
    return Volume(a, g), LabelVolume(labels, g, classes=classes)


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("flip", [False, True])
def test_radiological_orientation_and_numbering(tmp_path: Path, flip: bool) -> None:
    ct, _ = marker_volume()
    if flip:  # the same patient stored in RAS order (as NIfTI tools write): i and j run the other way
        g = ct.geometry
        origin = g.index_to_lps(np.array([[19, 15, 0]]))[0]
        flipped = Geometry(origin=tuple(origin), spacing=g.spacing,
                           direction=((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0)))
        ct = Volume(np.ascontiguousarray(ct.array[:, ::-1, ::-1]), flipped)
        view = plane_view(ct, "axial")
        assert view.row_flip and view.col_flip
    index = write_slices(ct, tmp_path, SliceOptions(window="bone", overlay_alpha=0))
    axial, coronal, sagittal = (index["planes"][p] for p in ("axial", "coronal", "sagittal"))
    assert (axial["count"], coronal["count"], sagittal["count"]) == (10, 16, 20)
    # Axial slice 1 is the most inferior: the bright right-anterior-inferior block shows there, at the
    # image's top-left (patient right on the image's left, anterior up).
    first = read(tmp_path / axial["slices"][0]["file"])
    w = first.shape[1]
    assert first[0, 0] > 200 and first[:, w // 2:].max() == 0
    last = read(tmp_path / axial["slices"][-1]["file"])
    assert last[-1, -1] > 50 and last[:, : w // 2].max() == 0  # left-posterior-superior: bottom right
    # Coronal slice 1 is the most anterior; head up: the inferior block is at the bottom, on the left.
    c1 = read(tmp_path / coronal["slices"][0]["file"])
    assert c1[-1, 0] > 200 and c1[:, c1.shape[1] // 2:].max() == 0
    # Sagittal slice 1 is the patient's right; anterior on the image's left, head up.
    s1 = read(tmp_path / sagittal["slices"][0]["file"])
    assert s1[-1, 0] > 200 and s1[:, s1.shape[1] // 2:].max() == 0
    # Corners: top-left of axial slice 1 is right (+x RAS), anterior (+y), at the lowest slice.
    tl, tr, br, bl = (np.array(c) for c in axial["slices"][0]["corners"])
    assert tl[0] > tr[0] and tl[1] > bl[1] and np.isclose(tl[2], br[2])
    z_first = axial["slices"][0]["corners"][0][2]
    z_last = axial["slices"][-1]["corners"][0][2]
    assert z_last - z_first == pytest.approx(9 * 3.0)


def test_square_pixels_and_plane_corners(tmp_path: Path) -> None:
    ct, labels = marker_volume(spacing=(0.8, 0.8, 3.0))
    index = write_slices(ct, tmp_path, SliceOptions(planes=("coronal",), contact_sheet=False), labels=labels)
    coronal = index["planes"]["coronal"]
    # 20 columns of 0.8 mm, 10 rows of 3 mm -> 16 x 30 mm at 0.8 mm pixels: 20 x 38 pixels.
    assert coronal["size_px"] == [20, 38]
    img = read(tmp_path / coronal["slices"][3]["file"])
    assert img.shape == (38, 20, 3)
    tl, tr, _, bl = (np.array(c) for c in coronal["slices"][3]["corners"])
    assert np.linalg.norm(tr - tl) == pytest.approx(20 * 0.8)
    assert np.linalg.norm(bl - tl) == pytest.approx(10 * 3.0)
    # The plane passes through the centre of its voxel row: LPS y of index j = 3 is 3 * 0.8; RAS y negated.
    assert tl[1] == pytest.approx(-3 * 0.8) and coronal["slices"][3]["index"] == 3
    assert not (tmp_path / "contact_sheet.png").exists()


def test_windowing_presets_and_percentiles() -> None:
    ct, _ = marker_volume()
    assert window_range(ct, "abdomen") == (WINDOWS["abdomen"][1] - 200, WINDOWS["abdomen"][1] + 200)
    assert window_range(ct, "400,40") == (-160.0, 240.0)
    low, high = window_range(ct, "percentile")
    assert low == -1000 and high >= 200
    with pytest.raises(ValueError):
        SliceOptions(window="spleen")
    with pytest.raises(ValueError):
        SliceOptions(planes=("oblique",))


def test_overlay_uses_the_palette_and_flat_layout(tmp_path: Path) -> None:
    ct, labels = marker_volume()
    index = write_slices(ct, tmp_path, SliceOptions(flat=True, planes=("axial",), overlay_alpha=1.0), labels=labels)
    assert (tmp_path / "axial_001.png").is_file() and not (tmp_path / "axial").exists()
    img = read(tmp_path / "axial_001.png")
    assert img.shape[2] == 3 and tuple(img[0, 0]) == (255, 0, 0)  # the class colour, fully opaque
    assert index["planes"]["axial"]["folder"] == ""


def test_phantom_stack_and_contact_sheet(tmp_path: Path) -> None:
    p = make_phantom(TINY)
    index = write_slices(p.ct, tmp_path, SliceOptions(every=2), labels=p.labels)
    assert index["planes"]["axial"]["written"] == 20
    assert len(list((tmp_path / "axial").glob("*.png"))) == 20
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.size[0] == 6 * 256 and sheet.mode == "RGB"
    on_disk = json.loads((tmp_path / "slices.json").read_text())
    assert on_disk["planes"]["sagittal"]["slices"][0]["file"] == "sagittal/001.png"
    view = plane_view(p.ct, "axial")
    assert (view.slice_axis, view.row_axis, view.col_axis) == (0, 1, 2)
    assert not (view.slice_flip or view.row_flip or view.col_flip)  # DICOM LPS order is radiological


def test_slices_stage_in_the_pipeline(tmp_path: Path) -> None:
    from node.nifti import write_nifti
    from node.pipeline import PipelineRequest, run_pipeline
    from node.segment import SegmentRequest
    from node.segment.labelmap import write_class_table

    p = make_phantom(TINY)
    write_nifti(p.labels, tmp_path / "labels.nii.gz")
    write_class_table(p.labels.classes, tmp_path / "labels.json")
    request = PipelineRequest(
        segment=SegmentRequest(engine="labelmap", labels_path=tmp_path / "labels.nii.gz"),
        outputs=("slices", "meshes"), stage_options={"slices": {"window": "liver", "planes": "axial"},
                                                     "meshes": {"export_format": "obj", "decimate": 0.2}},
    )
    result = run_pipeline(p.ct, tmp_path / "run", request)
    assert result.ok, result.error
    outputs = result.report["outputs"]
    assert outputs["slices"] == "slices" and outputs["contact_sheet"] == "contact_sheet.png"
    assert outputs["meshes"] == "meshes"
    assert (tmp_path / "run" / "slices" / "axial" / "020.png").is_file()
    assert not (tmp_path / "run" / "slices" / "coronal").exists()
    assert (tmp_path / "run" / "meshes" / "liver.obj").is_file()
    qc = result.report["qc"]
    assert qc["meshes"]["watertight"] == qc["meshes"]["meshes"] == len(p.labels.classes)
    assert qc["slices"]["planes"] == {"axial": 40}


# --- the palette (overlays here, materials in Blender) ------------------------------------------------


def test_palette_exact_auto_and_mapping(tmp_path: Path) -> None:
    from node.artifacts.palette import (
        ARTERY,
        BONE,
        HEPATIC_VEIN,
        MUSCLE,
        PORTAL,
        VEIN,
        class_colors,
        load_mapping,
        parse_color,
        structure_color,
    )

    assert parse_color("#ff8000") == (255, 128, 0, 255)
    assert parse_color([0.5, 0.25, 1.0]) == (128, 64, 255, 255)
    assert parse_color([10, 20, 30, 40]) == (10, 20, 30, 40)
    with pytest.raises(ValueError):
        parse_color([300, 0, 0])
    auto = {n: structure_color(n, (1, 2, 3), c, 0, "auto")[:3] for n, c in (
        ("aorta", "Vessel"), ("common_carotid_artery_left", "Vessel"), ("inferior_vena_cava", "Vessel"),
        ("portal_vein_and_splenic_vein", "Vessel"), ("hepatic_veins", "Vessel"), ("vertebrae_L1", "Bone"),
        ("autochthon_left", "Muscle"), ("liver", "Abdominal"), ("spleen", "Abdominal"))}
    assert auto["aorta"] == auto["common_carotid_artery_left"] == ARTERY
    assert auto["inferior_vena_cava"] == VEIN and auto["portal_vein_and_splenic_vein"] == PORTAL
    assert auto["hepatic_veins"] == HEPATIC_VEIN and auto["vertebrae_L1"] == BONE
    assert auto["autochthon_left"] == MUSCLE and auto["liver"] != auto["spleen"]
    assert structure_color("liver", (1, 2, 3), "Abdominal", 5, "exact") == (1, 2, 3, 255)
    mapping_file = tmp_path / "m.json"
    mapping_file.write_text('{"liver": [0.35, 0.05, 0.04], "aorta": "#d03020"}')
    mapping = load_mapping(mapping_file)
    assert structure_color("liver", (1, 2, 3), "Abdominal", 5, "exact", mapping) == (89, 13, 10, 255)
    classes = {5: LabelClass(5, "liver", (1, 2, 3), "Abdominal"), 52: LabelClass(52, "aorta", (9, 9, 9), "Vessel")}
    assert class_colors(classes, "auto", mapping) == {5: (89, 13, 10, 255), 52: (208, 48, 32, 255)}
    bad = tmp_path / "bad.json"
    bad.write_text('{"liver": "red"}')
    with pytest.raises(ValueError):
        load_mapping(bad)
