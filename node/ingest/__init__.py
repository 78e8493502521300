"""Ingest: instances arrive (C-STORE, STOW-RS, Orthanc), land durably in the spool, and complete series
are handed on as :class:`SeriesReady` — the contract between ingest and the router."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class Sender:
    """Who sent instances: how, from which AE title and address (no patient data)."""

    via: Literal["dimse", "stow", "orthanc", "file"]
    calling_aet: str = ""
    address: str = ""


@dataclass(frozen=True)
class SeriesReady:
    """A series in the spool that is ready to be routed.

    ``generation`` starts at 1 and grows when late instances arrive after the series was handed on;
    a job for a higher generation supersedes the earlier one's results.
    """

    study_uid: str
    series_uid: str
    folder: Path
    instance_count: int
    reason: Literal["complete", "quiet"]
    sender: Sender
    generation: int = 1
    #: Modality of the series' instances (0008,0060), e.g. "CT".
    modality: str = ""
    #: False for SEG, SR, RTSTRUCT, PR, KO and other non-image objects: stored, never to be selected.
    is_image: bool = True
