"""Build a Blender scene (.blend) of segmented structures. Runs inside Blender: stdlib, bpy, mathutils.

Two ways to run it, the same script::

    .venv-blender/bin/python blender_scene.py --manifest scene.json          # pip bpy (segnode does this)
    blender -b --factory-startup -P blender_scene.py -- --manifest scene.json  # a user's Blender >= 4.2

or, without segnode, straight from a folder of meshes (``meshes.json`` there gives names, colours and
categories; plain STL/OBJ/PLY files are imported with Blender's own importers)::

    blender -b -P blender_scene.py -- --mesh-dir meshes/ --save scene.blend --palette auto \
        --group-categories --units mm --scale 1 --rotate-x-deg 0 --mirror-x --remesh none

The manifest (JSON; relative paths are relative to it)::

    {"version": 1, "output": "scene.blend", "result": "result.json",
     "units": "mm", "space": "RAS", "scale": 1.0, "rotate_x_deg": 0.0, "mirror_x": false,
     "collection": "Organs", "group_categories": true, "shade_smooth": true,
     "remesh": {"mode": "none" | "voxel" | "quad" | "smooth" | "sharp" | "blocks", "voxel_size": 0.002,
                "octree_depth": 7},      (Remesh modifier, applied; "quad" is voxel: Blender's
                                          QuadriFlow is an interactive operator, not a modifier)
     "camera": true, "light": true,
     "objects": [{"name": "liver", "label": 5, "category": "Abdominal", "color": [r, g, b, a],
                  "file": "meshes/liver.ply"}, ...],
     "slices": {"folder": "//slices", "addon": "blender_slices_addon.py", "plane": "axial"}}

``color`` is sRGB 0..255 (alpha optional), made linear here for Blender's materials. Mesh files: a
binary little-endian PLY with float x/y/z and ``list uchar int vertex_indices`` (what segnode writes)
is read directly into the mesh (``foreach_set``, no importer); anything else goes through
``bpy.ops.wm.ply_import`` / ``stl_import`` / ``obj_import``.

World coordinates: mesh coordinates x units (mm -> m) x scale, mirrored in x (``mirror_x``), then
rotated about x (``rotate_x_deg``), baked into the vertices (objects keep identity transforms). The
scene keeps that matrix from RAS millimetres (``scene["segnode_world_from_ras_mm"]``, row-major) so
the slice add-on puts PNG slices in the same place. The camera looks at the structures from the
patient's front (anterior, +y in RAS), head up; a sun light shines from behind the camera.
"""

from __future__ import annotations

import argparse
import array
import json
import math
import os
import sys
import time
import warnings

import bpy  # type: ignore[import-not-found]
from mathutils import Matrix, Vector  # type: ignore[import-not-found]

CATEGORIES = ("Bone", "Muscle", "Thoracic", "Abdominal", "Vessel", "Other")
ADDON_TEXT = "segnode_dicom_slices.py"


# --- colours and transforms -----------------------------------------------------------------------


def srgb_to_linear(c: float) -> float:
    """One sRGB component (0..1) in Blender's scene-linear space."""
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def linear_rgba(color: list | tuple | None) -> tuple[float, float, float, float]:
    if not color:
        color = (180, 180, 180)
    r, g, b = (srgb_to_linear(float(c) / 255.0) for c in color[:3])
    a = float(color[3]) / 255.0 if len(color) > 3 else 1.0
    return (r, g, b, a)


def world_matrix(manifest: dict) -> Matrix:
    """Mesh coordinates -> Blender world (see the module docstring)."""
    unit = 0.001 if manifest.get("units", "mm") == "mm" else 1.0
    s = unit * float(manifest.get("scale", 1.0))
    m = Matrix.Scale(s, 4)
    if manifest.get("mirror_x"):
        m = Matrix.Diagonal((-1.0, 1.0, 1.0, 1.0)) @ m
    angle = float(manifest.get("rotate_x_deg", 0.0))
    if angle:
        m = Matrix.Rotation(math.radians(angle), 4, "X") @ m
    return m


def ras_to_mesh(manifest: dict) -> Matrix:
    """RAS millimetres -> mesh coordinates (the meshes' space and units)."""
    unit = 0.001 if manifest.get("units", "mm") == "m" else 1.0
    m = Matrix.Scale(unit, 4)
    if manifest.get("space", "RAS") == "LPS":
        m = Matrix.Diagonal((-1.0, -1.0, 1.0, 1.0)) @ m
    return m


# For a folder without meshes.json: categories and "auto" colours from structure names (a short
# version of node.artifacts.palette, which this script cannot import).
_CATEGORY_WORDS = (
    ("Vessel", ("aorta", "artery", "arteries", "vein", "vena", "portal", "trunk")),
    ("Bone", ("vertebra", "rib", "sacrum", "femur", "hip", "humerus", "scapula", "clavicula", "sternum", "skull",
              "cartilage", "bone")),
    ("Muscle", ("muscle", "gluteus", "iliopsoas", "autochthon", "psoas")),
    ("Thoracic", ("lung", "heart", "atri", "ventricle", "trachea", "esophagus", "myocardium")),
    ("Abdominal", ("liver", "spleen", "kidney", "pancrea", "gallbladder", "stomach", "duodenum", "bowel", "colon",
                   "adrenal", "bladder", "prostate")),
)
_AUTO = {"artery": (200, 40, 40), "vein": (40, 80, 200), "portal": (20, 30, 140), "Bone": (235, 222, 190),
         "Muscle": (150, 45, 40)}


def guess_category(name: str) -> str:
    n = name.lower()
    for category, words in _CATEGORY_WORDS:
        if any(w in n for w in words):
            return category
    return "Other"


def guess_color(name: str, index: int) -> list[int]:
    n, category = name.lower(), guess_category(name)
    if "portal" in n:
        return list(_AUTO["portal"])
    if any(w in n for w in ("artery", "arteries", "aorta", "trunk")):
        return list(_AUTO["artery"])
    if any(w in n for w in ("vein", "vena")):
        return list(_AUTO["vein"])
    if category in _AUTO:
        return list(_AUTO[category])
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895 + 0.1) % 1.0, 0.55, 0.85)
    return [round(r * 255), round(g * 255), round(b * 255)]


# --- reading meshes -----------------------------------------------------------------------------


def _read_plain_ply(path: str) -> tuple[array.array, array.array] | None:
    """Vertices (flat float32) and triangle indices (flat int32) of a segnode-style binary PLY, else None."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply") or end < 0:
        return None
    header = [line.split() for line in data[:end].decode("ascii", "replace").splitlines()]
    header = [h for h in header if h and h[0] != "comment"]
    nv = nf = -1
    expected = [["ply"], ["format", "binary_little_endian", "1.0"], ["element", "vertex"], ["property", "float", "x"],
                ["property", "float", "y"], ["property", "float", "z"], ["element", "face"],
                ["property", "list", "uchar", "int", "vertex_indices"]]
    if len(header) != len(expected):
        return None
    for got, want in zip(header, expected):
        if got[: len(want)] != want:
            return None
        if want[:2] == ["element", "vertex"]:
            nv = int(got[2])
        if want[:2] == ["element", "face"]:
            nf = int(got[2])
    body = end + len(b"end_header\n")
    verts = array.array("f")
    verts.frombytes(data[body: body + 12 * nv])
    raw = data[body + 12 * nv: body + 12 * nv + 13 * nf]
    if len(raw) != 13 * nf or (nf and raw[0::13] != b"\x03" * nf):
        return None  # not all triangles
    packed = bytearray(12 * nf)
    for b in range(12):  # drop each face's count byte: strided copies run at C speed
        packed[b::12] = raw[1 + b::13]
    faces = array.array("i")
    faces.frombytes(bytes(packed))
    if sys.byteorder != "little":
        verts.byteswap()
        faces.byteswap()
    return verts, faces


def mesh_from_arrays(name: str, verts: array.array, faces: array.array) -> bpy.types.Mesh:
    me = bpy.data.meshes.new(name)
    nv, nf = len(verts) // 3, len(faces) // 3
    me.vertices.add(nv)
    me.vertices.foreach_set("co", verts)
    me.loops.add(3 * nf)
    me.loops.foreach_set("vertex_index", faces)
    me.polygons.add(nf)
    me.polygons.foreach_set("loop_start", array.array("i", range(0, 3 * nf, 3)))
    me.validate(clean_customdata=False)  # an index out of range in a foreign file must not crash Blender
    me.update()
    return me


def _import_file(path: str) -> bpy.types.Object | None:
    """A mesh file through Blender's importer; the imported objects joined into one."""
    before = set(bpy.data.objects)
    ext = os.path.splitext(path)[1].lower()
    op = {".stl": bpy.ops.wm.stl_import, ".obj": bpy.ops.wm.obj_import, ".ply": bpy.ops.wm.ply_import}[ext]
    # Mesh files of patient space are z-up: no axis conversion (OBJ's default would turn y-up to z-up).
    op(filepath=path, forward_axis="Y", up_axis="Z")
    new = [o for o in bpy.data.objects if o not in before and o.type == "MESH"]
    if not new:
        return None
    for o in new:  # bake any importer transform (e.g. OBJ's Y-up) into the vertices
        o.data.transform(o.matrix_world)
        o.matrix_world = Matrix.Identity(4)
    if len(new) > 1:
        with bpy.context.temp_override(active_object=new[0], selected_editable_objects=new, object=new[0]):
            bpy.ops.object.join()
    obj = new[0]
    for c in list(obj.users_collection):
        c.objects.unlink(obj)
    return obj


# --- the scene ------------------------------------------------------------------------------------


def _collection(name: str, parent: bpy.types.Collection) -> bpy.types.Collection:
    c = bpy.data.collections.get(name)
    if c is None:
        c = bpy.data.collections.new(name)
    if c.name not in parent.children:
        parent.children.link(c)
    return c


def _material(name: str, rgba: tuple[float, float, float, float]) -> bpy.types.Material:
    mat = bpy.data.materials.new(name)
    if mat.node_tree is None:  # Blender 4.x: materials start without nodes (5.x: always with)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            mat.use_nodes = True
    bsdf = mat.node_tree.nodes.get("Principled BSDF")
    if bsdf is None:
        bsdf = mat.node_tree.nodes.new("ShaderNodeBsdfPrincipled")
        out = mat.node_tree.nodes.get("Material Output") or mat.node_tree.nodes.new("ShaderNodeOutputMaterial")
        mat.node_tree.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    bsdf.inputs["Base Color"].default_value = rgba
    bsdf.inputs["Alpha"].default_value = rgba[3]
    bsdf.inputs["Roughness"].default_value = 0.45
    mat.diffuse_color = rgba  # the solid viewport's colour
    if rgba[3] < 1.0:
        if hasattr(mat, "surface_render_method"):
            mat.surface_render_method = "BLENDED"
        elif hasattr(mat, "blend_method"):
            mat.blend_method = "BLEND"
    return mat


def _remesh(obj: bpy.types.Object, remesh: dict) -> None:
    mode = str(remesh.get("mode", "none")).upper()
    if mode in ("NONE", ""):
        return
    mod = obj.modifiers.new("segnode_remesh", "REMESH")
    mod.mode = "VOXEL" if mode == "QUAD" else mode
    if mod.mode == "VOXEL":
        mod.voxel_size = float(remesh.get("voxel_size") or 0.002)
        mod.adaptivity = float(remesh.get("adaptivity", 0.0))
    else:
        mod.octree_depth = int(remesh.get("octree_depth", 7))
        mod.use_remove_disconnected = False
    depsgraph = bpy.context.evaluated_depsgraph_get()
    new = bpy.data.meshes.new_from_object(obj.evaluated_get(depsgraph))
    old = obj.data
    obj.modifiers.remove(mod)
    obj.data = new
    for m in old.materials:
        new.materials.append(m)
    new.name = old.name
    bpy.data.meshes.remove(old)


def _bounds(objects: list) -> tuple[list[float], list[float]] | None:
    lo = [math.inf] * 3
    hi = [-math.inf] * 3
    for obj in objects:
        co = array.array("f", bytes(4 * 3 * len(obj.data.vertices)))
        obj.data.vertices.foreach_get("co", co)
        if not len(co):
            continue
        for axis in range(3):
            values = co[axis::3]
            lo[axis] = min(lo[axis], min(values))
            hi[axis] = max(hi[axis], max(values))
    if lo[0] == math.inf:
        return None
    return lo, hi


def _camera_and_light(scene, lo_world: list[float], hi_world: list[float], manifest: dict,
                      world_from_ras: Matrix) -> None:
    """A camera in front of the patient (anterior), head up, framing the structures; a sun behind it."""
    ras_from_world = world_from_ras.inverted()
    corners = [ras_from_world @ Vector((x, y, z)) for x in (lo_world[0], hi_world[0])
               for y in (lo_world[1], hi_world[1]) for z in (lo_world[2], hi_world[2])]
    lo = [min(c[a] for c in corners) for a in range(3)]
    hi = [max(c[a] for c in corners) for a in range(3)]
    centre = Vector([(lo[a] + hi[a]) / 2 for a in range(3)])
    extent = [hi[a] - lo[a] for a in range(3)]
    cam_data = bpy.data.cameras.new("Camera")
    cam_data.lens = 50.0
    half_fov = math.atan(cam_data.sensor_width / 2.0 / cam_data.lens)
    distance = (max(extent[0], extent[2]) / 2.0) / math.tan(half_fov) * 1.15 + extent[1] / 2.0
    eye_ras = centre + Vector((0.0, distance, 0.0))  # anterior of the patient
    eye = world_from_ras @ eye_ras
    target = world_from_ras @ centre
    up = (world_from_ras.to_3x3() @ Vector((0.0, 0.0, 1.0))).normalized()
    forward = (target - eye).normalized()
    right = forward.cross(up).normalized()
    true_up = right.cross(forward)
    rot = Matrix((right, true_up, -forward)).transposed()  # camera looks along its -Z, up is +Y
    cam = bpy.data.objects.new("Camera", cam_data)
    cam.matrix_world = Matrix.Translation(eye) @ rot.to_4x4()
    span = (eye - target).length + max(extent) * world_from_ras.median_scale
    cam_data.clip_start = max(span * 1e-4, 1e-4)
    cam_data.clip_end = span * 4.0
    scene.collection.objects.link(cam)
    scene.camera = cam
    if manifest.get("light", True):
        sun_data = bpy.data.lights.new("Sun", "SUN")
        sun_data.energy = 3.0
        sun = bpy.data.objects.new("Sun", sun_data)
        sun.matrix_world = Matrix.Translation(eye) @ rot.to_4x4()
        scene.collection.objects.link(sun)


def _install_addon(scene, slices: dict, base: str) -> None:
    """The slice add-on as a text block registered on load; its settings pointed at the slices."""
    source = slices.get("addon") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "blender_slices_addon.py")
    if not os.path.isabs(source):
        source = os.path.join(base, source)
    with open(source, encoding="utf-8") as f:
        code = f.read()
    text = bpy.data.texts.get(ADDON_TEXT) or bpy.data.texts.new(ADDON_TEXT)
    text.clear()
    # Blender imports a text block marked "Register" when the file opens (with "Auto Run Python
    # Scripts" allowed) but calls nothing in it: the trailer registers the panel.
    text.write(code + "\n\n# In a .blend: registered when the file opens (Text > Register).\nregister()\n")
    text.use_module = True
    module = text.as_module()
    settings = scene.segnode_slices
    settings.folder = slices.get("folder", "//slices")
    if slices.get("plane"):
        settings.axis = slices["plane"]
    module.show_middle(scene)


def build(manifest: dict, base: str) -> dict:
    started = time.perf_counter()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.unit_settings.system = "METRIC"
    world = bpy.data.worlds.new("World")
    world.color = (0.05, 0.05, 0.06)
    scene.world = world
    to_world = world_matrix(manifest)
    world_from_ras = to_world @ ras_to_mesh(manifest)
    scene["segnode_world_from_ras_mm"] = [world_from_ras[r][c] for r in range(4) for c in range(4)]
    scene["segnode_collection"] = manifest.get("collection") or "Organs"
    mirrored = to_world.determinant() < 0
    root = _collection(manifest.get("collection") or "Organs", scene.collection)
    group = bool(manifest.get("group_categories"))
    made = []
    skipped = []
    for entry in manifest.get("objects", []):
        name = entry["name"]
        path = entry["file"] if os.path.isabs(entry["file"]) else os.path.join(base, entry["file"])
        arrays = _read_plain_ply(path) if path.lower().endswith(".ply") else None
        if arrays is not None:
            if not arrays[1]:
                skipped.append(name)
                continue
            obj = bpy.data.objects.new(name, mesh_from_arrays(name, *arrays))
        else:
            obj = _import_file(path)
            if obj is None or not len(obj.data.polygons):
                skipped.append(name)
                continue
            obj.name = name
            obj.data.name = name
        me = obj.data
        me.transform(to_world)
        if mirrored:
            me.flip_normals()
        if manifest.get("shade_smooth", True):
            me.polygons.foreach_set("use_smooth", [True] * len(me.polygons))
        rgba = linear_rgba(entry.get("color"))
        me.materials.append(_material(name, rgba))
        obj["segnode_label"] = int(entry.get("label", 0))
        obj["segnode_category"] = entry.get("category", "Other")
        obj["segnode_color_srgb"] = list(entry.get("color") or [180, 180, 180, 255])
        target = root
        if group:
            category = entry.get("category") if entry.get("category") in CATEGORIES else "Other"
            target = _collection(category, root)
        target.objects.link(obj)
        _remesh(obj, manifest.get("remesh") or {})
        made.append(obj)
    box = _bounds(made)
    if box is not None and manifest.get("camera", True):
        _camera_and_light(scene, box[0], box[1], manifest, world_from_ras)
    if manifest.get("slices"):
        _install_addon(scene, manifest["slices"], base)
    output = manifest["output"] if os.path.isabs(manifest["output"]) else os.path.join(base, manifest["output"])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=os.path.abspath(output))
    result = {
        "output": os.path.abspath(output),
        "blender": bpy.app.version_string,
        "objects": [{"name": o.name, "collection": o.users_collection[0].name, "vertices": len(o.data.vertices),
                     "faces": len(o.data.polygons)} for o in made],
        "skipped": skipped,
        "bounds": None if box is None else [box[0], box[1]],
        "world_from_ras_mm": list(scene["segnode_world_from_ras_mm"]),
        "slices": bool(manifest.get("slices")),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if manifest.get("result"):
        path = manifest["result"] if os.path.isabs(manifest["result"]) else os.path.join(base, manifest["result"])
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


# --- command line -------------------------------------------------------------------------------


def manifest_from_folder(args: argparse.Namespace) -> dict:
    """A manifest for ``--mesh-dir``: ``meshes.json`` when the folder has one, else every mesh file."""
    folder = os.path.abspath(args.mesh_dir)
    index_path = os.path.join(folder, "meshes.json")
    objects = []
    units, space = args.units, "RAS"
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        units = args.units or index.get("units", "mm")
        space = index.get("space", "RAS")
        for e in index.get("meshes", []):
            if e.get("empty"):
                continue
            color = e.get("color_auto") if args.palette == "auto" else (e.get("color") or e.get("color_auto"))
            objects.append({"name": e["name"], "label": e.get("id", 0), "category": e.get("category", "Other"),
                            "color": color, "file": os.path.join(folder, e["file"])})
    else:
        for n, fname in enumerate(sorted(os.listdir(folder)), 1):
            stem, ext = os.path.splitext(fname)
            if ext.lower() in (".stl", ".obj", ".ply"):
                objects.append({"name": stem, "label": n, "category": guess_category(stem),
                                "color": guess_color(stem, n) if args.palette == "auto" else None,
                                "file": os.path.join(folder, fname)})
    if args.mapping_json:
        with open(args.mapping_json, encoding="utf-8") as f:
            mapping = json.load(f)
        for o in objects:
            if o["name"] in mapping:
                value = mapping[o["name"]]
                floats = all(isinstance(v, float) for v in value) and all(v <= 1.0 for v in value)
                o["color"] = [round(v * 255) for v in value] if floats else list(value)
    return {
        "version": 1, "output": os.path.abspath(args.save), "units": units or "mm", "space": space,
        "scale": args.scale, "rotate_x_deg": args.rotate_x_deg, "mirror_x": args.mirror_x,
        "collection": args.collection, "group_categories": args.group_categories,
        "remesh": {"mode": args.remesh, "voxel_size": args.voxel_size}, "objects": objects,
        "slices": {"folder": args.slices} if args.slices else None,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="blender_scene.py", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", help="JSON manifest (see the module docstring)")
    parser.add_argument("--mesh-dir", "--stl-dir", dest="mesh_dir", help="folder of meshes (no manifest)")
    parser.add_argument("--save", help="output .blend (with --mesh-dir)")
    parser.add_argument("--units", choices=("m", "mm"), default=None)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--collection", default="Organs")
    parser.add_argument("--group-categories", action="store_true")
    parser.add_argument("--palette", choices=("exact", "auto"), default="exact")
    parser.add_argument("--mapping-json")
    parser.add_argument("--rotate-x-deg", type=float, default=0.0)
    parser.add_argument("--mirror-x", action="store_true")
    parser.add_argument("--remesh", choices=("none", "voxel", "quad", "smooth", "sharp", "blocks"), default="none")
    parser.add_argument("--voxel-size", type=float, default=None, help="remesh voxel size, Blender units")
    parser.add_argument("--slices", help="slice folder for the add-on (e.g. //slices)")
    args = parser.parse_args(argv)
    if args.manifest:
        with open(args.manifest, encoding="utf-8") as f:
            manifest = json.load(f)
        base = os.path.dirname(os.path.abspath(args.manifest))
    elif args.mesh_dir and args.save:
        manifest, base = manifest_from_folder(args), os.getcwd()
    else:
        parser.error("give --manifest, or --mesh-dir and --save")
    result = build(manifest, base)
    print(f"segnode: saved {result['output']}: {len(result['objects'])} objects in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    sys.exit(main(argv))
