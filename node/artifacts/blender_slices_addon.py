"""DICOM slice slider for Blender: shows one PNG slice as an image plane where it lies in the patient.

A sidebar panel (3D Viewport > N > DICOM > "DICOM Slices") with the slice folder, the plane
(axial / coronal / sagittal), the slice number and "Auto-fit". stdlib + bpy + mathutils only.

* A folder written by ``segnode slices`` (it has ``slices.json``): each slice's plane corners are
  known in RAS millimetres; the scene's ``segnode_world_from_ras_mm`` matrix (set by the segnode
  scene builder) maps them to the same world coordinates as the meshes, so the image sits exactly
  on the structures.
* A plain folder of PNGs (``axial/``, ``coronal/``, ``sagittal/`` sub-folders, or one flat folder),
  as older scripts wrote: with "Auto-fit", the image is stretched over the organs' bounding box
  (objects in the scene's organ collection) and moved through it in proportion to the slice number.

Installed three ways: segnode's scene builder stores it in the .blend as a text block that
registers itself when the file opens (Blender asks to allow "Auto Run Python Scripts"; or press
"Run Script" in the Text Editor once); Edit > Preferences > Add-ons > Install; or
``blender scene.blend -P blender_slices_addon.py -- --image-dir DIR``.
"""

import json
import os
import sys

import bpy  # type: ignore[import-not-found]
from bpy.props import (  # type: ignore[import-not-found]
    BoolProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)
from mathutils import Matrix, Vector  # type: ignore[import-not-found]

bl_info = {
    "name": "segnode DICOM slices",
    "author": "segnode",
    "version": (1, 0, 0),
    "blender": (4, 2, 0),
    "location": "View3D > Sidebar > DICOM",
    "description": "Scroll through CT slices (PNG) placed in patient space over segmented meshes",
    "category": "3D View",
}

PLANE_OBJECT = "DICOM Slice"
INDEX = "slices.json"
PLANES = ("axial", "coronal", "sagittal")
_index_cache: dict[str, tuple[float, dict]] = {}


# --- where a slice goes ---------------------------------------------------------------------------


def _folder(settings) -> str:
    return os.path.abspath(bpy.path.abspath(settings.folder)) if settings.folder else ""


def load_index(folder: str) -> dict | None:
    path = os.path.join(folder, INDEX)
    if not os.path.isfile(path):
        return None
    mtime = os.path.getmtime(path)
    cached = _index_cache.get(path)
    if cached is None or cached[0] != mtime:
        with open(path, encoding="utf-8") as f:
            cached = (mtime, json.load(f))
        _index_cache[path] = cached
    return cached[1]


def plain_files(folder: str, plane: str) -> list[str]:
    """PNG files of a plane in a folder without slices.json."""
    sub = os.path.join(folder, plane)
    if os.path.isdir(sub):
        names = [os.path.join(sub, n) for n in os.listdir(sub)]
    else:
        every = [os.path.join(folder, n) for n in os.listdir(folder)] if os.path.isdir(folder) else []
        prefixed = [p for p in every if os.path.basename(p).lower().startswith(plane)]
        names = prefixed or every
    return sorted(p for p in names if p.lower().endswith(".png"))


def world_from_ras(scene) -> Matrix:
    values = scene.get("segnode_world_from_ras_mm")
    if values is None or len(values) != 16:
        return Matrix.Scale(0.001, 4)  # meshes in RAS mm shown in metres
    return Matrix([list(values[r * 4:(r + 1) * 4]) for r in range(4)])


def organ_bounds(scene) -> tuple[Vector, Vector] | None:
    """World bounding box of the mesh objects in the organ collection (all meshes if there is none)."""
    root = bpy.data.collections.get(scene.get("segnode_collection", "Organs"))
    objects = list(root.all_objects) if root is not None else list(scene.objects)
    lo = Vector((float("inf"),) * 3)
    hi = Vector((float("-inf"),) * 3)
    for obj in objects:
        if obj.type != "MESH" or obj.name.startswith(PLANE_OBJECT):
            continue
        for corner in obj.bound_box:
            w = obj.matrix_world @ Vector(corner)
            lo = Vector(min(a, b) for a, b in zip(lo, w))
            hi = Vector(max(a, b) for a, b in zip(hi, w))
    return None if lo.x == float("inf") else (lo, hi)


def slice_count(scene) -> int:
    settings = scene.segnode_slices
    folder = _folder(settings)
    index = load_index(folder) if folder else None
    if index is not None:
        plane = index.get("planes", {}).get(settings.axis)
        return len(plane["slices"]) if plane else 0
    return len(plain_files(folder, settings.axis)) if folder else 0


def slice_placement(scene) -> tuple[list[Vector], str] | None:
    """World corners (top-left, top-right, bottom-right, bottom-left) and the PNG of the chosen slice."""
    settings = scene.segnode_slices
    folder = _folder(settings)
    if not folder:
        return None
    index = load_index(folder)
    if index is not None:
        plane = index.get("planes", {}).get(settings.axis)
        if not plane or not plane["slices"]:
            return None
        entries = plane["slices"]
        entry = entries[max(1, min(settings.slice, len(entries))) - 1]
        m = world_from_ras(scene)
        corners = [m @ Vector(c) for c in entry["corners"]]
        return corners, os.path.join(folder, entry["file"])
    files = plain_files(folder, settings.axis)
    if not files:
        return None
    n = max(1, min(settings.slice, len(files)))
    box = organ_bounds(scene) if settings.auto_fit else None
    if box is None:  # no organs to fit: a 0.3 m square at the origin, slices 1 mm apart
        box = (Vector((-0.15, -0.15, -0.15)), Vector((0.15, 0.15, 0.15)))
    lo, hi = box
    t = 0.5 if len(files) == 1 else (n - 1) / (len(files) - 1)
    # In RAS-like world axes: x patient left->right is -x..+x, y posterior->anterior, z feet->head.
    if settings.axis == "axial":
        z = lo.z + t * (hi.z - lo.z)
        corners = [Vector((hi.x, hi.y, z)), Vector((lo.x, hi.y, z)), Vector((lo.x, lo.y, z)), Vector((hi.x, lo.y, z))]
    elif settings.axis == "coronal":
        y = hi.y - t * (hi.y - lo.y)
        corners = [Vector((hi.x, y, hi.z)), Vector((lo.x, y, hi.z)), Vector((lo.x, y, lo.z)), Vector((hi.x, y, lo.z))]
    else:
        x = hi.x - t * (hi.x - lo.x)
        corners = [Vector((x, hi.y, hi.z)), Vector((x, lo.y, hi.z)), Vector((x, lo.y, lo.z)), Vector((x, hi.y, lo.z))]
    return corners, files[n - 1]


# --- the image plane ------------------------------------------------------------------------------


def _plane_material(image, opacity: float):
    mat = bpy.data.materials.get(PLANE_OBJECT) or bpy.data.materials.new(PLANE_OBJECT)
    if mat.node_tree is None:
        mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    tex = nodes.get("segnode image")
    if tex is None:
        nodes.clear()
        tex = nodes.new("ShaderNodeTexImage")
        tex.name = "segnode image"
        tex.interpolation = "Closest"
        emit = nodes.new("ShaderNodeEmission")
        transparent = nodes.new("ShaderNodeBsdfTransparent")
        mix = nodes.new("ShaderNodeMixShader")
        mix.name = "segnode mix"
        out = nodes.new("ShaderNodeOutputMaterial")
        links.new(tex.outputs["Color"], emit.inputs["Color"])
        links.new(transparent.outputs[0], mix.inputs[1])
        links.new(emit.outputs[0], mix.inputs[2])
        links.new(mix.outputs[0], out.inputs["Surface"])
    tex.image = image
    nodes["segnode mix"].inputs[0].default_value = opacity
    if hasattr(mat, "surface_render_method"):
        mat.surface_render_method = "BLENDED" if opacity < 1.0 else "DITHERED"
    return mat


def update_plane(scene) -> bpy.types.Object | None:
    """Create or move the image plane for the scene's current settings."""
    placed = slice_placement(scene)
    if placed is None:
        return None
    corners, path = placed
    centre = sum(corners, Vector()) / 4.0
    obj = bpy.data.objects.get(PLANE_OBJECT)
    if obj is None:
        me = bpy.data.meshes.new(PLANE_OBJECT)
        me.from_pydata([(0, 0, 0)] * 4, [], [(3, 2, 1, 0)])  # bottom-left, bottom-right, top-right, top-left
        uv = me.uv_layers.new(name="UVMap")
        for loop, (u, v) in zip(me.loops, ((0, 0), (1, 0), (1, 1), (0, 1))):
            uv.data[loop.index].uv = (u, v)
        obj = bpy.data.objects.new(PLANE_OBJECT, me)
        scene.collection.objects.link(obj)
    me = obj.data
    obj.matrix_world = Matrix.Translation(centre)
    # vertex 0..3 = top-left, top-right, bottom-right, bottom-left
    for vertex, corner in zip(me.vertices, corners):
        vertex.co = corner - centre
    me.update()
    image = bpy.data.images.load(path, check_existing=True)
    mat = _plane_material(image, scene.segnode_slices.opacity)
    if not me.materials:
        me.materials.append(mat)
    else:
        me.materials[0] = mat
    obj["segnode_slice_file"] = path
    return obj


def show_middle(scene) -> None:
    """Select the middle slice of the current plane (and show it)."""
    n = slice_count(scene)
    scene.segnode_slices.slice = max(1, (n + 1) // 2)
    update_plane(scene)


def _changed(self, context) -> None:
    scene = context.scene if context is not None and context.scene is not None else bpy.context.scene
    try:
        update_plane(scene)
    except Exception as exc:  # noqa: BLE001 - a missing PNG must not break the UI
        print(f"segnode slices: {exc}")


# --- UI -------------------------------------------------------------------------------------------


class SEGNODE_SliceSettings(bpy.types.PropertyGroup):
    folder: StringProperty(name="Folder", subtype="DIR_PATH", default="//slices", update=_changed)
    axis: EnumProperty(
        name="Plane", items=[("axial", "Axial", ""), ("coronal", "Coronal", ""), ("sagittal", "Sagittal", "")],
        default="axial", update=_changed,
    )
    slice: IntProperty(name="Slice", min=1, default=1, update=_changed)
    auto_fit: BoolProperty(name="Auto-fit to organs", default=True, update=_changed,
                           description="Plain PNG folders: stretch the image over the organs' bounds")
    opacity: FloatProperty(name="Opacity", min=0.0, max=1.0, default=1.0, update=_changed)


class SEGNODE_OT_slice_step(bpy.types.Operator):
    """Show the next or previous slice"""

    bl_idname = "segnode.slice_step"
    bl_label = "Step slice"
    step: IntProperty(default=1)

    def execute(self, context):
        settings = context.scene.segnode_slices
        settings.slice = max(1, min(settings.slice + self.step, max(slice_count(context.scene), 1)))
        return {"FINISHED"}


class SEGNODE_OT_slice_middle(bpy.types.Operator):
    """Show the middle slice of the plane"""

    bl_idname = "segnode.slice_middle"
    bl_label = "Middle slice"

    def execute(self, context):
        show_middle(context.scene)
        return {"FINISHED"}


class SEGNODE_PT_slices(bpy.types.Panel):
    bl_label = "DICOM Slices"
    bl_idname = "SEGNODE_PT_slices"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "DICOM"

    def draw(self, context):
        settings = context.scene.segnode_slices
        layout = self.layout
        layout.prop(settings, "folder")
        layout.prop(settings, "axis", expand=True)
        row = layout.row(align=True)
        row.operator("segnode.slice_step", text="", icon="TRIA_LEFT").step = -1
        row.prop(settings, "slice")
        row.operator("segnode.slice_step", text="", icon="TRIA_RIGHT").step = 1
        count = slice_count(context.scene)
        layout.label(text=f"{count} slices" if count else "no slices in this folder")
        layout.prop(settings, "auto_fit")
        layout.prop(settings, "opacity", slider=True)
        layout.operator("segnode.slice_middle")


CLASSES = (SEGNODE_SliceSettings, SEGNODE_OT_slice_step, SEGNODE_OT_slice_middle, SEGNODE_PT_slices)


def register() -> None:
    for cls in CLASSES:
        existing = getattr(bpy.types, cls.__name__, None)
        if existing is not None:  # registered before (the text block run twice): replace it
            try:
                bpy.utils.unregister_class(existing)
            except RuntimeError:
                pass
        bpy.utils.register_class(cls)
    bpy.types.Scene.segnode_slices = PointerProperty(type=SEGNODE_SliceSettings)


def unregister() -> None:
    if hasattr(bpy.types.Scene, "segnode_slices"):
        del bpy.types.Scene.segnode_slices
    for cls in reversed(CLASSES):
        existing = getattr(bpy.types, cls.__name__, None)
        if existing is not None:
            bpy.utils.unregister_class(existing)


if __name__ == "__main__":  # blender scene.blend -P blender_slices_addon.py -- --image-dir DIR
    register()
    args = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    if "--image-dir" in args and args.index("--image-dir") + 1 < len(args):
        bpy.context.scene.segnode_slices.folder = args[args.index("--image-dir") + 1]
        show_middle(bpy.context.scene)
