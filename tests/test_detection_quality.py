"""luna.evaluate.detection: end-to-end quality by the FROC's own rules."""

from luna.annotations import Annotation
from luna.evaluate.detection import evaluate_diagnoses
from luna.inference.pipeline import Diagnosis, Nodule


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
