"""Training speed: the nodule classifier and the segmentation UNet, in the training app and alone.

``app``: epochs of ``python -m luna.training --stage nodule`` / ``--stage
segmentation`` on the benchmark data with augmentation on, as a user runs them.
One untimed epoch first fills the chunk cache and the segmentation site cache, so
the timed runs (same seed, same samples) read warm data. From each run's
checkpoint: training samples/s, validation samples/s and the share of the
training epoch spent waiting for the DataLoader; on CUDA the peak GPU memory.

``step``: forward + backward + AdamW step of the model alone on random input
(batch 24 chunks of 32x48x48 for the classifier, ``--model``'s default, and 16
crops of 7x64x64 for the UNet),
for float32 and autocast, with the memory layout the app uses (channels-last) and, on
the CPU, the allocator settings it uses (`luna.devices.keep_freed_memory`).
A torch.profiler table of these steps is written to the profile file.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from luna.bench.measure import gpu_peak, rate, stats
from luna.devices import amp_dtype_for, keep_freed_memory
from luna.models import SegmentationUNet
from luna.models.checkpoint import load_checkpoint
from luna.training.app import main as train_main
from luna.training.config import ClassifierConfig

__all__ = ["bench_training", "step_profile"]

CLASSIFIER_BATCH = 24
SEGMENTATION_BATCH = 16


def _classifier_step(device: torch.device, amp_dtype) -> tuple[Callable[[], None], int]:
    model = ClassifierConfig().build_model().to(device).to(memory_format=torch.channels_last_3d)
    x = (torch.randn(CLASSIFIER_BATCH, 1, 32, 48, 48, device=device) * 300).contiguous(
        memory_format=torch.channels_last_3d)
    y = torch.randint(0, 2, (CLASSIFIER_BATCH,), device=device)
    return _step(model, x, lambda out: torch.nn.functional.cross_entropy(out.float(), y), device, amp_dtype)


def _segmentation_step(device: torch.device, amp_dtype) -> tuple[Callable[[], None], int]:
    model = SegmentationUNet().to(device).to(memory_format=torch.channels_last)
    x = (torch.randn(SEGMENTATION_BATCH, 7, 64, 64, device=device) * 300).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(SEGMENTATION_BATCH, 1, 64, 64, device=device) > 0.95).float()
    return _step(model, x, lambda out: torch.nn.functional.binary_cross_entropy(out.float(), y), device, amp_dtype)


def _step(model, x, loss_fn, device, amp_dtype) -> tuple[Callable[[], None], int]:
    optimizer = torch.optim.AdamW(model.parameters())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        loss_fn(out).backward()
        optimizer.step()

    return step, len(x)


STEPS = {"nodule_classifier": _classifier_step, "segmentation_unet": _segmentation_step}


def _step_rate(make, device, amp_dtype, steps: int) -> float:
    torch.manual_seed(0)
    step, batch = make(device, amp_dtype)
    step()  # warm-up: oneDNN picks its kernels on the first call
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return rate(batch * steps, time.perf_counter() - start)


def step_profile(device: torch.device, amp_dtype, steps: int = 3) -> str:
    """torch.profiler tables (top operators by own time) of training steps of both models."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    parts = []
    for name, make in STEPS.items():
        for dtype in (None, amp_dtype):
            torch.manual_seed(0)
            step, batch = make(device, dtype)
            step()
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
            title = f"{name}: {steps} training steps, batch {batch}, {_precision(dtype)}, {device}"
            parts.append(f"== {title} ==\n{prof.key_averages().table(sort_by=sort, row_limit=15)}")
    return "\n\n".join(parts)


def _precision(dtype) -> str:
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"


def _app_runs(stage: str, options: list[str], work: Path, repeats: int, amp: bool, device) -> dict:
    train, val, wait, val_seconds, peaks = [], [], [], [], []
    for repeat in range(repeats):
        run = work / f"{stage}-{'amp' if amp else 'fp32'}-{repeat}"
        argv = options + ["--run-dir", str(run)] + (["--amp"] if amp else [])
        _, peak = gpu_peak(device, lambda argv=argv: train_main(argv))
        metrics = load_checkpoint(run / stage / "last.pt")["metrics"]
        train.append(metrics["train"]["samples_per_second"])
        val.append(metrics["val"]["samples_per_second"])
        wait.append(metrics["train"]["data_wait"])
        val_seconds.append(metrics["val"]["samples"] / max(metrics["val"]["samples_per_second"], 1e-9))
        if peak is not None:
            peaks.append(peak)
        shutil.rmtree(run, ignore_errors=True)
    entry = {
        "train_samples_per_s": stats(train),
        "train_data_wait_share": stats(wait),
        "val_samples_per_s": stats(val),
        "val_seconds": stats(val_seconds),
    }
    if peaks:
        entry["gpu_peak_mib"] = stats(peaks)
    return entry


def bench_training(
    data_dir: Path, work: Path, *, repeats: int, workers: int, nodule_epoch: int, segmentation_epoch: int,
    step_repeats: int, steps: int, device: torch.device, amp: bool = True,
) -> dict:
    """Both models' step rates (float32 and autocast) and app runs (autocast too with ``amp``)."""
    amp_dtype = amp_dtype_for(device)
    if device.type == "cpu":
        keep_freed_memory()  # as the training app does (Devices.setup), before the first step
    precisions = {"float32": None, _precision(amp_dtype): amp_dtype}
    app_precisions = precisions if amp else {"float32": None}
    result: dict = {"device": str(device), "step_samples_per_s": {}, "app": {}}
    for name, make in STEPS.items():
        result["step_samples_per_s"][name] = {
            label: stats(_step_rate(make, device, dtype, steps) for _ in range(step_repeats))
            for label, dtype in precisions.items()
        }

    cache = work / "cache"
    common = ["--data-dir", str(data_dir), "--cache-dir", str(cache), "--epochs", "1", "--num-workers",
              str(workers), "--augment", "--no-progress", "--device", str(device)]
    for stage, batch, epoch in (("nodule", CLASSIFIER_BATCH, nodule_epoch),
                                ("segmentation", SEGMENTATION_BATCH, segmentation_epoch)):
        options = common + ["--stage", stage, "--batch-size", str(batch), "--epoch-size", str(epoch)]
        train_main(options + ["--run-dir", str(work / f"{stage}-warmup")])  # fills the caches
        shutil.rmtree(work / f"{stage}-warmup", ignore_errors=True)
        result["app"][stage] = {
            "batch_size": batch,
            "epoch_size": epoch,
            **{label: _app_runs(stage, options, work, repeats, dtype is not None, device)
               for label, dtype in app_precisions.items()},
        }
    shutil.rmtree(work, ignore_errors=True)
    return result
