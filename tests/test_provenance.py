"""Provenance: training records what its models learnt from; the diagnosis reads it back and warns."""

from __future__ import annotations

import json

from luna.models import load_checkpoint
from luna.runs import NODULE, Provenance, provenance_warnings, read_provenance
from luna.training.app import main as train


def test_training_records_provenance_and_scores(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--stage", "nodule", "--data-dir", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache"),
            "--batch-size", "8", "--epoch-size", "16", "--num-workers", "0", "--val-stride", "2", "-q",
            "--epochs", "1", "--run-dir", str(run)]
    assert train(argv) == 0
    capsys.readouterr()
    info = json.loads((run / "run.json").read_text())
    expected = {"data_dir": str(tiny_dataset.absolute()), "synthetic": True, "scans": 4, "training_scans": 2,
                "validation_scans": 2}
    assert info["provenance"] == expected
    result = info["results"][NODULE]
    assert result["epochs"] == 1 and result["score_name"] == "auc" and 0 <= result["best_score"] <= 1

    checkpoint = load_checkpoint(run / NODULE / "best.pt")
    assert checkpoint["args"]["provenance"] == expected
    p = Provenance.from_checkpoint(checkpoint, run / NODULE / "best.pt", NODULE)
    assert p.synthetic is True and p.epochs == 1 and p.best_score == result["best_score"]
    assert p.describe().startswith(f"nodule classifier: synthetic phantoms ({tiny_dataset.absolute()}, 4 scans: "
                                   "2 training, 2 validation), 1 epoch, best validation AUC")


def test_warnings():
    phantom = Provenance("nodule", "a.pt", synthetic=True)
    real = Provenance("segmentation", "b.pt", synthetic=False)
    unknown = Provenance("malignancy", "c.pt")
    assert any("NOT meaningful for a real scan" in w for w in provenance_warnings([phantom], ct_is_synthetic=False))
    assert provenance_warnings([phantom], ct_is_synthetic=True) == []
    assert any("phantom" in w for w in provenance_warnings([real], ct_is_synthetic=True))
    assert provenance_warnings([real], ct_is_synthetic=False) == []
    (note,) = provenance_warnings([real, unknown], ct_is_synthetic=False)
    assert "malignancy classifier was trained on is not recorded" in note


def test_book_checkpoint_has_unknown_provenance(tmp_path):
    from luna.models import NoduleClassifier, SegmentationUNet, save_checkpoint
    from luna.runs import ModelPaths

    seg = save_checkpoint(tmp_path / "seg.pt", {"model_state": SegmentationUNet(depth=2, wf=2).state_dict()})
    cls = save_checkpoint(tmp_path / "cls.pt", {"model_state": NoduleClassifier().state_dict(),
                                                "model_name": "LunaModel", "epoch": 7})
    seg_p, cls_p = read_provenance(ModelPaths(seg, cls))
    assert not seg_p.recorded and cls_p.epochs == 7
    assert cls_p.describe() == "nodule classifier: unknown data (the checkpoint does not record it), 7 epochs"
