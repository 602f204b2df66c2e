"""Inference: from a loaded CT and trained networks to classified nodules.

- `luna.inference.segment`: `segment_ct`, the UNet over every axial slice -> probabilities;
- `luna.inference.grouping`: `group_detections`, probabilities -> candidate `Detection`s;
- `luna.inference.lungs`: `lung_mask`, `keep_near_lungs`, where lung nodules can be;
- `luna.inference.classify`: `classify_chunks`, p(class) for the chunk around each centre;
- `luna.inference.measure`: `nodule_extent`, a detection's centre and diameter read on the CT;
- `luna.inference.merge`: `distinct_findings`, one finding per structure (overlapping spheres);
- `luna.inference.pipeline`: `diagnose` (the steps above + `verdict`), `Diagnosis`,
  `Nodule`, `Models` / `load_models`.

The diagnosis command, the training stages' validation, the bench and the evaluation
all call these; nothing here reads files except `load_models`.
"""
