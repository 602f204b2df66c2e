"""PNG views of a synthetic scan with its findings marked, for a person to look at.

Images are shown in the radiological convention whatever the direction matrix:
patient right on the viewer's left, front at the top (axial), head at the top
(coronal). Annotated nodules are red circles, excluded findings yellow, and class 0
candidates small cyan dots on the axial views.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from luna.fileio import replacing

__all__ = ["write_preview"]


def write_preview(path: Path, scan) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle


    hu = scan.hu
    g = scan.geometry
    d = g.direction_matrix
    flip_c, flip_r = d[0, 0] < 0, d[1, 1] < 0
    sx, sy, sz = g.spacing_xyz
    findings = sorted(scan.findings, key=lambda f: (f.excluded, -f.diameter_mm))
    nz, ny, nx = hu.shape

    def to_view(irc):
        k, r, c = irc
        if flip_r:
            r = ny - 1 - r
        if flip_c:
            c = nx - 1 - c
        return k, r, c

    def axial(k):
        im = hu[k]
        if flip_r:
            im = im[::-1]
        if flip_c:
            im = im[:, ::-1]
        return im

    # Axial views through up to two findings (else through the middle of the lungs),
    # and one coronal view through the first finding.
    picks = [to_view(g.xyz_to_irc(f.center_xyz)) for f in findings[:2]]
    ks = [int(round(p[0])) for p in picks] or [nz // 2]
    if len(ks) < 2:
        ks.append(int(nz * 0.6))
    row = int(round(picks[0][1])) if picks else ny // 2 + ny // 16
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4), dpi=90)
    for ax, k in zip(axes[:2], ks):
        ax.imshow(axial(k), cmap="gray", vmin=-1000, vmax=400, interpolation="nearest")
        ax.set_title(f"axial slice {k} (z = {g.irc_to_xyz((k, 0, 0))[2]:.1f} mm)", fontsize=9)
        for c in scan.candidates:
            if c.is_nodule:
                continue
            kk, rr, cc = to_view(g.xyz_to_irc(c.xyz))
            if abs(kk - k) < 0.5:
                ax.plot(cc, rr, ".", color="c", markersize=2)
        for f in findings:
            kk, rr, cc = to_view(g.xyz_to_irc(f.center_xyz))
            half = f.radius / sz
            if abs(kk - k) <= max(half, 0.5):
                ax.add_patch(Circle((cc, rr), f.radius / sx + 4, fill=False, lw=1,
                                    color="y" if f.excluded else "r"))
    cor = hu[::-1, int(np.clip(row if not flip_r else ny - 1 - row, 0, ny - 1)), :]
    if flip_c:
        cor = cor[:, ::-1]
    ax = axes[2]
    ax.imshow(cor, cmap="gray", vmin=-1000, vmax=400, aspect=sz / sx, interpolation="nearest")
    ax.set_title(f"coronal row {row}", fontsize=9)
    for f in findings:
        kk, rr, cc = to_view(g.xyz_to_irc(f.center_xyz))
        if abs(rr - row) <= f.radius / sy:
            ax.add_patch(Circle((cc, nz - 1 - kk), f.radius / sx + 4, fill=False, lw=1,
                                color="y" if f.excluded else "r"))
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    kinds = ", ".join(f"{f.type} {f.diameter_mm:.1f} mm{' (excluded)' if f.excluded else ''}" for f in findings[:4])
    fig.suptitle(f"{scan.spec.series_uid[-12:]}  {nx}x{ny}x{nz}  spacing {sx:.2f}/{sz:.2f} mm  "
                 f"{'flipped' if flip_c else 'identity'}   {kinds}", fontsize=9)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
