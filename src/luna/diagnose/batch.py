"""Batch diagnosis: many CTs in one command, resumable, sharded over ``torchrun`` processes.

The CTs (`CtInput`, one folder per CT under ``--out``, named by its `CtInput.key`):
a data directory's series (all of them, a list of uids, or a run's validation
split), every CT series found under a folder of DICOM studies (searched
recursively), or a list of image files and DICOM folders. The list is sorted by
key, so that every process builds the same one.

Rules:

- *Resumable*: a CT whose ``<key>/report.json`` exists is finished (that file is
  written last, atomically) and is skipped. ``batch.json`` records the models and
  thresholds of the batch; resuming into the folder with other ones is an error
  (the merged results would mix two pipelines).
- *A failure does not stop the rest*: an error on one CT (unreadable file, odd DICOM,
  out of memory) is logged in one line and recorded; the other CTs go on. The
  summary counts the failures and the command exits with status 2 when there are any;
  running it again retries them.
- *Sharded*: under ``torchrun`` (``WORLD_SIZE`` > 1) the unfinished CTs are dealt
  round-robin, rank ``r`` taking positions ``r, r + world, ...``; every rank
  lists the unfinished CTs before any starts (a barrier), so the shards are
  disjoint and cover the list. Ranks meet over gloo, which needs no GPU; each rank
  runs on its own GPU (``cuda:LOCAL_RANK``) when there are GPUs. Rank 0 merges.
- *Merged outputs* (rank 0, from the files on disk, so a resumed batch includes the
  CTs finished earlier): ``results.csv`` (every detection of every finished CT, LUNA16
  results format, `luna.io.luna16.results_csv_text`), ``series.txt`` (their series
  uids, what ``luna evaluate --series`` takes), ``summary.json`` / ``summary.csv``
  (per CT: status, verdict, nodules, time, error, its report's warnings) and
  ``index.html``. For a data directory with annotations also ``confusion.json``
  (`luna.evaluate.confusion`) and ``malignancy.csv``
  (``seriesuid,coordX,coordY,coordZ,probability,label``, rule in
  `luna.evaluate.malignancy.nodule_malignancy_rows`, what ``luna evaluate
  --malignancy`` takes), and the ``luna evaluate`` command that scores it all.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from luna.diagnose import report as rep
from luna.errors import LunaError
from luna.fileio import write_atomic
from luna.io.luna16 import (
    ANNOTATIONS_FILE,
    EXCLUDED_FILE,
    MALIGNANCY_FILE,
    MALIGNANCY_RESULTS_COLUMNS,
    csv_text,
    read_results,
    results_csv_text,
)

__all__ = [
    "BATCH_FILE",
    "CtInput",
    "CtOutcome",
    "data_dir_inputs",
    "dicom_tree_inputs",
    "distributed",
    "finished",
    "path_inputs",
    "run_batch",
    "shard",
]

log = logging.getLogger("luna.diagnose")

BATCH_FILE = "batch.json"
REPORT = "report.json"


@dataclass(frozen=True)
class CtInput:
    """One CT of a batch: where it is and the folder its outputs go to."""

    key: str
    """Folder name under the batch's output directory, unique in the batch."""
    source: str
    """A scan file or a DICOM folder."""
    series_uid: str | None = None
    """The series to read from a DICOM folder (None: the folder's only one); for files, its uid."""
    dicom: bool = False


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "ct"


def _unique(inputs: list[CtInput]) -> list[CtInput]:
    """Sorted by key, duplicate keys numbered (``key-2``, ...) in source order."""
    seen: dict[str, int] = {}
    result = []
    for item in sorted(inputs, key=lambda i: (i.key, i.source, i.series_uid or "")):
        count = seen.get(item.key, 0) + 1
        seen[item.key] = count
        result.append(item if count == 1 else CtInput(f"{item.key}-{count}", item.source, item.series_uid, item.dicom))
    return sorted(result, key=lambda i: i.key)


def data_dir_inputs(data, uids: Sequence[str]) -> list[CtInput]:
    """The scans ``uids`` of a `luna.datadir.DataDir` (`LunaError` for a uid it does not hold)."""
    return _unique([CtInput(_safe(uid), str(data.scan_path(uid)), uid) for uid in dict.fromkeys(uids)])


def dicom_tree_inputs(root: str | Path) -> list[CtInput]:
    """Every CT image series under ``root`` (searched recursively; other modalities are left out)."""
    from luna.io.dicom import list_dicom_series

    root = Path(root)
    if not root.is_dir():
        raise LunaError(f"{root}: not a folder; --dicom-tree takes a folder of DICOM studies")
    found = [s for s in list_dicom_series(root) if s.modality in ("CT", "")]
    if not found:
        raise LunaError(f"{root}: no CT image series found under this folder")
    return _unique([CtInput(_safe(s.series_uid), str(s.folder), s.series_uid, True) for s in found])


def path_inputs(paths: Sequence[str | Path], dicom_series: str | None = None) -> list[CtInput]:
    """Image files and DICOM folders; a folder holding several CT series gives one input per series
    unless ``dicom_series`` picks one."""
    from luna.io import format_for, series_uid_from_path
    from luna.io.dicom import list_dicom_series

    inputs = []
    for path in map(Path, paths):
        if path.is_dir():
            series = [s for s in list_dicom_series(path) if s.modality in ("CT", "")]
            if dicom_series is not None:
                series = [s for s in series if s.series_uid == dicom_series]
            if not series:
                # the DICOM reader says best why (no images, damaged files, the series not there)
                inputs.append(CtInput(_safe(dicom_series or path.name), str(path), dicom_series, True))
                continue
            inputs += [CtInput(_safe(s.series_uid), str(path), s.series_uid, True) for s in series]
        else:
            format_for(path)  # a LunaError naming the formats for a file luna cannot read
            if not path.exists():  # the reader names anything else (a pipe, a device)
                raise LunaError(f"{path}: no such file")
            inputs.append(CtInput(_safe(series_uid_from_path(path)), str(path), None))
    return _unique(inputs)


def read_input_list(path: str | Path) -> list[str]:
    """``--input-list``: one file or DICOM folder per line (blank lines and ``#`` comments skipped);
    relative paths are relative to the list's folder."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as err:
        raise LunaError(f"{path}: cannot read the input list ({err.strerror})") from None
    entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not entries:
        raise LunaError(f"{path}: no input in the list; put one file or DICOM folder per line")
    return [str(p if p.is_absolute() else path.parent / p) for p in map(Path, entries)]


def shard(items: Sequence, rank: int, world: int) -> list:
    """The items rank ``rank`` of ``world`` takes: positions ``rank, rank + world, ...``."""
    return list(items[rank::world])


def finished(out: Path, item: CtInput) -> bool:
    return (out / item.key / REPORT).is_file()


# ------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value) -> list:
        """Every rank's ``value`` on rank 0 (other ranks get [])."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        box = [None] * self.world if self.is_main else None
        dist.gather_object(value, box, dst=0)
        return box or []


@contextmanager
def distributed() -> Iterator[Processes]:
    """The processes of this batch: one, or torchrun's (``WORLD_SIZE`` > 1), met over gloo.

    Gloo, not NCCL, because the ranks only exchange a few Python objects, and gloo
    works with or without GPUs. The timeout is long: ranks wait at the end for the
    slowest shard, which can take hours.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Processes()
        return
    import torch.distributed as dist

    from luna.devices import leave_process_group

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    completed = False
    try:
        yield Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        completed = True
    finally:
        if owned:
            leave_process_group(completed=completed)


# ------------------------------------------------------------------ the batch


@dataclass
class CtOutcome:
    """What happened to one CT in this run."""

    key: str
    source: str
    status: str
    """``done`` (diagnosed now), ``finished before`` (skipped) or ``failed``."""
    series_uid: str | None = None
    verdict: str | None = None
    accepted: int | None = None
    top_p_malignant: float | None = None
    seconds: float | None = None
    error: str | None = None
    rank: int = 0
    warnings: tuple[str, ...] = ()
    """The CT's report's warnings (`luna.diagnose.report`): the models' provenance, a short scan."""


@dataclass
class BatchResult:
    outcomes: list[CtOutcome]
    failed: int
    files: list[str] = field(default_factory=list)
    evaluate_command: str | None = None


def run_batch(
    inputs: Sequence[CtInput],
    out: Path,
    *,
    diagnose_one: Callable[[CtInput, Path, bool], tuple],
    fingerprint: dict,
    processes: Processes,
    progress: bool = False,
    data_root: Path | None = None,
    annotations: Sequence | None = None,
    malignancy_threshold: float = 0.5,
    title: str = "luna batch diagnosis",
) -> BatchResult:
    """Diagnose ``inputs`` into ``out`` (module docstring); rank 0's result holds every rank's outcomes.

    ``diagnose_one(item, folder, progress)`` diagnoses one CT, writes its files into
    ``folder`` (report.json last) and returns ``(diagnosis, seconds)``.
    """
    from tqdm import tqdm

    out = Path(out)
    error = _check_batch_file(out, fingerprint, inputs) if processes.is_main else None
    error = processes.broadcast(error)
    if error:
        raise LunaError(error)
    pending = [item for item in inputs if not finished(out, item)]
    processes.barrier()  # every rank has listed what is pending before any rank finishes a CT
    mine = shard(pending, processes.rank, processes.world)
    skipped = len(inputs) - len(pending)
    if processes.is_main:
        where = f" over {processes.world} processes" if processes.world > 1 else ""
        log.info("%d CT(s): %d finished before (skipped), %d to diagnose%s", len(inputs), skipped, len(pending), where)
    outcomes: list[CtOutcome] = []
    bar = tqdm(total=len(mine), unit="CT", desc="diagnose", disable=not (progress and processes.is_main))
    with bar:
        for position, item in enumerate(mine, 1):
            outcome = _one(item, out, diagnose_one, progress and processes.is_main, processes.rank)
            outcomes.append(outcome)
            counter = f"[{position}/{len(mine)}{f' rank {processes.rank}' if processes.world > 1 else ''}]"
            if outcome.status == "failed":
                log.error("%s %s failed: %s", counter, item.key, outcome.error)
            else:
                log.info("%s %s: %s (%.1f s)", counter, item.key, outcome.verdict, outcome.seconds)
            bar.update(1)
            bar.set_postfix(failed=sum(o.status == "failed" for o in outcomes), refresh=False)
    everyone = processes.gather(outcomes)
    processes.barrier()
    if not processes.is_main:
        return BatchResult(outcomes, sum(o.status == "failed" for o in outcomes))
    mine_all = [o for rank_outcomes in everyone for o in rank_outcomes]
    return _merge(out, inputs, mine_all, data_root=data_root, annotations=annotations,
                  malignancy_threshold=malignancy_threshold, title=title, fingerprint=fingerprint)


def _one(item: CtInput, out: Path, diagnose_one, progress: bool, rank: int) -> CtOutcome:
    start = time.perf_counter()
    try:
        diagnosis, _ = diagnose_one(item, out / item.key, progress)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - one CT's failure must not stop the batch
        message = str(err) if isinstance(err, LunaError) else f"{type(err).__name__}: {err}"
        log.debug("%s failed", item.key, exc_info=True)
        return CtOutcome(item.key, item.source, "failed", item.series_uid, error=message.splitlines()[0] if message
                         else type(err).__name__, seconds=round(time.perf_counter() - start, 2), rank=rank)
    scores = [n.p_malignant for n in diagnosis.accepted if n.p_malignant is not None]
    return CtOutcome(item.key, item.source, "done", diagnosis.series_uid, diagnosis.verdict, len(diagnosis.accepted),
                     max(scores) if scores else None, round(time.perf_counter() - start, 2), rank=rank)


def _check_batch_file(out: Path, fingerprint: dict, inputs: Sequence[CtInput]) -> str | None:
    """Write ``batch.json``, or the error when ``out`` holds a batch run with other models or thresholds."""
    path = out / BATCH_FILE
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"{path}: cannot read the earlier batch's settings ({err}); remove the file or use another --out"
        if before.get("fingerprint") != fingerprint:
            differ = sorted(k for k in set(fingerprint) | set(before.get("fingerprint", {}))
                            if fingerprint.get(k) != before.get("fingerprint", {}).get(k))
            return (f"{out} holds a batch diagnosed with other {', '.join(differ)}: resuming would mix two "
                    f"pipelines in one results file; use another --out (or delete {out})")
    elif any(finished(out, item) for item in inputs):
        return (f"{out} holds finished diagnoses but no {BATCH_FILE} to say how they were made; "
                "use another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, rep.dumps({"fingerprint": fingerprint, "inputs": [asdict(i) for i in inputs]}))
    return None


def _merge(out: Path, inputs: Sequence[CtInput], outcomes: list[CtOutcome], *, data_root, annotations,
           malignancy_threshold: float, title: str, fingerprint: dict) -> BatchResult:
    """Rank 0: the merged files, from every finished CT's folder (module docstring)."""
    from luna.evaluate.confusion import confusion_json, confusion_table, format_confusion
    from luna.evaluate.malignancy import nodule_malignancy_rows

    now = {o.key: o for o in outcomes}
    rows, series, per_ct = [], [], []
    per_series_confusion: dict[str, np.ndarray] = {}
    malignancy_rows: list[tuple] = []
    assessed = False
    for item in inputs:
        outcome = now.get(item.key)
        if finished(out, item):
            report = json.loads((out / item.key / REPORT).read_text())
            nodules = [rep.nodule_from_dict(n) for n in report["nodules"]]
            results = read_results(out / item.key / report["files"].get("nodules", "nodules.csv"))
            rows += [(u, *xyz, p) for u, xyz, p in zip(results.series_uids, results.center_xyz, results.probability)]
            uid = report["series_uid"]
            series.append(uid)
            scores = [n.p_malignant for n in nodules if n.accepted and n.p_malignant is not None]
            status = outcome.status if outcome else "finished before"
            per_ct.append(CtOutcome(item.key, item.source, status, uid, report["verdict"], report["reported"],
                                    max(scores) if scores else None,
                                    outcome.seconds if outcome else round(sum(report["timings_s"].values()), 2),
                                    rank=outcome.rank if outcome else 0,
                                    warnings=tuple(report.get("warnings", ()))))
            if annotations is not None:
                per_series_confusion[uid] = confusion_table(uid, nodules, annotations,
                                                            malignancy_threshold=malignancy_threshold)
                malignancy_rows += nodule_malignancy_rows(uid, nodules, annotations)
                assessed = assessed or report["malignancy_assessed"]
        elif outcome is not None:
            per_ct.append(outcome)
        else:
            per_ct.append(CtOutcome(item.key, item.source, "not run", item.series_uid))
    failed = [o for o in per_ct if o.status == "failed"]
    files = ["results.csv", "series.txt", "summary.json", "summary.csv", "index.html"]
    write_atomic(out / "results.csv", results_csv_text(rows))
    write_atomic(out / "series.txt", "".join(f"{uid}\n" for uid in series))
    counts = {status: sum(o.status == status for o in per_ct)
              for status in ("done", "finished before", "failed", "not run")}
    summary_line = (f"{len(inputs)} CT(s): {counts['done']} diagnosed now, {counts['finished before']} finished "
                    f"before, {counts['failed']} failed" + (f", {counts['not run']} not run" if counts["not run"] else ""))
    evaluate_command = None
    if annotations is not None:
        write_atomic(out / "confusion.json", rep.dumps(confusion_json(per_series_confusion)))
        files.append("confusion.json")
        total = sum(per_series_confusion.values(), np.zeros((3, 4), dtype=np.int64))
        print(format_confusion(total, f"total over {len(per_series_confusion)} series"))
        if assessed:
            write_atomic(out / "malignancy.csv", csv_text(MALIGNANCY_RESULTS_COLUMNS, malignancy_rows))
            files.append("malignancy.csv")
        evaluate_command = _evaluate_command(out, Path(data_root), malignancy=assessed)
    summary = {
        "title": title,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": summary_line,
        "counts": {**counts, "inputs": len(inputs), "finished": len(series)},
        "fingerprint": fingerprint,
        "evaluate_command": evaluate_command,
        "cts": [asdict(o) for o in per_ct],
    }
    write_atomic(out / "summary.json", rep.dumps(summary))
    columns = ("key", "series_uid", "status", "verdict", "accepted", "top_p_malignant", "seconds", "error", "source",
               "warnings")
    write_atomic(out / "summary.csv", csv_text(columns, ([_csv_cell(getattr(o, c)) for c in columns] for o in per_ct)))
    from luna.diagnose.html import index_html

    index_rows = [{**asdict(o), "html": (out / o.key / "report.html").is_file()} for o in per_ct]
    write_atomic(out / "index.html", index_html(index_rows, title=title, summary=summary_line))
    print(summary_line)
    for o in failed:
        print(f"failed: {o.key} ({o.source}): {o.error}")
    return BatchResult(per_ct, len(failed), files, evaluate_command)


def _csv_cell(value):
    """A summary.csv cell: "" for None, a tuple of warnings joined by " | "."""
    if value is None:
        return ""
    return " | ".join(value) if isinstance(value, tuple) else value


def _evaluate_command(out: Path, data_root: Path, *, malignancy: bool) -> str:
    from luna.cli import prog

    reference = data_root / ANNOTATIONS_FILE
    if not reference.is_file():  # the malignancy file alone has the same leading columns
        reference = data_root / MALIGNANCY_FILE
    parts = [prog("evaluate"), "--results", str(out / "results.csv"), "--series", str(out / "series.txt"),
             "--annotations", str(reference)]
    if (data_root / EXCLUDED_FILE).is_file():
        parts += ["--excluded", str(data_root / EXCLUDED_FILE)]
    if malignancy:
        parts += ["--malignancy", str(out / "malignancy.csv")]
    parts += ["--out", str(out / "evaluation")]
    return " ".join(parts)
