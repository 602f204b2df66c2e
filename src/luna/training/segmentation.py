"""The segmentation stage: a 2D UNet that marks nodule voxels slice by slice.

Training samples (`luna.data.segmentation`): random 64×64 crops of 96×96 windows of
``2 * --context-slices + 1`` slices around every nodule slice, plus random negative
windows inside the body (``--balanced`` negatives per positive in each epoch).
Loss: Dice over the whole batch plus ``--fn-weight`` × (1 - soft recall) per crop
holding nodule pixels (`luna.losses.segmentation_loss`: each nodule slice counts
alike, whatever its area);
augmentation per batch on the device, the same grid for image and mask.

Validation runs the diagnosis's first half on whole validation scans
(`luna.inference.pipeline.propose`: lung-field segmentation, grouping, the lung
rule) and scores it with `luna.evaluate.segmentation.score_segmentation`: voxel
precision, recall and Dice, nodule recall (annotated nodules hit by a detection, the
LUNA16 hit rule) and false-positive detections per scan. The validation loss is the
training loss (Dice + false-negative term) over each whole validation scan, averaged
over scans. Each epoch the grouping is scored at every threshold of
`luna.evaluate.segmentation.OPERATING_THRESHOLDS`, and the epoch's *operating
threshold* is the lowest one at which false-positive detections per scan stay within
``--fp-bound`` (default 100: the classifier after it is meant to sort out a few
hundred candidates per scan at most; `choose_threshold`, whose docstring gives the
measurement behind it). The metrics are those at that threshold, and the ``best``
checkpoint is chosen by ``score = nodule recall`` there (scaled down by
``fp_bound / fp_per_scan`` when even the highest threshold exceeds the bound; equal
scores go to the lower validation loss). The checkpoint stores the threshold
(``"operating_threshold"``): the nodule stage's proposals and the diagnosis use it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from luna.annotations import load_annotations, split_series
from luna.cache import ArrayCache
from luna.data import Augment2d, BalancedSampler, worker_init_fn
from luna.data.segmentation import SegmentationCrops, prepare_scan
from luna.datadir import DataDir
from luna.devices import Devices
from luna.errors import LunaError
from luna.evaluate.segmentation import OPERATING_THRESHOLDS, SegmentationCounts, choose_threshold, score_thresholds
from luna.inference.lungs import lung_mask
from luna.inference.pipeline import DEFAULT_SEGMENTATION_THRESHOLD, LUNG_MARGIN_MM, propose
from luna.io import load_ct
from luna.losses import segmentation_loss
from luna.masks import MaskSource
from luna.models import SegmentationUNet
from luna.training.config import LoopConfig, SegmentationConfig
from luna.training.stage import EpochResult, Stage, device_time, timed_batches
from luna.training.tensorboard import overlay

__all__ = ["SegmentationStage"]

log = logging.getLogger(__name__)


class SegmentationStage(Stage):
    name = "segmentation"
    score_name = "score"

    def __init__(
        self,
        loop: LoopConfig,
        segmentation: SegmentationConfig,
        devices: Devices,
        directory: Path,
        data: DataDir,
        cache_dir: Path,
        *,
        record: dict | None = None,
    ):
        super().__init__(loop, devices, directory, record)
        self.config = segmentation
        self.data = data
        cache = ArrayCache(cache_dir)
        annotations = [a for a in load_annotations(data.root) if a.series_uid in data.scans]
        if not annotations:
            raise LunaError(f"no annotated nodules in the scans of {data.root}: the segmentation stage needs some")
        self.annotations = annotations
        self.masks = MaskSource(data, cache, annotations)
        train_uids, self.val_uids = split_series(data.series_uids, loop.val_stride)
        if not self.val_uids:
            raise LunaError(f"no validation series in {data.root}; use more scans or a smaller --val-stride")
        context = segmentation.context_slices
        sites = []
        bar = self.progress(len(train_uids), "preparing training windows", unit="scan")
        for uid in train_uids:
            sites.extend(prepare_scan(uid, data, cache, self.masks, context=context, seed=loop.seed))
            bar.update()
        bar.close()
        self.train_set = SegmentationCrops(sites, data, cache, context=context, seed=loop.seed)
        if not self.train_set.labels.any():
            raise LunaError(f"no nodule voxels in the training scans of {data.root}")
        self.train_sampler = BalancedSampler(
            self.train_set, ratio=loop.balanced, epoch_size=self.epoch_size, seed=loop.seed,
            num_replicas=devices.world_size, rank=devices.rank,
        )
        workers = loop.num_workers
        self.train_loader = DataLoader(
            self.train_set, batch_size=devices.batch_size(loop.batch_size), sampler=self.train_sampler,
            num_workers=workers, pin_memory=devices.is_cuda, persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None, worker_init_fn=worker_init_fn,
        )
        self.augment = Augment2d.from_switches(**loop.augmentation.switches()).to(devices.device)
        # channels-last: the convolutions follow the weights' layout; 35% faster training
        # steps on our CPUs (148 -> 200 crops/s, batch 16 of 64x64)
        model = SegmentationUNet(in_channels=2 * context + 1, depth=segmentation.depth, wf=segmentation.width)
        self.model = devices.wrap(model.to(memory_format=torch.channels_last))
        self.operating_threshold = DEFAULT_SEGMENTATION_THRESHOLD  # until the first validation chooses one
        self.make_optimizer(self.model.parameters())

    def describe(self) -> str:
        positives = int(self.train_set.labels.sum())
        return (
            f"{len(self.train_set)} training windows ({positives} on nodule slices) from "
            f"{len(set(s.series_uid for s in self.train_set.sites))} scans, {len(self.val_uids)} validation "
            f"scans; epochs of {len(self.train_sampler) * self.devices.world_size} crops on {self.devices.describe()}"
        )

    def summary_metrics(self) -> list[tuple[str, str]]:
        return [("precision", "prec"), ("recall", "rec"), ("dice", "Dice"), ("nodule_recall", "nodule rec"),
                ("fp_per_scan", "FP/scan"), ("threshold", "at p >"), ("score", "score")]

    def checkpoint_extras(self) -> dict:
        """The epoch's operating threshold (see the module docstring), for the proposals and the diagnosis."""
        return {"operating_threshold": self.operating_threshold}

    def train_epoch(self, epoch: int) -> EpochResult:
        self.model.train()
        self.train_sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        self.augment.generator.manual_seed(self.augmentation_seed(epoch))
        device = self.devices.device
        losses, counts = [], torch.zeros(3, dtype=torch.float64, device=device)
        waited, start = 0.0, device_time(device)
        bar = self.progress(len(self.train_loader), f"epoch {epoch} train")
        for batch, wait in timed_batches(self.train_loader):
            waited += wait
            image = batch.image.to(device, non_blocking=True)
            label = batch.label.to(device, non_blocking=True)
            if not self.augment.is_identity:
                image, label = self.augment(image, label)
            with self.devices.autocast():
                probabilities = self.model(image)
            # Dice over the whole batch, not per crop: a crop without nodule voxels has
            # a per-crop Dice of m / (m + eps) for predicted mass m, which saturates at 1
            # with no gradient, so negatives would teach nothing (measured: precision
            # stuck at 0.02 while recall went to 1). The miss term is per crop.
            loss = segmentation_loss(probabilities.float(), label, fn_weight=self.config.fn_weight)
            self.optimizer_step(loss)
            loss = loss.detach().expand(image.shape[0])
            with torch.no_grad():
                predicted, truth = probabilities > 0.5, label > 0.5
                counts += torch.stack([(predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()]).double()
            losses.append(loss.detach())
            bar.update()
        bar.close()
        seconds = device_time(device) - start
        loss_all = torch.cat(losses) if losses else torch.zeros(0, device=device)
        total = torch.cat([counts, torch.tensor([loss_all.sum().item(), loss_all.numel()], device=device, dtype=torch.float64)])
        if self.devices.distributed:
            dist.all_reduce(total)
        tp, fp, fn, loss_sum, n = total.tolist()
        self.samples_seen += int(n)
        metrics = SegmentationCounts(tp=int(tp), fp=int(fp), fn=int(fn)).metrics(self.config.fp_bound)
        metrics = {k: metrics[k] for k in ("precision", "recall", "dice")}
        mean_loss = loss_sum / n if n else 0.0
        self.writer.log_scalars("train", self.samples_seen, {"loss": mean_loss, **metrics})
        return EpochResult(mean_loss, metrics, int(n), seconds, waited / seconds if seconds else 0.0)

    @torch.no_grad()
    def validate(self, epoch: int) -> EpochResult:
        device = self.devices.device
        start = device_time(device)
        model = self.bare_model
        mine = self.val_uids[self.devices.rank :: self.devices.world_size]
        counts = {t: SegmentationCounts() for t in OPERATING_THRESHOLDS}
        shown, slices, loss_sum = [], 0, 0.0
        bar = self.progress(len(mine), f"epoch {epoch} val", unit="scan")
        for uid in mine:
            ct = load_ct(self.data.scan_path(uid))
            scan_masks = self.masks.get(uid, ct)
            labels = scan_masks.labels
            lungs = lung_mask(ct)
            # the diagnosis's own first half: lung-field segmentation, grouping, the lung rule
            proposals = propose(ct, model, device=device, amp_dtype=self.devices.amp_dtype, lungs=lungs,
                                search_budget=0, keep_probabilities=True)
            probabilities = proposals.probabilities
            # propose grouped at its default threshold already (no faint blobs): that grouping is not redone
            scored = score_thresholds(probabilities, ct, self.annotations, labels, lung_margin_mm=LUNG_MARGIN_MM,
                                      lungs=lungs, grouped={DEFAULT_SEGMENTATION_THRESHOLD: proposals.detections})
            counts = {t: counts[t] + scored[t] for t in counts}
            # the training loss over the whole scan (one "batch" of all its slices)
            loss_sum += float(segmentation_loss(torch.from_numpy(probabilities), torch.from_numpy(labels > 0),
                                                fn_weight=self.config.fn_weight))
            slices += ct.hu.shape[0]
            if len(shown) < 4 and scan_masks.positive_slices.size:
                index = int(scan_masks.positive_slices[len(scan_masks.positive_slices) // 2])
                shown.append((ct.hu[index], probabilities[index], labels[index] > 0))
            bar.update()
        bar.close()
        if self.devices.distributed:
            parts = [None] * self.devices.world_size
            dist.all_gather_object(parts, (counts, slices, loss_sum))
            counts = {t: sum((p[0][t] for p in parts), SegmentationCounts()) for t in counts}
            slices = sum(p[1] for p in parts)
            loss_sum = sum(p[2] for p in parts)
        self.operating_threshold = choose_threshold(counts, self.config.fp_bound)
        chosen = counts[self.operating_threshold]
        metrics = {**chosen.metrics(self.config.fp_bound), "threshold": self.operating_threshold}
        pictures = [overlay(hu, p > self.operating_threshold, truth) for hu, p, truth in shown]
        loss = loss_sum / chosen.scans if chosen.scans else float("nan")
        metrics_with_loss = {"loss": loss, **metrics}
        self.writer.log_scalars("val", self.samples_seen, metrics_with_loss)
        if pictures:
            size = min(p.shape[0] for p in pictures), min(p.shape[1] for p in pictures)
            self.writer.log_images("val", "overlay (TP green, FP red, FN blue)",
                                   np.stack([p[: size[0], : size[1]] for p in pictures]), self.samples_seen)
        return EpochResult(loss, metrics, slices, device_time(device) - start)

