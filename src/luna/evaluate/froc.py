"""LUNA16 detection evaluation: FROC curve, CPM and its bootstrap interval.

Inputs
------
- A results CSV, ``seriesuid,coordX,coordY,coordZ,probability`` (what
  ``luna diagnose`` writes as ``nodules.csv`` per CT / ``results.csv`` per batch),
  read by `luna.io.luna16.read_results` with the checks of every LUNA16 reader (header, numbers,
  ``file:line`` in every message).
- ``annotations.csv`` (the nodules) and ``annotations_excluded.csv`` (irrelevant
  findings), read by `luna.io.luna16.read_annotations` and
  `luna.io.luna16.read_excluded_annotations`.
- The scans evaluated: a file with one series uid per line (`luna.io.luna16.read_series_list`;
  blank lines and ``#`` comments skipped), by default the series present in the
  results plus those annotated.

Rules
-----
- Scan set. Only the evaluated scans count: detections and nodules of other series
  are dropped (and counted as ``outside``). FP per scan divides by the number of
  evaluated scans, including scans without nodules or without detections.
- Mark cap (optional, ``max_marks_per_scan``; the challenge used 100). Before
  matching, each scan keeps its N most probable detections. Ties in probability
  are broken by (x, y, z) ascending, so the result never depends on row order.
The defaults are the challenge's evaluation script (noduleCADEvaluationLUNA16.py)
rule for rule; the two places where luna used to differ are options.

- Hit. A detection hits a finding of its series when its 3D distance to the
  finding's centre is strictly less than the radius (``diameter_mm / 2``).
- Nodules first. A detection that hits an annotated nodule is a hit of that
  nodule, even if it also hits an excluded finding. A detection inside several
  nodules hits each of them (`luna.annotations.hit_pairs`), as in the script
  (which prints "CAD mark ... detected two nodules" and counts it for both); it is
  counted in ``marks_on_several_nodules``. ``nearest_nodule_only=True``
  (``--nearest-nodule-only``) gives it to the nearest nodule only
  (`luna.annotations.match_annotations`), luna's former rule.
- Excluded findings. A detection that hits no nodule but hits an excluded finding
  is ignored. An excluded finding with a negative diameter (the file uses -1 for
  "no size") gets ``EXCLUDED_DEFAULT_DIAMETER_MM`` (10 mm, a 5 mm radius); one of
  diameter 0 keeps it, so no detection is ever strictly inside it, as in the
  script. ``zero_size_excluded_default=True`` (``--zero-size-excluded-default``)
  gives the 10 mm to diameter 0 as well, luna's former rule.
- Several hits on one nodule: the most probable is the nodule's mark (a true
  positive at that probability); the others are ignored, never false positives
  (``ignored_double_hits`` counts them as the script does: hits per detected
  nodule, minus one).
- Every other detection is a false positive. A nodule without a hit is missed: it
  stays in the denominator of the sensitivity.

FROC curve
----------
The retained marks (one per detected nodule, every false positive) are swept by
threshold, from +inf down: one point per distinct probability, all marks of equal
probability entering together (so ties cannot depend on row order). A point is
``(FP / scans, TP / nodules)`` with the threshold that produced it; the curve starts
at (0, 0) with threshold +inf. No nodules: sensitivity is 0 everywhere.

CPM
---
Mean sensitivity at ``FROC_RATES`` = 1/8, 1/4, 1/2, 1, 2, 4, 8 FP per scan.

- ``cpm`` (the challenge's figure): sensitivity read off the curve by linear
  interpolation between its consecutive points. Where the curve is vertical at
  the rate (several points with exactly that FP rate), the highest of them; past
  the curve's last point (it never reaches that FP rate), its last sensitivity.
- ``cpm_step`` (the figure of a widely copied script): the sensitivity at the
  smallest curve FP rate >= the rate (the highest sensitivity at that FP rate);
  the last sensitivity if the curve does not reach the rate. Never below ``cpm``.

Confidence interval: ``bootstrap_draws`` (1,000) resamplings of the scans with
replacement (seeded ``numpy.random.Generator``); each draw recomputes the whole
curve and the CPM, vectorised over draws; the interval is the 2.5 and 97.5
percentiles (draws without a nodule are left out).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from luna.annotations import Annotation, hit_pairs, match_annotations
from luna.errors import LunaError
from luna.io.luna16 import Results

__all__ = [
    "EXCLUDED_DEFAULT_DIAMETER_MM",
    "FROC_RATES",
    "FrocCurve",
    "FrocResult",
    "Marks",
    "bootstrap_cpm",
    "cpm_from_curve",
    "evaluate_froc",
    "format_ci",
    "froc_curve",
    "interval",
    "match_marks",
    "sized_excluded",
]

log = logging.getLogger(__name__)

FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
EXCLUDED_DEFAULT_DIAMETER_MM = 10.0


# -------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class Marks:
    """What the FROC sweeps: the retained marks and the per-scan nodule counts.

    ``scan``, ``probability``, ``is_tp`` describe the retained marks (one per
    detected nodule at its best probability, and every false positive);
    ``nodules_per_scan[s]`` counts the nodules of ``scans[s]``.
    """

    scans: list[str]
    scan: np.ndarray  # (m,) int64 index into scans
    probability: np.ndarray  # (m,) float64
    is_tp: np.ndarray  # (m,) bool
    nodules_per_scan: np.ndarray  # (scans,) int64
    counts: dict = field(default_factory=dict)

    @property
    def n_nodules(self) -> int:
        return int(self.nodules_per_scan.sum())


def _cap_per_scan(codes: np.ndarray, xyz: np.ndarray, prob: np.ndarray, cap: int) -> np.ndarray:
    """Boolean mask keeping the ``cap`` most probable marks of each scan (ties by x, y, z)."""
    order = np.lexsort((xyz[:, 2], xyz[:, 1], xyz[:, 0], -prob, codes))
    sorted_codes = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = np.zeros(len(order), dtype=bool)
    keep[order[rank < cap]] = True
    return keep


def match_marks(
    results: Results,
    annotations: Sequence[Annotation],
    excluded: Sequence[Annotation] = (),
    scans: Sequence[str] | None = None,
    max_marks_per_scan: int | None = None,
    *,
    nearest_nodule_only: bool = False,
    zero_size_excluded_default: bool = False,
) -> Marks:
    """Apply the matching rules of the module docstring to a set of detections."""
    if scans is None:
        scans = sorted(set(results.series_uids) | {a.series_uid for a in annotations})
    scans = list(dict.fromkeys(scans))
    index_of = {uid: i for i, uid in enumerate(scans)}

    in_set = np.fromiter((uid in index_of for uid in results.series_uids), bool, len(results))
    codes = np.fromiter((index_of.get(uid, -1) for uid in results.series_uids), np.int64, len(results))
    outside_marks = int((~in_set).sum())
    codes, xyz, prob = codes[in_set], results.center_xyz[in_set], results.probability[in_set]
    uids = [uid for uid, k in zip(results.series_uids, in_set.tolist()) if k]

    capped = 0
    if max_marks_per_scan is not None and len(codes):
        keep = _cap_per_scan(codes, xyz, prob, int(max_marks_per_scan))
        capped = int((~keep).sum())
        codes, xyz, prob = codes[keep], xyz[keep], prob[keep]
        uids = [uid for uid, k in zip(uids, keep.tolist()) if k]

    nodules = [a for a in annotations if a.series_uid in index_of]
    outside_nodules = len(annotations) - len(nodules)
    excluded_sized = sized_excluded([a for a in excluded if a.series_uid in index_of], zero_size_excluded_default)

    if nearest_nodule_only:
        nodule_of = match_annotations(uids, xyz, nodules)
        hit_mark = np.flatnonzero(nodule_of >= 0)
        hit_nodule = nodule_of[hit_mark]
    else:
        hit_mark, hit_nodule = hit_pairs(uids, xyz, nodules)
    on_nodule = np.zeros(len(uids), dtype=bool)
    on_nodule[hit_mark] = True
    hits_excluded = match_annotations(uids, xyz, excluded_sized) >= 0
    is_fp = ~on_nodule & ~hits_excluded
    ignored_excluded = int((~on_nodule & hits_excluded).sum())

    # Best probability per detected nodule.
    best = np.full(len(nodules), -np.inf)
    np.maximum.at(best, hit_nodule, prob[hit_mark])
    detected = np.isfinite(best)
    nodule_scan = np.array([index_of[a.series_uid] for a in nodules], dtype=np.int64)
    ignored_double = len(hit_mark) - int(detected.sum())
    several = int((np.bincount(hit_mark, minlength=len(uids)) > 1).sum())

    scan = np.concatenate([nodule_scan[detected], codes[is_fp]])
    probability = np.concatenate([best[detected], prob[is_fp]])
    is_tp = np.r_[np.ones(int(detected.sum()), bool), np.zeros(int(is_fp.sum()), bool)]
    nodules_per_scan = np.bincount(nodule_scan, minlength=len(scans)).astype(np.int64)
    counts = {
        "scans": len(scans),
        "scans_with_nodules": int((nodules_per_scan > 0).sum()),
        "nodules": len(nodules),
        "detections": len(results),
        "detected": int(detected.sum()),
        "false_positives": int(is_fp.sum()),
        "ignored": ignored_double + ignored_excluded,
        "ignored_double_hits": ignored_double,
        "ignored_excluded_hits": ignored_excluded,
        "marks_on_several_nodules": several,
        "dropped_by_cap": capped,
        "outside_detections": outside_marks,
        "outside_nodules": outside_nodules,
    }
    return Marks(scans, scan, probability, is_tp, nodules_per_scan, counts)


# ------------------------------------------------------------------------------ FROC


@dataclass(frozen=True)
class FrocCurve:
    fp_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray  # +inf for the (0, 0) start


def _sweep_order(marks: Marks) -> tuple[np.ndarray, np.ndarray]:
    """Marks sorted by decreasing probability, and the last index of each tie group."""
    order = np.argsort(-marks.probability, kind="stable")
    p = marks.probability[order]
    ends = np.r_[np.flatnonzero(np.diff(p) != 0), len(p) - 1] if len(p) else np.empty(0, np.int64)
    return order, ends


def _curves(
    marks: Marks, weights: np.ndarray, order: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """FP/scan and sensitivity curves, one row per row of ``weights`` (draws x scans)."""
    w = weights[:, marks.scan[order]]  # (draws, marks): copies of each mark in a draw
    tp_sorted = marks.is_tp[order]
    tp = np.cumsum(w * tp_sorted, axis=1)[:, ends]
    fp = np.cumsum(w * ~tp_sorted, axis=1)[:, ends]
    n_nodules = weights @ marks.nodules_per_scan
    n_scans = weights.sum(axis=1)
    zeros = np.zeros((len(weights), 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.where(n_nodules[:, None] > 0, tp / n_nodules[:, None], 0.0)
    return np.hstack([zeros, fp / n_scans[:, None]]), np.hstack([zeros, sens])


def froc_curve(marks: Marks) -> FrocCurve:
    """The FROC curve: (0, 0), then one point per distinct probability, decreasing."""
    order, ends = _sweep_order(marks)
    fps, sens = _curves(marks, np.ones((1, len(marks.scans))), order, ends)
    thresholds = np.r_[np.inf, marks.probability[order][ends]]
    return FrocCurve(fps[0], sens[0], thresholds)


def _sensitivity_at(fps: np.ndarray, sens: np.ndarray, rates: Sequence[float]):
    """(interpolated, step) sensitivities, each (rows, rates), of curves given as rows.

    Each row of ``fps`` is non-decreasing and starts at 0 (see the module docstring).
    """
    n = fps.shape[1]
    rows = np.arange(fps.shape[0])
    interp = np.empty((fps.shape[0], len(rates)))
    step = np.empty_like(interp)
    for k, rate in enumerate(rates):
        # Last point with fps <= rate (the top of a vertical run at the rate).
        i = (fps <= rate).sum(axis=1) - 1
        j = np.minimum(i + 1, n - 1)
        x0, x1 = fps[rows, i], fps[rows, j]
        y0, y1 = sens[rows, i], sens[rows, j]
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.where(x1 > x0, (rate - x0) / (x1 - x0), 0.0)
        interp[:, k] = np.where(x0 == rate, y0, y0 + t * (y1 - y0))
        # First point with fps >= rate; then the last point with that same FP rate.
        first = (fps < rate).sum(axis=1)
        reached = first < n
        x = fps[rows, np.minimum(first, n - 1)]
        top = (fps <= x[:, None]).sum(axis=1) - 1
        step[:, k] = np.where(reached, sens[rows, top], sens[:, -1])
    return interp, step


def cpm_from_curve(curve: FrocCurve, rates: Sequence[float] = FROC_RATES):
    """(cpm, cpm_step, sensitivities at rates (interpolated), sensitivities (step))."""
    interp, step = _sensitivity_at(curve.fp_per_scan[None], curve.sensitivity[None], rates)
    return float(interp[0].mean()), float(step[0].mean()), interp[0], step[0]


def bootstrap_cpm(
    marks: Marks,
    draws: int = 1000,
    seed: int = 0,
    rates: Sequence[float] = FROC_RATES,
    chunk: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """CPM (interpolated, step) of ``draws`` resamplings of the scans with replacement.

    Draws without any nodule give NaN. Vectorised: a (draws x scans) matrix of
    copy counts weights every mark; cumulative sums give all curves at once.
    """
    rng = np.random.default_rng(seed)
    n_scans = len(marks.scans)
    weights = rng.multinomial(n_scans, np.full(n_scans, 1.0 / n_scans), size=draws).astype(np.float64)
    order, ends = _sweep_order(marks)
    cpm = np.empty(draws)
    cpm_step = np.empty(draws)
    for start in range(0, draws, chunk):
        w = weights[start:start + chunk]
        fps, sens = _curves(marks, w, order, ends)
        interp, step = _sensitivity_at(fps, sens, rates)
        no_nodule = (w @ marks.nodules_per_scan) == 0
        cpm[start:start + chunk] = np.where(no_nodule, np.nan, interp.mean(axis=1))
        cpm_step[start:start + chunk] = np.where(no_nodule, np.nan, step.mean(axis=1))
    return cpm, cpm_step


def sized_excluded(excluded: Sequence[Annotation], zero_size_default: bool = False) -> list[Annotation]:
    """The excluded findings with the size the challenge gives those without one: a negative
    diameter becomes ``EXCLUDED_DEFAULT_DIAMETER_MM`` (with ``zero_size_default``, 0 too)."""
    unsized = (lambda d: d <= 0) if zero_size_default else (lambda d: d < 0)
    return [Annotation(a.series_uid, a.center_xyz, EXCLUDED_DEFAULT_DIAMETER_MM) if unsized(a.diameter_mm) else a
            for a in excluded]


def interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


@dataclass(frozen=True)
class FrocResult:
    cpm: float
    cpm_step: float
    ci: list[float] | None
    ci_step: list[float] | None
    rates: tuple[float, ...]
    sensitivities: list[float]
    sensitivities_step: list[float]
    counts: dict
    curve: FrocCurve
    bootstrap_draws: int
    bootstrap_seconds: float
    max_marks_per_scan: int | None
    rules: dict = field(default_factory=dict)
    """The matching options used (the challenge's rules when all are False)."""

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "curve"}
        out["rates"] = list(self.rates)
        return out


def evaluate_froc(
    results: Results,
    annotations: Sequence[Annotation],
    excluded: Sequence[Annotation] = (),
    scans: Sequence[str] | None = None,
    max_marks_per_scan: int | None = None,
    bootstrap_draws: int = 1000,
    seed: int = 0,
    *,
    nearest_nodule_only: bool = False,
    zero_size_excluded_default: bool = False,
) -> FrocResult:
    """Match, build the FROC curve, the CPMs and (``bootstrap_draws`` > 0) their intervals.

    The two keyword options select luna's former matching rules (module docstring).
    """
    rules = {"nearest_nodule_only": nearest_nodule_only, "zero_size_excluded_default": zero_size_excluded_default}
    marks = match_marks(results, annotations, excluded, scans, max_marks_per_scan, **rules)
    if not marks.scans:
        raise LunaError("no scans to evaluate: the results and annotations are empty.")
    curve = froc_curve(marks)
    cpm, cpm_step, interp, step = cpm_from_curve(curve)
    ci = ci_step = None
    started = time.perf_counter()
    if bootstrap_draws > 0:
        draws, draws_step = bootstrap_cpm(marks, bootstrap_draws, seed)
        ci, ci_step = interval(draws), interval(draws_step)
    seconds = time.perf_counter() - started
    return FrocResult(
        cpm, cpm_step, ci, ci_step, FROC_RATES, interp.tolist(), step.tolist(), marks.counts,
        curve, bootstrap_draws, seconds, max_marks_per_scan, rules,
    )


# --------------------------------------------------------------------------- outputs


def format_ci(ci: list[float] | None) -> str:
    return "" if ci is None else f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})"
