"""python -m luna.prepcache: fills the cache once per scan, resumes, reports broken scans."""

import numpy as np
import pytest

from conftest import write_scan
from luna.cache import ArrayCache
from luna.chunks import ChunkSource
from luna.datadir import DataDir
from luna.geometry import Geometry
from luna.prepcache import main

GEOMETRY = Geometry((-100.0, -90.0, -200.0), (0.8, 0.8, 2.0))
UIDS = ["1.2.840.1", "1.2.840.2"]


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "luna"
    (root / "subset0").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["seriesuid,coordX,coordY,coordZ,class"]
    for n, uid in enumerate(UIDS):
        write_scan(root / "subset0" / f"{uid}.mhd", rng.integers(-1000, 400, size=(30, 50, 50)).astype(np.int16),
                   GEOMETRY)
        for k in range(5):
            x, y, z = GEOMETRY.irc_to_xyz((3 + 5 * k, 10 + k, 20 + n))
            rows.append(f"{uid},{x},{y},{z},{int(k == 0)}")
    rows.append("9.9.9.not-on-disk,0,0,0,0")
    (root / "candidates.csv").write_text("\n".join(rows) + "\n")
    (root / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    return root


@pytest.mark.parametrize("workers", ["0", "2"])
def test_fills_cache_for_every_candidate(data_dir, tmp_path, capsys, workers):
    cache_dir = tmp_path / "cache"
    assert main(["--data-dir", str(data_dir), "--cache-dir", str(cache_dir), "--num-workers", workers, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "10 candidates in 2 scans: 10 chunks cut, 0 already cached" in out
    source = ChunkSource(DataDir.open(data_dir), ArrayCache(cache_dir))
    assert len(source.cache) == 10
    # a second run finds everything cached
    assert main(["--data-dir", str(data_dir), "--cache-dir", str(cache_dir), "--no-progress"]) == 0
    assert "0 chunks cut, 10 already cached" in capsys.readouterr().out


def test_broken_scan_is_reported_and_others_cached(data_dir, tmp_path, capsys):
    raw = data_dir / "subset0" / f"{UIDS[0]}.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    from luna.cli import run_cli

    status = run_cli(main, ["--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    captured = capsys.readouterr()
    assert status == 2
    assert f"failed: {UIDS[0]}" in captured.out
    assert "1 scan(s) could not be cached" in captured.err
    assert len(ArrayCache(tmp_path / "c")) == 5


def test_missing_data_dir_is_one_line_error(tmp_path, capsys):
    from luna.cli import run_cli

    assert run_cli(main, ["--data-dir", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and "does not exist" in err[0]
