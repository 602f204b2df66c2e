"""Batch diagnosis: many CTs in one command, a failure skipped and counted, resume, the merged results,
DICOM studies found recursively, and torchrun shards (2 gloo processes on the CPU)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from luna.datadir import DataDir
from luna.diagnose import __main__ as cmd
from luna.diagnose.batch import CtInput, shard
from luna.io.luna16 import read_results, read_series_list
from luna.models import NoduleClassifier, SegmentationUNet, make_checkpoint, save_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LIDC = SHARED / "lidc-idri"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("batch-models")
    torch.manual_seed(0)
    paths = {name: save_checkpoint(root / name / "best.pt", make_checkpoint(model, stage=name))
             for name, model in (("segmentation", SegmentationUNet(depth=2, wf=2)), ("nodule", NoduleClassifier()))}
    return ["--segmentation-path", str(paths["segmentation"]), "--classification-path", str(paths["nodule"]),
            "--device", "cpu", "--no-pictures", "--nodule-threshold", "0"]


def blob_at_center(model, ct, **kwargs):
    """A fake `segment_ct`: one ball of p = 0.95, 5 mm, in the middle of every CT."""
    spacing = np.array(ct.geometry.spacing_irc)
    grids = np.ogrid[tuple(slice(0, s) for s in ct.hu.shape)]
    d2 = sum(((g - (s - 1) / 2) * sp) ** 2 for g, s, sp in zip(grids, ct.hu.shape, spacing))
    return np.where(d2 <= 25.0, 0.95, 0.01).astype(np.float16)


@pytest.fixture
def dataset(tiny_dataset, tmp_path) -> Path:
    """A copy of the tiny dataset (4 scans) that a test may damage."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_dataset, copy)
    return copy


def test_shards_are_disjoint_and_cover_the_list():
    items = list(range(11))
    shards = [shard(items, rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == items
    assert all(not set(a) & set(b) for k, a in enumerate(shards) for b in shards[k + 1:])


def test_batch_skips_a_failure_and_resumes(dataset, models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", blob_at_center)
    data = DataDir.open(dataset)
    uids = data.series_uids
    broken = data.scan_path(uids[1]).with_suffix(".raw")
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 3])  # a truncated download
    out = tmp_path / "batch"
    argv = ["--all-series", "--data-dir", str(dataset), "--out", str(out), *models]

    assert cmd.cli(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1].startswith("error: 1 of 4 CT(s) failed")
    assert f"{uids[1]} failed: " in captured.err  # logged when it happened
    assert f"failed: {uids[1]}" in captured.out and "3 diagnosed now" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["failed"] == 1 and summary["counts"]["done"] == 3
    failure = next(c for c in summary["cts"] if c["status"] == "failed")
    assert failure["key"] == uids[1] and str(broken.with_suffix(".mhd").name) in failure["error"] + failure["source"]
    assert read_series_list(out / "series.txt") == [u for u in uids if u != uids[1]]
    mtimes = {u: (out / u / "report.json").stat().st_mtime_ns for u in uids if u != uids[1]}

    broken.write_bytes(good)  # fixed: the same command finishes the batch, the others are not redone
    assert cmd.cli(argv) == 0
    out_text = capsys.readouterr().out
    assert "1 diagnosed now, 3 finished before, 0 failed" in out_text
    assert {u: (out / u / "report.json").stat().st_mtime_ns for u in mtimes} == mtimes
    assert read_series_list(out / "series.txt") == uids
    merged = read_results(out / "results.csv")
    per_ct = [read_results(out / u / "nodules.csv") for u in uids]
    assert merged.series_uids == sum((r.series_uids for r in per_ct), [])
    np.testing.assert_array_equal(merged.center_xyz, np.concatenate([r.center_xyz for r in per_ct]))
    assert set(merged.series_uids) == set(uids)  # the blob gives every CT a detection
    index = (out / "index.html").read_text()
    assert all(f'href="{u}/report.html"' in index for u in uids)
    # another threshold would mix two pipelines in one results file
    assert cmd.cli([*argv, "--segmentation-threshold", "0.7"]) == 2
    assert "other thresholds" in capsys.readouterr().err


def test_several_files_need_an_out_dir(dataset, models, tmp_path, capsys):
    data = DataDir.open(dataset)
    files = [str(data.scan_path(u)) for u in data.series_uids[:2]]
    assert cmd.cli(["--image", *files, *models]) == 2
    assert "give --out DIR" in capsys.readouterr().err


def test_input_list_of_files(dataset, models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", blob_at_center)
    data = DataDir.open(dataset)
    listing = tmp_path / "inputs.txt"
    listing.write_text("# two scans\n" + "".join(f"{data.scan_path(u)}\n" for u in data.series_uids[:2]))
    out = tmp_path / "listed"
    assert cmd.cli(["--input-list", str(listing), "--out", str(out), *models]) == 0
    assert read_series_list(out / "series.txt") == data.series_uids[:2]
    assert not (out / "malignancy.csv").exists()  # files outside a data directory have no annotations


def test_dicom_studies_found_recursively(models, tmp_path, monkeypatch, capsys):
    if not LIDC.is_dir():
        pytest.skip(f"real DICOM data not found at {LIDC}")
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", blob_at_center)
    out = tmp_path / "studies"
    assert cmd.cli(["--dicom-tree", str(LIDC), "--out", str(out), *models]) == 0
    series = read_series_list(out / "series.txt")
    assert len(series) == 2 and "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192" in series
    for uid in series:
        report = json.loads((out / uid / "report.json").read_text())
        assert report["ct_is_synthetic"] is False
        assert Path(report["input"]).is_dir() and Path(report["input"]).is_relative_to(LIDC)
    # LIDC-IDRI-0002's slab covers 15 mm along z: its warning reaches the batch's summary and index page
    summary = json.loads((out / "summary.json").read_text())
    warned = {c["series_uid"]: c["warnings"] for c in summary["cts"]}
    short = "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919"
    assert any("covers only 15.0 mm along z" in w for w in warned[short])
    for uid in series:
        assert warned[uid] == json.loads((out / uid / "report.json").read_text())["warnings"]
    index = (out / "index.html").read_text()
    assert "WARNING: the scan covers only 15.0 mm along z" in index
    assert "covers only 15.0 mm along z" in (out / "summary.csv").read_text()


# ------------------------------------------------------------------ torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, argv: list[str]) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    os._exit(cmd.cli(argv))


def test_torchrun_shards_are_disjoint_and_rank0_merges(dataset, models, tmp_path, monkeypatch):
    """Two processes as torchrun starts them (env:// rendezvous over gloo), forked so that both
    keep the test's fake segmentation."""
    monkeypatch.setattr("luna.inference.pipeline.segment_ct", blob_at_center)
    out = tmp_path / "sharded"
    argv = ["--all-series", "--data-dir", str(dataset), "--out", str(out), "-q", *models]
    context = multiprocessing.get_context("fork")
    port = _free_port()
    ranks = [context.Process(target=_rank, args=(rank, port, argv)) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=300)
    assert [p.exitcode for p in ranks] == [0, 0]

    uids = DataDir.open(dataset).series_uids
    summary = json.loads((out / "summary.json").read_text())
    by_rank = {rank: [c["key"] for c in summary["cts"] if c["rank"] == rank] for rank in (0, 1)}
    assert by_rank == {0: uids[0::2], 1: uids[1::2]}  # disjoint shards covering the list
    assert all(c["status"] == "done" for c in summary["cts"])
    merged = read_results(out / "results.csv")
    per_ct = [read_results(out / u / "nodules.csv") for u in uids]
    assert merged.series_uids == sum((r.series_uids for r in per_ct), []) and set(merged.series_uids) == set(uids)
    assert read_series_list(out / "series.txt") == uids


def test_inputs_are_sorted_and_keys_unique(tmp_path):
    from luna.diagnose.batch import _unique

    items = _unique([CtInput("b", "/x/b.mha"), CtInput("a", "/y/a.mha"), CtInput("a", "/z/a.mha")])
    assert [i.key for i in items] == ["a", "a-2", "b"]
