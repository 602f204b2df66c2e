"""The synthetic LUNA16-layout dataset: file formats, determinism, and the realism checks.

One ``tiny`` dataset (with DICOM series and previews) is generated per module and
shared by most tests; it takes a few seconds.
"""

from __future__ import annotations

import csv
import filecmp
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from scipy import ndimage

from luna.errors import LunaError
from luna.io import load_ct
from luna.io.image import read_image
from luna.io.luna16 import read_malignancy_annotations
from luna.synth import PRESETS, ensure_dataset, generate_dataset, is_complete
from luna.synth.cli import main as synth_main
from luna.synth.anatomy import Tissue, render_anatomy, sample_patient
from luna.synth.compare import measure
from luna.synth.imaging import Scanner, acquire, nps_filter
from luna.synth.scan import JUXTA_PLEURAL_OVERLAP, LUNG_MAP_CELL_MM
from luna.metrics import roc_auc
from luna.synth.nodules import (DIAMETER_QUANTILES, LUNA16_MALIGNANT_SHARE, READER_MODEL, rating_statistics,
                                sample_findings)
from luna.synth.presets import Preset
from luna.synth.scan import SLAB_MARGIN_SLICES, ScanSpec, make_scan

REAL_LUNA = SHARED_DATA / "luna16"

# Headers of the real LUNA16 files (also compared with the real files when present).
ANNOTATION_HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
CANDIDATE_HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "class"]
MALIGNANCY_HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "mal_bool", "mal_details", "bboxLowX",
                     "bboxLowY", "bboxLowZ", "bboxHighX", "bboxHighY", "bboxHighZ", "len_mal_details"]
CSVS = ["candidates.csv", "annotations.csv", "annotations_excluded.csv", "annotations_with_malignancy.csv"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "tiny"
    summary = generate_dataset(out, "tiny", seed=0, dicom=True, preview=True, progress=False)
    return out, summary


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def scans_of(out: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(out.glob("subset*/*.mhd"))}


def ground_truth(out: Path) -> list[dict]:
    return rows(out / "ground_truth.csv")


# --- layout and formats ------------------------------------------------------------------------

def test_layout(tiny):
    out, summary = tiny
    scans = scans_of(out)
    assert len(scans) == PRESETS["tiny"].scans == summary.scans
    subsets = sorted(p.name for p in out.glob("subset*"))
    assert subsets == [f"subset{i}" for i in range(summary.subsets)] and len(subsets) >= 2
    for uid, mhd in scans.items():
        assert re.fullmatch(r"[0-9]+(\.[0-9]+)+", uid) and len(uid) <= 64
        assert not any(len(part) > 1 and part.startswith("0") for part in uid.split("."))
        assert uid.startswith("1.3.6.1.4.1.14519.5.2.1.6279.6001.")
        raw = mhd.with_suffix(".raw")
        text = mhd.read_text()
        assert "ElementType = MET_SHORT" in text and "CompressedData = False" in text
        assert f"ElementDataFile = {raw.name}" in text
        dims = [int(v) for v in re.search(r"DimSize = (.*)", text).group(1).split()]
        assert raw.stat().st_size == 2 * np.prod(dims)
    for name in CSVS + ["ground_truth.csv", "scans.csv", "synth.json"]:
        assert (out / name).is_file(), name
    assert not (out / ".synth-partial").exists()
    assert not list(out.rglob(".tmp*")), "temporary files left behind"
    marker = json.loads((out / "synth.json").read_text())
    assert marker["preset"] == "tiny" and marker["seed"] == 0 and marker["scans"] == len(scans)
    # every uid in the CSVs is a scan on disk
    for name in CSVS:
        assert {r["seriesuid"] for r in rows(out / name)} <= set(scans)


def test_csv_headers_match_real_luna16(tiny):
    out, _ = tiny
    assert header(out / "annotations.csv") == ANNOTATION_HEADER
    assert header(out / "annotations_excluded.csv") == ANNOTATION_HEADER
    assert header(out / "candidates.csv") == CANDIDATE_HEADER
    assert header(out / "annotations_with_malignancy.csv") == MALIGNANCY_HEADER
    if REAL_LUNA.is_dir():
        assert header(REAL_LUNA / "annotations.csv") == ANNOTATION_HEADER
        assert header(REAL_LUNA / "annotations_with_malignancy.csv") == MALIGNANCY_HEADER


def test_csv_number_formats(tiny):
    out, _ = tiny
    for name in CSVS:
        data = (out / name).read_bytes()
        assert b"\r" not in data and data.endswith(b"\n")
    for r in rows(out / "annotations.csv"):
        for key in ("coordX", "coordY", "coordZ", "diameter_mm"):
            digits = re.sub(r"[^0-9]", "", r[key].split("e")[0]).lstrip("0")
            assert len(digits) <= 10, r[key]
            float(r[key])
    for r in rows(out / "candidates.csv"):
        assert r["class"] in ("0", "1")
        for key in ("coordX", "coordY", "coordZ"):
            assert re.fullmatch(r"-?\d+(\.\d{1,2})?", r[key]), r[key]
    text = (out / "annotations_with_malignancy.csv").read_text()
    mal = rows(out / "annotations_with_malignancy.csv")
    assert len(mal) == len(rows(out / "annotations.csv")) >= 1
    for r in mal:
        assert r["mal_bool"] in ("True", "False")
        assert re.fullmatch(r"\[[1-5](, [1-5])*\]", r["mal_details"])
        assert f'"{r["mal_details"]}"' in text  # quoted as in the real file
        ratings = json.loads(r["mal_details"])
        assert int(r["len_mal_details"]) == len(ratings) in (3, 4)
        assert (r["mal_bool"] == "True") == (sum(v >= 4 for v in ratings) >= 2)
        for axis in "XYZ":
            lo, c, hi = float(r[f"bboxLow{axis}"]), float(r[f"coord{axis}"]), float(r[f"bboxHigh{axis}"])
            assert lo < c < hi
            # centre +- radius, widened to whole voxels
            assert float(r["diameter_mm"]) - 1e-6 <= hi - lo <= float(r["diameter_mm"]) + 6


def test_luna_readers_accept_the_files(tiny):
    annotations = pytest.importorskip("luna.io.luna16")
    out, _ = tiny
    assert len(annotations.read_candidates(out / "candidates.csv")) == len(rows(out / "candidates.csv"))
    assert len(annotations.read_annotations(out / "annotations.csv")) >= 1
    excluded = annotations.read_excluded_annotations(out / "annotations_excluded.csv")
    assert excluded and all(a.diameter_mm < 3 for a in excluded)
    mal = annotations.read_malignancy_annotations(out / "annotations_with_malignancy.csv")
    assert all(a.malignancy_ratings for a in mal)


# --- determinism ------------------------------------------------------------------------------------

def test_same_seed_same_bytes_different_seed_different(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    generate_dataset(again, "tiny", seed=0, progress=False, workers=2)
    names = sorted(str(p.relative_to(out)) for p in out.glob("subset*/*")) + CSVS + ["ground_truth.csv"]
    assert names == sorted(str(p.relative_to(again)) for p in again.glob("subset*/*")) + CSVS + ["ground_truth.csv"]
    match, mismatch, errors = filecmp.cmpfiles(out, again, names, shallow=False)
    assert not mismatch and not errors
    other = tmp_path / "other"
    generate_dataset(other, "tiny", seed=1, scans=1, progress=False)
    (mhd,) = other.glob("subset*/*.mhd")
    assert mhd.stem not in scans_of(out)
    first = read_image(next(iter(scans_of(out).values())), hu_range=None).hu
    second = read_image(mhd, hu_range=None).hu
    assert first.shape != second.shape or not np.array_equal(first, second)


# --- realism ------------------------------------------------------------------------------------------

def test_hu_statistics(tiny):
    out, summary = tiny
    for r in rows(out / "scans.csv"):
        assert -1010 <= int(r["hu_air"]) <= -980
        assert -900 <= int(r["hu_lung"]) <= -800
        assert -130 <= int(r["hu_fat"]) <= -60
        assert 0 <= int(r["hu_soft_tissue"]) <= 100
        assert int(r["hu_bone"]) > 300
    for mhd in scans_of(out).values():
        ct = read_image(mhd, hu_range=None)
        hu = ct.hu
        # Outside the body: padding, or air at the scanner's -1024 floor.
        corner = hu[:, :4, :4]
        assert np.median(corner) <= -990 and corner.max() < -850
        values = hu[hu > -1030]
        assert 0 <= _mode(values, -30, 150) <= 100
        assert -140 <= _mode(values, -200, -40) <= -60  # fat
        assert np.percentile(values, 99.9) > 300  # bone


def test_lung_around_isolated_nodules_is_parenchyma(tiny):
    # The lung, measured in the image alone: a shell 2-4 mm outside each nodule that
    # does not touch the wall holds parenchyma (-850 HU with vessels and texture).
    out, _ = tiny
    scans = scans_of(out)
    medians = []
    for f in ground_truth(out):
        if f["type"] == "juxta-pleural" or f["kind"] != "nodule":
            continue
        ct = read_image(scans[f["seriesuid"]], hu_range=None)
        c = np.array([float(f[k]) for k in ("coordX", "coordY", "coordZ")])
        r = float(f["diameter_mm"]) / 2
        k, i, j = np.indices(ct.hu.shape).reshape(3, -1)
        xyz = ct.geometry.irc_to_xyz(np.stack([k, i, j], axis=1))
        d = np.linalg.norm(xyz - c, axis=1)
        shell = (d > r + 2) & (d < r + 4)
        medians.append(np.median(ct.hu.reshape(-1)[shell]))
    assert len(medians) >= 3
    assert -900 <= np.median(medians) <= -780, medians


def _mode(values, lo, hi, width=10):
    sel = values[(values >= lo) & (values < hi)]
    counts, edges = np.histogram(sel, bins=np.arange(lo, hi + width, width))
    counts = np.convolve(counts, np.ones(3), mode="same")
    return float(edges[np.argmax(counts)] + width / 2)


def test_annotation_centres_lie_on_their_nodules(tiny):
    out, _ = tiny
    scans = scans_of(out)
    lung = {r["seriesuid"]: int(r["hu_lung"]) for r in rows(out / "scans.csv")}
    cts = {uid: read_image(p, hu_range=None) for uid, p in scans.items()}
    annotations = rows(out / "annotations.csv")
    assert annotations
    for r in annotations:
        ct = cts[r["seriesuid"]]
        xyz = [float(r[k]) for k in ("coordX", "coordY", "coordZ")]
        k, i, j = ct.geometry.xyz_to_irc_int(xyz)
        centre = int(ct.hu[k, i, j])
        assert centre > lung[r["seriesuid"]] + 150, (r, centre)
    for f in ground_truth(out):
        if f["kind"] == "nodule" and f["type"] in ("solid", "juxta-pleural", "juxta-vascular") \
                and float(f["diameter_mm"]) >= 5:
            assert int(f["center_hu"]) > -400, f


def test_nodules_touch_the_wall_only_when_juxta_pleural(tiny):
    out, _ = tiny
    truth = ground_truth(out)
    types = {f["type"] for f in truth if f["excluded"] == "False"}
    assert {"solid", "part-solid", "ground-glass", "juxta-pleural", "juxta-vascular"} <= types
    for f in truth:
        overlap = float(f["wall_overlap"])
        if f["type"] == "juxta-pleural":
            assert JUXTA_PLEURAL_OVERLAP[0] < overlap < JUXTA_PLEURAL_OVERLAP[1], f
            # Measured at the nearest cell of the ~2.5 mm lung map: within about a cell of the radius.
            assert float(f["pleura_distance_mm"]) < float(f["diameter_mm"]) / 2 + 1.5 * LUNG_MAP_CELL_MM, f
        else:
            assert overlap == 0, f
        if f["type"] == "juxta-vascular":
            assert f["vessel_contact"] == "True"


def test_small_nodules_go_to_excluded(tiny):
    out, _ = tiny
    annotated = rows(out / "annotations.csv")
    excluded = rows(out / "annotations_excluded.csv")
    assert all(float(r["diameter_mm"]) >= 3 for r in annotated)
    assert excluded and all(float(r["diameter_mm"]) < 3 for r in excluded)
    truth = ground_truth(out)
    small = [f for f in truth if f["kind"] == "nodule" and float(f["diameter_mm"]) < 3]
    assert small and all(f["excluded"] == "True" for f in small)
    non_nodules = [f for f in truth if f["kind"] == "non-nodule"]
    assert sum(r["diameter_mm"] == "-1" for r in excluded) == len(non_nodules)
    assert len(excluded) == len(small) + len(non_nodules)
    assert len(annotated) == sum(f["excluded"] == "False" for f in truth)


def test_candidates_near_nodules_and_many_on_vessels(tiny):
    out, _ = tiny
    cands = rows(out / "candidates.csv")
    xyz = np.array([[float(r[k]) for k in ("coordX", "coordY", "coordZ")] for r in cands])
    cls = np.array([r["class"] == "1" for r in cands])
    uid = np.array([r["seriesuid"] for r in cands])
    annotations = rows(out / "annotations.csv")
    for a in annotations:
        c = np.array([float(a[k]) for k in ("coordX", "coordY", "coordZ")])
        d = float(a["diameter_mm"])
        mine = (uid == a["seriesuid"]) & cls
        delta = np.abs(xyz[mine] - c)
        # The book's matching rule (|delta| < d/4 per axis) and LUNA16's hit rule (< radius).
        assert np.any(np.all(delta < d / 4, axis=1)), a
        assert np.any(np.linalg.norm(delta, axis=1) < d / 2), a
        # no class 0 candidate sits on an annotated nodule
        others = (uid == a["seriesuid"]) & ~cls
        assert np.all(np.linalg.norm(xyz[others] - c, axis=1) >= d / 2)
    assert cls.sum() >= len(annotations)
    per_scan = {u: int(np.sum((uid == u) & ~cls)) for u in set(uid)}
    assert min(per_scan.values()) >= 25
    # Hard negatives: most class 0 candidates sit on something bright (vessels, pleura).
    bright = 0
    negatives = 0
    for u, mhd in scans_of(out).items():
        ct = read_image(mhd, hu_range=None)
        for p in xyz[(uid == u) & ~cls]:
            k, i, j = ct.geometry.xyz_to_irc_int(p)
            patch = ct.hu[max(k - 1, 0):k + 2, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            bright += patch.max() > -500
            negatives += 1
    assert bright / negatives > 0.6


def test_geometry_variety(tiny):
    out, summary = tiny
    geometries = [read_image(p).geometry for p in scans_of(out).values()]
    directions = {g.direction for g in geometries}
    assert (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0) in directions
    assert (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0) in directions
    assert len({g.spacing_xyz[0] for g in geometries}) > 1
    assert len({g.origin_xyz for g in geometries}) == len(geometries)
    noise = [float(r["noise_hu"]) for r in rows(out / "scans.csv")]
    assert max(noise) > min(noise)
    # Centres in the ground truth agree with the geometry of the scan.
    scans = scans_of(out)
    for f in ground_truth(out):
        g = read_image(scans[f["seriesuid"]]).geometry
        irc = g.xyz_to_irc([float(f[k]) for k in ("coordX", "coordY", "coordZ")])
        assert np.allclose(irc, [float(f[k]) for k in ("index", "row", "col")], atol=1e-2)


def test_dicom_round_trip(tiny):
    pytest.importorskip("luna.io.dicom")
    out, _ = tiny
    for uid, mhd in scans_of(out).items():
        folder = out / "dicom" / uid
        assert len(list(folder.glob("*.dcm"))) == read_image(mhd).hu.shape[0]
        a, b = load_ct(mhd), load_ct(folder)
        assert b.series_uid == uid
        assert np.array_equal(a.hu, b.hu)
        assert a.geometry.direction == b.geometry.direction
        assert np.allclose(a.geometry.origin_xyz, b.geometry.origin_xyz, atol=1e-4)
        assert np.allclose(a.geometry.spacing_xyz, b.geometry.spacing_xyz, atol=1e-6)


def test_preview_pngs(tiny):
    out, _ = tiny
    pngs = sorted((out / "preview").glob("*.png"))
    assert {p.stem for p in pngs} == set(scans_of(out))
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_summary(tiny):
    out, summary = tiny
    assert summary.scans == 4 and summary.nodules >= 3
    assert summary.candidates == len(rows(out / "candidates.csv"))
    assert -900 <= summary.hu_medians["lung"] <= -800
    assert summary.directions.get("identity") and summary.directions.get("flipped")
    assert summary.vessel_segments_per_scan > 200
    text = summary.format()
    for word in ("nodules", "candidates", "HU medians", "malignant", "vessels"):
        assert word in text


# --- the generator's statistics without generating volumes ---------------------------------------

def test_diameters_and_malignancy_follow_luna16():
    rng = np.random.default_rng(0)
    findings = sample_findings(rng, 4000, 0, 0, max_diameter=40.0)
    d = np.array([f.diameter_mm for f in findings])
    mal = np.array([f.malignant for f in findings])
    assert np.median(d) == pytest.approx(np.median(DIAMETER_QUANTILES), rel=0.08)
    assert d.min() >= 3.0
    assert mal[(d >= 4) & (d < 6)].mean() < 0.12
    assert 0.35 < mal[(d >= 8) & (d < 10)].mean() < 0.75
    assert mal[d >= 15].mean() > 0.85
    assert 0.25 < mal.mean() < 0.42
    for f in findings[:200]:
        assert sum(r >= 4 for r in f.ratings) >= 2 if f.malignant else sum(r >= 4 for r in f.ratings) < 2


def test_synthetic_readers_rate_as_the_real_luna16_readers(shared_data):
    """`READER_MODEL` against the real annotations_with_malignancy.csv, on the statistics it was fitted on."""
    real = read_malignancy_annotations(shared_data / "luna16" / "annotations_with_malignancy.csv")
    want = rating_statistics([a.diameter_mm for a in real], [a.malignancy_ratings for a in real],
                             [a.is_malignant for a in real])
    assert want["malignant_share"] == pytest.approx(LUNA16_MALIGNANT_SHARE, abs=5e-4)  # the summary's reference
    findings = sample_findings(np.random.default_rng(1), 3000, 0, 0, max_diameter=40.0)
    got = rating_statistics([f.diameter_mm for f in findings], [f.ratings for f in findings],
                            [f.malignant for f in findings])
    # 0.08: in the 8-10 mm band the real share's own standard error is 0.045 (125 nodules), this sample's 0.03
    assert got["malignant_share"] == pytest.approx(want["malignant_share"], abs=0.08)
    assert got["reader_variance"] == pytest.approx(want["reader_variance"], abs=0.1)
    assert got["agreed_beyond_size"] == pytest.approx(want["agreed_beyond_size"], abs=0.08)
    assert got["diameter_auc"] == pytest.approx(want["diameter_auc"], abs=0.03)


def test_what_readers_agree_on_beyond_size_is_in_the_image():
    """LIDC readers saw only the CT: a model that saw the shape perfectly beats the diameter (by about 0.03)."""
    findings = sample_findings(np.random.default_rng(1), 3000, 0, 0, max_diameter=40.0)
    mal = np.array([f.malignant for f in findings])
    d = np.array([f.diameter_mm for f in findings])
    visible = [READER_MODEL.visible_score(f.diameter_mm, f.spiculation, f.lobulation, f.type, f.calcified)
               for f in findings]
    assert roc_auc(mal, visible) > roc_auc(mal, d) + 0.02
    # spiculation matters beyond size: among 8-12 mm nodules, spiculated ones are more often malignant
    band = (d >= 8) & (d < 12)
    spiculated = np.array([f.spiculation >= 3 for f in findings])
    assert mal[band & spiculated].mean() > mal[band & ~spiculated].mean() + 0.15



def test_every_annotated_nodule_of_a_generated_set_has_its_visible_score(tiny):
    """`visible_malignancy_scores` reads the ground truth back and keys it as the annotations: the bench's
    malignancy ceiling can score every rated nodule; a directory luna did not write has none."""
    from luna.annotations import load_annotations
    from luna.synth.dataset import visible_key, visible_malignancy_scores

    out, _ = tiny
    scores = visible_malignancy_scores(out)
    rated = [a for a in load_annotations(out) if a.is_malignant is not None]
    assert rated and len(scores) == len(rated)
    with (out / "ground_truth.csv").open(newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["kind"] == "nodule" and r["excluded"] == "False")
    want = READER_MODEL.visible_score(float(row["diameter_mm"]), int(row["spiculation"]), int(row["lobulation"]),
                                      row["type"], row["calcified"] == "True")
    centre = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
    assert scores[visible_key(row["seriesuid"], centre)] == want
    assert all(visible_key(a.series_uid, a.center_xyz) in scores for a in rated)
    assert visible_malignancy_scores(out / "subset0") == {}

# --- generate once, reuse after --------------------------------------------------------------------

def test_ensure_dataset_reuses_a_complete_dataset(tiny, tmp_path, monkeypatch):
    out, _ = tiny
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    import luna.synth.dataset as dataset

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(dataset, "generate_dataset", fail)
    assert ensure_dataset(copy, "tiny") == copy


def test_ensure_dataset_regenerates_for_another_scan_count(tiny, tmp_path):
    out, summary = tiny
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert ensure_dataset(copy, "tiny", scans=len(list(out.glob("subset*/*.mhd")))) == copy
    ensure_dataset(copy, "tiny", scans=1, progress=False)
    assert is_complete(copy, "tiny", scans=1) and not is_complete(copy, "tiny", scans=4)
    assert len(list(copy.glob("subset*/*.mhd"))) == 1


def test_ensure_dataset_regenerates_a_half_written_one(tiny, tmp_path):
    out, _ = tiny
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # Killed half-way: the marker is not there yet and a scan is short.
    (copy / "synth.json").unlink()
    (copy / ".synth-partial").write_text("{}")
    raw = next(copy.glob("subset*/*.raw"))
    raw.write_bytes(raw.read_bytes()[:1000])
    assert not is_complete(copy, "tiny")
    ensure_dataset(copy, "tiny", progress=False)
    assert is_complete(copy, "tiny")
    assert filecmp.cmp(raw, out / raw.relative_to(copy), shallow=False)
    # A truncated scan in a finished dataset is noticed too.
    raw.write_bytes(raw.read_bytes()[:1000])
    assert not is_complete(copy, "tiny")


def test_ensure_dataset_never_overwrites_other_data(tmp_path):
    data = tmp_path / "luna"
    (data / "subset0").mkdir(parents=True)
    (data / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    with pytest.raises(LunaError, match="not made by luna.synth"):
        ensure_dataset(data, "tiny", progress=False)
    assert (data / "annotations.csv").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synth_main(["--out", str(out), "--preset", "tiny", "--scans", "1", "--seed", "3", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "preset tiny, seed 3" in text and "candidates" in text
    assert len(list(out.glob("subset*/*.mhd"))) == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert synth_main(["--out", str(foreign), "--preset", "tiny", "--quiet"]) == 2
    assert "not made by luna.synth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synth_main(["--out", str(out), "--preset", "huge"])


# --- presets ------------------------------------------------------------------------------------------

def test_the_training_preset_has_real_ct_voxels():
    # Real chest CT: 512x512 slices of 0.6-0.9 mm; the built-in set trains on the same.
    demo = PRESETS["demo"]
    assert demo.inplane_size == 512 and 0.6 <= demo.inplane_spacing[0] < demo.inplane_spacing[1] <= 0.9
    # Slabs long enough that candidates fill at least 16 slices between the margins, and a
    # 32-slice chunk around one is padded by at most 16 - SLAB_MARGIN_SLICES slices.
    assert demo.slab and demo.slices[0] >= 2 * SLAB_MARGIN_SLICES + 16
    realistic = PRESETS["realistic"]
    assert realistic.inplane_size == 512 and not realistic.slab


def test_slabs_cut_whole_patients_and_keep_findings_away_from_their_ends():
    # A small slab preset: the patient is sized for a whole chest (its lungs are longer
    # than the slab) and every finding and candidate is SLAB_MARGIN_SLICES inside it.
    preset = Preset(name="slab-test", scans=1, inplane_size=160, inplane_spacing=(1.6, 1.8), slice_spacings=(2.5,),
                    slices=(40, 40), nodules_mean=4.0, max_diameter_mm=12.0, candidates=(30, 30),
                    scans_per_subset=1, slab=True)
    scan = make_scan(ScanSpec(0, "1.2.3", 0, preset, seed=5))
    assert scan.hu.shape == (40, 160, 160)
    z = scan.geometry.irc_to_xyz(np.array([[0, 0, 0], [39, 0, 0]]))[:, 2]
    assert scan.info["lung_length_mm"] > z[1] - z[0] + 10
    lo, hi = z[0] + SLAB_MARGIN_SLICES * 2.5 - 1e-6, z[1] - SLAB_MARGIN_SLICES * 2.5 + 1e-6
    assert scan.candidates and scan.findings
    for c in scan.candidates:
        assert lo <= c.xyz[2] <= hi or c.is_nodule or c.source == "excluded"
    for f in scan.findings:
        assert lo + f.radius - 1e-6 <= f.center_xyz[2] <= hi - f.radius + 1e-6


# --- the phantom's anatomy and the scanner model ---------------------------------------------------------

def _small_patient(seed=3):
    rng = np.random.default_rng(seed)
    patient = sample_patient(rng, fov_mm=300.0, center_uv=(0.0, 0.0), z_lo=-300.0, z_hi=0.0, body_fill=(0.8, 0.8))
    y = x = np.linspace(-150, 150, 96)
    return patient, x, y


def test_thick_slices_average_thin_sections():
    # Partial volume along z: a 2.5 mm slice rendered with 3 sections is the mean of the
    # three thin sections at -5/6, 0, +5/6 mm (checked where no section is lung: the
    # lung's texture is drawn once per slice).
    patient, x, y = _small_patient()
    mixed = 0
    for h in (0.15, 0.5, 0.97):  # near the diaphragm, mid-chest, near the apices
        z = patient.z(h) + np.array([0.0, 2.5])
        thick, labels = render_anatomy(patient, (z, y, x), (0.0, 0.0), 150.0, np.random.default_rng(0), z_sub=3)
        sections = [render_anatomy(patient, (z + dz, y, x), (0.0, 0.0), 150.0, np.random.default_rng(0))
                    for dz in (-2.5 / 3, 0.0, 2.5 / 3)]
        lung = np.any([lab == Tissue.LUNG for _, lab in sections], axis=0)
        mean = np.mean([hu for hu, _ in sections], axis=0)
        assert np.allclose(thick[~lung], mean[~lung], atol=1e-3)
        assert np.array_equal(labels, sections[1][1])
        # Where tissues change within the slice, voxels are mixtures that no section has.
        mixed += int((~lung & np.all([np.abs(thick - hu) > 50 for hu, _ in sections], axis=0)).sum())
    assert mixed > 10


def test_noise_has_ct_power_spectrum():
    # Unit variance, and a band-pass spectrum: low frequencies carry less power than
    # the peak, near the model's peak frequency, and neighbouring voxels correlate.
    spacing = (0.7, 0.7)
    amplitude = nps_filter((256, 256), spacing, peak=0.2, floor=0.1)
    rng = np.random.default_rng(0)
    fields = [np.fft.irfft2(np.fft.rfft2(rng.standard_normal((256, 256))) * amplitude, s=(256, 256)) for _ in range(8)]
    assert np.std(fields) == pytest.approx(1.0, abs=0.03)
    power = np.mean([np.abs(np.fft.fft2(f)) ** 2 for f in fields], axis=0)
    f = np.hypot(np.fft.fftfreq(256, 0.7)[:, None], np.fft.fftfreq(256, 0.7)[None, :])
    radial = [power[(f >= lo) & (f < lo + 0.05)].mean() for lo in np.arange(0, 0.7, 0.05)]
    peak = 0.025 + 0.05 * int(np.argmax(radial))
    assert 0.12 <= peak <= 0.25
    assert radial[0] < 0.5 * max(radial) and radial[-1] < 0.2 * max(radial)
    corr = np.mean([np.corrcoef(fl[:, :-1].ravel(), fl[:, 1:].ravel())[0, 1] for fl in fields])
    assert 0.3 < corr < 0.8


def _block_phantom(width, hu=0.0, n=128):
    """Air around a block ``width`` voxels wide and 40 high, of ``hu``."""
    vol = np.full((4, n, n), -1000.0, np.float32)
    vol[:, n // 2 - 20:n // 2 + 20, n // 2 - width // 2:n // 2 + width // 2] = hu
    return vol


def test_scanner_noise_level_and_streaks_along_long_paths():
    scanner = Scanner(kernel="standard", blur_mm=0.5, slice_sigma=0.2, sharpen=0.0, sharpen_mm=1.0, noise_hu=20.0,
                      nps_peak=0.2, nps_floor=0.25, z_correlation=0.0, streaks=1.0)
    spacing = (2.5, 1.0, 1.0)
    small = _block_phantom(100)
    out = acquire(small, scanner, spacing, np.random.default_rng(0), body_center_rc=(64, 64),
                  body_half_size_rc=(20, 50))
    inside = out[:, 54:74, 30:98]
    # 0.8-1.2 times noise_hu across the body (strongest at the centre).
    assert 14 < inside.std() < 26
    # A long path (here 5 mm voxels: 100 cm of bone-like tissue along each row) starves
    # the detector: each row gets one error along its whole length, a streak. Along a
    # 10 cm path of water there are none.
    spacing = (2.5, 5.0, 5.0)
    dense = _block_phantom(100, hu=1000.0)
    quiet = _block_phantom(20, hu=0.0)
    rows = []
    for phantom in (dense, quiet):
        image = acquire(phantom, scanner, spacing, np.random.default_rng(0), body_center_rc=(64, 64),
                        body_half_size_rc=(20, 50))
        error = image - ndimage.gaussian_filter(phantom, (0.2, 0.1, 0.1))
        rows.append(error[:, 50:78, 10:118].mean(axis=2).std())
    assert rows[0] > 5 * rows[1]


# --- the comparison with real CT ---------------------------------------------------------------------------

def _chest_phantom(spacing=0.7, n=352, slices=6, lung_hu=-870.0):
    """A body of soft tissue in a ring of fat, two lungs, and vessels of known calibre."""
    yy, xx = (np.mgrid[0:n, 0:n] - (n - 1) / 2) * spacing
    body = (xx / 110) ** 2 + (yy / 80) ** 2 < 1
    fat = body & ((xx / 110) ** 2 + (yy / 80) ** 2 > 0.55)
    lungs = [((xx - sx * 38) / 30) ** 2 + (yy / 40) ** 2 < 1 for sx in (-1, 1)]
    img = np.full((n, n), -1000.0)
    img[body] = 40.0
    img[fat] = -100.0
    for lung in lungs:
        img[lung] = lung_hu
    vol = np.repeat(img[None], slices, axis=0).astype(np.float32)
    # Vessels across the slices: discs of 3 mm diameter in the left lung, 2 mm in the right.
    for cx, d in ((-38, 3.0), (38, 2.0)):
        for cy in (-20, 0, 20):
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= (d / 2) ** 2
            vol[:, disc] = 40.0
    return vol


def test_measure_recovers_known_calibres_noise_and_edges():
    spacing = 0.7
    sigma_mm = 0.8
    clean = _chest_phantom(spacing)
    vol = ndimage.gaussian_filter(clean, (0, sigma_mm / spacing, sigma_mm / spacing))
    rng = np.random.default_rng(1)
    vol = vol + rng.normal(0, 15.0, vol.shape).astype(np.float32)
    stats = measure(vol, (2.5, spacing, spacing), "phantom", lung_slices_only=False)
    assert stats.noise_sd_hu["soft_tissue"] == pytest.approx(15.0, rel=0.15)
    assert stats.noise_sd_hu["fat"] == pytest.approx(15.0, rel=0.15)
    # White noise: almost no correlation at 1 mm, power spread up to Nyquist (0.71 c/mm).
    assert abs(stats.noise_correlation_1mm) < 0.1 and stats.nps_mean_frequency > 0.4
    # 6 vessel sections per slice of 3.0 and 2.0 mm, in two lungs of 30 x 40 mm less the
    # 2 mm border the measurement leaves out.
    assert stats.vessels_per_cm2 == pytest.approx(6 / (2 * np.pi * 27.9 * 37.9 / 100), rel=0.1)
    assert stats.calibre_mm["p90"] == pytest.approx(3.0, abs=0.5)
    assert stats.calibre_mm["p10"] == pytest.approx(2.0, abs=0.5)
    # A Gaussian edge of sigma s rises from 10 % to 90 % over 2.56 s.
    assert stats.edge_10_90_mm == pytest.approx(2.563 * sigma_mm, rel=0.2)
    assert stats.hu_percentiles["parenchyma"][2] == pytest.approx(-870, abs=10)
    assert stats.hu_percentiles["soft_tissue"][2] == pytest.approx(40, abs=5)
    assert stats.hu_percentiles["fat"][2] == pytest.approx(-100, abs=5)


def test_measure_a_real_slab(shared_data):
    ct = load_ct(shared_data / "lidc-idri" / "LIDC-IDRI-0002", hu_range=None)
    sx, sy, sz = ct.geometry.spacing_xyz
    stats = measure(ct.hu, (sz, sy, sx), "LIDC-IDRI-0002")
    assert -920 < stats.hu_percentiles["parenchyma"][2] < -820
    assert 20 < stats.hu_percentiles["soft_tissue"][2] < 80
    assert -130 < stats.hu_percentiles["fat"][2] < -70
    assert 0.003 < stats.vessel_fraction < 0.08
    assert 5 < stats.noise_sd_hu["soft_tissue"] < 40
    assert 250 < stats.body_width_mm < 450
    assert stats.edge_10_90_mm is not None and 0.8 < stats.edge_10_90_mm < 4


def test_cli_compare_real(tiny, tmp_path, capsys):
    # Any CT luna reads can be the "real" side; here a scan of the tiny set, so the test
    # runs without the real data.
    out, _ = tiny
    real = next(iter(scans_of(out).values()))
    report = tmp_path / "compare"
    assert synth_main(["--compare-real", str(real), "--preset", "tiny", "--scans", "1", "--out", str(report)]) == 0
    text = capsys.readouterr().out
    for row in ("HU parenchyma", "vessel share of lung", "calibre p10/p50/p90", "noise sd soft HU",
                "NPS mean freq", "noise corr at 1 mm", "edge 10-90%"):
        assert row in text
    assert "real" in text and "synthetic" in text and "tiny#0 (seed 0)" in text
    data = json.loads((report / "compare.json").read_text())
    assert len(data["real"]) == 1 and len(data["synthetic"]) == 1 and data["seconds_per_scan"] > 0
    assert (report / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert synth_main(["--compare-real", str(tmp_path / "nothing.mhd"), "--preset", "tiny"]) == 2
    assert "nothing.mhd" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synth_main(["--preset", "tiny"])  # neither --out nor --compare-real


def test_every_tiny_scan_holds_both_malignancy_classes(tiny):
    # So that any split of the test set can train and validate the malignancy classifier.
    out, _ = tiny
    by_scan: dict[str, set] = {}
    for r in rows(out / "annotations_with_malignancy.csv"):
        by_scan.setdefault(r["seriesuid"], set()).add(r["mal_bool"])
    assert set(by_scan) == set(scans_of(out))
    assert all(classes == {"True", "False"} for classes in by_scan.values())
