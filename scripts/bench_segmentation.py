"""Segmentation speed: full-CT inference per scan and UNet training crops/s; writes JSON.

    python scripts/bench_segmentation.py [--data-dir D] [--scans 2] [--out bench-segmentation.json]

Full-CT inference (`luna.segmentation.segment_ct`) runs on ``--scans`` scans of the
synthetic ``bench`` preset (512×512, generated into data-unversioned/bench on first
use) or of ``--data-dir``, with the default UNet (7 context channels, depth 3,
wf 4: the book's size; speed does not depend on the weights), in float32 and with
bf16 autocast (segment_ct feeds the model channels-last input). Training: forward + backward + AdamW on
64×64 crops, batch 16. Each figure is the median of ``--repeats`` runs with min and
max; CT loading is not timed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchlib import machine, stats
from luna.ct import load_ct
from luna.datadir import DataDir
from luna.models import SegmentationUNet
from luna.segmentation import segment_ct



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir")
    parser.add_argument("--scans", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="slices per inference batch")
    parser.add_argument("--out", default="bench-segmentation.json")
    args = parser.parse_args(argv)
    if args.data_dir:
        data = DataDir.open(args.data_dir)
    else:
        from luna.synth import ensure_dataset

        data = DataDir.open(ensure_dataset(Path("data-unversioned/bench"), "bench"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    result = {
        "machine": machine(),
        "inference": {},
    }
    cts = [load_ct(data.scan_path(uid)) for uid in data.series_uids[: args.scans]]
    result["scans_irc"] = [list(ct.hu.shape) for ct in cts]
    slices = sum(ct.hu.shape[0] for ct in cts)
    torch.manual_seed(0)
    model = SegmentationUNet().to(device).eval()
    for precision in ("float32", str(amp).removeprefix("torch.")):
        dtype = None if precision == "float32" else amp
        per_scan, per_slice = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for ct in cts:
                segment_ct(model, ct, device=device, batch_size=args.batch_size, amp_dtype=dtype)
            seconds = time.perf_counter() - start
            per_scan.append(seconds / len(cts))
            per_slice.append(seconds / slices)
        result["inference"][precision] = {"seconds_per_scan": stats(per_scan), "seconds_per_slice": stats(per_slice)}
    model = SegmentationUNet().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(16, 7, 64, 64, device=device) * 300
    y = (torch.rand(16, 1, 64, 64, device=device) > 0.9).float()
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(10):
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy(model(x), y).backward()
            optimizer.step()
        rates.append(160 / (time.perf_counter() - start))
    result["training_crops_per_s_batch16_64x64"] = stats(rates)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
