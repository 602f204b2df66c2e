"""Classification metrics against values worked out by hand, empty classes included."""

import math

import numpy as np
import pytest

from luna.metrics import binary_metrics, precision_recall_curve, roc_auc, roc_curve


def test_counts_and_rates_by_hand():
    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    scores = [0.9, 0.6, 0.4, 0.7, 0.2, 0.1, 0.5, 0.5]
    m = binary_metrics(labels, scores, threshold=0.5)
    # predicted positive: 0.9(1) 0.6(1) 0.7(0) 0.5(0) 0.5(1)
    assert (m.tp, m.fp, m.tn, m.fn) == (3, 2, 2, 1)
    assert m.precision == pytest.approx(3 / 5)
    assert m.recall == pytest.approx(3 / 4)
    assert m.specificity == pytest.approx(2 / 4)
    assert m.f1 == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m.accuracy == pytest.approx(5 / 8)


def test_auc_by_hand_with_ties():
    # positives 0.9, 0.5; negatives 0.5, 0.1 -> pairs: (0.9>0.5) (0.9>0.1) (0.5=0.5 half) (0.5>0.1)
    assert roc_auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(3.5 / 4)
    assert roc_auc([1, 0], [0.2, 0.8]) == 0.0
    assert roc_auc([1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3]) == 0.5


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300), 2)  # many ties
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert roc_auc(labels, scores) == pytest.approx(pairwise)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert np.trapezoid(tpr, fpr) == pytest.approx(pairwise)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []])
def test_empty_classes_give_no_nan(labels):
    scores = np.linspace(0, 1, len(labels))
    m = binary_metrics(labels, scores)
    for value in m.as_dict().values():
        assert math.isfinite(value)
    assert m.auc == 0.5
    fpr, tpr, thresholds = roc_curve(labels, scores)
    assert np.all(np.isfinite(fpr)) and np.all(np.isfinite(tpr))
    precision, recall, _ = precision_recall_curve(labels, scores)
    assert np.all(np.isfinite(precision)) and np.all(np.isfinite(recall))


def test_roc_curve_runs_from_origin_to_one():
    fpr, tpr, thresholds = roc_curve([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2])
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0, 0.5, 0.5, 1.0, 1.0]
    assert thresholds[0] == np.inf


def test_precision_recall_curve_by_hand():
    precision, recall, thresholds = precision_recall_curve([1, 0, 1], [0.9, 0.8, 0.7])
    assert precision.tolist() == pytest.approx([1.0, 0.5, 2 / 3])
    assert recall.tolist() == [0.5, 0.5, 1.0]
    assert thresholds.tolist() == [0.9, 0.8, 0.7]


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        binary_metrics([1, 0], [0.5])


def test_auc_gain_lower_bound_tells_a_real_gain_from_a_lucky_one():
    from luna.metrics import auc_gain_lower_bound

    rng = np.random.default_rng(0)
    # 200 items: the scores separate the classes, the baseline is noise: the gain is real and the bound above 0
    labels = rng.random(200) < 0.3
    good = labels + rng.normal(0, 0.3, 200)
    noise = rng.normal(0, 1, 200)
    assert auc_gain_lower_bound(labels, good, noise) > 0.3
    # the same pair of scores on 12 items, 2 positive, where the scores win 1.0 to 0.85: not beyond chance
    small = np.array([1, 1] + [0] * 10, dtype=bool)
    model = np.array([0.9, 0.8] + [0.1] * 10)
    diameter = np.array([20, 9, 11, 10, 12, 6, 5, 7, 4, 6, 5, 4], dtype=float)
    assert roc_auc(small, model) == 1.0 and roc_auc(small, diameter) == pytest.approx(0.85)
    assert auc_gain_lower_bound(small, model, diameter) <= 0
    # a baseline identical to the scores gains exactly nothing; one class only gives NaN
    assert auc_gain_lower_bound(labels, good, good) == 0.0
    assert np.isnan(auc_gain_lower_bound(np.ones(5, dtype=bool), np.arange(5.0), np.arange(5.0)))
