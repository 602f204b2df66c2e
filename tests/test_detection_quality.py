"""luna.evaluate.detection: end-to-end quality by the FROC's own rules."""

import numpy as np
import pytest

from luna.annotations import Annotation
from luna.evaluate.detection import evaluate_diagnoses
from luna.inference.pipeline import Diagnosis, Nodule
from luna.metrics import roc_auc


def _nodule(xyz, p, p_malignant=None):
    return Nodule(tuple(xyz), (0.0, 0.0, 0.0), 6.0, p, p_malignant, p >= 0.5)


def test_counts_follow_the_challenge_rules():
    nodules = [Annotation("s", (0.0, 0.0, 0.0), 10.0, True), Annotation("s", (6.0, 0.0, 0.0), 10.0, False),
               Annotation("s", (60.0, 0.0, 0.0), 10.0, False)]
    excluded = [Annotation("s", (0.0, 50.0, 0.0), -1.0)]  # no size: 10 mm, as the challenge's script
    diagnosis = Diagnosis("s", (
        _nodule((3.0, 0.0, 0.0), 0.9, 0.8),  # inside both of the first two nodules: hits each
        _nodule((0.0, 52.0, 0.0), 0.9),  # on the excluded finding: neither hit nor false positive
        _nodule((0.0, -80.0, 0.0), 0.9),  # a false positive
        _nodule((61.0, 0.0, 0.0), 0.2),  # proposed, rejected
    ), "", True)
    quality = evaluate_diagnoses([diagnosis], nodules, excluded, bootstrap_draws=0)
    assert quality.nodules == 3 and quality.proposal_recall == 1.0
    assert abs(quality.sensitivity_at_threshold - 2 / 3) < 1e-12
    assert quality.fp_per_scan_at_threshold == 1.0
    assert quality.malignancy_nodules == 2 and quality.malignancy_auc == 0.5  # one score for both


def test_duplicates_count_as_proposals_not_as_detections():
    """A nodule hit only by a merged duplicate was still proposed; the duplicate is not a detection."""
    nodules = [Annotation("s", (0.0, 0.0, 0.0), 10.0), Annotation("s", (40.0, 0.0, 0.0), 10.0)]
    diagnosis = Diagnosis("s", (_nodule((0.0, 0.0, 0.0), 0.9), _nodule((46.0, 0.0, 0.0), 0.7)), "", True,
                          duplicates=(_nodule((41.0, 0.0, 0.0), 0.3),))  # inside the second nodule
    quality = evaluate_diagnoses([diagnosis], nodules, bootstrap_draws=0)
    assert quality.proposal_recall == 1.0 and quality.proposals_per_scan == 3.0
    assert quality.sensitivity_at_threshold == 0.5 and quality.fp_per_scan_at_threshold == 1.0
    assert quality.froc.counts["detections"] == 2


def test_malignancy_gain_bound_and_ceiling_on_the_scored_nodules():
    """The model's gain over the diameter is bounded on the detected rated nodules; the ceiling (the readers'
    visible score, known only for luna's phantoms) is scored on the very same nodules, or not at all."""
    from luna.bench.quality import malignancy_ceiling
    from luna.synth.dataset import visible_key

    rng = np.random.default_rng(0)
    size = rng.uniform(4, 20, 40)
    malignant = size + rng.normal(0, 4, 40) > 12
    nodules = [Annotation("s", (10.0 * k, 0.0, 0.0), float(d), bool(m)) for k, (d, m) in enumerate(zip(size, malignant))]
    # the model ranks by size, but no nodule 0..4 is detected: they are not scored
    diagnosis = Diagnosis("s", tuple(_nodule(a.center_xyz, 0.9, a.diameter_mm / 20) for a in nodules[5:]), "", True)
    quality = evaluate_diagnoses([diagnosis], nodules, bootstrap_draws=200)
    assert quality.malignancy_nodules == 35 and quality.malignancy_auc == pytest.approx(quality.diameter_auc)
    assert -0.05 < quality.malignancy_gain_low(draws=200) <= 0.0  # the same ranking: no gain
    assert quality.summary()["malignancy"]["model_gain_95_low"] is not None

    truth = {visible_key(a.series_uid, a.center_xyz): float(m) for a, m in zip(nodules, malignant)}  # a perfect score
    ceiling = malignancy_ceiling(quality, truth, draws=200)
    labels = malignant[5:]
    assert ceiling["visible_score_auc"] == 1.0
    assert ceiling["gain_over_diameter"] == pytest.approx(1.0 - roc_auc(labels, size[5:]))
    low, high = ceiling["gain_95ci"]
    assert 0.0 <= low <= ceiling["gain_over_diameter"] <= high
    del truth[visible_key("s", nodules[7].center_xyz)]  # a nodule whose visible score is unknown: no ceiling
    assert malignancy_ceiling(quality, truth) is None
    assert malignancy_ceiling(quality, {}) is None  # data luna did not generate
