"""Shared fixtures: the real data beside the checkout and a tiny synthetic dataset;
`write_scan`, the one way tests write a scan file."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated_working_directory(tmp_path_factory, monkeypatch) -> Path:
    """Every test runs in an empty working directory of its own, without LUNA_DATA_DIR or
    LUNA_CACHE_DIR: the relative defaults (data-unversioned/runs, .../cache, ...) then never
    read what the checkout holds (say, the runs the README's training command left) nor
    write into it, whatever the order of the tests."""
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("LUNA_DATA_DIR", raising=False)
    monkeypatch.delenv("LUNA_CACHE_DIR", raising=False)
    return cwd


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real LIDC-IDRI slabs and LUNA16 CSVs); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The synthetic ``tiny`` preset (4 scans), generated once per test session."""
    from luna.synth import generate_dataset

    out = tmp_path_factory.mktemp("tiny")
    generate_dataset(out, "tiny", scans=4, seed=0, progress=False)
    return out


def write_scan(path: Path, hu: np.ndarray, geometry, *, compress: bool = False) -> Path:
    """Write ``hu`` ([index, row, col]) with ``geometry`` as an image file through SimpleITK
    alone, so that what luna reads back is checked against an independent writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(hu)
    geometry.apply_to_sitk(image)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def book_checkpoint(model, *, model_name: str, optimizer: str, epoch: int, samples: int, argv: list[str]) -> dict:
    """A dict laid out as the book's training code saves it: a DataParallel state dict
    (``module.`` prefixes) and an optimizer state with filled buffers (after one step)."""
    opt = {"SGD": lambda p: torch.optim.SGD(p, lr=0.001, momentum=0.99),
           "Adam": lambda p: torch.optim.Adam(p, lr=1e-3)}[optimizer](model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {
        "sys_argv": ["training.py", *argv],
        "time": "2020-05-01_12.00.00",
        "model_name": model_name,
        "model_state": {f"module.{k}": v for k, v in model.state_dict().items()},
        "optimizer_name": optimizer,
        "optimizer_state": opt.state_dict(),
        "epoch": epoch,
        "totalTrainingSamples_count": samples,
    }
