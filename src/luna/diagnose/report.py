"""Text and files from a `Diagnosis`: the table, report.json, nodules.csv, the confusion table.

``nodules.csv`` is in the LUNA16 results format (``seriesuid,coordX,coordY,coordZ,
probability``) and holds **every** classified detection with ``probability =
p_nodule``, accepted or not, so that an evaluation (``luna.evaluate``) can sweep
the threshold itself; the table and the verdict only use accepted nodules.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from typing import Iterable, Sequence

import numpy as np

from luna.annotations import Annotation, match_annotations

__all__ = [
    "CONFUSION_COLUMNS",
    "CONFUSION_ROWS",
    "confusion_table",
    "format_confusion",
    "format_table",
    "nodules_csv_text",
    "report_dict",
]

RESULTS_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
CONFUSION_ROWS = ("non-nodule", "benign", "malignant")
CONFUSION_COLUMNS = ("complete miss", "filtered out", "pred. benign", "pred. malignant")


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


def nodules_csv_text(rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RESULTS_HEADER)
    for uid, x, y, z, p in rows:
        w.writerow([uid, repr(float(x)), repr(float(y)), repr(float(z)), f"{float(p):.6f}"])
    return buf.getvalue()


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


# ---------------------------------------------------------------------- validation


def confusion_table(
    series_uid: str,
    nodules: Sequence,
    annotations: Sequence[Annotation],
    *,
    malignancy_threshold: float = 0.5,
) -> np.ndarray:
    """3x4 counts (rows `CONFUSION_ROWS`, columns `CONFUSION_COLUMNS`) for one series.

    A detection hits an annotation of the same series closer than its radius
    (`match_annotations`). An annotation (malignant if ``is_malignant`` is True,
    else benign, None included) is a complete miss when no detection hits it,
    filtered out when hits exist but none was accepted, else predicted malignant
    when the highest p(malignant) of its accepted hits reaches the threshold and
    predicted benign otherwise (also when malignancy was not assessed). Detections
    hitting no annotation fill the non-nodule row the same way (never a complete miss).
    """
    table = np.zeros((3, 4), dtype=np.int64)
    annotations = [a for a in annotations if a.series_uid == series_uid]
    if nodules:
        hits = match_annotations([series_uid] * len(nodules), [n.center_xyz for n in nodules], annotations)
    else:
        hits = np.zeros(0, dtype=np.int64)

    def column(group: Sequence) -> int:
        if not group:
            return 0
        accepted = [n for n in group if n.accepted]
        if not accepted:
            return 1
        scores = [n.p_malignant for n in accepted if n.p_malignant is not None]
        return 3 if scores and max(scores) >= malignancy_threshold else 2

    for k, a in enumerate(annotations):
        row = 2 if a.is_malignant is True else 1
        table[row, column([n for n, h in zip(nodules, hits) if h == k])] += 1
    for n, h in zip(nodules, hits):
        if h < 0:
            table[0, column([n])] += 1
    return table


def format_confusion(table: np.ndarray, title: str = "") -> str:
    width = max(len(c) for c in CONFUSION_COLUMNS) + 1
    lines = [title] if title else []
    lines.append(f"{'':>11}" + "".join(f"{c:>{width}}" for c in CONFUSION_COLUMNS))
    for name, row in zip(CONFUSION_ROWS, table):
        cells = ["-" if (name == "non-nodule" and j == 0) else str(int(v)) for j, v in enumerate(row)]
        lines.append(f"{name:>11}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def confusion_json(per_series: dict[str, np.ndarray]) -> dict:
    total = sum(per_series.values(), np.zeros((3, 4), dtype=np.int64))
    as_dict = lambda t: {r: dict(zip(CONFUSION_COLUMNS, map(int, row))) for r, row in zip(CONFUSION_ROWS, t)}
    return {"rows": list(CONFUSION_ROWS), "columns": list(CONFUSION_COLUMNS),
            "total": as_dict(total), "series": {u: as_dict(t) for u, t in per_series.items()}}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2) + "\n"
