"""PNG pictures of a diagnosis, drawn as radiologists read CTs (matplotlib, Agg backend).

Orientation comes from the CT's `Geometry` (its direction matrix), never from the
array order: `view` finds, for each patient axis (x: right->left, y: anterior->
posterior, z: inferior->superior in LPS), the array axis that runs most nearly along
it, and flips and transposes the slice so that every picture follows the
radiological convention whatever the scanner stored:

- axial: the patient's right on the viewer's left, anterior at the top;
- coronal: right on the left, head at the top;
- sagittal: anterior on the left, head at the top.

Each panel carries orientation letters at its edges (R/L, A/P, S/I, from the actual
direction of that edge, so an oblique scan shows e.g. "LP"), the window (width and
level, in HU) and a scale bar in mm; in-plane pixels keep their true aspect.

`nodule_picture`: axial, coronal and sagittal crops ~64 mm wide around one nodule,
with a circle of its diameter. `overview_picture`: the axial maximum-intensity
projection with the nodules numbered as in the table (`luna.diagnose.report`),
beside the projection of the segmentation's probabilities with its colour bar; when
no nodule is accepted, the most probable rejected candidates are drawn dashed. Each
number goes beside its ring where it covers no other number and no other ring
(`label_spots`): two detections side by side had their numbers "1" and "12" run
together into "112".
`thumbnail`: a small axial crop for the HTML table. Each returns PNG bytes.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402

__all__ = ["LUNG_WINDOW", "View", "label_spots", "nodule_picture", "orientation_letters", "overview_picture", "thumbnail",
           "view"]

HALF_WIDTH_MM = 32.0
LUNG_WINDOW = (-1000, 400)
"""HU shown from black to white: width 1400, level -300, the usual lung window."""

# Each plane: the patient axis it cuts across, and the patient direction (axis, sign in
# LPS) that runs to the viewer's right and the one that runs down the screen.
PLANES = {
    "axial": (2, (0, +1), (1, +1)),      # right: +x (patient left); down: +y (posterior)
    "coronal": (1, (0, +1), (2, -1)),    # right: +x; down: -z (feet)
    "sagittal": (0, (1, +1), (2, -1)),   # right: +y (posterior); down: -z
}
_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))  # (negative, positive) direction of x, y, z in LPS


def orientation_letters(direction_xyz: Sequence[float]) -> str:
    """The patient direction of a unit vector in LPS as letters, strongest first ("L", "LP", ...).

    Components below a third of the strongest are left out, as viewers do.
    """
    v = np.asarray(direction_xyz, dtype=np.float64)
    strongest = np.abs(v).max()
    order = np.argsort(-np.abs(v), kind="stable")
    return "".join(_LETTERS[a][int(v[a] > 0)] for a in order if abs(v[a]) >= strongest / 3 and v[a] != 0)


def _axis_directions(geometry) -> np.ndarray:
    """Row a: the unit patient direction (LPS) of array axis a (index, row, col)."""
    d = geometry.direction_matrix  # columns: directions of col (i), row (j), index (k)
    dirs = np.stack([d[:, 2], d[:, 1], d[:, 0]])
    return dirs / np.linalg.norm(dirs, axis=1, keepdims=True)


def _axis_of_patient_axis(dirs: np.ndarray) -> tuple[int, int, int]:
    """For patient axes x, y, z: the array axis that runs most nearly along each (a permutation)."""
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(dirs[p[k], k]) for k in range(3)))
    return tuple(best)


@dataclass(frozen=True)
class View:
    """A 2D picture of a volume in display order, and how voxels map onto it."""

    image: np.ndarray
    """Displayed pixels: row 0 at the top, column 0 on the left."""
    pixel_mm: tuple[float, float]
    """(height, width) of one displayed pixel in mm."""
    letters: dict
    """Patient direction at each edge: keys top, bottom, left, right."""
    axes: tuple[int, int]
    """Array axes shown down and across (index 0, row 1, col 2)."""
    flips: tuple[bool, bool]
    sizes: tuple[int, int]
    fixed_axis: int

    def place(self, irc: Sequence[float]) -> tuple[float, float]:
        """Display (x = column, y = row) of a voxel position (index, row, col)."""
        (down, across), (flip_down, flip_across), (n_down, n_across) = self.axes, self.flips, self.sizes
        y = irc[down] if not flip_down else n_down - 1 - irc[down]
        x = irc[across] if not flip_across else n_across - 1 - irc[across]
        return float(x), float(y)


def view(volume: np.ndarray, geometry, plane: str, index: int | None = None, *, project: str | None = None) -> View:
    """The ``plane`` ("axial", "coronal", "sagittal") of ``volume`` through array position ``index``
    along the plane's normal (default: the middle), or its projection (``project="max"``)."""
    normal, (right_axis, right_sign), (down_axis, down_sign) = PLANES[plane]
    dirs = _axis_directions(geometry)
    of = _axis_of_patient_axis(dirs)
    fixed, across, down = of[normal], of[right_axis], of[down_axis]
    if project == "max":
        image = volume.max(axis=fixed)
    else:
        k = volume.shape[fixed] // 2 if index is None else int(np.clip(index, 0, volume.shape[fixed] - 1))
        image = np.take(volume, k, axis=fixed)
    kept = [a for a in range(3) if a != fixed]
    if kept.index(down) != 0:
        image = image.T
    flip_across = dirs[across, right_axis] * right_sign < 0
    flip_down = dirs[down, down_axis] * down_sign < 0
    if flip_down:
        image = image[::-1]
    if flip_across:
        image = image[:, ::-1]
    right = dirs[across] * (-1 if flip_across else 1)
    below = dirs[down] * (-1 if flip_down else 1)
    letters = {"right": orientation_letters(right), "left": orientation_letters(-right),
               "bottom": orientation_letters(below), "top": orientation_letters(-below)}
    spacing = geometry.spacing_irc
    return View(np.ascontiguousarray(image), (spacing[down], spacing[across]), letters, (down, across),
                (bool(flip_down), bool(flip_across)), (volume.shape[down], volume.shape[across]), fixed)


# ------------------------------------------------------------------ drawing

_OUTLINE = [patheffects.withStroke(linewidth=2.5, foreground="black")]


def _annotate(ax, v: View, *, window: tuple[float, float] | None, bar_mm: float, fontsize: int = 9) -> None:
    """Orientation letters, window and a scale bar on a panel showing ``v`` (axes in pixels)."""
    style = dict(color="white", fontsize=fontsize, fontweight="bold", path_effects=_OUTLINE)
    ax.text(0.5, 0.985, v.letters["top"], transform=ax.transAxes, ha="center", va="top", **style)
    ax.text(0.5, 0.015, v.letters["bottom"], transform=ax.transAxes, ha="center", va="bottom", **style)
    ax.text(0.012, 0.5, v.letters["left"], transform=ax.transAxes, ha="left", va="center", **style)
    ax.text(0.988, 0.5, v.letters["right"], transform=ax.transAxes, ha="right", va="center", **style)
    small = dict(style, fontsize=max(fontsize - 2, 6), fontweight="normal")
    if window is not None:
        lo, hi = window
        ax.text(0.985, 0.03, f"W {hi - lo:.0f} L {(hi + lo) / 2:.0f}", transform=ax.transAxes, ha="right",
                va="bottom", **small)
    # scale bar: bar_mm long in the horizontal pixel units, bottom left
    x_lo, x_hi = sorted(ax.get_xlim())
    y_lo, y_hi = sorted(ax.get_ylim())
    length = bar_mm / v.pixel_mm[1]
    x0 = x_lo + 0.05 * (x_hi - x_lo)
    y0 = y_hi - 0.07 * (y_hi - y_lo)
    ax.plot([x0, x0 + length], [y0, y0], color="white", lw=2.5, solid_capstyle="butt",
            path_effects=[patheffects.withStroke(linewidth=4, foreground="black")])
    ax.text(x0 + length / 2, y0 - 0.015 * (y_hi - y_lo), f"{bar_mm:g} mm", ha="center", va="bottom", **small)


def _png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def _crop(v: View, center_xy: tuple[float, float], half_mm: float) -> tuple[np.ndarray, float, float]:
    """The part of ``v`` within ``half_mm`` of a display point: (pixels, x offset, y offset)."""
    cx, cy = center_xy
    hx = max(1, int(round(half_mm / v.pixel_mm[1])))
    hy = max(1, int(round(half_mm / v.pixel_mm[0])))
    x0, y0 = max(0, int(round(cx)) - hx), max(0, int(round(cy)) - hy)
    x1 = min(v.image.shape[1], int(round(cx)) + hx + 1)
    y1 = min(v.image.shape[0], int(round(cy)) + hy + 1)
    return v.image[y0:y1, x0:x1], x0, y0


def _show(ax, pixels: np.ndarray, v: View, x0: float, y0: float, **kwargs) -> object:
    h, w = pixels.shape
    # extent in full-view pixel coordinates, so that `View.place` positions need no shift
    return ax.imshow(pixels, extent=(x0 - 0.5, x0 + w - 0.5, y0 + h - 0.5, y0 - 0.5), interpolation="nearest",
                     aspect=v.pixel_mm[0] / v.pixel_mm[1], **kwargs)


def _nodule_ring(ax, v: View, nodule, *, color: str, dashed: bool = False, margin_mm: float = 0.0) -> None:
    x, y = v.place(nodule.center_irc)
    r = nodule.diameter_mm / 2 + margin_mm
    ax.add_patch(Ellipse((x, y), 2 * r / v.pixel_mm[1], 2 * r / v.pixel_mm[0], fill=False, color=color, lw=1.2,
                         ls="--" if dashed else "-"))


# Where a ring's label may go, tried in this order: right, left, above, below, then the diagonals.
_LABEL_DIRECTIONS = ((1, 0), (-1, 0), (0, -1), (0, 1), (1, -1), (-1, -1), (1, 1), (-1, 1))


def label_spots(rings: Sequence[tuple[float, float, float]], sizes: Sequence[tuple[float, float]], *,
                gap: float = 2.0) -> list[tuple[float, float]]:
    """Centres for the labels of ``rings`` ((x, y, radius) each) of ``sizes`` ((width, height)), one unit for all.

    Greedy, in the given order: each label takes the first spot beside its ring,
    ``gap`` away from it (`_LABEL_DIRECTIONS`, then again twice and three times as far),
    whose box overlaps no label already placed and no other ring's disc; where none is
    free, the first spot (right of the ring).
    """
    placed: list[tuple[float, float, float, float]] = []  # boxes: x0, y0, x1, y1
    spots = []
    for i, ((x, y, r), (w, h)) in enumerate(zip(rings, sizes)):
        options = [(x + dx * (r + gap * k + w / 2), y + dy * (r + gap * k + h / 2))
                   for k in (1, 2, 3) for dx, dy in _LABEL_DIRECTIONS]
        spot = options[0]
        for cx, cy in options:
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            clear = all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed)
            # a disc and a box are apart when the disc's centre is farther than its radius from the box
            clear = clear and all(
                np.hypot(ox - np.clip(ox, box[0], box[2]), oy - np.clip(oy, box[1], box[3])) >= orr
                for j, (ox, oy, orr) in enumerate(rings) if j != i)
            if clear:
                spot = (cx, cy)
                break
        spots.append(spot)
        placed.append((spot[0] - w / 2, spot[1] - h / 2, spot[0] + w / 2, spot[1] + h / 2))
    return spots


def nodule_picture(ct, nodule, *, title: str = "", half_width_mm: float = HALF_WIDTH_MM,
                   window: tuple[float, float] = LUNG_WINDOW) -> bytes:
    """Axial, coronal and sagittal crops through ``nodule``, with a circle of its diameter."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for ax, plane in zip(axes, ("axial", "coronal", "sagittal")):
        v = _view_through(ct, plane, nodule.center_irc)
        pixels, x0, y0 = _crop(v, v.place(nodule.center_irc), half_width_mm)
        _show(ax, pixels, v, x0, y0, cmap="gray", vmin=window[0], vmax=window[1])
        _nodule_ring(ax, v, nodule, color="red" if nodule.accepted else "yellow", dashed=not nodule.accepted)
        ax.set_title(plane)
        ax.set_xticks([])
        ax.set_yticks([])
        _annotate(ax, v, window=window, bar_mm=10)
    x, y, z = nodule.center_xyz
    pm = "n/a" if nodule.p_malignant is None else f"{nodule.p_malignant:.2f}"
    fig.suptitle(f"{title}  xyz ({x:.1f}, {y:.1f}, {z:.1f}) mm LPS  d {nodule.diameter_mm:.1f} mm  "
                 f"p(nodule) {nodule.p_nodule:.2f}  p(malignant) {pm}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _view_through(ct, plane: str, center_irc: Sequence[float]) -> View:
    fixed = _axis_of_patient_axis(_axis_directions(ct.geometry))[PLANES[plane][0]]
    return view(ct.hu, ct.geometry, plane, int(round(center_irc[fixed])))


def thumbnail(ct, nodule, *, half_width_mm: float = 20.0, size_in: float = 1.6,
              window: tuple[float, float] = LUNG_WINDOW) -> bytes:
    """A small axial crop around ``nodule`` with its circle (for the HTML table)."""
    v = _view_through(ct, "axial", nodule.center_irc)
    pixels, x0, y0 = _crop(v, v.place(nodule.center_irc), half_width_mm)
    fig = plt.figure(figsize=(size_in, size_in))
    ax = fig.add_axes((0, 0, 1, 1))
    _show(ax, pixels, v, x0, y0, cmap="gray", vmin=window[0], vmax=window[1])
    _nodule_ring(ax, v, nodule, color="red" if nodule.accepted else "yellow", dashed=not nodule.accepted,
                 margin_mm=1.5)
    ax.set_axis_off()
    _annotate(ax, v, window=None, bar_mm=10, fontsize=7)
    return _png(fig, dpi=80)


def _overview_label_spots(fig, ax, v: View, nodules, *, fontsize: float, ring_margin_mm: float
                          ) -> list[tuple[float, float]]:
    """`label_spots` for the overview's numbers, in display pixels (x, y) of ``v``, worked out in mm."""
    if not nodules:
        return []
    # mm per typographic point: the image fills the panel's width or its height, whichever binds
    height_mm, width_mm = (size * mm for size, mm in zip(v.image.shape, v.pixel_mm))
    box = ax.get_position()
    mm_per_pt = max(width_mm / (box.width * fig.get_figwidth() * 72), height_mm / (box.height * fig.get_figheight() * 72))
    rings, sizes = [], []
    for number, n in nodules:
        x, y = v.place(n.center_irc)
        rings.append((x * v.pixel_mm[1], y * v.pixel_mm[0], n.diameter_mm / 2 + ring_margin_mm))
        # bold digits are about 0.65 em wide and 1 em high
        sizes.append((0.65 * fontsize * len(str(number)) * mm_per_pt, fontsize * mm_per_pt))
    return [(x / v.pixel_mm[1], y / v.pixel_mm[0]) for x, y in label_spots(rings, sizes, gap=1.5)]


def overview_picture(ct, nodules: Sequence[tuple[int, object]], *, probabilities: np.ndarray | None = None,
                     title: str = "", candidates: bool = False) -> bytes:
    """Axial MIP with ``nodules`` ((number, nodule) pairs) circled and numbered, beside the
    probability MIP with its colour bar. ``candidates``: they are rejected candidates (dashed)."""
    window = (-1000, 1000)  # a projection is dominated by bone and vessels: a wider window than the slices'
    n_panels = 2 if probabilities is not None else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(6.2 * n_panels, 6.6), squeeze=False)
    axes = axes[0]
    v = view(ct.hu, ct.geometry, "axial", project="max")
    _show(axes[0], v.image, v, 0, 0, cmap="gray", vmin=window[0], vmax=window[1])
    axes[0].set_title("axial maximum-intensity projection (HU)")
    _annotate(axes[0], v, window=window, bar_mm=50)
    if probabilities is not None:
        pv = view(probabilities, ct.geometry, "axial", project="max")
        shown = _show(axes[1], pv.image.astype(np.float32), pv, 0, 0, cmap="magma", vmin=0, vmax=1)
        axes[1].set_title("segmentation: highest p(nodule) along the slices")
        bar = fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.03)
        bar.set_label("p(nodule), segmentation")
        _annotate(axes[1], pv, window=None, bar_mm=50)
    color = "yellow" if candidates else "cyan"
    margin_mm, fontsize = 4.0, 10  # rings a little wider than the nodule; the numbers as the spots reckon them
    spots = _overview_label_spots(fig, axes[0], v, nodules, fontsize=fontsize, ring_margin_mm=margin_mm)
    for ax in axes:
        for (number, n), (x, y) in zip(nodules, spots):
            _nodule_ring(ax, v, n, color=color, dashed=candidates, margin_mm=margin_mm)
            ax.text(x, y, str(number), color=color, fontsize=fontsize, fontweight="bold", ha="center", va="center",
                    path_effects=_OUTLINE)
        ax.set_xticks([])
        ax.set_yticks([])
    if candidates and nodules:
        title += f"\nno nodule accepted: the {len(nodules)} most probable candidates (rejected) are dashed"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)
