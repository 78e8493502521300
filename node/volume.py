"""The one data model between stages: a voxel array with its patient-space geometry.

Conventions (the same as SimpleITK/ITK, so either library can check us):

* ``array`` is indexed ``[k, j, i]``: slice, row, column.
* ``spacing`` and the columns of ``direction`` are in ``(i, j, k)`` order: along a row
  (DICOM ImageOrientationPatient[0:3]), down a column (IOP[3:6]), along the slice normal.
* ``origin`` is the centre of voxel ``(0, 0, 0)`` in millimetres, in DICOM patient space
  (LPS: +x to the patient's left, +y posterior, +z head), PS3.3 C.7.6.2.1.1.

NIfTI (RAS) is only an edge format; the flip happens once, in :mod:`node.nifti`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

#: Diagonal that turns LPS into RAS coordinates and back (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Where each voxel of a ``[k, j, i]`` array lies in patient space (LPS, mm)."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    def __post_init__(self) -> None:
        if any(s <= 0 or not np.isfinite(s) for s in self.spacing):
            raise ValueError(f"spacing must be positive and finite, got {self.spacing}")
        d = self.direction_matrix
        if d.shape != (3, 3) or not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
            raise ValueError("direction must be an orthonormal 3x3 matrix")

    @classmethod
    def from_affine(cls, affine_lps: np.ndarray) -> Geometry:
        """Geometry from a 4x4 LPS affine that maps ``(i, j, k, 1)`` to millimetres."""
        m = np.asarray(affine_lps, dtype=float)[:3, :3]
        spacing = np.linalg.norm(m, axis=0)
        direction = m / spacing
        return cls(
            origin=tuple(float(v) for v in np.asarray(affine_lps)[:3, 3]),
            spacing=tuple(float(s) for s in spacing),
            direction=tuple(tuple(float(v) for v in row) for row in direction),
        )

    @property
    def direction_matrix(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit vectors of the i, j and k axes."""
        return np.asarray(self.direction, dtype=float)

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping voxel index ``(i, j, k, 1)`` to LPS millimetres."""
        a = np.eye(4)
        a[:3, :3] = self.direction_matrix * np.asarray(self.spacing)
        a[:3, 3] = self.origin
        return a

    @property
    def affine_ras(self) -> np.ndarray:
        """The same mapping into RAS millimetres, as NIfTI, Slicer and Blender use."""
        return LPS_TO_RAS @ self.affine

    @property
    def slice_normal(self) -> np.ndarray:
        return self.direction_matrix[:, 2]

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """LPS points (N x 3) of voxel indices (N x 3, i/j/k order, may be fractional)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, points: np.ndarray) -> np.ndarray:
        """Fractional voxel indices (i, j, k) of LPS points (N x 3)."""
        points = np.atleast_2d(np.asarray(points, dtype=float))
        inv = np.linalg.inv(self.affine)
        return points @ inv[:3, :3].T + inv[:3, 3]

    def slice_origin(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``: the centre of its first transmitted voxel."""
        return self.index_to_lps(np.array([[0.0, 0.0, float(k)]]))[0]

    def same_grid(self, other: Geometry, atol_mm: float = 1e-3) -> bool:
        """True when both geometries place voxels at the same points (within ``atol_mm``)."""
        return bool(np.allclose(self.affine, other.affine, atol=atol_mm))


@dataclass(frozen=True)
class SeriesIdentity:
    """Which DICOM series a volume came from, enough to reference it from a derived object.

    ``instance_uids`` are ordered like the array's k axis (one per slice); for a
    multi-frame source each entry is ``"<SOPInstanceUID>"`` and ``frame_numbers`` says which frame.
    """

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    modality: str
    sop_class_uid: str
    instance_uids: tuple[str, ...] = ()
    frame_numbers: tuple[int, ...] = ()
    series_description: str = ""
    series_number: int | None = None


@dataclass
class Volume:
    """An image or label array on a patient-space grid; see the module docstring."""

    array: np.ndarray
    geometry: Geometry
    source: SeriesIdentity | None = None
    #: How it was built, for people: e.g. decoder used, slices skipped, tolerances applied.
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a Volume is 3-D ([k, j, i]); got an array of shape {self.array.shape}")

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Size as (columns, rows, slices), the order DICOM users quote."""
        k, j, i = self.array.shape
        return (i, j, k)

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume with the same grid and source and a new array of the same shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return replace(self, array=array, notes=list(self.notes))
