"""LUNA16 FROC / CPM evaluation: hand-worked cases, properties, readers and the CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from luna.annotations import Annotation
from luna.errors import LunaError
from luna.evaluate.__main__ import main
from luna.evaluate.froc import (
    FROC_RATES,
    bootstrap_cpm,
    cpm_from_curve,
    evaluate_froc,
    froc_curve,
    match_marks,
)
from luna.evaluate.malignancy import malignancy_roc
from luna.io.luna16 import Results, read_results, read_series_list


def results(*rows) -> Results:
    """rows: (uid, x, y, z, probability)."""
    return Results(
        [r[0] for r in rows],
        np.array([r[1:4] for r in rows], dtype=np.float64).reshape(-1, 3),
        np.array([r[4] for r in rows], dtype=np.float64),
    )


def nodule(uid, x, y=0.0, z=0.0, d=10.0) -> Annotation:
    return Annotation(uid, (float(x), float(y), float(z)), float(d))


def cpm_of(rows, annotations, excluded=(), scans=None, **kw):
    return evaluate_froc(results(*rows), annotations, excluded, scans, bootstrap_draws=0, **kw)


def far(uid, k, p):
    """A detection far from everything (a false positive)."""
    return (uid, 1000.0 + 50 * k, 1000.0, 1000.0, p)


NODULES = [nodule("a", 0), nodule("b", 0)]


def test_perfect_detector_scores_one():
    r = cpm_of([("a", 0, 0, 0, 0.9), ("b", 1, 0, 0, 0.8)], NODULES)
    assert r.cpm == 1.0 and r.cpm_step == 1.0
    assert r.counts["detected"] == 2 and r.counts["false_positives"] == 0


def test_no_hits_scores_zero():
    r = cpm_of([far("a", 0, 0.9), far("b", 1, 0.8)], NODULES)
    assert r.cpm == 0.0 and r.cpm_step == 0.0
    assert r.counts["false_positives"] == 2 and r.counts["detected"] == 0


def test_no_detections_at_all():
    r = cpm_of([], NODULES, scans=["a", "b"])
    assert r.cpm == 0.0 and r.counts["nodules"] == 2


def test_half_found_without_false_positives():
    # 1 of 2 nodules at 0 FP: sensitivity 0.5 at every rate -> CPM 0.5.
    r = cpm_of([("a", 0, 0, 0, 0.9)], NODULES)
    assert r.cpm == pytest.approx(0.5)


def test_hit_needs_distance_strictly_below_radius():
    # radius 5: a detection at distance exactly 5 misses (and is a FP).
    r = cpm_of([("a", 5, 0, 0, 0.9)], [nodule("a", 0)])
    assert r.counts["detected"] == 0 and r.counts["false_positives"] == 1
    r = cpm_of([("a", 4.999, 0, 0, 0.9)], [nodule("a", 0)])
    assert r.counts["detected"] == 1


def test_double_detections_are_ignored_not_false_positives():
    rows = [("a", 0, 0, 0, 0.9), ("a", 1, 0, 0, 0.7), ("a", 2, 0, 0, 0.3), ("b", 0, 0, 0, 0.8)]
    r = cpm_of(rows, NODULES)
    assert r.cpm == 1.0
    assert r.counts["ignored_double_hits"] == 2 and r.counts["false_positives"] == 0


def test_most_probable_hit_counts():
    # Two scans, nodule in "a"; hits at 0.2 and 0.9; 2 FPs at 0.5 in "b".
    # The nodule's mark is 0.9: sensitivity 1 at 0 FP -> CPM 1. With the 0.2 hit
    # counted instead it would come after both FPs.
    rows = [("a", 0, 0, 0, 0.2), ("a", 1, 0, 0, 0.9), far("b", 0, 0.5), far("b", 1, 0.5)]
    r = cpm_of(rows, [nodule("a", 0)])
    assert r.cpm == 1.0


def test_detections_on_excluded_findings_are_ignored():
    excluded = [nodule("a", 100, d=8), nodule("a", 200, d=-1)]
    rows = [("a", 0, 0, 0, 0.5), ("a", 102, 0, 0, 0.9), ("a", 203, 0, 0, 0.9)]
    r = cpm_of(rows, [nodule("a", 0)], excluded)
    # The -1 diameter uses the 10 mm default (radius 5): both ignored.
    assert r.counts["ignored_excluded_hits"] == 2 and r.counts["false_positives"] == 0
    assert r.cpm == 1.0
    # Without the excluded file they are 2 FPs above the nodule (1 scan):
    # FROC (0,0) -> (2, 0) -> (2, 1): sensitivity 0 below 2 FP/scan, 1 at 2, 4 and 8 -> 3/7.
    r = cpm_of(rows, [nodule("a", 0)])
    assert r.cpm == pytest.approx(3 / 7)


def test_excluded_finding_of_size_zero_keeps_it_as_in_the_challenge_script():
    # The script turns only a negative diameter into 10 mm: a 0 mm finding has radius
    # 0, nothing is strictly inside it, and a detection 1 mm away is a false positive.
    rows = [("a", 0, 0, 0, 0.5), ("a", 301, 0, 0, 0.9)]
    excluded = [nodule("a", 300, d=0)]
    r = cpm_of(rows, [nodule("a", 0)], excluded)
    assert r.counts["ignored_excluded_hits"] == 0 and r.counts["false_positives"] == 1
    # FROC (0,0) (1,0) (1,1): sensitivity 1 from 1 FP/scan on -> 4/7.
    assert r.cpm == pytest.approx(4 / 7)
    assert r.rules == {"nearest_nodule_only": False, "zero_size_excluded_default": False}
    # luna's former rule, as an option: 0 is "no size" too, the detection is ignored.
    r = cpm_of(rows, [nodule("a", 0)], excluded, zero_size_excluded_default=True)
    assert r.counts["ignored_excluded_hits"] == 1 and r.counts["false_positives"] == 0
    assert r.cpm == 1.0


def test_nodule_wins_over_excluded_finding():
    r = cpm_of([("a", 1, 0, 0, 0.9)], [nodule("a", 0)], [nodule("a", 2)])
    assert r.counts["detected"] == 1 and r.counts["ignored_excluded_hits"] == 0


def test_detection_inside_two_nodules_hits_both_as_in_the_challenge_script():
    annotations = [nodule("a", 0, d=20), nodule("a", 6, d=20)]
    r = cpm_of([("a", 5, 0, 0, 0.9)], annotations)
    assert r.counts["detected"] == 2 and r.counts["marks_on_several_nodules"] == 1
    assert r.counts["false_positives"] == 0 and r.cpm == 1.0
    # The nearest-only variant (luna's former rule): the farther nodule stays missed.
    r = cpm_of([("a", 5, 0, 0, 0.9)], annotations, nearest_nodule_only=True)
    assert r.counts["detected"] == 1 and r.cpm == pytest.approx(0.5)
    marks = match_marks(results(("a", 5, 0, 0, 0.9)), annotations, nearest_nodule_only=True)
    assert marks.counts["detected"] == 1


def test_double_hits_are_counted_per_nodule_as_the_script_does():
    # Nodule 0 is hit by marks at x=1 and x=5, nodule 1 (at 6) by x=5 and x=9:
    # two hits per nodule, minus one each -> 2 ignored; nothing is a false positive.
    annotations = [nodule("a", 0, d=12), nodule("a", 6, d=8)]
    rows = [("a", 1, 0, 0, 0.3), ("a", 5, 0, 0, 0.9), ("a", 9, 0, 0, 0.4)]
    r = cpm_of(rows, annotations)
    assert r.counts["detected"] == 2 and r.counts["ignored_double_hits"] == 2
    assert r.counts["false_positives"] == 0


def test_nodule_found_only_at_low_probability():
    # 1 scan, 1 nodule; FPs at 0.9, 0.8, 0.7 then the nodule at 0.1.
    # FROC: (0,0) (1,0) (2,0) (3,0) (3,1). Interpolated: 0 at 1/8..2, at 4 and 8 -> 1.
    # CPM = 2/7. Step: smallest FP rate >= r: r<=1 -> fps 1 -> 0; r=2 -> 0;
    # r=4, 8 not reached -> last sensitivity 1 -> 2/7.
    rows = [far("a", 0, 0.9), far("a", 1, 0.8), far("a", 2, 0.7), ("a", 0, 0, 0, 0.1)]
    r = cpm_of(rows, [nodule("a", 0)])
    assert r.cpm == pytest.approx(2 / 7)
    assert r.cpm_step == pytest.approx(2 / 7)


def test_linear_interpolation_between_points():
    # 2 scans, 2 nodules. Order: TP 0.9, FP 0.8, FP 0.7, FP 0.6, TP 0.5.
    # FROC: (0,0) (0,.5) (.5,.5) (1,.5) (1.5,.5) (1.5,1).
    # Interpolated sensitivities: .5 at 1/8..1, 1 at 2, 4, 8 -> (4*.5 + 3)/7 = 5/7.
    rows = [("a", 0, 0, 0, 0.9), far("a", 0, 0.8), far("b", 0, 0.7), far("b", 1, 0.6),
            ("b", 0, 0, 0, 0.5)]
    r = cpm_of(rows, NODULES)
    assert r.cpm == pytest.approx(5 / 7)
    assert r.sensitivities == pytest.approx([0.5, 0.5, 0.5, 0.5, 1, 1, 1])


def test_interpolation_on_a_sloped_segment_and_step_variant():
    # 1 scan, 2 nodules. Order: TP 0.9, then a tie at 0.5: 2 FPs + 1 TP.
    # FROC: (0,0) (0,.5) (2,1). Interpolated at r: .5 + .25 r for r <= 2, 1 beyond:
    # 1/8 -> .53125, 1/4 -> .5625, 1/2 -> .625, 1 -> .75, 2, 4, 8 -> 1.
    # CPM = (.53125 + .5625 + .625 + .75 + 3) / 7 = 5.46875 / 7.
    # Step: for r in 1/8..2 the smallest fps >= r is 2 -> 1; 4, 8: not reached -> 1: CPM 1.
    rows = [("a", 0, 0, 0, 0.9), far("a", 0, 0.5), far("a", 1, 0.5), ("a", 100, 0, 0, 0.5)]
    r = cpm_of(rows, [nodule("a", 0), nodule("a", 100)])
    assert r.cpm == pytest.approx(5.46875 / 7)
    assert r.cpm_step == pytest.approx(1.0)


def test_ties_in_probability_enter_together():
    # 1 scan, nodule and FP both at 0.5: a single point (1, 1) after (0, 0).
    # Interpolated: r/1 up to 1 -> 1/8, 1/4, 1/2, 1, then 1: (0.875 + 4) / 7.
    rows = [far("a", 0, 0.5), ("a", 0, 0, 0, 0.5)]
    r = cpm_of(rows, [nodule("a", 0)])
    assert len(r.curve.fp_per_scan) == 2
    assert r.cpm == pytest.approx(4.875 / 7)
    assert cpm_of(rows[::-1], [nodule("a", 0)]).cpm == r.cpm


def test_scans_without_nodules_count_in_the_fp_rate():
    # Nodule found at 0.9, then 8 FPs at 0.5 in a scan without nodules.
    # With 2 scans: FROC (0,0) (0,1) (4,1) -> CPM 1 regardless; the FP axis is 4.
    rows = [("a", 0, 0, 0, 0.9)] + [far("b", k, 0.5) for k in range(8)]
    r = cpm_of(rows, [nodule("a", 0)])
    assert r.counts["scans"] == 2 and r.curve.fp_per_scan[-1] == 4
    # A scan listed in --series without detections or nodules halves nothing else:
    r = cpm_of(rows, [nodule("a", 0)], scans=["a", "b", "c", "d"])
    assert r.curve.fp_per_scan[-1] == 2


def test_nodules_and_detections_outside_the_series_are_dropped():
    rows = [("a", 0, 0, 0, 0.9), ("z", 0, 0, 0, 0.9)]
    r = cpm_of(rows, [nodule("a", 0), nodule("y", 0)], scans=["a"])
    assert r.cpm == 1.0
    assert r.counts["outside_detections"] == 1 and r.counts["outside_nodules"] == 1


def test_mark_cap_per_scan_keeps_the_most_probable():
    # 3 FPs above the nodule; cap 2 drops the nodule hit (lowest probability).
    rows = [far("a", 0, 0.9), far("a", 1, 0.8), far("a", 2, 0.7), ("a", 0, 0, 0, 0.1)]
    r = cpm_of(rows, [nodule("a", 0)], max_marks_per_scan=2)
    assert r.counts["dropped_by_cap"] == 2 and r.counts["detected"] == 0 and r.cpm == 0


def random_case(rng, scans=6, per_scan=15):
    annotations, rows = [], []
    for s in range(scans):
        uid = f"s{s}"
        for k in range(rng.integers(0, 3)):
            annotations.append(nodule(uid, 40 * k, d=rng.uniform(4, 20)))
        for _ in range(per_scan):
            x = rng.choice([0, 40, 80, 200, 300]) + rng.normal(0, 3)
            rows.append((uid, x, rng.normal(0, 2), 0.0, round(rng.uniform(), 1)))
    return rows, annotations


def test_permuting_rows_does_not_change_the_result():
    rng = np.random.default_rng(1)
    for _ in range(10):
        rows, annotations = random_case(rng)
        base = cpm_of(rows, annotations, max_marks_per_scan=8)
        perm = rng.permutation(len(rows))
        other = cpm_of([rows[i] for i in perm], annotations[::-1], max_marks_per_scan=8)
        assert other.cpm == base.cpm and other.cpm_step == base.cpm_step
        np.testing.assert_array_equal(other.curve.sensitivity, base.curve.sensitivity)


def test_adding_a_far_detection_never_raises_sensitivity_at_a_given_fp_rate():
    rng = np.random.default_rng(2)
    for _ in range(20):
        rows, annotations = random_case(rng)
        if not annotations:
            continue
        uid = f"s{rng.integers(0, 6)}"
        more = rows + [(uid, 5000.0, 5000.0, 5000.0, float(rng.uniform()))]
        a = cpm_of(rows, annotations, scans=[f"s{s}" for s in range(6)])
        b = cpm_of(more, annotations, scans=[f"s{s}" for s in range(6)])
        assert np.all(np.array(b.sensitivities) <= np.array(a.sensitivities) + 1e-12)
        grid = np.linspace(0, 5, 101)
        for x in grid:
            # on the curves themselves: best sensitivity at FP rate <= x
            sa = a.curve.sensitivity[a.curve.fp_per_scan <= x].max()
            sb = b.curve.sensitivity[b.curve.fp_per_scan <= x].max()
            assert sb <= sa


def test_bootstrap_matches_a_loop_and_is_seeded():
    rng = np.random.default_rng(3)
    rows, annotations = random_case(rng, scans=8)
    marks = match_marks(results(*rows), annotations)
    one, one_step = bootstrap_cpm(marks, draws=40, seed=7)
    two, _ = bootstrap_cpm(marks, draws=40, seed=7)
    np.testing.assert_array_equal(one, two)
    # Draw 0 recomputed by building the resampled dataset explicitly.
    weights = np.random.default_rng(7).multinomial(8, np.full(8, 1 / 8), size=40)
    for d in range(3):
        new_rows, new_annotations, new_scans = [], [], []
        for s, count in enumerate(weights[d]):
            for c in range(count):
                uid = f"s{s}#{c}"
                new_scans.append(uid)
                new_rows += [(uid, *r[1:]) for r in rows if r[0] == f"s{s}"]
                new_annotations += [
                    Annotation(uid, a.center_xyz, a.diameter_mm)
                    for a in annotations if a.series_uid == f"s{s}"
                ]
        if not new_annotations:
            assert np.isnan(one[d])
            continue
        explicit = cpm_of(new_rows, new_annotations, scans=new_scans)
        assert one[d] == pytest.approx(explicit.cpm)
        assert one_step[d] == pytest.approx(explicit.cpm_step)


def test_bootstrap_is_fast_at_realistic_size():
    # 89 scans, ~30k marks, 1000 draws.
    rng = np.random.default_rng(0)
    scans = [f"s{i}" for i in range(89)]
    annotations = [nodule(u, 40 * k) for u in scans for k in range(rng.integers(0, 4))]
    n = 30000
    uids = [scans[i] for i in rng.integers(0, 89, n)]
    xyz = np.c_[rng.choice([0, 40, 80, 500], n) + rng.normal(0, 2, n), np.zeros((n, 2))]
    res = Results(uids, xyz, rng.uniform(size=n))
    started = time.perf_counter()
    r = evaluate_froc(res, annotations, (), scans, bootstrap_draws=1000)
    assert time.perf_counter() - started < 30
    assert r.ci[0] <= r.cpm <= r.ci[1]


def test_read_results_checks_header_and_numbers(tmp_path):
    good = tmp_path / "r.csv"
    good.write_text("seriesuid,coordX,coordY,coordZ,probability\na,1,2,3,0.5\n")
    assert read_results(good).probability.tolist() == [0.5]
    bad = tmp_path / "bad.csv"
    bad.write_text("seriesuid,coordX,coordY,coordZ,probability\na,1,2,3,0.5\na,1,x,3,0.5\n")
    with pytest.raises(LunaError, match=r"bad.csv:3: column 'coordY'"):
        read_results(bad)
    header = tmp_path / "header.csv"
    header.write_text("seriesuid,coordX,coordY,coordZ\na,1,2,3\n")
    with pytest.raises(LunaError, match="probability"):
        read_results(header)


def test_read_series_list(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("# validation\na\n\nb\na\n")
    assert read_series_list(path) == ["a", "b"]


def test_malignancy_roc_needs_both_classes():
    with pytest.raises(LunaError, match=r"mal.csv: all 3 nodule\(s\) are benign.*both"):
        malignancy_roc([0, 0, 0], [0.1, 0.2, 0.3], draws=10, source="mal.csv")
    with pytest.raises(LunaError, match="all 2 nodule.*malignant"):
        malignancy_roc([1, 1], [0.1, 0.2], draws=10)
    with pytest.raises(LunaError, match="no nodules"):
        malignancy_roc([], [], draws=10)


def test_malignancy_roc():
    labels = [0, 0, 1, 1, 0, 1]
    probs = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    r = malignancy_roc(labels, probs, draws=200)
    assert r.auc == pytest.approx(8 / 9)
    assert r.ci[0] <= r.auc <= r.ci[1] <= 1
    assert {p["name"] for p in r.operating_points} == {"fixed", "youden"}


def write(path, header, rows):
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_cli_writes_outputs_and_prints_cpm(tmp_path, capsys):
    res = write(tmp_path / "results.csv", "seriesuid,coordX,coordY,coordZ,probability",
                [("a", 0, 0, 0, 0.9), ("a", 300, 0, 0, 0.8), ("b", 1, 0, 0, 0.4), ("b", 300, 0, 0, 0.2)])
    ann = write(tmp_path / "annotations.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm",
                [("a", 0, 0, 0, 10), ("b", 0, 0, 0, 10)])
    exc = write(tmp_path / "excluded.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm",
                [("b", 300, 0, 0, -1)])
    mal = write(tmp_path / "mal.csv", "seriesuid,coordX,coordY,coordZ,probability,label",
                [("a", 0, 0, 0, 0.9, 1), ("b", 0, 0, 0, 0.2, 0), ("c", 0, 0, 0, 0.6, 0)])
    out = tmp_path / "out"
    code = main(["--results", str(res), "--annotations", str(ann), "--excluded", str(exc),
                 "--out", str(out), "--bootstrap", "100", "--malignancy", str(mal)])
    assert code == 0
    printed = capsys.readouterr().out
    # (0,0) (0,.5) (.5,.5) (.5,1): .5 at 1/8, 1/4; 1 from 1/2 on -> (1 + 5) / 7.
    cpm_line = [line for line in printed.splitlines() if line.startswith("CPM ")]
    assert cpm_line[0].startswith(f"CPM {6 / 7:.4f} (95% CI ")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cpm"] == pytest.approx(6 / 7)
    assert summary["counts"]["ignored_excluded_hits"] == 1
    assert len(summary["sensitivities"]) == len(FROC_RATES)
    lines = (out / "froc.csv").read_text().splitlines()
    assert lines[0] == "fp_per_scan,sensitivity,threshold" and lines[1] == "0,0,inf"
    assert (out / "froc.png").stat().st_size > 1000
    assert (out / "roc.png").exists() and (out / "malignancy.json").exists()


def test_cli_errors_are_luna_errors(tmp_path):
    with pytest.raises(LunaError):
        main([])
    with pytest.raises(LunaError, match="not found"):
        main(["--results", str(tmp_path / "nope.csv"), "--annotations", str(tmp_path / "a.csv")])


def test_cpm_from_curve_vertical_segment_takes_the_top():
    rows = [far("a", 0, 0.9), ("a", 0, 0, 0, 0.5)]
    # 1 scan: (0,0) (1,0) (1,1). At r=1 the top (1); below 1: 0 (flat segment).
    r = cpm_of(rows, [nodule("a", 0)])
    assert r.sensitivities == pytest.approx([0, 0, 0, 1, 1, 1, 1])
    assert cpm_from_curve(froc_curve(match_marks(results(*rows), [nodule("a", 0)])))[0] == pytest.approx(4 / 7)
