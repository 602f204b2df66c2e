"""``report.html``: one self-contained page per diagnosis, and ``index.html`` for a batch.

The page needs nothing beside it to show: its pictures are inline (``data:`` URIs,
base64 PNG) and its style is in the page. From the top: the verdict, the warnings
about the models (`luna.runs.provenance_warnings`: phantom-trained models on a real
CT, unknown provenance), what the models were trained on, the nodule table with a
thumbnail per nodule (numbers as everywhere, `luna.diagnose.report.numbered`), the
overview, the three views of each nodule, then the CT, the thresholds and links to
the files beside it (the NIfTI volumes, the DICOM SEG, report.json, nodules.csv),
which open in 3D Slicer, ITK-SNAP or a PACS viewer. Every text from the report is
escaped.
"""

from __future__ import annotations

import base64
import html
from typing import Mapping, Sequence

from luna.diagnose.report import count_line

__all__ = ["index_html", "report_html"]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1b1f24; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.45em; margin-bottom: 0.2em; word-break: break-all; }
h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.verdict { font-size: 1.3em; font-weight: 600; padding: 12px 16px; border-radius: 6px; background: #eef6ee;
           border: 1px solid #9cc89c; }
.verdict.suspect { background: #fdecea; border-color: #e0a09a; }
.warning { padding: 10px 16px; border-radius: 6px; background: #fff4d6; border: 2px solid #d4a72c;
           margin: 10px 0; font-weight: 600; }
.muted { color: #57606a; font-size: 0.92em; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 9px; text-align: right; vertical-align: middle; }
th { background: #f3f5f7; }
td.left, th.left { text-align: left; }
tr.rejected td { color: #6e7781; }
img { max-width: 100%; }
img.thumb { width: 110px; height: 110px; display: block; }
figure { margin: 12px 0; }
figcaption { font-size: 0.92em; color: #57606a; }
code { font-size: 0.95em; }
"""


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, alt: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} alt="{html.escape(alt)}" src="{_png_uri(data)}">'


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_html(report: Mapping, *, overview: bytes | None = None, thumbnails: Mapping[int, bytes] | None = None,
                pictures: Mapping[int, bytes] | None = None) -> str:
    """The page for one diagnosis from its report.json dict and PNG bytes (keys: nodule numbers)."""
    e = html.escape
    thumbnails, pictures = thumbnails or {}, pictures or {}
    nodules = report["nodules"]
    accepted = [n for n in nodules if n["accepted"]]
    shown = accepted or [n for n in nodules if n["number"] in thumbnails]
    suspect = "malignant" in report["verdict"] and "none suspected" not in report["verdict"]
    parts = [f"<h1>luna diagnosis: {e(report['series_uid'])}</h1>",
             f'<p class="muted">{e(report["input"])} &middot; written {e(report["written"])} by luna '
             f'{e(report["luna_version"])}</p>',
             f'<div class="verdict{" suspect" if suspect else ""}" id="verdict">verdict: {e(report["verdict"])}</div>']
    parts += [f'<div class="warning">WARNING: {e(w)}</div>' for w in report.get("warnings", [])]
    source = report.get("malignancy_source")
    if source and source != "model":
        parts.append(f'<p id="malignancy-source">p(malignant) from {e(source.removeprefix("diameter: "))}</p>')

    parts.append('<h2 id="provenance">Models and what they were trained on</h2><ul id="provenance-list">')
    for p in report.get("provenance", []):
        parts.append(f"<li>{e(_provenance_line(p))}</li>")
    if not report.get("provenance"):
        parts.append("<li>not recorded</li>")
    parts.append("</ul>")

    title = "Nodules" if accepted else "No nodule accepted: the most probable candidates (rejected)"
    parts.append(f'<h2 id="nodules">{e(title)}</h2>')
    th = lambda t, left=False: f'<th{" class=left" if left else ""}>{t}</th>'
    parts.append('<table id="nodule-table"><thead><tr>' + "".join([
        th("#"), th("view", True), th("x mm"), th("y mm"), th("z mm"), th("diameter mm"), th("p(nodule)"),
        th("p(malignant)"), th("picture", True)]) + "</tr></thead><tbody>")
    for n in shown:
        k = n["number"]
        thumb = _img(thumbnails[k], f"nodule {k}, axial", "thumb") if k in thumbnails else ""
        link = f'<a href="#nodule-{k}">views</a>' if k in pictures else ""
        x, y, z = n["center_xyz"]
        parts.append(
            f'<tr class="{"accepted" if n["accepted"] else "rejected"}" data-number="{k}"><td>{k}</td>'
            f'<td class="left">{thumb}</td><td>{x:.1f}</td><td>{y:.1f}</td><td>{z:.1f}</td>'
            f'<td>{n["diameter_mm"]:.1f}</td><td>{n["p_nodule"]:.3f}</td><td>{_fmt(n["p_malignant"])}</td>'
            f'<td class="left">{link}</td></tr>')
    if not shown:
        parts.append('<tr><td colspan="9" class="left">no detection at all</td></tr>')
    parts.append("</tbody></table>")
    t = report["thresholds"]
    counts = count_line(len(nodules), report["duplicates_merged"], len(accepted), t["nodule"])
    parts.append(f'<p class="muted">{e(counts)}; '
                 f'verdict: the highest p(malignant) of the accepted nodules against {t["malignancy"]}. '
                 'Coordinates: patient mm, LPS (x to the patient\'s left, y posterior, z superior), as in DICOM '
                 'and LUNA16. Every detection but the merged duplicates is in nodules.csv and report.json.</p>')

    if overview is not None:
        parts.append('<h2 id="overview">Overview</h2><figure>' + _img(overview, "overview") +
                     "<figcaption>Axial maximum-intensity projection of the CT with the nodules numbered as in the "
                     "table; right: the segmentation's highest p(nodule) along the slices.</figcaption></figure>")
    for n in shown:
        k = n["number"]
        if k in pictures:
            what = "nodule" if n["accepted"] else "candidate (rejected)"
            parts.append(f'<h2 id="nodule-{k}">{what} {k}</h2><figure>'
                         + _img(pictures[k], f"nodule {k}: axial, coronal, sagittal")
                         + "<figcaption>Axial, coronal and sagittal views through its centre, lung window, "
                           "radiological orientation (letters at the edges).</figcaption></figure>")

    g = report["geometry"]
    shape = "×".join(str(s) for s in g["shape_irc"])
    spacing = " × ".join(f"{s:.2f}" for s in g["spacing_xyz"])
    parts.append('<h2 id="ct">CT and settings</h2><table class="facts">'
                 f'<tr><th class="left">input</th><td class="left">{e(report["input"])}</td></tr>'
                 f'<tr><th class="left">voxels (slices × rows × columns)</th><td class="left">{shape}</td></tr>'
                 f'<tr><th class="left">spacing x × y × z</th><td class="left">{spacing} mm</td></tr>'
                 f'<tr><th class="left">thresholds</th><td class="left">{e(", ".join(f"{k} {v}" for k, v in t.items()))}'
                 '</td></tr>'
                 f'<tr><th class="left">time</th><td class="left">'
                 f'{e(", ".join(f"{k} {v:.1f} s" for k, v in report["timings_s"].items()))}</td></tr></table>')

    files = report.get("files", {})
    links = [(name, what) for name, what in (
        (files.get("segmentation"), "segmentation mask (NIfTI, with the CT's geometry)"),
        (files.get("labels"), "nodule label map (NIfTI; voxel value = nodule number)"),
        (files.get("probabilities"), "probability map (NIfTI)"),
        (files.get("dicom_seg"), "DICOM SEG of the accepted nodules (references the source series)"),
        (files.get("nodules"), "every detection, LUNA16 results CSV"),
        (files.get("report"), "this report as JSON"),
    ) if name]
    parts.append('<h2 id="files">Files</h2><ul id="files-list">'
                 + "".join(f'<li><a href="{e(name)}">{e(name)}</a>: {e(what)}</li>' for name, what in links)
                 + "</ul><p class=\"muted\">luna is research software, not a medical device.</p>")
    return _page(f"luna: {report['verdict']} ({report['series_uid']})", "\n".join(parts))


def _provenance_line(p: Mapping) -> str:
    from luna.runs import Provenance

    return Provenance(**p).describe()


def index_html(rows: Sequence[Mapping], *, title: str, summary: str) -> str:
    """A batch's page: one row per CT (key, verdict, nodules, link to its report.html, its report's
    warnings, or its error)."""
    e = html.escape
    body = [f"<h1>{e(title)}</h1>", f'<p class="muted">{e(summary)}</p>',
            '<table id="batch-table"><thead><tr><th class="left">CT</th><th class="left">verdict</th>'
            "<th>accepted</th><th>top p(malignant)</th><th class=left>report</th><th class=left>warnings</th>"
            "</tr></thead><tbody>"]
    for r in rows:
        if r.get("status") == "failed":
            body.append(f'<tr class="rejected"><td class="left">{e(r["key"])}</td>'
                        f'<td class="left" colspan="5">failed: {e(r.get("error") or "")}</td></tr>')
            continue
        report = f'<a href="{e(r["key"])}/report.html">report</a>' if r.get("html") else ""
        warnings = "<br>".join(f"WARNING: {e(w)}" for w in r.get("warnings") or ())
        body.append(f'<tr><td class="left">{e(r["key"])}</td><td class="left">{e(r.get("verdict") or "")}</td>'
                    f'<td>{r.get("accepted", "")}</td><td>{_fmt(r.get("top_p_malignant"))}</td>'
                    f'<td class="left">{report}</td><td class="left">{warnings}</td></tr>')
    body.append("</tbody></table>")
    return _page(title, "\n".join(body))
