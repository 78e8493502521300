"""TotalSegmentator weights: which datasets a task needs, which are installed, and offline import.

A hospital node never downloads weights at run time. They arrive as the zips TotalSegmentator
distributes (one ``DatasetNNN_<name>`` folder per zip: ``<trainer>__<plans>__<config>/fold_N/...``)
or as a folder holding such folders or zips, and :func:`import_weights` puts them where
TotalSegmentator looks: ``$TOTALSEG_HOME_DIR/nnunet/results/DatasetNNN_<name>``.

Which datasets a task needs is read from the installed TotalSegmentator (its task config and its
weights table), never copied here, so a newer TotalSegmentator brings its own answer. Only its
pure-data modules are imported (no torch), so ``segnode weights status`` is quick.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.config import Settings

#: A dataset folder as nnU-Net v2 names it (TotalSegmentator's weights are nnU-Net v2 results).
DATASET_RE = re.compile(r"^Dataset(\d{3,})_[A-Za-z0-9_.\-]+$")

#: The modes a task may offer (TotalSegmentator's ``sub_modes``); tasks without them have "default".
MODES = ("default", "fast", "fastest")


class WeightsError(Exception):
    """Weights could not be found, read or imported; ``code`` is stable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- where


def home_dir(settings: Settings) -> Path:
    """TotalSegmentator's home for this node: ``[segmentation] weights_dir`` or ``<data_dir>/totalsegmentator``."""
    configured = settings.segmentation.weights_dir
    return Path(configured) if configured is not None else Path(settings.node.data_dir) / "totalsegmentator"


def results_dir(home: Path) -> Path:
    """Where TotalSegmentator (through nnU-Net's ``nnUNet_results``) looks for dataset folders."""
    return Path(home) / "nnunet" / "results"


# --------------------------------------------------------------------------- the package's tables


def _package() -> tuple[Any, Any, Any]:
    """TotalSegmentator's pure-data modules: (map_tasks_config, map_to_binary, registry)."""
    try:
        from totalsegmentator import map_tasks_config, map_to_binary, registry
    except ImportError as exc:
        raise WeightsError(
            "engine_unavailable",
            f"TotalSegmentator is not installed ({exc}); install the node with its `seg` extra: "
            "pip install -e '.[seg]' (torch==2.13.0 first, see scripts/setup.sh)",
        ) from None
    return map_tasks_config, map_to_binary, registry


def package_version() -> str | None:
    """The installed TotalSegmentator version, or None."""
    try:
        from importlib.metadata import version

        return version("TotalSegmentator")
    except Exception:
        return None


def tasks() -> list[str]:
    """Every task the installed TotalSegmentator offers on its command line, in its order."""
    return list(_package()[2].TASKS)


def is_commercial(task: str) -> bool:
    """Whether the task needs a TotalSegmentator licence (free for non-commercial use)."""
    cfg, maps, _ = _package()
    return bool(cfg.TASK_CONFIGS.get(task, {}).get("commercial")) or task in maps.commercial_models


def task_modes(task: str) -> list[str]:
    """The modes a task offers: its ``sub_modes`` (default/fast/fastest), else just ``default``."""
    raw = _package()[0].TASK_CONFIGS[task]
    if "sub_modes" in raw:
        return [m for m in MODES if m in raw["sub_modes"]]
    return ["default"]


def task_config(task: str, *, fast: bool = False, fastest: bool = False, robust_crop: bool | None = None) -> dict:
    """The run configuration TotalSegmentator builds for ``task`` (its ``get_task_config``), without its
    side effects (printing, and ``sys.exit`` for licensed tasks without a licence).

    Raises :class:`WeightsError` ``unknown_task`` or ``bad_request`` (fast on a task that forbids it).
    """
    cfg = _package()[0]
    if task not in cfg.TASK_CONFIGS:
        raise WeightsError("unknown_task", f"TotalSegmentator {package_version()} has no task {task!r}")
    config = dict(cfg.DEFAULT_CONFIG)
    raw = cfg.TASK_CONFIGS[task]
    if robust_crop is not None:
        config["robust_crop"] = robust_crop
    if "sub_modes" in raw:
        mode = "fast" if fast else ("fastest" if fastest else "default")
        if mode not in raw["sub_modes"]:
            mode = "fast" if fast or fastest else "default"
        config.update(raw["sub_modes"][mode])
    else:
        config.update({k: v for k, v in raw.items() if k not in ("disallow_fast", "commercial", "info_msg")})
        if raw.get("disallow_fast") and (fast or fastest):
            raise WeightsError("bad_request", f"task {task} does not work with --fast/--fastest")
    return config


def _task_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _part_maps(task: str) -> tuple[dict, dict] | None:
    """(parts' class maps, dataset id -> part name) for the tasks TotalSegmentator runs in parts (the
    tables ``nnunet.nnUNet_predict_image`` picks the roi_subset's parts from), else None."""
    maps = _package()[1]
    table = {
        "total": ("class_map_5_parts", "map_taskid_to_partname_ct"),
        "total_v3": ("class_map_5_parts_total_v3", "map_taskid_to_partname_ct_v3"),
        "total_mr": ("class_map_parts_mr", "map_taskid_to_partname_mr"),
        "headneck_muscles": ("class_map_parts_headneck_muscles", "map_taskid_to_partname_headneck_muscles"),
    }
    if task not in table:
        return None
    parts_name, ids_name = table[task]
    return getattr(maps, parts_name), getattr(maps, ids_name)


def required_datasets(
    task: str,
    *,
    fast: bool = False,
    fastest: bool = False,
    roi_subset: tuple[str, ...] | list[str] = (),
    robust_crop: bool | None = None,
) -> list[int]:
    """Dataset ids TotalSegmentator 2.x needs on disk for this run: the rough crop model first, then the
    task's own, then 305 for ``vertebrae_pp_refined``.

    Mirrors ``python_api.totalsegmentator``, which calls ``download_pretrained_weights`` (a download
    when the folder is missing) for: every id of the task's ``task_id`` -- all parts of a task run in
    parts, even when a ``roi_subset`` later predicts only the parts holding its structures -- plus the
    rough model it crops with (``total`` 6 mm, or 3 mm when robust; ``total_mr`` 3 mm; ``body`` 6 mm
    for body crops; or the task named by ``crop_model``), plus 305 for ``vertebrae_pp_refined``.
    The resident engine (:mod:`node.segment.resident`) loads a subset of these (only the roi parts)
    but falls back to ``python_api`` for what it does not run, so the check is ``python_api``'s.
    """
    config = task_config(task, fast=fast, fastest=fastest, robust_crop=robust_crop)
    roi = list(roi_subset) or None
    ids: list[int] = []

    crop = config.get("crop")
    if crop is not None or roi is not None or config.get("cascade"):
        crop_model = config.get("crop_model")
        if crop_model is None:
            is_mr = task.endswith("_mr")
            robust = bool(config.get("robust_crop")) or (is_mr and roi is not None)
            if is_mr:
                crop_id = 852
            else:
                crop_id = 297 if robust else 298
            if crop is not None and ("body_trunc" in crop or "body_extremities" in crop):
                crop_id = 300
            ids.append(crop_id)
        else:
            ids.extend(required_datasets(crop_model))

    # python_api downloads every part before nnUNet_predict_image narrows them to the roi_subset's.
    ids.extend(_task_ids(config.get("task_id")))
    if task == "vertebrae_pp_refined":
        ids.append(305)
    return list(dict.fromkeys(ids))


def dataset_folder(task_id: int) -> str:
    """The folder (relative to ``nnunet/results``) TotalSegmentator expects for a dataset id."""
    cfg = _package()[0]
    info = cfg.TASK_ID_WEIGHTS_CONFIGS.get(task_id)
    if info is None:
        raise WeightsError("unknown_dataset", f"TotalSegmentator {package_version()} knows no dataset {task_id}")
    folder = str(info["foldername"])
    return str(PurePosixPath(info["rel_path"]) / folder) if info.get("rel_path") else folder


def missing_folders(home: Path, ids: list[int]) -> list[str]:
    """Folders of ``ids`` that are not under ``home``'s results folder (TotalSegmentator's own test)."""
    base = results_dir(home)
    return [name for name in (dataset_folder(i) for i in ids) if not (base / name).is_dir()]


# --------------------------------------------------------------------------- where the zips come from


@dataclass(frozen=True)
class WeightsZip:
    """Where TotalSegmentator's own downloader gets a dataset: a zip on a GitHub release, or its licence
    server (commercial models), as its weights table (``TASK_ID_WEIGHTS_CONFIGS``) says."""

    dataset_id: int
    folder: str
    zip: str | None
    url: str | None
    release_page: str | None
    where: str
    #: A checksum TotalSegmentator records for the zip; 2.18 records none (see :data:`NO_CHECKSUM`).
    checksum: str | None = None


#: What TotalSegmentator 2.18's code says about checksums of its weights zips.
NO_CHECKSUM = ("TotalSegmentator {version} records no checksum for its weights zips (its weights table has "
               "folder, release and licence only, and its downloader unpacks what it gets)")


def release_download_base() -> str | None:
    """The download root of TotalSegmentator's own weights downloader (``libs.download_pretrained_weights``),
    read from its source in this environment (not imported: that would import torch); None if not found."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("totalsegmentator.libs")
    except ImportError:
        return None
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).read_text(encoding="utf-8")
    found = re.findall(r'^\s*url\s*=\s*"(https://github\.com/[^"]+/releases/download)"\s*$', source, re.MULTILINE)
    return found[-1] if found else None


def weights_zip(dataset_id: int) -> WeightsZip:
    """Which zip TotalSegmentator distributes for ``dataset_id`` and where (its release page)."""
    cfg, maps, _ = _package()
    info = cfg.TASK_ID_WEIGHTS_CONFIGS.get(dataset_id)
    if info is None:
        raise WeightsError("unknown_dataset", f"TotalSegmentator {package_version()} knows no dataset {dataset_id}")
    folder = str(info["foldername"])
    checksum = next((str(v) for k, v in info.items() if re.search(r"sha|md5|checksum|hash", str(k), re.IGNORECASE)), None)
    version = info.get("version")
    if info.get("commercial") or dataset_id in maps.commercial_models.values():
        return WeightsZip(dataset_id, folder, None, None, None, "TotalSegmentator's licence server (a licensed "
                          "model: ask its authors)", checksum)
    base = release_download_base()
    if not version or version == "TODO" or base is None:
        return WeightsZip(dataset_id, folder, f"{folder}.zip", None, None,
                          "no public release named in TotalSegmentator's weights table", checksum)
    return WeightsZip(dataset_id, folder, f"{folder}.zip", f"{base}/{version}/{folder}.zip",
                      f"{base.removesuffix('/download')}/tag/{version}", f"GitHub release {version}", checksum)


def import_hint(folders: list[str] | tuple[str, ...] = ()) -> str:
    """How to get weights on the node; with ``folders`` (missing datasets), which zips and where."""
    hint = "run `segnode weights import ZIP|DIR` with the zips TotalSegmentator distributes"
    found = [DATASET_RE.match(PurePosixPath(f).name) for f in folders]
    zips = []
    for match in found:
        if match is None:
            continue
        try:
            z = weights_zip(int(match.group(1)))
        except WeightsError:
            continue
        zips.append(f"{z.zip} from {z.release_page}" if z.release_page else f"{z.folder}: {z.where}")
    return f"{hint} ({'; '.join(zips)})" if zips else hint


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class ModeStatus:
    mode: str
    datasets: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return not self.missing


@dataclass(frozen=True)
class TaskStatus:
    task: str
    modality: str
    license_required: bool
    modes: tuple[ModeStatus, ...] = field(default_factory=tuple)

    @property
    def ready_modes(self) -> list[str]:
        return [m.mode for m in self.modes if m.ready]


def task_status(home: Path) -> list[TaskStatus]:
    """Every task of the installed TotalSegmentator, per mode: the datasets it needs and which are missing."""
    _, _, registry = _package()
    out: list[TaskStatus] = []
    for task in registry.TASKS:
        modes: list[ModeStatus] = []
        for mode in task_modes(task):
            try:
                ids = required_datasets(task, fast=mode == "fast", fastest=mode == "fastest")
                folders = [dataset_folder(i) for i in ids]
            except WeightsError:
                continue
            modes.append(ModeStatus(mode, tuple(folders), tuple(missing_folders(home, ids))))
        out.append(TaskStatus(task, registry.task_modality(task), is_commercial(task), tuple(modes)))
    return out


def installed_datasets(home: Path) -> list[str]:
    """Dataset folders present under ``home``'s results folder."""
    base = results_dir(home)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and DATASET_RE.match(p.name))


def tasks_using(dataset_id: int) -> list[str]:
    """Task modes (``task`` or ``task --fast``) whose run loads this dataset."""
    _, _, registry = _package()
    found = []
    for task in registry.TASKS:
        for mode in task_modes(task):
            try:
                ids = required_datasets(task, fast=mode == "fast", fastest=mode == "fastest")
            except WeightsError:
                continue
            if dataset_id in ids:
                found.append(task if mode == "default" else f"{task} --{mode}")
    return found


# --------------------------------------------------------------------------- import


@dataclass(frozen=True)
class ImportedDataset:
    name: str
    #: ``installed`` (new), ``replaced`` (different content was there), ``unchanged`` (identical already).
    action: str
    #: A note for people, e.g. that TotalSegmentator expects another folder name for this id.
    note: str = ""
    #: SHA-256 of the zip it came from (None for a folder).
    sha256: str | None = None


def _is_unsafe(parts: tuple[str, ...]) -> bool:
    return any(p in ("", "..") for p in parts)


def _manifest(folder: Path) -> dict[str, int]:
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _zip_datasets(zf: zipfile.ZipFile, source: Path) -> dict[str, list[tuple[zipfile.ZipInfo, str]]]:
    """Members of a weights zip by dataset folder: ``{DatasetNNN_x: [(member, path inside it)]}``."""
    found: dict[str, list[tuple[zipfile.ZipInfo, str]]] = {}
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise WeightsError("unsafe_zip", f"{source}: member {info.filename!r} has an absolute path; refused")
        parts = tuple(p for p in name.split("/") if p != ".")
        if ".." in parts:
            raise WeightsError("unsafe_zip", f"{source}: member {info.filename!r} points outside the zip; refused")
        if parts and parts[0] == "__MACOSX":
            continue
        for index, part in enumerate(parts):
            if DATASET_RE.match(part):
                inner = "/".join(parts[index + 1 :])
                found.setdefault(part, [])
                if inner and not info.is_dir():
                    found[part].append((info, inner))
                break
    return found


def _expected_note(name: str) -> str:
    dataset_id = int(DATASET_RE.match(name).group(1))  # type: ignore[union-attr]
    try:
        expected = dataset_folder(dataset_id)
    except WeightsError:
        return f"TotalSegmentator {package_version()} does not use dataset {dataset_id}"
    if PurePosixPath(expected).name != name:
        return f"TotalSegmentator {package_version()} expects this id as {expected}; this folder will not be used"
    users = tasks_using(dataset_id)
    return f"used by: {', '.join(users)}" if users else ""


def _install(staged: Path, base: Path, name: str) -> str:
    """Move a staged dataset folder into place; returns the action taken."""
    target = base / name
    if target.is_dir():
        if _manifest(target) == _manifest(staged):
            shutil.rmtree(staged)
            return "unchanged"
        old = base / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staged.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return "replaced"
    staged.rename(target)
    return "installed"


def _import_zip(source: Path, base: Path) -> list[ImportedDataset]:
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise WeightsError("bad_zip", f"{source}: not a readable zip file ({exc})") from None
    with zf:
        datasets = _zip_datasets(zf, source)
        if not datasets:
            raise WeightsError(
                "no_datasets",
                f"{source}: no DatasetNNN_* folder inside; expected a TotalSegmentator weights zip "
                "(e.g. Dataset297_TotalSegmentator_total_3mm_1559subj.zip holding "
                "Dataset297_.../<trainer>__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth)",
            )
        results: list[ImportedDataset] = []
        for name, members in sorted(datasets.items()):
            if not members:
                raise WeightsError("no_datasets", f"{source}: dataset folder {name} is empty")
            staged = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=base))
            try:
                for info, inner in members:
                    dest = staged.joinpath(*inner.split("/"))
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                action = _install(staged, base, name)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            results.append(ImportedDataset(name, action, _expected_note(name)))
        return results


def _import_folder(folder: Path, base: Path) -> list[ImportedDataset]:
    name = folder.name
    if not any(p.is_file() for p in folder.rglob("*")):
        raise WeightsError("no_datasets", f"{folder}: dataset folder is empty")
    staged = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=base))
    try:
        shutil.rmtree(staged)
        shutil.copytree(folder, staged, symlinks=False)
        action = _install(staged, base, name)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return [ImportedDataset(name, action, _expected_note(name))]


def zip_sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_zip(source: Path, expected_sha256: str | None = None) -> str:
    """A zip's SHA-256, compared with ``expected_sha256`` when given, and its members' CRCs checked.

    TotalSegmentator 2.18 records no checksum for its zips (:data:`NO_CHECKSUM`), so the expected value
    is the administrator's (e.g. from the machine that downloaded it); :func:`weights_zip` would carry one
    where a later TotalSegmentator records it."""
    digest = zip_sha256(source)
    if expected_sha256 is not None and digest != expected_sha256.strip().lower():
        raise WeightsError("checksum_mismatch", f"{source}: SHA-256 {digest}, expected {expected_sha256.strip()}; "
                                                "not imported")
    try:
        with zipfile.ZipFile(source) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise WeightsError("bad_zip", f"{source}: not a readable zip file ({exc})") from None
    if bad is not None:
        raise WeightsError("bad_zip", f"{source}: member {bad} fails its CRC check (a damaged copy); not imported")
    return digest


def import_weights(source: Path, home: Path, *, expected_sha256: str | None = None) -> list[ImportedDataset]:
    """Install the ``DatasetNNN_*`` folders of a zip, a dataset folder, or a folder of either into ``home``.

    Idempotent: a dataset already there with the same files (names and sizes) is left as is
    (``unchanged``); different content is replaced whole (``replaced``), never merged. A zip's CRCs are
    checked and its SHA-256 is in each result's ``sha256`` (compared with ``expected_sha256`` if given).
    Raises :class:`WeightsError` (``not_found``, ``bad_zip``, ``unsafe_zip``, ``no_datasets``,
    ``checksum_mismatch``).
    """
    source = Path(source)
    if not source.exists():
        raise WeightsError("not_found", f"{source}: no such file or folder")
    base = results_dir(home)
    base.mkdir(parents=True, exist_ok=True)

    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise WeightsError("bad_zip", f"{source}: not a zip file; give a weights zip or a folder")
        digest = check_zip(source, expected_sha256)
        return [replace(d, sha256=digest) for d in _import_zip(source, base)]
    if expected_sha256 is not None:
        raise WeightsError("not_a_zip", f"{source}: --sha256 checks a zip file; this is a folder")

    if DATASET_RE.match(source.name):
        return _import_folder(source, base)
    results: list[ImportedDataset] = []
    entries = sorted(os.scandir(source), key=lambda e: e.name)
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir() and DATASET_RE.match(entry.name):
            results.extend(_import_folder(path, base))
        elif entry.is_file() and entry.name.lower().endswith(".zip"):
            digest = check_zip(path)
            results.extend(replace(d, sha256=digest) for d in _import_zip(path, base))
    if not results:
        raise WeightsError(
            "no_datasets",
            f"{source}: no DatasetNNN_* folder or weights zip inside; expected what TotalSegmentator "
            "distributes (Dataset297_TotalSegmentator_total_3mm_1559subj.zip, or its unpacked folder)",
        )
    return results
