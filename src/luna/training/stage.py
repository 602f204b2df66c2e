"""What every training stage shares: the epoch loop, checkpoints, resume, summaries.

A stage (nodule classifier, malignancy classifier, segmentation) subclasses `Stage`
and provides the model, optimizer, scheduler and two methods, `train_epoch` and
`validate`, each returning an `EpochResult`. `Stage.run` does the rest:

- epochs ``start .. loop.epochs``; after each, a one-line summary per split, the
  ``last`` checkpoint, and ``best`` when the validation score improved (the score is
  the stage's `score_name` metric, higher is better; an equal score at a lower
  validation loss is an improvement too);
- ``--resume``: the stage continues from its ``last.pt`` — model, optimizer,
  scheduler, epoch, samples seen and best score — and, since the sampler and the
  augmentation are seeded from (seed, epoch), it draws exactly what an
  uninterrupted run would have drawn;
- only the main process (rank 0 under torchrun) prints, writes TensorBoard events
  and checkpoints.

Checkpoints survive a kill at any moment. Each file is replaced atomically, and
``last.pt`` is written before ``best.pt``, recording the best epoch and score: a run
killed between the two writes (or stopped by a full disk) leaves a ``last.pt`` that
names itself as best, and the resumed run rebuilds ``best.pt`` from it (the payload
is the same). ``best.pt`` therefore always holds the epoch ``last.pt`` names as
best, and a resumed run keeps that score: a worse epoch never replaces it. The
temporary files of a killed write are removed when the stage starts again
(`luna.fileio.remove_stale_temporaries`).

Weights that turn NaN or infinite (training diverged) stop the stage with a
`LunaError` before they are saved, so ``last.pt`` keeps the previous epoch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from luna.data import worker_error
from luna.devices import Devices
from luna.errors import LunaError
from luna.fileio import remove_stale_temporaries
from luna.models.checkpoint import (
    load_checkpoint,
    load_model_state,
    make_checkpoint,
    model_state_from_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from luna.training.config import LoopConfig
from luna.training.tensorboard import StageWriter

__all__ = ["EpochResult", "Stage", "StageResult"]

log = logging.getLogger(__name__)


@dataclass
class EpochResult:
    """One split's epoch: its loss, its metrics (flat name -> number) and speed."""

    loss: float
    metrics: dict[str, float]
    samples: int
    seconds: float
    data_wait: float = 0.0
    """Share of the epoch's wall time spent waiting for the DataLoader."""

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            **self.metrics,
            "samples": self.samples,
            "samples_per_second": self.samples_per_second,
            "data_wait": self.data_wait,
        }


@dataclass
class StageResult:
    name: str
    score_name: str
    best_score: float | None
    best_epoch: int | None
    epochs: int
    directory: Path
    history: list[dict] = field(default_factory=list)

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"


class Stage:
    """Base of the training stages; see the module docstring."""

    name = "stage"
    score_name = "auc"
    default_lr = 3e-4
    """AdamW's learning rate when ``--lr`` is not given (cosine decay over the epochs)."""
    default_epoch_size = 2048
    """Training samples per epoch when ``--epoch-size`` is not given."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def __init__(self, loop: LoopConfig, devices: Devices, directory: Path, record: dict | None = None):
        """``loop``: the epoch loop's options; ``record``: the run's configuration, kept in every checkpoint."""
        self.loop = loop
        self.record = dict(record or {})
        self.devices = devices
        self.directory = Path(directory)
        self.samples_seen = 0
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_loss: float | None = None
        self.scaler = devices.grad_scaler()
        self.writer = StageWriter(self.directory, enabled=devices.is_main)

    @property
    def lr(self) -> float:
        """The learning rate this stage starts from: ``--lr`` if given, else its `default_lr`."""
        return self.loop.lr if self.loop.lr is not None else self.default_lr

    @property
    def epoch_size(self) -> int | None:
        """Training samples per epoch: ``--epoch-size`` if given, else `default_epoch_size`; None for 0
        (each positive about once: `luna.data.BalancedSampler`)."""
        size = self.loop.epoch_size if self.loop.epoch_size is not None else self.default_epoch_size
        return size or None

    def make_optimizer(self, params) -> None:
        """Every stage's optimizer: AdamW from `lr` with ``--weight-decay``, cosine decay over the epochs."""
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.loop.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(self.loop.epochs, 1))

    # -- to implement -------------------------------------------------------------
    def train_epoch(self, epoch: int) -> EpochResult:
        raise NotImplementedError

    def validate(self, epoch: int) -> EpochResult:
        raise NotImplementedError

    def describe(self) -> str:
        """A line on what is trained on what (printed once)."""
        return self.name

    # -- what stages share inside their epochs -------------------------------------
    def optimizer_step(self, loss: torch.Tensor) -> None:
        """One update from a scalar loss (with fp16 loss scaling when AMP needs it)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def augmentation_seed(self, epoch: int) -> int:
        """Per epoch and rank, so a resumed run draws what an uninterrupted one would."""
        return self.loop.seed * 100003 + epoch * 1009 + self.devices.rank

    def progress(self, total: int, what: str, unit: str = "batch") -> tqdm:
        """A progress bar on the main process (none with --no-progress)."""
        return tqdm(total=total, desc=f"[{self.name}] {what}", unit=unit, leave=False,
                    disable=not self.devices.is_main or not self.loop.progress)

    @property
    def bare_model(self) -> torch.nn.Module:
        """The model without its DataParallel / DDP wrapper."""
        return unwrap_model(self.model)

    # -- the loop -----------------------------------------------------------------
    def run(self) -> StageResult:
        if self.devices.is_main:
            remove_stale_temporaries(self.directory)  # a killed run's half-written checkpoints
        start = self._resume() + 1 if self.loop.resume else 1
        history: list[dict] = []
        if self.devices.is_main:
            log.info("[%s] %s; AdamW lr %g", self.name, self.describe(), self.lr)
            if start > self.loop.epochs:
                log.info("[%s] already trained for %d epochs; nothing to do", self.name, start - 1)
        for epoch in range(start, self.loop.epochs + 1):
            train = self.train_epoch(epoch)
            self._check_weights(epoch)
            val = self.validate(epoch)
            if self.scheduler is not None:
                self.scheduler.step()
            score = val.metrics.get(self.score_name, float("nan"))
            improved = self._improves(score, val.loss)
            if improved:
                self.best_score, self.best_epoch, self.best_loss = score, epoch, val.loss
            record = {"epoch": epoch, "train": train.as_dict(), "val": val.as_dict(), "score": score}
            history.append(record)
            if self.devices.is_main:
                print(self._summary(epoch, "train", train), flush=True)
                print(self._summary(epoch, "val", val) + ("  * best" if improved else ""), flush=True)
                # last before best: see the module docstring (a kill between the two
                # leaves a last.pt that names this epoch as best, and resume rebuilds best.pt)
                self._save("last", epoch, record)
                if improved:
                    self._save("best", epoch, record)
        return StageResult(
            self.name, self.score_name, self.best_score, self.best_epoch, self.loop.epochs, self.directory, history
        )

    def _improves(self, score: float, loss: float) -> bool:
        """A finite score above the best so far, or equal to it at a lower validation loss.

        The tie rule matters where the score moves in coarse steps: the segmentation's
        nodule recall on 2 validation slabs (7 nodules) was 0.857 at epochs 1 and 2, and
        the first, barely trained epoch (voxel recall 0.05, loss 1.82 against 1.76) was
        kept.
        """
        if not math.isfinite(score):
            return False
        if self.best_score is None or score > self.best_score:
            return True
        return score == self.best_score and self.best_loss is not None and loss < self.best_loss

    def _summary(self, epoch: int, split: str, result: EpochResult) -> str:
        m = result.metrics
        line = (
            f"[{self.name}] epoch {epoch}/{self.loop.epochs} {split:5s} loss {result.loss:.4f}"
            + "".join(f" {label} {m[key]:.3f}" for key, label in self.summary_metrics() if key in m)
            + f" | {result.samples} samples, {result.samples_per_second:.1f}/s"
        )
        if split == "train":
            line += f", data wait {100 * result.data_wait:.0f}%"
        return line

    def summary_metrics(self) -> list[tuple[str, str]]:
        """(metric key, label) pairs shown in the per-epoch line."""
        return [("accuracy_pos", "acc+"), ("accuracy_neg", "acc-"), ("precision", "prec"),
                ("recall", "rec"), ("f1", "F1"), ("auc", "AUC")]

    def _check_weights(self, epoch: int) -> None:
        """`LunaError` when training made any weight or statistic NaN or infinite."""
        state = self.bare_model.state_dict()
        floats = [(k, v) for k, v in state.items() if v.is_floating_point()]
        if bool(torch.stack([torch.isfinite(v).all() for _, v in floats]).all()):
            return
        broken = [k for k, v in floats if not bool(torch.isfinite(v).all())]
        shown = ", ".join(broken[:3]) + (f", ... ({len(broken) - 3} more)" if len(broken) > 3 else "")
        kept = f"{self.directory / 'last.pt'} still holds epoch {epoch - 1}" if epoch > 1 else "nothing was saved"
        raise LunaError(
            f"[{self.name}] training diverged in epoch {epoch}: NaN or infinite values in {shown}; "
            f"{kept}. Lower --lr (now {self.lr:g}) and train again (--resume continues from last.pt)"
        )

    # -- checkpoints --------------------------------------------------------------
    def _save(self, kind: str, epoch: int, record: dict) -> None:
        metrics = {**record, "best_score": self.best_score, "best_epoch": self.best_epoch, "best_loss": self.best_loss,
                   "score_name": self.score_name}
        payload = make_checkpoint(
            self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            epoch=epoch,
            samples_seen=self.samples_seen,
            metrics=metrics,
            args=self.record,
            stage=self.name,
        )
        save_checkpoint(self.directory / f"{kind}.pt", {**payload, **self.checkpoint_extras()})

    def checkpoint_extras(self) -> dict:
        """More entries for this stage's checkpoints (plain values); none by default."""
        return {}

    def _resume(self) -> int:
        """Load ``last.pt`` if there is one; the epoch it finished (0: start afresh)."""
        path = self.directory / "last.pt"
        if not path.exists():
            if self.devices.is_main:
                log.info("[%s] no checkpoint in %s; starting from epoch 1", self.name, self.directory)
            return 0
        checkpoint = load_checkpoint(path, map_location=self.devices.device)
        load_model_state(self.bare_model, model_state_from_checkpoint(checkpoint, source=str(path)), source=str(path))
        if checkpoint.get("optimizer_state"):
            self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.scheduler is not None and checkpoint.get("scheduler_state"):
            self.scheduler.load_state_dict(checkpoint["scheduler_state"])
            if hasattr(self.scheduler, "T_max"):
                # resumed with more --epochs: the cosine decay stretches to the new end
                self.scheduler.T_max = max(self.loop.epochs, 1)
        self.samples_seen = int(checkpoint.get("samples_seen", 0))
        metrics = checkpoint.get("metrics") or {}
        self.best_score = metrics.get("best_score")
        self.best_epoch = metrics.get("best_epoch")
        self.best_loss = metrics.get("best_loss")
        epoch = int(checkpoint.get("epoch", 0))
        self._restore_best(path, checkpoint, epoch)
        if self.devices.is_main:
            log.info("[%s] resumed from %s after epoch %d (%d samples seen)", self.name, path, epoch, self.samples_seen)
        return epoch

    def _restore_best(self, last_path: Path, last: dict, epoch: int) -> None:
        """Make ``best.pt`` hold the epoch ``last.pt`` names as best (see the module docstring)."""
        if self.best_epoch is None:
            return  # no finite validation score yet: there is no best.pt to have
        best_path = self.directory / "best.pt"
        found = None
        if best_path.is_file():
            try:
                found = load_checkpoint(best_path).get("epoch")
            except LunaError:  # half a file from before atomic writes, or damaged since
                found = None
        if found == self.best_epoch:
            return
        if self.best_epoch == epoch:
            # killed between the last.pt and best.pt writes of this epoch: same payload
            if self.devices.is_main:
                save_checkpoint(best_path, last)
                log.warning("[%s] %s was missing epoch %d, the best so far; rebuilt it from %s",
                            self.name, best_path, epoch, last_path)
            return
        state = "is missing" if found is None else f"holds epoch {found}"
        raise LunaError(
            f"{best_path} {state}, but {last_path} records epoch {self.best_epoch} as the best "
            f"({self.score_name} {self.best_score}) and cannot rebuild it: restore that best.pt, or "
            f"delete {last_path} to train this stage again from epoch 1"
        )


def device_time(device: torch.device) -> float:
    """A wall-clock reading after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed_batches(loader):
    """Yield the loader's batches with the seconds spent waiting for each.

    A `LunaError` raised while reading a sample (say, a truncated scan) comes out
    as its own one-line message, also from DataLoader worker processes.
    """
    iterator = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except LunaError as err:
            raise worker_error(err) from None
        yield batch, time.perf_counter() - start
