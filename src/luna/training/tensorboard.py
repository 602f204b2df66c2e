"""TensorBoard output of a training stage: one run per split, x-axis = samples seen.

A stage's directory gets ``train/`` and ``val/`` event files, so TensorBoard draws
the two splits of each curve in one chart. Per epoch and split: loss, accuracy
(all, positives, negatives), precision, recall, F1, ROC AUC; a precision-recall
curve; histograms of the predicted probability for each true class; and (validation)
a ROC figure. Only the main process (rank 0) writes; elsewhere this is a no-op.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from luna.metrics import BinaryMetrics, roc_curve

__all__ = ["StageWriter"]

_SCALARS = {
    "loss": None,
    "accuracy/all": "accuracy",
    "accuracy/pos": "accuracy_pos",
    "accuracy/neg": "accuracy_neg",
    "precision": "precision",
    "recall": "recall",
    "f1": "f1",
    "auc": "auc",
}


class StageWriter:
    def __init__(self, log_dir: Path, enabled: bool = True):
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self._writers: dict = {}

    def _writer(self, split: str):
        if split not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[split] = SummaryWriter(log_dir=str(self.log_dir / split))
        return self._writers[split]

    def log_scalars(self, split: str, samples_seen: int, values: dict[str, float]) -> None:
        if self.enabled:
            writer = self._writer(split)
            for tag, value in values.items():
                writer.add_scalar(tag, value, samples_seen)
            writer.flush()

    def log_images(self, split: str, tag: str, images: np.ndarray, samples_seen: int) -> None:
        """``images``: (N, H, W, 3) uint8 RGB."""
        if self.enabled and len(images):
            self._writer(split).add_images(tag, images, samples_seen, dataformats="NHWC")

    def log_text(self, tag: str, text: str) -> None:
        if self.enabled:
            self._writer("train").add_text(tag, text, 0)

    def log_epoch(
        self,
        split: str,
        samples_seen: int,
        loss: float,
        metrics: BinaryMetrics,
        labels: np.ndarray,
        probabilities: np.ndarray,
        *,
        roc_figure: bool = False,
    ) -> None:
        if not self.enabled:
            return
        writer = self._writer(split)
        values = metrics.as_dict()
        for tag, key in _SCALARS.items():
            writer.add_scalar(tag, loss if key is None else values[key], samples_seen)
        labels = np.asarray(labels, dtype=bool)
        probabilities = np.asarray(probabilities, dtype=np.float32)
        if labels.size:
            writer.add_pr_curve("pr", labels, probabilities, samples_seen)
        # fixed bins, so histograms of different epochs line up
        bins = np.linspace(0.0, 1.0, 51)
        for name, mask in (("pos", labels), ("neg", ~labels)):
            if mask.any():
                writer.add_histogram(f"probability/{name}", probabilities[mask], samples_seen, bins=bins)
        if roc_figure and labels.size:
            writer.add_figure("roc", _roc_figure(labels, probabilities, metrics), samples_seen)
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _roc_figure(labels: np.ndarray, probabilities: np.ndarray, metrics: BinaryMetrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(labels, probabilities)
    figure, axes = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    axes.plot(fpr, tpr, lw=2, label=f"AUC {metrics.auc:.3f}")
    axes.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    axes.scatter([1 - metrics.specificity], [metrics.recall], c="red", zorder=3, label=f"threshold {metrics.threshold:g}")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure


def overlay(hu_slice: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RGB uint8 picture of a slice: true positives green, false positives red, misses blue."""
    grey = ((np.clip(hu_slice, -1000, 1000) + 1000) / 2000 * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    for mask, colour in ((predicted & truth, (0, 255, 0)), (predicted & ~truth, (255, 0, 0)), (~predicted & truth, (0, 80, 255))):
        rgb[mask] = 0.4 * rgb[mask] + 0.6 * np.array(colour, dtype=np.float32)
    return rgb.astype(np.uint8)
