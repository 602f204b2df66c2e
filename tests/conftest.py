"""Shared fixtures: the real data beside the checkout and a tiny synthetic dataset."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
