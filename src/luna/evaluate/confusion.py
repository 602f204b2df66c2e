"""The diagnosis's confusion table: what happened to each annotated nodule and each detection.

Rows: non-nodule, benign, malignant (the truth); columns: complete miss, filtered
out (found by the segmentation, rejected by the classifier), predicted benign,
predicted malignant. ``luna.diagnose --run-validation`` prints one per series and in
total; the book's chapter 14 introduced it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from luna.annotations import Annotation, match_annotations

__all__ = ["CONFUSION_COLUMNS", "CONFUSION_ROWS", "confusion_json", "confusion_table", "format_confusion"]

CONFUSION_ROWS = ("non-nodule", "benign", "malignant")
CONFUSION_COLUMNS = ("complete miss", "filtered out", "pred. benign", "pred. malignant")


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
