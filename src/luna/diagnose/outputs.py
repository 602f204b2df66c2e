"""Every file one diagnosis writes into its folder; ``report.json`` last, so that its
presence means the CT is finished (a batch run skips such CTs when resumed).

=======================  ===========================================================
``nodules.csv``          every detection, LUNA16 results format (`luna.diagnose.report`)
``segmentation.nii.gz``  mask at ``--segmentation-threshold`` (`luna.diagnose.volumes`)
``labels.nii.gz``        accepted nodules by number
``probabilities.nii.gz`` with ``--save-probabilities``
``nodules.seg.dcm``      DICOM input with accepted nodules and highdicom installed
                         (`luna.diagnose.dicom_seg`)
``nodule_<k>.png``       per accepted nodule; ``candidate_<k>.png`` for the most probable
                         rejected ones when none is accepted (`luna.diagnose.pictures`)
``overview.png``
``report.html``          self-contained page (`luna.diagnose.html`)
``report.json``          everything above, the provenance and the numbering
=======================  ===========================================================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from luna.diagnose import report as rep
from luna.fileio import write_atomic
from luna.io.luna16 import results_csv_text

__all__ = ["OutputOptions", "write_outputs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputOptions:
    """What to write beside report.json (the command's options)."""

    pictures: bool = True
    save_probabilities: bool = False
    dicom_seg: bool = True
    html: bool = True


def write_outputs(out: Path, diagnosis, probabilities, ct, *, source: str, model_paths, thresholds: dict,
                  provenance: Sequence = (), warnings: Sequence[str] = (), ct_is_synthetic: bool | None = None,
                  dicom_folder: Path | None = None, options: OutputOptions = OutputOptions()) -> dict:
    """Write one diagnosis's files into ``out`` (module docstring); returns kind -> file name."""
    from luna.diagnose.volumes import write_volumes

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    write_atomic(out / "nodules.csv", results_csv_text(rep.results_rows(diagnosis)))
    files["nodules"] = "nodules.csv"
    reported = rep.reported_nodules(diagnosis)
    written, labels = write_volumes(out, ct, probabilities, reported, threshold=thresholds["segmentation"],
                                    save_probabilities=options.save_probabilities)
    files.update(written)
    if dicom_folder is not None and options.dicom_seg:
        name = _dicom_seg(out, ct, labels, reported, dicom_folder)
        if name:
            files["dicom_seg"] = name

    shown = reported or rep.top_candidates(diagnosis)
    overview = thumbnails = pictures = None
    if options.pictures or options.html:
        from luna.diagnose import pictures as pic

        thumbnails, pictures = {}, {}
        for number, nodule in shown:
            pictures[number] = pic.nodule_picture(
                ct, nodule, title=f"{'nodule' if nodule.accepted else 'candidate (rejected)'} {number}")
            thumbnails[number] = pic.thumbnail(ct, nodule)
        overview = pic.overview_picture(ct, shown, probabilities=probabilities, candidates=not reported,
                                        title=f"{diagnosis.series_uid}\n{diagnosis.verdict}")
        if options.pictures:
            for number, nodule in shown:
                name = f"{'nodule' if nodule.accepted else 'candidate'}_{number}.png"
                write_atomic(out / name, pictures[number])
                files[name.removesuffix(".png")] = name
            write_atomic(out / "overview.png", overview)
            files["overview"] = "overview.png"
    if options.html:
        files["html"] = "report.html"
    files["report"] = "report.json"
    report = rep.report_dict(diagnosis, source=source, ct=ct, model_paths=model_paths, thresholds=thresholds,
                             provenance=provenance, warnings=warnings, ct_is_synthetic=ct_is_synthetic, files=files)
    if options.html:
        from luna.diagnose.html import report_html

        write_atomic(out / "report.html", report_html(report, overview=overview, thumbnails=thumbnails,
                                                      pictures=pictures))
    write_atomic(out / "report.json", rep.dumps(report))
    return files


def _dicom_seg(out: Path, ct, labels, reported, folder: Path) -> str | None:
    from luna.diagnose.dicom_seg import DICOM_SEG_NAME, INSTALL_HINT, highdicom_available, write_dicom_seg

    if not reported or not labels.any():
        log.info("no accepted nodule: no DICOM SEG written")
        return None
    if not highdicom_available():
        log.warning("highdicom is not installed: no DICOM SEG written (%s)", INSTALL_HINT)
        return None
    write_dicom_seg(out / DICOM_SEG_NAME, ct, labels, reported, folder)
    return DICOM_SEG_NAME
