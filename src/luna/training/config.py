"""Training options as typed, validated records, built once from the command line.

`TrainingConfig.from_args` turns the parsed command line into frozen dataclasses;
each stage receives the parts it needs (`LoopConfig` for every stage, plus its own
`ClassifierConfig`, `MalignancyConfig` or `SegmentationConfig`), never the argparse
namespace. `TrainingConfig.to_dict` is what ``run.json`` and every checkpoint
record. Values are checked when a record is built, so a bad option is one
`LunaError` line before any run directory is made (``--lr nan``, ``--batch-size 0``,
``--num-workers -1``, ...).

Chaining stages replaces, never mutates: ``--stage all`` hands the malignancy stage
``dataclasses.replace(config.malignancy, finetune=<nodule best.pt>)``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field

from luna.cli import progress_enabled
from luna.errors import LunaError
from luna.losses import DEFAULT_FN_WEIGHT

__all__ = [
    "AUGMENTATIONS",
    "Augmentation",
    "ClassifierConfig",
    "LoopConfig",
    "MalignancyConfig",
    "SegmentationConfig",
    "TrainingConfig",
]

AUGMENTATIONS = ("flip", "offset", "scale", "rotate", "noise", "intensity", "texture", "resolution")


def _check(condition: bool, option: str, value, wanted: str) -> None:
    if not condition:
        raise LunaError(f"{option} {value!r}: must be {wanted}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class Augmentation:
    """Which augmentations run (per batch, on the device, training only)."""

    flip: bool = False
    offset: bool = False
    scale: bool = False
    rotate: bool = False
    noise: bool = False
    intensity: bool = False
    """Scanner calibration: HU gain about air and offset (`luna.data.augment`)."""
    texture: bool = False
    """CT-like correlated noise."""
    resolution: bool = False
    """Blur or sharpen in-plane (softer or sharper reconstruction kernels)."""

    def switches(self) -> dict[str, bool]:
        return asdict(self)


@dataclass(frozen=True)
class LoopConfig:
    """What every stage's epoch loop needs."""

    epochs: int = 10
    batch_size: int = 24
    num_workers: int = 2
    lr: float | None = None
    """AdamW's learning rate; None: each stage's own (`luna.training.stage.Stage.default_lr`)."""
    weight_decay: float = 1e-4
    epoch_size: int | None = None
    """Training samples per epoch; None: each stage's own (`luna.training.stage.Stage.default_epoch_size`)."""
    balanced: float = 1.0
    val_stride: int = 10
    seed: int = 0
    resume: bool = False
    progress: bool = True
    augmentation: Augmentation = field(default_factory=Augmentation)

    def __post_init__(self) -> None:
        _check(isinstance(self.epochs, int) and self.epochs >= 1, "--epochs", self.epochs, "at least 1")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "--batch-size", self.batch_size, "at least 1")
        _check(isinstance(self.num_workers, int) and self.num_workers >= 0, "--num-workers", self.num_workers,
               "0 (load in the main process) or more")
        _check(self.lr is None or (_finite(self.lr) and self.lr > 0), "--lr", self.lr,
               "a positive finite number, e.g. 3e-4")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay", self.weight_decay,
               "a finite number >= 0")
        _check(self.epoch_size is None or (isinstance(self.epoch_size, int) and self.epoch_size >= 0),
               "--epoch-size", self.epoch_size,
               "0 (each positive about once) or more")
        _check(_finite(self.balanced) and self.balanced >= 0, "--balanced", self.balanced,
               "a finite ratio >= 0 (0: unbalanced)")
        _check(isinstance(self.val_stride, int) and self.val_stride >= 2, "--val-stride", self.val_stride,
               "at least 2 (every N-th series validates)")


@dataclass(frozen=True)
class ClassifierConfig:
    """The nodule classifier: its registered architecture and size, and the operating threshold."""

    model: str = "ResidualClassifier"
    width: int = 8
    depth: int = 4
    threshold: float = 0.5
    hard_negatives: float = 0.5
    """Share of each epoch's negatives drawn from the segmentation's false proposals."""
    tubes: float = 0.5
    """Share of training chunks given a straight tube distractor (`luna.data.tubes`); 0: none. With generator
    5's phantoms 0.5 took another generator's CPM from 0.380 to 0.558 and the accepted structures besides the
    nodule on the real LIDC-IDRI-0001 slab from 7 to 0, for 0.808 -> 0.795 on luna's held-out set (README
    Quality)."""
    segmentation_path: str | None = None
    """The segmentation model whose proposals the stage trains and validates on (default: the run's)."""

    def __post_init__(self) -> None:
        _check(_finite(self.hard_negatives) and 0 <= self.hard_negatives <= 1, "--hard-negatives",
               self.hard_negatives, "a share between 0 and 1")
        _check(_finite(self.tubes) and 0 <= self.tubes <= 1, "--tubes", self.tubes, "a share between 0 and 1")
        _check(isinstance(self.width, int) and self.width >= 1, "--width", self.width, "at least 1")
        _check(isinstance(self.depth, int) and self.depth >= 1, "--depth", self.depth, "at least 1")
        _check(_finite(self.threshold) and 0 < self.threshold < 1, "--threshold", self.threshold,
               "between 0 and 1 (exclusive)")

    def build_model(self):
        """A fresh classifier of the registered ``model``, at ``width`` and ``depth`` (what the nodule stage trains)."""
        from luna.models import build_model, models_of_kind

        if self.model not in models_of_kind("classifier"):
            raise LunaError(f"--model {self.model}: not a registered classifier; choose one of "
                            f"{', '.join(models_of_kind('classifier'))}")
        return build_model(self.model, {"width": self.width, "depth": self.depth}, source=f"--model {self.model}")


@dataclass(frozen=True)
class MalignancyConfig:
    """The malignancy classifier: which nodule classifier it starts from, how much it trains."""

    finetune: str | None = None
    finetune_depth: int = 2

    def __post_init__(self) -> None:
        _check(isinstance(self.finetune_depth, int) and self.finetune_depth >= 1, "--finetune-depth",
               self.finetune_depth, "at least 1 (1: the head only)")


@dataclass(frozen=True)
class SegmentationConfig:
    """The segmentation UNet and how its checkpoints are scored."""

    context_slices: int = 3
    depth: int = 3
    width: int = 4
    fn_weight: float = DEFAULT_FN_WEIGHT
    fp_bound: float = 100.0
    """False-positive detections per validation scan the operating threshold may give (`choose_threshold`)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.context_slices, int) and self.context_slices >= 0, "--context-slices",
               self.context_slices, "0 or more")
        _check(isinstance(self.depth, int) and self.depth >= 1, "--seg-depth", self.depth, "at least 1")
        _check(isinstance(self.width, int) and 0 <= self.width <= 10, "--seg-width", self.width, "between 0 and 10")
        _check(_finite(self.fn_weight) and self.fn_weight >= 0, "--fn-weight", self.fn_weight, "a finite number >= 0")
        _check(_finite(self.fp_bound) and self.fp_bound > 0, "--fp-bound", self.fp_bound, "a positive finite number")


@dataclass(frozen=True)
class TrainingConfig:
    """Everything one ``python -m luna.training`` run was asked to do."""

    stage: str = "all"
    loop: LoopConfig = field(default_factory=LoopConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    malignancy: MalignancyConfig = field(default_factory=MalignancyConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    data_dir: str | None = None
    cache_dir: str | None = None
    run_dir: str | None = None
    resume_dir: str | None = None
    tb_prefix: str = "luna"
    comment: str = ""
    device: str | None = None
    amp: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainingConfig":
        augmentation = Augmentation(**{k: bool(args.augment or getattr(args, f"augment_{k}")) for k in AUGMENTATIONS})
        loop = LoopConfig(
            epochs=args.epochs, batch_size=args.batch_size, num_workers=args.num_workers, lr=args.lr,
            weight_decay=args.weight_decay, epoch_size=args.epoch_size, balanced=args.balanced,
            val_stride=args.val_stride, seed=args.seed, resume=bool(args.resume), progress=progress_enabled(args),
            augmentation=augmentation,
        )
        return cls(
            stage=args.stage,
            loop=loop,
            classifier=ClassifierConfig(model=args.model, width=args.width, depth=args.depth, threshold=args.threshold,
                                        hard_negatives=args.hard_negatives, tubes=args.tubes,
                                        segmentation_path=args.segmentation_path),
            malignancy=MalignancyConfig(finetune=args.finetune, finetune_depth=args.finetune_depth),
            segmentation=SegmentationConfig(context_slices=args.context_slices, depth=args.seg_depth,
                                            width=args.seg_width, fn_weight=args.fn_weight, fp_bound=args.fp_bound),
            data_dir=args.data_dir, cache_dir=args.cache_dir, run_dir=args.run_dir, resume_dir=args.resume,
            tb_prefix=args.tb_prefix, comment=args.comment, device=args.device, amp=args.amp,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def split(self) -> dict:
        """The validation split rule, as ``run.json`` records it (`luna.runs`)."""
        return {"val_stride": self.loop.val_stride, "seed": self.loop.seed}


