"""``python -m luna.synth --out DIR [--preset tiny|demo|realistic|bench] [--scans N] [--seed S] [--dicom] [--preview]``,
and ``python -m luna.synth --compare-real PATH... [--preset P] [--seed S] [--scans N] [--out DIR]``."""

from __future__ import annotations

import argparse
from typing import Sequence

from luna.synth.presets import PRESETS

__all__ = ["main"]

COMPARE_SCANS = 2
"""Phantoms measured by ``--compare-real`` unless ``--scans`` says otherwise."""


def build_parser() -> argparse.ArgumentParser:
    from luna.cli import ArgumentParser, prog

    parser = ArgumentParser(
        prog=prog("synth"),
        description="Write a synthetic chest-CT dataset in the LUNA16 layout (scans in subset*/ as .mhd/.raw, "
        "candidates.csv, annotations*.csv), with the ground truth of every nodule beside it; or, with "
        "--compare-real, measure real CTs and phantoms side by side.",
    )
    parser.add_argument("--out", help="output directory (new, empty, or an earlier luna.synth dataset); with "
                        "--compare-real where compare.json and compare.png go (default: none written)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="tiny: a few small scans for tests; demo: the built-in dataset (512x512 slabs); "
                        "realistic: whole chests for longer training; bench: whole chests for luna.bench "
                        "(default: demo)")
    parser.add_argument("--scans", type=int, help="number of scans (default: the preset's; "
                        f"{COMPARE_SCANS} with --compare-real)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed and arguments, same files")
    parser.add_argument("--dicom", action="store_true", help="also write each scan as a DICOM series in DIR/dicom/")
    parser.add_argument("--preview", action="store_true", help="write PNG views with the nodules marked in DIR/preview/")
    parser.add_argument("--workers", type=int, help="processes generating scans (default: CPU cores for big jobs)")
    parser.add_argument("--compare-real", nargs="+", metavar="PATH",
                        help="real CTs (DICOM folders or image files): print their statistics beside those of "
                        "phantoms of --preset/--seed (HU per region, vessels, noise and its spectrum, edges)")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    from luna.cli import progress_enabled

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare_real:
        from luna.synth.compare import compare_real, format_comparison

        result = compare_real(args.compare_real, preset=args.preset, seed=args.seed,
                              scans=COMPARE_SCANS if args.scans is None else args.scans, out_dir=args.out)
        print(format_comparison(result))
        if args.out:
            print(f"wrote {args.out}/compare.json and {args.out}/compare.png")
        return 0
    if not args.out:
        parser.error("--out is required (or give --compare-real)")
    from luna.synth.dataset import generate_dataset

    summary = generate_dataset(args.out, args.preset, scans=args.scans, seed=args.seed, dicom=args.dicom,
                               preview=args.preview, progress=progress_enabled(args), workers=args.workers)
    print(summary.format())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from luna.cli import run_cli

    return run_cli(_main, argv)
