"""Datasets and sampling for the nodule and malignancy classifiers.

- `ChunkDataset`: one candidate -> (chunk of raw clamped HU, label, index). The
  same class serves both classifiers: ``label="nodule"`` (every candidate,
  label ``is_nodule``) and ``label="malignant"`` (annotated nodules only, label
  ``is_malignant``). Workers only read and convert chunks; augmentation runs per
  batch on the device (`luna.data.augment`).
- `BalancedSampler`: the training order, epoch by epoch, optionally with a fixed
  ratio of negatives per positive, reproducible from a seed and split between
  DistributedDataParallel ranks.
- `split_candidates`: training / validation by series (never by candidate).
- `worker_init_fn`: seeds ``random`` and numpy in DataLoader workers;
  `worker_error`: a worker's `LunaError` as its one line, without the worker's traceback.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from luna.annotations import CandidateInfo, split_series
from luna.chunks import ChunkSource
from luna.errors import LunaError

__all__ = [
    "LABEL_MODES",
    "BalancedSampler",
    "ChunkDataset",
    "ChunkSample",
    "annotated_nodules",
    "split_candidates",
    "worker_error",
    "worker_init_fn",
]

LabelFn = Callable[[CandidateInfo], Union[bool, int]]

LABEL_MODES: dict[str, LabelFn] = {
    "nodule": lambda info: info.is_nodule,
    "malignant": lambda info: info.is_malignant,
}
"""Named label functions: ``nodule`` for the nodule classifier, ``malignant`` for the malignancy one."""


class ChunkSample(NamedTuple):
    """One item; DataLoader's default collate stacks each field (a ChunkSample of batches).

    ``chunk`` (1, D, H, W) HU as read (clamped by the `ChunkSource`'s ``hu_range``),
    ``label`` int64 scalar (1 = positive), ``index`` int64 scalar into the dataset's items.
    """

    chunk: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor


class ChunkDataset(Dataset):
    """Chunks around candidates with their labels.

    ``label`` is ``"nodule"``, ``"malignant"`` or a function of a `CandidateInfo`
    returning a truth value. With ``"malignant"`` every item must be an annotated
    nodule (use `annotated_nodules`): a candidate without annotation has no
    malignancy rating, and calling it benign would be a wrong label.

    ``labels`` (numpy int64, one per item) is computed once, for samplers and metrics.
    ``dtype`` is the chunk's tensor type (float32; int16 halves what workers send to
    the main process and the device, if the training loop converts).
    """

    def __init__(
        self,
        infos: Sequence[CandidateInfo],
        source: ChunkSource,
        label: str | LabelFn = "nodule",
        *,
        dtype: torch.dtype = torch.float32,
    ):
        if isinstance(label, str):
            if label not in LABEL_MODES:
                raise ValueError(f"label must be one of {sorted(LABEL_MODES)} or a function, got {label!r}")
            if label == "malignant":
                unannotated = sum(1 for info in infos if not info.has_annotation)
                if unannotated:
                    raise ValueError(
                        f"label='malignant' needs annotated nodules only, but {unannotated} of "
                        f"{len(infos)} items have no annotation; pass annotated_nodules(infos)"
                    )
            label_fn = LABEL_MODES[label]
        elif callable(label):
            label_fn = label
        else:
            raise TypeError(f"label must be a mode name or a function, got {type(label).__name__}")
        self.infos = list(infos)
        self.source = source
        self.dtype = dtype
        self.labels = np.fromiter((bool(label_fn(info)) for info in self.infos), dtype=np.int64, count=len(self.infos))

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, index: int) -> ChunkSample:
        index = int(index)
        info = self.infos[index]
        chunk = self.source.get(info.series_uid, info.center_xyz)
        tensor = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.dtype).unsqueeze(0)
        return ChunkSample(
            tensor,
            torch.tensor(self.labels[index], dtype=torch.int64),
            torch.tensor(index, dtype=torch.int64),
        )


def annotated_nodules(infos: Sequence[CandidateInfo]) -> list[CandidateInfo]:
    """The items of the malignancy classifier: annotated nodules, in the given order."""
    return [info for info in infos if info.has_annotation]


def split_candidates(
    infos: Sequence[CandidateInfo], val_stride: int = 10, val_offset: int = 0
) -> tuple[list[CandidateInfo], list[CandidateInfo]]:
    """(training, validation) infos, split by series with `luna.annotations.split_series`.

    Every candidate of a series goes to the same side; the order of ``infos`` is kept.
    """
    _, validation_uids = split_series((info.series_uid for info in infos), val_stride, val_offset)
    validation = set(validation_uids)
    train = [info for info in infos if info.series_uid not in validation]
    val = [info for info in infos if info.series_uid in validation]
    return train, val


def worker_init_fn(worker_id: int) -> None:
    """Seed ``random`` and numpy in a DataLoader worker from torch's per-worker seed.

    Torch already gives each worker its own torch seed (base seed + worker id, the
    base seed drawn from the loader's generator); this makes the other two generators
    follow it, independently of the torch version, so that workers never share numpy
    streams and a seeded loader is reproducible.
    """
    seed = torch.initial_seed()
    np.random.seed(np.random.SeedSequence(seed).generate_state(1)[0])
    random.seed(seed)


def worker_error(err: LunaError) -> LunaError:
    """``err`` without the DataLoader worker's traceback in its message.

    The DataLoader re-raises a worker's exception in the main process with the
    worker's whole traceback as the message ("Caught LunaError in DataLoader worker
    process 0. Original Traceback ... luna.errors.LunaError: <message>"); the
    traceback's last line is the original one-line message, which names the file
    and the fix. Errors raised in the main process come back unchanged.
    """
    text = str(err)
    if not (text.startswith("Caught LunaError") and "LunaError: " in text):
        return err
    original = text.rsplit("LunaError: ", 1)[1].strip()
    return LunaError(f"{original} (while a DataLoader worker read a training sample)")


# ----------------------------------------------------------------------------- sampler


class BalancedSampler(Sampler[int]):
    """Indices for one training epoch, optionally ``ratio`` negatives per positive.

    ``labels``: one 0/1 label per dataset item (or a dataset with a ``labels``
    attribute, such as `ChunkDataset`).

    ``ratio`` > 0 (``--balanced RATIO``): each epoch holds ``epoch_size`` indices,
    ``round(epoch_size / (1 + ratio))`` positives and the rest negatives, in random
    order. ``epoch_size`` defaults to ``(1 + ratio) x`` the number of positives
    (each positive about once per epoch).

    ``ratio`` 0 or None: no balancing, a shuffle of all items. ``epoch_size``
    defaults to the dataset size; a smaller one takes a different part of the
    dataset each epoch, a larger one repeats items (sampling with replacement,
    each item as evenly as possible).

    Positives and negatives are each drawn from their own sequence of shuffles
    that is walked through over the epochs: when an epoch needs ``k`` of ``n``
    negatives (``k < n``), epochs ``0 .. ceil(n / k) - 1`` together see every
    negative, then a new shuffle starts, and an epoch never holds a negative twice.
    Only when an epoch needs more than there are (typical for positives) do items
    repeat within it, each ``k // n`` or ``k // n + 1`` times.

    ``hard`` (a bool per item) and ``hard_share``: with balancing, that share of each
    epoch's negatives is drawn from the hard negatives (``hard & label == 0``: the
    segmentation's own false proposals, `luna.training.proposals`) and the rest from
    the others, each pool walked through as above. Without hard negatives (or with
    share 0) the negatives are one pool.

    Randomness comes from ``seed`` and the epoch set with `set_epoch` (call it
    before each epoch, as with ``DistributedSampler``): the same seed and epoch give
    the same indices, in any order of calls. With ``num_replicas`` > 1 the epoch is
    rounded up to a multiple of ``num_replicas`` and rank ``rank`` iterates over
    positions ``rank, rank + num_replicas, ...``: equal lengths, disjoint shares
    that together are the whole epoch. All ranks must use the same seed.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor | object,
        ratio: float | None = 1.0,
        epoch_size: int | None = None,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        hard: Sequence[bool] | np.ndarray | None = None,
        hard_share: float = 0.0,
    ):
        if hasattr(labels, "labels"):
            labels = labels.labels
        if isinstance(labels, torch.Tensor):
            labels = labels.cpu().numpy()
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        if ratio is not None and ratio < 0:
            raise ValueError(f"ratio (negatives per positive) must be >= 0, got {ratio}")
        self.ratio = float(ratio) if ratio else 0.0
        self.positives = np.flatnonzero(labels != 0)
        self.negatives = np.flatnonzero(labels == 0)
        if not 0.0 <= hard_share <= 1.0:
            raise ValueError(f"hard_share must be within [0, 1], got {hard_share}")
        hard = np.zeros(len(labels), dtype=bool) if hard is None else np.asarray(hard, dtype=bool)
        if hard.shape != labels.shape:
            raise ValueError(f"hard must have one flag per item ({labels.shape}), got {hard.shape}")
        self.hard_negatives = np.flatnonzero(hard & (labels == 0))
        self.easy_negatives = np.flatnonzero(~hard & (labels == 0))
        has_both = len(self.hard_negatives) and len(self.easy_negatives)
        self.hard_share = float(hard_share) if has_both else (1.0 if len(self.hard_negatives) else 0.0)
        self.dataset_size = len(labels)
        if self.ratio:
            if len(self.positives) == 0 or len(self.negatives) == 0:
                raise ValueError(
                    f"cannot balance {len(self.positives)} positives with {len(self.negatives)} "
                    f"negatives; use ratio 0 (no balancing) or a dataset with both"
                )
            if epoch_size is None:
                epoch_size = round(len(self.positives) * (1 + self.ratio))
        elif epoch_size is None:
            epoch_size = self.dataset_size
        if epoch_size < 1 or self.dataset_size == 0:
            raise ValueError(f"epoch_size must be >= 1 on a non-empty dataset, got {epoch_size} of {self.dataset_size}")
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed) % 2**64  # numpy seeds are non-negative
        self.epoch = 0
        self.num_samples = math.ceil(epoch_size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    @property
    def epoch_counts(self) -> tuple[int, int]:
        """(positives, negatives) in one epoch (all ranks together); (0, 0) when not balancing."""
        if not self.ratio:
            return 0, 0
        positives = min(max(round(self.total_size / (1 + self.ratio)), 1), self.total_size - 1)
        return positives, self.total_size - positives

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """All ``total_size`` indices of an epoch (every rank's share), in order."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.ratio:
            n_pos, n_neg = self.epoch_counts
            n_hard = round(n_neg * self.hard_share)
            parts = [self.positives[_cycle_take(len(self.positives), n_pos, epoch, (self.seed, 1))]]
            if n_hard:
                parts.append(self.hard_negatives[_cycle_take(len(self.hard_negatives), n_hard, epoch, (self.seed, 4))])
            if n_neg - n_hard:
                pool = self.easy_negatives if n_hard or len(self.easy_negatives) else self.negatives
                parts.append(pool[_cycle_take(len(pool), n_neg - n_hard, epoch, (self.seed, 2))])
            chosen = np.concatenate(parts)
        else:
            chosen = _cycle_take(self.dataset_size, self.total_size, epoch, (self.seed, 0))
        order = np.random.default_rng([self.seed, 3, epoch]).permutation(len(chosen))
        return chosen[order]

    def __iter__(self) -> Iterator[int]:
        share = self.epoch_indices()[self.rank :: self.num_replicas]
        return iter(share.tolist())


def _cycle_take(count: int, needed: int, epoch: int, key: tuple[int, int]) -> np.ndarray:
    """``needed`` positions in ``range(count)`` for ``epoch``, cycling through all of them.

    ``needed < count``: cycle ``c`` is a shuffle of everything, cut into ``ceil(count /
    needed)`` epochs; the last epoch of a cycle tops its remainder up with positions
    from the start of the same shuffle, so no epoch repeats a position. Otherwise each
    epoch takes whole shuffles and a part of one more.
    """
    if needed >= count:
        whole, extra = divmod(needed, count)
        parts = [np.random.default_rng([*key, 0, epoch, k]).permutation(count) for k in range(whole + (extra > 0))]
        return np.concatenate(parts)[:needed]
    per_cycle = math.ceil(count / needed)
    cycle, step = divmod(epoch, per_cycle)
    perm = np.random.default_rng([*key, 1, cycle]).permutation(count)
    taken = perm[step * needed : (step + 1) * needed]
    if len(taken) < needed:
        taken = np.concatenate([taken, perm[: needed - len(taken)]])
    return taken
