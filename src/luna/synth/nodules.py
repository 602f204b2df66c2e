"""Nodules and other focal findings: what they are (size, type, LIDC-like ratings) and how they look.

Diameters follow the real LUNA16 distribution (`DIAMETER_QUANTILES`, taken from the
1,186 nodules of ``annotations.csv``). LIDC readers rated malignancy 1-5; here a
nodule's latent score rises with size, spiculation and lobulation (part-solid up,
calcified down), each reader adds their own noise, and ``mal_bool`` follows the
LUNA16 rule (>= 2 ratings >= 4).

The constants (`READER_MODEL`) were fitted to the 1,182 rated nodules of the real
``annotations_with_malignancy.csv``, on three of its statistics (`rating_statistics`):
- the share of malignant nodules per size band (real: 3-6 mm 4 %, 6-8 mm 16 %,
  8-10 mm 54 %, 10-15 mm 81 %, > 15 mm 94 %);
- the readers' disagreement: variance of the ratings of one nodule, 0.75;
- what the readers agree on beyond size: the variance of a nodule's mean rating
  around a cubic fit on log diameter, less the readers' share, 0.26.
LIDC readers saw nothing but the CT, so what they agree on beyond size is something
they saw: here it is mostly the rendered shape (spiculation, lobulation, a solid or
calcified core) and only a little (`READER_MODEL.hidden_sd`) is not in the image.
Measured on 6,000 sampled nodules (``diameter`` the annotated size): ROC AUC of the
diameter for ``mal_bool`` 0.93 (real: 0.92); of the visible latent score, the best a
model that sees the nodule perfectly could do, 0.96. An earlier model here drew the
readers' shared judgement at random (sd 0.5) and gave readers too little
disagreement (0.44): its visible score reached only diameter + 0.01, so no image
model could beat size.

Shapes: an ellipsoid body with lobes (lobulation) and tapering spicules
(spiculation); ground-glass nodules are faint with a soft edge, part-solid ones a
ground-glass halo around a solid core; some benign nodules are calcified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from luna.metrics import roc_auc
from luna.synth.anatomy import Tissue
from luna.synth.vessels import Grid, rasterize_tubes

__all__ = ["Finding", "NODULE_TYPES", "DIAMETER_QUANTILES", "LUNA16_MALIGNANT_SHARE", "READER_MODEL", "ReaderModel",
           "SIZE_BANDS_MM",
           "rating_statistics", "sample_findings", "render_finding", "rate_malignancy"]

# Percentiles 0, 2.5, ..., 100 of diameter_mm in the real LUNA16 annotations.csv.
DIAMETER_QUANTILES = (
    3.25, 3.88, 4.09, 4.28, 4.4, 4.52, 4.67, 4.79, 4.9, 4.99, 5.11, 5.23, 5.31, 5.5, 5.63, 5.74, 5.9, 6.0, 6.17,
    6.31, 6.43, 6.66, 6.87, 7.05, 7.3, 7.72, 7.92, 8.28, 8.72, 9.22, 9.7, 10.33, 11.07, 12.06, 12.86, 14.0, 15.48,
    17.24, 18.95, 21.85, 32.27,
)

NODULE_TYPES = ("solid", "part-solid", "ground-glass", "juxta-pleural", "juxta-vascular")
# About as in LIDC: a quarter of nodules touch the pleura, one in seven sits on a vessel.
_TYPE_WEIGHTS = (0.42, 0.1, 0.12, 0.22, 0.14)
NON_NODULE_TYPE = "calcified-granuloma"


@dataclass
class Finding:
    finding_id: int
    kind: str
    """"nodule" or "non-nodule" (a calcified granuloma: LIDC's non-nodule finding)."""
    type: str
    diameter_mm: float
    excluded: bool
    """True for nodules < 3 mm and non-nodules: annotations_excluded.csv."""
    spiculation: int = 1
    lobulation: int = 1
    calcified: bool = False
    ratings: tuple[int, ...] = ()
    malignant: bool = False
    center_xyz: np.ndarray | None = None
    pleura_distance_mm: float = float("nan")
    wall_overlap: float = 0.0
    """Share of the nodule's sphere that lies outside the lung (chest wall, mediastinum)."""
    vessel_contact: bool = False
    shape: dict = field(default_factory=dict, repr=False)

    @property
    def radius(self) -> float:
        return self.diameter_mm / 2


def sample_diameter(rng: np.random.Generator, max_mm: float) -> float:
    """A diameter from the real LUNA16 distribution (log-linear between percentiles)."""
    q = np.log(DIAMETER_QUANTILES)
    for _ in range(100):
        u = rng.random() * (len(q) - 1)
        i = int(u)
        d = float(np.exp(q[i] + (u - i) * (q[i + 1] - q[i])))
        if d <= max_mm:
            return d
    return float(min(max_mm, DIAMETER_QUANTILES[len(q) // 2]))


@dataclass(frozen=True)
class ReaderModel:
    """How the synthetic LIDC readers rate malignancy (fitted as the module docstring says)."""

    base: float = 1.2
    size_gain: float = 1.27
    size_slope: float = 1.58
    """latent = base + size_gain * tanh(size_slope * log(diameter / 6 mm)) + the shape terms."""
    per_spiculation: float = 0.6
    per_lobulation: float = 0.4
    part_solid: float = 0.3
    calcified: float = -1.5
    hidden_sd: float = 0.2
    """The nodule's share of the readers' judgement that is not in the image."""
    reader_sd: float = 1.09
    """Each reader's own noise, before rounding to 1-5."""
    shape_spread: float = 1.2
    """Spread of spiculation and lobulation beyond what the size implies (`sample_findings`)."""

    def visible_score(self, diameter: float, spiculation: int, lobulation: int, kind: str, calcified: bool) -> float:
        """The latent score without its hidden part: what an image model can at best learn."""
        m = self.base + self.size_gain * np.tanh(self.size_slope * np.log(diameter / 6.0))
        m += self.per_spiculation * (spiculation - 1) + self.per_lobulation * (lobulation - 1)
        if kind == "part-solid":
            m += self.part_solid
        if calcified:
            m += self.calcified
        return float(m)


READER_MODEL = ReaderModel()


def rate_malignancy(rng: np.random.Generator, diameter: float, spiculation: int, lobulation: int, kind: str,
                    calcified: bool) -> tuple[tuple[int, ...], bool]:
    """LIDC-like reader ratings (3 or 4 readers, 1-5) and the LUNA16 malignancy flag (`READER_MODEL`)."""
    model = READER_MODEL
    m = model.visible_score(diameter, spiculation, lobulation, kind, calcified) + rng.normal(0, model.hidden_sd)
    readers = 4 if rng.random() < 0.65 else 3
    ratings = tuple(int(v) for v in np.clip(np.rint(m + rng.normal(0, model.reader_sd, readers)), 1, 5))
    return ratings, sum(r >= 4 for r in ratings) >= 2


SIZE_BANDS_MM = ((3.0, 6.0), (6.0, 8.0), (8.0, 10.0), (10.0, 15.0), (15.0, float("inf")))
LUNA16_MALIGNANT_SHARE = (0.044, 0.164, 0.536, 0.812, 0.944)
"""The malignant share per `SIZE_BANDS_MM` in the real ``annotations_with_malignancy.csv`` (`rating_statistics`)."""


def rating_statistics(diameter_mm: Sequence[float], ratings: Sequence[Sequence[int]],
                      malignant: Sequence[bool]) -> dict:
    """The statistics `READER_MODEL` was fitted on, for real or synthetic rated nodules (module docstring).

    ``malignant_share``: per `SIZE_BANDS_MM`; ``reader_variance``: mean variance of one nodule's ratings;
    ``agreed_beyond_size``: variance of a nodule's mean rating around a cubic fit on log diameter, less the
    readers' share of it; ``diameter_auc``: ROC AUC of the diameter for ``malignant``."""
    d = np.asarray(diameter_mm, dtype=np.float64)
    mal = np.asarray(malignant, dtype=bool)
    several = [r for r in ratings if len(r) > 1]
    mean = np.array([np.mean(r) for r in ratings])
    residual = mean - np.polyval(np.polyfit(np.log(d), mean, 3), np.log(d))
    within = float(np.mean([np.var(r, ddof=1) for r in several]))
    readers = float(np.mean([len(r) for r in ratings]))
    return {
        "malignant_share": [float(mal[(d >= lo) & (d < hi)].mean()) for lo, hi in SIZE_BANDS_MM],
        "reader_variance": within,
        "agreed_beyond_size": float(np.var(residual) - within / readers),
        "diameter_auc": roc_auc(mal, d),
    }


def sample_findings(rng: np.random.Generator, n_nodules: int, n_small: int, n_non_nodules: int,
                    max_diameter: float, forced_types: tuple[str, ...] = (),
                    forced_malignancy: tuple[bool, ...] = ()) -> list[Finding]:
    """Findings without positions, largest first (they are the hardest to place).

    ``forced_types`` fixes the types of the first nodules (so that a dataset holds every
    type); ``forced_malignancy`` whether the first nodules are malignant: they get a
    size that makes it likely (10 mm and up, or 4-6 mm) and readers' ratings are drawn
    until the LUNA16 rule agrees (so that a small dataset holds both classes).
    """
    out: list[Finding] = []
    for i in range(max(n_nodules, len(forced_types), len(forced_malignancy))):
        d = sample_diameter(rng, max_diameter)
        want = forced_malignancy[i] if i < len(forced_malignancy) else None
        if want is not None:
            d = float(rng.uniform(min(10.0, 0.8 * max_diameter), max_diameter) if want else rng.uniform(4.0, 6.0))
        kind = forced_types[i] if i < len(forced_types) else str(rng.choice(NODULE_TYPES, p=_TYPE_WEIGHTS))
        if d < 5 and kind in ("part-solid", "ground-glass"):
            if i < len(forced_types):
                d = float(rng.uniform(5.0, min(12.0, max_diameter)))
            else:
                kind = "solid"
        ld = max(0.0, np.log(d / 6.0))
        sub_solid = kind in ("part-solid", "ground-glass")
        spread = READER_MODEL.shape_spread
        spic = int(np.clip(np.rint(0.7 + 2.2 * ld + abs(rng.normal(0, spread))), 1, 5))
        lob = int(np.clip(np.rint(0.8 + 1.8 * ld + abs(rng.normal(0, spread))), 1, 5))
        if sub_solid:
            spic = min(spic, 2)
        calcified = bool(kind == "solid" and d < 12 and rng.random() < 0.08)
        if calcified:
            spic = 1
        if want:
            calcified = False
        ratings, mal = rate_malignancy(rng, d, spic, lob, kind, calcified)
        for _ in range(200):
            if want is None or mal == want:
                break
            ratings, mal = rate_malignancy(rng, d, spic, lob, kind, calcified)
        out.append(Finding(0, "nodule", kind, d, False, spic, lob, calcified, ratings, mal))
    for _ in range(n_small):
        d = float(rng.uniform(1.6, 2.95))
        out.append(Finding(0, "nodule", "solid", d, True, 1, 1, False, (), False))
    for _ in range(n_non_nodules):
        d = float(rng.uniform(3.0, 6.0))
        out.append(Finding(0, "non-nodule", NON_NODULE_TYPE, d, True, 1, 1, True, (), False))
    out.sort(key=lambda f: -f.diameter_mm)
    for i, f in enumerate(out):
        f.finding_id = i
    return out


def design_shape(rng: np.random.Generator, f: Finding) -> None:
    """Random shape and density of a finding (stored in ``f.shape``)."""
    r = f.radius
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    axes = np.array([1.0, rng.uniform(0.85, 1.0), rng.uniform(0.8, 1.0)])
    lobes = []
    for _ in range(max(0, f.lobulation - 1) + int(rng.integers(0, 2))):
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        lobes.append((u * r * rng.uniform(0.45, 0.6), r * rng.uniform(0.4, 0.55)))
    spicules = []
    n_spic = 0 if f.spiculation <= 1 else int((f.spiculation - 1) * 3 + rng.integers(0, 4))
    for _ in range(n_spic):
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        length = r * rng.uniform(0.3, 0.9) * (0.6 + 0.15 * f.spiculation)
        spicules.append((u * 0.7 * r, u * (r + length), max(0.35, 0.16 * r), 0.25))
    if f.kind == "non-nodule":
        hu = rng.uniform(250, 700)
    elif f.type == "ground-glass":
        hu = rng.uniform(-680, -450)
    elif f.type == "part-solid":
        hu = rng.uniform(-650, -450)
    else:
        hu = rng.uniform(0, 60)
    core = None
    if f.type == "part-solid":
        u = rng.normal(size=3)
        core = (u / np.linalg.norm(u) * r * rng.uniform(0, 0.25), r * rng.uniform(0.3, 0.55), rng.uniform(0, 50))
    calc = None
    if f.calcified and f.kind == "nodule":
        calc = (r * rng.uniform(0.3, 0.7), rng.uniform(300, 800))
    f.shape = dict(rotation=q, axes=axes, lobes=lobes, spicules=spicules, hu=hu, core=core, calc=calc,
                   soft=f.type in ("ground-glass", "part-solid"), texture_seed=int(rng.integers(1 << 31)))


def body_reach(f: Finding) -> float:
    """How far (mm) the body and lobes reach from the centre (spicules left out)."""
    r = f.radius
    return r * max([1.0] + [np.linalg.norm(c) / r + rr / r for c, rr in f.shape.get("lobes", [])])


def shape_reach(f: Finding) -> float:
    """How far (mm) the finding's shape reaches from its centre."""
    r = f.radius
    reach = r * max([1.0] + [np.linalg.norm(c) / r + rr / r for c, rr in f.shape.get("lobes", [])])
    for _, tip, _, _ in f.shape.get("spicules", []):
        reach = max(reach, float(np.linalg.norm(tip)) + 0.5)
    return reach


def occupancy(f: Finding, grid: Grid, box: tuple[slice, slice, slice], pv_sigma: float, z_samples: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The finding's occupancy (0..1) in ``box`` of the grid, and that of its solid/calcified core."""
    from scipy.special import erf

    sh = f.shape
    zs, ys, xs = grid.z[box[0]], grid.y[box[1]], grid.x[box[2]]
    c = f.center_xyz
    sigma = pv_sigma * (2.2 if sh["soft"] else 1.0)
    zoff = ((np.arange(z_samples) + 0.5) / z_samples - 0.5) * abs(grid.step(0)) if z_samples > 1 else np.zeros(1)
    body = np.zeros((len(zs), len(ys), len(xs)), np.float32)
    core_occ = None
    rot = sh["rotation"]
    r = f.radius
    for dz in zoff:
        P = np.stack(np.broadcast_arrays(
            (xs - c[0])[None, None, :], (ys - c[1])[None, :, None], (zs + dz - c[2])[:, None, None]), axis=-1)
        local = P @ rot
        q = np.sqrt(np.sum((local / (sh["axes"] * r)) ** 2, axis=-1))
        occ = 0.5 * (1 + erf((1 - q) * r / (np.sqrt(2) * sigma)))
        for center, rr in sh["lobes"]:
            d = np.sqrt(np.sum((P - center) ** 2, axis=-1))
            occ = np.maximum(occ, 0.5 * (1 + erf((rr - d) / (np.sqrt(2) * sigma))))
        body += occ.astype(np.float32)
        inner = None
        if sh["core"] is not None:
            center, rr, _ = sh["core"]
            d = np.sqrt(np.sum((P - center) ** 2, axis=-1))
            inner = 0.5 * (1 + erf((rr - d) / (np.sqrt(2) * pv_sigma)))
        elif sh["calc"] is not None:
            rr, _ = sh["calc"]
            d = np.sqrt(np.sum(P**2, axis=-1))
            inner = 0.5 * (1 + erf((rr - d) / (np.sqrt(2) * pv_sigma)))
        if inner is not None:
            core_occ = inner.astype(np.float32) if core_occ is None else core_occ + inner
    body /= len(zoff)
    if core_occ is not None:
        core_occ /= len(zoff)
    if sh["spicules"]:
        local_grid = Grid(zs, ys, xs)
        sp = np.array([[*(c + a)] for a, _, _, _ in sh["spicules"]])
        tip = np.array([[*(c + b)] for _, b, _, _ in sh["spicules"]])
        r0 = np.array([s[2] for s in sh["spicules"]])
        r1 = np.array([s[3] for s in sh["spicules"]])
        spic = np.zeros_like(body)
        rasterize_tubes(spic, local_grid, sp, tip, r0, r1, pv_sigma=pv_sigma, z_samples=z_samples)
        # Thin spicules are fainter than the body even where they are drawn fully.
        body = np.maximum(body, 0.8 * spic)
    return body, core_occ


def render_finding(hu: np.ndarray, label: np.ndarray, grid: Grid, f: Finding, box, pv_sigma: float,
                   z_samples: int) -> None:
    """Draw ``f`` into ``hu``/``label`` within ``box`` (never darkening what is there)."""
    body, core = occupancy(f, grid, box, pv_sigma, z_samples)
    sub = hu[box]
    sh = f.shape
    target = np.float32(sh["hu"])
    trng = np.random.default_rng(sh["texture_seed"])
    if sh["soft"]:
        # Ground glass is mottled, not uniform.
        target = target + trng.normal(0, 35, body.shape).astype(np.float32)
    else:
        # Solid tissue is not uniform either: a smooth +-20 HU heterogeneity over ~2 mm.
        spacing = np.array([abs(grid.step(0)), abs(grid.step(1)), abs(grid.step(2))])
        field = ndimage.gaussian_filter(trng.standard_normal(body.shape).astype(np.float32), 1.5 / spacing)
        field *= np.float32(20.0 / max(float(field.std()), 1e-6))
        target = target + field
    sub += body * np.maximum(0, target - sub)
    if core is not None:
        core_hu = sh["core"][2] if sh["core"] is not None else sh["calc"][1]
        sub += core * np.maximum(0, np.float32(core_hu) - sub)
        body = np.maximum(body, core)
    lab = label[box]
    lab[body > 0.5] = Tissue.NODULE
