"""The Blender scene, built in a bpy subprocess and checked by reopening the .blend in a second one.

Needs a Blender: ``.venv-blender`` (scripts/setup.sh: pip's bpy 5.0.1 with numpy < 2), or
``SEGNODE_BLENDER`` / ``blender`` >= 4.2 on the PATH; without one these tests are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from node.artifacts import mesh as M
from node.artifacts.blender import SCRIPT, SceneOptions, build_scene, find_blender
from node.artifacts.slices import SliceOptions, write_slices
from node.classes import LabelVolume
from node.phantom import TINY, make_phantom

BLENDER = find_blender()
needs_blender = pytest.mark.skipif(
    BLENDER is None, reason="no Blender: run scripts/setup.sh (.venv-blender with bpy 5.0.1) or set SEGNODE_BLENDER")
SAMPLE = Path(os.environ.get("SEGNODE_SAMPLE_DIR", "/work/shared/data/totalsegmentator")) / "example_seg.nii.gz"

# Runs in bpy: opens a .blend and reports what is in it; then registers the slice add-on from its text
# block and moves the slider through the requested (plane, slice) pairs.
INSPECT = textwrap.dedent('''
    import json, sys
    import bpy
    from mathutils import Vector
    args = json.loads(sys.argv[-1])
    bpy.ops.wm.open_mainfile(filepath=args["blend"])
    out = {"objects": {}, "collections": {}, "texts": [t.name for t in bpy.data.texts]}
    for o in bpy.data.objects:
        entry = {"type": o.type, "collections": [c.name for c in o.users_collection]}
        if o.type == "MESH":
            co = [o.matrix_world @ v.co for v in o.data.vertices]
            entry["bbox"] = [[min(c[a] for c in co) for a in range(3)], [max(c[a] for c in co) for a in range(3)]]
            entry["faces"] = len(o.data.polygons)
            if o.data.materials:
                mat = o.data.materials[0]
                bsdf = mat.node_tree.nodes.get("Principled BSDF") if mat.node_tree else None
                entry["base_color"] = list(bsdf.inputs["Base Color"].default_value) if bsdf else None
                entry["diffuse"] = list(mat.diffuse_color)
            entry["label"] = o.get("segnode_label")
        out["objects"][o.name] = entry
    for c in bpy.data.collections:
        out["collections"][c.name] = sorted(ch.name for ch in c.children)
    out["scene_collections"] = sorted(c.name for c in bpy.context.scene.collection.children)
    out["camera"] = bpy.context.scene.camera.name if bpy.context.scene.camera else None
    m = bpy.context.scene.get("segnode_world_from_ras_mm")
    out["world_from_ras_mm"] = list(m) if m is not None else None
    planes = []
    if args.get("moves") and "segnode_dicom_slices.py" in bpy.data.texts:
        bpy.data.texts["segnode_dicom_slices.py"].as_module()  # registers, as on load
        settings = bpy.context.scene.segnode_slices
        out["saved_settings"] = [settings.folder, settings.axis, settings.slice]
        for move in args["moves"]:
            plane, number = move[0], move[1]
            if len(move) > 2:
                settings.folder = move[2]
            settings.axis = plane
            settings.slice = number
            obj = bpy.data.objects["DICOM Slice"]
            world = [list(obj.matrix_world @ v.co) for v in obj.data.vertices]
            image = obj.active_material.node_tree.nodes["segnode image"].image
            planes.append({"plane": plane, "slice": number, "vertices": world,
                           "location": list(obj.matrix_world.translation), "image": bpy.path.abspath(image.filepath)})
    out["planes"] = planes
    print("INSPECT" + json.dumps(out))
''')


def inspect(blend: Path, tmp_path: Path, moves: list[tuple] | None = None) -> dict:
    script = tmp_path / "inspect_blend.py"
    script.write_text(INSPECT, encoding="utf-8")
    argv = BLENDER.argv(script, [json.dumps({"blend": str(blend), "moves": moves or []})])  # type: ignore[union-attr]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("INSPECT"))
    return json.loads(line[len("INSPECT"):])


def linear(c: float) -> float:
    c = c / 255.0
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(TINY)


@needs_blender
def test_phantom_scene_from_a_mesh_folder(phantom, tmp_path: Path) -> None:
    labels = phantom.labels
    index = M.export_meshes(labels, tmp_path / "meshes", M.MeshOptions(export_format="stl", decimate=0.3))
    slices = write_slices(phantom.ct, tmp_path / "slices", SliceOptions(planes=("axial", "coronal")))
    result = build_scene(tmp_path / "meshes", tmp_path / "scene.blend", SceneOptions(group_categories=True),
                         slices=tmp_path / "slices")
    assert result["skipped"] == [] and len(result["objects"]) == len(labels.classes)
    moves = [("axial", 1), ("axial", 25), ("coronal", 10)]
    got = inspect(tmp_path / "scene.blend", tmp_path, moves)

    meshes = {e["name"]: e for e in index["meshes"]}
    objects = {n: o for n, o in got["objects"].items() if o["type"] == "MESH" and n != "DICOM Slice"}
    assert set(objects) == set(meshes)
    assert got["scene_collections"] == ["Organs"]
    categories = {c.category for c in labels.classes.values()}
    assert got["collections"]["Organs"] == sorted(categories)
    for name, o in objects.items():
        e = meshes[name]
        assert o["collections"] == [e["category"]] and o["label"] == e["id"]
        want = [linear(c) for c in labels.classes[e["id"]].color] + [1.0]
        assert np.allclose(o["base_color"], want, atol=1e-4) and np.allclose(o["diffuse"], want, atol=1e-4)
        # Metres in Blender, millimetres in the mesh files: the same box.
        assert np.allclose(np.array(o["bbox"]) * 1000.0, e["bounds"], atol=0.05), name
    assert got["camera"] == "Camera" and "Sun" in got["objects"]
    assert np.allclose(np.array(got["world_from_ras_mm"]).reshape(4, 4), np.diag([1e-3, 1e-3, 1e-3, 1]))

    # The add-on: stored in the file, registered from its text block, the plane follows the slider.
    assert "segnode_dicom_slices.py" in got["texts"]
    assert got["saved_settings"][0] == "//slices" and got["saved_settings"][1] == "axial"
    for move in got["planes"]:
        entry = slices["planes"][move["plane"]]["slices"][move["slice"] - 1]
        expected = np.array(entry["corners"]) * 1e-3  # top-left, top-right, bottom-right, bottom-left
        assert np.allclose(move["vertices"], expected, atol=1e-6), move
        assert np.allclose(move["location"], expected.mean(axis=0), atol=1e-6)
        assert move["image"] == str((tmp_path / "slices" / entry["file"]).resolve())
    axial_1, axial_25 = got["planes"][0], got["planes"][1]
    dz = axial_25["location"][2] - axial_1["location"][2]
    assert dz == pytest.approx(24 * 6.0 * 1e-3, abs=1e-6)  # 24 slices of 6 mm, in metres


@needs_blender
def test_addon_fits_plain_png_folders_to_the_organs(phantom, tmp_path: Path) -> None:
    """A folder of PNGs without slices.json (older scripts'): the image spans the organs' box and moves
    through it with the slice number."""
    meshes = M.label_meshes(phantom.labels, M.MeshOptions(decimate=0.3, workers=1))
    write_slices(phantom.ct, tmp_path / "slices", SliceOptions(planes=("axial",), contact_sheet=False))
    plain = tmp_path / "plain" / "axial"
    plain.mkdir(parents=True)
    for png in sorted((tmp_path / "slices" / "axial").glob("*.png"))[:5]:
        (plain / png.name).write_bytes(png.read_bytes())
    build_scene(meshes, tmp_path / "scene.blend", SceneOptions(), slices=tmp_path / "slices",
                classes=phantom.labels.classes)
    got = inspect(tmp_path / "scene.blend", tmp_path, [("axial", 1, "//plain"), ("axial", 5, "//plain")])
    lo = np.min([m.bounds[0] for m in meshes], axis=0) * 1e-3
    hi = np.max([m.bounds[1] for m in meshes], axis=0) * 1e-3
    first, last = (np.array(p["vertices"]) for p in got["planes"])
    assert np.allclose(first.min(axis=0)[:2], lo[:2], atol=1e-5) and np.allclose(first.max(axis=0)[:2], hi[:2], atol=1e-5)
    assert np.allclose(first[:, 2], lo[2], atol=1e-5) and np.allclose(last[:, 2], hi[2], atol=1e-5)
    assert first[0][0] > first[1][0] and first[0][1] > first[3][1]  # top-left: patient right, anterior
    assert got["planes"][1]["image"].endswith("plain/axial/005.png")


@needs_blender
def test_transforms_auto_palette_mapping_and_remesh(phantom, tmp_path: Path) -> None:
    labels = phantom.labels
    meshes = M.label_meshes(labels, M.MeshOptions(decimate=0.3, workers=1))
    mapping = tmp_path / "colors.json"
    mapping.write_text(json.dumps({"liver": "#102030", "aorta": [0.5, 0.25, 1.0, 1.0]}))
    options = SceneOptions(palette="auto", mapping_json=str(mapping), group_categories=False, scale=2.0,
                           mirror_x=True, rotate_x_deg=90.0, remesh="voxel", voxel_size=0.004, collection="Body")
    result = build_scene(meshes, tmp_path / "scene.blend", options, classes=labels.classes)
    got = inspect(tmp_path / "scene.blend", tmp_path)
    objects = {n: o for n, o in got["objects"].items() if o["type"] == "MESH"}
    assert set(objects) == {m.name for m in meshes} and got["scene_collections"] == ["Body"]
    assert all(o["collections"] == ["Body"] for o in objects.values())
    assert np.allclose(objects["liver"]["base_color"][:3], [linear(0x10), linear(0x20), linear(0x30)], atol=1e-4)
    assert np.allclose(objects["aorta"]["base_color"][:3], [linear(128), linear(64), linear(255)], atol=1e-4)
    assert np.allclose(objects["inferior_vena_cava"]["base_color"][:3], [linear(c) for c in (40, 80, 200)], atol=1e-4)
    assert np.allclose(objects["vertebrae_L1"]["base_color"][:3], [linear(c) for c in (235, 222, 190)], atol=1e-4)
    # world = rotate_x(90) . mirror_x . (scale 2 x mm -> m): (x, y, z) -> (-2x, -2z, 2y) / 1000
    t = np.array([[-1, 0, 0], [0, 0, -1], [0, 1, 0]]) * 2e-3
    for m in meshes:
        corners = np.array([[x, y, z] for x in m.bounds[:, 0] for y in m.bounds[:, 1] for z in m.bounds[:, 2]])
        w = corners @ t.T
        box = np.array(objects[m.name]["bbox"])
        # Voxel remesh at 4 mm (world) moves the surface by up to about one remesh voxel.
        assert np.allclose(box, [w.min(axis=0), w.max(axis=0)], atol=0.006), m.name
    assert result["objects"][0]["faces"] > 0
    assert np.allclose(np.array(got["world_from_ras_mm"]).reshape(4, 4)[:3, :3], t, atol=1e-9)


@needs_blender
@pytest.mark.skipif(not SAMPLE.is_file(), reason="the TotalSegmentator sample is not on this machine")
def test_real_sample_41_structures(tmp_path: Path) -> None:
    from node.nifti import read_nifti
    from node.segment.labelmap import make_class, totalsegmentator_class_map

    volume = read_nifti(SAMPLE)
    names = totalsegmentator_class_map("total") or {}
    array = volume.array.astype(np.uint8)
    classes = {i: make_class(i, names.get(i, f"label_{i}")) for i in (int(v) for v in np.unique(array) if v)}
    labels = LabelVolume(array, volume.geometry, classes=classes)
    meshes = M.label_meshes(labels, M.MeshOptions(decimate=0.1, workers=1))
    assert len(meshes) == 41 and all(m.check.watertight for m in meshes)
    build_scene(meshes, tmp_path / "sample.blend", SceneOptions(group_categories=True), classes=classes)
    got = inspect(tmp_path / "sample.blend", tmp_path)
    objects = {n: o for n, o in got["objects"].items() if o["type"] == "MESH"}
    assert set(objects) == {c.name for c in classes.values()}
    for m in meshes:
        o = objects[m.name]
        assert o["collections"] == [classes[m.label].category]
        assert o["faces"] == len(m.faces)
        assert np.allclose(np.array(o["bbox"]) * 1000.0, m.bounds, atol=0.05)
        assert np.allclose(o["base_color"][:3], [linear(c) for c in classes[m.label].color], atol=1e-4)


@needs_blender
def test_users_command_line_on_a_mesh_folder(phantom, tmp_path: Path) -> None:
    """What a user without segnode runs: blender -b -P blender_scene.py -- --mesh-dir ... --save ..."""
    M.export_meshes(phantom.labels, tmp_path / "meshes", M.MeshOptions(export_format="ply", decimate=0.3))
    argv = BLENDER.argv(SCRIPT, ["--mesh-dir", str(tmp_path / "meshes"), "--save", str(tmp_path / "u.blend"),  # type: ignore[union-attr]
                                 "--palette", "auto", "--group-categories", "--units", "mm"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = inspect(tmp_path / "u.blend", tmp_path)
    assert "Vessel" in got["collections"]["Organs"]
    assert np.allclose(got["objects"]["aorta"]["base_color"][:3], [linear(c) for c in (200, 40, 40)], atol=1e-4)
    # Plain STL and OBJ files (no meshes.json): Blender's importers, no axis change, names from the files.
    plain = tmp_path / "plain"
    plain.mkdir()
    index = {e["name"]: e for e in json.loads((tmp_path / "meshes" / "meshes.json").read_text())["meshes"]}
    for name, suffix in (("liver", ".obj"), ("aorta", ".stl"), ("vertebrae_L1", ".stl")):
        v, f = M.read_mesh(tmp_path / "meshes" / f"{name}.ply")
        M.write_mesh(plain / f"{name}{suffix}", v, f, name)
    argv = BLENDER.argv(SCRIPT, ["--mesh-dir", str(plain), "--save", str(tmp_path / "p.blend"),  # type: ignore[union-attr]
                                 "--palette", "auto", "--group-categories"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = inspect(tmp_path / "p.blend", tmp_path)
    assert got["collections"]["Organs"] == ["Abdominal", "Bone", "Vessel"]
    for name in ("liver", "aorta", "vertebrae_L1"):
        assert np.allclose(np.array(got["objects"][name]["bbox"]) * 1000.0, index[name]["bounds"], atol=0.05), name


@needs_blender
def test_pipeline_outputs_meshes_slices_blender(phantom, tmp_path: Path) -> None:
    from node.nifti import write_nifti
    from node.pipeline import PipelineRequest, run_pipeline
    from node.segment import SegmentRequest
    from node.segment.labelmap import write_class_table

    write_nifti(phantom.labels, tmp_path / "labels.nii.gz")
    write_class_table(phantom.labels.classes, tmp_path / "labels.json")
    request = PipelineRequest(
        segment=SegmentRequest(engine="labelmap", labels_path=tmp_path / "labels.nii.gz"),
        outputs=("meshes", "slices", "blender"),
        stage_options={"meshes": {"decimate": 0.3}, "slices": {"planes": "axial"}},
    )
    result = run_pipeline(phantom.ct, tmp_path / "run", request)
    assert result.ok, result.error
    outputs = result.report["outputs"]
    assert (outputs["meshes"], outputs["slices"], outputs["blender"], outputs["contact_sheet"]) == (
        "meshes", "slices", "scene.blend", "contact_sheet.png")
    assert result.report["qc"]["blender"]["objects"] == len(phantom.labels.classes)
    got = inspect(tmp_path / "run" / "scene.blend", tmp_path, [("axial", 3)])
    assert got["planes"][0]["image"].endswith("slices/axial/003.png")


def test_without_blender_the_stage_is_skipped_and_the_run_goes_on(phantom, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from node.artifacts.blender import BlenderError
    from node.pipeline import PipelineRequest, run_pipeline
    from node.segment import SegmentRequest

    monkeypatch.setenv("SEGNODE_BLENDER", str(tmp_path / "no-such-blender"))
    assert find_blender() is None
    with pytest.raises(BlenderError) as err:
        build_scene([], tmp_path / "x.blend")
    assert err.value.code == "no_blender"
    from node.nifti import write_nifti
    from node.segment.labelmap import write_class_table

    write_nifti(phantom.labels, tmp_path / "labels.nii.gz")
    write_class_table(phantom.labels.classes, tmp_path / "labels.json")
    request = PipelineRequest(segment=SegmentRequest(engine="labelmap", labels_path=tmp_path / "labels.nii.gz"),
                              outputs=("blender",))
    result = run_pipeline(phantom.ct, tmp_path / "run", request)
    assert result.ok and "blender" not in result.report["outputs"]
    stage = next(s for s in result.report["stages"] if s["name"] == "blender")
    assert stage["state"] == "skipped" and "no Blender" in stage["message"]
