"""``python -m luna.synth --out DIR [--preset tiny|demo|bench] [--scans N] [--seed S] [--dicom] [--preview]``."""

from __future__ import annotations

import argparse
from typing import Sequence

from luna.synth.presets import PRESETS

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from luna.cli import ArgumentParser, prog

    parser = ArgumentParser(
        prog=prog("synth"),
        description="Write a synthetic chest-CT dataset in the LUNA16 layout (scans in subset*/ as .mhd/.raw, "
        "candidates.csv, annotations*.csv), with the ground truth of every nodule beside it.",
    )
    parser.add_argument("--out", required=True, help="output directory (new, empty, or an earlier luna.synth dataset)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="tiny: a few small scans for tests; demo: the built-in dataset; bench: 512x512, "
                        "realistic spacing (default: demo)")
    parser.add_argument("--scans", type=int, help="number of scans (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed and arguments, same files")
    parser.add_argument("--dicom", action="store_true", help="also write each scan as a DICOM series in DIR/dicom/")
    parser.add_argument("--preview", action="store_true", help="write PNG views with the nodules marked in DIR/preview/")
    parser.add_argument("--workers", type=int, help="processes generating scans (default: CPU cores for big jobs)")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    from luna.cli import progress_enabled
    from luna.synth.dataset import generate_dataset

    args = build_parser().parse_args(argv)
    summary = generate_dataset(args.out, args.preset, scans=args.scans, seed=args.seed, dicom=args.dicom,
                               preview=args.preview, progress=progress_enabled(args), workers=args.workers)
    print(summary.format())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from luna.cli import run_cli

    return run_cli(_main, argv)
