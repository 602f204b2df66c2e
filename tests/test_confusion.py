"""luna.evaluate.confusion: the diagnosis's confusion table."""

from __future__ import annotations

import numpy as np

from luna.annotations import Annotation
from luna.evaluate.confusion import confusion_table
from luna.inference.pipeline import Nodule


def nod(p_nodule=0.9, p_malignant=None, xyz=(0.0, 0.0, 0.0), threshold=0.5, d=6.0):
    return Nodule(tuple(xyz), (0.0, 0.0, 0.0), d, p_nodule, p_malignant, p_nodule >= threshold)


def test_confusion_table_counts():
    uid = "s1"
    anns = [
        Annotation(uid, (0.0, 0.0, 0.0), 10.0, True),  # hit, accepted, p_mal high -> malignant/pred malignant
        Annotation(uid, (50.0, 0.0, 0.0), 10.0, False),  # hit, accepted, p_mal low -> benign/pred benign
        Annotation(uid, (100.0, 0.0, 0.0), 10.0, None),  # hit but filtered -> benign/filtered out
        Annotation(uid, (150.0, 0.0, 0.0), 10.0, True),  # no detection -> malignant/complete miss
        Annotation("other", (0.0, 0.0, 0.0), 10.0, True),  # other series: ignored
    ]
    nodules = [
        nod(0.9, 0.8, (1.0, 0.0, 0.0)),
        nod(0.3, None, (0.0, 1.0, 0.0)),  # second hit on the same nodule, filtered: does not matter
        nod(0.9, 0.1, (50.0, 2.0, 0.0)),
        nod(0.2, None, (100.0, 0.0, 3.0)),
        nod(0.9, 0.9, (300.0, 0.0, 0.0)),  # false positive, predicted malignant
        nod(0.9, 0.2, (300.0, 50.0, 0.0)),  # false positive, predicted benign
        nod(0.1, None, (300.0, 90.0, 0.0)),  # false positive, filtered out
    ]
    table = confusion_table(uid, nodules, anns, malignancy_threshold=0.5)
    expected = np.array([
        [0, 1, 1, 1],  # non-nodule
        [0, 1, 1, 0],  # benign
        [1, 0, 0, 1],  # malignant
    ])
    np.testing.assert_array_equal(table, expected)


def test_confusion_table_hit_is_strictly_inside_radius():
    anns = [Annotation("s", (0.0, 0.0, 0.0), 10.0, True)]
    inside = confusion_table("s", [nod(0.9, 0.9, (4.9, 0.0, 0.0))], anns)
    outside = confusion_table("s", [nod(0.9, 0.9, (5.1, 0.0, 0.0))], anns)
    assert inside[2, 3] == 1 and inside[0].sum() == 0
    assert outside[2, 0] == 1 and outside[0, 3] == 1


def test_confusion_without_detections():
    anns = [Annotation("s", (0.0, 0.0, 0.0), 10.0, False), Annotation("s", (40.0, 0.0, 0.0), 8.0, True)]
    table = confusion_table("s", [], anns)
    assert table[1, 0] == 1 and table[2, 0] == 1 and table.sum() == 2
