"""The chest phantom: a patient drawn from a few dozen random parameters, rendered slice by slice.

Everything is described in patient millimetres around the body centre: ``u`` runs to
the patient's left (+x in LPS), ``v`` to the back (+y), and height is measured as
``h``, the share of the lung length above the lowest point of the lungs (0 at the
costophrenic recesses, 1 at the apices). Each axial slice is evaluated with 2D
numpy arrays; shapes change with ``h``, which is what makes the body, the rib cage,
the heart and the lungs change along z like a real chest.

The renderer returns HU before blur and noise and a label volume (`Tissue`) that
later stages use to put vessels and nodules only where they belong and to measure
HU per tissue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

__all__ = ["Tissue", "Patient", "sample_patient", "render_anatomy", "render_labels", "body_extent", "SmoothNoise"]


class Tissue(IntEnum):
    AIR = 0
    TABLE = 1
    TABLE_FOAM = 2
    SKIN = 3
    FAT = 4
    MUSCLE = 5
    CORTEX = 6
    MARROW = 7
    CARTILAGE = 8
    LUNG = 9
    MED_FAT = 10
    HEART = 11
    BLOOD = 12
    AIRWAY = 13
    AIRWAY_WALL = 14
    LIVER = 15
    SPLEEN = 16
    STOMACH = 17
    GAS = 18
    DISC = 19
    CSF = 20
    VESSEL = 21
    NODULE = 22
    PADDING = 23
    GLAND = 24
    PAD = 25


N_TISSUES = 26


def _harmonics(seed: int, theta: np.ndarray, amplitude: float) -> np.ndarray:
    """1 + a smooth random function of the angle ``theta`` (harmonics 1-4), within about +-``amplitude``."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(theta, dtype=np.float32)
    for k in range(1, 5):
        a, phase = rng.normal(0, 1.0 / k), rng.uniform(0, 2 * np.pi)
        out += np.float32(a) * np.cos(k * theta + phase).astype(np.float32)
    return 1 + amplitude * out / 1.2


def _smoothstep(e0: float, e1: float, x: float) -> float:
    t = min(max((x - e0) / (e1 - e0), 0.0), 1.0)
    return t * t * (3 - 2 * t)


@dataclass
class Patient:
    """The random parameters of one phantom patient (mm, relative to the body centre)."""

    cx: float
    cy: float
    half_width: float
    b_ant: float
    b_post: float
    exponent: float
    scale: float
    z_base: float
    lung_length: float
    fat: float
    muscle: float
    rib_band: float
    table_v: float
    table_curvature: float
    table_shell: float
    table_core: float
    pad: float
    """Thickness (mm) of the foam mattress between the patient and the table (0: none)."""
    rib_z0: float
    rib_pitch: float
    rib_drop: float
    rib_height: float
    vert_v: float
    vert_ru: float
    vert_rv: float
    vert_pitch: float
    vert_z0: float
    heart_u: float
    heart_v: float
    heart_h: float
    heart_ru: float
    heart_rv: float
    heart_rh: float
    dome_right: float
    dome_left: float
    carina_h: float
    trachea_v: float
    trachea_r: float
    lung_mu: float
    lung_gravity: float
    lung_texture: float
    emphysema: float
    breasts: bool
    contrast: bool
    hu: np.ndarray = field(repr=False)
    """HU of each `Tissue` for this patient."""
    mediastinum: float = 12.0
    """Half-width (mm) of the band of mediastinal fat between the lungs, in front of the heart."""
    wall_seed: int = 0
    """Seeds the chest wall's variation of fat and muscle thickness around the body."""
    arms_down: bool = False
    arm_u: float = 0.0
    """Distance of each arm's centre from the body's midline (mm)."""
    arm_v: float = 0.0
    arm_r: float = 0.0
    humerus_r: float = 0.0

    def h(self, z):
        return (z - self.z_base) / self.lung_length

    def z(self, h):
        return self.z_base + h * self.lung_length

    # Where the mediastinal landmarks are (u, v in mm); used by the renderer and by
    # the vessel and airway trees, which start at the hila.
    @property
    def pulmonary_trunk(self) -> tuple[float, float, float]:
        s = self.scale
        return (18 * s, self.heart_v - 0.55 * self.heart_rv, 0.47)

    @property
    def descending_aorta(self) -> tuple[float, float, float]:
        s = self.scale
        return (24 * s, self.vert_v - 6 * s, 12 * s)


def sample_patient(rng: np.random.Generator, *, fov_mm: float, center_uv: tuple[float, float],
                   z_lo: float, z_hi: float, body_fill: tuple[float, float]) -> Patient:
    """A random patient that fits a field of view of ``fov_mm`` and a scan from z_lo to z_hi."""
    # Most chest CTs are taken with the arms above the head (outside the field of
    # view); some with the arms down beside the chest, and then the field of view is
    # chosen wide enough for them (the trunk fills less of it).
    arms_down = bool(rng.random() < 0.15)
    width = fov_mm * (rng.uniform(0.6, 0.72) if arms_down else rng.uniform(*body_fill))
    a = width / 2
    s = a / 170.0
    depth_ratio = rng.uniform(0.62, 0.74)
    depth = width * depth_ratio
    b_ant = depth * rng.uniform(0.52, 0.56)
    b_post = depth - b_ant
    extent = z_hi - z_lo
    # Lung length: a real adult's ~250 mm scaled with the patient, but never more than
    # the scan can hold with margins for the apices and the upper abdomen.
    length = min(rng.uniform(230, 270) * max(s, 0.45), extent * rng.uniform(0.74, 0.84))
    below = (extent - length) * rng.uniform(0.35, 0.7)
    z_base = z_lo + below
    # Subcutaneous fat: most patients 5-15 mm, a few obese ones up to ~30 mm (skewed draw).
    fat = (3 + 24 * rng.random() ** 1.6) * s
    muscle = rng.uniform(8, 15) * s
    rib_band = rng.uniform(5.5, 7.5) * s
    contrast = bool(rng.random() < 0.2)
    hu = np.zeros(N_TISSUES, dtype=np.float32)
    T = Tissue
    hu[T.AIR] = -1000
    hu[T.TABLE] = rng.uniform(200, 550)
    hu[T.PAD] = rng.uniform(-900, -650)
    hu[T.TABLE_FOAM] = rng.uniform(-960, -900)
    hu[T.SKIN] = rng.uniform(20, 50)
    hu[T.FAT] = rng.uniform(-115, -85)
    hu[T.MED_FAT] = hu[T.FAT] + rng.uniform(-5, 15)
    hu[T.MUSCLE] = rng.uniform(35, 60)
    hu[T.CORTEX] = rng.uniform(650, 1100)
    hu[T.MARROW] = rng.uniform(170, 300)
    hu[T.CARTILAGE] = rng.uniform(90, 150)
    # Healthy lungs at full inspiration: about -900 to -840 HU away from vessels.
    lung_mu = rng.uniform(-905, -845)
    hu[T.LUNG] = lung_mu
    blood = rng.uniform(180, 320) if contrast else rng.uniform(35, 50)
    hu[T.HEART] = blood
    hu[T.BLOOD] = blood
    hu[T.VESSEL] = blood
    hu[T.AIRWAY] = -1000
    hu[T.AIRWAY_WALL] = rng.uniform(10, 60)
    hu[T.LIVER] = rng.uniform(50, 70) + (40 if contrast else 0)
    hu[T.SPLEEN] = rng.uniform(40, 55) + (50 if contrast else 0)
    hu[T.STOMACH] = rng.uniform(10, 35)
    hu[T.GAS] = -1000
    hu[T.DISC] = rng.uniform(70, 100)
    hu[T.CSF] = rng.uniform(5, 20)
    hu[T.NODULE] = 40
    hu[T.PADDING] = -1000
    hu[T.GLAND] = rng.uniform(-40, 20)
    vert_rv = rng.uniform(16, 19) * s
    patient = Patient(
        cx=center_uv[0],
        cy=center_uv[1],
        half_width=a,
        b_ant=b_ant,
        b_post=b_post,
        exponent=rng.uniform(2.0, 2.4),
        scale=s,
        z_base=z_base,
        lung_length=length,
        fat=fat,
        muscle=muscle,
        rib_band=rib_band,
        table_v=b_post * rng.uniform(0.88, 0.95),
        table_curvature=1.0 / (2 * rng.uniform(500, 1200)),
        table_shell=rng.uniform(1.5, 3.5),
        table_core=rng.uniform(18, 40),
        pad=float(rng.uniform(15, 60)) if rng.random() < 0.6 else 0.0,
        rib_z0=z_base - 0.07 * length,
        rib_pitch=length * rng.uniform(0.085, 0.095),
        # Ribs run down steeply from the spine to the front: an axial slice cuts the
        # side ribs as short bars a few cm long, not long arcs.
        rib_drop=length * rng.uniform(0.4, 0.5),
        rib_height=length * rng.uniform(0.036, 0.046),
        vert_v=b_post - rng.uniform(68, 80) * s - vert_rv,
        vert_ru=rng.uniform(19, 23) * s,
        vert_rv=vert_rv,
        vert_pitch=length * rng.uniform(0.1, 0.12),
        vert_z0=rng.uniform(0, 30),
        heart_u=rng.uniform(12, 24) * s,
        heart_v=-b_ant * rng.uniform(0.18, 0.28),
        heart_h=rng.uniform(0.22, 0.3),
        heart_ru=rng.uniform(55, 68) * s,
        heart_rv=rng.uniform(42, 52) * s,
        heart_rh=rng.uniform(0.2, 0.26),
        dome_right=rng.uniform(0.24, 0.32),
        dome_left=rng.uniform(0.18, 0.26),
        carina_h=rng.uniform(0.6, 0.66),
        trachea_v=0.0,  # set below: in front of the oesophagus, in front of the spine
        trachea_r=rng.uniform(8, 10) * s,
        lung_mu=lung_mu,
        lung_gravity=rng.uniform(15, 45),
        lung_texture=rng.uniform(5, 12),
        emphysema=float(rng.uniform(0.02, 0.12)) if rng.random() < 0.2 else 0.0,
        breasts=bool(rng.random() < 0.35),
        contrast=contrast,
        hu=hu,
    )
    patient.wall_seed = int(rng.integers(1 << 30))
    patient.mediastinum = float(rng.uniform(6, 13) * s)
    if arms_down:
        patient.arms_down = True
        # Arms are adult-sized even on a slim trunk, and rest against its sides.
        patient.arm_r = float(rng.uniform(36, 46) * np.clip(s, 0.8, 1.1))
        patient.arm_u = float(a + rng.uniform(-10, 3) + patient.arm_r)
        patient.arm_v = float(b_post * rng.uniform(0.0, 0.35))
        patient.humerus_r = float(rng.uniform(10, 13) * s)
    patient.trachea_v = patient.vert_v - patient.vert_rv - 1.6 * patient.trachea_r - 6 * s
    return patient


class SmoothNoise:
    """Band-limited 3D noise of unit variance, evaluated one slice at a time.

    White noise on a coarse grid (cell ``cell_mm``) is interpolated with cubic
    B-splines; the separable weights make a slice a few small matrix products.
    """

    def __init__(self, rng: np.random.Generator, axes: tuple[np.ndarray, np.ndarray, np.ndarray], cell_mm: float):
        self.weights = []
        for coords in axes:
            lo, hi = float(coords.min()), float(coords.max())
            n = int(np.ceil((hi - lo) / cell_mm)) + 4
            t = (coords - lo) / cell_mm + 1.5
            j = np.arange(n)
            w = _bspline3(t[:, None] - j[None, :]).astype(np.float32)
            # Interpolation lowers the variance; undo it on average.
            w /= np.sqrt(np.mean(np.sum(w * w, axis=1)))
            self.weights.append(w)
        wz, wy, wx = self.weights
        self.coarse = rng.standard_normal((wz.shape[1], wy.shape[1], wx.shape[1]), dtype=np.float32)
        self._planes: dict[int, np.ndarray] = {}

    def slice(self, k: int) -> np.ndarray:
        wz, wy, wx = self.weights
        cols = np.nonzero(wz[k])[0]
        out = None
        for c in cols:
            plane = self._planes.get(c)
            if plane is None:
                plane = wy @ self.coarse[c] @ wx.T
                self._planes[c] = plane
            out = plane * wz[k, c] if out is None else out + plane * wz[k, c]
        for c in list(self._planes):
            if c < cols.min():
                del self._planes[c]
        return out


def _bspline3(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, 2 / 3 - x**2 + x**3 / 2, np.where(x < 2, (2 - x) ** 3 / 6, 0.0))


def render_anatomy(p: Patient, axes: tuple[np.ndarray, np.ndarray, np.ndarray], fov_center: tuple[float, float],
                   fov_radius: float, rng: np.random.Generator, *, z_sub: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """HU (float32, before blur and noise) and `Tissue` labels (uint8) on the grid ``axes`` = (Z, Y, X).

    Partial volume along z: each slice is the mean of ``z_sub`` (odd) thin sections
    spread evenly across its thickness (the slice spacing), as a detector row
    integrates over its width; the diaphragm's dome, the apices and the ribs, which
    run nearly parallel to the slices, come out as the grey mixtures a thick slice
    shows rather than as steps. Labels are those of the middle section.
    """
    Z, Y, X = axes
    frame = _Frame(p, X, Y, fov_center, fov_radius)
    rows, cols = frame.box
    nz, ny, nx = len(Z), len(Y), len(X)
    hu = np.empty((nz, ny, nx), dtype=np.float32)
    label = np.empty((nz, ny, nx), dtype=np.uint8)
    box_axes = (Z, Y[rows], X[cols])
    fine = SmoothNoise(rng, box_axes, 3.0)
    coarse = SmoothNoise(rng, box_axes, 10.0)
    blotch = SmoothNoise(rng, box_axes, 7.0) if p.emphysema > 0 else None
    z_sub = max(1, int(z_sub) | 1)
    dz = abs(float(Z[1] - Z[0])) if nz > 1 else 1.0
    offsets = ((np.arange(z_sub) + 0.5) / z_sub - 0.5) * dz
    renderer = frame.renderer
    for k, z in enumerate(Z):
        tex = None
        total = None
        for j, off in enumerate(offsets):
            lab = frame.labels(float(z + off))
            h = p.hu[lab]
            inner = lab[rows, cols]
            lung = inner == Tissue.LUNG
            if lung.any():
                if tex is None:
                    tex = fine.slice(k) * (0.6 * p.lung_texture) + coarse.slice(k) * (0.8 * p.lung_texture)
                    tex += renderer.lung_gradient
                    if blotch is not None:
                        # Emphysema: holes of near-air density where a smooth field is high.
                        b = blotch.slice(k)
                        tex = np.where(b > 2.2 - 8 * p.emphysema, -1000 - p.lung_mu + 40 * (b - 2), tex)
                    tex += renderer.fissures(float(z))
                h[rows, cols] = np.where(lung, h[rows, cols] + tex, h[rows, cols])
            total = h if total is None else total + h
            if j == z_sub // 2:
                label[k] = lab
        hu[k] = total / z_sub if z_sub > 1 else total
    return hu, label


def render_labels(p: Patient, axes: tuple[np.ndarray, np.ndarray, np.ndarray], fov_center: tuple[float, float],
                  fov_radius: float) -> np.ndarray:
    """`Tissue` labels (uint8) alone on the grid ``axes`` = (Z, Y, X): where the lungs are, on a coarse grid."""
    Z, Y, X = axes
    frame = _Frame(p, X, Y, fov_center, fov_radius)
    out = np.empty((len(Z), len(Y), len(X)), dtype=np.uint8)
    for k, z in enumerate(Z):
        out[k] = frame.labels(float(z))
    return out


class _Frame:
    """A whole slice: the table and the field of view, which do not change along z, and the
    body's box, the only part `_SliceRenderer` evaluates (about half of a 512x512 slice)."""

    def __init__(self, p: Patient, X: np.ndarray, Y: np.ndarray, fov_center, fov_radius):
        U = (X - p.cx)[None, :]
        V = (Y - p.cy)[:, None]
        table_top = p.table_v - p.table_curvature * U**2
        tv = V - table_top
        self.base = np.full((len(Y), len(X)), Tissue.AIR, dtype=np.uint8)
        # The patient lies on a mattress (when there is one) on a carbon-fibre shell around foam.
        pad = (tv > 0) & (tv <= p.pad) & (np.abs(U) < 250)
        self.base[pad] = Tissue.PAD
        tv = tv - p.pad
        table = (tv > 0) & (tv < 2 * p.table_shell + p.table_core) & (np.abs(U) < 230)
        self.base[table] = Tissue.TABLE
        self.base[table & (tv > p.table_shell) & (tv < p.table_shell + p.table_core)] = Tissue.TABLE_FOAM
        self.fov = (X[None, :] - fov_center[0]) ** 2 + (Y[:, None] - fov_center[1]) ** 2 <= fov_radius**2
        u_reach, v_front, v_back = body_extent(p)
        self.box = (_index_range(Y - p.cy, v_front, v_back), _index_range(X - p.cx, -u_reach, u_reach))
        rows, cols = self.box
        self.renderer = _SliceRenderer(p, X[cols], Y[rows])

    def labels(self, z: float) -> np.ndarray:
        lab = self.base.copy()
        rows, cols = self.box
        inner = self.renderer.labels(z)
        window = lab[rows, cols]
        np.copyto(window, inner, where=inner != Tissue.AIR)
        lab[~self.fov] = Tissue.PADDING
        return lab


def body_extent(p: Patient) -> tuple[float, float, float]:
    """How far the body reaches from its centre at any height (mm): sideways (arms included), to the front, to the back."""
    s = p.scale
    u = p.half_width * 1.03 + 2.0
    if p.arms_down:
        u = max(u, abs(p.arm_u) + p.arm_r + 2.0)
    front = -(p.b_ant * 1.07 + (28 * s if p.breasts else 0.0) + 2.0)
    back = p.table_v + 1.0
    return u, front, back


def _index_range(coords: np.ndarray, lo: float, hi: float) -> slice:
    """The slice of indices whose coordinate lies in [lo, hi] (coordinates ascending or descending)."""
    inside = np.nonzero((coords >= lo) & (coords <= hi))[0]
    if len(inside) == 0:
        return slice(0, 0)
    return slice(int(inside.min()), int(inside.max()) + 1)


class _SliceRenderer:
    """The body of one patient, evaluated one axial slice at a time on a fixed in-plane grid."""

    def __init__(self, p: Patient, X: np.ndarray, Y: np.ndarray):
        self.p = p
        s = p.scale
        U = (X - p.cx).astype(np.float32)[None, :]
        V = (Y - p.cy).astype(np.float32)[:, None]
        self.U, self.V = U, V
        rho = np.hypot(U, V) + 1e-3
        self.rho = rho
        sin_t = V / rho
        cos_t = U / rho
        self.post = V > 0
        pe = p.exponent
        self.ac = np.abs(cos_t) ** pe
        self.as_ = np.abs(sin_t) ** pe
        self.gphi = (np.arccos(np.clip(sin_t, -1, 1)) / np.pi).astype(np.float32)
        self.gphi_drop = self.gphi**1.15
        # Fat and muscle thickness vary around the body (no two patients alike): a few
        # random harmonics of the angle, seeded by the patient.
        theta = np.arctan2(V, U)
        self.fat_map = (0.7 + 0.6 * np.abs(cos_t)) * _harmonics(p.wall_seed, theta, 0.3)
        self.muscle_map = _harmonics(p.wall_seed + 1, theta, 0.25)
        self.plane_map = _harmonics(p.wall_seed + 2, theta, 1.0) > 1.0
        self.ant_map = np.maximum(0, -sin_t)
        self.post_map = np.maximum(0, sin_t) ** 10
        self.table_top = p.table_v - p.table_curvature * U**2
        L = p.lung_length
        # Diaphragm: one dome per side, lowest at the back and sides (the recesses).
        right = 1 / (1 + np.exp(U / (10 * s)))  # 1 on the patient's right (u < 0)
        dome = right * p.dome_right + (1 - right) * p.dome_left
        ud = np.where(U < 0, -0.4, 0.42) * p.half_width
        vd = -0.05 * p.b_post
        # Falls steeply towards the side and the back (the recesses), gently towards the heart.
        lateral = np.abs(U) > np.abs(ud)
        ru = np.where(lateral, 0.55, 1.1) * p.half_width
        r2 = ((U - ud) / ru) ** 2 + ((V - vd) / (0.9 * np.where(V > vd, p.b_post, p.b_ant))) ** 2
        self.z_diaphragm = p.z(dome - 0.34 * r2 - 0.05 * np.maximum(0, -V / p.b_ant))
        # Apices: domes above each lung, highest a little behind the middle.
        ua = np.sign(U) * 0.42 * p.half_width
        ra = ((U - ua) / (0.42 * p.half_width)) ** 2 + ((V - 0.15 * p.b_post) / (0.75 * p.b_post)) ** 2
        # The top of the lung falls gently away from the apex: the front of the upper
        # lobes still reaches the level of the clavicles (h ~ 0.75).
        self.z_apex = p.z(1.0 - 0.17 * ra - 0.05 * (np.abs(U) < 0.2 * p.half_width))
        # Lungs are denser at the back (gravity), as in a supine patient.
        self.lung_gradient = (p.lung_gravity * np.clip(V / p.b_post, -1, 1)).astype(np.float32)
        # Oblique fissures: run from high at the back to low at the front; the right
        # lung also has a horizontal one.
        self.fissure_h = 0.45 + 0.33 * np.clip(V / p.b_post, -1.5, 1) + 0.12 * np.abs(U) / p.half_width
        self.fissure_norm = np.sqrt(1 + (0.33 * L / p.b_post) ** 2 + (0.12 * L / p.half_width) ** 2)
        self.right = U < 0
        self.trachea_v = p.trachea_v
        self.u1, self.v1 = U[0], V[:, 0]

    def _window(self, cu: float, cv: float, ru: float, rv: float | None = None) -> tuple[slice, slice]:
        """Rows and columns of the box reaching ``ru`` sideways and ``rv`` front-back from (cu, cv) (mm)."""
        rv = ru if rv is None else rv
        return _index_range(self.v1, cv - rv, cv + rv), _index_range(self.u1, cu - ru, cu + ru)

    def fissures(self, z: float) -> np.ndarray:
        p = self.p
        h = p.h(z)
        # Distance (mm) from the oblique fissure plane, measured perpendicular to it.
        d = (h - self.fissure_h) * p.lung_length / self.fissure_norm
        out = 180 * np.clip(1 - np.abs(d) / 1.2, 0, 1)
        hz = abs(h - 0.56) * p.lung_length
        if hz < 1.2:
            horiz = self.right & (self.fissure_h < 0.56) & (self.V < 0.3 * p.b_post)
            out = np.where(horiz, np.maximum(out, 180 * (1 - hz / 1.2)), out)
        return out

    def labels(self, z: float) -> np.ndarray:
        p, T = self.p, Tissue
        s = p.scale
        U, V = self.U, self.V
        h = p.h(z)
        # --- body outline (a superellipse, flattened on the table) -------------------
        a = p.half_width * (1 - 0.22 * _smoothstep(0.95, 1.35, h) + 0.02 * np.sin(6.0 * h))
        b_ant = p.b_ant * (1 - 0.12 * _smoothstep(0.75, 1.3, h) + 0.06 * _smoothstep(0.15, -0.3, h))
        b_post = p.b_post * (1 - 0.08 * _smoothstep(0.95, 1.35, h))
        pe = p.exponent
        inv_b = np.where(self.post, b_post**-pe, b_ant**-pe)
        radius = (self.ac * a**-pe + self.as_ * inv_b) ** (-1 / pe)
        depth = np.minimum(radius - self.rho, self.table_top - V)
        if p.breasts and 0.25 < h < 0.8:
            hb = 1 - ((h - 0.5) / 0.28) ** 2
            for side in (-1, 1):
                bu = side * 0.45 * a
                bump = 28 * s * hb * np.exp(-((U - bu) ** 2) / (2 * (0.2 * a) ** 2))
                depth = np.where(V < 0, np.maximum(depth, depth + bump * np.clip(-V / b_ant, 0, 1) ** 2), depth)
        body = depth > 0
        lab = np.full(depth.shape, T.AIR, dtype=np.uint8)
        # --- body wall ---------------------------------------------------------------
        skin = 1.8
        abd = 1 + 0.5 * _smoothstep(0.25, -0.25, h)
        fat = p.fat * self.fat_map * abd
        muscle = p.muscle * self.muscle_map * (1 + 1.2 * self.ant_map * _smoothstep(0.45, 0.8, h) + 3.2 * self.post_map)
        r0 = skin + fat + muscle
        r1 = r0 + p.rib_band
        lab[body] = T.MUSCLE
        # A fat plane between the superficial and deep muscles of the chest wall.
        plane = np.abs(depth - (skin + fat + 0.45 * muscle)) < 0.9 + 0.08 * muscle
        lab[body & plane & self.plane_map & (self.ant_map < 0.9) & (h > 0.2)] = T.FAT
        lab[body & (depth < skin + fat)] = T.FAT
        lab[body & (depth < skin)] = T.SKIN
        if p.breasts and 0.25 < h < 0.8:
            gland = body & (V < -0.5 * b_ant) & (depth > skin + 0.4 * fat) & (depth < skin + fat) & (np.abs(U) > 0.2 * a)
            lab[gland] = T.GLAND
        # Ribs: oblique bars in the band just outside the pleura, dropping towards the front
        # (evaluated on the band's voxels only: a few percent of the slice).
        band = np.nonzero(body & (depth > r0) & (depth < r1))
        gphi = self.gphi[band]
        phase = (z - p.rib_z0 + p.rib_drop * self.gphi_drop[band]) / p.rib_pitch
        k = np.floor(phase)
        frac = (phase - k) * (p.rib_pitch / p.rib_height)
        rib_end = np.where(k >= 5, 0.97, 0.62 + 0.07 * k)
        rb = (depth[band] - r0[band]) / p.rib_band
        e = (2 * rb - 1) ** 2 + (2 * frac - 1) ** 2
        rib = (frac < 1) & (k >= 0) & (k < 12) & (gphi > 0.03) & (gphi < rib_end) & (e < 1)
        if rib.any():
            where = (band[0][rib], band[1][rib])
            lab[where] = np.where(e[rib] > 0.45, T.CORTEX, T.MARROW)
            cart = gphi[rib] > 0.8
            lab[where[0][cart], where[1][cart]] = T.CARTILAGE
        # Scapulae: thin plates in the back muscles of the upper chest.
        if 0.5 < h < 1.08:
            width = 0.22 * _smoothstep(0.5, 0.8, h)
            scap = body & (np.abs(self.gphi - 0.3) < width) & (np.abs(depth - (r0 - 0.35 * muscle - 4 * s)) < 2.5 * s)
            scap &= V > 0
            lab[scap] = T.CORTEX
        # Sternum: a flat bone at the front, between the rib cartilages.
        if 0.3 < h < 1.0:
            half = (15 + 12 * _smoothstep(0.8, 0.95, h)) * s
            w = (_index_range(self.v1, -np.inf, 0.0), _index_range(self.u1, -half, half))
            sr = (depth[w] - r0[w] + 2 * s) / (p.rib_band + 3 * s)
            e = (2 * sr - 1) ** 2 + (U[:, w[1]] / half) ** 2
            stern = body[w] & (e < 1)
            lab[w][stern] = np.where(e[stern] > 0.5, T.CORTEX, T.MARROW)
        # --- thoracic cavity ---------------------------------------------------------
        cavity = depth > r1
        below = cavity & (z < self.z_diaphragm)
        lab[cavity] = T.MED_FAT
        # Mediastinum: a union of simple shapes; the lungs fill the rest of the cavity.
        # Only the sign of ``med`` matters, so each shape updates it in its own box.
        med = np.abs(U - 4 * s) - p.mediastinum - 8 * _smoothstep(0.75, 1.0, h) * s
        med = np.broadcast_to(med, depth.shape).copy()
        wv = self._window(0.0, p.vert_v, 1.1 * p.vert_ru + 1, 1.1 * p.vert_rv + 1)
        vb = np.hypot(U[:, wv[1]] / p.vert_ru, (V[wv[0]] - p.vert_v) / p.vert_rv)
        med[wv] = np.minimum(med[wv], (vb - 1.1) * p.vert_rv)
        dh = (h - p.heart_h) / p.heart_rh
        heart = None
        if abs(dh) < 1:
            f = np.sqrt(1 - dh * dh)
            ru, rv = p.heart_ru * f, p.heart_rv * f
            heart = np.hypot((U - p.heart_u) / ru, (V - p.heart_v) / rv)
            med = np.minimum(med, (heart - 1) * min(ru, rv) - 4 * s)
        circles = self._vessel_circles(h)
        for (cu, cv, r, _) in circles:
            w = self._window(cu, cv, r + 3 * s + 1)
            med[w] = np.minimum(med[w], np.hypot(U[:, w[1]] - cu, V[w[0]] - cv) - r - 3 * s)
        tr_v, tr_r = self.trachea_v, p.trachea_r
        if h > p.carina_h:
            w = self._window(0.0, tr_v, tr_r + 4 * s + 1)
            med[w] = np.minimum(med[w], np.hypot(U[:, w[1]], V[w[0]] - tr_v) - tr_r - 4 * s)
        lung = cavity & (med > 0) & (z > self.z_diaphragm) & (z < self.z_apex)
        lab[lung] = T.LUNG
        # Upper abdomen under the diaphragm.
        if below.any():
            lab[below] = T.FAT
            liver = below & (U < 0.2 * p.half_width - 0.4 * V)
            lab[liver] = T.LIVER
            stom = below & (np.hypot((U - 0.32 * p.half_width) / (0.28 * p.half_width), (V + 0.3 * p.b_ant) / (0.35 * p.b_ant)) < 1)
            lab[stom] = T.STOMACH
            # Supine: gas rises to the front of the stomach above a flat fluid level.
            gas = stom & (V < -0.3 * p.b_ant - 0.55 * 0.35 * p.b_ant) & (self.z_diaphragm - z < 30 * s)
            lab[gas] = T.GAS
            spleen = below & (np.hypot((U - 0.55 * p.half_width) / (0.2 * p.half_width), (V - 0.4 * p.b_post) / (0.35 * p.b_post)) < 1)
            lab[spleen] = T.SPLEEN
        # Heart with its fat pad, great vessels, trachea, oesophagus.
        if heart is not None:
            inside = cavity & (heart < 1)
            lab[cavity & (heart < 1.08) & ~lung] = T.MED_FAT
            lab[inside & (heart < 0.93)] = T.MUSCLE  # myocardium
            lab[inside & (heart < 0.8)] = T.HEART  # blood in the chambers
        for (cu, cv, r, tissue) in circles:
            w = self._window(cu, cv, r + 1)
            lab[w][cavity[w] & (np.hypot(U[:, w[1]] - cu, V[w[0]] - cv) < r)] = tissue
        if h > p.carina_h:
            w = self._window(0.0, tr_v, tr_r + 1.6 * s + 1.6)
            d = np.hypot(U[:, w[1]], V[w[0]] - tr_v)
            lab[w][d < tr_r + 1.6 * s + 0.6] = T.AIRWAY_WALL
            lab[w][d < tr_r] = T.AIRWAY
        eso_v = p.vert_v - p.vert_rv - 5 * s
        w = self._window(6 * s, eso_v, 6 * s + 1)
        eso = np.hypot(U[:, w[1]] - 6 * s, V[w[0]] - eso_v) < 6 * s
        lab[w][eso & (cavity[w] | (h > 0.9))] = T.MUSCLE
        # --- spine -------------------------------------------------------------------
        disc = ((z - p.vert_z0) / p.vert_pitch) % 1.0 < 0.22
        lab[wv][vb < 1] = T.DISC if disc else T.MARROW
        if not disc:
            lab[wv][(vb < 1) & (vb > 0.86)] = T.CORTEX
        canal_v = p.vert_v + p.vert_rv + 9 * s
        w = self._window(0.0, canal_v, 13.5 * s + 1)
        canal = np.hypot(U[:, w[1]], V[w[0]] - canal_v)
        lab[w][(canal < 13.5 * s) & (canal > 8.5 * s)] = T.CORTEX
        lab[w][canal < 8.5 * s] = T.CSF
        if not disc:
            w = (_index_range(self.v1, canal_v - 4 * s, canal_v + 38 * s), _index_range(self.u1, -30 * s, 30 * s))
            Uw, Vw = np.abs(U[:, w[1]]), V[w[0]] - canal_v
            spinous = (Uw < 3 * s) & (Vw > 11 * s) & (Vw < 38 * s)
            spinous &= Uw < 3 * s * (1.3 - Vw / (40 * s))
            # Transverse processes point backwards and outwards at ~25 degrees.
            tv = Vw - 0.45 * (Uw - 8 * s)
            transverse = (np.abs(tv) < 3.2 * s) & (Uw > 9 * s) & (Uw < 30 * s)
            lab[w][spinous | transverse] = T.CORTEX
        lab[~body] = T.AIR
        if p.arms_down:
            self._arms(lab, h)
        return lab

    def _arms(self, lab: np.ndarray, h: float) -> None:
        """Arms down beside the chest: skin, fat and muscle around the humerus, outside the trunk."""
        p, T = self.p, Tissue
        if not -0.6 < h < 1.25:
            return
        for side in (-1, 1):
            du = self.U - side * p.arm_u
            dv = self.V - p.arm_v
            r = np.hypot(du / p.arm_r, dv / (1.15 * p.arm_r))
            arm = (r < 1) & (lab == T.AIR)
            if not arm.any():
                continue
            lab[arm] = T.MUSCLE
            lab[arm & (r > 1 - (1.5 + 0.6 * p.fat) / p.arm_r)] = T.FAT
            lab[arm & (r > 1 - 1.5 / p.arm_r)] = T.SKIN
            bone = np.hypot(du - side * 0.1 * p.arm_r, dv) / p.humerus_r
            lab[arm & (bone < 1)] = T.CORTEX
            lab[arm & (bone < 0.7)] = T.MARROW

    def _vessel_circles(self, h: float) -> list[tuple[float, float, float, int]]:
        """Great vessels in this slice: (u, v, radius, tissue)."""
        p, T = self.p, Tissue
        s = p.scale
        out = []
        du, dv, dr = p.descending_aorta
        top = 0.7
        if h < top:
            out.append((du * (1 - 0.7 * _smoothstep(0.2, -0.2, h)), dv - 8 * s * _smoothstep(0.2, -0.2, h), dr, T.BLOOD))
        asc_u, asc_v, asc_r = -14 * s, p.heart_v - 0.3 * p.heart_rv, 15 * s
        if p.heart_h + 0.45 * p.heart_rh < h < top:
            out.append((asc_u, asc_v, asc_r, T.BLOOD))
        if top - 0.05 < h < top + 0.04:
            # The aortic arch: a sausage from the ascending to the descending aorta.
            for t in np.linspace(0, 1, 7):
                out.append((asc_u + t * (du - asc_u), asc_v + t * (dv - asc_v), 13 * s, T.BLOOD))
        tu, tv, th = p.pulmonary_trunk
        if th - 0.08 < h < th + 0.05:
            out.append((tu, tv, 14 * s, T.BLOOD))
        if 0.45 < h:
            out.append((-32 * s, asc_v + 6 * s, 10 * s, T.BLOOD))  # superior vena cava
        if h > top + 0.02:
            for (bu, bv, br) in ((-14 * s, self.trachea_v - 18 * s, 7 * s), (10 * s, self.trachea_v - 20 * s, 6 * s),
                                 (22 * s, self.trachea_v - 4 * s, 6 * s)):
                out.append((bu, bv, br, T.BLOOD))
        return out
