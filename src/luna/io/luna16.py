"""The LUNA16 CSV files: their columns, and the readers and writers everything uses.

The files (coordinates in patient mm, LPS, as in DICOM):

- ``candidates_V2.csv`` or ``candidates.csv``: ``seriesuid,coordX,coordY,coordZ,class``.
  ``class`` 1 means "nodule candidate", not "malignant".
- ``annotations.csv``: ``seriesuid,coordX,coordY,coordZ,diameter_mm`` -- the LUNA16
  reference nodules. ``annotations_excluded.csv`` has the same columns (irrelevant
  findings; its ``diameter_mm`` may be -1 or 0) and is read by
  `read_excluded_annotations`.
- ``annotations_with_malignancy.csv``: the annotation columns plus ``mal_bool``
  (``True``/``False``) and ``mal_details`` (the readers' ratings, ``"[4, 2, 4, 2]"``),
  then bounding-box columns and ``len_mal_details``.
- Results (what a detector writes and ``luna.evaluate`` scores):
  ``seriesuid,coordX,coordY,coordZ,probability``; malignancy results add ``label``.
- Series lists: one series uid per line.

The readers check the header (extra columns are fine), parse every number and raise
`LunaError` naming the file, the line and the fix for anything malformed. A UTF-8
byte-order mark, CRLF line ends and blank lines are tolerated. What each file may
hold, beyond finite numbers everywhere:

- nodules (``annotations.csv``, ``annotations_with_malignancy.csv``): a positive
  diameter, and each nodule once. A nodule of size 0 can never be hit, and a
  repeated row is a second nodule at the same place: on the real files neither
  occurs (1,186 and 1,182 distinct rows, smallest diameter 3.25 mm), and either
  silently changed training labels and halved the CPM. Both are errors naming the
  lines.
- excluded findings: any finite diameter (-1 and 0 mean "no size").
- candidates: a repeated row (same series, centre and class) is dropped, with one
  warning giving the count: it is the same sample twice, harmless to drop, and a
  candidates file is too large to make unusable over it.
- results: probabilities in [0, 1] (what the FROC thresholds and ``luna.diagnose``
  write); anything else is a score of some other scale, an error. `write_csv` writes as the real files
are (LF line ends, minimal quoting). What the rows *mean* (which candidate is a
positive, the hit rule) is `luna.annotations`'s business.
"""

from __future__ import annotations

import csv
import gc
import io
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Union

import numpy as np

from luna.errors import LunaError
from luna.fileio import write_atomic
from luna.io.formats import check_regular_file

__all__ = [
    "ANNOTATIONS_FILE",
    "ANNOTATION_COLUMNS",
    "CANDIDATES_FILES",
    "CANDIDATE_COLUMNS",
    "EXCLUDED_FILE",
    "MALIGNANCY_FILE",
    "MALIGNANCY_HEADER",
    "MALIGNANCY_RESULTS_COLUMNS",
    "RESULTS_COLUMNS",
    "Annotation",
    "Candidate",
    "CandidateColumns",
    "Results",
    "read_annotations",
    "read_candidate_columns",
    "read_candidates",
    "read_excluded_annotations",
    "read_malignancy_annotations",
    "read_malignancy_results",
    "read_results",
    "read_series_list",
    "results_csv_text",
    "write_csv",
]

log = logging.getLogger(__name__)

PathArg = Union[str, "PathLike[str]"]

ANNOTATIONS_FILE = "annotations.csv"
MALIGNANCY_FILE = "annotations_with_malignancy.csv"
EXCLUDED_FILE = "annotations_excluded.csv"
CANDIDATES_FILES = ("candidates_V2.csv", "candidates.csv")  # first one present wins

XYZ_COLUMNS = ("coordX", "coordY", "coordZ")
CANDIDATE_COLUMNS = ("seriesuid", *XYZ_COLUMNS, "class")
ANNOTATION_COLUMNS = ("seriesuid", *XYZ_COLUMNS, "diameter_mm")
MALIGNANCY_COLUMNS = (*ANNOTATION_COLUMNS, "mal_bool", "mal_details")
MALIGNANCY_HEADER = (
    *MALIGNANCY_COLUMNS,
    "bboxLowX", "bboxLowY", "bboxLowZ", "bboxHighX", "bboxHighY", "bboxHighZ",
    "len_mal_details",
)
RESULTS_COLUMNS = ("seriesuid", *XYZ_COLUMNS, "probability")
MALIGNANCY_RESULTS_COLUMNS = (*RESULTS_COLUMNS, "label")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Annotation:
    """One annotated finding. ``is_malignant`` is None when no rating is known."""

    series_uid: str
    center_xyz: tuple[float, float, float]
    diameter_mm: float
    is_malignant: bool | None = None
    malignancy_ratings: tuple[int, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """One row of a candidates file. ``is_nodule`` is its ``class`` column."""

    series_uid: str
    center_xyz: tuple[float, float, float]
    is_nodule: bool


# ------------------------------------------------------------------ reading a table


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building ~10^6 small objects.

    Each burst of new containers triggers a collection that scans all of them and
    frees nothing; on the 551k-row candidates file that was a third of the time.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class _Table:
    """The data rows of a CSV file, with their physical line numbers for messages."""

    path: Path
    columns: dict[str, int]
    rows: list[list[str]]
    lines: list[int]

    def strings(self, column: str) -> list[str]:
        index = self.columns[column]
        return [row[index].strip() for row in self.rows]

    def floats(self, column: str) -> np.ndarray:
        index = self.columns[column]
        texts = [row[index] for row in self.rows]
        try:
            values = np.array(texts, dtype=np.float64)
        except ValueError:
            values = None
        if values is None or not np.isfinite(values).all():
            # Slow path, only to name the first offending row.
            for text, line in zip(texts, self.lines):
                try:
                    number = float(text)
                except ValueError:
                    number = math.nan
                if not math.isfinite(number):
                    raise self.bad_value(line, column, text, "a finite number")
        return values

    def require(self, column: str, ok: np.ndarray, wanted: str) -> None:
        """`LunaError` naming the first row where ``ok`` (one flag per row) is False."""
        bad = np.flatnonzero(~np.asarray(ok, dtype=bool))
        if len(bad):
            row = int(bad[0])
            raise self.bad_value(self.lines[row], column, self.rows[row][self.columns[column]].strip(), wanted)

    def bad_value(self, line: int, column: str, text: str, wanted: str) -> LunaError:
        return LunaError(
            f"{self.path}:{line}: column {column!r} holds {text!r}, which is not "
            f"{wanted}; fix or delete that row."
        )


def _read_table(path: PathArg, required: Sequence[str], expected: Sequence[str]) -> _Table:
    """Read a CSV file whose header must contain ``required`` (``expected`` is for messages)."""
    path = Path(path)
    expected_header = ",".join(expected)
    check_regular_file(path)
    try:
        # utf-8-sig drops a byte-order mark (spreadsheet programs write one).
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = next((row for row in reader if any(f.strip() for f in row)), None)
            if header is None:
                raise LunaError(
                    f"{path}: the file is empty; expected a header line "
                    f"'{expected_header}' and one row per record. Re-download or "
                    f"regenerate the file."
                )
            header_line = reader.line_num
            columns: dict[str, int] = {}
            for index, name in enumerate(header):
                columns.setdefault(name.strip(), index)
            missing = [name for name in required if name not in columns]
            if missing:
                raise LunaError(
                    f"{path}:{header_line}: the header lacks column(s) "
                    f"{', '.join(missing)}; expected the header '{expected_header}' "
                    f"(extra columns are fine). Fix the header line or use the right file."
                )
            width = max(columns[name] for name in required) + 1
            rows: list[list[str]] = []
            lines: list[int] = []
            for row in reader:
                if len(row) >= width:
                    rows.append(row)
                    lines.append(reader.line_num)
                elif any(field.strip() for field in row):
                    raise LunaError(
                        f"{path}:{reader.line_num}: the row has {len(row)} field(s) but "
                        f"the header '{expected_header}' needs at least {width}; fix or "
                        f"delete that row."
                    )
    except FileNotFoundError:
        raise LunaError(
            f"{path}: file not found; expected it at {path.absolute()}. Put the LUNA16 "
            f"file there or pass the directory that holds it."
        ) from None
    except UnicodeDecodeError as error:
        raise LunaError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); is this "
            f"the right file? Save it as UTF-8 CSV."
        ) from None
    except csv.Error as error:
        raise LunaError(f"{path}: malformed CSV ({error}); fix the file.") from None
    except OSError as error:
        raise LunaError(
            f"{path}: cannot read the file ({error.strerror}); check that it is a "
            f"readable file."
        ) from None
    return _Table(path, columns, rows, lines)


def _series_uids(table: _Table) -> list[str]:
    uids = table.strings("seriesuid")
    for uid, line in zip(uids, table.lines):
        if not uid:
            raise table.bad_value(line, "seriesuid", uid, "a series UID")
    return uids


def _xyz(table: _Table) -> np.ndarray:
    return np.stack([table.floats(name) for name in XYZ_COLUMNS], axis=1).reshape(-1, 3)


# --------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class CandidateColumns:
    """A candidates file as columns: building one object per row is too slow at 550k rows."""

    series_uids: list[str]
    center_xyz: np.ndarray  # (n, 3) float64
    is_nodule: np.ndarray  # (n,) bool


def read_candidate_columns(path: PathArg) -> CandidateColumns:
    table = _read_table(path, CANDIDATE_COLUMNS, CANDIDATE_COLUMNS)
    index = table.columns["class"]
    is_nodule = np.empty(len(table.rows), dtype=bool)
    for i, row in enumerate(table.rows):
        label = row[index]
        if label == "1":
            is_nodule[i] = True
        elif label == "0":
            is_nodule[i] = False
        else:
            is_nodule[i] = _parse_class(table, i, label)
    return _drop_repeated_candidates(table, CandidateColumns(_series_uids(table), _xyz(table), is_nodule))


def _drop_repeated_candidates(table: _Table, columns: CandidateColumns) -> CandidateColumns:
    """The first of each set of identical rows (series, centre, class), with one warning."""
    n = len(columns.series_uids)
    code_of: dict[str, int] = {}
    codes = np.fromiter((code_of.setdefault(uid, len(code_of)) for uid in columns.series_uids), np.uint64, n)
    # A hash per row finds the usual case, no repeat, in 0.15 s on 755k rows (a set of
    # row tuples took 1.5 s, np.unique of the hashes 0.6 s); identical rows always share a hash, so only a file where
    # two hashes agree takes the exact path. "+ 0.0" makes -0.0 and 0.0 one bit pattern.
    bits = (columns.center_xyz + 0.0).view(np.uint64)
    with np.errstate(over="ignore"):
        hashes = codes * np.uint64(0x9E3779B97F4A7C15) + columns.is_nodule.astype(np.uint64)
        for k in range(3):
            hashes = (hashes ^ bits[:, k]) * np.uint64(0xBF58476D1CE4E5B9)
    hashes.sort()
    if not (hashes[1:] == hashes[:-1]).any():
        return columns
    first_of: dict[tuple, int] = {}
    first = np.array([
        first_of.setdefault((uid, *center, label), i) == i
        for i, (uid, center, label) in enumerate(
            zip(columns.series_uids, columns.center_xyz.tolist(), columns.is_nodule.tolist()))
    ], dtype=bool)
    if first.all():  # two different rows shared a hash
        return columns
    repeated = np.flatnonzero(~first)
    log.warning(
        "%s: dropped %d repeated candidate row(s) (same series, centre and class as an earlier row; "
        "the first at line %d)", table.path, len(repeated), table.lines[int(repeated[0])],
    )
    return CandidateColumns(
        [uid for uid, keep in zip(columns.series_uids, first.tolist()) if keep],
        columns.center_xyz[first],
        columns.is_nodule[first],
    )


def _parse_class(table: _Table, row_index: int, text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (0.0, 1.0):
        raise table.bad_value(table.lines[row_index], "class", text, "0 or 1")
    return value == 1.0


@gc_paused()
def read_candidates(path: PathArg) -> list[Candidate]:
    """Read ``candidates.csv`` / ``candidates_V2.csv``, one `Candidate` per row, in file order."""
    columns = read_candidate_columns(path)
    return [
        Candidate(uid, tuple(xyz), bool(is_nodule))
        for uid, xyz, is_nodule in zip(
            columns.series_uids, columns.center_xyz.tolist(), columns.is_nodule.tolist()
        )
    ]


def read_annotations(path: PathArg) -> list[Annotation]:
    """Read ``annotations.csv`` (the reference nodules), in file order.

    Every diameter must be positive and every nodule (series and centre) listed
    once (module docstring); `read_excluded_annotations` reads the excluded findings.
    """
    table = _read_table(path, ANNOTATION_COLUMNS, ANNOTATION_COLUMNS)
    uids, xyz, diameter = _nodule_columns(table)
    return [Annotation(uid, tuple(center), size) for uid, center, size in zip(uids, xyz.tolist(), diameter.tolist())]


def read_excluded_annotations(path: PathArg) -> list[Annotation]:
    """Read ``annotations_excluded.csv``, in file order.

    Any finite diameter is accepted: the file uses -1 and 0 for findings without a
    measured size (`luna.evaluate.froc` says what size they are given).
    """
    table = _read_table(path, ANNOTATION_COLUMNS, ANNOTATION_COLUMNS)
    return [
        Annotation(uid, tuple(xyz), diameter)
        for uid, xyz, diameter in zip(
            _series_uids(table), _xyz(table).tolist(), table.floats("diameter_mm").tolist()
        )
    ]


def _nodule_columns(table: _Table) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Series, centres and diameters of a file of nodules: positive sizes, each nodule once."""
    uids, xyz, diameter = _series_uids(table), _xyz(table), table.floats("diameter_mm")
    table.require("diameter_mm", diameter > 0,
                  "a positive diameter in mm (a nodule of size 0 or less can never be found)")
    first_line: dict[tuple, int] = {}
    repeats: list[tuple[int, int]] = []
    for uid, center, line in zip(uids, xyz.tolist(), table.lines):
        earlier = first_line.setdefault((uid, *center), line)
        if earlier != line:
            repeats.append((earlier, line))
    if repeats:
        named = ", ".join(f"line {line} repeats line {earlier}" for earlier, line in repeats[:5])
        more = f" and {len(repeats) - 5} more" if len(repeats) > 5 else ""
        raise LunaError(
            f"{table.path}: {len(repeats)} nodule(s) listed more than once (same series and centre): "
            f"{named}{more}. A repeated row counts that nodule twice in every sensitivity and in "
            f"training; delete the repeated rows."
        )
    return uids, xyz, diameter


def read_malignancy_annotations(path: PathArg) -> list[Annotation]:
    """Read ``annotations_with_malignancy.csv``, in file order.

    ``is_malignant`` comes from ``mal_bool``; ``malignancy_ratings`` from
    ``mal_details`` (empty when the field is empty). The bounding-box columns are
    not used. Diameters and repeats are checked as in `read_annotations`.
    """
    table = _read_table(path, MALIGNANCY_COLUMNS, MALIGNANCY_HEADER)
    flags = [
        _parse_bool(table, line, text)
        for text, line in zip(table.strings("mal_bool"), table.lines)
    ]
    ratings = [
        _parse_ratings(table, line, text)
        for text, line in zip(table.strings("mal_details"), table.lines)
    ]
    uids, xyz, diameter = _nodule_columns(table)
    return [
        Annotation(uid, tuple(center), size, flag, rating)
        for uid, center, size, flag, rating in zip(uids, xyz.tolist(), diameter.tolist(), flags, ratings)
    ]


def _parse_bool(table: _Table, line: int, text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise table.bad_value(line, "mal_bool", text, "True or False")


def _parse_ratings(table: _Table, line: int, text: str) -> tuple[int, ...]:
    inner = text.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    try:
        return tuple(int(part) for part in inner.split(",") if part.strip())
    except ValueError:
        raise table.bad_value(
            line, "mal_details", text, "a list of integer ratings like '[4, 2, 4]'"
        ) from None


# -------------------------------------------------------------------------- matching


# ------------------------------------------------------------------ results files


@dataclass(frozen=True)
class Results:
    """A results CSV as columns (one entry per detection, in file order)."""

    series_uids: list[str]
    center_xyz: np.ndarray  # (n, 3) float64
    probability: np.ndarray  # (n,) float64

    def __len__(self) -> int:
        return len(self.series_uids)


def read_results(path) -> Results:
    """Read a ``seriesuid,coordX,coordY,coordZ,probability`` CSV (extra columns are fine).

    Probabilities must lie in [0, 1].
    """
    table = _read_table(path, RESULTS_COLUMNS, RESULTS_COLUMNS)
    return Results(_series_uids(table), _xyz(table), _probabilities(table))


def _probabilities(table: _Table) -> np.ndarray:
    probability = table.floats("probability")
    table.require("probability", (probability >= 0) & (probability <= 1),
                  "a probability between 0 and 1 (scores of another scale must be mapped to [0, 1] first)")
    return probability


def read_malignancy_results(path) -> tuple[Results, np.ndarray]:
    """Read per-nodule malignancy probabilities and labels: (results, bool labels)."""
    table = _read_table(path, MALIGNANCY_RESULTS_COLUMNS, MALIGNANCY_RESULTS_COLUMNS)
    labels = np.empty(len(table.rows), dtype=bool)
    for i, (text, line) in enumerate(zip(table.strings("label"), table.lines)):
        lowered = text.lower()
        if lowered in ("1", "1.0", "true"):
            labels[i] = True
        elif lowered in ("0", "0.0", "false"):
            labels[i] = False
        else:
            raise table.bad_value(line, "label", text, "0 or 1")
    results = Results(_series_uids(table), _xyz(table), _probabilities(table))
    return results, labels


def read_series_list(path) -> list[str]:
    """One series uid per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    check_regular_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LunaError(
            f"{path}: file not found; pass a file with one series uid per line."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise LunaError(f"{path}: cannot read the series list ({error}).") from None
    uids: list[str] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        uid = line.strip()
        if not uid or uid.startswith("#"):
            continue
        if "," in uid or " " in uid:
            raise LunaError(
                f"{path}:{line_number}: {uid!r} is not a series uid; the file needs one "
                f"uid per line and nothing else."
            )
        uids.append(uid)
    if not uids:
        raise LunaError(f"{path}: no series uid in the file; put one uid per line.")
    return list(dict.fromkeys(uids))


# ------------------------------------------------------------------------- writing


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """CSV text as the real LUNA16 files are written: LF line ends, minimal quoting."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: PathArg, header: Sequence[str], rows: Iterable[Sequence[object]]) -> int:
    """Write `csv_text` atomically; returns the bytes written."""
    text = csv_text(header, rows)
    write_atomic(Path(path), text)
    return len(text.encode("utf-8"))


def results_csv_text(rows: Iterable[Sequence]) -> str:
    """A results file from ``(series_uid, x, y, z, probability)`` rows (coordinates exact, p to 6 digits)."""
    return csv_text(RESULTS_COLUMNS, (
        [uid, repr(float(x)), repr(float(y)), repr(float(z)), f"{float(p):.6f}"] for uid, x, y, z, p in rows
    ))
