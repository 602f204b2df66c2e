"""The run-directory contract: written by training, read by the diagnosis, the bench and evaluation.

One training run is one directory::

    <runs dir>/<prefix>/<time>[-comment]/
        run.json                    what was trained, on what, how (`RunInfo` fields below)
        segmentation/ nodule/ malignancy/      one folder per stage (`STAGES`)
            train/ val/             TensorBoard events
            last.pt best.pt         checkpoints (`LAST`, `BEST`)

``run.json`` holds ``luna_version``, ``torch_version``, ``python``, ``argv``,
``config`` (the training configuration, see `luna.training.config`), ``data_dir``,
``devices``, ``started`` and ``split``: ``{"val_stride": N, "seed": S}``, the rule
that chose the validation series (every N-th series uid, sorted), so that whoever
re-runs validation — ``luna.diagnose --run-validation``, the bench, evaluation —
uses the same series the run validated on.

A run is *complete* (usable by the diagnosis) when its segmentation and nodule
stages have a best checkpoint; `newest_run` picks the complete run whose
``run.json`` was written last. `find_models` resolves the checkpoints the diagnosis
uses: explicit paths, else the newest complete run's — never a mix of the two.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from luna.errors import LunaError
from luna.fileio import write_atomic

__all__ = [
    "BEST",
    "LAST",
    "MALIGNANCY",
    "NODULE",
    "RUNS_DIR",
    "RUN_INFO",
    "SEGMENTATION",
    "STAGES",
    "ModelPaths",
    "Run",
    "find_models",
    "newest_run",
]

log = logging.getLogger(__name__)

RUNS_DIR = Path("data-unversioned/runs")
SEGMENTATION, NODULE, MALIGNANCY = "segmentation", "nodule", "malignancy"
STAGES = (SEGMENTATION, NODULE, MALIGNANCY)
"""Stage names, in pipeline order (malignancy fine-tunes what nodule trained)."""
RUN_INFO = "run.json"
BEST, LAST = "best.pt", "last.pt"

NO_MODELS_MESSAGE = (
    "no trained models under {runs}: train them with `python -m luna.training` "
    "or pass --segmentation-path and --classification-path"
)


@dataclass(frozen=True)
class Run:
    """One run directory (it need not exist yet)."""

    directory: Path

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        return self.directory / stage

    def checkpoint(self, stage: str, which: str = BEST) -> Path:
        return self.stage_dir(stage) / which

    def has_best(self, stage: str) -> bool:
        return self.checkpoint(stage).is_file()

    @property
    def complete(self) -> bool:
        """Segmentation and nodule classifier trained: enough for a diagnosis."""
        return self.has_best(SEGMENTATION) and self.has_best(NODULE)

    @property
    def info_path(self) -> Path:
        return self.directory / RUN_INFO

    def read_info(self) -> dict:
        """``run.json`` as a dict ({} when the run has none)."""
        try:
            text = self.info_path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise LunaError(f"{self.info_path}: cannot read ({err.strerror})") from None
        try:
            info = json.loads(text)
        except json.JSONDecodeError as err:
            raise LunaError(f"{self.info_path}: not valid JSON ({err.msg}, line {err.lineno}); "
                            "the run's record is damaged") from None
        if not isinstance(info, dict):
            raise LunaError(f"{self.info_path}: expected a JSON object; the run's record is damaged")
        return info

    def write_info(self, info: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.info_path, json.dumps(info, indent=2, default=str))

    def split(self) -> dict | None:
        """``{"val_stride": N, "seed": S}`` recorded by training, None for runs without one."""
        split = self.read_info().get("split")
        return split if isinstance(split, dict) and isinstance(split.get("val_stride"), int) else None


def run_dirs(runs_dir: str | Path = RUNS_DIR) -> list[Run]:
    """Complete runs under ``runs_dir`` (``<prefix>/<name>/``), oldest first by ``run.json`` time."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = {Run(p.parent.parent) for p in runs_dir.glob(f"*/*/{SEGMENTATION}/{BEST}")}

    def key(run: Run):
        info = run.info_path
        return (info.stat().st_mtime if info.is_file() else 0.0, run.directory.name)

    return sorted((r for r in found if r.complete), key=key)


def newest_run(runs_dir: str | Path = RUNS_DIR) -> Run | None:
    runs = run_dirs(runs_dir)
    return runs[-1] if runs else None


@dataclass(frozen=True)
class ModelPaths:
    """The checkpoints a diagnosis uses, and the run they came from (None: given explicitly)."""

    segmentation: Path
    classification: Path
    malignancy: Path | None = None
    run_dir: Path | None = None


def find_models(
    runs_dir: str | Path | None = None,
    *,
    segmentation_path: str | Path | None = None,
    classification_path: str | Path | None = None,
    malignancy_path: str | Path | None = None,
    malignancy: bool = True,
) -> ModelPaths:
    """The diagnosis's checkpoints: all explicit, or all from the newest complete run.

    Explicit paths are never mixed with a run's: give ``segmentation_path`` and
    ``classification_path`` together (and ``malignancy_path`` for malignancy), or
    none of them to use the newest complete run under ``runs_dir`` (its
    ``malignancy/best.pt`` when present). ``malignancy=False`` leaves the malignancy
    model out either way. Raises `LunaError` when a checkpoint is neither given nor
    found.
    """
    explicit = [p for p in (segmentation_path, classification_path) if p]
    if len(explicit) == 1:
        raise LunaError("give --segmentation-path and --classification-path together, or neither "
                        "to use the newest training run's models")
    if malignancy_path and not malignancy:
        raise LunaError("--malignancy-path given together with --no-malignancy: drop one")
    if explicit:
        paths = ModelPaths(Path(segmentation_path), Path(classification_path),
                           Path(malignancy_path) if malignancy_path else None, None)
    else:
        if malignancy_path:
            raise LunaError("--malignancy-path needs --segmentation-path and --classification-path: "
                            "explicit models are not mixed with a run's")
        runs_dir = Path(runs_dir) if runs_dir is not None else RUNS_DIR
        run = newest_run(runs_dir)
        if run is None:
            raise LunaError(NO_MODELS_MESSAGE.format(runs=runs_dir))
        mal = run.checkpoint(MALIGNANCY) if malignancy and run.has_best(MALIGNANCY) else None
        paths = ModelPaths(run.checkpoint(SEGMENTATION), run.checkpoint(NODULE), mal, run.directory)
    for p in (paths.segmentation, paths.classification, paths.malignancy):
        if p is not None and not p.is_file():
            raise LunaError(f"checkpoint not found: {p}")
    return paths
