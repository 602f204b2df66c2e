"""luna.inference.merge: one finding per structure (detections whose measured spheres overlap)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luna.inference.merge import distinct_findings


def test_the_higher_score_of_two_overlapping_detections_stays():
    # 10 mm and 6 mm spheres 7 mm apart overlap (5 + 3 > 7); the third is 20 mm away
    keep = distinct_findings([(0, 0, 0), (7, 0, 0), (0, 20, 0)], [10.0, 6.0, 6.0], [0.4, 0.9, 0.1])
    assert keep.tolist() == [False, True, True]


def test_spheres_that_only_touch_are_two_findings():
    assert distinct_findings([(0, 0, 0), (8, 0, 0)], [8.0, 8.0], [0.9, 0.8]).tolist() == [True, True]
    assert distinct_findings([(0, 0, 0), (7.99, 0, 0)], [8.0, 8.0], [0.9, 0.8]).tolist() == [True, False]


def test_a_chain_keeps_the_ends_when_the_middle_loses():
    # a-b and b-c overlap, a-c do not: b goes to the higher a, c is not overlapped by a kept one
    keep = distinct_findings([(0, 0, 0), (6, 0, 0), (12, 0, 0)], [8.0, 8.0, 8.0], [0.9, 0.5, 0.6])
    assert keep.tolist() == [True, False, True]


def test_ties_keep_the_earlier_detection_and_bad_lengths_are_refused():
    assert distinct_findings([(0, 0, 0), (1, 0, 0)], [5.0, 5.0], [0.5, 0.5]).tolist() == [True, False]
    assert distinct_findings(np.zeros((0, 3)), [], []).tolist() == []
    with pytest.raises(ValueError, match="one of each per detection"):
        distinct_findings([(0, 0, 0)], [5.0, 6.0], [0.5])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-30, 30), st.floats(-30, 30), st.floats(-30, 30),
                          st.floats(0, 25), st.floats(0, 1)), max_size=25))
def test_kept_findings_never_overlap_and_each_dropped_one_overlaps_a_better_kept_one(detections):
    xyz = np.array([d[:3] for d in detections], dtype=float).reshape(-1, 3)
    radii = np.array([d[3] for d in detections]) / 2
    scores = np.array([d[4] for d in detections])
    keep = distinct_findings(xyz, 2 * radii, scores)
    dist = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
    overlap = dist < radii[:, None] + radii[None]
    kept = np.flatnonzero(keep)
    for i in kept:
        assert not any(overlap[i, j] for j in kept if j != i)
    for i in np.flatnonzero(~keep):
        assert any(overlap[i, j] and scores[j] >= scores[i] for j in kept)
