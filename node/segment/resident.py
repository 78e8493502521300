"""TotalSegmentator 2.18's pipeline in this process, on arrays, with resident nnU-Net predictors.

TotalSegmentator's ``python_api.totalsegmentator`` -> ``nnunet.nnUNet_predict_image`` ->
``nnunet.nnUNetv2_predict`` writes the (cropped, canonical, resampled) image to a temporary NIfTI,
builds a new ``nnUNetPredictor``, loads the checkpoints and runs ``predict_from_files`` with spawned
preprocessing and export processes, then reads the labels back. This module runs the same steps in the
same order on in-memory images, calling TotalSegmentator's own functions wherever they take arrays or
nibabel images (``get_task_config``, ``crop_to_mask``, ``as_closest_canonical``, ``change_spacing``,
``remove_auxiliary_labels``, ``undo_canonical``, ``undo_crop``, ``remove_outside_of_mask``, its class
maps) and nnU-Net's own functions for what happens inside ``predict_from_files`` (the configuration's
preprocessor ``run_case_npy``, ``predict_logits_from_preprocessed_data``,
``convert_predicted_logits_to_segmentation_with_correct_shape``). What only exists as file handling
is reproduced here, each time in a comment naming the function:

* the NIfTI round trip between TotalSegmentator and nnU-Net (``nib.save`` then nnU-Net's
  ``SimpleITKIO.read_images``): the array as float32 in SimpleITK's [z, y, x] order, the spacing as the
  header's float32 zooms reversed (:func:`_nnunet_input`);
* nnU-Net's SimpleITK export read back with ``nib.load``: the labels transposed back to [x, y, z];
* ``nnUNet_predict_image``'s part merging (its lookup table per part, later parts overwriting), its
  roi_subset part selection, its triple split of very large images, its tile step (0.8 for the
  ``total`` family, else 0.5);
* ``python_api.totalsegmentator``'s crop model choice (6 mm ``total``, 3 mm for MR or robust crop,
  ``body`` for body crops, a task's own ``crop_model``), its crop mask and addon, remove_outside mask.

Not reproduced (the caller falls back to TotalSegmentator's own entry point): cascade models,
``vertebrae_pp_refined``, ``body_seg``, higher-order resampling.

What this adds: predictors from :mod:`node.segment.predictors` (loaded once per process), the body
envelope (:mod:`node.segment.envelope`), a retry when CUDA runs out of memory, and per-job figures
(:class:`InferenceInfo`) for report.json.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from node.segment import SegmentationError
from node.segment import weights as W
from node.segment.envelope import Envelope, body_envelope
from node.segment.predictors import ModelKey, PredictorCache, default_cache, record_inference

#: nnUNet_predict_image splits an image into three along z above this many voxels (multi-model tasks).
TRIPLE_SPLIT_VOXELS = 512 * 512 * 900
TRIPLE_SPLIT_MARGIN = 20
#: Tasks whose models run with nnU-Net tile step 0.8 in TotalSegmentator (else 0.5).
COARSE_STEP_TASKS = ("total", "total_v3", "total_mr")
CHECKPOINT = "checkpoint_final.pth"


class Unsupported(Exception):
    """The task uses a TotalSegmentator feature this module does not reproduce."""


# --------------------------------------------------------------------------- per-job figures


@dataclass
class ModelRun:
    dataset: int
    task: str
    load_s: float = 0.0
    cache_hit: bool = False
    preprocess_s: float = 0.0
    network_s: float = 0.0
    export_s: float = 0.0
    tiles_run: int = 0
    tiles_skipped: int = 0
    envelope: list[list[int]] | None = None


@dataclass
class InferenceInfo:
    """What one job's inference cost; goes into report.json as ``inference``."""

    engine: str = "resident"
    device: str = "cpu"
    precision: str = "fp32"
    envelope_mm: float = 0.0
    models: list[ModelRun] = field(default_factory=list)
    #: TotalSegmentator's own steps around the networks (crop, canonical, resampling both ways).
    resample_s: float = 0.0
    total_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    retries: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("load_s", "preprocess_s", "network_s", "export_s", "tiles_run", "tiles_skipped"):
            total = sum(getattr(m, key) for m in self.models)
            d[key] = round(total, 4) if isinstance(total, float) else total
        d["cache_hits"] = sum(1 for m in self.models if m.cache_hit)
        d["cache_misses"] = sum(1 for m in self.models if not m.cache_hit)
        for m in d["models"]:
            for k, v in list(m.items()):
                if isinstance(v, float):
                    m[k] = round(v, 4)
        for k in ("resample_s", "total_s", "peak_rss_mb"):
            d[k] = round(d[k], 3)
        return d


class _RssSampler:
    """Peak resident set size of this process while a job runs (``/proc/self/statm``, every 50 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                import os

                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.05)

    def __enter__(self) -> _RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def is_cuda_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------- the runner


def torch_device(device: str) -> str:
    """The node's ``cpu | gpu | gpu:N | mps`` as a torch device string."""
    if device.startswith("gpu"):
        return f"cuda:{device.split(':')[1] if ':' in device else 0}"
    return device


class ResidentRunner:
    """One job's TotalSegmentator run on cached predictors; see the module docstring."""

    def __init__(self, home: Path, *, device: str = "cpu", threads: int = 2, envelope_mm: float = 0.0,
                 cache: PredictorCache | None = None, compile: bool = False) -> None:
        self.home = Path(home)
        self.device = torch_device(device)
        self.threads = max(1, int(threads))
        self.envelope_mm = float(envelope_mm)
        self.cache = cache or default_cache()
        cuda = self.device.startswith("cuda")
        self.precision = ("fp16-autocast" if cuda else "fp32") + ("+compile" if compile else "")
        self.info = InferenceInfo(device=self.device, precision=self.precision, envelope_mm=self.envelope_mm)
        self._envelopes: dict[int, Envelope | None] = {}

    # ---------------------------------------------------------------- python_api.totalsegmentator

    def run(self, image: Any, task: str, *, fast: bool = False, fastest: bool = False,
            roi_subset: list[str] | None = None, robust_crop: bool | None = None) -> np.ndarray:
        """Labels (uint8, the input image's [x, y, z] voxels) of ``python_api.totalsegmentator(image,
        None, ml=True, task=..., ...)``."""
        import torch

        started = time.perf_counter()
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        with _RssSampler() as rss, self._threads():
            labels = self._task(image, task, fast=fast, fastest=fastest, roi_subset=roi_subset,
                                robust_crop=robust_crop)
        self.info.peak_rss_mb = rss.peak / 1e6
        if cuda:
            self.info.peak_gpu_mb = round(torch.cuda.max_memory_allocated(self.device) / 1e6, 1)
        self.info.total_s = time.perf_counter() - started
        record_inference(task, self.device, self.info.total_s)
        return labels

    @contextmanager
    def _threads(self) -> Iterator[None]:
        """torch's thread count for the job: ``threads`` on CPU (TotalSegmentator's ``nnUNetv2_predict``
        takes every core; a node shares them), 1 on a GPU (as nnU-Net does); restored after."""
        import torch

        saved = torch.get_num_threads()
        torch.set_num_threads(1 if self.device.startswith("cuda") else self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(saved)

    def _task(self, image: Any, task: str, *, fast: bool, fastest: bool, roi_subset: list[str] | None,
              robust_crop: bool | None) -> np.ndarray:
        import nibabel as nib
        from totalsegmentator.map_to_binary import class_map
        from totalsegmentator.python_api import get_task_config

        cfg = get_task_config(task, fast=fast, fastest=fastest, quiet=True, robust_crop=robust_crop,
                              plans="nnUNetPlans", model_size="big")
        if cfg.get("cascade") or task in ("vertebrae_pp", "vertebrae_pp_refined"):
            raise Unsupported(f"task {task}'s cascade or vertebra post-processing")
        crop_model, crop_addon = cfg.get("crop_model"), cfg.get("crop_addon")
        remove_outside, remove_dilation = cfg.get("remove_outside"), cfg.get("remove_outside_dilation")
        crop = cfg.get("crop")
        remove_mask = cfg.get("remove_mask")

        # python_api: MR always crops with its 3 mm model.
        robust_rs = bool(task.endswith("_mr") and roi_subset)
        if roi_subset is not None and not task.startswith("total"):
            raise SegmentationError("bad_request", "roi_subset only works with task 'total' or 'total_mr'")

        if crop is not None or roi_subset is not None:
            if crop_model is None:
                crop_id, crop_spacing, crop_trainer, crop_task = _crop_choice(task, cfg, robust_rs)
                organ = self.predict_image(
                    image, crop_id, model="3d_fullres", folds=[0], trainer=crop_trainer, resample=crop_spacing,
                    crop=None, crop_addon=None, task_name=crop_task, plans="nnUNetPlans",
                )
                inverse = {v: k for k, v in class_map[crop_task].items()}
            else:
                organ = self.run_sub(image, crop_model)
                inverse = {v: k for k, v in class_map[crop_model].items()}
            crop_mask = np.zeros(organ.shape, dtype=np.uint8)
            for roi in (crop if crop is not None else roi_subset):
                crop_mask[organ == inverse[roi]] = 1
            crop_img = nib.Nifti1Image(crop_mask, image.affine)
            crop_addon = [20, 20, 20] if crop_model is None else crop_addon
            if remove_outside is not None:
                remove = np.zeros(organ.shape, dtype=np.uint8)
                for roi in remove_outside:
                    remove[organ == inverse[roi]] = 1
                remove_mask = remove
        else:
            crop_img = None

        return self.predict_image(
            image, cfg["task_id"], model=cfg.get("model") or "3d_fullres", folds=cfg.get("folds") or [0],
            trainer=cfg["trainer"], resample=cfg.get("resample"), crop=crop_img, crop_addon=crop_addon,
            task_name=task, plans=cfg.get("plans") or "nnUNetPlans", roi_subset=roi_subset,
            remove_outside_mask=remove_mask, remove_outside_dilation=remove_dilation,
        )

    def model_keys(self, task: str, *, fast: bool = False, fastest: bool = False,
                   roi_subset: list[str] | None = None, robust_crop: bool | None = None) -> list[ModelKey]:
        """The models :meth:`run` loads for this task, in the order it loads them (for preloading)."""
        from totalsegmentator.python_api import get_task_config

        cfg = get_task_config(task, fast=fast, fastest=fastest, quiet=True, robust_crop=robust_crop,
                              plans="nnUNetPlans", model_size="big")
        keys: list[ModelKey] = []
        if cfg.get("crop") is not None or roi_subset is not None:
            if cfg.get("crop_model") is None:
                crop_id, _, crop_trainer, _ = _crop_choice(task, cfg, bool(task.endswith("_mr") and roi_subset))
                keys.append(self.model_key(crop_id, crop_trainer, "nnUNetPlans", "3d_fullres", [0]))
            else:
                keys += self.model_keys(cfg["crop_model"], robust_crop=False)
        task_id = cfg["task_id"]
        ids = _part_ids(task, task_id, roi_subset) if isinstance(task_id, list) else [int(task_id)]
        for i in ids:
            keys.append(self.model_key(i, cfg["trainer"], cfg.get("plans") or "nnUNetPlans",
                                       cfg.get("model") or "3d_fullres", cfg.get("folds") or [0]))
        return keys

    def run_sub(self, image: Any, task: str) -> np.ndarray:
        """python_api: a task's ``crop_model`` is run as ``totalsegmentator(input, None, task=crop_model)``."""
        return self._task(image, task, fast=False, fastest=False, roi_subset=None, robust_crop=False)

    # ---------------------------------------------------------------- nnunet.nnUNet_predict_image

    def predict_image(self, img_in_orig: Any, task_id: int | list[int], *, model: str, folds: list,
                      trainer: str, resample: Any, crop: Any, crop_addon: Any, task_name: str, plans: str,
                      roi_subset: list[str] | None = None, remove_outside_mask: np.ndarray | None = None,
                      remove_outside_dilation: float | None = None) -> np.ndarray:
        """``nnUNet_predict_image(img, None, task_id, ..., multilabel_image=True)``'s labels as a uint8
        [x, y, z] array on ``img_in_orig``'s grid."""
        import nibabel as nib
        from totalsegmentator import map_to_binary as M
        from totalsegmentator.alignment import as_closest_canonical, undo_canonical
        from totalsegmentator.cropping import crop_to_mask, undo_crop
        from totalsegmentator.postprocessing import (
            keep_largest_blob_multilabel,
            remove_auxiliary_labels,
            remove_outside_of_mask,
            remove_small_blobs_multilabel,
        )
        from totalsegmentator.resampling import change_spacing

        multimodel = isinstance(task_id, list)
        if isinstance(resample, float):
            resample = [resample, resample, resample]
        label_map = M.class_map[task_name]
        if roi_subset is not None:
            label_map = {k: v for k, v in label_map.items() if v in roi_subset}

        t0 = time.perf_counter()
        img_in = nib.Nifti1Image(img_in_orig.get_fdata(), img_in_orig.affine)
        bbox = None
        if crop is not None:
            if crop.get_fdata().sum() == 0:  # "Crop is empty. Returning empty segmentation."
                return np.zeros(img_in.shape, dtype=np.uint8)
            img_in, bbox = crop_to_mask(img_in, crop, addon=crop_addon, dtype=np.int32, verbose=False)
        img_in = as_closest_canonical(img_in)
        use_gpu = self.device.startswith("cuda")
        img_in_shape = img_in.shape
        # nr_cpus=1: change_spacing's joblib loop runs over the channels (one here), so more workers only
        # start loky processes; the result does not depend on it.
        if resample is not None:
            img_in_rsp = change_spacing(img_in, resample, order=1, dtype=np.int32, nr_cpus=1,
                                        use_gpu=use_gpu)
        else:
            img_in_rsp = img_in
        self.info.resample_s += time.perf_counter() - t0

        # nnUNet_predict_image's triple split (along z, 20-voxel margins) of very large images.
        ss = img_in_rsp.shape
        split = bool(np.prod(ss) > TRIPLE_SPLIT_VOXELS and ss[2] > 200 and multimodel)
        if split:
            data = img_in_rsp.get_fdata()
            third, margin = ss[2] // 3, TRIPLE_SPLIT_MARGIN
            parts = [
                nib.Nifti1Image(data[:, :, :third + margin], img_in_rsp.affine),
                nib.Nifti1Image(data[:, :, third + 1 - margin:third * 2 + margin], img_in_rsp.affine),
                nib.Nifti1Image(data[:, :, third * 2 + 1 - margin:], img_in_rsp.affine),
            ]
            del data
        else:
            parts = [img_in_rsp]
        step = 0.8 if task_name in COARSE_STEP_TASKS else 0.5

        if multimodel:
            part_maps, id_to_part = _parts(task_name)
            ids = _part_ids(task_name, task_id, roi_subset)
            inverse = {v: k for k, v in M.class_map[task_name].items()}
            combined = [np.zeros(p.shape, dtype=np.uint8) for p in parts]
            for tid in ids:
                part_map = part_maps[id_to_part[tid]]
                lut = np.zeros(max(part_map.keys()) + 1, dtype=np.uint8)
                for j, name in part_map.items():
                    lut[j] = inverse[name]
                for p, out in zip(parts, combined):
                    seg = self.run_model(tid, trainer, plans, model, folds, p, step, task_name).astype(np.uint8)
                    if seg.size > 0 and seg.max() >= len(lut):
                        lut = np.pad(lut, (0, int(seg.max()) + 1 - len(lut)), mode="constant")
                    mapped = lut[seg]
                    np.copyto(out, mapped, where=mapped != 0)
            segs = combined
        else:
            segs = [self.run_model(int(task_id), trainer, plans, model, folds, p, step, task_name) for p in parts]

        t1 = time.perf_counter()
        if split:
            third, margin = ss[2] // 3, TRIPLE_SPLIT_MARGIN
            pred = np.zeros(ss, dtype=np.uint8)
            pred[:, :, :third] = segs[0][:, :, :-margin]
            pred[:, :, third:third * 2] = segs[1][:, :, margin - 1:-margin]
            pred[:, :, third * 2:] = segs[2][:, :, margin - 1:]
        else:
            pred = segs[0]
        img_pred = nib.Nifti1Image(pred, img_in_rsp.affine)
        img_pred = remove_auxiliary_labels(img_pred, task_name)
        if task_name == "body":
            pp = keep_largest_blob_multilabel(img_pred.get_fdata().astype(np.uint8), M.class_map[task_name],
                                              ["body_trunc"], debug=False, quiet=True)
            img_pred = nib.Nifti1Image(pp, img_pred.affine)
            vox_vol = np.prod(img_pred.header.get_zooms())
            pp = remove_small_blobs_multilabel(img_pred.get_fdata().astype(np.uint8), M.class_map[task_name],
                                               ["body_extremities"], interval=[50000 / vox_vol, 1e10],
                                               debug=False, quiet=True)
            img_pred = nib.Nifti1Image(pp, img_pred.affine)
        if resample is not None:
            img_pred = change_spacing(img_pred, resample, img_in_shape, order=0, dtype=np.uint8,
                                      nr_cpus=1, force_affine=img_in.affine, use_gpu=use_gpu)
        img_pred = undo_canonical(img_pred, img_in_orig)
        if bbox is not None:
            img_pred = undo_crop(img_pred, img_in_orig, bbox)
        img_data = img_pred.get_fdata().astype(np.uint8)
        if roi_subset is not None:
            img_data *= np.isin(img_data, list(label_map.keys()))
        if remove_outside_dilation is not None and remove_outside_mask is not None:
            zooms = img_in_orig.header.get_zooms()
            addon = int(remove_outside_dilation / np.mean(zooms))
            img_data = remove_outside_of_mask(img_data, remove_outside_mask, addon=addon)
        self.info.resample_s += time.perf_counter() - t1
        return img_data

    # ---------------------------------------------------------------- nnunet.nnUNetv2_predict

    def model_key(self, dataset_id: int, trainer: str, plans: str, model: str, folds: list,
                  device: str | None = None) -> ModelKey:
        folder = W.results_dir(self.home) / W.dataset_folder(dataset_id) / f"{trainer}__{plans}__{model}"
        if not folder.is_dir():
            raise SegmentationError(
                "weights_missing", f"model folder {folder} is missing; the node never downloads weights: "
                f"{W.import_hint()}",
            )
        device = device or self.device
        precision = self.precision if device == self.device else "fp32"
        return ModelKey(str(folder), tuple(folds), CHECKPOINT, device, precision)

    def run_model(self, dataset_id: int, trainer: str, plans: str, model: str, folds: list, image: Any,
                  step: float, task_name: str) -> np.ndarray:
        """``nnUNetv2_predict`` on one in-memory image: labels as an [x, y, z] array of its shape."""
        key = self.model_key(dataset_id, trainer, plans, model, folds)
        record = ModelRun(dataset=dataset_id, task=task_name)
        self.info.models.append(record)
        with self.cache.lease(key) as lease:
            record.cache_hit, record.load_s = lease.hit, lease.load_seconds
            return self._predict(lease.predictor, key, image, step, record)

    def _envelope(self, predictor: Any, image: Any) -> Envelope | None:
        if self.envelope_mm <= 0:
            return None
        schemes = list(predictor.configuration_manager.normalization_schemes)
        if not schemes or any(s != "CTNormalization" for s in schemes):
            return None  # per-image normalisation (MR): a box would change what the network sees
        key = id(image)
        if key not in self._envelopes:
            from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

            data = np.asanyarray(image.dataobj)
            zooms = [float(z) for z in image.header.get_zooms()[:3]]
            cm = predictor.configuration_manager
            shape_zyx = list(data.shape[::-1])
            if list(compute_new_shape(shape_zyx, zooms[::-1], cm.spacing)) != shape_zyx:
                # nnU-Net resamples this image itself (TotalSegmentator did not): a box resampled on its
                # own is not a sub-grid of the whole image resampled, so labels could differ at the edges.
                self._envelopes[key] = None
                return None
            patch_zyx = list(predictor.configuration_manager.patch_size)
            target_zyx = list(predictor.configuration_manager.spacing)
            # one patch at the model's spacing, in this image's voxels ([x, y, z])
            min_extent = [math.ceil(patch_zyx[2 - a] * target_zyx[2 - a] / zooms[a]) for a in range(3)]
            self._envelopes[key] = body_envelope(data, zooms, self.envelope_mm, min_extent)
        return self._envelopes[key]

    def _predict(self, predictor: Any, key: ModelKey, image: Any, step: float, record: ModelRun) -> np.ndarray:
        import torch
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
        from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        predictor.tile_step_size = step
        t0 = time.perf_counter()
        full = np.asanyarray(image.dataobj)
        zooms = [float(z) for z in image.header.get_zooms()[:3]]
        envelope = self._envelope(predictor, image)
        if envelope is not None and envelope.covers(full.shape):
            envelope = None
        sub = full[envelope.slices()] if envelope is not None else full
        # nib.save + nnU-Net's SimpleITKIO.read_images: float32, [z, y, x], spacing = zooms reversed.
        data = np.ascontiguousarray(sub.transpose(2, 1, 0)[None], dtype=np.float32)
        props: dict[str, Any] = {"spacing": [zooms[2], zooms[1], zooms[0]]}
        cm, pm = predictor.configuration_manager, predictor.plans_manager
        preprocessor = cm.preprocessor_class(verbose=False)
        data, _, props = preprocessor.run_case_npy(data, None, props, pm, cm, predictor.dataset_json)
        record.preprocess_s += time.perf_counter() - t0

        patch = list(cm.patch_size)
        record.tiles_run = _tiles(data.shape[1:], patch, step, compute_steps_for_sliding_window)
        if envelope is not None:
            full_zyx = full.shape[::-1]
            full_shape = compute_new_shape(full_zyx, props["spacing"], cm.spacing)
            record.tiles_skipped = _tiles(full_shape, patch, step, compute_steps_for_sliding_window) - record.tiles_run
            record.envelope = [[lo, hi] for lo, hi in zip(envelope.lo, envelope.hi)]

        t1 = time.perf_counter()
        logits = self._logits(predictor, key, torch.from_numpy(data))
        record.network_s += time.perf_counter() - t1

        t2 = time.perf_counter()
        seg = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, pm, cm, predictor.label_manager, props, return_probabilities=False,
            num_threads_torch=self.threads,
        )
        del logits
        # nnU-Net's SimpleITK export read back by nib.load: [z, y, x] -> [x, y, z].
        seg = seg.transpose(2, 1, 0)
        if envelope is not None:
            out = np.zeros(full.shape, dtype=seg.dtype)
            out[envelope.slices()] = seg
            seg = out
        record.export_s += time.perf_counter() - t2
        return seg

    def _logits(self, predictor: Any, key: ModelKey, data: Any) -> Any:
        """Sliding-window logits. CUDA out of memory: nnU-Net itself first retries with its results
        arrays on the CPU (the smaller GPU footprint, inside ``predict_sliding_window_return_logits``);
        when that runs out of memory too, the job is retried once on the CPU here, and
        ``info.retries`` says so."""
        import torch

        try:
            return predictor.predict_logits_from_preprocessed_data(data).cpu()
        except Exception as exc:
            if not is_cuda_oom(exc):
                raise
            first = f"{type(exc).__name__} on {key.device}"
        _empty_cache(key.device)
        self.info.retries.append(f"{first}: retried on the CPU")
        cpu_key = replace(key, device="cpu", precision="fp32")
        saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with self.cache.lease(cpu_key) as lease:
                lease.predictor.tile_step_size = predictor.tile_step_size
                return lease.predictor.predict_logits_from_preprocessed_data(data).cpu()
        finally:
            torch.set_num_threads(saved)


def _crop_choice(task: str, cfg: dict, robust_rs: bool) -> tuple[int, float, str, str]:
    """python_api.totalsegmentator's crop model: (dataset, spacing, trainer, its class map's task)."""
    if robust_rs or cfg.get("robust_crop"):
        crop_id, spacing = (852 if task.endswith("_mr") else 297), 3.0
    elif task.endswith("_mr"):  # "For MR always run 3mm model for cropping"
        crop_id, spacing = 852, 3.0
    else:
        crop_id, spacing = 298, 6.0
    crop_task = "total_mr" if (task.endswith("_mr") or cfg.get("modality") == "mr") else "total"
    trainer = "nnUNetTrainer_2000epochs_NoMirroring" if task.endswith("_mr") else "nnUNetTrainer_4000epochs_NoMirroring"
    crop = cfg.get("crop")
    if crop is not None and ("body_trunc" in crop or "body_extremities" in crop):
        crop_id, spacing, trainer, crop_task = 300, 6.0, "nnUNetTrainer", "body"
    return crop_id, spacing, trainer, crop_task


def _parts(task_name: str) -> tuple[dict, dict]:
    """nnUNet_predict_image's (class map per part, dataset id -> part name) of a task run in parts."""
    parts = W._part_maps(task_name)
    if parts is None:
        raise KeyError(task_name)
    return parts


def _part_ids(task_name: str, task_id: list[int], roi_subset: list[str] | None) -> list[int]:
    """The parts nnUNet_predict_image runs: all, or only those holding a class of the roi_subset."""
    if roi_subset is None:
        return [int(i) for i in task_id]
    part_maps, id_to_part = _parts(task_name)
    part_to_id = {v: k for k, v in id_to_part.items()}
    return [int(part_to_id[name]) for name, pm in part_maps.items() if any(o in roi_subset for o in pm.values())]


def _empty_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _tiles(shape: Any, patch: list[int], step: float, steps_fn: Any) -> int:
    padded = [max(int(s), int(p)) for s, p in zip(shape, patch)]
    steps = steps_fn(padded, patch, step)
    return int(np.prod([len(s) for s in steps]))
