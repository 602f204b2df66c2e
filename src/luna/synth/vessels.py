"""Pulmonary vessel and airway trees, and a batched rasteriser for tapered tubes.

Trees are grown by space colonisation: attractor points spread through a lung pull
the nearest tree node towards them until every attractor has been reached. That
fills the lung the way real vessels do, with branches that split, bend and thin
towards the periphery. Radii follow Murray's law from the leaves up
(``r_parent**g = sum(r_child**g)``), so calibres taper from the hilum outwards.

`rasterize_tubes` draws line segments with radii as partial-volume occupancy
(0..1). Segments are grouped by bounding-box size and evaluated in vectorised
batches, which keeps tens of thousands of small segments cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import erf

__all__ = ["Tree", "grow_tree", "rasterize_tubes", "Grid"]


@dataclass(frozen=True)
class Grid:
    """Voxel-centre coordinates (patient mm) along each array axis: Z (index), Y (row), X (col)."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z), len(self.y), len(self.x))

    def step(self, axis: int) -> float:
        c = (self.z, self.y, self.x)[axis]
        return float(c[1] - c[0]) if len(c) > 1 else 1.0

    def index_of(self, axis: int, coord: np.ndarray) -> np.ndarray:
        c = (self.z, self.y, self.x)[axis]
        return (np.asarray(coord) - c[0]) / self.step(axis)


@dataclass
class Tree:
    pos: np.ndarray
    """(N, 3) node positions, xyz mm."""
    parent: np.ndarray
    """(N,) parent index, -1 for the root."""
    radius: np.ndarray
    """(N,) radius of the segment that ends at each node (mm)."""

    def segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        child = np.nonzero(self.parent >= 0)[0]
        return self.pos[self.parent[child]], self.pos[child], self.radius[child]

    @property
    def n_children(self) -> np.ndarray:
        return np.bincount(self.parent[self.parent >= 0], minlength=len(self.parent))


def grow_tree(rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, attractors: np.ndarray, *,
              step: float, kill: float, leaf_radius: tuple[float, float], murray: float = 2.7,
              max_iter: int = 400) -> Tree:
    """Grow a tree from ``root`` (first heading ``direction``) into the ``attractors`` (M, 3)."""
    nodes = [np.asarray(root, float)]
    parents = [-1]
    d0 = np.asarray(direction, float)
    d0 /= np.linalg.norm(d0)
    # A short trunk so the first branches leave the hilum in the right direction.
    for _ in range(3):
        nodes.append(nodes[-1] + step * d0)
        parents.append(len(nodes) - 2)
    pos = np.array(nodes)
    parent = list(parents)
    alive = np.asarray(attractors, float)
    stale = 0
    for _ in range(max_iter):
        if len(alive) == 0:
            break
        tree = cKDTree(pos)
        dist, idx = tree.query(alive)
        keep = dist > kill
        alive, dist, idx = alive[keep], dist[keep], idx[keep]
        if len(alive) == 0:
            break
        unit = (alive - pos[idx]) / dist[:, None]
        acc = np.zeros_like(pos)
        np.add.at(acc, idx, unit)
        growing = np.unique(idx)
        vec = acc[growing]
        norm = np.linalg.norm(vec, axis=1)
        ok = norm > 1e-3
        growing, vec, norm = growing[ok], vec[ok], norm[ok]
        vec = vec / norm[:, None]
        vec += rng.normal(0, 0.12, vec.shape)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        new = pos[growing] + step * vec
        # Skip nodes that would land on top of existing ones (a node pulled equally
        # in two directions would otherwise grow in place forever).
        near, _ = tree.query(new)
        fresh = near > 0.45 * step
        if not fresh.any():
            stale += 1
            if stale > 3:
                break
            continue
        stale = 0
        parent.extend(growing[fresh].tolist())
        pos = np.vstack([pos, new[fresh]])
    parent = np.asarray(parent, dtype=np.int64)
    pos = _smooth(pos, parent, rounds=2)
    radius = _murray_radii(rng, parent, leaf_radius, murray)
    return Tree(pos=pos, parent=parent, radius=radius)


def _smooth(pos: np.ndarray, parent: np.ndarray, rounds: int) -> np.ndarray:
    """Pull each inner node towards the mean of its neighbours: removes the zigzag of growth."""
    n = len(pos)
    counts = np.bincount(parent[parent >= 0], minlength=n)
    inner = np.nonzero((parent >= 0) & (counts > 0))[0]
    child_sum = np.zeros_like(pos)
    for _ in range(rounds):
        child_sum[:] = 0
        np.add.at(child_sum, parent[parent >= 0], pos[parent >= 0])
        mean_child = child_sum[inner] / counts[inner, None]
        target = 0.5 * (pos[parent[inner]] + mean_child)
        pos = pos.copy()
        pos[inner] = 0.5 * pos[inner] + 0.5 * target
    return pos


def _murray_radii(rng: np.random.Generator, parent: np.ndarray, leaf_radius: tuple[float, float], g: float) -> np.ndarray:
    n = len(parent)
    acc = np.zeros(n)
    has_child = np.zeros(n, bool)
    has_child[parent[parent >= 0]] = True
    leaf = ~has_child
    acc[leaf] = rng.uniform(*leaf_radius, size=int(leaf.sum())) ** g
    # Children always come after their parent, so one reverse pass sums every subtree.
    for i in range(n - 1, 0, -1):
        p = parent[i]
        if p >= 0:
            acc[p] += acc[i]
    return acc ** (1 / g)


# --- rasterisation --------------------------------------------------------------------

_BUCKETS = np.array([1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256,
                     320, 384, 512, 768, 1024, 2047])


def rasterize_tubes(out: np.ndarray, grid: Grid, p0: np.ndarray, p1: np.ndarray, r0: np.ndarray, r1: np.ndarray, *,
                    pv_sigma: float, z_samples: int = 1, max_elements: int = 1 << 21) -> None:
    """Draw tapered tubes (segments p0->p1, xyz mm, radii r0->r1) into ``out`` as max-combined occupancy.

    ``pv_sigma`` (mm) softens the edge like a voxel's partial volume; ``z_samples``
    averages that many positions across each slice's thickness, so a thin vessel
    lying within a thick slice is drawn faint rather than missed or full-strength.
    """
    p0 = np.asarray(p0, np.float64).reshape(-1, 3)
    p1 = np.asarray(p1, np.float64).reshape(-1, 3)
    r0 = np.broadcast_to(np.asarray(r0, np.float64), (len(p0),))
    r1 = np.broadcast_to(np.asarray(r1, np.float64), (len(p0),))
    if len(p0) == 0:
        return
    shape = out.shape
    reach = np.maximum(r0, r1) + 2.5 * pv_sigma
    lo_idx = np.empty((len(p0), 3), np.int64)
    size = np.empty((len(p0), 3), np.int64)
    for axis, coord in ((0, 2), (1, 1), (2, 0)):
        a = grid.index_of(axis, np.minimum(p0[:, coord], p1[:, coord]) - reach)
        b = grid.index_of(axis, np.maximum(p0[:, coord], p1[:, coord]) + reach)
        half = 0.5 if (axis == 0 and z_samples > 1) else 0.0
        i0 = np.ceil(np.minimum(a, b) - half).astype(np.int64)
        i1 = np.floor(np.maximum(a, b) + half).astype(np.int64)
        i0 = np.clip(i0, 0, shape[axis])
        i1 = np.clip(i1, -1, shape[axis] - 1)
        lo_idx[:, axis] = i0
        size[:, axis] = i1 - i0 + 1
    visible = np.all(size > 0, axis=1)
    bucket = _BUCKETS[np.searchsorted(_BUCKETS, size[visible])]
    keys = (bucket[:, 0] * 2048 + bucket[:, 1]) * 2048 + bucket[:, 2]
    vis_idx = np.nonzero(visible)[0]
    flat = out.reshape(-1)
    zoff = (np.arange(z_samples) + 0.5) / z_samples - 0.5 if z_samples > 1 else np.zeros(1)
    zoff = zoff * abs(grid.step(0))
    inv = 1.0 / (np.sqrt(2.0) * pv_sigma)
    for key in np.unique(keys):
        members = vis_idx[keys == key]
        bz, by, bx = int(key // 2048 // 2048), int(key // 2048 % 2048), int(key % 2048)
        per = bz * by * bx * len(zoff)
        chunk = max(1, max_elements // per)
        for c0 in range(0, len(members), chunk):
            m = members[c0:c0 + chunk]
            _draw_batch(flat, shape, grid, lo_idx[m], (bz, by, bx), p0[m], p1[m], r0[m], r1[m], zoff, inv)


def _draw_batch(flat, shape, grid: Grid, lo, box, a, b, ra, rb, zoff, inv):
    n = len(lo)
    idx = []
    coords = []
    valid = np.ones((n, *box), bool)
    for axis, coord_arr in enumerate((grid.z, grid.y, grid.x)):
        ii = lo[:, axis:axis + 1] + np.arange(box[axis])[None, :]
        ok = ii < shape[axis]
        ii = np.minimum(ii, shape[axis] - 1)
        idx.append(ii)
        coords.append(coord_arr[ii])
        sl = [slice(None), None, None, None]
        sl[axis + 1] = slice(None)
        valid &= ok[tuple(sl)]
    ab = (b - a)
    ab2 = np.maximum(np.sum(ab * ab, axis=1), 1e-9)
    # Per-axis differences to the segment start, broadcast to (n, bz, by, bx).
    wx = (coords[2] - a[:, 0:1])[:, None, None, :]
    wy = (coords[1] - a[:, 1:2])[:, None, :, None]
    occ = None
    for dz in zoff:
        wz = (coords[0] + dz - a[:, 2:3])[:, :, None, None]
        t = (wx * ab[:, 0, None, None, None] + wy * ab[:, 1, None, None, None] + wz * ab[:, 2, None, None, None])
        t = np.clip(t / ab2[:, None, None, None], 0.0, 1.0)
        dx = wx - t * ab[:, 0, None, None, None]
        dy = wy - t * ab[:, 1, None, None, None]
        dzz = wz - t * ab[:, 2, None, None, None]
        d = np.sqrt(dx * dx + dy * dy + dzz * dzz)
        r = ra[:, None, None, None] + t * (rb - ra)[:, None, None, None]
        o = 0.5 * (erf((r - d) * inv) + erf((r + d) * inv))
        occ = o if occ is None else occ + o
    if len(zoff) > 1:
        occ /= len(zoff)
    lin = (idx[0][:, :, None, None] * shape[1] + idx[1][:, None, :, None]) * shape[2] + idx[2][:, None, None, :]
    keep = valid & (occ > 0.01)
    np.maximum.at(flat, lin[keep], occ[keep].astype(flat.dtype))
