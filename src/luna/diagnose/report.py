"""Text and files from a `Diagnosis`: the table, report.json, nodules.csv.

``nodules.csv`` is in the LUNA16 results format (``seriesuid,coordX,coordY,coordZ,
probability``) and holds **every** classified detection with ``probability =
p_nodule``, accepted or not, so that an evaluation (``luna.evaluate``) can sweep
the threshold itself; the table and the verdict only use accepted nodules.
"""

from __future__ import annotations

import json
from dataclasses import asdict

__all__ = ["dumps", "format_table", "report_dict", "reported_nodules", "results_rows"]


def format_table(diagnosis, *, show_all: bool = False) -> str:
    """One row per accepted nodule (all detections with ``show_all``), best p(nodule) first."""
    rows = [n for n in diagnosis.nodules if show_all or n.accepted]
    order = sorted(range(len(rows)), key=lambda k: -rows[k].p_nodule)
    head = f"{'#':>3}  {'x mm':>8} {'y mm':>8} {'z mm':>8}  {'i':>6} {'r':>6} {'c':>6}  {'diam mm':>7}  {'p(nodule)':>9}  {'p(malig.)':>9}"
    lines = [head, "-" * len(head)]
    for rank, k in enumerate(order, 1):
        n = rows[k]
        pm = "n/a" if n.p_malignant is None else f"{n.p_malignant:.3f}"
        x, y, z = n.center_xyz
        i, r, c = n.center_irc
        lines.append(
            f"{rank:>3}  {x:8.1f} {y:8.1f} {z:8.1f}  {i:6.1f} {r:6.1f} {c:6.1f}  {n.diameter_mm:7.1f}  {n.p_nodule:9.3f}  {pm:>9}"
        )
    if not rows:
        lines.append("  (no nodule above the nodule threshold)")
    return "\n".join(lines)


def reported_nodules(diagnosis) -> list:
    """Accepted nodules, highest p(nodule) first: the table's rows and the pictures' order."""
    return sorted(diagnosis.accepted, key=lambda n: -n.p_nodule)


def results_rows(diagnosis) -> list[tuple]:
    return [(diagnosis.series_uid, *n.center_xyz, n.p_nodule) for n in diagnosis.nodules]


def report_dict(diagnosis, *, source: str, ct, model_paths, thresholds: dict, files: dict | None = None) -> dict:
    g = ct.geometry
    return {
        "input": source,
        "series_uid": diagnosis.series_uid,
        "geometry": {
            "shape_irc": list(ct.hu.shape),
            "origin_xyz": list(g.origin_xyz),
            "spacing_xyz": list(g.spacing_xyz),
            "direction": list(g.direction),
        },
        "models": {k: (str(v) if v is not None else None) for k, v in asdict(model_paths).items()},
        "thresholds": thresholds,
        "verdict": diagnosis.verdict,
        "malignancy_assessed": diagnosis.malignancy_assessed,
        "nodules": [asdict(n) for n in diagnosis.nodules],
        "reported": len(diagnosis.accepted),
        "timings_s": {k: round(v, 3) for k, v in diagnosis.timings.items()},
        "files": files or {},
    }


def dumps(obj) -> str:
    """JSON text; a NaN or infinity (which JSON cannot hold) is a bug upstream and raises ValueError."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"
