"""GPU readiness in one command: ``python -m luna.bench --sections gpu`` (a few minutes on a CUDA machine).

On a machine without CUDA it records ``{"available": false, ...}``, says so, and the
command exits 0: nothing is measured and nothing pretends to be. With CUDA:

- ``steps``: training steps of the nodule classifier and the segmentation UNet on
  random input (`luna.bench.training`'s steps) in float32, float16 and, where the
  GPU has it, bfloat16 autocast: samples/s and peak GPU memory;
- ``app``: one short epoch of each stage through ``luna.training`` on a tiny synthetic
  set (pinned-memory DataLoader, 2 workers): training samples/s and the share of the
  epoch spent waiting for data (the target: compute >= 90% of the step time), float32
  and autocast;
- ``data_parallel``: the classifier epoch again with ``nn.DataParallel`` when the
  machine has two GPUs or more;
- ``ddp``: ``torchrun --nproc-per-node 1 -m luna.training`` (NCCL) on the same set:
  exit status and seconds;
- ``diagnosis``: the whole diagnosis (untrained networks of the default sizes) of a
  512x512x300 synthetic CT: seconds (the target: <= 2 s) and peak GPU memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from luna.bench.measure import gpu_peak, stats
from luna.bench.training import STEPS, _app_runs, _step_rate
from luna.ct import Ct
from luna.geometry import Geometry

__all__ = ["bench_gpu"]

NO_GPU = "no CUDA device on this machine: the GPU checks did not run (nothing was measured)"


def bench_gpu(work: Path, *, steps: int = 10) -> dict:
    if not torch.cuda.is_available():
        return {"available": False, "message": NO_GPU}
    device = torch.device("cuda", 0)
    precisions = {"float32": None, "float16": torch.float16}
    if torch.cuda.is_bf16_supported():
        precisions["bfloat16"] = torch.bfloat16
    result: dict = {"available": True, "gpu": torch.cuda.get_device_name(device), "gpus": torch.cuda.device_count(),
                    "steps": {}, "app": {}}
    for name, make in STEPS.items():
        entry = {}
        for label, dtype in precisions.items():
            torch.cuda.reset_peak_memory_stats(device)
            entry[label] = {"samples_per_s": stats([_step_rate(make, device, dtype, steps) for _ in range(2)]),
                            "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
        result["steps"][name] = entry

    from luna.synth import ensure_dataset

    data = ensure_dataset(work / "data", "tiny", progress=False)
    common = ["--data-dir", str(data), "--cache-dir", str(work / "cache"), "--epochs", "1", "--num-workers", "2",
              "--augment", "--no-progress", "--device", "cuda", "--val-stride", "2"]
    for stage in ("nodule", "segmentation"):
        options = common + ["--stage", stage, "--epoch-size", "512"]
        result["app"][stage] = {"float32": _app_runs(stage, options, work, 1, False, device),
                                "autocast": _app_runs(stage, options, work, 1, True, device)}
    if torch.cuda.device_count() >= 2:
        options = common + ["--stage", "nodule", "--epoch-size", "1024"]
        result["data_parallel"] = _app_runs("nodule", options, work, 1, True, torch.device("cuda"))
    result["ddp"] = _torchrun(common + ["--stage", "nodule", "--epoch-size", "256"], work)
    result["diagnosis"] = _diagnosis(device)
    return result


def _torchrun(options: list[str], work: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "luna.training", *options, "--run-dir", str(work / "ddp")]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ}, timeout=600)
    return {"command": " ".join(command[2:]), "returncode": done.returncode, "seconds": time.perf_counter() - start,
            "stderr_tail": done.stderr[-2000:] if done.returncode else ""}


def _diagnosis(device: torch.device) -> dict:
    from luna.inference.pipeline import Models, diagnose
    from luna.models import SegmentationUNet
    from luna.training.config import ClassifierConfig

    rng = np.random.default_rng(0)
    hu = np.full((300, 512, 512), -1000, np.int16)
    rows, cols = np.mgrid[:512, :512]
    body = ((rows - 256) / 200) ** 2 + ((cols - 256) / 230) ** 2 <= 1
    hu[:, body] = 40
    for c in (170, 342):
        hu[:, ((rows - 250) / 140) ** 2 + ((cols - c) / 70) ** 2 <= 1] = -850
    hu += rng.normal(0, 20, hu.shape).astype(np.int16)
    ct = Ct(hu, Geometry((0.0, 0.0, 0.0), (0.7, 0.7, 1.0)), "gpu-check")
    torch.manual_seed(0)
    models = Models(SegmentationUNet().eval().to(device), ClassifierConfig().build_model().eval().to(device),
                    ClassifierConfig().build_model().eval().to(device))
    diagnose(ct, models, device=device)  # warm-up: cuDNN picks its kernels
    out = {}
    for label, dtype in (("float32", None), ("autocast", torch.float16)):
        start = time.perf_counter()
        _, peak = gpu_peak(device, lambda dtype=dtype: diagnose(ct, models, device=device, amp_dtype=dtype))
        torch.cuda.synchronize(device)
        out[label] = {"seconds": time.perf_counter() - start, "peak_mib": peak, "shape_irc": list(ct.shape_irc)}
    return out
