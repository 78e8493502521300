"""The node's DICOM-SEG of a phantom, made the node's real way, for tests that check the SEG itself
(tests/integration/test_seg_conformance.py) or show it (tests/browser/test_ohif.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from node.phantom import TINY, PhantomSpec, write_phantom
from node.pipeline import PipelineRequest, PipelineResult, run_pipeline
from node.segment import SegmentRequest


def phantom_seg(tmp: Path, spec: PhantomSpec = TINY, seg_options: Mapping[str, Any] | None = None,
                outputs: tuple[str, ...] = ("seg",)) -> tuple[dict[str, Path], PipelineResult]:
    """The phantom of ``spec`` (TINY by default) written under ``tmp/phantom`` (its paths by kind:
    ``dicom``, ``labels``, ...) and the pipeline's successful run on its CT series under ``tmp/run``: the
    ``labelmap`` engine fed the phantom's exact labels, the ``seg`` output (``run.paths["seg"]``) with
    ``seg_options`` (the rule's ``stage_options["seg"]``; none: the node's defaults), and any other
    ``outputs``, e.g. ``("seg", "rtstruct")`` for an RTSTRUCT of the same structures
    (``run.paths["rtstruct"]``)."""
    phantom = write_phantom(spec, tmp / "phantom")
    request = PipelineRequest(segment=SegmentRequest(engine="labelmap", labels_path=phantom["labels"]),
                              outputs=outputs, stage_options={"seg": dict(seg_options or {})})
    run = run_pipeline(phantom["dicom"], tmp / "run", request)
    assert run.ok, run.error
    return phantom, run
