"""The evaluation's files: the FROC curve and summary (CSV, JSON, PNG), the malignancy ROC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from luna.evaluate.froc import FROC_RATES, FrocResult, format_ci
from luna.evaluate.malignancy import MalignancyResult
from luna.fileio import replacing, write_atomic

__all__ = ["plot_froc", "plot_roc", "write_froc_outputs", "write_malignancy_outputs"]


def write_froc_outputs(result: FrocResult, out_dir, plot: bool = True) -> list[Path]:
    """``froc.csv``, ``summary.json`` and (``plot``) ``froc.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = result.curve
    lines = ["fp_per_scan,sensitivity,threshold"]
    lines += [
        f"{f:.10g},{s:.10g},{t:.10g}"
        for f, s, t in zip(curve.fp_per_scan, curve.sensitivity, curve.thresholds)
    ]
    written = [out_dir / "froc.csv", out_dir / "summary.json"]
    write_atomic(written[0], "\n".join(lines) + "\n")
    write_atomic(written[1], json.dumps(result.summary(), indent=2) + "\n")
    if plot:
        written.append(plot_froc(result, out_dir / "froc.png"))
    return written


def plot_froc(result: FrocResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result.curve
    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=100)
    # The (0, 0) start cannot sit on a log axis; the curve is drawn from its first FP.
    x, y = curve.fp_per_scan, curve.sensitivity
    positive = x > 0
    if positive.any():
        first = np.argmax(positive)
        xs = np.r_[min(FROC_RATES[0] / 2, x[first]), x[first:]]
        ys = np.r_[y[first - 1] if first > 0 else 0.0, y[first:]]
        axes.plot(xs, ys, lw=2, label=f"CPM {result.cpm:.3f}{format_ci(result.ci)}")
    else:
        axes.axhline(y[-1], lw=2, label=f"CPM {result.cpm:.3f}")
    axes.scatter(result.rates, result.sensitivities, c="red", zorder=3, label="the 7 rates")
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(result.rates), ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    axes.set(xlim=(FROC_RATES[0] / 2, FROC_RATES[-1] * 2), ylim=(0, 1.01),
             xlabel="average false positives per scan", ylabel="sensitivity")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="lower right")
    return _save(figure, path)


def plot_roc(result: MalignancyResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    axes.plot(result.fpr, result.tpr, lw=2, label=f"AUC {result.auc:.3f}{format_ci(result.ci)}")
    axes.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    for point in result.operating_points:
        axes.scatter([1 - point["specificity"]], [point["sensitivity"]], zorder=3,
                     label=f"{point['name']} (t={point['threshold']:.3g})")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right")
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    """Write a matplotlib figure atomically as PNG and free it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with replacing(path) as temporary:
        figure.savefig(temporary)
    plt.close(figure)
    return path


def write_malignancy_outputs(result: MalignancyResult, out_dir, plot: bool = True) -> list[Path]:
    """``roc.csv``, ``malignancy.json`` and (``plot``) ``roc.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "roc.csv", out_dir / "malignancy.json"]
    write_atomic(written[0], "fpr,tpr,threshold\n" + "".join(
        f"{f:.10g},{t:.10g},{h:.10g}\n" for f, t, h in zip(result.fpr, result.tpr, result.thresholds)))
    write_atomic(written[1], json.dumps(result.summary(), indent=2) + "\n")
    if plot:
        written.append(plot_roc(result, out_dir / "roc.png"))
    return written
