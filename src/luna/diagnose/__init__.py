"""``luna diagnose`` (``python -m luna.diagnose``): the command, and the files it writes.

The pipeline itself (segment, group, classify, verdict) is `luna.inference`; this
package is the user-facing side:

- `luna.diagnose.__main__`: options; one CT, or a batch;
- `luna.diagnose.batch`: many CTs, resumable, failures skipped, torchrun shards, merged results;
- `luna.diagnose.outputs`: every file of one diagnosis (report.json written last);
- `luna.diagnose.report`: the numbering of detections, the table, report.json, nodules.csv rows;
- `luna.diagnose.html`: report.html (self-contained) and a batch's index.html;
- `luna.diagnose.pictures`: PNGs in the radiological convention;
- `luna.diagnose.volumes`: the mask, the nodule label map, the probabilities (NIfTI);
- `luna.diagnose.dicom_seg`: the DICOM SEG of the accepted nodules (highdicom).

Nothing here imports `luna.training`, `luna.data` or `luna.synth`.
"""
