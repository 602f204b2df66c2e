"""Diagnose one CT: segment it, group the blobs into nodules, classify them, give a verdict.

``python -m luna.diagnose`` (see `luna.diagnose.__main__`) is the command; this module
is the pipeline it and ``--run-validation`` share:

1. `segment_ct` (2D UNet over every axial slice, batched) -> probability volume;
2. `group_detections` -> one `Detection` per connected blob at the segmentation
   model's operating threshold (chosen by its training on the validation scans and
   stored in its checkpoint, `operating_threshold`), kept when lung lies
   within ``LUNG_MARGIN_MM`` of its centre (`luna.inference.lungs`: body wall, ribs,
   heart and table are not where lung nodules are); then up to ``SEARCH_BUDGET``
   faint blobs that only a lower threshold shows (`add_faint`: a ground-glass
   nodule, a small nodule whose core peaks just below the operating threshold),
   when the nodule classifier was trained on them (`trained_search_budget`);
3. the nodule classifier on every detection's 32x48x48 chunk (crops gathered into
   one preallocated float32 batch, ``batch_size`` at a time, channels-last 3D; the
   mean over ``views`` mirror images, `luna.inference.classify`), and
   each detection's diameter measured on the CT (`luna.inference.measure`: the
   blob's size follows the UNet's threshold, not the nodule's edge), from the centre
   of the compact structure it sits in when the classifier gives it at least
   ``RECENTRE_MIN_P`` (a large nodule's pieces then share one centre, which is
   reported); detections whose measured spheres overlap are one finding, the one with
   the highest p(nodule) (`luna.inference.merge`);
4. the malignancy classifier on the *accepted* detections only
   (``p_nodule >= nodule_threshold``) — or, when its training found it no better
   than the nodule's diameter alone on the validation nodules, the diameter rule
   stored with it (`luna.models.malignancy.DiameterRule`, fitted on annotated
   diameters) on each detection's measured diameter; `Diagnosis.malignancy_source` says which;
5. the verdict (`verdict`): the highest p(malignant) over accepted nodules against
   ``malignancy_threshold``.

Steps 1-2 are `propose`, steps 3-5 `classify_proposals`; `diagnose` runs both.
The CT is loaded once by the caller; `diagnose` never reads files. `load_models`
builds the networks from the checkpoints `luna.runs.find_models` names.

No silent wrong answer: `check_options` refuses thresholds that are not
probabilities (NaN included), batch sizes below 1 and view counts outside 1-8
before anything runs (the command calls it before loading anything); a model whose
output is not a probability stops the diagnosis with a `LunaError` naming its
checkpoint (`segment_ct`, `classify_chunks`) instead of reporting "no nodule found";
so does a CT that is not in Hounsfield units (`check_hounsfield`: no air anywhere, as
in an 8-bit export, which was diagnosed "no nodule found" with exit 0; no body, as in a
blank export; mostly denser than bone, as in an inverted one; tissue mostly denser than
soft tissue, as with a wrong rescale slope, which found 33 "nodules" in a real slab) or not in
millimetres (`check_spacing`: a header in cm, diagnosed the same way). A scan too short
along z to find a nodule in (`check_coverage`: two slices through a 23 mm nodule were
diagnosed "no nodule found" with exit 0) is refused; one short enough to
miss some carries a warning (`coverage_warnings`, `Diagnosis.warnings`). So does a CT
in which the lung mask finds no lungs (`lung_warnings`: a head CT was diagnosed "no
nodule found" with exit 0 and nothing else said): it is searched whole, since the
mask can also miss real lungs (cut by a small field of view).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from luna.ct import Ct
from luna.errors import LunaError
from luna.inference.classify import DEFAULT_VIEWS, SCREEN_BELOW, check_views, classify_chunks
from luna.inference.grouping import Detection, add_faint, group_detections, search_threshold
from luna.inference.lungs import (
    AIR_THRESHOLD_HU,
    MIN_LUNG_ML,
    LungMask,
    keep_near_lungs,
    lung_mask,
    segmentation_region,
)
from luna.inference.measure import nodule_extent
from luna.inference.merge import distinct_findings
from luna.inference.segment import receptive_radius, segment_ct
from luna.models import build_model_from_checkpoint, check_kind, load_checkpoint
from luna.models.malignancy import DiameterRule, why_diameter_instead
from luna.runs import ModelPaths

__all__ = [
    "DEFAULT_MALIGNANCY_THRESHOLD",
    "DEFAULT_NODULE_THRESHOLD",
    "DEFAULT_SEGMENTATION_THRESHOLD",
    "Diagnosis",
    "Models",
    "Nodule",
    "Proposals",
    "NO_LUNGS",
    "SEARCH_BUDGET",
    "SLAB",
    "classify_proposals",
    "check_hounsfield",
    "check_options",
    "check_axial",
    "check_coverage",
    "check_spacing",
    "coverage_warnings",
    "lung_warnings",
    "diameter_instead",
    "diagnose",
    "load_models",
    "operating_threshold",
    "propose",
    "trained_search_budget",
    "verdict",
]

log = logging.getLogger(__name__)

DEFAULT_NODULE_THRESHOLD = 0.5
DEFAULT_MALIGNANCY_THRESHOLD = 0.5
DEFAULT_SEGMENTATION_THRESHOLD = 0.5
"""For a segmentation checkpoint that stores no operating threshold of its own (`operating_threshold`)."""
LUNG_MARGIN_MM = 15.0
"""A detection is kept when lung lies within this distance of its centre (`luna.inference.lungs`):
the centre of a 30 mm juxta-pleural nodule is at most 15 mm from the lung's air."""
SEARCH_BUDGET = 100
"""Faint blobs (`luna.inference.grouping.add_faint`) added per scan at most: measured on the quality bench
(48 held-out scans, 87 nodules), 100 proposed 82 nodules where 25 proposed 79 and 200 also 82; each costs
one classifier pass."""
RECENTRE_MIN_P = 0.2
"""Detections the classifier gives less are measured from their own centre only (`luna.inference.measure`),
well below the 0.5 at which one is accepted: finding a structure's centre costs 15-30 ms per detection. On the
48 quality-bench scans (run 2026-11-30_02.56.53's models, the same proposals and scores) re-centring from
p 0.2 instead of 0.05 left CPM (0.893), the operating point (0.885 at 0.42 FP/scan) and the diameter rule's
malignancy AUC (0.945) as they were, and the measurement step took 0.58 s per scan instead of 1.44
(0.49 without re-centring)."""


@dataclass(frozen=True)
class Nodule:
    """One classified detection. ``p_malignant`` is None when not assessed."""

    center_xyz: tuple[float, float, float]
    center_irc: tuple[float, float, float]
    diameter_mm: float
    """Measured on the CT around the centre (`luna.inference.measure`); the segmentation blob's
    equivalent diameter when there is nothing to measure (the centre is not nodule tissue)."""
    p_nodule: float
    p_malignant: float | None
    accepted: bool
    """``p_nodule >= nodule_threshold``: reported in the table and the verdict."""
    max_probability: float = 0.0
    """Highest segmentation probability in the blob."""


@dataclass(frozen=True)
class Diagnosis:
    """What `diagnose` found in one CT."""

    series_uid: str
    nodules: tuple[Nodule, ...]
    """Every classified detection, accepted or not, in the order of `group_detections`, but `duplicates`."""
    verdict: str
    malignancy_assessed: bool
    timings: dict = field(default_factory=dict)
    """Seconds per step: segmentation, grouping, classification, malignancy."""
    outside_lungs: int = 0
    """Segmentation detections dropped because they lie away from the lungs."""
    duplicates: tuple[Nodule, ...] = ()
    """Classified detections merged into a higher-scoring one whose measured sphere they overlap
    (`luna.inference.merge`): not reported, not in ``nodules``; never accepted."""
    malignancy_source: str | None = None
    """Where p(malignant) comes from: ``"model"``, ``"diameter: ..."`` (the model's stored diameter rule,
    with why), or None when not assessed."""
    views: int = DEFAULT_VIEWS
    """Test-time mirror images the classifiers averaged over (`luna.inference.classify`)."""
    warnings: tuple[str, ...] = ()
    """What limits this diagnosis that the reader must know (`coverage_warnings`, `lung_warnings`), shown with every
    report."""

    @property
    def accepted(self) -> tuple[Nodule, ...]:
        return tuple(n for n in self.nodules if n.accepted)


@dataclass
class Models:
    """The loaded networks (eval mode, on ``device``) and where they came from (None: not from files)."""

    segmentation: torch.nn.Module
    classification: torch.nn.Module
    malignancy: torch.nn.Module | None
    paths: ModelPaths | None = None
    malignancy_rule: DiameterRule | None = None
    """Given instead of the malignancy model (see `diameter_instead`)."""
    malignancy_rule_reason: str = ""
    segmentation_threshold: float = DEFAULT_SEGMENTATION_THRESHOLD
    search_budget: int = 0
    """Faint blobs proposed per scan at most: as many as the nodule classifier was trained on
    (`trained_search_budget`)."""
    """The segmentation's operating threshold, as its training chose it (`operating_threshold`)."""


def verdict(
    nodules: Sequence[Nodule],
    *,
    malignancy_assessed: bool,
    malignancy_threshold: float = DEFAULT_MALIGNANCY_THRESHOLD,
) -> str:
    """The patient verdict from the classified nodules (only accepted ones count)."""
    accepted = [n for n in nodules if n.accepted]
    if not accepted:
        return "no nodule found"
    if not malignancy_assessed:
        return f"{len(accepted)} nodule(s) found; malignancy not assessed (no malignancy model)"
    scores = [n.p_malignant for n in accepted if n.p_malignant is not None]
    top = max(scores) if scores else 0.0
    if top >= malignancy_threshold:
        return f"malignant nodule suspected (p={top:.2f})"
    return "nodules found, none suspected malignant"


def check_options(
    *,
    segmentation_threshold: float | None = None,
    nodule_threshold: float = DEFAULT_NODULE_THRESHOLD,
    malignancy_threshold: float = DEFAULT_MALIGNANCY_THRESHOLD,
    batch_size: int | None = None,
    segmentation_batch_size: int | None = None,
    views: int = DEFAULT_VIEWS,
) -> None:
    """`LunaError` naming the option when a threshold is not in [0, 1] (NaN never is), a batch size < 1,
    or ``views`` not 1-8. ``segmentation_threshold`` None stands for the model's own."""
    for option, value in (("--segmentation-threshold", segmentation_threshold),
                          ("--nodule-threshold", nodule_threshold),
                          ("--malignancy-threshold", malignancy_threshold)):
        if value is None:
            continue  # only the segmentation's may be None: the model's own
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise LunaError(f"{option} {value!r}: must be a probability between 0 and 1")
    for option, value in (("--batch-size", batch_size), ("--segmentation-batch-size", segmentation_batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LunaError(f"{option} {value!r}: must be at least 1 (or left out for the device's default)")
    check_views(views)


MIN_TISSUE_SHARE = 0.01
"""`check_hounsfield`: at least this share of a chest CT's voxels is tissue (at or above ``AIR_THRESHOLD_HU``).
Measured (every second row and column): the real LIDC-IDRI slabs 0.32 and 0.36, phantoms more; a blank
image (all -1000 HU, diagnosed "no nodule found" with exit 0) 0."""
MAX_BONE_SHARE = 0.25
"""`check_hounsfield`: at most this share of a chest CT's voxels is denser than bone (``BONE_HU``). Measured:
the real LIDC-IDRI slabs 0.006 and 0.012, 12 phantoms 0.008-0.018; LIDC-IDRI-0001 with its HU negated (the
air outside the body at +1000, diagnosed "no nodule found" with exit 0) 0.67."""
BONE_HU = 500
MIN_SOFT_SHARE = 0.5
"""`check_hounsfield`: at least this share of the tissue voxels is soft tissue (fat, muscle, blood, organs: up to
``SOFT_TISSUE_MAX_HU``). Measured: the real LIDC-IDRI slabs 0.87 and 0.91, 16 phantoms 0.86-0.94; LIDC-IDRI-0001
with its HU multiplied by 10 (a wrong rescale slope: 33 "nodules" accepted, exit 0) 0.23."""
SOFT_TISSUE_MAX_HU = 200


def check_hounsfield(ct: Ct) -> None:
    """`LunaError` naming the CT's file when its values cannot be a chest CT's Hounsfield units.

    A chest CT in Hounsfield units holds air at about -1000 HU in its lungs and around
    the body, a body of tissue around 0 HU, and a little bone above ``BONE_HU``. An image
    without any air is in other units (an 8-bit or display-windowed export, a DICOM
    series read without its rescale); one with hardly any tissue (below
    `MIN_TISSUE_SHARE`) holds no body (a blank export); one mostly denser than bone
    (above `MAX_BONE_SHARE`) is inverted or scaled; one whose tissue is mostly denser than
    soft tissue (below `MIN_SOFT_SHARE`) is scaled too. Every threshold of the pipeline
    would read them wrongly ("no nodule found", or nodules everywhere). The shares are counted on
    every second row and column.
    """
    lowest = int(ct.hu.min()) if ct.hu.size else None
    if lowest is None or lowest >= AIR_THRESHOLD_HU:
        raise LunaError(f"{ct.name}: no voxel below {AIR_THRESHOLD_HU} HU (lowest: {lowest}), but a chest CT in "
                        f"Hounsfield units holds air at about -1000 HU; this image is in other units (an 8-bit or "
                        f"windowed export? DICOM without its rescale?): convert it to HU and run again")
    sample = ct.hu[:, ::2, ::2]
    is_tissue = sample >= AIR_THRESHOLD_HU
    tissue_voxels = np.count_nonzero(is_tissue)
    tissue = float(tissue_voxels) / sample.size
    if tissue < MIN_TISSUE_SHARE:
        raise LunaError(f"{ct.name}: {100 * tissue:.2f}% of the voxels at or above {AIR_THRESHOLD_HU} HU, but a chest "
                        f"CT holds a body of tissue around 0 HU (at least {100 * MIN_TISSUE_SHARE:g}%); this image "
                        "is blank or holds no patient: export the scan again")
    bone = float(np.count_nonzero(sample > BONE_HU)) / sample.size
    if bone > MAX_BONE_SHARE:
        raise LunaError(f"{ct.name}: {100 * bone:.0f}% of the voxels above {BONE_HU} HU (denser than bone), but in a "
                        f"chest CT in Hounsfield units they are a few percent; is the image inverted (HU negated) "
                        "or in other units? Convert it to HU and run again")
    soft = float(np.count_nonzero(is_tissue & (sample <= SOFT_TISSUE_MAX_HU))) / tissue_voxels
    if soft < MIN_SOFT_SHARE:
        raise LunaError(f"{ct.name}: only {100 * soft:.0f}% of the tissue voxels lie at {AIR_THRESHOLD_HU} to "
                        f"{SOFT_TISSUE_MAX_HU} HU, where a chest CT's fat, muscle and blood are (at least "
                        f"{100 * MIN_SOFT_SHARE:g}%); are the values scaled (a wrong rescale slope, tenths of HU)? "
                        "Convert it to HU and run again")


PIXEL_SPACING_MM = (0.1, 5.0)
"""In-plane pixel sizes a chest CT can have: LUNA16's are 0.46-0.98 mm; the bounds only catch unit mistakes."""
SLICE_SPACING_MM = (0.1, 20.0)
"""Slice spacings a chest CT can have: LUNA16's are 0.45-2.5 mm, old or thick-slice scans up to 10 mm."""


def check_spacing(ct: Ct) -> None:
    """`LunaError` naming the CT's file when its voxel size is not a CT's in millimetres.

    Every distance of the pipeline is in mm (the lung mask's volume, the lung margin, the
    measured diameter, the merging of overlapping detections): a header written in cm
    (a 512-pixel chest 35 mm wide) was diagnosed "no nodule found" with exit 0.
    """
    spacing = ct.geometry.spacing_xyz
    for axis, value, (low, high) in zip("xyz", spacing, (PIXEL_SPACING_MM, PIXEL_SPACING_MM, SLICE_SPACING_MM)):
        if not low <= value <= high:
            raise LunaError(f"{ct.name}: voxel size {' x '.join(f'{v:g}' for v in spacing)} mm (xyz), but a CT's "
                            f"spacing along {axis} lies within {low:g}-{high:g} mm; is the header in cm or m? "
                            "Write the spacing in mm and run again")


def check_axial(ct: Ct) -> None:
    """`LunaError` naming the CT's file when its slices are not axial (a sagittal or coronal stack).

    The UNet segments the volume slice by slice along its index axis, and the lung mask
    and the coverage rules read that axis as z. A whole-chest phantom saved as a stack
    of sagittal slices (the same voxels, the axes permuted) was diagnosed with exit 0,
    "no lungs found" and 2 accepted detections instead of 5. Oblique axial slices
    (a gantry tilt) pass: the slice axis only has to run more along z than along x or y.
    """
    normal = np.abs(ct.geometry.slice_normal_xyz)
    if normal[2] < normal.max():
        axis = int(np.argmax(normal[:2]))
        raise LunaError(f"{ct.name}: its slices are {('sagittal', 'coronal')[axis]} (the slice axis runs along "
                        f"{'xy'[axis]}), but luna segments axial slices: reformat it to an axial series (slices "
                        "along z) and run again")


MIN_COVERAGE_MM = 10.0
"""The pipeline refuses a CT that covers less along z (slices x slice spacing): it finds almost no nodule there.

Measured with run 2026-11-30_02.56.53's models on slabs cut around each nodule that the
whole scan finds, in 10 quality-bench phantoms (`luna.bench`'s held-out set; 15 nodules,
4.6-17.6 mm): found (p(nodule) >= 0.5) in slabs of 5 mm 0 of 15, 10 mm 6, 15 mm 11, 20 mm
12, 25-30 mm 14, 40 mm 15. LIDC-IDRI-0001's 23 mm nodule was found only at 40 mm (p 0.36
at 30 mm, at most 0.14 below). The UNet's context slices and the classifier's 32-slice
chunk repeat a short scan's end slices, and a nodule cut to a few slices looks like a
vessel. The real LIDC-IDRI-0002 slab covers 15 mm and stays diagnosable, with
`coverage_warnings`'s warning."""
FULL_COVERAGE_MM = 40.0
"""Below this z coverage the diagnosis warns that nodules can be missed (`coverage_warnings`): the shortest
slab in which every nodule of the `MIN_COVERAGE_MM` measurement was found."""


def coverage_mm(ct: Ct) -> float:
    """How far the scan reaches along its slice axis: slices x slice spacing, in mm."""
    return ct.shape_irc[0] * ct.geometry.spacing_irc[0]


def check_coverage(ct: Ct) -> None:
    """`LunaError` naming the CT's file when it covers less than `MIN_COVERAGE_MM` along z: "no nodule found"
    would mean nothing there (two 2.5 mm slices through a 23 mm nodule were diagnosed so, with exit 0)."""
    covered = coverage_mm(ct)
    if covered >= MIN_COVERAGE_MM:
        return
    raise LunaError(f"{ct.name}: {ct.shape_irc[0]} slices of {ct.geometry.spacing_irc[0]:g} mm cover only "
                    f"{covered:.1f} mm along z, too little to find nodules in (at least {MIN_COVERAGE_MM:g} mm; "
                    "a chest CT covers 250-400 mm); give the whole series (for DICOM, the folder of all its slices)")


NO_LUNGS = "no lungs found"
"""The words `lung_warnings`'s warning holds, by which a report recognises it."""


def lung_warnings(proposals: Proposals) -> tuple[str, ...]:
    """The warning of a CT in which the lung mask found no lungs (`NO_LUNGS`), else none.

    A head CT (no air inside the body) was diagnosed "no nodule found", exit 0, with
    nothing to say it was the wrong series. It is not refused: the mask also finds
    nothing where the lungs touch the image's edge (a small reconstruction field of
    view), and such a CT is searched whole and diagnosed as usual. The rule is the
    mask's: an abdomen with pockets of bowel gas of 5 mL or more has "lungs" for it and
    gets no warning.
    """
    if proposals.lungs_found is not False:
        return ()
    return (f"{NO_LUNGS} in this CT (no air-filled region of at least {MIN_LUNG_ML:g} mL inside the body): if it is "
            "not a chest CT (a head or abdomen series of the study?), its verdict means nothing; the whole volume was "
            "searched",)


SLAB = "a slab, not the whole chest"
"""The words `coverage_warnings`'s warning holds, by which a report recognises it."""


def coverage_warnings(ct: Ct) -> tuple[str, ...]:
    """The warning a scan shorter than `FULL_COVERAGE_MM` along z gets (`SLAB`), else none."""
    covered = coverage_mm(ct)
    if covered >= FULL_COVERAGE_MM:
        return ()
    return (f"the scan covers only {covered:.1f} mm along z ({SLAB}): nodules in it can be "
            "missed, large ones and ones near its first or last slice most, and the verdict speaks for the scanned "
            "part only",)


def _extent(ct: Ct, detection: Detection, recentre: bool) -> tuple[tuple[float, float, float], float]:
    """The detection's centre (xyz) and diameter measured on the CT, else (nothing to measure) its own and the
    blob's."""
    measured = nodule_extent(ct, detection.center_xyz, recentre=recentre)
    if measured is None:
        return tuple(float(v) for v in detection.center_xyz), float(detection.diameter_mm)
    return measured.center_xyz, measured.diameter_mm


def _name(models: Models, role: str, what: str) -> str:
    """How errors name a model: its checkpoint when it came from one."""
    path = getattr(models.paths, role, None) if models.paths is not None else None
    return f"the {what} (checkpoint {path})" if path is not None else f"the {what}"


def load_models(paths: ModelPaths, device: torch.device | str = "cpu", *,
                segmentation_threshold: float | None = None) -> Models:
    """Build the networks from their checkpoints, in eval mode on ``device``.

    ``segmentation_threshold``: the user's, which replaces the one stored with the segmentation
    model (`operating_threshold`, not read then, so a damaged stored value can be overridden).

    Each file must hold a model of its role's kind (a segmenter for segmentation,
    classifiers for the others): a classifier given as the segmentation model is a
    `LunaError` naming the file, not a traceback later.
    """

    def load(p: Path | None, kind: str, role: str) -> tuple[torch.nn.Module | None, dict | None]:
        if p is None:
            return None, None
        checkpoint = load_checkpoint(p, map_location="cpu")  # read once: the model and what it recorded
        model = build_model_from_checkpoint(checkpoint, source=f"checkpoint {p}")
        check_kind(model, kind, f"checkpoint {p}", role)
        return model.eval().to(device), checkpoint

    malignancy, checkpoint = load(paths.malignancy, "classifier", "malignancy classifier (--malignancy-path)")
    rule, reason = (diameter_instead(checkpoint, f"checkpoint {paths.malignancy}")
                    if checkpoint is not None else (None, ""))
    segmentation, checkpoint = load(paths.segmentation, "segmenter", "segmentation (--segmentation-path)")
    classification, classifier_checkpoint = load(paths.classification, "classifier",
                                                 "nodule classifier (--classification-path)")
    return Models(
        segmentation,
        classification,
        malignancy,
        paths,
        rule,
        reason,
        (operating_threshold(checkpoint, f"checkpoint {paths.segmentation}") if segmentation_threshold is None
         else float(segmentation_threshold)),
        trained_search_budget(classifier_checkpoint, f"checkpoint {paths.classification}"),
    )


def trained_search_budget(checkpoint: Mapping[str, Any] | None,
                          source: str = "the nodule classifier's checkpoint") -> int:
    """How many faint blobs per scan (`luna.inference.grouping.add_faint`) the nodule classifier was trained
    to reject, as its training recorded; 0 for a checkpoint that records none (trained before faint blobs
    were proposed, or the book's): run `2026-12-01_00.44.51`'s classifier, trained without them, accepted
    9.2 detections per quality-bench scan with them instead of 3.3 (the first 18 scans).
    A stored value that is not a whole number >= 0 is a `LunaError` naming ``source``."""
    value = (checkpoint or {}).get("search_budget", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LunaError(f"{source}: its search_budget {value!r} is not a whole number >= 0; the file is damaged "
                        "or not luna's: train the nodule stage again or use another checkpoint")
    return value


def operating_threshold(checkpoint: Mapping[str, Any] | None, source: str = "the segmentation checkpoint") -> float:
    """The threshold the segmentation stage chose for this model on its validation scans and stored in its
    checkpoint (`luna.evaluate.segmentation.choose_threshold`); `DEFAULT_SEGMENTATION_THRESHOLD` for a
    checkpoint without one (the book's, older runs'). A stored value that is not a probability strictly
    between 0 and 1 is a `LunaError` naming ``source``: at 0 or 1 every voxel or none would be a candidate."""
    stored = checkpoint.get("operating_threshold") if checkpoint is not None else None
    if stored is None:
        return DEFAULT_SEGMENTATION_THRESHOLD
    if isinstance(stored, bool) or not isinstance(stored, (int, float)) or not 0 < stored < 1:
        raise LunaError(f"{source}: its stored operating threshold {stored!r} is not a probability between 0 and 1; "
                        "give --segmentation-threshold, use another checkpoint or train the segmentation again")
    return float(stored)


def diameter_instead(
    checkpoint: Mapping[str, Any] | Path, source: str = "the malignancy checkpoint"
) -> tuple[DiameterRule | None, str]:
    """The diameter rule stored in a malignancy checkpoint (dict or path) and why, when the diagnosis should give
    it instead of the model (`luna.models.malignancy.why_diameter_instead` of the validation metrics the malignancy
    stage recorded); else ``(None, "")``. A rule the diagnosis would give but that is not a finite increasing
    logistic (a damaged file) is a `LunaError` naming ``source``, never NaN probabilities."""
    if not isinstance(checkpoint, Mapping):
        source = f"checkpoint {checkpoint}"
        checkpoint = load_checkpoint(checkpoint, map_location="cpu")
    stored = checkpoint.get("diameter_rule")
    metrics = checkpoint.get("metrics")
    val = metrics.get("val") if isinstance(metrics, dict) else None
    reason = why_diameter_instead(val) if isinstance(val, dict) and isinstance(stored, dict) else None
    if reason is None:
        return None, ""
    try:
        rule = DiameterRule(float(stored["slope_per_mm"]), float(stored["midpoint_mm"]))
    except (KeyError, TypeError, ValueError) as err:
        raise LunaError(f"{source}: its stored diameter rule {stored!r} is damaged ({err}); use another "
                        "malignancy checkpoint or train the malignancy stage again") from None
    return rule, reason


@dataclass(frozen=True, eq=False)
class Proposals:
    """What the segmentation proposes in one CT: the detections the classifiers will see."""

    detections: tuple[Detection, ...]
    """Grouped detections near the lungs, in the order of `group_detections`."""
    outside_lungs: int
    """Detections dropped because no lung lies within ``lung_margin_mm`` of their centre."""
    timings: dict = field(default_factory=dict)
    probabilities: np.ndarray | None = None
    """The probability volume, when asked for (``keep_probabilities``)."""
    lungs_found: bool | None = None
    """Whether the lung mask found lungs; None when no mask was made (``lung_margin_mm`` None)."""


def propose(
    ct: Ct,
    segmentation: torch.nn.Module,
    *,
    device: torch.device | str = "cpu",
    segmentation_batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    segmentation_threshold: float = DEFAULT_SEGMENTATION_THRESHOLD,
    lung_margin_mm: float | None = LUNG_MARGIN_MM,
    search_budget: int = SEARCH_BUDGET,
    keep_probabilities: bool = False,
    progress: bool = False,
    source: str = "the segmentation model",
    lungs: LungMask | None = None,
) -> Proposals:
    """Steps 1-2 of the pipeline: segment, group, and keep the detections near the lungs.

    Lung-field inference: the UNet runs only on the slices and in-plane box within
    ``lung_margin_mm`` of the lungs (plus its receptive radius), where it gives what
    whole-slice inference gives; elsewhere nothing is kept anyway. ``lung_margin_mm``
    None segments every slice whole and keeps every detection. The training stages
    call this once per scan and classify the proposals every epoch (the segmentation
    does not change while a classifier trains); `diagnose` calls it for one CT.
    ``lungs``: the CT's lung mask when the caller has made it already.
    ``search_budget``: faint blobs of the search threshold added at most (0: none;
    `luna.inference.grouping.add_faint`), after the lung rule, so that the budget goes
    to blobs near the lungs.
    """
    check_spacing(ct)
    check_axial(ct)
    check_hounsfield(ct)
    check_coverage(ct)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if lungs is None and lung_margin_mm is not None:
        lungs = lung_mask(ct)
    region = (segmentation_region(lungs, ct, lung_margin_mm, receptive_radius(segmentation))
              if lungs is not None else None)
    timings["lungs"] = time.perf_counter() - t

    t = time.perf_counter()
    probabilities = segment_ct(segmentation, ct, device=device, batch_size=segmentation_batch_size,
                               amp_dtype=amp_dtype, region=region, progress=progress, source=source)
    timings["segmentation"] = time.perf_counter() - t

    t = time.perf_counter()
    detections, outside = keep_near_lungs(group_detections(probabilities, ct, threshold=segmentation_threshold),
                                          ct, lung_margin_mm, lungs)
    if search_budget > 0:
        faint, _ = keep_near_lungs(
            group_detections(probabilities, ct, threshold=search_threshold(segmentation_threshold)),
            ct, lung_margin_mm, lungs)
        detections = add_faint(detections, faint, search_budget)
    timings["grouping"] = time.perf_counter() - t
    return Proposals(tuple(detections), outside, timings, probabilities if keep_probabilities else None,
                     lungs_found=None if lungs is None else not lungs.empty)


def diagnose(
    ct: Ct,
    models: Models,
    *,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    segmentation_batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    segmentation_threshold: float | None = None,
    nodule_threshold: float = DEFAULT_NODULE_THRESHOLD,
    malignancy_threshold: float = DEFAULT_MALIGNANCY_THRESHOLD,
    views: int = DEFAULT_VIEWS,
    lung_margin_mm: float | None = LUNG_MARGIN_MM,
    keep_probabilities: bool = False,
    progress: bool = False,
) -> Diagnosis | tuple[Diagnosis, np.ndarray]:
    """Run the whole pipeline on one CT (see the module docstring).

    ``segmentation_threshold`` None: the segmentation model's operating threshold
    (`Models.segmentation_threshold`).

    With ``keep_probabilities`` returns ``(diagnosis, probability volume)`` so the
    caller can save the mask without segmenting twice. ``progress``: a progress bar
    over the slices while segmenting (the long step).
    """
    check_options(segmentation_threshold=segmentation_threshold, nodule_threshold=nodule_threshold,
                  malignancy_threshold=malignancy_threshold, batch_size=batch_size,
                  segmentation_batch_size=segmentation_batch_size, views=views)
    if segmentation_threshold is None:
        segmentation_threshold = models.segmentation_threshold
    proposals = propose(ct, models.segmentation, device=device, segmentation_batch_size=segmentation_batch_size,
                        amp_dtype=amp_dtype, segmentation_threshold=segmentation_threshold,
                        lung_margin_mm=lung_margin_mm, search_budget=models.search_budget,
                        keep_probabilities=keep_probabilities,
                        progress=progress, source=_name(models, "segmentation", "segmentation model"))
    result = classify_proposals(ct, proposals, models, device=device, batch_size=batch_size, amp_dtype=amp_dtype,
                                nodule_threshold=nodule_threshold, malignancy_threshold=malignancy_threshold,
                                views=views)
    if keep_probabilities:
        return result, proposals.probabilities
    return result


def classify_proposals(
    ct: Ct,
    proposals: Proposals,
    models: Models,
    *,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    nodule_threshold: float = DEFAULT_NODULE_THRESHOLD,
    malignancy_threshold: float = DEFAULT_MALIGNANCY_THRESHOLD,
    views: int = DEFAULT_VIEWS,
    screen_below: float | None = SCREEN_BELOW,
) -> Diagnosis:
    """Steps 3-5: p(nodule) for every proposal, one finding per overlap, p(malignant) for the accepted ones,
    the verdict.

    ``views``: test-time mirror images each classifier averages over (`luna.inference.classify`);
    ``screen_below``: the nodule classifier's first look, one view, below which a proposal gets no more
    (None: every view for every proposal)."""
    timings = dict(proposals.timings)
    detections = proposals.detections
    t = time.perf_counter()
    centers = [d.center_xyz for d in detections]
    p_nodule = classify_chunks(
        models.classification, ct, centers, device=device, batch_size=batch_size, amp_dtype=amp_dtype,
        views=views, screen_below=screen_below, source=_name(models, "classification", "nodule classifier"),
    )
    timings["classification"] = time.perf_counter() - t

    t = time.perf_counter()
    extents = [_extent(ct, d, bool(p >= RECENTRE_MIN_P)) for d, p in zip(detections, p_nodule)]
    measured_xyz = [c for c, _ in extents]
    measured_irc = ct.geometry.xyz_to_irc(np.asarray(measured_xyz, dtype=np.float64).reshape(-1, 3))
    diameters = [d for _, d in extents]
    distinct = distinct_findings(measured_xyz, diameters, p_nodule)
    timings["measurement"] = time.perf_counter() - t

    t = time.perf_counter()
    accepted = (p_nodule >= nodule_threshold) & distinct
    p_malignant: list[float | None] = [None] * len(detections)
    if models.malignancy_rule is not None and accepted.any():
        idx = np.flatnonzero(accepted)
        for i, s in zip(idx, models.malignancy_rule.probability([diameters[i] for i in idx])):
            p_malignant[i] = float(s)
    elif models.malignancy is not None and accepted.any():
        idx = np.flatnonzero(accepted)
        scores = classify_chunks(
            models.malignancy, ct, [measured_xyz[i] for i in idx],
            device=device, batch_size=batch_size, amp_dtype=amp_dtype, views=views,
            source=_name(models, "malignancy", "malignancy classifier"),
        )
        for i, s in zip(idx, scores):
            p_malignant[i] = float(s)
    timings["malignancy"] = time.perf_counter() - t

    classified = [
        Nodule(
            center_xyz=measured_xyz[k],
            center_irc=tuple(float(v) for v in measured_irc[k]),
            diameter_mm=diameters[k],
            p_nodule=float(p_nodule[k]),
            p_malignant=p_malignant[k],
            accepted=bool(accepted[k]),
            max_probability=float(d.max_probability),
        )
        for k, d in enumerate(detections)
    ]
    nodules = tuple(n for n, keep in zip(classified, distinct) if keep)
    duplicates = tuple(n for n, keep in zip(classified, distinct) if not keep)
    assessed = models.malignancy is not None
    source = None if not assessed else (
        f"diameter: {models.malignancy_rule_reason}" if models.malignancy_rule is not None else "model")
    result = Diagnosis(
        series_uid=ct.series_uid,
        nodules=nodules,
        verdict=verdict(nodules, malignancy_assessed=assessed, malignancy_threshold=malignancy_threshold),
        malignancy_assessed=assessed,
        timings=timings,
        outside_lungs=proposals.outside_lungs,
        duplicates=duplicates,
        malignancy_source=source,
        views=views,
        warnings=coverage_warnings(ct) + lung_warnings(proposals),
    )
    return result
