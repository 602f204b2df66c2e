"""luna.diagnose and luna.inference.pipeline: verdict, model discovery, the command end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from luna.annotations import load_annotations
from luna.datadir import DataDir
from luna.diagnose import __main__ as cmd
from luna.errors import LunaError
from luna.inference.pipeline import SEARCH_BUDGET, Nodule, trained_search_budget, verdict
from luna.io import load_ct
from luna.models import (
    NoduleClassifier,
    SegmentationUNet,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LIDC_0001 = SHARED / "lidc-idri" / "LIDC-IDRI-0001"
LIDC_0002 = SHARED / "lidc-idri" / "LIDC-IDRI-0002"
LIDC_NODULE_XYZ = (56.208, 86.343, -115.868)


def nod(p_nodule=0.9, p_malignant=None, xyz=(0.0, 0.0, 0.0), threshold=0.5, d=6.0):
    return Nodule(tuple(xyz), (0.0, 0.0, 0.0), d, p_nodule, p_malignant, p_nodule >= threshold)


# ---------------------------------------------------------------- verdict


@pytest.mark.parametrize(
    "nodules, assessed, expected",
    [
        ([], True, "no nodule found"),
        ([], False, "no nodule found"),
        ([nod(0.2, None)], True, "no nodule found"),  # only filtered-out detections
        ([nod(0.9, 0.1), nod(0.8, 0.3)], True, "nodules found, none suspected malignant"),
        ([nod(0.9, 0.1), nod(0.8, 0.7)], True, "malignant nodule suspected (p=0.70)"),
        ([nod(0.9, 0.5)], True, "malignant nodule suspected (p=0.50)"),  # threshold inclusive
        ([nod(0.9, None)], False, "malignancy not assessed"),
        # a malignant score on a rejected detection does not count
        ([nod(0.3, 0.99), nod(0.9, 0.1)], True, "nodules found, none suspected malignant"),
    ],
)
def test_verdict(nodules, assessed, expected):
    assert expected in verdict(nodules, malignancy_assessed=assessed, malignancy_threshold=0.5)


def test_verdict_threshold_option():
    n = [nod(0.9, 0.3)]
    assert verdict(n, malignancy_assessed=True, malignancy_threshold=0.25).startswith("malignant")
    assert verdict(n, malignancy_assessed=True, malignancy_threshold=0.35).startswith("nodules found")


# ---------------------------------------------------------------- models


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    seg = SegmentationUNet(depth=2, wf=2)
    torch.manual_seed(1)
    cls = NoduleClassifier()
    torch.manual_seed(2)
    mal = NoduleClassifier()
    paths = {}
    for name, model, stage in (("segmentation", seg, "segmentation"), ("nodule", cls, "nodule"),
                               ("malignancy", mal, "malignancy")):
        paths[name] = save_checkpoint(root / name / "best.pt", make_checkpoint(model, stage=stage))
    return paths


# ---------------------------------------------------------------- command


def blob_segmentation(center_xyz, radius_mm=5.0):
    """A fake `segment_ct`: a ball of p = 0.95 around ``center_xyz``."""

    def fake(model, ct, **kwargs):
        irc = ct.geometry.xyz_to_irc(center_xyz)
        spacing = np.array(ct.geometry.spacing_irc)
        grids = np.ogrid[tuple(slice(0, s) for s in ct.hu.shape)]
        dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, irc, spacing))
        return np.where(dist2 <= radius_mm**2, 0.95, 0.01).astype(np.float32)

    return fake


def model_args(checkpoints, malignancy=True):
    args = ["--segmentation-path", str(checkpoints["segmentation"]),
            "--classification-path", str(checkpoints["nodule"]), "--device", "cpu"]
    if malignancy:
        args += ["--malignancy-path", str(checkpoints["malignancy"])]
    return args


@pytest.fixture
def tiny_case(tiny_dataset):
    data = DataDir.open(tiny_dataset)
    anns = load_annotations(tiny_dataset)
    uid = next(u for u in data.series_uids if any(a.series_uid == u for a in anns))
    ann = next(a for a in anns if a.series_uid == uid)
    return data, uid, ann


def test_cli_series_end_to_end(tiny_case, checkpoints, tmp_path, monkeypatch, capsys):
    data, uid, ann = tiny_case
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", blob_segmentation(ann.center_xyz))
    out = tmp_path / "out"
    # nodule threshold 0: the random classifier's score does not decide whether the row is shown
    rc = cmd.cli(["--series-uid", uid, "--data-dir", str(data.root), "--out", str(out),
                  "--nodule-threshold", "0", *model_args(checkpoints)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "verdict:" in text and uid in text
    for name in ("report.json", "nodules.csv", "segmentation.nii.gz", "overview.png", "nodule_1.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["series_uid"] == uid
    assert len(report["nodules"]) == 1
    xyz = report["nodules"][0]["center_xyz"]
    assert np.linalg.norm(np.subtract(xyz, ann.center_xyz)) < 3.0
    with open(out / "nodules.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert rows[0]["seriesuid"] == uid
    assert [float(rows[0][k]) for k in ("coordX", "coordY", "coordZ")] == pytest.approx(xyz)
    assert float(rows[0]["probability"]) == pytest.approx(report["nodules"][0]["p_nodule"], abs=1e-6)
    ct = load_ct(data.scan_path(uid))
    mask = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    assert mask.GetSize() == ct.hu.shape[::-1]
    assert mask.GetOrigin() == pytest.approx(ct.geometry.origin_xyz, abs=1e-3)
    assert mask.GetSpacing() == pytest.approx(ct.geometry.spacing_xyz, abs=1e-4)
    assert mask.GetDirection() == pytest.approx(ct.geometry.direction, abs=1e-5)
    assert sitk.GetArrayFromImage(mask).sum() > 0


def test_the_segmentation_threshold_is_the_checkpoints_own_unless_given(tiny_case, checkpoints, tmp_path,
                                                                        monkeypatch, capsys):
    """A segmentation checkpoint that stores its operating threshold (the training's choice) is grouped at it;
    --segmentation-threshold overrides it; a stored value that is no probability is refused, naming the file."""
    data, uid, ann = tiny_case
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", blob_segmentation(ann.center_xyz))  # p = 0.95
    model = load_checkpoint(checkpoints["segmentation"])
    args = model_args(checkpoints)
    at = args.index("--segmentation-path") + 1

    def diagnose_with(stored, *extra):
        path = save_checkpoint(tmp_path / f"seg-{stored}.pt", {**model, "operating_threshold": stored})
        argv = [*args[:at], str(path), *args[at + 1:]]
        out = tmp_path / f"out-{stored}-{len(extra)}"
        rc = cmd.cli(["--series-uid", uid, "--data-dir", str(data.root), "--out", str(out), "--no-pictures",
                      "--nodule-threshold", "0", *argv, *extra])
        report = json.loads((out / "report.json").read_text()) if rc == 0 else None
        return rc, report

    rc, report = diagnose_with(0.9)
    assert rc == 0 and len(report["nodules"]) == 1 and report["thresholds"]["segmentation"] == 0.9
    # above the blob's 0.95, whose odds / 10 (0.764) are below it: a faint blob, proposed (and labelled) only
    # to a nodule classifier whose training recorded faint blobs among its proposals
    rc, report = diagnose_with(0.97)
    assert rc == 0 and report["nodules"] == [] and report["thresholds"]["segmentation"] == 0.97
    trained = save_checkpoint(tmp_path / "nodule-faint.pt",
                              {**load_checkpoint(checkpoints["nodule"]), "search_budget": SEARCH_BUDGET})
    rc, report = diagnose_with(0.97, "--classification-path", str(trained))
    assert rc == 0 and len(report["nodules"]) == 1
    volumes = tmp_path / "out-0.97-2"
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(volumes / "segmentation.nii.gz"))).any()
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(volumes / "labels.nii.gz"))) == 1).sum() > 10
    rc, report = diagnose_with(0.999)  # the blob's 0.95 is below it and below its search threshold, 0.990
    assert rc == 0 and report["nodules"] == [] and report["thresholds"]["segmentation"] == 0.999
    rc, report = diagnose_with(0.999, "--segmentation-threshold", "0.5")
    assert rc == 0 and len(report["nodules"]) == 1 and report["thresholds"]["segmentation"] == 0.5
    capsys.readouterr()
    rc, _ = diagnose_with(1.5)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "seg-1.5.pt" in err and "operating threshold" in err
    rc, report = diagnose_with(1.5, "--segmentation-threshold", "0.5")  # what the message advises works
    assert rc == 0 and len(report["nodules"]) == 1 and report["thresholds"]["segmentation"] == 0.5


def test_cli_image_and_no_malignancy_model(tiny_case, checkpoints, tmp_path, monkeypatch, capsys):
    data, uid, ann = tiny_case
    ct = load_ct(data.scan_path(uid))
    image = tmp_path / "scan.mha"
    sitk.WriteImage(ct.to_sitk(), str(image))
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", blob_segmentation(ann.center_xyz))
    rc = cmd.cli(["--image", str(image), "--nodule-threshold", "0", *model_args(checkpoints, malignancy=False)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "malignancy not assessed" in text
    assert "n/a" in text


def test_cli_random_models_run(tiny_case, checkpoints, capsys):
    """The real segmentation path (random weights): the plumbing runs, whatever it finds."""
    data, uid, _ = tiny_case
    assert cmd.cli(["--series-uid", uid, "--data-dir", str(data.root), *model_args(checkpoints)]) == 0
    assert "verdict:" in capsys.readouterr().out


def test_cli_validation(tiny_dataset, checkpoints, tmp_path, monkeypatch, capsys):
    anns = load_annotations(tiny_dataset)
    monkeypatch.setattr("luna.inference.pipeline.segment_ct",
                        lambda model, ct, **kw: blob_segmentation(
                            next((a.center_xyz for a in anns if a.series_uid == ct.series_uid), (0, 0, 0)))(model, ct))
    out = tmp_path / "val"
    rc = cmd.cli(["--run-validation", "--data-dir", str(tiny_dataset), "--val-stride", "2", "--out", str(out),
                  *model_args(checkpoints)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "total over 2 series" in text
    assert "complete miss" in text
    confusion = json.loads((out / "confusion.json").read_text())
    assert set(confusion["total"]) == {"non-nodule", "benign", "malignant"}
    assert len(confusion["series"]) == 2
    # what luna evaluate takes: the series list, every detection, the labelled malignancy rows
    from luna.annotations import split_series
    from luna.io.luna16 import read_malignancy_results, read_results, read_series_list

    expected = split_series(DataDir.open(tiny_dataset).series_uids, 2)[1]
    assert read_series_list(out / "series.txt") == expected
    results = read_results(out / "results.csv")
    assert set(results.series_uids) <= set(expected)
    rows, labels = read_malignancy_results(out / "malignancy.csv")
    rated = [a for a in anns if a.series_uid in expected and a.is_malignant is not None]
    assert len(labels) == len(rated) and list(labels) == [bool(a.is_malignant) for a in rated]
    assert "score it with: python -m luna.evaluate --results" in text
    # and it scores: the printed command runs
    from luna.evaluate.__main__ import main as evaluate

    command = text.split("score it with: python -m luna.evaluate ")[1].splitlines()[0].split()
    assert evaluate([*command, "--bootstrap", "0", "--no-plot"]) == 0
    assert "CPM" in capsys.readouterr().out


def test_cli_missing_models(tiny_case, tmp_path, monkeypatch, capsys):
    data, uid, _ = tiny_case
    monkeypatch.chdir(tmp_path)
    rc = cmd.cli(["--series-uid", uid, "--data-dir", str(data.root)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1
    assert "python -m luna.training" in err and "--segmentation-path" in err


def test_cli_unknown_series(tiny_dataset, checkpoints, capsys):
    rc = cmd.cli(["--series-uid", "1.2.3.nope", "--data-dir", str(tiny_dataset), *model_args(checkpoints)])
    err = capsys.readouterr().err
    assert rc == 2 and "1.2.3.nope" in err and err.count("\n") == 1


def test_cli_missing_image(checkpoints, tmp_path, capsys):
    rc = cmd.cli(["--image", str(tmp_path / "nothing.mha"), *model_args(checkpoints)])
    assert rc == 2
    assert "nothing.mha" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--image", "a.mha", "--dicom", "d"], ["--dicom-series", "1.2"]])
def test_cli_input_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cmd.cli(argv)
    assert exc.value.code == 2


def test_cli_dicom_lidc(checkpoints, tmp_path, monkeypatch, capsys):
    if not LIDC_0001.is_dir():
        pytest.skip(f"real DICOM data not found at {LIDC_0001}")
    folder = sorted(LIDC_0001.glob("*/*/"))[0]
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", blob_segmentation(LIDC_NODULE_XYZ))
    out = tmp_path / "lidc"
    rc = cmd.cli(["--dicom", str(folder), "--nodule-threshold", "0", "--out", str(out), "--no-pictures",
                  *model_args(checkpoints)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert len(report["nodules"]) == 1
    xyz = report["nodules"][0]["center_xyz"]
    assert np.linalg.norm(np.subtract(xyz, LIDC_NODULE_XYZ)) < 3.0
    mask = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    assert np.linalg.norm(np.subtract(mask.GetOrigin(), report["geometry"]["origin_xyz"])) < 1e-3


def test_cli_a_real_slab_is_diagnosed_with_a_warning(checkpoints, tmp_path, capsys):
    """LIDC-IDRI-0002's slab covers 15 mm (12 slices of 1.25 mm): diagnosed, and the console, report.json and
    report.html all say that nodules can be missed in so short a scan."""
    if not LIDC_0002.is_dir():
        pytest.skip(f"real DICOM data not found at {LIDC_0002}")
    folder = sorted(LIDC_0002.glob("*/*/"))[0]
    out = tmp_path / "slab"
    assert cmd.cli(["--dicom", str(folder), "--out", str(out), "--no-pictures", *model_args(checkpoints)]) == 0
    console = capsys.readouterr().out
    assert "WARNING: the scan covers only 15.0 mm along z" in console
    assert "[a slab: for the scanned part only]" in console
    report = json.loads((out / "report.json").read_text())
    assert [w for w in report["warnings"] if "covers only 15.0 mm along z" in w]
    assert "covers only 15.0 mm along z" in (out / "report.html").read_text()


def test_cli_a_ct_without_lungs_is_diagnosed_with_a_warning(tiny_case, checkpoints, tmp_path, capsys):
    """A head CT (tissue in a skull, air only around it) was diagnosed "no nodule found", exit 0, with nothing
    said; now the console, report.json and report.html say that no lungs were found. A chest says nothing of it."""
    shape, spacing_mm = (40, 96, 96), 2.0
    _, rows, cols = np.mgrid[: shape[0], : shape[1], : shape[2]]
    radius = np.hypot(rows - 48, cols - 48) * spacing_mm
    head = np.where(radius < 70, 1000, -1000).astype(np.int16)
    head[radius < 64] = 35  # brain inside 6 mm of skull
    image = sitk.GetImageFromArray(head)
    image.SetSpacing((spacing_mm, spacing_mm, 2.5))
    sitk.WriteImage(image, str(tmp_path / "head.mha"))
    out = tmp_path / "head"
    assert cmd.cli(["--image", str(tmp_path / "head.mha"), "--out", str(out), "--no-pictures",
                    *model_args(checkpoints)]) == 0
    console = capsys.readouterr().out
    assert "WARNING: no lungs found in this CT" in console
    assert "[no lungs found: is it a chest CT?]" in console
    report = json.loads((out / "report.json").read_text())
    assert [w for w in report["warnings"] if w.startswith("no lungs found")]
    assert "no lungs found in this CT" in (out / "report.html").read_text()

    data, uid, _ = tiny_case
    assert cmd.cli(["--series-uid", uid, "--data-dir", str(data.root), "--out", str(tmp_path / "chest"),
                    "--no-pictures", *model_args(checkpoints)]) == 0
    assert "no lungs found" not in capsys.readouterr().out
    assert not [w for w in json.loads((tmp_path / "chest" / "report.json").read_text())["warnings"]
                if "no lungs" in w]


def test_faint_blobs_go_only_to_a_classifier_trained_on_them():
    """The nodule classifier's checkpoint says how many faint blobs per scan it learnt to reject; one that
    says nothing (older luna, the book's) gets none, and a damaged record is refused, naming the file."""
    assert trained_search_budget({}) == 0 and trained_search_budget(None) == 0
    assert trained_search_budget({"search_budget": 100}) == 100
    for bad in (-1, 2.5, "100", True):
        with pytest.raises(LunaError, match="nodule.pt: its search_budget"):
            trained_search_budget({"search_budget": bad}, "checkpoint nodule.pt")
