"""luna.bench.scale: the full LUNA16 projected from a bench result's measured medians, and nothing invented."""

import json

import pytest

from luna.bench.__main__ import main, summary
from luna.bench.scale import (
    ASSUMED_MEAN_SLICES_PER_SCAN,
    markdown_table,
    missing_sections,
    project_luna16,
)
from luna.errors import LunaError


def figure(median: float) -> dict:
    """A `luna.bench.measure.stats` figure whose min and max differ from the median (the median must be used)."""
    return {"median": median, "min": median / 2, "max": median * 3, "runs": 3}


def bench_result(**extra) -> dict:
    """A hand-made result of ``python -m luna.bench`` with the keys its sections write."""
    result = {
        "mode": "full",
        "machine": {"cpu": "Test CPU", "cores": 2, "gpu": None},
        "data": {"dir": "data-unversioned/bench", "scans": 10},
        "chunks": {
            "scans": 4, "candidates": 2000, "workers": 2, "cold_random_reads_per_s": figure(187.0),
            "zstd_level_1": {
                "bytes_on_disk_per_candidate": 100_000.0,
                "prepcache_candidates_per_s": {"1_process": figure(800.0), "2_processes": figure(1250.0)},
                "warm_reads_per_s": {"one_process": figure(4000.0), "dataloader_2_workers_batch_32": figure(2000.0)},
            },
        },
        "training": {
            "device": "cpu",
            "app": {"nodule": {"batch_size": 24, "epoch_size": 480,
                               "float32": {"train_samples_per_s": figure(40.0)},
                               "bfloat16 autocast": {"train_samples_per_s": figure(64.0)}}},
        },
        "diagnosis": {
            "device": "cpu",
            "models": "untrained (no complete training run found: random weights, default sizes)",
            "scans": {"a": {"shape_irc": [218, 512, 512]}, "b": {"shape_irc": [120, 512, 512]}},
            "median_seconds_per_128_slices_float32": figure(16.0),
            "median_seconds_per_128_slices_bfloat16_autocast": figure(8.0),
        },
    }
    result.update(extra)
    return result


def rows_by_quantity(projection: dict) -> dict:
    return {row["quantity"]: row for row in projection["rows"]}


def test_projection_multiplies_the_medians_by_the_full_dataset():
    projection = project_luna16(bench_result(), mean_slices_per_scan=256)
    rows = rows_by_quantity(projection)

    cache = rows["chunk cache on disk"]
    assert cache["size_gib"] == pytest.approx(100_000 * 551_065 / 2**30)  # 51.3 GiB
    assert "bytes_on_disk_per_candidate = 100,000 B" in cache["source"]

    measured = rows["prepcache, 2 processes"]
    assert measured["seconds"] == pytest.approx(551_065 / 1250)  # the 2-process median, not its min or max
    assert measured["basis"] == "measured rate" and "2_processes = 1,250" in measured["source"]
    projected = rows["prepcache, 16 processes"]
    assert projected["seconds"] == pytest.approx(551_065 / (1250 / 2 * 16))  # 10,000/s
    assert projected["basis"].startswith("linear projection") and "linear" in projected["source"]

    book = rows["nodule classifier epoch, book's balanced epoch (200,000 samples), float32, cpu"]
    assert book["seconds"] == pytest.approx(200_000 / 40)
    every = rows["nodule classifier epoch, every candidate once (551,065 samples), bfloat16 autocast, cpu"]
    assert every["seconds"] == pytest.approx(551_065 / 64)
    assert "training.app.nodule.bfloat16 autocast.train_samples_per_s = 64.0" in every["source"]

    diagnosis = rows["diagnosis of 888 scans, float32, cpu"]
    assert diagnosis["seconds"] == pytest.approx(888 * 256 / 128 * 16.0)  # 888 x 2 x 16 s = 7.9 h
    assert rows["diagnosis of 888 scans, bfloat16 autocast, cpu"]["seconds"] == pytest.approx(888 * 2 * 8.0)
    assert "median_seconds_per_128_slices_float32 = 16.00 s" in diagnosis["source"]

    # torchrun over N nodes: the data-parallel parts divided by N; the cache is what every node holds
    assert diagnosis["torchrun_nodes_seconds"] == pytest.approx(
        {"1": 28416.0, "2": 14208.0, "4": 7104.0, "8": 3552.0})
    assert book["torchrun_nodes_seconds"]["8"] == pytest.approx(5000 / 8)
    assert cache["torchrun_nodes_seconds"] is None
    assert projection["dataset"]["mean_slices_per_scan"] == 256
    assert projection["dataset"]["mean_slices_per_scan_basis"].startswith("given")
    json.dumps(projection)  # goes into the bench JSON as it is


def test_slices_per_scan_is_an_assumption_unless_given():
    projection = project_luna16(bench_result())
    data = projection["dataset"]
    assert data["mean_slices_per_scan"] == ASSUMED_MEAN_SLICES_PER_SCAN
    assert data["mean_slices_per_scan_basis"].startswith("assumption")
    seconds = rows_by_quantity(projection)["diagnosis of 888 scans, float32, cpu"]["seconds"]
    assert seconds == pytest.approx(888 * ASSUMED_MEAN_SLICES_PER_SCAN / 128 * 16.0)
    assert "assumption" in markdown_table(projection)
    with pytest.raises(LunaError, match="positive"):
        project_luna16(bench_result(), mean_slices_per_scan=0)


@pytest.mark.parametrize("section", ["chunks", "training", "diagnosis"])
def test_no_projection_without_a_needed_section(section):
    result = bench_result()
    del result[section]
    assert missing_sections(result) == [section]
    with pytest.raises(LunaError, match=f"missing or failed: {section}"):
        project_luna16(result)
    result[section] = {"error": "no candidates"}  # a failed section counts as missing
    assert missing_sections(result) == [section]


def test_gpu_not_run_or_absent_is_not_measured_never_a_number():
    for gpu in (None, {"available": False, "message": "no CUDA device on this machine"}):
        result = bench_result() if gpu is None else bench_result(gpu=gpu)
        projection = project_luna16(result)
        assert not any("GPU" in row["quantity"] or "cuda" in row["quantity"] for row in projection["rows"])
        (gpu_entry,) = [w for w in projection["not_measured"] if w["quantity"] == "diagnosis on GPU"]
        assert ("no CUDA device" in gpu_entry["why"]) == (gpu is not None)
        table = markdown_table(projection)
        assert "| diagnosis on GPU | not measured | not measured | not measured | not measured |" in table


def test_a_measured_gpu_diagnosis_is_projected_from_its_own_run():
    gpu = {"available": True, "gpu": "Test GPU", "gpus": 1,
           "app": {"nodule": {"float32": {"train_samples_per_s": figure(500.0)}}},
           "diagnosis": {"float32": {"seconds": 1.5, "peak_mib": 900.0, "shape_irc": [300, 512, 512]}}}
    rows = rows_by_quantity(project_luna16(bench_result(gpu=gpu), mean_slices_per_scan=300))
    assert rows["diagnosis of 888 scans, float32, Test GPU"]["seconds"] == pytest.approx(888 * 1.5)
    assert rows["nodule classifier epoch, book's balanced epoch (200,000 samples), float32, Test GPU"][
        "seconds"] == pytest.approx(400.0)


def test_a_result_without_a_figure_is_one_line_error_not_a_traceback():
    result = bench_result(gpu={"available": True, "gpu": "Test GPU", "diagnosis": {"float32": {}}})
    with pytest.raises(LunaError, match="lacks a figure"):
        project_luna16(result)
    result = bench_result()
    del result["diagnosis"]["median_seconds_per_128_slices_float32"]
    del result["diagnosis"]["median_seconds_per_128_slices_bfloat16_autocast"]
    with pytest.raises(LunaError, match="lacks a figure"):
        project_luna16(result)


def test_a_quick_run_says_autocast_training_was_not_measured():
    result = bench_result()
    del result["training"]["app"]["nodule"]["bfloat16 autocast"]
    projection = project_luna16(result)
    assert not any("autocast" in row["quantity"] and "epoch" in row["quantity"] for row in projection["rows"])
    assert any(w["quantity"] == "nodule classifier epoch, autocast, cpu" for w in projection["not_measured"])


def test_markdown_table_has_a_row_per_figure_and_node_columns():
    projection = project_luna16(bench_result())
    table = markdown_table(projection).splitlines()
    assert table[0].startswith("| full LUNA16 (888 scans, 551,065 candidates) | 1 node | 2 nodes | 4 nodes | 8 nodes |")
    rows = [line for line in table if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(projection["rows"]) + len(projection["not_measured"])
    assert "| chunk cache on disk | 51.3 GiB | same per node |" in table[2]
    assert any(line.startswith("| diagnosis of 888 scans, float32, cpu | 7.7 h | 3.9 h | 116 min | 58 min |")
               for line in table)  # 888 x 250 / 128 x 16 s = 27,750 s


def test_summary_names_the_projection():
    result = bench_result()
    projection = project_luna16(result)
    text = summary({"mode": "full", "machine": result["machine"], "luna16_projection": projection}, "bench.json")
    assert "full LUNA16 on paper" in text and "250 slices per scan assumed" in text
    assert "diagnosis: float32, cpu 7.71 h" in text and "not measured: diagnosis on GPU" in text


def test_projection_table_command(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench_result()))
    assert main(["--projection-table", str(path), "--slices-per-scan", "128"]) == 0
    out = capsys.readouterr().out
    assert "| diagnosis of 888 scans, float32, cpu | 3.9 h |" in out  # 888 x 16 s
    assert "128, given" in out

    partial = bench_result()
    del partial["training"]
    path.write_text(json.dumps(partial))
    with pytest.raises(LunaError, match="missing or failed: training"):
        main(["--projection-table", str(path)])
    path.write_text("{not json")
    with pytest.raises(LunaError, match="not a luna.bench JSON"):
        main(["--projection-table", str(path)])
    with pytest.raises(LunaError, match="cannot read"):
        main(["--projection-table", str(tmp_path / "absent.json")])
    with pytest.raises(LunaError, match="--slices-per-scan must be a positive number"):
        main(["--projection-table", str(path), "--slices-per-scan", "nan"])


def test_projection_table_exits_2_with_one_line(tmp_path, capsys):
    from luna.cli import run_cli

    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"mode": "quick", "loading": {}}))
    assert run_cli(main, ["--projection-table", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing or failed: chunks, training, diagnosis" in err[0]
