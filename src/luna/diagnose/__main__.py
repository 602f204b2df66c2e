"""``luna diagnose`` (``python -m luna.diagnose``): find and rate the nodules of one CT or of many.

One CT (``--series-uid UID`` of the data directory, ``--dicom DIR``, ``--image PATH``):
prints what the models were trained on, the table of accepted nodules and the
verdict; with ``--out DIR`` writes the files of `luna.diagnose.outputs` (report.json,
report.html, nodules.csv, NIfTI volumes, PNGs, a DICOM SEG for DICOM input).

Many CTs (several uids, files or folders, ``--series-list``, ``--all-series``,
``--dicom-tree``, ``--input-list``, ``--run-validation``): a batch
(`luna.diagnose.batch`) with a progress bar, one folder per CT under ``--out``,
resumable, failures skipped and counted, merged ``results.csv`` and summaries;
``torchrun --nproc-per-node N -m luna.diagnose ...`` shares the CTs among N
processes. ``--run-validation`` is the batch of the validation series (the run's own
split) and also writes what ``luna evaluate`` scores: ``series.txt``,
``malignancy.csv``, ``confusion.json``, and prints the command.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Sequence

from luna.cli import ArgumentParser, add_data_arguments, add_dicom_arguments, dicom_options, prog, progress_enabled, run_cli
from luna.diagnose import report as rep
from luna.diagnose.batch import (
    CtInput,
    data_dir_inputs,
    dicom_tree_inputs,
    distributed,
    path_inputs,
    read_input_list,
    run_batch,
)
from luna.diagnose.outputs import OutputOptions, write_outputs
from luna.errors import LunaError
from luna.fileio import writable_directory
from luna.inference.classify import DEFAULT_VIEWS
from luna.inference.pipeline import (
    DEFAULT_MALIGNANCY_THRESHOLD,
    DEFAULT_NODULE_THRESHOLD,
    DEFAULT_SEGMENTATION_THRESHOLD,
    NO_LUNGS,
    SLAB,
    check_options,
    diagnose,
    load_models,
)
from luna.runs import PHANTOM_MODELS_ON_REAL_CT, Run, find_models, provenance_warnings, read_provenance

log = logging.getLogger("luna.diagnose")

DEFAULT_VALIDATION_OUT = Path("data-unversioned/diagnose")
BATCH_KINDS = ("series_list", "all_series", "run_validation", "dicom_tree", "input_list")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog("diagnose"), description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("what to diagnose (exactly one)").add_mutually_exclusive_group(required=True)
    src.add_argument("--series-uid", nargs="+", metavar="UID", help="scan(s) of the data directory, by series uid")
    src.add_argument("--series-list", metavar="FILE",
                     help="scans of the data directory listed in FILE, one uid per line (e.g. from luna series)")
    src.add_argument("--all-series", action="store_true", help="every scan of the data directory")
    src.add_argument("--run-validation", action="store_true",
                     help="the validation series of the models' run (its own split), scored against the annotations")
    src.add_argument("--dicom", nargs="+", metavar="DIR", help="DICOM series folder(s)")
    src.add_argument("--dicom-tree", metavar="DIR",
                     help="every CT series in a folder of DICOM studies, searched recursively")
    src.add_argument("--image", nargs="+", metavar="PATH", help=".mhd / .mha / .nii / .nii.gz file(s)")
    src.add_argument("--input-list", metavar="FILE", help="files and DICOM folders listed in FILE, one per line")
    p.add_argument("--dicom-series", metavar="UID", help="with one --dicom DIR holding several series: the one to read "
                   "(default: every CT series in it)")
    add_dicom_arguments(p)
    data = p.add_argument_group("data")
    add_data_arguments(data)
    data.add_argument("--val-stride", type=int, default=None,
                      help="with --run-validation and explicit models: every N-th series (sorted by uid) validates "
                           "(default: 10); models from a run use the run's own split")
    models = p.add_argument_group("models")
    models.add_argument("--runs-dir", help="where to look for trained models: the newest complete run there "
                        "(default: data-unversioned/runs)")
    models.add_argument("--segmentation-path", help="segmentation checkpoint (default: the newest run's)")
    models.add_argument("--classification-path", help="nodule classifier checkpoint (default: the newest run's)")
    models.add_argument("--malignancy-path", help="malignancy classifier checkpoint (default: the newest run's, if "
                        "any); with explicit models, malignancy is assessed only when this is given")
    models.add_argument("--no-malignancy", action="store_true", help="do not assess malignancy")
    th = p.add_argument_group("thresholds")
    th.add_argument("--segmentation-threshold", type=float, default=None,
                    help="voxels with segmentation p(nodule) above this form the candidates and the written mask "
                         "(default: the threshold the segmentation's training chose, stored in its checkpoint; "
                         f"{DEFAULT_SEGMENTATION_THRESHOLD} for a checkpoint without one)")
    th.add_argument("--nodule-threshold", type=float, default=DEFAULT_NODULE_THRESHOLD,
                    help="a candidate with classifier p(nodule) at or above this is an accepted nodule")
    th.add_argument("--malignancy-threshold", type=float, default=DEFAULT_MALIGNANCY_THRESHOLD,
                    help="the verdict is 'malignant nodule suspected' when an accepted nodule's p(malignant) "
                         "reaches this")
    run = p.add_argument_group("speed")
    run.add_argument("--batch-size", type=int, default=None,
                     help="chunks per classifier batch (default: 4 on the CPU, where it is fastest and lightest; "
                          "32 on CUDA)")
    run.add_argument("--segmentation-batch-size", type=int, default=None,
                     help="slices per UNet batch (default: 1 on the CPU, where it is fastest and lightest; 16 on CUDA)")
    run.add_argument("--views", type=int, default=DEFAULT_VIEWS,
                     help="test-time flips: each candidate's chunk is classified in this many mirror images and "
                          "the probabilities averaged (default: %(default)s; 8: every mirror image; 1: once, 4x less "
                          "classifier time, lower sensitivity)")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; under torchrun "
                     "cuda:LOCAL_RANK)")
    run.add_argument("--amp", action="store_true", help="autocast: bfloat16 on the CPU and on GPUs that support it, "
                     "else float16; about 2x faster on CPUs with native bfloat16")
    out = p.add_argument_group("outputs")
    out.add_argument("--out", metavar="DIR", help="write the report files here (one CT), or one folder per CT and "
                     "the merged results (batch; default for --run-validation: data-unversioned/diagnose)")
    out.add_argument("--no-pictures", action="store_true", help="with --out: no PNG files (report.html keeps its "
                     "pictures)")
    out.add_argument("--no-html", action="store_true", help="with --out: no report.html")
    out.add_argument("--save-probabilities", action="store_true",
                     help="with --out: also write probabilities.nii.gz, the segmentation's p(nodule) per voxel")
    out.add_argument("--no-dicom-seg", action="store_true",
                     help="with --out and DICOM input: no DICOM SEG (written by default when highdicom is installed)")
    out.add_argument("--all", action="store_true", help="console table: every detection, not only accepted ones")
    return p


VERDICT_NOTES = (
    (PHANTOM_MODELS_ON_REAL_CT, "models trained on phantoms: not meaningful for this real scan"),
    (SLAB, "a slab: for the scanned part only"),
    (NO_LUNGS, "no lungs found: is it a chest CT?"),
)
"""The console's verdict line carries each note whose words one of the report's warnings holds."""


class Diagnoser:
    """The models, settings and provenance of one command, and the diagnosis of one CT with them."""

    def __init__(self, args, paths, device):
        from luna.devices import amp_dtype_for

        self.args, self.paths, self.device = args, paths, device
        self.provenance = read_provenance(paths)
        self.models = load_models(paths, device, segmentation_threshold=args.segmentation_threshold)
        self.thresholds = {"segmentation": self.models.segmentation_threshold, "nodule": args.nodule_threshold,
                           "malignancy": args.malignancy_threshold}
        self.options = dict(device=device, batch_size=args.batch_size,
                            segmentation_batch_size=args.segmentation_batch_size,
                            amp_dtype=amp_dtype_for(device) if args.amp else None,
                            nodule_threshold=args.nodule_threshold, malignancy_threshold=args.malignancy_threshold,
                            views=args.views)
        self.outputs = OutputOptions(pictures=not args.no_pictures, save_probabilities=args.save_probabilities,
                                     dicom_seg=not args.no_dicom_seg, html=not args.no_html)

    def fingerprint(self) -> dict:
        """What must not change between the parts of one resumed batch."""
        return {"models": {k: str(v) for k, v in vars(self.paths).items() if v is not None and k != "run_dir"},
                "thresholds": self.thresholds, "amp": bool(self.args.amp), "views": self.args.views}

    def warnings(self, item: CtInput, diagnosis=None) -> tuple[bool, list[str]]:
        """Whether the CT is a phantom, and the warnings its report shows: the models' (trained on what), then
        the diagnosis's own (`Diagnosis.warnings`: a scan too short to rule nodules out, one without lungs)."""
        from luna.datadir import is_synthetic_path

        synthetic = is_synthetic_path(item.source)
        own = list(diagnosis.warnings) if diagnosis is not None else []
        return synthetic, provenance_warnings(self.provenance, synthetic) + own

    def run(self, item: CtInput, folder: Path | None, progress: bool):
        """Load and diagnose one CT; with ``folder``, write its files. Returns (diagnosis, probabilities, ct, s)."""
        from luna.io import load_ct

        start = time.perf_counter()
        # the DICOM options go with every input when given: on another format load_ct says they do not apply
        options = {k: v for k, v in dicom_options(self.args).items() if v}
        ct = load_ct(item.source, series_uid=item.series_uid, **options)
        diagnosis, probabilities = diagnose(ct, self.models, keep_probabilities=True, progress=progress,
                                            **self.options)
        if folder is not None:
            synthetic, warnings = self.warnings(item, diagnosis)
            try:
                write_outputs(folder, diagnosis, probabilities, ct, source=item.source, model_paths=self.paths,
                              thresholds=self.thresholds, provenance=self.provenance, warnings=warnings,
                              ct_is_synthetic=synthetic, dicom_folder=Path(item.source) if item.dicom else None,
                              options=self.outputs)
            except OSError as err:  # e.g. the disk filled up during the run; each file is whole or absent
                raise LunaError(f"{folder}: cannot write the report ({err.strerror or err}); free some space or "
                                f"choose another --out and run again (report.json is written last)") from None
        return diagnosis, probabilities, ct, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dicom_series and not (args.dicom and len(args.dicom) == 1):
        parser.error("--dicom-series needs exactly one --dicom DIR")
    if any(dicom_options(args).values()) and not (args.dicom or args.dicom_tree or args.input_list):
        parser.error("--allow-gaps, --allow-nonuniform and --allow-tilt apply to DICOM input "
                     "(--dicom, --dicom-tree, --input-list) only")
    # Everything that can be checked before the run is, so a bad option or an
    # unwritable --out fails in a second, not after the whole diagnosis.
    check_options(segmentation_threshold=args.segmentation_threshold, nodule_threshold=args.nodule_threshold,
                  malignancy_threshold=args.malignancy_threshold, batch_size=args.batch_size,
                  segmentation_batch_size=args.segmentation_batch_size, views=args.views)
    if args.out or args.run_validation:
        writable_directory(Path(args.out) if args.out else DEFAULT_VALIDATION_OUT, "--out", keep=False)
    paths = find_models(args.runs_dir, segmentation_path=args.segmentation_path,
                        classification_path=args.classification_path, malignancy_path=args.malignancy_path,
                        malignancy=not args.no_malignancy)
    with distributed() as processes:
        inputs, data = _inputs(args, paths)
        batch = any(getattr(args, kind) for kind in BATCH_KINDS) or len(inputs) > 1
        if not batch and processes.world > 1:
            raise LunaError("one CT cannot be shared among torchrun processes: run it without torchrun")
        device = _device(args.device, processes)
        diagnoser = Diagnoser(args, paths, device)
        if not batch:
            return _single(args, diagnoser, inputs[0])
        return _batch(args, diagnoser, inputs, data, processes)


def _inputs(args, paths) -> tuple[list[CtInput], object]:
    """The CTs the options name, and the data directory when they come from one."""
    if args.dicom or args.image or args.dicom_tree or args.input_list:
        if args.dicom_tree:
            return dicom_tree_inputs(args.dicom_tree), None
        listed = args.dicom or args.image or read_input_list(args.input_list)
        return path_inputs(listed, args.dicom_series), None
    from luna.datadir import resolve_data_dir  # not at the top: it can fall back to luna.synth

    data = resolve_data_dir(args.data_dir, progress=progress_enabled(args))
    if args.run_validation:
        from luna.annotations import split_series

        uids = split_series(data.series_uids, validation_stride(args.val_stride, paths))[1]
        if not uids:
            raise LunaError(f"{data.root}: too few series for a validation split")
    elif args.all_series:
        uids = data.series_uids
    elif args.series_list:
        from luna.io.luna16 import read_series_list

        uids = read_series_list(args.series_list)
    else:
        uids = args.series_uid
    return data_dir_inputs(data, uids), data


def _device(name: str | None, processes):
    import torch

    from luna.devices import resolve_device

    device = resolve_device(name)
    if processes.world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", processes.local_rank % torch.cuda.device_count())
    return device


def _single(args, diagnoser: Diagnoser, item: CtInput) -> int:
    progress = progress_enabled(args)
    folder = Path(args.out) if args.out else None
    diagnosis, _, ct, seconds = diagnoser.run(item, folder, progress)
    _, warnings = diagnoser.warnings(item, diagnosis)
    print(f"series {diagnosis.series_uid}  ({item.source})")
    print(f"CT {ct.hu.shape[0]}x{ct.hu.shape[1]}x{ct.hu.shape[2]} voxels, spacing xyz "
          + " x ".join(f"{s:.2f}" for s in ct.geometry.spacing_xyz) + " mm")
    print(rep.format_provenance(diagnoser.provenance, warnings))
    print(rep.count_line(len(diagnosis.nodules), len(diagnosis.duplicates), len(diagnosis.accepted),
                         args.nodule_threshold))
    print(rep.format_table(diagnosis, show_all=args.all))
    if diagnosis.malignancy_source and diagnosis.malignancy_source != "model":
        print(f"p(malignant) from {diagnosis.malignancy_source.removeprefix('diameter: ')}")
    notes = [note for words, note in VERDICT_NOTES if any(words in w for w in warnings)]
    print(f"verdict: {diagnosis.verdict}" + "".join(f"  [{n}]" for n in notes))
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in diagnosis.timings.items())
    print(f"time: {timing} (total with loading and writing {seconds:.1f}s)")
    if folder is not None:
        print(f"wrote the report to {folder} (report.html, report.json, nodules.csv, volumes"
              + (", pictures" if not args.no_pictures else "") + ")")
    return 0


def _batch(args, diagnoser: Diagnoser, inputs: list[CtInput], data, processes) -> int:
    if args.out:
        out = Path(args.out)
    elif args.run_validation:
        out = DEFAULT_VALIDATION_OUT
    else:
        raise LunaError(f"{len(inputs)} CTs to diagnose: give --out DIR for their reports and the merged results")
    if processes.is_main:
        print(rep.format_provenance(diagnoser.provenance, provenance_warnings(
            diagnoser.provenance, diagnoser.warnings(inputs[0])[0] if inputs else None)))
    annotations = None
    if data is not None:
        from luna.annotations import load_annotations
        from luna.io.luna16 import ANNOTATIONS_FILE, MALIGNANCY_FILE

        if (data.root / ANNOTATIONS_FILE).is_file() or (data.root / MALIGNANCY_FILE).is_file():
            annotations = load_annotations(data.root)

    def diagnose_one(item: CtInput, folder: Path, progress: bool):
        diagnosis, _, _, seconds = diagnoser.run(item, folder, progress)
        return diagnosis, seconds

    title = "luna: validation series" if args.run_validation else "luna batch diagnosis"
    result = run_batch(inputs, out, diagnose_one=diagnose_one, fingerprint=diagnoser.fingerprint(),
                       processes=processes, progress=progress_enabled(args),
                       data_root=data.root if data is not None else None, annotations=annotations,
                       malignancy_threshold=args.malignancy_threshold, title=title)
    if not processes.is_main:
        return 0
    print(f"wrote {', '.join(result.files)} and one folder per CT to {out} (open {out / 'index.html'})")
    if result.evaluate_command:
        print(f"score it with: {result.evaluate_command}")
    if result.failed:
        raise LunaError(f"{result.failed} of {len(inputs)} CT(s) failed (listed above and in "
                        f"{out / 'summary.json'}); run the same command again to retry them")
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
