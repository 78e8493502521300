"""The node's DICOM-SEG of the TINY phantom, made the node's real way, for tests that check the SEG itself
(tests/integration/test_seg_conformance.py) or show it (tests/browser/test_ohif.py)."""

from __future__ import annotations

from pathlib import Path

from node.phantom import TINY, write_phantom
from node.pipeline import PipelineRequest, PipelineResult, run_pipeline
from node.segment import SegmentRequest


def phantom_seg(tmp: Path) -> tuple[dict[str, Path], PipelineResult]:
    """The TINY phantom written under ``tmp/phantom`` (its paths by kind: ``dicom``, ``labels``, ...) and
    the pipeline's successful run on its CT series under ``tmp/run``: the ``labelmap`` engine fed the
    phantom's exact labels, the ``seg`` output (``run.paths["seg"]``)."""
    phantom = write_phantom(TINY, tmp / "phantom")
    request = PipelineRequest(segment=SegmentRequest(engine="labelmap", labels_path=phantom["labels"]),
                              outputs=("seg",))
    run = run_pipeline(phantom["dicom"], tmp / "run", request)
    assert run.ok, run.error
    return phantom, run
