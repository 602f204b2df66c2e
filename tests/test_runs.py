"""luna.runs: the run-directory contract (newest complete run, explicit models never mixed, the split)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from luna.errors import LunaError
from luna.models import (
    NoduleClassifier,
    SegmentationUNet,
    make_checkpoint,
    save_checkpoint,
)
from luna.runs import Run, find_models, newest_run


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    models = {"segmentation": SegmentationUNet(depth=2, wf=2), "nodule": NoduleClassifier(),
              "malignancy": NoduleClassifier()}
    return {name: save_checkpoint(root / name / "best.pt", make_checkpoint(model, stage=name))
            for name, model in models.items()}


@pytest.fixture
def runs(tmp_path, checkpoints) -> Path:
    runs = tmp_path / "runs"
    for run in ("luna/2020-01-01_00.00.00", "luna/2021-01-01_00.00.00", "other/2022-01-01_00.00.00"):
        for stage in ("segmentation", "nodule"):
            (runs / run / stage).mkdir(parents=True)
            shutil.copy(checkpoints[stage], runs / run / stage / "best.pt")
    (runs / "luna/2021-01-01_00.00.00/malignancy").mkdir()
    shutil.copy(checkpoints["malignancy"], runs / "luna/2021-01-01_00.00.00/malignancy/best.pt")
    (runs / "other/2022-01-01_00.00.00/nodule/best.pt").unlink()  # incomplete: ignored
    return runs


def test_find_models_newest_run(runs):
    found = find_models(runs)
    assert found.run_dir == runs / "luna/2021-01-01_00.00.00"
    assert found.malignancy == found.run_dir / "malignancy" / "best.pt"
    assert newest_run(runs).directory == found.run_dir
    assert find_models(runs, malignancy=False).malignancy is None


def test_explicit_models_are_never_mixed_with_a_run(runs, checkpoints):
    with pytest.raises(LunaError, match="together"):
        find_models(runs, classification_path=checkpoints["nodule"])
    with pytest.raises(LunaError, match="not mixed"):
        find_models(runs, malignancy_path=checkpoints["malignancy"])
    explicit = find_models(runs, segmentation_path=checkpoints["segmentation"],
                           classification_path=checkpoints["nodule"])
    assert explicit.run_dir is None and explicit.malignancy is None  # not the run's malignancy model
    assert explicit.classification == checkpoints["nodule"]


def test_find_models_none(tmp_path):
    with pytest.raises(LunaError, match="python -m luna.training"):
        find_models(tmp_path / "runs")


def test_run_records_its_split(tmp_path):
    run = Run(tmp_path / "r")
    assert run.split() is None and run.read_info() == {}
    run.write_info({"split": {"val_stride": 4, "seed": 7}})
    assert run.split() == {"val_stride": 4, "seed": 7}
    (tmp_path / "r" / "run.json").write_text("{not json")
    with pytest.raises(LunaError, match="run.json: not valid JSON"):
        run.read_info()
