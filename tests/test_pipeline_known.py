"""The diagnosis with models whose answers are known, and the diagnosis refusing to guess.

Hand-built models with closed-form outputs run through the real pipeline
(`luna.inference.pipeline.diagnose`: `segment_ct`, grouping, `classify_chunks`,
malignancy, verdict) on the tiny phantoms, and every number the pipeline reports
is checked against the formula applied to that detection's own chunk:

- segmenter: p(voxel) = sigmoid((HU + 400) / 25), dense tissue;
- nodule classifier: p(nodule) = sigmoid((c + 330) / 20), c the mean HU of the
  chunk's central 2x2x2 voxels: on these phantoms every detection off the annotated
  nodules has c below -340, and most on them above -300 (small ones on 2.5 mm
  slices, whose central voxels are part lung, below);
- malignancy classifier: p(malignant) = sigmoid((c + 200) / 30).

Then what must be an error is one: model outputs that are not probabilities, NaN
weights, a checkpoint of the wrong kind or no checkpoint at all, thresholds that are
not probabilities, an --out that cannot be written.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from processes import SKIP_STATUS, run_forked, without_root_file_access

from luna.annotations import load_annotations
from luna.cli import run_cli
from luna.datadir import DataDir
from luna.diagnose import __main__ as cmd
from luna.diagnose import report as rep
from luna.errors import LunaError
from luna.inference.pipeline import Models, diagnose, load_models
from luna.io import load_ct
from luna.models import NoduleClassifier, SegmentationUNet, make_checkpoint, save_checkpoint
from luna.runs import ModelPaths

CENTRE = (slice(15, 17), slice(23, 25), slice(23, 25))
"""The central 2x2x2 voxels of a 32x48x48 chunk, whose centre voxel is (16, 24, 24)."""


class DenseTissue(nn.Module):
    """Segmenter (7 context slices): p = sigmoid((HU of the middle slice + 400) / 25)."""

    in_channels = 7
    depth = 1

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((slices[:, 3:4] + 400) / 25)


class CentreDensity(nn.Module):
    """Classifier: logits (0, (c - offset) / scale), so p(positive) = sigmoid((c - offset) / scale)."""

    chunk_shape = (32, 48, 48)

    def __init__(self, offset: float, scale: float):
        super().__init__()
        self.offset, self.scale = offset, scale

    def forward(self, chunks: torch.Tensor) -> torch.Tensor:
        z = (chunks[:, 0, CENTRE[0], CENTRE[1], CENTRE[2]].mean(dim=(1, 2, 3)) - self.offset) / self.scale
        return torch.stack([torch.zeros_like(z), z], dim=1)

    def expected(self, ct, center_xyz) -> float:
        """The formula in numpy, on the chunk `Ct.crop` cuts around ``center_xyz``."""
        c = ct.crop(center_xyz, self.chunk_shape)[CENTRE].astype(np.float64).mean()
        return 1.0 / (1.0 + math.exp(-(c - self.offset) / self.scale))


NODULE = CentreDensity(-330.0, 20.0)
MALIGNANCY = CentreDensity(-200.0, 30.0)


def known_models() -> Models:
    return Models(DenseTissue(), NODULE, MALIGNANCY)


def test_the_pipeline_reports_what_known_models_say(tiny_dataset):
    data = DataDir.open(tiny_dataset)
    annotations = load_annotations(data.root)
    found, rejected, distinct_scores, scans_with_detections, size_ratios = 0, 0, set(), 0, []
    for uid in data.series_uids:
        ct = load_ct(data.scan_path(uid))
        diagnosis, probabilities = diagnose(ct, known_models(), keep_probabilities=True)
        expected = 1 / (1 + np.exp(-(ct.hu.astype(np.float64) + 400) / 25))
        # the formula wherever the segmenter ran (a pipeline may leave voxels far from the lungs at 0)
        assert np.all((probabilities == 0) | np.isclose(probabilities, expected, rtol=0, atol=1e-3))
        assert np.isclose(probabilities, expected, rtol=0, atol=1e-3).mean() > 0.5
        scans_with_detections += bool(diagnosis.nodules)
        for n in diagnosis.nodules:
            p = NODULE.expected(ct, n.center_xyz)
            assert n.p_nodule == pytest.approx(p, rel=1e-6, abs=1e-9)  # p(nodule), this detection's own chunk
            assert n.accepted == (p >= 0.5)
            if n.accepted:
                assert n.p_malignant == pytest.approx(MALIGNANCY.expected(ct, n.center_xyz), rel=1e-6, abs=1e-9)
            else:
                assert n.p_malignant is None  # rejected detections are not rated
                rejected += 1
            nodule = next((a for a in annotations if a.series_uid == uid
                           and np.linalg.norm(np.subtract(n.center_xyz, a.center_xyz)) < a.diameter_mm / 2), None)
            if nodule is not None:  # the annotated nodules the classifier accepts are measured as they are
                if n.accepted:
                    found += 1
                    size_ratios.append(n.diameter_mm / nodule.diameter_mm)  # measured on the CT, not the blob
            else:
                assert not n.accepted, (uid, n)
        distinct_scores |= {round(n.p_nodule, 6) for n in diagnosis.nodules}
        # one finding per structure (luna.inference.merge): no two findings' measured spheres overlap; a
        # duplicate overlaps a finding with at least its p(nodule) and is never accepted
        spheres = [(np.array(n.center_xyz), n.diameter_mm / 2, n.p_nodule) for n in diagnosis.nodules]
        for i, (a, ra, _) in enumerate(spheres):
            assert all(np.linalg.norm(a - b) >= ra + rb for b, rb, _ in spheres[i + 1:])
        for d in diagnosis.duplicates:
            assert not d.accepted
            assert any(np.linalg.norm(np.array(d.center_xyz) - b) < d.diameter_mm / 2 + rb and p >= d.p_nodule
                       for b, rb, p in spheres)
        malignant = [n.p_malignant for n in diagnosis.accepted]
        if not malignant:
            expected = "no nodule found"
        elif max(malignant) >= 0.5:
            expected = f"malignant nodule suspected (p={max(malignant):.2f})"
        else:
            expected = "nodules found, none suspected malignant"
        assert diagnosis.verdict == expected
    # what makes the checks above able to fail: nodules found, detections rejected,
    # detections with different scores, scores far from 0.5
    # (the closed-form segmenter marks all tissue above -400 HU: on a phantom whose nodules touch vessels
    # growing from the hila that can be one component too large to be a nodule, so not every scan has one)
    assert scans_with_detections >= len(data.series_uids) - 1
    assert found >= 2 and rejected >= 1 and len(distinct_scores) > 1
    # within 25% of the annotated diameters (the blobs of this segmenter: 0.72 and 0.91 of them)
    assert max(abs(np.log(size_ratios))) < np.log(1.25), size_ratios


def test_a_model_that_outputs_nan_is_an_error_naming_its_checkpoint(tiny_dataset, tmp_path):
    def overflowing(model: nn.Module) -> nn.Module:
        """Finite weights (so the file loads) that overflow to inf - inf = NaN on any CT."""
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                    m.weight.fill_(3e38)
                    m.weight.view(-1)[::2] *= -1
        return model

    torch.manual_seed(0)
    good_seg = save_checkpoint(tmp_path / "seg.pt", make_checkpoint(SegmentationUNet(depth=2, wf=2)))
    good_cls = save_checkpoint(tmp_path / "cls.pt", make_checkpoint(NoduleClassifier(width=2)))
    bad_seg = save_checkpoint(tmp_path / "bad_seg.pt", make_checkpoint(overflowing(SegmentationUNet(depth=2, wf=2))))
    bad_cls = save_checkpoint(tmp_path / "bad_cls.pt", make_checkpoint(overflowing(NoduleClassifier(width=2))))
    data = DataDir.open(tiny_dataset)
    ct = load_ct(data.scan_path(data.series_uids[0]))

    models = load_models(ModelPaths(bad_seg, good_cls))
    with pytest.raises(LunaError, match=rf"segmentation model \(checkpoint {bad_seg}\) gave nan as a probability"):
        diagnose(ct, models)

    models = load_models(ModelPaths(good_seg, bad_cls))
    models.segmentation = DenseTissue()  # detections to classify
    with pytest.raises(LunaError, match=rf"nodule classifier \(checkpoint {bad_cls}\) gave nan as a probability"):
        diagnose(ct, models)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    nan_classifier = NoduleClassifier(width=2)
    with torch.no_grad():
        nan_classifier.head_linear.weight[0, 0] = float("nan")
    (root / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    models = {"segmentation": SegmentationUNet(depth=2, wf=2), "classifier": NoduleClassifier(width=2),
              "nan_classifier": nan_classifier}
    paths = {name: save_checkpoint(root / f"{name}.pt", make_checkpoint(m)) for name, m in models.items()}
    return {**paths, "random": root / "random.pt"}


@pytest.fixture(scope="module")
def image(tiny_dataset, tmp_path_factory) -> Path:
    import SimpleITK as sitk

    data = DataDir.open(tiny_dataset)
    path = tmp_path_factory.mktemp("image") / "scan.mha"
    sitk.WriteImage(load_ct(data.scan_path(data.series_uids[0])).to_sitk(), str(path))
    return path


def one_line_error(argv, capsys) -> str:
    assert cmd.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("segmentation, classification, expected", [
    ("classifier", "classifier", r"classifier\.pt holds a classifier \(NoduleClassifier\), not a segmenter.*--segmentation-path"),
    ("segmentation", "segmentation", r"segmentation\.pt holds a segmenter \(SegmentationUNet\), not a classifier.*--classification-path"),
    ("segmentation", "nan_classifier", r"nan_classifier\.pt holds NaN or infinite values in 1 tensor\(s\) \(head_linear\.weight\)"),
    ("random", "classifier", r"random\.pt is not a readable PyTorch checkpoint"),
])
def test_wrong_checkpoints_are_one_line(checkpoints, image, capsys, segmentation, classification, expected):
    err = one_line_error(["--image", str(image), "--segmentation-path", str(checkpoints[segmentation]),
                          "--classification-path", str(checkpoints[classification]), "--device", "cpu"], capsys)
    assert re.search(expected, err), err
    assert "trust=True" not in err


@pytest.mark.parametrize("option, value", [
    ("--segmentation-threshold", "nan"), ("--segmentation-threshold", "-0.1"), ("--nodule-threshold", "nan"),
    ("--nodule-threshold", "1.5"), ("--malignancy-threshold", "inf"), ("--batch-size", "0"),
    ("--segmentation-batch-size", "-1"), ("--views", "0"), ("--views", "9"),
])
def test_bad_options_are_one_line_before_anything_is_read(tmp_path, capsys, option, value):
    # nothing below exists: an error about anything else would mean the option was checked too late
    err = one_line_error(["--image", str(tmp_path / "none.mha"), "--segmentation-path", str(tmp_path / "s.pt"),
                          "--classification-path", str(tmp_path / "c.pt"), option, value], capsys)
    assert option in err and value in err


def test_an_unusable_out_is_one_line_before_the_run(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    base = ["--image", str(tmp_path / "none.mha"), "--segmentation-path", str(tmp_path / "s.pt"),
            "--classification-path", str(tmp_path / "c.pt")]
    err = one_line_error([*base, "--out", str(tmp_path / "taken")], capsys)
    assert "--out" in err and "taken is an existing file" in err
    err = one_line_error([*base, "--out", str(tmp_path / "taken" / "below")], capsys)
    assert "--out" in err and "cannot write there" in err

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        status = run_forked(run_cli, cmd.main, [*base, "--out", str(locked / "report")], log=tmp_path / "log",
                            prepare=without_root_file_access(locked))
        if status == SKIP_STATUS:
            pytest.skip("permission bits cannot be made to apply here")
        text = (tmp_path / "log").read_text()
        assert status == 2 and text.count("\n") == 1 and "--out" in text and "locked" in text, text
    finally:
        locked.chmod(0o755)


def test_report_json_is_strict_json(tiny_dataset, tmp_path):
    data = DataDir.open(tiny_dataset)
    ct = load_ct(data.scan_path(data.series_uids[0]))
    diagnosis = diagnose(ct, known_models())
    report = rep.report_dict(diagnosis, source="scan", ct=ct, model_paths=ModelPaths(Path("s.pt"), Path("c.pt")),
                             thresholds={"segmentation": 0.5, "nodule": 0.5, "malignancy": 0.5})

    def refuse(constant):
        raise AssertionError(f"{constant} in report.json")

    assert json.loads(rep.dumps(report), parse_constant=refuse)["series_uid"] == ct.series_uid
    with pytest.raises(ValueError):
        rep.dumps({**report, "verdict": float("nan")})


def test_a_ct_without_air_is_not_diagnosed():
    """No voxel below -400 HU: not Hounsfield units (an 8-bit export), so no "no nodule found" for it."""
    from luna.geometry import Geometry
    from luna.inference.pipeline import check_hounsfield

    from luna.ct import Ct

    hu = np.full((4, 16, 16), 120, dtype=np.int16)
    ct = Ct(hu, Geometry((0.0, 0.0, 0.0), (0.7, 0.7, 2.5)), "1.2.3", source="/data/export.mha")
    with pytest.raises(LunaError, match=r"^/data/export.mha: no voxel below -400 HU \(lowest: 120\)"):
        diagnose(ct, known_models())
    hu[0, 0, 0] = -1000  # one voxel of air is enough to be HU
    check_hounsfield(Ct(hu, ct.geometry, "1.2.3"))


def test_a_scan_too_short_along_z_is_refused_and_a_slab_is_warned_about(tiny_dataset):
    """Below `MIN_COVERAGE_MM` of z no diagnosis (it would say "no nodule found" for a scan that cannot show one);
    below `FULL_COVERAGE_MM` the diagnosis says that nodules can be missed; the whole scan gets no such warning."""
    from luna.ct import Ct
    from luna.geometry import Geometry
    from luna.inference.pipeline import FULL_COVERAGE_MM, MIN_COVERAGE_MM

    data = DataDir.open(tiny_dataset)
    ct = load_ct(data.scan_path(data.series_uids[0]))
    spacing = ct.geometry.spacing_irc[0]
    assert ct.shape_irc[0] * spacing >= FULL_COVERAGE_MM  # the tiny preset's scans hold whole lungs

    def slab(slices: int) -> Ct:
        first = (ct.shape_irc[0] - slices) // 2
        origin = ct.geometry.irc_to_xyz(np.array([[first, 0, 0]], dtype=float))[0]
        geometry = Geometry(tuple(origin), ct.geometry.spacing_xyz, ct.geometry.direction)
        return Ct(ct.hu[first:first + slices], geometry, ct.series_uid, source="/data/slab.mhd")

    short = int(MIN_COVERAGE_MM // spacing)
    if short * spacing >= MIN_COVERAGE_MM:
        short -= 1
    with pytest.raises(LunaError, match=rf"^/data/slab.mhd: {short} slices of {spacing:g} mm cover only "
                                        rf"{short * spacing:.1f} mm along z, .*give the whole series"):
        diagnose(slab(short), known_models())
    just_enough = math.ceil(MIN_COVERAGE_MM / spacing)
    warned = diagnose(slab(just_enough), known_models())
    assert len(warned.warnings) == 1
    assert f"covers only {just_enough * spacing:.1f} mm along z" in warned.warnings[0]
    assert diagnose(ct, known_models()).warnings == ()
