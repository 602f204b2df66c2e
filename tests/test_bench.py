"""luna.bench: the measuring helpers and one whole quick run on the tiny synthetic set."""

import json

import numpy as np
import pytest

from luna.bench.__main__ import main
from luna.bench.measure import PeakRss, machine, stats, top_costs
from luna.errors import LunaError


def test_stats_gives_median_min_max():
    assert stats([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "runs": 4}
    with pytest.raises(ValueError):
        stats([])


def test_peak_rss_sees_a_temporary_allocation():
    with PeakRss() as memory:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        del block
    if memory.increase_mib is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 60 <= memory.increase_mib < 200
    with PeakRss() as idle:
        pass
    assert idle.increase_mib < 20


def test_top_costs_names_the_expensive_function():
    import cProfile

    def expensive():
        return sum(i * i for i in range(300_000))

    profiler = cProfile.Profile()
    profiler.enable()
    expensive()
    profiler.disable()
    names = [row["function"] for row in top_costs(profiler, 3)]
    assert any("genexpr" in name or "expensive" in name for name in names)


def test_machine_names_cpu_and_torch():
    info = machine()
    assert info["cores"] >= 1 and info["torch"] and info["cpu"]


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(LunaError, match="unknown nope"):
        main(["--sections", "nope", "--out", str(tmp_path / "b.json")])


def test_a_bad_view_count_stops_the_bench_before_any_data_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quality section would generate its held-out set under data-unversioned/
    with pytest.raises(LunaError, match="--quality-views 9"):
        main(["--sections", "quality", "--quality-views", "9", "--out", str(tmp_path / "b.json")])
    assert list(tmp_path.iterdir()) == []


def test_quick_run_writes_every_section(tiny_dataset, tmp_path, capsys):
    """The whole suite, quick plan, on the tiny set: every figure present and plausible."""
    out = tmp_path / "results" / "bench.json"
    main(["--quick", "--data-dir", str(tiny_dataset), "--out", str(out), "--work-dir", str(tmp_path / "work"),
          "--runs-dir", str(tmp_path / "no-runs"), "--num-workers", "1"])
    result = json.loads(out.read_text())
    assert result["mode"] == "quick" and result["machine"]["cores"] >= 1
    assert set(result["seconds"]) == {"loading", "chunks", "training", "diagnosis"}

    def figure(entry):
        assert set(entry) == {"median", "min", "max", "runs"}
        assert entry["min"] <= entry["median"] <= entry["max"]
        return entry["median"]

    loading = result["loading"]
    (meta,) = loading["metaimage"].values()
    (dicom,) = loading["dicom"].values()
    assert meta["shape_irc"] == dicom["shape_irc"] and dicom["files"] == meta["shape_irc"][0]
    assert figure(meta["seconds"]) > 0 and figure(dicom["seconds"]) > 0

    chunks = result["chunks"]
    assert figure(chunks["cold_random_reads_per_s"]) > 0
    level = chunks["zstd_level_1"]
    assert 0 < level["bytes_on_disk_per_candidate"] < 32 * 48 * 48 * 2 + 4096  # compressed int16 + header
    assert figure(level["prepcache_candidates_per_s"]["1_process"]) > 0
    assert figure(level["warm_reads_per_s"]["one_process"]) > 0

    training = result["training"]
    for model in ("nodule_classifier", "segmentation_unet"):
        assert figure(training["step_samples_per_s"][model]["float32"]) > 0
    for stage in ("nodule", "segmentation"):
        app = training["app"][stage]["float32"]
        assert figure(app["train_samples_per_s"]) > 0
        assert 0 <= figure(app["train_data_wait_share"]) < 1
    assert "convolution" in (out.parent / "bench.training-step-profile.txt").read_text()

    diagnosis = result["diagnosis"]
    assert diagnosis["models"].startswith("untrained")
    (scan,) = diagnosis["scans"].values()
    for label in ("float32", "bfloat16 autocast"):
        entry = scan[label]
        seconds = {key: figure(value) for key, value in entry["seconds"].items()}
        assert set(seconds) == {"load", "lungs", "segmentation", "grouping", "classification", "measurement", "malignancy",
                                "total"}
        assert seconds["total"] >= seconds["segmentation"] > 0
        assert entry["ct_float32_mib"] == pytest.approx(np.prod(scan["shape_irc"]) * 4 / 2**20)
        if entry["peak_rss_increase_mib"] is not None:
            assert entry["peak_rss_increase_mib"] > 0
    lung = diagnosis["lung_field_inference"]
    assert lung["speedup"] > 0 and 0 < lung["segmented_voxel_share"] <= 1
    classifier = diagnosis["classifier_chunks_per_s"]
    assert classifier["chunks"] > 0 and figure(classifier["float32"]) > 0
    costs = diagnosis["profile"]["top_costs"]
    assert costs and costs[0]["seconds"] > 0
    assert "sorted by tottime" in (out.parent / "bench.diagnosis-profile.txt").read_text()
    projection = result["luna16_projection"]  # chunks, training and diagnosis ran: the full LUNA16 on paper
    assert {row["kind"] for row in projection["rows"]} == {"cache", "prepcache", "training epoch", "diagnosis"}
    assert all(row["seconds"] or row["size_gib"] for row in projection["rows"])
    printed = capsys.readouterr().out
    assert "diagnosis" in printed and "full LUNA16 on paper" in printed


def test_a_failing_section_is_recorded_and_the_others_still_run(tiny_dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    header = (data / "candidates.csv").read_text().splitlines()[0]
    (data / "candidates.csv").write_text(header + "\n")
    for path in data.glob("annotations*.csv"):
        path.unlink()
    out = tmp_path / "bench.json"
    with pytest.raises(LunaError, match="chunks failed"):
        main(["--quick", "--data-dir", str(data), "--sections", "chunks,loading", "--out", str(out),
              "--work-dir", str(tmp_path / "work")])
    result = json.loads(out.read_text())
    assert str(data) in result["chunks"]["error"]  # the error names the data dir
    assert "luna16_projection" not in result  # no projection from a failed section
    assert result["loading"]["metaimage"]


def test_gpu_section_says_so_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the section would measure it")
    out = tmp_path / "bench.json"
    assert main(["--sections", "gpu", "--out", str(out), "--work-dir", str(tmp_path / "w")]) == 0
    gpu = json.loads(out.read_text())["gpu"]
    assert gpu["available"] is False and "did not run" in gpu["message"]
    assert "no CUDA device" in capsys.readouterr().out


def test_quality_section_on_a_run_and_its_validation_series(tiny_dataset, tmp_path):
    """The whole diagnosis on the run's validation series, scored: CPM, interval, FROC picture, results CSV."""
    import torch

    from luna.models import (
        NoduleClassifier,
        SegmentationUNet,
        make_checkpoint,
        save_checkpoint,
    )
    from luna.runs import Run

    run = Run(tmp_path / "runs" / "luna" / "r1")
    torch.manual_seed(0)
    for stage, model in (("segmentation", SegmentationUNet(depth=2, wf=2)), ("nodule", NoduleClassifier())):
        save_checkpoint(run.checkpoint(stage), make_checkpoint(model, stage=stage))
    run.write_info({"split": {"val_stride": 2, "seed": 0}})
    out = tmp_path / "bench.json"
    argv = ["--sections", "quality", "--data-dir", str(tiny_dataset), "--runs-dir", str(tmp_path / "runs"),
            "--quality-run-validation", "--out", str(out), "--work-dir", str(tmp_path / "w")]
    assert main(argv) == 0
    quality = json.loads(out.read_text())["quality"]
    assert quality["series"] == 2 and quality["nodules"] >= 1
    assert 0.0 <= quality["cpm"] <= 1.0 and set(quality["sensitivity_at_fp_per_scan"]) == {
        "0.125", "0.25", "0.5", "1", "2", "4", "8"}
    assert 0.0 <= quality["segmentation_proposal_recall"] <= 1.0
    assert (tmp_path / "bench.quality-froc.png").stat().st_size > 0
    assert (tmp_path / "bench.quality-results.csv").read_text().startswith("seriesuid,coordX")


def test_diagnosis_targets_set_each_target_beside_its_measured_figure():
    from luna.bench.diagnosis import diagnosis_targets

    def scan(depth, peak):
        ct = depth * 512 * 512 * 4 / 2**20
        return {"shape_irc": [depth, 512, 512],
                "float32": {"peak_rss_increase_mib": peak, "ct_float32_mib": ct, "memory_budget_mib": 1.5 * ct + 4}}

    result = {
        "scans": {"a": scan(121, 280.0), "b": scan(218, 300.0)},
        "median_seconds_per_128_slices_float32": {"median": 10.5, "min": 9, "max": 11},
        "median_seconds_per_128_slices_bfloat16_autocast": {"median": 4.0, "min": 3, "max": 5},
        "lung_field_inference": {"speedup": 2.1},
    }
    targets = diagnosis_targets(result)
    assert targets["seconds_per_128_slices_float32"] == {"target_max": 10.0, "measured": 10.5, "met": False}
    assert targets["seconds_per_128_slices_bfloat16_autocast"]["met"] is True
    memory = targets["peak_memory_float32"]  # the largest scan decides: 300 MiB for a 218 MiB CT
    assert memory["shape_irc"][0] == 218 and memory["met"] is True
    assert memory["measured_times_ct"] == pytest.approx(300.0 / 218.0)
    assert targets["lung_field_speedup"]["measured"] == 2.1
