"""What one diagnosis writes: numbering, report.json, report.html, oriented pictures, the mask at the
segmentation threshold, the label map, the probabilities, the DICOM SEG, and the provenance warnings."""

from __future__ import annotations

import base64
import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from luna.annotations import load_annotations
from luna.datadir import DataDir
from luna.diagnose import __main__ as cmd
from luna.diagnose.pictures import label_spots, orientation_letters, view
from luna.geometry import Geometry
from luna.io import load_ct
from luna.models import NoduleClassifier, SegmentationUNet, make_checkpoint, save_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LIDC_0001 = SHARED / "lidc-idri" / "LIDC-IDRI-0001"
LIDC_NODULE_XYZ = (56.208, 86.343, -115.868)
PNG = b"\x89PNG\r\n\x1a\n"
PHANTOMS = {"data_dir": "/data/synthetic", "synthetic": True, "scans": 24, "training_scans": 21,
            "validation_scans": 3}


@pytest.fixture(scope="module")
def phantom_models(tmp_path_factory) -> dict[str, Path]:
    """Untrained networks in checkpoints that say they were trained on phantoms, 2 epochs."""
    root = tmp_path_factory.mktemp("phantom-models")
    paths = {}
    for seed, (name, model) in enumerate((("segmentation", SegmentationUNet(depth=2, wf=2)),
                                          ("nodule", NoduleClassifier()), ("malignancy", NoduleClassifier()))):
        torch.manual_seed(seed)
        model = type(model)(**model.model_args)
        payload = make_checkpoint(model, stage=name, epoch=2, args={"provenance": PHANTOMS},
                                  metrics={"best_score": 0.8, "best_epoch": 2, "score_name": "auc"})
        paths[name] = save_checkpoint(root / name / "best.pt", payload)
    return paths


def model_args(paths):
    return ["--segmentation-path", str(paths["segmentation"]), "--classification-path", str(paths["nodule"]),
            "--malignancy-path", str(paths["malignancy"]), "--device", "cpu"]


def graded_blobs(centers_xyz, radius_mm=6.0):
    """A fake `segment_ct`: p falls from 0.95 at each centre to 0 at ``radius_mm`` (so thresholds matter)."""

    def fake(model, ct, **kwargs):
        out = np.zeros(ct.hu.shape, dtype=np.float32)
        spacing = np.array(ct.geometry.spacing_irc)
        grids = np.ogrid[tuple(slice(0, s) for s in ct.hu.shape)]
        for xyz in centers_xyz:
            irc = ct.geometry.xyz_to_irc(xyz)
            d = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, irc, spacing)))
            out = np.maximum(out, 0.95 * np.clip(1 - d / radius_mm, 0, 1))
        return out.astype(np.float16)

    return fake


@pytest.fixture
def two_nodule_scan(tiny_dataset):
    data = DataDir.open(tiny_dataset)
    anns = load_annotations(tiny_dataset)
    for uid in data.series_uids:
        mine = [a for a in anns if a.series_uid == uid and a.diameter_mm >= 4]
        if len(mine) >= 2:
            return data, uid, mine[:2]
    pytest.skip("no tiny scan with two nodules")


class _Page(HTMLParser):
    """The parts of report.html a test checks."""

    def __init__(self):
        super().__init__()
        self.ids, self.images, self.links, self.rows, self._in, self.text = {}, [], [], [], [], {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids[a["id"]] = tag
            self._in.append(a["id"])
        else:
            self._in.append(None)
        if tag == "img":
            self.images.append(a)
            self._in.pop()
        if tag == "a":
            self.links.append(a.get("href"))
        if tag == "tr" and "data-number" in a:
            self.rows.append((int(a["data-number"]), a.get("class")))

    def handle_endtag(self, tag):
        if self._in:
            self._in.pop()

    def handle_data(self, data):
        for key in filter(None, self._in):
            self.text[key] = self.text.get(key, "") + data


def test_report_numbering_html_and_volumes(two_nodule_scan, phantom_models, tmp_path, monkeypatch, capsys):
    data, uid, (a, b) = two_nodule_scan
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", graded_blobs([a.center_xyz, b.center_xyz]))
    out = tmp_path / "out"
    assert cmd.cli(["--series-uid", uid, "--data-dir", str(data.root), "--out", str(out), "--nodule-threshold", "0",
                    "--segmentation-threshold", "0.3", "--save-probabilities", "--all", *model_args(phantom_models)]) == 0
    console = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())

    # report.json: version, time, convention, provenance; the CT is a phantom, so no "not meaningful" warning
    assert report["luna_version"] and report["written"][:4].isdigit()
    assert report["coordinates"]["system"] == "LPS"
    assert report["ct_is_synthetic"] is True and report["warnings"] == []
    assert [p["role"] for p in report["provenance"]] == ["segmentation", "nodule", "malignancy"]
    assert all(p["synthetic"] is True and p["epochs"] == 2 for p in report["provenance"])
    assert "synthetic phantoms (/data/synthetic, 24 scans: 21 training, 3 validation), 2 epochs" in console

    # one numbering: accepted first by p(nodule); the same in the table, JSON, CSV, PNG names and HTML
    nodules = report["nodules"]
    assert [n["number"] for n in nodules] == list(range(1, len(nodules) + 1))
    accepted = [n for n in nodules if n["accepted"]]
    assert len(accepted) == 2
    assert [n["p_nodule"] for n in accepted] == sorted((n["p_nodule"] for n in accepted), reverse=True)
    table = [line.split() for line in console.splitlines() if line[:3].strip().isdigit()]
    assert [int(r[0]) for r in table] == [n["number"] for n in nodules]
    assert [float(r[1]) for r in table] == pytest.approx([round(n["center_xyz"][0], 1) for n in nodules], abs=0.06)
    with open(out / "nodules.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["coordX"]) for r in rows] == pytest.approx([n["center_xyz"][0] for n in nodules])
    for n in accepted:
        assert (out / f"nodule_{n['number']}.png").read_bytes().startswith(PNG)

    # the mask honours --segmentation-threshold; the probabilities and the label map line up with the CT
    ct = load_ct(data.scan_path(uid))
    probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "probabilities.nii.gz")))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    assert probabilities.shape == mask.shape == ct.hu.shape
    # compared in the segmentation's float16, as the grouping compares (the file holds float32 copies)
    np.testing.assert_array_equal(mask, (probabilities.astype(np.float16) > 0.3).astype(np.uint8))
    assert 0 < mask.sum() < (probabilities > 0).sum()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    assert labels.dtype == np.uint16 and set(np.unique(labels)) == {0, 1, 2}
    assert np.all(mask[labels > 0] == 1)
    for n in accepted:
        i, r, c = (int(round(v)) for v in n["center_irc"])
        assert labels[i, r, c] == n["number"]
    image = sitk.ReadImage(str(out / "labels.nii.gz"))
    assert image.GetOrigin() == pytest.approx(ct.geometry.origin_xyz, abs=1e-3)
    assert image.GetDirection() == pytest.approx(ct.geometry.direction, abs=1e-6)

    # report.html: self-contained, verdict and provenance on top, a thumbnail per nodule, links to the files
    page = _Page()
    page.feed((out / "report.html").read_text())
    order = list(page.ids)
    assert order.index("verdict") < order.index("provenance") < order.index("nodule-table")
    assert report["verdict"] in page.text["verdict"]
    assert "synthetic phantoms" in page.text["provenance-list"]
    assert page.rows == [(n["number"], "accepted") for n in accepted]
    assert len(page.images) == 2 * len(accepted) + 1  # thumbnails, views, overview
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1]).startswith(PNG)
    files = [href for href in page.links if not href.startswith("#")]
    assert {"segmentation.nii.gz", "labels.nii.gz", "probabilities.nii.gz", "report.json"} <= set(files)
    assert all((out / href).is_file() for href in files)
    assert all(f"#nodule-{n['number']}" in page.links for n in accepted)


def test_no_accepted_nodule_shows_the_top_candidates(two_nodule_scan, phantom_models, tmp_path, monkeypatch,
                                                     capsys):
    data, uid, (a, b) = two_nodule_scan
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", graded_blobs([a.center_xyz, b.center_xyz]))
    out = tmp_path / "none"
    assert cmd.cli(["--series-uid", uid, "--data-dir", str(data.root), "--out", str(out), "--nodule-threshold",
                    "1.0", *model_args(phantom_models)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "no nodule found" and report["reported"] == 0
    assert {"candidate_1", "candidate_2"} <= set(report["files"])
    assert not any(name.startswith("nodule_") for name in report["files"])
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.rows == [(1, "rejected"), (2, "rejected")]
    assert "most probable candidates" in page.text["nodules"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    assert not labels.any()  # the label map holds accepted nodules only


def test_a_nodule_split_into_two_blobs_is_one_finding(tiny_dataset, phantom_models, tmp_path, monkeypatch, capsys):
    """Two blobs inside one nodule (a segmentation that splits it): one row, one duplicate merged."""
    data = DataDir.open(tiny_dataset)
    nodule = max(load_annotations(tiny_dataset), key=lambda a: a.diameter_mm)
    assert nodule.diameter_mm > 6
    offset = np.array([0.35 * nodule.diameter_mm, 0.0, 0.0])  # both centres inside the nodule, 0.7 d apart
    halves = [tuple(np.add(nodule.center_xyz, offset)), tuple(np.subtract(nodule.center_xyz, offset))]
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", graded_blobs(halves, radius_mm=0.5 * nodule.diameter_mm))
    out = tmp_path / "split"
    assert cmd.cli(["--series-uid", nodule.series_uid, "--data-dir", str(data.root), "--out", str(out),
                    "--nodule-threshold", "0", *model_args(phantom_models)]) == 0
    console = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert len(report["nodules"]) == 1 and report["duplicates_merged"] == 1
    assert "1 detection(s) (1 overlapping duplicate(s) merged into them), 1 accepted" in console
    found = np.array(report["nodules"][0]["center_xyz"])
    assert min(np.linalg.norm(found - h) for h in halves) < 1.0


# ------------------------------------------------------------------ pictures


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),          # LUNA16's usual
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),        # LUNA16's other
    (0, 0, 1, 1, 0, 0, 0, -1, 0),         # slices along x, rows towards the feet: a sagittal acquisition
    (1, 0, 0, 0, 1, 0, 0, 0, -1),         # slices stored feet first
])
def test_views_are_radiological_whatever_the_direction_matrix(direction):
    geometry = Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), direction)
    shape = (31, 41, 51)
    middle_xyz = geometry.irc_to_xyz(np.array(shape) / 2 - 0.5)
    marker_xyz = middle_xyz + np.array([-8.0, -8.0, 8.0])  # the patient's right, anterior, superior
    hu = np.full(shape, -1000, dtype=np.int16)
    i, r, c = geometry.xyz_to_irc_int(marker_xyz)
    hu[i, r, c] = 1000
    expected = {"axial": ("left", "top", dict(left="R", right="L", top="A", bottom="P")),
                "coronal": ("left", "top", dict(left="R", right="L", top="S", bottom="I")),
                "sagittal": ("left", "top", dict(left="A", right="P", top="S", bottom="I"))}
    for plane, (side, height, letters) in expected.items():
        fixed = view(hu, geometry, plane).fixed_axis
        v = view(hu, geometry, plane, (i, r, c)[fixed])
        assert v.letters == letters, plane
        y, x = np.unravel_index(np.argmax(v.image), v.image.shape)
        assert (x < v.image.shape[1] / 2) == (side == "left"), plane
        assert (y < v.image.shape[0] / 2) == (height == "top"), plane
        assert v.place((i, r, c)) == pytest.approx((x, y)), plane


def test_orientation_letters_of_oblique_directions():
    assert orientation_letters((1, 0, 0)) == "L"
    assert orientation_letters((0, -1, 0)) == "A"
    assert orientation_letters((0.8, -0.6, 0)) == "LA"
    assert orientation_letters((0.1, 0, -0.99)) == "I"


def test_overview_numbers_of_neighbouring_rings_do_not_overlap():
    def box(spot, size):
        (x, y), (w, h) = spot, size
        return x - w / 2, y - h / 2, x + w / 2, y + h / 2

    def apart(a, b):
        return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]

    # a lone ring: its number to the right, 2 (the gap) beyond the ring
    assert label_spots([(50, 50, 5)], [(4, 6)]) == [pytest.approx((59, 50))]
    # "1" and "12" beside two rings 12 mm apart on one row (their numbers ran into "112")
    rings, sizes = [(40, 50, 5), (52, 50, 5), (46, 60, 4)], [(4, 6), (8, 6), (4, 6)]
    spots = label_spots(rings, sizes)
    boxes = [box(s, z) for s, z in zip(spots, sizes)]
    assert all(apart(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    for b in boxes:  # and no number sits on a ring
        for x, y, r in rings:
            assert np.hypot(x - np.clip(x, b[0], b[2]), y - np.clip(y, b[1], b[3])) >= r


# ------------------------------------------------------------------ real DICOM: warning and DICOM SEG


@pytest.fixture
def lidc_folder():
    if not LIDC_0001.is_dir():
        pytest.skip(f"real DICOM data not found at {LIDC_0001}")
    return sorted(LIDC_0001.glob("*/*/"))[0]


def test_real_ct_with_phantom_models_says_not_meaningful_and_writes_a_dicom_seg(lidc_folder, phantom_models,
                                                                                 tmp_path, monkeypatch, capsys):
    hd = pytest.importorskip("highdicom")
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", graded_blobs([LIDC_NODULE_XYZ], radius_mm=12.0))
    out = tmp_path / "lidc"
    assert cmd.cli(["--dicom", str(lidc_folder), "--nodule-threshold", "0", "--out", str(out), "--no-pictures",
                    *model_args(phantom_models)]) == 0
    console = capsys.readouterr().out
    assert "NOT meaningful for a real scan" in console
    assert "not meaningful for this real scan" in console.split("verdict:")[1].splitlines()[0]
    report = json.loads((out / "report.json").read_text())
    assert report["ct_is_synthetic"] is False
    assert any("NOT meaningful" in w for w in report["warnings"])
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert "NOT meaningful" in (out / "report.html").read_text().split('id="provenance"')[0]

    # the DICOM SEG reads back, references the source series and lines up with the CT's slices
    ct = load_ct(lidc_folder)
    seg = hd.seg.segread(out / report["files"]["dicom_seg"])
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_uid
    import pydicom

    sources = {}
    for path in sorted(lidc_folder.iterdir()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if "ImagePositionPatient" in ds:
            k = int(round(ct.geometry.xyz_to_irc([float(v) for v in ds.ImagePositionPatient])[0]))
            sources[k] = ds
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.PatientID == sources[0].PatientID
    assert seg.number_of_segments == report["reported"] >= 1
    assert seg.get_segment_description(1).SegmentLabel == "nodule 1"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    slices = [k for k in range(ct.hu.shape[0]) if labels[k].any()]
    assert slices
    uids = [sources[k].SOPInstanceUID for k in slices]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(pixels, labels[slices])
    # the nodule's centre slice holds the nodule's segment at its centre pixel
    n = report["nodules"][0]
    i, r, c = (int(round(v)) for v in n["center_irc"])
    assert seg.get_pixels_by_source_instance([sources[i].SOPInstanceUID], segment_numbers=[1])[0, r, c, 0] == 1


def test_checkpoints_without_provenance_say_so(tiny_dataset, tmp_path, monkeypatch, capsys):
    root = tmp_path / "plain"
    paths = {name: save_checkpoint(root / f"{name}.pt", make_checkpoint(model, stage=name)) for name, model in
             (("segmentation", SegmentationUNet(depth=2, wf=2)), ("nodule", NoduleClassifier()),
              ("malignancy", NoduleClassifier()))}
    data = DataDir.open(tiny_dataset)
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", graded_blobs([]))
    assert cmd.cli(["--series-uid", data.series_uids[0], "--data-dir", str(tiny_dataset), *model_args(paths)]) == 0
    console = capsys.readouterr().out
    assert "unknown data (the checkpoint does not record it)" in console
    assert "is not recorded in the checkpoint" in console


def test_a_ct_is_synthetic_when_its_dataset_says_so(tiny_dataset, tmp_path):
    from luna.datadir import SYNTHETIC_MARKER, is_synthetic_path
    from luna.synth.dataset import MARKER

    assert SYNTHETIC_MARKER == MARKER
    data = DataDir.open(tiny_dataset)
    assert data.is_synthetic and is_synthetic_path(data.scan_path(data.series_uids[0]))
    assert not is_synthetic_path(tmp_path)


def test_the_diagnosis_imports_no_training_data_or_synth_code():
    import subprocess
    import sys

    import luna

    code = ("import sys, luna.diagnose.__main__, luna.diagnose.outputs, luna.diagnose.html, luna.diagnose.pictures, "
            "luna.diagnose.volumes, luna.diagnose.dicom_seg, luna.diagnose.batch; "
            "bad = [m for m in sys.modules if m.split('.')[:2] in (['luna', 'training'], ['luna', 'data'], "
            "['luna', 'synth'])]; print(bad); sys.exit(1 if bad else 0)")
    src = str(Path(luna.__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src},
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
