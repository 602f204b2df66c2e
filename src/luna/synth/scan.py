"""One synthetic scan from start to finish: geometry, anatomy, vessels, findings, candidates, noise.

`make_scan` is a pure function of its `ScanSpec` (the seed is in it), so scans can be
generated in any order, in parallel, and come out byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from luna.geometry import Geometry
from luna.synth.anatomy import Patient, Tissue, body_extent, render_anatomy, render_labels, sample_patient
from luna.synth.imaging import acquire, sample_scanner
from luna.synth.nodules import Finding, body_reach, design_shape, render_finding, sample_findings, shape_reach
from luna.synth.presets import Preset
from luna.synth.vessels import Grid, Tree, grow_tree, rasterize_tubes

__all__ = ["ScanSpec", "Scan", "make_scan", "Candidate", "TISSUE_GROUPS"]

FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

TISSUE_GROUPS = {
    "air": (Tissue.AIR,),
    "lung": (Tissue.LUNG,),
    "fat": (Tissue.FAT, Tissue.MED_FAT),
    "soft_tissue": (Tissue.MUSCLE, Tissue.HEART, Tissue.BLOOD, Tissue.LIVER, Tissue.SPLEEN, Tissue.STOMACH),
    "bone": (Tissue.CORTEX,),
    "marrow": (Tissue.MARROW,),
    "vessel": (Tissue.VESSEL,),
    "nodule": (Tissue.NODULE,),
}


@dataclass(frozen=True)
class ScanSpec:
    index: int
    series_uid: str
    subset: int
    preset: Preset
    seed: int
    direction: tuple[float, ...] | None = None
    """Force a direction matrix (the dataset makes sure both kinds occur)."""


@dataclass(frozen=True)
class Candidate:
    xyz: tuple[float, float, float]
    is_nodule: bool
    source: str
    """Where it came from: nodule, vessel, bifurcation, pleura, airway, lung, outside, excluded."""


@dataclass
class Scan:
    spec: ScanSpec
    geometry: Geometry
    hu: np.ndarray
    findings: list[Finding]
    candidates: list[Candidate]
    info: dict = field(default_factory=dict)
    """Scan-level facts for scans.csv and the summary (noise, blur, padding, HU medians...)."""


def make_scan(spec: ScanSpec, *, keep_labels: bool = False) -> Scan:
    """Generate one scan: int16 HU with its geometry, findings and candidates.

    Order matters for realism: the patient first (sized for a whole chest even when
    the scan is a slab of it), then where the lungs are on a coarse grid of the whole
    chest, from which the vessel and airway trees grow out of the hila; then the
    anatomy on the scan's own grid, the trees drawn into it, findings placed against
    both, and last what the scanner adds (`luna.synth.imaging`: blur, kernel,
    noise, streaks). ``keep_labels`` leaves the `Tissue` label volume in
    ``info["labels"]`` (for inspection).
    """
    preset = spec.preset
    seeds = np.random.SeedSequence([spec.seed, _preset_code(preset.name), spec.index])
    # One stream per stage, so that changing how one stage draws leaves the others' draws alone.
    rng, rng_anatomy, rng_trees, rng_findings, rng_scanner = (np.random.default_rng(s) for s in seeds.spawn(5))
    frame = _sample_frame(rng, spec)
    fov, center = frame["fov_mm"], frame["center"]
    patient = sample_patient(
        rng,
        fov_mm=fov,
        center_uv=(center[0] + rng.uniform(-0.03, 0.03) * fov, center[1] + rng.uniform(-0.02, 0.035) * fov),
        z_lo=frame["chest"][0],
        z_hi=frame["chest"][1],
        body_fill=preset.body_fill,
    )
    geom, grid = _place_grid(rng, spec, frame, patient)
    info = dict(fov_mm=fov, padding_hu=frame["padding_hu"], slice_thickness_mm=frame["dz"])
    # Without a padded circle the whole square is reconstructed.
    fov_radius = fov / 2 if frame["padded"] else fov
    spacing = np.array([abs(grid.step(0)), abs(grid.step(1)), abs(grid.step(2))])
    # Partial volume along z: thin sections across each slice's thickness, averaged.
    z_sub = 3 if spacing[0] >= 1.9 else 1
    hu, label = render_anatomy(patient, (grid.z, grid.y, grid.x), center, fov_radius, rng_anatomy, z_sub=z_sub)
    pv_sigma = 0.4 * float(spacing[1:].min())

    lungs = _LungMap.of_chest(patient, grid, frame["chest"], center, fov_radius)
    # Findings and candidates keep away from a slab's ends, so that a 32-slice chunk
    # around one is padded by at most a few slices (real scans are long).
    margin = SLAB_MARGIN_SLICES * spacing[0] if preset.slab else 0.0
    slab = (float(grid.z.min()) + margin, float(grid.z.max()) - margin)
    trees, tube_info = _draw_trees(rng_trees, patient, grid, hu, label, lungs, pv_sigma, z_sub)
    findings = _place_findings(rng_findings, spec, patient, grid, hu, label, lungs, trees, pv_sigma, z_sub, slab)
    candidates = _candidates(rng_findings, preset, patient, grid, label, lungs, trees, findings, slab)

    scanner = sample_scanner(rng_scanner, spacing, 2 * patient.half_width)
    u_reach, front, back = body_extent(patient)
    centre_irc = geom.xyz_to_irc((patient.cx, patient.cy + 0.5 * (front + back), slab[0]))
    half_rc = (0.5 * (back - front) / spacing[1], patient.half_width / spacing[2])
    hu = acquire(hu, scanner, spacing, rng_scanner, body_center_rc=(centre_irc[1], centre_irc[2]), body_half_size_rc=half_rc)
    padding = info["padding_hu"]
    outside = label == Tissue.PADDING
    np.maximum(hu, -1024, out=hu)
    hu[outside] = padding
    volume = np.rint(hu).astype(np.int16)
    del hu

    info.update(
        noise_hu=round(scanner.noise_hu, 2),
        blur_mm=round(scanner.blur_mm, 3),
        kernel=scanner.kernel,
        nps_peak=round(scanner.nps_peak, 3),
        contrast=patient.contrast,
        body_width_mm=round(2 * patient.half_width, 1),
        lung_length_mm=round(patient.lung_length, 1),
        vessel_segments=tube_info["vessel_segments"],
        airway_segments=tube_info["airway_segments"],
        emphysema=patient.emphysema > 0,
        arms_down=patient.arms_down,
    )
    info.update(_tissue_stats(rng, volume, label))
    scan = Scan(spec, geom, volume, findings, candidates, info)
    if keep_labels:
        scan.info["labels"] = label
    return scan


def _preset_code(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name))


# --- geometry -----------------------------------------------------------------------------

SLAB_MARGIN_SLICES = 12
"""Slices kept free of findings and candidates at each end of a slab."""


def _sample_frame(rng: np.random.Generator, spec: ScanSpec) -> dict:
    """Field of view, voxel size, slices, direction and the z range of the whole chest."""
    p = spec.preset
    n = p.inplane_size
    fov = float(np.round(n * rng.uniform(*p.inplane_spacing)))
    dz = float(rng.choice(p.slice_spacings))
    width_guess = fov * np.mean(p.body_fill)
    extent = rng.uniform(290, 350) * width_guess / 340
    if p.slab:
        nz = int(rng.integers(p.slices[0], p.slices[1] + 1))
        chest = extent
    else:
        nz = int(np.clip(np.rint(extent / dz), *p.slices))
        chest = (nz - 1) * dz
    direction = spec.direction or (FLIPPED if rng.random() < 0.35 else IDENTITY)
    center = (float(np.round(rng.uniform(-0.05, 0.05) * fov, 1)), float(np.round(rng.uniform(-0.1, 0.05) * fov, 1)))
    z_lo = float(np.round(rng.uniform(-420, -60), 1))
    if rng.random() < 0.1:
        z_lo += float(rng.choice([-900.0, 700.0]))
    padded = rng.random() < p.padding_share
    padding = float(rng.choice([-2000.0, -3024.0])) if padded else -1024.0
    return dict(n=n, fov_mm=fov, sxy=fov / n, dz=dz, nz=nz, direction=direction, center=center,
                chest=(z_lo, z_lo + chest), padded=padded, padding_hu=int(padding))


def _place_grid(rng: np.random.Generator, spec: ScanSpec, frame: dict, patient: Patient) -> tuple[Geometry, Grid]:
    """The scan's geometry: the whole chest, or for slab presets a slab through the lungs."""
    n, sxy, dz, nz = frame["n"], frame["sxy"], frame["dz"], frame["nz"]
    z_lo = frame["chest"][0]
    if spec.preset.slab:
        # A slab centred anywhere from just above the diaphragm's recesses to near the apices.
        z_mid = patient.z(float(rng.uniform(0.12, 0.9)))
        z_lo = float(np.round(z_mid - (nz - 1) * dz / 2, 1))
    direction = frame["direction"]
    center = frame["center"]
    d = np.array(direction).reshape(3, 3)
    half = (n - 1) / 2 * sxy
    origin = (center[0] - d[0, 0] * half, center[1] - d[1, 1] * half, z_lo)
    geom = Geometry(origin, (sxy, sxy, dz), direction)
    grid = Grid(
        z=geom.irc_to_xyz(np.stack([np.arange(nz), np.zeros(nz), np.zeros(nz)], axis=1))[:, 2],
        y=geom.irc_to_xyz(np.stack([np.zeros(n), np.arange(n), np.zeros(n)], axis=1))[:, 1],
        x=geom.irc_to_xyz(np.stack([np.zeros(n), np.zeros(n), np.arange(n)], axis=1))[:, 0],
    )
    return geom, grid


# --- lungs on a coarse grid ------------------------------------------------------------------

LUNG_MAP_CELL_MM = 2.5


class _LungMap:
    """Lung voxels of the whole chest on a ~2.5 mm grid with their distance to the lung boundary.

    Trees grow through all of it (so a slab's vessels come from hila that may lie
    outside the slab); findings and candidates are placed within the scan's slab.
    """

    def __init__(self, label: np.ndarray, grid: Grid):
        lung = (label == Tissue.LUNG) | (label == Tissue.VESSEL)
        self.cell = np.array([abs(grid.step(a)) for a in range(3)])
        self.edt = ndimage.distance_transform_edt(lung, sampling=self.cell).astype(np.float32)
        self.lung = lung
        self.grid = grid
        idx = np.nonzero(lung)
        self.idx = np.stack(idx, axis=1)
        self.dist = self.edt[idx]
        self.xyz = np.stack([grid.x[idx[2]], grid.y[idx[1]], grid.z[idx[0]]], axis=1)
        self.volume_mm3 = float(len(self.idx) * np.prod(self.cell))

    @classmethod
    def of_chest(cls, patient: Patient, grid: Grid, chest: tuple[float, float], fov_center, fov_radius) -> "_LungMap":
        """Rendered from the patient on a coarse grid: the scan's rows and columns every ~2.5 mm, the chest's z range."""
        sy = max(1, int(np.rint(LUNG_MAP_CELL_MM / abs(grid.step(1)))))
        sx = max(1, int(np.rint(LUNG_MAP_CELL_MM / abs(grid.step(2)))))
        dz = abs(grid.step(0))
        step_z = dz * max(1, int(np.rint(LUNG_MAP_CELL_MM / dz)))
        lo, hi = min(chest[0], float(grid.z.min())), max(chest[1], float(grid.z.max()))
        z = np.arange(lo, hi + 1e-6, step_z)
        coarse = Grid(z, grid.y[::sy], grid.x[::sx])
        return cls(render_labels(patient, (coarse.z, coarse.y, coarse.x), fov_center, fov_radius), coarse)

    def jitter(self, rng, xyz):
        half = np.array([abs(self.grid.step(2)), abs(self.grid.step(1)), abs(self.grid.step(0))]) / 2
        return xyz + rng.uniform(-1, 1, xyz.shape) * half

    def distance_at(self, xyz) -> float:
        """Distance (mm) to the lung's boundary at the coarse cell nearest ``xyz``."""
        ci = _nearest_index(self.grid, xyz)
        ci = np.clip(ci, 0, np.array(self.edt.shape) - 1)
        return float(self.edt[tuple(ci)])

    def inward(self, i: int) -> np.ndarray:
        """Unit vector (xyz) into the lung at lung point ``i``: the gradient of the distance map."""
        at = self.idx[i]
        g = np.zeros(3)
        for a in range(3):
            lo, hi = at.copy(), at.copy()
            lo[a], hi[a] = max(at[a] - 1, 0), min(at[a] + 1, self.edt.shape[a] - 1)
            if hi[a] > lo[a]:
                g[a] = (self.edt[tuple(hi)] - self.edt[tuple(lo)]) / (hi[a] - lo[a]) / self.grid.step(a)
        xyz = g[::-1]
        return xyz / max(float(np.linalg.norm(xyz)), 1e-6)

    def within(self, slab: tuple[float, float], margin: float = 0.0) -> np.ndarray:
        """Whether each lung point lies inside the z range ``slab`` shrunk by ``margin`` (mm)."""
        return (self.xyz[:, 2] >= slab[0] + margin) & (self.xyz[:, 2] <= slab[1] - margin)


# --- vessel and airway trees -------------------------------------------------------------------

# Attractors per lung side and tree pair: one per ~(3.8 mm)^3 of lung, which is what
# makes the vessel trees about as dense as on a real scan.
MAX_ATTRACTORS = 20000
ATTRACTOR_SPACING_MM = 5.0
LEAF_RADIUS_MM = (0.22, 0.36)
MURRAY_EXPONENT = 2.7

def _draw_trees(rng, patient: Patient, grid: Grid, hu, label, lungs: _LungMap, pv_sigma, z_samples):
    s = patient.scale
    u = lungs.xyz[:, 0] - patient.cx
    v = lungs.xyz[:, 1] - patient.cy
    h = patient.h(lungs.xyz[:, 2])
    segs_a, segs_b, rads = [], [], []
    trees: list[Tree] = []
    artery_roots = []
    spacing_attr = ATTRACTOR_SPACING_MM
    for side in (-1, 1):
        on_side = np.sign(u) == side
        pts = np.nonzero(on_side & (lungs.dist > 2.0))[0]
        if len(pts) < 20:
            continue
        n_attr = int(np.clip(lungs.volume_mm3 / 2 / spacing_attr**3, 60, MAX_ATTRACTORS))
        chosen = rng.choice(pts, size=min(n_attr, len(pts)), replace=False)
        attractors = lungs.jitter(rng, lungs.xyz[chosen])
        split = rng.random(len(attractors)) < 0.55
        for kind, h_root, v_off, attr in (("artery", 0.56 if side > 0 else 0.52, -0.05, attractors[split]),
                                          ("vein", 0.4, 0.12, attractors[~split])):
            root = _hilum(patient, lungs, u, v, h, side, h_root, v_off)
            if root is None or len(attr) < 5:
                continue
            direction = np.array([side * 1.0, 0.15 * rng.normal(), -0.3])
            tree = grow_tree(rng, root, direction, attr, step=2.5, kill=4.5, leaf_radius=LEAF_RADIUS_MM,
                             murray=MURRAY_EXPONENT)
            trees.append(tree)
            a, b, r = tree.segments()
            segs_a.append(a)
            segs_b.append(b)
            rads.append(r)
            # The main vessel from the heart to the hilum crosses the mediastinal fat.
            if kind == "artery":
                tu, tv, th = patient.pulmonary_trunk
                origin = np.array([patient.cx + tu, patient.cy + tv, patient.z(th)])
                artery_roots.append((tree, side))
            else:
                origin = np.array([patient.cx + 0.3 * patient.heart_u + side * 0.25 * patient.heart_ru,
                                   patient.cy + patient.heart_v + 0.75 * patient.heart_rv,
                                   patient.z(patient.heart_h + 0.35 * patient.heart_rh)])
            segs_a.append(origin[None])
            segs_b.append(tree.pos[0][None])
            rads.append(np.array([tree.radius[0] * 1.1]))
    info = dict(vessel_segments=int(sum(len(r) for r in rads)), airway_segments=0)
    if not rads:
        return trees, info
    a = np.concatenate(segs_a)
    b = np.concatenate(segs_b)
    r = np.concatenate(rads)
    occ = np.zeros(hu.shape, np.float32)
    rasterize_tubes(occ, grid, a, b, r, r, pv_sigma=pv_sigma, z_samples=z_samples)
    _blend(hu, label, occ, patient.hu[Tissue.VESSEL], (Tissue.LUNG, Tissue.MED_FAT), Tissue.VESSEL)
    # Airways run beside the arteries: a thin wall around air, invisible below ~1 mm.
    wa, wb, wr, la, lb, lr = [], [], [], [], [], []
    carina = np.array([patient.cx, patient.cy + patient.trachea_v, patient.z(patient.carina_h)])
    for tree, side in artery_roots:
        pa, pb, pr = tree.segments()
        big = pr > 1.1
        pa, pb, pr = pa[big], pb[big], pr[big]
        d = pb - pa
        d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)
        ref = np.where(np.abs(d[:, 2:3]) > 0.9, np.array([[1.0, 0, 0]]), np.array([[0, 0, 1.0]]))
        off = np.cross(d, ref)
        off /= np.maximum(np.linalg.norm(off, axis=1, keepdims=True), 1e-6)
        off *= np.sign(off[:, 1:2] + 1e-6)  # always behind the artery
        lumen = 0.85 * pr
        wall = np.maximum(0.25, 0.2 * lumen)
        shift = off * (pr + lumen + wall + 0.4)[:, None]
        wa.append(pa + shift), wb.append(pb + shift), wr.append(lumen + wall)
        la.append(pa + shift), lb.append(pb + shift), lr.append(lumen)
        root = tree.pos[0] + np.array([0, 1, 0]) * (tree.radius[0] * 2 + 2)
        main = (6.5 if side < 0 else 5.5) * s
        wa.append(carina[None]), wb.append(root[None]), wr.append(np.array([main + 1.5 * s]))
        la.append(carina[None]), lb.append(root[None]), lr.append(np.array([main]))
    if wr:
        occ[:] = 0
        wa, wb, wr = np.concatenate(wa), np.concatenate(wb), np.concatenate(wr)
        rasterize_tubes(occ, grid, wa, wb, wr, wr, pv_sigma=pv_sigma, z_samples=z_samples)
        _blend(hu, label, occ, patient.hu[Tissue.AIRWAY_WALL], (Tissue.LUNG, Tissue.MED_FAT, Tissue.VESSEL), None)
        occ[:] = 0
        la, lb, lr = np.concatenate(la), np.concatenate(lb), np.concatenate(lr)
        rasterize_tubes(occ, grid, la, lb, lr, lr, pv_sigma=pv_sigma, z_samples=z_samples)
        _blend(hu, label, occ, -1000.0, (Tissue.LUNG, Tissue.MED_FAT, Tissue.VESSEL), Tissue.AIRWAY)
        info["airway_segments"] = int(len(lr))
    return trees, info


def _blend(hu, label, occ, value, where, new_label):
    """hu <- hu + occ * (value - hu) on voxels whose label is in ``where``."""
    idx = np.flatnonzero(occ > 0.01)
    lab = label.reshape(-1)[idx]
    ok = np.isin(lab, np.array(where, dtype=np.uint8))
    idx = idx[ok]
    o = occ.reshape(-1)[idx]
    flat = hu.reshape(-1)
    flat[idx] += o * (np.float32(value) - flat[idx])
    if new_label is not None:
        strong = idx[o > 0.5]
        label.reshape(-1)[strong] = new_label


def _hilum(patient: Patient, lungs: _LungMap, u, v, h, side, h_root, v_off):
    """The most medial lung point near height ``h_root`` on one side, moved into the mediastinum."""
    band = (np.sign(u) == side) & (np.abs(h - h_root) < 0.05) & (lungs.dist > 1.5)
    band &= np.abs(v - v_off * patient.b_post) < 0.35 * patient.b_post
    idx = np.nonzero(band)[0]
    if len(idx) == 0:
        band = (np.sign(u) == side) & (np.abs(h - h_root) < 0.12)
        idx = np.nonzero(band)[0]
        if len(idx) == 0:
            return None
    best = idx[np.argmin(np.abs(u[idx]))]
    root = lungs.xyz[best].copy()
    root[0] -= side * 6.0 * patient.scale
    return root


# --- findings ----------------------------------------------------------------------------------

# The first two scans of every dataset hold every kind of finding, so that even the
# smallest dataset exercises all of them.
_FORCED_TYPES = {0: ("juxta-pleural", "solid", "juxta-vascular"), 1: ("ground-glass", "part-solid")}


def _place_findings(rng, spec: ScanSpec, patient: Patient, grid: Grid, hu, label, lungs: _LungMap, trees, pv_sigma,
                    z_samples, slab: tuple[float, float]) -> list[Finding]:
    preset = spec.preset
    n_nod = int(rng.poisson(preset.nodules_mean))
    if rng.random() < 0.12 and not preset.mixed_malignancy:
        n_nod = 0  # some patients have no nodule at all, as in LUNA16
    n_small = int(rng.binomial(3, 0.2)) + (spec.index == 0)
    n_non = int(rng.binomial(2, 0.15)) + (spec.index == 1)
    findings = sample_findings(rng, n_nod, n_small, n_non, preset.max_diameter_mm,
                               forced_types=_FORCED_TYPES.get(spec.index, ()),
                               forced_malignancy=(True, False) if preset.mixed_malignancy else ())
    seg_a, seg_b, seg_r = [], [], []
    for t in trees:
        a, b, r = t.segments()
        seg_a.append(a), seg_b.append(b), seg_r.append(r)
    if seg_r:
        seg_a, seg_b, seg_r = np.concatenate(seg_a), np.concatenate(seg_b), np.concatenate(seg_r)
    else:
        seg_a = seg_b = np.zeros((0, 3))
        seg_r = np.zeros(0)
    placed: list[Finding] = []
    spacing = np.array([abs(grid.step(2)), abs(grid.step(1)), abs(grid.step(0))])
    for f in findings:
        design_shape(rng, f)
        for attempt in range(60):
            if attempt and attempt % 20 == 0 and f.diameter_mm > 3.5 and not f.excluded:
                # Too big to fit this patient's lungs: take a smaller one from the same draw.
                f.diameter_mm = max(3.2, f.diameter_mm * 0.8)
                design_shape(rng, f)
            center = _propose(rng, f, lungs, seg_a, seg_b, seg_r, slab)
            if center is None:
                continue
            if any(np.linalg.norm(center - g.center_xyz) < f.radius + g.radius + 4 for g in placed):
                continue
            if not slab[0] + f.radius <= center[2] <= slab[1] - f.radius:
                continue
            if not _fits(f, center, grid, label, spacing):
                continue
            f.center_xyz = center
            break
        if f.center_xyz is None:
            continue
        f.pleura_distance_mm = lungs.distance_at(f.center_xyz)
        if len(seg_r):
            f.vessel_contact = bool(np.any(_seg_dist(f.center_xyz, seg_a, seg_b) < f.radius + seg_r + 0.3))
        box = _box(grid, f.center_xyz, shape_reach(f) + 3 * pv_sigma + 1.0)
        render_finding(hu, label, grid, f, box, pv_sigma, z_samples)
        placed.append(f)
    for i, f in enumerate(placed):
        f.finding_id = i
    return placed


def _propose(rng, f: Finding, lungs: _LungMap, seg_a, seg_b, seg_r, slab: tuple[float, float]):
    """A centre for ``f`` (xyz mm) at least its radius inside the scan's z range, or None."""
    r = f.radius
    if f.type == "juxta-vascular":
        mid = 0.5 * (seg_a[:, 2] + seg_b[:, 2])
        ok = np.nonzero((seg_r > 0.8) & (seg_r < 3.5) & (mid > slab[0] + r) & (mid < slab[1] - r))[0]
        if len(ok) == 0:
            return None
        i = rng.choice(ok)
        t = rng.uniform(0.2, 0.8)
        p = seg_a[i] + t * (seg_b[i] - seg_a[i])
        d = seg_b[i] - seg_a[i]
        n = np.cross(d, rng.normal(size=3))
        n /= max(np.linalg.norm(n), 1e-6)
        return p + n * (seg_r[i] + rng.uniform(0.45, 0.7) * r)
    inside = lungs.within(slab, margin=r)
    if f.type == "juxta-pleural":
        # A point near the pleura, moved along the lung's inward direction to put the
        # centre from 0.75 r inside the lung to 0.15 r beyond its border (`_fits` then
        # measures the overlap on the full-resolution labels).
        half = 0.5 * float(lungs.cell.mean())
        ok = np.nonzero(inside & (lungs.dist < r + 3 * half))[0]
        if len(ok) == 0:
            return None
        i = rng.choice(ok)
        depth = rng.uniform(-0.15, 0.75) * r
        return lungs.jitter(rng, lungs.xyz[i]) + lungs.inward(i) * (depth - (lungs.dist[i] - half))
    ok = np.nonzero(inside & (lungs.dist > r + 3.0))[0]
    if len(ok) == 0:
        return None
    return lungs.jitter(rng, lungs.xyz[rng.choice(ok)])


# How far a juxta-pleural nodule may sink into what bounds the lung (share of its sphere).
# LIDC's juxta-pleural nodules sit on the chest wall, the mediastinum and the diaphragm,
# from a sliver of contact to a broad base with the centre on the pleura; generator 4
# took only 4-45% and the chest wall, and its models missed nodules sunk deeper or lying
# on the mediastinum (README Quality, another generator's phantoms).
JUXTA_PLEURAL_OVERLAP = (0.04, 0.6)


def _fits(f: Finding, center, grid: Grid, label, spacing) -> bool:
    """Check against the full-resolution labels: inside the lung, touching the wall only if juxta-pleural.

    A juxta-pleural nodule lies `JUXTA_PLEURAL_OVERLAP` outside the lung, on any of its
    borders; with more than half of it outside, its centre lies just beyond the pleura."""
    r = f.radius
    reach = body_reach(f) + 1.0
    box = _box(grid, center, reach)
    lab = label[box]
    zz, yy, xx = grid.z[box[0]], grid.y[box[1]], grid.x[box[2]]
    d2 = ((xx - center[0])[None, None, :] ** 2 + (yy - center[1])[None, :, None] ** 2
          + (zz - center[2])[:, None, None] ** 2)
    ci = _nearest_index(grid, center)
    if not all(0 <= ci[a] < label.shape[a] for a in range(3)):
        return False
    lungish = np.isin(lab, (Tissue.LUNG, Tissue.VESSEL, Tissue.AIRWAY))
    inner = d2 <= r * r
    if not inner.any():
        return False
    if f.type == "juxta-pleural":
        outside = 1 - lungish[inner].mean()
        f.wall_overlap = float(outside)
        # Outside the lung is tissue (wall, mediastinum, diaphragm), not the airways' lumen.
        lumen = np.isin(lab[inner], (Tissue.AIRWAY, Tissue.AIR, Tissue.GAS)).mean()
        return bool(JUXTA_PLEURAL_OVERLAP[0] < outside < JUXTA_PLEURAL_OVERLAP[1] and lumen < 0.02)
    if label[tuple(ci)] not in (Tissue.LUNG, Tissue.VESSEL):
        return False
    if (lab == Tissue.NODULE).any():
        return False
    # Lobes included, nothing but lung within 1 mm of the nodule.
    margin = d2 <= reach**2
    if f.excluded:
        margin = inner
    outside = 1 - lungish[margin].mean()
    f.wall_overlap = float(1 - lungish[inner].mean())
    if outside > 0:
        return False
    return True


def _seg_dist(p, a, b):
    ab = b - a
    t = np.clip(np.sum((p - a) * ab, axis=1) / np.maximum(np.sum(ab * ab, axis=1), 1e-9), 0, 1)
    return np.linalg.norm(a + t[:, None] * ab - p, axis=1)


def _nearest_index(grid: Grid, xyz) -> np.ndarray:
    return np.array([int(np.rint(grid.index_of(0, xyz[2]))), int(np.rint(grid.index_of(1, xyz[1]))),
                     int(np.rint(grid.index_of(2, xyz[0])))])


def _box(grid: Grid, center, reach: float) -> tuple[slice, slice, slice]:
    out = []
    for axis, c in ((0, center[2]), (1, center[1]), (2, center[0])):
        a, b = sorted((float(grid.index_of(axis, c - reach)), float(grid.index_of(axis, c + reach))))
        n = grid.shape[axis]
        out.append(slice(int(np.clip(np.floor(a), 0, n)), int(np.clip(np.ceil(b) + 1, 0, n))))
    return tuple(out)


# --- candidates ----------------------------------------------------------------------------------

_SOURCES = (("vessel", 0.33), ("bifurcation", 0.25), ("pleura", 0.2), ("airway", 0.04), ("lung", 0.12),
            ("outside", 0.06))


def _candidates(rng, preset: Preset, patient: Patient, grid: Grid, label, lungs: _LungMap, trees, findings,
                slab: tuple[float, float]):
    out: list[Candidate] = []
    annotated = [f for f in findings if not f.excluded]
    for f in annotated:
        for _ in range(2 if rng.random() < 0.15 else 1):
            sd = min(0.12 * f.diameter_mm, 1.5)
            jitter = np.clip(rng.normal(0, sd, 3), -0.2 * f.diameter_mm, 0.2 * f.diameter_mm)
            out.append(Candidate(tuple(f.center_xyz + jitter), True, "nodule"))
    for f in findings:
        if f.excluded and rng.random() < 0.8:
            out.append(Candidate(tuple(f.center_xyz + rng.normal(0, 0.4, 3)), False, "excluded"))
    n_neg = int(rng.integers(preset.candidates[0], preset.candidates[1] + 1))
    nodes = [(t.pos, t.radius, t.n_children) for t in trees]
    pos = np.concatenate([n[0] for n in nodes]) if nodes else np.zeros((0, 3))
    rad = np.concatenate([n[1] for n in nodes]) if nodes else np.zeros(0)
    kids = np.concatenate([n[2] for n in nodes]) if nodes else np.zeros(0)
    lo = np.array([grid.x.min(), grid.y.min(), slab[0]])
    hi = np.array([grid.x.max(), grid.y.max(), slab[1]])
    # Only what lies in the scan (a slab holds part of the trees and lungs).
    here = (pos[:, 2] >= slab[0]) & (pos[:, 2] <= slab[1])
    in_slab = lungs.within(slab)
    pools = {
        "vessel": np.nonzero(here & (rad > 0.45) & (rad < 4.5))[0],
        "bifurcation": np.nonzero(here & (kids >= 2) & (rad > 0.5))[0],
        "airway": np.nonzero(here & (rad > 1.3))[0],
        "pleura": np.nonzero(in_slab & (lungs.dist < 1.01 * lungs.cell.max()))[0],
        "lung": np.nonzero(in_slab)[0],
    }
    body = np.nonzero(np.isin(label[::4, ::4, ::4], (Tissue.MUSCLE, Tissue.MED_FAT, Tissue.HEART, Tissue.LIVER,
                                                     Tissue.CORTEX, Tissue.BLOOD, Tissue.FAT)))
    names = [n for n, _ in _SOURCES]
    weights = np.array([w for _, w in _SOURCES])
    picks = rng.choice(len(names), size=n_neg, p=weights / weights.sum())
    for which in picks:
        source = names[which]
        for _ in range(10):
            p = _draw_point(rng, source, pools, pos, rad, lungs, grid, body, trees)
            if p is None:
                source = "lung"
                continue
            if np.any(p < lo) or np.any(p > hi):
                continue
            if any(np.linalg.norm(p - f.center_xyz) < f.radius + 3.0 for f in annotated):
                continue
            out.append(Candidate(tuple(p), False, source))
            break
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _draw_point(rng, source, pools, pos, rad, lungs: _LungMap, grid: Grid, body, trees):
    if source in ("vessel", "bifurcation"):
        pool = pools[source]
        if len(pool) == 0:
            return None
        i = rng.choice(pool)
        return pos[i] + rng.normal(0, 0.25 * max(rad[i], 0.5), 3)
    if source == "airway":
        big = pools["airway"]
        if len(big) == 0:
            return None
        i = rng.choice(big)
        return pos[i] + np.array([0, 1, 0]) * rad[i] * 2.2 + rng.normal(0, 0.5, 3)
    if source in ("pleura", "lung"):
        pool = pools[source]
        if len(pool) == 0:
            return None
        return lungs.jitter(rng, lungs.xyz[rng.choice(pool)])
    if len(body[0]) == 0:
        return None
    i = rng.integers(len(body[0]))
    k, j, m = body[0][i] * 4, body[1][i] * 4, body[2][i] * 4
    return np.array([grid.x[m], grid.y[j], grid.z[k]]) + rng.normal(0, 1.0, 3)


# --- statistics ------------------------------------------------------------------------------------

def _tissue_stats(rng, volume: np.ndarray, label: np.ndarray) -> dict:
    out = {}
    flat_l = label.reshape(-1)
    flat_v = volume.reshape(-1)
    # Sample voxels rather than sorting whole volumes: medians of 20k voxels are exact to ~1 HU.
    sample = rng.integers(0, flat_l.size, size=min(flat_l.size, 400_000))
    ls, vs = flat_l[sample], flat_v[sample]
    for name, tissues in TISSUE_GROUPS.items():
        vals = vs[np.isin(ls, np.array(tissues, dtype=np.uint8))]
        if name == "nodule" and len(vals) < 50:
            vals = flat_v[flat_l == Tissue.NODULE]
        out[f"hu_{name}"] = int(np.median(vals)) if len(vals) else None
    pad = vs[ls == Tissue.PADDING]
    out["hu_padding"] = int(np.median(pad)) if len(pad) else None
    lung = np.count_nonzero(np.isin(ls, (Tissue.LUNG, Tissue.VESSEL, Tissue.AIRWAY)))
    out["vessel_share_of_lung"] = round(float(np.count_nonzero(ls == Tissue.VESSEL) / max(lung, 1)), 4)
    return out
