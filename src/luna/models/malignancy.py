"""The malignancy classifier: the fine-tuned nodule CNN plus what it can measure of the nodule.

The book's malignancy model (the nodule classifier fine-tuned on annotated nodules)
did not beat the nodule's diameter alone, and neither did ours: on the demo
validation nodules its ROC AUC was 0.50-0.55 against 0.79 for the diameter. Size is
the strongest single predictor of malignancy (LIDC readers rated large nodules
malignant), and density tells calcified (benign) from part-solid ones — both are
easy to measure and slow for a small CNN to learn from a few hundred nodules.

`SizeAwareClassifier` therefore gives its head, beside the CNN's logit, the nodule's
measures taken from the same chunk (`chunk_measures`, fixed functions, nothing
learned): the share of dense voxels (> -400 HU) in balls of 2 to 12 voxels around the
centre (a radial profile: its fall-off is the nodule's size), the share of
calcified voxels (> 200 HU) within 4 voxels, and the mean HU within 2 voxels. The
head is a linear layer on those inputs, trained with the CNN's fine-tuned sections.
It is a chunk classifier like any other (kind ``"classifier"``, logits ``(N, 2)``), so
the diagnosis runs it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from luna.models.registry import (
    POSITIVE_CLASS,
    build_model,
    check_kind,
    models_of_kind,
    register_model,
    registered_models,
    spec_for_class,
)

__all__ = ["MEASURE_NAMES", "DiameterRule", "SizeAwareClassifier", "chunk_measures", "why_diameter_instead"]

DENSE_HU = -400.0
CALCIFIED_HU = 200.0
RADII_VOXELS = (2, 3, 4, 6, 8, 12)
MEASURE_NAMES = (*(f"dense_within_{r}" for r in RADII_VOXELS), "calcified_within_4", "mean_hu_within_2")


def _balls(shape: Sequence[int]) -> torch.Tensor:
    """(len(RADII) + 2, 1, D, H, W) float masks, each normalised to sum 1: the balls the measures average over.

    Rank 5, like a batch of chunks, so that the model can move to channels-last 3D as a whole."""
    grids = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) - s // 2 for s in shape), indexing="ij")
    distance = torch.sqrt(sum(g * g for g in grids))
    masks = [distance <= r for r in (*RADII_VOXELS, 4, 2)]
    return torch.stack([m.float() / m.sum() for m in masks]).unsqueeze(1)


def chunk_measures(chunks: torch.Tensor, balls: torch.Tensor | None = None) -> torch.Tensor:
    """(N, len(MEASURE_NAMES)) measures of HU chunks (N, 1, D, H, W) centred on the nodule (module docstring)."""
    if balls is None:
        balls = _balls(chunks.shape[2:]).to(chunks.device)
    x = chunks[:, 0].float()
    dense = (x > DENSE_HU).float()
    calcified = (x > CALCIFIED_HU).float()
    n = len(RADII_VOXELS)
    flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
    b = balls.reshape(balls.shape[0], -1)
    profile = flat(dense) @ b[:n].T
    calc = flat(calcified) @ b[n : n + 1].T
    mean_hu = flat(x) @ b[n + 1 :].T / 1000.0
    return torch.cat([profile, calc, mean_hu], dim=1)


class SizeAwareClassifier(nn.Module):
    """A chunk classifier whose head also sees the nodule's measures (see the module docstring).

    Args:
        base: the registered classifier inside (``cnn``), e.g. ``"NoduleClassifier"``;
        base_args: its constructor arguments (``model_args``).
    """

    def __init__(self, base: str = "NoduleClassifier", base_args: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.cnn = build_model(base, base_args, source=f"SizeAwareClassifier base {base}")
        check_kind(self.cnn, "classifier", f"SizeAwareClassifier base {base}", "classifier")
        self.model_args = {"base": base, "base_args": dict(self.cnn.model_args)}
        self.chunk_shape = self.cnn.chunk_shape
        self.depth = self.cnn.depth
        self.head = nn.Linear(1 + len(MEASURE_NAMES), 2)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():  # start as the CNN alone: logit difference passed through
            self.head.weight[POSITIVE_CLASS, 0] = 1.0
        self.register_buffer("balls", _balls(self.chunk_shape), persistent=False)

    @classmethod
    def from_classifier(cls, cnn: nn.Module) -> "SizeAwareClassifier":
        """Wrap a trained classifier (its weights are kept); the head starts as the CNN alone."""
        spec = spec_for_class(type(cnn))
        if spec is None:
            raise ValueError(f"{type(cnn).__name__} is not a registered model")
        model = cls(base=spec.name, base_args=cnn.model_args)
        model.cnn.load_state_dict(cnn.state_dict())
        return model

    @classmethod
    def args_from_state_dict(cls, state_dict: Mapping[str, Any]) -> dict | None:
        if "head.weight" not in state_dict or tuple(state_dict["head.weight"].shape) != (2, 1 + len(MEASURE_NAMES)):
            return None
        inner = {k.removeprefix("cnn."): v for k, v in state_dict.items() if k.startswith("cnn.")}
        for name in models_of_kind("classifier"):
            spec = registered_models()[name]
            if spec.cls is not cls and spec.infer_args is not None:
                args = spec.infer_args(inner)
                if args is not None:
                    return {"base": name, "base_args": args}
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.cnn(x).float()
        difference = (logits[:, POSITIVE_CLASS] - logits[:, 1 - POSITIVE_CLASS]).unsqueeze(1)
        return self.head(torch.cat([difference, chunk_measures(x, self.balls)], dim=1))

    # --- fine-tuning: the CNN's sections, the head always trained -------------------

    def freeze_for_finetuning(self, finetune_depth: int) -> list[nn.Parameter]:
        return [*self.cnn.freeze_for_finetuning(finetune_depth), *self.head.parameters()]

    @property
    def frozen_sections(self) -> tuple[str, ...]:
        return self.cnn.frozen_sections


register_model(
    "SizeAwareClassifier",
    SizeAwareClassifier,
    kind="classifier",
    infer_args=SizeAwareClassifier.args_from_state_dict,
)


@dataclass(frozen=True)
class DiameterRule:
    """p(malignant) from the nodule's diameter alone: ``sigmoid(slope_per_mm * (diameter_mm - midpoint_mm))``.

    The baseline a malignancy model has to beat. The malignancy stage fits it to its
    training nodules (`fit`: logistic regression on the annotated diameters) and stores
    it in its checkpoints (``"diameter_rule"``) with the best epoch's validation AUCs of
    the model and of the diameter. When the model did not beat the diameter there
    (`why_diameter_instead`), the diagnosis gives this rule's p(malignant), applied to
    each detection's measured diameter, and says so (`luna.inference.pipeline.load_models`).
    """

    slope_per_mm: float
    midpoint_mm: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.slope_per_mm) and self.slope_per_mm > 0 and np.isfinite(self.midpoint_mm)):
            raise ValueError(f"a diameter rule needs a finite positive slope and a finite midpoint, got "
                             f"{self.slope_per_mm!r} per mm about {self.midpoint_mm!r} mm")

    def probability(self, diameter_mm: np.ndarray | Sequence[float] | float) -> np.ndarray:
        d = np.asarray(diameter_mm, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-self.slope_per_mm * (d - self.midpoint_mm)))

    @classmethod
    def fit(cls, diameter_mm: Sequence[float], malignant: Sequence[int], *, ridge: float = 1e-2) -> "DiameterRule | None":
        """Logistic regression of ``malignant`` (0/1) on the diameter (Newton steps, a small ridge on the slope so
        that perfectly separated sizes give a steep finite rule); None without both classes."""
        d = np.asarray(diameter_mm, dtype=np.float64)
        y = np.asarray(malignant, dtype=np.float64)
        if d.size == 0 or y.min() == y.max() or not np.isfinite(d).all():
            return None
        scale = d.std() or 1.0
        x = np.stack([(d - d.mean()) / scale, np.ones_like(d)], axis=1)
        w = np.zeros(2)
        penalty = np.diag([ridge, 0.0])
        for _ in range(50):
            p = 1.0 / (1.0 + np.exp(-x @ w))
            gradient = x.T @ (p - y) + penalty @ w
            hessian = x.T @ (x * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(2)
            step = np.linalg.solve(hessian, gradient)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        slope = w[0] / scale
        if not slope > 0:  # larger not more malignant on these nodules: no rule worth giving
            return None
        return cls(float(slope), float(d.mean() - w[1] / w[0] * scale))


def why_diameter_instead(val: Mapping[str, Any]) -> str | None:
    """Why the diagnosis should give the `DiameterRule` instead of the malignancy model, from the validation
    metrics the malignancy stage stores with its best epoch; None when the model is to be used.

    The model has to beat the diameter beyond chance: the one-sided 95% lower bound of
    its AUC gain over the diameter (``auc_gain_low``, a paired bootstrap over the
    validation nodules, `luna.metrics.auc_gain_lower_bound`) must be above 0. Against
    the plain comparison of the two AUCs: on the 12 validation nodules (2 malignant) of
    the demo data, the model "won" 1.0 to 0.85 and then lost 0.755 to 0.853 on the 35
    held-out bench nodules, where the rule on the measured diameters gave 0.801.
    Checkpoints without the bound (older ones) compare the AUCs. A NaN (one class in
    validation: no evidence either way) keeps the model.
    """
    auc, baseline, gain_low = (val.get(k) for k in ("auc", "diameter_auc", "auc_gain_low"))
    if not isinstance(auc, (int, float)) or not isinstance(baseline, (int, float)):
        return None
    if isinstance(gain_low, (int, float)) and np.isfinite(gain_low):
        if gain_low > 0:
            return None
        return (f"the nodule diameter (validation AUC {baseline:.3f}): the malignancy model ({auc:.3f}) did not "
                f"beat it beyond chance in its training (95% lower bound of the gain {gain_low:+.3f})")
    if not auc < baseline:  # NaN compares False: the model stays
        return None
    return f"the nodule diameter (validation AUC {baseline:.3f}), which beat the malignancy model ({auc:.3f}) in its training"
