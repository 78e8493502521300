"""The ``totalsegmentator`` engine: TotalSegmentator 2.x through its one public entry point.

``totalsegmentator.python_api.totalsegmentator`` runs the whole of TotalSegmentator (rough crop model,
resampling, nnU-Net's sliding window, post-processing) on an in-memory NIfTI image made from the
Volume by :mod:`node.nifti`; its multilabel result is read back with :mod:`node.nifti` and must lie
on the input's exact grid.

What this adapter adds, for a hospital node:

* Weights are never downloaded. Before TotalSegmentator is called, every dataset folder the run
  will load (:func:`node.segment.weights.required_datasets`) must exist under
  ``$TOTALSEG_HOME_DIR/nnunet/results``; a missing one is ``SegmentationError("weights_missing")``
  naming the task, the folders and ``segnode weights import``. TotalSegmentator's download
  functions are replaced by the same check, so it cannot start a download either.
* Usage statistics are off: ``send_usage_stats: false`` in its ``config.json`` (written before it is
  imported), and its senders replaced by no-ops.
* TOTALSEG_HOME_DIR is ``request.weights_dir``, else the engine's ``home``, else the node config's.
* Threads: ``request.threads`` for torch (nnU-Net's own cap, ``default_num_processes``, is set to it
  for the call) and for TotalSegmentator's resampling; nnU-Net's export uses one worker process (one
  image at a time; each extra worker is another Python with torch loaded).
* torchvision: TotalSegmentator pulls in a CUDA build of torchvision; on the node's CPU torch its
  ``_meta_registrations`` module fails at import (``operator torchvision::nms does not exist``), and
  nnU-Net imports it through timm while it searches its trainer classes. nnU-Net never uses
  torchvision's operators, so that one module is replaced by an empty stub in ``sys.modules`` before
  nnU-Net is imported (see :func:`neutralise_torchvision`).

One call at a time per process (a lock): TotalSegmentator is configured through environment variables
and module globals.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from node.classes import LabelVolume
from node.segment import SegmentationError, SegmentRequest
from node.segment import weights as W
from node.volume import Volume

_LOCK = threading.RLock()
_PATCHED = False


def neutralise_torchvision() -> bool:
    """Stub ``torchvision._meta_registrations`` when torchvision's build cannot load on this torch.

    PyPI's torchvision wheels for Linux are CUDA builds; with the CPU build of torch their
    ``_meta_registrations`` (fake-tensor kernels for torchvision's own operators, used by
    torch.compile) raises ``RuntimeError: operator torchvision::nms does not exist`` at import, and
    with it every import of torchvision, timm and the nnU-Net trainer search. Nothing on the node's
    path uses those operators. Returns True when the stub was installed.
    """
    name = "torchvision._meta_registrations"
    if "torchvision" in sys.modules or name in sys.modules:
        return False
    try:
        from importlib.metadata import version

        import torch

        tv_version = version("torchvision")
    except Exception:
        return False  # no torchvision (nothing to neutralise) or no torch (the import fails anyway)
    cpu_torch = getattr(torch.version, "cuda", None) is None
    matching_cpu_build = tv_version.endswith("+cpu")
    if not cpu_torch or matching_cpu_build:
        return False
    stub = types.ModuleType(name)
    stub.__doc__ = "Stub from node.segment.totalseg: CUDA torchvision's fake kernels fail on CPU torch."
    sys.modules[name] = stub
    return True


def write_totalseg_config(home: Path) -> Path:
    """TotalSegmentator's ``config.json`` in ``home`` with usage statistics off (other keys kept)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    config: dict[str, Any] = {}
    if path.exists():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
    wanted = {
        "totalseg_id": config.get("totalseg_id") or "segnode",
        "send_usage_stats": False,
        "prediction_counter": int(config.get("prediction_counter") or 0),
        "statistics_disclaimer_shown": True,
    }
    if any(config.get(k) != v for k, v in wanted.items()):
        config.update(wanted)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=4), encoding="utf-8")
        tmp.replace(path)
    return path


def _weights_missing(task: str, mode: str, home: Path, missing: list[str]) -> SegmentationError:
    return SegmentationError(
        "weights_missing",
        f"TotalSegmentator task {task!r}{mode} needs weights that are not installed in "
        f"{W.results_dir(home)}: {', '.join(missing)}; the node never downloads weights: "
        f"{W.import_hint(missing)}",
    )


def _refuse_download(task_id: Any, *args: Any, **kwargs: Any) -> None:
    """Stands in for TotalSegmentator's ``download_pretrained_weights``: present, or a clear error."""
    from totalsegmentator.config import get_weights_dir

    try:
        folder = W.dataset_folder(int(task_id))
    except (ValueError, W.WeightsError):
        folder = str(task_id)
    base = Path(get_weights_dir())
    if (base / folder).is_dir():
        return
    home = base.parent.parent if base.name == "results" else base
    raise _weights_missing(str(task_id), " (a dataset it loads)", home, [folder])


def _refuse_url(*args: Any, **kwargs: Any) -> None:
    raise SegmentationError(
        "weights_missing", f"TotalSegmentator tried to download weights; the node never does: {W.import_hint()}"
    )


def _no_stats(*args: Any, **kwargs: Any) -> None:
    return None


def load_totalsegmentator() -> Any:
    """Import TotalSegmentator's python API with the node's guards; returns the ``python_api`` module."""
    global _PATCHED
    with _LOCK:
        neutralise_torchvision()
        try:
            from totalsegmentator import config as ts_config
            from totalsegmentator import libs as ts_libs
            from totalsegmentator import python_api
        except Exception as exc:
            raise SegmentationError(
                "engine_unavailable",
                f"TotalSegmentator cannot be imported ({type(exc).__name__}: {exc}); "
                "install the node's `seg` extra (scripts/setup.sh does)",
            ) from None
        if not _PATCHED:
            for module in (python_api, ts_libs):
                module.download_pretrained_weights = _refuse_download
            ts_libs.download_url_and_unpack = _refuse_url
            ts_libs.download_model_with_license_and_unpack = _refuse_url
            for module in (python_api, ts_config):
                module.send_usage_stats = _no_stats
            ts_config.send_usage_stats_application = _no_stats
            ts_cnn = sys.modules.get("totalsegmentator.cnn")
            if ts_cnn is not None:
                ts_cnn.download_pretrained_weights = _refuse_download
            _PATCHED = True
        return python_api


@contextmanager
def _environment(home: Path) -> Iterator[None]:
    """TOTALSEG_HOME_DIR = home for the call (TOTALSEG_WEIGHTS_PATH would override it: unset)."""
    keys = ("TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["TOTALSEG_HOME_DIR"] = str(home)
    os.environ.pop("TOTALSEG_WEIGHTS_PATH", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _threads(threads: int) -> Iterator[None]:
    """torch uses ``threads`` for the call: nnU-Net raises torch's count to every CPU on 'cpu', then caps
    it at its ``default_num_processes`` while it predicts; both are set here and restored after."""
    import torch
    from nnunetv2.inference import predict_from_raw_data as pfrd

    saved_torch = torch.get_num_threads()
    saved_cap = pfrd.default_num_processes
    torch.set_num_threads(threads)
    pfrd.default_num_processes = threads
    try:
        yield
    finally:
        pfrd.default_num_processes = saved_cap
        torch.set_num_threads(saved_torch)


def _device(request_device: str, notes: list[str]) -> str:
    import re

    device = request_device.strip().lower()
    if not re.fullmatch(r"cpu|gpu|gpu:\d+|mps", device):
        raise SegmentationError("bad_request", f"device must be cpu, gpu, gpu:N or mps, got {request_device!r}")
    if device.startswith("gpu"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        if not torch.cuda.is_available():
            notes.append(f"device {device} requested but torch sees no CUDA GPU: ran on cpu")
            return "cpu"
        if index >= torch.cuda.device_count():
            notes.append(f"device {device} requested but there are {torch.cuda.device_count()} GPUs: ran on cpu")
            return "cpu"
    return device


class TotalSegmentatorEngine:
    """``segment(volume, request)`` through TotalSegmentator; see the module docstring."""

    name = "totalsegmentator"

    def __init__(self, home: Path | None = None) -> None:
        #: TotalSegmentator's home when a request names none; None = the node config's.
        self.home = Path(home) if home is not None else None

    @classmethod
    def from_settings(cls, settings: Any) -> TotalSegmentatorEngine:
        return cls(home=W.home_dir(settings))

    def resolve_home(self, request: SegmentRequest) -> Path:
        if request.weights_dir is not None:
            return Path(request.weights_dir).absolute()
        if self.home is not None:
            return self.home.absolute()
        from node.config import load_settings

        return W.home_dir(load_settings()).absolute()

    # ------------------------------------------------------------------ checks before any heavy import

    def check(self, request: SegmentRequest) -> tuple[Path, list[int]]:
        """Validate the request and the installed weights; returns (home, dataset ids).

        Raises ``unknown_task``, ``bad_request``, ``license_required``, ``weights_missing`` or
        ``engine_unavailable`` without loading torch.
        """
        task = request.task
        if request.fast and request.fastest:
            raise SegmentationError("bad_request", "choose one of fast and fastest")
        try:
            ids = W.required_datasets(
                task, fast=request.fast, fastest=request.fastest, roi_subset=tuple(request.roi_subset),
                robust_crop=True if request.robust_crop else None,
            )
        except W.WeightsError as exc:
            raise SegmentationError(exc.code, str(exc)) from None
        if request.roi_subset:
            from totalsegmentator.map_to_binary import class_map

            if not task.startswith("total"):
                raise SegmentationError(
                    "bad_request", f"roi_subset works with the total and total_mr tasks, not {task}"
                )
            unknown = [r for r in request.roi_subset if r not in class_map[task].values()]
            if unknown:
                raise SegmentationError("bad_request", f"task {task} has no class {', '.join(unknown)}")
        home = self.resolve_home(request)
        if W.is_commercial(task):
            license_number = ""
            try:
                license_number = json.loads((home / "config.json").read_text()).get("license_number", "")
            except (OSError, ValueError):
                pass
            if len(str(license_number)) != 18:
                raise SegmentationError(
                    "license_required",
                    f"TotalSegmentator task {task!r} needs a licence (free for non-commercial use: "
                    "https://backend.totalsegmentator.com/license-academic/); set it with "
                    f"totalseg_set_license -l KEY (TOTALSEG_HOME_DIR={home})",
                )
        missing = W.missing_folders(home, ids)
        if missing:
            mode = " --fast" if request.fast else (" --fastest" if request.fastest else "")
            if request.roi_subset:
                mode += f" --roi_subset {' '.join(request.roi_subset)}"
            raise _weights_missing(task, mode, home, missing)
        return home, ids

    # ------------------------------------------------------------------ the run

    def segment(self, volume: Volume, request: SegmentRequest) -> LabelVolume:
        from node.nifti import from_nifti_image, to_nifti_image

        home, ids = self.check(request)
        notes: list[str] = []
        device = _device(request.device, notes)
        threads = max(1, int(request.threads))
        write_totalseg_config(home)
        if request.resident:
            from node.segment.resident import Unsupported

            try:
                return self._segment_resident(volume, request, home, ids, device, threads, notes)
            except Unsupported as exc:
                notes.append(f"warm inference does not reproduce {exc}: TotalSegmentator's entry point ran")
        with _LOCK:
            api = load_totalsegmentator()
            image = to_nifti_image(volume)
            try:
                with _environment(home), _threads(threads):
                    result = api.totalsegmentator(
                        image, None, ml=True, task=request.task, fast=request.fast, fastest=request.fastest,
                        roi_subset=list(request.roi_subset) or None,
                        robust_crop=True if request.robust_crop else None,
                        device=device, nr_thr_resamp=threads, nr_thr_saving=1, quiet=True,
                        statistics=False, preview=False,
                    )
            except SegmentationError:
                raise
            except SystemExit as exc:  # TotalSegmentator exits on a few errors (licence, missing input)
                raise SegmentationError(
                    "totalsegmentator_failed", f"TotalSegmentator stopped: {exc.code}"
                ) from None
            except Exception as exc:
                raise SegmentationError(
                    "totalsegmentator_failed", f"TotalSegmentator failed: {type(exc).__name__}: {exc}"
                ) from exc

        labels = from_nifti_image(result)
        return self._labels(volume, request, labels.array, labels.geometry, ids, device, threads, notes, None)

    def _segment_resident(self, volume: Volume, request: SegmentRequest, home: Path, ids: list[int],
                          device: str, threads: int, notes: list[str]) -> LabelVolume:
        """TotalSegmentator's pipeline in this process on cached predictors (:mod:`node.segment.resident`)."""
        from node.nifti import to_nifti_image
        from node.segment.resident import ResidentRunner, Unsupported

        load_totalsegmentator()
        runner = ResidentRunner(home, device=device, threads=threads, envelope_mm=request.envelope_mm,
                                compile=request.compile)
        try:
            xyz = runner.run(
                to_nifti_image(volume), request.task, fast=request.fast, fastest=request.fastest,
                roi_subset=list(request.roi_subset) or None, robust_crop=True if request.robust_crop else None,
            )
        except (SegmentationError, Unsupported):
            raise
        except SystemExit as exc:
            raise SegmentationError("totalsegmentator_failed", f"TotalSegmentator stopped: {exc.code}") from None
        except Exception as exc:
            raise SegmentationError(
                "totalsegmentator_failed", f"TotalSegmentator failed: {type(exc).__name__}: {exc}"
            ) from exc
        info = runner.info.as_dict()
        notes.append(
            f"warm inference: {info['cache_hits']} model(s) cached, {info['cache_misses']} loaded "
            f"({info['load_s']:.2f} s); tiles run {info['tiles_run']}, skipped by the envelope "
            f"{info['tiles_skipped']}" + (f"; {'; '.join(info['retries'])}" if info["retries"] else "")
        )
        return self._labels(volume, request, xyz.transpose(2, 1, 0), volume.geometry, ids, device, threads,
                            notes, info)

    def _labels(self, volume: Volume, request: SegmentRequest, array: np.ndarray, geometry: Any,
                ids: list[int], device: str, threads: int, notes: list[str],
                inference: dict[str, Any] | None) -> LabelVolume:
        from node.segment.snomed import task_classes

        if array.shape != volume.array.shape or not geometry.same_grid(volume.geometry):
            k, j, i = array.shape
            raise SegmentationError(
                "geometry_mismatch",
                f"TotalSegmentator returned labels of shape {(i, j, k)} on another grid than the input "
                f"{volume.shape_ijk}; refused rather than resampled",
            )
        array = np.ascontiguousarray(array).astype(np.uint8, copy=False)
        classes = task_classes(request.task, request.roi_subset)
        unknown = sorted(set(np.unique(array).tolist()) - set(classes) - {0})
        if unknown:
            raise SegmentationError(
                "unknown_label", f"TotalSegmentator returned label ids without a class: {unknown}"
            )
        mode = " --fast" if request.fast else (" --fastest" if request.fastest else "")
        notes.insert(
            0,
            f"TotalSegmentator {W.package_version()} task {request.task}{mode}"
            + (f" roi_subset {','.join(request.roi_subset)}" if request.roi_subset else "")
            + f"; datasets {', '.join(str(i) for i in ids)}; device {device}; threads {threads}",
        )
        return LabelVolume(
            array=array, geometry=volume.geometry, source=volume.source, notes=notes, classes=classes,
            inference=inference,
        )
