"""Label classes: what each id of a label volume means (name, codes, colour, category)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from node.volume import Volume

#: Categories used to group structures (Blender collections, reports).
CATEGORIES = ("Bone", "Muscle", "Thoracic", "Abdominal", "Vessel", "Other")


@dataclass(frozen=True)
class Code:
    """A coded concept: (CodeValue, CodingSchemeDesignator, CodeMeaning), PS3.3 8.8."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class LabelClass:
    """One segment class: its id in label volumes and how it is named and shown."""

    id: int
    name: str
    color: tuple[int, int, int] = (128, 128, 128)
    category: str = "Other"
    #: SegmentedPropertyCategoryCodeSequence / SegmentedPropertyTypeCodeSequence (PS3.3 C.8.20.4).
    property_category: Code | None = None
    property_type: Code | None = None

    def __post_init__(self) -> None:
        if not 0 < self.id < 65536:
            raise ValueError(f"label id must be 1..65535, got {self.id}")
        if self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {self.category!r}")


@dataclass
class LabelVolume(Volume):
    """A label array (0 = background) on a grid, with the table of its classes."""

    classes: dict[int, LabelClass] = field(default_factory=dict)
    #: What producing the labels cost (model load, preprocessing, network, export, memory); the
    #: engine's, for report.json ``inference``. None: the engine reports nothing.
    inference: dict | None = None

    def present_ids(self) -> list[int]:
        """Ids that occur in the array, without background."""
        return [int(v) for v in np.unique(self.array) if v != 0]
