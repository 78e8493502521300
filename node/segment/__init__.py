"""Segmentation engines behind one protocol: ``segment(volume, request) -> LabelVolume``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from node.classes import LabelVolume
from node.errors import NodeError
from node.volume import Volume


@dataclass(frozen=True)
class SegmentRequest:
    """What to segment and how; flag names follow TotalSegmentator's CLI."""

    engine: str = "threshold"
    task: str = "total"
    fast: bool = False
    fastest: bool = False
    roi_subset: tuple[str, ...] = ()
    robust_crop: bool = False
    device: str = "cpu"
    threads: int = 2
    #: TotalSegmentator's home (its config.json and nnunet/results weights).
    weights_dir: Path | None = None
    #: TotalSegmentator in this process on cached predictors (:mod:`node.segment.resident`); False:
    #: through its ``python_api`` entry point (a new predictor, temporary files, worker processes).
    resident: bool = True
    #: Body envelope margin in mm for the sliding window (:mod:`node.segment.envelope`); 0 = off.
    envelope_mm: float = 20.0
    #: torch.compile the networks (nnU-Net's ``nnUNet_compile``); resident only.
    compile: bool = False
    #: For the ``labelmap`` engine: a multilabel NIfTI or a folder of per-class masks.
    labels_path: Path | None = None
    options: dict[str, object] = field(default_factory=dict)


class SegmentationError(NodeError):
    """An engine could not segment this input; ``code`` is stable, the message is for people."""


class Engine(Protocol):
    name: str

    def segment(self, volume: Volume, request: SegmentRequest) -> LabelVolume:
        """Labels on exactly ``volume.geometry``, with a class table for every id present."""
        ...
