"""LUNA16 annotations and candidates -> training samples; the hit rule; the series split.

The files and their columns are `luna.io.luna16`'s (readers, writers, records);
this module holds the rules that give the rows meaning.

Rules
-----
Hit rule. A point hits an annotated nodule when it lies in the same series and its
3D Euclidean distance to the nodule centre is strictly less than the nodule's radius
(``diameter_mm / 2``) -- the LUNA16 evaluation rule. `hit_pairs` gives every
(point, nodule) hit, so a point inside two nodules hits both (as in the challenge's
evaluation script); `match_annotations` gives each point one nodule, the nearest
(training labels and the diagnosis's confusion table need one answer per point).

`load_annotations` -- the annotated nodules. ``annotations.csv`` is the reference
list: it defines which nodules exist and their centres and diameters. When
``annotations_with_malignancy.csv`` is also present, each of its rows gives its
rating to at most one annotation and each annotation takes at most one rating:
pairs in the same series whose distance is below the annotation's radius are
formed one-to-one, nearest first. On the real files, 1,182 of the 1,186 annotations
find a rating row at a distance below 1e-6 mm (the malignancy file copies their
coordinates, up to float printing) and all 1,182 rating rows are used (378
malignant, 804 benign). The other 4 annotations keep ``is_malignant=None``: two lie
in a series the malignancy file does not mention; two lie farther than their radius
from every rating row of their series (the nearest are 10.9 mm and 96.7 mm away, and
are exact copies of other nodules). A rating row that matches no annotation is
dropped with a warning. Either file alone works; ``is_malignant`` is None for
every nodule read from ``annotations.csv`` alone.

`load_candidate_infos` -- one record per training sample:

- Every annotated nodule is a positive (``is_nodule=True``, ``has_annotation=True``,
  centre and diameter from the annotation, ``is_malignant`` from its rating, False
  when unknown), whether or not a candidate row hits it.
- Candidate rows that hit an annotated nodule are dropped: a class-1 row is already
  represented by the nodule's record, and a class-0 row would put a negative
  label on a nodule.
- The other class-1 rows are positives without annotation (``has_annotation=False``,
  ``diameter_mm=0.0``, ``is_malignant=False``); the other class-0 rows are negatives.
- ``candidates_V2.csv`` is used when present, else ``candidates.csv``. Without
  either, the annotations give the positives and a warning says there are no
  negatives.
- With ``series_uids`` (the scans on disk), records of other series are dropped and
  one INFO line counts them (a partial download is normal); if no series of the
  CSVs is on disk, the CSVs and the scans do not belong together: `LunaError`.
- Order: positives first, then larger diameter first, then series uid, then x, y, z.

`split_series` splits by series, never by candidate, so that no scan is in both
training and validation.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from luna.errors import LunaError
from luna.io.luna16 import (
    ANNOTATIONS_FILE,
    CANDIDATES_FILES,
    EXCLUDED_FILE,
    MALIGNANCY_FILE,
    Annotation,
    Candidate,
    CandidateColumns,
    PathArg,
    gc_paused,
    read_annotations,
    read_candidate_columns,
    read_excluded_annotations,
    read_malignancy_annotations,
)

__all__ = [
    "Annotation",
    "Candidate",
    "CandidateInfo",
    "load_annotations",
    "hit_pairs",
    "load_candidate_infos",
    "load_excluded",
    "match_annotations",
    "split_series",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateInfo:
    """One training sample: a positive (annotated or not) or a negative."""

    series_uid: str
    center_xyz: tuple[float, float, float]
    is_nodule: bool
    has_annotation: bool
    is_malignant: bool
    diameter_mm: float


# ----------------------------------------------------------------------- hit rule


def _series_codes(uids: Iterable[str], code_of: dict[str, int], count: int) -> np.ndarray:
    """Small integer per series uid (``code_of`` grows as new uids appear)."""
    return np.fromiter(
        (code_of.setdefault(uid, len(code_of)) for uid in uids), dtype=np.int64, count=count
    )


def _hit_pairs(
    point_codes: np.ndarray,
    point_xyz: np.ndarray,
    nodule_codes: np.ndarray,
    nodule_xyz: np.ndarray,
    nodule_radius: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (point, nodule, distance) of a point strictly inside a nodule of its series."""
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if len(point_codes) and len(nodule_codes):
        order = np.argsort(point_codes, kind="stable")
        sorted_codes = point_codes[order]
        for code in np.unique(nodule_codes):
            start, stop = np.searchsorted(sorted_codes, [code, code + 1])
            if start == stop:
                continue
            points = order[start:stop]
            nodules = np.flatnonzero(nodule_codes == code)
            distance = np.linalg.norm(point_xyz[points, None, :] - nodule_xyz[None, nodules, :], axis=2)
            i, j = np.nonzero(distance < nodule_radius[nodules])
            found.append((points[i], nodules[j], distance[i, j]))
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
    points, nodules, distances = (np.concatenate(parts) for parts in zip(*found))
    return points, nodules, distances


def _match(
    point_codes: np.ndarray,
    point_xyz: np.ndarray,
    nodule_codes: np.ndarray,
    nodule_xyz: np.ndarray,
    nodule_radius: np.ndarray,
) -> np.ndarray:
    """For each point, the index of the nearest nodule it hits, or -1 (see the hit rule)."""
    result = np.full(len(point_codes), -1, dtype=np.int64)
    points, nodules, distance = _hit_pairs(point_codes, point_xyz, nodule_codes, nodule_xyz, nodule_radius)
    # Nearest first; at equal distance the nodule listed first.
    order = np.lexsort((nodules, distance, points))
    points, nodules = points[order], nodules[order]
    first = np.r_[True, points[1:] != points[:-1]] if len(points) else np.empty(0, bool)
    result[points[first]] = nodules[first]
    return result


def _annotation_arrays(
    annotations: Sequence[Annotation], code_of: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    codes = _series_codes((a.series_uid for a in annotations), code_of, len(annotations))
    xyz = np.array([a.center_xyz for a in annotations], dtype=np.float64).reshape(-1, 3)
    radius = np.array([a.diameter_mm for a in annotations], dtype=np.float64) / 2
    return codes, xyz, radius


def match_annotations(
    series_uids: Sequence[str],
    centers_xyz: np.ndarray | Sequence[Sequence[float]],
    annotations: Sequence[Annotation],
) -> np.ndarray:
    """Index into ``annotations`` of the nodule each point hits, -1 where none.

    Point ``i`` is ``(series_uids[i], centers_xyz[i])``. It hits an annotation of
    the same series whose centre is strictly closer than ``diameter_mm / 2``; with
    several, the nearest wins.
    """
    return _match(*_point_and_nodule_arrays(series_uids, centers_xyz, annotations))


def hit_pairs(
    series_uids: Sequence[str],
    centers_xyz: np.ndarray | Sequence[Sequence[float]],
    annotations: Sequence[Annotation],
) -> tuple[np.ndarray, np.ndarray]:
    """Every hit as (point index, annotation index) arrays: a point inside several nodules hits each.

    Pairs are ordered by point, then by annotation.
    """
    points, nodules, _ = _hit_pairs(*_point_and_nodule_arrays(series_uids, centers_xyz, annotations))
    order = np.lexsort((nodules, points))
    return points[order], nodules[order]


def _point_and_nodule_arrays(series_uids, centers_xyz, annotations):
    code_of: dict[str, int] = {}
    nodule_codes, nodule_xyz, radius = _annotation_arrays(annotations, code_of)
    point_codes = _series_codes(series_uids, code_of, len(series_uids))
    point_xyz = np.asarray(centers_xyz, dtype=np.float64).reshape(-1, 3)
    return point_codes, point_xyz, nodule_codes, nodule_xyz, radius


# ----------------------------------------------------------------------- annotations


def load_excluded(data_dir: PathArg) -> list[Annotation]:
    """The excluded findings of ``data_dir`` (``annotations_excluded.csv``; [] when absent).

    Detections on them count neither as hits nor as false positives.
    """
    path = Path(data_dir) / EXCLUDED_FILE
    return read_excluded_annotations(path) if path.is_file() else []


def load_annotations(data_dir: PathArg) -> list[Annotation]:
    """The annotated nodules of ``data_dir``, with malignancy where a rating is known.

    Reads ``annotations.csv`` and/or ``annotations_with_malignancy.csv`` and merges
    them as the module docstring describes; order is that of ``annotations.csv``
    (of the malignancy file when it is alone).
    """
    annotations = _load_annotations_if_any(Path(data_dir))
    if annotations is None:
        raise LunaError(
            f"{data_dir}: found neither {ANNOTATIONS_FILE} nor {MALIGNANCY_FILE}; put "
            f"the LUNA16 annotation files in that directory or pass the directory "
            f"that holds them."
        )
    return annotations


def _load_annotations_if_any(data_dir: Path) -> list[Annotation] | None:
    plain_path = data_dir / ANNOTATIONS_FILE
    rated_path = data_dir / MALIGNANCY_FILE
    if plain_path.exists() and rated_path.exists():
        return _merge_ratings(
            read_annotations(plain_path), read_malignancy_annotations(rated_path), rated_path
        )
    if plain_path.exists():
        return read_annotations(plain_path)
    if rated_path.exists():
        return read_malignancy_annotations(rated_path)
    return None


def _merge_ratings(
    annotations: list[Annotation], rated: list[Annotation], rated_path: Path
) -> list[Annotation]:
    """Give each annotation the rating of its one-to-one, nearest-first partner row."""
    code_of: dict[str, int] = {}
    codes, xyz, radius = _annotation_arrays(annotations, code_of)
    rated_codes, rated_xyz, _ = _annotation_arrays(rated, code_of)
    partner = np.full(len(annotations), -1, dtype=np.int64)
    taken = np.zeros(len(rated), dtype=bool)
    # The rating rows are the points, the annotations the nodules of the hit rule.
    rows, nodules, distance = _hit_pairs(rated_codes, rated_xyz, codes, xyz, radius)
    # Greedy nearest-first; equal distances in file order (annotation, then rating row).
    for k in np.lexsort((rows, nodules, distance)):
        i, j = nodules[k], rows[k]
        if partner[i] < 0 and not taken[j]:
            partner[i] = j
            taken[j] = True
    merged = [
        annotation
        if j < 0
        else Annotation(
            annotation.series_uid,
            annotation.center_xyz,
            annotation.diameter_mm,
            rated[j].is_malignant,
            rated[j].malignancy_ratings,
        )
        for annotation, j in zip(annotations, partner.tolist())
    ]
    log.debug(
        "%d of %d annotations have a malignancy rating", int(taken.sum()), len(annotations)
    )
    if not taken.all():
        log.warning(
            "%s: %d rating row(s) match no nodule of %s (same series, closer than its "
            "radius) and are ignored",
            rated_path, int((~taken).sum()), ANNOTATIONS_FILE,
        )
    return merged


# ------------------------------------------------------------------------ candidates


def _find_candidates_file(data_dir: Path) -> Path | None:
    for name in CANDIDATES_FILES:
        if (data_dir / name).exists():
            return data_dir / name
    return None


@gc_paused()
def load_candidate_infos(
    data_dir: PathArg, series_uids: Collection[str] | None = None
) -> list[CandidateInfo]:
    """Positives and negatives for training, restricted to ``series_uids`` when given.

    The rules (hit rule, which rows are kept, order) are in the module docstring.
    """
    data_dir = Path(data_dir)
    annotations = _load_annotations_if_any(data_dir)
    candidates_path = _find_candidates_file(data_dir)
    if annotations is None and candidates_path is None:
        raise LunaError(
            f"{data_dir}: found no LUNA16 CSV files (expected {CANDIDATES_FILES[0]} or "
            f"{CANDIDATES_FILES[1]}, and {ANNOTATIONS_FILE}); put them in that directory "
            f"or pass the directory that holds them."
        )
    if annotations is None:
        log.warning(
            "%s: no %s or %s; class-1 candidates are positives without annotation, "
            "none has a diameter or malignancy", data_dir, ANNOTATIONS_FILE, MALIGNANCY_FILE,
        )
        annotations = []
    if candidates_path is None:
        log.warning(
            "%s: no %s or %s: the annotated nodules are the only samples, there are "
            "NO negatives", data_dir, *CANDIDATES_FILES,
        )
        candidates = CandidateColumns([], np.empty((0, 3)), np.empty(0, dtype=bool))
    else:
        candidates = read_candidate_columns(candidates_path)

    if series_uids is not None:
        candidates, annotations = _restrict(candidates, annotations, series_uids, data_dir)

    return _candidate_infos(annotations, candidates, data_dir)


def _candidate_infos(
    annotations: list[Annotation], candidates: CandidateColumns, data_dir: Path
) -> list[CandidateInfo]:
    """Apply the rules: all annotations, plus the candidate rows that hit no nodule."""
    code_of: dict[str, int] = {}
    ann_codes, ann_xyz, ann_radius = _annotation_arrays(annotations, code_of)
    cand_codes = _series_codes(candidates.series_uids, code_of, len(candidates.series_uids))
    hit = _match(cand_codes, candidates.center_xyz, ann_codes, ann_xyz, ann_radius) >= 0
    keep = ~hit
    kept = int(keep.sum())

    # Columns of the result: the annotations first, then the kept candidate rows.
    count = len(annotations)
    codes = np.concatenate([ann_codes, cand_codes[keep]])
    xyz = np.concatenate([ann_xyz, candidates.center_xyz[keep]])
    is_nodule = np.concatenate([np.ones(count, dtype=bool), candidates.is_nodule[keep]])
    has_annotation = np.arange(len(codes)) < count
    is_malignant = np.concatenate(
        [np.array([a.is_malignant is True for a in annotations], dtype=bool),
         np.zeros(kept, dtype=bool)]
    )
    diameter = np.concatenate(
        [np.array([a.diameter_mm for a in annotations], dtype=np.float64), np.zeros(kept)]
    )

    uid_of = sorted(code_of, key=code_of.__getitem__)
    rank = np.empty(len(uid_of), dtype=np.int64)
    rank[np.argsort(np.array(uid_of, dtype=object), kind="stable")] = np.arange(len(uid_of))
    # Sorting the columns is much faster than sorting records; lexsort's last key is first.
    order = np.lexsort((xyz[:, 2], xyz[:, 1], xyz[:, 0], rank[codes], -diameter, ~is_nodule))

    records = [
        CandidateInfo(uid_of[code], tuple(center), nodule, annotated, malignant, size)
        for code, center, nodule, annotated, malignant, size in zip(
            codes[order].tolist(),
            xyz[order].tolist(),
            is_nodule[order].tolist(),
            has_annotation[order].tolist(),
            is_malignant[order].tolist(),
            diameter[order].tolist(),
        )
    ]
    log.debug(
        "%s: %d samples: %d annotated nodules, %d other class-1 candidates, %d negatives "
        "(%d candidate rows inside a nodule dropped)",
        data_dir, len(records), count, int(candidates.is_nodule[keep].sum()),
        int((~candidates.is_nodule[keep]).sum()), int(hit.sum()),
    )
    return records


def _restrict(
    candidates: CandidateColumns,
    annotations: list[Annotation],
    series_uids: Collection[str],
    data_dir: Path,
) -> tuple[CandidateColumns, list[Annotation]]:
    """Keep the records of the series on disk; log what the CSVs name beyond them."""
    present = set(series_uids)
    named = set(candidates.series_uids).union(a.series_uid for a in annotations)
    found = named & present
    if not found:
        raise LunaError(
            f"{data_dir}: the CSV files and the scans do not match: the CSVs name "
            f"{len(named)} series, none of which is among the {len(present)} series on "
            f"disk. Use the CSV files that belong to these scans (or the scans that "
            f"belong to these CSVs)."
        )
    keep = np.fromiter(
        (uid in present for uid in candidates.series_uids),
        dtype=bool, count=len(candidates.series_uids),
    )
    kept_annotations = [a for a in annotations if a.series_uid in present]
    if len(found) < len(named):
        log.info(
            "%s: the CSVs name %d series, %d of them are among the %d series on disk; "
            "dropped %d candidate rows and %d annotations of the other %d series "
            "(normal for a partial download)",
            data_dir, len(named), len(found), len(present), int((~keep).sum()),
            len(annotations) - len(kept_annotations), len(named) - len(found),
        )
    kept = CandidateColumns(
        [uid for uid, k in zip(candidates.series_uids, keep.tolist()) if k],
        candidates.center_xyz[keep],
        candidates.is_nodule[keep],
    )
    return kept, kept_annotations


# ---------------------------------------------------------------------------- split


def split_series(
    series_uids: Iterable[str], val_stride: int = 10, val_offset: int = 0
) -> tuple[list[str], list[str]]:
    """Split series into (training, validation) lists, deterministically, by series.

    The unique uids are sorted; positions ``val_offset, val_offset + val_stride, ...``
    go to validation, the rest to training. With two or more series both lists are
    non-empty: if the offset lies past the end, the last series is the validation
    one (a stride >= 2 always leaves a training series). A single series goes to
    training. Both lists are sorted.
    """
    if val_stride < 2:
        raise ValueError(f"val_stride must be >= 2, got {val_stride}")
    if not 0 <= val_offset < val_stride:
        raise ValueError(f"val_offset must be in [0, val_stride), got {val_offset}")
    uids = sorted(set(series_uids))
    if len(uids) < 2:
        return uids, []
    validation_positions = set(range(min(val_offset, len(uids) - 1), len(uids), val_stride))
    training = [uid for i, uid in enumerate(uids) if i not in validation_positions]
    validation = [uid for i, uid in enumerate(uids) if i in validation_positions]
    return training, validation
