"""Text and data from a `Diagnosis`: the numbering, the table, report.json, nodules.csv rows.

Numbering (`numbered`): accepted nodules first, then the rejected detections, each
group by p(nodule), highest first; nodule 1 is the most probable accepted one. The
console table, ``report.json`` (its ``nodules`` list, in this order, each with its
``number``), ``nodules.csv``, ``nodule_<k>.png``, the overview's labels, the label
map, the DICOM SEG's segment numbers and ``report.html`` all use these numbers.

``nodules.csv`` is in the LUNA16 results format (``seriesuid,coordX,coordY,coordZ,
probability``) and holds **every** classified detection with ``probability =
p_nodule``, accepted or not, so that an evaluation (``luna evaluate``) can sweep the
threshold itself; the table and the verdict only use accepted nodules.

``report.json`` also states the luna version, when it was written, the coordinate
convention (`COORDINATES`), the models and their provenance (`luna.runs.Provenance`)
with the warnings every report shows first (`luna.runs.provenance_warnings`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from typing import Sequence

import luna
from luna.inference.pipeline import Nodule

__all__ = [
    "COORDINATES",
    "REPORT_FORMAT_VERSION",
    "count_line",
    "dumps",
    "format_provenance",
    "format_table",
    "nodule_from_dict",
    "numbered",
    "report_dict",
    "reported_nodules",
    "results_rows",
    "top_candidates",
]

REPORT_FORMAT_VERSION = 2
"""2: nodules in table order with their ``number``; version, time, coordinates, provenance."""

COORDINATES = {
    "center_xyz": "patient coordinates in mm, LPS (x towards the patient's left, y posterior, z superior), "
                  "as DICOM and the LUNA16 CSVs",
    "center_irc": "voxel (index, row, col) of the CT as read, continuous; index = slice",
    "system": "LPS",
    "units": "mm",
}

TOP_CANDIDATES = 5
"""Rejected detections pictured when no nodule is accepted."""


def numbered(diagnosis) -> list[tuple[int, Nodule]]:
    """Every detection with its number (1-based): accepted first, then rejected, each by p(nodule)."""
    order = sorted(diagnosis.nodules, key=lambda n: (not n.accepted, -n.p_nodule))
    return list(enumerate(order, 1))


def reported_nodules(diagnosis) -> list[tuple[int, Nodule]]:
    """The accepted nodules with their numbers (1..k): the table's rows and the pictures."""
    return [(k, n) for k, n in numbered(diagnosis) if n.accepted]


def top_candidates(diagnosis, count: int = TOP_CANDIDATES) -> list[tuple[int, Nodule]]:
    """The most probable rejected detections, shown when no nodule is accepted (else [])."""
    if diagnosis.accepted:
        return []
    return numbered(diagnosis)[:count]


def format_table(diagnosis, *, show_all: bool = False) -> str:
    """One row per accepted nodule (every detection with ``show_all``), numbered as everywhere."""
    rows = numbered(diagnosis) if show_all else reported_nodules(diagnosis)
    head = (f"{'#':>3}  {'x mm':>8} {'y mm':>8} {'z mm':>8}  {'i':>6} {'r':>6} {'c':>6}  {'diam mm':>7}  "
            f"{'p(nodule)':>9}  {'p(malig.)':>9}")
    lines = [head, "-" * len(head)]
    for number, n in rows:
        pm = "n/a" if n.p_malignant is None else f"{n.p_malignant:.3f}"
        x, y, z = n.center_xyz
        i, r, c = n.center_irc
        mark = "" if n.accepted else "  (rejected)"
        lines.append(
            f"{number:>3}  {x:8.1f} {y:8.1f} {z:8.1f}  {i:6.1f} {r:6.1f} {c:6.1f}  {n.diameter_mm:7.1f}  "
            f"{n.p_nodule:9.3f}  {pm:>9}{mark}"
        )
    if not rows:
        lines.append("  (no nodule above the nodule threshold)")
    return "\n".join(lines)


def format_provenance(provenance: Sequence, warnings: Sequence[str]) -> str:
    """The lines every console report starts with: what the models learnt from, then the warnings."""
    lines = ["models:"] + [f"  {p.describe()}" for p in provenance]
    lines += [f"WARNING: {w}" for w in warnings]
    return "\n".join(lines)


def count_line(detections: int, merged: int, accepted: int, nodule_threshold: float) -> str:
    """The count line of the console and report.html:
    'N detection(s) (M overlapping duplicate(s) merged into them), K accepted at p(nodule) >= T'."""
    duplicates = f" ({merged} overlapping duplicate(s) merged into them)" if merged else ""
    return f"{detections} detection(s){duplicates}, {accepted} accepted at p(nodule) >= {nodule_threshold}"


def results_rows(diagnosis) -> list[tuple]:
    """``nodules.csv`` rows, in the numbering's order."""
    return [(diagnosis.series_uid, *n.center_xyz, n.p_nodule) for _, n in numbered(diagnosis)]


def nodule_from_dict(entry: dict) -> Nodule:
    """A `Nodule` back from report.json (extra keys such as ``number`` ignored)."""
    names = {f.name for f in fields(Nodule)}
    values = {k: v for k, v in entry.items() if k in names}
    for key in ("center_xyz", "center_irc"):
        values[key] = tuple(values[key])
    return Nodule(**values)


def report_dict(diagnosis, *, source: str, ct, model_paths, thresholds: dict, provenance: Sequence = (),
                warnings: Sequence[str] = (), ct_is_synthetic: bool | None = None, files: dict | None = None) -> dict:
    g = ct.geometry
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "luna_version": luna.__version__,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input": source,
        "series_uid": diagnosis.series_uid,
        "ct_is_synthetic": ct_is_synthetic,
        "coordinates": COORDINATES,
        "geometry": {
            "shape_irc": list(ct.hu.shape),
            "origin_xyz": list(g.origin_xyz),
            "spacing_xyz": list(g.spacing_xyz),
            "direction": list(g.direction),
        },
        "models": {k: (str(v) if v is not None else None) for k, v in asdict(model_paths).items()},
        "provenance": [asdict(p) for p in provenance],
        "warnings": list(warnings),
        "thresholds": thresholds,
        "verdict": diagnosis.verdict,
        "malignancy_assessed": diagnosis.malignancy_assessed,
        "malignancy_source": diagnosis.malignancy_source,
        "classifier_views": diagnosis.views,
        "reported": len(diagnosis.accepted),
        "duplicates_merged": len(diagnosis.duplicates),
        "nodules": [{"number": k, **asdict(n)} for k, n in numbered(diagnosis)],
        "timings_s": {k: round(v, 3) for k, v in diagnosis.timings.items()},
        "files": files or {},
    }


def dumps(obj) -> str:
    """JSON text; a NaN or infinity (which JSON cannot hold) is a bug upstream and raises ValueError."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"
