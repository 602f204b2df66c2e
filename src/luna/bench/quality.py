"""Detection quality end to end: the whole diagnosis on scans no model has seen.

``python -m luna.bench --sections quality`` diagnoses every scan of a held-out set
with the newest run's models (or ``--runs-dir``) exactly as ``luna.diagnose`` does
(segment, group, keep what is near the lungs, classify with ``--quality-views``
test-time flips, malignancy), and scores the results with
`luna.evaluate.detection.evaluate_diagnoses`: CPM with its 95% bootstrap interval,
the sensitivities at the 7 FP rates, the operating point (sensitivity and false
positives per scan of the accepted nodules), the recall of the segmentation stage
alone, and the malignancy AUC against the diameter-only AUC on the detected nodules.
On luna's own phantoms it also writes the ceiling of that comparison
(`malignancy_ceiling`): the AUC, on the same nodules, of the readers' visible score
(`luna.synth.dataset.visible_malignancy_scores`), which no model that sees only the
image can expect to beat. Beside the JSON: ``<out>.quality-froc.png`` and
``<out>.quality-results.csv`` (every detection, LUNA16 results format).

The data: by default a synthetic set generated for this benchmark alone
(`QUALITY_SEED`, never used by training, which generates with seed 0), `QUALITY_SCANS`
scans of the ``bench`` preset (512x512, 0.58-0.82 mm in-plane: real CT's grid);
``--quick`` takes fewer. With ``--data-dir`` it measures a user's own LUNA16-layout
directory: all its series, or with ``--quality-run-validation`` only the validation
series of the run whose models it uses (the split recorded in its ``run.json``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from luna.annotations import load_annotations, load_excluded, split_series
from luna.datadir import DataDir
from luna.devices import amp_dtype_for
from luna.errors import LunaError
from luna.evaluate.detection import DetectionQuality, evaluate_diagnoses
from luna.evaluate.froc import interval
from luna.evaluate.outputs import plot_froc
from luna.fileio import write_atomic
from luna.inference.classify import DEFAULT_VIEWS
from luna.inference.pipeline import diagnose, load_models
from luna.io import load_ct
from luna.io.luna16 import results_csv_text
from luna.metrics import auc_gain_draws, roc_auc
from luna.runs import Run, find_models
from luna.synth.dataset import visible_key, visible_malignancy_scores

__all__ = ["QUALITY_SCANS", "QUALITY_SEED", "bench_quality", "malignancy_ceiling", "quality_series"]

log = logging.getLogger(__name__)

QUALITY_SEED = 20261
QUALITY_SCANS = 48
"""48 bench scans hold 87 nodules (the issue asks for >= 40). Why not 24 (46 nodules): one run's
models scored CPM 0.870 (0.760-0.957) on the first 24 and 0.781 (0.66-0.91) on the next 24; on all 48
0.821 (0.743-0.901), an interval 0.16 wide instead of 0.20-0.22, for 15-16 min on 2 cores instead of 9."""
QUICK_QUALITY_SCANS = 6


def quality_series(data: DataDir, run_dir: Path | None, validation_only: bool) -> list[str]:
    """The series to diagnose: all of ``data``, or the validation split of the run."""
    if not validation_only:
        return list(data.series_uids)
    split = Run(run_dir).split() if run_dir is not None else None
    if split is None:
        raise LunaError("--quality-run-validation needs models from a training run that recorded its split "
                        "(run.json); train with python -m luna.training or drop the option")
    return split_series(data.series_uids, int(split["val_stride"]))[1]


def malignancy_ceiling(quality: DetectionQuality, visible: dict, draws: int = 1000) -> dict | None:
    """The best a malignancy model can do on the nodules ``quality`` scored, where their visible scores are known.

    ``visible``: `luna.synth.dataset.visible_malignancy_scores` of the data (empty unless luna generated
    it). Returns the AUC of the visible score on the detected rated nodules, its gain over the reference
    diameter's AUC there, and the 95% interval of that gain (a paired bootstrap over the nodules, the
    resampling of the model's own gain bound); None without visible scores or without both classes.
    On the 83 nodules of the 48 bench scans that run `12.06.02`'s models detected, the visible
    score's AUC is 0.960 against the annotated diameter's 0.953: a gain of +0.007 (-0.024..+0.042);
    on 6,000 generated nodules 0.96 against 0.93 (`luna.synth.nodules`). The readers' own noise,
    fitted to LIDC's, is what no model can learn.
    """
    arrays = quality.malignancy_arrays()
    scores = [visible.get(visible_key(a.series_uid, a.center_xyz)) for a, _ in quality.malignancy_scored]
    if arrays is None or None in scores:
        return None
    labels, _, diameter = arrays
    best = np.array(scores, dtype=np.float64)
    auc = roc_auc(labels, best)
    return {"visible_score_auc": auc, "gain_over_diameter": auc - roc_auc(labels, diameter),
            "gain_95ci": interval(auc_gain_draws(labels, best, diameter, draws=draws))}


def bench_quality(
    data: DataDir,
    uids: list[str],
    *,
    runs_dir: Path | None,
    device: torch.device,
    amp: bool,
    out: Path,
    views: int = DEFAULT_VIEWS,
    bootstrap_draws: int = 1000,
) -> dict:
    """Diagnose ``uids`` of ``data`` and score them (see the module docstring)."""
    paths = find_models(runs_dir)
    models = load_models(paths, device)
    annotations = load_annotations(data.root)
    excluded = load_excluded(data.root)
    amp_dtype = amp_dtype_for(device) if amp else None
    diagnoses, seconds = [], []
    for k, uid in enumerate(uids, 1):
        ct = load_ct(data.scan_path(uid), series_uid=uid)
        start = time.perf_counter()
        diagnoses.append(diagnose(ct, models, device=device, amp_dtype=amp_dtype, views=views))
        seconds.append(time.perf_counter() - start)
        log.info("quality: [%d/%d] %s: %d proposals, %d accepted (%.1f s)", k, len(uids), uid,
                 len(diagnoses[-1].nodules), len(diagnoses[-1].accepted), seconds[-1])
    quality = evaluate_diagnoses(diagnoses, annotations, excluded, bootstrap_draws=bootstrap_draws)
    picture = out.with_name(f"{out.stem}.quality-froc.png")
    plot_froc(quality.froc, picture)
    results = out.with_name(f"{out.stem}.quality-results.csv")
    write_atomic(results, results_csv_text(
        (d.series_uid, *n.center_xyz, n.p_nodule) for d in diagnoses for n in d.nodules))
    run = paths.run_dir
    return {
        "models": str(run) if run is not None else str(paths.segmentation),
        "trained_on": Run(run).read_info().get("data_dir") if run is not None else None,
        "data": str(data.root),
        "series": len(uids),
        "precision": "bfloat16/float16 autocast" if amp else "float32",
        "classifier_views": views,
        "diagnosis_seconds_total": sum(seconds),
        **quality.summary(),
        "malignancy_source": next((d.malignancy_source for d in diagnoses), None),
        "malignancy_ceiling": malignancy_ceiling(quality, visible_malignancy_scores(data.root), bootstrap_draws),
        "froc_picture": str(picture),
        "results_csv": str(results),
    }
