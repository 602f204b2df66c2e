"""What the scanner does to the phantom: resolution, reconstruction kernel, noise and streaks.

The phantom arrives as HU without noise (tissues, vessels and nodules with their
partial volume). `sample_scanner` draws one scanner set-up per scan and `acquire`
applies it:

1. Resolution: a Gaussian point spread in-plane (sigma ``blur_mm``) and along z
   (``slice_sigma``, in slices; the slice's own thickness was integrated when
   the phantom was rendered).
2. Kernel: smooth and standard kernels (most scans) leave edges as they are;
   sharp kernels (a quarter of scans: lung, bone, B60f-B70f) enhance them,
   ``hu + sharpen * (hu - G(hu))``, which gives the overshoot at the lung border
   and around vessels that such scans show.
3. Noise: filtered back projection gives noise whose power spectrum (NPS) rises
   with spatial frequency (the ramp filter) and falls where the kernel cuts off,
   ``NPS(f) ~ (f + floor) * exp(-2 (f / f_c)^2)``, peaking near ``f_c / 2``:
   0.14-0.27 cycles/mm for standard kernels (noise correlated over about a
   millimetre: 0.2-0.5 at 1 mm), 0.35-0.55 for sharp ones. It is made
   per slice by shaping white noise in the Fourier domain, correlated between
   neighbouring slices (``z_correlation``), stronger in the middle of the body than
   at its edge, and scaled to ``noise_hu`` (standard deviation in soft tissue at the
   body's centre: 9-40 HU, more for larger patients and sharp kernels). White
   noise, what the book-era phantoms used, has a flat NPS and looks like sand.
4. Streaks: where a ray crosses much tissue (the shoulders, arms down beside the
   chest), too few photons reach the detector and the reconstruction smears that
   ray's error along it: lines across the image. Each row of the slice gets a
   random error whose size grows exponentially with the water-equivalent path
   along it, drawn along a line tilted a few degrees from the lateral direction.

Measured against real CT with ``python -m luna.synth --compare-real``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Scanner", "sample_scanner", "acquire", "nps_filter"]

STREAK_PATH_CM = 34.0
"""Water-equivalent path (cm) at which a row's streak error equals ``streaks`` x ``noise_hu``."""
STREAK_GROWTH = 0.16
"""Growth of the streak error per cm of path beyond `STREAK_PATH_CM` (e^0.16: +17% per cm)."""


@dataclass(frozen=True)
class Scanner:
    """One scan's acquisition and reconstruction."""

    kernel: str
    """"standard" or "sharp"."""
    blur_mm: float
    slice_sigma: float
    sharpen: float
    sharpen_mm: float
    noise_hu: float
    nps_peak: float
    """cycles/mm."""
    nps_floor: float
    """Share of ``nps_peak`` added to the frequency (noise left at low frequencies)."""
    z_correlation: float
    streaks: float


def sample_scanner(rng: np.random.Generator, spacing_zyx, body_width_mm: float) -> Scanner:
    """A random scanner set-up for a scan with this voxel size and patient."""
    dz, sy, sx = (float(v) for v in spacing_zyx)
    nyquist = 0.5 / max(sy, sx)
    sharp = bool(rng.random() < 0.25)
    # Larger patients attenuate more: noise grows with their width (clipped, so that
    # the small phantoms of the test presets still get real noise levels).
    size = float(np.clip(body_width_mm / 340.0, 0.85, 1.3)) ** 1.5
    noise = float(np.exp(rng.uniform(np.log(9.0), np.log(32.0)))) * size
    if sharp:
        peak = float(rng.uniform(0.35, 0.55))
        noise *= float(rng.uniform(1.5, 2.4))
        sharpen = float(rng.uniform(0.4, 1.0))
        blur = float(rng.uniform(0.3, 0.5))
    else:
        peak = float(rng.uniform(0.14, 0.27))
        sharpen = float(rng.uniform(0.0, 0.15))
        blur = float(rng.uniform(0.45, 0.85))
    # Thin slices are noisier (fewer photons per voxel), relative to 1.25-2.5 mm.
    noise *= float(np.clip(np.sqrt(1.5 / dz), 0.8, 1.4))
    return Scanner(
        kernel="sharp" if sharp else "standard",
        blur_mm=blur,
        slice_sigma=float(rng.uniform(0.15, 0.35)),
        sharpen=sharpen,
        sharpen_mm=float(rng.uniform(0.8, 1.3)),
        noise_hu=noise,
        nps_peak=min(peak, 0.8 * nyquist),
        nps_floor=float(rng.uniform(0.1, 0.4)),
        z_correlation=float(rng.uniform(0.0, 0.3 if dz <= 1.25 else 0.12)),
        streaks=float(rng.uniform(0.3, 1.2)),
    )


def nps_filter(shape: tuple[int, int], spacing_yx, peak: float, floor: float) -> np.ndarray:
    """Amplitude filter (for ``np.fft.rfft2``) giving unit-variance noise with the band-pass NPS of the module docstring."""
    sy, sx = spacing_yx
    fy = np.fft.fftfreq(shape[0], d=sy)[:, None]
    fx = np.fft.fftfreq(shape[1], d=sx)[None, :]
    f = np.hypot(fy, fx)
    cutoff = 2.0 * peak
    power = (f + floor * peak) * np.exp(-2.0 * (f / cutoff) ** 2)
    power /= power.mean()
    amplitude = np.sqrt(power)
    return amplitude[:, : shape[1] // 2 + 1].astype(np.float32)


def acquire(hu: np.ndarray, scanner: Scanner, spacing_zyx, rng: np.random.Generator, *,
            body_center_rc: tuple[float, float], body_half_size_rc: tuple[float, float]) -> np.ndarray:
    """The scanner's image of ``hu`` (float32 HU without noise, [index, row, col]): blurred, sharpened, noisy.

    ``body_center_rc`` and ``body_half_size_rc`` (voxels) locate the body, where the
    noise is strongest. Works slice by slice after the blur, so memory stays at one
    volume plus a slice.
    """
    dz, sy, sx = (float(v) for v in spacing_zyx)
    sigma = (scanner.slice_sigma, scanner.blur_mm / sy, scanner.blur_mm / sx)
    out = ndimage.gaussian_filter(hu, sigma, mode="nearest")
    if scanner.sharpen > 0:
        smooth = ndimage.gaussian_filter(out, (0, scanner.sharpen_mm / sy, scanner.sharpen_mm / sx), mode="nearest")
        out += np.float32(scanner.sharpen) * (out - smooth)
        del smooth
    nz, ny, nx = out.shape
    amplitude = nps_filter((ny, nx), (sy, sx), scanner.nps_peak, scanner.nps_floor)
    # Noise is strongest at the body's centre, where rays cross the most tissue.
    rr = (np.arange(ny) - body_center_rc[0])[:, None] / max(body_half_size_rc[0], 1.0)
    cc = (np.arange(nx) - body_center_rc[1])[None, :] / max(body_half_size_rc[1], 1.0)
    profile = (0.8 + 0.4 * np.exp(-(rr**2 + cc**2) / 0.5)).astype(np.float32)
    scale = np.float32(scanner.noise_hu) * profile
    rho = np.float32(scanner.z_correlation)
    keep = np.float32(np.sqrt(1 - rho * rho))
    previous = None
    cols = np.arange(nx, dtype=np.float64)
    for k in range(nz):
        white = rng.standard_normal((ny, nx), dtype=np.float32)
        noise = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=(ny, nx)).astype(np.float32)
        if previous is not None and rho > 0:
            noise = rho * previous + keep * noise
        previous = noise
        out[k] += noise * scale
        _add_streaks(out[k], hu[k], scanner, sx, rng, cols)
    return out


def _add_streaks(image: np.ndarray, clean: np.ndarray, scanner: Scanner, sx: float, rng: np.random.Generator,
                 cols: np.ndarray) -> None:
    """Photon-starvation streaks along (nearly) lateral rays, in place."""
    # Water-equivalent path along each row (cm): air 0, fat 0.9, water 1, bone up to ~2.
    mu = np.clip(1.0 + clean / 1000.0, 0.0, 2.5)
    path = mu.sum(axis=1) * (sx / 10.0)
    size = scanner.streaks * scanner.noise_hu * np.exp(STREAK_GROWTH * (path - STREAK_PATH_CM))
    size = np.minimum(size, 8.0 * scanner.noise_hu)
    tilt = float(np.tan(np.deg2rad(rng.uniform(-6.0, 6.0))))
    error = rng.standard_normal(len(path)) * size
    if not np.any(np.abs(error) > 0.5):
        return
    error = ndimage.gaussian_filter1d(error, 0.8)
    ny, nx = image.shape
    rows = np.arange(ny, dtype=np.float64)[:, None] + (cols[None, :] - nx / 2) * tilt
    image += np.interp(rows.reshape(-1), np.arange(ny), error).reshape(ny, nx).astype(np.float32)
