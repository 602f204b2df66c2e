"""Tests for luna.annotations: CSV readers, annotation merge, candidate rules, split."""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from luna.annotations import (
    Annotation,
    Candidate,
    CandidateInfo,
    load_annotations,
    hit_pairs,
    load_candidate_infos,
    match_annotations,
    split_series,
)
from luna.errors import LunaError
from luna.io.luna16 import (
    read_annotations,
    read_candidate_columns,
    read_candidates,
    read_excluded_annotations,
    read_malignancy_annotations,
)

REAL_DIR = SHARED_DATA / "luna16"

CAND_HEADER = "seriesuid,coordX,coordY,coordZ,class\n"
ANN_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
MAL_HEADER = (
    "seriesuid,coordX,coordY,coordZ,diameter_mm,mal_bool,mal_details,"
    "bboxLowX,bboxLowY,bboxLowZ,bboxHighX,bboxHighY,bboxHighZ,len_mal_details\n"
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def mal_row(uid: str, x: float, y: float, z: float, d: float, mal: bool, ratings: str) -> str:
    return f'{uid},{x},{y},{z},{d},{mal},"{ratings}",0,0,0,1,1,1,{len(ratings.split(","))}\n'


def by_key(infos: list[CandidateInfo]) -> dict[tuple[str, tuple[float, ...]], CandidateInfo]:
    return {(info.series_uid, info.center_xyz): info for info in infos}


# ------------------------------------------------------------------- real files


def real_file(name: str) -> Path:
    path = REAL_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def real_dir(tmp_path: Path) -> Path:
    """The two real annotation files, without any candidates file."""
    for name in ("annotations.csv", "annotations_with_malignancy.csv"):
        (tmp_path / name).write_bytes(real_file(name).read_bytes())
    return tmp_path


def test_real_annotations_count():
    annotations = read_annotations(real_file("annotations.csv"))
    assert len(annotations) == 1186
    assert all(a.is_malignant is None and a.malignancy_ratings == () for a in annotations)


def test_real_malignancy_counts():
    rated = read_malignancy_annotations(real_file("annotations_with_malignancy.csv"))
    assert len(rated) == 1182
    assert sum(a.is_malignant for a in rated) == 378
    assert all(len(a.malignancy_ratings) >= 3 for a in rated)


def test_real_merge_counts(tmp_path):
    merged = load_annotations(real_dir(tmp_path))
    assert len(merged) == 1186
    assert sum(a.is_malignant is True for a in merged) == 378
    assert sum(a.is_malignant is False for a in merged) == 804
    unrated = [a for a in merged if a.is_malignant is None]
    # Two in a series without rating rows, two whose series' rating rows all
    # belong to other (exactly co-located) nodules.
    assert sorted(a.series_uid[-12:] for a in unrated) == [
        "145405000951", "414741039150", "511069914832", "511069914832"
    ]
    assert sum(bool(a.malignancy_ratings) for a in merged) == 1182  # every rating row used
    # Merging keeps annotations.csv's rows, in its order.
    plain = read_annotations(tmp_path / "annotations.csv")
    assert [(a.series_uid, a.center_xyz, a.diameter_mm) for a in merged] == [
        (a.series_uid, a.center_xyz, a.diameter_mm) for a in plain
    ]


def test_real_known_malignant_nodule(tmp_path):
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    found = [a for a in load_annotations(real_dir(tmp_path)) if a.series_uid == uid]
    assert len(found) == 1
    nodule = found[0]
    assert nodule.center_xyz == pytest.approx((56.208, 86.343, -115.868), abs=1e-3)
    assert nodule.diameter_mm == pytest.approx(23.35, abs=1e-2)
    assert nodule.is_malignant is True
    assert nodule.malignancy_ratings == (5, 5, 5, 4)


def test_real_without_candidates_gives_positives_only(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="luna.annotations"):
        infos = load_candidate_infos(real_dir(tmp_path))
    assert len(infos) == 1186
    assert all(i.is_nodule and i.has_annotation for i in infos)
    assert sum(i.is_malignant for i in infos) == 378
    assert "NO negatives" in caplog.text


# ------------------------------------------------------------------- hit rule

# One nodule of diameter 10 mm (radius 5) at (10, 20, 30) in series "s1".
# Offsets along the diagonal: 2.88 * sqrt(3) = 4.988 < 5 (inside), 2.9 * sqrt(3) =
# 5.023 > 5 (outside), although every per-axis offset is well below the radius.
INSIDE = (12.88, 22.88, 32.88)
OUTSIDE = (12.9, 22.9, 32.9)
ON_SPHERE = (13.0, 24.0, 30.0)  # distance exactly 5: not strictly inside


@pytest.fixture
def one_nodule_dir(tmp_path):
    write(tmp_path / "annotations.csv", ANN_HEADER + "s1,10,20,30,10\n")
    return tmp_path


def test_diagonal_offsets_are_really_inside_and_outside():
    center = np.array([10.0, 20.0, 30.0])
    assert np.linalg.norm(np.array(INSIDE) - center) < 5
    assert np.linalg.norm(np.array(OUTSIDE) - center) > 5
    assert np.linalg.norm(np.array(ON_SPHERE) - center) == 5


def test_class0_inside_nodule_dropped_outside_kept(one_nodule_dir):
    write(
        one_nodule_dir / "candidates.csv",
        CAND_HEADER
        + "s1,{},{},{},0\n".format(*INSIDE)
        + "s1,{},{},{},0\n".format(*OUTSIDE)
        + "s1,{},{},{},0\n".format(*ON_SPHERE),
    )
    infos = by_key(load_candidate_infos(one_nodule_dir))
    assert ("s1", INSIDE) not in infos
    assert not infos[("s1", OUTSIDE)].is_nodule
    assert not infos[("s1", ON_SPHERE)].is_nodule
    assert len(infos) == 3  # the nodule and two negatives


def test_class1_inside_is_the_annotation_outside_stays_unannotated(one_nodule_dir):
    write(
        one_nodule_dir / "candidates.csv",
        CAND_HEADER + "s1,{},{},{},1\n".format(*INSIDE) + "s1,{},{},{},1\n".format(*OUTSIDE),
    )
    infos = load_candidate_infos(one_nodule_dir)
    assert infos == [
        CandidateInfo("s1", (10.0, 20.0, 30.0), True, True, False, 10.0),
        CandidateInfo("s1", OUTSIDE, True, False, False, 0.0),
    ]


def test_candidates_in_other_series_do_not_match(one_nodule_dir):
    write(one_nodule_dir / "candidates.csv", CAND_HEADER + "s2,10,20,30,0\n")
    infos = by_key(load_candidate_infos(one_nodule_dir))
    assert infos[("s2", (10.0, 20.0, 30.0))].is_nodule is False
    assert infos[("s1", (10.0, 20.0, 30.0))].has_annotation is True


def test_unmatched_annotation_is_still_a_positive(one_nodule_dir):
    write(one_nodule_dir / "candidates.csv", CAND_HEADER + "s1,100,100,100,0\n")
    infos = load_candidate_infos(one_nodule_dir)
    assert infos[0] == CandidateInfo("s1", (10.0, 20.0, 30.0), True, True, False, 10.0)
    assert infos[1] == CandidateInfo("s1", (100.0, 100.0, 100.0), False, False, False, 0.0)


def test_nearest_annotation_wins():
    annotations = [
        Annotation("s1", (0.0, 0.0, 0.0), 20.0),  # radius 10, covers the point
        Annotation("s1", (6.0, 0.0, 0.0), 4.0),  # radius 2, covers it and is nearer
        Annotation("s2", (5.0, 0.0, 0.0), 50.0),  # other series: never
    ]
    points = [(5.0, 0.0, 0.0), (-5.0, 0.0, 0.0), (5.0, 0.0, 0.0), (30.0, 0.0, 0.0)]
    uids = ["s1", "s1", "s3", "s1"]
    assert match_annotations(uids, points, annotations).tolist() == [1, 0, -1, -1]
    assert match_annotations([], np.empty((0, 3)), annotations).tolist() == []
    assert match_annotations(["s1"], [(0.0, 0.0, 0.0)], []).tolist() == [-1]


def test_hit_pairs_gives_every_nodule_a_point_is_inside():
    annotations = [
        Annotation("s1", (0.0, 0.0, 0.0), 20.0),
        Annotation("s1", (6.0, 0.0, 0.0), 20.0),
        Annotation("s2", (0.0, 0.0, 0.0), 4.0),
    ]
    uids = ["s1", "s1", "s2", "s1"]
    points = [(5.0, 0.0, 0.0), (-9.0, 0.0, 0.0), (0.0, 0.0, 1.0), (100.0, 0.0, 0.0)]
    point_index, nodule_index = hit_pairs(uids, points, annotations)
    assert list(zip(point_index.tolist(), nodule_index.tolist())) == [(0, 0), (0, 1), (1, 0), (2, 2)]
    # match_annotations keeps the nearest of those pairs per point.
    assert match_annotations(uids, points, annotations).tolist() == [1, 0, 2, -1]
    assert [len(a) for a in hit_pairs([], np.empty((0, 3)), annotations)] == [0, 0]


def test_vectorised_match_agrees_with_brute_force():
    rng = random.Random(7)
    annotations = [
        Annotation(f"s{rng.randrange(5)}", tuple(rng.uniform(-20, 20) for _ in range(3)),
                   rng.uniform(3, 40))  # large enough that points lie inside several nodules
        for _ in range(30)
    ]
    uids = [f"s{rng.randrange(6)}" for _ in range(2000)]
    points = [tuple(rng.uniform(-25, 25) for _ in range(3)) for _ in range(2000)]
    expected = []
    for uid, point in zip(uids, points):
        best, best_distance = -1, math.inf
        for index, a in enumerate(annotations):
            distance = math.dist(point, a.center_xyz)
            if a.series_uid == uid and distance < a.diameter_mm / 2 and distance < best_distance:
                best, best_distance = index, distance
        expected.append(best)
    assert match_annotations(uids, points, annotations).tolist() == expected
    pairs = [(i, k) for i, (uid, point) in enumerate(zip(uids, points)) for k, a in enumerate(annotations)
             if a.series_uid == uid and math.dist(point, a.center_xyz) < a.diameter_mm / 2]
    point_index, nodule_index = hit_pairs(uids, points, annotations)
    assert list(zip(point_index.tolist(), nodule_index.tolist())) == pairs
    assert len(pairs) > len(set(i for i, _ in pairs))  # the case has points inside several nodules


# ---------------------------------------------------------------- candidate list


def test_order_and_malignancy(tmp_path):
    write(tmp_path / "annotations.csv",
          ANN_HEADER + "b,0,0,0,6\n" "a,50,0,0,6\n" "a,0,0,0,6\n" "c,0,0,0,12\n")
    write(tmp_path / "annotations_with_malignancy.csv",
          MAL_HEADER + mal_row("a", 50, 0, 0, 6, True, "[5, 4, 4]")
          + mal_row("c", 0.5, 0, 0, 12, False, "[1, 2, 1]"))
    write(tmp_path / "candidates.csv",
          CAND_HEADER + "b,-40,0,0,0\n" "a,-40,5,0,0\n" "a,-40,1,0,0\n" "b,-80,0,0,1\n")
    infos = load_candidate_infos(tmp_path)
    assert [(i.series_uid, i.center_xyz[:2]) for i in infos] == [
        ("c", (0.0, 0.0)),  # largest diameter
        ("a", (0.0, 0.0)),  # same diameter: series, then x
        ("a", (50.0, 0.0)),
        ("b", (0.0, 0.0)),
        ("b", (-80.0, 0.0)),  # unannotated positive, diameter 0
        ("a", (-40.0, 1.0)),  # negatives: series, then x, y
        ("a", (-40.0, 5.0)),
        ("b", (-40.0, 0.0)),
    ]
    assert [i.is_malignant for i in infos] == [False, False, True] + [False] * 5
    assert [i.has_annotation for i in infos] == [True] * 4 + [False] * 4
    assert [i.is_nodule for i in infos] == [True] * 5 + [False] * 3
    assert load_candidate_infos(tmp_path) == infos  # deterministic


def test_candidates_v2_preferred(tmp_path):
    write(tmp_path / "annotations.csv", ANN_HEADER)
    write(tmp_path / "candidates.csv", CAND_HEADER + "s1,1,1,1,0\n")
    write(tmp_path / "candidates_V2.csv", CAND_HEADER + "s1,2,2,2,0\n")
    assert [i.center_xyz for i in load_candidate_infos(tmp_path)] == [(2.0, 2.0, 2.0)]


def test_candidates_without_annotations_warn(tmp_path, caplog):
    write(tmp_path / "candidates.csv", CAND_HEADER + "s1,1,1,1,1\n" "s1,2,2,2,0\n")
    with caplog.at_level(logging.WARNING, logger="luna.annotations"):
        infos = load_candidate_infos(tmp_path)
    assert [(i.is_nodule, i.has_annotation) for i in infos] == [(True, False), (False, False)]
    assert "annotations.csv" in caplog.text


def test_no_csv_at_all(tmp_path):
    with pytest.raises(LunaError, match="candidates.csv"):
        load_candidate_infos(tmp_path)
    with pytest.raises(LunaError, match="annotations.csv"):
        load_annotations(tmp_path)


def test_gc_state_restored(one_nodule_dir):
    assert gc.isenabled()
    load_candidate_infos(one_nodule_dir)
    assert gc.isenabled()
    gc.disable()
    try:
        load_candidate_infos(one_nodule_dir)
        assert not gc.isenabled()
    finally:
        gc.enable()


# ------------------------------------------------------------ series on disk


@pytest.fixture
def three_series_dir(tmp_path):
    write(tmp_path / "annotations.csv", ANN_HEADER + "s1,0,0,0,10\n" "s3,0,0,0,10\n")
    write(tmp_path / "candidates.csv",
          CAND_HEADER + "s1,50,0,0,0\n" "s2,50,0,0,0\n" "s2,60,0,0,1\n" "s3,50,0,0,0\n")
    return tmp_path


def test_restrict_to_series_on_disk(three_series_dir, caplog):
    with caplog.at_level(logging.INFO, logger="luna.annotations"):
        infos = load_candidate_infos(three_series_dir, series_uids=["s1", "s2", "elsewhere"])
    assert {i.series_uid for i in infos} == {"s1", "s2"}
    assert len(infos) == 4
    records = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "name 3 series, 2 of them" in message
    assert "3 series on disk" in message
    assert "dropped 1 candidate rows and 1 annotations" in message


def test_all_series_on_disk_logs_nothing(three_series_dir, caplog):
    with caplog.at_level(logging.INFO, logger="luna.annotations"):
        infos = load_candidate_infos(three_series_dir, series_uids={"s1", "s2", "s3"})
    assert infos == load_candidate_infos(three_series_dir)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_no_series_on_disk_is_an_error(three_series_dir):
    for on_disk in (["x1", "x2"], []):
        with pytest.raises(LunaError, match="do not match") as info:
            load_candidate_infos(three_series_dir, series_uids=on_disk)
        assert str(three_series_dir) in str(info.value)


# ------------------------------------------------------------- annotation merge


def test_merge_is_one_to_one_nearest_first(tmp_path, caplog):
    write(tmp_path / "annotations.csv",
          ANN_HEADER + "s1,0,0,0,10\n" "s1,3,0,0,10\n" "s1,100,0,0,10\n" "s2,0,0,0,10\n")
    write(tmp_path / "annotations_with_malignancy.csv",
          MAL_HEADER
          + mal_row("s1", 3.1, 0, 0, 10, True, "[5, 5, 4]")  # nearest to the 2nd nodule
          + mal_row("s1", 0.2, 0, 0, 10, False, "[1, 1, 2]")
          + mal_row("s1", 200, 0, 0, 10, True, "[5, 5, 5]"))  # matches nothing
    with caplog.at_level(logging.WARNING, logger="luna.annotations"):
        merged = load_annotations(tmp_path)
    assert [(a.center_xyz[0], a.is_malignant, a.malignancy_ratings) for a in merged] == [
        (0.0, False, (1, 1, 2)),
        (3.0, True, (5, 5, 4)),
        (100.0, None, ()),
        (0.0, None, ()),
    ]
    assert "1 rating row(s)" in caplog.text


def test_either_annotation_file_alone(tmp_path):
    write(tmp_path / "annotations_with_malignancy.csv",
          MAL_HEADER + mal_row("s1", 1, 2, 3, 8, True, "[4, 4, 3, 2]"))
    assert load_annotations(tmp_path) == [
        Annotation("s1", (1.0, 2.0, 3.0), 8.0, True, (4, 4, 3, 2))
    ]
    write(tmp_path / "annotations.csv", ANN_HEADER + "s1,1,2,3,8\n" "s1,50,2,3,8\n")
    (tmp_path / "annotations_with_malignancy.csv").unlink()
    assert load_annotations(tmp_path) == [
        Annotation("s1", (1.0, 2.0, 3.0), 8.0),
        Annotation("s1", (50.0, 2.0, 3.0), 8.0),
    ]


# ----------------------------------------------------------------------- readers


def test_read_candidates_in_file_order(tmp_path):
    path = write(tmp_path / "candidates.csv", CAND_HEADER + "s2,1.5,-2,3e1,1\n" "s1,0,0,0,0\n")
    assert read_candidates(path) == [
        Candidate("s2", (1.5, -2.0, 30.0), True),
        Candidate("s1", (0.0, 0.0, 0.0), False),
    ]


def test_bom_blank_lines_extra_columns_and_spaces(tmp_path):
    path = write(
        tmp_path / "annotations.csv",
        "seriesuid,coordX,extra,coordY,coordZ,diameter_mm\n"
        "s1, 1.0,x,2,3,4\n"
        "\n"
        "s2,5,y,6,7,8\n"
        "\n\n",
        encoding="utf-8-sig",
    )
    assert read_annotations(path) == [
        Annotation("s1", (1.0, 2.0, 3.0), 4.0),
        Annotation("s2", (5.0, 6.0, 7.0), 8.0),
    ]


def test_excluded_file_accepts_minus_one_and_zero_diameters(tmp_path):
    text = ANN_HEADER + "s1,1,2,3,-1\n" "s1,4,5,6,0\n" "s1,4,5,6,0\n"
    path = write(tmp_path / "annotations_excluded.csv", text)
    assert [a.diameter_mm for a in read_excluded_annotations(path)] == [-1.0, 0.0, 0.0]


@pytest.mark.parametrize("diameter", ["0", "-1", "-0.5", "0.0"])
@pytest.mark.parametrize("reader, name", [(read_annotations, "annotations.csv"),
                                          (read_malignancy_annotations, "annotations_with_malignancy.csv")])
def test_nodules_need_a_positive_diameter(tmp_path, reader, name, diameter):
    # A nodule of size 0 can never be hit; such rows made 16 extra positives in
    # training and nodules no detector could find in the evaluation.
    if reader is read_annotations:
        text = ANN_HEADER + "s1,1,2,3,4\n" f"s1,5,6,7,{diameter}\n"
    else:
        text = MAL_HEADER + mal_row("s1", 1, 2, 3, 4, True, "[4]") + mal_row("s1", 5, 6, 7, diameter, False, "[1]")
    with pytest.raises(LunaError) as info:
        reader(write(tmp_path / name, text))
    assert f"{name}:3: column 'diameter_mm' holds '{diameter}'" in str(info.value)
    assert "positive diameter" in str(info.value)


@pytest.mark.parametrize("reader, name", [(read_annotations, "annotations.csv"),
                                          (read_malignancy_annotations, "annotations_with_malignancy.csv")])
def test_repeated_nodules_are_an_error_naming_the_lines(tmp_path, reader, name):
    # Found by value, not by text: "1" and "1.0" are the same centre.
    if reader is read_annotations:
        rows = ["s1,1,2,3,4\n", "s2,1,2,3,4\n", "s1,1.0,2,3,5\n", "s2,1,2,3,4\n"]
        text = ANN_HEADER + "".join(rows)
    else:
        rows = [mal_row("s1", 1, 2, 3, 4, True, "[4]"), mal_row("s2", 1, 2, 3, 4, True, "[4]"),
                mal_row("s1", "1.0", 2, 3, 5, True, "[4]"), mal_row("s2", 1, 2, 3, 4, True, "[4]")]
        text = MAL_HEADER + "".join(rows)
    with pytest.raises(LunaError) as info:
        reader(write(tmp_path / name, text))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / name}: 2 nodule(s) listed more than once")
    assert "line 4 repeats line 2, line 5 repeats line 3" in message
    # The same centre in another series is another nodule.
    ok = write(tmp_path / "ok.csv", ANN_HEADER + "s1,1,2,3,4\ns2,1,2,3,4\n")
    assert len(read_annotations(ok)) == 2


def test_real_annotation_files_pass_the_checks():
    # The checks are made to hold on the real files (no repeat, no size <= 0).
    assert len(read_annotations(real_file("annotations.csv"))) == 1186
    assert len(read_malignancy_annotations(real_file("annotations_with_malignancy.csv"))) == 1182


def test_repeated_candidate_rows_are_dropped_with_one_warning(tmp_path, caplog):
    text = CAND_HEADER + "s1,1,2,3,0\n" "s1,1,2,3,1\n" "s1,1.0,2,3,0\n" "s2,1,2,3,0\n" "s1,1,2,3,0\n" "s1,-0.0,0,0,0\n" "s1,0,0,0,0\n"
    path = write(tmp_path / "candidates.csv", text)
    with caplog.at_level(logging.WARNING):
        columns = read_candidate_columns(path)
    assert columns.series_uids == ["s1", "s1", "s2", "s1"]
    assert columns.is_nodule.tolist() == [False, True, False, False]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "candidates.csv: dropped 3 repeated candidate row(s)" in warnings[0] and "line 4" in warnings[0]
    # A file without repeats is returned as read, without a warning.
    caplog.clear()
    assert len(read_candidates(write(tmp_path / "c2.csv", CAND_HEADER + "s1,1,2,3,0\ns1,1,2,3,1\n"))) == 2
    assert not caplog.records


def test_header_only_file_has_no_records(tmp_path):
    assert read_candidates(write(tmp_path / "candidates.csv", CAND_HEADER)) == []


def test_records_are_frozen_hashable_and_picklable():
    info = CandidateInfo("s1", (1.0, 2.0, 3.0), True, True, False, 5.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.is_nodule = False  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(info)) == info
    assert len({info, pickle.loads(pickle.dumps(info))}) == 1
    assert hash(Annotation("s1", (0.0, 0.0, 0.0), 3.0, True, (4, 4)))


# ------------------------------------------------------------------- bad files


def test_missing_column(tmp_path):
    path = write(tmp_path / "candidates.csv", "seriesuid,coordX,coordY,class\ns1,1,2,1\n")
    with pytest.raises(LunaError) as info:
        read_candidates(path)
    message = str(info.value)
    assert "candidates.csv:1" in message
    assert "coordZ" in message
    assert "seriesuid,coordX,coordY,coordZ,class" in message


def test_missing_malignancy_column(tmp_path):
    path = write(tmp_path / "annotations_with_malignancy.csv", ANN_HEADER + "s1,1,2,3,4\n")
    with pytest.raises(LunaError, match=r"malignancy\.csv:1: .*mal_bool, mal_details"):
        read_malignancy_annotations(path)


@pytest.mark.parametrize(
    "reader, name, text, line, column, value",
    [
        (read_candidates, "candidates.csv",
         CAND_HEADER + "s1,1,2,3,0\n\ns1,1,abc,3,0\n", 4, "coordY", "abc"),
        (read_candidates, "candidates.csv",
         CAND_HEADER + "s1,1,2,3,0\ns1,1,2,3,2\n", 3, "class", "2"),
        (read_candidates, "candidates.csv", CAND_HEADER + "s1,nan,2,3,0\n", 2, "coordX", "nan"),
        (read_candidates, "candidates.csv", CAND_HEADER + ",1,2,3,0\n", 2, "seriesuid", ""),
        (read_annotations, "annotations.csv", ANN_HEADER + "s1,1,2,3,\n", 2, "diameter_mm", ""),
        (read_malignancy_annotations, "annotations_with_malignancy.csv",
         MAL_HEADER + mal_row("s1", 1, 2, 3, 4, True, "[4, 4]").replace("True", "yes"),
         2, "mal_bool", "yes"),
        (read_malignancy_annotations, "annotations_with_malignancy.csv",
         MAL_HEADER + mal_row("s1", 1, 2, 3, 4, True, "[4, x]"), 2, "mal_details", "[4, x]"),
    ],
)
def test_bad_value_names_file_line_column_value(tmp_path, reader, name, text, line, column, value):
    with pytest.raises(LunaError) as info:
        reader(write(tmp_path / name, text))
    message = str(info.value)
    assert f"{name}:{line}:" in message
    assert repr(column) in message
    assert repr(value) in message


def test_short_row(tmp_path):
    path = write(tmp_path / "candidates.csv", CAND_HEADER + "s1,1,2,3,0\ns1,1,2\n")
    with pytest.raises(LunaError, match=r"candidates\.csv:3: .*3 field"):
        read_candidates(path)


@pytest.mark.parametrize("text", ["", "\n\n", "\ufeff"])
def test_empty_file(tmp_path, text):
    path = write(tmp_path / "annotations.csv", text)
    with pytest.raises(LunaError, match=r"annotations\.csv.*empty"):
        read_annotations(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "candidates_V2.csv"
    with pytest.raises(LunaError) as info:
        read_candidates(path)
    assert "candidates_V2.csv" in str(info.value)
    assert "expected it at" in str(info.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "annotations.csv"
    path.write_bytes(ANN_HEADER.encode() + b"s1,1,2,3,\xff\xfe\n")
    with pytest.raises(LunaError, match=r"annotations\.csv.*UTF-8"):
        read_annotations(path)


def test_bad_file_in_data_dir_is_reported(tmp_path):
    write(tmp_path / "annotations.csv", ANN_HEADER + "s1,1,2,3,4\n")
    write(tmp_path / "candidates.csv", CAND_HEADER + "s1,1,2,3,0\ns1,x,2,3,0\n")
    with pytest.raises(LunaError, match=r"candidates\.csv:3:"):
        load_candidate_infos(tmp_path)


# ------------------------------------------------------------------------ split


def uids(n: int) -> list[str]:
    return [f"1.2.{i:03d}" for i in range(n)]


def test_split_by_series_deterministic_no_overlap():
    all_uids = uids(25)
    shuffled = all_uids[::-1]
    train, val = split_series(shuffled)
    assert (train, val) == split_series(all_uids)
    assert val == ["1.2.000", "1.2.010", "1.2.020"]
    assert not set(train) & set(val)
    assert sorted(train + val) == all_uids
    train3, val3 = split_series(all_uids, val_stride=5, val_offset=3)
    assert val3 == ["1.2.003", "1.2.008", "1.2.013", "1.2.018", "1.2.023"]
    assert len(train3) == 20


def test_split_duplicates_counted_once():
    train, val = split_series(["b", "a", "b", "c", "a"], val_stride=2)
    assert (train, val) == (["b"], ["a", "c"])


@pytest.mark.parametrize("n", [2, 3, 5, 9])
@pytest.mark.parametrize("stride, offset", [(10, 0), (10, 9), (2, 1), (3, 2)])
def test_split_at_least_one_each(n, stride, offset):
    train, val = split_series(uids(n), val_stride=stride, val_offset=offset)
    assert train and val
    assert sorted(train + val) == uids(n)
    assert not set(train) & set(val)


def test_split_tiny_and_bad_arguments():
    assert split_series([]) == ([], [])
    assert split_series(["only"]) == (["only"], [])
    with pytest.raises(ValueError):
        split_series(uids(5), val_stride=1)
    with pytest.raises(ValueError):
        split_series(uids(5), val_stride=4, val_offset=4)
    with pytest.raises(ValueError):
        split_series(uids(5), val_offset=-1)
