"""A second phantom generator, deliberately unlike luna's: does a model fit only luna's phantoms?

luna's quality numbers are measured on `luna.synth` phantoms; models trained on the
same generator can learn its habits rather than what a nodule is. This script writes
a LUNA16-layout set from a different, simpler world, sharing no code with
`luna.synth`:

- an elliptic body (fat rim, muscle), a table, a round spine, ring ribs every 25 mm;
- two ellipsoid lungs of uniform -870 HU with a heart cut out of them;
- vessel trees of straight cylinders, 10 per lung from the hilum, each segment
  splitting in two at random angles, radii from 3-4.5 mm down to 0.6 mm (rendered in
  four calibres: thicker far from the hila than real lungs' vessels);
- 1-3 nodules per scan, 4-28 mm (log-uniform): solid ellipsoids of 0-60 HU inside the
  lung (65%), on the pleura (20%), or ground glass of -480 HU (15%);
- a Gaussian blur, then noise of 12-30 HU smoothed in-plane;
- 512x512 at 0.6-0.85 mm, slices of 1, 1.25, 2 or 2.5 mm over 260-280 mm.

It writes ``subset0/<uid>.mhd``, ``annotations.csv`` and ``candidates.csv`` (each
nodule, and 40 random lung points of class 0): ``--scans`` scans for each of
``--seeds``, each seed its own random stream, so the set is the same whatever order or
grouping the seeds come in. About 30 s and 0.2-0.4 GB of memory per scan on one core.
The set of README Quality (20 scans, 44 nodules), then a run's models measured on it:

    python scripts/cartoon_phantoms.py data-unversioned/cartoon --scans 10 --seeds 11 12
    python -m luna.bench --sections quality --data-dir data-unversioned/cartoon --out cartoon.json
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

VESSEL_CALIBRES = ((0.5, 1.0), (1.0, 1.7), (1.7, 2.6), (2.6, 5.0))
"""Radius bins (mm): each is drawn at its mid radius."""


def grow(rng: np.random.Generator, start, direction, radius: float, depth: int, segments: list) -> None:
    """A straight segment from ``start``, then two thinner children at random angles."""
    if radius < 0.6 or depth > 9:
        return
    end = start + direction * rng.uniform(8, 25) * (radius / 2 + 0.5)
    segments.append((start, end, radius))
    for _ in range(2):
        d = direction + rng.normal(0, 0.55, 3)
        grow(rng, end, d / np.linalg.norm(d), radius * rng.uniform(0.65, 0.8), depth + 1, segments)


def scan(rng: np.random.Generator, uid: str, out: Path, annotations: list, candidates: list) -> None:
    sx = rng.uniform(0.6, 0.85)
    sz = float(rng.choice([1.0, 1.25, 2.0, 2.5]))
    nz = int(min(260, 280 / sz))
    xs = (np.arange(512) - 255.5) * sx
    ys = xs.copy()
    zs = (np.arange(nz) - nz / 2) * sz
    z, y, x = np.meshgrid(zs, ys, xs, indexing="ij", sparse=True)
    a, b = rng.uniform(140, 175), rng.uniform(100, 125)
    body = (x / a) ** 2 + ((y - 10) / b) ** 2 < 1
    vol = np.full((nz, 512, 512), -1000.0, np.float32)
    vol[np.broadcast_to(body, vol.shape)] = -90.0
    vol[np.broadcast_to((x / (a - 15)) ** 2 + ((y - 10) / (b - 15)) ** 2 < 1, vol.shape)] = 45.0
    vol[:, (ys > 10 + b + 15) & (ys < 10 + b + 22), :] = 150.0
    lung = np.zeros(vol.shape, bool)
    zc, hz = zs.min() + 0.55 * (zs.max() - zs.min()), 0.55 * (zs.max() - zs.min())
    for side in (-1, 1):
        cx, lx, ly = side * rng.uniform(60, 72), rng.uniform(45, 58), rng.uniform(70, 85)
        lung |= ((x - cx) / lx) ** 2 + ((y - 5) / ly) ** 2 + ((z - zc) / hz) ** 2 < 1
    lung &= ~(((x - 20) / 55) ** 2 + ((y + 35) / 45) ** 2 + ((z - (zc - hz * 0.4)) / 50) ** 2 < 1)
    vol[lung] = -870.0
    vol[np.broadcast_to(x ** 2 + (y - 10 - b + 30) ** 2 < 16 ** 2, vol.shape)] = 350.0
    rib = (np.abs(np.sqrt((x[0] / (a - 8)) ** 2 + ((y[0] - 10) / (b - 8)) ** 2) - 1) < 0.035) & (y[0] < 10 + b - 40)
    for zr in np.arange(zs.min() + rng.uniform(0, 25), zs.max(), 25):
        for k in np.flatnonzero(np.abs(zs - zr) < 5):
            vol[k][rib] = 650.0
    segments: list = []
    for side in (-1, 1):
        for _ in range(10):
            d = np.array([side * 1.0, rng.normal(0, 0.6), rng.normal(0, 0.8)])
            grow(rng, np.array([side * 35.0, 0.0, zc - 0.1 * hz]), d / np.linalg.norm(d), rng.uniform(3.0, 4.5), 0,
                 segments)
    for lo, hi in VESSEL_CALIBRES:
        axis = np.zeros(vol.shape, bool)
        for p, q, r in segments:
            if lo <= r < hi:
                t = np.linspace(0, 1, int(np.linalg.norm(q - p) / 0.4) + 2)[:, None]
                pts = p + t * (q - p)
                i = np.rint(pts[:, 2] / sz + nz / 2).astype(int)
                j = np.rint(pts[:, 1] / sx + 255.5).astype(int)
                k = np.rint(pts[:, 0] / sx + 255.5).astype(int)
                ok = (i >= 0) & (i < nz) & (j >= 0) & (j < 512) & (k >= 0) & (k < 512)
                axis[i[ok], j[ok], k[ok]] = True
        if axis.any():
            vol[(ndimage.distance_transform_edt(~axis, sampling=(sz, sx, sx)) < (lo + hi) / 2) & lung] = 35.0
    inner = np.stack(np.nonzero(ndimage.binary_erosion(lung, iterations=3)), 1)
    rim = np.stack(np.nonzero(lung & ~ndimage.binary_erosion(lung, iterations=2)), 1)
    centres: list = []
    for _ in range(int(rng.integers(1, 4))):
        d = float(np.exp(rng.uniform(np.log(4), np.log(28))))
        kind = rng.choice(["solid", "pleural", "ggo"], p=[0.65, 0.2, 0.15])
        where = rim if kind == "pleural" else inner
        for _try in range(50):
            v = where[rng.integers(len(where))]
            c = np.array([xs[v[2]], ys[v[1]], zs[v[0]]])
            if all(np.linalg.norm(c - o) > 30 for o in centres) and abs(c[2]) < zs.max() - d:
                break
        centres.append(c)
        semi = d / 2 * rng.uniform(0.8, 1.2, 3)
        inside = ((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2 + ((z - c[2]) / semi[2]) ** 2 < 1
        inside &= body
        vol[inside] = np.maximum(vol[inside], -480.0 if kind == "ggo" else float(rng.uniform(0, 60)))
        annotations.append([uid, f"{c[0]:.3f}", f"{c[1]:.3f}", f"{c[2]:.3f}", f"{d:.3f}"])
        candidates.append([uid, f"{c[0]:.3f}", f"{c[1]:.3f}", f"{c[2]:.3f}", "1"])
    for _ in range(40):
        v = inner[rng.integers(len(inner))]
        candidates.append([uid, f"{xs[v[2]]:.3f}", f"{ys[v[1]]:.3f}", f"{zs[v[0]]:.3f}", "0"])
    vol = ndimage.gaussian_filter(vol, (0.5, 0.8, 0.8))
    noise = ndimage.gaussian_filter(rng.normal(0, 1, vol.shape).astype(np.float32), (0, 0.7, 0.7))
    vol += noise * (rng.uniform(12, 30) / noise.std())
    image = sitk.GetImageFromArray(np.clip(vol, -1024, 3000).astype(np.int16))
    image.SetSpacing((sx, sx, sz))
    image.SetOrigin((float(xs[0]), float(ys[0]), float(zs[0])))
    sitk.WriteImage(image, str(out / "subset0" / f"{uid}.mhd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--scans", type=int, default=10, help="scans per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12])
    args = parser.parse_args()
    (args.out / "subset0").mkdir(parents=True, exist_ok=True)
    annotations: list = []
    candidates: list = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        for s in range(args.scans):
            uid = f"1.3.6.1.4.1.55555.7.{seed}.{s:04d}"
            scan(rng, uid, args.out, annotations, candidates)
            print(f"seed {seed}: [{s + 1}/{args.scans}] {uid}", flush=True)
    for name, header, rows in (("annotations.csv", ["coordX", "coordY", "coordZ", "diameter_mm"], annotations),
                               ("candidates.csv", ["coordX", "coordY", "coordZ", "class"], candidates)):
        with open(args.out / name, "w", newline="") as f:
            csv.writer(f).writerows([["seriesuid", *header], *rows])
    print(f"{args.scans * len(args.seeds)} scans, {len(annotations)} nodules -> {args.out}")


if __name__ == "__main__":
    main()
