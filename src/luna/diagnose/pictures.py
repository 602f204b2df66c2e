"""PNG pictures of a diagnosis (matplotlib, Agg backend; no display needed).

`save_nodule_picture`: axial, coronal and sagittal crops ~64 mm wide around one
nodule, with a circle of its diameter; coronal and sagittal panels use the voxel
spacing as aspect so a sphere looks round. `save_overview`: a maximum-intensity
projection of the CT (axial) with the reported nodules marked, beside the
projection of the segmentation probabilities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, Ellipse  # noqa: E402

from luna.fileio import write_atomic  # noqa: E402

HALF_WIDTH_MM = 32.0
WINDOW = (-1000, 400)


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def _window(a, lo, hi):
    lo = max(0, lo)
    hi = min(a, hi)
    return lo, hi


def save_nodule_picture(ct, nodule, path, *, title: str = "", half_width_mm: float = HALF_WIDTH_MM) -> Path:
    """Three orthogonal crops through ``nodule.center_irc`` with a circle of its diameter."""
    hu = ct.hu
    si, sr, sc = ct.geometry.spacing_irc
    ci, cr, cc = (int(round(v)) for v in nodule.center_irc)
    ci = min(max(ci, 0), hu.shape[0] - 1)
    cr = min(max(cr, 0), hu.shape[1] - 1)
    cc = min(max(cc, 0), hu.shape[2] - 1)
    hi_, hr, hc = (max(1, int(round(half_width_mm / s))) for s in (si, sr, sc))
    i0, i1 = _window(hu.shape[0], ci - hi_, ci + hi_ + 1)
    r0, r1 = _window(hu.shape[1], cr - hr, cr + hr + 1)
    c0, c1 = _window(hu.shape[2], cc - hc, cc + hc + 1)
    radius = nodule.diameter_mm / 2
    fi, fr, fc = nodule.center_irc
    # (image, x = column axis, y = row axis, (x spacing, y spacing), labels)
    panels = [
        ("axial", hu[ci, r0:r1, c0:c1], (c0, fc, sc), (r0, fr, sr), "col", "row"),
        ("coronal", hu[i0:i1, cr, c0:c1], (c0, fc, sc), (i0, fi, si), "col", "slice"),
        ("sagittal", hu[i0:i1, r0:r1, cc], (r0, fr, sr), (i0, fi, si), "row", "slice"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for ax, (name, img, (x0, fx, sx), (y0, fy, sy), xl, yl) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=sy / sx, interpolation="nearest")
        ax.add_patch(Ellipse((fx - x0, fy - y0), 2 * radius / sx, 2 * radius / sy, fill=False, color="red", lw=1.2))
        ax.set_title(name)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_xticks([])
        ax.set_yticks([])
    x, y, z = nodule.center_xyz
    pm = "n/a" if nodule.p_malignant is None else f"{nodule.p_malignant:.2f}"
    fig.suptitle(f"{title}  xyz ({x:.1f}, {y:.1f}, {z:.1f}) mm  d {nodule.diameter_mm:.1f} mm  "
                 f"p(nodule) {nodule.p_nodule:.2f}  p(malignant) {pm}", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def save_overview(ct, nodules: Sequence, path, *, probabilities: np.ndarray | None = None, title: str = "") -> Path:
    """Axial maximum-intensity projection with the nodules numbered as in the table."""
    hu = ct.hu
    si, sr, sc = ct.geometry.spacing_irc
    mip = hu.max(axis=0)
    n_panels = 2 if probabilities is not None else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(6 * n_panels, 6.4))
    axes = np.atleast_1d(axes)
    axes[0].imshow(mip, cmap="gray", vmin=-1000, vmax=1000, aspect=sr / sc, interpolation="nearest")
    axes[0].set_title("axial MIP (HU)")
    if probabilities is not None:
        axes[1].imshow(probabilities.max(axis=0), cmap="magma", vmin=0, vmax=1, aspect=sr / sc,
                       interpolation="nearest")
        axes[1].set_title("max p(nodule) from segmentation")
    for ax in axes:
        for k, n in enumerate(nodules, 1):
            _, r, c = n.center_irc
            ax.add_patch(Circle((c, r), max(n.diameter_mm / 2 / sc, 3) + 4, fill=False, color="cyan", lw=1.2))
            ax.text(c + n.diameter_mm / 2 / sc + 6, r, str(k), color="cyan", fontsize=9, va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))
