"""Nodule classifier training and validation speed; writes JSON.

    python scripts/bench_training.py [--data-dir D] [--epoch-size 480] [--out bench-training.json]

Two measurements, each the median of ``--repeats`` runs with min and max:

- ``step``: forward + backward + AdamW step on random chunks (batch 24), for the
  memory layouts and precisions the training app can use — the model alone;
- ``app``: one epoch of ``python -m luna.training --stage nodule`` on real chunks
  from a warm cache (``--data-dir``, default the built-in demo set), giving training
  and validation samples/s and the share of the training epoch spent waiting for
  the DataLoader, with and without ``--amp``.

On CUDA (when present) the same runs happen on the GPU, with AMP on and off, and the
peak GPU memory is reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from benchlib import machine, stats
from luna.models import NoduleClassifier
from luna.models.checkpoint import load_checkpoint
from luna.training.app import main as train_main



def step_rate(device: torch.device, channels_last: bool, amp_dtype, batch: int = 24, steps: int = 4) -> float:
    torch.manual_seed(0)
    model = NoduleClassifier().to(device)
    x = torch.randn(batch, 1, 32, 48, 48, device=device) * 300
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    y = torch.randint(0, 2, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters())

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        optimizer.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="LUNA16-layout data (default: the built-in demo set)")
    parser.add_argument("--cache-dir", default="data-unversioned/cache")
    parser.add_argument("--epoch-size", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench-training.json")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "machine": machine(),
        "batch_size": args.batch_size,
    }
    amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    variants = {
        "contiguous_fp32": (False, None),
        "channels_last_fp32": (True, None),
        f"channels_last_{str(amp_dtype).removeprefix('torch.')}_autocast": (True, amp_dtype),
    }
    result["step_samples_per_s"] = {
        name: stats([step_rate(device, cl, dt, args.batch_size) for _ in range(args.repeats)])
        for name, (cl, dt) in variants.items()
    }

    common = ["--stage", "nodule", "--epochs", "1", "--epoch-size", str(args.epoch_size),
              "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
              "--cache-dir", args.cache_dir, "--augment", "--no-progress"]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    work = Path("data-unversioned/bench-training")
    shutil.rmtree(work, ignore_errors=True)
    # one untimed epoch fills the chunk cache for the measured ones
    train_main(common + ["--run-dir", str(work / "warmup")])
    for amp in (False, True):
        train, val, wait, peak = [], [], [], []
        for repeat in range(args.repeats):
            run = work / f"amp{int(amp)}-{repeat}"
            if device.type == "cuda":
                torch.cuda.reset_peak_memorystats()
            train_main(common + ["--run-dir", str(run)] + (["--amp"] if amp else []))
            metrics = load_checkpoint(run / "nodule" / "last.pt")["metrics"]
            train.append(metrics["train"]["samples_per_second"])
            val.append(metrics["val"]["samples_per_second"])
            wait.append(metrics["train"]["data_wait"])
            if device.type == "cuda":
                peak.append(torch.cuda.max_memory_allocated() / 2**20)
        entry = {
            "train_samples_per_s": stats(train),
            "val_samples_per_s": stats(val),
            "train_data_wait_share": stats(wait),
        }
        if peak:
            entry["gpu_peak_mib"] = stats(peak)
        result[f"app_{'amp' if amp else 'fp32'}"] = entry
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
