"""A synthetic contrast-enhanced abdominal CT with its exact ground-truth label map.

The anatomy is defined in *reference millimetres*: LPS (+x patient left, +y posterior, +z head),
centred on (0, 0, 0), in a reference field of view of 204.8 x 204.8 x 240 mm (the default grid's
and :data:`TINY`'s). Another size or spacing scales the anatomy to its own field of view, so every
grid shows the same body.

Labels follow TotalSegmentator's ``total`` class map, plus two ground-truth classes of our own:

* 64 ``portal_vein_and_splenic_vein``: the portal trunk, SMV and splenic vein outside the liver;
* 201 ``portal_vein_branches``: the portal tree inside the liver (from the hilum on);
* 202 ``hepatic_veins``: the hepatic veins inside the liver; where they run outside it, into the
  IVC, they are 63 ``inferior_vena_cava``;
* 5 ``liver`` is the parenchyma only, so a TotalSegmentator-style liver mask is {5, 201, 202}.

"Inside the liver" means inside its analytic envelope (:func:`in_liver`). Labels are exactly what was
painted (later shapes win: vessels over parenchyma); the CT is then blurred a little (partial volume)
and gets seeded Gaussian noise.

Both vessel trees are planned in reference millimetres for the coarsest grid allowed (TINY,
64 x 64 x 40): tubes are drawn at least half a voxel diagonal thick (thinner ones fall apart into
voxel islands), and the portal side (201, 64) keeps more than one TINY voxel diagonal away from the
hepatic side (202, 63), so the two never touch, not even diagonally. Every allowed grid therefore
shows the same trees; TINY draws the thinnest generations thicker than they are.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from node.classes import LabelClass, LabelVolume
from node.dicom.writer import SeriesInfo, write_series
from node.nifti import write_nifti
from node.volume import Geometry, Volume

REFERENCE_FOV_MM = np.array([204.8, 204.8, 240.0])
#: The coarsest grid allowed (TINY's); the vessel trees are planned for it.
MIN_SIZE = (64, 64, 40)

#: Body outline, inner edge of the subcutaneous fat, abdominal cavity: (x, y) semi-axes in mm.
BODY, FAT_INNER, CAVITY = (94.0, 76.0), (84.0, 66.0), (78.0, 60.0)
#: The liver envelope: a union of ellipsoids (centre, semi-axes) inside the cavity, minus the
#: retroperitoneum behind and medial of the IVC groove (x > RETRO[0] and y > RETRO[1]).
LIVER_LOBES = (((-44.0, -6.0, 40.0), (42.0, 50.0, 60.0)),  # right lobe
               ((6.0, -30.0, 56.0), (42.0, 24.0, 30.0)),  # left lobe
               ((-14.0, -18.0, 52.0), (30.0, 32.0, 44.0)))  # medial part, dome and IVC groove
RETRO = (-30.0, 10.0)
IVC_XY, IVC_R = (-20.0, 4.0), 10.0
AORTA_XY, AORTA_R = (10.0, 8.0), 9.0
#: Vertebrae from the head down: 38 mm of body, then an 8 mm disc below it.
VERTEBRAE = ((33, "vertebrae_T11"), (32, "vertebrae_T12"), (31, "vertebrae_L1"),
             (30, "vertebrae_L2"), (29, "vertebrae_L3"))
VERTEBRA_TOP, VERTEBRA_BODY, DISC = 115.0, 38.0, 8.0

_ORGAN, _BONE, _BACK, _PSOAS = (185, 102, 83), (241, 214, 145), (171, 85, 68), (188, 95, 76)
CLASSES: dict[int, LabelClass] = {c.id: c for c in sorted((
    LabelClass(1, "spleen", (157, 108, 162), "Abdominal"),
    LabelClass(2, "kidney_right", _ORGAN, "Abdominal"), LabelClass(3, "kidney_left", _ORGAN, "Abdominal"),
    LabelClass(5, "liver", (221, 130, 101), "Abdominal"),
    LabelClass(6, "stomach", (216, 132, 105), "Abdominal"),
    LabelClass(7, "pancreas", (249, 180, 111), "Abdominal"),
    *(LabelClass(i, name, _BONE, "Bone") for i, name in VERTEBRAE),
    LabelClass(52, "aorta", (224, 97, 76), "Vessel"),
    LabelClass(63, "inferior_vena_cava", (0, 151, 206), "Vessel"),
    LabelClass(64, "portal_vein_and_splenic_vein", (0, 70, 170), "Vessel"),
    LabelClass(79, "spinal_cord", (244, 214, 49), "Other"),
    LabelClass(86, "autochthon_left", _BACK, "Muscle"), LabelClass(87, "autochthon_right", _BACK, "Muscle"),
    LabelClass(88, "iliopsoas_left", _PSOAS, "Muscle"), LabelClass(89, "iliopsoas_right", _PSOAS, "Muscle"),
    LabelClass(201, "portal_vein_branches", (50, 90, 230), "Vessel"),
    LabelClass(202, "hepatic_veins", (0, 190, 225), "Vessel"),
), key=lambda c: c.id)}


@dataclass(frozen=True)
class PhaseHU:
    """Mean Hounsfield units per tissue; the defaults are a portal-venous phase."""

    air: float = -1000.0
    fat: float = -100.0
    muscle: float = 50.0
    liver: float = 100.0
    spleen: float = 110.0
    kidney: float = 160.0
    stomach: float = 30.0
    pancreas: float = 90.0
    aorta: float = 170.0
    ivc: float = 140.0
    portal: float = 170.0
    hepatic: float = 150.0  # overlaps the portal tree, as in a real portal-venous phase
    cancellous: float = 250.0
    cortical: float = 700.0
    disc: float = 80.0
    csf: float = 10.0
    cord: float = 30.0


@dataclass(frozen=True)
class PhantomSpec:
    """What to build: the grid (i, j, k order), seed, noise and contrast."""

    size: tuple[int, int, int] = (256, 256, 160)
    spacing: tuple[float, float, float] = (0.8, 0.8, 1.5)
    seed: int = 0
    noise_hu: float = 12.0
    blur_voxels: float = 0.6  # Gaussian sigma before the noise: partial volume at edges
    hu: PhaseHU = field(default_factory=PhaseHU)

    def __post_init__(self) -> None:
        if any(n < m for n, m in zip(self.size, MIN_SIZE)) or min(self.spacing) <= 0:
            raise ValueError(f"size must be at least {MIN_SIZE} and spacing positive, "
                             f"got {self.size} and {self.spacing}")


#: The same field of view on a 64 x 64 x 40 grid, for fast tests.
TINY = PhantomSpec(size=(64, 64, 40), spacing=(3.2, 3.2, 6.0))


@dataclass(frozen=True)
class VesselSegment:
    """One tapered tube (LPS mm), running away from its tree's root (the portal confluence, or the
    IVC); ``parent`` indexes ``Phantom.segments``."""

    tree: str  # "portal", "hepatic" or "ivc"
    generation: int  # 0: portal trunk, SMV and splenic vein; the three hepatic veins; the IVC
    start: tuple[float, float, float]
    end: tuple[float, float, float]
    radius_start: float
    radius_end: float
    parent: int | None = None


@dataclass
class Phantom:
    """The CT (int16 HU), its exact labels on the same grid, and the vessel segments drawn."""

    ct: Volume
    labels: LabelVolume
    segments: list[VesselSegment]


def _ellipse(x: np.ndarray, y: np.ndarray, semi, c=(0.0, 0.0)) -> np.ndarray:
    return ((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2 <= 1


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, c, semi) -> np.ndarray:
    return ((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2 + ((z - c[2]) / semi[2]) ** 2 <= 1


def in_liver(x: np.ndarray, y: np.ndarray, z: np.ndarray, shrink: float = 0.0) -> np.ndarray:
    """True where reference-mm points lie in the liver envelope (and ``shrink`` mm inside its edge)."""
    inside = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), bool)
    for c, semi in LIVER_LOBES:
        inside |= _ellipsoid(x, y, z, c, np.subtract(semi, shrink))
    inside &= _ellipse(x, y, np.subtract(CAVITY, shrink))
    return inside & ~((x > RETRO[0] - shrink) & (y > RETRO[1] - shrink))


# --- vessel trees ---------------------------------------------------------------------------------

_SIDE = {"portal": 0, "hepatic": 1, "ivc": 1}  # the two sides that must never touch
_R0 = {"portal": 5.5, "hepatic": 4.5}  # trunk radius (mm), x0.7 per generation
_LAST_GEN = {"portal": 4, "hepatic": 3}


def _radius(tree: str, generation: int) -> float:
    return _R0[tree] * 0.7**generation


class _Planner:
    """Grows both trees a generation at a time, refusing branches that would leave the liver or come
    too close to the other side."""

    def __init__(self, rng: np.random.Generator, min_radius: float, gap: float) -> None:
        self.rng, self.min_radius, self.gap = rng, min_radius, gap
        self.segments: list[VesselSegment] = []

    def add(self, tree: str, gen: int, a, b, ra: float, rb: float, parent: int | None = None) -> int:
        a, b = tuple(map(float, a)), tuple(map(float, b))
        self.segments.append(VesselSegment(tree, gen, a, b, ra, rb, parent))
        return len(self.segments) - 1

    def fits(self, tree: str, a: np.ndarray, b: np.ndarray, r: float, skip_liver_mm: float = 0.0) -> bool:
        """Whether a tube stays in the liver (past its first ``skip_liver_mm``) and clear of the other
        side of the vessels."""
        r, step = max(r, self.min_radius), 0.5
        p = a + np.linspace(0, 1, int(np.linalg.norm(b - a) / step) + 2)[:, None] * (b - a)
        far = np.linalg.norm(p - a, axis=1) >= skip_liver_mm
        if not in_liver(*p[far].T, shrink=r + 1.5).all():  # + 1.5 mm: shrunk ellipsoids are not offsets
            return False
        others = [s for s in self.segments if _SIDE[s.tree] != _SIDE[tree]]
        if not others:
            return True
        sa, sb = np.array([s.start for s in others]), np.array([s.end for s in others])
        sr = np.maximum([max(s.radius_start, s.radius_end) for s in others], self.min_radius)
        ab = sb - sa
        t = np.clip(np.einsum("nkd,kd->nk", p[:, None] - sa, ab) / (ab * ab).sum(1), 0, 1)
        gap = np.linalg.norm(p[:, None] - sa - t[..., None] * ab, axis=-1) - sr - r
        return bool(gap.min() >= self.gap + step / 2)  # sampling can miss the closest point by step/2

    def perpendicular(self, d: np.ndarray) -> np.ndarray:
        v = self.rng.normal(size=3)
        v -= (v @ d) * d
        return v / np.linalg.norm(v)

    def grow(self, tree: str, gen: int, start, aim, parent: int | None, turn_deg: tuple[float, float],
             skip_liver_mm: float = 0.0, side: np.ndarray | None = None) -> list[int]:
        """A branch from ``start`` towards ``aim``, turned by ``turn_deg`` (to ``side`` on the first try)
        and shorter at each try: the first that fits, or none."""
        start = np.asarray(start, float)
        length = float(np.linalg.norm(np.subtract(aim, start)))
        d = np.subtract(aim, start) / length
        for attempt in range(24):
            u = side if side is not None and attempt == 0 else self.perpendicular(d)
            turn = np.radians(self.rng.uniform(*turn_deg))
            reach = length * 0.94**attempt * self.rng.uniform(0.85, 1.05)
            end = start + (np.cos(turn) * d + np.sin(turn) * u) * reach
            if self.fits(tree, start, end, _radius(tree, gen), skip_liver_mm):
                return [self.add(tree, gen, start, end, _radius(tree, gen), _radius(tree, gen + 1), parent)]
        return []

    def fork(self, tree: str, gen: int, parent: int) -> list[int]:
        """Two children at the end of ``parent`` (a planar fork on the first try) and one from its
        side, which fills the liver between the parent and the edge."""
        a, b = np.array(self.segments[parent].start), np.array(self.segments[parent].end)
        side = self.perpendicular((b - a) / np.linalg.norm(b - a))
        mid = a + (b - a) * self.rng.uniform(0.35, 0.65)
        return (self.grow(tree, gen, b, b + 0.72 * (b - a), parent, (25.0, 55.0), side=side)
                + self.grow(tree, gen, b, b + 0.72 * (b - a), parent, (25.0, 55.0), side=-side)
                + self.grow(tree, gen, mid, mid + 0.6 * (b - a), parent, (55.0, 85.0)))


def _plan_vessels(seed: int) -> list[VesselSegment]:
    """The IVC, portal and hepatic vein trees in reference mm (deterministic by seed)."""
    coarsest = float(np.linalg.norm(REFERENCE_FOV_MM / MIN_SIZE))  # TINY's voxel diagonal
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    plan = _Planner(rng, min_radius=coarsest / 2, gap=coarsest + 0.5)
    plan.add("ivc", 0, (*IVC_XY, -130.0), (*IVC_XY, 130.0), IVC_R, IVC_R)
    # The portal trunk rises from the confluence behind the pancreas to the hilum; its tributaries
    # (fixed anatomy, checked by the tests) come down to it from the spleen and the mesentery.
    confluence, hilum = (-4.0, -26.0, -14.0), (-32.0, -20.0, 16.0)
    trunk = plan.add("portal", 0, confluence, hilum, _radius("portal", 0), _radius("portal", 1))
    plan.add("portal", 0, confluence, (0.0, -30.0, -130.0), _radius("portal", 0), 4.5, trunk)  # SMV
    splenic = plan.add("portal", 0, confluence, (28.0, -10.0, 12.0), 3.5, 3.5, trunk)
    plan.add("portal", 0, (28.0, -10.0, 12.0), (44.0, 20.0, 44.0), 3.5, 3.5, splenic)
    # Right and left portal veins first: the hilum is the most crowded place.
    portal = [i for aim in ((-56.0, -12.0, 28.0), (0.0, -34.0, 46.0))
              for i in plan.grow("portal", 1, hilum, aim, trunk, (0.0, 10.0))]
    # Right, middle and left hepatic veins leave the IVC below the dome, running down and forward.
    mouths = {86.0: (-62.0, -4.0, 48.0), 88.0: (-22.0, -40.0, 58.0), 90.0: (14.0, -32.0, 68.0)}  # z: aim
    hepatic = [i for z, aim in mouths.items()
               for i in plan.grow("hepatic", 0, (*IVC_XY, z), aim, None, (0.0, 8.0), IVC_R + plan.min_radius)]
    # Then every branch forks, the portal tree a generation ahead (it has the smaller space).
    for gen in range(1, _LAST_GEN["hepatic"] + 1):
        if gen + 1 <= _LAST_GEN["portal"]:
            portal = [i for parent in portal for i in plan.fork("portal", gen + 1, parent)]
        hepatic = [i for parent in hepatic for i in plan.fork("hepatic", gen, parent)]
    return plan.segments


# --- painting -------------------------------------------------------------------------------------

Region = tuple[slice, slice, slice]


class _Canvas:
    """Label and HU arrays ([k, j, i]) and the reference-mm coordinates of the voxel centres."""

    def __init__(self, spec: PhantomSpec) -> None:
        n = np.array(spec.size)
        self.axes = [(np.arange(m) - (m - 1) / 2) * fov / m for m, fov in zip(n, REFERENCE_FOV_MM)]
        self.labels = np.zeros(tuple(n[::-1]), np.uint8)
        self.hu = np.full(tuple(n[::-1]), spec.hu.air, np.float32)
        self.min_radius = 0.5 * float(np.linalg.norm(REFERENCE_FOV_MM / n))  # thinner tubes break apart

    def region(self, lo, hi) -> Region:
        """The voxels whose centres lie in the box ``lo``..``hi`` (x, y, z)."""
        i, j, k = (slice(int(np.searchsorted(ax, a)), int(np.searchsorted(ax, b, "right")))
                   for ax, a, b in zip(self.axes, lo, hi))
        return k, j, i

    def coords(self, r: Region) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y and z of the region's voxel centres, broadcastable to its shape."""
        return (self.axes[0][r[2]][None, None, :], self.axes[1][r[1]][None, :, None],
                self.axes[2][r[0]][:, None, None])

    def paint(self, r: Region, mask: np.ndarray, label: int, hu: float) -> None:
        mask = np.broadcast_to(mask, self.labels[r].shape)
        self.labels[r][mask] = label
        self.hu[r][mask] = hu

    def prism(self, c, semi, z0: float, z1: float, label: int, hu: float, within=None) -> None:
        """An elliptic cylinder along z, optionally clipped to the centred ellipse ``within``."""
        r = self.region((c[0] - semi[0], c[1] - semi[1], z0), (c[0] + semi[0], c[1] + semi[1], z1))
        x, y, _ = self.coords(r)
        mask = _ellipse(x, y, semi, c)
        self.paint(r, mask if within is None else mask & _ellipse(x, y, within), label, hu)

    def ellipsoid(self, c, semi, label: int, hu: float) -> None:
        """An ellipsoid, clipped to the abdominal cavity."""
        r = self.region(np.subtract(c, semi), np.add(c, semi))
        x, y, z = self.coords(r)
        self.paint(r, _ellipsoid(x, y, z, c, semi) & _ellipse(x, y, CAVITY), label, hu)

    def tube(self, a, b, ra: float, rb: float, label: int, hu: float,
             label_in_liver: int | None = None) -> None:
        """A tapered capsule from ``a`` to ``b``; inside the liver envelope it gets ``label_in_liver``."""
        a, b = np.asarray(a, float), np.asarray(b, float)
        ra, rb = max(ra, self.min_radius), max(rb, self.min_radius)
        r = self.region(np.minimum(a, b) - max(ra, rb), np.maximum(a, b) + max(ra, rb))
        x, y, z = self.coords(r)
        (px, py, pz), ab = (x - a[0], y - a[1], z - a[2]), b - a
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / (ab @ ab), 0.0, 1.0)
        distance2 = (px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2
        mask = distance2 <= (ra + t * (rb - ra)) ** 2
        if label_in_liver is None:
            return self.paint(r, mask, label, hu)
        liver = in_liver(x, y, z)
        self.paint(r, mask & ~liver, label, hu)
        self.paint(r, mask & liver, label_in_liver, hu)


def _paint_body(cv: _Canvas, hu: PhaseHU) -> None:
    full = (-130.0, 130.0)
    cv.prism((0, 0), BODY, *full, 0, hu.fat)
    cv.prism((0, 0), FAT_INNER, *full, 0, hu.muscle)  # abdominal wall
    cv.prism((0, 0), CAVITY, *full, 0, hu.fat)  # visceral fat around the organs
    for x, label in ((20.0, 86), (-20.0, 87)):  # autochthon_left lies at +x, the patient's left
        cv.prism((x, 52.0), (13.0, 10.0), *full, label, hu.muscle, within=FAT_INNER)
    for x, label in ((1.0, 88), (-1.0, 89)):  # psoas: from T12 down, widening caudally
        cv.tube((26.0 * x, 30.0, 35.0), (30.0 * x, 34.0, -130.0), 4.0, 15.0, label, hu.muscle)
    for n, (label, _) in enumerate(VERTEBRAE):
        top = VERTEBRA_TOP - n * (VERTEBRA_BODY + DISC)
        bottom, mid = top - VERTEBRA_BODY, top - VERTEBRA_BODY / 2
        cv.prism((0.0, 52.0), (12.0, 12.0), bottom + 4, top - 4, label, hu.cortical)  # neural arch
        cv.prism((0.0, 48.0), (28.0, 3.5), mid - 6, mid + 6, label, hu.cortical)  # transverse processes
        cv.prism((0.0, 58.0), (3.5, 7.0), mid - 12, mid + 8, label, hu.cortical)  # spinous process
        cv.prism((0.0, 30.0), (17.0, 14.0), bottom, top, label, hu.cortical)  # body: a cortical shell
        cv.prism((0.0, 30.0), (15.0, 12.0), bottom + 2, top - 2, label, hu.cancellous)  # round cancellous
        cv.prism((0.0, 30.0), (17.0, 14.0), bottom - DISC, bottom, 0, hu.disc)
    cv.prism((0.0, 52.0), (8.0, 8.0), *full, 0, hu.csf)  # spinal canal
    cv.prism((0.0, 52.0), (5.0, 5.0), *full, 79, hu.cord)


def _paint_organs(cv: _Canvas, hu: PhaseHU) -> None:
    cv.ellipsoid((-50.0, 36.0, -52.0), (17.0, 14.0, 36.0), 2, hu.kidney)  # the right kidney sits lower
    cv.ellipsoid((50.0, 36.0, -40.0), (17.0, 14.0, 36.0), 3, hu.kidney)
    cv.ellipsoid((56.0, 32.0, 52.0), (18.0, 26.0, 34.0), 1, hu.spleen)
    cv.ellipsoid((38.0, -34.0, 40.0), (22.0, 18.0, 28.0), 6, hu.stomach)
    cv.tube((-10.0, -38.0, -22.0), (4.0, -36.0, -10.0), 10.0, 8.0, 7, hu.pancreas)  # head and neck,
    cv.tube((4.0, -36.0, -10.0), (36.0, -6.0, 24.0), 8.0, 6.0, 7, hu.pancreas)  # body and tail
    r = cv.region(np.min([np.subtract(c, s) for c, s in LIVER_LOBES], axis=0),
                  np.max([np.add(c, s) for c, s in LIVER_LOBES], axis=0))
    cv.paint(r, in_liver(*cv.coords(r)), 5, hu.liver)
    cv.tube((*AORTA_XY, -130.0), (*AORTA_XY, 130.0), AORTA_R, AORTA_R, 52, hu.aorta)


def _paint_vessels(cv: _Canvas, segments: list[VesselSegment], hu: PhaseHU) -> None:
    # Hepatic veins before the IVC, which covers their mouths; the portal side never touches either.
    style = {"hepatic": (63, 202, hu.hepatic), "ivc": (63, None, hu.ivc), "portal": (64, 201, hu.portal)}
    for seg in sorted(segments, key=lambda s: ("hepatic", "ivc", "portal").index(s.tree)):
        label, label_in_liver, value = style[seg.tree]
        cv.tube(seg.start, seg.end, seg.radius_start, seg.radius_end, label, value, label_in_liver)


def make_phantom(spec: PhantomSpec = PhantomSpec()) -> Phantom:
    """Build the phantom ``spec`` describes (deterministic by ``spec.seed``)."""
    cv = _Canvas(spec)
    _paint_body(cv, spec.hu)
    _paint_organs(cv, spec.hu)
    segments = _plan_vessels(spec.seed)
    _paint_vessels(cv, segments, spec.hu)
    hu = ndimage.gaussian_filter(cv.hu, spec.blur_voxels, truncate=2.5) if spec.blur_voxels > 0 else cv.hu
    noise = np.random.default_rng(np.random.SeedSequence(spec.seed).spawn(2)[1])  # apart from the trees
    hu += noise.standard_normal(hu.shape, dtype=np.float32) * np.float32(spec.noise_hu)
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)  # what DICOM stores with intercept -1024

    size, spacing = np.array(spec.size), np.array(spec.spacing, float)
    origin = -(size - 1) / 2 * spacing  # the field of view is centred on (0, 0, 0)
    geometry = Geometry(origin=tuple(map(float, origin)), spacing=tuple(map(float, spacing)))
    scale = size * spacing / REFERENCE_FOV_MM  # reference mm to this grid's mm
    r_scale = float(np.sqrt(scale[0] * scale[1]))
    segments = [replace(s, start=tuple(map(float, s.start * scale)), end=tuple(map(float, s.end * scale)),
                        radius_start=s.radius_start * r_scale, radius_end=s.radius_end * r_scale)
                for s in segments]
    note = f"segnode phantom, seed {spec.seed}"
    return Phantom(ct=Volume(ct, geometry, notes=[note]),
                   labels=LabelVolume(cv.labels, geometry, notes=[note], classes=dict(CLASSES)),
                   segments=segments)


def write_phantom(spec: PhantomSpec, out_dir: Path) -> dict[str, Path]:
    """Write ``dicom/IM*.dcm``, ``ct.nii.gz``, ``labels.nii.gz``, ``classes.json`` and the vessel
    segments (``vessels.json``) under ``out_dir``; returns their paths by kind."""
    out_dir = Path(out_dir)
    phantom = make_phantom(spec)
    write_series(phantom.ct, out_dir / "dicom", SeriesInfo(uid_seed=f"segnode-phantom-{spec.seed}"))
    classes = [{"id": c.id, "name": c.name, "color": list(c.color), "category": c.category}
               for c in CLASSES.values()]
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    (out_dir / "vessels.json").write_text(json.dumps([asdict(s) for s in phantom.segments], indent=1) + "\n")
    return {"dicom": out_dir / "dicom", "ct": write_nifti(phantom.ct, out_dir / "ct.nii.gz"),
            "labels": write_nifti(phantom.labels, out_dir / "labels.nii.gz"),
            "classes": out_dir / "classes.json", "vessels": out_dir / "vessels.json"}
