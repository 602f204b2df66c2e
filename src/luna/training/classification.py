"""The classifier stages: nodule (a 3D CNN telling nodules from other candidates)
and malignancy (the same network fine-tuned to tell malignant from benign nodules).

Data: the candidates of `luna.annotations.load_candidate_infos` for the scans on
disk, split by series (`--val-stride`). Training draws a balanced epoch
(`--balanced` negatives per positive, `--epoch-size` samples, reshuffled each epoch);
validation runs over every validation candidate, unbalanced, so its precision is
the one a user will see. Chunks come from the cache (`luna.chunks`), filled on the
fly or beforehand by ``python -m luna.prepcache``; augmentation runs per batch on
the device, after the tube distractors of ``--tubes`` (half the chunks by default; nodule
stage only: `luna.data.tubes`).

With a segmentation model (the run's ``segmentation/best.pt``, or
``--segmentation-path``) the nodule stage trains and validates on what the diagnosis
will give it (`luna.training.proposals`, at the segmentation's stored operating
threshold): the segmentation's false proposals on the
training scans are hard negatives (``--hard-negatives`` = their share of each
epoch's negatives; proposals on nodules are extra positives), and every epoch the
validation runs the rest of the pipeline on the validation scans' proposals —
classify, accept — and scores it as LUNA16 does (`luna.evaluate.detection`): CPM,
sensitivity at 1 and 4 false positives per scan, false positives per scan at the
operating threshold, and the proposals' own recall. The ``best`` checkpoint is the
epoch with the highest CPM, what a user gets. Without a segmentation model it is
the validation ROC AUC over the CSV candidates (threshold-free; F1 at 0.5 swings
with the class ratio of the validation set). Metrics at the operating threshold
(`--threshold`, default 0.5) are logged beside either.

The malignancy stage (`MalignancyStage`) learns from the annotated nodules only,
labelled by ``annotations_with_malignancy.csv`` (malignant when >= 2 readers rated
>= 4; nodules without a rating count as benign), split by series and balanced the
same way. It starts from a nodule classifier checkpoint (``--finetune PATH``; in
``--stage all`` the nodule stage's ``best.pt``), wrapped in a
`luna.models.malignancy.SizeAwareClassifier` whose head also sees the nodule's
measured size and density, and trains only the ``--finetune-depth`` sections nearest
the head (and the head). Its validation also reports the
ROC AUC of the nodule diameter alone (``diameter_auc``), the baseline the book
found hard to beat. Its checkpoints also carry a diameter-only rule fitted on the
training nodules (`luna.models.malignancy.DiameterRule`); unless the best epoch's
model beat the diameter beyond chance in validation (``auc_gain_low``, the 95% lower
bound of its AUC gain, above 0: `luna.models.malignancy.why_diameter_instead`), the
stage warns and the diagnosis gives the rule's p(malignant) instead of the model's,
and says so.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from luna.annotations import CandidateInfo, load_annotations, load_candidate_infos, load_excluded
from luna.cache import ArrayCache
from luna.chunks import ChunkSource
from luna.data import (
    Augment3d,
    BalancedSampler,
    ChunkDataset,
    TubeDistractors,
    annotated_nodules,
    split_candidates,
    worker_init_fn,
)
from luna.datadir import DataDir
from luna.devices import Devices
from luna.errors import LunaError
from luna.evaluate.detection import evaluate_diagnoses
from luna.inference.grouping import search_threshold
from luna.inference.pipeline import SEARCH_BUDGET, Models, classify_proposals, operating_threshold
from luna.io import load_ct
from luna.metrics import auc_gain_lower_bound, binary_metrics, roc_auc
from luna.models import POSITIVE_CLASS, build_model_from_checkpoint, check_kind, load_checkpoint
from luna.models.malignancy import DiameterRule, SizeAwareClassifier, why_diameter_instead
from luna.training.config import ClassifierConfig, LoopConfig, MalignancyConfig
from luna.training.proposals import ScanProposals, proposals_for, training_infos
from luna.training.stage import (
    EpochResult,
    Stage,
    StageResult,
    device_time,
    timed_batches,
)

__all__ = ["MalignancyStage", "NoduleStage"]

log = logging.getLogger(__name__)

TUBE_SEED_OFFSET = 2**40
"""Seeds the tube distractors' own stream apart from the augmentation's (`Stage.augmentation_seed`)."""


class NoduleStage(Stage):
    name = "nodule"
    score_name = "auc"
    label = "nodule"
    default_lr = 1e-3
    """Ten epochs of 2,048 chunks are only 850 steps: at 3e-4 the classifier still
    misread 12% of its training nodules in the last epoch (run ``21.06.59``), at 1e-3 5-7%.
    Held-out CPM: see the README's Quality section."""
    default_epoch_size = 4096
    """Twice the other stages': after 10 epochs of 2,048 chunks the classifier still misread 12% of
    its augmented training nodules (run ``2026-12-01_06.17.13``), and trained again on the same
    UNet's proposals with 4,096 per epoch (6% in its last epoch) it scored held-out CPM 0.854
    (0.782-0.922) instead of 0.773 (0.693-0.851), sensitivity at 1 FP per scan 0.87 instead of
    0.76; the juxta-pleural nodules gained most (14 of 20 ranked below 1 FP per scan -> 6).
    Cost: its epochs take twice as long (100 s instead of 57 on 2 cores)."""

    def __init__(
        self,
        loop: LoopConfig,
        classifier: ClassifierConfig,
        devices: Devices,
        directory: Path,
        data: DataDir,
        cache_dir: Path,
        *,
        segmentation_path: Path | None = None,
        record: dict | None = None,
    ):
        super().__init__(loop, devices, directory, record)
        self.classifier = classifier
        self.data = data
        infos = self.select(load_candidate_infos(data.root, data.series_uids))
        train_infos, val_infos = split_candidates(infos, loop.val_stride)
        self._check(train_infos, "training")
        self._check(val_infos, "validation")
        cache = ArrayCache(cache_dir)
        source = ChunkSource(data, cache)
        hard = np.zeros(len(train_infos), dtype=bool)
        self.val_proposals: dict[str, ScanProposals] = {}
        self.search_budget = 0
        """Faint blobs per scan among the proposals it trained on (`checkpoint_extras`)."""
        if segmentation_path is not None and self.uses_proposals:
            self.search_budget = SEARCH_BUDGET
            hard_infos = self._proposals(segmentation_path, data, cache, train_infos, val_infos)
            hard = np.r_[hard, np.ones(len(hard_infos), dtype=bool)]
            train_infos = [*train_infos, *hard_infos]
            self.score_name = "cpm"
        self.train_set = ChunkDataset(train_infos, source, self.label)
        self.val_set = ChunkDataset(val_infos, source, self.label)
        self.train_sampler = BalancedSampler(
            self.train_set,
            ratio=loop.balanced,
            epoch_size=self.epoch_size,
            seed=loop.seed,
            num_replicas=devices.world_size,
            rank=devices.rank,
            hard=hard,
            hard_share=classifier.hard_negatives,
        )
        val_sampler = (
            DistributedSampler(self.val_set, devices.world_size, devices.rank, shuffle=False)
            if devices.distributed
            else None
        )
        self.train_loader = self._loader(self.train_set, self.train_sampler)
        self.val_loader = self._loader(self.val_set, val_sampler)
        self.augment = Augment3d.from_switches(**loop.augmentation.switches()).to(devices.device)
        self.tubes = TubeDistractors(classifier.tubes if self.uses_tubes else 0.0)
        self.train_diameters = torch.tensor([info.diameter_mm for info in self.train_set.infos], dtype=torch.float64)
        # channels-last 3D: 2.5x faster convolutions on our CPUs (18 -> 45 samples/s, batch 24)
        self.model = devices.wrap(self.build_model().to(memory_format=torch.channels_last_3d))
        self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        self.threshold = classifier.threshold
        self.val_scores: np.ndarray | None = None
        """p(positive) of each validation item in the dataset's order, from the latest validation."""

    uses_proposals = True
    """Whether a segmentation model gives this stage hard negatives and end-to-end validation."""

    uses_tubes = True
    """Whether ``--tubes`` draws vessel-like tubes into the training chunks (`luna.data.tubes`)."""

    def checkpoint_extras(self) -> dict:
        """The faint blobs its training proposals held: the diagnosis proposes them only to a classifier
        that learnt to reject them (`luna.inference.pipeline.trained_search_budget`)."""
        return {"search_budget": self.search_budget}

    def _proposals(self, segmentation_path: Path, data: DataDir, cache: ArrayCache,
                   train_infos: list[CandidateInfo], val_infos: list[CandidateInfo]) -> list[CandidateInfo]:
        """Segment every scan once (cached): hard negatives and extra positives for training, the
        validation scans' proposals for the end-to-end validation."""
        checkpoint = load_checkpoint(segmentation_path, map_location="cpu")
        source = f"segmentation checkpoint {segmentation_path}"
        model = build_model_from_checkpoint(checkpoint, source=source)
        check_kind(model, "segmenter", source, "segmentation")
        model = model.eval().to(self.devices.device)
        threshold = operating_threshold(checkpoint, source)
        train_uids = sorted({i.series_uid for i in train_infos})
        val_uids = sorted({i.series_uid for i in val_infos})
        bar = self.progress(len(train_uids) + len(val_uids), "segmentation proposals", unit="scan")
        found = proposals_for([*train_uids, *val_uids], data, cache, model, segmentation_path,
                              device=self.devices.device, amp_dtype=self.devices.amp_dtype, threshold=threshold,
                              search_budget=self.search_budget, progress=bar.update)
        bar.close()
        self.annotations = load_annotations(data.root)
        self.excluded = load_excluded(data.root)
        negatives, positives = training_infos({u: found[u] for u in train_uids}, self.annotations, self.excluded)
        self.val_proposals = {u: found[u] for u in val_uids}
        if self.devices.is_main:
            log.info("[%s] segmentation proposals (%s, at p > %g and up to %d faint blobs per scan at p > %.4g): "
                     "%d on the training scans -> %d hard negatives, %d extra positives; %d on the validation scans",
                     self.name, segmentation_path, threshold, self.search_budget, search_threshold(threshold),
                     sum(len(found[u]) for u in train_uids), len(negatives), len(positives),
                     sum(len(p) for p in self.val_proposals.values()))
        return [*negatives, *positives]

    # -- what the malignancy stage changes ------------------------------------------
    def select(self, infos: list[CandidateInfo]) -> list[CandidateInfo]:
        """The candidates this stage learns from."""
        return infos

    def build_model(self) -> torch.nn.Module:
        """The registered classifier ``--model`` names, at ``--width`` and ``--depth``."""
        return self.classifier.build_model()

    # -------------------------------------------------------------------------------
    def describe(self) -> str:
        pos, neg = self.train_sampler.epoch_counts
        return (
            f"{len(self.train_set)} training candidates ({int(self.train_set.labels.sum())} positive), "
            f"{len(self.val_set)} validation ({int(self.val_set.labels.sum())} positive); "
            f"epochs of {len(self.train_sampler) * self.devices.world_size} samples "
            f"({pos} positive, {neg} negative) on {self.devices.describe()}"
        )

    def summary_metrics(self) -> list[tuple[str, str]]:
        return super().summary_metrics() + [("cpm", "CPM"), ("sensitivity_at_1", "sens@1FP"),
                                            ("fp_per_scan", "FP/scan"), ("proposal_recall", "proposals rec")]

    def _check(self, infos: list[CandidateInfo], split: str) -> None:
        labels = [getattr(i, "is_malignant" if self.label == "malignant" else "is_nodule") for i in infos]
        if not infos or all(labels) or not any(labels):
            raise LunaError(
                f"the {split} split of the {self.name} stage has {len(infos)} samples, "
                f"{sum(labels)} positive: it needs both classes. Use more scans, or change "
                f"--val-stride (now {self.loop.val_stride})"
            )

    def _loader(self, dataset, sampler) -> DataLoader:
        workers = self.loop.num_workers
        return DataLoader(
            dataset,
            batch_size=self.devices.batch_size(self.loop.batch_size),
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.devices.is_cuda,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=worker_init_fn,
        )

    def train_epoch(self, epoch: int) -> EpochResult:
        self.model.train()
        self.train_sampler.set_epoch(epoch)
        self.augment.generator.manual_seed(self.augmentation_seed(epoch))
        self.tubes.generator.manual_seed(self.augmentation_seed(epoch) + TUBE_SEED_OFFSET)
        return self._run_epoch(epoch, "train", self.train_loader, training=True)

    @torch.no_grad()
    def validate(self, epoch: int) -> EpochResult:
        self.model.eval()
        result = self._run_epoch(epoch, "val", self.val_loader, training=False)
        if self.val_proposals:
            quality = self._end_to_end()
            metrics = quality.metrics()
            result.metrics.update(metrics)
            self.writer.log_scalars("val", self.samples_seen, {f"end_to_end/{k}": v for k, v in metrics.items()})
        return result

    def _end_to_end(self):
        """The rest of the diagnosis on the validation proposals with the current model, scored."""
        model = self.bare_model
        mine = sorted(self.val_proposals)[self.devices.rank :: self.devices.world_size]
        models = Models(None, model, None)
        diagnoses = []
        for uid in mine:
            ct = load_ct(self.data.scan_path(uid), series_uid=uid)
            diagnoses.append(classify_proposals(ct, self.val_proposals[uid].as_proposals(ct), models,
                                                device=self.devices.device, amp_dtype=self.devices.amp_dtype,
                                                nodule_threshold=self.threshold))
        if self.devices.distributed:
            parts = [None] * self.devices.world_size
            dist.all_gather_object(parts, diagnoses)
            diagnoses = [d for part in parts for d in part]
        return evaluate_diagnoses(diagnoses, self.annotations, self.excluded, bootstrap_draws=0)

    def _run_epoch(self, epoch: int, split: str, loader: DataLoader, training: bool) -> EpochResult:
        device = self.devices.device
        losses, probabilities, labels, indices = [], [], [], []
        waited = 0.0
        start = device_time(device)
        bar = self.progress(len(loader), f"epoch {epoch} {split}")
        for batch, wait in timed_batches(loader):
            waited += wait
            chunks = batch.chunk.to(device, non_blocking=True)
            target = batch.label.to(device, non_blocking=True)
            if training and self.tubes.share > 0:
                chunks = self.tubes(chunks, target, self.train_diameters[batch.index])
            if training and not self.augment.is_identity:
                chunks = self.augment(chunks)
            with self.devices.autocast():
                logits = self.model(chunks)
            loss_each = F.cross_entropy(logits.float(), target, reduction="none")
            if training:
                self.optimizer_step(loss_each.mean())
            # kept on the device: a .cpu() per batch would wait for the GPU each step
            losses.append(loss_each.detach())
            probabilities.append(torch.softmax(logits.detach().float(), dim=1)[:, POSITIVE_CLASS])
            labels.append(target)
            indices.append(batch.index)
            bar.update()
        bar.close()
        seconds = device_time(device) - start
        loss, prob, label, index = (
            torch.cat(x).cpu().numpy() if x else np.zeros(0) for x in (losses, probabilities, labels, indices)
        )
        loss, prob, label, index = self._gather(loss, prob, label, index, dedupe=not training)
        if training:
            self.samples_seen += label.size
        else:  # p(positive) of every validation item, in the dataset's order
            self.val_scores = np.full(len(loader.dataset), np.nan)
            self.val_scores[index.astype(np.int64)] = prob
        metrics = binary_metrics(label, prob, self.threshold)
        mean_loss = float(loss.mean()) if loss.size else 0.0
        self.writer.log_epoch(split, self.samples_seen, mean_loss, metrics, label, prob, roc_figure=not training)
        return EpochResult(mean_loss, metrics.as_dict(), int(label.size), seconds, waited / seconds if seconds else 0.0)

    def _gather(self, loss, prob, label, index, dedupe: bool):
        """Every rank's per-sample values (validation: each sample once)."""
        if not self.devices.distributed:
            return loss, prob, label, index
        parts = [None] * self.devices.world_size
        dist.all_gather_object(parts, (loss, prob, label, index))
        loss, prob, label, index = (np.concatenate([p[k] for p in parts]) for k in range(4))
        if dedupe:  # DistributedSampler pads the last share with repeats
            _, first = np.unique(index, return_index=True)
            loss, prob, label, index = loss[first], prob[first], label[first], index[first]
        return loss, prob, label, index


class MalignancyStage(NoduleStage):
    name = "malignancy"
    label = "malignant"
    default_lr = Stage.default_lr
    """Fine-tuning a few sections of a trained classifier: the base rate, not the nodule stage's."""
    default_epoch_size = Stage.default_epoch_size
    """About a hundred training nodules: twice the samples would only repeat them."""
    uses_proposals = False
    uses_tubes = False
    """Its label follows a nodule's size and density, which a tube drawn beside it could change."""

    def __init__(
        self,
        loop: LoopConfig,
        malignancy: MalignancyConfig,
        devices: Devices,
        directory: Path,
        data: DataDir,
        cache_dir: Path,
        *,
        record: dict | None = None,
    ):
        self.malignancy = malignancy
        super().__init__(loop, ClassifierConfig(), devices, directory, data, cache_dir, record=record)
        # the diameter-only baseline, fitted on the training nodules and stored in every
        # checkpoint: the diagnosis gives it instead of the model when the model did not
        # beat it in validation (`luna.models.malignancy.DiameterRule`)
        self.diameter_rule = DiameterRule.fit([info.diameter_mm for info in self.train_set.infos],
                                              self.train_set.labels)

    def select(self, infos: list[CandidateInfo]) -> list[CandidateInfo]:
        return annotated_nodules(infos)

    def build_model(self) -> torch.nn.Module:
        source = self.malignancy.finetune
        if not source:
            raise LunaError(
                "the malignancy stage fine-tunes a nodule classifier: pass --finetune PATH "
                "(e.g. <run dir>/nodule/best.pt) or train with --stage all"
            )
        model = check_kind(build_model_from_checkpoint(source), "classifier", f"--finetune {source}",
                           "nodule classifier")
        if not isinstance(model, SizeAwareClassifier):
            # the head also sees the nodule's measured size and density (luna.models.malignancy)
            model = SizeAwareClassifier.from_classifier(model)
        model.freeze_for_finetuning(self.malignancy.finetune_depth)
        return model

    def describe(self) -> str:
        frozen = ", ".join(self.bare_model.frozen_sections) or "nothing"
        return f"fine-tuning {self.malignancy.finetune} (frozen: {frozen}); " + super().describe()

    def checkpoint_extras(self) -> dict:
        rule = self.diameter_rule
        return {"diameter_rule": dataclasses.asdict(rule)} if rule is not None else {}

    def validate(self, epoch: int) -> EpochResult:
        result = super().validate(epoch)
        diameters = np.array([info.diameter_mm for info in self.val_set.infos])
        result.metrics["diameter_auc"] = roc_auc(self.val_set.labels, diameters)
        result.metrics["auc_gain_low"] = auc_gain_lower_bound(self.val_set.labels, self.val_scores, diameters)
        return result

    def summary_metrics(self) -> list[tuple[str, str]]:
        return Stage.summary_metrics(self) + [("diameter_auc", "diameter AUC"), ("auc_gain_low", "gain low")]

    def run(self) -> StageResult:
        result = super().run()
        best = next((h for h in result.history if h["epoch"] == result.best_epoch), None)
        reason = why_diameter_instead(best["val"]) if best is not None else None
        if reason is not None and self.devices.is_main:
            log.warning("[%s] WARNING: the diagnosis will give p(malignant) from the measured diameter instead of "
                        "the best malignancy model, and say so: %s", self.name, reason)
        return result
