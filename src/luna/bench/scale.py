"""The full LUNA16 on paper: what the bench's measured per-unit costs come to for 888 scans.

The rule: every figure is one measured median of the same ``python -m luna.bench``
run times a count of the full dataset, and names the measured input it came from
(its JSON path and value), so a reader can redo the arithmetic. Nothing is guessed:
a figure whose input did not run is listed as not measured, and without the
``chunks``, ``training`` and ``diagnosis`` sections of one run there is no
projection at all.

- cache on disk = candidates x ``chunks.zstd_level_1.bytes_on_disk_per_candidate``;
- prepcache = candidates / ``chunks.zstd_level_1.prepcache_candidates_per_s`` with
  the bench's process count (measured); for other process counts, 16 say, the
  per-process rate times the count: a linear projection, which ignores the disk,
  memory bandwidth and the cores the machine really has;
- one nodule-classifier training epoch = samples / ``training.app.nodule.<precision>
  .train_samples_per_s`` (the training app with augmentation, warm cache), for the
  book's balanced epoch (200,000 samples) and for every candidate once;
- diagnosis of all scans = scans x mean slices per scan / 128 x
  ``diagnosis.median_seconds_per_128_slices_<precision>``, on the device that section
  ran on; on a GPU only from the ``gpu`` section's measured diagnosis;
- ``torchrun`` over N nodes: the data-parallel parts (training epoch, diagnosis of
  independent scans, prepcache of independent scans) divided by N. The division is
  the ideal: the all-reduce of every training step, the uneven split of scans and
  copying the cache to every node are not measured.

The mean number of slices per scan is not measured by the bench and not sourced
here: it is a parameter (`ASSUMED_MEAN_SLICES_PER_SCAN` unless given), and the
output says it is an assumption. ``luna series`` on the real data lists every scan's
size; pass the mean it gives (``--slices-per-scan``).

`project_luna16` makes the projection (a JSON-able dict, ``luna16_projection`` in the
bench's JSON); `markdown_table` renders it for the README (``python -m luna.bench
--projection-table bench.json``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from luna.cache import DEFAULT_COMPRESS_LEVEL
from luna.errors import LunaError

__all__ = [
    "ASSUMED_MEAN_SLICES_PER_SCAN",
    "LUNA16_CANDIDATES",
    "LUNA16_NODULES",
    "LUNA16_SCANS",
    "NEEDED_SECTIONS",
    "NODES",
    "Projection",
    "markdown_table",
    "missing_sections",
    "project_luna16",
]

LUNA16_SCANS = 888
"""CT scans in LUNA16 (luna16.grand-challenge.org/Data: LIDC-IDRI without slices thicker than 2.5 mm)."""
LUNA16_CANDIDATES = 551_065
"""Rows of LUNA16's ``candidates.csv``, the book's candidate list (``candidates_V2.csv`` has 754,975)."""
LUNA16_NODULES = 1_186
"""Rows of ``annotations.csv``: the nodules >= 3 mm that 3 of 4 radiologists accepted."""
ASSUMED_MEAN_SLICES_PER_SCAN = 250
"""An assumption, not a sourced figure: no reliable published mean was found. For
scale: ~120 GB of 512x512 int16 slices (this project's figure for the scans, if that
is their unpacked size) would be 120e9 / (888 x 512 x 512 x 2 B) = 258 slices per scan."""
BOOK_BALANCED_EPOCH = 200_000
"""Samples of one balanced training epoch in the book's code (``LunaDataset.__len__``
with ``ratio_int`` in dlwpt-code ``p2ch12/dsets.py``)."""
REFERENCE_SLICES = 128
"""The bench's diagnosis times are per 128 slices (`luna.bench.diagnosis.REFERENCE_SLICES`)."""
PROJECTED_PROCESSES = 16
"""The prepcache process count projected linearly from the measured one (the issue's 16 cores)."""
NODES = (1, 2, 4, 8)
"""torchrun node counts of the table's columns."""
NEEDED_SECTIONS = ("chunks", "training", "diagnosis")
"""Sections of one bench run without which there is no projection (``gpu`` is optional)."""

EPOCHS = (
    (f"book's balanced epoch ({BOOK_BALANCED_EPOCH:,} samples)", BOOK_BALANCED_EPOCH),
    (f"every candidate once ({LUNA16_CANDIDATES:,} samples)", LUNA16_CANDIDATES),
)


@dataclass(frozen=True)
class Projection:
    """One projected figure for the full LUNA16 and where it came from."""

    kind: str
    """"cache", "prepcache", "training epoch" or "diagnosis"."""
    case: str
    """Which one of its kind: "16 processes", "float32, cpu", ..."""
    quantity: str
    """The whole name: "prepcache, 16 processes", "diagnosis of 888 scans, float32, cpu", ..."""
    basis: str
    """"measured rate" (the measured median times a count) or "linear projection ..." (scaled beyond it)."""
    source: str
    """The measured input: its JSON path, its median, and the arithmetic."""
    seconds: float | None = None
    size_gib: float | None = None
    torchrun_nodes_seconds: dict[str, float] | None = None
    """Seconds on N nodes (keys: N) for the data-parallel parts: ``seconds / N``; None where N does not divide it."""


def missing_sections(result: dict) -> list[str]:
    """The `NEEDED_SECTIONS` that did not run (or failed) in this bench result."""
    return [s for s in NEEDED_SECTIONS if not isinstance(result.get(s), dict) or "error" in result[s]]


def project_luna16(result: dict, *, mean_slices_per_scan: float | None = None) -> dict:
    """The full LUNA16 projected from one ``luna.bench`` result (its JSON as a dict); see the module docstring.

    Raises `LunaError` when a section in `NEEDED_SECTIONS` is missing or failed, or
    a figure the projection reads is absent.
    """
    missing = missing_sections(result)
    if missing:
        raise LunaError(f"the LUNA16 projection needs the {', '.join(NEEDED_SECTIONS)} sections of one bench run; "
                        f"missing or failed: {', '.join(missing)}")
    assumed = mean_slices_per_scan is None
    slices = float(ASSUMED_MEAN_SLICES_PER_SCAN if assumed else mean_slices_per_scan)
    if not (math.isfinite(slices) and slices > 0):
        raise LunaError(f"mean slices per scan must be a positive number, not {mean_slices_per_scan}")
    rows: list[Projection] = []
    not_measured: list[dict] = []  # {"quantity", "why"} of each figure this run did not measure
    try:
        rows += _cache_and_prepcache(result["chunks"])
        rows += _training("training.app.nodule", result["training"]["app"]["nodule"], result["training"]["device"],
                          not_measured)
        rows += _diagnosis(result["diagnosis"], slices, not_measured)
        rows += _gpu(result.get("gpu"), slices, not_measured)
    except (KeyError, TypeError, ValueError) as err:
        raise LunaError(f"the bench result lacks a figure the LUNA16 projection reads ({err!r}); "
                        "was it written by this version of luna.bench?") from None
    machine = result.get("machine") or {}
    return {
        "dataset": {
            "name": "LUNA16",
            "scans": LUNA16_SCANS,
            "candidates": LUNA16_CANDIDATES,
            "candidates_file": "candidates.csv (candidates_V2.csv has 754,975)",
            "nodules": LUNA16_NODULES,
            "mean_slices_per_scan": slices,
            "mean_slices_per_scan_basis": (
                "assumption (no sourced mean found; measure it with `luna series` on the real data and pass "
                "--slices-per-scan)" if assumed else "given (--slices-per-scan)"),
            "total_slices": LUNA16_SCANS * slices,
        },
        "measured": {
            "mode": result.get("mode"),
            "machine": f"{machine.get('cpu')}, {machine.get('cores')} cores",
            "data": (result.get("data") or {}).get("dir"),
            "figures": "medians over the run's repeats",
        },
        "nodes": list(NODES),
        "rows": [asdict(row) for row in rows],
        "not_measured": not_measured,
        "caveats": _caveats(result),
    }


def _per_nodes(seconds: float) -> dict[str, float]:
    return {str(n): seconds / n for n in NODES}


def _median(entry: dict) -> float:
    value = float(entry["median"])
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"median {value} is not a positive figure")
    return value


def _cache_and_prepcache(chunks: dict) -> list[Projection]:
    level = f"zstd_level_{DEFAULT_COMPRESS_LEVEL}"
    figures = chunks[level]
    bytes_per = float(figures["bytes_on_disk_per_candidate"])
    scans, candidates = chunks["scans"], chunks["candidates"]
    on = f"{candidates:,} candidates of {scans} bench scans"
    rows = [Projection(
        kind="cache", case="zstd int16 chunks",
        quantity="chunk cache on disk",
        basis="measured size per candidate",
        source=f"chunks.{level}.bytes_on_disk_per_candidate = {bytes_per:,.0f} B ({on}) x {LUNA16_CANDIDATES:,} "
               "candidates; every training node holds the whole cache",
        size_gib=bytes_per * LUNA16_CANDIDATES / 2**30,
    )]
    workers = int(chunks["workers"])
    key = f"{workers}_process{'es' if workers > 1 else ''}"
    rate = _median(figures["prepcache_candidates_per_s"][key])
    path = f"chunks.{level}.prepcache_candidates_per_s.{key}"
    for processes in sorted({workers, 2, PROJECTED_PROCESSES}):
        if processes == workers:
            basis, source, projected = "measured rate", f"{path} = {rate:,.0f} candidates/s", rate
        else:
            projected = rate / workers * processes
            basis = f"linear projection from the {workers}-process rate"
            source = (f"{path} = {rate:,.0f} candidates/s / {workers} x {processes} = {projected:,.0f}/s "
                      f"(linear: {processes} cores assumed; disk and memory bandwidth not measured)")
        seconds = LUNA16_CANDIDATES / projected
        case = f"{processes} process{'es' if processes > 1 else ''}"
        rows.append(Projection(
            kind="prepcache", case=case, quantity=f"prepcache, {case}",
            basis=basis,
            source=f"{LUNA16_CANDIDATES:,} candidates / {source}",
            seconds=seconds,
            torchrun_nodes_seconds=_per_nodes(seconds),
        ))
    return rows


def _training(path: str, nodule: dict, device: str, not_measured: list) -> list[Projection]:
    """Epochs of the nodule classifier from the training app's samples/s, per precision it ran in."""
    rows = []
    precisions = {label: entry for label, entry in nodule.items() if isinstance(entry, dict)}
    if not precisions:
        raise ValueError(f"{path}: no precision measured")
    for label, entry in precisions.items():
        rows += _epochs(_median(entry["train_samples_per_s"]), label, device, f"{path}.{label}")
    if not any("autocast" in label or label in ("float16", "bfloat16") for label in precisions):
        not_measured.append({"quantity": f"nodule classifier epoch, autocast, {device}",
                             "why": f"the training app ran in {', '.join(precisions)} only in this run "
                                    "(a full run measures autocast too)"})
    return rows


def _epochs(rate: float, label: str, device: str, path: str, note: str = "") -> list[Projection]:
    """One nodule classifier epoch of each of `EPOCHS` at ``rate`` samples/s (measured at ``path``)."""
    rows = []
    for epoch, samples in EPOCHS:
        seconds = samples / rate
        rows.append(Projection(
            kind="training epoch", case=f"{epoch}, {label}, {device}",
            quantity=f"nodule classifier epoch, {epoch}, {label}, {device}",
            basis="measured rate",
            source=f"{samples:,} / {path}.train_samples_per_s = {rate:.1f} samples/s{note}",
            seconds=seconds,
            torchrun_nodes_seconds=_per_nodes(seconds),
        ))
    return rows


def _diagnosis(diagnosis: dict, slices: float, not_measured: list) -> list[Projection]:
    prefix = "median_seconds_per_128_slices_"
    device = diagnosis["device"]
    shapes = [scan["shape_irc"][0] for scan in diagnosis["scans"].values()]
    rows = []
    for key, entry in diagnosis.items():
        if not key.startswith(prefix) or not isinstance(entry, dict):
            continue
        label = key.removeprefix(prefix).replace("_", " ")
        per_128 = _median(entry)
        seconds = LUNA16_SCANS * slices / REFERENCE_SLICES * per_128
        rows.append(Projection(
            kind="diagnosis", case=f"{label}, {device}",
            quantity=f"diagnosis of {LUNA16_SCANS} scans, {label}, {device}",
            basis="measured rate",
            source=f"{LUNA16_SCANS} x {slices:g} slices / {REFERENCE_SLICES} x diagnosis.{key} = {per_128:.2f} s "
                   f"(median over {len(shapes)} bench scan(s) of {', '.join(map(str, shapes))} slices; "
                   f"models: {diagnosis['models'].split(' (')[0]})",
            seconds=seconds,
            torchrun_nodes_seconds=_per_nodes(seconds),
        ))
    if not rows:
        raise ValueError(f"diagnosis: no {prefix}* figure")
    return rows


def _gpu(gpu: dict | None, slices: float, not_measured: list) -> list[Projection]:
    """GPU figures only from the gpu section's own measurements."""
    if not isinstance(gpu, dict) or "error" in gpu:
        not_measured.append({"quantity": "diagnosis on GPU",
                             "why": "no gpu section in this run (`python -m luna.bench --sections gpu` "
                                    "on a CUDA machine)"})
        return []
    if not gpu.get("available"):
        not_measured.append({"quantity": "diagnosis on GPU", "why": gpu.get("message", "no CUDA device")})
        return []
    rows = []
    name = gpu.get("gpu", "GPU")
    for label, entry in gpu["diagnosis"].items():
        depth = entry["shape_irc"][0]
        measured = float(entry["seconds"])
        per_128 = measured * REFERENCE_SLICES / depth
        seconds = LUNA16_SCANS * slices / REFERENCE_SLICES * per_128
        rows.append(Projection(
            kind="diagnosis", case=f"{label}, {name}",
            quantity=f"diagnosis of {LUNA16_SCANS} scans, {label}, {name}",
            basis="measured time (one run)",
            source=f"{LUNA16_SCANS} x {slices:g} slices / {depth} x gpu.diagnosis.{label}.seconds = {measured:.2f} s "
                   f"(one {depth}-slice phantom, untrained networks, one run)",
            seconds=seconds,
            torchrun_nodes_seconds=_per_nodes(seconds),
        ))
    for label, entry in gpu.get("app", {}).get("nodule", {}).items():
        rows += _epochs(_median(entry["train_samples_per_s"]), label, name, f"gpu.app.nodule.{label}",
                        " (tiny synthetic set, one run)")
    return rows


def _caveats(result: dict) -> list[str]:
    from luna.training.config import ClassifierConfig

    gradient_mib = sum(p.numel() * 4 for p in ClassifierConfig().build_model().parameters()) / 2**20
    chunks = result["chunks"]
    bench_per_scan = chunks["candidates"] / max(chunks["scans"], 1)
    data_dir = (result.get("data") or {}).get("dir")
    return [
        (f"The bench's scans ({data_dir}; synthetic unless --data-dir named real CT) are not LUNA16's: real CT "
         "may compress differently (cache size) and give the models other numbers of detections (diagnosis time)."),
        (f"prepcache's rate mixes a per-scan cost (loading the CT) with a per-candidate one: the bench scans have "
         f"{bench_per_scan:.0f} candidates each, LUNA16 {LUNA16_CANDIDATES / LUNA16_SCANS:.0f}."),
        "Training epochs assume a filled cache (the bench times warm epochs): run prepcache first.",
        (f"torchrun over N nodes divides the data-parallel parts by N, the ideal: each training step's all-reduce "
         f"of {gradient_mib:.2f} MiB of float32 gradients (the classifier's parameters) is not measured; "
         "`luna diagnose` deals the scans round-robin, so the node with the largest scans finishes last; "
         "`luna prepcache` has no torchrun mode (split the scans by hand), and every training node needs the "
         "whole cache (copied or shared: not measured)."),
    ]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not measured"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def markdown_table(projection: dict) -> str:
    """The projection (`project_luna16`'s dict) as a Markdown table with its assumptions and caveats below it."""
    data = projection["dataset"]
    nodes = projection["nodes"]
    lines = [
        f"| full LUNA16 ({data['scans']} scans, {data['candidates']:,} candidates) | "
        + " | ".join(f"{n} node{'s' if n > 1 else ''}" for n in nodes) + " | from (measured median) |",
        "|---|" + "---|" * len(nodes) + "---|",
    ]
    for row in projection["rows"]:
        if row["size_gib"] is not None:
            cells = [f"{row['size_gib']:.1f} GiB"] + ["same per node"] * (len(nodes) - 1)
        elif row["torchrun_nodes_seconds"]:
            cells = [_duration(row["torchrun_nodes_seconds"][str(n)]) for n in nodes]
        else:
            cells = [_duration(row["seconds"])] + ["-"] * (len(nodes) - 1)
        basis = "" if row["basis"].startswith("measured") else f" ({row['basis']})"
        lines.append(f"| {row['quantity']}{basis} | " + " | ".join(cells) + f" | {row['source']} |")
    for what in projection["not_measured"]:
        lines.append(f"| {what['quantity']} | " + " | ".join(["not measured"] * len(nodes)) + f" | {what['why']} |")
    measured = projection["measured"]
    notes = [
        "",
        (f"Measured with `luna.bench` ({measured['mode']}) on {measured['machine']}; {measured['figures']}. "
         f"Mean slices per scan: {data['mean_slices_per_scan']:g}, {data['mean_slices_per_scan_basis']}. "
         "N nodes: the data-parallel parts divided by N."),
        "",
        *(f"- {caveat}" for caveat in projection["caveats"]),
    ]
    return "\n".join(lines + notes)
