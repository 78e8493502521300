"""Tiny nnU-Net v2 checkpoints that make TotalSegmentator's real pipeline a deterministic intensity lookup.

TotalSegmentator's weights are nnU-Net v2 results folders::

    $TOTALSEG_HOME_DIR/nnunet/results/<DatasetNNN_name>/<trainer>__<plans>__<config>/
        dataset.json  plans.json  fold_0/checkpoint_final.pth

:func:`write_dataset` writes one such folder. Everything TotalSegmentator and nnU-Net look up is read
from the installed TotalSegmentator, never written down here: the folder name (its weights table), the
trainer, plans name, configuration, target spacing (its task config) and the label ids (its class
maps, per part for the models it runs in parts).

The network is a real ``dynamic_network_architectures`` ``PlainConvUNet``, described in plans.json the
way nnU-Net v2 plans describe one, and rebuilt by nnU-Net from that description. It has two stages,
1x1x1 kernels, no normalisation and ReLU, and its weights make every voxel's logits a step function
of that voxel's intensity:

* nnU-Net's CT normalisation is ``(clip(v, p00_5, p99_5) - mean) / std``; the plans say mean 0 and
  std ``SCALE``, so the network sees ``x = v / SCALE`` and multiplies it back by ``SCALE``.
* For each threshold ``T`` the first stage makes ``a = relu(v - (T - 1))`` and ``b = relu(v - T)``;
  the decoder's convolution makes ``g_T = relu(a - b) = clamp(v - T + 1, 0, 1)``: 0 for integer
  ``v <= T - 1`` and 1 for ``v >= T``. The second stage and the transposed convolution are zero.
* The segmentation layer gives class ``c`` with interval ``[lo, hi)`` the logit
  ``LOGIT * (g_lo - g_hi)`` and background a constant ``BACKGROUND`` logit, so the class wins inside
  its interval and background outside it, by margins of 2 with logits no larger than 3 (nothing for
  half precision to overflow).

With an input already on the model's grid (TotalSegmentator resamples only when the spacing differs),
TotalSegmentator's resampling, cropping, nnU-Net's preprocessing, sliding window (Gaussian-weighted
tiles of identical per-voxel logits) and export all keep integer intensities and exact labels, so a
test can assert every voxel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: nnU-Net's CT normalisation divides by the plans' std; this one, so the network sees v / SCALE.
SCALE = 100.0
#: Clip range of the CT normalisation (the plans' 0.5 and 99.5 percentiles).
CLIP = (-1024.0, 1500.0)
LOGIT = 3.0
BACKGROUND = 1.0
#: Patch size of every fixture model (each axis divisible by the one stride-2 stage).
PATCH = (32, 32, 32)

#: Default lookup: class name -> [lo, hi) in HU (hi None = no upper bound). A dataset uses the
#: entries whose names it has among its labels.
DEFAULT_LOOKUP: dict[str, tuple[float, float | None]] = {
    "liver": (30, 150),
    "portal_vein_and_splenic_vein": (150, None),
    "liver_vessels": (150, None),
    "liver_tumor": (10, 30),
}


@dataclass(frozen=True)
class DatasetSpec:
    """What TotalSegmentator expects of one dataset's folder, read from the installed package."""

    dataset_id: int
    folder: str
    trainer: str
    plans: str
    configuration: str
    #: Target spacing in TotalSegmentator's [x, y, z] order, or None (the task does not resample).
    resample_xyz: tuple[float, float, float] | None
    #: Label name -> id, background excluded.
    labels: dict[str, int]
    modality: str


def dataset_spec(dataset_id: int) -> DatasetSpec:
    """The first task (mode) of the installed TotalSegmentator that runs ``dataset_id``."""
    from totalsegmentator.map_tasks_config import DEFAULT_CONFIG, TASK_CONFIGS
    from totalsegmentator.map_to_binary import class_map
    from totalsegmentator.registry import task_modality

    from node.segment.weights import _part_maps, dataset_folder

    for task, raw in TASK_CONFIGS.items():
        configs = list(raw["sub_modes"].values()) if "sub_modes" in raw else [raw]
        for sub in configs:
            config = {**DEFAULT_CONFIG, **sub}
            ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
            if dataset_id not in ids:
                continue
            if len(ids) > 1:
                parts = _part_maps(task)
                if parts is None:
                    raise LookupError(f"task {task} runs {ids} in parts, but its part maps are unknown")
                part_maps, id_to_part = parts
                labels = part_maps[id_to_part[dataset_id]]
            else:
                labels = class_map[task]
            resample = config.get("resample")
            if isinstance(resample, (int, float)):
                resample = (float(resample),) * 3
            return DatasetSpec(
                dataset_id=dataset_id,
                folder=dataset_folder(dataset_id),
                trainer=config["trainer"],
                plans=config.get("plans") or "nnUNetPlans",
                configuration=config.get("model") or "3d_fullres",
                resample_xyz=tuple(float(v) for v in resample) if resample is not None else None,
                labels={name: int(i) for i, name in sorted(class_map_items(labels))},
                modality=task_modality(task),
            )
    raise LookupError(f"no task of the installed TotalSegmentator runs dataset {dataset_id}")


def class_map_items(labels: dict) -> list[tuple[int, str]]:
    return [(int(i), str(name)) for i, name in labels.items()]


def _thresholds(lookup: dict[str, tuple[float, float | None]], labels: dict[str, int]) -> list[float]:
    values = set()
    for name, (lo, hi) in lookup.items():
        if name in labels:
            values.add(float(lo))
            if hi is not None:
                values.add(float(hi))
    return sorted(values)


def lookup_network_weights(labels: dict[str, int], lookup: dict[str, tuple[float, float | None]], scale: float):
    """(network, state dict) of the lookup ``PlainConvUNet`` for these labels."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    thresholds = _thresholds(lookup, labels)
    m = max(1, len(thresholds))
    features = 2 * m
    n_classes = max(labels.values()) + 1
    network = PlainConvUNet(**_arch_kwargs(features, resolve=True), input_channels=1, num_classes=n_classes)
    with torch.no_grad():
        for p in network.parameters():
            p.zero_()
        stem = network.encoder.stages[0][0].convs[0].conv
        for index, t in enumerate(thresholds):
            stem.weight[2 * index, 0] = scale
            stem.bias[2 * index] = -(t - 1.0)
            stem.weight[2 * index + 1, 0] = scale
            stem.bias[2 * index + 1] = -t
        decoder_conv = network.decoder.stages[0].convs[0].conv
        # Its input is [transposed-convolution output (features), skip from stage 0 (features)].
        for index in range(len(thresholds)):
            decoder_conv.weight[index, features + 2 * index] = 1.0
            decoder_conv.weight[index, features + 2 * index + 1] = -1.0
        seg = network.decoder.seg_layers[0]
        seg.bias[0] = BACKGROUND
        for name, (lo, hi) in lookup.items():
            if name not in labels:
                continue
            c = labels[name]
            seg.weight[c, thresholds.index(float(lo))] += LOGIT
            if hi is not None:
                seg.weight[c, thresholds.index(float(hi))] -= LOGIT
    return network, network.state_dict()


def _arch_kwargs(features: int, resolve: bool = False) -> dict:
    kwargs = {
        "n_stages": 2,
        "features_per_stage": [features, 2],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 1, 1], [1, 1, 1]],
        "strides": [[1, 1, 1], [2, 2, 2]],
        "n_conv_per_stage": [1, 1],
        "n_conv_per_stage_decoder": [1],
        "conv_bias": True,
        "norm_op": None,
        "norm_op_kwargs": None,
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.ReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if resolve:
        import pydoc

        for key in ("conv_op", "nonlin"):
            kwargs[key] = pydoc.locate(kwargs[key])
    return kwargs


def write_dataset(
    home: Path,
    dataset_id: int,
    lookup: dict[str, tuple[float, float | None]] | None = None,
    spacing_mm: float = 3.0,
) -> Path:
    """Write dataset ``dataset_id``'s folder under ``home``; returns the model folder.

    ``spacing_mm`` is the target spacing for a task that does not resample (its nnU-Net plans decide);
    a task that resamples gets its own resample spacing.
    """
    import torch

    spec = dataset_spec(dataset_id)
    lookup = DEFAULT_LOOKUP if lookup is None else lookup
    ct = spec.modality == "CT"
    scale = SCALE if ct else 1.0
    xyz = spec.resample_xyz or (spacing_mm,) * 3
    spacing_zyx = [xyz[2], xyz[1], xyz[0]]  # nnU-Net plans are [z, y, x]

    thresholds = _thresholds(lookup, spec.labels)
    features = 2 * max(1, len(thresholds))
    network, state = lookup_network_weights(spec.labels, lookup, scale)
    del network

    plans = {
        "dataset_name": Path(spec.folder).name,
        "plans_name": spec.plans,
        "original_median_spacing_after_transp": spacing_zyx,
        "original_median_shape_after_transp": list(PATCH),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            spec.configuration: {
                "data_identifier": f"{spec.plans}_{spec.configuration}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(PATCH),
                "median_image_size_in_voxels": list(PATCH),
                "spacing": spacing_zyx,
                "normalization_schemes": ["CTNormalization" if ct else "NoNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None,
                },
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": _arch_kwargs(features),
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": CLIP[1], "mean": 0.0, "median": 0.0, "min": CLIP[0],
                "percentile_00_5": CLIP[0], "percentile_99_5": CLIP[1], "std": SCALE,
            }
        },
    }
    dataset_json = {
        "channel_names": {"0": spec.modality},
        "labels": {"background": 0, **spec.labels},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "name": Path(spec.folder).name,
        "description": "segnode test fixture: a deterministic intensity lookup, not a trained model",
    }
    model_dir = home / "nnunet" / "results" / spec.folder / f"{spec.trainer}__{spec.plans}__{spec.configuration}"
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=1))
    (model_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    checkpoint = {
        "network_weights": state,
        "trainer_name": spec.trainer,
        "init_args": {"plans": plans, "configuration": spec.configuration, "fold": 0,
                      "dataset_json": dataset_json, "device": "cpu"},
        "inference_allowed_mirroring_axes": None,
        "current_epoch": 0,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
    }
    torch.save(checkpoint, model_dir / "fold_0" / "checkpoint_final.pth")
    return model_dir


def install_for_task(
    home: Path,
    task: str,
    *,
    fast: bool = False,
    fastest: bool = False,
    roi_subset: tuple[str, ...] = (),
    robust_crop: bool | None = None,
    lookup: dict[str, tuple[float, float | None]] | None = None,
    spacing_mm: float = 3.0,
) -> list[int]:
    """Write every dataset this TotalSegmentator run loads; returns their ids."""
    from node.segment.weights import required_datasets

    ids = required_datasets(task, fast=fast, fastest=fastest, roi_subset=roi_subset, robust_crop=robust_crop)
    for dataset_id in ids:
        write_dataset(home, dataset_id, lookup=lookup, spacing_mm=spacing_mm)
    return ids


def expected_labels(values, labels: dict[str, int], lookup: dict[str, tuple[float, float | None]] | None = None):
    """What the lookup network labels each intensity in ``values`` (a numpy array) as."""
    import numpy as np

    lookup = DEFAULT_LOOKUP if lookup is None else lookup
    out = np.zeros(np.shape(values), dtype=np.uint8)
    for name, (lo, hi) in lookup.items():
        if name in labels:
            inside = values >= lo if hi is None else (values >= lo) & (values < hi)
            out[inside] = labels[name]
    return out
