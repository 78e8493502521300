"""The stage contract: what the pipeline hands a stage and what a stage may do with it.

Every post-processing stage (``node.segment.vessels``) and output stage (``node.dicom.*``,
``node.artifacts.*``) imports from here, never from :mod:`node.pipeline`, which imports the stages
(by name, when first used): the layers point one way.

* :class:`PipelineRequest`: what was asked (engine, post-processing, options per stage, outputs);
* :class:`PipelineContext`: the CT, the labels and their classes, the output folder, QC, artifacts;
  :meth:`PipelineContext.add_output` lists a written file and announces it at once;
* :class:`StageSkipped`: "this stage does not apply to this input" (recorded; the run goes on);
* :class:`ProgressEvent`: what the pipeline reports while it runs (status ``output``: a file is final).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from node.classes import LabelClass, LabelVolume
from node.segment import SegmentRequest
from node.volume import Volume

__all__ = ["PipelineContext", "PipelineRequest", "ProgressCallback", "ProgressEvent", "Stage", "StageSkipped"]

#: A post-processing stage: reads and changes the context (labels, classes, QC, artifacts).
Stage = Callable[["PipelineContext"], None]


class StageSkipped(Exception):
    """Raised by a stage that does not apply to this input; recorded with its reason, the run goes on."""


@dataclass(frozen=True)
class ProgressEvent:
    """What the pipeline is doing, for progress displays and job heartbeats."""

    stage: str
    #: ``output``: the stage wrote ``path`` (the artifact named ``message``), final, ready to deliver.
    status: Literal["started", "progress", "done", "skipped", "failed", "output"]
    done: int | None = None
    total: int | None = None
    seconds: float | None = None
    message: str = ""
    path: Path | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class PipelineRequest:
    """Everything a run needs besides its input and output folder."""

    segment: SegmentRequest = field(default_factory=SegmentRequest)
    #: Which series of a DICOM folder holding several.
    series_uid: str | None = None
    #: Allowed deviation of a slice step from the median step (see ``[volume]`` in the config).
    spacing_tolerance: float = 0.01
    #: Post-processing stages in order: callables, or names from :data:`STAGES`.
    post: tuple[str | Stage, ...] = ()
    #: Options per stage name, e.g. ``{"liver_vessels": {"min_component_size": 50}}``.
    stage_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Extra outputs by name (:data:`OUTPUT_STAGES`), e.g. ``("seg", "meshes")``.
    outputs: tuple[str, ...] = ()


@dataclass
class PipelineContext:
    """What post-processing stages read and change."""

    ct: Volume
    labels: LabelVolume
    request: PipelineRequest
    outdir: Path
    #: The DICOM folder/zip/file the CT came from (None for a NIfTI or in-memory input).
    source_path: Path | None = None
    #: The headers (pixel data dropped) of the CT's DICOM instances, read once by the load stage;
    #: the DICOM-SEG references them (None: read them from ``source_path``).
    source_headers: list[Any] | None = None
    #: QC and stage metadata by stage name; goes into report.json as ``qc``.
    qc: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Extra files written by stages (name -> path inside outdir); listed in the report.
    artifacts: dict[str, Path] = field(default_factory=dict)
    #: The name of the stage now running.
    stage: str = ""
    #: Told of each output as soon as a stage has written it (set by the pipeline: a progress event
    #: of status ``output``, which the worker hands to the outbox while the run goes on).
    announce: Callable[[str, str, Path], None] | None = field(default=None, repr=False)
    #: The stages run so far, as report.json lists them (name, state, seconds); set by the pipeline.
    stages_run: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _structures: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def options(self) -> dict[str, Any]:
        """This stage's options (``request.stage_options[stage]``)."""
        return dict(self.request.stage_options.get(self.stage, {}))

    def ids(self, *names: str) -> list[int]:
        """Label ids of the classes called ``names`` (absent names are left out)."""
        wanted = set(names)
        return sorted(i for i, c in self.labels.classes.items() if c.name in wanted)

    def mask(self, *names: str) -> np.ndarray:
        """Boolean mask of the union of the classes called ``names``."""
        return np.isin(self.labels.array, self.ids(*names))

    def paint(self, mask: np.ndarray, label_class: LabelClass) -> None:
        """Give ``label_class.id`` to the voxels of ``mask`` and put the class in the table."""
        if mask.shape != self.labels.array.shape:
            raise ValueError(f"mask shape {mask.shape} is not the label grid {self.labels.array.shape}")
        if label_class.id > np.iinfo(self.labels.array.dtype).max:
            self.labels.array = self.labels.array.astype(np.uint16)
        self.labels.array[mask] = label_class.id
        self.labels.classes[label_class.id] = label_class

    def add_output(self, name: str, path: Path) -> Path:
        """List ``path`` (written, final) as the artifact ``name`` and announce it at once, so that a
        delivered output (a DICOM instance) can be sent while the stage goes on with the next one."""
        self.artifacts[name] = path
        if self.announce is not None:
            self.announce(self.stage, name, path)
        return path

    def structures(self) -> list[dict[str, Any]]:
        """Per structure: id, name, voxels, volume (mL), mean and SD of HU, ... (:mod:`node.stats`),
        computed once the labels are final (the first output stage to ask) and shared by all."""
        if self._structures is None:
            from node.stats import structure_stats

            self._structures = structure_stats(self.labels, self.ct)
        return self._structures

    def record(self, **values: Any) -> None:
        """Add QC values for the running stage (``report.json`` ``qc.<stage>``)."""
        self.qc.setdefault(self.stage, {}).update(values)

    def write_nifti(self, name: str, volume: Volume) -> Path:
        """Write an extra NIfTI artifact into the output folder and list it in the report."""
        from node.nifti import write_nifti

        path = write_nifti(volume, self.outdir / name)
        self.artifacts[name] = path
        return path
