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
uses the same series the run validated on; ``provenance`` (`PROVENANCE_KEYS`: what
the models learnt from) and, once training ends, ``results`` (per stage: epochs,
best validation score and its epoch).

Provenance. Every checkpoint training writes carries the run's provenance in its
``args`` (``args["provenance"]``), besides its own ``epoch`` and ``metrics`` (best
score); `Provenance.from_checkpoint` reads it back, and `provenance_warnings` turns
it into what every diagnosis report says: models trained on phantoms (a synthetic
dataset, `luna.datadir.is_synthetic_path`) say plainly that their result means
nothing for a real CT. Checkpoints from elsewhere (the book's, older luna) say that
their provenance is unknown.

A run is *complete* (usable by the diagnosis) when its segmentation and nodule
stages have a best checkpoint; `newest_run` picks the complete run whose
``run.json`` was written last. `find_models` resolves the checkpoints the diagnosis
uses: explicit paths, else the newest complete run's — never a mix of the two.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from luna.errors import LunaError
from luna.fileio import write_atomic

__all__ = [
    "PROVENANCE_KEYS",
    "Provenance",
    "provenance_warnings",
    "read_provenance",
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
    "no trained models under {runs}: train them with `luna train` (python -m luna.training) "
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


# ------------------------------------------------------------------ provenance

PROVENANCE_KEYS = ("data_dir", "synthetic", "scans", "training_scans", "validation_scans")
"""What training records about its data (``run.json`` and every checkpoint's ``args``)."""

ROLE_NAMES = {SEGMENTATION: "segmentation", NODULE: "nodule classifier", MALIGNANCY: "malignancy classifier"}
SCORE_NAMES = {"auc": "AUC", "score": "score"}
PHANTOM_MODELS_ON_REAL_CT = (
    "the models were trained on synthetic phantoms only: this result is NOT meaningful for a real scan "
    "(train on real CTs, e.g. LUNA16, before reading anything into it)"
)


@dataclass(frozen=True)
class Provenance:
    """What one model was trained on and how well it did, as its checkpoint records it.

    ``None`` in a field: not recorded (a checkpoint from the book or an older luna).
    """

    role: str
    """``segmentation``, ``nodule`` or ``malignancy`` (`STAGES`)."""
    path: str
    data_dir: str | None = None
    synthetic: bool | None = None
    scans: int | None = None
    training_scans: int | None = None
    validation_scans: int | None = None
    epochs: int | None = None
    """Epochs trained when this checkpoint was written."""
    score_name: str | None = None
    best_score: float | None = None
    best_epoch: int | None = None
    luna_version: str | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping, path: str | Path, role: str) -> "Provenance":
        args = checkpoint.get("args") if isinstance(checkpoint.get("args"), Mapping) else {}
        recorded = args.get("provenance") if isinstance(args.get("provenance"), Mapping) else {}
        metrics = checkpoint.get("metrics") if isinstance(checkpoint.get("metrics"), Mapping) else {}
        epoch = checkpoint.get("epoch")
        score = metrics.get("best_score")
        return cls(
            role=role,
            path=str(path),
            data_dir=_typed(recorded.get("data_dir"), str),
            synthetic=_typed(recorded.get("synthetic"), bool),
            scans=_typed(recorded.get("scans"), int),
            training_scans=_typed(recorded.get("training_scans"), int),
            validation_scans=_typed(recorded.get("validation_scans"), int),
            epochs=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
            score_name=_typed(metrics.get("score_name"), str),
            best_score=float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None,
            best_epoch=_typed(metrics.get("best_epoch"), int),
            luna_version=_typed(checkpoint.get("luna_version"), str),
        )

    @property
    def recorded(self) -> bool:
        return self.synthetic is not None

    def data_text(self) -> str:
        """``synthetic phantoms (DIR, 24 scans: 21 training, 3 validation)``, or that it is unknown."""
        if not self.recorded:
            return "unknown data (the checkpoint does not record it)"
        kind = "synthetic phantoms" if self.synthetic else "real CTs"
        split = (f": {self.training_scans} training, {self.validation_scans} validation"
                 if self.training_scans is not None and self.validation_scans is not None else "")
        count = f", {self.scans} scans{split}" if self.scans is not None else ""
        return f"{kind} ({self.data_dir}{count})"

    def describe(self) -> str:
        """One line: role, data, epochs, best validation score."""
        parts = [f"{ROLE_NAMES.get(self.role, self.role)}: {self.data_text()}"]
        if self.epochs is not None:
            parts.append(f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}")
        if self.best_score is not None:
            name = SCORE_NAMES.get(self.score_name or "", self.score_name or "score")
            at = f" at epoch {self.best_epoch}" if self.best_epoch is not None else ""
            parts.append(f"best validation {name} {self.best_score:.3f}{at}")
        return ", ".join(parts)


def _typed(value, kind):
    if kind is int and isinstance(value, bool):
        return None
    return value if isinstance(value, kind) else None


def read_provenance(paths: ModelPaths) -> tuple[Provenance, ...]:
    """The provenance of each checkpoint the diagnosis uses, in pipeline order."""
    from luna.models.checkpoint import load_checkpoint  # torch: only when models are read

    roles = ((SEGMENTATION, paths.segmentation), (NODULE, paths.classification), (MALIGNANCY, paths.malignancy))
    return tuple(Provenance.from_checkpoint(load_checkpoint(path), path, role) for role, path in roles if path)


def provenance_warnings(provenance: Sequence[Provenance], ct_is_synthetic: bool | None) -> list[str]:
    """What a report must say about the models before its result: phantom-trained models on a
    real CT (the result means nothing), real-data models on a phantom, unknown provenance."""
    warnings = []
    if ct_is_synthetic is False and any(p.synthetic for p in provenance):
        warnings.append(PHANTOM_MODELS_ON_REAL_CT)
    if ct_is_synthetic and provenance and all(p.synthetic is False for p in provenance):
        warnings.append("the models were trained on real CTs and this CT is a synthetic phantom")
    unknown = [ROLE_NAMES.get(p.role, p.role) for p in provenance if not p.recorded]
    if unknown:
        warnings.append(f"what the {', '.join(unknown)} {'was' if len(unknown) == 1 else 'were'} trained on is not "
                        "recorded in the checkpoint (a file from the book or an older luna): judge the result "
                        "with that in mind")
    return warnings
