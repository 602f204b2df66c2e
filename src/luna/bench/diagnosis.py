"""Diagnosis per scan: load, segmentation, grouping, classification, total, peak memory.

Each repeat loads the scan from its file and runs `luna.diagnose.diagnose` on it,
as ``python -m luna.diagnose --series-uid`` does (without writing report files).
Models: the newest complete training run under ``runs_dir``; when there is none,
untrained networks of the default sizes. Speed does not depend on the weights, but
the number of detections does, and with it the grouping and classification time:
the JSON records which models ran and how many detections they gave.

Each scan and precision runs in a fresh process: after the models load, a first
diagnosis gives the memory figures and pays the once-per-process cost of oneDNN /
cuDNN building their kernels (``first_run_seconds``); ``repeats`` more give the
timings.

Memory: the peak RSS increase of that first diagnosis over the process holding
only the loaded models (the CT, the probability volume, the UNet's activations, the
grouping's masks, the kernels' workspaces), set against the issue's budget: 1.5x
the CT as float32 plus the models. ``peak_rss_mib`` is the whole process's peak.

``classifier_chunks_per_s``: the nodule classifier alone on up to 200 of the first
scan's listed candidates, a rate that does not depend on what the models detect.

A cProfile run of one diagnosis is written to the profile file; the JSON names its
top costs.
"""

from __future__ import annotations

import cProfile
import gc
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from luna.annotations import load_candidate_infos
from luna.bench.measure import (
    MIB,
    PeakRss,
    gpu_peak,
    profile_text,
    rate,
    stats,
    top_costs,
)
from luna.datadir import DataDir
from luna.devices import amp_dtype_for
from luna.errors import LunaError
from luna.inference.classify import classify_chunks
from luna.inference.pipeline import Models, diagnose, load_models
from luna.io import load_ct
from luna.models import SegmentationUNet
from luna.runs import find_models
from luna.training.config import ClassifierConfig

__all__ = ["bench_diagnosis", "bench_models", "diagnosis_targets"]

REFERENCE_SLICES = 128
"""Times are also given per 128 slices, the scan size of the issue's targets."""
CLASSIFIER_CHUNKS = 200
"""Candidates of the first scan for the classifier's own rate (`_classifier_rates`)."""


def bench_models(runs_dir: Path | None, device: torch.device) -> tuple[Models, str]:
    """The newest trained models under ``runs_dir``, else untrained default networks; and which."""
    try:
        paths = find_models(runs_dir)
    except LunaError:
        torch.manual_seed(0)
        models = Models(SegmentationUNet(), ClassifierConfig().build_model(), ClassifierConfig().build_model())
        for model in (models.segmentation, models.classification, models.malignancy):
            model.eval().to(device)
        return models, "untrained (no complete training run found: random weights, default sizes)"
    return load_models(paths, device), str(paths.run_dir or paths.segmentation.parent.parent)


def _model_mib(models: Models) -> float:
    nets = [m for m in (models.segmentation, models.classification, models.malignancy) if m is not None]
    return sum(t.numel() * t.element_size() for m in nets for t in (*m.parameters(), *m.buffers())) / MIB


def _one(path: Path, models: Models, device, amp_dtype) -> tuple[dict, tuple]:
    gc.collect()
    with PeakRss() as memory:
        def run():
            start = time.perf_counter()
            ct = load_ct(path)
            loaded = time.perf_counter()
            result = diagnose(ct, models, device=device, amp_dtype=amp_dtype)
            return ct.shape_irc, result, loaded - start, time.perf_counter() - start

        (shape, result, load_seconds, total), gpu = gpu_peak(device, run)
    timings = {"load": load_seconds, **result.timings, "total": total}
    return {"timings": timings, "peak_rss_increase_mib": memory.increase_mib, "peak_rss_mib": memory.peak_mib,
            "gpu_peak_mib": gpu, "detections": len(result.nodules), "accepted": len(result.accepted)}, shape


def _diagnose_in_fresh_process(path: Path, runs_dir: Path | None, device: str, amp: bool, repeats: int) -> dict:
    """Runs in a new process: the models load, then one cold diagnosis, then ``repeats`` timed ones.

    The cold run gives the memory figures: its baseline is a process that holds only
    the models, so nothing freed by an earlier run hides in it. It also pays the
    once-per-process cost of oneDNN / cuDNN building their kernels, and is reported
    apart (``first_run_seconds``); the warm repeats give the timings.
    """
    device = torch.device(device)
    models, _ = bench_models(runs_dir, device)
    amp_dtype = amp_dtype_for(device) if amp else None
    first, shape = _one(path, models, device, amp_dtype)
    runs = [_one(path, models, device, amp_dtype)[0] for _ in range(repeats)]
    return {"first": first, "runs": runs, "shape": shape}


def bench_diagnosis(
    data: DataDir, uids: list[str], *, runs_dir: Path | None, repeats: int, device: torch.device,
    amp: bool, profile_path: Path | None,
) -> dict:
    models, which = bench_models(runs_dir, device)
    model_mib = _model_mib(models)
    precisions = {"float32": False}
    if amp:
        precisions[f"{str(amp_dtype_for(device)).removeprefix('torch.')} autocast"] = True
    result: dict = {"device": str(device), "models": which, "models_mib": model_mib, "scans": {}}
    spawn = multiprocessing.get_context("spawn")
    for uid in uids:
        per_scan: dict = {}
        for label, use_amp in precisions.items():
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                measured = pool.submit(_diagnose_in_fresh_process, data.scan_path(uid), runs_dir, str(device),
                                       use_amp, repeats).result()
            per_scan["shape_irc"] = list(measured["shape"])
            per_scan[label] = _summarise(measured, model_mib)
        result["scans"][uid] = per_scan
    for label in precisions:
        totals = [s[label]["seconds_per_128_slices"]["median"] for s in result["scans"].values()]
        result[f"median_seconds_per_128_slices_{label.replace(' ', '_')}"] = stats(totals)
    result["classifier_chunks_per_s"] = _classifier_rates(data, uids[0], models, device, precisions, repeats)
    result["lung_field_inference"] = _lung_field_speedup(data.scan_path(uids[0]), models, device)
    result["targets"] = diagnosis_targets(result)

    if profile_path is not None:
        profiler = cProfile.Profile()
        ct = load_ct(data.scan_path(uids[0]))
        diagnose(ct, models, device=device)  # warm-up: kernels built outside the profile
        profiler.enable()
        diagnose(ct, models, device=device)
        profiler.disable()
        title = f"cProfile of one float32 diagnosis of {uids[0]} {ct.shape_irc} on {device} ({which})"
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        profile_path.write_text(profile_text(profiler, title))
        result["profile"] = {"file": str(profile_path), "top_costs": top_costs(profiler)}
    return result


SECONDS_PER_128_SLICES_TARGETS = {"float32": 10.0, "autocast": 6.0}
"""Issue 17's CPU targets: seconds per 128 slices of 512x512, float32 and bfloat16/float16 autocast."""
MEMORY_TARGET = 1.5
"""Peak memory of a diagnosis above the loaded models, in multiples of the CT's float32 size."""


def diagnosis_targets(result: dict) -> dict:
    """Each of the issue's diagnosis targets beside its measured figure, from `bench_diagnosis`'s result.

    Speed: the median over scans of each precision's seconds per 128 slices. Memory:
    the largest scan (the issue's target scan has 218 slices; smaller scans weigh the
    UNet's fixed working memory more), its float32 peak increase against
    ``MEMORY_TARGET`` x its float32 size plus the models. The lung-field speed-up is
    reported, without a target.
    """
    targets = {}
    for key, entry in result.items():
        if key.startswith("median_seconds_per_128_slices_") and isinstance(entry, dict):
            label = key.removeprefix("median_seconds_per_128_slices_")
            limit = SECONDS_PER_128_SLICES_TARGETS["float32" if label == "float32" else "autocast"]
            targets[f"seconds_per_128_slices_{label}"] = {
                "target_max": limit, "measured": entry["median"], "met": entry["median"] <= limit}
    scans = [s for s in result.get("scans", {}).values() if isinstance(s.get("float32"), dict)]
    if scans:
        largest = max(scans, key=lambda s: s["shape_irc"][0])
        figures = largest["float32"]
        peak, budget = figures.get("peak_rss_increase_mib"), figures["memory_budget_mib"]
        targets["peak_memory_float32"] = {
            "shape_irc": largest["shape_irc"], "target": f"<= {MEMORY_TARGET}x the CT's float32 size + the models",
            "budget_mib": budget, "measured_mib": peak,
            "measured_times_ct": None if peak is None else peak / figures["ct_float32_mib"],
            "met": None if peak is None else peak <= budget}
    lung = result.get("lung_field_inference")
    if lung:
        targets["lung_field_speedup"] = {"measured": lung["speedup"], "target": "reported"}
    return targets


def _lung_field_speedup(path: Path, models: Models, device) -> dict:
    """Segmentation + grouping of one scan on the lungs' box (the default) against whole slices, float32, one run
    each after a warm-up: the speed-up of lung-field inference as a ratio from the same run."""
    from luna.inference.lungs import lung_mask, segmentation_region
    from luna.inference.pipeline import LUNG_MARGIN_MM, propose
    from luna.inference.segment import receptive_radius

    ct = load_ct(path)
    propose(ct, models.segmentation, device=device)  # warm-up
    seconds = {}
    for label, margin in (("whole_slices", None), ("lung_field", LUNG_MARGIN_MM)):
        start = time.perf_counter()
        propose(ct, models.segmentation, device=device, lung_margin_mm=margin)
        seconds[label] = time.perf_counter() - start
    region = segmentation_region(lung_mask(ct), ct, LUNG_MARGIN_MM, receptive_radius(models.segmentation))
    share = 1.0 if region is None else float(
        np.prod([s.stop - s.start for s in region]) / np.prod(ct.shape_irc))
    return {"shape_irc": list(ct.shape_irc), "whole_slices_seconds": seconds["whole_slices"],
            "lung_field_seconds": seconds["lung_field"], "speedup": seconds["whole_slices"] / seconds["lung_field"],
            "segmented_voxel_share": share}


def _classifier_rates(data: DataDir, uid: str, models: Models, device, precisions: dict, repeats: int) -> dict:
    """Nodule classifier chunks/s on the scan's listed candidates, whatever the detections.

    The diagnosis classifies what the segmentation found, which depends on the
    weights (an untrained UNet finds nothing); this rate does not.
    """
    # all series on disk, then this one: restricted to one series, the loader would report the others as missing
    infos = load_candidate_infos(data.root, data.series_uids)
    centers = [info.center_xyz for info in infos if info.series_uid == uid][:CLASSIFIER_CHUNKS]
    if not centers:
        return {}
    ct = load_ct(data.scan_path(uid))
    rates = {"chunks": len(centers)}
    for label, use_amp in precisions.items():
        amp_dtype = amp_dtype_for(device) if use_amp else None
        classify_chunks(models.classification, ct, centers[:8], device=device, amp_dtype=amp_dtype)  # warm-up
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            classify_chunks(models.classification, ct, centers, device=device, amp_dtype=amp_dtype)
            runs.append(rate(len(centers), time.perf_counter() - start))
        rates[label] = stats(runs)
    return rates


def _summarise(measured: dict, model_mib: float) -> dict:
    runs, first, shape = measured["runs"], measured["first"], measured["shape"]
    depth = shape[0]
    ct_float32_mib = depth * shape[1] * shape[2] * 4 / MIB
    timings = {key: stats(r["timings"][key] for r in runs) for key in runs[0]["timings"]}
    totals = [r["timings"]["total"] for r in runs]
    outside = [(r["timings"]["total"] - r["timings"]["segmentation"]) / r["timings"]["total"] for r in runs]
    entry = {
        "seconds": timings,
        "seconds_per_128_slices": stats(t * REFERENCE_SLICES / depth for t in totals),
        "share_outside_segmentation": stats(outside),
        "first_run_seconds": first["timings"]["total"],
        "detections": runs[0]["detections"],
        "accepted": runs[0]["accepted"],
        "ct_float32_mib": ct_float32_mib,
        "memory_budget_mib": 1.5 * ct_float32_mib + model_mib,
        "peak_rss_increase_mib": first["peak_rss_increase_mib"],
        "peak_rss_mib": first["peak_rss_mib"],
    }
    gpu = [r["gpu_peak_mib"] for r in runs if r["gpu_peak_mib"] is not None]
    if gpu:
        entry["gpu_peak_mib"] = stats(gpu)
    return entry
