"""Tests aimed at plausible wrong programs that a suite can otherwise miss: each one
fails on a named deliberate bug (in the docstring), checked by making that bug.

(The diagnosis's own wrong programs -- p(non-nodule) read as p(nodule), every
detection classified on one chunk, malignancy rated on rejected detections -- are
caught by `test_pipeline_known`; a resumed run forgetting its best score by
`test_faults.test_a_resumed_run_keeps_its_best_score`.)
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from luna.annotations import Annotation
from luna.devices import Devices
from luna.evaluate.froc import evaluate_froc
from luna.evaluate.malignancy import malignancy_roc
from luna.io.luna16 import Results
from luna.models import NoduleClassifier
from luna.training.config import LoopConfig
from luna.training.stage import Stage

# ----------------------------------------------------------------- DDP


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return NoduleClassifier(width=2, depth=2, chunk_shape=(8, 8, 8)).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return 300 * torch.randn(4, 1, 8, 8, 8, generator=generator), torch.tensor([0, 1, 1, 0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_step(rank: int, world_size: int, port: int, out: str) -> None:
    """One training step of `Stage.optimizer_step` on this rank's half of the batch, under DDP (gloo).

    Leaves the group as `luna.training.app.main` does: after the stage (and its DDP
    wrapper) is gone, when the ``with Devices`` block ends.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    with Devices.setup("cpu") as devices:
        _step_and_save(devices, rank, Path(out))


def _step_and_save(devices: Devices, rank: int, out: Path) -> None:
    stage = Stage(LoopConfig(num_workers=0, progress=False), devices, out)
    stage.model = devices.wrap(_model())
    stage.optimizer = torch.optim.SGD(stage.model.parameters(), lr=0.1)
    chunks, labels = _batch()
    half = slice(2 * rank, 2 * rank + 2)
    stage.optimizer_step(F.cross_entropy(stage.model(chunks[half]), labels[half]))
    model = stage.bare_model
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "state": model.state_dict()},
               out / f"rank{rank}.pt")


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    _ddp_step(rank, world_size, port, out)


def test_ddp_gradients_are_synchronised_and_equal_single_process_training(tmp_path):
    """Wrong program: DDP without gradient synchronisation (no DDP wrapper, or ``no_sync``).

    Two gloo ranks each take half of a batch; after one step their gradients must be
    equal to each other and to one process's on the whole batch (mean loss over equal
    halves). Batch norm runs on its running statistics (eval mode): with batch
    statistics each rank would normalise by its own half, which is DDP's documented
    behaviour without SyncBatchNorm, not a synchronisation bug.
    """
    import torch.multiprocessing as mp

    # spawned, not forked: a child forked from a process whose torch thread pools are
    # running can deadlock in them (seen in a fresh clone's test run)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    single = _model()
    optimizer = torch.optim.SGD(single.parameters(), lr=0.1)
    chunks, labels = _batch()
    F.cross_entropy(single(chunks), labels).backward()
    optimizer.step()
    for name, p in single.named_parameters():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        torch.testing.assert_close(ranks[0]["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ranks[1]["state"][name], value, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------- evaluation


def _detection_study(rng: np.random.Generator, scans: int, sensitivity: float):
    """One nodule per scan, found with probability ``sensitivity`` at a score above three
    false positives per scan: every FROC point, hence the CPM, is the fraction found,
    whose true value is ``sensitivity``. Returns (results, annotations, scans, found)."""
    uids, xyz, probabilities, annotations, found = [], [], [], [], 0
    for s in range(scans):
        uid = f"1.2.{s}"
        annotations.append(Annotation(uid, (0.0, 0.0, 0.0), 10.0))
        if rng.random() < sensitivity:
            found += 1
            uids.append(uid)
            xyz.append((0.0, 0.0, 0.0))
            probabilities.append(rng.uniform(0.5, 1.0))
        for k in range(3):
            uids.append(uid)
            xyz.append((100.0 + 30.0 * k, 0.0, 0.0))
            probabilities.append(rng.uniform(0.0, 0.1))
    results = Results(uids, np.array(xyz), np.array(probabilities))
    return results, annotations, [a.series_uid for a in annotations], found


def test_the_cpm_bootstrap_interval_covers_the_true_value_95_percent_of_the_time():
    """Wrong program: a bootstrap interval at the 25/75 percentiles instead of 2.5/97.5.

    100 independent studies of 50 scans with a known CPM (0.7): a 95% interval must
    hold the true value in about 95 of them (measured: 95); a 50% interval holds it
    in about half.
    """
    rng = np.random.default_rng(2)
    covered = 0
    for study in range(100):
        results, annotations, scans, found = _detection_study(rng, scans=50, sensitivity=0.7)
        froc = evaluate_froc(results, annotations, (), scans, bootstrap_draws=300, seed=study)
        assert froc.cpm == pytest.approx(found / 50)
        covered += froc.ci[0] <= 0.7 <= froc.ci[1]
    assert 88 <= covered <= 99


def test_the_malignancy_operating_point_is_youdens():
    """Wrong program: the operating point chosen by argmax(TPR) instead of max(TPR - FPR).

    Threshold by threshold (p >= t), TPR - FPR is largest (0.8) only at t = 0.6:
    sensitivity 4/5, specificity 5/5. argmax(TPR) would take t = 0.35 (TPR 1, FPR 0.4).
    """
    negatives = [0.1, 0.2, 0.3, 0.4, 0.55]
    positives = [0.35, 0.6, 0.7, 0.8, 0.9]
    labels = [0] * 5 + [1] * 5
    result = malignancy_roc(labels, negatives + positives, draws=0)
    youden = next(p for p in result.operating_points if p["name"] == "youden")
    assert youden["threshold"] == pytest.approx(0.6)
    assert (youden["sensitivity"], youden["specificity"]) == (pytest.approx(0.8), pytest.approx(1.0))
    assert (youden["tp"], youden["fp"], youden["tn"], youden["fn"]) == (4, 0, 5, 1)
