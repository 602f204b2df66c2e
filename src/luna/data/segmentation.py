"""Training samples of the segmentation UNet: context-slice crops around nodules and elsewhere.

A sample is a window of ``2 * context + 1`` axial slices (the model's channels) and
the nodule mask of its middle slice, cut around a *site*:

- a positive site for every slice of every annotated nodule that holds mask voxels,
  centred on the nodule's box;
- negative sites drawn at random (seeded): ``lung_share`` of them on dense tissue
  inside the lungs (vessels, fissures, airway walls, the lung side of the pleura:
  above ``DENSE_LUNG_HU`` within `luna.inference.lungs.lung_mask`), where the
  diagnosis's false proposals come from, and the rest anywhere in the body, so the
  model also sees lung, wall and mediastinum without nodules. Drawn from the whole
  body alone, most negatives land in soft tissue that the lung rule discards anyway.

Each site's window is cut once at ``window`` × ``window`` pixels (default 96) and
cached (int16 HU and a uint8 mask, in the `ArrayCache` with the chunks); every time
the site is drawn, a random ``crop`` × ``crop`` (default 64) part of it is served,
which is the translation augmentation of the book. `SegmentationCrops.fill` cuts
the windows of one scan from a single load of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from luna.cache import CACHE_FORMAT, ArrayCache
from luna.ct import AIR_HU, DEFAULT_HU_RANGE, Ct, crop
from luna.datadir import DataDir
from luna.inference.lungs import lung_mask
from luna.io import load_ct, source_identity
from luna.masks import MaskSource, ScanMask

__all__ = ["DENSE_LUNG_HU", "SegmentationCrops", "SegmentationSample", "Site", "find_sites", "prepare_scan"]

DENSE_LUNG_HU = -500
"""Denser than aerated lung (-900 to -700 HU): vessels, walls, fissures, nodules."""


@dataclass(frozen=True)
class Site:
    """Where a training window is cut: slice ``index``, centred at (``row``, ``col``)."""

    series_uid: str
    index: int
    row: int
    col: int
    is_positive: bool


class SegmentationSample(NamedTuple):
    image: torch.Tensor  # (2c+1, crop, crop) float32 HU
    label: torch.Tensor  # (1, crop, crop) float32 0/1
    index: torch.Tensor  # int64: which site


def find_sites(
    ct: Ct, masks: ScanMask, *, negatives: int, rng: np.random.Generator, margin: int = 0, lung_share: float = 0.0
) -> list[Site]:
    """The positive sites of a scan (one per nodule slice) and ``negatives`` random ones, ``lung_share`` of them
    on dense lung tissue (see the module docstring; fewer when the lungs hold fewer such points)."""
    sites = []
    for box in masks.boxes_irc:
        if box[0] < 0:
            continue
        row, col = (int(box[1]) + int(box[4])) // 2, (int(box[2]) + int(box[5])) // 2
        for index in range(int(box[0]), int(box[3])):
            if masks.slice_mask(index).any():
                sites.append(Site(ct.series_uid, index, row, col, True))
    # Negatives are drawn on a coarse grid (every step-th row and column) to keep this cheap,
    # away from the in-plane border.
    step = 4
    grid = (slice(None), slice(margin, ct.hu.shape[1] - margin, step), slice(margin, ct.hu.shape[2] - margin, step))
    hu = ct.hu[grid]
    body = hu > -950  # not air: body, lung parenchyma, vessels, wall
    pools = [np.argwhere(body)]
    in_lungs = round(negatives * lung_share)
    if in_lungs:
        lungs = lung_mask(ct)
        if not lungs.empty:
            on_grid = lungs.full_resolution()[grid]
            dense = np.argwhere(on_grid & (hu > DENSE_LUNG_HU))
            pools.insert(0, dense)
    wanted = [in_lungs, negatives - in_lungs] if len(pools) == 2 else [negatives]
    for pool, count in zip(pools, wanted):
        if len(pool) and count > 0:
            picks = pool[rng.choice(len(pool), size=min(count, len(pool)), replace=False)]
            for i, r, c in picks:
                sites.append(Site(ct.series_uid, int(i), int(r) * step + margin, int(c) * step + margin, False))
    return sites


class SegmentationCrops(Dataset):
    """Random ``crop`` squares of cached windows around `Site`\\ s (see the module docstring)."""

    def __init__(
        self,
        sites: Sequence[Site],
        data: DataDir,
        cache: ArrayCache | None,
        *,
        context: int = 3,
        window: int = 96,
        crop: int = 64,
        seed: int = 0,
        hu_range: tuple[int, int] | None = DEFAULT_HU_RANGE,
    ):
        if crop > window:
            raise ValueError(f"crop {crop} is larger than the window {window}")
        self.sites = list(sites)
        self.data = data
        self.cache = cache
        self.context = context
        self.window = window
        self.crop = crop
        self.seed = seed
        self.epoch = 0
        self.hu_range = hu_range
        self.labels = np.array([s.is_positive for s in self.sites], dtype=np.int64)
        self._identities: dict[str, str] = {}

    def set_epoch(self, epoch: int) -> None:
        """Crop positions are drawn from (seed, epoch, index): reproducible, new each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sites)

    def key(self, site: Site) -> str:
        identity = self._identities.get(site.series_uid)
        if identity is None:
            identity = self._identities[site.series_uid] = source_identity(self.data.scan_path(site.series_uid))
        return (
            f"segwindow/v{CACHE_FORMAT}/{site.series_uid}/{identity}/{site.index},{site.row},{site.col}"
            f"/{self.context}/{self.window}/{self.hu_range}"
        )

    def window_of(self, ct: Ct, masks: ScanMask, site: Site) -> np.ndarray:
        """(2c+2, window, window) int16: the context slices, then the middle slice's mask."""
        picks = np.clip(np.arange(site.index - self.context, site.index + self.context + 1), 0, ct.hu.shape[0] - 1)
        center = (site.row, site.col)
        image = np.stack([crop(ct.hu[p], center, (self.window, self.window), fill=AIR_HU) for p in picks])
        label = crop(masks.slice_mask(site.index).astype(np.int16), center, (self.window, self.window), fill=0)
        return np.concatenate([image, label[None]])

    def fill(self, series_uid: str, masks: MaskSource, ct: Ct | None = None) -> int:
        """Cache every missing window of one scan from a single load; returns how many were cut."""
        if self.cache is None:
            return 0
        todo = {self.key(s): s for s in self.sites if s.series_uid == series_uid}
        missing = self.cache.missing(todo)
        if missing:
            ct = ct or load_ct(self.data.scan_path(series_uid), hu_range=self.hu_range)
            scan_masks = masks.get(series_uid, ct)
            for key in missing:
                self.cache.set(key, self.window_of(ct, scan_masks, todo[key]))
        return len(missing)

    def _window(self, site: Site) -> np.ndarray:
        if self.cache is not None:
            stored = self.cache.get(self.key(site))
            if stored is not None:
                return stored
        raise KeyError(f"window of {site} is not cached; call fill() for series {site.series_uid} first")

    def __getitem__(self, i: int) -> SegmentationSample:
        i = int(i)
        site = self.sites[i]
        stored = self._window(site)
        rng = np.random.default_rng((self.seed, self.epoch, i))
        r, c = rng.integers(0, self.window - self.crop + 1, size=2)
        part = stored[:, r : r + self.crop, c : c + self.crop]
        image = torch.from_numpy(part[:-1].astype(np.float32))
        label = torch.from_numpy(part[-1:].astype(np.float32))
        return SegmentationSample(image, label, torch.tensor(i, dtype=torch.int64))


def prepare_scan(
    series_uid: str,
    data: DataDir,
    cache: ArrayCache,
    masks: MaskSource,
    *,
    context: int = 3,
    window: int = 96,
    seed: int = 0,
    negatives_per_nodule: int = 8,
    min_negatives: int = 16,
    lung_share: float = 0.5,
) -> list[Site]:
    """The training sites of one scan, with their windows cut and cached.

    The sites themselves are cached too (keyed like the windows, plus the mask key
    and the sampling parameters), so a later run — or a resumed one — that finds
    them reads no scan at all. Negatives are drawn from a generator seeded by
    (seed, series uid): the same sites whatever order scans are prepared in.
    """
    key = (
        f"segsites/v{CACHE_FORMAT}/{series_uid}/{masks.key(series_uid)}/"
        f"{context},{window},{seed},{negatives_per_nodule},{min_negatives},{lung_share}"
    )
    stored = cache.get(key)
    if stored is not None:
        return [Site(series_uid, int(i), int(r), int(c), bool(p)) for i, r, c, p in stored]
    ct = load_ct(data.scan_path(series_uid))
    scan_masks = masks.get(series_uid, ct)
    nodules = int(np.count_nonzero(scan_masks.boxes_irc[:, 0] >= 0))
    uid_key = int(hashlib.sha1(series_uid.encode()).hexdigest()[:12], 16)
    sites = find_sites(
        ct, scan_masks, negatives=max(min_negatives, negatives_per_nodule * nodules),
        rng=np.random.default_rng([seed, uid_key]), lung_share=lung_share,
    )
    SegmentationCrops(sites, data, cache, context=context, window=window).fill(series_uid, masks, ct)
    # written after the windows: an entry here means they are all cached
    table = np.array([(s.index, s.row, s.col, s.is_positive) for s in sites], dtype=np.int64).reshape(-1, 4)
    cache.set(key, table)
    return sites
