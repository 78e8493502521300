"""DICOM-SEG for the node: the writer, the one reader, the pipeline's ``seg`` output and its CLI helpers.

Writing (:mod:`node.dicom.seg_write`)::

    from node.dicom.seg import SegOptions, write_seg
    write_seg(labels, "path/to/ct-series", "seg.dcm")                              # BINARY, version 1
    write_seg(labels, datasets, "seg.dcm", options=SegOptions(version=2))          # supersedes v1
    write_seg(labels, datasets, "seg.dcm", options=SegOptions(segmentation_type="LABELMAP",
                                                               compression="RLE"))
    ds = build_seg(labels, datasets)                                               # the Dataset

Reading (:mod:`node.dicom.seg_read`)::

    labels = read_seg("seg.dcm", source_volume_or_folder)   # LabelVolume on the source grid
    masks = read_seg_masks("seg.dcm", source)               # one mask per segment (overlaps kept)
    placement = place_frames(parse_seg("seg.dcm").frames, geometry, shape, identity)

The pipeline's output stage ``seg`` (:func:`seg_output`) writes ``seg.dcm`` beside the other results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.dicom.seg_read import (
    ParsedSeg,
    Placement,
    SegFrame,
    Segment,
    SegmentMasks,
    describe_seg,
    frame_masks,
    frame_pixels,
    parse_seg,
    place_frames,
    read_seg,
    read_seg_masks,
    seg_grid,
    source_grid,
)
from node.dicom.seg_write import (
    LABEL_ID_OFFSET,
    MANUFACTURER,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    SegError,
    SegOptions,
    build_seg,
    segment_description,
    series_description,
    series_number,
    write_seg,
)

if TYPE_CHECKING:
    from node.stages import PipelineContext

__all__ = [
    "LABEL_ID_OFFSET", "MANUFACTURER", "PRIVATE_CREATOR", "PRIVATE_GROUP", "ParsedSeg", "Placement",
    "SegError", "SegFrame", "SegOptions", "Segment", "SegmentMasks", "build_seg", "describe_seg",
    "frame_masks", "frame_pixels", "parse_seg", "place_frames", "read_seg", "read_seg_masks", "seg_grid",
    "seg_output",
    "seg_to_nifti", "segment_description", "series_description", "series_number", "source_grid", "write_seg",
]

#: The file the output stage writes in the run's folder.
SEG_FILE = "seg.dcm"


def seg_output(ctx: PipelineContext) -> None:
    """Output stage ``seg``: ``seg.dcm`` of the run's final labels on its DICOM source.

    Options (``request.stage_options["seg"]``): the fields of :class:`SegOptions` (``type`` for
    ``segmentation_type``; ``version`` for a superseding result). Skipped (recorded, the run goes on)
    when the input has no DICOM source (NIfTI or in-memory input) or no structure was found.
    """
    from node.classes import LabelVolume
    from node.stages import StageSkipped
    from node.segment import SegmentationError

    source = ctx.ct.source
    if ctx.source_path is None or source is None or not source.instance_uids:
        raise StageSkipped("the input has no DICOM source (NIfTI or in-memory input): no DICOM-SEG")
    if not ctx.labels.classes or not ctx.labels.array.any():
        raise StageSkipped("no structure was found: no DICOM-SEG")
    try:
        values = dict(ctx.options)
        engine = ctx.request.segment
        values.setdefault("algorithm_parameters", {"engine": engine.engine, "task": engine.task})
        options = SegOptions.from_mapping(values)
        labels = LabelVolume(ctx.labels.array, ctx.labels.geometry, source=source, classes=ctx.labels.classes)
        # The headers the load stage kept: the series is not read a second time (~0.25 s for 300 slices).
        source_images = ctx.source_headers or ctx.source_path
        path = write_seg(labels, source_images, ctx.outdir / SEG_FILE, options=options)
    except SegError as exc:
        raise SegmentationError(f"seg_{exc.code}", f"DICOM-SEG: {exc}") from None
    # The QC values from the written file's header (read lazily: no frame is parsed, unlike parse_seg,
    # which spends ~0.5 s on the 1,400 per-frame items of a 300-slice SEG).
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
        "SegmentationType", "NumberOfFrames", "SegmentSequence", "SeriesNumber", "SeriesInstanceUID",
        "SOPInstanceUID"])
    ctx.add_output("seg", path)
    ctx.record(
        # A LABELMAP's Background item (segment 0) is no structure.
        type=str(header.SegmentationType),
        segments=sum(int(item.SegmentNumber) != 0 for item in header.SegmentSequence),
        frames=int(header.NumberOfFrames), series_number=int(header.SeriesNumber), version=options.version,
        series_instance_uid=str(header.SeriesInstanceUID),
        sop_instance_uid=str(header.SOPInstanceUID), bytes=path.stat().st_size,
    )


def seg_to_nifti(seg: Path | str, out: Path | str, source: Path | str | None = None) -> dict[str, Any]:
    """``segnode seg to-nifti``: the SEG as a multilabel NIfTI (on ``source``'s grid, else its own) and
    its class table beside it, named after it (``<name>.classes.json``: two conversions into one folder keep
    theirs). Returns what was written, with the reader's notes."""
    from node.nifti import class_table_path, write_nifti
    from node.segment.labelmap import write_class_table

    out = Path(out)
    labels = read_seg(seg, source)
    write_nifti(labels, out)
    classes_path = class_table_path(out)
    write_class_table(labels.classes, classes_path)
    return {"nifti": str(out), "classes": str(classes_path), "shape_ijk": list(labels.shape_ijk),
            "labels": sorted(labels.classes), "notes": labels.notes}


def describe_seg_json(seg: Path | str) -> str:
    return json.dumps(describe_seg(seg), indent=2, default=str)
