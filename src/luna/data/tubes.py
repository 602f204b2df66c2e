"""Tube distractors: straight vessels drawn into the nodule classifier's training chunks.

A nodule is a blob; a vessel is a tube. A classifier trained on one generator's
phantoms can learn that generator's vessels instead (where they run, how thick they
are away from the hila) and then read any dense tube as a nodule: run ``15.56.03``
accepted a straight 70 mm cylinder of 35 HU drawn into a luna phantom's lung in
0, 12, 21 and 22 of 24 tries at radius 1, 2, 3 and 4 mm, and on another generator's
phantoms (``scripts/cartoon_phantoms.py``, straight vessels up to 9 mm thick) it
accepted about 99 false positives per scan, most of them on vessels.

`TubeDistractors` draws one straight tube into a share of the chunks of a training
batch, where the label says what may be drawn:

- a **negative** gets a tube whose axis passes within one tube radius of the chunk's
  centre: a candidate centred on a vessel, the false proposal the diagnosis must
  reject;
- a **positive** of known diameter ``D`` keeps its label: half the time the tube runs
  through the nodule but is thin (radius at most a quarter of ``D``, a vessel
  traversing it), otherwise it passes at least ``D / 2`` plus its own radius from the
  centre (a vessel beside or attached to it). So a tube never says "not a nodule" by
  itself: only a centre that lies on a tube and nowhere wider does. Positives of
  unknown diameter are left as they are.

A share ``ends`` of the tubes (default half) end at that point instead of running
through the chunk, with a round end no wider than the tube: a negative centred on a
vessel's tip, a vessel ending at or in a nodule. With lines alone, run ``15.56.03``'s
UNet and classifier trained again for 10 epochs rejected every cylinder above (0-1
of 24 per radius) and a fork of three tubes as well, but of the 845 structures it
still accepted on the other generator's 20 scans, the commonest were vessel tips
and thin vessels. With ends as well (the defaults, share 0.5): cylinders 0/0/0/1 of
24, the other generator's CPM 0.419 -> 0.513, LIDC-IDRI-0001's nodule and nothing
else accepted; but on luna's own 48 held-out phantoms CPM 0.926 -> 0.844 (small
nodules on vessels look like a tube's tip at this scale). With generator 5's phantoms
(juxta-pleural nodules on every border of the lung) the cost is 0.808 -> 0.795 on its
held-out set, for 0.380 -> 0.558 on the other generator's and 7 -> 0 structures
accepted besides LIDC-IDRI-0001's nodule, so the nodule stage's ``--tubes`` is 0.5 by
default (README Quality).

Chunks carry no spacing, so tubes are drawn in voxels: radius uniform in
[``radius[0]``, ``radius[1]``] in-plane voxels (defaults 1-7: 0.7-5 mm at 0.7 mm), the
index axis ``a`` times coarser than the in-plane ones with ``a`` uniform in [1, 3.5]
(0.7 mm pixels and 0.7-2.5 mm slices). The nodule's ``D`` in voxels is bounded both
ways from LUNA16's in-plane spacings (0.46-0.98 mm): clearance assumes 0.5 mm pixels
(the nodule at its largest in voxels), traversal 1 mm (at its smallest). The tube
keeps a partial-volume edge one voxel wide and only ever raises a voxel towards its
density (uniform in ``hu``; vessels are 0-80 HU, thin ones lower by partial volume),
so denser structures it crosses stay as they were.

Run it on the raw batch before `luna.data.augment.Augment3d`: the tube is then
turned, scaled, blurred and made noisy with everything else. It draws from its own
``torch.Generator`` (``seed``), never from the augmentation's, whose stream is pinned.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TubeDistractors", "TRAVERSE_SPACING_MM", "CLEAR_SPACING_MM"]

CLEAR_SPACING_MM = 0.5
"""In-plane spacing assumed when a tube must keep clear of a nodule (the finest in LUNA16: the nodule at its
largest in voxels)."""
TRAVERSE_SPACING_MM = 1.0
"""In-plane spacing assumed when a thin tube runs through a nodule (coarser than any in LUNA16: the nodule at
its smallest in voxels)."""


class TubeDistractors(nn.Module):
    """Draw one straight tube into a ``share`` of the chunks of a (N, 1, D, H, W) HU batch.

    ``forward(chunks, labels, diameter_mm)``: ``labels`` (N,) 1 for a nodule,
    ``diameter_mm`` (N,) the nodule's diameter (NaN or 0 for a positive of unknown
    size: left as it is; ignored for negatives). Returns a new tensor; the input is
    never written. ``forward(..., return_params=True)`` also returns a dict of the
    per-sample draws (``drawn``, ``radius``, ``distance`` from the centre to the
    axis, ``hu``, ``anisotropy``, ``direction``, ``offset`` the axis's point nearest
    the centre, ``end``: the tube starts there), all in voxels.
    """

    def __init__(self, share: float = 0.5, radius: tuple[float, float] = (1.0, 7.0),
                 hu: tuple[float, float] = (-40.0, 80.0), ends: float = 0.5, *, seed: int | None = None):
        super().__init__()
        if not 0 <= share <= 1:
            raise ValueError(f"share is the fraction of chunks that get a tube, in [0, 1], got {share}")
        if not 0.5 <= radius[0] <= radius[1]:
            raise ValueError(f"radius is an in-plane voxel range with 0.5 <= low <= high, got {radius}")
        if not hu[0] <= hu[1]:
            raise ValueError(f"hu is a range (low, high), got {hu}")
        if not 0 <= ends <= 1:
            raise ValueError(f"ends is the fraction of tubes that end in the chunk, in [0, 1], got {ends}")
        self.share = float(share)
        self.radius = (float(radius[0]), float(radius[1]))
        self.hu = (float(hu[0]), float(hu[1]))
        self.ends = float(ends)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    def extra_repr(self) -> str:
        return f"share={self.share}, radius={self.radius}, hu={self.hu}, ends={self.ends}"

    def sample(self, labels: Tensor, diameter_mm: Tensor) -> dict[str, Tensor]:
        """The per-sample draws (CPU, float64), always the same draws in the same order."""
        g = self.generator
        n = int(labels.shape[0])
        f64 = torch.float64
        draw_share = torch.rand(n, generator=g, dtype=f64)
        draw_radius = torch.rand(n, generator=g, dtype=f64)
        draw_hu = torch.rand(n, generator=g, dtype=f64)
        draw_aniso = torch.rand(n, generator=g, dtype=f64)
        direction = torch.randn(n, 3, generator=g, dtype=f64)
        across = torch.randn(n, 3, generator=g, dtype=f64)
        draw_distance = torch.rand(n, generator=g, dtype=f64)
        draw_through = torch.rand(n, generator=g, dtype=f64) < 0.5
        draw_end = torch.rand(n, generator=g, dtype=f64) < self.ends

        positive = labels.detach().cpu().to(torch.bool)
        diameter = torch.nan_to_num(diameter_mm.detach().cpu().to(f64), nan=0.0)
        low, high = self.radius
        radius = low + draw_radius * (high - low)
        distance = draw_distance * radius  # negatives: the centre lies on the tube
        drawn = draw_share < self.share
        # positives: through the nodule when thin enough, else beside it
        clear = diameter / 2 / CLEAR_SPACING_MM
        small = diameter / 2 / TRAVERSE_SPACING_MM
        thin_max = small / 2
        through = positive & draw_through & (thin_max >= low)
        radius = torch.where(through, low + draw_radius * (torch.clamp(thin_max, min=low) - low), radius)
        distance = torch.where(through, draw_distance * small * 0.3, distance)
        beside = positive & ~through
        distance = torch.where(beside, clear + radius + draw_distance * 6.0, distance)
        drawn &= ~positive | (diameter > 0)

        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        across = across - (across * direction).sum(1, keepdim=True) * direction
        across = across / across.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return {
            "drawn": drawn,
            "radius": radius,
            "distance": distance,
            "hu": self.hu[0] + draw_hu * (self.hu[1] - self.hu[0]),
            "anisotropy": 1.0 + 2.5 * draw_aniso,
            "direction": direction,
            "offset": across * distance[:, None],
            "end": draw_end,
        }

    def forward(self, chunks: Tensor, labels: Tensor, diameter_mm: Tensor, return_params: bool = False):
        if chunks.dim() != 5:
            raise ValueError(f"expected a (N, C, D, H, W) batch, got shape {tuple(chunks.shape)}")
        params = self.sample(labels, diameter_mm)
        out = draw_tubes(chunks, params) if bool(params["drawn"].any()) else chunks
        return (out, params) if return_params else out


def draw_tubes(chunks: Tensor, params: dict[str, Tensor]) -> Tensor:
    """``chunks`` with the tubes of ``params`` (`TubeDistractors.sample`) drawn where ``drawn``."""
    rows = torch.nonzero(params["drawn"]).flatten()
    out = chunks.clone()
    device, dtype = chunks.device, chunks.dtype
    d, h, w = chunks.shape[2:]
    grid = torch.stack(torch.meshgrid(
        torch.arange(d, dtype=torch.float32, device=device) - (d - 1) / 2,
        torch.arange(h, dtype=torch.float32, device=device) - (h - 1) / 2,
        torch.arange(w, dtype=torch.float32, device=device) - (w - 1) / 2,
        indexing="ij"), dim=-1)  # (D, H, W, 3) voxels from the centre, index axis first
    for i in rows.tolist():
        scale = torch.tensor([float(params["anisotropy"][i]), 1.0, 1.0], device=device)
        p = grid * scale - params["offset"][i].to(device=device, dtype=torch.float32)
        u = params["direction"][i].to(device=device, dtype=torch.float32)
        along = (p * u).sum(-1, keepdim=True)
        if bool(params["end"][i]):  # the tube starts at the offset point, with a round end
            along = along.clamp_min(0.0)
        off_axis = (p - along * u).norm(dim=-1)
        occupancy = (float(params["radius"][i]) + 0.5 - off_axis).clamp(0.0, 1.0).to(dtype)
        hu = float(params["hu"][i])
        chunk = out[i]
        out[i] = chunk + occupancy * (hu - chunk).clamp_min(0.0)
    return out

