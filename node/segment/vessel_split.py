"""Portal vs hepatic labelling of an intrahepatic vessel mask: the algorithm, on numpy arrays.

The public, Volume-level API is :func:`node.segment.vessels.split_portal_hepatic`; this module is its
engine room, on ``[k, j, i]`` arrays and a ``(k, j, i)`` spacing in mm.

How it works (``use_skeleton=True``, the default):

1. **Seeds**: vessel voxels within ``seed_distance_mm`` of ``portal_vein_and_splenic_vein`` are portal
   seeds, those near ``inferior_vena_cava`` hepatic seeds; a voxel near both is dropped.
2. **Cost**: every vessel voxel costs ``(r_ref / r) ** 2`` per mm, with ``r`` its distance to the
   vessel wall (Euclidean distance transform) and ``r_ref`` the median radius on the centreline:
   about 1 per mm along an ordinary vessel, much more through the narrow waist where two vessels
   merely touch.
3. **Skeleton graph**: the mask is skeletonised (Lee); skeleton voxels with 3+ neighbours form
   junctions, the chains between them branches. Short dead-end spurs fold into their junction; two
   3-way junctions joined by a short branch as thick as the vessels there fold into one 4-arm
   *complex* (the skeleton of two vessels crossing: two T-junctions about a diameter apart). Each arm
   (a branch end at a complex) gets an outward direction; going across a complex from one arm to
   another costs the way between them (a large junction is no free shortcut).
4. **Propagation**: per tree, a Dijkstra over arms: the cost of a path is its cost along branches,
   plus ``crossing_penalty_mm`` for leaving one straight pair of a crossing for the other (a
   complex of four arms making two straight pairs), and as much for a *lateral* branch, one that
   enters the side of a vessel running straight through at both its ends (a leak between two
   vessels: a tree's own branches end in their bifurcation, or nowhere). A turn at a bifurcation
   costs nothing: trees turn all the time. Inside each branch the two trees meet where their costs
   are equal (a branch that both reach is cut at its narrowest, most expensive part). Each skeleton
   voxel takes the cheaper tree; each vessel voxel the label of its nearest skeleton voxel
   (geodesically, inside the mask).

With ``use_skeleton=False`` step 3-4 are replaced by a competitive Dijkstra over all vessel voxels
with the cost of step 2 (fronts grow from both seed sets; each voxel goes to the cheaper one).

Then, in both modes: components of the mask that no seed reaches (a gap in a branch) take the label
of the nearest labelled voxel within ``max_gap_mm`` (repeatedly, so chains of fragments are
followed); what stays out of reach is *unassigned* (0). Last, pieces of one tree smaller than
``min_split_component_size`` voxels that touch the other tree are given to it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy import ndimage
from scipy.sparse.csgraph import connected_components, dijkstra
from scipy.spatial import cKDTree

PORTAL, HEPATIC = 1, 2
LABELS = (PORTAL, HEPATIC)
#: Zero-cost edges are written as this (sparse graphs do not keep explicit zeros reliably).
_EPS = 1e-9
#: Half of the 26 neighbour offsets (the other half are their negatives).
OFFSETS = tuple(o for o in product((-1, 0, 1), repeat=3) if o > (0, 0, 0))
CUBE = np.ones((3, 3, 3), bool)
#: Arms whose directions are within 35 degrees of a straight line continue each other.
STRAIGHT_COS = float(np.cos(np.radians(35.0)))


@dataclass
class SplitArrays:
    """The split on the input grid: ``labels`` (0, 1 portal, 2 hepatic), the labelled skeleton
    (or None), and QC counts."""

    labels: np.ndarray
    skeleton: np.ndarray | None
    qc: dict[str, Any] = field(default_factory=dict)


# --- voxel graphs ---------------------------------------------------------------------------------


class VoxelGraph:
    """The voxels of a mask as graph nodes (in C order), edges between 26-neighbours with their
    length in mm."""

    def __init__(self, mask: np.ndarray, spacing: np.ndarray) -> None:
        self.shape = mask.shape
        self.flat = np.flatnonzero(mask)
        self.n = int(self.flat.size)
        index = np.full(mask.shape, -1, np.int32)
        index.ravel()[self.flat] = np.arange(self.n, dtype=np.int32)
        us, vs, lengths = [], [], []
        for off in OFFSETS:
            src = tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip(off, mask.shape))
            dst = tuple(slice(max(0, d), n - max(0, -d)) for d, n in zip(off, mask.shape))
            both = mask[src] & mask[dst]
            if both.any():
                us.append(index[src][both])
                vs.append(index[dst][both])
                step = float(np.linalg.norm(np.multiply(off, spacing)))
                lengths.append(np.full(vs[-1].size, step, np.float32))
        self.u = np.concatenate(us) if us else np.zeros(0, np.int32)
        self.v = np.concatenate(vs) if vs else np.zeros(0, np.int32)
        self.length = np.concatenate(lengths) if lengths else np.zeros(0, np.float32)
        self.index = index

    def coords(self, nodes: np.ndarray | None = None) -> np.ndarray:
        """``(k, j, i)`` indices of ``nodes`` (all nodes when None), shape (n, 3)."""
        flat = self.flat if nodes is None else self.flat[nodes]
        return np.stack(np.unravel_index(flat, self.shape), axis=1)

    def degree(self) -> np.ndarray:
        return np.bincount(self.u, minlength=self.n) + np.bincount(self.v, minlength=self.n)

    def matrix(self, node_cost: np.ndarray | None = None, keep: np.ndarray | None = None,
               extra: tuple[np.ndarray, np.ndarray] | None = None) -> sp.csr_array:
        """Edge weights ``length * mean(cost of both ends)`` (plain length when no cost), only edges
        whose ends are both ``keep`` (node mask), plus ``extra = (targets, weights)`` from an added
        node ``n`` (a super source)."""
        w = self.length.astype(np.float64)
        if node_cost is not None:
            w = w * 0.5 * (node_cost[self.u] + node_cost[self.v])
        u, v = self.u, self.v
        if keep is not None:
            sel = keep[u] & keep[v]
            u, v, w = u[sel], v[sel], w[sel]
        n = self.n
        if extra is not None:
            targets, weights = extra
            u = np.concatenate([u, np.full(targets.size, n, np.int32)])
            v = np.concatenate([v, targets.astype(np.int32)])
            w = np.concatenate([w, np.maximum(weights, _EPS)])
            n += 1
        return sp.csr_array((np.maximum(w, _EPS), (u, v)), shape=(n, n))


def _from_sources(graph: sp.csr_array, sources: np.ndarray,
                  limit: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
    """Distance to, and index of, the nearest of ``sources`` for every node (-9999: unreachable)."""
    if sources.size == 0:
        n = graph.shape[0]
        return np.full(n, np.inf), np.full(n, -9999, np.int32)
    dist, _, src = dijkstra(graph, directed=False, indices=sources, min_only=True,
                            return_predecessors=True, limit=limit)
    return dist, src


def _super_dist(graph_with_super: sp.csr_array) -> np.ndarray:
    """Distances from the super source (the last node) to every other node."""
    n = graph_with_super.shape[0] - 1
    return dijkstra(graph_with_super, directed=False, indices=n)[:n]


# --- the split ------------------------------------------------------------------------------------


def split_arrays(vessels: np.ndarray, portal_support: np.ndarray, hepatic_support: np.ndarray,
                 spacing_kji: tuple[float, float, float], *, use_skeleton: bool = True,
                 seed_distance_mm: float = 3.0, max_gap_mm: float = 10.0, crossing_penalty_mm: float = 30.0,
                 min_split_component_size: int = 20) -> SplitArrays:
    """Label each voxel of ``vessels`` portal (1) or hepatic (2); see the module docstring."""
    vessels = np.asarray(vessels, bool)
    spacing = np.asarray(spacing_kji, float)
    labels_full = np.zeros(vessels.shape, np.uint8)
    skeleton_full = np.zeros(vessels.shape, np.uint8) if use_skeleton else None
    qc: dict[str, Any] = {"use_skeleton": use_skeleton}
    if not vessels.any():
        qc.update(_counts(labels_full, vessels, 0, 0, 0))
        return SplitArrays(labels_full, skeleton_full, qc)

    # Crop to the vessels, with room for the seed distance.
    pad = np.ceil(max(seed_distance_mm, float(np.linalg.norm(spacing))) / spacing).astype(int) + 1
    nz = [np.flatnonzero(vessels.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
    box = tuple(slice(max(0, int(a[0]) - p), min(n, int(a[-1]) + p + 1))
                for a, p, n in zip(nz, pad, vessels.shape))
    v = vessels[box]
    graph = VoxelGraph(v, spacing)

    # 1. Seeds.
    reach = max(seed_distance_mm, float(np.linalg.norm(spacing)) + 1e-6)  # at least the 26-neighbours
    near = [_near(np.asarray(s, bool)[box], spacing, reach)[v] for s in (portal_support, hepatic_support)]
    conflict = near[0] & near[1]
    seeds = {PORTAL: np.flatnonzero(near[0] & ~conflict), HEPATIC: np.flatnonzero(near[1] & ~conflict)}
    qc.update(portal_seed_voxels=int(seeds[PORTAL].size), hepatic_seed_voxels=int(seeds[HEPATIC].size),
              conflicting_seed_voxels=int(conflict.sum()))

    # 2. Cost per mm from the local radius.
    radius = ndimage.distance_transform_edt(v, sampling=spacing)
    node_radius = radius.ravel()[graph.flat]
    del radius

    # 3-4. Propagation.
    if use_skeleton:
        node_labels, skel_nodes, skel_qc = _skeleton_split(v, graph, node_radius, seeds, spacing,
                                                           crossing_penalty_mm)
        qc.update(skel_qc)
    else:
        r_ref = float(np.median(node_radius))
        cost = (r_ref / node_radius) ** 2
        seed_nodes = np.concatenate([seeds[PORTAL], seeds[HEPATIC]])
        seed_label = np.zeros(graph.n, np.uint8)
        seed_label[seeds[PORTAL]], seed_label[seeds[HEPATIC]] = PORTAL, HEPATIC
        _, src = _from_sources(graph.matrix(cost), seed_nodes)
        node_labels = np.where(src >= 0, seed_label[np.maximum(src, 0)], 0).astype(np.uint8)

    # Gaps: unreached components take the label of the nearest labelled voxel.
    node_labels, bridged = _bridge_gaps(graph, node_labels, spacing, max_gap_mm)
    qc.update(bridged_components=bridged[0], bridged_voxels=bridged[1])

    labels = np.zeros(v.shape, np.uint8)
    labels.ravel()[graph.flat] = node_labels
    labels, relabelled = _absorb_small(labels, min_split_component_size)
    qc["relabelled_voxels"] = relabelled
    labels_full[box] = labels
    if use_skeleton:
        # Skeleton voxels carry the final label of their voxel (bridged fragments included).
        skel = np.zeros(v.shape, np.uint8)
        skel.ravel()[graph.flat[skel_nodes]] = labels.ravel()[graph.flat[skel_nodes]]
        skeleton_full[box] = skel
        qc["skeleton_voxels"] = int(skel_nodes.size)
    qc.update(_counts(labels_full, vessels, qc["portal_seed_voxels"], qc["hepatic_seed_voxels"],
                      qc["conflicting_seed_voxels"]))
    return SplitArrays(labels_full, skeleton_full, qc)


def _near(mask: np.ndarray, spacing: np.ndarray, distance_mm: float) -> np.ndarray:
    """Voxels within ``distance_mm`` of ``mask`` (mask included)."""
    if not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= distance_mm


def _counts(labels: np.ndarray, vessels: np.ndarray, portal_seeds: int, hepatic_seeds: int,
            conflicting: int) -> dict[str, Any]:
    total = int(vessels.sum())
    portal, hepatic = int((labels == PORTAL).sum()), int((labels == HEPATIC).sum())
    unassigned = total - portal - hepatic
    frac = (lambda n: round(n / total, 6)) if total else (lambda n: 0.0)
    warnings = []
    if total:
        for name, n in (("portal", portal), ("hepatic", hepatic)):
            if n / total < 0.05:
                warnings.append(f"{name} fraction {n / total:.3f} is below 0.05: "
                                f"the {name} seeds probably failed")
    else:
        warnings.append("no vessel voxels to split")
    if total and not portal_seeds:
        warnings.append("no portal seed: no vessel voxel near portal_vein_and_splenic_vein")
    if total and not hepatic_seeds:
        warnings.append("no hepatic seed: no vessel voxel near inferior_vena_cava")
    return {
        "portal_voxels": portal, "hepatic_voxels": hepatic, "unassigned_voxels": unassigned,
        "total_vessel_voxels": total, "portal_fraction": frac(portal), "hepatic_fraction": frac(hepatic),
        "unassigned_fraction": frac(unassigned), "warnings": warnings,
    }


# --- skeleton graph -------------------------------------------------------------------------------


def _components(g: VoxelGraph, keep: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected components of the ``keep`` nodes, numbered 0..n-1 (-1 elsewhere)."""
    _, lab = connected_components(g.matrix(keep=keep), directed=False)
    out = np.full(g.n, -1, np.int64)
    uniq, inv = np.unique(lab[keep], return_inverse=True)
    out[keep] = inv.ravel()
    return int(uniq.size), out


@dataclass
class _Skeleton:
    """The skeleton as branches (chains between junctions) and complexes (merged junctions) joined
    by arms (a branch end at a complex)."""

    sg: VoxelGraph
    junction: np.ndarray  # per skeleton voxel
    branch_of: np.ndarray  # branch id per skeleton voxel, -1 on junctions
    cx_of: np.ndarray  # complex id per skeleton voxel (junctions and branches folded into one), else -1
    n_cx: int
    arm_branch: np.ndarray  # per arm
    arm_cx: np.ndarray
    arm_voxel: np.ndarray  # the branch voxel that touches the complex
    arm_dir: np.ndarray  # unit vector, away from the complex
    n_branches: int


def _build_skeleton(skel: np.ndarray, radius: np.ndarray, spacing: np.ndarray) -> _Skeleton:
    """Branches, complexes and arm directions of a skeleton; ``radius`` (mm) per skeleton voxel."""
    sg = VoxelGraph(skel, spacing)
    pos = sg.coords() * spacing
    junction = sg.degree() >= 3
    n_branch, branch_of = _components(sg, ~junction)
    n_junc, junc_of = _components(sg, junction)

    # Attachments (branch, cluster, branch voxel): a branch voxel next to a junction voxel.
    bj = junction[sg.u] != junction[sg.v]
    b_node = np.where(junction[sg.u[bj]], sg.v[bj], sg.u[bj])
    j_node = np.where(junction[sg.u[bj]], sg.u[bj], sg.v[bj])
    att = np.unique(np.stack([branch_of[b_node], junc_of[j_node], b_node], axis=1), axis=0)
    pairs = np.unique(att[:, :2], axis=0)  # (branch, cluster), sorted by branch
    ends = np.bincount(pairs[:, 0], minlength=n_branch)

    # Short dead ends (spurs, small loops) are part of their cluster. Two 3-way clusters joined by a
    # short branch as thick as the vessels there are one 4-arm complex: two vessels crossing (skeletons
    # of an X have two T-junctions about a diameter apart). A thinner branch is a waist where two
    # vessels merely touch: it stays a branch, with its cost.
    in_branch = ~junction[sg.u] & ~junction[sg.v]
    length = np.bincount(branch_of[sg.u[in_branch]], weights=sg.length[in_branch], minlength=n_branch)
    length += spacing.min()
    thinnest = np.full(n_branch, np.inf)
    np.minimum.at(thinnest, branch_of[~junction], radius[~junction])
    j_radius = np.zeros(n_junc)
    np.maximum.at(j_radius, junc_of[junction], radius[junction])
    r_at = j_radius[pairs[:, 1]]
    short_pair = length[pairs[:, 0]] < 2.0 * r_at + 2.0 * spacing.min()
    short = np.zeros(n_branch, bool)
    short[pairs[short_pair, 0]] = True
    spur = short & (ends == 1)
    arms_per_cluster = np.bincount(pairs[~spur[pairs[:, 0]], 1], minlength=n_junc)
    thick = np.ones(n_branch, bool)
    np.logical_and.at(thick, pairs[:, 0], thinnest[pairs[:, 0]] >= 0.6 * r_at)
    bridge_rows = np.flatnonzero(short[pairs[:, 0]] & (ends[pairs[:, 0]] == 2) & thick[pairs[:, 0]])
    first = bridge_rows[::2]  # pairs are sorted by branch: a branch's two clusters are adjacent rows
    c1, c2 = pairs[first, 1], pairs[first + 1, 1]
    uses = np.bincount(np.concatenate([c1, c2]), minlength=n_junc)
    ok = (arms_per_cluster[c1] == 3) & (arms_per_cluster[c2] == 3) & (uses[c1] == 1) & (uses[c2] == 1)
    crossing = pairs[first[ok], 0]
    internal = spur.copy()
    internal[crossing] = True
    links = sp.csr_array((np.ones(int(ok.sum())), (c1[ok], c2[ok])), shape=(n_junc, n_junc))
    n_cx, cx_of_cluster = connected_components(links, directed=False)
    cx_of = np.full(sg.n, -1, np.int64)
    cx_of[junction] = cx_of_cluster[junc_of[junction]]
    branch_cx = np.full(n_branch, -1, np.int64)
    folded = internal[pairs[:, 0]]
    branch_cx[pairs[folded, 0]] = cx_of_cluster[pairs[folded, 1]]
    on_folded = (branch_of >= 0) & (branch_cx[np.maximum(branch_of, 0)] >= 0)
    cx_of[on_folded] = branch_cx[branch_of[on_folded]]

    # Arms: the ends of the other branches; one attachment voxel each.
    arm_att = att[~internal[att[:, 0]]]
    keys, first_row = np.unique(np.stack([arm_att[:, 0], cx_of_cluster[arm_att[:, 1]]], axis=1),
                                axis=0, return_index=True)
    arm_branch, arm_cx, arm_voxel = keys[:, 0], keys[:, 1], arm_att[first_row, 2]
    n_arm = arm_branch.size

    # Directions: from the complex's centre to the mean of the arm's first few mm (3 radii).
    centre = np.zeros((n_cx, 3))
    count = np.maximum(np.bincount(cx_of[junction], minlength=n_cx), 1)
    for d in range(3):
        centre[:, d] = np.bincount(cx_of[junction], weights=pos[junction, d], minlength=n_cx) / count
    cx_radius = np.zeros(n_cx)
    np.maximum.at(cx_radius, cx_of_cluster, j_radius)
    arm_dir = np.zeros((n_arm, 3))
    if n_arm:
        dist, src = _from_sources(sg.matrix(keep=~junction), arm_voxel)
        arm_at = np.full(sg.n, -1, np.int64)
        arm_at[arm_voxel] = np.arange(n_arm)
        arm = np.where(src >= 0, arm_at[np.maximum(src, 0)], -1)
        sel = np.flatnonzero(arm >= 0)
        sel = sel[dist[sel] <= np.maximum(3.0 * cx_radius, 3.0 * spacing.max())[arm_cx[arm[sel]]]]
        w = np.maximum(np.bincount(arm[sel], minlength=n_arm), 1)
        for d in range(3):
            arm_dir[:, d] = np.bincount(arm[sel], weights=pos[sel, d], minlength=n_arm) / w
        arm_dir -= centre[arm_cx]
        arm_dir /= np.maximum(np.linalg.norm(arm_dir, axis=1), 1e-9)[:, None]
    return _Skeleton(sg, junction, branch_of, cx_of, n_cx, arm_branch, arm_cx, arm_voxel, arm_dir, n_branch)


def _arm_dijkstra(sk: _Skeleton, travel: np.ndarray, seed_arrival: np.ndarray, seeded_cx: np.ndarray,
                  transit: dict[int, np.ndarray],
                  crossing_penalty_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """One tree's cheapest *arrival* at each complex through each arm, and *entry* into each arm's
    branch from its complex (arrival through another arm + the way across the complex + the
    crossing penalty)."""
    n_arm = sk.arm_branch.size
    arms_of_cx, arms_of_branch = _arm_tables(sk)
    lateral = _lateral_branches(sk, arms_of_cx, arms_of_branch)
    arrival = seed_arrival.copy()
    entry = np.full(n_arm, np.inf)
    heap = [(float(c), a) for a, c in enumerate(arrival) if np.isfinite(c)]
    heapq.heapify(heap)

    def enter(b: int, e: float) -> None:
        """Enter branch of arm ``b`` at cost ``e``; arrive at the complex at its other end."""
        if e >= entry[b]:
            return
        entry[b] = e
        for b2 in arms_of_branch[int(sk.arm_branch[b])]:
            if sk.arm_cx[b2] != sk.arm_cx[b]:
                t = e + abs(travel[b2] - travel[b]) + crossing_penalty_mm * lateral[int(sk.arm_branch[b])]
                if t < arrival[b2]:
                    arrival[b2] = t
                    heapq.heappush(heap, (t, b2))

    for c in seeded_cx:
        for b in arms_of_cx.get(int(c), []):
            enter(b, 0.0)
    penalty = {c: transit[c] + _crossing_penalties(sk.arm_dir[arms], crossing_penalty_mm)
               for c, arms in arms_of_cx.items()}
    done = np.zeros(n_arm, bool)
    while heap:
        c, a = heapq.heappop(heap)
        if done[a] or c > arrival[a]:
            continue
        done[a] = True
        cx = int(sk.arm_cx[a])
        arms = arms_of_cx[cx]
        row = penalty[cx][arms.index(a)]
        for b, p in zip(arms, row):
            if b != a:
                enter(b, c + p)
    return arrival, entry


def _arm_tables(sk: _Skeleton) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Arms by complex and by branch."""
    arms_of_cx: dict[int, list[int]] = {}
    arms_of_branch: dict[int, list[int]] = {}
    for a in range(sk.arm_branch.size):
        arms_of_cx.setdefault(int(sk.arm_cx[a]), []).append(a)
        arms_of_branch.setdefault(int(sk.arm_branch[a]), []).append(a)
    return arms_of_cx, arms_of_branch


def _transit_costs(sk: _Skeleton, s_cost: np.ndarray, batch: int = 256) -> dict[int, np.ndarray]:
    """Per complex, the cost from each arm's attachment voxel to each other's across the complex
    (junction voxels and folded branches): a large junction is no free shortcut."""
    arms_of_cx, _ = _arm_tables(sk)
    inside = sk.cx_of >= 0
    inside[sk.arm_voxel] = True
    nodes = np.flatnonzero(inside)
    sub = sk.sg.matrix(s_cost, keep=inside)[nodes][:, nodes]
    at = np.full(sk.sg.n, -1, np.int64)
    at[nodes] = np.arange(nodes.size)
    starts = at[sk.arm_voxel]
    transit = {c: np.zeros((len(arms), len(arms))) for c, arms in arms_of_cx.items()}
    order = np.argsort(sk.arm_cx, kind="stable")  # a batch holds whole complexes as far as it can
    for lo in range(0, order.size, batch):
        arms = order[lo:lo + batch]
        d = dijkstra(sub, directed=False, indices=starts[arms])
        for row, a in zip(d, arms):
            c = int(sk.arm_cx[a])
            peers = arms_of_cx[c]
            transit[c][peers.index(a)] = row[starts[peers]]
    for m in transit.values():
        m[~np.isfinite(m)] = 0.0  # arms that touch the complex only through each other's voxel
    return transit


def _lateral_branches(sk: _Skeleton, arms_of_cx: dict[int, list[int]],
                      arms_of_branch: dict[int, list[int]]) -> dict[int, bool]:
    """Branches that enter the side of a vessel running straight through at both ends: a leak between
    two vessels (a tree's branch ends in its own bifurcation, or nowhere)."""
    side = np.zeros(sk.arm_branch.size, bool)
    for arms in arms_of_cx.values():
        if len(arms) < 3:
            continue
        d = sk.arm_dir[arms]
        straight = -d @ d.T >= STRAIGHT_COS
        np.fill_diagonal(straight, False)
        for x in range(len(arms)):
            others = np.delete(np.delete(straight, x, axis=0), x, axis=1)
            side[arms[x]] = not straight[x].any() and bool(others.any())
    return {b: len(arms) == 2 and bool(side[arms].all()) for b, arms in arms_of_branch.items()}


def _crossing_penalties(directions: np.ndarray, crossing_penalty_mm: float) -> np.ndarray:
    """Cost of going from arm a into arm b of one complex (``directions``: unit vectors away from it):
    ``crossing_penalty_mm`` for leaving one straight pair for the other where the four arms make two
    straight pairs (two vessels crossing), else nothing."""
    penalty = np.zeros((len(directions), len(directions)))
    if len(directions) == 4:
        cos_turn = -directions @ directions.T  # 1: b continues a straight on
        np.fill_diagonal(cos_turn, -1.0)
        straight = cos_turn >= STRAIGHT_COS
        if (straight.sum(axis=1) == 1).all():
            penalty[~straight] = crossing_penalty_mm
    return penalty


def _skeleton_split(v: np.ndarray, graph: VoxelGraph, node_radius: np.ndarray, seeds: dict[int, np.ndarray],
                    spacing: np.ndarray, crossing_penalty_mm: float):
    """Steps 3-4 of the module docstring. Returns labels per vessel node, the skeleton's vessel-graph
    nodes, their labels, and QC."""
    from skimage.morphology import skeletonize

    skel = skeletonize(v) > 0
    # Every component keeps at least one skeleton voxel (its deepest), so every voxel has one to go to.
    comp, n_comp = ndimage.label(v, CUBE)
    has = np.zeros(n_comp + 1, bool)
    has[comp[skel]] = True
    missing = np.flatnonzero(~has[1:]) + 1
    if missing.size:
        for p in ndimage.maximum_position(ndimage.distance_transform_edt(v), comp, missing):
            skel[p] = True
    del comp
    skel_nodes = graph.index[skel]  # C order, like the skeleton graph's own nodes
    _, nearest = _from_sources(graph.matrix(), skel_nodes)  # every vessel voxel's skeleton voxel
    skel_at = np.full(graph.n, -1, np.int64)
    skel_at[skel_nodes] = np.arange(skel_nodes.size)

    sk = _build_skeleton(skel, node_radius[skel_nodes], spacing)
    sg, junction = sk.sg, sk.junction
    r_ref = float(np.median(node_radius[skel_nodes]))
    s_cost = (r_ref / np.maximum(node_radius[skel_nodes], 1e-6)) ** 2
    branch_cost = sg.matrix(s_cost, keep=~junction)
    # Cost along each arm's branch from the branch's first arm (so |difference| = end to end).
    n_arm = sk.arm_branch.size
    _, first = np.unique(sk.arm_branch, return_index=True)
    d_first, _ = _from_sources(branch_cost, sk.arm_voxel[first])
    travel = d_first[sk.arm_voxel] if n_arm else np.zeros(0)

    transit = _transit_costs(sk, s_cost)
    # Seeds on the skeleton: the nearest skeleton voxel of each seed voxel; ambiguous ones dropped.
    seed_skel = {lab: np.unique(skel_at[nearest[s][nearest[s] >= 0]]) for lab, s in seeds.items()}
    both = np.intersect1d(seed_skel[PORTAL], seed_skel[HEPATIC])
    cost = {}
    for lab in LABELS:
        ss = np.setdiff1d(seed_skel[lab], both)
        on_branch = ss[sk.cx_of[ss] < 0]
        seeded_cx = np.unique(sk.cx_of[ss][sk.cx_of[ss] >= 0])
        d_seed, _ = _from_sources(branch_cost, on_branch)
        arrival, entry = _arm_dijkstra(sk, travel, d_seed[sk.arm_voxel], seeded_cx, transit,
                                       crossing_penalty_mm)
        # Branch voxels: cheapest of the entries at their ends and the seeds on them.
        fin = np.isfinite(entry)
        targets = np.concatenate([sk.arm_voxel[fin], on_branch])
        weights = np.concatenate([entry[fin], np.zeros(on_branch.size)])
        per_voxel = _super_dist(sg.matrix(s_cost, keep=~junction, extra=(targets, weights)))
        # Complex voxels: the cheapest arrival at their complex.
        cx_cost = np.full(sk.n_cx, np.inf)
        np.minimum.at(cx_cost, sk.arm_cx, arrival)
        cx_cost[seeded_cx] = 0.0
        in_cx = sk.cx_of >= 0
        per_voxel[in_cx] = cx_cost[sk.cx_of[in_cx]]
        cost[lab] = per_voxel

    cp, ch = cost[PORTAL], cost[HEPATIC]
    skel_labels = np.where(cp < ch, PORTAL, np.where(ch < cp, HEPATIC, 0)).astype(np.uint8)
    node_labels = np.where(nearest >= 0, skel_labels[skel_at[np.maximum(nearest, 0)]], 0).astype(np.uint8)
    crossings = sum(bool(_crossing_penalties(sk.arm_dir[sk.arm_cx == c], 1.0).any())
                    for c in np.flatnonzero(np.bincount(sk.arm_cx, minlength=sk.n_cx) == 4))
    qc = {"skeleton_branches": sk.n_branches, "skeleton_junctions": sk.n_cx, "skeleton_crossings": crossings}
    return node_labels, skel_nodes, qc


# --- gaps and small pieces ------------------------------------------------------------------------


def _bridge_gaps(graph: VoxelGraph, node_labels: np.ndarray, spacing: np.ndarray,
                 max_gap_mm: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Components without any label take the label of the nearest labelled voxel within
    ``max_gap_mm``. Round by round, only the fragments closest to what is labelled are linked, so a
    fragment between another one and the tree passes its label on."""
    node_labels = node_labels.copy()
    if graph.n == 0 or not (node_labels > 0).any():
        return node_labels, (0, 0)
    n_comp, comp = connected_components(graph.matrix(), directed=False)
    todo = np.ones(n_comp, bool)
    todo[comp[node_labels > 0]] = False
    pos = graph.coords() * spacing
    best = np.full(n_comp, np.inf)
    best_label = np.zeros(n_comp, np.uint8)
    new = np.flatnonzero(node_labels > 0)
    step = float(np.linalg.norm(spacing))
    n_fragments = n_voxels = 0
    while todo.any() and new.size:
        ask = np.flatnonzero(todo[comp])
        dist, which = cKDTree(pos[new]).query(pos[ask], distance_upper_bound=max_gap_mm)
        ok = np.isfinite(dist)
        ask, dist, which = ask[ok], dist[ok], which[ok]
        order = np.argsort(-dist)  # so the smallest distance of each fragment is written last
        c = comp[ask[order]]
        improve = dist[order] < best[c]
        best[c[improve]] = dist[order][improve]
        best_label[c[improve]] = node_labels[new[which[order][improve]]]
        candidates = np.flatnonzero(todo & np.isfinite(best))
        if candidates.size == 0:
            break
        link = candidates[best[candidates] <= best[candidates].min() + step]
        todo[link] = False
        new = np.flatnonzero(np.isin(comp, link))
        node_labels[new] = best_label[comp[new]]
        n_fragments += int(link.size)
        n_voxels += int(new.size)
    return node_labels, (n_fragments, n_voxels)


def _absorb_small(labels: np.ndarray, min_size: int) -> tuple[np.ndarray, int]:
    """Pieces of one tree smaller than ``min_size`` voxels that touch the other tree join it."""
    if min_size <= 1:
        return labels, 0
    changed = 0
    for lab, other in ((PORTAL, HEPATIC), (HEPATIC, PORTAL)):
        comp, n = ndimage.label(labels == lab, CUBE)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel(), minlength=n + 1)
        small = np.flatnonzero(sizes[1:] < min_size) + 1
        if small.size == 0:
            continue
        touching = np.zeros(n + 1, bool)
        touching[comp[ndimage.binary_dilation(labels == other, CUBE)]] = True
        move = small[touching[small]]
        sel = np.isin(comp, move)
        labels[sel] = other
        changed += int(sel.sum())
    return labels, changed
