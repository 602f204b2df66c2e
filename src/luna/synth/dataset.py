"""Generating a whole synthetic dataset, its summary statistics, and the generate-once default.

Layout (as LUNA16, plus our ground truth)::

    DIR/subset0 .. subsetK/<uid>.mhd + .raw
    DIR/candidates.csv, annotations.csv, annotations_excluded.csv,
        annotations_with_malignancy.csv
    DIR/ground_truth.csv   every finding: centre (xyz and irc), diameter, type, ratings...
    DIR/scans.csv          every scan: geometry, noise, blur, HU medians per tissue...
    DIR/dicom/<uid>/       with --dicom
    DIR/preview/<uid>.png  with --preview
    DIR/synth.json         written last: the dataset is complete

While generating, ``DIR/.synth-partial`` marks the directory as ours and unfinished;
`ensure_dataset` regenerates such a directory and never uses it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from luna.errors import LunaError
from luna.synth.nodules import DIAMETER_QUANTILES, LUNA16_MALIGNANT_SHARE, NODULE_TYPES, READER_MODEL, SIZE_BANDS_MM
from luna.synth.output import (
    atomic_write_text,
    fmt10,
    fmt_candidate,
    fmt_repr,
    make_uid,
    write_csv,
    write_dicom_series,
    write_metaimage,
)
from luna.synth.presets import PRESETS
from luna.synth.scan import FLIPPED, IDENTITY, ScanSpec, make_scan

__all__ = ["SynthSummary", "generate_dataset", "ensure_dataset", "is_complete", "scan_specs", "GENERATOR_VERSION",
           "MARKER", "visible_key", "visible_malignancy_scores"]

log = logging.getLogger("luna.synth")

GENERATOR_VERSION = 5
"""Bump whenever the output for a given preset and seed changes: older datasets are regenerated."""
MARKER = "synth.json"
PARTIAL = ".synth-partial"
CSV_FILES = ("candidates.csv", "annotations.csv", "annotations_excluded.csv", "annotations_with_malignancy.csv",
             "ground_truth.csv", "scans.csv")

ANNOTATION_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
MALIGNANCY_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "mal_bool", "mal_details", "bboxLowX",
                     "bboxLowY", "bboxLowZ", "bboxHighX", "bboxHighY", "bboxHighZ", "len_mal_details")
CANDIDATE_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "class")
GROUND_TRUTH_HEADER = ("seriesuid", "finding_id", "kind", "type", "excluded", "coordX", "coordY", "coordZ", "index",
                       "row", "col", "diameter_mm", "center_hu", "mal_details", "mal_bool", "malignancy",
                       "spiculation", "lobulation", "calcified", "pleura_distance_mm", "wall_overlap",
                       "vessel_contact")
SCAN_COLUMNS = ("seriesuid", "subset", "slices", "rows", "cols", "spacingX", "spacingY", "spacingZ", "originX",
                "originY", "originZ", "direction", "fov_mm", "padding_hu", "noise_hu", "blur_mm", "kernel", "nps_peak",
                "contrast", "arms_down",
                "emphysema", "body_width_mm", "lung_length_mm", "vessel_segments", "airway_segments", "nodules",
                "excluded", "candidates", "hu_air", "hu_lung", "hu_fat", "hu_soft_tissue", "hu_bone", "hu_marrow",
                "hu_vessel", "hu_nodule", "hu_padding", "vessel_share_of_lung", "seconds")

@dataclass(frozen=True)
class SynthSummary:
    """What was generated, with the statistics that show how realistic it is."""

    out_dir: str
    preset: str
    seed: int
    scans: int
    subsets: int
    seconds: float
    bytes_written: int
    slices: tuple[int, int]
    inplane_size: int
    inplane_spacing_mm: tuple[float, float]
    slice_spacing_mm: tuple[float, float]
    directions: dict
    padding: dict
    contrast_scans: int
    nodules: int
    nodule_types: dict
    excluded_small: int
    excluded_non_nodules: int
    diameter_quantiles_mm: dict
    malignant: int
    malignant_by_size: dict
    candidates: int
    candidates_positive: int
    candidate_sources: dict
    hu_medians: dict
    hu_lung_range: tuple[int, int]
    noise_hu_range: tuple[float, float]
    blur_mm_range: tuple[float, float]
    vessel_segments_per_scan: float
    airway_segments_per_scan: float
    vessel_share_of_lung: float
    min_center_hu_annotated: int | None
    juxta_pleural_wall_overlap: float
    other_nodule_wall_overlap: float
    kernels: dict = field(default_factory=dict)
    """Scans per reconstruction kernel (standard, sharp)."""
    arms_down_scans: int = 0

    def format(self) -> str:
        mb = self.bytes_written / 1e6
        q = self.diameter_quantiles_mm
        lines = [
            f"luna.synth: preset {self.preset}, seed {self.seed}: {self.scans} scans in {self.subsets} subsets -> "
            f"{self.out_dir} ({mb:,.0f} MB) in {self.seconds:.1f} s ({self.seconds / max(self.scans, 1):.2f} s per scan)",
            f"  geometry: {self.inplane_size}x{self.inplane_size} x {self.slices[0]}-{self.slices[1]} slices; in-plane "
            f"{self.inplane_spacing_mm[0]:.3f}-{self.inplane_spacing_mm[1]:.3f} mm, slices "
            f"{self.slice_spacing_mm[0]:g}-{self.slice_spacing_mm[1]:g} mm; direction "
            + ", ".join(f"{k} {v}" for k, v in self.directions.items())
            + "; outside the field of view "
            + ", ".join(f"{k} {v}" for k, v in self.padding.items())
            + f"; contrast {self.contrast_scans}",
            f"  image: noise {self.noise_hu_range[0]:.0f}-{self.noise_hu_range[1]:.0f} HU, blur "
            f"{self.blur_mm_range[0]:.2f}-{self.blur_mm_range[1]:.2f} mm, kernels "
            + ", ".join(f"{k} {v}" for k, v in self.kernels.items())
            + f"; arms down {self.arms_down_scans}; HU medians "
            + ", ".join(f"{k} {v}" for k, v in self.hu_medians.items())
            + f"; lung median per scan {self.hu_lung_range[0]}..{self.hu_lung_range[1]}",
            f"  vessels: {self.vessel_segments_per_scan:,.0f} segments and {self.airway_segments_per_scan:,.0f} airway "
            f"segments per scan; vessels are {100 * self.vessel_share_of_lung:.1f}% of lung voxels",
            f"  nodules: {self.nodules} annotated ("
            + ", ".join(f"{k} {v}" for k, v in self.nodule_types.items())
            + f"), excluded: {self.excluded_small} < 3 mm and {self.excluded_non_nodules} non-nodules",
            f"  diameter (mm) p10/p25/p50/p75/p90: {q['p10']:.1f}/{q['p25']:.1f}/{q['p50']:.1f}/{q['p75']:.1f}/"
            f"{q['p90']:.1f} (LUNA16 {_luna_q(10):.1f}/{_luna_q(25):.1f}/{_luna_q(50):.1f}/{_luna_q(75):.1f}/"
            f"{_luna_q(90):.1f})",
            f"  malignant: {self.malignant} of {self.nodules} ({100 * self.malignant / max(self.nodules, 1):.0f}%; "
            f"LUNA16 32%); by size "
            + ", ".join(f"{k} {v}" for k, v in self.malignant_by_size.items()),
            f"  candidates: {self.candidates:,} ({self.candidates / max(self.scans, 1):.0f} per scan), class 1: "
            f"{self.candidates_positive}; class 0 from "
            + ", ".join(f"{k} {v}" for k, v in self.candidate_sources.items()),
            f"  checks: lowest HU at an annotated nodule centre {self.min_center_hu_annotated} (lung "
            f"{self.hu_medians.get('lung')}); share outside the lung: juxta-pleural "
            f"{100 * self.juxta_pleural_wall_overlap:.0f}%, other nodules {100 * self.other_nodule_wall_overlap:.1f}%",
        ]
        return "\n".join(lines)


def _luna_q(p: float) -> float:
    q = np.asarray(DIAMETER_QUANTILES)
    return float(np.interp(p / 2.5, np.arange(len(q)), q))


# --- the scan worker ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    spec: ScanSpec
    out_dir: str
    dicom: bool
    preview: bool


def _run_job(job: _Job) -> dict:
    """Generate one scan and write its files; return what the CSVs and the summary need."""
    t0 = time.perf_counter()
    out = Path(job.out_dir)
    spec = job.spec
    scan = make_scan(spec)
    sub = out / f"subset{spec.subset}"
    sub.mkdir(parents=True, exist_ok=True)
    mhd = sub / f"{spec.series_uid}.mhd"
    nbytes = write_metaimage(mhd, scan.hu, scan.geometry)
    files = [str(mhd.relative_to(out)), str(mhd.with_suffix(".raw").relative_to(out))]
    if job.dicom:
        folder = out / "dicom" / spec.series_uid
        folder.parent.mkdir(parents=True, exist_ok=True)
        nbytes += write_dicom_series(
            folder, scan.hu, scan.geometry, spec.series_uid, seed_text=f"{spec.preset.name}:{spec.seed}:{spec.index}",
            patient_id=f"SYNTH-{spec.preset.name}-{spec.seed}-{spec.index:04d}",
            slice_thickness=scan.info["slice_thickness_mm"], padding_hu=scan.info["padding_hu"])
    if job.preview:
        from luna.synth.preview import write_preview

        folder = out / "preview"
        folder.mkdir(parents=True, exist_ok=True)
        write_preview(folder / f"{spec.series_uid}.png", scan)
    g = scan.geometry
    findings = []
    for f in scan.findings:
        irc = g.xyz_to_irc(f.center_xyz)
        k, r, c = (int(v) for v in np.clip(np.rint(irc), 0, np.array(scan.hu.shape) - 1))
        findings.append(dict(
            finding_id=f.finding_id, kind=f.kind, type=f.type, excluded=f.excluded,
            xyz=[float(v) for v in f.center_xyz], irc=[float(v) for v in irc], diameter_mm=f.diameter_mm,
            center_hu=int(scan.hu[k, r, c]), ratings=list(f.ratings), malignant=f.malignant,
            spiculation=f.spiculation, lobulation=f.lobulation, calcified=f.calcified,
            pleura_distance_mm=f.pleura_distance_mm, wall_overlap=f.wall_overlap, vessel_contact=f.vessel_contact,
        ))
    return dict(
        index=spec.index,
        uid=spec.series_uid,
        subset=spec.subset,
        shape=list(scan.hu.shape),
        origin=list(g.origin_xyz),
        spacing=list(g.spacing_xyz),
        direction=list(g.direction),
        findings=findings,
        candidates=[(list(c.xyz), c.is_nodule, c.source) for c in scan.candidates],
        info=scan.info,
        files=files,
        bytes=nbytes,
        seconds=time.perf_counter() - t0,
    )


# --- the dataset --------------------------------------------------------------------------------

def generate_dataset(out_dir, preset: str = "demo", *, scans: int | None = None, seed: int = 0, dicom: bool = False,
                     preview: bool = False, progress: bool = True, workers: int | None = None) -> SynthSummary:
    """Generate a synthetic LUNA16-layout dataset in ``out_dir`` and return its statistics.

    The same ``preset``, ``scans`` and ``seed`` always give byte-identical scans and
    CSVs, whatever ``workers`` is. ``out_dir`` must be new, empty, or an earlier
    luna.synth dataset (which is replaced).
    """
    _refuse_in_bootstrapping_worker()
    if preset not in PRESETS:
        raise LunaError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    n = p.scans if scans is None else int(scans)
    if n < 1:
        raise LunaError(f"--scans must be at least 1, got {n}")
    if not 0 <= int(seed) < 2**63:
        raise LunaError(f"--seed must be a non-negative integer, got {seed}")
    seed = int(seed)
    out = Path(out_dir)
    t0 = time.perf_counter()
    _claim(out, preset, seed)
    specs = scan_specs(preset, seed, n)
    n_subsets = _subset_count(p, n)
    for k in range(n_subsets):
        (out / f"subset{k}").mkdir(parents=True, exist_ok=True)
    jobs = [_Job(s, str(out), dicom, preview) for s in specs]
    results = _run_all(jobs, workers, progress, f"synth {preset}")
    results.sort(key=lambda r: r["index"])
    nbytes = sum(r["bytes"] for r in results)
    nbytes += _write_tables(out, results)
    seconds = time.perf_counter() - t0
    summary = _summarise(out, preset, seed, n_subsets, results, seconds, nbytes)
    marker = dict(
        generator="luna.synth", version=GENERATOR_VERSION, preset=preset, seed=seed, scans=n, subsets=n_subsets,
        dicom=dicom, preview=preview,
        files={f: (out / f).stat().st_size for r in results for f in r["files"]},
    )
    atomic_write_text(out / MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")
    (out / PARTIAL).unlink(missing_ok=True)
    return summary


def scan_specs(preset: str, seed: int, scans: int) -> list[ScanSpec]:
    """The specs of the first ``scans`` scans of a dataset: what `generate_dataset` writes, in order."""
    p = PRESETS[preset]
    n_subsets = _subset_count(p, scans)
    specs = []
    for i in range(scans):
        direction = IDENTITY if i == 0 else FLIPPED if i == 1 else None
        specs.append(ScanSpec(index=i, series_uid=make_uid(preset, seed, i, "series"), subset=i * n_subsets // scans,
                              preset=p, seed=seed, direction=direction))
    return specs


def _subset_count(p, scans: int) -> int:
    return min(10, math.ceil(scans / p.scans_per_subset))


def _run_all(jobs: list[_Job], workers: int | None, progress: bool, desc: str) -> list[dict]:
    from tqdm import tqdm

    voxels = sum(j.spec.preset.inplane_size**2 * np.mean(j.spec.preset.slices) for j in jobs)
    if workers is None:
        # Starting workers costs about a second; only worth it for real work.
        workers = 1 if voxels < 2e7 else min(len(jobs), os.cpu_count() or 1)
    workers = max(1, min(int(workers), len(jobs)))
    bar = tqdm(total=len(jobs), desc=desc, unit="scan", disable=not progress, leave=True)
    results = []
    try:
        if workers == 1:
            for job in jobs:
                results.append(_run_job(job))
                bar.update()
        else:
            # spawn: the parent may hold threads (torch, BLAS) that fork would copy mid-state.
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                    for result in pool.map(_run_job, jobs):
                        results.append(result)
                        bar.update()
            except BrokenProcessPool as err:
                # E.g. a script that calls us without an ``if __name__ == "__main__":`` guard,
                # which spawned workers cannot import. Finish here instead.
                log.warning("luna.synth: worker processes failed (%s); generating in this process", err)
                for job in jobs[len(results):]:
                    results.append(_run_job(job))
                    bar.update()
    finally:
        bar.close()
    return results


def _refuse_in_bootstrapping_worker() -> None:
    """Fail fast in a spawned worker that is re-running an unguarded main script.

    Such a worker would otherwise start generating into the same directory as its
    parent (or wait forever for the parent's lock). Failing makes the parent finish
    the work itself (see `_run_all`).
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "luna.synth was called while a worker process was importing the main script; "
            "put the call under `if __name__ == \"__main__\":`")


def _made_here(out: Path) -> bool:
    """Whether luna.synth generated (or began generating) a dataset in ``out``."""
    return (out / MARKER).exists() or (out / PARTIAL).exists()


def _claim(out: Path, preset: str, seed: int) -> None:
    """Make ``out`` ours and empty of old generated files, or refuse if it holds someone else's data."""
    if out.exists() and not out.is_dir():
        raise LunaError(f"{out}: exists and is not a directory; choose another --out")
    if out.exists():
        entries = [e for e in out.iterdir() if e.name != ".synth.lock"]
        if entries and not _made_here(out):
            raise LunaError(
                f"{out}: directory is not empty and was not made by luna.synth; choose a new or empty "
                "directory (it is never overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / PARTIAL, json.dumps(dict(preset=preset, seed=seed, version=GENERATOR_VERSION)) + "\n")
    (out / MARKER).unlink(missing_ok=True)
    for entry in out.iterdir():
        name = entry.name
        if (entry.is_dir() and (name.startswith("subset") or name in ("dicom", "preview") or name.startswith(".tmp"))):
            shutil.rmtree(entry)
        elif name in CSV_FILES or name.startswith(".") and ".tmp-" in name:
            entry.unlink()


def _write_tables(out: Path, results: list[dict]) -> int:
    ann, exc, mal, cand, truth, scans = [], [], [], [], [], []
    for r in results:
        uid = r["uid"]
        for f in r["findings"]:
            x, y, z = f["xyz"]
            d = f["diameter_mm"]
            if f["excluded"]:
                exc.append((uid, fmt10(x), fmt10(y), fmt10(z), fmt10(d) if f["kind"] == "nodule" else "-1"))
            else:
                ann.append((uid, fmt10(x), fmt10(y), fmt10(z), fmt10(d)))
                # The bounding box of the nodule: centre +- radius, widened to whole voxel sizes.
                rad = d / 2
                sp = r["spacing"]
                lo = [math.floor((v - rad) / s) * s for v, s in zip((x, y, z), sp)]
                hi = [math.ceil((v + rad) / s) * s for v, s in zip((x, y, z), sp)]
                ratings = f["ratings"]
                mal.append((uid, fmt_repr(float(fmt10(x))), fmt_repr(float(fmt10(y))), fmt_repr(float(fmt10(z))),
                            fmt_repr(float(fmt10(d))), "True" if f["malignant"] else "False", str(ratings),
                            *(fmt_repr(v) for v in lo), *(fmt_repr(v) for v in hi), str(len(ratings))))
            irc = f["irc"]
            truth.append((uid, f["finding_id"], f["kind"], f["type"], f["excluded"], fmt10(x), fmt10(y), fmt10(z),
                          *(f"{v:.3f}" for v in irc), fmt10(d), f["center_hu"],
                          str(f["ratings"]) if f["ratings"] else "", f["malignant"],
                          f"{np.mean(f['ratings']):.2f}" if f["ratings"] else "", f["spiculation"], f["lobulation"],
                          f["calcified"], f"{f['pleura_distance_mm']:.2f}", f"{f['wall_overlap']:.3f}",
                          f["vessel_contact"]))
        for xyz, is_nodule, _ in r["candidates"]:
            cand.append((uid, *(fmt_candidate(v) for v in xyz), "1" if is_nodule else "0"))
        info = r["info"]
        row = dict(
            seriesuid=uid, subset=r["subset"], slices=r["shape"][0], rows=r["shape"][1], cols=r["shape"][2],
            spacingX=r["spacing"][0], spacingY=r["spacing"][1], spacingZ=r["spacing"][2], originX=r["origin"][0],
            originY=r["origin"][1], originZ=r["origin"][2], direction=" ".join(f"{v:g}" for v in r["direction"]),
            nodules=sum(not f["excluded"] for f in r["findings"]),
            excluded=sum(f["excluded"] for f in r["findings"]), candidates=len(r["candidates"]),
            seconds=f"{r['seconds']:.2f}", **{k: info[k] for k in SCAN_COLUMNS if k in info})
        scans.append(tuple("" if row.get(k) is None else row[k] for k in SCAN_COLUMNS))
    # The real files are sorted by series uid; rows of one scan keep their order.
    key = lambda row: row[0]  # noqa: E731
    total = write_csv(out / "annotations.csv", ANNOTATION_HEADER, sorted(ann, key=key))
    total += write_csv(out / "annotations_excluded.csv", ANNOTATION_HEADER, sorted(exc, key=key))
    total += write_csv(out / "annotations_with_malignancy.csv", MALIGNANCY_HEADER, sorted(mal, key=key))
    total += write_csv(out / "candidates.csv", CANDIDATE_HEADER, sorted(cand, key=key))
    total += write_csv(out / "ground_truth.csv", GROUND_TRUTH_HEADER, sorted(truth, key=key))
    total += write_csv(out / "scans.csv", SCAN_COLUMNS, sorted(scans, key=key))
    return total


def _summarise(out: Path, preset: str, seed: int, n_subsets: int, results: list[dict], seconds: float,
               nbytes: int) -> SynthSummary:
    findings = [f for r in results for f in r["findings"]]
    annotated = [f for f in findings if not f["excluded"]]
    diam = np.array([f["diameter_mm"] for f in annotated]) if annotated else np.zeros(1)
    types = Counter(f["type"] for f in annotated)
    by_size = {}
    for (lo, hi), real in zip(SIZE_BANDS_MM, LUNA16_MALIGNANT_SHARE):
        band = [f for f in annotated if lo <= f["diameter_mm"] < hi]
        label = f"{lo:g}-{hi:g} mm" if np.isfinite(hi) else f">={lo:g} mm"
        if band:
            share = sum(f["malignant"] for f in band) / len(band)
            by_size[label] = f"{100 * share:.0f}% of {len(band)} (LUNA16 {100 * real:.0f}%)"
    infos = [r["info"] for r in results]
    cands = [c for r in results for c in r["candidates"]]
    med = {}
    for key in ("air", "lung", "fat", "soft_tissue", "bone", "marrow", "vessel", "nodule"):
        vals = [i[f"hu_{key}"] for i in infos if i.get(f"hu_{key}") is not None]
        if vals:
            med[key] = int(np.median(vals))
    dirs = Counter("flipped" if r["direction"][0] < 0 else "identity" for r in results)
    pads = Counter("none (-1024 clip)" if i["padding_hu"] == -1024 else str(i["padding_hu"]) for i in infos)
    jp = [f["wall_overlap"] for f in annotated if f["type"] == "juxta-pleural"]
    other = [f["wall_overlap"] for f in findings if f["type"] != "juxta-pleural"]
    lung_meds = [i["hu_lung"] for i in infos if i.get("hu_lung") is not None]
    return SynthSummary(
        out_dir=str(out),
        preset=preset,
        seed=seed,
        scans=len(results),
        subsets=n_subsets,
        seconds=round(seconds, 2),
        bytes_written=int(nbytes),
        slices=(min(r["shape"][0] for r in results), max(r["shape"][0] for r in results)),
        inplane_size=results[0]["shape"][1],
        inplane_spacing_mm=(min(r["spacing"][0] for r in results), max(r["spacing"][0] for r in results)),
        slice_spacing_mm=(min(r["spacing"][2] for r in results), max(r["spacing"][2] for r in results)),
        directions=dict(sorted(dirs.items())),
        padding=dict(sorted(pads.items())),
        contrast_scans=sum(bool(i["contrast"]) for i in infos),
        nodules=len(annotated),
        nodule_types={t: types.get(t, 0) for t in NODULE_TYPES},
        excluded_small=sum(f["excluded"] and f["kind"] == "nodule" for f in findings),
        excluded_non_nodules=sum(f["kind"] != "nodule" for f in findings),
        diameter_quantiles_mm={f"p{p}": float(np.percentile(diam, p)) for p in (10, 25, 50, 75, 90)},
        malignant=sum(f["malignant"] for f in annotated),
        malignant_by_size=by_size,
        candidates=len(cands),
        candidates_positive=sum(c[1] for c in cands),
        candidate_sources=dict(Counter(c[2] for c in cands if not c[1]).most_common()),
        hu_medians=med,
        hu_lung_range=(min(lung_meds), max(lung_meds)) if lung_meds else (0, 0),
        noise_hu_range=(min(i["noise_hu"] for i in infos), max(i["noise_hu"] for i in infos)),
        blur_mm_range=(min(i["blur_mm"] for i in infos), max(i["blur_mm"] for i in infos)),
        vessel_segments_per_scan=float(np.mean([i["vessel_segments"] for i in infos])),
        airway_segments_per_scan=float(np.mean([i["airway_segments"] for i in infos])),
        vessel_share_of_lung=float(np.mean([i["vessel_share_of_lung"] for i in infos])),
        min_center_hu_annotated=min((f["center_hu"] for f in annotated), default=None),
        juxta_pleural_wall_overlap=float(np.mean(jp)) if jp else 0.0,
        other_nodule_wall_overlap=float(max(other)) if other else 0.0,
        kernels=dict(sorted(Counter(i.get("kernel", "standard") for i in infos).items())),
        arms_down_scans=sum(bool(i.get("arms_down")) for i in infos),
    )


def visible_malignancy_scores(data_dir) -> dict[tuple[str, tuple[float, float, float]], float]:
    """Per annotated nodule of a dataset luna generated: the readers' visible malignancy score.

    That is `READER_MODEL.visible_score` of the nodule's ``ground_truth.csv`` row (size, spiculation,
    lobulation, part-solid, calcified): the readers' latent judgement without its hidden part and their
    own noise, so the most any image model can learn of the ratings. Its ROC AUC on a set of nodules is
    the ceiling of every malignancy model there. Keyed by series uid and the centre (mm, rounded to
    0.001 as `visible_key` does); empty for a directory luna did not generate (no ``ground_truth.csv``).
    """
    path = Path(data_dir) / "ground_truth.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "nodule" and r["excluded"] == "False"]
    return {visible_key(r["seriesuid"], (float(r["coordX"]), float(r["coordY"]), float(r["coordZ"]))):
            READER_MODEL.visible_score(float(r["diameter_mm"]), int(r["spiculation"]), int(r["lobulation"]),
                                       r["type"], r["calcified"] == "True")
            for r in rows}


def visible_key(series_uid: str, center_xyz) -> tuple[str, tuple[float, float, float]]:
    """The key of `visible_malignancy_scores` for a nodule (an annotation's uid and centre)."""
    return series_uid, tuple(round(float(v), 3) for v in center_xyz)


# --- generate once, reuse after ------------------------------------------------------------------

def is_complete(out_dir, preset: str | None = None, seed: int | None = None, scans: int | None = None) -> bool:
    """True when ``out_dir`` holds a finished dataset of this generator version (and preset/seed/scans if given)."""
    out = Path(out_dir)
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if (out / PARTIAL).exists() or marker.get("version") != GENERATOR_VERSION:
        return False
    if preset is not None and marker.get("preset") != preset:
        return False
    if seed is not None and marker.get("seed") != seed:
        return False
    if scans is not None and marker.get("scans") != scans:
        return False
    files = marker.get("files") or {}
    for name in CSV_FILES:
        if not (out / name).is_file():
            return False
    for name, size in files.items():
        try:
            if (out / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return bool(files)


def ensure_dataset(out_dir, preset: str = "demo", *, seed: int = 0, scans: int | None = None,
                   progress: bool = True, workers: int | None = None) -> Path:
    """The synthetic dataset in ``out_dir``, generated first if it is missing, unfinished or stale.

    A complete dataset of the same preset, seed, number of scans (``scans``: the
    preset's when None) and generator version is used as it is. A directory that holds anything else than a luna.synth dataset is an error,
    never overwritten.
    """
    _refuse_in_bootstrapping_worker()
    out = Path(out_dir)
    if preset in PRESETS and scans is None:
        scans = PRESETS[preset].scans
    if is_complete(out, preset, seed, scans):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out / ".synth.lock"):
        if is_complete(out, preset, seed, scans):  # another process finished it while we waited
            return out
        why = ("replacing the one there: unfinished, or made with other settings or generator" if _made_here(out)
               else "first use")
        log.info("generating the synthetic %s dataset in %s (%s; later runs reuse it)", preset, out, why)
        generate_dataset(out, preset, seed=seed, scans=scans, progress=progress, workers=workers)
    return out


class _lock:
    """An exclusive lock file (fcntl where available) so two processes do not generate at once."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
        except ImportError:  # Windows: no lock, the marker still guards completeness
            pass
        return self

    def __exit__(self, *exc):
        try:
            import fcntl

            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        except ImportError:
            pass
        self.file.close()
        return False
