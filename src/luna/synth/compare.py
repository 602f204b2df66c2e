"""Real CT against phantoms, side by side: how far the phantoms are from real scans.

``python -m luna.synth --compare-real PATH... [--preset P] [--seed S] [--scans N] [--out DIR]``
reads each real CT through `luna.io.load_ct` (DICOM folder or image file), generates
``N`` phantoms of the preset in memory (the same scans ``--preset P --seed S`` writes),
measures both with the same code and prints the numbers side by side; ``DIR`` gets
``compare.json`` and ``compare.png`` (real and synthetic slices at the same windows
and the same scale in mm, and maximum intensity projections that show the vessel
trees).

Every statistic is measured from the image alone, with one set of rules for real
and synthetic scans (the phantom's own tissue labels are never used), so a number
that differs is a difference of the images:

- regions: the body is the largest in-plane component above -400 HU (smoothed
  1 mm), holes filled; lungs are the large components below -400 HU inside it,
  their holes (vessels) filled and 2 mm taken off their border; outside the body
  and away from it is air; inside the body and outside the lungs, the smoothed
  image sorts voxels into fat (-200..-40), soft tissue (-20..150) and bone
  (> 250 HU). Histograms are of the unsmoothed HU in each region.
- vessels: lung voxels above -550 HU (smoothed 0.5 px), their share of the lung,
  and per in-plane cross-section (2D component) a calibre of twice its largest
  inscribed radius, with the median calibre by depth in the lung (distance to the
  lung border < 10, 10-25, > 25 mm) to show tapering towards the periphery.
- noise: square tiles of 16 mm wholly inside fat or soft tissue, a quadratic trend
  removed; the median standard deviation, and from the Hann-windowed tiles the
  noise power spectrum (NPS): its mean and peak frequency (cycles/mm) and the
  autocorrelation at 1 mm. White noise has a flat NPS (mean frequency near
  Nyquist x 0.6); CT's filtered back projection gives a band-pass NPS.
- edges: profiles of the unsmoothed HU across the lung border into the chest wall
  (normals from the smoothed lung mask, sampled every 0.1 mm), each aligned at
  its own half-way crossing and averaged; the 10-90 % rise distance in mm.

On a real slab the measured vessels include anything solid in the lung (the
nodule of LIDC-IDRI-0001 among them); on phantoms too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from luna.fileio import replacing, write_atomic

__all__ = ["ImageStats", "measure", "measure_regions", "compare_real", "format_comparison", "CALIBRE_BINS_MM"]

CALIBRE_BINS_MM = (0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0, math.inf)
"""Bins of the vessel calibre histogram (mm)."""
REGIONS = ("parenchyma", "vessel", "soft_tissue", "fat", "bone", "air")
PERCENTILES = (5, 25, 50, 75, 95)
TILE_MM = 16.0
MAX_SLICES = 24
"""At most this many slices per scan are measured (evenly spread), which keeps a
512x512 phantom's statistics to a few seconds."""


@dataclass(frozen=True)
class ImageStats:
    """The statistics of one CT (see the module docstring for how each is measured)."""

    name: str
    spacing_mm: tuple[float, float, float]
    """(x, y, z)."""
    slices: int
    body_width_mm: float
    body_depth_mm: float
    lung_share_of_body: float
    region_share_of_body: dict
    """Share of body voxels (lungs included) in each region."""
    hu_percentiles: dict
    """Region -> HU at `PERCENTILES`; None where the region is empty."""
    vessel_fraction: float
    """Share of lung voxels that are vessel."""
    vessels_per_cm2: float
    """Vessel cross-sections per cm^2 of lung, per slice."""
    calibre_mm: dict
    """p10, p50, p90 of the cross-sections' calibres."""
    calibre_histogram: dict
    """Share of cross-sections per `CALIBRE_BINS_MM` bin."""
    calibre_by_depth_mm: dict
    """Median calibre of cross-sections < 10, 10-25, > 25 mm from the lung border."""
    noise_sd_hu: dict
    """Median standard deviation of the tiles of each tissue (fat, soft_tissue)."""
    noise_tiles: int
    nps_mean_frequency: float | None
    """cycles/mm."""
    nps_peak_frequency: float | None
    noise_correlation_1mm: float | None
    nps_curve: dict = field(default_factory=dict)
    """Radially averaged NPS (HU^2 mm^2) at bin centres 0.05, 0.15, ... cycles/mm."""
    edge_10_90_mm: float | None = None
    edge_profiles: int = 0


# --- regions ------------------------------------------------------------------------------------

def measure_regions(hu: np.ndarray, spacing_zyx: Sequence[float]) -> dict[str, np.ndarray]:
    """Boolean masks (same shape as ``hu``) of body, lung (filled), the `REGIONS`, and the padding."""
    hu = np.asarray(hu, dtype=np.float32)
    _, sy, sx = (float(s) for s in spacing_zyx)
    smooth = ndimage.gaussian_filter(hu, (0, 1.0 / sy, 1.0 / sx), mode="nearest")
    fine = ndimage.gaussian_filter(hu, (0, 0.5, 0.5), mode="nearest")
    padding = _padding(hu)
    body = np.zeros(hu.shape, bool)
    lung_seed = np.zeros(hu.shape, bool)
    for k in range(hu.shape[0]):
        dense = (smooth[k] > -400) & ~padding[k]
        lab, n = ndimage.label(dense)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(dense, lab, index=np.arange(1, n + 1))
        body[k] = ndimage.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))
        lung_seed[k] = body[k] & (smooth[k] < -400)
    # Lungs: big low-density components in 3D (the trachea, oesophagus and bowel gas are small).
    lab, n = ndimage.label(lung_seed)
    lung = np.zeros(hu.shape, bool)
    if n:
        sizes = ndimage.sum_labels(lung_seed, lab, index=np.arange(1, n + 1))
        keep = np.nonzero(sizes >= 0.1 * sizes.max())[0] + 1
        lung = np.isin(lab, keep)
    filled = np.zeros_like(lung)
    inner = np.zeros_like(lung)
    margin = max(1, int(round(2.0 / sx)))
    for k in range(hu.shape[0]):
        if lung[k].any():
            filled[k] = ndimage.binary_fill_holes(lung[k])
            inner[k] = ndimage.binary_erosion(filled[k], iterations=margin)
    vessel = inner & (fine > -550)
    parenchyma = inner & ~ndimage.binary_dilation(vessel, structure=_disk2d())
    rest = body & ~filled
    fat = rest & (smooth > -200) & (smooth < -40)
    soft = rest & (smooth > -20) & (smooth < 150)
    bone = rest & (smooth > 250)
    away = np.zeros_like(body)
    gap = max(1, int(round(10.0 / sx)))
    for k in range(hu.shape[0]):
        away[k] = ~ndimage.binary_dilation(body[k], iterations=gap)
    air = away & ~padding & (smooth < -900)
    return dict(body=body, lung=filled, lung_inner=inner, parenchyma=parenchyma, vessel=vessel, soft_tissue=soft,
                fat=fat, bone=bone, air=air, padding=padding)


def _padding(hu: np.ndarray) -> np.ndarray:
    """Voxels outside the reconstructed circle: one constant value reaching the image's border."""
    out = np.zeros(hu.shape, bool)
    for k in range(hu.shape[0]):
        s = hu[k]
        value = s[0, 0]
        same = s == value
        if same.sum() < 0.01 * s.size:
            continue
        lab, _ = ndimage.label(same)
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        border = border[border > 0]
        out[k] = np.isin(lab, border)
    return out


def _disk2d() -> np.ndarray:
    s = np.zeros((1, 3, 3), bool)
    s[0] = ndimage.generate_binary_structure(2, 1)
    return s


# --- measurements --------------------------------------------------------------------------------

def measure(hu: np.ndarray, spacing_zyx: Sequence[float], name: str, *, lung_slices_only: bool = True) -> ImageStats:
    """The `ImageStats` of one volume ``hu`` [index, row, col] with ``spacing_zyx`` in mm.

    With ``lung_slices_only`` only the slices whose lung area is at least 40 % of the
    largest are measured (the chest, not the neck or abdomen), at most `MAX_SLICES`.
    """
    hu = np.asarray(hu, dtype=np.float32)
    sz, sy, sx = (float(s) for s in spacing_zyx)
    if lung_slices_only:
        # A first, cheap pass on every slice (every 4th voxel) for the lung area.
        area = measure_regions(hu[:, ::4, ::4], (sz, 4 * sy, 4 * sx))["lung"].sum(axis=(1, 2))
        keep = np.nonzero(area >= 0.4 * max(area.max(), 1))[0]
    else:
        keep = np.arange(hu.shape[0])
    if len(keep) > MAX_SLICES:
        keep = keep[np.unique(np.rint(np.linspace(0, len(keep) - 1, MAX_SLICES)).astype(int))]
    hu = hu[keep]
    masks = measure_regions(hu, (sz, sy, sx))
    body, lung = masks["body"], masks["lung"]
    voxels_body = max(int(body.sum()), 1)
    widths, depths = [], []
    for k in range(hu.shape[0]):
        rows = np.nonzero(body[k].any(axis=1))[0]
        cols = np.nonzero(body[k].any(axis=0))[0]
        if len(rows) and len(cols):
            depths.append((rows[-1] - rows[0] + 1) * sy)
            widths.append((cols[-1] - cols[0] + 1) * sx)
    percentiles = {}
    for region in REGIONS:
        values = hu[masks[region]]
        percentiles[region] = [round(float(v), 1) for v in np.percentile(values, PERCENTILES)] if values.size > 50 else None
    shares = {r: round(float(masks[r].sum() / voxels_body), 4) for r in REGIONS if r != "air"}
    inner = masks["lung_inner"]
    vessel = masks["vessel"]
    parenchyma_hu = float(np.median(hu[masks["parenchyma"]])) if masks["parenchyma"].any() else -850.0
    calibres, depth_of = _cross_sections(hu, vessel, inner, parenchyma_hu, (sy, sx))
    lung_cm2 = inner.sum() * sy * sx / 100.0
    noise = _noise(hu, masks, (sy, sx))
    edge = _edge(hu, masks, (sy, sx))
    hist = {}
    if len(calibres):
        counts, _ = np.histogram(calibres, bins=np.array(CALIBRE_BINS_MM))
        for lo, hi, c in zip(CALIBRE_BINS_MM[:-1], CALIBRE_BINS_MM[1:], counts):
            hist[_bin_name(lo, hi)] = round(float(c / len(calibres)), 4)
    by_depth = {}
    for label, lo, hi in (("<10mm", 0, 10), ("10-25mm", 10, 25), (">25mm", 25, math.inf)):
        sel = calibres[(depth_of >= lo) & (depth_of < hi)]
        by_depth[label] = round(float(np.median(sel)), 2) if len(sel) >= 5 else None
    return ImageStats(
        name=name,
        spacing_mm=(round(sx, 4), round(sy, 4), round(sz, 4)),
        slices=int(hu.shape[0]),
        body_width_mm=round(float(np.median(widths)), 1) if widths else 0.0,
        body_depth_mm=round(float(np.median(depths)), 1) if depths else 0.0,
        lung_share_of_body=round(float(lung.sum() / voxels_body), 4),
        region_share_of_body=shares,
        hu_percentiles=percentiles,
        vessel_fraction=round(float(vessel.sum() / max(int(inner.sum()), 1)), 4),
        vessels_per_cm2=round(float(len(calibres) / max(lung_cm2, 1e-6)), 3),
        calibre_mm={f"p{q}": round(float(np.percentile(calibres, q)), 2) if len(calibres) else None
                    for q in (10, 50, 90)},
        calibre_histogram=hist,
        calibre_by_depth_mm=by_depth,
        edge_10_90_mm=edge[0],
        edge_profiles=edge[1],
        **noise,
    )


def _bin_name(lo: float, hi: float) -> str:
    return f">={lo:g}" if math.isinf(hi) else f"{lo:g}-{hi:g}"


def _cross_sections(hu: np.ndarray, vessel: np.ndarray, inner: np.ndarray, parenchyma_hu: float,
                    spacing_yx) -> tuple[np.ndarray, np.ndarray]:
    """Calibre (mm) of every in-plane vessel cross-section, and its centre's distance to the lung border (mm).

    Each voxel of a cross-section (grown by one voxel to take in its partial-volume
    rim) counts with its vessel occupancy, ``(HU - parenchyma) / (40 - parenchyma)``
    clipped to [0, 1]. The calibre is the smaller of the diameter of the disc with
    that area and the width across the section's principal axes (4 sqrt of the
    smaller moment: 2r for a disc, 1.15 w for a rod of width w), so a vessel cut
    across and one lying in the slice both measure their width, below a voxel too.
    """
    sy, sx = spacing_yx
    calibres, depths = [], []
    eight = np.ones((3, 3), bool)
    yy, xx = np.mgrid[0:vessel.shape[1], 0:vessel.shape[2]].astype(np.float64)
    yy *= sy
    xx *= sx
    for k in range(vessel.shape[0]):
        if not vessel[k].any():
            continue
        lab, n = ndimage.label(vessel[k], structure=eight)
        grown = ndimage.grey_dilation(lab, footprint=eight) * inner[k]
        grown = np.where(lab > 0, lab, grown)
        w = np.clip((hu[k].astype(np.float64) - parenchyma_hu) / (40.0 - parenchyma_hu), 0.0, 1.0)
        index = np.arange(1, n + 1)
        m0 = np.maximum(ndimage.sum_labels(w, grown, index), 1e-9)
        my = ndimage.sum_labels(w * yy, grown, index) / m0
        mx = ndimage.sum_labels(w * xx, grown, index) / m0
        cyy = ndimage.sum_labels(w * yy * yy, grown, index) / m0 - my * my
        cxx = ndimage.sum_labels(w * xx * xx, grown, index) / m0 - mx * mx
        cxy = ndimage.sum_labels(w * xx * yy, grown, index) / m0 - mx * my
        small = 0.5 * (cyy + cxx) - np.sqrt(np.maximum(0.25 * (cyy - cxx) ** 2 + cxy**2, 0.0))
        width = 4 * np.sqrt(np.maximum(small, 0.0))
        disc = 2 * np.sqrt(m0 * sy * sx / np.pi)
        calibres.append(np.minimum(width, disc))
        border = ndimage.distance_transform_edt(inner[k], sampling=spacing_yx)
        r = np.clip(np.rint(my / sy).astype(int), 0, vessel.shape[1] - 1)
        c = np.clip(np.rint(mx / sx).astype(int), 0, vessel.shape[2] - 1)
        depths.append(border[r, c])
    if not calibres:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(calibres), np.concatenate(depths)


def _noise(hu: np.ndarray, masks: dict, spacing_yx) -> dict:
    sy, sx = spacing_yx
    t = max(8, int(round(TILE_MM / sx)))
    yy, xx = np.mgrid[0:t, 0:t].astype(np.float64)
    yy = (yy - yy.mean()) / t
    xx = (xx - xx.mean()) / t
    design = np.stack([np.ones_like(xx), xx, yy, xx * xx, yy * yy, xx * yy], axis=-1).reshape(-1, 6)
    pinv = np.linalg.pinv(design)
    hann = np.outer(np.hanning(t), np.hanning(t))
    hann /= np.sqrt(np.mean(hann**2))
    sds: dict[str, list[float]] = {"fat": [], "soft_tissue": []}
    power = np.zeros((t, t))
    tiles = 0
    for tissue in ("fat", "soft_tissue"):
        mask = masks[tissue]
        for k in range(hu.shape[0]):
            if mask[k].sum() < t * t:
                continue
            full = ndimage.minimum_filter(mask[k].astype(np.uint8), size=t, mode="constant") > 0
            # Tile centres on a grid of half a tile, wholly inside the tissue.
            centres = np.argwhere(full[t // 2::t // 2, t // 2::t // 2]) * (t // 2) + t // 2
            for r, c in centres[:: max(1, len(centres) // 20)]:
                tile = hu[k, r - t // 2:r - t // 2 + t, c - t // 2:c - t // 2 + t].astype(np.float64)
                if tile.shape != (t, t):
                    continue
                resid = tile.reshape(-1) - design @ (pinv @ tile.reshape(-1))
                resid = resid.reshape(t, t)
                sds[tissue].append(float(resid.std()))
                power += np.abs(np.fft.fft2(resid * hann)) ** 2
                tiles += 1
    out = dict(noise_sd_hu={k: round(float(np.median(v)), 1) if v else None for k, v in sds.items()},
               noise_tiles=tiles, nps_mean_frequency=None, nps_peak_frequency=None, noise_correlation_1mm=None,
               nps_curve={})
    if tiles == 0:
        return out
    nps = power / tiles * sx * sy / (t * t)
    fy = np.fft.fftfreq(t, d=sy)[:, None]
    fx = np.fft.fftfreq(t, d=sx)[None, :]
    f = np.hypot(fy, fx)
    weight = nps.copy()
    weight[0, 0] = 0.0  # the trend removal leaves no power at zero frequency
    out["nps_mean_frequency"] = round(float(np.sum(f * weight) / np.sum(weight)), 3)
    bins = np.arange(0, 0.05 + f.max(), 0.1)
    which = np.digitize(f.reshape(-1), bins) - 1
    curve = {}
    for b in range(len(bins) - 1):
        sel = which == b
        if sel.any():
            curve[f"{bins[b] + 0.05:.2f}"] = round(float(nps.reshape(-1)[sel].mean()), 2)
    out["nps_curve"] = curve
    radial = [(float(k), v) for k, v in curve.items()]
    out["nps_peak_frequency"] = max(radial, key=lambda kv: kv[1])[0] if radial else None
    acf = np.real(np.fft.ifft2(power))
    acf /= acf[0, 0]
    # Lag of 1 mm along rows and columns (linear between voxels).
    lag_x, lag_y = 1.0 / sx, 1.0 / sy
    ax = _interp_lag(acf[0, :], lag_x)
    ay = _interp_lag(acf[:, 0], lag_y)
    out["noise_correlation_1mm"] = round(float((ax + ay) / 2), 3)
    return out


def _interp_lag(line: np.ndarray, lag: float) -> float:
    i = int(np.floor(lag))
    w = lag - i
    if i + 1 >= len(line):
        return float(line[min(i, len(line) - 1)])
    return float((1 - w) * line[i] + w * line[i + 1])


def _edge(hu: np.ndarray, masks: dict, spacing_yx, max_profiles: int = 3000) -> tuple[float | None, int]:
    """10-90 % distance (mm) of the mean lung-to-chest-wall edge profile, and how many profiles went in."""
    sy, sx = spacing_yx
    lung = masks["lung"]
    wall = masks["soft_tissue"] | masks["fat"]
    offsets = np.arange(-5.0, 5.0001, 0.1)
    profiles = []
    for k in range(hu.shape[0]):
        if not lung[k].any():
            continue
        border = lung[k] & ~ndimage.binary_erosion(lung[k])
        near_wall = ndimage.binary_dilation(wall[k], iterations=max(2, int(round(3.0 / sx))))
        pts = np.argwhere(border & near_wall)
        if len(pts) == 0:
            continue
        pts = pts[:: max(1, len(pts) // 300)]
        smooth = ndimage.gaussian_filter(lung[k].astype(np.float32), 2.0)
        gy = ndimage.sobel(smooth, axis=0)
        gx = ndimage.sobel(smooth, axis=1)
        # The outward normal (mm units): down the gradient of the lung mask.
        ny = -gy[pts[:, 0], pts[:, 1]] / sy
        nx = -gx[pts[:, 0], pts[:, 1]] / sx
        norm = np.hypot(ny, nx)
        ok = norm > 1e-6
        pts, ny, nx, norm = pts[ok], ny[ok], nx[ok], norm[ok]
        ny, nx = ny / norm, nx / norm
        rows = pts[:, 0:1] + offsets[None, :] * ny[:, None] / sy
        cols = pts[:, 1:2] + offsets[None, :] * nx[:, None] / sx
        vals = ndimage.map_coordinates(hu[k], [rows.reshape(-1), cols.reshape(-1)], order=1, mode="nearest")
        profiles.append(vals.reshape(len(pts), -1))
    if not profiles:
        return None, 0
    prof = np.concatenate(profiles)[:max_profiles]
    lo = prof[:, offsets < -2.5].mean(axis=1)
    hi = prof[:, offsets > 2.5].mean(axis=1)
    spread_hi = prof[:, offsets > 2.5].std(axis=1)
    clean = (lo < -650) & (hi > -150) & (hi < 200) & (spread_hi < 80)
    prof, lo, hi = prof[clean], lo[clean], hi[clean]
    if len(prof) < 20:
        return None, int(len(prof))
    norm = (prof - lo[:, None]) / (hi - lo)[:, None]
    # Align each profile at its own 50 % crossing (the mask border is only voxel-exact).
    aligned = []
    centre = len(offsets) // 2
    for p in norm:
        above = np.nonzero(p >= 0.5)[0]
        if len(above) == 0:
            continue
        i = int(above[0])
        if i == 0 or abs(i - centre) > 25:
            continue
        frac = (0.5 - p[i - 1]) / max(p[i] - p[i - 1], 1e-6)
        shift = (i - 1 + frac) - centre
        aligned.append(np.interp(np.arange(len(offsets)) + shift, np.arange(len(offsets)), p))
    if len(aligned) < 20:
        return None, len(aligned)
    mean = np.mean(aligned, axis=0)
    width = _rise(mean, offsets)
    return (round(width, 2) if width is not None else None), len(aligned)


def _rise(profile: np.ndarray, offsets: np.ndarray) -> float | None:
    """Distance between the 10 % and 90 % crossings nearest the centre."""
    centre = len(offsets) // 2

    def crossing(level: float, forward: bool) -> float | None:
        idx = range(centre, len(profile) - 1) if forward else range(centre, 0, -1)
        for i in idx:
            a, b = (profile[i], profile[i + 1]) if forward else (profile[i - 1], profile[i])
            j = i if forward else i - 1
            if (a - level) * (b - level) <= 0 and a != b:
                return float(offsets[j] + (level - a) / (b - a) * (offsets[j + 1] - offsets[j]))
        return None

    lo = crossing(0.1, forward=False)
    hi = crossing(0.9, forward=True)
    if lo is None or hi is None:
        return None
    return hi - lo


# --- the comparison --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    real: list[ImageStats]
    synthetic: list[ImageStats]
    preset: str
    seed: int
    seconds_per_scan: float
    """Generation time of one phantom (mean, this machine)."""


def compare_real(paths: Sequence[str | Path], *, preset: str = "demo", seed: int = 0, scans: int = 2,
                 out_dir: str | Path | None = None) -> Comparison:
    """Measure the real CTs at ``paths`` and ``scans`` phantoms of ``preset``/``seed``; write the report to ``out_dir``."""
    import time

    from luna.errors import LunaError
    from luna.io import load_ct
    from luna.synth.dataset import scan_specs
    from luna.synth.scan import make_scan

    if not paths:
        raise LunaError("--compare-real needs at least one real CT (a DICOM folder or an image file)")
    if scans < 1:
        raise LunaError(f"--scans must be at least 1, got {scans}")
    real_images, real_stats = [], []
    for path in paths:
        ct = load_ct(path, hu_range=None)
        spacing = ct.geometry.spacing_xyz
        zyx = (spacing[2], spacing[1], spacing[0])
        name = _short_name(Path(path))
        real_stats.append(measure(ct.hu, zyx, name))
        real_images.append((name, ct.hu, zyx, ct.geometry.direction))
    synth_images, synth_stats = [], []
    seconds = []
    for spec in scan_specs(preset, seed, scans):
        t0 = time.perf_counter()
        scan = make_scan(spec)
        seconds.append(time.perf_counter() - t0)
        spacing = scan.geometry.spacing_xyz
        zyx = (spacing[2], spacing[1], spacing[0])
        name = f"{preset}#{spec.index} (seed {seed})"
        synth_stats.append(measure(scan.hu, zyx, name))
        synth_images.append((name, scan.hu, zyx, scan.geometry.direction))
    result = Comparison(real_stats, synth_stats, preset, seed, round(float(np.mean(seconds)), 2))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "compare.json", json.dumps(
            dict(preset=preset, seed=seed, seconds_per_scan=result.seconds_per_scan,
                 real=[asdict(s) for s in real_stats], synthetic=[asdict(s) for s in synth_stats]),
            indent=1) + "\n")
        write_picture(out / "compare.png", real_images, synth_images)
    return result


def _short_name(path: Path) -> str:
    parts = [p for p in path.parts if p.startswith("LIDC") or p.startswith("LUNA")]
    return parts[-1] if parts else path.name[-24:]


def format_comparison(c: Comparison) -> str:
    """The side-by-side table printed by ``--compare-real``."""
    stats = c.real + c.synthetic
    names = [s.name for s in stats]
    width = max(14, *(len(n) for n in names))
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, values):
        rows.append((label, [_fmt(v) for v in values]))

    add("spacing x/z mm", [f"{s.spacing_mm[0]:.2f}/{s.spacing_mm[2]:.2f}" for s in stats])
    add("slices measured", [s.slices for s in stats])
    add("body width mm", [s.body_width_mm for s in stats])
    add("body depth mm", [s.body_depth_mm for s in stats])
    add("lung share of body", [s.lung_share_of_body for s in stats])
    for region in ("fat", "soft_tissue", "bone"):
        add(f"{region} share of body", [s.region_share_of_body.get(region) for s in stats])
    for region in REGIONS:
        add(f"HU {region} p5/p50/p95", [_pct(s.hu_percentiles.get(region)) for s in stats])
    add("vessel share of lung", [s.vessel_fraction for s in stats])
    add("vessel sections /cm2", [s.vessels_per_cm2 for s in stats])
    add("calibre p10/p50/p90", ["/".join(_fmt(s.calibre_mm[k]) for k in ("p10", "p50", "p90")) for s in stats])
    for key in stats[0].calibre_histogram or {}:
        add(f"  calibre {key} mm", [s.calibre_histogram.get(key) for s in stats])
    add("calibre by depth <10/10-25/>25", ["/".join(_fmt(v) for v in s.calibre_by_depth_mm.values()) for s in stats])
    add("noise sd fat HU", [s.noise_sd_hu.get("fat") for s in stats])
    add("noise sd soft HU", [s.noise_sd_hu.get("soft_tissue") for s in stats])
    add("noise tiles", [s.noise_tiles for s in stats])
    add("NPS mean freq c/mm", [s.nps_mean_frequency for s in stats])
    add("NPS peak freq c/mm", [s.nps_peak_frequency for s in stats])
    add("noise corr at 1 mm", [s.noise_correlation_1mm for s in stats])
    add("edge 10-90% mm", [s.edge_10_90_mm for s in stats])
    label_width = max(len(r[0]) for r in rows)
    lines = [f"real CT vs luna.synth preset {c.preset}, seed {c.seed} "
             f"({c.seconds_per_scan:.1f} s per phantom on this machine)"]
    kinds = ["real"] * len(c.real) + ["synthetic"] * len(c.synthetic)
    lines.append(" " * label_width + "  " + "  ".join(k.rjust(width) for k in kinds))
    lines.append(" " * label_width + "  " + "  ".join(n[-width:].rjust(width) for n in names))
    for label, values in rows:
        lines.append(label.ljust(label_width) + "  " + "  ".join(v.rjust(width) for v in values))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.4g}"
    return str(v)


def _pct(p) -> str:
    if p is None:
        return "-"
    return f"{p[0]:.0f}/{p[2]:.0f}/{p[4]:.0f}"


# --- the picture ------------------------------------------------------------------------------------

WINDOWS = {"lung": (-1350.0, 150.0), "soft tissue": (-160.0, 240.0)}
"""(low, high) HU: the lung window (W 1500, L -600) and the soft-tissue window (W 400, L 40)."""
MIP_MM = 20.0
"""Thickness of the maximum intensity projection in the picture."""


def write_picture(path: Path, real: list, synthetic: list) -> None:
    """One row per CT, all at the same scale in mm and shown as a radiologist would (patient's
    right on the left, front up): lung window, a 60 mm lung crop, a maximum intensity
    projection over `MIP_MM` of lung (vessel trees), and the soft-tissue window.

    ``real`` and ``synthetic`` hold (name, hu, spacing_zyx, direction) tuples.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    items = [("real", *r) for r in real] + [("synthetic", *s) for s in synthetic]
    fig, axes = plt.subplots(len(items), 4, figsize=(20, 5 * len(items)), dpi=80, squeeze=False)
    target = None
    for row, (kind, name, hu, zyx, direction) in enumerate(items):
        hu = _radiological(hu, direction)
        k = _pick_slice(hu, zyx, target)
        if kind == "real" and target is None:
            target = _lung_fraction(hu[k], zyx)
        s = hu[k].astype(np.float32)
        sz, sy, sx = zyx
        half = max(1, int(round(MIP_MM / 2 / sz)))
        mip = hu[max(0, k - half):k + half + 1].max(axis=0).astype(np.float32)
        ny, nx = s.shape
        extent = (-(nx / 2) * sx, (nx / 2) * sx, (ny / 2) * sy, -(ny / 2) * sy)
        cy, cx = _lung_crop_centre(s, (sy, sx))
        lung_lo, lung_hi = WINDOWS["lung"]
        soft_lo, soft_hi = WINDOWS["soft tissue"]
        views = [
            (s, lung_lo, lung_hi, None, f"{kind}: {name}, slice {k}, lung window"),
            (s, lung_lo, lung_hi, (cy, cx), f"60 mm of lung, {sx:.2f} mm voxels, {sz:.2f} mm slices"),
            (mip, lung_lo, lung_hi, None,
             f"max. intensity over {min(hu.shape[0], 2 * half + 1) * sz:.0f} mm (vessel trees)"),
            (s, soft_lo, soft_hi, None, "soft-tissue window (W 400, L 40)"),
        ]
        for ax, (image, lo, hi, crop, title) in zip(axes[row], views):
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
            if crop is None:
                ax.set_xlim(-200, 200)
                ax.set_ylim(200, -200)
            else:
                ax.set_xlim(crop[1] - 30, crop[1] + 30)
                ax.set_ylim(crop[0] + 30, crop[0] - 30)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("mm", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _radiological(hu: np.ndarray, direction) -> np.ndarray:
    """``hu`` [index, row, col] turned so that rows run front to back and columns right to left of the patient."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    out = hu
    if d[1, 1] < 0:
        out = out[:, ::-1]
    if d[0, 0] < 0:
        out = out[:, :, ::-1]
    return out


def _lung_fraction(s: np.ndarray, zyx) -> float:
    """Share of the body's area (every 4th voxel) that is lung."""
    masks = measure_regions(s[None, ::4, ::4], (zyx[0], 4 * zyx[1], 4 * zyx[2]))
    return float(masks["lung"].sum() / max(int(masks["body"].sum()), 1))


def _pick_slice(hu: np.ndarray, zyx, target: float | None) -> int:
    """The middle slice for the first real CT; for the others, the slice whose lung share is closest to it."""
    if target is None:
        return hu.shape[0] // 2
    fractions = np.array([_lung_fraction(hu[k], zyx) for k in range(hu.shape[0])])
    return int(np.argmin(np.abs(fractions - target)))


def _lung_crop_centre(s: np.ndarray, spacing_yx) -> tuple[float, float]:
    """A point (mm from the image centre) deep in the right lung (the viewer's left), for the crop."""
    masks = measure_regions(s[None], (1.0, *spacing_yx))
    inner = masks["lung_inner"][0]
    if not inner.any():
        return 0.0, 0.0
    depth = ndimage.distance_transform_edt(inner, sampling=spacing_yx)
    ny, nx = s.shape
    left = depth.copy()
    left[:, nx // 2:] = 0
    if left.max() > 15:
        depth = left
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return (r - ny / 2) * spacing_yx[0], (c - nx / 2) * spacing_yx[1]
