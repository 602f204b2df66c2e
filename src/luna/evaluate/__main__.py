"""``python -m luna.evaluate``: LUNA16 FROC / CPM of a results CSV, malignancy ROC of per-nodule probabilities.

The rules are in `luna.evaluate.froc` and `luna.evaluate.malignancy`; the files it
writes with ``--out`` in `luna.evaluate.outputs`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from luna.cli import ArgumentParser, prog, run_cli
from luna.errors import LunaError
from luna.evaluate.froc import evaluate_froc, format_ci
from luna.evaluate.malignancy import malignancy_roc
from luna.evaluate.outputs import write_froc_outputs, write_malignancy_outputs
from luna.io.luna16 import (
    read_annotations,
    read_excluded_annotations,
    read_malignancy_results,
    read_results,
    read_series_list,
)

log = logging.getLogger("luna.evaluate")


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog("evaluate"),
        description="LUNA16 FROC / CPM of a results CSV; malignancy ROC of per-nodule probabilities.",
    )
    parser.add_argument("--results", help="seriesuid,coordX,coordY,coordZ,probability CSV")
    parser.add_argument("--annotations", help="annotations.csv (the reference nodules)")
    parser.add_argument("--excluded", help="annotations_excluded.csv (hits there are ignored)")
    parser.add_argument("--series", help="file with one series uid per line (default: the "
                        "series in the results plus the annotated ones)")
    parser.add_argument("--max-marks-per-scan", type=int, help="keep the N most probable "
                        "detections per scan (the challenge used 100)")
    parser.add_argument("--nearest-nodule-only", action="store_true", help="a detection inside several "
                        "nodules hits only the nearest (luna's former rule; the challenge's script counts it "
                        "for each)")
    parser.add_argument("--zero-size-excluded-default", action="store_true", help="excluded findings of "
                        "diameter 0 get the 10 mm default size too (luna's former rule; the challenge's "
                        "script gives it only to negative diameters)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--malignancy", help="seriesuid,coordX,coordY,coordZ,probability,label "
                        "CSV: per-nodule malignancy probability and 0/1 label")
    parser.add_argument("--out", help="directory for froc.csv, froc.png, summary.json "
                        "(and roc.csv, roc.png, malignancy.json)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.results is None and args.malignancy is None:
        raise LunaError("nothing to evaluate: pass --results and --annotations (FROC/CPM) "
                        "and/or --malignancy (ROC).")
    if args.results is not None:
        if args.annotations is None:
            raise LunaError("--results needs --annotations (the reference nodules, annotations.csv).")
        if args.max_marks_per_scan is not None and args.max_marks_per_scan < 1:
            raise LunaError(f"--max-marks-per-scan must be >= 1, got {args.max_marks_per_scan}.")
        results = read_results(args.results)
        annotations = read_annotations(args.annotations)
        excluded = read_excluded_annotations(args.excluded) if args.excluded else []
        scans = read_series_list(args.series) if args.series else None
        result = evaluate_froc(results, annotations, excluded, scans, args.max_marks_per_scan,
                               args.bootstrap, args.seed, nearest_nodule_only=args.nearest_nodule_only,
                               zero_size_excluded_default=args.zero_size_excluded_default)
        c = result.counts
        print(f"scans {c['scans']} ({c['scans_with_nodules']} with nodules), nodules "
              f"{c['nodules']}, detected {c['detected']}, false positives "
              f"{c['false_positives']}, ignored {c['ignored']} ({c['ignored_double_hits']} "
              f"double hits, {c['ignored_excluded_hits']} on excluded findings)")
        if c["marks_on_several_nodules"]:
            print(f"{c['marks_on_several_nodules']} detection(s) inside several nodules, "
                  + ("given to the nearest" if args.nearest_nodule_only else "a hit of each (challenge rule)"))
        if c["outside_detections"] or c["outside_nodules"]:
            print(f"outside the evaluated scans (dropped): {c['outside_detections']} "
                  f"detections, {c['outside_nodules']} nodules")
        if c["dropped_by_cap"]:
            print(f"dropped by --max-marks-per-scan {args.max_marks_per_scan}: {c['dropped_by_cap']}")
        print("sensitivity at FP/scan: " + ", ".join(
            f"{r:g}: {s:.4f}" for r, s in zip(result.rates, result.sensitivities)))
        if result.bootstrap_draws:
            print(f"bootstrap: {result.bootstrap_draws} draws in {result.bootstrap_seconds:.2f} s")
        print(f"CPM {result.cpm:.4f}{format_ci(result.ci)}")
        print(f"CPM (step) {result.cpm_step:.4f}{format_ci(result.ci_step)}")
        if args.out:
            for path in write_froc_outputs(result, args.out, plot=not args.no_plot):
                log.info("wrote %s", path)
    if args.malignancy is not None:
        rows, labels = read_malignancy_results(args.malignancy)
        roc = malignancy_roc(labels, rows.probability, args.bootstrap, args.seed, source=args.malignancy)
        print(f"malignancy: {roc.positives} malignant, {roc.negatives} benign")
        for p in roc.operating_points:
            print(f"  {p['name']} threshold {p['threshold']:.4g}: sensitivity "
                  f"{p['sensitivity']:.3f}, specificity {p['specificity']:.3f}")
        print(f"AUC {roc.auc:.4f}{format_ci(roc.ci)}")
        if args.out:
            for path in write_malignancy_outputs(roc, args.out, plot=not args.no_plot):
                log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
