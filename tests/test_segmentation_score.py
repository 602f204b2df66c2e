"""luna.evaluate.segmentation: a segmentation scored through the diagnosis's grouping."""

from __future__ import annotations

import numpy as np

from luna.annotations import Annotation
from luna.ct import Ct
from luna.evaluate.segmentation import OPERATING_THRESHOLDS, SegmentationCounts, choose_threshold, score_segmentation, score_thresholds
from luna.geometry import Geometry


def test_nodules_found_and_false_positives_are_the_groupings_detections():
    geometry = Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    ct = Ct(np.zeros((20, 40, 40), np.int16), geometry, "s")
    found = Annotation("s", (10.0, 10.0, 10.0), 8.0)  # xyz; a blob sits on it
    missed = Annotation("s", (30.0, 30.0, 10.0), 8.0)
    other_scan = Annotation("t", (10.0, 10.0, 10.0), 8.0)  # never counts
    p = np.zeros(ct.hu.shape, np.float32)
    p[8:13, 8:13, 8:13] = 0.9  # on the found nodule (index, row, col = z, y, x)
    p[8:13, 25:30, 2:7] = 0.9  # a false positive
    p[2:7, 2:7, 30:35] = 0.9  # another
    p[15, 20, 20] = 0.9  # one voxel: removed by the grouping's opening, not a false positive
    labels = np.zeros(ct.hu.shape, np.int32)
    labels[8:13, 8:13, 8:14] = 1
    counts = score_segmentation(p, ct, [found, missed, other_scan], labels)
    assert (counts.nodules, counts.nodules_found, counts.fp_detections) == (2, 1, 2)
    assert (counts.tp, counts.fn) == (125, 25)
    assert counts.fp == 125 * 2 + 1
    metrics = (counts + counts).metrics(fp_bound=10)
    assert metrics["nodule_recall"] == 0.5 and metrics["fp_per_scan"] == 2.0 and metrics["score"] == 0.5
    assert counts.metrics(fp_bound=1)["score"] == 0.25  # 2 FP per scan, bound 1: halved
    # the hit rule is the LUNA16 one: a detection 4 mm or more from a 8 mm nodule's centre misses it
    shifted = score_segmentation(np.roll(p, 5, axis=2), ct, [found], None)
    assert shifted.nodules_found == 0 and shifted.fp_detections == 3


def test_empty_segmentation_scores_finitely():
    ct = Ct(np.zeros((4, 16, 16), np.int16), Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "s")
    empty = score_segmentation(np.zeros(ct.hu.shape, np.float16), ct, [], np.zeros(ct.hu.shape, np.int32))
    assert all(np.isfinite(v) for v in empty.metrics(5).values())


def test_each_threshold_is_scored_as_the_grouping_sees_it():
    """A confident nodule beside a fainter false blob that joins it at low thresholds: at 0.5 the two are
    one blob whose centre misses the nodule; from 0.95 on the nodule stands alone and is found."""
    geometry = Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    ct = Ct(np.zeros((20, 40, 40), np.int16), geometry, "s")
    nodule = Annotation("s", (12.0, 10.0, 10.0), 6.0)
    p = np.zeros(ct.hu.shape, np.float32)
    p[6:14, 4:24, 4:24] = 0.9  # a large faint blob...
    p[8:13, 8:13, 10:15] = 0.999  # ...around the confident nodule
    p[2:7, 30:35, 30:35] = 0.97  # a false positive that only the highest thresholds drop
    scored = score_thresholds(p, ct, [nodule], thresholds=(0.5, 0.95, 0.98))
    assert [(c.nodules_found, c.fp_detections) for c in scored.values()] == [(0, 2), (1, 1), (1, 0)]
    assert scored[0.95].nodules_found == score_segmentation(p, ct, [nodule], threshold=0.95).nodules_found


def test_the_operating_threshold_is_the_lowest_within_the_false_positive_bound():
    def counts(found, fp):
        return SegmentationCounts(scans=2, nodules=7, nodules_found=found, fp_detections=2 * fp)

    grid = {0.5: counts(7, 400), 0.9: counts(7, 150), 0.99: counts(7, 90), 0.999: counts(6, 20)}
    assert choose_threshold(grid, fp_bound=100) == 0.99  # not 0.999: the bound is there to be used
    assert choose_threshold(grid, fp_bound=500) == 0.5
    assert choose_threshold(grid, fp_bound=10) == 0.999  # none within: the fewest false positives
    assert list(OPERATING_THRESHOLDS) == sorted(OPERATING_THRESHOLDS) and OPERATING_THRESHOLDS[0] == 0.5
