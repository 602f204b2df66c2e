"""``python -m luna.training``: train the models the diagnosis needs.

    python -m luna.training --epochs 10 --num-workers 8

Stages run in pipeline order (`STAGES`); ``--stage all`` (the default) runs every
stage that exists. Each stage writes, under one run directory,

    <run dir>/run.json                 arguments, versions, devices
    <run dir>/<stage>/train/, val/     TensorBoard events (x-axis: samples seen)
    <run dir>/<stage>/last.pt, best.pt checkpoints (best: the stage's validation score)

The layout is the run-directory contract of `luna.runs`, which the diagnosis, the
bench and evaluation read. The run directory is ``--run-dir``, else
``data-unversioned/runs/<tb prefix>/<time>[-comment]``. ``--resume RUN_DIR``
continues a run where it stopped. Under ``torchrun`` each process trains its share
(DistributedDataParallel) and only rank 0 writes. The command line becomes a
`TrainingConfig` once (validated there); stages get their parts of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import luna
from luna.cache import ArrayCache
from luna.cli import ArgumentParser, add_data_arguments, prog, run_cli
from luna.datadir import resolve_cache_dir, resolve_data_dir
from luna.devices import Devices
from luna.errors import LunaError
from luna.losses import DEFAULT_FN_WEIGHT
from luna.fileio import remove_stale_temporaries, writable_directory
from luna.models import models_of_kind
from luna.runs import MALIGNANCY, NODULE, RUNS_DIR, SEGMENTATION, STAGES, Run
from luna.training.classification import MalignancyStage, NoduleStage
from luna.training.config import TrainingConfig
from luna.training.segmentation import SegmentationStage
from luna.training.stage import Stage, StageResult

log = logging.getLogger("luna.training")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog("train"),
        description="Train luna's models (stages in pipeline order) with TensorBoard logging and checkpoints.",
    )
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all",
                        help="which stage to train; 'all' runs every stage in pipeline order")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per stage")
    parser.add_argument("--batch-size", type=int, default=24, help="samples per batch per device")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate, cosine decay over the epochs (default: each stage's own: "
                             "nodule 1e-3, segmentation and malignancy 3e-4)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--epoch-size", type=int, default=None,
                        help="training samples per epoch, drawn with --balanced; 0: each positive about once "
                             "(default: each stage's own: nodule 4096, segmentation and malignancy 2048)")
    parser.add_argument("--balanced", type=float, default=1.0, metavar="RATIO",
                        help="negatives per positive in each training epoch; 0 draws from all candidates unbalanced")
    parser.add_argument("--val-stride", type=int, default=10,
                        help="every N-th series (sorted by uid) goes to validation")
    parser.add_argument("--threshold", type=float, default=0.5, help="operating threshold for the metrics")
    aug = parser.add_argument_group("augmentation (training only, per batch on the device)")
    aug.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                     help="all kinds below (on by default: the built-in phantoms are few and the models must "
                          "carry over to real CT; --no-augment and a kind below trains with that kind alone)")
    for kind, what in [("flip", "random mirroring"), ("offset", "random sub-voxel shifts"),
                       ("scale", "random scaling"), ("rotate", "random rotation about the head-foot axis"),
                       ("noise", "additive Gaussian noise"),
                       ("intensity", "scanner calibration: HU gain about air and offset"),
                       ("texture", "CT-like noise, correlated between neighbouring voxels"),
                       ("resolution", "blur or sharpen in-plane, as softer or sharper kernels do")]:
        aug.add_argument(f"--augment-{kind}", action="store_true", help=what)
    model = parser.add_argument_group("nodule classifier")
    model.add_argument("--model", default="ResidualClassifier", choices=models_of_kind("classifier"),
                       help="registered classifier architecture (luna.models.registry); NoduleClassifier is the "
                            "book's LunaModel")
    model.add_argument("--hard-negatives", type=float, default=0.5, metavar="SHARE",
                       help="share of each epoch's negatives drawn from the segmentation's false proposals on the "
                            "training scans (0: CSV candidates only)")
    model.add_argument("--tubes", type=float, default=0.5, metavar="SHARE",
                       help="share of the nodule classifier's training chunks given a straight vessel-like tube: "
                            "through the centre of negatives, beside or thinly through nodules (default 0.5; 0: "
                            "none, which scores higher on luna's own phantoms and lower on other data and real "
                            "CT, README Quality)")
    model.add_argument("--segmentation-path", metavar="PATH",
                       help="segmentation checkpoint whose proposals the nodule stage trains and validates on "
                            "(default: the run's segmentation/best.pt; without one the stage validates on the "
                            "CSV candidates by ROC AUC)")
    model.add_argument("--width", type=int, default=8, help="channels of the classifier's first block (book: 8)")
    model.add_argument("--depth", type=int, default=4, help="blocks of the classifier (book: 4)")
    mal = parser.add_argument_group("malignancy classifier")
    mal.add_argument("--finetune", metavar="PATH",
                     help="nodule classifier checkpoint to start from (default with --stage all: the nodule stage's best.pt)")
    mal.add_argument("--finetune-depth", type=int, default=2,
                     help="sections trained, counted from the head: 1 = head only, 2 = head + last block, ...")
    seg = parser.add_argument_group("segmentation")
    seg.add_argument("--context-slices", type=int, default=3,
                     help="slices above and below each slice given to the UNet as channels (book: 3)")
    seg.add_argument("--seg-depth", type=int, default=3, help="UNet levels (book: 3)")
    seg.add_argument("--seg-width", type=int, default=4, help="UNet base width as a power of 2: 2**N channels (book: 4)")
    seg.add_argument("--fn-weight", type=float, default=DEFAULT_FN_WEIGHT, help="weight of the missed-nodule-voxel term of the loss")
    seg.add_argument("--fp-bound", type=float, default=100.0,
                     help="false-positive proposals per validation scan allowed at the operating threshold: each "
                          "epoch the lowest threshold within it is chosen and stored in the checkpoint (the "
                          "classifier after it is meant to sort out at most a few hundred per scan)")
    run = parser.add_argument_group("run")
    add_data_arguments(run)
    run.add_argument("--run-dir", help="where TensorBoard events and checkpoints go (default: a new "
                     "directory under data-unversioned/runs/<tb-prefix>/)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoints")
    run.add_argument("--tb-prefix", default="luna", help="group runs under data-unversioned/runs/<tb-prefix>/")
    run.add_argument("--comment", default="", help="free text: appended to the run directory's name, kept in run.json")
    run.add_argument("--seed", type=int, default=0, help="seed for sampling, augmentation and initialisation")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    run.add_argument("--amp", action="store_true", help="mixed precision: bf16 where supported, else fp16 (CUDA); bf16 on the CPU")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (summary lines only; -q also turns them off)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = TrainingConfig.from_args(args)
    with Devices.setup(config.device, config.amp) as devices:
        run_dir = devices.same_on_all_ranks(choose_run_dir(config))
        made_here = not run_dir.exists()
        try:
            results = train(config, devices, run_dir)
        except LunaError:
            if made_here and devices.is_main:
                remove_run_without_checkpoints(run_dir)
            raise
    if devices.is_main:
        print(report(results, run_dir))
    return 0


def train(config: TrainingConfig, devices: Devices, run_dir: Path) -> list[StageResult]:
    _seed_everything(config.loop.seed + devices.rank)
    data = resolve_data_dir(config.data_dir, progress=config.loop.progress and devices.is_main)
    cache_dir = resolve_cache_dir(config.cache_dir)
    run = Run(run_dir)
    provenance = data_provenance(data, config.loop.val_stride)
    info = {**_run_info(config, devices, data.root), "provenance": provenance}
    if devices.is_main:
        # Before anything is written: an unwritable run or cache directory is one clear
        # error, and what a killed run left half-written (run.json's temporary, cache
        # value files without an entry) goes. Stages clean their own checkpoints.
        writable_directory(run_dir, "run directory")
        remove_stale_temporaries(run_dir)
        cache = ArrayCache(cache_dir)
        cache.remove_orphans()
        cache.close()  # DataLoader workers open their own connections
    if devices.is_main:
        run.write_info(info)
        log.info("run directory %s (TensorBoard: tensorboard --logdir %s)", run_dir, run_dir)
        log.info("training on %s", "synthetic phantoms" if provenance["synthetic"] else "real CTs")
    names = list(STAGES) if config.stage == "all" else [config.stage]
    results: list[StageResult] = []
    for name in names:
        stage = build_stage(name, config, devices, run, data, cache_dir, provenance)
        try:
            results.append(stage.run())
        finally:
            stage.writer.close()
        if name == NODULE and not config.malignancy.finetune:
            # the malignancy stage fine-tunes the nodule classifier just trained
            config = dataclasses.replace(
                config, malignancy=dataclasses.replace(config.malignancy, finetune=str(results[-1].best_path))
            )
    if devices.is_main:  # what the run achieved, beside what it was asked (luna.runs)
        run.write_info({**info, "results": {r.name: {"epochs": r.epochs, "score_name": r.score_name,
                                                     "best_score": r.best_score, "best_epoch": r.best_epoch}
                                            for r in results}})
    return results


def data_provenance(data, val_stride: int) -> dict:
    """What the models learn from (`luna.runs.PROVENANCE_KEYS`), kept in run.json and every checkpoint."""
    from luna.annotations import split_series

    training, validation = split_series(data.series_uids, val_stride)
    return {"data_dir": str(data.root.absolute()), "synthetic": bool(data.is_synthetic),
            "scans": len(data.series_uids), "training_scans": len(training), "validation_scans": len(validation)}


def build_stage(name: str, config: TrainingConfig, devices: Devices, run: Run, data, cache_dir: Path,
                provenance: dict | None = None) -> Stage:
    """The stage ``name`` with the parts of ``config`` it needs; checkpoints record the whole config
    and the data's provenance."""
    directory = run.stage_dir(name)
    record = {**config.to_dict(), "provenance": provenance or data_provenance(data, config.loop.val_stride)}
    if name == SEGMENTATION:
        return SegmentationStage(config.loop, config.segmentation, devices, directory, data, cache_dir, record=record)
    if name == NODULE:
        segmentation = config.classifier.segmentation_path
        if segmentation is None and run.has_best(SEGMENTATION):
            segmentation = run.checkpoint(SEGMENTATION)
        return NoduleStage(config.loop, config.classifier, devices, directory, data, cache_dir,
                           segmentation_path=Path(segmentation) if segmentation else None, record=record)
    return MalignancyStage(config.loop, config.malignancy, devices, directory, data, cache_dir, record=record)


def remove_run_without_checkpoints(run_dir: Path) -> None:
    """Remove a run directory this command made when it stopped on a user error before any checkpoint.

    What a bad ``--finetune`` or ``--segmentation-path`` (read when its stage is built,
    after ``run.json``) or a broken scan left was a run of ``run.json`` alone: nothing
    to resume or diagnose with, only litter beside the real runs.
    """
    if run_dir.is_dir() and not any(run_dir.rglob("*.pt")):
        shutil.rmtree(run_dir, ignore_errors=True)


def choose_run_dir(config: TrainingConfig) -> Path:
    """``--resume`` or ``--run-dir``, else a new time-stamped directory under the runs folder."""
    if config.resume_dir:
        path = Path(config.resume_dir)
        if not path.is_dir():
            raise LunaError(f"--resume {path}: no such run directory")
        return path
    if config.run_dir:
        return Path(config.run_dir)
    stamp = time.strftime("%Y-%m-%d_%H.%M.%S")
    suffix = f"-{_slug(config.comment)}" if config.comment else ""
    return RUNS_DIR / config.tb_prefix / f"{stamp}{suffix}"


def report(results: list[StageResult], run_dir: Path) -> str:
    lines = [f"Training done. Run directory: {run_dir}"]
    for r in results:
        if r.best_score is None:
            lines.append(f"  {r.name}: no validation score")
        else:
            lines.append(f"  {r.name}: best validation {r.score_name} {r.best_score:.4f} at epoch "
                         f"{r.best_epoch}/{r.epochs} -> {r.best_path}")
    lines.append(f"TensorBoard: tensorboard --logdir {run_dir}")
    paths = {r.name: r.best_path for r in results}
    options = {SEGMENTATION: "--segmentation-path", NODULE: "--classification-path",
               MALIGNANCY: "--malignancy-path"}
    given = " ".join(f"{options[name]} {path}" for name, path in paths.items() if name in options)
    if given:
        lines.append(f"Diagnose with: {prog('diagnose')} --series-uid <uid> {given}")
    return "\n".join(lines)


def _run_info(config: TrainingConfig, devices: Devices, data_root: Path) -> dict:
    """What ``run.json`` records (`luna.runs`)."""
    return {
        "luna_version": luna.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "argv": sys.argv,
        "config": config.to_dict(),
        "split": config.split,
        "data_dir": str(data_root),
        "devices": devices.describe(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.strip())[:60]


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
