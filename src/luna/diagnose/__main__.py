"""``python -m luna.diagnose``: find and rate the nodules of one CT, or of the validation series.

Input (exactly one): ``--series-uid UID`` (a scan of the data directory),
``--dicom DIR`` (+ ``--dicom-series UID`` when the folder holds several series) or
``--image PATH`` (.mhd/.mha/.nii/.nii.gz); or ``--run-validation``.

Prints the table of accepted nodules and the verdict. With ``--out DIR`` also writes
``report.json``, ``nodules.csv`` (LUNA16 results format, every classified detection
with probability = p(nodule), for threshold sweeps), ``segmentation.nii.gz`` (0/1
mask at 0.5 with the CT's geometry), ``nodule_<k>.png`` per reported nodule and
``overview.png``. ``--run-validation`` prints confusion tables per series and in
total and writes ``validation_results.csv`` + ``confusion.json`` to ``--out``
(default ``data-unversioned/diagnose``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from luna.cli import HelpFormatter, add_data_arguments, run_cli
from luna.devices import amp_dtype_for, resolve_device
from luna.diagnose import report as rep
from luna.errors import LunaError
from luna.evaluate.confusion import confusion_json, confusion_table, format_confusion
from luna.fileio import writable_directory, write_atomic
from luna.inference.pipeline import (
    DEFAULT_MALIGNANCY_THRESHOLD,
    DEFAULT_NODULE_THRESHOLD,
    DEFAULT_SEGMENTATION_THRESHOLD,
    check_options,
    diagnose,
    load_models,
)
from luna.io import load_ct
from luna.io.luna16 import results_csv_text
from luna.runs import Run, find_models

log = logging.getLogger("luna.diagnose")

DEFAULT_VALIDATION_OUT = Path("data-unversioned/diagnose")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m luna.diagnose", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--series-uid", help="a scan of the data directory")
    src.add_argument("--dicom", metavar="DIR", help="a DICOM series folder")
    src.add_argument("--image", metavar="PATH", help=".mhd / .mha / .nii / .nii.gz file")
    src.add_argument("--run-validation", action="store_true", help="diagnose the validation series and score them")
    p.add_argument("--dicom-series", metavar="UID", help="series in --dicom when the folder holds several")
    add_data_arguments(p)
    p.add_argument("--runs-dir", help="where to look for trained models (default: data-unversioned/runs)")
    p.add_argument("--segmentation-path", help="segmentation checkpoint (default: newest run's)")
    p.add_argument("--classification-path", help="nodule classifier checkpoint (default: newest run's)")
    p.add_argument("--malignancy-path", help="malignancy classifier checkpoint (default: newest run's, if any); "
                   "with explicit models, malignancy is assessed only when this is given")
    p.add_argument("--no-malignancy", action="store_true", help="do not assess malignancy (no malignancy model)")
    p.add_argument("--nodule-threshold", type=float, default=DEFAULT_NODULE_THRESHOLD)
    p.add_argument("--malignancy-threshold", type=float, default=DEFAULT_MALIGNANCY_THRESHOLD)
    p.add_argument("--segmentation-threshold", type=float, default=DEFAULT_SEGMENTATION_THRESHOLD)
    p.add_argument("--batch-size", type=int, default=None,
                   help="chunks per classifier batch (default: 4 on the CPU, where it is fastest and lightest; 32 on CUDA)")
    p.add_argument("--segmentation-batch-size", type=int, default=None,
                   help="slices per UNet batch (default: 1 on the CPU, where it is fastest and lightest; 16 on CUDA)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--amp", action="store_true", help="autocast: bfloat16 on the CPU and on GPUs that support it, else float16; about 2x faster on CPUs with native bfloat16")
    p.add_argument("--val-stride", type=int, default=None,
                   help="with --run-validation and explicit models: every N-th series validates (default 10); "
                        "models from a run use the run's own split")
    p.add_argument("--out", metavar="DIR", help="write report files here")
    p.add_argument("--no-pictures", action="store_true", help="with --out: skip the PNGs")
    p.add_argument("--all", action="store_true", help="table: every detection, not only accepted ones")
    return p


def _options(args, device) -> dict:
    amp_dtype = amp_dtype_for(device) if args.amp else None
    return dict(device=device, batch_size=args.batch_size, segmentation_batch_size=args.segmentation_batch_size,
                amp_dtype=amp_dtype, segmentation_threshold=args.segmentation_threshold,
                nodule_threshold=args.nodule_threshold, malignancy_threshold=args.malignancy_threshold)


def _thresholds(args) -> dict:
    return {"segmentation": args.segmentation_threshold, "nodule": args.nodule_threshold,
            "malignancy": args.malignancy_threshold}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dicom_series and not args.dicom:
        parser.error("--dicom-series needs --dicom")
    # Everything that can be checked before the run is, so a bad option or an
    # unwritable --out fails in a second, not after the whole diagnosis.
    check_options(segmentation_threshold=args.segmentation_threshold, nodule_threshold=args.nodule_threshold,
                  malignancy_threshold=args.malignancy_threshold, batch_size=args.batch_size,
                  segmentation_batch_size=args.segmentation_batch_size)
    if args.out or args.run_validation:
        writable_directory(Path(args.out) if args.out else DEFAULT_VALIDATION_OUT, "--out")
    device = resolve_device(args.device)
    paths = find_models(args.runs_dir, segmentation_path=args.segmentation_path,
                        classification_path=args.classification_path, malignancy_path=args.malignancy_path,
                        malignancy=not args.no_malignancy)
    if args.run_validation:
        return run_validation(args, paths, device)

    if args.series_uid:
        from luna.datadir import (
            resolve_data_dir,  # not at the top: it can fall back to luna.synth
        )

        data = resolve_data_dir(args.data_dir)
        source = data.scan_path(args.series_uid)
        ct = load_ct(source, series_uid=args.series_uid)
    elif args.dicom:
        source = Path(args.dicom)
        ct = load_ct(source, series_uid=args.dicom_series)
    else:
        source = Path(args.image)
        ct = load_ct(source)

    models = load_models(paths, device)
    t0 = time.perf_counter()
    diagnosis, probabilities = diagnose(ct, models, keep_probabilities=True, **_options(args, device))
    print(f"series {diagnosis.series_uid}  ({source})")
    print(f"CT {ct.hu.shape[0]}x{ct.hu.shape[1]}x{ct.hu.shape[2]} voxels, spacing xyz "
          + " x ".join(f"{s:.2f}" for s in ct.geometry.spacing_xyz) + " mm")
    print(f"{len(diagnosis.nodules)} detection(s), {len(diagnosis.accepted)} above p(nodule) >= {args.nodule_threshold}")
    print(rep.format_table(diagnosis, show_all=args.all))
    print(f"verdict: {diagnosis.verdict}")
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in diagnosis.timings.items())
    print(f"time: {timing} (total {time.perf_counter() - t0:.1f}s)")

    if args.out:
        out = Path(args.out)
        try:
            files = write_outputs(out, diagnosis, probabilities, ct, source=str(source), model_paths=paths,
                                  thresholds=_thresholds(args), pictures=not args.no_pictures)
        except OSError as err:  # e.g. the disk filled up during the run; each file is whole or absent
            raise LunaError(f"--out {out}: cannot write the report ({err.strerror or err}); free some space "
                            f"or choose another --out and run again (report.json is written last)") from None
        print(f"wrote {len(files)} file(s) to {out}")
    return 0


def write_outputs(out: Path, diagnosis, probabilities, ct, *, source, model_paths, thresholds, pictures=True) -> dict:
    from luna.io.image import save_volume_image  # SimpleITK's writer, only when writing

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    write_atomic(out / "nodules.csv", results_csv_text(rep.results_rows(diagnosis)))
    files["nodules"] = "nodules.csv"
    save_volume_image(probabilities, ct, out / "segmentation.nii.gz", threshold=0.5)
    files["segmentation"] = "segmentation.nii.gz"
    if pictures:
        from luna.diagnose.pictures import save_nodule_picture, save_overview

        for k, n in enumerate(rep.reported_nodules(diagnosis), 1):
            name = f"nodule_{k}.png"
            save_nodule_picture(ct, n, out / name, title=f"nodule {k}")
            files[f"nodule_{k}"] = name
        save_overview(ct, rep.reported_nodules(diagnosis), out / "overview.png", probabilities=probabilities,
                      title=f"{diagnosis.series_uid}\n{diagnosis.verdict}")
        files["overview"] = "overview.png"
    files["report"] = "report.json"
    report = rep.report_dict(diagnosis, source=source, ct=ct, model_paths=model_paths,
                             thresholds=thresholds, files=files)
    write_atomic(out / "report.json", rep.dumps(report))
    return files


def run_validation(args, paths, device) -> int:
    from luna.annotations import load_annotations, split_series
    from luna.datadir import resolve_data_dir

    data = resolve_data_dir(args.data_dir)
    annotations = load_annotations(data.root)
    _, val = split_series(data.series_uids, validation_stride(args.val_stride, paths))
    models = load_models(paths, device)
    out = Path(args.out) if args.out else DEFAULT_VALIDATION_OUT
    per_series: dict[str, np.ndarray] = {}
    rows: list[tuple] = []
    for k, uid in enumerate(val, 1):
        ct = load_ct(data.scan_path(uid), series_uid=uid)
        d = diagnose(ct, models, **_options(args, device))
        table = confusion_table(uid, d.nodules, annotations, malignancy_threshold=args.malignancy_threshold)
        per_series[uid] = table
        rows.extend(rep.results_rows(d))
        print(format_confusion(table, f"[{k}/{len(val)}] {uid}: {d.verdict}"), flush=True)
    total = sum(per_series.values(), np.zeros((3, 4), dtype=np.int64))
    print(format_confusion(total, f"total over {len(val)} validation series"))
    write_atomic(out / "validation_results.csv", results_csv_text(rows))
    write_atomic(out / "confusion.json", rep.dumps(confusion_json(per_series)))
    print(f"wrote {out / 'validation_results.csv'} and {out / 'confusion.json'}")
    return 0


def validation_stride(given: int | None, paths) -> int:
    """The validation split: the run's own when the models come from a run, else ``--val-stride`` (10)."""
    split = Run(paths.run_dir).split() if paths.run_dir is not None else None
    if split is None:
        return given if given is not None else 10
    if given is not None and given != split["val_stride"]:
        raise LunaError(f"--val-stride {given} differs from the split of the run {paths.run_dir} "
                        f"(val_stride {split['val_stride']}); drop --val-stride to validate on the run's own series")
    return int(split["val_stride"])


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
