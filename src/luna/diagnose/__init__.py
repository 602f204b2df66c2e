"""Diagnose one CT: segment it, group the blobs into nodules, classify them, give a verdict.

``python -m luna.diagnose`` (see `luna.diagnose.__main__`) is the command; this module
is the pipeline it and ``--run-validation`` share:

1. `segment_ct` (2D UNet over every axial slice, batched) -> probability volume;
2. `group_detections` -> one `Detection` per connected blob;
3. the nodule classifier on every detection's 32x48x48 chunk (crops gathered into
   one preallocated float32 batch, ``batch_size`` at a time, channels-last 3D);
4. the malignancy classifier on the *accepted* detections only
   (``p_nodule >= nodule_threshold``);
5. the verdict (`verdict`): the highest p(malignant) over accepted nodules against
   ``malignancy_threshold``.

The CT is loaded once by the caller; `diagnose` never reads files. Models are found
by `find_models` (best checkpoints of the newest training run) unless given.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from luna.ct import CHUNK_SHAPE, Ct
from luna.detection import Detection, group_detections
from luna.errors import LunaError
from luna.models import POSITIVE_CLASS, build_model_from_checkpoint
from luna.segmentation import segment_ct

__all__ = [
    "DEFAULT_MALIGNANCY_THRESHOLD",
    "DEFAULT_NODULE_THRESHOLD",
    "Diagnosis",
    "Models",
    "ModelPaths",
    "Nodule",
    "classify_chunks",
    "diagnose",
    "find_models",
    "load_models",
    "verdict",
]

log = logging.getLogger(__name__)

DEFAULT_NODULE_THRESHOLD = 0.5
DEFAULT_MALIGNANCY_THRESHOLD = 0.5
DEFAULT_SEGMENTATION_THRESHOLD = 0.5

NO_MODELS_MESSAGE = (
    "no trained models under {runs}: train them with `python -m luna.training` "
    "or pass --segmentation-path/--classification-path"
)


@dataclass(frozen=True)
class Nodule:
    """One classified detection. ``p_malignant`` is None when not assessed."""

    center_xyz: tuple[float, float, float]
    center_irc: tuple[float, float, float]
    diameter_mm: float
    p_nodule: float
    p_malignant: float | None
    accepted: bool
    """``p_nodule >= nodule_threshold``: reported in the table and the verdict."""
    max_probability: float = 0.0
    """Highest segmentation probability in the blob."""


@dataclass(frozen=True)
class Diagnosis:
    """What `diagnose` found in one CT."""

    series_uid: str
    nodules: tuple[Nodule, ...]
    """Every classified detection, accepted or not, in the order of `group_detections`."""
    verdict: str
    malignancy_assessed: bool
    timings: dict = field(default_factory=dict)
    """Seconds per step: segmentation, grouping, classification, malignancy."""

    @property
    def accepted(self) -> tuple[Nodule, ...]:
        return tuple(n for n in self.nodules if n.accepted)


@dataclass(frozen=True)
class ModelPaths:
    segmentation: Path
    classification: Path
    malignancy: Path | None = None
    run_dir: Path | None = None


@dataclass
class Models:
    """The loaded networks (eval mode, on ``device``) and where they came from (None: not from files)."""

    segmentation: torch.nn.Module
    classification: torch.nn.Module
    malignancy: torch.nn.Module | None
    paths: ModelPaths | None = None


def verdict(
    nodules: Sequence[Nodule],
    *,
    malignancy_assessed: bool,
    malignancy_threshold: float = DEFAULT_MALIGNANCY_THRESHOLD,
) -> str:
    """The patient verdict from the classified nodules (only accepted ones count)."""
    accepted = [n for n in nodules if n.accepted]
    if not accepted:
        return "no nodule found"
    if not malignancy_assessed:
        return f"{len(accepted)} nodule(s) found; malignancy not assessed (no malignancy model)"
    scores = [n.p_malignant for n in accepted if n.p_malignant is not None]
    top = max(scores) if scores else 0.0
    if top >= malignancy_threshold:
        return f"malignant nodule suspected (p={top:.2f})"
    return "nodules found, none suspected malignant"


# ---------------------------------------------------------------------- models


def _run_dirs(runs_dir: Path) -> list[Path]:
    found = [p.parent.parent for p in runs_dir.glob("*/*/segmentation/best.pt")]
    found = [d for d in found if (d / "nodule" / "best.pt").is_file()]

    def key(d: Path):
        info = d / "run.json"
        return (info.stat().st_mtime if info.is_file() else 0.0, d.name)

    return sorted(set(found), key=key)


def find_models(
    runs_dir: str | Path | None = None,
    *,
    segmentation_path: str | Path | None = None,
    classification_path: str | Path | None = None,
    malignancy_path: str | Path | None = None,
) -> ModelPaths:
    """Checkpoint paths: explicit ones, the rest from the newest complete run under ``runs_dir``.

    A run is complete when it has ``segmentation/best.pt`` and ``nodule/best.pt``;
    its ``malignancy/best.pt`` is used when present. Raises `LunaError` when a
    needed checkpoint is neither given nor found.
    """
    from luna.training.app import RUNS_DIR

    runs_dir = Path(runs_dir) if runs_dir is not None else RUNS_DIR
    run_dir = None
    if segmentation_path is None or classification_path is None or malignancy_path is None:
        runs = _run_dirs(runs_dir) if runs_dir.is_dir() else []
        run_dir = runs[-1] if runs else None
    if run_dir is None and (segmentation_path is None or classification_path is None):
        raise LunaError(NO_MODELS_MESSAGE.format(runs=runs_dir))
    seg = Path(segmentation_path) if segmentation_path else run_dir / "segmentation" / "best.pt"
    cls = Path(classification_path) if classification_path else run_dir / "nodule" / "best.pt"
    if malignancy_path:
        mal = Path(malignancy_path)
    elif run_dir is not None and (run_dir / "malignancy" / "best.pt").is_file():
        mal = run_dir / "malignancy" / "best.pt"
    else:
        mal = None
    for p in (seg, cls, mal):
        if p is not None and not p.is_file():
            raise LunaError(f"checkpoint not found: {p}")
    used_run = run_dir if (segmentation_path is None or classification_path is None) else None
    return ModelPaths(seg, cls, mal, used_run)


def load_models(paths: ModelPaths, device: torch.device | str = "cpu") -> Models:
    """Build the networks from their checkpoints, in eval mode on ``device``."""

    def load(p: Path | None) -> torch.nn.Module | None:
        if p is None:
            return None
        model = build_model_from_checkpoint(p, map_location="cpu")
        return model.eval().to(device)

    return Models(load(paths.segmentation), load(paths.classification), load(paths.malignancy), paths)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise LunaError(f"unknown device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LunaError("--device cuda given but CUDA is not available: use --device cpu")
    return device


# ---------------------------------------------------------------------- pipeline


def classify_chunks(
    model: torch.nn.Module,
    ct: Ct,
    centers_xyz: Sequence[Sequence[float]],
    *,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """p(positive class) for the chunk around each centre (float64, one per centre).

    ``batch_size``: chunks per forward pass, by default 4 on the CPU and 32 on CUDA.
    On the CPU small batches are both faster and far lighter (measured on 192 chunks:
    92 chunks/s and +23 MiB with 4, 79/s and +358 MiB with 32).
    """
    n = len(centers_xyz)
    out = np.zeros(n, dtype=np.float64)
    if n == 0:
        return out
    device = torch.device(device)
    if batch_size is None:
        batch_size = 32 if device.type == "cuda" else 4
    shape = tuple(getattr(model, "chunk_shape", CHUNK_SHAPE))
    size = min(batch_size, n)
    buffer = torch.empty((size, 1, *shape), dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        for start in range(0, n, size):
            stop = min(start + size, n)
            for k in range(start, stop):
                buffer[k - start, 0] = torch.from_numpy(ct.crop(centers_xyz[k], shape))
            batch = buffer[: stop - start].to(device, non_blocking=True)
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(batch)
            out[start:stop] = torch.softmax(logits.float(), dim=1)[:, POSITIVE_CLASS].cpu().numpy()
    return out


def diagnose(
    ct: Ct,
    models: Models,
    *,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    segmentation_batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    segmentation_threshold: float = DEFAULT_SEGMENTATION_THRESHOLD,
    nodule_threshold: float = DEFAULT_NODULE_THRESHOLD,
    malignancy_threshold: float = DEFAULT_MALIGNANCY_THRESHOLD,
    keep_probabilities: bool = False,
) -> Diagnosis | tuple[Diagnosis, np.ndarray]:
    """Run the whole pipeline on one CT (see the module docstring).

    With ``keep_probabilities`` returns ``(diagnosis, probability volume)`` so the
    caller can save the mask without segmenting twice.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    probabilities = segment_ct(
        models.segmentation, ct, device=device, batch_size=segmentation_batch_size, amp_dtype=amp_dtype
    )
    timings["segmentation"] = time.perf_counter() - t

    t = time.perf_counter()
    detections: list[Detection] = group_detections(probabilities, ct, threshold=segmentation_threshold)
    timings["grouping"] = time.perf_counter() - t

    t = time.perf_counter()
    centers = [d.center_xyz for d in detections]
    p_nodule = classify_chunks(
        models.classification, ct, centers, device=device, batch_size=batch_size, amp_dtype=amp_dtype
    )
    timings["classification"] = time.perf_counter() - t

    t = time.perf_counter()
    accepted = p_nodule >= nodule_threshold
    p_malignant: list[float | None] = [None] * len(detections)
    if models.malignancy is not None and accepted.any():
        idx = np.flatnonzero(accepted)
        scores = classify_chunks(
            models.malignancy, ct, [centers[i] for i in idx],
            device=device, batch_size=batch_size, amp_dtype=amp_dtype,
        )
        for i, s in zip(idx, scores):
            p_malignant[i] = float(s)
    timings["malignancy"] = time.perf_counter() - t

    nodules = tuple(
        Nodule(
            center_xyz=tuple(float(v) for v in d.center_xyz),
            center_irc=tuple(float(v) for v in d.center_irc),
            diameter_mm=float(d.diameter_mm),
            p_nodule=float(p_nodule[k]),
            p_malignant=p_malignant[k],
            accepted=bool(accepted[k]),
            max_probability=float(d.max_probability),
        )
        for k, d in enumerate(detections)
    )
    assessed = models.malignancy is not None
    result = Diagnosis(
        series_uid=ct.series_uid,
        nodules=nodules,
        verdict=verdict(nodules, malignancy_assessed=assessed, malignancy_threshold=malignancy_threshold),
        malignancy_assessed=assessed,
        timings=timings,
    )
    if keep_probabilities:
        return result, probabilities
    return result
