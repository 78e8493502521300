"""Which weights a run needs, checked against TotalSegmentator's own run rather than restated.

``python_api.totalsegmentator`` (2.18) is called for real on a tiny image with its network calls
recorded instead of run: ``download_pretrained_weights`` (what must be on disk, or it tries to
download) and ``nnUNet_predict_image`` (the crop model returns an empty organ map; the task's own
prediction stops the run, after every download has been asked for). The node's weights check must
name exactly those datasets, and the resident engine must load nothing outside them.
Imports torch (through python_api), so about 6 s.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("totalsegmentator")

from node.segment import weights as W  # noqa: E402

PORTAL = ["portal_vein_and_splenic_vein", "inferior_vena_cava", "liver"]
TOTAL_PARTS = {291, 292, 293, 294, 295}


class _Stop(Exception):
    """The task's own prediction was reached: every download has been asked for."""


@pytest.fixture(scope="module")
def ts_run(tmp_path_factory):
    """``run(task, **options)`` -> the set of datasets TotalSegmentator's python_api asks to download."""
    import nibabel as nib
    import numpy as np
    import torch
    from totalsegmentator import nnunet, python_api

    saved_env, saved_threads = dict(os.environ), torch.get_num_threads()
    saved = (python_api.download_pretrained_weights, nnunet.nnUNet_predict_image, python_api.send_usage_stats,
             python_api.convert_device_to_string)
    os.environ["TOTALSEG_HOME_DIR"] = str(tmp_path_factory.mktemp("totalseg_home"))
    asked: list[int] = []

    def predict(image, output, task_id, **kwargs):
        if "roi_subset" in kwargs:  # only the task's own prediction passes roi_subset
            raise _Stop
        return nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), None, None

    python_api.download_pretrained_weights = asked.append
    nnunet.nnUNet_predict_image = predict
    python_api.send_usage_stats = lambda *a, **k: None
    # 2.18 turns the "cpu" select_device gives into None when it runs a task's crop_model (a CPU-only bug
    # the resident engine does not have); pass it on as it is.
    python_api.convert_device_to_string = lambda device: getattr(device, "type", device)
    image = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))

    def run(task: str, roi_subset=None, **options) -> set[int]:
        asked.clear()
        with pytest.raises(_Stop):
            python_api.totalsegmentator(image, None, task=task, roi_subset=roi_subset, quiet=True,
                                        device="cpu", **options)
        return set(asked)

    try:
        yield run
    finally:
        (python_api.download_pretrained_weights, nnunet.nnUNet_predict_image, python_api.send_usage_stats,
         python_api.convert_device_to_string) = saved
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)


def _node(task: str, roi_subset=None, robust_crop: bool = False, **modes) -> set[int]:
    ids = W.required_datasets(task, roi_subset=tuple(roi_subset or ()),
                              robust_crop=True if robust_crop else None, **modes)
    assert len(ids) == len(set(ids))
    return set(ids)


@pytest.mark.parametrize(
    ("task", "options", "expected"),
    [
        ("total", {}, TOTAL_PARTS),
        ("total", {"fast": True}, {297}),
        ("total", {"fastest": True}, {298}),
        # python_api downloads all five parts, though it predicts only those holding the roi classes.
        ("total", {"roi_subset": ["liver"]}, {298} | TOTAL_PARTS),
        ("total", {"roi_subset": PORTAL}, {298} | TOTAL_PARTS),
        ("total", {"roi_subset": PORTAL, "robust_crop": True}, {297} | TOTAL_PARTS),
        ("total", {"roi_subset": ["liver"], "fast": True}, {298, 297}),
        ("total", {"roi_subset": ["liver"], "fast": True, "robust_crop": True}, {297}),
        ("total_mr", {}, {850, 851}),
        ("total_mr", {"fast": True}, {852}),
        ("total_mr", {"roi_subset": ["liver"]}, {852, 850, 851}),  # MR always crops with its 3 mm model
        ("total_mr", {"roi_subset": ["liver"], "robust_crop": True}, {852, 850, 851}),
        ("liver_vessels", {}, {298, 8}),
        ("liver_vessels", {"robust_crop": True}, {297, 8}),
        ("lung_vessels", {}, {297, 117}),  # robust_crop is this task's own default
        ("vertebrae_pp_refined", {}, {803, 305}),
    ],
)
def test_weights_check_names_what_totalsegmentator_downloads(ts_run, task, options, expected) -> None:
    assert ts_run(task, **options) == expected
    assert _node(task, **options) == expected


def test_every_free_task_and_mode_matches_totalsegmentator(ts_run) -> None:
    checked = 0
    for task in W.tasks():
        if W.is_commercial(task) or task == "test":
            # python_api exits without a licence before it asks for weights; its own "test" task has
            # crop="body" (a string), which python_api iterates letter by letter and fails on.
            continue
        for mode in W.task_modes(task):
            modes = {"fast": mode == "fast", "fastest": mode == "fastest"}
            assert _node(task, **modes) == ts_run(task, **modes), (task, mode)
            checked += 1
    assert checked > 40


@pytest.mark.parametrize(
    ("task", "options"),
    [
        ("total", {}),
        ("total", {"roi_subset": PORTAL}),
        ("total", {"roi_subset": PORTAL, "robust_crop": True}),
        ("total", {"roi_subset": ["liver"], "fast": True}),
        ("total_mr", {"roi_subset": ["liver"]}),
        ("liver_vessels", {"robust_crop": True}),
    ],
)
def test_resident_engine_loads_only_checked_datasets(tmp_path, task, options) -> None:
    """The resident engine's models all lie in folders the check requires (only those are created here,
    so a model outside them is its ``weights_missing``); with a roi_subset it loads only the roi's parts."""
    from node.segment.resident import ResidentRunner

    ids = _node(task, **options)
    own = W.task_config(task, fast=options.get("fast", False))["trainer"]
    for dataset_id in ids:
        for trainer in {own, "nnUNetTrainer_2000epochs_NoMirroring", "nnUNetTrainer_4000epochs_NoMirroring"}:
            folder = W.results_dir(tmp_path) / W.dataset_folder(dataset_id)
            (folder / f"{trainer}__nnUNetPlans__3d_fullres").mkdir(parents=True)
    runner = ResidentRunner(tmp_path, device="cpu")
    robust = True if options.get("robust_crop") else None
    keys = runner.model_keys(task, fast=options.get("fast", False), roi_subset=options.get("roi_subset"),
                             robust_crop=robust)
    loaded = {int(W.DATASET_RE.match(os.path.basename(os.path.dirname(k.folder))).group(1)) for k in keys}
    assert loaded <= ids
    if task == "total" and options.get("roi_subset") == PORTAL:
        assert loaded == {297 if robust else 298, 291, 293}
