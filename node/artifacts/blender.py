"""The node's side of the Blender scene: find Blender, write the manifest, run the scene builder.

pip's ``bpy`` (5.0.1, cp311) needs numpy < 2 and the node runs numpy 2, so the builder
(:mod:`node.artifacts.blender_scene`, stdlib + bpy only) always runs in another process:

1. a Python with ``bpy`` installed: ``.venv-blender/bin/python`` (``scripts/setup.sh`` makes it), or
2. a Blender >= 4.2 binary: ``blender -b --factory-startup -P blender_scene.py -- --manifest m.json``.

Which one: ``blender=`` (a stage option or ``segnode blender --blender PATH``), else the environment
variable ``SEGNODE_BLENDER`` (a Blender binary, a Python with bpy, or a virtual environment folder),
else ``.venv-blender`` beside the node's source tree or in the working folder, else ``blender`` on
the PATH.

The meshes go to the builder as binary PLY files (the builder reads them straight into Blender
meshes); a folder of STL/OBJ meshes is converted first. Colours are settled here (palette, mapping
file), so the manifest carries final sRGB colours.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.artifacts.mesh import Mesh, file_stem, read_mesh, read_mesh_folder, write_ply
from node.artifacts.palette import PALETTES, auto_color, load_mapping, structure_color

SCRIPT = Path(__file__).with_name("blender_scene.py")
ADDON = Path(__file__).with_name("blender_slices_addon.py")
MIN_VERSION = (4, 2)
REMESH_MODES = ("none", "voxel", "quad", "smooth", "sharp", "blocks")


class BlenderError(Exception):
    """The scene could not be built; ``code`` is stable for programs."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class BlenderCommand:
    """How to run a bpy script: ``kind`` is ``python`` (a Python with bpy) or ``blender`` (a binary)."""

    kind: str
    executable: str

    def argv(self, script: Path, args: list[str]) -> list[str]:
        if self.kind == "python":
            return [self.executable, str(script), *args]
        return [self.executable, "-b", "--factory-startup", "-noaudio", "-P", str(script), "--", *args]


@dataclass(frozen=True)
class SceneOptions:
    """What ``segnode blender`` and the ``blender`` output stage build (the tool chain's flag names)."""

    palette: str = "exact"
    mapping_json: str | None = None
    collection: str = "Organs"
    group_categories: bool = False
    #: Uniform scale after the unit conversion (mm meshes become metres in Blender).
    scale: float = 1.0
    rotate_x_deg: float = 0.0
    mirror_x: bool = False
    remesh: str = "none"
    #: Remesh voxel size in Blender units (metres at scale 1); default 2 mm.
    voxel_size: float | None = None
    octree_depth: int = 7
    shade_smooth: bool = True
    camera: bool = True
    light: bool = True
    #: Blender binary, Python with bpy, or venv folder (see the module docstring).
    blender: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.palette not in PALETTES:
            raise ValueError(f"palette must be one of {', '.join(PALETTES)}, got {self.palette!r}")
        if self.remesh not in REMESH_MODES:
            raise ValueError(f"remesh must be one of {', '.join(REMESH_MODES)}, got {self.remesh!r}")
        if self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> SceneOptions:
        known = set(cls.__dataclass_fields__)
        values = {k.replace("-", "_"): v for k, v in options.items() if k.replace("-", "_") in known}
        return cls(**values)


# --- finding Blender --------------------------------------------------------------------------------


def _python_with_bpy(python: Path) -> bool:
    if not (python.is_file() and os.access(python, os.X_OK)):
        return False
    venv = python.parent.parent
    return any(venv.glob("lib/python3*/site-packages/bpy/__init__*"))


def _blender_version(binary: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"Blender (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _candidate(path: str) -> BlenderCommand | None:
    p = Path(path).expanduser()
    if p.is_dir():
        python = p / "bin" / "python"
        return BlenderCommand("python", str(python)) if _python_with_bpy(python) else None
    if "blender" in p.name.lower() and not p.name.lower().startswith("python"):
        exe = shutil.which(str(p)) or (str(p) if p.is_file() else None)
        if exe is None:
            return None
        version = _blender_version(exe)
        return BlenderCommand("blender", exe) if version and version >= MIN_VERSION else None
    return BlenderCommand("python", str(p)) if _python_with_bpy(p) else None


def find_blender(explicit: str | Path | None = None) -> BlenderCommand | None:
    """The first usable Blender (see the module docstring), or None."""
    if explicit:
        return _candidate(str(explicit))
    env = os.environ.get("SEGNODE_BLENDER")
    if env:
        return _candidate(env)
    roots = [Path(__file__).resolve().parents[2], Path.cwd()]
    for root in roots:
        python = root / ".venv-blender" / "bin" / "python"
        if _python_with_bpy(python):
            return BlenderCommand("python", str(python))
    binary = shutil.which("blender")
    if binary:
        version = _blender_version(binary)
        if version and version >= MIN_VERSION:
            return BlenderCommand("blender", binary)
    return None


def no_blender_message() -> str:
    return ("no Blender found: run scripts/setup.sh (it makes .venv-blender with pip's bpy 5.0.1), or set "
            "SEGNODE_BLENDER to a Blender >= 4.2 binary or a Python with bpy")


# --- the manifest ---------------------------------------------------------------------------------


def _entry(name: str, label: int, category: str, exact: Any, options: SceneOptions,
           mapping: dict[str, tuple[int, int, int, int]] | None) -> dict[str, Any]:
    color = structure_color(name, exact, category, label, options.palette, mapping)
    return {"name": name, "label": int(label), "category": category, "color": list(color)}


def _manifest(objects: list[dict[str, Any]], output: Path, options: SceneOptions, units: str, space: str,
              slices: str | None, result: Path) -> dict[str, Any]:
    return {
        "version": 1, "output": str(output), "result": str(result), "units": units, "space": space,
        "scale": options.scale, "rotate_x_deg": options.rotate_x_deg, "mirror_x": options.mirror_x,
        "collection": options.collection, "group_categories": options.group_categories,
        "shade_smooth": options.shade_smooth, "camera": options.camera, "light": options.light,
        "remesh": {"mode": options.remesh, "voxel_size": options.voxel_size, "octree_depth": options.octree_depth},
        "objects": objects,
        "slices": {"folder": slices, "addon": str(ADDON)} if slices else None,
    }


def build_scene(
    meshes: list[Mesh] | Path | str,
    output: Path | str,
    options: SceneOptions = SceneOptions(),
    slices: str | Path | None = None,
    classes: dict[int, Any] | None = None,
    units: str | None = None,
) -> dict[str, Any]:
    """Build ``output`` (.blend) from meshes in memory or a mesh folder; returns the builder's result.

    ``slices``: the PNG slice folder for the add-on; written into the scene relative to the .blend
    (``//slices``) when it is beside it. ``classes``: label id -> LabelClass for meshes in memory
    (colours, categories). ``units``: of a folder's meshes when it has no ``meshes.json`` (default mm).
    Raises :class:`BlenderError` (``no_blender``, ``no_meshes``, ``blender_failed``, ``timeout``).
    """
    command = find_blender(options.blender)
    if command is None:
        raise BlenderError("no_blender", no_blender_message())
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    mapping = load_mapping(options.mapping_json) if options.mapping_json else None
    with tempfile.TemporaryDirectory(prefix=".segnode-blender-", dir=output.parent) as tmp:
        work = Path(tmp)
        objects: list[dict[str, Any]] = []
        mesh_units, space = units or "mm", "RAS"
        if isinstance(meshes, (str, Path)):
            folder = Path(meshes)
            entries = read_mesh_folder(folder)
            for e in entries:
                if e.get("empty"):
                    continue
                mesh_units = units or e.get("units") or "mm"
                space = e.get("space") or "RAS"
                category = e.get("category") or "Other"
                exact = e.get("color") or e.get("color_auto") or auto_color(e["name"], category, e["id"])
                entry = _entry(e["name"], e["id"], category, exact, options, mapping)
                path = Path(e["path"])
                if path.suffix.lower() == ".ply" and _is_plain_ply(path):
                    entry["file"] = str(path.resolve())
                else:
                    v, f = read_mesh(path)
                    if not len(f):
                        continue
                    entry["file"] = str(write_ply(work / f"{file_stem(e['name'])}.ply", v, f, e["name"]))
                objects.append(entry)
        else:
            for m in meshes:
                if m.empty:
                    continue
                c = (classes or {}).get(m.label)
                category = c.category if c is not None else "Other"
                exact = c.color if c is not None else None
                entry = _entry(m.name, m.label, category, exact, options, mapping)
                entry["file"] = str(write_ply(work / f"{file_stem(m.name)}_{m.label}.ply", m.vertices, m.faces, m.name))
                objects.append(entry)
                mesh_units, space = m.units, m.space
        if not objects:
            raise BlenderError("no_meshes", "no mesh with faces to put in the scene")
        slice_ref = None
        if slices is not None:
            s = Path(slices).resolve()
            slice_ref = "//" + os.path.relpath(s, output.parent).replace(os.sep, "/") \
                if s.is_relative_to(output.parent) else str(s)
        result_path = work / "result.json"
        manifest = _manifest(objects, output, options, mesh_units, space, slice_ref, result_path)
        manifest_path = work / "manifest.json"
        manifest_path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        started = time.perf_counter()
        argv = command.argv(SCRIPT, ["--manifest", str(manifest_path)])
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=options.timeout_s,
                                  cwd=str(work), env=_child_env(), check=False)
        except subprocess.TimeoutExpired:
            raise BlenderError("timeout", f"Blender took more than {options.timeout_s:g} s") from None
        except OSError as exc:
            raise BlenderError("blender_failed", f"cannot run {command.executable}: {exc}") from None
        if proc.returncode != 0 or not result_path.is_file() or not output.is_file():
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-12:])
            raise BlenderError("blender_failed", f"the scene builder failed (exit {proc.returncode}): {tail}")
        result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
        result["runner"] = {"kind": command.kind, "executable": command.executable,
                            "seconds": round(time.perf_counter() - started, 3)}
        return result


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # the node's venv must not leak into bpy's
        env.pop(key, None)
    return env


def _is_plain_ply(path: Path) -> bool:
    """A binary little-endian PLY of float x/y/z and uchar/int triangle lists (the builder's fast path)."""
    with open(path, "rb") as f:
        head = f.read(512)
    text = head.split(b"end_header")[0].decode("ascii", "replace")
    lines = [l for l in text.splitlines() if l and not l.startswith("comment")]
    wanted = ["ply", "format binary_little_endian 1.0", "element vertex", "property float x", "property float y",
              "property float z", "element face", "property list uchar int vertex_indices"]
    return len(lines) == len(wanted) and all(l.startswith(w) for l, w in zip(lines, wanted))


# --- the pipeline's output stage ------------------------------------------------------------------


def blender_stage(ctx: Any) -> None:
    """Output stage ``blender``: ``scene.blend`` in the run folder.

    Meshes: those of the ``meshes`` output when it ran first (its folder), else made here with the
    mesh options given to this stage (:class:`~node.artifacts.mesh.MeshOptions` fields, default 10 %
    decimation). The slice add-on is installed when the ``slices`` output is asked for too. Options:
    :class:`SceneOptions` fields (here ``group_categories`` defaults to true). No Blender on this
    machine, or the builder failed: the stage is skipped with the reason (the run and its other
    outputs go on).
    """
    from node.artifacts.mesh import MeshOptions, label_meshes
    from node.stages import StageSkipped

    opts = dict(ctx.options)
    options = SceneOptions.from_dict({"group_categories": True, **opts})
    if find_blender(options.blender) is None:
        raise StageSkipped(no_blender_message())
    output = Path(ctx.outdir) / "scene.blend"
    outputs = tuple(getattr(ctx.request, "outputs", ()) or ())
    slices = Path(ctx.outdir) / "slices" if ("slices" in ctx.artifacts or "slices" in outputs) else None
    if "meshes" in ctx.artifacts:
        source: list[Mesh] | Path = Path(ctx.artifacts["meshes"])
    else:
        mesh_opts = {"decimate": 0.1, **opts}
        source = label_meshes(ctx.labels, MeshOptions.from_dict(mesh_opts))
    try:
        result = build_scene(source, output, options, slices=slices, classes=ctx.labels.classes)
    except BlenderError as exc:  # an artifact that failed must not fail the run (and drop its labels)
        raise StageSkipped(f"{exc.code}: {exc}") from None
    ctx.artifacts["blender"] = output
    ctx.qc["blender"] = {"objects": len(result["objects"]), "skipped": result["skipped"],
                         "blender": result["blender"], "runner": result["runner"]["kind"],
                         "seconds": result["runner"]["seconds"], "slices": result["slices"]}
