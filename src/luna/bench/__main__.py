"""The ``python -m luna.bench`` command (see `luna.bench`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from luna.bench.measure import machine
from luna.bench.scale import (
    ASSUMED_MEAN_SLICES_PER_SCAN,
    markdown_table,
    missing_sections,
    project_luna16,
)
from luna.cli import ArgumentParser, prog, run_cli
from luna.datadir import DataDir
from luna.errors import LunaError
from luna.fileio import write_atomic
from luna.inference.classify import DEFAULT_VIEWS, check_views

log = logging.getLogger("luna.bench")

SECTIONS = ("loading", "chunks", "training", "diagnosis", "quality", "gpu")
DEFAULT_SECTIONS = ("loading", "chunks", "training", "diagnosis")
"""What a plain run measures; ``quality`` (minutes of diagnoses on its own data) and ``gpu`` are asked for by name."""
QUALITY_DIR = Path("data-unversioned/bench-quality")
BENCH_DIR = Path("data-unversioned/bench")
QUICK_DIR = Path("data-unversioned/bench-quick")
QUICK_SCANS = 3


@dataclass(frozen=True)
class Plan:
    """How much of everything one run measures; ``--quick`` and the full suite differ only here."""

    repeats: int
    load_scans: int
    chunk_scans: int
    chunk_samples: int
    raw_cache: bool
    nodule_epoch: int
    segmentation_epoch: int
    step_repeats: int
    steps: int
    diagnosis_scans: int
    app_amp: bool


FULL = Plan(repeats=3, load_scans=3, chunk_scans=4, chunk_samples=400, raw_cache=True, nodule_epoch=480,
            segmentation_epoch=512, step_repeats=3, steps=4, diagnosis_scans=3, app_amp=True)
QUICK = Plan(repeats=1, load_scans=1, chunk_scans=2, chunk_samples=100, raw_cache=False, nodule_epoch=96,
             segmentation_epoch=64, step_repeats=1, steps=2, diagnosis_scans=1, app_amp=False)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog("bench"), description="Measure luna's speed, memory and disk use; write one JSON.")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer scans, repeats and samples (minutes)")
    p.add_argument("--data-dir", help=f"LUNA16-layout data (default: the synthetic bench preset in {BENCH_DIR}, "
                   f"{QUICK_DIR} with --quick)")
    p.add_argument("--runs-dir", help="trained models for the diagnosis: the newest complete run here "
                   "(default: data-unversioned/runs; untrained networks when there is none)")
    p.add_argument("--out", default="data-unversioned/bench-results/bench.json",
                   help="the JSON file; the profiles go beside it")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help="comma-separated subset of " + ", ".join(SECTIONS))
    p.add_argument("--quality-scans", type=int, help="quality: held-out synthetic scans to generate and diagnose "
                   "(default: 48, 6 with --quick)")
    p.add_argument("--quality-preset", default="bench",
                   help="quality: the luna.synth preset of the held-out set (bench: 512x512 at real CT's spacing)")
    p.add_argument("--quality-run-validation", action="store_true",
                   help="quality with --data-dir: only the validation series of the run whose models are used")
    p.add_argument("--quality-amp", action="store_true", help="quality: run the networks under autocast")
    p.add_argument("--quality-views", type=int, default=DEFAULT_VIEWS,
                   help="quality: test-time mirror images per classified chunk, as luna diagnose --views "
                        "(default: %(default)s)")
    p.add_argument("--repeats", type=int, help="repeats per figure (default: 3, 1 with --quick)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers and prepcache processes")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--work-dir", default="data-unversioned/bench-work", help="scratch space (emptied at the end)")
    scale = p.add_argument_group("the full LUNA16 on paper (luna.bench.scale)")
    scale.add_argument("--projection-table", metavar="BENCH_JSON",
                       help="measure nothing: print the LUNA16 projection of an earlier run's JSON (which ran the "
                            "chunks, training and diagnosis sections) as a Markdown table")
    scale.add_argument("--slices-per-scan", type=float, metavar="N",
                       help="mean slices per LUNA16 scan for the projection's diagnosis time (default: an assumed "
                            f"{ASSUMED_MEAN_SLICES_PER_SCAN}, marked as such; `luna series` on the real data gives it)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.slices_per_scan is not None and not (math.isfinite(args.slices_per_scan) and args.slices_per_scan > 0):
        raise LunaError(f"--slices-per-scan must be a positive number, not {args.slices_per_scan}")
    if args.projection_table:
        print(projection_table(Path(args.projection_table), args.slices_per_scan))
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise LunaError(f"--sections: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTIONS)}")
    check_views(args.quality_views, "--quality-views")  # before any section runs, not minutes into the bench
    plan = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            raise LunaError("--repeats must be at least 1")
        plan = Plan(**{**asdict(plan), "repeats": args.repeats, "step_repeats": args.repeats})
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LunaError("--device cuda given but CUDA is not available")

    # the quality and gpu sections bring their own data: no bench scans for them alone
    data = _data(args) if set(sections) - {"quality", "gpu"} else None
    uids = list(data.series_uids) if data is not None else []
    if args.quick:  # the smallest scans first
        uids.sort(key=lambda uid: _scan_bytes(data.scan_path(uid)))
    out = Path(args.out)
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": " ".join(["python -m luna.bench", *(sys.argv[1:] if argv is None else argv)]),
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine(),
        "data": {"dir": str(data.root), "scans": len(data.series_uids)} if data is not None else None,
        "plan": asdict(plan),
        "seconds": {},
    }
    failed = []
    for section in SECTIONS:
        if section not in sections:
            continue
        log.info("luna.bench: %s ...", section)
        start = time.perf_counter()
        try:
            result[section] = _run_section(section, args, plan, data, uids, work / section, out, device)
        except LunaError as err:  # e.g. a data dir without annotations: the other sections still run
            log.error("luna.bench: %s failed: %s", section, err)
            result[section] = {"error": str(err)}
            failed.append(section)
        result["seconds"][section] = time.perf_counter() - start
        write_atomic(out, json.dumps(result, indent=2) + "\n")
        log.info("luna.bench: %s done in %.0f s -> %s", section, result["seconds"][section], out)
    shutil.rmtree(work, ignore_errors=True)
    if not missing_sections(result):  # the full LUNA16 from this run's own figures, or nothing
        try:
            result["luna16_projection"] = project_luna16(result, mean_slices_per_scan=args.slices_per_scan)
            write_atomic(out, json.dumps(result, indent=2) + "\n")
        except LunaError as err:  # a figure it reads is absent: the measurements stand without it
            log.error("luna.bench: no LUNA16 projection: %s", err)
    print(summary(result, out))
    if failed:
        raise LunaError(f"section(s) {', '.join(failed)} failed (see above); the others are in {out}")
    return 0


def projection_table(path: Path, mean_slices_per_scan: float | None = None) -> str:
    """The Markdown table of the LUNA16 projection (`luna.bench.scale`) from a bench JSON file."""
    try:
        result = json.loads(path.read_text())
    except OSError as err:
        raise LunaError(f"{path}: cannot read the bench result: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LunaError(f"{path}: not a luna.bench JSON file ({err})") from None
    if not isinstance(result, dict):
        raise LunaError(f"{path}: not a luna.bench JSON file (a JSON object expected)")
    try:
        projection = project_luna16(result, mean_slices_per_scan=mean_slices_per_scan)
    except LunaError as err:
        raise LunaError(f"{path}: {err}") from None
    return markdown_table(projection)


def _scan_bytes(path: Path) -> int:
    raw = path.with_suffix(".raw")
    return (raw if raw.is_file() else path).stat().st_size


def _data(args) -> DataDir:
    if args.data_dir:
        return DataDir.open(args.data_dir)
    from luna.synth import ensure_dataset

    if args.quick:
        return DataDir.open(ensure_dataset(QUICK_DIR, "bench", scans=QUICK_SCANS))
    return DataDir.open(ensure_dataset(BENCH_DIR, "bench"))


def _run_section(section, args, plan: Plan, data: DataDir, uids, work: Path, out: Path, device) -> dict:
    """One section; each takes the first of ``uids`` it needs."""
    if section == "loading":
        from luna.bench.loading import bench_loading

        return bench_loading(data, uids[: plan.load_scans], work, plan.repeats)
    if section == "chunks":
        from luna.bench.chunks import bench_chunks

        return bench_chunks(data, uids[: plan.chunk_scans], work, repeats=plan.repeats,
                            samples=plan.chunk_samples, workers=args.num_workers, raw=plan.raw_cache)
    if section == "training":
        from luna.bench.training import bench_training, step_profile
        from luna.devices import amp_dtype_for

        result = bench_training(data.root, work, repeats=plan.repeats, workers=args.num_workers,
                                nodule_epoch=plan.nodule_epoch, segmentation_epoch=plan.segmentation_epoch,
                                step_repeats=plan.step_repeats, steps=plan.steps, device=device, amp=plan.app_amp)
        profile = _beside(out, "training-step-profile.txt")
        write_atomic(profile, step_profile(device, amp_dtype_for(device)))
        result["profile"] = {"file": str(profile)}
        return result
    runs_dir = Path(args.runs_dir) if args.runs_dir else None
    if section == "quality":
        return _quality(args, runs_dir, device, out)
    if section == "gpu":
        from luna.bench.gpu import bench_gpu

        return bench_gpu(work)
    from luna.bench.diagnosis import bench_diagnosis

    return bench_diagnosis(data, uids[: plan.diagnosis_scans], runs_dir=runs_dir, repeats=plan.repeats,
                           device=device, amp=True, profile_path=_beside(out, "diagnosis-profile.txt"))


def _quality(args, runs_dir: Path | None, device, out: Path) -> dict:
    """The quality section's own data: the held-out synthetic set, or the user's (see `luna.bench.quality`)."""
    from luna.bench.quality import (
        QUALITY_SCANS,
        QUALITY_SEED,
        QUICK_QUALITY_SCANS,
        bench_quality,
        quality_series,
    )
    from luna.runs import find_models

    if args.data_dir:
        data = DataDir.open(args.data_dir)
        uids = quality_series(data, find_models(runs_dir).run_dir, args.quality_run_validation)
    else:
        from luna.synth import PRESETS, ensure_dataset

        if args.quality_preset not in PRESETS:
            raise LunaError(f"--quality-preset {args.quality_preset}: choose one of {', '.join(PRESETS)}")
        scans = args.quality_scans or (QUICK_QUALITY_SCANS if args.quick else QUALITY_SCANS)
        if scans < 1:
            raise LunaError("--quality-scans must be at least 1")
        folder = QUALITY_DIR if args.quality_preset == "bench" else QUALITY_DIR.with_name(
            f"{QUALITY_DIR.name}-{args.quality_preset}")
        data = DataDir.open(ensure_dataset(folder, args.quality_preset, seed=QUALITY_SEED, scans=scans),
                            is_synthetic=True)
        uids = list(data.series_uids)
    return bench_quality(data, uids, runs_dir=runs_dir, device=device, amp=args.quality_amp,
                         views=args.quality_views, out=out)


def _beside(out: Path, name: str) -> Path:
    return out.with_name(f"{out.stem}.{name}")


def summary(result: dict, out: Path) -> str:
    """A few lines for the terminal: the headline figures of each section that ran."""

    def med(entry) -> str:
        if isinstance(entry, dict):
            entry = entry["median"]
        return "-" if entry is None else f"{entry:.3g}"

    lines = [f"luna.bench ({result['mode']}) on {result['machine']['cpu']}, {result['machine']['cores']} cores"
             + (f", {result['machine']['gpu']['name']}" if result["machine"]["gpu"] else "")]
    result = {k: v for k, v in result.items() if not (isinstance(v, dict) and "error" in v)}
    if "loading" in result:
        for entry in result["loading"]["metaimage"].values():
            lines.append(f"  load MetaImage {entry['shape_irc']}: {med(entry['seconds'])} s")
        for entry in result["loading"]["dicom"].values():
            lines.append(f"  load DICOM {entry['shape_irc']} ({entry['files']} files): {med(entry['seconds'])} s")
    if "chunks" in result:
        c = result["chunks"]
        z = next(v for k, v in c.items() if k.startswith("zstd_level_"))
        warm = z["warm_reads_per_s"]
        lines.append(f"  chunks: cold {med(c['cold_random_reads_per_s'])}/s, warm {med(warm['one_process'])}/s, "
                     f"{z['bytes_on_disk_per_candidate'] / 1024:.0f} KiB per candidate")
    if "training" in result:
        for stage, entry in result["training"]["app"].items():
            for label, figures in entry.items():
                if isinstance(figures, dict):
                    lines.append(f"  train {stage} {label}: {med(figures['train_samples_per_s'])} samples/s, "
                                 f"data wait {100 * figures['train_data_wait_share']['median']:.1f}%")
    if "diagnosis" in result:
        for scan in result["diagnosis"]["scans"].values():
            for label, entry in scan.items():
                if isinstance(entry, dict):
                    s = entry["seconds"]
                    lines.append(
                        f"  diagnosis {scan['shape_irc']} {label}: {med(s['total'])} s "
                        f"(segmentation {med(s['segmentation'])} s), {med(entry['seconds_per_128_slices'])} s "
                        f"per 128 slices, peak +{med(entry.get('peak_rss_increase_mib'))} MiB"
                    )
        lung = result["diagnosis"].get("lung_field_inference")
        if lung:
            lines.append(f"  lung-field inference {lung['shape_irc']}: {lung['speedup']:.2f}x faster than whole slices "
                         f"({lung['whole_slices_seconds']:.1f} -> {lung['lung_field_seconds']:.1f} s, "
                         f"{100 * lung['segmented_voxel_share']:.0f}% of the voxels segmented)")
        for name, t in result["diagnosis"].get("targets", {}).items():
            if "met" in t:
                measured = t.get("measured", t.get("measured_times_ct"))
                goal = t.get("target_max", t.get("target"))
                state = "-" if t["met"] is None else ("met" if t["met"] else "NOT met")
                lines.append(f"  target {name}: {med(measured)} (target {goal}): {state}")
        rates = result["diagnosis"].get("classifier_chunks_per_s", {})
        for label, entry in rates.items():
            if isinstance(entry, dict):
                lines.append(f"  nodule classifier {label}: {med(entry)} chunks/s")
    if "gpu" in result:
        g = result["gpu"]
        if not g["available"]:
            lines.append(f"  gpu: {g['message']}")
        else:
            d = g["diagnosis"]["float32"]
            lines.append(f"  gpu {g['gpu']}: diagnosis {d['shape_irc']} {d['seconds']:.2f} s, peak {d['peak_mib']:.0f} MiB; "
                         f"torchrun DDP exit {g['ddp']['returncode']}")
    if "quality" in result:
        q = result["quality"]
        ci = q["cpm_95ci"] or [float("nan")] * 2
        sens = q["sensitivity_at_fp_per_scan"]
        lines.append(f"  quality on {q['series']} scans, {q['nodules']} nodules: CPM {q['cpm']:.3f} "
                     f"(95% CI {ci[0]:.3f}-{ci[1]:.3f}), sensitivity {sens['1']:.3f} at 1 FP/scan, "
                     f"{sens['4']:.3f} at 4; operating point {q['operating_point']['sensitivity']:.3f} at "
                     f"{q['operating_point']['fp_per_scan']:.2f} FP/scan; proposals recall "
                     f"{q['segmentation_proposal_recall']:.3f}")
        m = q["malignancy"]
        if m["model_auc"] is not None:
            gain = m.get("model_gain_95_low")
            which = "the diameter rule" if (q.get("malignancy_source") or "").startswith("diameter") else "model"
            lines.append(f"  malignancy AUC {m['model_auc']:.3f} ({which}) vs "
                         f"diameter alone {m['diameter_auc']:.3f} on {m['detected_nodules_with_rating']} detected "
                         f"nodules" + (f"; 95% lower bound of the gain {gain:+.3f}" if gain is not None else ""))
        ceiling = q.get("malignancy_ceiling")
        if ceiling:
            low, high = ceiling["gain_95ci"] or [float("nan")] * 2
            lines.append(f"  malignancy ceiling (the readers' visible score, luna's phantoms): AUC "
                         f"{ceiling['visible_score_auc']:.3f}, {ceiling['gain_over_diameter']:+.3f} over the diameter "
                         f"(95% CI {low:+.3f}..{high:+.3f}) on the same nodules")
    projection = result.get("luna16_projection")
    if projection:
        data = projection["dataset"]
        assumed = data["mean_slices_per_scan_basis"].startswith("assumption")
        lines.append(f"  full LUNA16 on paper, one node ({data['scans']} scans, {data['candidates']:,} candidates, "
                     f"{data['mean_slices_per_scan']:g} slices per scan {'assumed' if assumed else 'given'}; "
                     "the table: --projection-table JSON):")
        kinds: dict[str, list[str]] = {}
        for row in projection["rows"]:
            value = f"{row['size_gib']:.1f} GiB" if row["size_gib"] is not None else _hours(row["seconds"])
            linear = "" if row["basis"].startswith("measured") else " (linear)"
            kinds.setdefault(row["kind"], []).append(f"{row['case']} {value}{linear}")
        for kind, cases in kinds.items():
            lines.append(f"    {kind}: {'; '.join(cases)}")
        if projection["not_measured"]:
            lines.append("    not measured: " + "; ".join(w["quantity"] for w in projection["not_measured"]))
    lines.append(f"JSON: {out}")
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.0f} s"


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
